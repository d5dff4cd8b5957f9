#!/usr/bin/env bash
# Builds the tiny test kernel (vmlinux + bzImage) from Debian's linux-source-6.1 and caches it
# outside git. Guest kernel mode is emulated on the development machines (see design.md), so the
# config is tinyconfig plus only what the tests assert on, and two instructions the emulator cannot
# run are kept off the boot path (the INT3 self-test, the FWAIT of a task's exit).
#
# Two flavours:
#   plain   no ACPI: CPUs from the MP table, virtio-mmio devices from virtio_mmio.device= (--acpi off)
#   acpi    ACPI and PCI on, virtio-mmio without command-line devices: everything from the tables,
#           as a distribution kernel finds it (--acpi on, the default)
#
# Usage: scripts/build-tiny-kernel.sh [plain|acpi]   prints the cache directory holding vmlinux, bzImage
# Env:   VIREO_CACHE (default ~/.cache/vireo)
set -euo pipefail

flavour=${1:-plain}
case "$flavour" in
  plain|acpi) ;;
  *) echo "build-tiny-kernel: flavour '$flavour' is not one of plain, acpi" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${VIREO_CACHE:-$HOME/.cache/vireo}
# The cache key is this script itself: changing the recipe rebuilds the kernel.
key=$(sha256sum "$here/build-tiny-kernel.sh" | cut -c1-16)
out="$cache_root/tiny-kernel-$flavour-$key"
if [[ -f "$out/vmlinux" && -f "$out/bzImage" ]]; then
  echo "$out"
  exit 0
fi
# One build at a time (tests and scripts may ask concurrently); the winner's result is reused.
mkdir -p "$cache_root"
exec 9>"$cache_root/.tiny-kernel.lock"
flock 9
if [[ -f "$out/vmlinux" && -f "$out/bzImage" ]]; then
  echo "$out"
  exit 0
fi

src_tar=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1 || true)
if [[ -z "$src_tar" ]]; then
  echo "build-tiny-kernel: /usr/src/linux-source-6.1.tar.* missing; run scripts/setup.sh first" >&2
  exit 1
fi

work=$(mktemp -d "$cache_root.build.XXXXXX" 2>/dev/null || { mkdir -p "$cache_root"; mktemp -d "$cache_root/build.XXXXXX"; })
trap 'rm -rf "$work"' EXIT
echo "build-tiny-kernel: unpacking $src_tar" >&2
tar -C "$work" -xf "$src_tar"
cd "$work"/linux-source-6.1

# The emulator cannot deliver INT3, so the boot-time self-test would hang the guest.
sed -i 's/^\(\s*\)int3_selftest();/\1\/\* int3_selftest() removed for the emulated test hosts \*\//' \
  arch/x86/kernel/alternative.c
grep -q 'int3_selftest() removed' arch/x86/kernel/alternative.c

# KVM's instruction emulator has no FWAIT (opcode 0x9b), and fpu__drop() runs one whenever a task
# exits. The first kernel thread to exit during boot (workqueues reap idle kworkers after 300 s of
# guest time, which an emulated boot on a loaded host reaches) stopped the VM with an emulation
# failure. The FWAIT only swallows delayed x87 exceptions from user space, which cannot run here.
sed -i 's/asm volatile("1: fwait\\n"/asm volatile("1: nop\\n"/' arch/x86/kernel/fpu/core.c
grep -q 'asm volatile("1: nop\\n"' arch/x86/kernel/fpu/core.c

make -s tinyconfig >&2
enable=(64BIT PRINTK EARLY_PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP
        BINFMT_ELF PROC_FS SYSFS DEVTMPFS HYPERVISOR_GUEST PARAVIRT KVM_GUEST KERNEL_LZ4
        SMP X86_MPPARSE
        BLOCK BLK_DEV VIRTIO_MENU VIRTIO_MMIO VIRTIO_BLK EXT4_FS
        NET INET NETDEVICES NET_CORE VIRTIO_NET IP_PNP IP_PNP_DHCP HW_RANDOM HW_RANDOM_VIRTIO)
disable=(KERNEL_XZ KERNEL_GZIP KERNEL_BZIP2 KERNEL_LZMA KERNEL_LZO KERNEL_ZSTD)
if [[ "$flavour" == acpi ]]; then
  # ACPI's region setup needs PCI; the button driver (with input) shows the DSDT's power button
  # bound; VMGENID is the driver for the generation ID device; FUSE and VIRTIO_FS mount a shared
  # folder as the root file system (root=TAG rootfstype=virtiofs).
  enable+=(ACPI PCI INPUT ACPI_BUTTON VIRT_DRIVERS VMGENID FUSE_FS VIRTIO_FS)
  disable+=(VIRTIO_MMIO_CMDLINE_DEVICES)
else
  enable+=(VIRTIO_MMIO_CMDLINE_DEVICES)
fi
args=()
for o in "${enable[@]}"; do args+=(--enable "$o"); done
for o in "${disable[@]}"; do args+=(--disable "$o"); done
scripts/config "${args[@]}" --set-val NR_CPUS 8
make -s olddefconfig >&2
for o in "${enable[@]}"; do
  grep -q "^CONFIG_$o=y" .config || { echo "build-tiny-kernel: CONFIG_$o did not stick" >&2; exit 1; }
done
for o in "${disable[@]}"; do
  if grep -q "^CONFIG_$o=y" .config; then echo "build-tiny-kernel: CONFIG_$o is still on" >&2; exit 1; fi
done

echo "build-tiny-kernel: building (a few minutes on 2 cores)" >&2
make -s -j"$(nproc)" vmlinux bzImage >&2

mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp .config "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"

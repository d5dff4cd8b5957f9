#!/usr/bin/env bash
# Builds the container guest kernel (bzImage) the containerd shim boots (docs/containerd.md), from
# Debian's linux-source-6.1, and caches it outside git. It is the tiny test kernel's recipe
# (scripts/build-tiny-kernel.sh, whose cache key this script leaves alone) plus what a container's
# processes need: user ids, futexes, epoll, ptys, tmpfs, PID/UTS/IPC/mount namespaces, scripts,
# and the agent's channels on both engines (virtio-serial on PCI for the qemu engine, virtio-vsock
# on virtio-mmio for the kvm engine), IP_PNP: the kernel configures a pod's address and
# gateway from `ip=` on its command line (the shim passes what CNI gave the pod), and
# VIRTIO_BALLOON: a lower memory limit from Update is the balloon's share of the VM's RAM.
#
# Usage: scripts/build-guest-kernel.sh        prints the cache directory holding bzImage
# Env:   VIREO_CACHE (default ~/.cache/vireo)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${VIREO_CACHE:-$HOME/.cache/vireo}
key=$(sha256sum "$here/build-guest-kernel.sh" | cut -c1-16)
out="$cache_root/guest-kernel-$key"
if [[ -f "$out/bzImage" ]]; then echo "$out"; exit 0; fi
mkdir -p "$cache_root"
exec 9>"$cache_root/.guest-kernel.lock"
flock 9
if [[ -f "$out/bzImage" ]]; then echo "$out"; exit 0; fi

src_tar=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1 || true)
if [[ -z "$src_tar" ]]; then
  echo "build-guest-kernel: /usr/src/linux-source-6.1.tar.* missing; run scripts/setup.sh first" >&2
  exit 1
fi
work=$(mktemp -d "$cache_root/guest-kernel.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build-guest-kernel: unpacking $src_tar" >&2
tar -C "$work" -xf "$src_tar"
cd "$work"/linux-source-6.1
# The same two edits as the tiny kernel's, for the same reasons (the kvm engine on emulated hosts):
# no INT3 self-test, no FWAIT when a task exits.
sed -i 's/^\(\s*\)int3_selftest();/\1\/\* int3_selftest() removed for the emulated test hosts \*\//' \
  arch/x86/kernel/alternative.c
grep -q 'int3_selftest() removed' arch/x86/kernel/alternative.c
sed -i 's/asm volatile("1: fwait\\n"/asm volatile("1: nop\\n"/' arch/x86/kernel/fpu/core.c
grep -q 'asm volatile("1: nop\\n"' arch/x86/kernel/fpu/core.c

make -s tinyconfig >&2
enable=(64BIT PRINTK EARLY_PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP
        BINFMT_ELF BINFMT_SCRIPT PROC_FS SYSFS DEVTMPFS HYPERVISOR_GUEST PARAVIRT KVM_GUEST KERNEL_LZ4
        SMP X86_MPPARSE ACPI PCI PCI_MSI INPUT ACPI_BUTTON
        BLOCK BLK_DEV VIRTIO_MENU VIRTIO_MMIO VIRTIO_PCI VIRTIO_BLK VIRTIO_CONSOLE EXT4_FS
        HW_RANDOM HW_RANDOM_VIRTIO VIRTIO_BALLOON
        NET UNIX INET IP_PNP NETDEVICES NET_CORE VIRTIO_NET VSOCKETS VIRTIO_VSOCKETS
        MULTIUSER FUTEX EPOLL SIGNALFD TIMERFD EVENTFD SHMEM TMPFS POSIX_TIMERS FILE_LOCKING
        UNIX98_PTYS INOTIFY_USER PROC_SYSCTL SYSVIPC
        NAMESPACES UTS_NS IPC_NS PID_NS)
disable=(KERNEL_XZ KERNEL_GZIP KERNEL_BZIP2 KERNEL_LZMA KERNEL_LZO KERNEL_ZSTD VIRTIO_MMIO_CMDLINE_DEVICES)
args=()
for o in "${enable[@]}"; do args+=(--enable "$o"); done
for o in "${disable[@]}"; do args+=(--disable "$o"); done
scripts/config "${args[@]}" --set-val NR_CPUS 8
make -s olddefconfig >&2
for o in "${enable[@]}"; do
  grep -q "^CONFIG_$o=y" .config || { echo "build-guest-kernel: CONFIG_$o did not stick" >&2; exit 1; }
done
for o in "${disable[@]}"; do
  if grep -q "^CONFIG_$o=y" .config; then echo "build-guest-kernel: CONFIG_$o is still on" >&2; exit 1; fi
done
echo "build-guest-kernel: building (a few minutes on 2 cores)" >&2
make -s -j"$(nproc)" bzImage >&2
mkdir -p "$out.tmp"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp .config "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"

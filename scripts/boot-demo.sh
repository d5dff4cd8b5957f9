#!/usr/bin/env bash
# The README's "boot a VM" command: sets everything up, builds the tiny Linux kernel (cached after
# the first time) and boots it with two vCPUs on the serial console of this terminal.
# Extra arguments go to `vireo run` (e.g. --cpus 4 --memory 1G).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
# The ACPI flavour: it finds its CPUs, devices and power button in Vireo's ACPI tables, as a
# distribution kernel does.
kernel_dir=$(scripts/build-tiny-kernel.sh acpi)
initramfs=$(scripts/make-initramfs.sh)
# noxsave, clearcpuid, nopv and nofsgsbase only matter on hosts whose KVM emulates guest kernel mode (like the
# project's CI); they are harmless elsewhere. nopv also turns off kvmclock, where an ACPI guest
# learns its TSC frequency, so that is handed over too (docs/acpi.md).
tsc_khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
tsc_option=${tsc_khz:+tsc_early_khz=$tsc_khz}
exec .build/release/vireo run --kernel "$kernel_dir/vmlinux" --initrd "$initramfs" --cpus 2 --memory 256M \
  --cmdline "console=ttyS0 noxsave clearcpuid=smap,popcnt nopv nofsgsbase $tsc_option panic=-1 reboot=acpi" "$@"

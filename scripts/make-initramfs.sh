#!/usr/bin/env bash
# Builds a minimal initramfs (a static /init that exits at once) and prints its path. Guest user
# space cannot make system calls on the emulated CI hosts, so the kernel reaching /init and
# panicking when it exits is the end of a demo boot there.
set -euo pipefail
cache_root=${VIREO_CACHE:-$HOME/.cache/vireo}
out="$cache_root/initramfs-demo.cpio.gz"
if [[ -f "$out" ]]; then echo "$out"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root" "$cache_root"
printf 'void _start(void) { __asm__ volatile("mov $60, %%eax; xor %%edi, %%edi; syscall"); for (;;) {} }\n' > "$work/init.c"
gcc -static -nostdlib -O2 -o "$work/root/init" "$work/init.c"
(cd "$work/root" && echo init | cpio -o -H newc 2>/dev/null | gzip -9 > "$out.tmp")
mv "$out.tmp" "$out"
echo "$out"

#!/usr/bin/env bash
# Builds what a containerd sandbox VM boots (docs/containerd.md): the container guest kernel
# (scripts/build-guest-kernel.sh, cached) and an initramfs whose /init is Vireo's container agent
# (statically linked, from this package's build). Prints the directory holding bzImage and
# agent.cpio.gz.
#
# Usage: scripts/build-container-guest.sh [--install] [debug|release]
#   --install   also copy both to /usr/local/lib/vireo/containerd, where the shim looks by default
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
install=0
config=debug
for argument in "$@"; do
  case "$argument" in
    --install) install=1 ;;
    debug|release) config=$argument ;;
    *) echo "build-container-guest: unknown argument '$argument'" >&2; exit 2 ;;
  esac
done
kernel_dir=$("$here/build-guest-kernel.sh")
(cd "$root" && swift build -c "$config" --product vireo-container-agent >&2)
agent="$root/.build/$config/vireo-container-agent"
out="$root/.build/container-guest-$config"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root"/{dev,proc,sys,run,tmp,bin}
cp "$agent" "$work/root/init"
strip "$work/root/init"
# The kernel opens /dev/console for /init's output before anything is mounted.
mknod -m 600 "$work/root/dev/console" c 5 1
mknod -m 666 "$work/root/dev/null" c 1 3
mkdir -p "$out"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -6 > "$out/agent.cpio.gz.tmp")
mv "$out/agent.cpio.gz.tmp" "$out/agent.cpio.gz"
cp "$kernel_dir/bzImage" "$out/bzImage"
if [[ $install == 1 ]]; then
  install -d /usr/local/lib/vireo/containerd
  install -m 644 "$out/bzImage" "$out/agent.cpio.gz" /usr/local/lib/vireo/containerd/
fi
echo "$out"

#!/usr/bin/env bash
# Downloads Debian's stock amd64 kernel package (about 70 MB) once and prints the path of its
# bzImage (/boot/vmlinuz-*), cached in ~/.cache/vireo. A real distribution kernel is the loader
# tests' fixture: Vireo must parse and place exactly what people will boot.
set -euo pipefail
cache_root=${VIREO_CACHE:-$HOME/.cache/vireo}
package=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [[ -z "$package" ]]; then
  apt-get update -qq >&2
  package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
out="$cache_root/debian-kernel/$package"
if compgen -G "$out/vmlinuz-*" >/dev/null; then ls "$out"/vmlinuz-* | head -n1; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"   # apt downloads as the _apt user when it can
(cd "$work" && apt-get download -qq "$package" >&2)
dpkg-deb --fsys-tarfile "$work"/*.deb | tar -x -C "$work" --wildcards './boot/vmlinuz-*'
mkdir -p "$out"
mv "$work"/boot/vmlinuz-* "$out/"
ls "$out"/vmlinuz-* | head -n1

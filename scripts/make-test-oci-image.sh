#!/usr/bin/env bash
# Makes a small OCI image archive from Debian's busybox-static (no registry is reached), for the
# containerd tests: `ctr image import --index-name NAME FILE` takes it.
# Usage: scripts/make-test-oci-image.sh OUT.tar [NAME]
set -euo pipefail
out=${1:?usage: make-test-oci-image.sh OUT.tar [NAME]}
name=${2:-docker.io/vireo/busybox:test}
busybox=/bin/busybox
# Static: no program interpreter in its headers (readelf is binutils', which build-essential brings).
[[ -x $busybox ]] && ! readelf -l "$busybox" | grep -q "program interpreter" || { echo "make-test-oci-image: $busybox is missing or not static; install busybox-static" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp" "$work/rootfs/root" "$work/image/blobs/sha256"
cp "$busybox" "$work/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [[ $applet == busybox ]] || ln -sf busybox "$work/rootfs/bin/$applet"
done
chmod 1777 "$work/rootfs/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$work/rootfs/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' > "$work/rootfs/etc/group"
tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$work/rootfs" -cf "$work/layer.tar" .
layer=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar")
mv "$work/layer.tar" "$work/image/blobs/sha256/$layer"
cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:$layer"]}}
JSON
config=$(sha256sum "$work/config.json" | cut -d' ' -f1)
config_size=$(stat -c %s "$work/config.json")
mv "$work/config.json" "$work/image/blobs/sha256/$config"
cat > "$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:$layer","size":$layer_size}]}
JSON
manifest=$(sha256sum "$work/manifest.json" | cut -d' ' -f1)
manifest_size=$(stat -c %s "$work/manifest.json")
mv "$work/manifest.json" "$work/image/blobs/sha256/$manifest"
cat > "$work/image/index.json" <<JSON
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$manifest_size,"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"test"}}]}
JSON
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/image/oci-layout"
tar --numeric-owner --owner=0 --group=0 -C "$work/image" -cf "$out" oci-layout index.json blobs
echo "$out"

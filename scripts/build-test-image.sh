#!/usr/bin/env bash
# Builds the debian-12 image the image tests use, with `vireo image build --cache-dir`, into a
# throwaway library: the build is kept in ~/.cache/vireo/images and reused while its recipe
# (release, packages, mirror, size, builder version) is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${HOME}/.cache/vireo/images"
home="$(mktemp -d /tmp/vireo-image-build.XXXXXX)"
trap 'rm -rf "$home"' EXIT
mkdir -p "$cache"
# Downloaded packages are kept beside the builds, so a rebuild after a recipe change fetches
# only what changed.
mkdir -p "$cache/debs" "$home/images"
ln -s "$cache/debs" "$home/images/.debs"
VIREO_HOME="$home" .build/debug/vireo image build debian-12 --cache-dir "$cache" >&2

#!/usr/bin/env bash
# Builds vireo-fuzz with libFuzzer and AddressSanitizer (in .build-fuzz, apart from the normal
# build) and fuzzes one target: scripts/fuzz.sh virtqueue|qcow2 [SECONDS] [libFuzzer options...]
# Crashes land in fuzz/crashes/<target>/; reproduce one with `vireo-fuzz TARGET FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh virtqueue|qcow2 [SECONDS]}
seconds=${2:-60}
shift $(( $# > 1 ? 2 : 1 ))
swift build --build-path .build-fuzz --product vireo-fuzz -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING >&2
corpus="fuzz/corpus/$target"
crashes="fuzz/crashes/$target"
mkdir -p "$corpus" "$crashes"
VIREO_FUZZ_TARGET=$target .build-fuzz/debug/vireo-fuzz "$corpus" -max_total_time="$seconds" \
  -artifact_prefix="$crashes/" -max_len=70000 -rss_limit_mb=4096 "$@"

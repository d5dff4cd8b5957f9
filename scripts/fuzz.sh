#!/usr/bin/env bash
# Builds vireo-fuzz with libFuzzer and AddressSanitizer (in .build-fuzz, apart from the normal
# build) and fuzzes one target:
#   scripts/fuzz.sh virtqueue|qcow2|savedstate|migration|iso9660|manifest|apibody|offer|nbd|ovf|agentstream [SECONDS] [libFuzzer options...]
# Crashes land in fuzz/crashes/<target>/; reproduce one with `vireo-fuzz TARGET FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh virtqueue|qcow2|savedstate|migration|iso9660|manifest|apibody|offer|nbd|ovf|agentstream [SECONDS]}
seconds=${2:-60}
shift $(( $# > 1 ? 2 : 1 ))
swift build --build-path .build-fuzz --product vireo-fuzz -Xswiftc -sanitize=fuzzer,address -Xswiftc -use-ld=lld >&2
corpus="fuzz/corpus/$target"
crashes="fuzz/crashes/$target"
mkdir -p "$corpus" "$crashes"
# Seed an empty qcow2 corpus with real images, so the search starts past the magic number.
if [[ $target == qcow2 && -z $(ls -A "$corpus") ]]; then
  for cluster in 512 4096 65536; do
    seed="$corpus/seed-$cluster.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=$cluster "$seed" 1M
    qemu-io -c "write -P 0x5a 0 8k" -c "write -z 64k 4k" "$seed" >/dev/null
  done
  qemu-img snapshot -c snap "$corpus/seed-4096.qcow2"
  qemu-img create -q -f qcow2 -F raw -b /nonexistent/base.raw -u "$corpus/seed-backed.qcow2" 1M
fi
# The other targets start from the well-formed inputs vireo-fuzz itself knows (written by a
# normal build, whose main is Vireo's rather than libFuzzer's).
if [[ -z $(ls -A "$corpus") ]]; then
  swift build --product vireo-fuzz >&2
  .build/debug/vireo-fuzz seed "$target" "$corpus"
fi
VIREO_FUZZ_TARGET=$target .build-fuzz/debug/vireo-fuzz "$corpus" -max_total_time="$seconds" \
  -artifact_prefix="$crashes/" -max_len=70000 -rss_limit_mb=4096 "$@"

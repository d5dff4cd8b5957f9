#!/usr/bin/env bash
# The README's test command: installs what is needed, builds, builds the tiny kernel (cached
# outside git) and runs the whole suite. Tests that need /dev/kvm fail, never skip, without it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [[ ! -c /dev/kvm ]]; then
  echo "test: /dev/kvm is missing; the VMM tests will fail (they never skip)" >&2
fi
# Built here once so its minutes show up on their own, not inside one test's time limit.
scripts/build-tiny-kernel.sh plain >/dev/null
scripts/build-tiny-kernel.sh acpi >/dev/null
swift build --build-tests
# The debian-12 image, built for real by `vireo image build` and kept in ~/.cache/vireo/images
# (keyed on its recipe): a fresh machine builds it once, before the suite, so its minutes are
# not inside a test's time limit; the image tests then import the kept build.
scripts/build-test-image.sh
swift test --skip-build "$@"

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
# The containerd shim's guest: its kernel (cached) and the agent's initramfs from this build.
scripts/build-container-guest.sh >/dev/null
# The debian-12 image, built for real by `vireo image build` and kept in ~/.cache/vireo/images
# (keyed on its recipe): a fresh machine builds it once, before the suite, so its minutes are
# not inside a test's time limit; the image tests then import the kept build.
scripts/build-test-image.sh
# The Debian archive indexes the unattended-install test serves as its mirror, fetched from
# Debian's archive once (cached per installer version), here rather than inside the test.
python3 scripts/make-installer-mirror.py "${HOME}/.cache/vireo/installer-mirror-$(dpkg-query -W -f='${Version}' debian-installer-12-netboot-amd64 | tr + _)/debian"
# Every temporary file the suite makes (tests, the VMs they start, the tools they run) goes into
# one directory for this run, removed when the run ends however it ends: the tests' own
# directories hold disks, images and saved states, and a run that left them in /tmp filled the
# disk after a few dozen runs (CI then failed with ENOSPC). A run killed before its trap leaves
# its directory behind; the next run removes it once its owner is gone.
for stale in /tmp/vireo-suite.*; do
  [[ -d "$stale" ]] || continue
  owner=$(cat "$stale/.owner" 2>/dev/null || echo 0)
  if [[ "$owner" -gt 0 ]] && kill -0 "$owner" 2>/dev/null; then continue; fi
  rm -rf --one-file-system "$stale" || echo "test: could not remove $stale, left by an earlier run" >&2
done
suite_tmp=$(mktemp -d /tmp/vireo-suite.XXXXXX)
echo $$ > "$suite_tmp/.owner"
chmod 1777 "$suite_tmp"   # as /tmp: jailed VMMs (their own uids) reach the tests' files through it
if [[ -n "${VIREO_KEEP_TEST_FILES:-}" ]]; then
  echo "test: keeping this run's files in $suite_tmp (VIREO_KEEP_TEST_FILES)" >&2
else
  trap 'rm -rf --one-file-system "$suite_tmp"' EXIT
fi
# The suite's disks, images and saved states need room; without it tests fail deep inside with
# ENOSPC, so say it here, with the figure.
needed_kib=$((8 * 1024 * 1024))
free_kib=$(df -Pk "$suite_tmp" | awk 'NR == 2 { print $4 }')
if (( free_kib < needed_kib )); then
  echo "test: $((free_kib / 1024)) MiB free under /tmp; the suite needs $((needed_kib / 1024)) MiB for its disks, images and saved states" >&2
  exit 1
fi
TMPDIR=$suite_tmp swift test --skip-build "$@"

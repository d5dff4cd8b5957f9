#!/usr/bin/env bash
# Installs what Vireo needs on a fresh Debian 12 machine and builds it. Idempotent: packages
# already present are not reinstalled.
#   scripts/setup.sh         everything the tests use; a debug build (what the tests run)
#   scripts/setup.sh demo    only what scripts/boot-demo.sh uses: its packages and a release
#                            build of the two programs it runs, nothing else (the first run's time)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-tests}
case "$profile" in
  tests|demo) ;;
  *) echo "setup: '$profile' is not one of tests, demo" >&2; exit 2 ;;
esac

# What the demo needs: the Swift build's C libraries (vireo and vireo-vmm link libstdc++, zlib,
# libseccomp and libxcrypt from their archives: Linking/static-archives) and the tiny kernel's build.
demo_packages=(
  build-essential          # gcc/make: the tiny kernel and its initramfs
  linux-source-6.1         # the tiny kernel's source
  flex bison bc libelf-dev libssl-dev cpio lz4 xz-utils gzip   # kernel build and initramfs
  zlib1g-dev                                                   # qcow2 compressed clusters
  libseccomp-dev                                               # the VMM's seccomp filters (docs/isolation.md)
  libiscsi-dev                                                 # iSCSI disks: libiscsi's headers (the VMM loads the library when a disk needs it)
  libgnutls28-dev                                              # NBD over TLS (nbds://): GnuTLS's headers (loaded the same way)
)
# The tests use all of the demo's and these.
packages=(
  "${demo_packages[@]}"    # gcc/make also build the probe guests
  qemu-system-x86 qemu-utils                                   # the qemu engine; peers for benchmarks and image checks
  seabios ovmf                                                 # the qemu engine's BIOS and UEFI firmware
  debian-installer-12-netboot-amd64 grub-pc-bin grub-efi-amd64-bin xorriso mtools   # the installer ISO the qemu tests make
  tesseract-ocr tesseract-ocr-eng                              # reads the installer's screens in the qemu tests
  e2fsprogs                                                    # ext4 root images for the Linux tests
  mount                                                        # losetup and mount: the block-device tests' loop devices
  tgt                                                          # tgtd, the user-space iSCSI target the iSCSI disk tests serve LUNs from
  nbdkit                                                       # the second NBD server the network-disk tests meet (qemu-nbd the first)
  libxml2-utils                                                # xmllint: the appliance tests check the OVF envelopes Vireo writes
  qemu-guest-agent                                             # qemu-ga on a host socket: the peer for vireo exec's client (GuestAgentTests)
  swtpm swtpm-tools                                            # --tpm: the TPM 2.0 emulator beside QEMU (docs/tpm.md)
  qemu-block-extra                                             # QEMU's iscsi driver: the peer in bench/run.py --only network-disks
  iproute2 dnsmasq-base nftables passt                         # networks: bridges and taps, DHCP and DNS, NAT and forwards, user mode
  python3 acl                                                  # the net tests' echo servers; an ACL grants an unprivileged test user /dev/kvm
  acpica-tools                                                 # iasl: the oracle for every ACPI table the VMM builds
  debootstrap openssh-client genisoimage                       # vireo image build; vireo ssh (and the library's key pair); cloud-init seeds
  initramfs-tools-core fdisk                                   # lsinitramfs (what an imported initramfs holds); sfdisk for the import tests' GPT disks
  node-xterm libjs-xterm novnc libjs-chart.js                  # the web manager's consoles and charts, served by `vireo serve` (docs/web-ui.md)
  chromium chromium-driver python3-selenium python3-venv curl wrk   # the manager's browser test, schemathesis's venv, the API load test
  stunnel4 openssl procps                                      # `vireo serve --tls-cert`: TLS in front of the API (docs/api.md); test certificates; pgrep in its test
  containerd runc busybox-static                               # the containerd shim's tests: a private containerd and ctr, runc beside it in bench, the test image's busybox (docs/containerd.md)
  containernetworking-plugins                                  # CNI's bridge and host-local plugins: the shim test's pod network, wired as CRI does it
)
if [[ "$profile" == demo ]]; then packages=("${demo_packages[@]}"); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v swift >/dev/null; then
  echo "setup: swift is not on PATH; install the Swift 6 toolchain (swift.org) first" >&2
  exit 1
fi

if [[ "$profile" == demo ]]; then
  # `vireo run` and the VMM it starts; not the tests, the fuzzer or a debug build.
  swift build -c release --product vireo >&2
  swift build -c release --product vireo-vmm >&2
  exit 0
fi

# schemathesis (PyPI; not in Debian) checks the API against its OpenAPI document. Kept in a venv
# under ~/.cache/vireo, pinned, made once.
schemathesis_version=4.32.5
venv="${HOME}/.cache/vireo/venv"
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$schemathesis_version"; then
  echo "setup: installing schemathesis $schemathesis_version into $venv" >&2
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$schemathesis_version" >&2
fi

swift build >&2
# The containerd shim's guest (docs/containerd.md): the container kernel (cached) and the agent's
# initramfs, installed where the shim looks with no settings, so `ctr run --runtime
# io.containerd.vireo.v2` works after this script.
scripts/build-container-guest.sh --install >/dev/null

#!/usr/bin/env python3
"""The archive indexes the unattended-install test serves as its Debian mirror: bookworm's
signed Release files and the debian-installer Packages index, fetched unchanged from
deb.debian.org, so the netboot installer verifies them against Debian's key as it would any
mirror's. The udebs themselves are not served: this project's package registry does not carry
udebs (deb.debian.org answers 404 for them here), so the installer stops when it asks for its
first component, which is where the test looks. Cached: a finished copy is reused.

Usage: make-installer-mirror.py OUTDIR
"""
import hashlib, os, re, subprocess, sys, urllib.request

ARCHIVE = os.environ.get("VIREO_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
UDEBS = "main/debian-installer/binary-amd64"


def fetch(path):
    with urllib.request.urlopen(f"{ARCHIVE}/{path}", timeout=120) as response:
        return response.read()


def main():
    out = sys.argv[1]
    if os.path.exists(os.path.join(out, ".complete")):
        return
    kernel = subprocess.run(
        "zcat /usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/initrd.gz | cpio -t 2>/dev/null",
        shell=True, capture_output=True, text=True).stdout
    abi = re.search(r"lib/modules/([0-9][^/\n]*)", kernel).group(1)
    release = fetch(f"dists/{SUITE}/Release")
    packages_xz = fetch(f"dists/{SUITE}/{UDEBS}/Packages.xz")
    wanted_hash = re.search(rf"^ ([0-9a-f]{{64}})\s+\d+\s+{re.escape(UDEBS)}/Packages.xz$", release.decode(), re.M).group(1)
    if hashlib.sha256(packages_xz).hexdigest() != wanted_hash:
        sys.exit("the mirror changed between Release and Packages; run again")
    files = [(f"dists/{SUITE}/Release", release), (f"dists/{SUITE}/{UDEBS}/Packages.xz", packages_xz)]
    # choose-mirror reads main/binary-amd64/Release to see that the mirror has the architecture.
    for extra in (f"{UDEBS}/Packages.gz", "main/binary-amd64/Release"):
        data = fetch(f"dists/{SUITE}/{extra}")
        digest = re.search(rf"^ ([0-9a-f]{{64}})\s+\d+\s+{re.escape(extra)}$", release.decode(), re.M).group(1)
        if hashlib.sha256(data).hexdigest() != digest:
            sys.exit("the mirror changed between Release and its indexes; run again")
        files.append((f"dists/{SUITE}/{extra}", data))
    for path, data in files:
        os.makedirs(os.path.join(out, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(out, path), "wb") as f:
            f.write(data)
    for name in ("InRelease", "Release.gpg"):
        with open(os.path.join(out, f"dists/{SUITE}/{name}"), "wb") as f:
            f.write(fetch(f"dists/{SUITE}/{name}"))
    open(os.path.join(out, ".complete"), "w").write(f"bookworm indexes, main/binary-amd64 Release, for kernel {abi}\n")
    print(f"installer mirror indexes in {out}")


main()

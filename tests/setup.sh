#!/usr/bin/env bash
# Install the tools the test suite calls, when missing (Debian/Ubuntu, apt-get). Idempotent, and
# silent when everything is there. The README's test command and .ci/run start with it.
# Tool (Debian package): what calls it.
#   - minisign (minisign): signed-package tests make key pairs and signatures with it
#   - strace (strace): the fsync-ordering test
#   - shellcheck (shellcheck): the lint test of the shell scripts
#   - unzip (unzip): the install benchmark's baseline
#   - nginx (nginx-light): the delta-download benchmark's package server
#   - zip (zip): the delta-download benchmark's `zip -9` package
#   - man (man-db): rendering the man pages
#   - systemd-analyze (systemd): verifying the units
#   - script (bsdutils): the progress-bar test on a pseudo-terminal
#   - mmdebstrap, mkfs.ext4 and debugfs (e2fsprogs): the box's Debian image (tests/vm/image.sh)
#   - socat: the box's relay to its package server
#   - qemu-img (qemu-utils), qemu-system-x86_64 (qemu-system-x86), qemu-system-aarch64 and
#     qemu-system-arm (qemu-system-arm), qemu-aarch64-static (qemu-user-static): the boxes, all
#     from <codename>-backports (the machine's qemu-utils comes from there and the release's
#     own 7.2 would remove it, and cannot save a machine to a file)
#   - arch-test (arch-test): mmdebstrap's check that the ARM images' binaries run (binfmt)
#   - cpio (cpio), modprobe (kmod), xz (xz-utils), zstd (zstd): the ARM images' second stage
#     inside the guest, where the host has no binfmt_misc (tests/vm/second-stage.sh builds its
#     initramfs, with the kernel's modules uncompressed)
#   - the ARM boards' cross builds: deploy/build-debs.sh installs them (tests/setup-cross.sh)
#   - cargo deb (crates.io cargo-deb): the box installs the real .deb
set -euo pipefail

if ! cargo deb --version >/dev/null 2>&1; then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "tests/setup.sh: cargo-deb is missing and there is no cargo to install it" >&2
        exit 1
    fi
    echo "tests/setup.sh: installing cargo-deb" >&2
    cargo install --quiet --locked cargo-deb --version 3.8.0
fi

need=()
command -v minisign >/dev/null 2>&1 || need+=(minisign)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v zip >/dev/null 2>&1 || need+=(zip)
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v debugfs >/dev/null 2>&1 || need+=(e2fsprogs)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-system-aarch64 >/dev/null 2>&1 || need+=(qemu-system-arm)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v arch-test >/dev/null 2>&1 || need+=(arch-test)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v xz >/dev/null 2>&1 || need+=(xz-utils)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v modprobe >/dev/null 2>&1 || need+=(kmod)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v strip >/dev/null 2>&1 || need+=(binutils)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: missing ${need[*]}, and no apt-get here: install them by hand" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "tests/setup.sh: missing ${need[*]}: run as root (or with sudo) to install them" >&2
        exit 1
    fi
    sudo=(sudo)
fi
echo "tests/setup.sh: installing ${need[*]}" >&2
backports=()
if [[ " ${need[*]} " == *" qemu-"* ]]; then
    # shellcheck disable=SC1091
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    if [ -n "$codename" ] && [ ! -e /etc/apt/sources.list.d/tope-ota-backports.sources ]; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$codename" | "${sudo[@]}" tee /etc/apt/sources.list.d/tope-ota-backports.sources >/dev/null
    fi
    [ -n "$codename" ] && backports=(-t "$codename-backports")
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${backports[@]}" "${need[@]}" >/dev/null

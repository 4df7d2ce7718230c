#!/usr/bin/env bash
# Build the box's base image: a small Debian bookworm with systemd, the cloud kernel, the guest
# agent and the printer's stand-in software at /opt/tope/versions/v1.0.0 (current). tope-ota is
# not in it: the box installs its .deb with dpkg -i in the booted image, as a device image gets it.
# No root mounts: mmdebstrap into a directory, then mkfs.ext4 -d.
# A foreign architecture (arm64, armhf) runs its maintainer scripts under qemu-user through
# binfmt_misc, which this script mounts and registers from qemu-user-static's binfmt.d entry
# when the host has not (a container often has neither); without binfmt_misc it fails and says so.
#   tests/vm/image.sh OUT_DIR [ARCH]     -> OUT_DIR/{base.img,vmlinuz,initrd.img}; ARCH amd64 (default), arm64, armhf
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$1"
arch="${2:-amd64}"
case "$arch" in
    amd64) kernel=linux-image-cloud-amd64 ;;
    arm64) kernel=linux-image-cloud-arm64 ;;
    # -M virt with a Cortex-A15 has LPAE: Debian's armmp-lpae flavour boots it
    armhf) kernel=linux-image-armmp-lpae ;;
    *) echo "image.sh: unknown architecture $arch (amd64, arm64, armhf)" >&2; exit 2 ;;
esac

binfmt() {
    local q="$1" misc=/proc/sys/fs/binfmt_misc
    [ -e "$misc/$q" ] && return 0
    if [ ! -e "$misc/register" ]; then
        mount -t binfmt_misc binfmt_misc "$misc" 2>/dev/null || {
            echo "image.sh: binfmt_misc cannot be mounted here: a foreign $arch image needs it (mmdebstrap runs the image's maintainer scripts under qemu-user)" >&2
            exit 1
        }
    fi
    [ -e "$misc/$q" ] && return 0
    local conf="/usr/lib/binfmt.d/$q.conf"
    [ -e "$conf" ] || { echo "image.sh: $conf is missing (package qemu-user-static from bookworm-backports)" >&2; exit 1; }
    grep '^:' "$conf" > "$misc/register" || { echo "image.sh: registering $q with binfmt_misc failed" >&2; exit 1; }
}
case "$arch" in
    arm64) binfmt qemu-aarch64 ;;
    armhf) binfmt qemu-arm ;;
esac
mkdir -p "$out"
work="$(mktemp -d "$out/.tope-ota-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"

packages=systemd,systemd-sysv,udev,dbus,python3,curl,$kernel,initramfs-tools,qemu-guest-agent,iproute2,procps,man-db,bash-completion,less,socat,unzip

mmdebstrap --mode=root --variant=minbase --architectures="$arch" --include="$packages" \
    --customize-hook="$here/customize.sh \"\$1\" \"$here/device\"" \
    bookworm "$root" http://deb.debian.org/debian

cp "$root"/boot/vmlinuz-* "$work/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/initrd.img"
mkfs.ext4 -q -L vmroot -d "$root" "$work/base.img" 2G
mv "$work/vmlinuz" "$work/initrd.img" "$work/base.img" "$out/"

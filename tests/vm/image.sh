#!/usr/bin/env bash
# Build the box's base image: a small Debian bookworm with systemd, the cloud kernel, the guest
# agent and the printer's stand-in software at /opt/tope/versions/v1.0.0 (current). tope-ota is
# not in it: the box installs its .deb with dpkg -i in the booted image, as a device image gets it.
# No root mounts: mmdebstrap into a directory, then mkfs.ext4 -d.
#   tests/vm/image.sh OUT_DIR      -> OUT_DIR/{base.img,vmlinuz,initrd.img}
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$1"
mkdir -p "$out"
work="$(mktemp -d "$out/.tope-ota-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"

packages=systemd,systemd-sysv,udev,dbus,python3,curl,linux-image-cloud-amd64,initramfs-tools,qemu-guest-agent,iproute2,procps,man-db,bash-completion,less,socat

mmdebstrap --mode=root --variant=minbase --include="$packages" \
    --customize-hook="$here/customize.sh \"\$1\" \"$here/device\"" \
    bookworm "$root" http://deb.debian.org/debian

cp "$root"/boot/vmlinuz-* "$work/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/initrd.img"
mkfs.ext4 -q -L vmroot -d "$root" "$work/base.img" 2G
mv "$work/vmlinuz" "$work/initrd.img" "$work/base.img" "$out/"

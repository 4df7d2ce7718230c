#!/usr/bin/env bash
# Build the box's base image: a small Debian bookworm with systemd, the cloud kernel, the guest
# agent and the printer's stand-in software at /opt/tope/versions/v1.0.0 (current). tope-ota is
# not in it: the box installs its .deb with dpkg -i in the booted image, as a device image gets it.
# No loop mounts: mmdebstrap into a directory, then mkfs.ext4 -d (mmdebstrap --mode=root mounts
# /proc, /sys and /dev, the host's /dev/shm among them, inside the root while it runs: a build
# killed mid-way is unmounted before it is removed, never removed across a mount).
# A foreign architecture (arm64, armhf) runs its maintainer scripts under qemu-user through
# binfmt_misc, which this script mounts and registers from qemu-user-binfmt's binfmt.d entry
# when the host has not (a container often has neither). Where binfmt_misc cannot be had the
# packages are only extracted here and configured inside the guest itself, booted under TCG
# (second-stage.sh). TOPE_OTA_IMAGE_STAGE says which: host (fails where binfmt_misc cannot be
# had), guest, or auto (the default: host where it can be had, else guest). The box decides
# with --probe and passes host or guest, so its cache keys the image by how it was made.
#   tests/vm/image.sh OUT_DIR [ARCH]     -> OUT_DIR/{base.img,vmlinuz,initrd.img}; ARCH amd64 (default), arm64, armhf
#   tests/vm/image.sh --probe ARCH       prints the stage auto takes here: host or guest
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
probe=
if [ "${1:-}" = --probe ]; then
    probe=1
    shift
    set -- "" "$@"
fi
out="$1"
arch="${2:-amd64}"
case "$arch" in
    amd64) kernel=linux-image-cloud-amd64 ;;
    arm64) kernel=linux-image-cloud-arm64 ;;
    # -M virt with a Cortex-A15 has LPAE: Debian's armmp-lpae flavour boots it
    armhf) kernel=linux-image-armmp-lpae ;;
    *) echo "image.sh: unknown architecture $arch (amd64, arm64, armhf)" >&2; exit 2 ;;
esac

stage="${TOPE_OTA_IMAGE_STAGE:-auto}"
case "$stage" in auto | host | guest) ;; *) echo "image.sh: TOPE_OTA_IMAGE_STAGE is auto, host or guest, not $stage" >&2; exit 2 ;; esac
if [ "$arch" = amd64 ] && [ "$stage" = guest ]; then
    echo "image.sh: amd64 is the host's own architecture: no second stage" >&2
    exit 2
fi
# Fails (and says why) when this host cannot run the image's binaries through binfmt_misc.
binfmt() {
    local q="$1" misc=/proc/sys/fs/binfmt_misc
    [ -e "$misc/$q" ] && return 0
    if [ ! -e "$misc/register" ]; then
        mount -t binfmt_misc binfmt_misc "$misc" 2>/dev/null || {
            echo "image.sh: binfmt_misc cannot be mounted here" >&2
            return 1
        }
    fi
    [ -e "$misc/$q" ] && return 0
    local conf="/usr/lib/binfmt.d/$q.conf"
    [ -e "$conf" ] || { echo "image.sh: $conf is missing (package qemu-user-binfmt, with qemu-user-static from bookworm-backports)" >&2; return 1; }
    grep '^:' "$conf" > "$misc/register" 2>/dev/null || { echo "image.sh: registering $q with binfmt_misc failed" >&2; return 1; }
}
if [ "$stage" != guest ]; then
    ok=0
    case "$arch" in
        arm64) binfmt qemu-aarch64 || ok=$? ;;
        armhf) binfmt qemu-arm || ok=$? ;;
    esac
    if [ "$ok" -ne 0 ] && [ "$stage" = host ]; then
        echo "image.sh: TOPE_OTA_IMAGE_STAGE=host, and qemu-user cannot run $arch binaries here" >&2
        exit 1
    fi
    if [ "$ok" -ne 0 ]; then
        echo "image.sh: no qemu-user for $arch here: the image is configured inside the guest" >&2
        stage=guest
    else
        stage=host
    fi
fi
if [ -n "$probe" ]; then
    echo "$stage"
    exit 0
fi
# Unmount what mmdebstrap left mounted under a build directory, deepest first, then remove it
# without crossing into another filesystem.
sweep() {
    local d="$1" m
    findmnt -rn -o TARGET | awk -v p="$d/" 'index($0, p) == 1' | sort -r | while read -r m; do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$d"
}
mkdir -p "$out"
for stale in "$out"/.tope-ota-image.*; do
    if [ -e "$stale" ]; then sweep "$stale"; fi
done
work="$(mktemp -d "$out/.tope-ota-image.XXXXXX")"
trap 'sweep "$work"' EXIT
root="$work/root"

packages=systemd,systemd-sysv,udev,dbus,python3,curl,$kernel,initramfs-tools,qemu-guest-agent,iproute2,procps,man-db,bash-completion,less,socat,unzip

if [ "$stage" = guest ]; then
    bash "$here/second-stage.sh" "$work" "$arch" "$packages"
else
    mmdebstrap --mode=root --variant=minbase --architectures="$arch" --include="$packages" \
        --setup-hook="$here/setup-hook.sh \"\$1\"" \
        --customize-hook="$here/customize.sh \"\$1\" \"$here/device\"" \
        bookworm "$root" http://deb.debian.org/debian
    cp "$root"/boot/vmlinuz-* "$work/vmlinuz"
    cp "$root"/boot/initrd.img-* "$work/initrd.img"
    mkfs.ext4 -q -L vmroot -d "$root" "$work/base.img" 2G
fi
sync "$work/vmlinuz" "$work/initrd.img" "$work/base.img"
mv "$work/vmlinuz" "$work/initrd.img" "$work/base.img" "$out/"

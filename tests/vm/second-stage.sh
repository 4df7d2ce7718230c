#!/usr/bin/env bash
# image.sh's way for a foreign architecture when the host cannot run the image's binaries
# (no binfmt_misc, as in many containers): the packages are only extracted here, and they are
# configured inside the guest itself, booted under TCG from the image being built, as
# debootstrap's --second-stage does. The guest boots Debian's kernel with a small initramfs made
# here (the image's own busybox-static, the modules that reach the disk); its init runs
# guest-stage.sh in the image (dpkg --install, then customize.sh as image.sh runs it) and powers
# off. The kernel and the initramfs that dpkg made in the guest are then read out of the image.
#   tests/vm/second-stage.sh WORK_DIR ARCH PACKAGES   -> WORK_DIR/{base.img,vmlinuz,initrd.img}
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ "${1:-}" = --extract-hook ]; then
    # mmdebstrap's extract hook: keep the .debs for the guest's dpkg, and name the packages
    # mmdebstrap would install first with dpkg --force-depends: the Essential:yes ones and all
    # they depend on (apt resolves them with the image's own configuration).
    t="$2/second-stage"
    mkdir -p "$t/debs"
    cp "$2"/var/cache/apt/archives/*.deb "$t/debs/"
    APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get --simulate -qq install '?essential' |
        awk '$1 == "Inst" { print $2 }' | sed 's/:.*//' | sort -u > "$t/essential-names"
    [ -s "$t/essential-names" ] || { echo "second-stage.sh: apt named no essential package" >&2; exit 1; }
    exit 0
fi
work="$1"
arch="$2"
packages="$3"
root="$work/root"
case "$arch" in
    arm64) qemu=(qemu-system-aarch64 -machine 'virt,accel=tcg' -cpu cortex-a72) ;;
    armhf) qemu=(qemu-system-arm -machine 'virt,accel=tcg' -cpu cortex-a15) ;;
    *) echo "second-stage.sh: $arch is not a foreign board here (arm64, armhf)" >&2; exit 2 ;;
esac
for tool in cpio modprobe depmod debugfs e2fsck timeout "${qemu[0]}"; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "second-stage.sh: $tool is missing (tests/setup.sh installs it)" >&2
        exit 1
    }
done

# Extract only: nothing of the image runs on the host. The package set of image.sh's minbase
# (Essential:yes and Priority:required, with their dependencies), its packages, and usrmerge
# as apt picks it there; /usr merged before extracting (mmdebstrap's own hooks: their stand-in
# usr-is-merged is purged in the guest once usrmerge is installed).
mmdebstrap --mode=root --variant=extract --architectures="$arch" --skip=check/qemu \
    --hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr \
    --include='?or(?essential,?priority(required))' --include="usrmerge,busybox-static,$packages" \
    --setup-hook="$here/setup-hook.sh \"\$1\"" \
    --extract-hook="$here/second-stage.sh --extract-hook \"\$1\"" \
    bookworm "$root" http://deb.debian.org/debian

stage="$root/second-stage"
for deb in "$stage"/debs/*.deb; do
    if grep -qxF "$(dpkg-deb -f "$deb" Package)" "$stage/essential-names"; then
        echo "/second-stage/debs/${deb##*/}" >> "$stage/essential"
    else
        echo "/second-stage/debs/${deb##*/}" >> "$stage/others"
    fi
done
cp "$here/guest-stage.sh" "$here/customize.sh" "$stage/"
cp -r "$here/device" "$stage/device"

# The initramfs: busybox and the modules that reach an ext4 root on virtio-blk over PCI, in
# the order modprobe resolves them from the image's own modules (uncompressed: busybox's insmod
# takes plain .ko files).
kvers=("$root"/lib/modules/*/)
if [ ${#kvers[@]} -ne 1 ] || [ ! -d "${kvers[0]}" ]; then
    echo "second-stage.sh: not one kernel in the image: ${kvers[*]}" >&2
    exit 1
fi
kver="$(basename "${kvers[0]}")"
depmod -b "$root" "$kver"
init="$work/initramfs"
mkdir -p "$init/bin" "$init/modules" "$init/dev" "$init/proc" "$init/sys" "$init/root"
cp "$root/bin/busybox" "$init/bin/busybox"
mknod -m 600 "$init/dev/console" c 5 1
# One module a call: modprobe takes further names as the first one's parameters.
for m in virtio_pci virtio_blk ext4 crc32c_generic; do
    modprobe -d "$root" -S "$kver" --show-depends "$m" || {
        echo "second-stage.sh: modprobe finds no $m for $kver" >&2
        exit 1
    }
done > "$work/modules.deps"
grep -Eq '(^builtin virtio_blk|/virtio_blk\.ko)' "$work/modules.deps" || {
    echo "second-stage.sh: no virtio_blk for $kver" >&2
    exit 1
}
n=0
awk '$1 == "insmod" && !seen[$2]++ { print $2 }' "$work/modules.deps" | while read -r path; do
    n=$((n + 1))
    name="$(printf %02d "$n")-$(basename "$path")"
    case "$path" in
        *.ko) cp "$path" "$init/modules/$name" ;;
        *.ko.xz) xz -dc "$path" > "$init/modules/${name%.xz}" ;;
        *.ko.zst) zstd -qdc "$path" > "$init/modules/${name%.zst}" ;;
        *.ko.gz) gzip -dc "$path" > "$init/modules/${name%.gz}" ;;
        *) echo "second-stage.sh: cannot load $path" >&2; exit 1 ;;
    esac
done
cat > "$init/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec > /dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in /modules/*.ko; do insmod "$m" || echo "second-stage: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
rc=1
if mount -t ext4 /dev/vda /root; then
    mount --bind /dev /root/dev
    mount -t proc proc /root/proc
    mount -t sysfs sysfs /root/sys
    mount -t tmpfs tmpfs /root/run
    chroot /root /bin/sh /second-stage/guest-stage.sh
    rc=$?
    umount /root/run /root/sys /root/proc /root/dev
    # What dpkg deleted (the .debs) goes back to the image file's holes.
    fstrim /root || true
    umount /root || rc=1
fi
sync
echo "second-stage: exit $rc"
poweroff -f
INIT
chmod 755 "$init/init"
(cd "$init" && find . | cpio --quiet -o -H newc | gzip -1) > "$work/stage-initrd.img"

mkfs.ext4 -q -L vmroot -d "$root" "$work/base.img" 2G
log="$work/second-stage.log"
out_log="$(dirname "$work")/second-stage-$arch-failed.log"
rm -f "$out_log"
failed() {
    echo "second-stage.sh: $1; the console is kept in $out_log, its last lines:" >&2
    cp "$log" "$out_log" 2>/dev/null || true
    tail -60 "$log" 2>/dev/null | tr -d '\r' >&2
    exit 1
}
echo "second-stage.sh: configuring the $arch image inside the guest (TCG; console in $log)" >&2
# --foreground: timeout stays in this process group, so the caller's kill of the group ends
# QEMU too instead of leaving it on a deleted image.
timeout --foreground 3000 "${qemu[@]}" -smp 2 -m 1024 -display none -monitor none -no-reboot \
    -nic none -serial "file:$log" \
    -kernel "$root/boot/vmlinuz-$kver" -initrd "$work/stage-initrd.img" \
    -append "console=ttyAMA0 panic=-1" \
    -drive "file=$work/base.img,if=none,format=raw,id=d,discard=unmap" -device virtio-blk-pci,drive=d ||
    failed "QEMU failed or timed out"
grep -q '^second-stage: exit 0' "$log" || failed "the guest stage failed"
fsck="$(e2fsck -fn "$work/base.img" 2>&1)" || failed "the image is not clean after the guest stage: $fsck"
# The kernel is the one extracted here; the initramfs is the one dpkg made in the guest, read
# out of the image and checked against the size the image records for it.
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
initrd="/boot/initrd.img-$kver"
want="$(debugfs -R "stat $initrd" "$work/base.img" 2>/dev/null | sed -n 's/.*Size: \([0-9]*\).*/\1/p' | head -1)"
debugfs -R "dump $initrd $work/initrd.img" "$work/base.img" 2>/dev/null
got="$(stat -c %s "$work/initrd.img" 2>/dev/null || echo 0)"
if [ -z "$want" ] || [ "$want" -eq 0 ] || [ "$got" != "$want" ]; then
    failed "the guest made no whole $initrd (image says ${want:-nothing}, read $got bytes)"
fi

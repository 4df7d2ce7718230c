#!/usr/bin/env bash
# mmdebstrap setup hook of image.sh: $1 is the image's root, before any package is installed.
# The initramfs holds only what the box's boards boot from (virtio on PCI, ext4), not most of
# the kernel's modules: under qemu-user (the ARM images) every mkinitramfs run of the default
# MODULES=most took minutes, and dpkg runs it twice.
set -euo pipefail
root="$1"
install -d "$root/etc/initramfs-tools/conf.d" "$root/etc/initramfs-tools/hooks"
echo 'MODULES=list' > "$root/etc/initramfs-tools/conf.d/box.conf"
cat > "$root/etc/initramfs-tools/hooks/box-virtio" <<'HOOK'
#!/bin/sh
# The box's root disk: virtio-blk on PCI (-M virt: the generic ECAM host bridge), ext4.
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in pci-host-generic virtio_pci virtio_blk ext4 crc32c_generic; do
    force_load "$m"
done
HOOK
chmod 755 "$root/etc/initramfs-tools/hooks/box-virtio"

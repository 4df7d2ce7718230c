#!/usr/bin/env bash
# mmdebstrap customize hook of image.sh: $1 is the image's root, $2 the stand-in software.
set -euo pipefail
root="$1"
dev="$2"

echo box > "$root/etc/hostname"
cat > "$root/etc/hosts" <<'HOSTS'
127.0.0.1 localhost
127.0.1.1 box
10.0.2.100 packages.box
HOSTS
# mmdebstrap leaves the host's resolver; the box has no DNS at all.
: > "$root/etc/resolv.conf"
echo 'LABEL=vmroot / ext4 defaults 0 1' > "$root/etc/fstab"
passwd_root='root::0:0:root:/root:/bin/bash'
sed -i "s|^root:[^:]*:|root::|" "$root/etc/shadow"
: "$passwd_root"

# The user-mode network: DHCP from QEMU on the one NIC.
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/10-box.network" <<'NET'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
NET
chroot "$root" systemctl enable systemd-networkd.service
# Nothing to wait for on a box without a real network.
chroot "$root" systemctl mask systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer systemd-tmpfiles-clean.timer

# Keep unsynced data in the page cache for long, so a power cut (kill -9 of QEMU) loses what
# was not fsynced instead of what the kernel happened not to write back yet. The root fs gets
# commit=300 on the kernel command line.
cat > "$root/etc/sysctl.d/90-box.conf" <<'SYS'
vm.dirty_expire_centisecs = 30000
vm.dirty_writeback_centisecs = 30000
SYS

# The printer's software, version 1.0.0, as the image ships it.
v="$root/opt/tope/versions/v1.0.0"
install -d "$v/bin" "$v/etc"
sed 's/@VERSION@/1.0.0/' "$dev/device-api" > "$v/bin/device-api"
sed 's/@VERSION@/1.0.0/' "$dev/service" > "$v/bin/printer-ui"
sed 's/@VERSION@/1.0.0/' "$dev/service" > "$v/bin/mainboard"
chmod 755 "$v/bin/"*
echo '{"fail": false}' > "$v/etc/mainboard.conf"
ln -s v1.0.0 "$root/opt/tope/versions/current"
install -m 755 "$dev/ota-gui" "$root/opt/tope/ota-gui"
for u in device-api printer-ui mainboard; do
    install -m 644 "$dev/$u.service" "$root/etc/systemd/system/$u.service"
    chroot "$root" systemctl enable "$u.service"
done

# Test equipment, not the printer's: serve listens on loopback only, so the host's hostfwd
# reaches it through this relay on the guest's user-mode address (requests arrive from
# 127.0.0.1, as device-api's do).
cat > "$root/etc/systemd/system/box-api-relay.service" <<'UNIT'
[Unit]
Description=Box test equipment: relay 10.0.2.15:12315 to tope-ota serve on 127.0.0.1:12315
After=network.target

[Service]
ExecStart=/usr/bin/socat TCP-LISTEN:12315,bind=10.0.2.15,fork,reuseaddr TCP:127.0.0.1:12315
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable box-api-relay.service

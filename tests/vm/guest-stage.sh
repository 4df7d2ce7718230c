#!/bin/sh
# The second stage of second-stage.sh, inside the booted guest (chroot into the image, which
# the initramfs mounted): configure the extracted packages as mmdebstrap would have, essential
# ones first, then run the same customize.sh as image.sh. No service starts meanwhile.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true LC_ALL=C
s=/second-stage
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
echo "second-stage: dpkg --install of $(wc -l < $s/essential) essential packages"
# shellcheck disable=SC2046
dpkg --install --force-depends $(cat $s/essential)
# As mmdebstrap does once the essential packages are in: a daemon started by a maintainer
# script would keep the image busy.
mv /usr/sbin/start-stop-daemon /usr/sbin/start-stop-daemon.REAL
printf '#!/bin/sh\necho "Warning: Fake start-stop-daemon called, doing nothing"\n' > /usr/sbin/start-stop-daemon
chmod 755 /usr/sbin/start-stop-daemon
# The others as apt would order them is more than dpkg alone does: a Pre-Depends on a package
# of the same batch that is not configured yet refuses the unpack, so the batch runs again for
# what is left, as long as each pass installs more (a chain of n Pre-Depends takes n passes).
pass=1
while :; do
    echo "second-stage: dpkg --install of $(wc -l < $s/others) others, pass $pass"
    before="$(dpkg-query -W -f '${Package} ${db:Status-Abbrev}\n' | grep -c ' ii' || true)"
    # shellcheck disable=SC2046
    if dpkg --install --skip-same-version $(cat $s/others); then break; fi
    dpkg --configure -a || true
    after="$(dpkg-query -W -f '${Package} ${db:Status-Abbrev}\n' | grep -c ' ii' || true)"
    [ "$after" -gt "$before" ] || { echo "second-stage: pass $pass installed nothing more ($after installed)"; exit 1; }
    pass=$((pass + 1))
done
dpkg --configure -a
[ -z "$(dpkg --audit)" ] || { dpkg --audit; exit 1; }
dpkg --purge busybox-static
# The merged-/usr hook's stand-in (version 1), which usrmerge makes needless, as in image.sh's
# own build.
if [ "$(dpkg-query -W -f '${Version}' usr-is-merged 2>/dev/null)" = 1 ]; then
    dpkg --purge usr-is-merged
fi
bash $s/customize.sh / $s/device
rm -f /usr/sbin/policy-rc.d
mv /usr/sbin/start-stop-daemon.REAL /usr/sbin/start-stop-daemon
rm -rf $s
# What mmdebstrap's cleanup leaves: no package lists, no downloaded .debs, no machine id (each
# boot of the image is a first boot of its own), no logs of the build.
rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/ldconfig/aux-cache
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /var/log/dpkg.log /var/log/alternatives.log /var/log/apt/*.log
find /tmp /var/tmp -mindepth 1 -delete
# How this image was made, for the test that it is a device like the others.
echo guest > /etc/tope-box-stage
echo "second-stage: done"

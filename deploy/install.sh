#!/bin/sh
# Install tope-ota on a device (or into a staging tree with DESTDIR). Idempotent: running it
# again leaves the same tree. Never overwrites /etc/default/tope-ota once it exists.
#
#   BIN=target/release/tope-ota DESTDIR=/tmp/stage PREFIX=/usr sh deploy/install.sh
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr}
UNITDIR=${UNITDIR:-/usr/lib/systemd/system}
STATE_DIR=${STATE_DIR:-/var/lib/tope-ota}
VERSIONS_DIR=${VERSIONS_DIR:-/opt/tope/versions}
BIN=${BIN:-$top/target/release/tope-ota}

if [ ! -x "$BIN" ]; then
    echo "install.sh: no binary at $BIN (build it with: cargo build --release --locked)" >&2
    exit 1
fi

d() { install -d -m "$1" "$DESTDIR$2"; }
f() { install -m "$1" "$2" "$DESTDIR$3"; }

d 0755 "$PREFIX/bin"
f 0755 "$BIN" "$PREFIX/bin/tope-ota"

d 0755 "$PREFIX/share/man/man1"
for page in "$top"/man/*.1; do
    f 0644 "$page" "$PREFIX/share/man/man1/$(basename "$page")"
done

d 0755 "$PREFIX/share/bash-completion/completions"
f 0644 "$top/completions/tope-ota.bash" "$PREFIX/share/bash-completion/completions/tope-ota"
d 0755 "$PREFIX/share/zsh/vendor-completions"
f 0644 "$top/completions/_tope-ota" "$PREFIX/share/zsh/vendor-completions/_tope-ota"
d 0755 "$PREFIX/share/fish/vendor_completions.d"
f 0644 "$top/completions/tope-ota.fish" "$PREFIX/share/fish/vendor_completions.d/tope-ota.fish"

d 0755 "$UNITDIR"
for unit in tope-ota-heal.service tope-ota-heal.timer tope-ota-serve.service; do
    # The units name /usr/bin/tope-ota; follow PREFIX.
    sed "s|/usr/bin/tope-ota|$PREFIX/bin/tope-ota|g" "$here/$unit" > "$DESTDIR$UNITDIR/$unit.tmp"
    chmod 0644 "$DESTDIR$UNITDIR/$unit.tmp"
    mv -f "$DESTDIR$UNITDIR/$unit.tmp" "$DESTDIR$UNITDIR/$unit"
done

d 0755 /etc/default
if [ ! -e "$DESTDIR/etc/default/tope-ota" ]; then
    f 0644 "$here/tope-ota.default" /etc/default/tope-ota
fi

d 0755 /etc/tope-ota/keys.d
d 0700 "$STATE_DIR"
d 0755 "$VERSIONS_DIR"

# On a running device (not into a staging tree), enable the units.
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now tope-ota-heal.timer tope-ota-serve.service
fi
echo "tope-ota installed into ${DESTDIR:-/} (prefix $PREFIX)"

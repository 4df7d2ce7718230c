#!/bin/sh
# Check a device's tope-ota layout and print what is wrong. Exit 0 when all is well, 1 if not.
#
#   sh deploy/verify-setup.sh
set -u

BIN=${BIN:-$(command -v tope-ota || echo /usr/bin/tope-ota)}
STATE_DIR=${TOPE_OTA_STATE_DIR:-/var/lib/tope-ota}
VERSIONS_DIR=${TOPE_OTA_VERSIONS_DIR:-/opt/tope/versions}
UNITDIR=${UNITDIR:-/usr/lib/systemd/system}
problems=0

bad() { echo "PROBLEM: $*"; problems=$((problems + 1)); }
ok() { echo "ok: $*"; }
# check OK-TEXT BAD-TEXT COMMAND...: report by the command's status.
check() {
    good=$1 wrong=$2
    shift 2
    if "$@"; then ok "$good"; else bad "$wrong"; fi
}

if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    ok "binary $BIN ($("$BIN" --version))"
else
    bad "no working tope-ota binary at $BIN"
fi

check "state dir $STATE_DIR" "state dir $STATE_DIR is missing" test -d "$STATE_DIR"
if [ -e "$STATE_DIR/state.json" ]; then
    if "$BIN" --state-dir "$STATE_DIR" --versions-dir "$VERSIONS_DIR" --json status >/dev/null 2>&1; then
        ok "state.json readable"
    else
        bad "state.json cannot be read"
    fi
fi
check "versions root $VERSIONS_DIR" "versions root $VERSIONS_DIR is missing" test -d "$VERSIONS_DIR"

for link in current factory; do
    if [ -L "$VERSIONS_DIR/$link" ]; then
        if [ -d "$VERSIONS_DIR/$link/" ]; then
            ok "$link -> $(readlink "$VERSIONS_DIR/$link")"
        else
            bad "$link -> $(readlink "$VERSIONS_DIR/$link") points nowhere (tope-ota heal repairs current)"
        fi
    else
        bad "no $link symlink in $VERSIONS_DIR"
    fi
done
if [ -d "$VERSIONS_DIR/factory/" ] && [ -n "$(find "$VERSIONS_DIR/factory/" -perm -u=w -print -quit 2>/dev/null)" ]; then
    bad "the factory snapshot is writable (create-factory.sh makes it read-only)"
fi
if [ -n "$(find "$VERSIONS_DIR" -maxdepth 1 -name '.tope-ota-tmp-*' -print -quit 2>/dev/null)" ]; then
    bad "leftovers of an interrupted operation in $VERSIONS_DIR (tope-ota heal removes them)"
fi

for unit in tope-ota-heal.service tope-ota-heal.timer tope-ota-serve.service; do
    check "unit $unit" "unit $unit is not installed in $UNITDIR" test -f "$UNITDIR/$unit"
done
if [ -d /run/systemd/system ]; then
    for unit in tope-ota-heal.timer tope-ota-serve.service; do
        check "$unit enabled" "$unit is not enabled" systemctl is-enabled --quiet "$unit"
    done
fi

if [ "$problems" -eq 0 ]; then
    echo "tope-ota setup looks right"
    exit 0
fi
echo "$problems problem(s) found"
exit 1

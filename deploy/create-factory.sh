#!/bin/sh
# Make the device's factory snapshot, the last line of defence: a private, read-only copy of the
# version `current` runs, sharing no inode with any other snapshot. `tope-ota factory` makes it
# under the updater's lock, so it never races an install or a heal; this script only checks
# that the version given is the one running.
#
#   sh deploy/create-factory.sh [VERSION [VERSIONS_DIR]]
set -eu

BIN=${BIN:-$(command -v tope-ota || echo /usr/bin/tope-ota)}
version=${1:-}
root=${2:-${TOPE_OTA_VERSIONS_DIR:-/opt/tope/versions}}

case "$version" in
    .|..|*/*) echo "create-factory.sh: bad version '$version'" >&2; exit 2 ;;
esac
if [ -n "$version" ]; then
    current=$(readlink "$root/current" 2>/dev/null || true)
    if [ "$current" != "v$version" ]; then
        echo "create-factory.sh: current is '${current:-nothing}', not v$version: install $version first" >&2
        exit 1
    fi
fi
exec "$BIN" --versions-dir "$root" factory

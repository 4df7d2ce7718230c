#!/bin/sh
# Make an installed version the device's factory version: the last line of defence, never
# modified or removed by tope-ota. Its tree is made read-only and `factory` points at it.
#
#   sh deploy/create-factory.sh 1.0.0 [VERSIONS_DIR]
set -eu

version=${1:?usage: create-factory.sh VERSION [VERSIONS_DIR]}
root=${2:-${TOPE_OTA_VERSIONS_DIR:-/opt/tope/versions}}
snap="$root/v$version"

case "$version" in
    .|..|*/*|"") echo "create-factory.sh: bad version '$version'" >&2; exit 2 ;;
esac
if [ ! -d "$snap" ]; then
    echo "create-factory.sh: no snapshot $snap" >&2
    exit 1
fi
if [ -L "$root/factory" ]; then
    current=$(readlink "$root/factory")
    if [ "$current" = "v$version" ]; then
        echo "factory is already $version"
        exit 0
    fi
    echo "create-factory.sh: factory already points to $current; it is never replaced" >&2
    exit 1
fi

# Read-only for everyone: directories and files. Files are shared by hard links with later
# snapshots, which tope-ota never writes in place, so their content stays the factory's.
chmod -R a-w "$snap"

tmp="$root/.tope-ota-tmp-factory-$$"
ln -s "v$version" "$tmp"
sync "$root" 2>/dev/null || sync
mv -T "$tmp" "$root/factory"
sync "$root" 2>/dev/null || sync
echo "factory is now $version ($snap, read-only)"

#!/usr/bin/env bash
# Install the tools the test suite calls, when missing (Debian/Ubuntu, apt-get). Idempotent, and
# silent when everything is there. The README's test command and .ci/run start with it.
# Tool (Debian package): what calls it.
#   - minisign (minisign): signed-package tests make key pairs and signatures with it
#   - strace (strace): the fsync-ordering test
#   - shellcheck (shellcheck): the lint test of the shell scripts
#   - unzip (unzip): the install benchmark's baseline
#   - man (man-db): rendering the man pages
#   - systemd-analyze (systemd): verifying the units
#   - script (bsdutils): the progress-bar test on a pseudo-terminal
set -euo pipefail

need=()
command -v minisign >/dev/null 2>&1 || need+=(minisign)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup.sh: missing ${need[*]}, and no apt-get here: install them by hand" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "tests/setup.sh: missing ${need[*]}: run as root (or with sudo) to install them" >&2
        exit 1
    fi
    sudo=(sudo)
fi
echo "tests/setup.sh: installing ${need[*]}" >&2
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

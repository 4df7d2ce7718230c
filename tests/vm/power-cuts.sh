#!/usr/bin/env bash
# The box's power-cut benchmark: N cuts (default 100, seed TOPE_OTA_POWER_CUT_SEED or the fixed
# default) at random instants of a download, an install, a rollback and a heal; prints where each
# landed and any invariant violations. About 50 s a cut under TCG on amd64, about 3 times that on
# the emulated ARM boards.
#   tests/vm/power-cuts.sh [--arch A] [N]            the device build: must show no violation
#   tests/vm/power-cuts.sh [--arch A] --broken [N]   a build that does not sync a new snapshot: must show some
# A: amd64 (default) or arm64 (the boards with the power-cut scenario; armhf has none).
set -euo pipefail
cd "$(dirname "$0")/../.."
n=100
features=
arch=amd64
usage() { echo "usage: $0 [--arch amd64|arm64] [--broken] [N >= 1]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --broken) features=break-snapshot-sync ;;
        --arch) [ $# -ge 2 ] || usage; arch="$2"; shift ;;
        *[!0-9]* | '' | 0 | 0*) usage ;;
        *) [ ${#1} -le 6 ] || usage; n="$1" ;;
    esac
    shift
done
case "$arch" in amd64 | arm64) ;; *) usage ;; esac
bash tests/setup.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
TOPE_OTA_POWER_CUTS="$n" TOPE_OTA_BOX_FEATURES="$features" \
    cargo test --locked --test vm "$arch::power_cuts" -- --exact --nocapture | tee "$log"
# A filter that matched nothing passes with 0 tests: that is no run.
grep -q '^test result: ok. 1 passed' "$log" || { echo "power-cuts.sh: $arch::power_cuts did not run" >&2; exit 1; }

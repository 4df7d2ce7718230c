#!/usr/bin/env bash
# The box's power-cut benchmark: N cuts (default 100, seed TOPE_OTA_POWER_CUT_SEED or the fixed
# default) at random instants of a download, an install, a rollback and a heal; prints where each
# landed and any invariant violations. About 50 s a cut under TCG on amd64, about 3 times that on
# the emulated ARM boards.
#   tests/vm/power-cuts.sh [--arch A] [N]            the device build: must show no violation
#   tests/vm/power-cuts.sh [--arch A] --broken [N]   a build that does not sync a new snapshot: must show some
#   tests/vm/power-cuts.sh [--arch A] --self-update [N]   N (default 20) cuts during installs of
#                                                 releases that carry a new updater (issue #23)
# A: amd64 (default) or arm64 (the boards with the power-cut scenario; armhf has none).
set -euo pipefail
cd "$(dirname "$0")/../.."
n=
features=
arch=amd64
scenario=power_cuts
usage() { echo "usage: $0 [--arch amd64|arm64] [--broken | --self-update] [N >= 1]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --broken) features=break-snapshot-sync ;;
        --self-update) scenario=self_update_power_cuts ;;
        --arch) [ $# -ge 2 ] || usage; arch="$2"; shift ;;
        *[!0-9]* | '' | 0 | 0*) usage ;;
        *) [ ${#1} -le 6 ] || usage; n="$1" ;;
    esac
    shift
done
case "$arch" in amd64 | arm64) ;; *) usage ;; esac
if [ "$scenario" = self_update_power_cuts ]; then n="${n:-20}"; else n="${n:-100}"; fi
bash tests/setup.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
TOPE_OTA_POWER_CUTS="$n" TOPE_OTA_SELF_UPDATE_CUTS="$n" TOPE_OTA_BOX_FEATURES="$features" \
    cargo test --locked --test vm "$arch::$scenario" -- --exact --nocapture | tee "$log"
# A filter that matched nothing passes with 0 tests: that is no run.
grep -q '^test result: ok. 1 passed' "$log" || { echo "power-cuts.sh: $arch::$scenario did not run" >&2; exit 1; }

#!/usr/bin/env bash
# The box's power-cut benchmark: N cuts (default 100, seed TOPE_OTA_POWER_CUT_SEED or the fixed
# default) at random instants of a download, an install, a rollback and a heal; prints where each
# landed and any invariant violations. About 50 s a cut under TCG.
#   tests/vm/power-cuts.sh [N]            the device build: must show no violation
#   tests/vm/power-cuts.sh --broken [N]   a build that does not sync a new snapshot: must show some
set -euo pipefail
cd "$(dirname "$0")/../.."
n=100
features=
for a in "$@"; do
    case "$a" in
        --broken) features=break-snapshot-sync ;;
        *[!0-9]* | '') echo "usage: $0 [--broken] [N]" >&2; exit 2 ;;
        *) n="$a" ;;
    esac
done
bash tests/setup.sh
TOPE_OTA_POWER_CUTS="$n" TOPE_OTA_BOX_FEATURES="$features" \
    cargo test --locked --test vm power_cuts -- --nocapture

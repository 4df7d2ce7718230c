#!/usr/bin/env bash
# Build the .deb of tope-ota for amd64, arm64 and armhf (or the architectures named) on an amd64
# Debian bookworm machine, from Debian's own packages: the cross targets are built by Debian's
# rustc-web/cargo-web (1.96, from the release's security suite) with Debian's multi-arch
# standard library for the target (libstd-rust-web-dev:ARCH) and Debian's cross gcc as linker
# (and as C compiler for ring). amd64 is built by the machine's own toolchain, as the box does.
# Each binary must stay within 6 MiB. Prints one line per .deb.
#
#   deploy/build-debs.sh                 # all three
#   deploy/build-debs.sh arm64 armhf     # only these
#   deploy/build-debs.sh --features F arm64   # with cargo features (the box's broken build): built
#                                             # in target/features-F unless CARGO_TARGET_DIR is set, so
#                                             # a release's binaries and .debs are never such a build
set -euo pipefail
cd "$(dirname "$0")/.."

features=()
archs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --features) [ $# -ge 2 ] || { echo "build-debs.sh: --features needs a value" >&2; exit 2; }
            features=(--features "$2"); shift 2 ;;
        *) archs+=("$1"); shift ;;
    esac
done
[ ${#archs[@]} -gt 0 ] || archs=(amd64 arm64 armhf)
max=$((6 * 1024 * 1024))

triple() {
    case "$1" in
        amd64) echo x86_64-unknown-linux-gnu ;;
        arm64) echo aarch64-unknown-linux-gnu ;;
        armhf) echo armv7-unknown-linux-gnueabihf ;;
        *) echo "build-debs.sh: unknown architecture $1 (amd64, arm64, armhf)" >&2; exit 2 ;;
    esac
}

gnu() {
    case "$1" in
        arm64) echo aarch64-linux-gnu ;;
        armhf) echo arm-linux-gnueabihf ;;
    esac
}

if [ ${#features[@]} -gt 0 ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
    CARGO_TARGET_DIR="$PWD/target/features-${features[1]//[^A-Za-z0-9_-]/_}"
    export CARGO_TARGET_DIR
fi
bash tests/setup-cross.sh "${archs[@]}"
cargo_deb="$(command -v cargo-deb || echo "$HOME/.cargo/bin/cargo-deb")"
for a in "${archs[@]}"; do
    t="$(triple "$a")"
    if [ "$a" = amd64 ]; then
        cargo build --release --locked --target "$t" "${features[@]}"
    else
        g="$(gnu "$a")"
        env_t="$(echo "$t" | tr 'a-z-' 'A-Z_')"
        # Debian's toolchain only: the machine's rustup toolchain comes first on PATH otherwise.
        env PATH=/usr/bin:/bin RUSTC=/usr/bin/rustc \
            "CARGO_TARGET_${env_t}_LINKER=$g-gcc" \
            "CC_${t//-/_}=$g-gcc" "AR_${t//-/_}=$g-ar" \
            /usr/bin/cargo build --release --locked --target "$t" "${features[@]}"
    fi
    bin="${CARGO_TARGET_DIR:-target}/$t/release/tope-ota"
    size=$(stat -c %s "$bin")
    if [ "$size" -gt "$max" ]; then
        echo "build-debs.sh: $bin is $size bytes, over the 6 MiB budget" >&2
        exit 1
    fi
    deb="$("$cargo_deb" --locked --no-build --target "$t" | tail -n 1)"
    echo "$a: $deb (binary $size bytes: $(file -b "$bin" | cut -d, -f1-2))"
done

#!/usr/bin/env bash
# Install what cross builds for the named architectures (arm64, armhf; amd64 needs nothing)
# and running them under emulation take, from Debian's own packages, when missing. Idempotent,
# silent when everything is there.
#   - rustc-web, cargo-web: rustc/cargo 1.96 of the release's security suite, as /usr/bin/rustc
#     and /usr/bin/cargo (the machine's rustup toolchain has no standard library for the ARM
#     targets, and no other toolchain can be fetched here)
#   - libstd-rust-web-dev:ARCH: that rustc's standard library for the target (multi-arch)
#   - gcc-aarch64-linux-gnu / gcc-arm-linux-gnueabihf, libc6-dev-*-cross: linker and C compiler
#   - libc6:ARCH (multi-arch): the loader and libc qemu-user runs them with (the cross sysroot's
#     libc6-*-cross under `qemu -L` crashed at every pthread_create here)
#   - qemu-user-static: runs the ARM binaries in the tests
set -euo pipefail

need=()
foreign=()
for a in "$@"; do
    case "$a" in
        amd64) continue ;;
        arm64) g=aarch64-linux-gnu; lib=aarch64-unknown-linux-gnu; cross=arm64-cross; q=qemu-aarch64-static; ld=/lib/ld-linux-aarch64.so.1 ;;
        armhf) g=arm-linux-gnueabihf; lib=armv7-unknown-linux-gnueabihf; cross=armhf-cross; q=qemu-arm-static; ld=/lib/ld-linux-armhf.so.3 ;;
        *) echo "setup-cross.sh: unknown architecture $a (amd64, arm64, armhf)" >&2; exit 2 ;;
    esac
    [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] || need+=(rustc-web cargo-web)
    [ -d "/usr/lib/rustlib/$lib/lib" ] || { need+=("libstd-rust-web-dev:$a"); foreign+=("$a"); }
    command -v "$g-gcc" >/dev/null 2>&1 || need+=("gcc-$g" "libc6-dev-$cross")
    [ -e "$ld" ] || { need+=("libc6:$a"); foreign+=("$a"); }
    command -v "$q" >/dev/null 2>&1 || need+=(qemu-user-static)
done
[ ${#need[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup-cross.sh: missing ${need[*]}: run as root" >&2; exit 1; }
    sudo=(sudo)
fi
echo "setup-cross.sh: installing ${need[*]}" >&2
for a in "${foreign[@]}"; do
    dpkg --print-foreign-architectures | grep -qx "$a" || "${sudo[@]}" dpkg --add-architecture "$a"
done
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null

#!/usr/bin/env bash
# Builds the tributary .deb: `packaging/deb.sh` for amd64 (the build machine), or
# `packaging/deb.sh --target aarch64-unknown-linux-gnu` (arm64) / `armv7-unknown-linux-gnueabihf`
# (armhf). Prints the path of the package on its last line. The package layout is configured in
# firmware-gateway/Cargo.toml ([package.metadata.deb]), the maintainer scripts are in
# firmware-gateway/debian/.
#
# The binary is built once with the release profile (`cargo build --release`, the same command
# and target directory a release build uses anyway), then packed with `cargo deb --no-build`.
# For ARM targets the cross linker comes from the environment (cross/env.sh sets it up).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tributary-target}"
CARGO_DEB_VERSION=3.8.0

target=""
while [ $# -gt 0 ]; do
    case "$1" in
        --target) target="$2"; shift 2 ;;
        --target=*) target="${1#--target=}"; shift ;;
        *) echo "usage: $0 [--target aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf]" >&2; exit 2 ;;
    esac
done

# cargo-deb, installed once into ~/.cargo/bin and reused (a pinned version, built from crates.io).
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
# readelf (binutils) checks the binary's shared libraries below.
command -v readelf >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils
}

target_args=()
if [ -n "$target" ]; then
    source cross/env.sh "$target"
    target_args=(--target "$target")
fi

start=$(date +%s)
cargo build --release --locked -p tributary-gateway --bin tributary "${target_args[@]}"
echo "deb: release build $(( $(date +%s) - start )) s" >&2
# Depends: in firmware-gateway/Cargo.toml states libc6 (>= 2.34) and nothing else: check it.
bin="$CARGO_TARGET_DIR/${target:+$target/}release/tributary"
needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
for lib in $needed; do
    case "$lib" in
        libc.so.6 | libm.so.6 | libgcc_s.so.1 | ld-linux*) ;;
        *) echo "deb.sh: $bin needs $lib: add its package to depends in firmware-gateway/Cargo.toml" >&2; exit 1 ;;
    esac
done
glibc=$(readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
if [ "$(printf '%s\n2.34\n' "$glibc" | sort -V | tail -1)" != 2.34 ]; then
    echo "deb.sh: $bin needs glibc $glibc: raise libc6 (>= 2.34) in firmware-gateway/Cargo.toml" >&2
    exit 1
fi
# The release profile already strips symbols (Cargo.toml); no target strip tool is needed.
out_dir="$CARGO_TARGET_DIR/debian"
mkdir -p "$out_dir"
# cargo deb prints the package's path on stdout: this script's last line.
cargo deb --no-build --no-strip --locked -p tributary-gateway "${target_args[@]}" --output "$out_dir"

# shellcheck shell=bash
# Sourced, not run: `source cross/env.sh TRIPLE` prepares cargo to build and run for an ARM
# target on this x86-64 Debian machine. Installs what is missing (Debian's cross gcc, used only
# as the linker, and qemu-user-static; the Rust standard library with rustup) and exports
#   CARGO_TARGET_<TRIPLE>_LINKER  the cross gcc
#   CARGO_TARGET_<TRIPLE>_RUNNER  qemu-<arch>-static -L /usr/<gnu triple> (for cargo test/run)
#   CROSS_QEMU                    the same runner, for scripts that start a binary themselves
#   CC_<triple>, AR_<triple>      the cross gcc and ar, for build scripts using the cc crate
# Used by cross/build-and-test.sh and packaging/deb.sh.

case "${1:-}" in
    aarch64-unknown-linux-gnu)
        _gnu=aarch64-linux-gnu _gcc_pkg=gcc-aarch64-linux-gnu _qemu=qemu-aarch64-static ;;
    armv7-unknown-linux-gnueabihf)
        _gnu=arm-linux-gnueabihf _gcc_pkg=gcc-arm-linux-gnueabihf _qemu=qemu-arm-static ;;
    *)
        echo "cross/env.sh: unknown target '${1:-}' (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)" >&2
        return 2 ;;
esac

_need=()
command -v "$_gnu-gcc" >/dev/null 2>&1 || _need+=("$_gcc_pkg")
command -v "$_qemu" >/dev/null 2>&1 || _need+=(qemu-user-static)
if [ "${#_need[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${_need[@]}"
fi
rustup target list --installed | grep -qx "$1" || rustup target add "$1"

_var=$(echo "$1" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${_var}_LINKER=$_gnu-gcc"
export "CARGO_TARGET_${_var}_RUNNER=$_qemu -L /usr/$_gnu"
export CROSS_QEMU="$_qemu -L /usr/$_gnu"
# For crates that compile C or assembly with the cc crate (ring, for the mirror's QUIC/TLS).
_cc_var=$(echo "$1" | tr '-' '_')
export "CC_${_cc_var}=$_gnu-gcc" "AR_${_cc_var}=$_gnu-ar"
unset _cc_var
unset _gnu _gcc_pkg _qemu _need _var

#!/bin/sh
# Builds the rumqttd peer of `mqtt-bench` (release) outside the workspace's target directory and
# prints the binary's path:
#   tests/bench/rumqttd/build.sh
#   mqtt-bench --rumqttd "$HOME/.cache/tributary-rumqttd-target/release/bench-rumqttd"
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target="${CARGO_TARGET_DIR_RUMQTTD:-$HOME/.cache/tributary-rumqttd-target}"
cargo build --release --manifest-path "$here/Cargo.toml" --target-dir "$target" >&2
echo "$target/release/bench-rumqttd"

#!/usr/bin/env bash
# Node packages for the browser tests, outside the clone: playwright-core (drives the system's
# chromium; it downloads no browser) and MQTT.js. Installed into TRIBUTARY_NODE_DIR (default
# ~/.cache/tributary-node, shared with kafkajs for tests/interop/mqtt.sh); a no-op once there.
# Chromium itself is Debian's (`apt-get install chromium`, done by .ci/run).
set -euo pipefail
dir=${TRIBUTARY_NODE_DIR:-$HOME/.cache/tributary-node}
command -v node >/dev/null || { echo "node is not installed (apt-get install nodejs npm)" >&2; exit 1; }
if [ -d "$dir/node_modules/playwright-core" ] && [ -d "$dir/node_modules/mqtt" ]; then
    exit 0
fi
mkdir -p "$dir"
[ -f "$dir/package.json" ] || echo '{"private": true}' >"$dir/package.json"
(cd "$dir" && npm install --no-audit --no-fund --loglevel=error 'playwright-core@1' 'mqtt@5')

// The system's chromium under playwright-core, headless, for the browser tests (tests/src/browser.rs
// runs each script with NODE_PATH pointing at the packages tests/browser/setup.sh installed).
'use strict';
const { chromium } = require('playwright-core');

/// Chromium from TRIBUTARY_CHROMIUM, else Debian's /usr/bin/chromium. `--no-sandbox` because CI
/// runs as root, where chromium's sandbox refuses to start.
async function launch() {
  const executablePath = process.env.TRIBUTARY_CHROMIUM || '/usr/bin/chromium';
  return chromium.launch({ executablePath, headless: true, args: ['--no-sandbox'] });
}

/// Fails the script with a message: what a test reads in the Rust side's error.
function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

module.exports = { launch, fail };

// The browser test: a page in Debian's chromium (headless) loads MQTT.js from the
// installed package (no CDN), connects to TRIB_WS_URL with MQTT 5, subscribes to
// meters/+/reading, then a reading is published with mosquitto_pub to the gateway's TCP listener
// (TRIB_MQTT_PORT) and must reach the page; the page then publishes dashboard/setpoint at QoS 1
// (acknowledged once stored). Prints what the page received, as JSON.
'use strict';
const { execFileSync } = require('child_process');
const { launch, fail } = require('./chromium.js');

const url = process.env.TRIB_WS_URL || fail('TRIB_WS_URL is not set');
const mqttPort = process.env.TRIB_MQTT_PORT || fail('TRIB_MQTT_PORT is not set');

async function main() {
  const browser = await launch();
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.setContent('<!doctype html><meta charset="utf-8"><title>readings</title><pre id="log"></pre>');
    await page.addScriptTag({ path: require.resolve('mqtt/dist/mqtt.min') });
    await page.evaluate(async (wsUrl) => {
      window.received = [];
      const client = await window.mqtt.connectAsync(wsUrl, {
        protocolVersion: 5, clientId: 'browser-dashboard', clean: true, reconnectPeriod: 0, connectTimeout: 10000,
      });
      window.client = client;
      client.on('message', (topic, payload) => {
        window.received.push([topic, payload.toString()]);
        document.getElementById('log').textContent += `${topic} ${payload}\n`;
      });
      const granted = await client.subscribeAsync('meters/+/reading', { qos: 1 });
      if (granted[0].qos !== 1) throw new Error(`granted ${JSON.stringify(granted)}`);
    }, url);
    execFileSync('mosquitto_pub', ['-h', '127.0.0.1', '-p', mqttPort, '-V', 'mqttv5', '-q', '1',
      '-i', 'field-meter-7', '-t', 'meters/7/reading', '-m', '230.5']);
    await page.waitForFunction(() => window.received.length > 0, null, { timeout: 10000 })
      .catch(() => fail(`no reading reached the page; page errors: ${errors.join('; ')}`));
    const received = await page.evaluate(() => window.received);
    await page.evaluate(() => window.client.publishAsync('dashboard/setpoint', '21.0', { qos: 1 }));
    await page.evaluate(() => window.client.endAsync());
    console.log(JSON.stringify({ received }));
  } finally {
    await browser.close();
  }
}

main().catch((e) => fail(e.stack || String(e)));

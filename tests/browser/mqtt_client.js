// MQTT.js (the browser dashboards' client) in Node, over the URL given: ws://, wss:// or mqtt://
// (the same script over TCP, for comparing). A subscriber and a publisher connect with
// TRIB_VERSION (4 = 3.1.1, 5), the subscriber subscribes to TRIB_TOPIC at QoS 1, the publisher
// sends three QoS 1 messages and a last one; once the last arrived, prints as JSON how often each
// came and at which QoS, then (TRIB_DENIED_TOPIC) how a QoS 1 publish there was answered, and
// (TRIB_BAD_PASSWORD) how a login with that password was answered. TRIB_CA: a PEM file of the CA
// the server's certificate must chain to (wss, mqtts).
'use strict';
const fs = require('fs');
const mqtt = require('mqtt');
const { fail } = require('./chromium.js');

const env = (name, fallback) => process.env[name] ?? fallback;
const url = env('TRIB_URL') || fail('TRIB_URL is not set');
const version = Number(env('TRIB_VERSION', '5'));
const topic = env('TRIB_TOPIC', 'ws/readings');
// With a login, client ids start with the user name (the default `mqtt.client_ids` is %u-*).
const tag = `${env('TRIB_USER') ? `${env('TRIB_USER')}-` : ''}${version}-${process.pid}`;

function options(clientId, password) {
  const o = { protocolVersion: version, clientId, clean: true, reconnectPeriod: 0, connectTimeout: 10000 };
  if (env('TRIB_USER')) {
    o.username = env('TRIB_USER');
    o.password = password ?? env('TRIB_PASSWORD');
  }
  if (env('TRIB_CA')) {
    o.ca = fs.readFileSync(env('TRIB_CA'));
  }
  return o;
}

async function main() {
  const sub = await mqtt.connectAsync(url, options(`${tag}-sub`));
  const pub = await mqtt.connectAsync(url, options(`${tag}-pub`));
  const got = {};
  let last;
  const ended = new Promise((resolve) => { last = resolve; });
  sub.on('message', (t, payload, packet) => {
    const p = payload.toString();
    got[p] = got[p] || [];
    got[p].push(packet.qos);
    if (p === 'last') last();
  });
  const granted = await sub.subscribeAsync(topic, { qos: 1 });
  for (const m of ['m0', 'm1', 'm2', 'last']) {
    await pub.publishAsync(topic, m, { qos: 1 });
  }
  const timer = setTimeout(() => fail(`no 'last' message within 10 s; got ${JSON.stringify(got)}`), 10000);
  await ended;
  clearTimeout(timer);
  const result = { granted: granted.map((g) => g.qos), received: got };
  if (env('TRIB_DENIED_TOPIC')) {
    try {
      await pub.publishAsync(env('TRIB_DENIED_TOPIC'), 'denied', { qos: 1 });
      result.denied = 'acknowledged';
    } catch (e) {
      result.denied = `refused ${e.code}`;
    }
  }
  await pub.endAsync();
  await sub.endAsync();
  if (env('TRIB_BAD_PASSWORD')) {
    try {
      const c = await mqtt.connectAsync(url, options(`${tag}-bad`, env('TRIB_BAD_PASSWORD')));
      await c.endAsync();
      result.bad_login = 'accepted';
    } catch (e) {
      result.bad_login = `refused ${e.code}`;
    }
  }
  console.log(JSON.stringify(result));
}

main().catch((e) => fail(e.stack || String(e)));

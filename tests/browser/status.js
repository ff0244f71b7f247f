// The status page in chromium, stepping through a scenario with tests/it/status.rs over the
// control socket CONTROL (one line per step each way). MODE:
//   live:   the page loads (VERSION shown); after "produced", TOPIC appears without a reload.
//   mirror: the link shows up; after "stopped" down with a backlog; after "restarted" up again
//           with the backlog drained. With
//           SCREENSHOTS=dir, saves status-desktop.png and status-phone.png there.
//   auth:   nothing but the 401 without a login or with a wrong one; with USER/PASSWORD the
//           page shows TOPIC and the wrong login among the refusals.
'use strict';
const net = require('net');
const path = require('path');
const { launch, fail } = require('./chromium.js');

const env = (k) => process.env[k] || fail(`${k} is not set`);
const STEP_MS = 60000;

function control(addr) {
  const i = addr.lastIndexOf(':');
  const sock = net.connect(Number(addr.slice(i + 1)), addr.slice(0, i));
  let buf = '';
  const lines = [], waiting = [];
  sock.on('data', (d) => {
    buf += d;
    for (let n; (n = buf.indexOf('\n')) >= 0;) {
      const l = buf.slice(0, n);
      buf = buf.slice(n + 1);
      if (waiting.length) waiting.shift()(l); else lines.push(l);
    }
  });
  sock.on('error', (e) => fail(`control socket: ${e.message}`));
  return {
    send: (l) => sock.write(l + '\n'),
    next: () => (lines.length ? Promise.resolve(lines.shift()) : new Promise((r) => waiting.push(r))),
    async expect(l) { const got = await this.next(); if (got !== l) fail(`expected ${l} from the test, got ${got}`); },
    end: () => sock.end(),
  };
}

// Opens URL in `page`, waits for the first update, and marks the document so a reload shows.
async function open(page, url) {
  const resp = await page.goto(url);
  if (resp.status() !== 200) fail(`GET ${url}: ${resp.status()}`);
  await page.waitForSelector('body[data-updates]', { timeout: STEP_MS });
  await page.evaluate(() => { window.__sameDocument = true; });
}

async function sameDocument(page) {
  if (!(await page.evaluate(() => window.__sameDocument === true))) fail('the page was reloaded');
}

async function live(browser, ctl) {
  const page = await browser.newPage();
  await open(page, env('URL'));
  const version = await page.textContent('#version');
  if (version !== 'v' + env('VERSION')) fail(`version shown: ${version}`);
  const row = `tr[data-topic="${env('TOPIC')}"]`;
  if (await page.$(row)) fail('the topic is shown before it exists');
  ctl.send('loaded');
  await ctl.expect('produced');
  await page.waitForSelector(row, { timeout: STEP_MS });
  // Records: the fourth cell, once the third record is in.
  await page.waitForFunction((sel) => document.querySelector(sel).cells[3].textContent === '3', row, { timeout: STEP_MS });
  await sameDocument(page);
  console.log(`records ${await page.textContent(`${row} td:nth-child(4)`)}`);
  ctl.send('topic shown');
}

async function mirror(browser, ctl) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await open(page, env('URL'));
  const link = (state) => page.waitForSelector(`#mirror-link[data-state="${state}"]`, { timeout: STEP_MS });
  await link('up');
  ctl.send('up');
  await ctl.expect('stopped');
  await link('down');
  // The records produced while the receiver is away show as the backlog, and drain after.
  const lag = (cond) => page.waitForFunction(cond, null, { timeout: STEP_MS });
  await lag(() => Number(document.getElementById('mirror').dataset.lag) > 0);
  ctl.send('down');
  await ctl.expect('restarted');
  await link('up');
  await lag(() => document.getElementById('mirror').dataset.lag === '0');
  await sameDocument(page);
  const dir = process.env.SCREENSHOTS;
  if (dir) {
    await page.screenshot({ path: path.join(dir, 'status-desktop.png'), fullPage: true });
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: path.join(dir, 'status-phone.png'), fullPage: true });
  }
  ctl.send('up');
}

async function auth(browser) {
  const url = env('URL'), topic = env('TOPIC');
  // No login, then a wrong password: headless chromium meets the challenge with no credentials
  // to give (the navigation fails with ERR_INVALID_AUTH_CREDENTIALS, or shows the 401), and the
  // page shows nothing of the gateway. The same requests outside navigation get the 401.
  const wrong = 'Basic ' + Buffer.from(`${env('USER')}:wrong`).toString('base64');
  let wrongLogins = 0;
  for (const headers of [{}, { Authorization: wrong }]) {
    const counts = headers.Authorization ? 1 : 0;
    const ctx = await browser.newContext({ extraHTTPHeaders: headers });
    const page = await ctx.newPage();
    try {
      wrongLogins += counts;
      const resp = await page.goto(url);
      if (resp.status() !== 401) fail(`login ${JSON.stringify(headers)}: ${resp.status()}`);
      const body = await resp.text();
      if (body.includes(topic) || body.includes('mirror-link')) fail(`shown without a login: ${body}`);
    } catch (e) {
      if (!String(e).includes('ERR_INVALID_AUTH_CREDENTIALS')) throw e;
    }
    for (const route of ['', 'api/status', 'status.js']) {
      wrongLogins += counts;
      const r = await ctx.request.get(url + route);
      const challenge = r.headers()['www-authenticate'] || '';
      if (r.status() !== 401 || !challenge.startsWith('Basic ')) fail(`GET /${route}: ${r.status()} ${challenge}`);
      if ((await r.text()).includes(topic)) fail(`GET /${route} shows the topic without a login`);
    }
    await ctx.close();
  }
  // The right user: the browser answers the challenge, the page updates (its requests carry the login).
  const ctx = await browser.newContext({ httpCredentials: { username: env('USER'), password: env('PASSWORD') } });
  const page = await ctx.newPage();
  await open(page, url);
  await page.waitForSelector(`tr[data-topic="${topic}"]`, { timeout: STEP_MS });
  const refusal = await page.waitForSelector('#refusals li[data-kind="login"][data-protocol="http"]', { timeout: STEP_MS });
  const text = await refusal.textContent();
  if (!text.includes(`user "${env('USER')}"`) || !text.includes('wrong password')) fail(`refusal shown: ${text}`);
  // Two more updates: the polling goes on with the login.
  const n = Number(await page.getAttribute('body', 'data-updates'));
  await page.waitForFunction((n) => Number(document.body.dataset.updates) >= n + 2, n, { timeout: STEP_MS });
  console.log('login refused shown');
  console.log(`wrong logins ${wrongLogins}`);
  await ctx.close();
}

(async () => {
  const ctl = control(env('CONTROL'));
  const browser = await launch();
  try {
    const mode = env('MODE');
    if (mode === 'live') await live(browser, ctl);
    else if (mode === 'mirror') await mirror(browser, ctl);
    else if (mode === 'auth') await auth(browser);
    else fail(`unknown MODE ${mode}`);
  } finally {
    await browser.close();
    ctl.end();
  }
})().catch((e) => fail(e.stack || String(e)));

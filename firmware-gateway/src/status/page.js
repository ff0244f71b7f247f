// The status page: asks /api/status every refresh_ms (one request at a time) and fills the page
// in. Every string from the gateway is set as text, never as markup.
'use strict';
(function () {
  const SVG = 'http://www.w3.org/2000/svg';
  const $ = (id) => document.getElementById(id);
  let refreshMs = 2000;
  // The history series, asked for once per history interval (other refreshes say history=0).
  let history = { rates: {}, lag: [], at: 0, everyMs: 0 };

  function bytes(n) {
    if (n === null || n === undefined) return '—';
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + ' ' + u[i];
  }
  function duration(s) {
    if (s === null || s === undefined) return '—';
    s = Math.round(s);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + 'd ' + h + 'h';
    if (h) return h + 'h ' + m + 'm';
    if (m) return m + 'm ' + (s % 60) + 's';
    return s + 's';
  }
  function count(n) { return n === null || n === undefined ? '—' : Number(n).toLocaleString('en'); }
  function rate(r) { return r === null || r === undefined ? '—' : (r < 10 ? r.toFixed(1) : Math.round(r).toLocaleString('en')) + '/s'; }
  function clock(ms) { return new Date(ms).toLocaleTimeString('en-GB'); }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function figures(dl, pairs) {
    dl.replaceChildren();
    for (const [k, v] of pairs) { dl.append(el('dt', k), el('dd', v)); }
  }
  // A sparkline of `values` (oldest first) as inline SVG.
  function spark(values, w, h) {
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('width', w);
    svg.setAttribute('height', h);
    svg.setAttribute('viewBox', '0 0 ' + w + ' ' + h);
    const base = document.createElementNS(SVG, 'line');
    base.setAttribute('x1', 0); base.setAttribute('x2', w);
    base.setAttribute('y1', h - 0.5); base.setAttribute('y2', h - 0.5);
    svg.append(base);
    if (values.length > 1) {
      const max = Math.max(...values) || 1;
      const pts = values.map((v, i) => (i * w / (values.length - 1)).toFixed(1) + ',' + (h - 1 - v / max * (h - 3)).toFixed(1));
      const line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('points', pts.join(' '));
      svg.append(line);
    }
    return svg;
  }
  function rows(table, items, cells, empty) {
    const body = table.tBodies[0];
    body.replaceChildren();
    if (!items.length) {
      const td = el('td', empty, 'empty');
      td.colSpan = table.tHead.rows[0].cells.length;
      const tr = el('tr');
      tr.append(td);
      body.append(tr);
      return;
    }
    for (const it of items) { body.append(cells(it)); }
  }
  function shown(n, total) { return n < total ? '(' + n + ' of ' + total + ')' : '(' + total + ')'; }

  function render(s) {
    $('version').textContent = 'v' + s.version;
    $('uptime').textContent = duration(s.uptime_s);
    const d = s.disk;
    const pct = d.budget_bytes ? Math.min(100, 100 * d.used_bytes / d.budget_bytes) : 0;
    $('disk-bar').style.width = pct.toFixed(1) + '%';
    $('disk-bar').className = pct > 90 ? 'high' : '';
    figures($('disk'), [
      ['Used', bytes(d.used_bytes) + ' of ' + bytes(d.budget_bytes) + ' (' + pct.toFixed(1) + '%)'],
      ['Free on volume', bytes(d.free_bytes) + ' (minimum ' + bytes(d.free_min_bytes) + ')'],
      ['Database file', bytes(d.file_bytes)],
    ]);
    $('disk-fault').hidden = !d.write_fault;
    $('disk-fault').textContent = d.write_fault ? 'Writes failing: ' + d.write_fault : '';

    const m = s.mirror, link = $('mirror-link');
    link.dataset.state = m ? (m.link_up ? 'up' : 'down') : 'off';
    link.textContent = link.dataset.state;
    $('mirror').dataset.lag = m ? m.lag_records : '';
    figures($('mirror'), m ? [
      ['Behind', count(m.lag_records) + ' records, ' + bytes(m.lag_bytes)],
      ['Oldest unmirrored', duration(m.oldest_unmirrored_age_s)],
      ['Drain ETA', m.drain_eta_s === null ? (m.lag_records > 0 ? 'not draining' : '—') : duration(m.drain_eta_s)],
      ['Drain rate', count(Math.round(m.drain_records_per_s)) + ' records/s'],
      ['Reconnects', count(m.reconnects)],
      ['Last error', m.last_error || '—'],
    ] : [['Mirror', 'not configured']]);
    $('mirror-spark').replaceChildren(m ? spark(history.lag, 300, 40) : '');

    const c = s.clients;
    figures($('clients'), [
      ['MQTT connections', c.mqtt_connections === null ? 'listener off' : count(c.mqtt_connections)],
      ['Kafka connections', c.kafka_connections === null ? 'listener off' : count(c.kafka_connections)],
    ]);

    $('topics-count').textContent = shown(s.topics.length, s.topics_total);
    rows($('topics'), s.topics, (t) => {
      const tr = el('tr');
      tr.dataset.topic = t.name;
      const ret = [t.retention_ms ? duration(t.retention_ms / 1000) : '', t.retention_bytes ? bytes(t.retention_bytes) : '']
        .filter(Boolean).join(', ') || 'none';
      const sp = el('td');
      sp.append(spark(history.rates[t.name] || [], 120, 22));
      tr.append(el('td', t.name), el('td', count(t.partitions), 'num'), el('td', bytes(t.bytes), 'num'),
        el('td', count(t.records), 'num'), el('td', rate(t.rate_per_s), 'num'), sp, el('td', ret));
      return tr;
    }, 'no topics yet');

    $('groups-count').textContent = shown(s.groups.length, s.groups_total);
    rows($('groups'), s.groups, (g) => {
      const tr = el('tr');
      tr.dataset.group = g.name;
      tr.append(el('td', g.name), el('td', g.state), el('td', count(g.partitions), 'num'), el('td', count(g.lag), 'num'));
      return tr;
    }, 'no consumer groups');

    const list = $('refusals');
    list.replaceChildren();
    $('refusals-count').textContent = s.refusals_total ? '(' + count(s.refusals_total) + ' since start)' : '';
    if (!s.refusals.length) list.append(el('li', 'none', 'empty'));
    for (const r of s.refusals) {
      const li = el('li');
      li.dataset.kind = r.kind;
      li.dataset.protocol = r.protocol;
      li.append(el('span', r.kind + ' ' + r.protocol, 'kind'), el('span', clock(r.at_ms) + ' ', 'muted'),
        el('span', (r.who ? r.who + ': ' : '') + r.detail + (r.count > 1 ? ' (×' + r.count + ')' : '')));
      list.append(li);
    }
  }

  async function tick() {
    try {
      const due = Date.now() - history.at >= history.everyMs;
      const r = await fetch(due ? '/api/status' : '/api/status?history=0', { cache: 'no-store', credentials: 'same-origin' });
      if (!r.ok) throw new Error('HTTP ' + r.status);
      const s = await r.json();
      if (s.history_included) {
        history = { rates: {}, lag: s.mirror ? s.mirror.lag_history : [], at: Date.now(), everyMs: s.history_interval_ms };
        for (const t of s.topics) history.rates[t.name] = t.rate_history;
      }
      render(s);
      refreshMs = s.refresh_ms;
      $('error').hidden = true;
      $('updated').textContent = 'updated ' + clock(Date.now());
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    } catch (e) {
      $('error').hidden = false;
      $('error').textContent = 'No fresh figures (' + e.message + '); retrying.';
    }
    setTimeout(tick, refreshMs);
  }
  tick();
})();

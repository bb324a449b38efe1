// The live operations page: orders table, driver map, counters. Everything
// live comes over one events-dialect socket (ORDER_*, DRIVER_LOCATION); the
// only API calls are the order list (at sign-in, and again whenever a room
// could not be recovered after a reconnect: `resync`) and /api/stats for
// counters. A reconnect (e.g. after a node's drain) resumes where the socket
// left off, so the table never stays stale.

import { SwitchboardClient } from '/dashboard/switchboard.js';

const $ = (s) => document.querySelector(s);
const wsBase = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`;
let client = null;
let token = null;

async function api(path) {
  const r = await fetch(path, { headers: { authorization: `Bearer ${token}` } });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${(await r.json().catch(() => ({})))?.error?.message ?? ''}`);
  return r.json();
}

function setStatus(text, cls) {
  const s = $('#status');
  s.textContent = text;
  s.className = `pill ${cls}`;
}

// ---- orders table -------------------------------------------------------

function cell(text) {
  const td = document.createElement('td');
  td.textContent = text ?? '–';
  return td;
}

const DISPATCH_LABELS = {
  searching: 'searching',
  offered: 'offered',
  assigned: 'assigned',
  no_drivers: 'no drivers',
  gave_up: 'gave up',
  none: '–',
};

function badge(kind, value, text = value) {
  const td = cell('');
  const s = document.createElement('span');
  s.className = `${kind} ${value}`;
  s.textContent = text;
  td.append(s);
  return td;
}

function renderRow(o) {
  let tr = document.querySelector(`#orders tr[data-id="${o.id}"]`);
  const fresh = !tr;
  if (!tr) {
    tr = document.createElement('tr');
    tr.dataset.id = o.id;
  }
  const dispatch = o.dispatch_status ?? 'none';
  tr.replaceChildren(
    cell(o.order_code),
    badge('status', o.status),
    badge('dispatch', dispatch, DISPATCH_LABELS[dispatch]),
    cell(o.city_id), cell(o.user_id), cell(o.driver_id), cell(o.total), cell(o.version),
    cell(new Date(o.updated_at).toLocaleTimeString()),
  );
  tr.dataset.status = o.status;
  tr.dataset.dispatch = dispatch;
  tr.dataset.version = o.version;
  // Nobody is taking these: they must catch the eye (SPEC §5).
  tr.classList.toggle('stranded', dispatch === 'no_drivers' || dispatch === 'gave_up');
  tr.classList.remove('flash');
  void tr.offsetWidth;
  tr.classList.add('flash');
  if (fresh) {
    // Newest first.
    const body = $('#orders tbody');
    const after = [...body.children].find((r) => Number(r.dataset.id) < o.id);
    body.insertBefore(tr, after ?? null);
  }
  countOrders();
}

function countOrders() {
  $('#order-count').textContent = `${$('#orders tbody').children.length} shown`;
}

// ---- driver map ---------------------------------------------------------

const W = 600, H = 420, PAD = 30;
let box = null; // {minLat, maxLat, minLon, maxLon}

function fit(p) {
  if (!box) box = { minLat: p.latitude - 0.01, maxLat: p.latitude + 0.01, minLon: p.longitude - 0.01, maxLon: p.longitude + 0.01 };
  const before = JSON.stringify(box);
  box.minLat = Math.min(box.minLat, p.latitude); box.maxLat = Math.max(box.maxLat, p.latitude);
  box.minLon = Math.min(box.minLon, p.longitude); box.maxLon = Math.max(box.maxLon, p.longitude);
  return before !== JSON.stringify(box);
}

// Equirectangular projection of the bounding box onto the SVG.
function project(lat, lon) {
  const kx = Math.cos(((box.minLat + box.maxLat) / 2) * Math.PI / 180);
  const spanX = Math.max((box.maxLon - box.minLon) * kx, 1e-6);
  const spanY = Math.max(box.maxLat - box.minLat, 1e-6);
  const scale = Math.min((W - 2 * PAD) / spanX, (H - 2 * PAD) / spanY);
  const x = PAD + (lon - box.minLon) * kx * scale + ((W - 2 * PAD) - spanX * scale) / 2;
  const y = H - PAD - (lat - box.minLat) * scale - ((H - 2 * PAD) - spanY * scale) / 2;
  return [x, y];
}

function drawGrid() {
  const g = $('#grid');
  g.replaceChildren();
  for (let i = 1; i < 6; i++) {
    for (const [x1, y1, x2, y2] of [[i * W / 6, 0, i * W / 6, H], [0, i * H / 6, W, i * H / 6]]) {
      const l = document.createElementNS('http://www.w3.org/2000/svg', 'line');
      l.setAttribute('x1', x1); l.setAttribute('y1', y1); l.setAttribute('x2', x2); l.setAttribute('y2', y2);
      g.append(l);
    }
  }
}

function placeAll() {
  for (const [id, p] of client.drivers) place(id, p);
}

// A marker is one group moved as a whole (`transform`), so its label can
// never lag behind its dot: the dot sits at the group's origin, the label at
// a fixed offset from it.
function place(id, p) {
  let m = document.querySelector(`#markers g[data-driver="${id}"]`);
  if (!m) {
    m = document.createElementNS('http://www.w3.org/2000/svg', 'g');
    m.dataset.driver = id;
    m.setAttribute('class', 'marker');
    const c = document.createElementNS('http://www.w3.org/2000/svg', 'circle');
    c.setAttribute('r', 7);
    c.setAttribute('class', 'driver');
    c.dataset.driver = id;
    const t = document.createElementNS('http://www.w3.org/2000/svg', 'text');
    t.setAttribute('class', 'label');
    t.setAttribute('x', 10);
    t.setAttribute('y', 4);
    t.textContent = `#${id}`;
    m.append(c, t);
    $('#markers').append(m);
  }
  const [x, y] = project(p.latitude, p.longitude);
  m.style.transform = `translate(${x.toFixed(1)}px, ${y.toFixed(1)}px)`;
  m.dataset.x = x.toFixed(1);
  m.dataset.y = y.toFixed(1);
  const c = m.querySelector('circle');
  c.dataset.lat = p.latitude;
  c.dataset.lon = p.longitude;
  $('#driver-count').textContent = `${client.drivers.size} seen`;
}

// ---- counters -------------------------------------------------------------

let last = null;
async function refreshStats() {
  try {
    const s = await api('/api/stats');
    $('#nodes').textContent = s.nodes.length;
    $('#sockets').textContent = s.sockets;
    const now = performance.now();
    if (last) {
      const rate = (s.messages_out - last.out) / ((now - last.t) / 1000);
      $('#rate').textContent = Math.max(0, rate).toFixed(1);
    }
    last = { out: s.messages_out, t: now };
  } catch (e) {
    // Managers may not read /api/stats: counters stay blank.
    $('#rate').textContent = '–';
  }
}

// ---- sign in --------------------------------------------------------------

async function signIn(t) {
  token = t.trim();
  $('#signin-error').hidden = true;
  try {
    const list = await api('/api/orders?limit=200');
    client?.close();
    // On resync the cache reloads the same view the table started from.
    const loadOrders = async () => (await api('/api/orders?limit=200')).items;
    client = new SwitchboardClient(`${wsBase}/ws`, { token, loadOrders });
    for (const o of list.items) client.orders.byId.set(o.id, o);
    client.orders.subscribe((kind, id, order) => {
      if (kind === 'removed') {
        document.querySelector(`#orders tr[data-id="${id}"]`)?.remove();
        countOrders();
      } else if ((kind === 'added' || kind === 'updated') && order) {
        renderRow(order);
      } else if (kind === 'reloaded') {
        const n = Number(document.body.dataset.reloads ?? 0) + 1;
        document.body.dataset.reloads = n; // tests read it
        setStatus('live (reloaded)', 'on');
      }
    });
    client.on('resync', () => setStatus('reloading…', 'retry'));
    client.on('DRIVER_LOCATION', (msg) => {
      const p = client.drivers.get(msg.payload.driverId);
      if (fit(p)) placeAll(); else place(msg.payload.driverId, p);
    });
    client.on('open', () => setStatus('live', 'on'));
    client.on('reconnecting', (n) => setStatus(`reconnecting (${n})`, 'retry'));
    client.on('gave-up', (code) => setStatus(code === 4001 ? 'token rejected' : 'disconnected', 'off'));
    client.connect();
    $('#orders tbody').replaceChildren();
    for (const o of client.orders.list().reverse()) renderRow(o);
    $('#signin').hidden = true;
    $('#live').hidden = false;
    refreshStats();
    setInterval(refreshStats, 2000);
  } catch (e) {
    $('#signin-error').textContent = e.message;
    $('#signin-error').hidden = false;
  }
}

drawGrid();
$('#go').addEventListener('click', () => signIn($('#token').value));
fetch('/dashboard/dev-token').then(async (r) => {
  if (!r.ok) return;
  const { token: dev } = await r.json();
  const b = $('#dev');
  b.hidden = false;
  b.addEventListener('click', () => { $('#token').value = dev; signIn(dev); });
}).catch(() => {});

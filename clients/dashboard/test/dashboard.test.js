// The dashboard in headless Chromium against a real node: an order created
// over HTTP appears in the table, a driver location moves its marker, a
// deleted order disappears. Saves a screenshot. Behind a balancer over two
// nodes, a drained node never leaves the table stale.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

import { chromium } from 'playwright-core';

import { Balancer, Node, admin, mint } from '../../js/test/helpers.js';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const SHOTS = process.env.SCREENSHOT_DIR ?? join(process.env.CARGO_TARGET_DIR ?? '/tmp', 'dashboard-screenshots');

test('orders and drivers update live in the dashboard', async (t) => {
  const node = await Node.start(t);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));

  await page.goto(`${node.http}/dashboard`);
  // Not dev mode (a secret is configured): no dev-token button.
  assert.equal(await page.isHidden('#dev'), true);
  await page.fill('#token', admin());
  await page.click('#go');
  await page.waitForSelector('#live:not([hidden])');
  await page.waitForSelector('#status.on');

  const created = await node.call('POST', '/api/orders', admin(), { city_id: 1, user_id: 5, total: 1500 });
  assert.equal(created.status, 201);
  const id = created.body.id;
  const row = `#orders tr[data-id="${id}"]`;
  await page.waitForSelector(row);
  assert.equal(await page.getAttribute(row, 'data-status'), 'pending');

  await node.call('PATCH', `/api/orders/${id}`, admin(), { status: 'confirmed' });
  await page.waitForSelector(`${row}[data-status="confirmed"]`);

  const driver = mint({ sub: 42, role: 'driver', city_id: 1 });
  const marker = 'circle[data-driver="42"]';
  await node.call('POST', '/api/driver/location', driver, { latitude: 41.30, longitude: 69.24 });
  await page.waitForSelector(marker);
  const other = mint({ sub: 43, role: 'driver', city_id: 1 });
  await node.call('POST', '/api/driver/location', other, { latitude: 41.34, longitude: 69.30 });
  await page.waitForSelector('circle[data-driver="43"]');
  const group = 'g[data-driver="42"]';
  // Where the label sits against its dot, on screen.
  const offset = () => page.evaluate((sel) => {
    const g = document.querySelector(sel);
    const c = g.querySelector('circle').getBoundingClientRect();
    const t = g.querySelector('text').getBoundingClientRect();
    return [Math.round(t.left - c.left), Math.round(t.top - c.top)];
  }, group);
  const still = await offset();
  const before = await page.getAttribute(group, 'data-x');
  await node.call('POST', '/api/driver/location', driver, { latitude: 41.32, longitude: 69.28 });
  await page.waitForFunction(
    ([sel, old]) => document.querySelector(sel)?.dataset.x !== old,
    [group, before],
  );
  assert.equal(await page.getAttribute(marker, 'data-lat'), '41.32');
  // The label travels with its dot, during the move and after it.
  assert.deepEqual(await offset(), still);
  await page.waitForTimeout(600);
  assert.deepEqual(await offset(), still);

  // An order nobody can take stands out: dispatch status `no_drivers`.
  const far = await node.call('POST', '/api/orders', admin(),
    { city_id: 1, user_id: 6, total: 10, latitude_from: 40.0, longitude_from: 60.0 });
  assert.equal(far.status, 201);
  const farRow = `#orders tr[data-id="${far.body.id}"]`;
  await page.waitForSelector(`${farRow}[data-dispatch="no_drivers"].stranded`);
  assert.equal(await page.textContent(`${farRow} .dispatch`), 'no drivers');
  assert.equal(await page.getAttribute(row, 'data-dispatch'), 'none');
  assert.equal(await page.$eval(row, (r) => r.classList.contains('stranded')), false);

  // Counters come from /api/stats.
  await page.waitForFunction(() => document.querySelector('#sockets').textContent !== '–');

  mkdirSync(SHOTS, { recursive: true });
  const shot = join(SHOTS, 'dashboard.png');
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${shot}`);

  const del = await node.call('DELETE', `/api/orders/${id}`, admin());
  assert.equal(del.status, 204);
  await page.waitForSelector(row, { state: 'detached' });
  assert.deepEqual(errors, []);
});

test('a bad token is refused on the sign-in form', async (t) => {
  const node = await Node.start(t);
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'] });
  t.after(() => browser.close());
  const page = await browser.newPage();
  await page.goto(`${node.http}/dashboard`);
  await page.fill('#token', 'not-a-token');
  await page.click('#go');
  await page.waitForSelector('#signin-error:not([hidden])');
  assert.match(await page.textContent('#signin-error'), /401/);
});

test('a drained node never leaves the table stale: resumed, or reloaded over HTTP', async (t) => {
  const { redis, nodes: [a, b] } = await Node.cluster(t, 2);
  // The page, its socket and its API calls all go through the balancer.
  const lb = await Balancer.start(t, a.port);
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'] });
  t.after(() => browser.close());
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`http://127.0.0.1:${lb.port}/dashboard`);
  await page.fill('#token', admin());
  await page.click('#go');
  await page.waitForSelector('#status.on');
  const row = (id) => `#orders tr[data-id="${id}"]`;
  const create = async (node, total) => {
    const r = await node.call('POST', '/api/orders', admin(), { city_id: 1, user_id: 5, total });
    assert.equal(r.status, 201);
    return r.body.id;
  };
  const o1 = await create(a, 100);
  await page.waitForSelector(row(o1));

  // A drains; while the page has no node, an order is created and o1 moves on.
  lb.closed = true;
  lb.target = b.port;
  const drained = a.stop();
  await page.waitForSelector('#status.retry');
  const o2 = await create(b, 200);
  assert.equal((await b.call('PATCH', `/api/orders/${o1}`, admin(), { status: 'confirmed' })).status, 200);
  await drained;
  lb.closed = false;
  // Resumed on B: both come as replayed events, no reload.
  await page.waitForSelector(row(o2), { timeout: 20000 });
  await page.waitForSelector(`${row(o1)}[data-status="confirmed"]`);
  await page.waitForSelector('#status.on');
  assert.equal(await page.getAttribute('body', 'data-reloads'), null, 'recovered: no HTTP reload');

  // B drains too, and Redis loses the history meanwhile (a flush): the
  // resume on A (back on its port) cannot be honoured, so the page reloads.
  await a.spawn();
  lb.closed = true;
  lb.target = a.port;
  const drainedB = b.stop();
  await page.waitForSelector('#status.retry');
  const o3 = await create(a, 300);
  assert.equal((await a.call('DELETE', `/api/orders/${o2}`, admin())).status, 204);
  assert.equal(await redis.command('FLUSHALL'), '+OK');
  await drainedB;
  lb.closed = false;
  await page.waitForSelector('body[data-reloads="1"]', { timeout: 20000 });
  await page.waitForSelector(row(o3));
  await page.waitForSelector(row(o2), { state: 'detached' });
  assert.equal(await page.getAttribute(row(o1), 'data-status'), 'confirmed');
  await page.waitForSelector('#status.on');
  assert.deepEqual(errors, []);
});

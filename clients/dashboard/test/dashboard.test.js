// The dashboard in headless Chromium against a real node: an order created
// over HTTP appears in the table, a driver location moves its marker, a
// deleted order disappears. Saves a screenshot.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

import { chromium } from 'playwright-core';

import { Node, admin, mint } from '../../js/test/helpers.js';

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
  const before = await page.getAttribute(marker, 'cx');
  await node.call('POST', '/api/driver/location', driver, { latitude: 41.32, longitude: 69.28 });
  await page.waitForFunction(
    ([sel, old]) => document.querySelector(sel)?.getAttribute('cx') !== old,
    [marker, before],
  );
  assert.equal(await page.getAttribute(marker, 'data-lat'), '41.32');

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

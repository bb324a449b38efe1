// The JS client against a real switchboard node.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { SwitchboardClient, OrdersCache, backoffDelay, dialectOf } from '../switchboard.js';
import { Node, admin, mint, next, until } from './helpers.js';

test('dialect from the URL path', () => {
  assert.equal(dialectOf('ws://h/'), 'rooms');
  assert.equal(dialectOf('ws://h/ws'), 'events');
  assert.equal(dialectOf('ws://h/ws/driver/orders/'), 'driver');
});

test('backoff doubles, is capped, and jitters within [0.5, 1.5)', () => {
  assert.equal(backoffDelay(1, 100, 10000, () => 0.5), 100);
  assert.equal(backoffDelay(4, 100, 10000, () => 0.5), 800);
  assert.equal(backoffDelay(20, 100, 1000, () => 0.5), 1000);
  assert.equal(backoffDelay(1, 100, 10000, () => 0), 50);
  assert.equal(backoffDelay(1, 100, 10000, () => 0.999), 150);
});

test('the cache keeps the newest version and signals refetch', () => {
  const c = new OrdersCache();
  const seen = [];
  c.subscribe((kind, id) => seen.push(`${kind}:${id}`));
  c.apply({ type: 'ORDER_CREATED', payload: { id: 1, status: 'pending', version: 1 } });
  c.apply({ type: 'ORDER_UPDATED', payload: { id: 1, status: 'ready', version: 3, changed: ['status'] } });
  c.apply({ type: 'ORDER_UPDATED', payload: { id: 1, status: 'confirmed', version: 2, changed: ['status'] } });
  assert.equal(c.get(1).status, 'ready', 'a stale update is dropped');
  assert.equal(c.get(1).changed, undefined);
  c.apply({ type: 'ORDER_DELETED', payload: { id: 1 } });
  assert.equal(c.get(1), undefined);
  assert.deepEqual(seen, ['added:1', 'updated:1', 'refetch:1', 'removed:1']);
});

test('receives publishes in each dialect with typed callbacks', async (t) => {
  const node = await Node.start(t);
  const events = new SwitchboardClient(node.ws('/ws'), { token: admin() }).connect();
  const rooms = new SwitchboardClient(node.ws('/'), { token: admin() }).connect();
  t.after(() => { events.close(); rooms.close(); });
  // Listen on both before awaiting either: the second may arrive first.
  const ready = [next(events, 'CONNECTED'), next(rooms, 'connected')];
  await Promise.all(ready);
  const a = next(events, 'hello');
  const b = next(rooms, 'hello');
  await node.publish('admin-orders', 'hello', { n: 1 });
  assert.deepEqual((await a).payload, { n: 1 });
  assert.deepEqual((await b).data, { n: 1 });
  // join-room is acknowledged once live.
  const joined = next(rooms, 'room-joined');
  rooms.joinRoom('city-7-orders');
  assert.equal((await joined).data.roomId, 'city-7-orders');
});

test('orders cache and driver map follow the server without API calls', async (t) => {
  const node = await Node.start(t);
  const c = new SwitchboardClient(node.ws('/ws'), { token: admin() }).connect();
  t.after(() => c.close());
  await next(c, 'CONNECTED');
  const refetches = [];
  c.orders.subscribe((kind, id) => kind === 'refetch' && refetches.push(id));

  const created = await node.call('POST', '/api/orders', admin(), { city_id: 1, user_id: 5, total: 100 });
  assert.equal(created.status, 201);
  const id = created.body.id;
  await until(() => c.orders.get(id)?.status === 'pending');

  const patched = await node.call('PATCH', `/api/orders/${id}`, admin(), { status: 'confirmed' });
  assert.equal(patched.status, 200);
  await until(() => c.orders.get(id)?.status === 'confirmed');
  assert.equal(c.orders.get(id).version, 2);
  assert.deepEqual(refetches, [id]);

  const driver = mint({ sub: 77, role: 'driver', city_id: 1 });
  const loc = await node.call('POST', '/api/driver/location', driver, { latitude: 41.3, longitude: 69.2, heading: 10, speed: 5 });
  assert.equal(loc.status, 204);
  await until(() => c.drivers.get(77)?.latitude === 41.3);
  assert.equal(c.drivers.get(77).longitude, 69.2);

  const del = await node.call('DELETE', `/api/orders/${id}`, admin());
  assert.equal(del.status, 204);
  await until(() => c.orders.get(id) === undefined);
});

test('survives a node restart and keeps receiving', async (t) => {
  const node = await Node.start(t);
  const c = new SwitchboardClient(node.ws('/ws'), { token: admin(), baseDelayMs: 100, maxDelayMs: 500 }).connect();
  t.after(() => c.close());
  await next(c, 'CONNECTED');
  const closed = next(c, 'close');
  await node.stop(); // drain: the socket is closed 1012
  const [code] = await closed;
  assert.equal(code, 1012);
  // Listen before restarting: the client may reconnect while spawn() waits.
  const reconnected = next(c, 'CONNECTED', 20000);
  await node.spawn(); // same port, same database
  await reconnected;
  assert.ok(c.attempt === 0, 'attempts reset after a successful reconnect');
  const got = next(c, 'after-restart');
  await node.publish('admin-orders', 'after-restart', { ok: true });
  assert.deepEqual((await got).payload, { ok: true });
});

test('a rejected token (4001) is not retried', async (t) => {
  const node = await Node.start(t);
  const bad = mint({ sub: 1, role: 'admin' }, 'some-other-secret-0123456789');
  const c = new SwitchboardClient(node.ws('/ws'), { token: bad, baseDelayMs: 10 });
  let reconnects = 0;
  c.on('reconnecting', () => reconnects++);
  const err = next(c, 'ERROR');
  const gaveUp = next(c, 'gave-up');
  c.connect();
  assert.equal((await err).payload.code, 'unauthorized');
  assert.equal(await gaveUp, 4001);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(reconnects, 0);
});

test('gives up after maxAttempts when nothing listens', async () => {
  const c = new SwitchboardClient('ws://127.0.0.1:9/ws', { token: 'x', maxAttempts: 3, baseDelayMs: 10, maxDelayMs: 20 });
  const attempts = [];
  c.on('reconnecting', (n) => attempts.push(n));
  const gaveUp = next(c, 'gave-up');
  c.connect();
  await gaveUp;
  assert.deepEqual(attempts, [1, 2, 3]);
});

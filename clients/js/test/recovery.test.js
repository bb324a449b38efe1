// Recovery (SPEC §10) against a real Redis-backed cluster of two nodes
// behind a TCP balancer: a client on node A loses it (drain 1012, or
// SIGKILL), reconnects through the balancer to node B with `since` and gets
// exactly what was published meanwhile, once, in order; a resume the server
// cannot honour (wrong epoch) resyncs the room and the orders cache
// refetches over HTTP.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { SwitchboardClient } from '../switchboard.js';
import { Balancer, Node, admin, mint, next, until } from './helpers.js';

/** Everything a client signals, in order; `tick` is the type of its ticks. */
function record(c, tick = 'tick') {
  const log = { ticks: [], frames: [], recovered: [], resync: [], duplicates: 0, closes: [] };
  c.on('message', (m) => {
    if (m.type === tick) {
      log.ticks.push((m.payload ?? m.data ?? m).n);
      log.frames.push([m.room, m.offset]);
    }
  });
  c.on('recovered', (room, missed) => log.recovered.push([room, missed]));
  c.on('resync', (room, reason) => log.resync.push([room, reason]));
  c.on('duplicate', () => log.duplicates++);
  c.on('close', (code) => log.closes.push(code));
  return log;
}

const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

for (const how of ['drain', 'kill']) {
  test(`after a ${how} of its node, each dialect resumes on the other node: every missed event once, in order`, async (t) => {
    const { nodes: [a, b] } = await Node.cluster(t, 2);
    const lb = await Balancer.start(t, a.port);
    // The first reconnect waits 1–3 s: the test publishes in that gap.
    const opts = (token) => ({ token, baseDelayMs: 2000, maxDelayMs: 4000, pingIntervalMs: 0, loadOrders: null });
    const clients = {
      events: new SwitchboardClient(lb.ws('/ws'), opts(admin())),
      rooms: new SwitchboardClient(lb.ws('/'), opts(admin())),
      driver: new SwitchboardClient(lb.ws('/ws/driver/orders/'), opts(mint({ sub: 7, role: 'driver', city_id: 1 }))),
    };
    const room = { events: 'admin-orders', rooms: 'city-9-orders', driver: 'driver-7' };
    const logs = {};
    const ready = [];
    for (const [k, c] of Object.entries(clients)) {
      logs[k] = record(c, `tick:${room[k]}`); // the rooms client is in admin-orders too
      ready.push(next(c, { events: 'CONNECTED', rooms: 'connected', driver: 'connection_established' }[k]));
      t.after(() => c.close());
    }
    // The rooms-dialect client follows a room it joins by hand: it resumes
    // through `join-room` with `since`.
    const joined = next(clients.rooms, 'room-joined');
    clients.rooms.joinRoom('city-9-orders');
    for (const c of Object.values(clients)) c.connect();
    await Promise.all(ready);
    await joined;

    const publishAll = async (node, from, to) => {
      for (let n = from; n <= to; n++) {
        for (const r of Object.values(room)) await node.publish(r, `tick:${r}`, { n });
      }
    };
    await publishAll(a, 1, 3);
    for (const log of Object.values(logs)) await until(() => log.ticks.length === 3);

    lb.target = b.port; // new connections land on B
    // Resumed: the verdict for the client's room (the connect message, or
    // `room-joined` for the room joined by hand) has come.
    const resumed = Object.entries(clients).map(([k, c]) => next(c, 'recovered', 20000, (r) => r === room[k]));
    const closed = Object.values(clients).map((c) => next(c, 'close', 20000));
    // SIGTERM: 1012 after the drain delay; SIGKILL: the connections just drop.
    const stopped = how === 'drain' ? a.stop() : a.kill();
    await Promise.all(closed);
    await publishAll(b, 4, 8); // while every client is between nodes
    await stopped;
    await Promise.all(resumed);
    await publishAll(b, 9, 10); // live again
    for (const log of Object.values(logs)) await until(() => log.ticks.length >= 10);
    await new Promise((r) => setTimeout(r, 200)); // nothing more may come

    for (const [k, log] of Object.entries(logs)) {
      assert.deepEqual(log.ticks, range(1, 10), `${k}: every event once, in order`);
      assert.equal(log.duplicates, 0, `${k}: the server replayed nothing twice`);
      assert.equal(log.closes[0], how === 'drain' ? 1012 : 1006, k);
      assert.deepEqual(log.resync, [], `${k}: nothing to resync`);
      assert.deepEqual(log.recovered.find(([r]) => r === room[k]), [room[k], 5], `${k}: recovered, 5 missed`);
      // Every frame names its room, with offsets one apart.
      const offsets = log.frames.map(([r, o]) => (assert.equal(r, room[k]), o));
      assert.deepEqual(offsets, range(offsets[0], offsets[0] + 9), k);
      assert.deepEqual(clients[k].positions()[room[k]].offset, offsets[9], k);
    }
  });
}

test('a resume with a wrong epoch resyncs that room, and the orders cache refetches over HTTP', async (t) => {
  const { nodes: [a, b] } = await Node.cluster(t, 2);
  const lb = await Balancer.start(t, a.port);
  const fetches = [];
  const counting = (url, init) => {
    fetches.push(new URL(url).pathname);
    return fetch(url, init);
  };
  // The cache's refetch goes to node B's HTTP API (A is gone by then).
  const c = new SwitchboardClient(lb.ws('/ws'), {
    token: admin(), baseDelayMs: 2000, maxDelayMs: 4000, pingIntervalMs: 0, fetch: counting, httpUrl: b.http,
  });
  const log = record(c);
  const reloaded = [];
  c.orders.subscribe((kind, rooms) => kind === 'reloaded' && reloaded.push(rooms));
  t.after(() => c.close());
  const connected = next(c, 'CONNECTED');
  c.connect();
  const hello = await connected;
  assert.equal(typeof hello.payload.rooms['admin-orders'].epoch, 'string', 'CONNECTED names the positions');

  const first = await a.call('POST', '/api/orders', admin(), { city_id: 1, user_id: 5, total: 100 });
  assert.equal(first.status, 201);
  await until(() => c.orders.get(first.body.id));
  assert.equal(c.positions()['admin-orders'].epoch, hello.payload.rooms['admin-orders'].epoch);

  // The client's epoch no longer matches the room's.
  c.tracker.positions.get('admin-orders').epoch = 'not-the-epoch';
  lb.target = b.port;
  const closed = next(c, 'close', 20000);
  const resynced = next(c, 'resync', 20000);
  const stopped = a.stop();
  await closed;
  // Missed while away, and not replayable: a new order, and the first one deleted.
  const second = await b.call('POST', '/api/orders', admin(), { city_id: 1, user_id: 5, total: 200 });
  assert.equal(second.status, 201);
  assert.equal((await b.call('DELETE', `/api/orders/${first.body.id}`, admin())).status, 204);
  await stopped;

  assert.deepEqual(await resynced, ['admin-orders', 'epoch_changed']);
  await until(() => reloaded.length === 1);
  assert.deepEqual(reloaded, [['admin-orders']]);
  assert.deepEqual(fetches, ['/api/orders'], 'one HTTP refetch');
  assert.deepEqual(log.resync, [['admin-orders', 'epoch_changed']], 'only that room');
  assert.ok(c.orders.get(second.body.id), 'the order created meanwhile is there');
  assert.equal(c.orders.get(first.body.id), undefined, 'the order deleted meanwhile is gone');
  // From the server's position on, live events flow again.
  const third = await b.call('POST', '/api/orders', admin(), { city_id: 1, user_id: 5, total: 300 });
  await until(() => c.orders.get(third.body.id));
  assert.notEqual(c.positions()['admin-orders'].epoch, 'not-the-epoch');
});

test('a since the server refuses (bad_since): the rooms it named resync, and the client goes on live', async (t) => {
  const node = await Node.start(t);
  // This client never sends a malformed `since`: mangle it on the way out.
  class Mangling extends WebSocket {
    constructor(url) {
      super(url.replace(/since=[^&]*/, 'since=%21%21'));
    }
  }
  const loads = [];
  const c = new SwitchboardClient(node.ws('/ws'), {
    token: admin(), WebSocket: Mangling, pingIntervalMs: 0,
    since: { 'admin-orders': { epoch: 'e', offset: 1 }, 'user-1': { epoch: 'e', offset: 1 } },
    loadOrders: async (rooms) => (loads.push(rooms), []),
  });
  const log = record(c);
  const errors = [];
  c.on('ERROR', (m) => errors.push(m.payload.code));
  t.after(() => c.close());
  const connected = next(c, 'CONNECTED');
  c.connect();
  const hello = await connected;
  await until(() => errors.length === 1);
  assert.deepEqual(errors, ['bad_since']);
  // The connect message (sent before the error) has no verdict for the rooms asked about.
  assert.equal(hello.payload.recovery, undefined);
  assert.deepEqual(log.resync.map(([r]) => r).sort(), ['admin-orders', 'user-1']);
  await until(() => loads.length === 1);
  assert.deepEqual(loads[0].sort(), ['admin-orders', 'user-1'], 'one refetch for both');
  // The positions are the server's now, and live events flow.
  assert.deepEqual(c.positions()['admin-orders'], hello.payload.rooms['admin-orders']);
  const tick = next(c, 'tick');
  await node.publish('admin-orders', 'tick', { n: 1 });
  assert.equal((await tick).offset, hello.payload.rooms['admin-orders'].offset + 1);
});

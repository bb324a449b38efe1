// Positions, `since` and resync (SPEC §10) without a server: the pure
// encoding and tracker, and the client over a scripted fake WebSocket.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  OrdersCache,
  PositionTracker,
  SwitchboardClient,
  base64url,
  decodeSince,
  encodeSince,
  fromBase64url,
  httpOrigin,
  orderInRoom,
} from '../switchboard.js';

test('since is base64url without padding of {room: {epoch, offset}}', () => {
  const since = encodeSince({ 'admin-orders': { epoch: 'e1', offset: 42 }, 'user-4': { epoch: 'x/y+z', offset: 0 } });
  assert.match(since, /^[A-Za-z0-9_-]+$/, 'url-safe alphabet, no padding');
  assert.equal(
    Buffer.from(since, 'base64url').toString(),
    '{"admin-orders":{"epoch":"e1","offset":42},"user-4":{"epoch":"x/y+z","offset":0}}',
  );
  assert.deepEqual(decodeSince(since), { 'admin-orders': { epoch: 'e1', offset: 42 }, 'user-4': { epoch: 'x/y+z', offset: 0 } });
  // A Map works too; positions without an epoch (or a bad offset) are left out.
  const m = new Map([['a', { epoch: 'e', offset: 1 }], ['b', { epoch: null, offset: 3 }], ['c', { epoch: 'e', offset: -1 }]]);
  assert.deepEqual(decodeSince(encodeSince(m)), { a: { epoch: 'e', offset: 1 } });
  assert.equal(encodeSince({}), null);
  assert.equal(encodeSince(new Map([['b', { epoch: null, offset: 3 }]])), null);
});

test('base64url round-trips UTF-8 and every padding length', () => {
  for (const s of ['', 'a', 'ab', 'abc', 'abcd', 'комната-1', '?>?>~~']) {
    const e = base64url(s);
    assert.equal(e, Buffer.from(s).toString('base64url'));
    assert.ok(!e.includes('='));
    assert.equal(fromBase64url(e), s);
  }
});

test('since names at most 64 rooms', () => {
  const many = {};
  for (let i = 0; i < 70; i++) many[`user-${i}`] = { epoch: 'e', offset: i };
  assert.equal(Object.keys(decodeSince(encodeSince(many))).length, 64);
});

test('tracker: positions from the connect message and frames; duplicates dropped', () => {
  const t = new PositionTracker();
  assert.equal(t.begin(), null, 'nothing to resume on a first connect');
  const v = t.onConnect({ 'admin-orders': { epoch: 'E', offset: 10 }, 'user-1': { epoch: 'U', offset: 0 } });
  assert.deepEqual(v, { recovered: [], resync: [] }, 'a first connect resyncs nothing');
  assert.equal(t.onFrame('admin-orders', 11), true);
  assert.equal(t.onFrame('admin-orders', 12), true);
  assert.equal(t.onFrame('admin-orders', 12), false, 'same offset: already seen');
  assert.equal(t.onFrame('admin-orders', 5), false, 'older offset: already seen');
  assert.deepEqual(t.toJSON(), { 'admin-orders': { epoch: 'E', offset: 12 }, 'user-1': { epoch: 'U', offset: 0 } });
  // The next connection asks for exactly that.
  assert.deepEqual(decodeSince(t.begin()), { 'admin-orders': { epoch: 'E', offset: 12 }, 'user-1': { epoch: 'U', offset: 0 } });
});

test('tracker: recovered rooms keep their offset (the replay moves it), others resync', () => {
  const t = new PositionTracker({ a: { epoch: 'E', offset: 7 }, b: { epoch: 'B', offset: 3 }, c: { epoch: 'C', offset: 1 } });
  decodeSince(t.begin());
  const v = t.onConnect(
    { a: { epoch: 'E', offset: 10 }, b: { epoch: 'B2', offset: 0 }, c: { epoch: 'C', offset: 9 }, d: { epoch: 'D', offset: 4 } },
    { a: { recovered: true, missed: 3 }, b: { recovered: false, reason: 'epoch_changed' }, c: { recovered: false, reason: 'too_old' } },
  );
  assert.deepEqual(v.recovered, [['a', 3]]);
  assert.deepEqual(v.resync, [['b', 'epoch_changed'], ['c', 'too_old']], 'd is new: nothing to resync');
  assert.deepEqual(t.get('a'), { epoch: 'E', offset: 7 }, 'replayed frames 8..10 must not be dropped');
  for (const o of [8, 9, 10]) assert.equal(t.onFrame('a', o), true);
  assert.deepEqual(t.get('b'), { epoch: 'B2', offset: 0 }, 'a resynced room starts from the server position');
  assert.deepEqual(t.get('c'), { epoch: 'C', offset: 9 });
  assert.deepEqual(t.get('d'), { epoch: 'D', offset: 4 });
});

test('tracker: a room asked about with no verdict, or known without a position, resyncs', () => {
  const t = new PositionTracker();
  t.begin();
  t.onConnect({ a: { epoch: 'E', offset: 1 }, b: { epoch: 'F', offset: 1 } });
  t.positions.get('b').epoch = null; // e.g. only frames told its offset
  assert.deepEqual(decodeSince(t.begin()), { a: { epoch: 'E', offset: 1 } });
  const v = t.onConnect({ a: { epoch: 'E', offset: 2 }, b: { epoch: 'F', offset: 2 } }); // no `recovery` at all
  assert.deepEqual(v.resync, [['a', 'not_recovered'], ['b', 'no_position']]);
  assert.deepEqual(t.get('a'), { epoch: 'E', offset: 2 });
});

test('tracker: rooms the socket is no longer put in are forgotten; hand-joined ones wait for room-joined', () => {
  const t = new PositionTracker({ gone: { epoch: 'G', offset: 1 }, mine: { epoch: 'M', offset: 5 }, a: { epoch: 'E', offset: 1 } });
  const since = decodeSince(t.begin(new Set(['mine'])));
  assert.deepEqual(Object.keys(since).sort(), ['a', 'gone'], 'hand-joined rooms resume through join-room');
  assert.deepEqual(t.sinceFor('mine'), { epoch: 'M', offset: 5 });
  const v = t.onConnect({ a: { epoch: 'E', offset: 1 } }, { a: { recovered: true, missed: 0 } }, new Set(['mine']));
  assert.deepEqual(v, { recovered: [['a', 0]], resync: [] });
  assert.equal(t.get('gone'), undefined);
  // room-joined's recovery, in either shape.
  assert.deepEqual(t.onJoined({ roomId: 'mine', epoch: 'M', offset: 9, recovery: { recovered: true, missed: 4 } }),
    { recovered: [['mine', 4]], resync: [] });
  assert.deepEqual(t.get('mine'), { epoch: 'M', offset: 5 });
  t.begin(new Set(['mine']));
  assert.deepEqual(t.onJoined({ roomId: 'mine', epoch: 'M3', offset: 0, recovery: { mine: { recovered: false, reason: 'epoch_changed' } } }).resync,
    [['mine', 'epoch_changed']]);
  assert.deepEqual(t.get('mine'), { epoch: 'M3', offset: 0 });
  // A first join of a room: its position, no resync.
  assert.deepEqual(t.onJoined({ roomId: 'new', epoch: 'N', offset: 2 }), { recovered: [], resync: [] });
  assert.deepEqual(t.get('new'), { epoch: 'N', offset: 2 });
});

test('tracker: bad_since resyncs every pending room and drops the positions it sent', () => {
  // Before the connect message.
  let t = new PositionTracker({ a: { epoch: 'E', offset: 3 }, b: { epoch: 'F', offset: 1 } });
  t.begin();
  assert.deepEqual(t.onBadSince().resync, [['a', 'bad_since'], ['b', 'bad_since']]);
  assert.deepEqual(t.toJSON(), {});
  assert.deepEqual(t.onConnect({ a: { epoch: 'E', offset: 5 } }), { recovered: [], resync: [] }, 'not twice');
  assert.deepEqual(t.get('a'), { epoch: 'E', offset: 5 });
  // After it: the positions the server just gave are kept, nothing resyncs twice.
  t = new PositionTracker({ a: { epoch: 'E', offset: 3 } });
  t.begin();
  assert.deepEqual(t.onConnect({ a: { epoch: 'E', offset: 5 } }).resync, [['a', 'not_recovered']]);
  assert.deepEqual(t.onBadSince().resync, []);
  assert.deepEqual(t.get('a'), { epoch: 'E', offset: 5 });
});

test('orders of a room', () => {
  const o = { id: 1, city_id: 3, user_id: 9 };
  assert.ok(orderInRoom(o, 'admin-orders'));
  assert.ok(orderInRoom(o, 'city-3-orders'));
  assert.ok(!orderInRoom(o, 'city-4-orders'));
  assert.ok(orderInRoom(o, 'user-9'));
  assert.ok(!orderInRoom(o, 'user-1'));
  assert.ok(!orderInRoom(o, 'driver-9'));
  assert.equal(httpOrigin('wss://h.example:8443/ws?x=1'), 'https://h.example:8443');
  assert.equal(httpOrigin('ws://127.0.0.1:3000/'), 'http://127.0.0.1:3000');
});

test('cache resync: one load for the rooms of one moment; replaces, removes, keeps live changes', async () => {
  let release;
  const loads = [];
  const c = new OrdersCache({
    load: (rooms) => {
      loads.push(rooms);
      return new Promise((r) => { release = r; });
    },
  });
  const seen = [];
  c.subscribe((kind, a) => seen.push(`${kind}:${Array.isArray(a) ? a.join(',') : a}`));
  c.apply({ type: 'ORDER_CREATED', payload: { id: 1, city_id: 1, version: 1 } }); // will be gone
  c.apply({ type: 'ORDER_CREATED', payload: { id: 2, city_id: 1, version: 1 } }); // updated meanwhile
  c.apply({ type: 'ORDER_CREATED', payload: { id: 3, city_id: 2, version: 1 } }); // other city: untouched
  seen.length = 0;
  const done = c.resync('city-1-orders', 'epoch_changed');
  c.resync('user-5', 'epoch_changed');
  c.resync('some-room', 'too_old'); // carries no orders
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(loads, [['city-1-orders', 'user-5']]);
  // Live events while the list is on its way.
  c.apply({ type: 'ORDER_CREATED', payload: { id: 7, city_id: 1, version: 1 } });
  c.apply({ type: 'ORDER_DELETED', payload: { id: 4 } });
  release([
    { id: 2, city_id: 1, version: 2 },
    { id: 4, city_id: 1, version: 1 }, // deleted meanwhile: not brought back
    { id: 5, city_id: 1, version: 1, user_id: 5 },
  ]);
  assert.equal(await done, true);
  assert.equal(c.get(1), undefined);
  assert.equal(c.get(2).version, 2);
  assert.ok(c.get(3));
  assert.equal(c.get(4), undefined);
  assert.ok(c.get(5));
  assert.ok(c.get(7), 'created live during the load: kept');
  assert.deepEqual(seen, [
    'resync:city-1-orders', 'resync:user-5', 'resync:some-room', 'added:7',
    'updated:2', 'added:5', 'removed:1', 'reloaded:city-1-orders,user-5',
  ]);
  assert.equal(await new OrdersCache().resync('admin-orders'), false, 'without load: the signal only');
});

// ---- the client over a fake WebSocket ------------------------------------

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.();
    }, 0);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000) {
    this.drop(code);
  }
  server(msg) {
    this.onmessage({ data: JSON.stringify(msg) });
  }
  drop(code) {
    this.readyState = 3;
    this.onclose?.({ code, reason: '' });
  }
}

const tick = () => new Promise((r) => setTimeout(r, 5));

async function waitSocket(n) {
  for (let i = 0; i < 200 && FakeSocket.all.length < n; i++) await tick();
  await tick();
  return FakeSocket.all[n - 1];
}

test('client: since on every reconnect, replay applied once, resync refetches the cache', async () => {
  FakeSocket.all = [];
  const loads = [];
  const c = new SwitchboardClient('ws://h/ws', {
    token: 't', WebSocket: FakeSocket, baseDelayMs: 1, maxDelayMs: 2, pingIntervalMs: 0,
    loadOrders: async (rooms) => {
      loads.push(rooms);
      return [{ id: 9, city_id: 1, version: 4 }];
    },
  });
  const events = [];
  for (const e of ['resync', 'recovered', 'duplicate']) c.on(e, (...a) => events.push([e, ...a.map((x) => x?.type ?? x)]));
  c.connect();
  const s1 = await waitSocket(1);
  assert.equal(s1.url.searchParams.get('since'), null);
  assert.equal(s1.url.searchParams.get('token'), 't');
  s1.server({ type: 'CONNECTED', payload: { userId: 1, role: 'admin', rooms: { 'admin-orders': { epoch: 'E', offset: 4 }, 'user-1': { epoch: 'U', offset: 0 } } } });
  s1.server({ type: 'ORDER_CREATED', payload: { id: 1, city_id: 1, version: 1 }, room: 'admin-orders', offset: 5 });
  s1.drop(1012); // drained

  const s2 = await waitSocket(2);
  assert.deepEqual(decodeSince(s2.url.searchParams.get('since')), { 'admin-orders': { epoch: 'E', offset: 5 }, 'user-1': { epoch: 'U', offset: 0 } });
  s2.server({
    type: 'CONNECTED',
    payload: {
      rooms: { 'admin-orders': { epoch: 'E', offset: 7 }, 'user-1': { epoch: 'U', offset: 0 } },
      recovery: { 'admin-orders': { recovered: true, missed: 2 }, 'user-1': { recovered: true, missed: 0 } },
    },
  });
  s2.server({ type: 'ORDER_CREATED', payload: { id: 2, city_id: 1, version: 1 }, room: 'admin-orders', offset: 6 });
  s2.server({ type: 'ORDER_CREATED', payload: { id: 2, city_id: 1, version: 1 }, room: 'admin-orders', offset: 6 });
  s2.server({ type: 'ORDER_UPDATED', payload: { id: 2, city_id: 1, version: 2 }, room: 'admin-orders', offset: 7 });
  assert.equal(c.orders.get(2).version, 2);
  assert.deepEqual(c.positions()['admin-orders'], { epoch: 'E', offset: 7 });
  s2.drop(1006); // the connection just dropped

  const s3 = await waitSocket(3);
  assert.deepEqual(decodeSince(s3.url.searchParams.get('since'))['admin-orders'], { epoch: 'E', offset: 7 });
  s3.server({
    type: 'CONNECTED',
    payload: {
      rooms: { 'admin-orders': { epoch: 'E2', offset: 0 }, 'user-1': { epoch: 'U', offset: 0 } },
      recovery: { 'admin-orders': { recovered: false, reason: 'epoch_changed' }, 'user-1': { recovered: true, missed: 0 } },
    },
  });
  await tick();
  assert.deepEqual(events, [
    ['recovered', 'admin-orders', 2], ['recovered', 'user-1', 0], ['duplicate', 'ORDER_CREATED'],
    ['recovered', 'user-1', 0], ['resync', 'admin-orders', 'epoch_changed'],
  ]);
  assert.deepEqual(loads, [['admin-orders']], 'one refetch');
  assert.equal(c.orders.get(9).version, 4);
  assert.equal(c.orders.get(1), undefined, 'an order the refetch no longer lists is gone');
  assert.deepEqual(c.positions()['admin-orders'], { epoch: 'E2', offset: 0 });
  c.close();
});

test('client: bad_since resyncs every room; hand-joined rooms resume through join-room', async () => {
  FakeSocket.all = [];
  const resyncs = [];
  const c = new SwitchboardClient('ws://h/', {
    token: 't', WebSocket: FakeSocket, baseDelayMs: 1, maxDelayMs: 2, pingIntervalMs: 0, loadOrders: null,
    since: { 'admin-orders': { epoch: 'E', offset: 3 } },
  });
  c.on('resync', (room, reason) => resyncs.push(`${room}:${reason}`));
  c.joinRoom('city-2-orders'); // before connect: sent at open
  c.connect();
  const s1 = await waitSocket(1);
  assert.deepEqual(decodeSince(s1.url.searchParams.get('since')), { 'admin-orders': { epoch: 'E', offset: 3 } });
  assert.deepEqual(s1.sent, [{ type: 'join-room', data: { roomId: 'city-2-orders' } }]);
  s1.server({ type: 'error', data: { code: 'bad_since', message: 'x' } });
  s1.server({ type: 'connected', data: { userId: 1, role: 'admin', rooms: { 'admin-orders': { epoch: 'E', offset: 9 } } } });
  s1.server({ type: 'room-joined', data: { roomId: 'city-2-orders', epoch: 'C', offset: 4 } });
  assert.deepEqual(resyncs, ['admin-orders:bad_since']);
  s1.server({ type: 'new-order', data: { id: 1 }, room: 'city-2-orders', offset: 5 });
  s1.drop(1012);

  const s2 = await waitSocket(2);
  assert.deepEqual(decodeSince(s2.url.searchParams.get('since')), { 'admin-orders': { epoch: 'E', offset: 9 } });
  assert.deepEqual(s2.sent, [{ type: 'join-room', data: { roomId: 'city-2-orders', since: { epoch: 'C', offset: 5 } } }]);
  s2.server({ type: 'connected', data: { rooms: { 'admin-orders': { epoch: 'E', offset: 9 } }, recovery: { 'admin-orders': { recovered: true, missed: 0 } } } });
  s2.server({ type: 'room-joined', data: { roomId: 'city-2-orders', epoch: 'C', offset: 8, recovery: { recovered: false, reason: 'too_old' } } });
  assert.deepEqual(resyncs, ['admin-orders:bad_since', 'city-2-orders:too_old']);
  c.leaveRoom('city-2-orders');
  assert.deepEqual(Object.keys(c.positions()), ['admin-orders']);
  c.close();
});

// switchboard client: a dependency-free ES module for browsers and Node 20+
// (Node 20 needs `--experimental-websocket`; or pass `WebSocket` in options).
//
// Connects to any of the three endpoints, reconnects with exponential backoff
// and jitter (at most 10 attempts by default, never after 4001/4003), keeps
// the socket alive with pings, and keeps an orders cache and a driver
// positions map up to date from the server's events (seed 000's rules).
//
// It follows each room's position (SPEC §10: epoch from the connect message
// or `room-joined`, offset from every frame) and resumes by itself on every
// reconnect (`since`): missed events are replayed, once, in order; a room
// that could not be recovered is signalled as `resync` and the orders cache
// refetches that room's orders over HTTP.

/** Close codes after which reconnecting cannot help. */
export const FATAL_CLOSE_CODES = new Set([4001, 4003]);

/** Which dialect a URL's path speaks. */
export function dialectOf(url) {
  const path = new URL(url).pathname;
  if (path.startsWith('/ws/driver/orders')) return 'driver';
  if (path === '/ws' || path === '/ws/') return 'events';
  return 'rooms';
}

/** The body of a message in any dialect: `data`, `payload`, or the message. */
export function bodyOf(msg) {
  if (msg && typeof msg === 'object') {
    if ('payload' in msg) return msg.payload;
    if ('data' in msg) return msg.data;
  }
  return msg;
}

// ---- positions and recovery (SPEC §10) ----------------------------------

/** base64url without padding of a string's UTF-8 bytes. */
export function base64url(text) {
  let bin = '';
  for (const b of new TextEncoder().encode(text)) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** The inverse of {@link base64url} (padding optional). */
export function fromBase64url(s) {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/');
  const bin = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
  return new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)));
}

/** The server accepts at most this many rooms in one `since`. */
export const MAX_SINCE_ROOMS = 64;

/** A usable position: a string epoch and a non-negative integer offset. */
function validPosition(p) {
  return p != null && typeof p.epoch === 'string' && Number.isSafeInteger(p.offset) && p.offset >= 0;
}

/**
 * The `since` query value for `positions` (a Map or an object of
 * `room → {epoch, offset}`): base64url without padding of the JSON object
 * `{"<room>": {"epoch": "…", "offset": N}}`. Positions without an epoch are
 * left out, as are rooms beyond the first 64. `null` when none is left.
 */
export function encodeSince(positions, max = MAX_SINCE_ROOMS) {
  const entries = positions instanceof Map ? positions.entries() : Object.entries(positions ?? {});
  const out = {};
  let n = 0;
  for (const [room, p] of entries) {
    if (n >= max) break;
    if (!validPosition(p)) continue;
    out[room] = { epoch: p.epoch, offset: p.offset };
    n += 1;
  }
  return n ? base64url(JSON.stringify(out)) : null;
}

/** Decodes a `since` value back to `{room: {epoch, offset}}` (throws when malformed). */
export function decodeSince(since) {
  const v = JSON.parse(fromBase64url(since));
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('since is not an object');
  return v;
}

/** Where the connect message of each dialect keeps `rooms` and `recovery`; null for other messages. */
export function connectInfo(msg) {
  switch (msg?.type) {
    case 'connected':
      return msg.data ?? {};
    case 'CONNECTED':
      return msg.payload ?? {};
    case 'connection_established':
      return msg;
    default:
      return null;
  }
}

/** True for the `bad_since` error in any dialect. */
export function isBadSince(msg) {
  if (msg?.type !== 'error' && msg?.type !== 'ERROR') return false;
  return (msg.data?.code ?? msg.payload?.code ?? msg.code) === 'bad_since';
}

/**
 * What a client has seen, per room, and what to do on each connection
 * (pure: no socket, no timers). The epoch comes from the connect message or
 * `room-joined`, the offset from every frame that carries `room` and
 * `offset`.
 *
 * A connection starts with {@link begin} (which gives the `since` to send);
 * every room the client was in before is then *pending* until the server
 * says what became of it (the connect message, or `room-joined` for a room
 * joined by hand). A pending room that is not reported `recovered: true` is
 * to be resynced: the server said it could not (`epoch_changed`,
 * `too_old`, `unavailable`), or said nothing for a room it was asked about
 * (`not_recovered`; also what a refused `since` looks like, as the server's
 * `bad_since` error follows its connect message), or the client had no
 * position to ask with (`no_position`), or a `bad_since` error came before
 * any verdict (`bad_since`).
 * The methods return `{recovered: [[room, missed]], resync: [[room, reason]]}`.
 */
export class PositionTracker {
  /** @param {object} [initial] `{room: {epoch, offset}}`, e.g. saved from {@link toJSON} */
  constructor(initial = {}) {
    /** room → {epoch, offset}; epoch is null while only frames told the offset. */
    this.positions = new Map();
    /** Rooms the client has been in (awaiting a verdict on the next connection). */
    this.known = new Set();
    /** Rooms awaiting a verdict on this connection. */
    this.pending = new Set();
    /** Rooms whose position this connection's server gave. */
    this.confirmed = new Set();
    /** The rooms this connection's `since` named. */
    this.asked = new Set();
    for (const [room, p] of Object.entries(initial ?? {})) {
      if (validPosition(p)) {
        this.positions.set(room, { epoch: p.epoch, offset: p.offset });
        this.known.add(room);
      }
    }
  }

  /** The position of `room`, or undefined. */
  get(room) {
    return this.positions.get(room);
  }

  /** The positions with an epoch, as a plain object (what `since` carries). */
  toJSON() {
    const out = {};
    for (const [room, p] of this.positions) if (validPosition(p)) out[room] = { ...p };
    return out;
  }

  /**
   * A connection is being opened; returns the `since` query value (or null).
   * `exclude`: rooms not to name in it (joined by hand, resumed by `join-room`).
   */
  begin(exclude = new Set()) {
    this.pending = new Set([...this.known, ...this.positions.keys()]);
    this.confirmed = new Set();
    const asked = new Map();
    for (const [room, p] of this.positions) {
      if (!exclude.has(room) && validPosition(p) && asked.size < MAX_SINCE_ROOMS) asked.set(room, p);
    }
    this.asked = new Set(asked.keys());
    return encodeSince(asked);
  }

  /** The `since` a `join-room` for `room` may carry, or undefined. */
  sinceFor(room) {
    const p = this.positions.get(room);
    return validPosition(p) ? { epoch: p.epoch, offset: p.offset } : undefined;
  }

  /** One room's verdict; `pos` is the server's `{epoch, offset}` for it (may be absent). */
  settle(room, pos, rec, out) {
    const mine = this.positions.get(room);
    const serverPos = pos && typeof pos === 'object' && Number.isSafeInteger(pos.offset)
      ? { epoch: typeof pos.epoch === 'string' ? pos.epoch : null, offset: pos.offset }
      : null;
    const wasPending = this.pending.delete(room);
    if (wasPending && rec?.recovered === true && validPosition(mine)
        && (serverPos?.epoch == null || serverPos.epoch === mine.epoch)) {
      // Replayed frames follow and move the offset on from ours.
      out.recovered.push([room, rec.missed ?? 0]);
    } else {
      // A room already followed on this connection (joined twice) keeps its
      // own offset: frames in flight still move it on.
      const keep = !wasPending && validPosition(mine) && serverPos?.epoch === mine.epoch;
      if (serverPos && !keep) this.positions.set(room, serverPos);
      if (wasPending) {
        const reason = rec?.recovered === false
          ? (rec.reason ?? 'not_recovered')
          : this.asked.has(room) ? 'not_recovered' : 'no_position';
        out.resync.push([room, reason]);
      }
    }
    this.known.add(room);
    this.confirmed.add(room);
  }

  /**
   * The connect message's `rooms` and `recovery`. `manual`: rooms joined by
   * hand (they get their verdict from `room-joined`); any other pending room
   * the socket was not put in is forgotten.
   */
  onConnect(rooms, recovery, manual = new Set()) {
    const out = { recovered: [], resync: [] };
    if (!rooms || typeof rooms !== 'object') return out; // a server without history
    for (const [room, pos] of Object.entries(rooms)) this.settle(room, pos, recovery?.[room], out);
    for (const room of [...this.pending]) {
      if (manual.has(room) || room in rooms) continue;
      this.forget(room);
    }
    return out;
  }

  /** `room-joined` `{roomId, epoch, offset, recovery?}`. */
  onJoined(body) {
    const out = { recovered: [], resync: [] };
    const room = body?.roomId;
    if (typeof room !== 'string' || !Number.isSafeInteger(body.offset)) return out;
    let rec = body.recovery;
    if (rec && typeof rec === 'object' && !('recovered' in rec)) rec = rec[room];
    this.settle(room, body, rec, out);
    return out;
  }

  /**
   * The server refused this connection's `since`: every pending room is to
   * be resynced, and positions the server did not give on this connection
   * are dropped.
   */
  onBadSince() {
    const out = { recovered: [], resync: [] };
    for (const room of this.pending) out.resync.push([room, 'bad_since']);
    this.pending.clear();
    for (const room of [...this.positions.keys()]) {
      if (!this.confirmed.has(room)) this.positions.delete(room);
    }
    return out;
  }

  /**
   * A frame with `room` and `offset`: false when it is one the client has
   * already seen (offset ≤ the last one for that room), else the position
   * moves to it.
   */
  onFrame(room, offset) {
    const p = this.positions.get(room);
    if (p && offset <= p.offset) return false;
    if (p) p.offset = offset;
    else this.positions.set(room, { epoch: null, offset });
    this.known.add(room);
    return true;
  }

  /** The client left `room`. */
  forget(room) {
    this.positions.delete(room);
    this.known.delete(room);
    this.pending.delete(room);
    this.asked.delete(room);
    this.confirmed.delete(room);
  }
}

const ORDER_TYPES = new Set(['ORDER_CREATED', 'new-order', 'order-created', 'ORDER_UPDATED', 'order-status-updated', 'ORDER_DELETED']);

/** Rooms whose events change orders: `admin-orders`, `city-{id}-orders`, `user-{id}`. */
export function isOrdersRoom(room) {
  return room === 'admin-orders' || /^city-\d+-orders$/.test(room) || /^user-\d+$/.test(room);
}

/** Whether `order` is one that `room` carries events of. */
export function orderInRoom(order, room) {
  if (room === 'admin-orders') return true;
  let m = /^city-(\d+)-orders$/.exec(room);
  if (m) return String(order?.city_id) === m[1];
  m = /^user-(\d+)$/.exec(room);
  if (m) return String(order?.user_id) === m[1];
  return false;
}

/**
 * Orders keyed by id. ORDER_CREATED / new-order / order-created add;
 * ORDER_UPDATED replaces only a newer `version` and signals a refetch;
 * order-status-updated patches the status and signals a refetch;
 * ORDER_DELETED removes.
 *
 * `resync(room)` is the refetch of a whole room: its events may have been
 * missed. Subscribers see `('resync', room, reason)`; with a `load`
 * function the cache refetches by itself: the resyncs of one moment are
 * gathered into one `load(rooms)` call, whose result (an array of orders, or
 * `{items, complete}`) replaces those rooms' orders (newer versions win; an
 * order of those rooms that the list no longer has is removed, unless the
 * list is marked incomplete or a live event touched it meanwhile), then
 * `('reloaded', rooms, items)`.
 */
export class OrdersCache {
  /** @param {{load?: (rooms: string[]) => Promise<object[] | {items: object[], complete?: boolean}>}} [options] */
  constructor(options = {}) {
    this.byId = new Map();
    this.listeners = new Set();
    this.load = options.load ?? null;
    this.stale = new Set(); // rooms waiting for a reload
    this.reloading = null; // the reload in flight
    this.touched = null; // ids live events changed while a load was in flight
    this.deleted = null; // ids live events deleted meanwhile
  }

  /**
   * `fn(kind, id, order)` with kind 'added' | 'updated' | 'refetch' | 'removed';
   * also `fn('resync', room, reason)` and `fn('reloaded', rooms, items)`.
   */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  emit(kind, id, order) {
    for (const fn of this.listeners) fn(kind, id, order);
  }

  get(id) {
    return this.byId.get(Number(id));
  }

  list() {
    return [...this.byId.values()].sort((a, b) => b.id - a.id);
  }

  /**
   * `room`'s events may have been missed (it was not recovered): signals
   * `resync` and, for a room that carries orders and with a `load`
   * function, refetches. Resolves when the reload that covers `room` is
   * done (true), or at once (false) when none runs.
   */
  resync(room, reason) {
    this.emit('resync', room, reason);
    if (!this.load || !isOrdersRoom(room)) return Promise.resolve(false);
    this.stale.add(room);
    this.reloading ??= this.reloadStale().finally(() => {
      this.reloading = null;
    });
    return this.reloading;
  }

  async reloadStale() {
    await null; // gather the resyncs of one connect message into one load
    while (this.stale.size) {
      const rooms = [...this.stale];
      this.stale.clear();
      this.touched = new Set();
      this.deleted = new Set();
      const { touched, deleted } = this;
      let got;
      try {
        got = await this.load(rooms);
      } catch (e) {
        for (const r of rooms) this.stale.add(r); // the next resync tries them again
        throw e;
      } finally {
        this.touched = null;
        this.deleted = null;
      }
      const items = Array.isArray(got) ? got : (got?.items ?? []);
      const complete = Array.isArray(got) || got?.complete !== false;
      this.replace(items, rooms, { complete, touched, deleted });
      this.emit('reloaded', rooms, items);
    }
    return true;
  }

  /**
   * Replaces the orders of `rooms` with `items` (what the server has now).
   * `touched` / `deleted`: ids live events changed or removed while the list
   * was being fetched (the list may predate them).
   */
  replace(items, rooms, { complete = true, touched = new Set(), deleted = new Set() } = {}) {
    const fetched = new Set();
    for (const o of items) {
      if (!o || o.id == null) continue;
      fetched.add(o.id);
      if (deleted.has(o.id)) continue;
      const have = this.byId.get(o.id);
      if (have && (have.version ?? 0) >= (o.version ?? 0)) continue;
      this.byId.set(o.id, o);
      this.emit(have ? 'updated' : 'added', o.id, o);
    }
    if (!complete) return;
    for (const [id, o] of [...this.byId]) {
      if (fetched.has(id) || touched.has(id)) continue;
      if (!rooms.some((r) => orderInRoom(o, r))) continue;
      this.byId.delete(id);
      this.emit('removed', id);
    }
  }

  /** Applies one server message; returns true when the cache changed. */
  apply(msg) {
    const body = bodyOf(msg);
    if (this.touched && ORDER_TYPES.has(msg.type) && body && typeof body === 'object') {
      const id = msg.type === 'order-status-updated' ? body.orderId : body.id;
      if (id != null) (msg.type === 'ORDER_DELETED' ? this.deleted : this.touched).add(id);
    }
    switch (msg.type) {
      case 'ORDER_CREATED':
      case 'new-order':
      case 'order-created': {
        if (!body || body.id == null) return false;
        const have = this.byId.get(body.id);
        if (have && (have.version ?? 0) >= (body.version ?? 0)) return false;
        this.byId.set(body.id, body);
        this.emit('added', body.id, body);
        return true;
      }
      case 'ORDER_UPDATED': {
        if (!body || body.id == null) return false;
        const have = this.byId.get(body.id);
        if (have && (have.version ?? 0) >= (body.version ?? 0)) return false; // stale
        const { changed, ...order } = body;
        this.byId.set(body.id, order);
        this.emit('updated', body.id, order);
        this.emit('refetch', body.id, order);
        return true;
      }
      case 'order-status-updated': {
        const have = this.byId.get(body.orderId);
        if (have) {
          this.byId.set(body.orderId, { ...have, status: body.newStatus });
          this.emit('updated', body.orderId, this.byId.get(body.orderId));
        }
        this.emit('refetch', body.orderId, have);
        return Boolean(have);
      }
      case 'ORDER_DELETED': {
        if (!body || !this.byId.delete(body.id)) return false;
        this.emit('removed', body.id);
        return true;
      }
      default:
        return false;
    }
  }
}

/** Driver positions from DRIVER_LOCATION, no API call needed. */
export class DriverPositions extends Map {
  apply(msg) {
    if (msg.type !== 'DRIVER_LOCATION') return false;
    const p = bodyOf(msg);
    this.set(p.driverId, {
      latitude: p.latitude,
      longitude: p.longitude,
      heading: p.heading ?? null,
      speed: p.speed ?? null,
      timestamp: p.timestamp,
    });
    return true;
  }
}

/** The wait before reconnect attempt `n` (1-based): base·2^(n−1), capped, ×[0.5, 1.5). */
export function backoffDelay(n, baseMs, maxMs, random = Math.random) {
  const raw = Math.min(maxMs, baseMs * 2 ** Math.max(0, n - 1));
  return Math.round(raw * (0.5 + random()));
}

/** The HTTP origin beside a WebSocket URL: `ws://h:3000/ws` → `http://h:3000`. */
export function httpOrigin(url) {
  const u = new URL(url);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  return u.origin;
}

/**
 * A `load` for {@link OrdersCache}: every page of `GET /api/orders` (the
 * token's scope: admin all, manager its cities, user its own), at most
 * `maxPages` pages of 200; a list cut short is marked incomplete.
 */
export function httpOrdersLoader({ origin, token, fetch = globalThis.fetch, maxPages = 50 }) {
  return async () => {
    const items = [];
    let cursor = null;
    for (let page = 0; page < maxPages; page++) {
      const u = new URL('/api/orders', origin);
      u.searchParams.set('limit', '200');
      if (cursor) u.searchParams.set('cursor', cursor);
      const r = await fetch(u.toString(), { headers: token ? { authorization: `Bearer ${token}` } : {} });
      if (!r.ok) throw new Error(`GET /api/orders: ${r.status}`);
      const body = await r.json();
      items.push(...(body.items ?? []));
      cursor = body.next_cursor;
      if (!cursor) return { items, complete: true };
    }
    return { items, complete: false };
  };
}

export class SwitchboardClient {
  /**
   * @param {string} url  e.g. `ws://host:3000/ws` (the token is added as `?token=`)
   * @param {object} options
   *   token, maxAttempts (10), baseDelayMs (500), maxDelayMs (30000),
   *   pingIntervalMs (25000; 0 = off), WebSocket (defaults to globalThis.WebSocket),
   *   since (positions to resume from, `{room: {epoch, offset}}`, e.g. a saved
   *   `positions()`), loadOrders (`(rooms) => orders` for the cache's refetch
   *   on resync; default `GET /api/orders` over `fetch`, `null` = none),
   *   fetch (defaults to globalThis.fetch), httpUrl (the HTTP origin; default
   *   the socket's host)
   */
  constructor(url, options = {}) {
    this.url = url;
    this.dialect = dialectOf(url);
    this.token = options.token ?? null;
    this.maxAttempts = options.maxAttempts ?? 10;
    this.baseDelayMs = options.baseDelayMs ?? 500;
    this.maxDelayMs = options.maxDelayMs ?? 30000;
    this.pingIntervalMs = options.pingIntervalMs ?? 25000;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) throw new Error('no WebSocket implementation (Node 20: --experimental-websocket)');
    const fetchImpl = options.fetch ?? globalThis.fetch;
    let load = options.loadOrders;
    if (load === undefined) {
      load = this.dialect !== 'driver' && fetchImpl
        ? httpOrdersLoader({ origin: options.httpUrl ?? httpOrigin(url), token: this.token, fetch: fetchImpl })
        : null;
    }
    this.orders = new OrdersCache({ load });
    this.drivers = new DriverPositions();
    this.tracker = new PositionTracker(options.since);
    this.handlers = new Map();
    this.rooms = new Set();
    this.attempt = 0;
    this.closedByUser = false;
    this.socket = null;
    this.timer = null;
    this.pingTimer = null;
    this.awaitingPong = false;
  }

  /**
   * `on('ORDER_CREATED', fn)`, `on('open'|'close'|'reconnecting'|'gave-up'|'error'|'message', fn)`;
   * `on('resync', (room, reason) => …)` for a room whose missed events could
   * not be replayed, `on('recovered', (room, missed) => …)` for one whose were,
   * `on('duplicate', (msg) => …)` for a frame dropped as already seen.
   */
  on(type, fn) {
    if (!this.handlers.has(type)) this.handlers.set(type, new Set());
    this.handlers.get(type).add(fn);
    return () => this.handlers.get(type)?.delete(fn);
  }

  emit(type, ...args) {
    for (const fn of this.handlers.get(type) ?? []) {
      try {
        fn(...args);
      } catch (e) {
        if (type !== 'error') this.emit('error', e);
      }
    }
  }

  /** The last position seen per room, `{room: {epoch, offset}}` (save it to resume later with `since`). */
  positions() {
    return this.tracker.toJSON();
  }

  connect() {
    this.closedByUser = false;
    const u = new URL(this.url);
    if (this.token) u.searchParams.set('token', this.token);
    // Resume: what this client has seen, for the rooms the server puts it in.
    const since = this.tracker.begin(this.rooms);
    if (since) u.searchParams.set('since', since);
    else u.searchParams.delete('since');
    const ws = new this.WebSocket(u.toString());
    this.socket = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.startPings();
      // Rooms joined by hand are joined again after a reconnect, resuming
      // from their position.
      for (const roomId of this.rooms) this.sendJoin(roomId);
      this.emit('open');
    };
    ws.onmessage = (ev) => this.onMessage(ev.data);
    // Some implementations (Node 20's) fire only `error` when the connection
    // cannot be made: treat that as a close, once per socket.
    let ended = false;
    const end = (code, reason) => {
      if (ended || this.socket !== ws) return;
      ended = true;
      this.onClose(code, reason);
    };
    ws.onerror = (ev) => {
      this.emit('error', ev);
      if (ws.readyState !== 1) setTimeout(() => end(1006, 'connection failed'), 0);
    };
    ws.onclose = (ev) => end(ev.code, ev.reason);
    return this;
  }

  wrap(body) {
    if (this.dialect === 'rooms') return { data: body };
    if (this.dialect === 'events') return { payload: body };
    return body;
  }

  onMessage(data) {
    let msg;
    try {
      msg = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch (e) {
      this.emit('error', e);
      return;
    }
    if (msg.type === 'pong') {
      this.awaitingPong = false;
      return;
    }
    // A frame from a room's history: drop it when already seen (a replay
    // overlapping what arrived live), else it moves the room's position.
    if (typeof msg.room === 'string' && Number.isSafeInteger(msg.offset)) {
      if (!this.tracker.onFrame(msg.room, msg.offset)) {
        this.emit('duplicate', msg);
        return;
      }
    }
    let verdicts = null;
    const info = connectInfo(msg);
    if (info) verdicts = this.tracker.onConnect(info.rooms, info.recovery, this.rooms);
    else if (msg.type === 'room-joined') verdicts = this.tracker.onJoined(bodyOf(msg));
    else if (isBadSince(msg)) verdicts = this.tracker.onBadSince();
    this.orders.apply(msg);
    this.drivers.apply(msg);
    this.emit('message', msg);
    this.emit(msg.type, msg);
    if (!verdicts) return;
    for (const [room, missed] of verdicts.recovered) this.emit('recovered', room, missed);
    for (const [room, reason] of verdicts.resync) {
      this.emit('resync', room, reason);
      this.orders.resync(room, reason).catch((e) => this.emit('error', e));
    }
  }

  onClose(code, reason) {
    this.stopPings();
    this.socket = null;
    this.emit('close', code, reason);
    if (this.closedByUser) return;
    if (FATAL_CLOSE_CODES.has(code)) {
      this.emit('gave-up', code);
      return;
    }
    if (this.attempt >= this.maxAttempts) {
      this.emit('gave-up', code);
      return;
    }
    this.attempt += 1;
    const delay = backoffDelay(this.attempt, this.baseDelayMs, this.maxDelayMs);
    this.emit('reconnecting', this.attempt, delay);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  startPings() {
    if (!this.pingIntervalMs) return;
    this.pingTimer = setInterval(() => {
      if (this.awaitingPong) {
        // No pong since the last ping: the connection is dead; reconnect.
        this.socket?.close(4000, 'pong timeout');
        return;
      }
      this.awaitingPong = true;
      this.send({ type: 'ping' });
    }, this.pingIntervalMs);
  }

  stopPings() {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
    this.awaitingPong = false;
  }

  send(obj) {
    if (this.socket && this.socket.readyState === 1) {
      this.socket.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  /** `join-room`, with `since` when the client has a position for the room. */
  sendJoin(roomId) {
    const since = this.tracker.sinceFor(roomId);
    return this.send({ type: 'join-room', ...this.wrap(since ? { roomId, since } : { roomId }) });
  }

  joinRoom(roomId) {
    this.rooms.add(roomId);
    return this.sendJoin(roomId);
  }

  leaveRoom(roomId) {
    this.rooms.delete(roomId);
    this.tracker.forget(roomId);
    return this.send({ type: 'leave-room', ...this.wrap({ roomId }) });
  }

  /** Driver endpoint: report a position. */
  sendLocation(latitude, longitude, heading, speed) {
    return this.send({ type: 'location', ...this.wrap({ latitude, longitude, heading, speed }) });
  }

  close() {
    this.closedByUser = true;
    clearTimeout(this.timer);
    this.stopPings();
    this.socket?.close(1000, 'bye');
  }
}

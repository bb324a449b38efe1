// switchboard client: a dependency-free ES module for browsers and Node 20+
// (Node 20 needs `--experimental-websocket`; or pass `WebSocket` in options).
//
// Connects to any of the three endpoints, reconnects with exponential backoff
// and jitter (at most 10 attempts by default, never after 4001/4003), keeps
// the socket alive with pings, and keeps an orders cache and a driver
// positions map up to date from the server's events (seed 000's rules).

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

/**
 * Orders keyed by id. ORDER_CREATED / new-order / order-created add;
 * ORDER_UPDATED replaces only a newer `version` and signals a refetch;
 * order-status-updated patches the status and signals a refetch;
 * ORDER_DELETED removes.
 */
export class OrdersCache {
  constructor() {
    this.byId = new Map();
    this.listeners = new Set();
  }

  /** `fn(kind, id, order)` with kind 'added' | 'updated' | 'refetch' | 'removed'. */
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

  /** Applies one server message; returns true when the cache changed. */
  apply(msg) {
    const body = bodyOf(msg);
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

export class SwitchboardClient {
  /**
   * @param {string} url  e.g. `ws://host:3000/ws` (the token is added as `?token=`)
   * @param {object} options
   *   token, maxAttempts (10), baseDelayMs (500), maxDelayMs (30000),
   *   pingIntervalMs (25000; 0 = off), WebSocket (defaults to globalThis.WebSocket)
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
    this.orders = new OrdersCache();
    this.drivers = new DriverPositions();
    this.handlers = new Map();
    this.rooms = new Set();
    this.attempt = 0;
    this.closedByUser = false;
    this.socket = null;
    this.timer = null;
    this.pingTimer = null;
    this.awaitingPong = false;
  }

  /** `on('ORDER_CREATED', fn)`, `on('open'|'close'|'reconnecting'|'gave-up'|'error'|'message', fn)`. */
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

  connect() {
    this.closedByUser = false;
    const u = new URL(this.url);
    if (this.token) u.searchParams.set('token', this.token);
    const ws = new this.WebSocket(u.toString());
    this.socket = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.startPings();
      // Rooms joined by hand are joined again after a reconnect.
      for (const roomId of this.rooms) this.send({ type: 'join-room', ...this.wrap({ roomId }) });
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
    this.orders.apply(msg);
    this.drivers.apply(msg);
    this.emit('message', msg);
    this.emit(msg.type, msg);
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

  joinRoom(roomId) {
    this.rooms.add(roomId);
    return this.send({ type: 'join-room', ...this.wrap({ roomId }) });
  }

  leaveRoom(roomId) {
    this.rooms.delete(roomId);
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

// Test helpers: start the real switchboard binary on a free port (alone, or
// as a Redis-backed cluster behind a TCP balancer), mint tokens, HTTP calls.
// Every process started is killed when the test ends.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, existsSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { connect as tcpConnect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const SECRET = 'js-client-test-secret-0123456789';
export const API_KEY = 'js-test-key';

const live = new Set();
process.on('exit', () => {
  for (const c of live) c.kill('SIGKILL');
});

export function binary() {
  if (process.env.SWITCHBOARD_BIN) return process.env.SWITCHBOARD_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? resolve(import.meta.dirname, '../../../target');
  const bin = join(target, 'debug', 'switchboard');
  if (!existsSync(bin)) throw new Error(`${bin} missing: build with cargo build, or set SWITCHBOARD_BIN`);
  return bin;
}

export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
    s.on('error', rej);
  });
}

const b64 = (x) => Buffer.from(x).toString('base64url');

export function mint(claims, secret = SECRET) {
  const body = { exp: Math.floor(Date.now() / 1000) + 3600, ...claims };
  const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const payload = b64(JSON.stringify(body));
  const sig = createHmac('sha256', secret).update(`${head}.${payload}`).digest('base64url');
  return `${head}.${payload}.${sig}`;
}

export const admin = () => mint({ sub: '1', role: 'admin' });

/** A `redis-server` of the test's own on a free port, without persistence. */
export class Redis {
  constructor(port) {
    this.port = port;
    this.child = null;
  }

  static async start(t) {
    const r = new Redis(await freePort());
    await r.spawn();
    t.after(() => r.kill());
    return r;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/`;
  }

  async spawn() {
    this.child = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
      stdio: 'ignore',
    });
    live.add(this.child);
    const deadline = Date.now() + 10000;
    while (!(await this.ping())) {
      if (Date.now() > deadline) throw new Error('redis-server did not start');
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  async ping() {
    return (await this.command('PING').catch(() => '')) === '+PONG';
  }

  /** One inline command (e.g. `FLUSHALL`); its first reply line. */
  command(line) {
    return new Promise((res, rej) => {
      const s = tcpConnect(this.port, '127.0.0.1');
      let got = '';
      s.on('connect', () => s.write(`${line}\r\n`));
      s.on('data', (d) => {
        got += d;
        const end = got.indexOf('\r\n');
        if (end >= 0) {
          s.destroy();
          res(got.slice(0, end));
        }
      });
      s.on('error', rej);
    });
  }

  kill() {
    if (this.child) {
      this.child.kill('SIGKILL');
      live.delete(this.child);
      this.child = null;
    }
  }
}

/**
 * A TCP balancer on a free port: each new connection goes to `target`
 * (a port), which the test moves from node to node; connections already
 * made stay where they are. While `closed`, new connections are refused
 * (reset at once), as by a balancer with no backend.
 */
export class Balancer {
  constructor(target) {
    this.target = target;
    this.closed = false;
    this.connections = 0;
    this.sockets = new Set();
    this.server = createServer((down) => {
      if (this.closed) {
        down.destroy();
        return;
      }
      this.connections += 1;
      const up = tcpConnect(this.target, '127.0.0.1');
      this.sockets.add(down).add(up);
      const end = () => {
        down.destroy();
        up.destroy();
        this.sockets.delete(down);
        this.sockets.delete(up);
      };
      down.pipe(up);
      up.pipe(down);
      down.on('error', end).on('close', end);
      up.on('error', end).on('close', end);
    });
  }

  static async start(t, target) {
    const b = new Balancer(target);
    await new Promise((res) => b.server.listen(0, '127.0.0.1', res));
    t.after(() => b.close());
    return b;
  }

  get port() {
    return this.server.address().port;
  }

  ws(path) {
    return `ws://127.0.0.1:${this.port}${path}`;
  }

  close() {
    for (const s of this.sockets) s.destroy();
    this.server.close();
  }
}

/** A node process; `stop()` sends SIGTERM (drain) and waits for exit. */
export class Node {
  /**
   * `env`: extra environment, e.g. `{REDIS_URL}` for a cluster node.
   * `tls`: `{ca}` (PEM) when the node serves TLS (`TLS_CERT_FILE` in `env`):
   * the helpers' own requests then go over https trusting `ca`.
   */
  constructor(port, dbDir, env = {}, tls = null) {
    this.port = port;
    this.dbDir = dbDir ?? mkdtempSync(join(tmpdir(), 'sbjs-'));
    this.env = env;
    this.tls = tls;
    this.child = null;
  }

  static async start(t, options = {}) {
    const n = new Node(await freePort(), options.dbDir, options.env, options.tls);
    await n.spawn();
    t.after(() => n.kill());
    return n;
  }

  /** `n` nodes sharing one Redis and one database. */
  static async cluster(t, n, env = {}) {
    const redis = await Redis.start(t);
    const dbDir = mkdtempSync(join(tmpdir(), 'sbjs-'));
    const nodes = [];
    for (let i = 0; i < n; i++) {
      nodes.push(await Node.start(t, { dbDir, env: { REDIS_URL: redis.url, NODE_ID: `n${i}`, ...env } }));
    }
    return { redis, nodes };
  }

  get http() {
    return `${this.tls ? 'https' : 'http'}://127.0.0.1:${this.port}`;
  }

  ws(path) {
    return `${this.tls ? 'wss' : 'ws'}://127.0.0.1:${this.port}${path}`;
  }

  /**
   * A request to this node: `{status, text}`. Plain: `fetch`. TLS: node:https
   * trusting `tls.ca` (Node 20's fetch cannot be given a CA).
   */
  async request(path, init = {}) {
    if (!this.tls) {
      const r = await fetch(`${this.http}${path}`, init);
      return { status: r.status, text: await r.text() };
    }
    return new Promise((res, rej) => {
      const options = { method: init.method ?? 'GET', headers: init.headers ?? {}, ca: this.tls.ca, agent: false };
      const req = httpsRequest(`${this.http}${path}`, options, (r) => {
        let text = '';
        r.setEncoding('utf8');
        r.on('data', (d) => (text += d));
        r.on('end', () => res({ status: r.statusCode, text }));
      });
      req.on('error', rej);
      req.end(init.body);
    });
  }

  async spawn() {
    this.child = spawn(binary(), ['serve'], {
      env: {
        ...process.env,
        SWITCHBOARD_LISTEN: `127.0.0.1:${this.port}`,
        DATABASE_URL: `sqlite://${join(this.dbDir, 'sb.db')}?mode=rwc`,
        JWT_SECRET: SECRET,
        API_KEYS: API_KEY,
        SHUTDOWN_GRACE_SECS: '3',
        RUST_LOG: 'warn',
        ...this.env,
      },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    live.add(this.child);
    const deadline = Date.now() + 20000;
    for (;;) {
      try {
        const r = await this.request('/readyz');
        if (r.status === 200) return;
      } catch {}
      if (Date.now() > deadline) throw new Error('node did not start');
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async stop() {
    const c = this.child;
    if (!c) return;
    const done = new Promise((r) => c.once('exit', r));
    c.kill('SIGTERM');
    await done;
    live.delete(c);
    this.child = null;
  }

  kill() {
    if (this.child) {
      this.child.kill('SIGKILL');
      live.delete(this.child);
      this.child = null;
    }
  }

  async call(method, path, token, body) {
    const r = await this.request(path, {
      method,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: r.status, body: r.text ? JSON.parse(r.text) : null };
  }

  async publish(room, type, data) {
    const r = await this.request('/api/publish', {
      method: 'POST',
      headers: { 'x-api-key': API_KEY, 'content-type': 'application/json' },
      body: JSON.stringify({ room, type, data }),
    });
    if (r.status !== 204) throw new Error(`publish ${r.status}: ${r.text}`);
  }
}

/** Resolves with the first event of `type` the client emits (or rejects after `ms`). */
export function next(client, type, ms = 10000, filter = () => true) {
  return new Promise((res, rej) => {
    const timer = setTimeout(() => {
      off();
      rej(new Error(`no ${type} within ${ms} ms`));
    }, ms);
    const off = client.on(type, (...args) => {
      if (!filter(...args)) return;
      clearTimeout(timer);
      off();
      res(args.length > 1 ? args : args[0]);
    });
  });
}

/** Polls `cond` until true (or throws after `ms`). */
export async function until(cond, ms = 10000) {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error('condition never became true');
    await new Promise((r) => setTimeout(r, 20));
  }
}

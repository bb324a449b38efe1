// The client over wss:// against the real binary serving native TLS
// (TLS_CERT_FILE / TLS_KEY_FILE, SPEC §12), with a CA and a server
// certificate the test makes (openssl). Node 20's WebSocket (undici) takes
// no CA option; it trusts what the process trusted at start, so the client
// runs in a child `node --experimental-websocket` with NODE_EXTRA_CA_CERTS
// naming the test's CA. The same child without it must fail to connect: the
// certificate is checked, and the connection really is TLS.

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { test } from 'node:test';

import { Node, admin } from './helpers.js';

/** A CA and a server certificate for 127.0.0.1 / localhost it signed. */
function makeCerts(dir) {
  const run = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=switchboard js test CA');
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', 'key.pem', '-out', 'node.csr', '-subj', '/CN=switchboard js test node');
  writeFileSync(join(dir, 'ext.cnf'),
    'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n');
  run('x509', '-req', '-in', 'node.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-out', 'cert.pem', '-days', '2', '-extfile', 'ext.cnf');
  return { ca: join(dir, 'ca.pem'), cert: join(dir, 'cert.pem'), key: join(dir, 'key.pem') };
}

const clientModule = pathToFileURL(resolve(import.meta.dirname, '../switchboard.js')).href;

// The child: connect, say READY once in the rooms, print every message type,
// and stop after `until` arrives (or report what happened instead).
const childSource = `
import { SwitchboardClient } from ${JSON.stringify(clientModule)};
const [url, token, until] = process.argv.slice(1);
const c = new SwitchboardClient(url, { token, maxAttempts: 1, pingIntervalMs: 0, loadOrders: null });
const out = (line) => process.stdout.write(line + '\\n');
c.on('connected', () => out('READY'));
c.on('message', (m) => {
  out('TYPE ' + m.type);
  if (m.type === until) { c.close(); process.exit(0); }
});
c.on('gave-up', (code) => { out('GAVE-UP ' + code); process.exit(2); });
c.connect();
setTimeout(() => { out('TIMEOUT'); process.exit(3); }, 8000);
`;

/** Runs the child; resolves with its exit code and output once it exits. */
function runClient(env, url, token, until, onLine = () => {}) {
  const child = spawn(process.execPath, ['--experimental-websocket', '--input-type=module', '-e', childSource, url, token, until], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (d) => {
    out += d;
    for (const line of d.split('\n')) if (line) onLine(line);
  });
  child.stderr.on('data', (d) => (err += d));
  return new Promise((res) => child.on('exit', (code) => res({ code, out, err })));
}

test('connects over wss:// to a node serving TLS, and the certificate is checked', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'sbjs-tls-'));
  const files = makeCerts(dir);
  const ca = readFileSync(files.ca, 'utf8');
  const node = await Node.start(t, {
    env: { TLS_CERT_FILE: files.cert, TLS_KEY_FILE: files.key },
    tls: { ca },
  });
  const url = node.ws('/');
  assert.match(url, /^wss:\/\//);
  // The probes and the API over https (the helpers trust the CA).
  assert.equal((await node.request('/healthz')).status, 200);

  // Trusting the test's CA: connected, then a publish arrives.
  let published = null;
  const trusted = await runClient({ NODE_EXTRA_CA_CERTS: files.ca }, url, admin(), 'over-tls', (line) => {
    if (line === 'READY' && !published) published = node.publish('admin-orders', 'over-tls', { n: 1 });
  });
  await published;
  assert.equal(trusted.code, 0, `child: ${trusted.out}\n${trusted.err}`);
  assert.match(trusted.out, /TYPE connected/);
  assert.match(trusted.out, /TYPE over-tls/);

  // Not trusting it: the handshake fails, the client never connects.
  const untrusted = await runClient({ NODE_EXTRA_CA_CERTS: '' }, url, admin(), 'over-tls');
  assert.notEqual(untrusted.code, 0, `connected without trusting the CA: ${untrusted.out}`);
  assert.doesNotMatch(untrusted.out, /READY/);
  assert.match(untrusted.out, /GAVE-UP/, untrusted.out + untrusted.err);
});

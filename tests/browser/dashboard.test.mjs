// The dashboard in a real browser against a real two-node cluster on loopback.
//
// Starts "gpu-box" (hosting smollm2) and "laptop" (no models, joined to gpu-box with --peer),
// opens laptop's dashboard in headless Chromium, signs in with the API key, checks that both
// nodes and the model appear, chats through the playground and waits for a streamed answer
// served by gpu-box, saves a screenshot, creates a connection key in the invite panel (checking
// its error, key, join command and QR code, with a screenshot of the panel), loads a model on
// laptop from the Models panel (a missing file first) and unloads it, creates an API key limited
// to smollm2 in the Keys panel and checks its secret against gpu-box from here (smollm2 only on
// /v1, refused on /api) before revoking it from the panel until both nodes refuse it (with a
// screenshot of the panel), then revokes gpu-box from the dashboard and waits for its card to
// go and stay gone. Every
// wait is bounded; the nodes, the browser and the temporary directories are cleaned up on
// success, failure and interruption.
//
// Environment: LLMESH_BIN (the llmesh binary), LLMESH_MODELS_DIR (holding
// SmolLM2-135M-Instruct.Q4_1.gguf), LLMESH_SCREENSHOT_DIR (where the screenshot goes),
// CHROMIUM (the browser, default /usr/bin/chromium).

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.LLMESH_BIN || '/var/tmp/llmesh-target/debug/llmesh';
const MODELS_DIR = path.resolve(process.env.LLMESH_MODELS_DIR || path.join(REPO, 'models'));
const MODEL_FILE = path.join(MODELS_DIR, 'SmolLM2-135M-Instruct.Q4_1.gguf');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const API_KEY = 'dash-key';
const CLUSTER_KEY = 'dash-cluster-secret-for-tests';
/** The whole test, start to finish. */
const DEADLINE_MS = 300_000;

const started = Date.now();
const nodes = [];
const tempDirs = [];
let context = null;
/** The cleanup under way, once started: it runs once whatever calls it. */
let cleaning = null;

function step(message) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s] ${message}`);
}

function fail(message) {
  throw new Error(message);
}

/** Poll `probe` until it returns a truthy value, for at most `timeoutMs`. */
async function waitFor(what, probe, timeoutMs, intervalMs = 250) {
  const until = Date.now() + timeoutMs;
  let lastError = null;
  while (Date.now() < until) {
    try {
      const value = await probe();
      if (value) return value;
    } catch (error) {
      lastError = error;
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
  fail(`timed out after ${timeoutMs / 1000} s waiting for ${what}${lastError ? ` (last error: ${lastError.message})` : ''}`);
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Start `llmesh serve` as node `name`, keeping the tail of its log for failure reports. */
async function startNode(name, extraArgs) {
  const port = await freePort();
  const dataDir = path.join(tempDirs[0], name);
  const args = [
    'serve', '--name', name, '--listen', `127.0.0.1:${port}`, '--p2p-listen', '/ip4/127.0.0.1/tcp/0',
    '--no-mdns', '--data-dir', dataDir, '--api-key', API_KEY, '--cluster-key', CLUSTER_KEY, ...extraArgs,
  ];
  const child = spawn(BIN, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
  });
  const node = { name, port, child, log: [], exited: null, url: `http://127.0.0.1:${port}` };
  const keep = (chunk) => {
    node.log.push(...chunk.toString().split('\n').filter(Boolean));
    if (node.log.length > 200) node.log.splice(0, node.log.length - 200);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  child.on('exit', (code, signal) => { node.exited = signal || `exit code ${code}`; });
  child.on('error', (error) => { node.exited = error.message; });
  nodes.push(node);
  return node;
}

/** GET `route` on `node` with `key`, without failing on a refusal: {status, body}. */
async function getWith(node, route, key) {
  const response = await fetch(`${node.url}${route}`, {
    headers: { Authorization: `Bearer ${key}` },
    signal: AbortSignal.timeout(5000),
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

async function api(node, route) {
  const response = await fetch(`${node.url}${route}`, {
    headers: { Authorization: `Bearer ${API_KEY}` },
    signal: AbortSignal.timeout(5000),
  });
  if (!response.ok) fail(`${route} answered ${response.status}`);
  return response.json();
}

function alive(node) {
  if (node.exited) fail(`node ${node.name} stopped (${node.exited})`);
}

/** The node's own overlay address on loopback, with its peer id, once it has announced it. */
async function p2pAddress(node) {
  return waitFor(`${node.name}'s p2p address`, async () => {
    alive(node);
    const list = await api(node, '/api/nodes');
    const self = list.data.find((entry) => entry.this_node);
    const address = self?.addresses.find((candidate) => candidate.includes('/ip4/127.0.0.1/'));
    if (!address) return null;
    return address.includes('/p2p/') ? address : `${address}/p2p/${self.peer_id}`;
  }, 120_000);
}

async function checkStaticRoutes(node) {
  const page = await fetch(`${node.url}/`, { signal: AbortSignal.timeout(5000) });
  if (page.status !== 200 || !page.headers.get('content-type')?.startsWith('text/html')) {
    fail(`GET / without a key answered ${page.status} ${page.headers.get('content-type')}`);
  }
  const missing = await fetch(`${node.url}/assets/missing.js`, { signal: AbortSignal.timeout(5000) });
  const body = await missing.json().catch(() => null);
  if (missing.status !== 404 || body?.error?.code !== 'unknown_url') {
    fail(`an unknown asset answered ${missing.status} ${JSON.stringify(body)}`);
  }
  const models = await fetch(`${node.url}/v1/models`, { signal: AbortSignal.timeout(5000) });
  if (models.status !== 401) fail(`/v1/models without a key answered ${models.status}`);
}

async function run() {
  if (!existsSync(BIN)) fail(`no llmesh binary at ${BIN}: build it (cargo build) or set LLMESH_BIN`);
  if (!existsSync(MODEL_FILE)) fail(`no model at ${MODEL_FILE}: run scripts/fetch-models.sh or set LLMESH_MODELS_DIR`);
  if (!existsSync(CHROMIUM)) fail(`no browser at ${CHROMIUM}: apt-get install chromium, or set CHROMIUM`);
  tempDirs.push(await mkdtemp(path.join(os.tmpdir(), 'llmesh-browser-')));
  const shots = process.env.LLMESH_SCREENSHOT_DIR || (await mkdtemp(path.join(os.tmpdir(), 'llmesh-screenshots-')));
  await mkdir(shots, { recursive: true });

  step('starting gpu-box with smollm2');
  const gpuBox = await startNode('gpu-box', ['--model', `smollm2=${MODEL_FILE}`]);
  const address = await p2pAddress(gpuBox);
  step(`gpu-box listens on ${address}; starting laptop`);
  const laptop = await startNode('laptop', ['--peer', address]);
  await waitFor('laptop to see gpu-box and smollm2', async () => {
    alive(laptop);
    alive(gpuBox);
    const [list, models] = await Promise.all([api(laptop, '/api/nodes'), api(laptop, '/v1/models')]);
    return list.data.some((entry) => entry.name === 'gpu-box') && models.data.some((model) => model.id === 'smollm2');
  }, 60_000);
  await checkStaticRoutes(laptop);

  step('opening laptop\'s dashboard in Chromium');
  const profile = path.join(tempDirs[0], 'chromium-profile');
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1440, height: 900 },
    colorScheme: 'light',
    timeout: 30_000,
    // This script closes the browser itself on a signal, before removing its profile.
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
  });
  context.setDefaultTimeout(15_000);
  const page = context.pages()[0] || (await context.newPage());
  const problems = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  /** Refusals the test provokes on purpose (an invalid invitation), which the browser logs. */
  let expectedRefusals = 0;
  page.on('console', (message) => {
    if (message.type() !== 'error') return;
    // The browser reports the 401 that makes the page ask for a key; that one is expected.
    if (message.text().includes('status of 401')) return;
    if (expectedRefusals > 0 && message.text().includes('status of 400')) {
      expectedRefusals -= 1;
      return;
    }
    problems.push(`console: ${message.text()}`);
  });
  await page.goto(`${laptop.url}/`, { waitUntil: 'load', timeout: 15_000 });

  step('signing in');
  await page.locator('#login').waitFor({ state: 'visible' });
  await page.fill('#login-key', 'wrong-key');
  await page.click('#login-submit');
  await page.locator('#login-error', { hasText: 'refused' }).waitFor({ state: 'visible' });
  await page.fill('#login-key', API_KEY);
  await page.click('#login-submit');
  await page.locator('#login').waitFor({ state: 'hidden' });
  const stored = await page.evaluate(() => sessionStorage.getItem('llmesh.apiKey'));
  if (stored !== API_KEY) fail(`sessionStorage holds ${JSON.stringify(stored)}, not the key`);
  if (page.url().includes(API_KEY)) fail('the key leaked into the URL');

  step('checking nodes and models');
  const gpuCard = page.locator('#nodes [data-node="gpu-box"]');
  const laptopCard = page.locator('#nodes [data-node="laptop"]');
  await gpuCard.waitFor({ timeout: 30_000 });
  await laptopCard.waitFor();
  await laptopCard.locator('.pill', { hasText: 'this node' }).waitFor();
  if (!(await gpuCard.textContent()).includes('smollm2')) fail('gpu-box\'s card does not list smollm2');
  const modelRow = page.locator('#models tr[data-model="smollm2"]');
  await modelRow.waitFor();
  const modelText = await modelRow.textContent();
  if (!modelText.includes('gpu-box') || !modelText.includes('chat')) fail(`smollm2's row reads "${modelText}"`);

  step('chatting in the playground');
  await page.locator('#chat-model option[value="smollm2"]').waitFor({ state: 'attached' });
  await page.selectOption('#chat-model', 'smollm2');
  await page.fill('#chat-temperature', '0');
  await page.fill('#chat-system', 'You are a helpful assistant.');
  await page.fill('#chat-input', 'What is the capital of France?');
  await page.click('#chat-send');
  const answer = page.locator('#chat-log .message.assistant').last();
  await answer.locator('.content:not(.streaming)').waitFor({ timeout: 120_000 });
  const answerText = await answer.locator('.content').textContent();
  const meta = await answer.locator('.meta').textContent();
  if (!answerText.includes('Paris')) fail(`the answer does not mention Paris: "${answerText}" (${meta})`);
  if (!meta.includes('served by gpu-box')) fail(`the answer is not marked as served by gpu-box: "${meta}"`);
  step(`answer: "${answerText.trim()}" (${meta})`);

  step('waiting for the routing statistics and their sparklines');
  await page.locator('#stats tr[data-key="smollm2"]').waitFor({ timeout: 15_000 });
  await page.locator('#stats tr[data-key="gpu-box"]').waitFor({ timeout: 15_000 });
  await page.locator('#stats .spark polyline').first().waitFor({ state: 'attached', timeout: 20_000 });

  const screenshot = path.join(shots, 'dashboard.png');
  await page.screenshot({ path: screenshot, fullPage: true });
  step(`screenshot: ${screenshot}`);

  step('inviting a machine');
  if (await laptopCard.locator('button.revoke').count()) fail('this node\'s own card offers to revoke it');
  await page.click('#invite-open');
  await page.locator('#invite').waitFor({ state: 'visible' });
  await page.fill('#invite-uses', '0');
  expectedRefusals += 1;
  await page.click('#invite-create');
  await page.locator('#invite-error', { hasText: 'uses' }).waitFor({ state: 'visible' });
  await page.fill('#invite-uses', '2');
  await page.fill('#invite-hours', '48');
  await page.click('#invite-create');
  await page.locator('#invite-result').waitFor({ state: 'visible' });
  if (await page.locator('#invite-error').isVisible()) fail(`the invitation failed: ${await page.textContent('#invite-error')}`);
  const key = await page.inputValue('#invite-key');
  if (!key.startsWith('llmesh://join/')) fail(`the key field reads "${key}"`);
  const command = await page.textContent('#invite-command');
  if (command !== `llmesh serve --join '${key}'`) fail(`the join command reads "${command}"`);
  if (!(await page.textContent('#invite-expiry')).includes('2 times')) fail('the expiry line does not say 2 uses');
  await page.locator('#invite-qr svg.qr-code path').waitFor({ state: 'attached' });
  const qrBox = await page.locator('#invite-qr svg.qr-code').boundingBox();
  if (!qrBox || qrBox.width < 100 || qrBox.height < 100) fail(`the QR code is not shown at a readable size: ${JSON.stringify(qrBox)}`);
  const inviteShot = path.join(shots, 'invite.png');
  await page.locator('#invite').screenshot({ path: inviteShot });
  step(`invite screenshot: ${inviteShot}`);
  await page.click('#invite-close');
  await page.locator('#invite').waitFor({ state: 'hidden' });

  step('loading models on laptop from its dashboard: a missing file, then smollm2 again');
  await page.click('#load-open');
  await page.locator('#load-model').waitFor({ state: 'visible' });
  await page.fill('#load-id', 'missing');
  await page.fill('#load-path', '/nonexistent/model.gguf');
  await page.click('#load-submit');
  const failed = page.locator('#pending-models li[data-key="missing"]');
  await failed.filter({ hasText: 'does not exist' }).waitFor({ timeout: 30_000 });
  await failed.locator('button.dismiss').click();
  await failed.waitFor({ state: 'detached' });
  await page.click('#load-open');
  await page.fill('#load-id', 'smol-laptop');
  await page.fill('#load-path', MODEL_FILE);
  await page.click('#load-submit');
  const loadedRow = page.locator('#models tr[data-model="smol-laptop"]');
  await loadedRow.waitFor({ timeout: 60_000 });
  const loadedText = await loadedRow.textContent();
  if (!loadedText.includes('laptop') || !loadedText.includes('134.5M')) fail(`smol-laptop's row reads "${loadedText}"`);
  if (await modelRow.locator('button.unload').count()) fail('laptop offers to unload a model gpu-box hosts');
  page.once('dialog', (dialog) => dialog.accept());
  await loadedRow.locator('button.unload').click();
  await loadedRow.waitFor({ state: 'detached', timeout: 30_000 });

  step('creating an API key for smollm2 in the Keys panel, using it on gpu-box, revoking it');
  await page.click('#key-open');
  await page.locator('#key-create').waitFor({ state: 'visible' });
  await page.fill('#key-name', 'browser-test');
  await page.locator('#key-models input[value="smollm2"]').check();
  await page.fill('#key-rpm', '5');
  await page.click('#key-submit');
  await page.locator('#key-result').waitFor({ state: 'visible' });
  if (await page.locator('#key-error').isVisible()) fail(`the key was refused: ${await page.textContent('#key-error')}`);
  const secret = await page.inputValue('#key-secret');
  if (!secret.startsWith('sk-llmesh-')) fail(`the secret field reads "${secret}"`);
  if (!(await page.textContent('#key-result')).includes('Shown once')) fail('the secret is not marked as shown once');
  const keptSecret = await page.evaluate((value) => [
    ...Object.keys(sessionStorage).map((name) => sessionStorage.getItem(name)),
    ...Object.keys(localStorage).map((name) => localStorage.getItem(name)),
    location.href,
  ].some((text) => text.includes(value)), secret);
  if (keptSecret) fail('the secret was kept in storage or the URL');
  const keyRow = page.locator('#keys tr[data-name="browser-test"]');
  await keyRow.waitFor({ timeout: 15_000 });
  const keyText = await keyRow.textContent();
  if (!keyText.includes('smollm2') || !keyText.includes('5 req/min') || !keyText.includes('active')) {
    fail(`browser-test's row reads "${keyText}"`);
  }
  // The key was made on laptop; gpu-box must know it (it spreads with the cluster's records).
  const seen = await waitFor('gpu-box to accept the new key', async () => {
    alive(gpuBox);
    const answer = await getWith(gpuBox, '/v1/models', secret);
    return answer.status === 200 ? answer.body : null;
  }, 30_000);
  const visible = seen.data.map((model) => model.id);
  if (visible.join() !== 'smollm2') fail(`the key lists the models ${JSON.stringify(visible)} on gpu-box, not only smollm2`);
  const forbidden = await getWith(gpuBox, '/api/nodes', secret);
  if (forbidden.status !== 403) fail(`the key answered ${forbidden.status} on gpu-box's /api/nodes, not 403`);
  const chat = await fetch(`${gpuBox.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${secret}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: 'smollm2', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 4 }),
    signal: AbortSignal.timeout(60_000),
  });
  if (chat.status !== 200) fail(`a chat with the key on gpu-box answered ${chat.status}: ${await chat.text()}`);
  // Counted on gpu-box, it reaches laptop's table with gpu-box's next announcement.
  await waitFor('browser-test\'s request to show in laptop\'s Keys panel', async () =>
    Number((await keyRow.locator('td').nth(5).textContent()).trim()) === 1, 20_000);
  const minuteText = await keyRow.locator('td').nth(7).textContent();
  if (!minuteText.startsWith('1 req')) fail(`browser-test's last minute reads "${minuteText}"`);
  const keysShot = path.join(shots, 'keys.png');
  await page.locator('#keys-panel').screenshot({ path: keysShot });
  step(`keys screenshot: ${keysShot}`);
  await page.click('#key-close');
  await page.locator('#key-create').waitFor({ state: 'hidden' });
  if (await page.inputValue('#key-secret')) fail('the secret stayed in the page after its box was closed');
  let keyQuestion = null;
  page.once('dialog', (dialog) => {
    keyQuestion = dialog.message();
    dialog.accept();
  });
  await keyRow.locator('button.revoke-key').click();
  await page.locator('#keys-note', { hasText: 'Revoked the key browser-test' }).waitFor({ state: 'visible' });
  if (!keyQuestion?.includes('browser-test')) fail(`the key's confirmation asked "${keyQuestion}"`);
  await keyRow.locator('.pill', { hasText: 'revoked' }).waitFor({ timeout: 15_000 });
  if (await keyRow.locator('button.revoke-key').count()) fail('a revoked key still offers to revoke it');
  for (const node of [laptop, gpuBox]) {
    await waitFor(`${node.name} to refuse the revoked key`, async () => {
      alive(node);
      return (await getWith(node, '/v1/models', secret)).status === 401;
    }, 30_000);
  }

  step('revoking gpu-box from laptop\'s dashboard: its card must go, and stay gone');
  let question = null;
  page.once('dialog', (dialog) => {
    question = dialog.message();
    dialog.accept();
  });
  await gpuCard.locator('button.revoke').click();
  await page.locator('#membership-note', { hasText: 'Revoked gpu-box' }).waitFor({ state: 'visible' });
  if (!question?.includes('gpu-box')) fail(`the confirmation asked "${question}"`);
  await gpuCard.waitFor({ state: 'detached', timeout: 30_000 });
  await page.locator('#nodes-note', { hasText: 'gpu-box went offline' }).waitFor();
  await laptopCard.waitFor();
  // Two more polls: a revoked node must not come back (laptop still has gpu-box as --peer).
  for (let poll = 0; poll < 2; poll += 1) {
    const shown = await page.textContent('#live');
    await page.waitForFunction((before) => document.getElementById('live').textContent !== before, shown);
  }
  if (await gpuCard.count()) fail('gpu-box came back after it was revoked');
  alive(gpuBox);

  if (problems.length) fail(`the page reported problems:\n  ${problems.join('\n  ')}`);
}

async function cleanup() {
  cleaning ??= (async () => {
    if (context) await context.close().catch(() => {});
    await Promise.all(nodes.map((node) => stopNode(node)));
    await Promise.all(tempDirs.map((dir) =>
      rm(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 }).catch((error) => {
        console.error(`could not remove ${dir}: ${error.message}`);
      })));
  })();
  return cleaning;
}

async function stopNode(node) {
  if (node.exited) return;
  const gone = new Promise((resolve) => node.child.once('exit', resolve));
  node.child.kill('SIGTERM');
  const timer = setTimeout(() => node.child.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(timer);
}

let interrupted = false;
let finished = false;

/** Print the summary line once and exit. */
function finish(passed, code = passed ? 0 : 1) {
  if (finished) return;
  finished = true;
  console.log(passed ? '1 passed, 0 failed' : '0 passed, 1 failed');
  process.exit(code);
}

for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    interrupted = true;
    console.error(`interrupted by ${signal}: cleaning up`);
    cleanup().finally(() => finish(false, 130));
  });
}
// Last resort if the process dies some other way: never leave nodes behind.
process.on('exit', () => {
  for (const node of nodes) if (!node.exited) node.child.kill('SIGKILL');
});

const deadline = setTimeout(() => {
  interrupted = true;
  console.error(`FAILED: the test took longer than ${DEADLINE_MS / 1000} s`);
  cleanup().finally(() => finish(false));
}, DEADLINE_MS);

let passed = false;
try {
  await run();
  passed = true;
} catch (error) {
  if (!interrupted) {
    // Playwright appends the browser's whole log to its errors: keep the message itself.
    console.error(`FAILED: ${String(error.message).split('\nBrowser logs:')[0]}`);
    for (const node of nodes) {
      console.error(`--- last log lines of ${node.name} ---\n${node.log.slice(-40).join('\n')}`);
    }
  }
} finally {
  await cleanup();
  clearTimeout(deadline);
}
finish(passed);

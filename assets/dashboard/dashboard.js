// The dashboard: polls the node every 2 s for the cluster's nodes, models, routing statistics
// and API keys, and renders them. Rates (requests/s, tokens/s) and their sparklines come from the
// difference between successive polls, kept here for the last five minutes.

import { AuthRequired, apiKey, clearApiKey, getJson, onAuthRequired, setApiKey } from './api.js';
import { initChat, updateChatModels } from './chat.js';
import { bar, h, patch, sparkline } from './dom.js';
import * as fmt from './format.js';
import { forgetSecret, initKeys, keysTable, updateKeyModels } from './keys.js';
import { initMembership, revokeButton } from './membership.js';
import { initModels, pendingModels, unloadButton } from './models.js';

const POLL_MS = 2000;
const HISTORY_MS = 5 * 60 * 1000;
/** How long a node that left stays mentioned under the node list. */
const GONE_MS = 5 * 60 * 1000;

const $ = (id) => document.getElementById(id);

const state = {
  nodes: [],
  models: [],
  /** This node's own models with their state (`/api/models`): loading, ready, unloading, failed. */
  localModels: [],
  /** The cluster's API keys with their use (`/api/keys`). */
  keys: [],
  stats: null,
  /** The previous stats poll, for rates: {t, stats}. */
  previous: null,
  /** Per model and per node: the current rates {requests, tokens} per second. */
  rates: { models: new Map(), nodes: new Map() },
  /** Per model: [{t, requests, tokens}] over the last HISTORY_MS. */
  history: new Map(),
  /** Nodes seen before and missing now: peer id → {name, since}. */
  gone: new Map(),
  errors: {},
  lastUpdate: null,
  signedOut: false,
  timer: null,
  polling: false,
  /** How many documents each poll asks for. */
  polled: 0,
};

// ---- polling --------------------------------------------------------------------------------

async function poll() {
  if (state.polling || state.signedOut) return;
  state.polling = true;
  clearTimeout(state.timer);
  const [nodes, models, stats, localModels, keys] = await Promise.allSettled([
    getJson('/api/nodes'), getJson('/v1/models'), getJson('/api/stats'), getJson('/api/models'), getJson('/api/keys'),
  ]);
  state.polling = false;
  const results = { nodes, models, stats, localModels, keys };
  if (Object.values(results).some((result) => result.reason instanceof AuthRequired)) {
    showLogin();
    return;
  }
  const now = performance.now();
  state.errors = {};
  for (const [name, result] of Object.entries(results)) {
    if (result.status === 'rejected') state.errors[name] = result.reason?.message || String(result.reason);
  }
  if (nodes.status === 'fulfilled') takeNodes(nodes.value.data || []);
  if (models.status === 'fulfilled') {
    state.models = models.value.data || [];
    updateChatModels(state.models);
    updateKeyModels(state.models);
  }
  if (stats.status === 'fulfilled') takeStats(stats.value, now);
  if (localModels.status === 'fulfilled') state.localModels = localModels.value.data || [];
  if (keys.status === 'fulfilled') state.keys = keys.value.data || [];
  state.polled = Object.keys(results).length;
  if (Object.keys(state.errors).length < state.polled) state.lastUpdate = new Date();
  render();
  state.timer = setTimeout(poll, POLL_MS);
}

function takeNodes(all) {
  const nowMs = Date.now();
  // The node lists nodes that left in the last minutes as "offline", with since when.
  const nodes = all.filter((node) => node.status !== 'offline');
  const present = new Set(nodes.map((node) => node.peer_id));
  for (const node of state.nodes) {
    if (!present.has(node.peer_id)) state.gone.set(node.peer_id, { name: node.name, since: nowMs });
  }
  for (const node of all.filter((node) => node.status === 'offline')) {
    state.gone.set(node.peer_id, { name: node.name, since: node.status_since * 1000 });
  }
  for (const [peer, gone] of state.gone) {
    if (present.has(peer) || nowMs - gone.since > GONE_MS) state.gone.delete(peer);
  }
  state.nodes = nodes;
}

function takeStats(stats, now) {
  const previous = state.previous;
  state.rates = { models: new Map(), nodes: new Map() };
  if (previous) {
    const seconds = (now - previous.t) / 1000;
    for (const group of ['models', 'nodes']) {
      for (const [key, counters] of Object.entries(stats[group] || {})) {
        const before = previous.stats[group]?.[key] || { requests: 0, tokens: 0 };
        // A restarted node starts its counters again: never show a negative rate.
        const perSecond = (field) => Math.max(0, (counters[field] - before[field]) / seconds);
        state.rates[group].set(key, { requests: perSecond('requests'), tokens: perSecond('tokens') });
      }
    }
    for (const [model, rates] of state.rates.models) {
      const series = state.history.get(model) || [];
      series.push({ t: now, requests: rates.requests, tokens: rates.tokens });
      while (series.length && now - series[0].t > HISTORY_MS) series.shift();
      state.history.set(model, series);
    }
  }
  state.previous = { t: now, stats };
  state.stats = stats;
}

// ---- rendering ------------------------------------------------------------------------------

function render() {
  renderSummary();
  renderNodes();
  renderModels();
  renderStats();
  renderKeys();
}

function renderSummary() {
  const nodes = state.nodes;
  const self = nodes.find((node) => node.this_node);
  const cores = nodes.reduce((sum, node) => sum + (node.hardware?.cores || 0), 0);
  const memory = nodes.reduce((sum, node) => sum + (node.hardware?.memory_bytes || 0), 0);
  const gpus = nodes.filter((node) => node.hardware?.gpu).length;
  const degraded = nodes.filter((node) => node.degraded).length;
  patch($('summary'),
    h('span', null, h('strong', null, fmt.plural(nodes.length, 'node'))),
    h('span', null, fmt.plural(state.models.length, 'model')),
    h('span', null, `${cores} cores · ${fmt.bytes(memory)} RAM`),
    gpus ? h('span', null, fmt.plural(gpus, 'GPU')) : null,
    degraded ? h('span', { class: 'pill warn' }, `${degraded} degraded`) : null,
    self ? h('span', { class: 'muted' }, `via ${self.name}`) : null);

  const live = $('live');
  const failing = Object.keys(state.errors);
  if (failing.length && failing.length === state.polled) {
    live.className = 'live down';
    live.textContent = `Node unreachable (${state.errors.nodes}) · retrying`;
  } else if (failing.length) {
    live.className = 'live warn';
    live.textContent = `Partly updated · ${failing.map((name) => `${name}: ${state.errors[name]}`).join('; ')}`;
  } else {
    live.className = 'live up';
    live.textContent = `Live · ${fmt.clock(state.lastUpdate)}`;
  }
  $('sign-out').hidden = !apiKey();
}

function renderNodes() {
  if (state.errors.nodes && !state.nodes.length) {
    patch($('nodes'), h('p', { class: 'placeholder error-text' }, `Cannot list nodes: ${state.errors.nodes}`));
    return;
  }
  patch($('nodes'), state.nodes.map(nodeCard));
  const gone = Array.from(state.gone.values())
    .map((node) => `${node.name} went offline ${fmt.ago(Date.now() - node.since)}`);
  $('nodes-note').textContent = gone.join(' · ');
}

function nodeCard(node) {
  const hardware = node.hardware || {};
  const usage = node.usage || {};
  const load = node.load || { in_flight: 0, queued: 0 };
  const uptime = Date.now() / 1000 - node.started_at;
  const meters = [
    meter('CPU', usage.cpu_percent / 100, fmt.percent(usage.cpu_percent)),
    meter('Memory', usage.memory_used_bytes / hardware.memory_bytes, fmt.usedOf(usage.memory_used_bytes, hardware.memory_bytes)),
  ];
  if (hardware.gpu) {
    meters.push(meter('GPU', (usage.gpu_percent ?? 0) / 100, fmt.percent(usage.gpu_percent)));
    if (hardware.gpu_memory_bytes) {
      meters.push(meter('VRAM', (usage.gpu_memory_used_bytes ?? 0) / hardware.gpu_memory_bytes,
        fmt.usedOf(usage.gpu_memory_used_bytes, hardware.gpu_memory_bytes)));
    }
  }
  const busy = load.in_flight + load.queued > 0;
  return h('article', { class: `card node${node.degraded ? ' degraded' : ''}`, 'data-key': node.peer_id, 'data-node': node.name },
    h('header', { class: 'node-head' },
      h('span', { class: `dot ${node.status === 'online' ? 'up' : 'warn'}`, title: node.status }),
      h('h3', { class: 'node-name' }, node.name),
      node.this_node ? h('span', { class: 'pill accent' }, 'this node') : null,
      h('span', { class: 'pill' }, node.status),
      h('span', { class: 'version muted small' }, `v${node.version}`),
      node.version_skew ? h('span', { class: 'pill warn', title: 'another llmesh version than this node' }, 'version differs') : null,
      revokeButton(node)),
    node.degraded ? h('div', { class: 'degraded-banner', role: 'alert' }, h('strong', null, 'Degraded: '), node.degraded) : null,
    h('div', { class: 'node-ids small muted' },
      h('span', { class: 'mono', title: node.peer_id }, fmt.shortPeerId(node.peer_id)),
      h('span', null, `up ${fmt.duration(uptime)}`),
      h('span', null, node.this_node ? 'answering this page' : `seen ${fmt.ago(node.last_seen_ms)}`)),
    h('div', { class: 'hardware small' },
      h('span', { title: hardware.cpu }, hardware.cpu || 'unknown CPU'),
      h('span', null, `${hardware.cores} cores`),
      h('span', null, `${fmt.bytes(hardware.memory_bytes)} RAM`),
      hardware.gpu ? h('span', { class: 'gpu' }, `${hardware.gpu}${hardware.gpu_memory_bytes ? ` · ${fmt.bytes(hardware.gpu_memory_bytes)}` : ''}`) : null),
    h('div', { class: 'meters' }, meters),
    h('div', { class: 'node-foot' },
      h('span', { class: `load${busy ? ' busy' : ''}` },
        h('strong', null, load.in_flight), ' in flight · ', h('strong', null, load.queued), ' queued'),
      h('span', { class: 'chips' }, node.models.length
        ? node.models.map((model) => h('span', { class: 'chip' }, model))
        : h('span', { class: 'muted small' }, 'no models'))),
    h('div', { class: 'addresses mono small muted' },
      node.addresses.length ? node.addresses.map((address) => h('div', { title: address }, address)) : 'no addresses yet'));
}

function meter(label, fraction, text) {
  return h('div', { class: 'meter' },
    h('span', { class: 'meter-label' }, label), bar(fraction, `${label} ${text}`), h('span', { class: 'meter-value' }, text));
}

function renderModels() {
  patch($('pending-models'), pendingModels(state.localModels));
  if (state.errors.models && !state.models.length) {
    patch($('models'), h('p', { class: 'placeholder error-text' }, `Cannot list models: ${state.errors.models}`));
    return;
  }
  if (!state.models.length) {
    patch($('models'), h('p', { class: 'placeholder' }, 'No node hosts a model yet. Load one here, or start a node with --model ID=PATH.'));
    return;
  }
  const byPeer = new Map(state.nodes.map((node) => [node.peer_id, node]));
  const local = new Map(state.localModels.map((model) => [model.id, model]));
  const rows = state.models.map((model) => {
    const info = model.llmesh || {};
    const hosts = info.hosts || [];
    return h('tr', { 'data-key': model.id, 'data-model': model.id },
      h('td', { class: 'key' }, h('strong', null, model.id)),
      h('td', null, h('span', { class: `pill ${info.kind === 'chat' ? 'accent' : ''}` }, info.kind || '—')),
      h('td', null, info.architecture || '—'),
      h('td', { class: 'num' }, info.parameters ? fmt.count(info.parameters) : '—'),
      h('td', null, info.quantization || '—'),
      h('td', { class: 'num' }, info.file_bytes ? fmt.bytes(info.file_bytes) : '—'),
      h('td', { class: 'num' }, info.context_length ? fmt.integer(info.context_length) : '—'),
      h('td', null, h('div', { class: 'hosts' }, hosts.length ? hosts.map((host) => hostChip(host, byPeer.get(host.peer_id))) : '—')),
      h('td', null, unloadButton(model, local.get(model.id))));
  });
  const numeric = new Set([3, 5, 6]);
  patch($('models'), h('table', null,
    h('thead', null, h('tr', null, ['Model', 'Kind', 'Architecture', 'Parameters', 'Quantization', 'Size', 'Context', 'Hosts (load)', '']
      .map((title, index) => h('th', { class: numeric.has(index) ? 'num' : null }, title)))),
    h('tbody', null, rows)));
}

function hostChip(host, node) {
  if (!node) return h('span', { class: 'host', title: host.peer_id }, host.name, h('span', { class: 'muted' }, ' · not listed'));
  const { in_flight: inFlight, queued } = node.load || { in_flight: 0, queued: 0 };
  const load = inFlight + queued === 0 ? 'idle' : `${inFlight} in flight${queued ? `, ${queued} queued` : ''}`;
  return h('span', { class: `host${node.degraded ? ' degraded' : ''}${inFlight + queued ? ' busy' : ''}`, title: `${host.name} (${host.peer_id})` },
    host.name, h('span', { class: 'host-load' }, ` · ${load}`));
}

function renderKeys() {
  if (state.errors.keys && !state.keys.length) {
    patch($('keys'), h('p', { class: 'placeholder error-text' }, `Cannot list keys: ${state.errors.keys}`));
    return;
  }
  if (!state.keys.length) {
    patch($('keys'), h('p', { class: 'placeholder' }, 'No API key yet. Create one for each user or application: it works on every node, for /v1 only, within its models and limits.'));
    return;
  }
  patch($('keys'), keysTable(state.keys, state.nodes));
}

function renderStats() {
  const self = state.nodes.find((node) => node.this_node);
  $('stats-note').textContent = self ? `requests routed by ${self.name}` : '';
  if (!state.stats) {
    patch($('stats'), h('p', { class: state.errors.stats ? 'placeholder error-text' : 'placeholder' },
      state.errors.stats ? `Cannot read statistics: ${state.errors.stats}` : 'Loading…'));
    return;
  }
  const models = Object.entries(state.stats.models || {});
  const nodes = Object.entries(state.stats.nodes || {});
  if (!models.length && !nodes.length) {
    patch($('stats'), h('p', { class: 'placeholder' }, 'No requests routed yet: send one from the playground.'));
    return;
  }
  const now = performance.now();
  patch($('stats'),
    h('h3', { class: 'subhead' }, 'By model'),
    h('div', { class: 'table-wrap' }, statsTable('Model', models, state.rates.models, (model) => {
      const series = state.history.get(model) || [];
      const line = (field, unit) => sparkline(series.map((point) => ({ t: point.t, v: point[field] })), {
        now, windowMs: HISTORY_MS,
        title: `${unit} over the last 5 minutes, peak ${fmt.rate(Math.max(0, ...series.map((point) => point[field])))}`,
      });
      return [line('requests', 'requests/s'), line('tokens', 'tokens/s')];
    })),
    h('h3', { class: 'subhead' }, 'By node'),
    h('div', { class: 'table-wrap' }, statsTable('Node', nodes, state.rates.nodes, null)));
}

function statsTable(title, entries, rates, sparklines) {
  const head = [title, 'Requests', 'Errors', 'Retries', 'Failovers', 'Tokens', 'Req/s', 'Tok/s', 'First token', 'Total'];
  const percentiles = (index) => (index >= 8 ? h('div', { class: 'th-sub' }, 'p50 / p95') : null);
  return h('table', { class: 'stats' },
    h('thead', null, h('tr', null, head.map((text, index) => h('th', { class: index ? 'num' : null }, text, percentiles(index))))),
    h('tbody', null, entries.map(([key, counters]) => {
      const rate = rates.get(key);
      const [requestLine, tokenLine] = sparklines ? sparklines(key) : [null, null];
      return h('tr', { 'data-key': key },
        h('td', { class: 'key' }, h('strong', null, key)),
        h('td', { class: 'num' }, fmt.count(counters.requests)),
        h('td', { class: `num${counters.errors ? ' bad' : ''}` }, fmt.count(counters.errors)),
        h('td', { class: 'num' }, fmt.count(counters.retries)),
        h('td', { class: 'num' }, fmt.count(counters.failovers)),
        h('td', { class: 'num' }, fmt.count(counters.tokens)),
        h('td', { class: 'num rate' }, requestLine, h('span', null, fmt.rate(rate?.requests))),
        h('td', { class: 'num rate' }, tokenLine, h('span', null, fmt.rate(rate?.tokens))),
        h('td', { class: 'num' }, latency(counters.first_token_ms)),
        h('td', { class: 'num' }, latency(counters.total_ms)));
    })));
}

/** `180 / 420 ms`, `0.85 / 1.30 s`: both percentiles in one unit. */
function latency(percentiles) {
  const { p50 = null, p95 = null } = percentiles || {};
  if (p50 === null && p95 === null) return '—';
  const high = Math.max(p50 ?? 0, p95 ?? 0);
  const [scale, digits, unit] = high < 1000 ? [1, 0, 'ms'] : [1000, 2, 's'];
  const show = (value) => (value === null ? '—' : (value / scale).toFixed(digits));
  return `${show(p50)} / ${show(p95)} ${unit}`;
}

// ---- signing in -----------------------------------------------------------------------------

function showLogin(message) {
  state.signedOut = true;
  clearTimeout(state.timer);
  $('live').className = 'live warn';
  $('live').textContent = 'Signed out';
  $('login').hidden = false;
  document.body.classList.add('locked');
  const error = $('login-error');
  const refused = message ?? (apiKey() ? 'That key was refused. Check it and try again.' : '');
  error.textContent = refused;
  error.hidden = !refused;
  $('login-key').focus();
}

async function signIn(event) {
  event.preventDefault();
  const key = $('login-key').value.trim();
  if (!key) return;
  setApiKey(key);
  $('login-submit').disabled = true;
  try {
    await getJson('/api/nodes');
    $('login').hidden = true;
    $('login-key').value = '';
    document.body.classList.remove('locked');
    state.signedOut = false;
    poll();
  } catch (error) {
    showLogin(error instanceof AuthRequired ? 'That key was refused. Check it and try again.' : `Cannot check the key: ${error.message}`);
  } finally {
    $('login-submit').disabled = false;
  }
}

function signOut() {
  clearApiKey();
  forgetSecret();
  showLogin('');
}

onAuthRequired(() => showLogin());
$('login-form').addEventListener('submit', signIn);
$('sign-out').addEventListener('click', signOut);
initChat();
initMembership({ refresh: poll });
initModels({ refresh: poll });
initKeys({ refresh: poll });
poll();

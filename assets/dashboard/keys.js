// The cluster's API keys for /v1 (GET /api/keys, polled with the rest): a table of every key with
// its limits, state and use across the cluster, the form that makes one (POST /api/keys) and a
// Revoke button on each key still in use (POST /api/keys/{name}/revoke). A new key's secret is
// shown once, in the form's result box, and is kept nowhere else: not in storage, not in a URL,
// and it is cleared from the page when the box is closed. Revoke buttons live in polled, patched
// rows, so their clicks are taken by one listener on the panel.

import { postJson } from './api.js';
import { bar, copyField, h } from './dom.js';
import * as fmt from './format.js';

const $ = (id) => document.getElementById(id);
/** How long a note about a revocation stays up. */
const NOTE_MS = 10_000;
/** The order of the table: keys in use first. */
const STATE_ORDER = { active: 0, expired: 1, revoked: 2 };

/** Keys whose revocation is under way, so a second click does not send it again. */
const revoking = new Set();
/** The models ticked in the form, kept across the polls that rebuild its checkboxes. */
const ticked = new Set();
let noteTimer = null;

/** `refresh` is called after a change, to poll at once. */
export function initKeys({ refresh }) {
  $('key-open').addEventListener('click', () => showForm($('key-create').hidden));
  $('key-close').addEventListener('click', () => showForm(false));
  $('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    createKey(refresh);
  });
  $('key-copy').addEventListener('click', () => copyField($('key-secret'), $('key-copy')));
  $('key-done').addEventListener('click', forgetSecret);
  $('key-models').addEventListener('change', (event) => {
    const box = event.target.closest('input[type="checkbox"]');
    if (!box) return;
    if (box.checked) ticked.add(box.value);
    else ticked.delete(box.value);
  });
  $('keys-panel').addEventListener('click', (event) => {
    const button = event.target.closest('button.revoke-key');
    if (button) revoke(button.dataset.name, refresh);
  });
}

/** Offer the cluster's models as checkboxes, keeping what was ticked. */
export function updateKeyModels(models) {
  const container = $('key-models');
  const ids = models.map((model) => model.id).sort();
  if (ids.join('\n') === container.dataset.ids) return;
  container.dataset.ids = ids.join('\n');
  container.replaceChildren(...ids.map((id) => h('label', { class: 'check' },
    h('input', { type: 'checkbox', value: id, checked: ticked.has(id) }), id)));
  if (!ids.length) container.append(h('span', { class: 'muted small' }, 'no model in the cluster yet'));
}

/** Clear the shown secret from the page: it cannot be shown again. */
export function forgetSecret() {
  $('key-secret').value = '';
  $('key-result').hidden = true;
}

/** The table of keys; `nodes` names the peers that signed them. */
export function keysTable(keys, nodes) {
  const names = new Map(nodes.map((node) => [node.peer_id, node.name]));
  const now = Date.now() / 1000;
  const sorted = keys
    .map((key) => ({ key, state: keyState(key, now) }))
    .sort((a, b) => STATE_ORDER[a.state] - STATE_ORDER[b.state] || a.key.name.localeCompare(b.key.name));
  const numeric = new Set([5, 6, 7]);
  return h('table', { class: 'keys' },
    h('thead', null, h('tr', null, ['Key', 'Models', 'Limits', 'Expires', 'State', 'Requests', 'Tokens', 'Last minute', '']
      .map((title, index) => h('th', { class: numeric.has(index) ? 'num' : null }, title)))),
    h('tbody', null, sorted.map(({ key, state }) => keyRow(key, state, now, names))));
}

function keyRow(key, state, now, names) {
  const usage = key.usage || { requests: 0, prompt_tokens: 0, completion_tokens: 0 };
  const signer = names.get(key.signed_by) || fmt.shortPeerId(key.signed_by);
  const made = state === 'revoked'
    ? `revoked ${fmt.ago((now - key.revoked_at) * 1000)} by ${signer}`
    : `made ${fmt.ago((now - key.created_at) * 1000)} by ${signer}`;
  return h('tr', { 'data-key': key.name, 'data-name': key.name, class: state === 'active' ? null : 'dim' },
    h('td', { class: 'key' }, h('strong', null, key.name),
      h('div', { class: 'small muted', title: `signed by ${key.signed_by}` }, made)),
    h('td', null, key.models?.length
      ? h('span', { class: 'chips' }, key.models.map((model) => h('span', { class: 'chip' }, model)))
      : h('span', { class: 'muted' }, 'all')),
    h('td', { class: 'limits' }, limits(key)),
    h('td', { class: 'key' }, expiry(key, state, now)),
    h('td', null, h('span', { class: `pill state ${state}` }, state)),
    h('td', { class: 'num', title: hereTitle(key.usage_here) }, fmt.count(usage.requests)),
    h('td', { class: 'num', title: `${fmt.integer(usage.prompt_tokens)} prompt + ${fmt.integer(usage.completion_tokens)} completion` },
      fmt.count(usage.prompt_tokens + usage.completion_tokens)),
    h('td', { class: 'num minute' }, lastMinute(key, state)),
    h('td', null, state === 'active' ? revokeButton(key) : null));
}

/** Active, expired (by this browser's clock) or revoked. */
function keyState(key, now) {
  if (key.revoked_at !== null && key.revoked_at !== undefined) return 'revoked';
  if (key.expires_at !== null && key.expires_at !== undefined && key.expires_at <= now) return 'expired';
  return 'active';
}

function limits(key) {
  const parts = [];
  if (key.requests_per_minute !== null && key.requests_per_minute !== undefined) {
    parts.push(`${fmt.integer(key.requests_per_minute)} req/min`);
  }
  if (key.tokens_per_minute !== null && key.tokens_per_minute !== undefined) {
    parts.push(`${fmt.integer(key.tokens_per_minute)} tok/min`);
  }
  return parts.length ? parts.join(' · ') : h('span', { class: 'muted' }, 'none');
}

function expiry(key, state, now) {
  if (key.expires_at === null || key.expires_at === undefined) return h('span', { class: 'muted' }, 'never');
  const at = new Date(key.expires_at * 1000);
  const when = state === 'expired'
    ? `${fmt.ago((now - key.expires_at) * 1000)}`
    : `in ${fmt.duration(key.expires_at - now)}`;
  return h('span', { title: at.toLocaleString() }, when);
}

/** Requests and tokens in the last minute; for a key in use, a bar against its nearer limit. */
function lastMinute(key, state) {
  const requests = key.minute_requests ?? 0;
  const tokens = key.minute_tokens ?? 0;
  const fractions = [];
  if (key.requests_per_minute) fractions.push(requests / key.requests_per_minute);
  if (key.tokens_per_minute) fractions.push(tokens / key.tokens_per_minute);
  const text = `${fmt.count(requests)} req · ${fmt.count(tokens)} tok`;
  if (!fractions.length || state !== 'active') return text;
  const fraction = Math.max(...fractions);
  return h('div', { class: 'minute-use' }, h('span', null, text), bar(fraction, `${fmt.percent(fraction * 100)} of its limit`));
}

/** `through this node: smollm2 3 requests, 120 tokens`, for a hover title. */
function hereTitle(usageHere) {
  const entries = Object.entries(usageHere || {});
  if (!entries.length) return 'none through this node';
  return `through this node: ${entries.map(([model, use]) =>
    `${model} ${fmt.plural(use.requests, 'request')}, ${fmt.integer(use.prompt_tokens + use.completion_tokens)} tokens`).join('; ')}`;
}

function revokeButton(key) {
  return h('button', {
    class: 'quiet small revoke-key', type: 'button', 'data-name': key.name,
    title: `Refuse ${key.name} on every node from now on`,
  }, 'Revoke');
}

function showForm(open) {
  $('key-create').hidden = !open;
  $('key-open').setAttribute('aria-expanded', String(open));
  if (open) $('key-name').focus();
  else forgetSecret();
}

/** A whole number typed in `id`, null when the field is empty; throws when it is not a number. */
function optionalNumber(id, what) {
  const field = $(id);
  if (field.validity.badInput) throw new Error(`${what} must be a number.`);
  const text = field.value.trim();
  return text === '' ? null : Number(text);
}

/** The ticked models and those typed in the "other models" field, without repeats. */
function chosenModels() {
  const typed = $('key-other-models').value.split(',').map((id) => id.trim()).filter(Boolean);
  const ticks = Array.from($('key-models').querySelectorAll('input[type="checkbox"]:checked'), (box) => box.value);
  return Array.from(new Set([...ticks, ...typed]));
}

async function createKey(refresh) {
  const error = $('key-error');
  error.hidden = true;
  forgetSecret();
  const spec = { name: $('key-name').value.trim() };
  try {
    const models = chosenModels();
    if (models.length) spec.models = models;
    // Out-of-range numbers go to the node as typed: its message says what is allowed.
    const requests = optionalNumber('key-rpm', 'Requests per minute');
    if (requests !== null) spec.requests_per_minute = requests;
    const tokens = optionalNumber('key-tpm', 'Tokens per minute');
    if (tokens !== null) spec.tokens_per_minute = tokens;
    const expiresIn = Number($('key-expiry').value);
    if (expiresIn > 0) spec.expires_in_seconds = expiresIn;
  } catch (failure) {
    error.textContent = failure.message;
    error.hidden = false;
    return;
  }
  $('key-submit').disabled = true;
  try {
    const key = await postJson('/api/keys', spec);
    showSecret(key);
    $('key-form').reset();
    ticked.clear();
    for (const box of $('key-models').querySelectorAll('input[type="checkbox"]')) box.checked = false;
    refresh();
  } catch (failure) {
    error.textContent = `Cannot create the key: ${failure.message || failure}`;
    error.hidden = false;
  } finally {
    $('key-submit').disabled = false;
  }
}

function showSecret(key) {
  $('key-secret').value = key.secret;
  $('key-result-name').textContent = key.name;
  $('key-copy').textContent = 'Copy';
  $('key-result').hidden = false;
  $('key-secret').select();
}

async function revoke(name, refresh) {
  if (!name || revoking.has(name)) return;
  if (!confirm(`Revoke the key ${name}?\n\nEvery node refuses it from now on. This cannot be undone, `
    + 'and its name cannot be used for a new key.')) return;
  revoking.add(name);
  try {
    const answer = await postJson(`/api/keys/${encodeURIComponent(name)}/revoke`, {});
    note(answer.newly_revoked ? `Revoked the key ${name}.` : `The key ${name} was already revoked.`, false);
    refresh();
  } catch (failure) {
    note(`Cannot revoke the key ${name}: ${failure.message || failure}`, true);
  } finally {
    revoking.delete(name);
  }
}

function note(text, isError) {
  const element = $('keys-note');
  element.textContent = text;
  element.className = `action-note${isError ? ' error' : ''}`;
  element.hidden = false;
  clearTimeout(noteTimer);
  noteTimer = setTimeout(() => { element.hidden = true; }, NOTE_MS);
}

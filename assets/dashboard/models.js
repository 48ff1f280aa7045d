// This node's own models, changed while it serves: the "Load a model" form (POST /api/models),
// the progress of loads and the reasons of failed ones (GET /api/models, polled with the rest),
// and an Unload button on each model this node hosts (DELETE /api/models/{id}). Buttons live in
// polled, patched rows, so their clicks are taken by one listener on the table.

import { ApiError, apiFetch, errorMessage, postJson } from './api.js';
import { h } from './dom.js';
import * as fmt from './format.js';

const $ = (id) => document.getElementById(id);
/** How long a note about a load or an unload stays up. */
const NOTE_MS = 10_000;

let noteTimer = null;

/** `refresh` is called after a change, to poll at once. */
export function initModels({ refresh }) {
  $('load-open').addEventListener('click', () => showForm($('load-model').hidden));
  $('load-close').addEventListener('click', () => showForm(false));
  $('load-form').addEventListener('submit', (event) => {
    event.preventDefault();
    load(refresh);
  });
  $('models-panel').addEventListener('click', (event) => {
    const button = event.target.closest('button.unload');
    if (button) unload(button.dataset.model, { force: event.shiftKey, ask: true }, refresh);
    const dismiss = event.target.closest('button.dismiss');
    if (dismiss) unload(dismiss.dataset.model, { force: false, ask: false }, refresh);
  });
}

/** The Unload button of a model this node hosts (`local`: its entry in /api/models). */
export function unloadButton(model, local) {
  if (!local || local.state !== 'ready') return null;
  return h('button', {
    class: 'quiet small unload', type: 'button', 'data-model': model.id,
    title: `Stop serving ${model.id} on this node once its answers finish (shift-click: end them now)`,
  }, 'Unload');
}

/** Rows for this node's models that are loading, unloading or failed: they are not in /v1/models. */
export function pendingModels(locals) {
  const pending = locals.filter((model) => model.state !== 'ready');
  if (!pending.length) return null;
  return h('ul', { class: 'pending-models' }, pending.map((model) => {
    if (model.state === 'loading') {
      const fraction = (model.percent || 0) / 100;
      return h('li', { 'data-key': model.id, class: 'pending' },
        h('strong', null, model.id), ` loading from ${model.source} `,
        h('progress', { max: 1, value: fraction, 'aria-label': `${model.id} loaded` }),
        ` ${Math.floor(model.percent || 0)}% of ${fmt.bytes(model.total_bytes || 0)}`);
    }
    if (model.state === 'unloading') {
      return h('li', { 'data-key': model.id, class: 'pending' },
        h('strong', null, model.id), ` unloading: ${model.active || 0} answer(s) still running`);
    }
    return h('li', { 'data-key': model.id, class: 'pending error-text' },
      h('strong', null, model.id), ` did not load: ${model.error}`,
      h('button', { class: 'quiet small dismiss', type: 'button', 'data-model': model.id }, 'Dismiss'));
  }));
}

function showForm(open) {
  $('load-model').hidden = !open;
  $('load-open').setAttribute('aria-expanded', String(open));
  if (open) $('load-id').focus();
}

async function load(refresh) {
  const id = $('load-id').value.trim();
  const path = $('load-path').value.trim();
  const error = $('load-error');
  error.hidden = true;
  $('load-submit').disabled = true;
  try {
    await postJson('/api/models', { id, path });
    note(`Loading ${id}…`, false);
    showForm(false);
    $('load-form').reset();
    refresh();
  } catch (failure) {
    error.textContent = failure.message || String(failure);
    error.hidden = false;
  } finally {
    $('load-submit').disabled = false;
  }
}

/** Unload a model (`ask`: after a confirmation), or forget a failed load. */
async function unload(id, { force, ask }, refresh) {
  if (!id) return;
  const question = force
    ? `Unload ${id} now?\n\nAnswers it is generating end with an error.`
    : `Unload ${id}?\n\nNew requests are refused at once; answers being generated finish first.`;
  if (ask && !confirm(question)) return;
  try {
    const response = await apiFetch(`/api/models/${encodeURIComponent(id)}${force ? '?force=true' : ''}`, {
      method: 'DELETE', headers: { 'Content-Type': 'application/json' }, signal: AbortSignal.timeout(15000),
    });
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    if (ask) note(`Unloading ${id}.`, false);
    refresh();
  } catch (failure) {
    note(`Cannot unload ${id}: ${failure.message || failure}`, true);
  }
}

function note(text, isError) {
  const element = $('models-note');
  element.textContent = text;
  element.className = `action-note${isError ? ' error' : ''}`;
  element.hidden = false;
  clearTimeout(noteTimer);
  noteTimer = setTimeout(() => { element.hidden = true; }, NOTE_MS);
}

// The chat playground: a conversation with any chat model of the cluster, streamed token by
// token from /v1/chat/completions (SSE), showing which node served each answer.

import { AuthRequired, apiFetch, errorMessage } from './api.js';
import { h } from './dom.js';
import { millis, plural, rate } from './format.js';

const $ = (id) => document.getElementById(id);

/** Finished turns, sent back with each new message: {role, content}. */
let history = [];
/** The answer being streamed, if any. */
let running = null;

export function initChat() {
  $('chat-form').addEventListener('submit', (event) => {
    event.preventDefault();
    if (running) running.abort();
    else send();
  });
  $('chat-input').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!running) send();
    }
  });
  $('chat-clear').addEventListener('click', () => {
    if (running) running.abort();
    history = [];
    $('chat-log').replaceChildren(h('p', { class: 'placeholder' }, 'Conversation cleared.'));
  });
  updateChatModels([]);
}

/** Offer the cluster's chat models, keeping the current choice while it still exists. */
export function updateChatModels(models) {
  const select = $('chat-model');
  const ids = models.filter((model) => model.llmesh?.kind === 'chat').map((model) => model.id).sort();
  const shown = Array.from(select.options).map((option) => option.value);
  if (ids.join('\n') !== shown.join('\n')) {
    const previous = select.value;
    select.replaceChildren(...ids.map((id) => h('option', { value: id }, id)));
    if (ids.includes(previous)) select.value = previous;
    if (!ids.length) select.append(h('option', { value: '', disabled: true }, 'no chat model in the cluster'));
  }
  select.disabled = !ids.length;
  $('chat-send').disabled = !ids.length && !running;
}

function numberInput(id, fallback) {
  const value = Number.parseFloat($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

async function send() {
  const model = $('chat-model').value;
  const input = $('chat-input');
  const text = input.value.trim();
  if (!model || !text) return;
  const system = $('chat-system').value.trim();
  const messages = [...(system ? [{ role: 'system', content: system }] : []), ...history, { role: 'user', content: text }];
  input.value = '';

  const log = $('chat-log');
  log.querySelector('.placeholder')?.remove();
  log.append(h('div', { class: 'message user' }, h('div', { class: 'content' }, text)));
  const content = h('div', { class: 'content streaming' });
  const meta = h('div', { class: 'meta' }, `${model} · waiting for a node…`);
  const bubble = h('div', { class: 'message assistant' }, content, meta);
  log.append(bubble);
  scrollToEnd(log, true);

  const controller = new AbortController();
  running = controller;
  setSending(true);
  const started = performance.now();
  let firstToken = null;
  let answer = '';
  let chunks = 0;
  let usage = null;
  let node = null;
  let failure = null;
  try {
    const response = await apiFetch('/v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({
        model,
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: numberInput('chat-temperature', 0.7),
        max_tokens: Math.max(1, Math.round(numberInput('chat-max-tokens', 256))),
      }),
      signal: controller.signal,
    });
    node = response.headers.get('x-llmesh-node');
    if (!response.ok) throw new Error(await errorMessage(response));
    meta.textContent = servedBy(model, node, 'generating…');
    for await (const data of serverSentData(response.body)) {
      if (data === '[DONE]') break;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        continue;
      }
      if (chunk.error) throw new Error(chunk.error.message || 'the generation failed');
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        firstToken ??= performance.now();
        answer += delta;
        chunks += 1;
        const follow = nearEnd(log);
        content.textContent = answer;
        scrollToEnd(log, follow);
      }
      if (chunk.usage) usage = chunk.usage;
    }
  } catch (error) {
    if (error.name === 'AbortError') failure = 'stopped';
    else if (error instanceof AuthRequired) failure = 'an API key is required: sign in and send again';
    else failure = error.message || String(error);
  } finally {
    running = null;
    setSending(false);
  }

  content.classList.remove('streaming');
  const finished = performance.now();
  const tokens = usage?.completion_tokens ?? chunks;
  const parts = [plural(tokens, 'token'), `first token ${millis(firstToken === null ? null : firstToken - started)}`];
  if (firstToken !== null && finished - firstToken > 0 && tokens > 1) {
    parts.push(`${rate(((tokens - 1) * 1000) / (finished - firstToken))} tok/s`);
  }
  meta.textContent = servedBy(model, node, parts.join(' · '));
  if (failure) {
    bubble.classList.add('failed');
    bubble.append(h('div', { class: 'error-text' }, failure === 'stopped' ? 'Stopped.' : `Error: ${failure}`));
  }
  if (!failure || failure === 'stopped') {
    history.push({ role: 'user', content: text }, { role: 'assistant', content: answer });
  }
  if (!answer) content.textContent = failure ? '' : '(empty answer)';
  scrollToEnd(log, true);
}

function servedBy(model, node, rest) {
  return `${model} · served by ${node || 'unknown node'} · ${rest}`;
}

function setSending(sending) {
  const button = $('chat-send');
  button.textContent = sending ? 'Stop' : 'Send';
  button.classList.toggle('danger', sending);
  button.disabled = !sending && !$('chat-model').value;
}

function nearEnd(element) {
  return element.scrollHeight - element.scrollTop - element.clientHeight < 40;
}

function scrollToEnd(element, really) {
  if (really) element.scrollTop = element.scrollHeight;
}

/** The `data:` payload of each server-sent event of a response body, as it arrives. */
async function* serverSentData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === '') {
          if (data.length) yield data.join('\n');
          data = [];
        } else if (line.startsWith('data:')) {
          data.push(line.slice(5).replace(/^ /, ''));
        }
      }
    }
    if (buffer.startsWith('data:')) data.push(buffer.slice(5).replace(/^ /, ''));
    if (data.length) yield data.join('\n');
  } finally {
    reader.cancel().catch(() => {});
  }
}

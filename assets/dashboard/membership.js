// Who may be in the cluster: inviting a machine (a connection key, its join command and its QR
// code) and revoking a node. The invite panel is static HTML shown and filled here; the Revoke
// buttons live on the polled node cards, so their clicks are taken by one listener on the grid
// (patched cards carry no listeners of their own).

import { postJson } from './api.js';
import { copyField, h } from './dom.js';

const $ = (id) => document.getElementById(id);

/** The only elements and attributes a QR code needs; anything else in the answer is dropped. */
const QR_ELEMENTS = new Set(['svg', 'g', 'rect', 'path']);
const QR_ATTRIBUTES = new Set(['xmlns', 'version', 'width', 'height', 'viewBox', 'shape-rendering',
  'x', 'y', 'd', 'fill']);
/** How long a note about a revocation stays up. */
const NOTE_MS = 10_000;

/** Peers whose revocation is under way, so a second click does not send it again. */
const revoking = new Set();
let noteTimer = null;

/** `refresh` is called after a change to the membership, to poll at once. */
export function initMembership({ refresh }) {
  $('invite-open').addEventListener('click', () => showInvite($('invite').hidden));
  $('invite-close').addEventListener('click', () => showInvite(false));
  $('invite-form').addEventListener('submit', (event) => {
    event.preventDefault();
    createInvitation();
  });
  $('invite-copy').addEventListener('click', () => copyField($('invite-key'), $('invite-copy')));
  $('nodes').addEventListener('click', (event) => {
    const button = event.target.closest('button.revoke');
    if (button) revoke(button.dataset.peer, button.dataset.name, refresh);
  });
}

/** The card's Revoke button, for every node but the one answering this page. */
export function revokeButton(node) {
  if (node.this_node) return null;
  return h('button', {
    class: 'quiet small revoke', type: 'button', 'data-peer': node.peer_id, 'data-name': node.name,
    title: `Close ${node.name}'s connections and refuse it from now on`,
  }, 'Revoke');
}

function showInvite(open) {
  $('invite').hidden = !open;
  $('invite-open').setAttribute('aria-expanded', String(open));
  if (open) $('invite-uses').focus();
}

async function createInvitation() {
  const uses = Number($('invite-uses').value);
  const hours = Number($('invite-hours').value);
  const error = $('invite-error');
  error.hidden = true;
  $('invite-create').disabled = true;
  try {
    // Out-of-range numbers go to the node as typed: its message says what is allowed.
    const invitation = await postJson('/api/invitations', { uses, valid_hours: hours });
    showInvitation(invitation);
  } catch (failure) {
    error.textContent = `Cannot create a key: ${failure.message}`;
    error.hidden = false;
  } finally {
    $('invite-create').disabled = false;
  }
}

function showInvitation(invitation) {
  $('invite-key').value = invitation.key;
  const expires = new Date(invitation.expires_at * 1000);
  const uses = invitation.uses === 1 ? 'once' : `${invitation.uses} times`;
  $('invite-expiry').textContent = `Can be used ${uses}, until ${expires.toLocaleString()}.`;
  $('invite-command').textContent = `llmesh serve --join '${invitation.key}'`;
  const code = invitation.qr_svg ? qrCode(invitation.qr_svg) : null;
  $('invite-qr').replaceChildren(code || h('p', { class: 'small muted' }, 'No QR code for this key.'));
  $('invite-copy').textContent = 'Copy';
  $('invite-result').hidden = false;
}

/**
 * The node's SVG as an element of this page. The policy forbids inline styles and scripts, and
 * the markup is never assigned to innerHTML: it is parsed as SVG, reduced to shapes, and imported.
 */
function qrCode(markup) {
  const parsed = new DOMParser().parseFromString(markup, 'image/svg+xml');
  const root = parsed.documentElement;
  if (root.localName !== 'svg' || parsed.getElementsByTagName('parsererror').length) return null;
  for (const element of [root, ...root.querySelectorAll('*')]) {
    if (!QR_ELEMENTS.has(element.localName)) {
      element.remove();
      continue;
    }
    for (const { name } of Array.from(element.attributes)) {
      if (!QR_ATTRIBUTES.has(name)) element.removeAttribute(name);
    }
  }
  root.setAttribute('class', 'qr-code');
  root.setAttribute('aria-hidden', 'true');
  return document.importNode(root, true);
}

async function revoke(peerId, name, refresh) {
  if (!peerId || revoking.has(peerId)) return;
  if (!confirm(`Revoke ${name}?\n\nIts connections are closed and every node refuses it from now on. `
    + 'It can only come back with a new connection key.')) return;
  revoking.add(peerId);
  try {
    const answer = await postJson(`/api/nodes/${encodeURIComponent(peerId)}/revoke`, {});
    note(answer.newly_revoked ? `Revoked ${name}.` : `${name} was already revoked.`, false);
    refresh();
  } catch (failure) {
    note(`Cannot revoke ${name}: ${failure.message || failure}`, true);
  } finally {
    revoking.delete(peerId);
  }
}

function note(text, isError) {
  const element = $('membership-note');
  element.textContent = text;
  element.className = `action-note${isError ? ' error' : ''}`;
  element.hidden = false;
  clearTimeout(noteTimer);
  noteTimer = setTimeout(() => { element.hidden = true; }, NOTE_MS);
}

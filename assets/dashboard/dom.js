// Building and updating the page without a framework. Sections are rebuilt from data on every
// poll and then patched into the live page (`patch`), so hover titles, text selection, focus and
// open <details> survive the 2-second refresh. Only attributes and text are patched: rebuilt
// sections carry no event listeners.

const SVG_NS = 'http://www.w3.org/2000/svg';

/** An HTML element: `h('td', {class: 'num'}, 'text', child, [more])`. */
export function h(tag, props, ...children) {
  return fill(document.createElement(tag), props, children);
}

/** An SVG element, same shape as `h`. */
export function svg(tag, props, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), props, children);
}

function fill(element, props, children) {
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      element.addEventListener(name.slice(2), value);
    } else {
      element.setAttribute(name, value === true ? '' : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

/** Make `container`'s children match `children`, reusing the nodes already there. */
export function patch(container, ...children) {
  const fresh = fill(container.cloneNode(false), null, children);
  morph(container, fresh);
}

function morph(live, fresh) {
  syncAttributes(live, fresh);
  const liveChildren = Array.from(live.childNodes);
  const freshChildren = Array.from(fresh.childNodes);
  freshChildren.forEach((next, index) => {
    const current = liveChildren[index];
    if (!current) {
      live.appendChild(next);
    } else if (!sameKind(current, next)) {
      live.replaceChild(next, current);
    } else if (next.nodeType === Node.ELEMENT_NODE) {
      morph(current, next);
    } else if (current.nodeValue !== next.nodeValue) {
      current.nodeValue = next.nodeValue;
    }
  });
  for (const extra of liveChildren.slice(freshChildren.length)) extra.remove();
}

function sameKind(a, b) {
  if (a.nodeType !== b.nodeType || a.nodeName !== b.nodeName) return false;
  return a.nodeType !== Node.ELEMENT_NODE || a.getAttribute('data-key') === b.getAttribute('data-key');
}

function syncAttributes(live, fresh) {
  for (const { name } of Array.from(live.attributes)) {
    // A <details> the user opened stays open.
    const userState = name === 'open' && live.nodeName === 'DETAILS';
    if (!fresh.hasAttribute(name) && !userState) live.removeAttribute(name);
  }
  for (const { name, value } of Array.from(fresh.attributes)) {
    if (live.getAttribute(name) !== value) live.setAttribute(name, value);
  }
}

/**
 * A horizontal bar for a fraction in [0, 1], drawn in SVG so that no inline style is needed
 * (the page's content security policy forbids them).
 */
export function bar(fraction, label) {
  const value = Math.max(0, Math.min(1, Number.isFinite(fraction) ? fraction : 0));
  const level = value >= 0.9 ? 'high' : value >= 0.7 ? 'warm' : 'ok';
  return svg('svg', { class: `bar ${level}`, viewBox: '0 0 100 6', preserveAspectRatio: 'none', role: 'img', 'aria-label': label },
    svg('rect', { class: 'track', width: 100, height: 6, rx: 3 }),
    svg('rect', { class: 'fill', width: (value * 100).toFixed(1), height: 6, rx: 3 }));
}

/**
 * A sparkline of `points` ({t, v}, t in ms) over at most the `windowMs` before `now`, scaled to
 * its own peak; `title` is shown on hover.
 */
export function sparkline(points, { now, windowMs, width = 72, height = 22, title = '' }) {
  const pad = 2;
  const peak = Math.max(0, ...points.map((point) => point.v));
  // Until a whole window has been seen, stretch what there is across the width.
  const span = points.length ? Math.min(windowMs, Math.max(now - points[0].t, 1)) : windowMs;
  const x = (t) => (width * (1 - (now - t) / span)).toFixed(1);
  const y = (v) => (peak > 0 ? height - pad - (v / peak) * (height - 2 * pad) : height - pad).toFixed(1);
  const children = [svg('title', null, title)];
  if (points.length >= 2) {
    const line = points.map((point) => `${x(point.t)},${y(point.v)}`).join(' ');
    const first = points[0];
    const last = points[points.length - 1];
    children.push(
      svg('path', { class: 'area', d: `M${x(first.t)},${height} L${line.replaceAll(' ', ' L')} L${x(last.t)},${height} Z` }),
      svg('polyline', { class: 'line', points: line }),
      svg('circle', { class: 'dot', cx: x(last.t), cy: y(last.v), r: 2 }));
  } else {
    children.push(svg('line', { class: 'baseline', x1: 0, x2: width, y1: height - pad, y2: height - pad }));
  }
  return svg('svg', { class: 'spark', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title }, children);
}

/** Copy a text field's value, saying on `button` whether it worked. */
export async function copyField(field, button) {
  let copied = false;
  try {
    await navigator.clipboard.writeText(field.value);
    copied = true;
  } catch {
    // No clipboard API outside secure contexts (a plain-HTTP LAN address): select and copy.
    field.select();
    copied = document.execCommand('copy');
  }
  button.textContent = copied ? 'Copied' : 'Select and copy';
}

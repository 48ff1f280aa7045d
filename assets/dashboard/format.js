// How numbers, sizes, durations and ids are written on the page.

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

function unitOf(bytes) {
  let unit = 0;
  while (bytes >= 1024 ** (unit + 1) && unit < UNITS.length - 1) unit += 1;
  return unit;
}

function inUnit(bytes, unit) {
  const value = bytes / 1024 ** unit;
  return unit > 0 && value < 10 ? value.toFixed(1) : Math.round(value).toString();
}

/** `15.6 GiB` */
export function bytes(value) {
  if (value === null || value === undefined) return '—';
  const unit = unitOf(value);
  return `${inUnit(value, unit)} ${UNITS[unit]}`;
}

/** `2.1 / 15.6 GiB`: both in the unit of the total. */
export function usedOf(used, total) {
  if (!total) return bytes(used);
  const unit = unitOf(total);
  return `${inUnit(used ?? 0, unit)} / ${inUnit(total, unit)} ${UNITS[unit]}`;
}

/** `340 ms`, `1.25 s`; a dash when there is no sample yet. */
export function millis(value) {
  if (value === null || value === undefined) return '—';
  if (value < 1000) return `${Math.round(value)} ms`;
  return `${(value / 1000).toFixed(value < 10000 ? 2 : 1)} s`;
}

/** `just now`, `12 s ago`, `3 min ago` */
export function ago(ms) {
  if (ms < 1500) return 'just now';
  if (ms < 60000) return `${Math.round(ms / 1000)} s ago`;
  if (ms < 3600000) return `${Math.round(ms / 60000)} min ago`;
  return `${Math.round(ms / 3600000)} h ago`;
}

/** `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h` */
export function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const INTEGER = new Intl.NumberFormat('en-US');
const COMPACT = new Intl.NumberFormat('en-US', { notation: 'compact', maximumFractionDigits: 1 });

/** `131,072` */
export function integer(value) {
  return value === null || value === undefined ? '—' : INTEGER.format(value);
}

/** `1,234`, and `12.3K` from 100,000 up. */
export function count(value) {
  if (value === null || value === undefined) return '—';
  return value >= 100000 ? COMPACT.format(value) : INTEGER.format(value);
}

/** A rate per second: `0`, `0.4`, `12.5`, `230`. */
export function rate(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '—';
  if (value === 0) return '0';
  return value < 100 ? value.toFixed(1) : Math.round(value).toString();
}

export function percent(value) {
  if (value === null || value === undefined) return '—';
  return `${Math.round(value)}%`;
}

/** `12D3KooW…x8Yz3a`: enough to tell peers apart; the full id goes in a hover title. */
export function shortPeerId(id) {
  return id && id.length > 18 ? `${id.slice(0, 8)}…${id.slice(-6)}` : id || '—';
}

export function plural(n, word, many = `${word}s`) {
  return `${n} ${n === 1 ? word : many}`;
}

export function clock(date) {
  return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

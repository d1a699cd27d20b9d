// DOM building without innerHTML (every value is set as text), and the
// formats the views share.

// h('td', {class: 'n', title: 'x', on: {click: fn}}, child, ...): children are
// nodes, strings (text), numbers, arrays of those, or null/false (skipped).
export function h(tag, props, ...children) {
  const el = tag.startsWith('svg:')
    ? document.createElementNS('http://www.w3.org/2000/svg', tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === 'class') el.setAttribute('class', v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k in el && !tag.startsWith('svg:')) el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// Replaces el's children.
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function $(sel, root = document) {
  return root.querySelector(sel);
}

const intFmt = new Intl.NumberFormat('en-US', {maximumFractionDigits: 0});
const rateFmt = new Intl.NumberFormat('en-US', {maximumFractionDigits: 2, minimumFractionDigits: 2});

export const fmt = {
  int: (n) => (n === null || n === undefined || Number.isNaN(n) ? '—' : intFmt.format(n)),
  rate: (n) => (n === null || n === undefined || !Number.isFinite(n) ? '—' : rateFmt.format(n)),
  pct: (x) => (x === null || x === undefined || !Number.isFinite(x) ? '—' : `${(x * 100).toFixed(1)} %`),
  // seconds (a latency) as ms or s
  secs(s) {
    if (s === null || s === undefined || !Number.isFinite(s)) return '—';
    if (s < 0.001) return `${(s * 1000).toFixed(2)} ms`;
    if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`;
    return fmt.dur(s * 1000);
  },
  // milliseconds as a readable duration
  dur(ms) {
    if (ms === null || ms === undefined || !Number.isFinite(ms)) return '—';
    const neg = ms < 0;
    ms = Math.abs(ms);
    let out;
    if (ms < 1000) out = `${Math.round(ms)} ms`;
    else if (ms < 60e3) out = `${(ms / 1000).toFixed(ms < 10e3 ? 2 : 1)} s`;
    else if (ms < 3600e3) out = `${Math.floor(ms / 60e3)} min ${Math.floor((ms % 60e3) / 1000)} s`;
    else if (ms < 86400e3) out = `${Math.floor(ms / 3600e3)} h ${Math.floor((ms % 3600e3) / 60e3)} min`;
    else out = `${Math.floor(ms / 86400e3)} d ${Math.floor((ms % 86400e3) / 3600e3)} h`;
    return neg ? `−${out}` : out;
  },
  // a signed millisecond delta, exact
  delta: (ms) => `+${intFmt.format(Math.max(0, Math.round(ms)))} ms`,
  time(ms) {
    if (!ms) return '—';
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, '0')}`;
  },
  datetime(ms) {
    if (!ms) return '—';
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  },
  age: (ms) => (ms ? fmt.dur(Date.now() - ms) : '—'),
};

function pad(n) {
  return String(n).padStart(2, '0');
}

// A status word's colour class.
export function tone(word) {
  switch (word) {
    case 'accepted': case 'completed': case 'delivered': case 'acked': case 'closed':
    case 'confirmed': case 'ready': return 'ok';
    case 'error': case 'rejected': case 'failed': case 'dead': case 'open-circuit':
    case 'unacknowledged': case 'overridden': return 'bad';
    case 'filtered': case 'expired': case 'retried': case 'half-open': case 'open': return 'warn';
    case 'running': case 'pending': return 'info';
    default: return '';
  }
}

export function badge(word, cls) {
  return h('span', {class: `badge ${cls ?? tone(word)}`}, word);
}

// A small line chart of values (null gaps drawn as 0).
export function sparkline(values, width = 120, height = 22) {
  const svg = h('svg:svg', {class: 'spark', width, height, viewBox: `0 0 ${width} ${height}`, 'aria-hidden': 'true'});
  svg.append(h('svg:line', {class: 'base', x1: 0, y1: height - 1, x2: width, y2: height - 1}));
  const v = values.map((x) => (Number.isFinite(x) ? x : 0));
  if (v.length >= 2) {
    const max = Math.max(...v, 1e-9);
    const step = width / (v.length - 1);
    const pts = v.map((x, i) => `${(i * step).toFixed(1)},${(height - 2 - (x / max) * (height - 4)).toFixed(1)}`);
    svg.append(h('svg:polyline', {points: pts.join(' ')}));
  }
  return svg;
}

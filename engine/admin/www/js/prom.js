// The Prometheus text format (0.0.4) as the engine writes it, and what the
// views compute from it: counter rates between two scrapes and quantiles
// estimated from histogram buckets (as PromQL's histogram_quantile does).

// parse(text): [{name, labels: {k: v}, value}] of every sample line.
export function parse(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const s = parseLine(line.trim());
    if (s) out.push(s);
  }
  return out;
}

function parseLine(line) {
  let i = 0;
  while (i < line.length && /[A-Za-z0-9_:]/.test(line[i])) i++;
  const name = line.slice(0, i);
  if (!name) return null;
  const labels = {};
  if (line[i] === '{') {
    i++;
    for (;;) {
      while (line[i] === ' ' || line[i] === ',') i++;
      if (i >= line.length) return null;
      if (line[i] === '}') {
        i++;
        break;
      }
      const eq = line.indexOf('=', i);
      if (eq < 0 || line[eq + 1] !== '"') return null;
      const key = line.slice(i, eq).trim();
      let v = '';
      i = eq + 2;
      while (i < line.length && line[i] !== '"') {
        if (line[i] === '\\' && i + 1 < line.length) {
          v += line[i + 1] === 'n' ? '\n' : line[i + 1];
          i += 2;
        } else {
          v += line[i++];
        }
      }
      if (line[i] !== '"') return null;
      i++;
      labels[key] = v;
    }
  }
  const fields = line.slice(i).trim().split(/\s+/);
  const value = number(fields[0]);
  return Number.isNaN(value) && fields[0] !== 'NaN' ? null : {name, labels, value};
}

function number(s) {
  if (s === '+Inf' || s === 'Inf') return Infinity;
  if (s === '-Inf') return -Infinity;
  return s === undefined || s === '' ? NaN : Number(s);
}

export function key(name, labels) {
  return `${name}{${Object.keys(labels).sort().map((k) => `${k}=${JSON.stringify(labels[k])}`).join(',')}}`;
}

function matches(labels, want) {
  for (const [k, v] of Object.entries(want)) if (labels[k] !== v) return false;
  return true;
}

// One scrape: its samples and when it was taken (ms).
export class Snapshot {
  constructor(samples, at) {
    this.at = at;
    this.samples = samples;
    this.byKey = new Map(samples.map((s) => [key(s.name, s.labels), s.value]));
  }
  static fromText(text, at) {
    return new Snapshot(parse(text), at);
  }
  // The value of the sample with exactly these labels, or null.
  get(name, labels = {}) {
    const v = this.byKey.get(key(name, labels));
    return v === undefined ? null : v;
  }
  // Samples called name whose labels include want.
  select(name, want = {}) {
    return this.samples.filter((s) => s.name === name && matches(s.labels, want));
  }
  // The distinct values of label among the samples called name.
  values(name, label) {
    return [...new Set(this.select(name).map((s) => s.labels[label]).filter((v) => v !== undefined))];
  }
  // The cumulative buckets of histogram base for the series with labels
  // want: [{le, count}] by le, +Inf last.
  buckets(base, want = {}) {
    return this.select(`${base}_bucket`, want)
      .map((s) => ({le: number(s.labels.le), count: s.value}))
      .sort((a, b) => a.le - b.le);
  }
}

// Per-second rate of a counter between two snapshots; null without an
// older one, across a restart (the value went down) or with no time between.
export function rate(now, old, name, labels) {
  if (!old) return null;
  const a = old.get(name, labels);
  const b = now.get(name, labels);
  const dt = (now.at - old.at) / 1000;
  if (a === null || b === null || dt <= 0 || b < a) return null;
  return (b - a) / dt;
}

// Buckets of now minus the same buckets of old (the observations in
// between); null when a bucket went down (a restart) or is missing.
export function bucketDelta(now, old) {
  if (!old || old.length !== now.length) return null;
  const out = [];
  for (let i = 0; i < now.length; i++) {
    if (old[i].le !== now[i].le || now[i].count < old[i].count) return null;
    out.push({le: now[i].le, count: now[i].count - old[i].count});
  }
  return out;
}

// The q-quantile (0..1) estimated from cumulative buckets by linear
// interpolation inside the bucket that holds it; null without
// observations. A quantile in the +Inf bucket is the highest finite bound.
export function quantile(q, buckets) {
  if (!buckets || !buckets.length) return null;
  const total = buckets[buckets.length - 1].count;
  if (!(total > 0)) return null;
  const rank = q * total;
  for (let i = 0; i < buckets.length; i++) {
    if (buckets[i].count < rank) continue;
    const upper = buckets[i].le;
    const lower = i > 0 ? buckets[i - 1].le : 0;
    const below = i > 0 ? buckets[i - 1].count : 0;
    if (upper === Infinity) return i > 0 ? lower : null;
    const inside = buckets[i].count - below;
    if (inside <= 0) return upper;
    return lower + ((upper - lower) * (rank - below)) / inside;
  }
  return null;
}

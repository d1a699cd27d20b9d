// The views drawn from /metrics alone: channels (counters, rates, ACK
// latency) and destinations (queues, circuit breakers).
import {$, h, fill, fmt, badge, sparkline} from './dom.js';
import {rate, quantile, bucketDelta} from './prom.js';

const WINDOW_MS = 60 * 1000;
const MSG = 'radrelay_channel_messages_total';
const ACK = 'radrelay_ack_latency_seconds';

function num(v, cls = '') {
  return h('td', {class: `${cls} ${v === 0 ? 'zero' : ''}`}, fmt.int(v));
}

function rateCell(v, bad = false) {
  return h('td', {class: bad && v > 0 ? 'bad' : v ? '' : 'zero'}, fmt.rate(v));
}

// The ACK latency quantiles of a channel: over the window when it saw
// messages, else since the engine started.
function ackQuantiles(now, old, channel) {
  const all = now.buckets(ACK, {channel});
  if (!all.length) return null;
  const recent = bucketDelta(all, old ? old.buckets(ACK, {channel}) : null);
  const useRecent = recent && recent[recent.length - 1].count > 0;
  const b = useRecent ? recent : all;
  return {p50: quantile(0.5, b), p99: quantile(0.99, b), recent: useRecent};
}

// Received per second between consecutive scrapes (sparkline points).
function receivedSeries(history, channel) {
  const out = [];
  for (let i = 1; i < history.length; i++)
    out.push(rate(history[i], history[i - 1], MSG, {channel, outcome: 'received'}));
  return out;
}

function card(label, value, cls = '') {
  return h('div', {class: `card ${cls}`}, h('div', {class: 'label'}, label), h('div', {class: 'value'}, value));
}

export const channels = {
  show(ctx) {
    this.onMetrics(ctx, true);
  },
  onMetrics(ctx, visible) {
    if (!visible) return;
    const now = ctx.latest;
    const tbody = $('#channels-table tbody');
    if (!now) {
      fill(tbody, h('tr', {}, h('td', {class: 'empty', colSpan: 13}, 'Waiting for the first figures…')));
      return;
    }
    const old = ctx.since(WINDOW_MS);
    const names = now.values(MSG, 'channel').sort();
    const get = (channel, outcome) => now.get(MSG, {channel, outcome}) ?? 0;
    const r = (channel, outcome) => rate(now, old, MSG, {channel, outcome});
    const rows = names.map((c) => {
      const q = ackQuantiles(now, old, c);
      const note = q && !q.recent ? ' (since start)' : '';
      return h('tr', {dataset: {channel: c}},
        h('td', {class: 'text'}, h('strong', {}, c)),
        num(get(c, 'received')),
        num(get(c, 'accepted')),
        num(get(c, 'errored'), get(c, 'errored') ? 'bad' : ''),
        num(get(c, 'rejected'), get(c, 'rejected') ? 'warn' : ''),
        num(get(c, 'duplicate')),
        num(get(c, 'filtered')),
        rateCell(r(c, 'received')),
        rateCell(r(c, 'accepted')),
        rateCell(r(c, 'errored'), true),
        h('td', {title: `p50${note}`}, q ? fmt.secs(q.p50) : '—'),
        h('td', {title: `p99${note}`}, q ? fmt.secs(q.p99) : '—'),
        h('td', {class: 'text'}, sparkline(receivedSeries(ctx.history, c))));
    });
    fill(tbody, rows.length ? rows : h('tr', {}, h('td', {class: 'empty', colSpan: 13}, 'No channels.')));

    const sum = (outcome) => names.reduce((a, c) => a + get(c, outcome), 0);
    const sumRate = (outcome) => {
      const v = names.map((c) => r(c, outcome));
      return v.some((x) => x === null) ? null : v.reduce((a, b) => a + b, 0);
    };
    const errors = sum('errored') + sum('rejected') + sum('script_error');
    const depth = (state) => now.select('radrelay_queue_depth', {state}).reduce((a, s) => a + s.value, 0);
    const open = now.get('radrelay_notifications', {state: 'open'}) ?? 0;
    const unacked = now.get('radrelay_notifications', {state: 'unacknowledged'}) ?? 0;
    const circuits = now.select('radrelay_destination_circuit_open').filter((s) => s.value > 0).length;
    fill($('#cards'),
      card('Messages received', fmt.int(sum('received'))),
      card('Received / s', fmt.rate(sumRate('received'))),
      card('Errored or rejected', fmt.int(errors), errors ? 'bad' : ''),
      card('Queued deliveries', fmt.int(depth('pending')), depth('pending') ? 'warn' : ''),
      card('Dead letters', fmt.int(depth('dead')), depth('dead') ? 'bad' : ''),
      card('Open circuits', fmt.int(circuits), circuits ? 'bad' : 'ok'),
      card('Open notifications', fmt.int(open + unacked), open + unacked ? 'bad' : 'ok'));
  },
};

function circuit(v) {
  if (v === null) return h('span', {class: 'muted'}, '—');
  if (v >= 1) return badge('open', 'bad');
  if (v > 0) return badge('half-open', 'warn');
  return badge('closed', 'ok');
}

export const queues = {
  show(ctx) {
    this.onMetrics(ctx, true);
  },
  onMetrics(ctx, visible) {
    if (!visible) return;
    const now = ctx.latest;
    const tbody = $('#queues-table tbody');
    if (!now) {
      fill(tbody, h('tr', {}, h('td', {class: 'empty', colSpan: 10}, 'Waiting for the first figures…')));
      return;
    }
    const old = ctx.since(WINDOW_MS);
    const names = [...new Set([
      ...now.values('radrelay_queue_depth', 'destination'),
      ...now.values('radrelay_deliveries_total', 'destination'),
      ...now.values('radrelay_destination_circuit_open', 'destination'),
    ])].sort();
    const rows = names.map((d) => {
      const cs = now.select('radrelay_destination_circuit_open', {destination: d})[0];
      const pending = now.get('radrelay_queue_depth', {destination: d, state: 'pending'}) ?? 0;
      const dead = now.get('radrelay_queue_depth', {destination: d, state: 'dead'}) ?? 0;
      const age = now.get('radrelay_queue_oldest_age_seconds', {destination: d});
      const del = (outcome) => now.get('radrelay_deliveries_total', {destination: d, outcome});
      return h('tr', {dataset: {destination: d}},
        h('td', {class: 'text'}, h('strong', {}, d)),
        h('td', {class: 'text'}, cs?.labels.kind ?? '—'),
        h('td', {class: 'text'}, circuit(cs ? cs.value : null)),
        num(pending, pending ? 'warn' : ''),
        num(dead, dead ? 'bad' : ''),
        h('td', {class: age > 300 ? 'bad' : age > 60 ? 'warn' : age ? '' : 'zero'}, age ? fmt.dur(age * 1000) : '—'),
        num(del('delivered')),
        num(del('retried'), del('retried') ? 'warn' : ''),
        num(del('dead'), del('dead') ? 'bad' : ''),
        rateCell(rate(now, old, 'radrelay_deliveries_total', {destination: d, outcome: 'delivered'})));
    });
    fill(tbody, rows.length ? rows : h('tr', {}, h('td', {class: 'empty', colSpan: 10}, 'No destinations.')));
  },
};

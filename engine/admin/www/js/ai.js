// AI endpoints and models: GET /api/ai/summary (jobs, critical rate, the
// radiologists' agreement, turnaround percentiles) and, live from
// /metrics, jobs per state and the turnaround histogram per endpoint.
import {api, query} from './api.js';
import {$, h, fill, fmt} from './dom.js';
import {quantile} from './prom.js';

const STATES = ['completed', 'failed', 'rejected', 'expired', 'running'];
const REFRESH_MS = 30000;
let timer = null;

export function init(ctx) {
  $('#ai-window').addEventListener('change', () => load(ctx));
}

export function show(ctx) {
  load(ctx);
  onMetrics(ctx, true);
}

export function hide() {
  clearTimeout(timer);
}

async function load(ctx) {
  clearTimeout(timer);
  const days = $('#ai-window').value;
  const since = days ? Date.now() - Number(days) * 86400e3 : null;
  const tbody = $('#ai-table tbody');
  try {
    const res = await api(`/api/ai/summary${query({since})}`);
    const rows = res.endpoints.map(row);
    fill(tbody, rows.length ? rows : h('tr', {}, h('td', {class: 'empty', colSpan: 9}, 'No AI jobs in this period.')));
  } catch (e) {
    fill(tbody, h('tr', {}, h('td', {class: 'empty', colSpan: 9}, `The summary could not be read: ${e.message}`)));
  }
  timer = setTimeout(() => load(ctx), REFRESH_MS);
}

function stateBar(g) {
  const total = STATES.reduce((a, s) => a + g[s], 0) || 1;
  const bar = h('div', {class: 'bar', title: STATES.map((s) => `${s} ${g[s]}`).join(', ')});
  for (const s of STATES) {
    if (!g[s]) continue;
    const seg = h('span', {class: s});
    seg.style.width = `${(100 * g[s]) / total}%`;
    bar.append(seg);
  }
  const legend = STATES.filter((s) => g[s]).map((s) => `${fmt.int(g[s])} ${s}`).join(' · ');
  return h('div', {class: 'states'}, bar, h('span', {class: 'legend'}, legend || 'no jobs'));
}

function pctl(t) {
  if (!t || !t.n) return h('td', {class: 'zero'}, '—');
  return h('td', {title: `p90 ${fmt.dur(t.p90)}, ${t.n} jobs`}, fmt.dur(t.p50));
}

function row(g) {
  const model = g.model_name ? `${g.model_name}${g.model_version ? ` ${g.model_version}` : ''}` : 'no result yet';
  const verdicts = g.confirmed + g.overridden;
  return h('tr', {dataset: {endpoint: g.endpoint}},
    h('td', {class: 'text'}, h('strong', {}, g.endpoint), g.modes.length ? h('div', {class: 'legend'}, g.modes.join(', ')) : null),
    h('td', {class: `text ${g.model_name ? '' : 'muted'}`}, model),
    h('td', {class: 'text'}, stateBar(g)),
    h('td', {}, fmt.int(g.studies)),
    h('td', {class: g.critical ? 'warn' : '', title: `${g.critical} of ${g.completed} completed jobs critical`},
      g.completed ? `${fmt.pct(g.critical_rate)} (${fmt.int(g.critical)})` : '—'),
    h('td', {title: `${g.confirmed} confirmed, ${g.overridden} overridden of ${g.findings} findings`,
      class: g.agreement_rate !== null && g.agreement_rate < 0.8 ? 'bad' : ''},
    verdicts ? `${fmt.pct(g.agreement_rate)} (${g.confirmed}/${verdicts})` : '—'),
    pctl(g.turnaround_ms),
    pctl(g.arrival_to_result_ms),
    pctl(g.result_to_report_ms));
}

export function onMetrics(ctx, visible) {
  if (!visible) return;
  const now = ctx.latest;
  if (!now) return;
  const names = [...new Set([
    ...now.values('radrelay_ai_jobs', 'endpoint'),
    ...now.values('radrelay_ai_turnaround_seconds_count', 'endpoint'),
  ])].sort();
  const rows = names.map((e) => {
    const b = now.buckets('radrelay_ai_turnaround_seconds', {endpoint: e});
    const n = (state) => now.get('radrelay_ai_jobs', {endpoint: e, state}) ?? 0;
    return h('tr', {},
      h('td', {class: 'text'}, h('strong', {}, e)),
      ['running', 'completed', 'failed', 'rejected', 'expired'].map((s) =>
        h('td', {class: n(s) === 0 ? 'zero' : s === 'failed' || s === 'rejected' ? 'bad' : s === 'expired' ? 'warn' : ''}, fmt.int(n(s)))),
      h('td', {}, fmt.secs(quantile(0.5, b))),
      h('td', {}, fmt.secs(quantile(0.99, b))));
  });
  fill($('#ai-live tbody'), rows.length ? rows : h('tr', {}, h('td', {class: 'empty', colSpan: 8}, 'No AI endpoint has had a job.')));
}

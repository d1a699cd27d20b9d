// Message search (GET /api/messages), a message's detail with its raw
// HL7, ACK, deliveries and the timeline of its order or study
// (GET /api/messages/{id}). Search values go to the API's query string
// only: the page's own address holds at most a message id.
import {api, query} from './api.js';
import {$, h, fill, fmt, badge, tone} from './dom.js';

let pages = [null]; // the "before" of each page shown so far; the last is the current one
let next = null; // next_before of the current page
let criteria = {};
let openId = null;
let searched = false;
let rows = [];

export function init(ctx) {
  const form = $('#search');
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    criteria = readForm(form);
    pages = [null];
    search(ctx);
  });
  form.addEventListener('reset', () => {
    setTimeout(() => {
      criteria = readForm(form);
      pages = [null];
      search(ctx);
    });
  });
  form.addEventListener('keydown', (e) => {
    if (e.key === 'ArrowDown' && rows.length && !(e.target instanceof HTMLSelectElement)) {
      e.preventDefault();
      rows[0].focus();
    }
  });
  $('#page-older').addEventListener('click', () => {
    if (next === null) return;
    pages.push(next);
    search(ctx);
  });
  $('#page-newer').addEventListener('click', () => {
    if (pages.length < 2) return;
    pages.pop();
    search(ctx);
  });
}

export function show(ctx, arg) {
  if (!searched) {
    searched = true;
    criteria = readForm($('#search'));
    search(ctx);
  }
  const id = arg && /^\d+$/.test(arg) ? arg : null;
  if (id && id !== openId) openMessage(ctx, id);
  else if (!id && openId) closeDetail(ctx, false);
}

export function onMetrics(ctx) {
  // the channel list of the search form, from the channels /metrics knows
  const sel = $('#search select[name=channel]');
  const names = ctx.latest.values('radrelay_channel_messages_total', 'channel').sort();
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (names.join('\n') === have.join('\n')) return;
  const keep = sel.value;
  fill(sel, h('option', {value: ''}, 'any'), names.map((n) => h('option', {value: n}, n)));
  sel.value = keep;
}

export function focusSearch() {
  const input = $('#search input[name=mrn]');
  input.focus();
  input.select();
}

function readForm(form) {
  const f = new FormData(form);
  const out = {};
  for (const k of ['mrn', 'accession', 'study_uid', 'control_id', 'channel', 'status', 'type', 'limit']) {
    const v = String(f.get(k) ?? '').trim();
    if (v) out[k] = v;
  }
  for (const k of ['since', 'until']) {
    const v = String(f.get(k) ?? '');
    const t = v ? new Date(v).getTime() : NaN;
    if (Number.isFinite(t)) out[k] = String(t);
  }
  return out;
}

async function search(ctx) {
  const before = pages[pages.length - 1];
  const tbody = $('#results tbody');
  $('#results-count').textContent = 'Searching…';
  let res;
  try {
    res = await api(`/api/messages${query({...criteria, before})}`);
  } catch (e) {
    $('#results-count').textContent = '';
    fill(tbody, h('tr', {}, h('td', {class: 'empty', colSpan: 7}, `Search failed: ${e.message}`)));
    return;
  }
  ctx.banner(null);
  next = res.next_before ?? null;
  const page = pages.length;
  const n = res.messages.length;
  $('#results-count').textContent = n
    ? `${n} message${n === 1 ? '' : 's'}${page > 1 || next !== null ? `, page ${page}` : ''}, newest first`
    : 'No messages match.';
  $('#page-older').disabled = next === null;
  $('#page-newer').disabled = page < 2;
  rows = res.messages.map((m) => row(ctx, m));
  fill(tbody, rows.length ? rows : h('tr', {}, h('td', {class: 'empty', colSpan: 7}, 'No messages match.')));
  markOpen();
}

function row(ctx, m) {
  const open = () => ctx.navigate('messages', String(m.id));
  const tr = h('tr', {
    tabIndex: 0,
    dataset: {id: String(m.id)},
    on: {
      click: open,
      keydown(e) {
        if (e.key === 'Enter' || e.key === ' ') {
          e.preventDefault();
          open();
        } else if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
          e.preventDefault();
          const i = rows.indexOf(tr) + (e.key === 'ArrowDown' ? 1 : -1);
          if (i < 0) focusSearch();
          else rows[Math.min(i, rows.length - 1)].focus();
        }
      },
    },
  },
  h('td', {title: fmt.datetime(m.received_ms)}, shortTime(m.received_ms)),
  h('td', {}, m.channel),
  h('td', {class: 'mono'}, m.message_type ?? '—'),
  h('td', {class: 'mono ellipsis', title: m.control_id ?? ''}, m.control_id ?? '—'),
  h('td', {class: 'mono'}, m.mrn ?? '—'),
  h('td', {class: 'mono'}, m.accession ?? '—'),
  h('td', {}, badge(m.status)));
  return tr;
}

// Today's times without the date.
function shortTime(ms) {
  const full = fmt.datetime(ms);
  return full.slice(0, 10) === fmt.datetime(Date.now()).slice(0, 10) ? full.slice(11) : full.slice(5, 16);
}

function markOpen() {
  for (const tr of rows) tr.classList.toggle('sel', tr.dataset.id === openId);
}

export function closeDetail(ctx, navigate = true) {
  openId = null;
  $('#detail').hidden = true;
  fill($('#detail'));
  $('#messages-split').classList.remove('open');
  markOpen();
  if (navigate) ctx.navigate('messages');
}

async function openMessage(ctx, id) {
  openId = id;
  markOpen();
  const box = $('#detail');
  $('#messages-split').classList.add('open');
  box.hidden = false;
  fill(box, h('p', {class: 'muted'}, 'Loading…'));
  let m;
  try {
    m = await api(`/api/messages/${encodeURIComponent(id)}`);
  } catch (e) {
    if (openId === id) fill(box, header(ctx, `Message ${id}`), h('p', {class: 'error'}, e.message));
    return;
  }
  if (openId !== id) return;
  fill(box,
    header(ctx, `Message ${m.id}`, m),
    meta(m),
    h('h4', {}, 'Raw message', h('span', {class: 'muted'}, `${m.raw ? m.raw.length : 0} characters`)),
    hl7(m.raw),
    h('h4', {}, 'Timeline', m.timeline ? h('span', {class: 'muted'}, timelineKey(m.timeline)) : null),
    m.timeline ? timeline(ctx, m.timeline.events, m.id) : h('p', {class: 'muted'}, 'The message names no order or study.'),
    h('h4', {}, 'ACK'),
    m.ack ? hl7(m.ack) : h('p', {class: 'muted'}, 'No ACK was sent (not an MLLP message, or none expected).'),
    h('h4', {}, 'Deliveries'),
    deliveries(m.deliveries),
    m.queued.length ? [h('h4', {}, 'Still queued'), queued(m.queued)] : null);
  box.focus({preventScroll: true});
}

function header(ctx, title, m) {
  return h('header', {},
    h('h3', {}, title),
    m ? h('span', {class: 'mono'}, m.message_type ?? '') : null,
    m ? badge(m.status) : null,
    h('button', {type: 'button', class: 'ghost small close', title: 'Close (Esc)', on: {click: () => closeDetail(ctx)}}, 'Close'));
}

function meta(m) {
  const pairs = [
    ['Received', fmt.datetime(m.received_ms)], ['Channel', m.channel],
    ['From', [m.sending_app, m.sending_facility].filter(Boolean).join(' / ') || '—'], ['Peer', m.peer ?? '—'],
    ['Control ID', m.control_id ?? '—'], ['MRN', m.mrn ?? '—'],
    ['Accession', m.accession ?? '—'], ['Study UID', m.study_uid ?? '—'],
  ];
  if (m.error) pairs.push(['Error', m.error]);
  return h('dl', {class: 'meta'}, pairs.map(([k, v]) => [h('dt', {}, k), h('dd', {class: k === 'Error' ? 'error' : ''}, v)]));
}

// HL7 v2: one segment a line, the segment name and the separators marked.
function hl7(text) {
  const pre = h('pre', {class: 'hl7'});
  if (!text) return fill(pre, '—');
  const sep = text.startsWith('MSH') && text.length > 3 ? text[3] : '|';
  const segs = text.split(/\r\n|\r|\n/).filter((s) => s.length);
  for (const s of segs.slice(0, 5000)) {
    const parts = s.split(sep);
    const line = h('span', {class: 'line'}, h('span', {class: 'seg'}, parts[0]));
    for (const p of parts.slice(1)) line.append(h('span', {class: 'sep'}, sep), p);
    pre.append(line);
  }
  if (segs.length > 5000) pre.append(h('span', {class: 'line muted'}, `… ${segs.length - 5000} more segments`));
  return pre;
}

function timelineKey(t) {
  return [t.accession ? `accession ${t.accession}` : null, t.study_uid ? `study ${t.study_uid}` : null].filter(Boolean).join(' · ');
}

// What each timeline event says, and its colour.
function describe(ctx, e, currentId) {
  const msgLink = (id, label) => (String(id) === String(currentId)
    ? h('span', {class: 'what'}, `${label} (this message)`)
    : h('button', {type: 'button', class: 'link', on: {click: () => ctx.navigate('messages', String(id))}}, label));
  switch (e.event) {
    case 'order':
      return {what: 'Order', info: [`accession ${e.accession}`, e.status && `status ${e.status}`, e.priority && `priority ${e.priority}`]};
    case 'message':
      return {what: msgLink(e.message_id, `${e.message_type || 'Message'} on ${e.channel}`), info: [e.status], cls: tone(e.status)};
    case 'study_first_instance':
      return {what: 'First instance of the study arrived'};
    case 'study_stable':
      return {what: 'Study stable', info: [`${e.instances} instances`]};
    case 'study_routed':
      return {what: 'Study routed', info: [e.match ? `order match: ${e.match}` : 'no order matched']};
    case 'ai_request_sent':
      return {what: `AI request sent to ${e.endpoint}`, info: [`job ${e.job_id}`, e.mode && `${e.mode} mode`]};
    case 'ai_result':
      return {what: `AI result from job ${e.job_id}`, info: [e.state, e.model, e.critical ? 'critical' : 'not critical'],
        cls: e.critical ? 'bad' : tone(e.state)};
    case 'delivered':
      return {what: msgLink(e.message_id, `${e.message_type} delivered to ${e.destination}`), info: [e.detail], cls: 'ok'};
    case 'notification':
      return {what: 'Critical-result notification', info: [e.notification_id, `ACR category ${e.acr_category}`], cls: 'bad'};
    case 'notification_acked':
      return {what: `Notification acknowledged by ${e.by}`, info: [e.notification_id, `${e.pages} page${e.pages === 1 ? '' : 's'}`], cls: 'ok'};
    case 'radiologist_verdict':
      return {what: `Radiologist ${e.verdict} finding ${e.finding_id}`, info: [`job ${e.job_id}`, e.by && `by ${e.by}`],
        cls: tone(e.verdict)};
    default:
      return {what: e.event};
  }
}

function timeline(ctx, events, currentId) {
  if (!events.length) return h('p', {class: 'muted'}, 'No events.');
  const first = events[0].at_ms;
  let prev = first;
  const items = events.map((e, i) => {
    const d = describe(ctx, e, currentId);
    const isCurrent = e.event === 'message' && String(e.message_id) === String(currentId);
    const li = h('li', {class: `${d.cls ?? ''} ${isCurrent ? 'current' : ''}`, dataset: {event: e.event}},
      h('span', {class: 'delta', title: 'since the step before'}, i ? fmt.delta(e.at_ms - prev) : 'start'),
      h('div', {class: 'body'},
        h('div', {class: 'what'}, d.what),
        d.info ? h('div', {class: 'info'}, d.info.filter(Boolean).join(' · ')) : null),
      h('span', {class: 'when', title: `${fmt.datetime(e.at_ms)}${i ? `, ${fmt.dur(e.at_ms - first)} after the first step` : ''}`},
        fmt.time(e.at_ms)));
    prev = e.at_ms;
    return li;
  });
  return h('ol', {class: 'timeline'}, items);
}

function deliveries(list) {
  if (!list.length) return h('p', {class: 'muted'}, 'No delivery attempts.');
  return h('div', {class: 'table-wrap'}, h('table', {class: 'grid'},
    h('thead', {}, h('tr', {}, ['Destination', 'Attempt', 'When', 'Outcome', 'Detail'].map((t) => h('th', {}, t)))),
    h('tbody', {}, list.map((d) => h('tr', {},
      h('td', {}, d.destination), h('td', {class: 'n'}, fmt.int(d.attempt)), h('td', {}, fmt.datetime(d.at_ms)),
      h('td', {}, badge(d.outcome)), h('td', {class: 'ellipsis', title: d.detail ?? ''}, d.detail ?? '—'))))));
}

function queued(list) {
  return h('div', {class: 'table-wrap'}, h('table', {class: 'grid'},
    h('thead', {}, h('tr', {}, ['Destination', 'State', 'Attempts', 'Queued', 'Next try', 'Last error'].map((t) => h('th', {}, t)))),
    h('tbody', {}, list.map((q) => h('tr', {},
      h('td', {}, q.destination), h('td', {}, badge(q.state)), h('td', {class: 'n'}, fmt.int(q.attempts)),
      h('td', {}, fmt.datetime(q.enqueued_ms)), h('td', {}, q.not_before_ms ? fmt.datetime(q.not_before_ms) : '—'),
      h('td', {class: 'ellipsis', title: q.last_error ?? ''}, q.last_error ?? '—'))))));
}

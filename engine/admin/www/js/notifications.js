// Critical-result notifications (GET /api/notifications) and their
// acknowledgement (POST /api/notifications/{id}/ack, operator role).
import {api, query} from './api.js';
import {$, h, fill, fmt, badge} from './dom.js';

const REFRESH_MS = 15000;
let state = '';
let timer = null;

export function init(ctx) {
  for (const b of document.querySelectorAll('#notif-filter button')) {
    b.addEventListener('click', () => {
      state = b.dataset.state;
      for (const o of document.querySelectorAll('#notif-filter button')) o.classList.toggle('on', o === b);
      load(ctx);
    });
  }
}

export function show(ctx) {
  load(ctx);
}

export function hide() {
  clearTimeout(timer);
}

async function load(ctx) {
  clearTimeout(timer);
  const tbody = $('#notif-table tbody');
  try {
    const res = await api(`/api/notifications${query({state, limit: 500})}`);
    const rows = res.notifications.map((n) => row(ctx, n));
    fill(tbody, rows.length ? rows : h('tr', {}, h('td', {class: 'empty', colSpan: 12}, 'No notifications.')));
  } catch (e) {
    fill(tbody, h('tr', {}, h('td', {class: 'empty', colSpan: 12}, `The notifications could not be read: ${e.message}`)));
  }
  timer = setTimeout(() => load(ctx), REFRESH_MS);
}

function row(ctx, n) {
  const ackable = n.state === 'open' || n.state === 'unacknowledged';
  const ack = n.ack
    ? h('span', {title: n.ack.note ?? ''}, `${n.ack.by}, after ${fmt.dur(n.ack.at_ms - n.created_ms)}`)
    : h('span', {class: 'muted'}, '—');
  return h('tr', {dataset: {id: n.id, state: n.state}},
    h('td', {}, badge(n.state)),
    h('td', {title: n.id}, fmt.datetime(n.created_ms)),
    h('td', {class: ackable && Date.now() - n.created_ms > 15 * 60e3 ? 'bad' : ''}, ackable ? fmt.age(n.created_ms) : '—'),
    h('td', {}, n.finding ?? n.code ?? '—'),
    h('td', {class: n.acr_category === 1 ? 'bad' : ''}, fmt.int(n.acr_category)),
    h('td', {class: 'mono'}, n.accession ?? '—'),
    h('td', {}, n.destination),
    h('td', {class: 'n', title: 'the person of the escalation chain paged last (0: the first)'}, fmt.int(n.escalation_level)),
    h('td', {class: 'n'}, fmt.int(n.pages)),
    h('td', {}, n.last_page_ms ? fmt.age(n.last_page_ms) + ' ago' : '—'),
    h('td', {}, ack),
    h('td', {}, ackable ? h('button', {type: 'button', class: 'small danger', on: {click: (e) => acknowledge(ctx, n, e.currentTarget)}}, 'Acknowledge') : null));
}

async function acknowledge(ctx, n, button) {
  button.disabled = true;
  try {
    const res = await api(`/api/notifications/${encodeURIComponent(n.id)}/ack`, {method: 'POST', body: {}});
    ctx.banner(null);
    ctx.toast(`Acknowledged by ${res.ack?.by ?? 'you'}.`);
    ctx.refresh();
  } catch (e) {
    button.disabled = false;
    if (e.status === 403)
      ctx.banner('Not allowed: acknowledging a notification needs an operator token; this token is a viewer\'s. Sign out and sign in with an operator token.');
    else if (e.status === 409) ctx.banner(`Already acknowledged: ${e.message}`, 'info');
    else ctx.banner(`The acknowledgement failed: ${e.message}`);
    if (e.status !== 409) return;
  }
  load(ctx);
}

// The dashboard's shell: sign-in, the views and their keys, and the
// /metrics poll every view reads from.
import {api, auth, ApiError} from './api.js';
import {$, fmt} from './dom.js';
import {Snapshot} from './prom.js';
import * as live from './live.js';
import * as messages from './messages.js';
import * as ai from './ai.js';
import * as notifications from './notifications.js';

const POLL_MS = 5000;
const KEEP_MS = 3 * 60 * 1000; // scrapes kept: 3 minutes (sparklines)

const views = {
  channels: live.channels,
  queues: live.queues,
  messages,
  ai,
  notifications,
};
const order = Object.keys(views);

// What the views share: the scrapes (oldest first), helpers, navigation.
const ctx = {
  history: [],
  get latest() {
    return this.history[this.history.length - 1] ?? null;
  },
  // The oldest scrape at most ms old (for rates), else null.
  since(ms) {
    const last = this.latest;
    if (!last) return null;
    return this.history.find((s) => s !== last && last.at - s.at <= ms + 1000) ?? null;
  },
  banner,
  toast,
  // The figures again now (after an action that changes them).
  refresh: () => poll(),
  // Shows view now (and records it in the address for back/forward).
  navigate(view, arg) {
    const hash = arg ? `#/${view}/${arg}` : `#/${view}`;
    if (location.hash !== hash) location.hash = hash;
    route();
  },
};

let current = null;
let pollTimer = null;
let started = false;

function banner(message, kind = 'bad') {
  const el = $('#banner');
  if (!message) {
    el.hidden = true;
    return;
  }
  el.textContent = message;
  el.className = `banner ${kind}`;
  el.hidden = false;
}

let toastTimer = null;
function toast(message, kind = '') {
  const el = $('#toast');
  el.textContent = message;
  el.className = `toast ${kind}`;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), 4000);
}

let routed = null; // the address last shown

function route() {
  if (location.hash === routed) return;
  routed = location.hash;
  const [, name = 'channels', arg] = location.hash.match(/^#\/([a-z]+)(?:\/(.+))?$/) ?? [];
  const view = views[name] ? name : 'channels';
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('on', a.dataset.view === view);
  for (const n of order) $(`#view-${n}`).hidden = n !== view;
  if (current !== view) {
    if (current) views[current].hide?.();
    current = view;
    banner(null);
  }
  views[view].show(ctx, arg ? decodeURIComponent(arg) : null);
}

async function poll() {
  clearTimeout(pollTimer);
  try {
    const text = await api('/metrics', {text: true});
    const snap = Snapshot.fromText(text, Date.now());
    const last = ctx.latest;
    const start = snap.get('radrelay_start_time_seconds');
    if (last && last.get('radrelay_start_time_seconds') !== start) ctx.history = []; // restarted
    ctx.history.push(snap);
    while (ctx.history.length > 2 && snap.at - ctx.history[0].at > KEEP_MS) ctx.history.shift();
    header(snap);
    for (const n of order) views[n].onMetrics?.(ctx, n === current);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return; // sign-in shown
    const pill = $('#engine-state');
    pill.textContent = 'unreachable';
    pill.className = 'pill bad';
    $('#engine-updated').textContent = `metrics: ${e.message}`;
  }
  clearTimeout(pollTimer); // one timer, whoever asked for this poll
  pollTimer = setTimeout(poll, POLL_MS);
}

function header(snap) {
  const ready = snap.get('radrelay_ready') === 1;
  const pill = $('#engine-state');
  pill.textContent = ready ? 'ready' : 'not ready';
  pill.className = `pill ${ready ? 'ok' : 'bad'}`;
  const start = snap.get('radrelay_start_time_seconds');
  $('#engine-uptime').textContent = start ? `up ${fmt.dur(snap.at - start * 1000)}` : '';
  $('#engine-updated').textContent = `updated ${fmt.time(snap.at).slice(0, 8)}`;
  const open = snap.get('radrelay_notifications', {state: 'open'}) ?? 0;
  const count = $('#nav-open');
  count.textContent = String(open);
  count.hidden = !open;
  count.title = `${open} open`;
}

function showLogin(message) {
  clearTimeout(pollTimer);
  const box = $('#login');
  box.hidden = false;
  $('#signout').hidden = true;
  const err = $('#login-error');
  err.textContent = message ?? '';
  err.hidden = !message;
  $('#login-token').value = '';
  $('#login-token').focus();
}

async function signIn(token) {
  auth.set(token);
  try {
    await api('/metrics', {text: true});
  } catch (e) {
    auth.clear();
    showLogin(e.status === 401 ? 'This token is not recognised.' : `The engine did not answer: ${e.message}`);
    return;
  }
  $('#login-token').blur();
  $('#login').hidden = true;
  $('#signout').hidden = false;
  start();
}

function start() {
  if (!started) {
    started = true;
    for (const n of order) views[n].init?.(ctx);
    window.addEventListener('hashchange', route);
  }
  route();
  poll();
}

function keys(e) {
  if (e.ctrlKey || e.metaKey || e.altKey || !$('#login').hidden) return;
  const t = e.target;
  const typing = t instanceof HTMLInputElement || t instanceof HTMLSelectElement || t instanceof HTMLTextAreaElement;
  if (e.key === '/' && !typing) {
    e.preventDefault();
    ctx.navigate('messages');
    messages.focusSearch();
  } else if (!typing && e.key >= '1' && e.key <= String(order.length)) {
    ctx.navigate(order[Number(e.key) - 1]);
  } else if (e.key === 'Escape' && current === 'messages') {
    messages.closeDetail(ctx);
  }
}

auth.onUnauthorized(() => showLogin('The token is no longer accepted: sign in again.'));
$('#login-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = $('#login-token');
  const token = input.value.trim();
  input.value = ''; // the token stays in sessionStorage only
  if (token) signIn(token);
});
$('#signout').addEventListener('click', () => {
  auth.clear();
  location.hash = '';
  location.reload(); // drops everything the page showed
});
document.addEventListener('keydown', keys);

if (auth.token) signIn(auth.token);
else showLogin();

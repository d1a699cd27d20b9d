// Drives the engine's web dashboard in headless Chromium (Debian's
// /usr/bin/chromium, through playwright-core from tests/peers; no browser
// is downloaded) as a person would, and checks what it shows.
//
//   node dashboard_browser.mjs --peers tests/peers --chromium /usr/bin/chromium
//        --url http://127.0.0.1:PORT/ --expect expect.json --artifacts DIR
//
// The tokens come in the environment (RR_VIEWER_TOKEN, RR_OPERATOR_TOKEN),
// never on the command line; the line "traffic: send N messages" asks the
// test to send N more to the orders channel. expect.json: {"mrn",
// "message_count", "traffic",
// "control_id", "segments", "timeline_events": [...], "ai_rows",
// "ai_agreement": {endpoint: text}, "notification", "destination"}.
// Prints one line per step; exits 1 with the reason on the first failure.
import {createRequire} from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import {parseArgs} from 'node:util';

const {values: args} = parseArgs({
  options: {
    peers: {type: 'string'},
    chromium: {type: 'string', default: '/usr/bin/chromium'},
    url: {type: 'string'},
    expect: {type: 'string'},
    artifacts: {type: 'string'},
  },
});
const require = createRequire(path.join(path.resolve(args.peers), 'package.json'));
const {chromium} = require('playwright-core');
const expect = JSON.parse(fs.readFileSync(args.expect, 'utf8'));
const viewer = process.env.RR_VIEWER_TOKEN;
const operator = process.env.RR_OPERATOR_TOKEN;
const origin = new URL(args.url).origin;
const STEP_MS = 15000;

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

// Console errors and failed loads, each with the step it happened in: the
// steps that provoke a 401 or 403 on purpose may have those, nothing else.
let phase = 'load';
const consoleErrors = [];
const pageErrors = [];
const requests = [];
const addresses = [];

const browser = await chromium.launch({executablePath: args.chromium, headless: true});
let failed = null;
try {
  const context = await browser.newContext({viewport: {width: 1280, height: 800}, colorScheme: 'light'});
  const page = await context.newPage();
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') consoleErrors.push({phase, type: m.type(), text: m.text()});
  });
  page.on('pageerror', (e) => pageErrors.push(`${phase}: ${e.message}`));
  page.on('request', (r) => requests.push(r.url()));
  page.on('framenavigated', (f) => {
    if (f === page.mainFrame()) addresses.push(f.url());
  });
  const shot = async (name) => {
    const file = path.join(args.artifacts, name);
    await page.screenshot({path: file});
    console.log(`screenshot ${file}`);
  };
  const signIn = async (token, wrong = false) => {
    await page.locator('#login-token').fill(token);
    await page.locator('#login-token').press('Enter');
    if (!wrong) await page.locator('#login').waitFor({state: 'hidden', timeout: STEP_MS});
  };

  // ---- sign-in: the root sends the browser to /ui/, which asks for a token
  await page.goto(args.url);
  check(new URL(page.url()).pathname === '/ui/', `the dashboard at /ui/ (${page.url()})`);
  await page.locator('#login-token').waitFor({state: 'visible', timeout: STEP_MS});
  phase = 'wrong-token';
  await signIn('not-a-token-of-this-engine', true);
  await page.locator('#login-error').filter({hasText: 'not recognised'}).waitFor({timeout: STEP_MS});
  console.log('sign-in: an unknown token is refused');
  phase = 'viewer';
  await signIn(viewer);
  const stored = await page.evaluate(() => ({
    session: Object.values(sessionStorage),
    local: Object.keys(localStorage).length,
    field: document.querySelector('#login-token').value,
  }));
  check(stored.session.includes(viewer) && stored.local === 0 && stored.field === '',
    'the token is in sessionStorage only');

  // ---- channels: the engine's counters
  const received = page.locator('#channels-table tr[data-channel="orders"] td:nth-child(2)');
  await page.waitForFunction(() => {
    const td = document.querySelector('#channels-table tr[data-channel="orders"] td:nth-child(2)');
    return td && Number(td.textContent.replace(/,/g, '')) > 0;
  }, null, {timeout: STEP_MS});
  const n = Number((await received.textContent()).replace(/,/g, ''));
  check(n >= expect.message_count, `orders received ${n} >= ${expect.message_count}`);
  // a second scrape gives rates
  await page.waitForFunction(() => {
    const td = document.querySelector('#channels-table tr[data-channel="orders"] td:nth-child(8)');
    return td && td.textContent !== '—';
  }, null, {timeout: STEP_MS});
  // live: the test sends more messages now; the next scrapes show them
  console.log(`traffic: send ${expect.traffic} messages`);
  await page.waitForFunction(([before, more]) => {
    const cells = document.querySelectorAll('#channels-table tr[data-channel="orders"] td');
    return cells.length && Number(cells[1].textContent.replace(/,/g, '')) >= before + more
      && Number(cells[7].textContent) > 0;
  }, [n, expect.traffic], {timeout: 3 * STEP_MS});
  const rateNow = await page.locator('#channels-table tr[data-channel="orders"] td:nth-child(8)').textContent();
  const points = await page.locator('#channels-table tr[data-channel="orders"] svg polyline').count();
  check(points === 1, 'a sparkline of the received rate');
  const ackP50 = await page.locator('#channels-table tr[data-channel="orders"] td:nth-child(11)').textContent();
  check(/ms|s$/.test(ackP50), `an ACK p50 (${ackP50})`);
  console.log(`channels: orders received ${n} then ${expect.traffic} more, ${rateNow}/s, ACK p50 ${ackP50}`);
  await shot('dashboard-channels.png');

  // ---- queues (key 2): the destination the ADT waits for
  await page.keyboard.press('2');
  const q = page.locator(`#queues-table tr[data-destination="${expect.destination}"]`);
  await q.waitFor({timeout: STEP_MS});
  const pending = Number(await q.locator('td:nth-child(4)').textContent());
  check(pending >= 1, `${expect.destination} pending ${pending}`);
  check(/closed|open|half-open/.test(await q.locator('td:nth-child(3)').textContent()), 'a circuit state');
  console.log(`queues: ${expect.destination} pending ${pending}`);

  // ---- AI (key 4): the summary per endpoint and model
  await page.keyboard.press('4');
  await page.waitForFunction((want) => document.querySelectorAll('#ai-table tbody tr[data-endpoint]').length === want,
    expect.ai_rows, {timeout: STEP_MS});
  for (const [endpoint, text] of Object.entries(expect.ai_agreement)) {
    const cells = await page.locator(`#ai-table tr[data-endpoint="${endpoint}"] td:nth-child(6)`).allTextContents();
    check(cells.includes(text), `agreement of ${endpoint}: ${text} in ${JSON.stringify(cells)}`);
  }
  await page.locator('#ai-live tbody tr').first().waitFor({timeout: STEP_MS});
  console.log(`ai: ${expect.ai_rows} endpoint/model rows`);
  await shot('dashboard-ai.png');

  // ---- notifications (key 5): a viewer may not acknowledge
  await page.keyboard.press('5');
  const row = page.locator(`#notif-table tr[data-id="${expect.notification}"]`);
  await row.waitFor({timeout: STEP_MS});
  check((await row.getAttribute('data-state')) === 'open', 'the notification is open');
  phase = 'viewer-ack';
  await row.getByRole('button', {name: 'Acknowledge'}).click();
  await page.locator('#banner').filter({hasText: 'needs an operator token'}).waitFor({timeout: STEP_MS});
  check((await row.getAttribute('data-state')) === 'open', 'still open after the 403');
  console.log('notifications: a viewer\'s acknowledgement is refused (403 shown)');
  phase = 'viewer';

  // ---- message search by MRN, from the keyboard ("/" focuses the form)
  await page.keyboard.press('/');
  check(await page.evaluate(() => document.activeElement?.name === 'mrn'), '"/" focuses the MRN field');
  await page.keyboard.type(expect.mrn);
  await page.keyboard.press('Enter');
  await page.waitForFunction((want) => document.querySelectorAll('#results tbody tr[data-id]').length === want
    && document.querySelector('#results-count').textContent.startsWith(`${want} message`),
  expect.mrn_count, {timeout: STEP_MS});
  const mrns = await page.locator('#results tbody tr[data-id] td:nth-child(5)').allTextContents();
  check(mrns.every((m) => m === expect.mrn), `every row has the MRN: ${mrns}`);
  // open the message: arrow down from the form to the rows, then Enter on ours
  await page.keyboard.press('ArrowDown');
  const target = page.locator('#results tbody tr[data-id]').filter({hasText: expect.control_id});
  await target.focus();
  await page.keyboard.press('Enter');
  const detail = page.locator('#detail');
  await detail.locator('pre.hl7').first().waitFor({timeout: STEP_MS});
  const lines = await detail.locator('pre.hl7').first().locator('.line').allTextContents();
  check(lines.length === expect.segments.length, `${lines.length} raw lines for ${expect.segments.length} segments`);
  check(lines.every((l, i) => l.startsWith(`${expect.segments[i]}|`)), `one segment per line: ${lines.map((l) => l.slice(0, 3))}`);
  check(lines[0].includes(expect.control_id), 'the raw message is the one searched for');
  const ack = await detail.locator('pre.hl7').nth(1).textContent();
  check(ack.includes(`MSA|AA|${expect.control_id}`), 'its ACK');
  const events = await detail.locator('ol.timeline > li').evaluateAll((lis) => lis.map((li) => li.dataset.event));
  for (const e of expect.timeline_events) check(events.includes(e), `timeline has ${e}: ${events}`);
  const deltas = await detail.locator('ol.timeline .delta').allTextContents();
  check(deltas[0] === 'start' && deltas.slice(1).every((d) => /^\+[\d,]+ ms$/.test(d)), `ms deltas: ${deltas}`);
  check(await detail.locator('ol.timeline > li.current').count() === 1, 'the message marked in its timeline');
  check(new URL(page.url()).hash.startsWith('#/messages/'), 'the address names the message id');
  console.log(`message: ${lines.length} segments, timeline ${events.join(' > ')}`);
  await shot('dashboard.png');
  await detail.locator('ol.timeline').scrollIntoViewIfNeeded();
  await shot('dashboard-timeline.png');
  await page.keyboard.press('Escape');
  await detail.waitFor({state: 'hidden', timeout: STEP_MS});

  // ---- an operator acknowledges
  await page.locator('#signout').click();
  await page.locator('#login-token').waitFor({state: 'visible', timeout: STEP_MS});
  check(await page.evaluate(() => sessionStorage.length === 0), 'signing out forgets the token');
  phase = 'operator';
  await signIn(operator);
  await page.keyboard.press('5');
  await row.getByRole('button', {name: 'Acknowledge'}).click();
  await page.locator(`#notif-table tr[data-id="${expect.notification}"][data-state="acked"]`).waitFor({timeout: STEP_MS});
  await page.locator('#toast').filter({hasText: 'Acknowledged'}).waitFor({timeout: STEP_MS});
  console.log('notifications: an operator acknowledged it');
  await shot('dashboard-notifications.png');

  // ---- what the page did
  const allowed = {'wrong-token': /status of 401/, 'viewer-ack': /status of 403/};
  const unexpected = consoleErrors.filter((c) => !(allowed[c.phase] && allowed[c.phase].test(c.text)));
  check(unexpected.length === 0, `console errors: ${JSON.stringify(unexpected)}`);
  check(consoleErrors.some((c) => c.phase === 'viewer-ack'), 'the 403 was the engine\'s');
  check(pageErrors.length === 0, `page errors: ${pageErrors}`);
  const foreign = requests.filter((u) => new URL(u).origin !== origin);
  check(foreign.length === 0, `requests to other hosts: ${foreign}`);
  const leaks = requests.filter((u) => u.includes(viewer) || u.includes(operator));
  check(leaks.length === 0, 'no token in a URL');
  const withMrn = requests.filter((u) => u.includes(encodeURIComponent(expect.mrn)) || u.includes(expect.mrn));
  check(withMrn.every((u) => new URL(u).pathname === '/api/messages'), `the MRN only in the search: ${withMrn}`);
  check(addresses.every((u) => !u.includes(expect.mrn)), `the MRN never in the address: ${addresses}`);
  console.log(`requests: ${requests.length}, all to ${origin}; console errors only the provoked 401/403`);
} catch (e) {
  failed = e;
} finally {
  await browser.close();
}
if (failed) {
  console.error(failed.stack || String(failed));
  process.exit(1);
}

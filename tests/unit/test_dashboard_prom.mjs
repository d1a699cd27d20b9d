// The dashboard's Prometheus text parser and histogram arithmetic
// (engine/admin/www/js/prom.js), with node's own test runner:
//   node --test tests/unit/test_dashboard_prom.mjs
import test from 'node:test';
import assert from 'node:assert/strict';
import {parse, Snapshot, rate, quantile, bucketDelta} from '../../engine/admin/www/js/prom.js';

// As GET /metrics writes it (admin/metrics.c).
const TEXT = `# HELP radrelay_channel_messages_total Messages per channel.
# TYPE radrelay_channel_messages_total counter
radrelay_channel_messages_total{channel="orders",outcome="received"} 10
radrelay_channel_messages_total{channel="orders",outcome="accepted"} 9
radrelay_channel_messages_total{channel="odd \\"name\\" \\\\ x",outcome="received"} 1
# TYPE radrelay_ack_latency_seconds histogram
radrelay_ack_latency_seconds_bucket{channel="orders",le="0.001"} 2
radrelay_ack_latency_seconds_bucket{channel="orders",le="0.002"} 6
radrelay_ack_latency_seconds_bucket{channel="orders",le="0.005"} 10
radrelay_ack_latency_seconds_bucket{channel="orders",le="+Inf"} 10
radrelay_ack_latency_seconds_sum{channel="orders"} 0.021000
radrelay_ack_latency_seconds_count{channel="orders"} 10
radrelay_queue_oldest_age_seconds{destination="orders.patient_index"} 1.250
radrelay_destination_circuit_open{destination="d",kind="mllp"} 0.5
radrelay_ready 1
`;

test('parse: names, labels with escapes, values', () => {
  const s = parse(TEXT);
  assert.equal(s.length, 12);
  assert.deepEqual(s[0], {name: 'radrelay_channel_messages_total', labels: {channel: 'orders', outcome: 'received'}, value: 10});
  assert.equal(s[2].labels.channel, 'odd "name" \\ x');
  assert.equal(s.find((x) => x.labels.le === '+Inf').value, 10);
  assert.equal(s.at(-1).name, 'radrelay_ready');
  assert.deepEqual(s.at(-1).labels, {});
  assert.equal(s.at(-2).value, 0.5);
  assert.deepEqual(parse('broken{x="1" 3\n# only a comment\n\n'), []);
});

test('Snapshot: get, select, values, buckets', () => {
  const snap = Snapshot.fromText(TEXT, 1000);
  assert.equal(snap.get('radrelay_channel_messages_total', {outcome: 'accepted', channel: 'orders'}), 9);
  assert.equal(snap.get('radrelay_channel_messages_total', {channel: 'orders'}), null);
  assert.equal(snap.select('radrelay_channel_messages_total', {outcome: 'received'}).length, 2);
  assert.deepEqual(snap.values('radrelay_channel_messages_total', 'channel').sort(), ['odd "name" \\ x', 'orders']);
  assert.deepEqual(snap.buckets('radrelay_ack_latency_seconds', {channel: 'orders'}).map((b) => b.le),
    [0.001, 0.002, 0.005, Infinity]);
  assert.equal(snap.get('radrelay_ready'), 1);
});

test('quantile: linear inside the bucket, as histogram_quantile', () => {
  const b = Snapshot.fromText(TEXT, 0).buckets('radrelay_ack_latency_seconds', {channel: 'orders'});
  // rank 5 of 10: bucket (0.001, 0.002] holds ranks 3..6 -> 0.001 + 0.001 * 3/4
  assert.ok(Math.abs(quantile(0.5, b) - 0.00175) < 1e-12);
  // rank 1 of 10 in the first bucket, from 0
  assert.ok(Math.abs(quantile(0.1, b) - 0.0005) < 1e-12);
  // rank 9.9: bucket (0.002, 0.005] holds 7..10 -> 0.002 + 0.003 * 3.9/4
  assert.ok(Math.abs(quantile(0.99, b) - 0.004925) < 1e-12);
  // in the +Inf bucket: the highest finite bound
  assert.equal(quantile(0.99, [{le: 0.1, count: 1}, {le: Infinity, count: 10}]), 0.1);
  assert.equal(quantile(0.5, [{le: 0.1, count: 0}, {le: Infinity, count: 0}]), null);
  assert.equal(quantile(0.5, []), null);
});

test('rate and bucketDelta: per second between scrapes, null across a restart', () => {
  const a = new Snapshot(parse('c{x="1"} 10\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\n'), 1000);
  const b = new Snapshot(parse('c{x="1"} 30\nh_bucket{le="1"} 4\nh_bucket{le="+Inf"} 6\n'), 11000);
  assert.equal(rate(b, a, 'c', {x: '1'}), 2);
  assert.equal(rate(b, null, 'c', {x: '1'}), null);
  assert.equal(rate(a, b, 'c', {x: '1'}), null); // went down: restarted
  assert.deepEqual(bucketDelta(b.buckets('h'), a.buckets('h')), [{le: 1, count: 3}, {le: Infinity, count: 4}]);
  assert.equal(bucketDelta(a.buckets('h'), b.buckets('h')), null);
});

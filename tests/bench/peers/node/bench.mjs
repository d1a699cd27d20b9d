#!/usr/bin/env node
// HL7 v2 parser benchmark for npm libraries (see adapters.mjs).
//
//   node bench.mjs --list                      adapters whose package is installed
//   node bench.mjs IMPL ADT_FILE ORU_FILE      benchmark one library
//
// Prints one JSON object per line, the same shape as the C benchmark:
//   {"impl","case","op","msgs_per_s","mb_per_s","checksum","iterations","seconds"}
// plus "roundtrip" (true/false) on parse_serialize lines, "note" where the
// adapter had to help the library or the library works differently, and an
// {"impl","case","op","error"} line for an operation that cannot be run.
//   parse_read10:    checksum = sum of the UTF-8 byte lengths of the ten values
//   parse_serialize: checksum = UTF-8 byte length of the serialized text
// MB/s counts input bytes (file size) and MB = 10^6 bytes.
//
// Environment: RR_BENCH_SECONDS (measured time per case and op, default 2),
// RR_BENCH_WARMUP_SECONDS (default 0.5), RR_PEERS_DIR (the directory holding
// package.json and node_modules, default tests/peers), RR_BENCH_DEBUG=1 (print
// the ten values on stderr).
import { readFileSync, existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { adapters } from './adapters.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const peersDir = resolve(process.env.RR_PEERS_DIR || join(here, '..', '..', '..', 'peers'));
const req = createRequire(join(peersDir, 'package.json'));
const SECONDS = Number(process.env.RR_BENCH_SECONDS || 2);
const WARMUP = Number(process.env.RR_BENCH_WARMUP_SECONDS || 0.5);
const DEBUG = process.env.RR_BENCH_DEBUG === '1';

function installedVersion(pkg) {
  const p = join(peersDir, 'node_modules', pkg, 'package.json');
  if (!existsSync(p)) return undefined;
  return JSON.parse(readFileSync(p, 'utf8')).version;
}

function out(obj) { process.stdout.write(JSON.stringify(obj) + '\n'); }
const r3 = (x) => Math.round(x * 1000) / 1000;

// Runs body(n) (n iterations, returns a number that is accumulated so that the
// work cannot be optimised away) for WARMUP seconds, then in batches of about
// 10 ms until SECONDS have passed. Returns {iterations, seconds, sink}.
function timeSync(body) {
  let t0 = performance.now();
  let n = 0;
  let sink = 0;
  do { sink += body(1); n++; } while (performance.now() - t0 < WARMUP * 1000);
  const per = (performance.now() - t0) / n;
  const batch = Math.max(1, Math.floor(10 / Math.max(per, 1e-6)));
  let iterations = 0;
  t0 = performance.now();
  let el;
  do { sink += body(batch); iterations += batch; } while ((el = performance.now() - t0) < SECONDS * 1000);
  return { iterations, seconds: el / 1000, sink };
}
async function timeAsync(body) {
  let t0 = performance.now();
  let n = 0;
  let sink = 0;
  do { sink += await body(1); n++; } while (performance.now() - t0 < WARMUP * 1000);
  const per = (performance.now() - t0) / n;
  const batch = Math.max(1, Math.floor(10 / Math.max(per, 1e-6)));
  let iterations = 0;
  t0 = performance.now();
  let el;
  do { sink += await body(batch); iterations += batch; } while ((el = performance.now() - t0) < SECONDS * 1000);
  return { iterations, seconds: el / 1000, sink };
}

async function main() {
  const argv = process.argv.slice(2);
  if (argv[0] === '--list') {
    for (const [name, a] of Object.entries(adapters)) {
      const v = installedVersion(a.pkg);
      if (v) process.stdout.write(`${name}\n`);
    }
    return;
  }
  if (argv.length !== 3 || !adapters[argv[0]]) {
    process.stderr.write(`usage: bench.mjs --list | IMPL ADT_FILE ORU_FILE\nIMPL: ${Object.keys(adapters).join(', ')}\n`);
    process.exit(2);
  }
  const [name, adtFile, oruFile] = argv;
  const a = adapters[name];
  const version = installedVersion(a.pkg);
  if (!version) { process.stderr.write(`${a.pkg} is not installed in ${peersDir}\n`); process.exit(2); }
  const impl = `${a.pkg}@${version}`;
  const lib = await a.load(req);
  const ad = a.make(lib);
  const isAsync = !!a.async;

  const cases = [['adt_a01', adtFile], ['oru_big', oruFile]];
  for (const [caseName, file] of cases) {
    const buf = readFileSync(file);
    const text = buf.toString('utf8');
    const inBytes = buf.length;

    // ---- parse_read10: check once, then time
    try {
      const m = isAsync ? await ad.parse(text) : ad.parse(text);
      const vals = ad.read(caseName, m);
      if (vals.length !== 10 || vals.some((v) => typeof v !== 'string')) {
        throw new Error(`read returned ${JSON.stringify(vals.map((v) => typeof v))}`);
      }
      if (DEBUG) process.stderr.write(`${impl} ${caseName}: ${JSON.stringify(vals.map((v) => (v.length > 40 ? `${v.slice(0, 20)}...(${v.length})` : v)))}\n`);
      const checksum = vals.reduce((s, v) => s + Buffer.byteLength(v, 'utf8'), 0);
      const chars = vals.reduce((s, v) => s + v.length, 0);
      let res;
      if (isAsync) {
        res = await timeAsync(async (n) => {
          let s = 0;
          for (let i = 0; i < n; i++) {
            const v = ad.read(caseName, await ad.parse(text));
            for (let j = 0; j < v.length; j++) s += v[j].length;
          }
          return s;
        });
      } else {
        res = timeSync((n) => {
          let s = 0;
          for (let i = 0; i < n; i++) {
            const v = ad.read(caseName, ad.parse(text));
            for (let j = 0; j < v.length; j++) s += v[j].length;
          }
          return s;
        });
      }
      if (res.sink % chars !== 0) throw new Error('values changed between iterations');
      out({ impl, case: caseName, op: 'parse_read10', msgs_per_s: r3(res.iterations / res.seconds),
        mb_per_s: r3((res.iterations * inBytes) / res.seconds / 1e6), checksum,
        iterations: res.iterations, seconds: r3(res.seconds), ...(ad.readNote ? { note: ad.readNote } : {}) });
    } catch (e) {
      out({ impl, case: caseName, op: 'parse_read10', error: String(e && e.message || e).slice(0, 200) });
    }

    // ---- parse_serialize
    if (!ad.serialize) {
      out({ impl, case: caseName, op: 'parse_serialize', error: 'library has no serializer' });
      continue;
    }
    try {
      const m = isAsync ? await ad.parse(text) : ad.parse(text);
      const s = ad.serialize(m);
      if (typeof s !== 'string') throw new Error('serialize did not return a string');
      const checksum = Buffer.byteLength(s, 'utf8');
      const roundtrip = s === text;
      if (!roundtrip && DEBUG) {
        let i = 0;
        while (i < s.length && s[i] === text[i]) i++;
        process.stderr.write(`${impl} ${caseName}: round-trip differs at char ${i} (out ${s.length}, in ${text.length} chars): ` +
          `in ${JSON.stringify(text.slice(Math.max(0, i - 20), i + 20))} out ${JSON.stringify(s.slice(Math.max(0, i - 20), i + 20))}\n`);
      }
      const body = (n) => {
        let acc = 0;
        for (let i = 0; i < n; i++) acc += ad.serialize(ad.parse(text)).length;
        return acc;
      };
      const res = isAsync
        ? await timeAsync(async (n) => { let acc = 0; for (let i = 0; i < n; i++) acc += ad.serialize(await ad.parse(text)).length; return acc; })
        : timeSync(body);
      out({ impl, case: caseName, op: 'parse_serialize', msgs_per_s: r3(res.iterations / res.seconds),
        mb_per_s: r3((res.iterations * inBytes) / res.seconds / 1e6), checksum,
        iterations: res.iterations, seconds: r3(res.seconds), roundtrip,
        ...(ad.serializeNote ? { note: ad.serializeNote } : {}) });
    } catch (e) {
      out({ impl, case: caseName, op: 'parse_serialize', error: String(e && e.message || e).slice(0, 200) });
    }
  }
}

main().catch((e) => { process.stderr.write(`${e && e.stack || e}\n`); process.exit(1); });

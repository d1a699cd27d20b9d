// A third-party MLLP server for scripts/bench-mllp: @medplum/hl7's Hl7Server
// (pinned in tests/peers/package.json), answering every message with AA and
// storing nothing.
//
//   node tests/bench/peers/node/mllp_server.mjs PORT      (0 = any free port)
//
// Prints `ready port=N impl=@medplum/hl7@VERSION` on stdout once listening.
// SIGTERM/SIGINT stop it; it then prints `stopped messages=N errors=N` and
// exits 0. Environment: RR_PEERS_DIR (the folder holding package.json and
// node_modules, default tests/peers).
//
// Notes on the peer, so its figures are read right:
// - Hl7Server.start(port) listens on every interface (the library takes no
//   host); the benchmark connects to 127.0.0.1.
// - Hl7Connection treats everything read up to a chunk ending in FS CR as one
//   message, so it is only correct for senders that wait for each ACK
//   (window 1, as real MLLP senders do); pipelined frames that arrive in one
//   read would be parsed as one message.
// - The ACK is built by the library (Hl7Message.buildAck): MSA-1 AA, MSA-2 =
//   the message's MSH-10.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const peersDir = resolve(process.env.RR_PEERS_DIR || join(here, '..', '..', '..', 'peers'));
const req = createRequire(join(peersDir, 'package.json'));

const arg = process.argv[2];
const port = Number(arg);
if (arg === undefined || !Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write('usage: node mllp_server.mjs PORT   (0 = any free port)\n');
  process.exit(2);
}

let hl7;
try {
  hl7 = req('@medplum/hl7');
} catch (e) {
  process.stderr.write(`@medplum/hl7 is not installed in ${peersDir} (run scripts/setup): ${e.message}\n`);
  process.exit(3);
}
const version = JSON.parse(
  readFileSync(join(peersDir, 'node_modules', '@medplum', 'hl7', 'package.json'), 'utf8'),
).version;

let messages = 0;
let errors = 0;
const MAX_SHOWN = 5;

const server = new hl7.Hl7Server((connection) => {
  connection.addEventListener('message', (event) => {
    messages++;
    connection.send(event.message.buildAck());
  });
  connection.addEventListener('error', (event) => {
    // A client closing its connection at the end of a run shows up here too.
    const code = event.error && event.error.code;
    if (code === 'ECONNRESET' || code === 'EPIPE') return;
    errors++;
    if (errors <= MAX_SHOWN) process.stderr.write(`mllp_server: ${event.error}\n`);
  });
});
server.start(port);
server.server.once('listening', () => {
  process.stdout.write(`ready port=${server.server.address().port} impl=@medplum/hl7@${version}\n`);
});
server.server.on('error', (e) => {
  process.stderr.write(`mllp_server: ${e.message}\n`);
  process.exit(1);
});

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  process.stdout.write(`stopped messages=${messages} errors=${errors}\n`);
  // Open client connections would hold stop() for its drain time; the
  // benchmark is over, so just go.
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

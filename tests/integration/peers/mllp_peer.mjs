// MLLP receiving peer for radrelay's sender tests, built on npm's
// @medplum/hl7 Hl7Server (a third-party MLLP server; we only choose what it
// answers). Usage:
//
//   node mllp_peer.mjs [--port N] [--modules DIR]
//
//   --port N      listen on N (default 0 = any free port; a restarted peer
//                 passes the port it had before)
//   --modules DIR node_modules folder holding @medplum/hl7 (default: the
//                 repository's tests/peers/node_modules, or $RR_PEERS_MODULES)
//
// What it answers is chosen per message by a prefix of MSH-10:
//
//   (none)        AA, MSA-2 = MSH-10 (buildAck of the library)
//   AE-           AE, MSA-2 = MSH-10
//   WRONG-        AA, but MSA-2 = "X" + MSH-10
//   LATE-<ms>-    AA after <ms> milliseconds (e.g. LATE-1500-0007)
//   SILENT-       no answer at all
//   CLOSE-        closes the connection on receipt, no answer
//   BAD-          a frame that is not HL7 ("this is not an HL7 message")
//   NOMSA-        an HL7 message without an MSA segment
//   BIG-          AA with a 100,000-byte MSA-3 (for reply size limits)
//   DOUBLE-       two AAs for the one message, in a single socket write
//
// Lines on stdout (the test reads them; one write each):
//   ready port=N               listening
//   conn n=K                   K-th connection accepted
//   msg conn=K id=MSH-10       a message received on connection K
//   closed n=K                 connection K closed
// The peer exits when stdin reaches end of file (its parent went away), on
// SIGTERM, or when killed.
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const here = path.dirname(fileURLToPath(import.meta.url));
const modules =
  arg('--modules', process.env.RR_PEERS_MODULES) ?? path.join(here, '..', '..', 'peers', 'node_modules');
const require = createRequire(path.join(modules, '..', 'package.json'));
const { Hl7Server } = require('@medplum/hl7');
const { Hl7Message } = require('@medplum/core');

const VT = 0x0b, FS = 0x1c, CR = 0x0d;
const port = Number(arg('--port', '0'));

function say(line) {
  process.stdout.write(line + '\n');
}

function frame(text) {
  const body = Buffer.from(text, 'utf-8');
  const out = Buffer.alloc(body.length + 3);
  out[0] = VT;
  body.copy(out, 1);
  out[body.length + 1] = FS;
  out[body.length + 2] = CR;
  return out;
}

function ackFor(msg, code) {
  return msg.buildAck({ ackCode: code });
}

let nconn = 0;
const server = new Hl7Server((connection) => {
  const k = ++nconn;
  say(`conn n=${k}`);
  connection.addEventListener('close', () => say(`closed n=${k}`));
  connection.addEventListener('error', () => {}); // resets, unknown ACK ids: not ours to judge
  connection.addEventListener('message', (event) => {
    const msg = event.message;
    const id = msg.getSegment('MSH')?.getField(10)?.toString() ?? '';
    say(`msg conn=${k} id=${id}`);
    if (id.startsWith('SILENT-')) {
      return;
    }
    if (id.startsWith('CLOSE-')) {
      connection.socket.destroy();
      return;
    }
    if (id.startsWith('BAD-')) {
      connection.socket.write(frame('this is not an HL7 message'));
      return;
    }
    if (id.startsWith('NOMSA-')) {
      const text = msg.header.toString().replace(/\|ADT\^[^|]*\|/, '|ACK|');
      connection.socket.write(frame(text + '\r'));
      return;
    }
    if (id.startsWith('DOUBLE-')) {
      const a = ackFor(msg, 'AA').toString();
      connection.socket.write(Buffer.concat([frame(a), frame(a)]));
      return;
    }
    if (id.startsWith('LATE-')) {
      const ms = Number(id.split('-')[1]);
      const ack = ackFor(msg, 'AA');
      setTimeout(() => {
        if (!connection.isClosed()) {
          connection.send(ack);
        }
      }, ms);
      return;
    }
    if (id.startsWith('WRONG-')) {
      const ack = ackFor(msg, 'AA');
      ack.getSegment('MSA').setField(2, 'X' + id);
      connection.send(ack);
      return;
    }
    if (id.startsWith('BIG-')) {
      const ack = ackFor(msg, 'AA');
      ack.getSegment('MSA').setField(3, 'x'.repeat(100000));
      connection.send(ack);
      return;
    }
    connection.send(ackFor(msg, id.startsWith('AE-') ? 'AE' : 'AA'));
  });
});

server.start(port);
server.server.once('listening', () => {
  say(`ready port=${server.server.address().port}`);
});

process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
process.on('SIGTERM', () => process.exit(0));

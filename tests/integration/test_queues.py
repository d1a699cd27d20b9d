#!/usr/bin/python3
"""End-to-end tests of the store-and-forward destination queues
(engine/queue/dispatch.c) with the real `radrelay run` binary.

    /usr/bin/python3 tests/integration/test_queues.py --radrelay build/radrelay \
        --gen-certs scripts/gen-certs [--node /usr/bin/node] [unittest args...]

Every case starts the engine with its own configuration and store in a
temporary folder (ephemeral ports), sends HL7 over MLLP from Python sockets
(stop-and-wait, several connections; each patient's messages go over one
connection, so a patient's send order is well defined), and checks what the
receiving side saw and what the store holds. Receivers:

  - tests/integration/peers/mllp_peer.mjs: npm's @medplum/hl7 MLLP server
    (needs node and tests/peers/node_modules, or $RR_PEERS_MODULES; the
    cases that use it are skipped with a message when they are missing);
  - tests/integration/peers/flaky_mllp_peer.py: a scripted MLLP server that
    fails a message the first time it sees it and accepts the resend
    (transient failure injection the npm server cannot do);
  - tests/integration/peers/https_peer.py: Python's http.server over TLS,
    requiring a client certificate (PKI from scripts/gen-certs).

Cases:
  1 the receiver is down while N messages arrive and stays down for a while;
    every message is ACKed AA meanwhile; once it is up everything arrives
    exactly once, each patient's messages in send order
  2 kill -9 of the engine while the queue drains, several times: every
    message the engine ACKed reaches the receiver (resends keep their
    control id; nothing arrives that was not sent)
  3 per-key order while the receiver fails random first attempts (AE, a
    dropped connection, no answer): nothing lost, each patient's messages
    tried and delivered strictly in send order
  4 HTTP over mutual TLS: 200 delivered (a script's Lua table arrives as
    application/json with the bearer token), 503 and a timeout retried until
    delivered, 404 dead at once; `queue retry` / `queue drop` on a running
    engine
  5 operator commands: `queue ls` against the store, `replay --to --id` on a
    running engine, `queue retry --dead` with the engine stopped
  6 disk full (the store on a small tmpfs; needs root to mount, skipped
    otherwise): new messages are refused with AR "message store
    unavailable, resend later" on connections that stay open, nothing
    ACKed AA is lost, and once space returns the same engine accepts new
    messages and the resent refused ones and delivers everything

Environment: RR_QUEUE_TEST_MESSAGES (case 1, default 10000),
RR_QUEUE_DOWN_SECONDS (case 1, default 120), RR_QUEUE_KILL_TRIALS (case 2,
default 3), RR_QUEUE_ORDER_KEYS and RR_QUEUE_ORDER_PER_KEY (case 3, default
100 x 100), RR_QUEUE_SEED (case 3's failure pattern, default random and
printed). Each case prints one summary line. Synchronisation is by condition
with a deadline (log lines, store queries, receiver output), never by a
fixed sleep; case 1's outage is a duration the scenario asks for.

Runs on /usr/bin/python3 (python3-hl7 parses the ACKs); stdlib unittest.
Ends with "N passed, M failed, K skipped"; exit status 0 when nothing
failed, 1 otherwise, 2 on a usage error.
"""
import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import hl7

RADRELAY = None  # set from the command line
GEN_CERTS = None
NODE = None
PKI = None  # folder with the test PKI, made once

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers")
SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
HOST = "127.0.0.1"
IO_TIMEOUT = 30.0  # seconds any single socket operation may block
SENDER_CONNECTIONS = 8


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v else default


def env_float(name, default):
    v = os.environ.get(name)
    return float(v) if v else default


# ---- helpers (after tests/integration/test_engine_mllp.py) --------------------

def wait_for(predicate, timeout, what="condition"):
    """Polls predicate until it returns a true value (returned) or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)  # poll interval, not a synchronisation point


def frame(payload):
    return SB + payload + EB + CR


def read_frame(sock):
    """One MLLP frame's payload from a raw socket; EOFError on a closed stream."""
    buf = b""
    while not buf.endswith(EB + CR):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} bytes of a reply")
        buf += chunk
    if not buf.startswith(SB) or SB in buf[1:-2] or EB in buf[1:-2]:
        raise AssertionError(f"not one MLLP frame: {buf[:80]!r}")
    return buf[1:-2]


def set_os_timeouts(sock, seconds):
    """SO_RCVTIMEO/SO_SNDTIMEO: bounds blocking calls without socket timeout mode."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def free_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def msa(ack_payload):
    """(MSA-1, MSA-2) of an ACK, parsed by python-hl7."""
    try:
        s = hl7.parse(ack_payload.decode("latin-1")).segment("MSA")
    except Exception as e:  # noqa: BLE001 - any failure is a test failure
        raise AssertionError(f"ACK does not parse with python-hl7 ({e!r}): {ack_payload!r}")
    return str(s[1]), str(s[2])


def make_msg(control_id, mrn):
    return (f"MSH|^~\\&|RR_TEST_SND|RR_TEST_FAC|RADRELAY|RR_TEST_RCV|20240315083000||ADT^A01|"
            f"{control_id}|P|2.5.1\r"
            f"EVN||20240315082955\r"
            f"PID|1||{mrn}^^^RR_TEST_FAC^MR||ZZTEST^PATIENT||19700101|M\r").encode()


def make_padded_msg(control_id, mrn, size=1024):
    """make_msg with an NTE segment that brings it to about size bytes."""
    base = make_msg(control_id, mrn)
    text = ("STORE FILLER " * (size // 13 + 1))[:max(0, size - len(base) - 9)]
    return base + f"NTE|1||{text}\r".encode()


def mount_tmpfs(path, mib):
    """Mounts a tmpfs of mib MiB on path (made if missing); None when done,
    else why it could not be (not root, no mount privilege)."""
    if os.geteuid() != 0:
        return "not root: mounting a tmpfs needs root"
    if not shutil.which("mount") or not shutil.which("umount"):
        return "mount/umount not found"
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0750", "tmpfs", path],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"mount -t tmpfs failed ({r.returncode}): {r.stderr.strip()}"
    return None


def unmount(path):
    subprocess.run(["umount", path], capture_output=True, timeout=30)
    if not os.path.ismount(path):
        shutil.rmtree(path, ignore_errors=True)


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


LOG_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def log_fields(line):
    return {k: v.strip('"') for k, v in LOG_KV.findall(line)}


ROUTE_ALL = """
function on_message(msg, ctx)
  ctx:route("out", msg)
end
"""


def mllp_dest(port, **kw):
    d = {"type": "mllp", "host": HOST, "port": port}
    d.update(kw)
    return d


def channel(name, destinations, script="route.lua"):
    return {"name": name, "source": {"type": "mllp", "host": HOST, "port": 0},
            "accept": ["ADT^A01"], "hl7": {"strict": False}, "script": script,
            "destinations": destinations}


# ---- the engine -------------------------------------------------------------

class Engine:
    """One `radrelay run` process with its own configuration folder; the store
    stays across restarts."""

    def __init__(self, workdir, channels, scripts):
        self.dir = workdir
        self.store = os.path.join(workdir, "store", "radrelay.db")
        self.config = os.path.join(workdir, "radrelay.json")
        chdir = os.path.join(workdir, "channels")
        os.makedirs(chdir, exist_ok=True)
        for name, text in scripts.items():
            with open(os.path.join(chdir, name), "w") as f:
                f.write(text)
        self.names, self.queues = [], []
        for ch in channels:
            with open(os.path.join(chdir, ch["name"] + ".json"), "w") as f:
                json.dump(ch, f, indent=2)
            self.names.append(ch["name"])
            self.queues += [f"{ch['name']}.{d}" for d in ch.get("destinations", {})]
        with open(self.config, "w") as f:
            json.dump({"store": {"path": "store/radrelay.db"}, "channels": "channels",
                       "log": {"level": "info"}}, f, indent=2)
        self.proc = None
        self.lines = []
        self.cond = threading.Condition()
        self.ports = {}
        self.reports = []  # sanitizer lines of earlier runs (kill -9 clears lines)

    def start(self, timeout=30):
        self.reports += self.sanitizer_reports()
        self.lines = []
        self.ports = {}
        self.proc = subprocess.Popen([RADRELAY, "run", "-c", self.config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()

        def ready():
            ready_queues = set()
            for line in self.snapshot():
                f = log_fields(line)
                if f.get("event") == "ready":
                    self.ports[f.get("channel")] = int(f.get("port", "0"))
                elif f.get("event") == "destination_ready":
                    ready_queues.add(f.get("destination"))
            if self.proc.poll() is not None:
                raise AssertionError(f"radrelay exited with {self.proc.returncode} before "
                                     f"ready:\n{self.tail()}")
            return all(n in self.ports for n in self.names) and ready_queues >= set(self.queues)

        wait_for(ready, timeout, f"event=ready of {self.names} and {self.queues}")
        return self

    def _read(self, proc):
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
        proc.stderr.close()

    def port(self, name=None):
        return self.ports[name or self.names[0]]

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def snapshot(self):
        with self.cond:
            return list(self.lines)

    def tail(self, n=40):
        return "\n".join(self.snapshot()[-n:])

    def logged(self, *needles):
        return [l for l in self.snapshot() if all(x in l for x in needles)]

    def wait_log(self, *needles, timeout=15, count=1):
        return wait_for(lambda: len(self.logged(*needles)) >= count and self.logged(*needles),
                        timeout, f"{count} log line(s) with {needles}")

    def sanitizer_reports(self):
        return [l for l in self.snapshot()
                if "AddressSanitizer" in l or "LeakSanitizer" in l or "runtime error:" in l]

    def stop(self, timeout=20):
        """SIGTERM; the exit status (None if it had to be killed)."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self.reader.join(10)
        return rc

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(10)

    def cleanup(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    # -- the store (read beside the running engine: SQLite allows it) --
    def sql(self, query, args=()):
        db = sqlite3.connect(self.store, timeout=10)
        try:
            return db.execute(query, args).fetchall()
        finally:
            db.close()

    def scalar(self, query, args=()):
        return self.sql(query, args)[0][0]

    def queue_counts(self, dest=None):
        """{"pending": n, "dead": m} of one queue (or all)."""
        rows = self.sql("SELECT state, count(*) FROM queue WHERE ?1 IS NULL OR destination = ?1"
                        " GROUP BY state", (dest,))
        out = {"pending": 0, "dead": 0}
        out.update(dict(rows))
        return out

    def outcomes(self, dest, queue_id=None):
        return [r[0] for r in self.sql(
            "SELECT outcome FROM deliveries WHERE destination = ?1"
            " AND (?2 IS NULL OR queue_id = ?2) ORDER BY id", (dest, queue_id))]

    def cli(self, *args):
        return subprocess.run([RADRELAY, *args, "-c", self.config], capture_output=True,
                              text=True, timeout=60)


# ---- receivers ----------------------------------------------------------------

MSG_LINE = re.compile(r"^msg conn=(\d+) id=(\S*)(?: answer=(\S+))?")


class Peer:
    """A receiving peer process that prints `ready port=N` and one
    `msg conn=K id=ID [answer=A]` line per message (in arrival order)."""

    def __init__(self, argv, what):
        self.what = what
        self.msgs = []  # (conn, control id, answer or None)
        self.other = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        m = wait_for(lambda: self._ready() or self._exited(), 20, f"{what}: ready port=")
        self.port = int(m)

    def _exited(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.what} exited with {self.proc.returncode}: "
                                 f"{self.other} {getattr(self, 'err', b'')[-2000:]!r}")
        return None

    def _ready(self):
        with self.cond:
            for l in self.other:
                if l.startswith("ready port="):
                    return l.split("=", 1)[1]
        return None

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            m = MSG_LINE.match(line)
            with self.cond:
                if m:
                    self.msgs.append((int(m.group(1)), m.group(2), m.group(3)))
                else:
                    self.other.append(line)
        self.proc.stdout.close()

    def _drain_stderr(self):
        self.err = b""
        for raw in self.proc.stderr:
            self.err = (self.err + raw)[-8000:]
        self.proc.stderr.close()

    def ids(self):
        with self.cond:
            return [m[1] for m in self.msgs]

    def snapshot(self):
        with self.cond:
            return list(self.msgs)

    def count(self):
        with self.cond:
            return len(self.msgs)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def node_modules():
    return os.environ.get("RR_PEERS_MODULES") or os.path.join(HERE, "..", "peers", "node_modules")


def npm_peer_missing():
    """Why the npm MLLP peer cannot run here, or None."""
    if not NODE or not shutil.which(NODE):
        return f"node not found ({NODE!r}); scripts/setup installs it"
    if not os.path.isdir(os.path.join(node_modules(), "@medplum", "hl7")):
        return (f"npm package @medplum/hl7 not found in {node_modules()} "
                f"(scripts/setup runs npm ci in tests/peers; or set RR_PEERS_MODULES)")
    return None


# ---- senders ------------------------------------------------------------------

def workload(prefix, nkeys, total, nconn=SENDER_CONNECTIONS):
    """total messages over nkeys patients, interleaved (message j is for
    patient j % nkeys). Patient k's messages all go over connection k % nconn,
    so their send order is their order of arrival at the engine.
    Returns (per-connection lists of (control id, mrn), {mrn: [ids in order]})."""
    conns = [[] for _ in range(nconn)]
    order = collections.defaultdict(list)
    for j in range(total):
        k = j % nkeys
        mrn = f"MRN{k:05d}"
        cid = f"{prefix}-{j:07d}"
        conns[k % nconn].append((cid, mrn))
        order[mrn].append(cid)
    return conns, order


class Senders:
    """One thread per connection, stop-and-wait: send a message, read its ACK.
    A thread ends at the end of its list, on stop, or when the engine goes
    away (a connection error is expected only where the test kills it)."""

    def __init__(self, port, conns, stop=None, make=make_msg):
        self.make = make  # (control id, mrn) -> the message's bytes
        self.lock = threading.Lock()
        self.sent, self.acked, self.naks, self.errors = [], [], [], []
        self.stop = stop or threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(port, c), daemon=True)
                        for c in conns if c]
        for t in self.threads:
            t.start()

    def _run(self, port, msgs):
        try:
            with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as s:
                s.settimeout(None)
                set_os_timeouts(s, IO_TIMEOUT)
                for cid, mrn in msgs:
                    if self.stop.is_set():
                        return
                    with self.lock:
                        self.sent.append(cid)
                    s.sendall(frame(self.make(cid, mrn)))
                    code, ref = msa(read_frame(s))
                    with self.lock:
                        if (code, ref) == ("AA", cid):
                            self.acked.append(cid)
                        else:
                            self.naks.append((cid, code, ref))
        except (OSError, EOFError) as e:
            with self.lock:
                self.errors.append(repr(e))

    def join(self, timeout=600):
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def nacked(self):
        with self.lock:
            return len(self.acked)


def first_order_by_key(received, key_of):
    """{key: [control ids in order of first arrival]}."""
    seen, out = set(), collections.defaultdict(list)
    for cid in received:
        if cid in seen or cid not in key_of:
            continue
        seen.add(cid)
        out[key_of[cid]].append(cid)
    return out


def order_violations(got, want, limit=5):
    """Keys whose order in got differs from want (both {key: [ids]})."""
    bad = []
    for k in sorted(want):
        if got.get(k, []) != want[k]:
            g, w = got.get(k, []), want[k]
            i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            bad.append(f"{k}: at #{i} got {g[i:i + 3]} want {w[i:i + 3]}")
            if len(bad) >= limit:
                break
    return bad


def summary(case, **kv):
    print(f"\n[test_queues] {case}: " + " ".join(f"{k}={v}" for k, v in kv.items()),
          flush=True)


# ---- the cases ----------------------------------------------------------------

class QueueTest(unittest.TestCase):
    maxDiff = 4000

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="rr-q-")
        self.engines, self.peers = [], []
        self.t0 = time.monotonic()

    def tearDown(self):
        for p in self.peers:
            p.stop()
        for e in self.engines:
            e.cleanup()
        self.tmp.cleanup()

    def engine(self, channels, scripts=None):
        e = Engine(self.tmp.name, channels, scripts or {"route.lua": ROUTE_ALL})
        self.engines.append(e)
        return e

    def npm_peer(self, port=0):
        why = npm_peer_missing()
        if why:
            self.skipTest(why)
        p = Peer([NODE, os.path.join(PEERS, "mllp_peer.mjs"), "--port", str(port),
                  "--modules", node_modules()], "npm MLLP peer")
        self.peers.append(p)
        return p

    def stop_ok(self, e):
        rc = e.stop()
        self.assertEqual(rc, 0, f"radrelay did not exit 0 on SIGTERM:\n{e.tail()}")
        self.assertEqual(e.reports + e.sanitizer_reports(), [])

    def send_all(self, e, conns, timeout=900, make=make_msg):
        s = Senders(e.port(), conns, make=make)
        self.assertTrue(s.join(timeout), "senders did not finish")
        self.assertEqual(s.errors, [], f"connection errors while sending:\n{e.tail()}")
        self.assertEqual(s.naks, [], "negative ACKs")
        return s

    def wait_drained(self, e, timeout, dest=None):
        """Waits until the queue (or one destination's) holds no row at all."""
        def empty():
            if not e.alive():
                raise AssertionError(f"radrelay exited with {e.proc.returncode}:\n{e.tail()}")
            return e.scalar("SELECT count(*) FROM queue WHERE ?1 IS NULL OR destination = ?1",
                            (dest,)) == 0
        wait_for(empty, timeout, f"an empty queue ({e.queue_counts(dest)} left)")

    # ---- 1 ------------------------------------------------------------------
    def test_1_downstream_down_then_up(self):
        """The receiver is down while N messages (100 patients, interleaved,
        over 8 connections) arrive and for RR_QUEUE_DOWN_SECONDS from the first
        one: every message is ACKed AA, nothing is delivered nor dead-lettered
        meanwhile. Then the npm peer starts on the destination's port: every
        control id arrives exactly once and each patient's in send order."""
        n = env_int("RR_QUEUE_TEST_MESSAGES", 10000)
        down = env_float("RR_QUEUE_DOWN_SECONDS", 120.0)
        why = npm_peer_missing()
        if why:
            self.skipTest(why)
        port = free_port()
        # max_attempts 0: a two-minute outage must not dead-letter anything
        # (with 1 s breaker probes a head would use up the default 10).
        e = self.engine([channel("orders", {"out": mllp_dest(
            port, concurrency=4, max_attempts=0, backoff_base_ms=100, backoff_max_ms=1000,
            breaker_failures=5, breaker_open_ms=1000, connect_timeout_ms=2000)})]).start()
        conns, order = workload("DOWN", 100, n)
        t_start = time.monotonic()
        s = self.send_all(e, conns)
        self.assertEqual(len(s.acked), n)
        t_sent = time.monotonic() - t_start
        e.wait_log("event=breaker", "destination=orders.out", "state=open")
        # The outage itself: a duration the scenario asks for, not a
        # synchronisation. The engine must stay up throughout.
        while time.monotonic() < t_start + down:
            self.assertTrue(e.alive(), f"radrelay died during the outage:\n{e.tail()}")
            time.sleep(0.2)
        self.assertEqual(e.queue_counts(), {"pending": n, "dead": 0},
                         "after the outage every message waits in the queue")
        self.assertEqual(e.scalar("SELECT count(*) FROM deliveries WHERE outcome = 'delivered'"),
                         0)
        t_up = time.monotonic()
        peer = self.npm_peer(port)
        self.wait_drained(e, max(60.0, n / 50))
        wait_for(lambda: peer.count() >= n, 30, f"{n} messages at the peer")
        t_drain = time.monotonic() - t_up
        got = peer.ids()
        counts = collections.Counter(got)
        self.assertEqual(sorted(set(got)), sorted(s.acked), "the control ids received")
        twice = [c for c, k in counts.items() if k > 1]
        self.assertEqual(twice[:10], [], f"{len(twice)} control ids received more than once")
        key_of = {c: k for k, ids in order.items() for c in ids}
        self.assertEqual(order_violations(first_order_by_key(got, key_of), order), [],
                         "per-patient order at the receiver")
        delivered = e.scalar("SELECT count(*) FROM deliveries WHERE outcome = 'delivered'")
        retries = e.scalar("SELECT count(*) FROM deliveries WHERE outcome = 'retry'")
        self.assertEqual(delivered, n)
        self.assertTrue(e.logged("event=breaker", "destination=orders.out", "state=closed"),
                        "the breaker closes once the receiver is up")
        self.stop_ok(e)
        summary("case 1 down_then_up", messages=n, keys=100, connections=SENDER_CONNECTIONS,
                send_s=f"{t_sent:.1f}", down_s=f"{t_up - t_start:.1f}",
                drain_s=f"{t_drain:.1f}", retries=retries,
                breaker_opens=len(e.logged("event=breaker", "state=open")),
                seconds=f"{time.monotonic() - self.t0:.1f}")

    # ---- 2 ------------------------------------------------------------------
    def test_2_kill9_while_draining(self):
        """kill -9 while the queue drains to a live receiver, several times,
        while senders keep sending: every control id the engine ACKed AA
        reaches the receiver at least once; nothing arrives that was not sent;
        each patient's messages first arrive in send order."""
        trials = env_int("RR_QUEUE_KILL_TRIALS", 3)
        nkeys, nconn = 40, 4
        peer = self.npm_peer()
        e = self.engine([channel("orders", {"out": mllp_dest(
            peer.port, concurrency=2, max_attempts=0, backoff_base_ms=50, backoff_max_ms=500,
            breaker_open_ms=500)})])
        sent, acked, order = [], set(), collections.defaultdict(list)
        key_of, at_kill = {}, []
        for t in range(trials):
            e.start()
            base = peer.count()
            conns = [[] for _ in range(nconn)]
            for j in range(50000):  # more than any trial sends before its kill
                k = j % nkeys
                # LATE-2-: the npm peer answers after 2 ms, so that deliveries
                # (two at a time) fall behind the senders and rows pile up.
                cid = f"LATE-2-KILL{t}-{j:06d}"
                key_of[cid] = f"MRN{k:05d}"
                conns[k % nconn].append((cid, key_of[cid]))
            s = Senders(e.port(), conns)
            # Kill once deliveries are under way and rows are still queued.
            wait_for(lambda: (peer.count() >= base + 200
                              and e.scalar("SELECT count(*) FROM queue") >= 100)
                     or not e.alive(), 60, f"trial {t + 1}: deliveries under way")
            self.assertTrue(e.alive(), f"radrelay exited with {e.proc.returncode}:\n{e.tail()}")
            queued = e.scalar("SELECT count(*) FROM queue")
            e.kill9()
            s.stop.set()
            self.assertTrue(s.join(IO_TIMEOUT + 5), "a sender did not notice the kill")
            self.assertEqual(s.naks, [])
            at_kill.append((queued, s.nacked(), peer.count() - base))
            self.assertGreater(queued, 0, "killed while the queue drains")
            sent += s.sent
            acked |= set(s.acked)
            for cid in s.sent:  # per connection in order; patients do not span connections
                order[key_of[cid]].append(cid)
        e.start()
        self.wait_drained(e, 120)
        # The last delivery's ACK reached the engine; its stdout line precedes it.
        wait_for(lambda: acked <= set(peer.ids()), 10, "every ACKed message at the peer")
        self.stop_ok(e)
        got = peer.ids()
        lost = sorted(acked - set(got))
        self.assertEqual(lost[:10], [], f"{len(lost)} ACKed messages never reached the peer")
        strangers = sorted(set(got) - set(sent))
        self.assertEqual(strangers[:10], [], "received control ids that were never sent")
        # Sent but not ACKed (in flight at a kill) may have been kept or not;
        # per-patient order of first arrivals must still be the send order.
        arrived = set(got)
        want = {k: [c for c in ids if c in arrived] for k, ids in order.items()}
        self.assertEqual(order_violations(first_order_by_key(got, key_of), want), [],
                         "per-patient order of first arrivals")
        dups = len(got) - len(set(got))
        summary("case 2 kill9", trials=trials, acked=len(acked), received=len(got),
                duplicates=dups, at_kills="/".join(f"queued={q},acked={a},delivered={d}"
                                                  for q, a, d in at_kill),
                retries=e.scalar("SELECT count(*) FROM deliveries WHERE outcome = 'retry'"),
                seconds=f"{time.monotonic() - self.t0:.1f}")

    # ---- 3 ------------------------------------------------------------------
    def test_3_per_key_order_with_failures(self):
        """The receiver fails ~10% of first attempts (AE, closing the
        connection, or no answer at all) and takes every resend. Nothing is
        lost, every message is accepted exactly once, and each patient's
        messages are tried and delivered strictly in send order: a patient's
        next message is never tried before the one before it was accepted.
        A scripted peer (flaky_mllp_peer.py): the npm server answers the same
        way every time for an id, so it cannot fail transiently."""
        nkeys = env_int("RR_QUEUE_ORDER_KEYS", 100)
        per = env_int("RR_QUEUE_ORDER_PER_KEY", 100)
        seed = os.environ.get("RR_QUEUE_SEED") or str(random.randrange(1 << 30))
        n = nkeys * per
        # AE and closed connections 9:9:1 to no answer at all: each silent
        # attempt costs the ACK timeout, kept at 1 s so that a loop stalled
        # by a slow disk does not time out an AA that did arrive.
        modes = ",".join(["ae"] * 9 + ["close"] * 9 + ["silent"])
        peer = Peer([sys.executable, os.path.join(PEERS, "flaky_mllp_peer.py"),
                     "--fail-rate", "0.1", "--seed", seed, "--modes", modes],
                    "flaky MLLP peer")
        self.peers.append(peer)
        e = self.engine([channel("orders", {"out": mllp_dest(
            peer.port, concurrency=8, max_attempts=0, ack_timeout_ms=1000, backoff_base_ms=20,
            backoff_max_ms=200, breaker_failures=5, breaker_open_ms=200)})]).start()
        conns, order = workload("ORD", nkeys, n)
        s = self.send_all(e, conns)
        self.assertEqual(len(s.acked), n)
        self.wait_drained(e, max(120.0, n / 40))
        wait_for(lambda: sum(1 for m in peer.snapshot() if m[2] == "AA") >= n, 30,
                 f"{n} accepted messages at the peer (seed {seed})")
        msgs = peer.snapshot()
        accepted = collections.Counter(cid for _, cid, a in msgs if a == "AA")
        self.assertEqual(sorted(accepted), sorted(s.acked), f"accepted ids (seed {seed})")
        twice = [c for c, k in accepted.items() if k > 1]
        self.assertEqual(twice[:10], [], f"accepted more than once (seed {seed})")
        key_of = {c: k for k, ids in order.items() for c in ids}
        # Every attempt of a patient is for its oldest message not yet accepted.
        head = {k: 0 for k in order}
        wrong = []
        for _, cid, answer in msgs:
            k = key_of[cid]
            expect = order[k][head[k]] if head[k] < len(order[k]) else None
            if cid != expect and len(wrong) < 5:
                wrong.append(f"{k}: tried {cid} while {expect} was not yet accepted")
            if cid == expect and answer == "AA":
                head[k] += 1
        self.assertEqual(wrong, [], f"per-patient attempt order (seed {seed})")
        accepted_order = first_order_by_key([c for _, c, a in msgs if a == "AA"], key_of)
        self.assertEqual(order_violations(accepted_order, order), [])
        failures = collections.Counter(a for _, _, a in msgs if a != "AA")
        retries = e.scalar("SELECT count(*) FROM deliveries WHERE outcome = 'retry'")
        self.assertGreater(sum(failures.values()), 0, "the peer failed nothing")
        self.assertEqual(retries, sum(failures.values()),
                         f"one retry row per failed attempt {dict(failures)}")
        self.assertEqual(e.scalar("SELECT count(*) FROM deliveries WHERE outcome = 'delivered'"),
                         n)
        self.stop_ok(e)
        summary("case 3 per_key_order", messages=n, keys=nkeys, seed=seed,
                failures="/".join(f"{k}={v}" for k, v in sorted(failures.items())),
                retries=retries, seconds=f"{time.monotonic() - self.t0:.1f}")

    # ---- 4 ------------------------------------------------------------------
    def test_4_http_over_mutual_tls(self):
        """HTTP destinations against https_peer.py (client certificate
        required): a Lua table arrives as application/json with the bearer
        token from the file; 503 twice then 200: two retries then delivered;
        a timeout: retried then delivered; 404: dead at once. `queue retry`
        on the running engine re-sends the dead letter (dead again: still
        404), `queue drop` removes it."""
        pki = PKI
        peer = Peer([sys.executable, os.path.join(PEERS, "https_peer.py"),
                     "--cert", os.path.join(pki, "server.pem"),
                     "--key", os.path.join(pki, "server.key"),
                     "--ca", os.path.join(pki, "ca.pem")], "HTTPS peer")
        self.peers.append(peer)
        token = f"tok-{random.randrange(1 << 40):x}"
        token_file = os.path.join(self.tmp.name, "token")
        with open(token_file, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)
        tls = {"ca": os.path.join(pki, "ca.pem"), "cert": os.path.join(pki, "client.pem"),
               "key": os.path.join(pki, "client.key")}
        base = f"https://localhost:{peer.port}"

        def http(path, **kw):
            d = {"type": "http", "url": base + path, "tls": tls, "bearer_token_file": token_file,
                 "backoff_base_ms": 50, "backoff_max_ms": 200, "breaker_failures": 0,
                 "max_attempts": 0}
            d.update(kw)
            return d

        dests = {"ok": http("/echo"), "flaky": http("/flaky/2/503"),
                 "slow": http("/flaky/1/delay-4000", timeout_ms=1000), "gone": http("/status/404")}
        script = """
function on_message(msg, ctx)
  local id = msg:get("MSH-10")
  local dest = id:match("^H%-(%a+)%-")
  ctx:route(dest, {control_id = id, mrn = msg:get("PID-3.1"), note = "queued over https"})
end
"""
        e = self.engine([channel("h", dests)], {"route.lua": script}).start()
        ids = {d: f"H-{d}-1" for d in dests}
        self.send_all(e, [[(ids[d], f"MRN-{d}")] for d in dests])
        for d in ("ok", "flaky", "slow"):
            self.wait_drained(e, 30, f"h.{d}")
        wait_for(lambda: e.queue_counts("h.gone") == {"pending": 0, "dead": 1}, 30,
                 "the 404 dead-lettered")

        def requests(path):
            ctx = ssl.create_default_context(cafile=tls["ca"])
            ctx.load_cert_chain(tls["cert"], tls["key"])
            with urllib.request.urlopen(base + "/requests", context=ctx, timeout=10) as r:
                return [q for q in json.load(r) if q["path"] == path]

        (ok,) = requests("/echo")
        self.assertEqual((ok["method"], ok["content_type"], ok["authorization"]),
                         ("POST", "application/json", f"Bearer {token}"))
        self.assertEqual(json.loads(ok["body"]), {"control_id": ids["ok"], "mrn": "MRN-ok",
                                                  "note": "queued over https"})
        self.assertEqual(e.outcomes("h.ok"), ["delivered"])
        # every history row names its message
        self.assertEqual(e.sql("SELECT count(*) FROM deliveries d LEFT JOIN messages m"
                               " ON m.id = d.message_id WHERE d.queue_id > 0 AND m.id IS NULL"),
                         [(0,)])
        self.assertEqual(len(requests("/flaky/2/503")), 3)
        self.assertEqual(e.outcomes("h.flaky"), ["retry", "retry", "delivered"])
        self.assertEqual({r[0] for r in e.sql("SELECT detail FROM deliveries WHERE destination ="
                                              " 'h.flaky' AND outcome = 'retry'")}, {"HTTP 503"})
        self.assertEqual(len(requests("/flaky/1/delay-4000")), 2)
        self.assertEqual(e.outcomes("h.slow"), ["retry", "delivered"])
        (detail,) = e.sql("SELECT detail FROM deliveries WHERE destination = 'h.slow'"
                          " AND outcome = 'retry'")[0]
        self.assertRegex(detail.lower(), r"time", "the retry says it timed out")
        # 404: dead at the first attempt
        ((qid, attempts, err),) = e.sql("SELECT id, attempts, last_error FROM queue"
                                        " WHERE destination = 'h.gone' AND state = 'dead'")
        self.assertEqual(attempts, 1)
        self.assertEqual(e.outcomes("h.gone"), ["dead"])
        self.assertEqual(len(requests("/status/404")), 1)
        e.wait_log("event=dead_letter", "destination=h.gone", f"queue_id={qid}")
        # an operator retries it on the running engine: requeued, sent again, dead again
        r = e.cli("queue", "retry", "h.gone", str(qid))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("handed to the running engine", r.stdout)
        e.wait_log("event=operator_request", "op=retry", "destination=h.gone",
                   f"queue_id={qid}", "result=ok")
        wait_for(lambda: e.outcomes("h.gone", qid) == ["dead", "requeued", "dead"], 15,
                 f"the retried 404 dead again ({e.outcomes('h.gone', qid)})")
        self.assertEqual(len(requests("/status/404")), 2)
        # and drops it
        r = e.cli("queue", "drop", "h.gone", str(qid))
        self.assertEqual(r.returncode, 0, r.stderr)
        e.wait_log("event=operator_request", "op=drop", f"queue_id={qid}", "result=ok")
        wait_for(lambda: e.queue_counts("h.gone") == {"pending": 0, "dead": 0}, 15,
                 "the dropped row gone from the store")
        self.assertEqual(e.outcomes("h.gone", qid), ["dead", "requeued", "dead", "dropped"])
        # a replay runs the script again: the destination gets what the
        # script routes (the JSON), not the raw HL7
        (mid,) = e.sql("SELECT id FROM messages WHERE control_id = ?", (ids["ok"],))[0]
        r = e.cli("replay", "--to", "h.ok", "--id", str(mid))
        self.assertEqual(r.returncode, 0, r.stderr)
        e.wait_log("event=replay", f"message_id={mid}", "destination=h.ok", "queued=1")
        wait_for(lambda: len(requests("/echo")) == 2, 15, "the replayed delivery")
        again = requests("/echo")[1]
        self.assertEqual(again["content_type"], "application/json")
        self.assertEqual(json.loads(again["body"]), json.loads(ok["body"]))
        self.stop_ok(e)
        summary("case 4 https", destinations=len(dests),
                requests=sum(len(requests(p)) for p in ("/echo", "/flaky/2/503",
                                                        "/flaky/1/delay-4000", "/status/404")),
                retries=e.scalar("SELECT count(*) FROM deliveries WHERE outcome = 'retry'"),
                seconds=f"{time.monotonic() - self.t0:.1f}")

    # ---- 5 ------------------------------------------------------------------
    def test_5_operator_commands(self):
        """With the receiver down and max_attempts 1, each patient's first
        message is dead-lettered and its later ones wait behind it:
        `queue ls` shows the store's pending and dead counts. With the engine
        stopped, `queue retry --dead` requeues them in the store, and the next
        start delivers everything in per-patient order. `replay --to --id` on
        the running engine delivers a message once more."""
        why = npm_peer_missing()
        if why:
            self.skipTest(why)
        port = free_port()
        e = self.engine([channel("ops", {"out": mllp_dest(
            port, max_attempts=1, breaker_failures=0, backoff_base_ms=50,
            backoff_max_ms=100)})]).start()
        # patients A (3 messages), B (2), C (1): three heads dead, three waiting
        msgs = [("OPS-1", "MRNA"), ("OPS-2", "MRNB"), ("OPS-3", "MRNC"), ("OPS-4", "MRNA"),
                ("OPS-5", "MRNB"), ("OPS-6", "MRNA")]
        self.send_all(e, [msgs])
        e.wait_log("event=dead_letter", "destination=ops.out", count=3)
        wait_for(lambda: e.queue_counts("ops.out") == {"pending": 3, "dead": 3}, 10,
                 f"3 pending, 3 dead ({e.queue_counts('ops.out')})")
        r = e.cli("queue", "ls")
        self.assertEqual(r.returncode, 0, r.stderr)
        rows = {l.split()[0]: l.split()[1:] for l in r.stdout.splitlines()[1:] if l.strip()}
        self.assertIn("ops.out", rows, r.stdout)
        kind, pending, dead = rows["ops.out"][:3]
        store = e.queue_counts("ops.out")
        self.assertEqual((kind, int(pending), int(dead)), ("mllp", store["pending"], store["dead"]),
                         r.stdout)
        r = e.cli("queue", "show", "ops.out", "--dead")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(sorted(re.findall(r"OPS-\d", r.stdout)), ["OPS-1", "OPS-2", "OPS-3"],
                         r.stdout)
        self.stop_ok(e)
        # engine stopped: the command changes the store for the next start
        r = e.cli("queue", "retry", "ops.out", "--dead")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("changed in the store", r.stdout)
        self.assertEqual(e.queue_counts("ops.out"), {"pending": 6, "dead": 0})
        self.assertEqual(e.scalar("SELECT count(*) FROM deliveries WHERE outcome = 'requeued'"),
                         1)
        peer = self.npm_peer(port)
        e.start()
        self.wait_drained(e, 30)
        wait_for(lambda: peer.count() >= 6, 10, "six messages at the peer")
        got = peer.ids()
        self.assertEqual(sorted(got), [m[0] for m in msgs])
        self.assertEqual([c for c in got if c in ("OPS-1", "OPS-4", "OPS-6")],
                         ["OPS-1", "OPS-4", "OPS-6"], "patient A in order")
        self.assertEqual([c for c in got if c in ("OPS-2", "OPS-5")], ["OPS-2", "OPS-5"])
        # replay one message on the running engine
        (mid,) = e.sql("SELECT id FROM messages WHERE control_id = 'OPS-4'")[0]
        r = e.cli("replay", "--to", "ops.out", "--id", str(mid))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("handed to the running engine", r.stdout)
        e.wait_log("event=operator_request", "op=replay", f"message_id={mid}", "result=ok")
        wait_for(lambda: peer.ids().count("OPS-4") == 2, 15, "OPS-4 delivered once more")
        self.wait_drained(e, 15)
        self.assertEqual(peer.count(), 7)
        self.stop_ok(e)
        summary("case 5 operator", messages=len(msgs), replayed=1,
                seconds=f"{time.monotonic() - self.t0:.1f}")

    # ---- 6 ------------------------------------------------------------------
    def test_6_disk_full(self):
        """Disk full on a small tmpfs: refused, not lost; resumes. The store
        is on a 16 MiB tmpfs; a filler file leaves 6 MiB of it while the
        destination is down, so the messages and the queue both grow (each
        ~1 KB message is kept twice: raw and routed). Senders keep going
        until every connection has had refusals: each is AR for its control
        id, the connection stays open and answers the next message, a
        refused message is not in the store, every message ACKed AA is. The
        receiver starts while the disk is still full (delivery outcomes meet
        the full disk too). Then the filler goes: the same engine, not
        restarted, ACKs AA a new message on the connection that had the
        refusals, the resent refused messages and more; every message ACKed
        AA reaches the receiver and the queue empties in the store. The log
        names the failure (event=commit_failed ... full, event=not_stored);
        the store passes PRAGMA integrity_check. Skipped without root."""
        why = npm_peer_missing()
        if why:
            self.skipTest(why)
        mib, leave = 16, 6 << 20
        mnt = tempfile.mkdtemp(prefix="rr-q-tmpfs-")
        why = mount_tmpfs(mnt, mib)
        if why:
            os.rmdir(mnt)
            self.skipTest(f"the disk full case needs a small tmpfs: {why}")
        self.addCleanup(unmount, mnt)  # cleanups run after tearDown stopped the engine
        os.symlink(mnt, os.path.join(self.tmp.name, "store"))  # the engine's store folder
        port = free_port()  # the receiver is down at first
        e = self.engine([channel("full", {"out": mllp_dest(
            port, concurrency=2, max_attempts=0, backoff_base_ms=50, backoff_max_ms=300,
            breaker_failures=3, breaker_open_ms=300, connect_timeout_ms=1000)})]).start()
        acked, refused, mrn_of = set(), [], {}

        def alive():
            self.assertTrue(e.alive(), f"radrelay exited with {e.proc.returncode}:\n{e.tail()}")

        # One connection stays open through the whole case.
        keep = socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT)
        self.addCleanup(keep.close)
        keep.settimeout(None)
        set_os_timeouts(keep, IO_TIMEOUT)

        def send_kept(cid):
            mrn_of[cid] = "MRNKEEP"
            keep.sendall(frame(make_padded_msg(cid, "MRNKEEP")))
            ack = read_frame(keep)
            code, ref = msa(ack)
            self.assertEqual(ref, cid, f"MSA-2 of {ack!r}")
            if code == "AA":
                acked.add(cid)
            else:
                refused.append(cid)
            return code, ack

        self.assertEqual(send_kept("KEEP-0")[0], "AA")
        room = self.send_all(e, [[(f"ROOM-{c}-{j:04d}", f"MRNR{c}") for j in range(25)]
                                 for c in range(4)], make=make_padded_msg)
        acked |= set(room.acked)

        # Fill the tmpfs but for `leave` bytes, then send until every
        # connection has been refused a few times.
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb") as f:
            chunk, left = b"\xa5" * (1 << 20), free_bytes(mnt) - leave
            while left > 0:
                left -= f.write(chunk[:min(left, len(chunk))])
        nconn = 4
        conns = [[(f"FULL-{c}-{j:06d}", f"MRNF{c}{j % 5}") for j in range(50000)]
                 for c in range(nconn)]
        mrn_of.update((cid, mrn) for c in conns for cid, mrn in c)
        fill = Senders(e.port(), conns, make=make_padded_msg)

        def refused_on_every_connection():
            alive()
            with fill.lock:
                per = collections.Counter(cid.split("-")[1] for cid, _, _ in fill.naks)
                errors = list(fill.errors)
            self.assertEqual(errors, [], f"connection errors while the disk fills:\n{e.tail()}")
            return len(per) == nconn and min(per.values()) >= 3

        t_fill = time.monotonic()
        wait_for(refused_on_every_connection, 60,
                 f"3 refusals on each of {nconn} connections as the disk fills")
        fill.stop.set()
        self.assertTrue(fill.join(IO_TIMEOUT + 5), "a sender did not finish")
        t_fill = time.monotonic() - t_fill
        self.assertEqual(fill.errors, [], "connections stay open after a refusal")
        wrong = [n for n in fill.naks if n[1:] != ("AR", n[0])]
        self.assertEqual(wrong[:5], [], "each refusal is AR for the message's control id")
        acked |= set(fill.acked)
        refused += [cid for cid, _, _ in fill.naks]
        accepted_while_filling = len(fill.acked)
        # The kept connection: refused with the engine's reason, still open
        # after that (a commit can still succeed now and then; an AA is fine
        # as long as the message is in the store, checked below).
        naks = []
        for i in range(20):
            code, ack = send_kept(f"KEEP-F-{i}")
            if code != "AA":
                naks.append((code, ack))
            if len(naks) == 2:
                break
        self.assertEqual(len(naks), 2, "the kept connection refused twice while the disk is full")
        self.assertEqual([c for c, _ in naks], ["AR", "AR"], naks)
        self.assertIn(b"message store unavailable, resend later", naks[0][1])
        alive()
        # Refused means not kept; ACKed AA means kept.
        stored = {r[0] for r in e.sql("SELECT control_id FROM messages")}
        self.assertEqual(sorted(acked - stored)[:10], [], "ACKed AA but not in the store")
        self.assertEqual(sorted(set(refused) & stored)[:10], [], "refused but in the store")
        failed = e.wait_log("event=commit_failed")
        self.assertTrue(any("full" in log_fields(l).get("error", "").lower() for l in failed),
                        f"commit_failed names the full disk: {failed[:3]}")
        e.wait_log("event=not_stored", "channel=full")

        # The receiver comes up while the disk is still full: deliveries
        # go on, their outcome records meet the full disk.
        peer = self.npm_peer(port)
        wait_for(lambda: alive() or peer.count() >= min(50, len(acked)), 20,
                 "deliveries while the disk is full")
        delivered_while_full = peer.count()
        strangers = sorted(set(peer.ids()) - acked)
        self.assertEqual(strangers[:10], [], "delivered but never ACKed AA")
        commit_failed_while_full = len(e.logged("event=commit_failed"))
        alive()

        # Space returns: the same engine takes messages again.
        os.remove(filler)
        code, ack = send_kept("KEEP-AFTER")
        self.assertEqual(code, "AA", f"ENGINE: still refusing once space returned: {ack!r}\n"
                         f"{e.tail()}")
        groups = collections.defaultdict(list)  # resends keep their connection's order
        for cid in refused:
            groups[cid.rsplit("-", 1)[0]].append((cid, mrn_of[cid]))
        again = self.send_all(e, list(groups.values()), make=make_padded_msg)
        acked |= set(again.acked)
        more = self.send_all(e, [[(f"AFTER-{c}-{j:04d}", f"MRNA{c}") for j in range(25)]
                                 for c in range(4)], make=make_padded_msg)
        acked |= set(more.acked)
        # Nothing ACKed is lost: at the receiver, and the queue empties in
        # the store (each delivery's outcome committed once there is room).
        wait_for(lambda: alive() or acked <= set(peer.ids()), 30,
                 f"every message ACKed AA at the receiver "
                 f"({len(acked - set(peer.ids()))} of {len(acked)} missing)")
        stuck = None
        try:
            self.wait_drained(e, 30)
        except AssertionError as x:
            stuck = str(x)
        if stuck:
            left = e.sql("SELECT q.id, m.control_id FROM queue q JOIN messages m"
                         " ON m.id = q.message_id ORDER BY q.id LIMIT 5")
            self.fail(f"ENGINE: queue rows stay in the store after space returned, although "
                      f"the receiver has their messages (delivery outcome records lost on the "
                      f"full disk?): {stuck}; e.g. {left}\n{e.tail()}")
        stored = {r[0] for r in e.sql("SELECT control_id FROM messages")}
        self.assertEqual(sorted(acked - stored)[:10], [], "ACKed AA but not in the store")
        # One route per message: one queue row each, and each row's
        # delivered record committed (rows go once delivered, so count the
        # records' distinct queue ids).
        self.assertEqual(e.scalar("SELECT count(DISTINCT queue_id) FROM deliveries"
                                  " WHERE outcome = 'delivered'"), len(stored),
                         "queue rows with a committed 'delivered' record")
        got = peer.ids()
        self.assertEqual(sorted(set(got) - acked)[:10], [], "delivered but never ACKed AA")
        self.assertTrue(e.logged("event=record_failed", "destination=full.out"),
                        "the log names the outcome records that met the full disk")
        self.stop_ok(e)
        self.assertEqual(e.sql("PRAGMA integrity_check"), [("ok",)])
        summary("case 6 disk_full", tmpfs_mib=mib, left_mib=leave >> 20, acked=len(acked),
                accepted_while_filling=accepted_while_filling, refused=len(refused),
                fill_s=f"{t_fill:.1f}", delivered_while_full=delivered_while_full,
                commit_failed=commit_failed_while_full,
                record_failed=len(e.logged("event=record_failed")), received=len(got),
                duplicates=len(got) - len(set(got)),
                seconds=f"{time.monotonic() - self.t0:.1f}")

    # ---- 7 ------------------------------------------------------------------
    def test_7_retention(self):
        """store.retention_days: messages older than that go, with their
        history, and their pages go back to the file (page_count drops);
        kept regardless: status error, and messages whose delivery is still
        queued."""
        ch = channel("ret", {"out": mllp_dest(free_port(), breaker_failures=0,
                                              backoff_base_ms=1000, backoff_max_ms=5000)},
                     script="ret.lua")
        ch["on_script_error"] = "accept"
        e = self.engine([ch], {"ret.lua": RETENTION_SCRIPT}).start()
        old = [(f"P-{i}", f"MRN{i % 7}") for i in range(300)]
        keep = [(f"Q-{i}", f"MRNQ{i}") for i in range(5)] + [(f"ERR-{i}", "MRNE") for i in range(5)]
        self.send_all(e, [old, keep])
        self.stop_ok(e)
        self.assertEqual(e.scalar("SELECT count(*) FROM messages"), 310)
        # two days pass
        db = sqlite3.connect(e.store, timeout=10)
        db.execute("UPDATE messages SET received_ms = received_ms - 2 * 86400000")
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages_before = db.execute("PRAGMA page_count").fetchone()[0]
        db.close()
        with open(e.config) as f:
            cfg = json.load(f)
        cfg["store"]["retention_days"] = 1
        with open(e.config, "w") as f:
            json.dump(cfg, f)
        e.start()
        e.wait_log("event=pruned", "messages=300", timeout=30)
        left = {r[0] for r in e.sql("SELECT control_id FROM messages")}
        self.assertEqual(left, {cid for cid, _ in keep})
        self.assertEqual(e.scalar("SELECT count(*) FROM messages WHERE status = 'error'"), 5)
        self.assertEqual(e.scalar("SELECT count(*) FROM queue"), 5)
        self.stop_ok(e)
        db = sqlite3.connect(e.store, timeout=10)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages_after = db.execute("PRAGMA page_count").fetchone()[0]
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        db.close()
        # 300 of 310 messages go; what stays is mostly the schema's own
        # pages (a root page per table and index): at least 40% comes back
        self.assertLess(pages_after, pages_before * 0.6,
                        f"pages not given back: {pages_before} -> {pages_after}")
        summary("case 7 retention", pruned=300, kept=len(left), pages_before=pages_before,
                pages_after=pages_after, seconds=f"{time.monotonic() - self.t0:.1f}")

    # ---- 8 ------------------------------------------------------------------
    def test_8_channel_destination(self):
        """A destination of type channel: the payload is handled by the other
        channel as if it had arrived there (its own journal row, accept list
        and duplicate check); a message the other channel refuses (not on its
        accept list) is a dead letter at once; a replay reaches the other
        channel's duplicate check and is answered from its journal."""
        front = channel("front", {"back": {"type": "channel", "channel": "back"}},
                        script="front.lua")
        front["accept"] = ["ADT^A01", "ADT^A08"]
        back = {"name": "back", "source": {"type": "mllp", "host": HOST, "port": 0},
                "accept": ["ADT^A01"], "hl7": {"strict": False}}
        script = """
function on_message(msg, ctx)
  ctx:route("back", msg)
end
"""
        e = self.engine([front, back], {"front.lua": script}).start()
        msgs = [(f"CH-{i}", f"MRN{i % 3}") for i in range(20)]
        self.send_all(e, [msgs])
        self.wait_drained(e, 20, "front.back")
        got = e.sql("SELECT control_id FROM messages WHERE channel = 'back' ORDER BY id")
        self.assertEqual([r[0] for r in got], [cid for cid, _ in msgs])
        self.assertEqual(e.outcomes("front.back"), ["delivered"] * len(msgs))
        # an ADT^A08 the back channel does not accept: dead at once
        a08 = make_msg("CH-A08", "MRN9").replace(b"ADT^A01", b"ADT^A08")
        s = Senders(e.port("front"), [[("CH-A08", "MRN9")]], make=lambda cid, mrn: a08)
        self.assertTrue(s.join(30))
        self.assertEqual(s.naks, [])
        wait_for(lambda: e.queue_counts("front.back") == {"pending": 0, "dead": 1}, 15,
                 f"the refused one dead ({e.queue_counts('front.back')})")
        self.assertEqual(e.scalar("SELECT status FROM messages WHERE channel = 'back'"
                                  " AND control_id = 'CH-A08'"), "rejected")
        # a replay to the back channel: its duplicate check answers, nothing new
        (mid,) = e.sql("SELECT id FROM messages WHERE channel = 'front' AND control_id = 'CH-0'")[0]
        r = e.cli("replay", "--to", "front.back", "--id", str(mid))
        self.assertEqual(r.returncode, 0, r.stderr)
        e.wait_log("event=duplicate", "channel=back", "control_id=CH-0")
        self.assertEqual(e.scalar("SELECT count(*) FROM messages WHERE channel = 'back'"
                                  " AND control_id = 'CH-0'"), 1)
        self.stop_ok(e)
        summary("case 8 channel", messages=len(msgs) + 1,
                seconds=f"{time.monotonic() - self.t0:.1f}")


RETENTION_SCRIPT = """
function on_message(msg, ctx)
  local id = msg:get("MSH-10")
  if id:find("^ERR") then error("kept for review") end
  if id:find("^Q") then ctx:route("out", msg) return end
  ctx:filter("nothing to send")
end
"""


def main():
    global RADRELAY, GEN_CERTS, NODE, PKI
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--radrelay", default=os.environ.get("RADRELAY"))
    ap.add_argument("--gen-certs", default=os.path.join(HERE, "..", "..", "scripts", "gen-certs"))
    ap.add_argument("--node", default=shutil.which("node") or shutil.which("nodejs"))
    args, rest = ap.parse_known_args()
    if not args.radrelay or not os.access(args.radrelay, os.X_OK):
        print(f"radrelay binary not found: --radrelay PATH or RADRELAY "
              f"(got {args.radrelay!r})", file=sys.stderr)
        return 2
    if not os.access(args.gen_certs, os.X_OK):
        print(f"gen-certs not found: --gen-certs PATH (got {args.gen_certs!r})", file=sys.stderr)
        return 2
    RADRELAY = os.path.abspath(args.radrelay)
    GEN_CERTS = os.path.abspath(args.gen_certs)
    NODE = args.node
    if npm_peer_missing():
        print(f"note: cases with the npm MLLP peer are skipped: {npm_peer_missing()}",
              flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rr-q-pki-") as pki:
        PKI = os.path.join(pki, "pki")
        subprocess.run([GEN_CERTS, PKI], check=True)
        prog = unittest.main(module=__name__, argv=[sys.argv[0], "-v"] + rest, exit=False)
    r = prog.result
    bad = {getattr(t, "test_case", t).id() for t, _ in r.failures + r.errors}
    bad |= {t.id() for t in r.unexpectedSuccesses}
    skipped = {t.id() for t, _ in r.skipped} - bad
    passed = r.testsRun - len(bad) - len(skipped)
    print(f"took {time.monotonic() - t0:.1f}s", flush=True)
    print(f"{passed} passed, {len(bad)} failed, {len(skipped)} skipped", flush=True)
    return 0 if not bad and r.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""End-to-end tests of `radrelay run` over MLLP, with a third-party client.

    /usr/bin/python3 tests/integration/test_engine_mllp.py \
        --radrelay build/radrelay --data tests/data/hl7 [unittest args...]

The radrelay binary comes from --radrelay or $RADRELAY, the HL7 corpus from
--data (or $RR_DATA_HL7). Every test starts the real binary with its own
engine and channel files in a temporary folder (ephemeral ports, store in
that folder), waits for `event=ready` of every channel, talks to it with
python-hl7's hl7.client.MLLPClient (Debian's python3-hl7) or with raw
sockets, stops it, and then reads the SQLite journal with the sqlite3 module.

Synchronisation is by condition with a deadline (wait_for / Engine.wait_log),
never by sleeping for a fixed time. $RR_KILL_TRIALS sets how many times the
kill -9 durability test kills the engine (default 3); $RR_IT_VERBOSE=1 makes
it print how many messages each trial acknowledged and journaled. Extra
arguments go to unittest (e.g. EngineTest.test_7_kill9_loses_nothing_acknowledged).

Runs on the python3 that python3-hl7 is installed for (/usr/bin/python3);
stdlib unittest only. Ends with the line "N passed, M failed"; exit status 0
when everything passed, 1 otherwise, 2 on a usage error.
"""
import argparse
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib

import hl7
import hl7.client

RADRELAY = None  # set from the command line
DATA = None

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
HOST = "127.0.0.1"
IO_TIMEOUT = 30.0  # seconds any single socket operation may block
BIG_FILE = "oru_r01_ed_big.hl7"


# ---- helpers ----------------------------------------------------------------

def wait_for(predicate, timeout, what="condition"):
    """Polls predicate until it returns a true value (returned) or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.005)  # poll interval, not a synchronisation point


def frame(payload):
    return SB + payload + EB + CR


def unframe(data):
    """The payload of exactly one MLLP frame."""
    if not (data.startswith(SB) and data.endswith(EB + CR)):
        raise AssertionError(f"not one MLLP frame: {data[:80]!r}...{data[-8:]!r}")
    payload = data[1:-2]
    if SB in payload or EB in payload:
        raise AssertionError(f"more than one frame in one reply: {data!r}")
    return payload


def read_frame(sock):
    """Reads one MLLP frame from a raw socket; EOFError on a closed stream."""
    buf = b""
    while not buf.endswith(EB + CR):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} bytes of a reply")
        buf += chunk
    return unframe(buf)


def read_frames(sock, n):
    """Reads exactly n MLLP frames (they may arrive in one segment)."""
    buf = b""
    while buf.count(EB + CR) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} bytes of replies")
        buf += chunk
    frames = [unframe(f + EB + CR) for f in buf.split(EB + CR)[:-1]]
    assert len(frames) == n, f"{len(frames)} frames, wanted {n}: {buf!r}"
    return frames


def set_os_timeouts(sock, seconds):
    """SO_RCVTIMEO/SO_SNDTIMEO: bounds a blocking socket's calls without
    putting Python's socket object in timeout mode (where send() may send
    only part of a large buffer, which MLLPClient.send does not handle)."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def mllp_client(port):
    c = hl7.client.MLLPClient(HOST, port)
    set_os_timeouts(c.socket, IO_TIMEOUT)
    return c


def client_exchange(client, payload):
    """Sends payload with MLLPClient.send_message and returns the ACK payload.
    MLLPClient returns what one recv() gave; read on if the frame is not
    complete yet."""
    data = client.send_message(payload)
    while not data.endswith(EB + CR):
        more = client.socket.recv(65536)
        if not more:
            raise EOFError(f"connection closed after {len(data)} bytes of a reply: {data!r}")
        data += more
    return unframe(data)


def normalize(raw):
    """Segment terminators to CR (the corpus has LF and CRLF files)."""
    return raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def split_messages(raw):
    """The messages of a file: a batch file's FHS/BHS/BTS/FTS are dropped."""
    segs = [s for s in normalize(raw).split(CR) if s]
    msgs, cur = [], None
    for s in segs:
        if s[:3] == b"MSH":
            cur = [s]
            msgs.append(cur)
        elif s[:3] in (b"FHS", b"BHS", b"BTS", b"FTS"):
            cur = None
        elif cur is not None:
            cur.append(s)
        else:
            raise AssertionError(f"segment outside a message: {s[:40]!r}")
    return [CR.join(m) + CR for m in msgs]


def msh(raw):
    """python-hl7's MSH segment of a message (only the MSH is parsed: the
    corpus has a 2.5 MB message). msh(raw)[n] is MSH-n."""
    first = raw.split(CR, 1)[0]
    return hl7.parse(first.decode("latin-1") + "\r").segment("MSH")


def fld(seg, n):
    """Field n of a python-hl7 segment as str; "" past the last field."""
    return str(seg[n]) if len(seg) > n else ""


def comp(field, c=1):
    """Component c (1-based) of a python-hl7 field's first repetition, as
    str ("" when absent). python-hl7 keeps a field without delimiters as a
    plain string and one with components as Field[Repetition[Component]]."""
    if isinstance(field, str):
        return field if c == 1 else ""
    rep = field[0] if len(field) else ""
    if isinstance(rep, str):
        return rep if c == 1 else ""
    return str(rep[c - 1]) if len(rep) >= c else ""


def parse_ack(payload):
    """The ACK as a python-hl7 message (fails the test if it does not parse)."""
    try:
        return hl7.parse(payload.decode("latin-1"))
    except Exception as e:  # noqa: BLE001 - any failure is a test failure
        raise AssertionError(f"ACK does not parse with python-hl7 ({e!r}): {payload!r}")


def msa(ack):
    s = ack.segment("MSA")
    return str(s[1]), str(s[2])


def err_code(ack):
    """The HL7 error code (table 0357) of the ACK's first ERR segment:
    ERR-3.1 (v2.5 and later) or ERR-1.4.1 (ELD, before v2.5)."""
    err = ack.segment("ERR")
    if fld(err, 3):
        return comp(err[3], 1)
    eld = err[1] if len(err) > 1 else ""
    code = comp(eld, 4) if isinstance(eld, str) else eld[0][3] if len(eld[0]) > 3 else ""
    return code if isinstance(code, str) else str(code[0])


def make_msg(control_id, mtype="ADT^A01", version="2.5.1", extra=b"", enhanced=False):
    tail = "|||AL|NE" if enhanced else ""
    m = (f"MSH|^~\\&|RR_TEST_SND|RR_TEST_FAC|RADRELAY|RR_TEST_RCV|20240315083000||{mtype}|"
         f"{control_id}|P|{version}{tail}\r"
         f"EVN||20240315082955\r"
         f"PID|1||MRN{zlib.crc32(control_id.encode()) % 10**8:08d}^^^RR_TEST_FAC^MR||ZZTEST^PATIENT||19700101|M\r"
         ).encode()
    return m + extra


def free_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


LOG_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


SCRIPT_V1 = """
function on_message(msg, ctx)
  local id = msg:get("MSH-10")
  if id:find("FILTER") then ctx:filter("not for us") return end
  if id:find("REJECT") then ctx:reject("no orders from this one") return end
  if id:find("ERROR") then error("deliberate failure") end
  if id:find("NODEST") then ctx:route("nowhere", msg) return end
  ctx:route("out", msg)
end
"""


def log_fields(line):
    return {k: v.strip('"') for k, v in LOG_KV.findall(line)}


class Engine:
    """One `radrelay run` process with its own configuration folder."""

    def __init__(self, workdir, channels, synchronous="full", store="store/radrelay.db"):
        self.dir = workdir
        self.store = os.path.join(workdir, store)
        self.config = os.path.join(workdir, "radrelay.json")
        chdir = os.path.join(workdir, "channels")
        os.makedirs(chdir, exist_ok=True)
        self.names = []
        for ch in channels:
            with open(os.path.join(chdir, ch["name"] + ".json"), "w") as f:
                json.dump(ch, f, indent=2)
            self.names.append(ch["name"])
        with open(self.config, "w") as f:
            json.dump({"store": {"path": store, "synchronous": synchronous},
                       "channels": "channels", "log": {"level": "info"}}, f, indent=2)
        self.proc = None
        self.lines = []
        self.cond = threading.Condition()
        self.ports = {}

    # -- process --
    def start(self, timeout=15):
        self.lines = []
        self.ports = {}
        self.proc = subprocess.Popen([RADRELAY, "run", "-c", self.config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()

        def ready():
            for line in self.snapshot():
                if "event=ready" in line:
                    f = log_fields(line)
                    self.ports[f.get("channel")] = int(f.get("port", "0"))
            if self.proc.poll() is not None:
                raise AssertionError(f"radrelay exited with {self.proc.returncode} before "
                                     f"ready:\n{self.tail()}")
            return all(n in self.ports for n in self.names)

        wait_for(ready, timeout, f"event=ready of {self.names}")
        for n in self.names:
            assert self.ports[n] > 0, f"channel {n} reports port {self.ports[n]}"
        return self

    def _read(self, proc):
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        proc.stderr.close()

    def port(self, name=None):
        return self.ports[name or self.names[0]]

    def snapshot(self):
        with self.cond:
            return list(self.lines)

    def tail(self, n=40):
        return "\n".join(self.snapshot()[-n:])

    def logged(self, *needles):
        """Log lines containing every needle."""
        return [l for l in self.snapshot() if all(x in l for x in needles)]

    def wait_log(self, *needles, timeout=10):
        return wait_for(lambda: self.logged(*needles), timeout,
                        f"a log line with {needles}")

    def sanitizer_reports(self):
        return [l for l in self.snapshot()
                if "AddressSanitizer" in l or "LeakSanitizer" in l or "runtime error:" in l]

    def stop(self, timeout=10):
        """SIGTERM; returns the exit status (None if it had to be killed)."""
        if not self.proc or self.proc.poll() is not None:
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
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # -- journal --
    def rows(self, where="1", args=()):
        db = sqlite3.connect(self.store)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(
                f"SELECT * FROM messages WHERE {where} ORDER BY id", args)]
        finally:
            db.close()


class EngineTest(unittest.TestCase):
    maxDiff = 4000

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="rr-it-")
        self.engines = []

    def tearDown(self):
        for e in self.engines:
            e.cleanup()
        self.tmp.cleanup()

    def engine(self, channels, **kw):
        e = Engine(self.tmp.name, channels, **kw)
        self.engines.append(e)
        return e

    @staticmethod
    def channel(name="orders", accept=("ADT^A01",), **source):
        src = {"type": "mllp", "host": HOST, "port": 0}
        src.update(source)
        return {"name": name, "source": src, "accept": list(accept), "hl7": {"strict": False}}

    def stop_ok(self, e):
        rc = e.stop()
        self.assertEqual(rc, 0, f"radrelay did not exit 0 on SIGTERM:\n{e.tail()}")
        self.assertTrue(e.logged("event=stopped"), f"no event=stopped:\n{e.tail()}")
        self.assertEqual(e.sanitizer_reports(), [])

    def assert_positive(self, ack_payload, control_id, code="AA"):
        ack = parse_ack(ack_payload)
        self.assertEqual(msa(ack), (code, control_id), ack_payload)
        return ack

    # ---- 1 ----------------------------------------------------------------
    def test_1_corpus_over_one_connection(self):
        msgs = []  # (file, bytes)
        for name in sorted(os.listdir(DATA)):
            if name.endswith(".hl7"):
                with open(os.path.join(DATA, name), "rb") as f:
                    for i, m in enumerate(split_messages(f.read())):
                        msgs.append((f"{name}#{i + 1}", m))
        self.assertGreaterEqual(len(msgs), 20, "corpus too small")
        # MLLPClient copes with the 2.5 MB message: it is sent like the rest.
        self.assertTrue(any(label.startswith(BIG_FILE) for label, _ in msgs), BIG_FILE)
        types = sorted({f"{comp(msh(m)[9], 1)}^{comp(msh(m)[9], 2)}" for _, m in msgs})
        e = self.engine([self.channel("corpus", types)]).start()
        with mllp_client(e.port()) as client:
            for label, m in msgs:
                with self.subTest(message=label):
                    h = msh(m)
                    ack = parse_ack(client_exchange(client, m))
                    enhanced = bool(fld(h, 15) or fld(h, 16))
                    self.assertEqual(msa(ack), ("CA" if enhanced else "AA", fld(h, 10)))
                    a = ack.segment("MSH")
                    self.assertEqual((fld(a, 3), fld(a, 4)), (fld(h, 5), fld(h, 6)), "MSH-3/4")
                    self.assertEqual((fld(a, 5), fld(a, 6)), (fld(h, 3), fld(h, 4)), "MSH-5/6")
                    self.assertEqual(fld(a, 12), fld(h, 12), "MSH-12")
                    self.assertEqual(comp(a[9], 1), "ACK", "MSH-9")
        self.stop_ok(e)
        rows = e.rows()
        self.assertEqual(len(rows), len(msgs), "one journal row per message")
        for (label, m), r in zip(msgs, rows):
            with self.subTest(row=label):
                self.assertEqual(r["status"], "accepted")
                self.assertEqual(r["raw"], m, "raw must be the bytes sent")
                self.assertEqual(r["control_id"], str(msh(m)[10]))
                self.assertEqual(r["channel"], "corpus")
                self.assertIsNone(r["error"])

    # ---- 2 ----------------------------------------------------------------
    def test_2_parse_error_gets_AE_and_connection_lives(self):
        e = self.engine([self.channel("orders")]).start()
        good1 = make_msg("GOOD-0001")
        bad = (b"MSH|^~\\&|RR_TEST_SND|RR_TEST_FAC|RADRELAY|RR_TEST_RCV|20240315083000||"
               b"ADT^A01|BAD-0001|P|2.5.1\rPIDX|1\r")
        good2 = make_msg("GOOD-0002")
        with mllp_client(e.port()) as client:
            self.assert_positive(client_exchange(client, good1), "GOOD-0001")
            ack = parse_ack(client_exchange(client, bad))
            self.assertEqual(msa(ack), ("AE", "BAD-0001"))
            self.assertTrue(ack.segments("ERR"), "AE without an ERR segment")
            self.assertEqual(err_code(ack), "100")
            self.assert_positive(client_exchange(client, good2), "GOOD-0002")
        # Offset in the connection's byte stream: after the first frame, the
        # start byte, then the MSH segment.
        expect_off = len(frame(good1)) + 1 + bad.index(b"\rPIDX") + 1
        line = e.wait_log("event=parse_error", "channel=orders")[0]
        f = log_fields(line)
        self.assertIn("offset", f, line)
        self.assertEqual(int(f["offset"]), expect_off, line)
        self.stop_ok(e)
        rows = e.rows()
        self.assertEqual([(r["control_id"], r["status"]) for r in rows],
                         [("GOOD-0001", "accepted"), ("BAD-0001", "error"),
                          ("GOOD-0002", "accepted")])
        self.assertEqual(rows[1]["raw"], bad)
        self.assertTrue(rows[1]["error"])

    # ---- 3 ----------------------------------------------------------------
    def test_3_unaccepted_type_gets_AR_200(self):
        e = self.engine([self.channel("orders", ["ADT^A01", "ORM^O01"])]).start()
        m = make_msg("REJ-0001", mtype="ORU^R01^ORU_R01")
        with mllp_client(e.port()) as client:
            ack = parse_ack(client_exchange(client, m))
            self.assertEqual(msa(ack), ("AR", "REJ-0001"))
            self.assertTrue(ack.segments("ERR"), "AR without an ERR segment")
            self.assertEqual(err_code(ack), "200")
            # The connection goes on.
            self.assert_positive(client_exchange(client, make_msg("OK-0001")), "OK-0001")
        self.stop_ok(e)
        rows = e.rows()
        self.assertEqual([(r["control_id"], r["status"]) for r in rows],
                         [("REJ-0001", "rejected"), ("OK-0001", "accepted")])
        self.assertEqual(rows[0]["raw"], m)

    # ---- 4 ----------------------------------------------------------------
    def test_4_junk_before_start_byte(self):
        e = self.engine([self.channel("orders")]).start()
        m = make_msg("JUNK-0001")
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.0\x00\xff garbage " + frame(m))
            self.assert_positive(read_frame(s), "JUNK-0001")
        line = e.wait_log("event=junk", "channel=orders")[0]
        self.assertIn("level=warn", line)
        self.stop_ok(e)
        self.assertEqual([r["raw"] for r in e.rows()], [m])

    # ---- 5 ----------------------------------------------------------------
    def test_5_oversized_frame_closes_connection(self):
        e = self.engine([self.channel("orders", max_frame_bytes=4096)]).start()
        head = make_msg("BIG-0001")
        big = head + b"NTE|1||" + b"X" * (10000 - len(head) - 8) + CR
        self.assertEqual(len(big), 10000)
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            try:
                s.sendall(frame(big))
                got = s.recv(65536)
                while got:  # the engine must close without an ACK
                    self.assertNotIn(b"MSA", got, "oversized frame was acknowledged")
                    got = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed while we were still writing: as good
        e.wait_log("event=oversize", "channel=orders")
        e.wait_log("event=close", "reason=frame_too_large")
        with mllp_client(e.port()) as client:
            self.assert_positive(client_exchange(client, make_msg("SMALL-0001")), "SMALL-0001")
        self.stop_ok(e)
        self.assertEqual([r["control_id"] for r in e.rows()], ["SMALL-0001"])

    # ---- 6 ----------------------------------------------------------------
    def test_6_fifty_concurrent_connections(self):
        nconn, per = 50, 20
        e = self.engine([self.channel("orders")]).start()
        port = e.port()
        problems, done = [], []
        lock = threading.Lock()
        go = threading.Event()

        def worker(t):
            try:
                with mllp_client(port) as client:
                    go.wait(IO_TIMEOUT)
                    for i in range(per):
                        cid = f"C{t:02d}-{i:03d}"
                        ack = parse_ack(client_exchange(client, make_msg(cid)))
                        if msa(ack) != ("AA", cid):
                            raise AssertionError(f"{cid}: {msa(ack)}")
                        with lock:
                            done.append(cid)
            except Exception as ex:  # noqa: BLE001 - reported below
                with lock:
                    problems.append(f"connection {t}: {ex!r}")

        threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(nconn)]
        for t in threads:
            t.start()
        # All connections open before anyone sends, so they really overlap.
        wait_for(lambda: len(e.logged("event=accept", "channel=orders")) >= nconn or problems,
                 15, f"{nconn} accepted connections")
        go.set()
        for t in threads:
            t.join(60)
        self.assertFalse(any(t.is_alive() for t in threads), "a client thread hung")
        self.assertEqual(problems, [])
        self.assertEqual(len(done), nconn * per)
        self.stop_ok(e)
        rows = e.rows()
        self.assertEqual(len(rows), nconn * per)
        self.assertEqual(sorted(r["control_id"] for r in rows), sorted(done))
        self.assertTrue(all(r["status"] == "accepted" for r in rows))

    # ---- 7 ----------------------------------------------------------------
    def test_7_kill9_loses_nothing_acknowledged(self):
        trials = int(os.environ.get("RR_KILL_TRIALS", "3"))
        min_acks = 300
        e = self.engine([self.channel("orders")], synchronous="full")
        all_acked = []
        for trial in range(trials):
            e.start()
            acked, problems = [], []
            stop = threading.Event()

            def sender(port=e.port(), trial=trial, acked=acked, problems=problems, stop=stop):
                try:
                    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as s:
                        n = 0
                        while not stop.is_set():
                            cid = f"K{trial}-{n:06d}"
                            s.sendall(frame(make_msg(cid)))
                            ack = parse_ack(read_frame(s))
                            if msa(ack) != ("AA", cid):
                                problems.append(f"{cid}: {msa(ack)}")
                                return
                            acked.append(cid)
                            n += 1
                except (OSError, EOFError):
                    pass  # the engine was killed under us
                except Exception as ex:  # noqa: BLE001
                    problems.append(repr(ex))

            th = threading.Thread(target=sender, daemon=True)
            th.start()
            wait_for(lambda: len(acked) >= min_acks or problems or not th.is_alive(), 30,
                     f"{min_acks} ACKs (trial {trial + 1})")
            e.kill9()
            stop.set()
            th.join(IO_TIMEOUT)
            self.assertFalse(th.is_alive(), "sender did not notice the kill")
            self.assertEqual(problems, [])
            self.assertGreaterEqual(len(acked), min_acks, e.tail())
            db = sqlite3.connect(e.store)
            try:
                self.assertEqual(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
                stored = {r[0] for r in db.execute("SELECT control_id FROM messages")}
            finally:
                db.close()
            all_acked += acked
            lost = [c for c in all_acked if c not in stored]
            self.assertEqual(lost, [], f"trial {trial + 1}: acknowledged but not journaled")
            if os.environ.get("RR_IT_VERBOSE"):
                print(f"\n  trial {trial + 1}: {len(acked)} acknowledged, "
                      f"{len([c for c in stored if c.startswith(f'K{trial}-')])} journaled",
                      end=" ", flush=True)
        # A last clean start proves the store is still usable.
        e.start()
        self.stop_ok(e)

    # ---- 8 ----------------------------------------------------------------
    def test_8_sigterm_with_idle_client(self):
        e = self.engine([self.channel("orders")]).start()
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(make_msg("IDLE-0001")))
            self.assert_positive(read_frame(s), "IDLE-0001")
            e.wait_log("event=accept", "channel=orders")
            t0 = time.monotonic()
            e.proc.send_signal(signal.SIGTERM)
            try:
                rc = e.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.fail(f"radrelay still running 10 s after SIGTERM:\n{e.tail()}")
            elapsed = time.monotonic() - t0
            e.reader.join(10)
            self.assertEqual(rc, 0, e.tail())
            self.assertLess(elapsed, 10)
            self.assertTrue(e.logged("event=stopped"), e.tail())
            self.assertEqual(e.sanitizer_reports(), [])
            self.assertEqual(s.recv(100), b"", "the idle connection is closed")
        self.assertEqual([r["control_id"] for r in e.rows()], ["IDLE-0001"])

    # ---- 9 ----------------------------------------------------------------
    def test_9_check_names_file_and_json_path(self):
        bad = self.channel("orders")
        bad["source"]["port"] = "abc"
        bad["source"]["bogus"] = 1
        e = Engine(self.tmp.name, [bad])
        chfile = os.path.join(self.tmp.name, "channels", "orders.json")
        p = subprocess.run([RADRELAY, "check", "-c", e.config], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=30)
        out = (p.stdout + p.stderr).decode("utf-8", "replace")
        self.assertNotEqual(p.returncode, 0, out)
        self.assertNotIn("Sanitizer", out)
        for jpath in ("$.source.port", "$.source.bogus"):
            lines = [l for l in out.splitlines() if jpath in l]
            self.assertTrue(lines, f"no line names {jpath}:\n{out}")
            named = lines[0].split(": " + jpath)[0]
            self.assertTrue(os.path.exists(named) and os.path.samefile(named, chfile),
                            f"{lines[0]!r} does not name {chfile}")
        # And the good version of the same file passes.
        good = self.channel("orders")
        with open(chfile, "w") as f:
            json.dump(good, f)
        p = subprocess.run([RADRELAY, "check", "-c", e.config], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(p.returncode, 0, (p.stdout + p.stderr).decode("utf-8", "replace"))

    # ---- 10 ---------------------------------------------------------------
    def test_10_peer_that_never_reads_acks(self):
        """A sender that never reads its ACKs is read from no faster than its
        ACKs leave (bounded memory), and SIGTERM still ends within the drain
        deadline."""
        e = self.engine([self.channel("orders", drain_timeout_ms=1000)],
                        synchronous="off").start()
        s = socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT)
        s.settimeout(0.5)
        burst = frame(make_msg("STUCK-0001")) * 500
        sent = 0
        try:
            while sent < 400000:   # the engine stops reading long before this
                s.sendall(burst)
                sent += 500
        except socket.timeout:
            pass
        self.assertLess(sent, 400000, "the engine kept reading from a peer that reads nothing")
        rss_kb = int([l for l in open(f"/proc/{e.proc.pid}/status")
                      if l.startswith("VmRSS")][0].split()[1])
        # ASan keeps freed memory in quarantine (256 MB by default).
        with open(RADRELAY, "rb") as f:
            sanitized = b"__asan_init" in f.read()
        limit_mb = 700 if sanitized else 200
        self.assertLess(rss_kb, limit_mb * 1024, f"engine RSS {rss_kb} kB")
        t0 = time.monotonic()
        e.proc.send_signal(signal.SIGTERM)
        try:
            rc = e.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.fail(f"radrelay still running 15 s after SIGTERM:\n{e.tail()}")
        e.reader.join(10)
        s.close()
        self.assertEqual(rc, 0, e.tail())
        self.assertLess(time.monotonic() - t0, 15)
        self.assertTrue(e.logged("reason=shutdown_deadline"), e.tail())

    # ---- 11 ---------------------------------------------------------------
    def test_11_enhanced_mode_never_gets_no_commit_ack(self):
        """MSH-15 NE: the message is kept but no commit ACK is sent; MSH-15 AL
        on the same connection then gets its CA."""
        e = self.engine([self.channel("orders")]).start()
        ne = make_msg("ENH-NE-1").replace(b"|P|2.5.1\r", b"|P|2.5.1|||NE|NE\r", 1)
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(ne))
            s.sendall(frame(make_msg("ENH-AL-2", enhanced=True)))
            self.assert_positive(read_frame(s), "ENH-AL-2", code="CA")
        self.stop_ok(e)
        rows = e.rows()
        self.assertEqual([r["control_id"] for r in rows], ["ENH-NE-1", "ENH-AL-2"])
        self.assertIsNone(rows[0]["ack"])


    # ---- 12 ---------------------------------------------------------------
    def test_12_duplicates(self):
        """A resend (same MSH-3/4 and MSH-10, same bytes) gets the stored ACK
        back byte for byte and is not stored again, whether the first copy is
        still being committed, committed, or from before a restart; the same
        control id with other content gets AR with ERR 205 and is kept."""
        e = self.engine([self.channel("orders")]).start()
        first = make_msg("DUP-0001")
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(first) + frame(first))      # second one while the first commits
            a1, a2 = read_frames(s, 2)
            self.assertEqual(a1, a2)
            self.assert_positive(a1, "DUP-0001")
            s.sendall(frame(first))                      # first one committed by now
            self.assertEqual(read_frame(s), a1)
            other = first.replace(b"ZZTEST^PATIENT", b"ZZTEST^OTHER")
            s.sendall(frame(other))
            nak = parse_ack(read_frame(s))
            self.assertEqual(msa(nak)[0], "AR")
            self.assertEqual(err_code(nak), "205")
        self.assertTrue(e.logged("event=duplicate_conflict"), e.tail())
        self.stop_ok(e)
        e.start()
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(first))
            self.assertEqual(read_frame(s), a1, "the stored ACK after a restart")
        self.stop_ok(e)
        rows = e.rows()
        self.assertEqual([(r["control_id"], r["status"]) for r in rows],
                         [("DUP-0001", "accepted"), ("DUP-0001", "rejected")])
        self.assertEqual(rows[0]["ack"], a1)


    # ---- 13 ---------------------------------------------------------------
    def test_13_mllp_release_2_commit_blocks(self):
        """MLLP release 2: each stored message is answered with a 0x06 commit
        block (a message that does not parse is stored too), a resend with
        the same block."""
        e = self.engine([self.channel("orders", mllp_release=2)]).start()
        bad = make_msg("R2-0002").replace(b"\rPID|", b"\rPIDX|", 1)
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(make_msg("R2-0001")))
            self.assertEqual(read_frame(s), b"\x06")
            s.sendall(frame(bad))
            self.assertEqual(read_frame(s), b"\x06")
            s.sendall(frame(make_msg("R2-0001")))
            self.assertEqual(read_frame(s), b"\x06")
        self.stop_ok(e)
        self.assertEqual([(r["control_id"], r["status"]) for r in e.rows()],
                         [("R2-0001", "accepted"), ("R2-0002", "error")])


    # ---- 14 ---------------------------------------------------------------
    def test_14_thousand_idle_connections(self):
        """1,000 idle connections do not keep a normal client from being
        served."""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1100:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        e = self.engine([self.channel("orders", max_connections=1100,
                                      max_per_peer=1100)]).start()
        idle = []
        try:
            for _ in range(1000):
                idle.append(socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT))
            wait_for(lambda: len([l for l in e.snapshot() if "event=accept" in l]) >= 1000,
                     20, "1,000 accepted connections")
            with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
                s.sendall(frame(make_msg("BUSY-0001")))
                self.assert_positive(read_frame(s), "BUSY-0001")
        finally:
            for s in idle:
                s.close()
        self.stop_ok(e)

    # ---- 15 ---------------------------------------------------------------
    def test_15_slow_sender_is_cut_off(self):
        """A frame that does not end within frame_timeout_ms closes that
        connection (logged with its offset); others are served meanwhile."""
        e = self.engine([self.channel("orders", frame_timeout_ms=500)]).start()
        slow = socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT)
        slow.sendall(frame(make_msg("SLOW-0001"))[:40])   # a frame that never ends
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(make_msg("FAST-0001")))
            self.assert_positive(read_frame(s), "FAST-0001")
        slow.settimeout(10)
        self.assertEqual(slow.recv(100), b"", "the slow sender is disconnected")
        slow.close()
        e.wait_log("event=frame_timeout", "channel=orders", "offset=0")
        self.stop_ok(e)
        self.assertEqual([r["control_id"] for r in e.rows()], ["FAST-0001"])


    # ---- 16 ---------------------------------------------------------------
    def test_16_enhanced_mode_application_ack(self):
        """MSH-15 AL, MSH-16 AL: a CA once the message is kept, then an AA
        (application acknowledgement, its own control id, MSH-15/16 NE); a
        rejected message gets its CR and no AA; MSH-16 ER gets none on
        success."""
        e = self.engine([self.channel("orders")]).start()
        al = make_msg("APP-0001").replace(b"|P|2.5.1\r", b"|P|2.5.1|||AL|AL\r", 1)
        er = make_msg("APP-0002").replace(b"|P|2.5.1\r", b"|P|2.5.1|||AL|ER\r", 1)
        bad = make_msg("APP-0003", mtype="ORU^R01").replace(b"|P|2.5.1\r",
                                                            b"|P|2.5.1|||AL|AL\r", 1)
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(al))
            commit, app = (parse_ack(f) for f in read_frames(s, 2))
            self.assertEqual(msa(commit), ("CA", "APP-0001"))
            self.assertEqual(msa(app), ("AA", "APP-0001"))
            self.assertNotEqual(str(app.segment("MSH")[10]), str(commit.segment("MSH")[10]))
            self.assertEqual(str(app.segment("MSH")[15]), "NE")
            s.sendall(frame(er))
            self.assertEqual(msa(parse_ack(read_frame(s))), ("CA", "APP-0002"))
            s.sendall(frame(bad))
            self.assertEqual(msa(parse_ack(read_frame(s)))[0], "CR")
            s.sendall(frame(make_msg("APP-0004")))   # nothing else was queued in between
            self.assertEqual(msa(parse_ack(read_frame(s)))[1], "APP-0004")
        self.stop_ok(e)


    # ---- 17 ---------------------------------------------------------------
    def test_17_channel_scripts(self):
        """A channel's Lua script decides: pass (AA), filter (AA, status
        filtered), reject (AR with the reason in ERR), error (AE, status
        error with file:line). A runaway script on one channel fails its
        message only; another channel keeps delivering meanwhile. Editing the
        script reloads it; a version that does not compile leaves the
        running one in place."""
        chdir = os.path.join(self.tmp.name, "channels")
        os.makedirs(chdir, exist_ok=True)
        script = os.path.join(chdir, "orders.lua")
        with open(script, "w") as f:
            f.write(SCRIPT_V1)
        with open(os.path.join(chdir, "spin.lua"), "w") as f:
            f.write("function on_message(msg, ctx)\n  while true do end\nend\n")
        orders = self.channel("orders")
        orders["script"] = "orders.lua"
        orders["destinations"] = {"out": {"type": "mllp", "host": HOST, "port": free_port()}}
        spin = self.channel("spin")
        spin["script"] = "spin.lua"
        e = self.engine([orders, spin]).start()
        with socket.create_connection((HOST, e.port("orders")), timeout=IO_TIMEOUT) as s:
            def ask(cid, extra=b""):
                s.sendall(frame(make_msg(cid, extra=extra)))
                return parse_ack(read_frame(s))
            self.assertEqual(msa(ask("S-PASS")), ("AA", "S-PASS"))
            self.assertEqual(msa(ask("S-FILTER")), ("AA", "S-FILTER"))
            nak = ask("S-REJECT")
            self.assertEqual(msa(nak)[0], "AR")
            self.assertIn("no orders from this one", str(nak.segment("ERR")))
            nak = ask("S-ERROR")
            self.assertEqual(msa(nak)[0], "AE")
            nak = ask("S-NODEST")  # a destination the channel does not declare
            self.assertEqual(msa(nak)[0], "AE")
            self.assertIn('no destination', str(nak.segment("ERR")))
            # a runaway script on the other channel, while this one keeps going
            with socket.create_connection((HOST, e.port("spin")), timeout=IO_TIMEOUT) as t:
                t.sendall(frame(make_msg("SPIN-1")))
                self.assertEqual(msa(ask("S-PASS2")), ("AA", "S-PASS2"))
                self.assertEqual(msa(parse_ack(read_frame(t)))[0], "AE")
            # edit: the new version is picked up; a broken one is not
            with open(script + ".new", "w") as f:
                f.write(SCRIPT_V1.replace("no orders from this one", "version two"))
            os.replace(script + ".new", script)
            e.wait_log("event=script_reloaded", "channel=orders")
            self.assertIn("version two", str(ask("S-REJECT2").segment("ERR")))
            with open(script + ".new", "w") as f:
                f.write("function on_message(msg, ctx\n")
            os.replace(script + ".new", script)
            e.wait_log("event=script_load_failed", "channel=orders")
            self.assertIn("version two", str(ask("S-REJECT3").segment("ERR")))
            # `radrelay reload` asks the running engine to read everything again
            with open(script + ".new", "w") as f:
                f.write(SCRIPT_V1.replace("no orders from this one", "version three"))
            os.replace(script + ".new", script)
            r = subprocess.run([RADRELAY, "reload", "-c", e.config], capture_output=True,
                               text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stderr)
            e.wait_log("event=reload", "signal=HUP")
            probes = iter(range(1000))
            wait_for(lambda: "version three" in
                     str(ask(f"S-REJECT-P{next(probes)}").segment("ERR")), 10,
                     "the reloaded script answering")
        self.stop_ok(e)
        rows = {r["control_id"]: r for r in e.rows()}
        self.assertEqual(rows["S-PASS"]["status"], "accepted")
        self.assertEqual(rows["S-FILTER"]["status"], "filtered")
        self.assertEqual(rows["S-REJECT"]["status"], "rejected")
        self.assertEqual(rows["S-ERROR"]["status"], "error")
        self.assertRegex(rows["S-ERROR"]["error"], r"orders\.lua:\d+:")
        self.assertEqual(rows["SPIN-1"]["status"], "error")
        self.assertIn("instruction", rows["SPIN-1"]["error"])


    # ---- 18 ---------------------------------------------------------------
    def test_18_script_store_enriches_across_messages_and_restarts(self):
        """store.set in one message is seen by store.get in a later one, also
        after a restart: it is committed with the message that wrote it."""
        chdir = os.path.join(self.tmp.name, "channels")
        os.makedirs(chdir, exist_ok=True)
        with open(os.path.join(chdir, "orders.lua"), "w") as f:
            f.write("""
function on_message(msg, ctx)
  local key = "patient:" .. msg:get("PID-5.1")
  if msg:get("MSH-9.1") == "ADT" then
    store.set(key, msg:get("PID-7"))
    return
  end
  local dob = store.get(key)
  if not dob then return ctx:reject("unknown patient") end
  ctx:route("orders", {dob = dob})
end
""")
        ch = self.channel("orders", accept=("ADT^A01", "ORM^O01"))
        ch["script"] = "orders.lua"
        ch["destinations"] = {"orders": {"type": "mllp", "host": HOST, "port": free_port()}}
        e = self.engine([ch]).start()
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(make_msg("KV-ORM-1", mtype="ORM^O01")))
            self.assertEqual(msa(parse_ack(read_frame(s))), ("AR", "KV-ORM-1"))
            s.sendall(frame(make_msg("KV-ADT-1")))
            self.assertEqual(msa(parse_ack(read_frame(s))), ("AA", "KV-ADT-1"))
            s.sendall(frame(make_msg("KV-ORM-2", mtype="ORM^O01")))
            self.assertEqual(msa(parse_ack(read_frame(s))), ("AA", "KV-ORM-2"))
        self.stop_ok(e)
        e.start()
        with socket.create_connection((HOST, e.port()), timeout=IO_TIMEOUT) as s:
            s.sendall(frame(make_msg("KV-ORM-3", mtype="ORM^O01")))
            self.assertEqual(msa(parse_ack(read_frame(s))), ("AA", "KV-ORM-3"))
        self.stop_ok(e)
        db = sqlite3.connect(e.store)
        try:
            self.assertEqual(db.execute("SELECT key, value FROM kv").fetchall(),
                             [("patient:ZZTEST", b"19700101")])
        finally:
            db.close()


    # ---- 19 ---------------------------------------------------------------
    def test_19_on_script_error_answers(self):
        """on_script_error: AR refuses the failed message, accept acknowledges
        it (kept as error for review); both keep the script's file:line."""
        chdir = os.path.join(self.tmp.name, "channels")
        os.makedirs(chdir, exist_ok=True)
        with open(os.path.join(chdir, "fail.lua"), "w") as f:
            f.write("function on_message(msg, ctx)\n  local t = nil\n  return t.x\nend\n")
        chans = []
        for name, mode in (("refuse", "AR"), ("review", "accept")):
            ch = self.channel(name)
            ch["script"] = "fail.lua"
            ch["on_script_error"] = mode
            chans.append(ch)
        e = self.engine(chans).start()
        for name, code in (("refuse", "AR"), ("review", "AA")):
            with socket.create_connection((HOST, e.port(name)), timeout=IO_TIMEOUT) as s:
                s.sendall(frame(make_msg(f"OSE-{name}")))
                self.assertEqual(msa(parse_ack(read_frame(s))), (code, f"OSE-{name}"))
        self.stop_ok(e)
        for r in e.rows():
            self.assertEqual(r["status"], "error")
            self.assertRegex(r["error"], r"fail\.lua:3:")


def main():
    global RADRELAY, DATA
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--radrelay", default=os.environ.get("RADRELAY"))
    ap.add_argument("--data", default=os.environ.get("RR_DATA_HL7"))
    args, rest = ap.parse_known_args()
    if not args.radrelay or not os.access(args.radrelay, os.X_OK):
        print(f"radrelay binary not found: --radrelay PATH or RADRELAY "
              f"(got {args.radrelay!r})", file=sys.stderr)
        return 2
    if not args.data or not os.path.isdir(args.data):
        print(f"corpus folder not found: --data DIR (got {args.data!r})", file=sys.stderr)
        return 2
    RADRELAY = os.path.abspath(args.radrelay)
    DATA = os.path.abspath(args.data)
    t0 = time.monotonic()
    prog = unittest.main(module=__name__, argv=[sys.argv[0], "-v"] + rest, exit=False)
    r = prog.result
    # A failing subTest is reported under the test it belongs to: count tests.
    bad = {getattr(t, "test_case", t).id() for t, _ in r.failures + r.errors}
    bad |= {t.id() for t in r.unexpectedSuccesses}
    skipped = {t.id() for t, _ in r.skipped} - bad
    passed = r.testsRun - len(bad) - len(skipped)
    print(f"took {time.monotonic() - t0:.1f}s", flush=True)
    print(f"{passed} passed, {len(bad)} failed", flush=True)
    return 0 if not bad and r.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

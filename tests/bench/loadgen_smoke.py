#!/usr/bin/python3
"""Smoke test of rr-loadgen against the real radrelay, and of its error checks.

    /usr/bin/python3 tests/bench/loadgen_smoke.py --radrelay build/radrelay \
        --loadgen build/rr-loadgen [unittest args...]

- radrelay: starts `radrelay run` with a generated configuration (ephemeral
  port, store in a temporary folder), runs `rr-loadgen --messages 2000
  --connections 8 --json`, and checks exit 0, 2000 positive ACKs, then after
  SIGTERM one journal row per message with the control ids rr-loadgen sent.
- error checks: against small in-process MLLP servers that answer with the
  wrong MSA-2, with AE, or not at all, rr-loadgen must exit 1 and count the
  error of the right kind.

Synchronisation is by condition with a deadline, never by a fixed sleep.
Stdlib only. Exit status 0 when every test passed.
"""
import argparse
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest

RADRELAY = None
LOADGEN = None
HOST = "127.0.0.1"


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)  # poll interval, not a synchronisation point


def loadgen(port, *args, timeout=120):
    p = subprocess.run([LOADGEN, "--host", HOST, "--port", str(port), "--json", *args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    out = p.stdout.decode()
    line = next((l for l in out.splitlines() if l.startswith("{")), None)
    return p.returncode, (json.loads(line) if line else None), p.stderr.decode()


class FakeServer:
    """An MLLP server on an ephemeral port; answer(payload) -> reply payload
    or None (no reply)."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        with conn:
            while not self.stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\x1c\r" in buf:
                    frame, buf = buf.split(b"\x1c\r", 1)
                    reply = self.answer(frame.lstrip(b"\x0b"))
                    if reply is not None:
                        conn.sendall(b"\x0b" + reply + b"\x1c\r")

    def close(self):
        self.stop.set()
        self.sock.close()


def control_id(payload):
    return payload.split(b"\r", 1)[0].split(b"|")[9]


def ack(code, cid):
    return b"MSH|^~\\&|FAKE|FAKE|LG|LG|20240101000000||ACK^A01^ACK|A1|P|2.5.1\rMSA|" + \
        code + b"|" + cid + b"\r"


class LoadgenTest(unittest.TestCase):
    def test_1_radrelay_2000_messages_8_connections(self):
        with tempfile.TemporaryDirectory(prefix="rr-lg-") as tmp:
            os.makedirs(os.path.join(tmp, "channels"))
            with open(os.path.join(tmp, "radrelay.json"), "w") as f:
                json.dump({"store": {"path": "store/radrelay.db", "synchronous": "full"},
                           "channels": "channels", "log": {"level": "info"}}, f)
            with open(os.path.join(tmp, "channels", "smoke.json"), "w") as f:
                json.dump({"name": "smoke", "source": {"type": "mllp", "host": HOST, "port": 0},
                           "accept": ["ADT^A01"], "hl7": {"strict": False}}, f)
            log = open(os.path.join(tmp, "radrelay.log"), "w+b")
            proc = subprocess.Popen([RADRELAY, "run", "-c", os.path.join(tmp, "radrelay.json")],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=log)
            try:
                def ready():
                    if proc.poll() is not None:
                        raise AssertionError(f"radrelay exited with {proc.returncode}")
                    log.seek(0)
                    m = re.search(rb"event=ready channel=smoke port=(\d+)", log.read())
                    return int(m.group(1)) if m else None

                port = wait_for(ready, 15, "event=ready")
                rc, res, err = loadgen(port, "--messages", "2000", "--connections", "8",
                                       "--id-prefix", "SMOKE")
                self.assertEqual(rc, 0, err)
                self.assertIsNotNone(res, err)
                self.assertEqual((res["sent"], res["acked"], res["errors"]), (2000, 2000, 0))
                self.assertGreater(res["msgs_per_s"], 0)
                self.assertGreater(res["latency_ms"]["max"], 0)
                self.assertLessEqual(res["latency_ms"]["p50"], res["latency_ms"]["p99"])
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                log.close()
            self.assertEqual(rc, 0, "radrelay did not exit 0 on SIGTERM")
            db = sqlite3.connect(os.path.join(tmp, "store", "radrelay.db"))
            ids = [r[0] for r in db.execute("SELECT control_id FROM messages WHERE status = 'accepted'")]
            db.close()
            expected = {f"SMOKE-{c}-{s}" for c in range(8) for s in range(250)}
            self.assertEqual(len(ids), 2000)
            # Closed loop shares the 2000 among the connections unevenly: check
            # the shape and uniqueness rather than an exact split.
            self.assertEqual(len(set(ids)), 2000)
            self.assertTrue(all(re.fullmatch(r"SMOKE-[0-7]-\d+", i) for i in ids), ids[:5])
            self.assertTrue(expected & set(ids))

    def run_fake(self, answer, *args):
        srv = FakeServer(answer)
        try:
            return loadgen(srv.port, *args)
        finally:
            srv.close()

    def test_2_wrong_msa2_is_mismatched(self):
        rc, res, err = self.run_fake(lambda p: ack(b"AA", b"NOT-" + control_id(p)),
                                     "--messages", "20", "--connections", "2")
        self.assertEqual(rc, 1, err)
        self.assertEqual((res["mismatched"], res["acked"]), (20, 0), res)
        self.assertIn("MSA-2 is NOT-", err)

    def test_3_ae_is_negative(self):
        rc, res, err = self.run_fake(lambda p: ack(b"AE", control_id(p)), "--messages", "10")
        self.assertEqual(rc, 1, err)
        self.assertEqual((res["negative"], res["acked"]), (10, 0), res)

    def test_4_positive_fake_passes_with_window(self):
        rc, res, err = self.run_fake(lambda p: ack(b"CA", control_id(p)),
                                     "--messages", "300", "--connections", "3", "--window", "4")
        self.assertEqual(rc, 0, err)
        self.assertEqual((res["acked"], res["errors"]), (300, 0), res)

    def test_5_no_answer_times_out(self):
        rc, res, err = self.run_fake(lambda p: None, "--messages", "3", "--timeout", "300")
        self.assertEqual(rc, 1, err)
        self.assertEqual(res["timeouts"], 1, res)

    def test_6_open_loop_keeps_the_rate(self):
        rc, res, err = self.run_fake(lambda p: ack(b"AA", control_id(p)),
                                     "--seconds", "1", "--rate", "400", "--connections", "4")
        self.assertEqual(rc, 0, err)
        self.assertEqual(res["sent"], 400, res)
        self.assertEqual(res["acked"], 400, res)


def main():
    global RADRELAY, LOADGEN
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", default=os.environ.get("RADRELAY"))
    ap.add_argument("--loadgen", default=os.environ.get("RR_LOADGEN"))
    args, rest = ap.parse_known_args()
    if not args.radrelay or not args.loadgen:
        ap.error("--radrelay and --loadgen are required")
    RADRELAY, LOADGEN = args.radrelay, args.loadgen
    prog = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2)
    r = prog.result
    failed = len(r.failures) + len(r.errors)
    print(f"{r.testsRun - failed} passed, {failed} failed")
    sys.exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()

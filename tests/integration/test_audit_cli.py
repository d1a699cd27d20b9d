#!/usr/bin/python3
"""`radrelay audit verify|export` on a real store.

The store is written by the unit test binary (`test_audit --make-store`,
records appended by engine/audit), and extended and tampered with here by
Python's sqlite3. Every exported line is re-hashed with the recipe in
engine/audit/audit.h, written in Python from the header alone, so the
canonical data and the hash encoding are checked by a second
implementation in both directions: C's records re-hashed by Python, and
Python's records accepted by `radrelay audit verify`.
"""
import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import unittest

ARGS = None
ZERO = "0" * 64


def field(b):
    return struct.pack(">Q", len(b)) + b


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(seq, at_ms, actor, kind, subject, data_text, prev):
    m = field(b"radrelay-audit-v1") + struct.pack(">Qq", seq, at_ms)
    for f in (actor, kind, subject, data_text):
        m += field(f.encode())
    return hashlib.sha256(m + bytes.fromhex(prev)).hexdigest()


def check_lines(test, text, first_seq=1, prev=None):
    """Re-hashes JSON lines; returns (count, last hash)."""
    n, last = 0, prev
    for line in text.splitlines():
        r = json.loads(line)
        test.assertEqual(set(r), {"seq", "at_ms", "actor", "kind", "subject", "data", "prev",
                                  "hash"})
        test.assertEqual(r["seq"], first_seq + n)
        if last is not None:
            test.assertEqual(r["prev"], last)
        want = record_hash(r["seq"], r["at_ms"], r["actor"], r["kind"], r["subject"],
                           canonical(r["data"]), r["prev"])
        test.assertEqual(want, r["hash"], f"record {r['seq']}")
        last = r["hash"]
        n += 1
    return n, last


class AuditCli(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="rr-audit-cli-")
        cls.pristine = os.path.join(cls.work, "pristine.db")
        out = subprocess.run([ARGS.make_store, "--make-store", cls.pristine], check=True,
                             capture_output=True, text=True).stdout.split()
        cls.count, cls.head = int(out[0]), out[1]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.work, ignore_errors=True)

    def setUp(self):
        """A configuration and a fresh copy of the store for each case."""
        self.dir = tempfile.mkdtemp(dir=self.work)
        os.mkdir(os.path.join(self.dir, "channels"))
        with open(os.path.join(self.dir, "channels", "adt.json"), "w") as f:
            json.dump({"name": "adt", "source": {"type": "mllp", "host": "127.0.0.1", "port": 0}},
                      f)
        os.mkdir(os.path.join(self.dir, "store"))
        self.store = os.path.join(self.dir, "store", "radrelay.db")
        shutil.copy(self.pristine, self.store)
        self.config = os.path.join(self.dir, "radrelay.json")
        with open(self.config, "w") as f:
            json.dump({"store": {"path": "store/radrelay.db"}, "channels": "channels"}, f)

    def cli(self, *args):
        return subprocess.run([ARGS.radrelay, "audit", *args, "-c", self.config],
                              capture_output=True, text=True, timeout=60)

    def tamper(self, *sql):
        db = sqlite3.connect(self.store)
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("DROP TRIGGER audit_no_delete")
        for s in sql:
            db.execute(s)
        db.commit()
        db.close()

    def test_verify_intact(self):
        r = self.cli("verify")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, f"audit: {self.count} records, chain intact, head {self.head}\n")
        r = self.cli("verify", "--anchor", f"{self.count}:{self.head}")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("anchor matches", r.stdout)
        r = self.cli("verify", "--anchor", f"50:{'ab' * 32}")
        self.assertEqual(r.returncode, 1)
        self.assertIn("anchor 50 does not match", r.stdout)

    def test_export_rehash(self):
        r = self.cli("export")
        self.assertEqual(r.returncode, 0, r.stderr)
        n, last = check_lines(self, r.stdout, prev=ZERO)
        self.assertEqual(n, self.count)
        self.assertEqual(last, self.head)
        first = json.loads(r.stdout.splitlines()[0])
        self.assertIsInstance(first["data"], dict)  # a JSON value, not a string
        # a time window: record i is at 1795000000000 + i s; until is excluded
        r = self.cli("export", "--since", "1795000010000", "--until", "2026-11-18T11:07:30Z")
        self.assertEqual(r.returncode, 0, r.stderr)
        n, _ = check_lines(self, r.stdout, first_seq=10)
        self.assertEqual(n, 1795000050000 // 1000 - 1795000010000 // 1000)
        # to a file, readable by its owner only
        out = os.path.join(self.dir, "audit.jsonl")
        r = self.cli("export", "--out", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "")
        self.assertEqual(os.stat(out).st_mode & 0o777, 0o600)
        with open(out) as f:
            self.assertEqual(check_lines(self, f.read(), prev=ZERO), (self.count, self.head))

    def test_python_records_verify(self):
        """Records appended by Python with the documented recipe verify."""
        db = sqlite3.connect(self.store)
        seq, prev = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        for i, data in enumerate([{"z": 1, "a": [0.5, 1e-7, "\u00e9\n"]}, None, "x"]):
            seq += 1
            text = canonical(data)
            h = record_hash(seq, 1796000000000 + i, "python", "verdict", f"s{i}", text, prev)
            db.execute("INSERT INTO audit VALUES(?,?,?,?,?,?,?,?)",
                       (seq, 1796000000000 + i, "python", "verdict", f"s{i}", text, prev, h))
            prev = h
        db.commit()
        db.close()
        r = self.cli("verify")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(r.stdout, f"audit: {self.count + 3} records, chain intact, head {prev}\n")

    def test_edited(self):
        self.tamper("UPDATE audit SET subject = 'x' WHERE seq = 57")
        r = self.cli("verify")
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stdout.startswith("audit: record 57: edited: "), r.stdout)

    def test_deleted(self):
        self.tamper("DELETE FROM audit WHERE seq = 80")
        r = self.cli("verify")
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stdout.startswith("audit: record 80: deleted: "), r.stdout)

    def test_reordered(self):
        self.tamper("UPDATE audit SET seq = -1 WHERE seq = 20",
                    "UPDATE audit SET seq = 20 WHERE seq = 30",
                    "UPDATE audit SET seq = 30 WHERE seq = -1")
        r = self.cli("verify")
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stdout.startswith("audit: record 20: reordered: "), r.stdout)

    def test_truncated_tail(self):
        """Removing the newest record leaves a valid chain; the anchor shows it."""
        self.tamper(f"DELETE FROM audit WHERE seq = {self.count}")
        r = self.cli("verify")
        self.assertEqual(r.returncode, 0)
        self.assertTrue(r.stdout.startswith(f"audit: {self.count - 1} records, chain intact"))
        r = self.cli("verify", "--anchor", f"{self.count}:{self.head}")
        self.assertEqual(r.returncode, 1)
        self.assertIn("past the newest record", r.stdout)

    def test_usage(self):
        r = subprocess.run([ARGS.radrelay, "audit"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        r = self.cli("export", "--since", "yesterday")
        self.assertEqual(r.returncode, 2)
        r = subprocess.run([ARGS.radrelay, "audit", "verify"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertIn("-c CONFIG", r.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--radrelay", required=True)
    p.add_argument("--make-store", required=True)
    ARGS, rest = p.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)

#!/usr/bin/env python3
"""A store made by an early radrelay, whose queue table had plain rowids
(SQLite hands the newest id out again once that row is deleted, i.e.
delivered), is upgraded when the engine opens it: the table is rebuilt with
AUTOINCREMENT, queued rows are kept, and new rows get ids past every id the
store ever used (queue rows, delivery history, AI jobs), so an id -- and an
AI job named after it -- never comes back.

Run: test_store_upgrade.py --radrelay build/radrelay (exits 77 without
python3-hl7)."""
import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_study_matching import send_hl7, wait_for  # noqa: E402

ADT = ("MSH|^~\\&|ADT_SIM|RRTEST_HOSP|RADRELAY|RRTEST|202611280700||ADT^A04|RRUPG-1|P|2.5\r"
       "EVN|A04|202611280700\r"
       "PID|1||RRPAT-UPG1^^^RRTEST_HOSP^MR||ZZTEST^UPGRADE||19700101|F\r")


def run(radrelay, config, send=None):
    lines = []
    proc = subprocess.Popen([radrelay, "run", "-c", config], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: [lines.append(l) for l in proc.stderr], daemon=True).start()
    wait_for(lambda: any("event=ready channel=orders" in l for l in lines), 20, "ready")
    if send:
        port = int([l for l in lines if "event=ready channel=orders" in l][0]
                   .split("port=")[1].split()[0])
        send(port)
    proc.terminate()
    assert proc.wait(timeout=30) == 0, lines[-10:]
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    if subprocess.run(["/usr/bin/python3", "-c", "import hl7"], capture_output=True).returncode:
        print("SKIPPED: python3-hl7 not importable by /usr/bin/python3")
        return 77
    with tempfile.TemporaryDirectory(prefix="rr-upgrade-") as tmp:
        ch = os.path.join(tmp, "channels")
        os.makedirs(ch)
        shutil.copytree(os.path.join(ROOT, "channels", "lib"), os.path.join(ch, "lib"))
        shutil.copy(os.path.join(ROOT, "channels", "orders.lua"), ch)
        with open(os.path.join(ROOT, "channels", "orders.json")) as f:
            c = json.load(f)
        c["source"]["port"] = 0
        c["destinations"]["patient_index"]["port"] = 9  # discard: nobody answers
        with open(os.path.join(ch, "orders.json"), "w") as f:
            json.dump(c, f)
        config = os.path.join(tmp, "radrelay.json")
        store = os.path.join(tmp, "store.db")
        with open(config, "w") as f:
            json.dump({"store": {"path": "store.db"}, "channels": "channels"}, f)
        run(args.radrelay, config)
        # the early layout: plain rowids; queued rows 10..12; history up to 50
        db = sqlite3.connect(store)
        db.executescript(
            "DROP TABLE queue;"
            "CREATE TABLE queue(id INTEGER PRIMARY KEY, message_id INTEGER NOT NULL,"
            " destination TEXT NOT NULL, key TEXT NOT NULL, lane INTEGER NOT NULL,"
            " state TEXT NOT NULL, attempts INTEGER NOT NULL, not_before_ms INTEGER NOT NULL,"
            " enqueued_ms INTEGER NOT NULL, last_error TEXT, content_type TEXT NOT NULL,"
            " payload BLOB NOT NULL);"
            "DELETE FROM sqlite_sequence WHERE name = 'queue';")
        for i in (10, 11, 12):
            db.execute("INSERT INTO queue VALUES(?, 1, 'orders.old_gone', '', 0, 'dead', 3, 0,"
                       " 0, 'x', 'hl7', x'4d5348')", (i,))
        db.execute("INSERT INTO deliveries(queue_id, message_id, destination, attempt, at_ms,"
                   " outcome) VALUES(50, 1, 'orders.patient_index', 1, 0, 'delivered')")
        db.commit()
        db.close()
        lines = run(args.radrelay, config, lambda port: send_hl7(port, [ADT]))
        assert any("event=store_upgraded table=queue" in l for l in lines), lines[-20:]
        db = sqlite3.connect(store)
        try:
            (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'queue'").fetchone()
            assert "AUTOINCREMENT" in sql, sql
            ids = [r[0] for r in db.execute("SELECT id FROM queue ORDER BY id")]
            assert ids[:3] == [10, 11, 12] and len(ids) == 4 and ids[3] > 50, ids
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
        # opened again: nothing more to upgrade
        lines = run(args.radrelay, config)
        assert not any("event=store_upgraded" in l for l in lines)
    print(f"store upgrade: queue rebuilt with AUTOINCREMENT, rows kept, new id {ids[3]} past 50")
    return 0


if __name__ == "__main__":
    sys.exit(main())

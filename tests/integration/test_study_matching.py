#!/usr/bin/env python3
"""Orders and studies in the running engine: the bundled orders channel
(channels/orders.lua) keeps the orders that python-hl7's MLLP client sends;
DCMTK's storescu (the modality) sends synthetic CT studies to a DICOM
source channel; once stable, each study is matched to its order and its
context goes to the channel's on_study, which routes it to an HTTP receiver
here. Checked:

- match by accession; by Study Instance UID (no accession in the images);
  by patient ID + modality + time window; no order ("none");
- the context carries the order's priority, indication and procedure;
- an order changed (XO) and cancelled (CA) after it was first kept;
- a late instance of a routed study: recorded, not routed again
  (late_series "ignore"); with "reopen" the study is routed again;
- a study interrupted by a restart completes, and is routed, once; so does
  one that arrived just before a kill -9, and one made stable by `radrelay
  study complete` while the engine was down;
- no patient identifier or UID in the log above debug.

Run: test_study_matching.py --radrelay build/radrelay (needs /usr/bin/python3
with pydicom and hl7, and DCMTK's storescu; exits 77 otherwise)."""
import argparse
import http.server
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SKIP = 77
HOST = "127.0.0.1"

IMAGING_LUA = r"""
function on_study(study, ctx)
  ctx:log("info", "study", study.match)
  ctx:route("events", study)
end
"""


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)  # poll interval; the condition is pred()
    raise AssertionError(f"timed out waiting for {what}")


class Receiver:
    """An HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self):
        self.bodies, self.lock = [], threading.Lock()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(n))
                with outer.lock:
                    outer.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_study(self, uid):
        with self.lock:
            return [b for b in self.bodies if b.get("study_uid") == uid]


class Engine:
    def __init__(self, radrelay, workdir, receiver_port):
        self.radrelay, self.dir = radrelay, workdir
        chdir = os.path.join(workdir, "channels")
        os.makedirs(chdir, exist_ok=True)
        shutil.copytree(os.path.join(ROOT, "channels", "lib"), os.path.join(chdir, "lib"))
        shutil.copy(os.path.join(ROOT, "channels", "orders.lua"), chdir)
        with open(os.path.join(ROOT, "channels", "orders.json")) as f:
            orders = json.load(f)
        orders["source"]["port"] = 0
        orders["destinations"]["patient_index"]["port"] = 9  # nothing listens: ADT waits
        with open(os.path.join(chdir, "orders.json"), "w") as f:
            json.dump(orders, f)
        imaging = {"name": "imaging",
                   "source": {"type": "dicom", "host": HOST, "port": 0, "ae_title": "RADRELAY",
                              "calling_aes": ["RRTEST"], "spool": "spool", "min_free_mb": 1,
                              "stable_after_s": 2, "match_window_hours": 12},
                   "script": "imaging.lua",
                   "destinations": {"events": {
                       "type": "http", "url": f"http://{HOST}:{receiver_port}/studies"}}}
        with open(os.path.join(chdir, "imaging.json"), "w") as f:
            json.dump(imaging, f)
        with open(os.path.join(chdir, "imaging.lua"), "w") as f:
            f.write(IMAGING_LUA)
        self.config = os.path.join(workdir, "radrelay.json")
        with open(self.config, "w") as f:
            json.dump({"store": {"path": "store/radrelay.db"}, "channels": "channels",
                       "log": {"level": "info"}}, f)
        self.store = os.path.join(workdir, "store", "radrelay.db")
        self.lines, self.all_lines, self.lock = [], [], threading.Lock()

    def start(self):
        self.lines = []
        self.proc = subprocess.Popen([self.radrelay, "run", "-c", self.config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        wait_for(lambda: len(self.grep("event=ready")) == 2, 20, "event=ready x2")
        self.orders_port = int(re.search(r"port=(\d+)",
                                         self.grep("event=ready", "channel=orders")[0]).group(1))
        self.dicom_port = int(re.search(r"port=(\d+)",
                                        self.grep("event=ready", "channel=imaging")[0]).group(1))
        return self

    def _read(self, proc):
        for line in proc.stderr:
            with self.lock:
                self.lines.append(line.rstrip("\n"))
                self.all_lines.append(line.rstrip("\n"))

    def grep(self, *needles):
        with self.lock:
            return [l for l in self.lines if all(n in l for n in needles)]

    def sql(self, q, *args):
        db = sqlite3.connect(self.store, timeout=10)
        try:
            return db.execute(q, args).fetchall()
        finally:
            db.close()

    def set_stable_after(self, seconds, late_series=None):
        path = os.path.join(self.dir, "channels", "imaging.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["source"]["stable_after_s"] = seconds
        if late_series:
            cfg["source"]["late_series"] = late_series
        with open(path, "w") as f:
            json.dump(cfg, f)

    def stop(self):
        self.proc.terminate()
        rc = self.proc.wait(timeout=30)
        if rc != 0:  # a sanitizer report from its first line, else the last lines
            first = next((i for i, l in enumerate(self.lines) if "==ERROR" in l), None)
            shown = self.lines[first:first + 60] if first is not None else self.lines[-20:]
            raise AssertionError(f"radrelay exited {rc} on SIGTERM:\n" + "\n".join(shown))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def orm(control_id, order_control, accession, mrn, modality, priority, reason, when,
        study_uid=""):
    """A synthetic ORM^O01 (made-up patient ZZTEST^...)."""
    segs = [
        f"MSH|^~\\&|RIS_SIM|RRTEST_HOSP|RADRELAY|RRTEST|{when}||ORM^O01|{control_id}|P|2.3",
        f"PID|1||{mrn}^^^RRTEST_HOSP^MR||ZZTEST^MATCH||19700101|F",
        "PV1|1|E|ED^BAY1^1",
        f"ORC|{order_control}|PLC-{accession}|FIL-{accession}||SC||1^ONCE^^{when}^^{priority}"
        f"||{when}|||ORD9^ZZORDER^THETA",
        f"OBR|1|PLC-{accession}|FIL-{accession}|CTHEAD^CT HEAD WITHOUT CONTRAST^L|||{when}"
        f"|||||||||ORD9^ZZORDER^THETA||{accession}||||||{modality}|||1^ONCE^^{when}^^{priority}"
        f"||||^{reason}",
    ]
    if study_uid:
        segs.append(f"ZDS|{study_uid}^RADRELAY^Application^DICOM")
    return ("\r".join(segs) + "\r").encode()


def send_hl7(port, payloads):
    import hl7.client  # Debian's python3-hl7: an MLLP client we did not write
    acks = []
    with hl7.client.MLLPClient(HOST, port) as c:
        c.socket.settimeout(20)
        for p in payloads:
            acks.append(c.send_message(p))
    return acks


def make_study(out, seed, accession, patient_id, slices=3, study_uid=None, date=None, time_=None):
    cmd = ["/usr/bin/python3", os.path.join(ROOT, "scripts", "make-study"), "--out", out,
           "--slices", str(slices), "--size", "64", "--accession", accession,
           "--patient-id", patient_id, "--seed", str(seed)]
    if study_uid:
        cmd += ["--study-uid", study_uid]
    if date:
        cmd += ["--date", date]
    if time_:
        cmd += ["--time", time_]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["study_instance_uid"]


def store(port, *paths):
    env = dict(os.environ, TCP_NODELAY="1")  # DCMTK's tools leave Nagle on otherwise
    r = subprocess.run(["storescu", "-aet", "RRTEST", "-aec", "RADRELAY", "+sd", "-xe", HOST,
                        str(port), *paths], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    if not shutil.which("storescu"):
        print("SKIPPED: storescu not found (Debian package dcmtk)")
        return SKIP
    for mod in ("pydicom", "hl7"):
        if subprocess.run(["/usr/bin/python3", "-c", "import " + mod],
                          capture_output=True).returncode != 0:
            print(f"SKIPPED: {mod} not importable by /usr/bin/python3")
            return SKIP
    rx = Receiver()
    with tempfile.TemporaryDirectory(prefix="rr-match-") as tmp:
        e = Engine(os.path.abspath(args.radrelay), tmp, rx.port).start()
        today = time.strftime("%Y%m%d")
        try:
            uid_by_study = "2.25.99000111222333444555666777888999001"
            acks = send_hl7(e.orders_port, [
                orm("RRM-1", "NW", "RRACC-A1", "RRPAT-1", "CT", "S", "SUSPECTED BLEED",
                    today + "0900"),
                orm("RRM-2", "NW", "RRACC-U1", "RRPAT-2", "CT", "R", "FOLLOW UP",
                    today + "0900", study_uid=uid_by_study),
                orm("RRM-3", "NW", "RRACC-T1", "RRPAT-3", "CT", "R", "HEADACHE",
                    today + "0930"),
                orm("RRM-4", "NW", "RRACC-T2", "RRPAT-3", "CT", "R", "OLD ORDER",
                    "20200101" + "0930"),
                orm("RRM-5", "NW", "RRACC-C1", "RRPAT-5", "CT", "R", "TO BE CANCELLED",
                    today + "0800"),
                orm("RRM-6", "XO", "RRACC-A1", "RRPAT-1", "CT", "S", "SUSPECTED BLEED, ON AC",
                    today + "0900"),
                orm("RRM-7", "CA", "RRACC-C1", "RRPAT-5", "CT", "R", "", today + "0800"),
            ])
            for a in acks:
                a = a.decode() if isinstance(a, bytes) else a
                assert "MSA|AA|" in a, a
            rows = e.sql("SELECT accession, status, priority FROM orders ORDER BY accession")
            assert rows == [("RRACC-A1", "active", "STAT"), ("RRACC-C1", "cancelled", "ROUTINE"),
                            ("RRACC-T1", "active", "ROUTINE"), ("RRACC-T2", "active", "ROUTINE"),
                            ("RRACC-U1", "active", "ROUTINE")], rows
            studies = {
                "accession": make_study(os.path.join(tmp, "s1"), 1, "RRACC-A1", "RRPAT-1",
                                        date=today, time_="091500"),
                "study_uid": make_study(os.path.join(tmp, "s2"), 2, "", "RRPAT-2",
                                        study_uid=uid_by_study, date=today, time_="091500"),
                "patient_modality_time": make_study(os.path.join(tmp, "s3"), 3, "", "RRPAT-3",
                                                    date=today, time_="100000"),
                "none": make_study(os.path.join(tmp, "s4"), 4, "", "RRPAT-4", date=today,
                                   time_="100000"),
            }
            for k in ("s1", "s2", "s3", "s4"):
                store(e.dicom_port, os.path.join(tmp, k))
            for method, uid in studies.items():
                wait_for(lambda: rx.for_study(uid), 30, f"the {method} study routed")
                (ctx,) = rx.for_study(uid)
                assert ctx["match"] == method, (method, ctx["match"])
                assert ctx["instances"] == 3 and ctx["modalities"] == ["CT"], ctx
                assert len(ctx["series"]) == 1 and ctx["series"][0]["instances"] == 3, ctx
            ctx = rx.for_study(studies["accession"])[0]
            assert ctx["order"]["priority"] == "STAT", ctx["order"]
            assert ctx["order"]["reason"] == "SUSPECTED BLEED, ON AC", ctx["order"]  # the XO
            assert ctx["order"]["procedure"]["code"] == "CTHEAD", ctx["order"]
            assert ctx["order"]["status"] == "active", ctx["order"]
            assert rx.for_study(studies["study_uid"])[0]["order"]["accession"] == "RRACC-U1"
            # the order of today, not the one of 2020, for the same patient and modality
            assert rx.for_study(studies["patient_modality_time"])[0]["order"]["accession"] \
                == "RRACC-T1"
            assert rx.for_study(studies["none"])[0]["order"] is None
            # the match is in the store, and every study event was delivered
            rows = e.sql("SELECT s.match_method, o.accession FROM studies s LEFT JOIN orders o"
                         " ON o.id = s.order_id ORDER BY s.match_method")
            assert rows == [("accession", "RRACC-A1"), ("none", None),
                            ("patient_modality_time", "RRACC-T1"),
                            ("study_uid", "RRACC-U1")], rows
            # (the outcome is recorded in the commit after the receiver's answer)
            lanes_sql = ("SELECT m.accession, d.outcome FROM deliveries d JOIN messages m"
                         " ON m.id = d.message_id WHERE m.message_type = 'STUDY'")
            wait_for(lambda: len(e.sql(lanes_sql)) >= 4, 10, "the four deliveries recorded")
            lanes = e.sql(lanes_sql)
            assert len(lanes) == 4 and all(o == "delivered" for _, o in lanes), lanes
            assert e.grep("event=study_routed", "match=accession")
            # a cancelled order still matches by accession, with its status
            uid_c = make_study(os.path.join(tmp, "s5"), 5, "RRACC-C1", "RRPAT-5")
            store(e.dicom_port, os.path.join(tmp, "s5"))
            wait_for(lambda: rx.for_study(uid_c), 30, "the cancelled order's study routed")
            assert rx.for_study(uid_c)[0]["order"]["status"] == "cancelled"

            # restart during arrival: half the study, stop, the rest, routed once
            uid6 = make_study(os.path.join(tmp, "s6"), 6, "RRACC-T1", "RRPAT-3", slices=6)
            files = sorted(os.path.join(tmp, "s6", f) for f in os.listdir(os.path.join(tmp, "s6")))
            store(e.dicom_port, *files[:3])
            wait_for(lambda: e.sql("SELECT instances FROM studies WHERE study_uid = ?", uid6)
                     == [(3,)], 10, "half of the sixth study")
        finally:
            e.stop()
        e.start()
        try:
            store(e.dicom_port, *files[3:])
            wait_for(lambda: rx.for_study(uid6), 30, "the interrupted study routed")
            assert rx.for_study(uid6)[0]["instances"] == 6
            # a late instance of a routed study with late_series "ignore"
            # (the default): recorded, the study stays routed, not again
            s5 = os.path.join(tmp, "s5")
            before = e.sql("SELECT max(i.received_ms), s.routed_ms FROM instances i JOIN studies"
                           " s USING (study_uid) WHERE study_uid = ?", uid_c)[0]
            store(e.dicom_port, os.path.join(s5, sorted(os.listdir(s5))[0]))
            wait_for(lambda: e.sql("SELECT max(received_ms) FROM instances WHERE study_uid = ?",
                                   uid_c)[0][0] > before[0], 10, "the late instance recorded")
            assert e.sql("SELECT state, routed_ms FROM studies WHERE study_uid = ?", uid_c) == [
                ("stable", before[1])]
            # kill -9 right after a study arrived: routed once, after the restart
            uid7 = make_study(os.path.join(tmp, "s7"), 7, "RRACC-U1", "RRPAT-2")
            store(e.dicom_port, os.path.join(tmp, "s7"))
            e.kill()
        except BaseException:
            e.stop()
            raise
        e.set_stable_after(3600)
        e.start()
        try:
            wait_for(lambda: e.sql("SELECT instances FROM studies WHERE study_uid = ?", uid7)
                     == [(3,)], 10, "the seventh study kept")
            # stable while the engine is down (`radrelay study complete` on
            # the store), not yet routed: the next start routes it, once
            uid8 = make_study(os.path.join(tmp, "s8"), 8, "RRACC-T1", "RRPAT-3")
            store(e.dicom_port, os.path.join(tmp, "s8"))
            wait_for(lambda: e.sql("SELECT state FROM studies WHERE study_uid = ?", uid8)
                     == [("arriving",)], 10, "the eighth study arriving")
        finally:
            e.stop()
        for uid in (uid7, uid8):
            cli = subprocess.run([e.radrelay, "study", "complete", uid, "-c", e.config],
                                 capture_output=True, text=True)
            assert cli.returncode == 0, cli.stderr
        assert e.sql("SELECT count(*) FROM studies WHERE state = 'stable' AND routed_ms IS NULL"
                     " AND study_uid IN (?, ?)", uid7, uid8) == [(2,)]
        e.start()
        try:
            for uid in (uid7, uid8):
                wait_for(lambda: rx.for_study(uid), 30, "a study completed offline routed")
            wait_for(lambda: e.sql("SELECT count(*) FROM queue") == [(0,)], 30,
                     "every delivery done")
        finally:
            e.stop()
        # late_series "reopen": a late instance makes the routed study
        # arriving again; stable again, it is handed to on_study again
        e.set_stable_after(1, late_series="reopen")
        e.start()
        try:
            s1 = os.path.join(tmp, "s1")
            store(e.dicom_port, os.path.join(s1, sorted(os.listdir(s1))[0]))
            wait_for(lambda: len(rx.for_study(studies["accession"])) == 2, 30,
                     "the reopened study routed again")
            again = rx.for_study(studies["accession"])[1]
            assert again["match"] == "accession" and again["instances"] == 3, again
        finally:
            e.stop()
        assert len(rx.for_study(studies["accession"])) == 2
        for uid in list(studies.values())[1:] + [uid_c, uid6, uid7, uid8]:
            assert len(rx.for_study(uid)) == 1, (uid, len(rx.for_study(uid)))
        assert e.sql("SELECT count(*) FROM studies WHERE routed_ms IS NULL") == [(0,)]
        leaks = [l for l in e.all_lines if "level=debug" not in l and
                 any(s in l for s in ["RRPAT-", "RRACC-", "2.25."] + list(studies.values()))]
        assert not leaks, leaks[:5]
        bad = [l for l in e.all_lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad, bad
        db = sqlite3.connect(e.store)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
    print("study matching: accession, Study UID, patient + modality + time, none; order change "
          "and cancel; restart mid-arrival, kill -9, completed offline: each study routed once")
    return 0


if __name__ == "__main__":
    sys.exit(main())

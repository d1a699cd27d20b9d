#!/usr/bin/env python3
"""The engine's web dashboard (engine/admin/www, served at /ui/) in headless
Chromium, and GET /api/ai/summary behind it, with the real binary and the
bundled orders and reports channels:

1. the engine runs, takes ORMs and an ADT from python-hl7's MLLP client,
   and stops; AI jobs, findings with the radiologists' verdicts, a study
   and two critical-result notifications (one open, one acknowledged) are
   written into its store as the AI workflow leaves them; the engine starts
   again on that store and takes more messages;
2. GET /api/ai/summary: 401 without a token, 200 for a viewer, and per
   endpoint and model the counts, rates and nearest-rank percentiles of
   those rows; since= leaves older jobs out; / and /ui send to /ui/, the
   files come with their types;
3. Debian's Chromium, driven by playwright-core (tests/peers, the system
   browser: nothing downloaded), signs in (an unknown token refused, the
   viewer's kept in sessionStorage only), sees the channel counters and
   rates, the queue of the ADT, the AI summary, a viewer's acknowledgement
   refused with a clear 403, searches a message by MRN from the keyboard,
   opens it (raw HL7 a segment per line, its ACK, the timeline with ms
   deltas), and as an operator acknowledges the open notification; no
   console errors but the provoked 401/403, no request to another host,
   no token in a URL, the MRN only in the search request
   (tests/integration/peers/dashboard_browser.mjs);
4. the acknowledgement is in the store with the operator's name; no token
   in the engine's log.

Screenshots go to --artifacts (dashboard.png: the message and its
timeline; dashboard-channels/-ai/-timeline/-notifications.png).

Run: test_dashboard.py --radrelay build/radrelay --artifacts build/artifacts
(exits 77 without Chromium, node 20+, tests/peers' playwright-core
(scripts/setup) or python3-hl7)."""
import argparse
import hashlib
import http.client
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_study_matching import orm, send_hl7, wait_for  # noqa: E402

SKIP = 77
HOST = "127.0.0.1"
TOKENS = {"viewer": "rr-test-token-viewer-dashboard-0001",
          "operator": "rr-test-token-operator-dashboard-0001"}
MRN = "RRPAT-DB1"
ACC = "RRACC-DB1"
ADT = ("MSH|^~\\&|ADT_SIM|RRTEST_HOSP|RADRELAY|RRTEST|202611280700||ADT^A04|RRDB-ADT1|P|2.5\r"
       "EVN|A04|202611280700\r"
       f"PID|1||{MRN}^^^RRTEST_HOSP^MR||ZZTEST^DASHBOARD||19700101|F\r"
       "PV1|1|E|ED^BAY1^1\r")
OPEN_NOTE, ACKED_NOTE = "N-00000000000d0b02", "N-00000000000d0b01"


def skip_reason(args):
    if not os.access(args.chromium, os.X_OK):
        return f"{args.chromium} missing (apt-get install chromium)"
    node = shutil.which(args.node)
    if not node:
        return "node missing"
    r = subprocess.run([node, "-e", "process.exit(Number(process.versions.node.split('.')[0]) >= 20"
                        " ? 0 : 1)"], capture_output=True)
    if r.returncode != 0:
        return "playwright-core needs node 20 or later"
    r = subprocess.run([node, "-e", "require.resolve('playwright-core')"], cwd=args.peers,
                       capture_output=True)
    if r.returncode != 0:
        return f"playwright-core not installed in {args.peers} (scripts/setup)"
    if subprocess.run(["/usr/bin/python3", "-c", "import hl7"], capture_output=True).returncode:
        return "python3-hl7 missing"
    return None


def call(port, method, path, token=None, body=None):
    c = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        h = {"Authorization": f"Bearer {token}"} if token else {}
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.getheader("Location"), r.read()
    finally:
        c.close()


class Engine:
    def __init__(self, radrelay, config):
        self.lines, self.lock = [], threading.Lock()
        self.proc = subprocess.Popen([radrelay, "run", "-c", config], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: self.grep("event=api_ready") or self.proc.poll() is not None, 20,
                 "the API ready")
        assert self.proc.poll() is None, self.lines[-20:]
        self.port = int(self.grep("event=api_ready")[0].split("port=")[1].split()[0])
        self.orders = int(self.grep("event=ready", "channel=orders")[0]
                          .split("port=")[1].split()[0])

    def _read(self):
        for line in self.proc.stderr:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def grep(self, *needles):
        with self.lock:
            return [l for l in self.lines if all(n in l for n in needles)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(timeout=30)
        assert rc == 0, self.lines[-20:]
        bad = [l for l in self.lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad, bad


def send(port, msgs):
    acks = send_hl7(port, msgs)
    for a in acks:
        assert "MSA|AA|" in (a.decode() if isinstance(a, bytes) else str(a)), a


def seed(db_path):
    """AI jobs, findings, a study and notifications as the AI workflow leaves
    them; returns what GET /api/ai/summary must say, and when the older jobs
    were sent."""
    db = sqlite3.connect(db_path)
    t0 = db.execute("SELECT created_ms FROM orders WHERE accession = ?", (ACC,)).fetchone()[0]
    old = t0 - 3 * 3600 * 1000  # the other studies: three hours before
    studies = {  # uid: (accession, first_ms)
        "2.25.90011": (ACC, t0 + 100),
        "2.25.90012": ("RRACC-DB2", old),
        "2.25.90013": ("RRACC-DB3", old + 60_000),
        "2.25.90014": ("RRACC-DB4", old + 120_000),
        "2.25.90015": ("RRACC-DB5", old + 180_000),
        "2.25.90016": ("RRACC-DB6", old + 240_000),
    }
    for uid, (acc, first) in studies.items():
        db.execute("INSERT INTO studies(study_uid, channel, patient_id, accession, modality,"
                   " instances, first_ms, last_ms, state, stable_ms, routed_ms, match_method)"
                   " VALUES(?, 'imaging', ?, ?, 'CT', 120, ?, ?, 'stable', ?, ?, 'accession')",
                   (uid, MRN if acc == ACC else "RRPAT-DBX", acc, first, first + 150,
                    first + 200, first + 210))
    # job: (endpoint, uid, mode, state, sent, result, model, version, critical)
    bleed, pe = ("BleedNet", "2.1"), ("PENet", "1.0")
    jobs = {
        "AJ-DB-1": ("ai_bleed", "2.25.90011", "active", "completed", t0 + 320, t0 + 620, bleed, 1),
        "AJ-DB-2": ("ai_bleed", "2.25.90012", "active", "completed", old + 1000, old + 4000,
                    bleed, 0),
        "AJ-DB-3": ("ai_bleed", "2.25.90013", "active", "completed", old + 61_000,
                    old + 66_000, bleed, 1),
        "AJ-DB-4": ("ai_bleed", "2.25.90014", "active", "failed", old + 121_000, None,
                    (None, None), None),
        "AJ-DB-5": ("ai_bleed", "2.25.90015", "active", "expired", old + 181_000, None,
                    (None, None), None),
        "AJ-DB-6": ("ai_bleed", "2.25.90016", "active", "running", t0 + 50, None,
                    (None, None), None),
        "AJ-DB-7": ("ai_pe", "2.25.90012", "shadow", "completed", old + 1000, old + 6000, pe, 0),
        "AJ-DB-8": ("ai_pe", "2.25.90013", "shadow", "completed", old + 61_000, old + 68_000,
                    pe, 1),
    }
    for job, (ep, uid, mode, state, sent, result, (name, ver), crit) in jobs.items():
        db.execute("INSERT INTO ai_jobs(job_id, destination, channel, study_uid, mode, state,"
                   " sent_ms, deadline_ms, result_ms, model_name, model_version, critical)"
                   " VALUES(?, ?, 'imaging', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (job, ep, uid, mode, state, sent, sent + 600_000, result, name, ver, crit))
    # finding: (job, id, critical, verdict, verdict_ms)
    findings = [
        ("AJ-DB-1", "F1", 1, "confirmed", t0 + 900),
        ("AJ-DB-2", "F1", 0, "overridden", old + 4000 + 3_600_000),
        ("AJ-DB-3", "F1", 1, "confirmed", old + 66_000 + 1_800_000),
        ("AJ-DB-8", "F1", 1, "overridden", old + 68_000 + 900_000),
    ]
    for job, fid, crit, verdict, at in findings:
        db.execute("INSERT INTO ai_findings(job_id, finding_id, study_uid, code_system, code,"
                   " meaning, label, confidence, critical, acr_category, finding, verdict,"
                   " verdict_ms, verdict_by) VALUES(?, ?, ?, 'SCT', '1386000',"
                   " 'Intracranial hemorrhage', 'bleed', 0.93, ?, ?, '{}', ?, ?, 'dr-zztest')",
                   (job, fid, jobs[job][1], crit, 1 if crit else None, verdict, at))
    now = int(time.time() * 1000)
    notes = [  # id, study, job, state, created, acked, sends, level
        (ACKED_NOTE, "2.25.90011", "AJ-DB-1", "acked", t0 + 640, t0 + 700, 1, 0),
        (OPEN_NOTE, "2.25.90013", "AJ-DB-3", "open", now - 7 * 60_000, None, 3, 1),
    ]
    for nid, uid, job, state, created, acked, sends, level in notes:
        payload = json.dumps({"finding": "Intracranial hemorrhage", "code": "1386000",
                              "accession": studies[uid][0]})
        db.execute("INSERT INTO notifications(id, key, destination, channel, job_id, study_uid,"
                   " category, level, attempt, sends, state, created_ms, level_ms, last_ms,"
                   " next_ms, acked_ms, acked_by, ack_via, payload)"
                   " VALUES(?, ?, 'pager', 'imaging', ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
                   (nid, f"{job}/F1", job, uid, level, sends, sends, state, created,
                    created + 60_000 * level, created + 60_000 * level, acked,
                    "dr-zztest" if acked else None, "test-operator" if acked else None,
                    payload))
    db.commit()
    db.close()
    pct = lambda n, p50, p90: {"n": n, "p50": p50, "p90": p90}  # noqa: E731
    none = pct(0, None, None)
    expected = {
        ("ai_bleed", "BleedNet", "2.1"): {
            "modes": ["active"], "jobs": 3, "studies": 3, "running": 0, "completed": 3,
            "failed": 0, "rejected": 0, "expired": 0, "critical": 2, "critical_rate": 2 / 3,
            "findings": 3, "confirmed": 2, "overridden": 1, "agreement_rate": 2 / 3,
            "turnaround_ms": pct(3, 3000, 5000),         # 300, 3000, 5000
            "arrival_to_result_ms": pct(3, 4000, 6000),  # 520, 4000, 6000
            "result_to_report_ms": pct(3, 1_800_000, 3_600_000)},  # 280, 30 min, 1 h
        ("ai_bleed", None, None): {
            "modes": ["active"], "jobs": 3, "studies": 3, "running": 1, "completed": 0,
            "failed": 1, "rejected": 0, "expired": 1, "critical": 0, "critical_rate": None,
            "findings": 0, "confirmed": 0, "overridden": 0, "agreement_rate": None,
            "turnaround_ms": none, "arrival_to_result_ms": none, "result_to_report_ms": none},
        ("ai_pe", "PENet", "1.0"): {
            "modes": ["shadow"], "jobs": 2, "studies": 2, "running": 0, "completed": 2,
            "failed": 0, "rejected": 0, "expired": 0, "critical": 1, "critical_rate": 0.5,
            "findings": 1, "confirmed": 0, "overridden": 1, "agreement_rate": 0.0,
            "turnaround_ms": pct(2, 5000, 7000),
            "arrival_to_result_ms": pct(2, 6000, 8000),
            "result_to_report_ms": pct(1, 900_000, 900_000)},
    }
    return expected, t0


def check_summary(port, expected, t0):
    st, ctype, _, data = call(port, "GET", "/api/ai/summary")
    assert st == 401 and json.loads(data)["error"] == "unauthorized", (st, data)
    st, ctype, _, data = call(port, "GET", "/api/ai/summary", TOKENS["viewer"])
    assert st == 200 and ctype.startswith("application/json"), (st, ctype)
    got = json.loads(data)
    assert got["since_ms"] is None and got["generated_ms"] > t0, got
    rows = {(e["endpoint"], e["model_name"], e["model_version"]): e for e in got["endpoints"]}
    assert set(rows) == set(expected), sorted(rows, key=str)
    for k, want in expected.items():
        for field, v in want.items():
            have = rows[k][field]
            if isinstance(v, float):
                assert abs(have - v) < 1e-9, (k, field, have, v)
            else:
                assert have == v, (k, field, have, v)
    # since: only the jobs of the last hour (the timeline's study)
    st, _, _, data = call(port, "GET", f"/api/ai/summary?since={t0 - 3_600_000}",
                          TOKENS["viewer"])
    recent = {(e["endpoint"], e["model_name"]): e for e in json.loads(data)["endpoints"]}
    assert set(recent) == {("ai_bleed", "BleedNet"), ("ai_bleed", None)}, recent
    assert recent[("ai_bleed", "BleedNet")]["jobs"] == 1
    assert recent[("ai_bleed", "BleedNet")]["turnaround_ms"] == {"n": 1, "p50": 300, "p90": 300}
    assert recent[("ai_bleed", None)]["running"] == 1
    text = data.decode()
    assert MRN not in text and "RRACC-" not in text and "2.25." not in text, text


def check_static(port):
    for path in ("/", "/ui"):
        st, _, loc, _ = call(port, "GET", path)
        assert st == 302 and loc == "/ui/", (path, st, loc)
    for path, ctype in (("/ui/", "text/html"), ("/ui/js/app.js", "text/javascript"),
                        ("/ui/app.css", "text/css"), ("/ui/favicon.svg", "image/svg+xml")):
        st, got, _, data = call(port, "GET", path)
        assert st == 200 and got.startswith(ctype) and data, (path, st, got)
    st, _, _, _ = call(port, "GET", "/ui/.hidden")
    assert st == 404


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--node", default="node")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--peers", default=os.path.join(ROOT, "tests", "peers"))
    args = ap.parse_args()
    why = skip_reason(args)
    if why:
        print(f"SKIPPED: {why}")
        return SKIP
    os.makedirs(args.artifacts, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rr-dash-") as tmp:
        ch = os.path.join(tmp, "channels")
        os.makedirs(ch)
        shutil.copytree(os.path.join(ROOT, "channels", "lib"), os.path.join(ch, "lib"))
        for name in os.listdir(os.path.join(ROOT, "channels")):
            if name.endswith(".csv"):  # lookup tables of the scripts
                shutil.copy(os.path.join(ROOT, "channels", name), ch)
        for name in ("orders", "reports"):
            shutil.copy(os.path.join(ROOT, "channels", name + ".lua"), ch)
            with open(os.path.join(ROOT, "channels", name + ".json")) as f:
                c = json.load(f)
            c["source"]["port"] = 0
            with open(os.path.join(ch, name + ".json"), "w") as f:
                json.dump(c, f)
        with open(os.path.join(tmp, "tokens"), "w") as f:
            for role, tok in TOKENS.items():
                f.write(f"{role} test-{role} {hashlib.sha256(tok.encode()).hexdigest()}\n")
        config = os.path.join(tmp, "radrelay.json")
        with open(config, "w") as f:  # no "dashboard": the default folder is found
            json.dump({"store": {"path": "store/radrelay.db"}, "channels": "channels",
                       "http": {"host": HOST, "port": 0, "token_file": "tokens"}}, f)

        # ---- 1. a first run leaves orders; then the AI workflow's rows
        e = Engine(args.radrelay, config)
        try:
            send(e.orders, [orm("RRDB-1", "NW", ACC, MRN, "CT", "S", "HEADACHE",
                                "202611280800")])
            send(e.orders, [orm("RRDB-2", "XO", ACC, MRN, "CT", "S", "HEADACHE, WORSE",
                                "202611280805")])
        finally:
            e.stop()
        expected, t0 = seed(os.path.join(tmp, "store", "radrelay.db"))

        e = Engine(args.radrelay, config)
        try:
            assert e.grep("event=api_ready", "dashboard=/ui/"), e.grep("api_ready")
            send(e.orders, [orm(f"RRDB-{i}", "NW", f"RRACC-DB{i}", f"RRPAT-DB{i}", "CT", "R",
                                "HEADACHE", "202611280810") for i in range(3, 7)])
            send(e.orders, [ADT])  # waits in the patient index's queue: nobody listens there

            # ---- 2. the API behind the AI panel, and the static files
            check_summary(e.port, expected, t0)
            check_static(e.port)

            # ---- 3. the browser
            st, _, _, data = call(e.port, "GET", f"/api/messages?mrn={MRN}", TOKENS["viewer"])
            mine = json.loads(data)["messages"]
            assert len(mine) == 3, mine  # two ORMs, the ADT
            expect = {
                "mrn": MRN, "mrn_count": len(mine), "message_count": 5, "traffic": 5,
                "control_id": "RRDB-2", "segments": ["MSH", "PID", "PV1", "ORC", "OBR"],
                "timeline_events": ["order", "message", "study_first_instance", "study_stable",
                                    "ai_request_sent", "ai_result", "radiologist_verdict",
                                    "notification", "notification_acked"],
                "ai_rows": len(expected),
                "ai_agreement": {"ai_bleed": "66.7 % (2/3)", "ai_pe": "0.0 % (0/1)"},
                "notification": OPEN_NOTE, "destination": "orders.patient_index",
            }
            with open(os.path.join(tmp, "expect.json"), "w") as f:
                json.dump(expect, f)
            env = dict(os.environ, RR_VIEWER_TOKEN=TOKENS["viewer"],
                       RR_OPERATOR_TOKEN=TOKENS["operator"])
            browser = subprocess.Popen(
                [shutil.which(args.node), os.path.join(HERE, "peers", "dashboard_browser.mjs"),
                 "--peers", args.peers, "--chromium", args.chromium,
                 "--url", f"http://{HOST}:{e.port}/", "--expect",
                 os.path.join(tmp, "expect.json"), "--artifacts", args.artifacts],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            out = []
            try:
                for line in browser.stdout:
                    sys.stdout.write(line)
                    out.append(line)
                    if line.startswith("traffic:"):  # while the page watches
                        send(e.orders, [orm(f"RRDB-T{i}", "NW", f"RRACC-DBT{i}",
                                            f"RRPAT-DBT{i}", "CT", "R", "HEADACHE",
                                            "202611280815") for i in range(expect["traffic"])])
                rc = browser.wait(timeout=240)
            finally:
                if browser.poll() is None:
                    browser.kill()
                    browser.wait()
            assert rc == 0, "".join(out[-40:])

            # ---- 4. the acknowledgement, recorded with who made it
            st, _, _, data = call(e.port, "GET", f"/api/notifications/{OPEN_NOTE}",
                                  TOKENS["viewer"])
            note = json.loads(data)
            assert note["state"] == "acked" and note["ack"]["via"] == "test-operator", note
        finally:
            e.stop()
        log = "\n".join(e.lines)
        assert all(t not in log for t in TOKENS.values()), "a token in the engine's log"
    print(f"dashboard: screenshot {os.path.join(args.artifacts, 'dashboard.png')}")
    print("dashboard: sign-in, channels, queues, AI summary, notifications (403 for a viewer, "
          "acknowledged by an operator), search by MRN, message with raw HL7 and timeline")
    return 0


if __name__ == "__main__":
    sys.exit(main())

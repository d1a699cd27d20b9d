#!/usr/bin/env python3
"""The AI workflow end to end, with the bundled channels (orders.lua,
imaging.lua, radiology.lua) and real peers:

- Orthanc (Debian's orthanc + orthanc-dicomweb) is the PACS the AI fetches
  images from by WADO-RS;
- tests/peers/reference_ai.py is the AI endpoint (the reference hemorrhage
  detector: a real, simple image analysis; not a medical device);
- tests/peers/ris_peer.py is the RIS: python-hl7's asyncio MLLP server
  (Debian's python3-hl7), which records every message it gets;
- an HTTP receiver here is the pager gateway;
- python-hl7's MLLP client sends the ORMs; DCMTK's storescu the studies.

Checked:
1. active mode, synchronous results: an ORM for a head CT with a planted
   bleed and one for a clean head CT; each study goes to the hemorrhage
   endpoint once stable and matched; the bleed comes back critical: the RIS
   gets an ORU^R01 (OBR-25 P, OBX-8 AA, the Study Instance UID as OBX
   113014, the model's name and version) and an order update raising the
   priority (ORC-1 XO, STAT, STAT_AI_POSITIVE), the pager a notification;
   the PACS (Orthanc) gets the result's DICOM SR, which DCMTK's dsrdump
   reads; the clean study gets an ORU without findings and nothing else;
   GET /api/worklist lists the bleed first; GET /api/ai/jobs/{id} shows
   the job completed with its result;
2. results by callback (the endpoint answers 202 and POSTs the result to
   /api/ai/jobs/{id}/result with the job's token); a wrong token is 401;
3. silent mode: the job runs and its result is recorded, nothing is sent;
4. the endpoint down: the job is retried, then expired; the study stays
   on the worklist unflagged; orders keep flowing;
5. the radiologist's reports (the reports channel, reports.lua, by
   python-hl7's MLLP client): radrelay's own preliminary ORU sent back by
   the RIS is not a report; the final report confirming the bleed
   records "confirmed" by the signing radiologist (OBR-32), a final
   report saying "no hemorrhage" on the silent study "overridden", a
   corrected report (OBR-25 C) overrides the bleed's verdict; the rows of
   ai_findings say so, and the AI audit gets each report as JSON;
6. the audit trail verifies (`radrelay audit verify`) and holds every
   dispatch (what was sent: no patient identifier), result, finding,
   publication, route held back by silent mode, expiry, and each verdict
   with the radiologist as its actor (the corrected one naming the
   verdict it replaced).

Run: test_ai_workflow.py --radrelay build/radrelay (exits 77 without
Orthanc, its DICOMweb plugin, pydicom, numpy, python3-hl7 or storescu)."""
import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
import orthanc  # noqa: E402
from test_study_matching import Receiver, make_study, orm, send_hl7, store, wait_for  # noqa: E402

SKIP = 77
HOST = "127.0.0.1"
VIEWER = "rr-test-token-viewer-ai-0001"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Peer:
    """A peer started as a command that prints JSON lines on stdout."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.lines, self.lock = [], threading.Lock()
        first = self.proc.stdout.readline()
        self.ready = json.loads(first)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.lines.append(obj)

    def messages(self, type_prefix=""):
        with self.lock:
            return [m for m in self.lines if m.get("event") == "message"
                    and m.get("type", "").startswith(type_prefix)]

    def stop(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Engine:
    def __init__(self, radrelay, tmp):
        self.radrelay, self.tmp = radrelay, tmp
        self.config = os.path.join(tmp, "radrelay.json")
        self.store = os.path.join(tmp, "store", "radrelay.db")
        self.all_lines, self.lock = [], threading.Lock()

    def start(self):
        self.lines = []
        self.proc = subprocess.Popen([self.radrelay, "run", "-c", self.config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        wait_for(lambda: self.grep("event=api_ready"), 20, "the engine ready")
        ready = lambda ch: int(re.search(r"port=(\d+)",  # noqa: E731
                                         self.grep("event=ready", f"channel={ch}")[0]).group(1))
        self.orders_port, self.dicom_port = ready("orders"), ready("imaging")
        self.reports_port = ready("reports")

    def _read(self, proc):
        for line in proc.stderr:
            with self.lock:
                self.lines.append(line.rstrip("\n"))
                self.all_lines.append(line.rstrip("\n"))

    def grep(self, *needles):
        with self.lock:
            return [l for l in self.lines if all(n in l for n in needles)]

    def sql(self, q, *a):
        db = sqlite3.connect(self.store, timeout=10)
        try:
            return db.execute(q, a).fetchall()
        finally:
            db.close()

    def stop(self):
        self.proc.terminate()
        rc = self.proc.wait(timeout=30)
        if rc != 0:
            first = next((i for i, l in enumerate(self.lines) if "==ERROR" in l), None)
            shown = self.lines[first:first + 60] if first is not None else self.lines[-30:]
            raise AssertionError(f"radrelay exited {rc}:\n" + "\n".join(shown))


def api(port, path, token=VIEWER, method="GET", body=None, headers=None):
    c = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None
    finally:
        c.close()


def upload(pacs, folder):
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            r = pacs.request("POST", "/instances", body=f.read(),
                             headers={"Content-Type": "application/dicom"})
        assert r.status == 200, r


def configure(tmp, ai_url, ai_mode, result, ris_port, pager_port, api_port, max_age_s=600):
    chdir = os.path.join(tmp, "channels")
    if os.path.isdir(chdir):
        shutil.rmtree(chdir)
    os.makedirs(chdir)
    shutil.copytree(os.path.join(ROOT, "channels", "lib"), os.path.join(chdir, "lib"))
    for f in ("orders.lua", "imaging.lua", "reports.lua", "finding_terms.csv"):
        shutil.copy(os.path.join(ROOT, "channels", f), chdir)
    with open(os.path.join(ROOT, "channels", "reports.json")) as f:
        reports = json.load(f)
    reports["source"]["port"] = 0
    if VERDICTS[0] is None:  # a test that reuses this one without the reports receiver
        VERDICTS[0] = Receiver()
    reports["destinations"]["report_verdicts"]["url"] = f"http://{HOST}:{VERDICTS[0].port}/v"
    with open(os.path.join(chdir, "reports.json"), "w") as f:
        json.dump(reports, f)
    with open(os.path.join(ROOT, "channels", "orders.json")) as f:
        orders = json.load(f)
    orders["source"]["port"] = 0
    orders["destinations"]["patient_index"]["port"] = ris_port
    with open(os.path.join(chdir, "orders.json"), "w") as f:
        json.dump(orders, f)
    with open(os.path.join(ROOT, "channels", "imaging.json")) as f:
        imaging = json.load(f)
    imaging["source"].update({"port": 0, "calling_aes": ["RRTEST"], "spool": "spool",
                              "min_free_mb": 1, "stable_after_s": 1})
    d = imaging["destinations"]
    d["hemorrhage"].update({"url": ai_url, "mode": ai_mode, "result": result,
                            "images_root": IMAGES_ROOT[0], "max_age_s": max_age_s,
                            "backoff_base_ms": 200, "backoff_max_ms": 500})
    d["ris"]["port"] = d["worklist"]["port"] = ris_port
    d["pager"]["url"] = f"http://{HOST}:{pager_port}/notify"
    d["pacs"].update({"port": PACS[0].dicom_port, "called_ae": PACS[0].aet,
                      "calling_ae": orthanc.ENGINE_AET})
    with open(os.path.join(chdir, "imaging.json"), "w") as f:
        json.dump(imaging, f)
    with open(os.path.join(tmp, "tokens"), "w") as f:
        f.write(f"viewer ward {hashlib.sha256(VIEWER.encode()).hexdigest()}\n")
    with open(os.path.join(tmp, "radrelay.json"), "w") as f:
        json.dump({"store": {"path": "store/radrelay.db"}, "channels": "channels",
                   "http": {"host": HOST, "port": api_port, "token_file": "tokens",
                            "public_url": f"http://{HOST}:{api_port}"}}, f)


def edit_imaging(tmp, change):
    """change(imaging) edits the test's copy of channels/imaging.json."""
    path = os.path.join(tmp, "channels", "imaging.json")
    with open(path) as f:
        imaging = json.load(f)
    change(imaging)
    with open(path, "w") as f:
        json.dump(imaging, f)


IMAGES_ROOT = [""]
PACS = [None]
VERDICTS = [None]  # the AI audit's receiver of report records (reports.json)


def missing_peers():
    """Why the AI workflow's peers cannot run here (None: they can):
    Orthanc with its DICOMweb plugin, pydicom, numpy and python3-hl7 for
    Debian's python3, DCMTK's storescu."""
    why = orthanc.missing()
    if why:
        return why
    for mod in ("pydicom", "numpy", "hl7"):
        if subprocess.run(["/usr/bin/python3", "-c", "import " + mod],
                          capture_output=True).returncode != 0:
            return f"{mod} not importable by /usr/bin/python3"
    if not shutil.which("storescu"):
        return "storescu missing"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    why = missing_peers()
    if why:
        print(f"SKIPPED: {why}")
        return SKIP
    peers = os.path.join(ROOT, "tests", "peers")
    pager = Receiver()
    VERDICTS[0] = Receiver()
    api_port = free_port()
    with tempfile.TemporaryDirectory(prefix="rr-aiwf-") as tmp, \
            orthanc.Orthanc(os.path.join(tmp, "pacs"), auth=False) as pacs:
        IMAGES_ROOT[0] = pacs.dicomweb_url
        PACS[0] = pacs
        ris = Peer(["/usr/bin/python3", os.path.join(peers, "ris_peer.py")])
        ai = Peer(["/usr/bin/python3", os.path.join(peers, "reference_ai.py"), "--mode", "sync"])
        e = Engine(os.path.abspath(args.radrelay), tmp)
        try:
            # ---- 1. active, synchronous
            configure(tmp, ai.ready["url"].rstrip("/") + "/analyze", "active", "sync",
                      ris.ready["port"], pager.port, api_port)
            e.start()
            import time
            today = time.strftime("%Y%m%d")
            acks = send_hl7(e.orders_port, [
                orm("RRAI-1", "NW", "RRACC-AI1", "RRPAT-AI1", "CT", "R", "HEADACHE",
                    today + "0800"),
                orm("RRAI-2", "NW", "RRACC-AI2", "RRPAT-AI2", "CT", "R", "DIZZINESS",
                    today + "0800")])
            assert all("MSA|AA|" in (a.decode() if isinstance(a, bytes) else a) for a in acks)
            bleed = os.path.join(tmp, "bleed")
            clean = os.path.join(tmp, "clean")
            uid_b = make_study_bleed(bleed, 51, "RRACC-AI1", "RRPAT-AI1", True)
            uid_c = make_study_bleed(clean, 52, "RRACC-AI2", "RRPAT-AI2", False)
            for folder in (bleed, clean):
                upload(pacs, folder)
                store(e.dicom_port, folder)
            wait_for(lambda: len(ris.messages("ORU")) == 2, 120, "two ORUs at the RIS")
            orus = {m["text"].split("\r")[3].split("|")[5] if False else oru_study(m["text"]): m
                    for m in ris.messages("ORU")}
            ob = orus[uid_b]["text"]
            oc = orus[uid_c]["text"]
            segs_b = [s for s in ob.split("\r") if s]
            obr = [s for s in segs_b if s.startswith("OBR|")][0].split("|")
            assert obr[25] == "P", obr
            obx = [s.split("|") for s in segs_b if s.startswith("OBX|")]
            assert any(o[3].startswith("113014^") and o[5] == uid_b for o in obx), obx
            assert any(o[8] == "AA" for o in obx), obx
            assert any("radrelay-reference-hemorrhage" in o[5] for o in obx), obx
            assert not any(s.split("|")[8] == "AA" for s in oc.split("\r") if s.startswith("OBX|"))
            assert "no findings" in oc
            wait_for(lambda: ris.messages("ORM"), 30, "the priority update at the RIS")
            (upd,) = [m["text"] for m in ris.messages("ORM") if "STAT_AI_POSITIVE" in m["text"]]
            orc = [s for s in upd.split("\r") if s.startswith("ORC|")][0].split("|")
            assert orc[1] == "XO" and orc[7].split("^")[5] == "S", orc
            # the result's SR is in the PACS, in the bleed study, and DCMTK reads it
            def srs(uid):
                r = pacs.request("POST", "/tools/find", body=json.dumps(
                    {"Level": "Instance", "Query": {"StudyInstanceUID": uid, "Modality": "SR"}})
                    .encode(), headers={"Content-Type": "application/json"})
                return r.json()
            wait_for(lambda: len(srs(uid_b)) == 1, 60, "the SR in the PACS")
            assert srs(uid_c) == [], "an SR for a study without findings"
            r = pacs.request("GET", f"/instances/{srs(uid_b)[0]}/file")
            sr_file = os.path.join(tmp, "sr.dcm")
            with open(sr_file, "wb") as f:
                f.write(r.body)
            dump = subprocess.run(["dsrdump", sr_file], capture_output=True, text=True)
            assert dump.returncode == 0 and "radrelay-reference-hemorrhage" in dump.stdout, dump
            assert "1386000" in dump.stdout, dump.stdout[:2000]
            wait_for(lambda: pager.bodies, 30, "the page")
            assert len(pager.bodies) == 1 and pager.bodies[0]["study_uid"] == uid_b
            assert pager.bodies[0]["acr_category"] == 1
            st, wl = api(api_port, "/api/worklist")
            assert st == 200 and wl["studies"][0]["study_uid"] == uid_b, wl
            assert wl["studies"][0]["ai_critical"] is True
            assert [s["ai_critical"] for s in wl["studies"] if s["study_uid"] == uid_c] == [False]
            (job,) = [j for (j,) in e.sql("SELECT job_id FROM ai_jobs WHERE study_uid = ?", uid_b)]
            st, jb = api(api_port, f"/api/ai/jobs/{job}")
            assert st == 200 and jb["state"] == "completed" and jb["critical"] == 1, jb
            assert jb["result"]["findings"][0]["critical"] is True
            st, _ = api(api_port, f"/api/ai/jobs/{job}", token=None)
            assert st == 401
            st, jl = api(api_port, f"/api/ai/jobs?study_uid={uid_b}")
            assert st == 200 and [j["job_id"] for j in jl["jobs"]] == [job], jl
            st, jl = api(api_port, "/api/ai/jobs?state=completed&endpoint=imaging.hemorrhage")
            assert st == 200 and len(jl["jobs"]) == 2 and "result" not in jl["jobs"][0], jl
            # what the result's deliveries sent stays readable after delivery
            (mid,) = [m for (m,) in e.sql("SELECT id FROM messages WHERE study_uid = ? AND"
                                          " message_type = 'AI_RESULT'", uid_b)]
            st, md = api(api_port, f"/api/messages/{mid}")
            sent = {s["destination"]: s for s in md["sent"]}
            assert st == 200 and "ORU^R01" in sent["imaging.ris"]["payload"], md["sent"]
            assert md["timeline"]["study_uid"] == uid_b and md["timeline"]["events"], md
            # what left for the AI endpoint named no patient
            reqs = [r for r in e.sql("SELECT request FROM ai_jobs")]
            assert reqs and not [r for (r,) in reqs if "RRPAT-" in r]
            # nothing the results routed was refused (a result without
            # findings has no SR for the script to route)
            dead = e.sql("SELECT destination, last_error FROM queue WHERE state = 'dead'")
            assert not dead, dead
            e.stop()

            # ---- 2. results by callback
            ai.stop()
            ai = Peer(["/usr/bin/python3", os.path.join(peers, "reference_ai.py"), "--mode",
                       "callback"])
            configure(tmp, ai.ready["url"].rstrip("/") + "/analyze", "active", "callback",
                      ris.ready["port"], pager.port, api_port)
            e.start()
            cb = os.path.join(tmp, "cb")
            send_hl7(e.orders_port, [orm("RRAI-3", "NW", "RRACC-AI3", "RRPAT-AI3", "CT", "R",
                                         "FALL", today + "0800")])
            uid_cb = make_study_bleed(cb, 53, "RRACC-AI3", "RRPAT-AI3", True)
            upload(pacs, cb)
            store(e.dicom_port, cb)
            wait_for(lambda: len(ris.messages("ORU")) == 3, 120, "the ORU of a callback result")
            assert e.grep("event=result", "via=callback")
            (job3,) = [j for (j,) in e.sql("SELECT job_id FROM ai_jobs WHERE study_uid = ?",
                                           uid_cb)]
            body = json.dumps({"schema": "radrelay.ai-result/1", "job_id": job3,
                               "status": "completed", "model": {"name": "x", "version": "1"},
                               "findings": []})
            st, r = api(api_port, f"/api/ai/jobs/{job3}/result", token="not-the-token",
                        method="POST", body=body, headers={"Content-Type": "application/json"})
            assert st == 401, (st, r)
            e.stop()

            # ---- 3. silent: recorded, nothing sent
            ai.stop()
            ai = Peer(["/usr/bin/python3", os.path.join(peers, "reference_ai.py"), "--mode",
                       "sync"])
            configure(tmp, ai.ready["url"].rstrip("/") + "/analyze", "silent", "sync",
                      ris.ready["port"], pager.port, api_port)
            e.start()
            sil = os.path.join(tmp, "silent")
            send_hl7(e.orders_port, [orm("RRAI-4", "NW", "RRACC-AI4", "RRPAT-AI4", "CT", "R",
                                         "FALL", today + "0800")])
            uid_s = make_study_bleed(sil, 54, "RRACC-AI4", "RRPAT-AI4", True)
            upload(pacs, sil)
            store(e.dicom_port, sil)
            wait_for(lambda: e.sql("SELECT state, critical FROM ai_jobs WHERE study_uid = ?",
                                   uid_s) == [("completed", 1)], 120, "the silent job's result")
            wait_for(lambda: e.grep("event=result", "mode=silent", "held=4"), 10,
                     "the silent result's routes held")
            assert len(ris.messages("ORU")) == 3 and len(pager.bodies) == 2
            st, wl = api(api_port, "/api/worklist")
            assert [s["ai_critical"] for s in wl["studies"] if s["study_uid"] == uid_s] == [False]
            e.stop()

            # ---- 4. the endpoint down: retried, expired, the study unflagged
            configure(tmp, f"http://{HOST}:{free_port()}/analyze", "active", "sync",
                      ris.ready["port"], pager.port, api_port, max_age_s=3)
            e.start()
            down = os.path.join(tmp, "down")
            send_hl7(e.orders_port, [orm("RRAI-5", "NW", "RRACC-AI5", "RRPAT-AI5", "CT", "R",
                                         "FALL", today + "0800")])
            uid_d = make_study_bleed(down, 55, "RRACC-AI5", "RRPAT-AI5", True)
            store(e.dicom_port, down)
            wait_for(lambda: e.sql("SELECT state FROM ai_jobs WHERE study_uid = ?", uid_d)
                     == [("expired",)], 60, "the job expired")
            assert len(e.sql("SELECT 1 FROM deliveries WHERE destination = 'imaging.hemorrhage'"
                             " AND outcome = 'retry'")) >= 1
            st, wl = api(api_port, "/api/worklist")
            assert [s["ai_critical"] for s in wl["studies"] if s["study_uid"] == uid_d] == [False]
            acks = send_hl7(e.orders_port, [orm("RRAI-6", "NW", "RRACC-AI6", "RRPAT-AI6", "CT",
                                                "R", "FALL", today + "0900")])
            assert "MSA|AA|" in (acks[0].decode() if isinstance(acks[0], bytes) else acks[0])
            e.stop()

            # ---- 5. the radiologist's reports: confirmed, overridden, corrected
            e.start()
            (job_s,) = [j for (j,) in e.sql("SELECT job_id FROM ai_jobs WHERE study_uid = ?",
                                            uid_s)]
            # radrelay's own preliminary ORU (step 1), sent back by the RIS
            send_hl7(e.reports_port, [ob])
            acks = send_hl7(e.reports_port, [
                report("RRAI-RPT-1", "RRACC-AI1", "RRPAT-AI1", "F", "RAD-AI1",
                       "IMPRESSION: Acute hemorrhage in the right cerebral hemisphere. "
                       "No midline shift.", uid_b),
                report("RRAI-RPT-2", "RRACC-AI4", "RRPAT-AI4", "F", "RAD-AI1",
                       "IMPRESSION: No intracranial hemorrhage. Normal noncontrast CT head."),
                report("RRAI-RPT-3", "RRACC-AI2", "RRPAT-AI2", "F", "RAD-AI1",
                       "IMPRESSION: No acute intracranial abnormality.", uid_c)])
            assert all("MSA|AA|" in a.decode() if isinstance(a, bytes) else "MSA|AA|" in a
                       for a in acks), acks
            verdicts = lambda uid: e.sql(  # noqa: E731
                "SELECT verdict, verdict_by, verdict_report FROM ai_findings"
                " WHERE study_uid = ?", uid)
            assert verdicts(uid_b) == [("confirmed", "RAD-AI1", "RRAI-RPT-1")], verdicts(uid_b)
            assert verdicts(uid_s) == [("overridden", "RAD-AI1", "RRAI-RPT-2")], verdicts(uid_s)
            (own,) = e.sql("SELECT status, error FROM messages WHERE channel = 'reports'"
                           " AND control_id = ?", f"{job}-ORU")
            assert own == ("filtered", "not a final report (OBR-25 P)"), own
            # the corrected report: the radiologist takes the bleed back
            acks = send_hl7(e.reports_port, [
                report("RRAI-RPT-4", "RRACC-AI1", "RRPAT-AI1", "C", "RAD-AI2",
                       "CORRECTED REPORT. IMPRESSION: The right hemispheric hyperdensity is "
                       "calcification; there is no acute hemorrhage.", uid_b)])
            assert "MSA|AA|" in (acks[0].decode() if isinstance(acks[0], bytes) else acks[0])
            assert verdicts(uid_b) == [("overridden", "RAD-AI2", "RRAI-RPT-4")], verdicts(uid_b)
            wait_for(lambda: len(VERDICTS[0].bodies) == 4, 30, "four report records")
            by_acc = {}
            for b in VERDICTS[0].bodies:
                by_acc.setdefault(b["accession"], []).append(b)
            assert [[f["verdict"] for f in b["ai_findings"]] for b in by_acc["RRACC-AI1"]] == \
                [["confirmed"], ["overridden"]], by_acc["RRACC-AI1"]
            assert by_acc["RRACC-AI1"][1]["ai_findings"][0]["outcome"] == "replaced"
            assert by_acc["RRACC-AI4"][0]["ai_findings"][0]["job_id"] == job_s
            assert "ai_findings" not in by_acc["RRACC-AI2"][0]
            e.stop()
        except BaseException:
            # what the engine said, for the failure's report
            sys.stderr.write("\n".join(l for l in e.all_lines[-60:]) + "\n")
            raise
        finally:
            if e.__dict__.get("proc") and e.proc.poll() is None:
                e.proc.kill()
            ai.stop()
            ris.stop()
        # the audit trail: chained, and it has every step
        v = subprocess.run([e.radrelay, "audit", "verify", "-c", e.config], capture_output=True,
                           text=True)
        assert v.returncode == 0 and "chain intact" in v.stdout, (v.stdout, v.stderr)
        x = subprocess.run([e.radrelay, "audit", "export", "-c", e.config], capture_output=True,
                           text=True, check=True)
        recs = [json.loads(l) for l in x.stdout.splitlines() if l.strip()]
        kinds = {r["kind"] for r in recs}
        for k in ("dispatch", "result", "finding", "publish", "held", "expired", "verdict"):
            assert k in kinds, (k, kinds)
        vs = [(r["actor"], r["subject"], r["data"]["verdict"], r["data"].get("replaces"))
              for r in recs if r["kind"] == "verdict"]
        assert [v[:3] for v in vs] == [("RAD-AI1", job, "confirmed"),
                                       ("RAD-AI1", job_s, "overridden"),
                                       ("RAD-AI2", job, "overridden")], vs
        assert vs[0][3] is None and vs[1][3] is None
        assert vs[2][3]["verdict"] == "confirmed" and vs[2][3]["by"] == "RAD-AI1", vs[2]
        assert vs[2][3]["report"] == "RRAI-RPT-1"
        sent = [r for r in recs if r["kind"] == "dispatch"]
        assert all("RRPAT-" not in json.dumps(r["data"]) for r in sent)
        crit = [r for r in recs if r["kind"] == "result" and r["data"]["study_uid"] == uid_b]
        assert crit and crit[0]["data"]["critical"] is True, crit
        held = [r for r in recs if r["kind"] == "held"]
        assert {r["data"]["mode"] for r in held} == {"silent"}, held
        leaks = [l for l in e.all_lines if "level=debug" not in l and
                 any(s in l for s in ("RRPAT-", "RRACC-", uid_b, uid_c))]
        assert not leaks, leaks[:5]
        bad = [l for l in e.all_lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad, bad
    print("ai workflow: bleed -> critical ORU, SR in Orthanc, priority update, page, first on the "
          "worklist; "
          "final report confirms, corrected report overrides, own preliminary ORU ignored; "
          "clean -> ORU without findings; callback results; silent mode recorded only; "
          "endpoint down -> retried, expired, unflagged; audit chain verified")
    return 0


def report(control_id, accession, mrn, status, radiologist, impression, study_uid=None):
    """The radiologist's report from the RIS: ORU^R01 with OBR-25 status (F
    or C), the signing radiologist in OBR-32, the impression as LOINC
    19005-8, the Study Instance UID as OBX 113014 when given."""
    when = "20260110093000"
    segs = [
        f"MSH|^~\\&|RIS_SIM|RRTEST_HOSP|RADRELAY|RRTEST|{when}||ORU^R01^ORU_R01|{control_id}"
        "|P|2.5.1",
        f"PID|1||{mrn}^^^RRTEST_HOSP^MR||ZZTEST^REPORT||19700101|F",
        f"OBR|1|PLC-{accession}|FIL-{accession}|CTHEAD^CT HEAD WITHOUT CONTRAST^L|||{when}"
        f"|||||||||ORD9^ZZORDER^THETA||{accession}||||{when}||CT|{status}|||||||"
        f"{radiologist}&ZZREADER&MU&&&DR",
    ]
    if study_uid:
        segs.append(f"OBX|{len(segs) - 2}|ST|113014^DICOM Study^DCM||{study_uid}||||||{status}")
    segs.append(f"OBX|{len(segs) - 2}|TX|19005-8^Radiology Imaging study [Impression] "
                f"(narrative)^LN||{impression}||||||{status}")
    return "\r".join(segs)


def oru_study(text):
    for s in text.split("\r"):
        f = s.split("|")
        if f[0] == "OBX" and f[3].startswith("113014^"):
            return f[5]
    return None


def make_study_bleed(out, seed, accession, patient_id, bleed):
    cmd = ["/usr/bin/python3", os.path.join(ROOT, "scripts", "make-study"), "--out", out,
           "--slices", "24", "--size", "128", "--accession", accession, "--patient-id",
           patient_id, "--seed", str(seed), "--bleed" if bleed else "--no-bleed"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["study_instance_uid"]


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""The story scripts/demo tells, once the engine is built: radrelay with
the bundled channels (channels/*.json, *.lua) on the store var/radrelay.db,
between real peers on this machine, all on loopback:

  PACS        a private Orthanc (Debian's orthanc + orthanc-dicomweb),
              tests/integration/peers/orthanc.py: its own folder, ports
              and configuration, removed at the end
  AI          tests/peers/reference_ai.py, the reference hemorrhage
              detector (NOT A MEDICAL DEVICE: a reference implementation
              of the AI contract, tuned to synthetic studies)
  RIS         tests/peers/ris_peer.py, python-hl7's MLLP server: gets the
              ORU^R01 results and the worklist updates (and, here, the ADT
              the orders channel passes on to the patient index)
  pager       tests/peers/gateway.py, a notification gateway that prints
              the pages it gets (and the AI audit's verdicts)

The channel files read where the peers are from the environment
(RR_AI_URL, RR_PACS_DICOMWEB, RR_RIS_PORT, RR_PAGER_URL, RR_PACS_DICOM_PORT,
...); the engine file var/demo/radrelay.json is channels/radrelay.json with
the REST API added (port 8480, tokens in var/demo/api.tokens), beside
links to the bundled channel files (var/demo/channels/). Standard
ports are used when free, others picked otherwise.

Then: the synthetic sample feed (tests/data/hl7), and the AI story: an ADT
and an ORM for two head CTs over MLLP, two synthetic studies (scripts/
make-study, one with a planted bleed) into the PACS and to radrelay by
DICOM C-STORE, each completed through the REST API; the AI's results become
an ORU at the RIS, for the bleed also a DICOM SR in the PACS, a worklist
priority update and a page. Per study, a timeline from the store, in
milliseconds. Exit status 1, with the reason, when the story does not
happen; on a terminal (or RR_DEMO_KEEP=1) everything keeps running until
Ctrl-C.

    scripts/lib/demo.py --radrelay build/radrelay [--keep | --no-keep]
"""
import argparse
import ctypes
import hashlib
import http.client
import json
import os
import secrets
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
PEERS = os.path.join(ROOT, "tests", "peers")
sys.path.insert(0, os.path.join(ROOT, "tests", "integration", "peers"))
import orthanc  # noqa: E402

HOST = "127.0.0.1"
PY = "/usr/bin/python3"
OUT_LOCK = threading.Lock()


class StoryFailed(Exception):
    pass


def say(*lines):
    with OUT_LOCK:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()


def section(title):
    say("", f"== {title}")


def port_free(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) != 0


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pick_port(var, default, what):
    """The port for what: $var, else the standard one; a free one when 0 or taken."""
    want = int(os.environ.get(var) or default)
    if want and port_free(want):
        return want
    got = free_port()
    if want:
        say(f"demo: port {want} is taken, using {got} for {what}")
    return got


def die_with_parent():
    """preexec_fn: the child gets SIGTERM when the demo dies (Linux), and
    has its own process group, so Ctrl-C reaches only the demo, which stops
    everything in order."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise StoryFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)  # polling interval


class Peer:
    """A peer command that prints JSON lines on stdout (the first one says
    where it listens) and runs until its stdin closes."""

    def __init__(self, name, argv, log_path=None, on_event=None):
        self.name = name
        self.log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True,
                                     preexec_fn=die_with_parent)
        first = self.proc.stdout.readline()
        if not first:
            raise StoryFailed(f"{name} did not start ({' '.join(argv)}; see {log_path})")
        self.ready = json.loads(first)
        self.events, self.lock, self.on_event = [], threading.Lock(), on_event
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append(obj)
            if self.on_event:
                self.on_event(obj)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


class Engine:
    def __init__(self, radrelay, config, log_path, env):
        self.radrelay, self.config, self.env = radrelay, config, env
        self.log = open(log_path, "a")
        self.lines, self.lock = [], threading.Lock()
        self.proc = subprocess.Popen([radrelay, "run", "-c", config], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env, preexec_fn=die_with_parent)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.log.write(line)
            self.log.flush()
            with self.lock:
                self.lines.append(line.rstrip("\n"))
            if " level=error " in line:
                say("radrelay: " + line.rstrip("\n"))

    def grep(self, *needles):
        with self.lock:
            return [l for l in self.lines if all(n in l for n in needles)]

    def problems(self, n=15):
        with self.lock:
            return [l for l in self.lines if " level=warn " in l or " level=error " in l][-n:]

    def stop(self):
        """SIGTERM, then its exit status (after a SIGKILL past 30 s: -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Api:
    def __init__(self, port, tokens):
        self.port, self.tokens = port, tokens

    def call(self, method, path, role="viewer", body=None):
        c = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            h = {"Authorization": f"Bearer {self.tokens[role]}"}
            if body is not None:
                h["Content-Type"] = "application/json"
                body = json.dumps(body)
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, json.loads(data) if data else None
        finally:
            c.close()


# ---- the story's messages and studies ---------------------------------------------

def final_report(cid, accession, mrn, study_uid, ts):
    """The radiologist's signed report from the RIS (OBR-25 F, OBR-32 the
    reader, the impression as LOINC 19005-8, the Study UID as OBX 113014)."""
    return "\r".join([
        f"MSH|^~\\&|RIS_SIM|RRDEMO_HOSP|RADRELAY|RRDEMO|{ts}||ORU^R01^ORU_R01|{cid}|P|2.5.1",
        f"PID|1||{mrn}^^^RRDEMO_HOSP^MR||ZZDEMO^BLEED||19700101|F",
        f"OBR|1|PLC-{accession}|FIL-{accession}|CTHEAD^CT HEAD WITHOUT CONTRAST^L|||{ts}"
        f"|||||||||ORD9^ZZORDER^DEMO||{accession}||||{ts}||CT|F|||||||"
        "RAD1&ZZREADER&DEMO&&&DR",
        f"OBX|1|ST|113014^DICOM Study^DCM||{study_uid}||||||F",
        "OBX|2|TX|19005-8^Radiology Imaging study [Impression] (narrative)^LN||Acute"
        " intracranial hemorrhage in the right parietal lobe.||||||F"]) + "\r"


def adt_a04(cid, mrn, given, sex, ts):
    return "\r".join([
        f"MSH|^~\\&|RIS_SIM|RRDEMO_HOSP|RADRELAY|RRDEMO|{ts}||ADT^A04^ADT_A01|{cid}|P|2.5.1",
        f"EVN|A04|{ts}",
        f"PID|1||{mrn}^^^RRDEMO_HOSP^MR||ZZDEMO^{given}||19700101|{sex}",
        "PV1|1|E|ED^BAY2^1^RRDEMO_HOSP",
    ]) + "\r"


def orm_o01(cid, mrn, given, sex, accession, reason, ts):
    return "\r".join([
        f"MSH|^~\\&|RIS_SIM|RRDEMO_HOSP|RADRELAY|RRDEMO|{ts}||ORM^O01|{cid}|P|2.3",
        f"PID|1||{mrn}^^^RRDEMO_HOSP^MR||ZZDEMO^{given}||19700101|{sex}",
        "PV1|1|E|ED^BAY2^1^RRDEMO_HOSP",
        f"ORC|NW|PLC-{accession}|FIL-{accession}||SC||1^ONCE^^{ts}^^R||{ts}|||ORD9^ZZORDER^THETA",
        f"OBR|1|PLC-{accession}|FIL-{accession}|CTHEAD^CT HEAD WITHOUT CONTRAST^L|||{ts}"
        f"|||||||||ORD9^ZZORDER^THETA||{accession}||||||CT|||1^ONCE^^{ts}^^R||||^{reason}",
    ]) + "\r"


def make_study(out, accession, mrn, seed, bleed, when):
    r = subprocess.run([PY, os.path.join(ROOT, "scripts", "make-study"), "--out", out,
                        "--slices", "24", "--size", "128", "--accession", accession,
                        "--patient-id", mrn, "--seed", str(seed),
                        "--bleed" if bleed else "--no-bleed",
                        "--date", time.strftime("%Y%m%d", when),
                        "--time", time.strftime("%H%M%S", when)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise StoryFailed(f"scripts/make-study failed: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])["study_instance_uid"]


# ---- what the store says ---------------------------------------------------------

class Store:
    def __init__(self, path):
        self.path = path

    def rows(self, q, *a):
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(q, a).fetchall()
        finally:
            db.close()

    def one(self, q, *a):
        r = self.rows(q, *a)
        return r[0][0] if r else None

    def job(self, uid):
        r = self.rows("SELECT job_id, state, sent_ms, result_ms, critical, result FROM ai_jobs"
                      " WHERE study_uid = ? AND destination = 'imaging.hemorrhage'"
                      " ORDER BY sent_ms DESC LIMIT 1", uid)
        if not r:
            return None
        job_id, state, sent, got, critical, result = r[0]
        return {"id": job_id, "state": state, "sent_ms": sent, "result_ms": got,
                "critical": critical, "result": json.loads(result) if result else None}

    def verdict(self, uid):
        """The radiologist's verdict on the study's AI finding: (verdict, by)."""
        r = self.rows("SELECT verdict, verdict_by FROM ai_findings WHERE study_uid = ? AND"
                      " verdict IS NOT NULL LIMIT 1", uid)
        return r[0] if r else None

    def delivered(self, uid, destination):
        """When the delivery of what the AI result of the study routed to
        destination was acknowledged (deliveries.at_ms), or None."""
        return self.one("SELECT min(d.at_ms) FROM deliveries d JOIN messages m"
                        " ON m.id = d.message_id WHERE m.study_uid = ? AND"
                        " m.message_type = 'AI_RESULT' AND d.destination = ? AND"
                        " d.outcome = 'delivered'", uid, destination)

    def routed_to(self, uid, destination):
        """How many deliveries an AI result of the study has to destination
        (queued or done)."""
        return self.one("SELECT (SELECT count(*) FROM queue q JOIN messages m ON m.id ="
                        " q.message_id WHERE m.study_uid = ?1 AND m.message_type = 'AI_RESULT'"
                        " AND q.destination = ?2) + (SELECT count(*) FROM deliveries d JOIN"
                        " messages m ON m.id = d.message_id WHERE m.study_uid = ?1 AND"
                        " m.message_type = 'AI_RESULT' AND d.destination = ?2)", uid, destination)


STEPS_AFTER_RESULT = (
    ("imaging.ris", "ORU^R01 acknowledged by the RIS"),
    ("imaging.pacs", "DICOM SR stored in the PACS (C-STORE answered)"),
    ("imaging.worklist", "worklist priority update acknowledged by the RIS"),
    ("imaging.pager", "notification delivered to the pager gateway"),
)


def clock(at):
    return time.strftime("%H:%M:%S", time.localtime(at / 1000)) + f".{at % 1000:03d}"


def timeline(store, study):
    """The study's steps from the store: each with the milliseconds since
    the step before; what the AI result fans out to, since the result."""
    uid, acc = study["uid"], study["accession"]
    s = store.rows("SELECT first_ms, stable_ms, routed_ms, match_method, instances FROM studies"
                   " WHERE study_uid = ?", uid)[0]
    job = store.job(uid)
    chain = [
        (store.one("SELECT created_ms FROM orders WHERE accession = ?", acc),
         "order received (ORM^O01 journaled and acknowledged, orders channel)"),
        (s[0], f"first instance (C-STORE to radrelay; {s[4]} instances)"),
        (s[1], "stable (the modality said complete: POST /api/studies/{uid}/complete)"),
        (s[2], f"routed (matched to its order by {s[3]}; on_study queued the AI request)"),
        (job["sent_ms"], "AI request sent to the reference AI"),
        (job["result_ms"], "AI result received" +
         (" (critical)" if job["critical"] else " (no findings)")),
    ]
    out, prev = [], None
    for at, what in chain:
        delta = "" if prev is None else f"+{at - prev}"
        out.append(f"   {clock(at)}  {delta:>7}  {what}")
        prev = at
    out.append(f"   {'':12}  {'':>7}  then, from the AI result:")
    fan = sorted(((store.delivered(uid, d), w) for d, w in STEPS_AFTER_RESULT),
                 key=lambda x: (x[0] is None, x[0] or 0))
    for at, what in fan:
        if at is None:
            out.append(f"   {'':12}  {'':>7}  {what}: not sent")
        else:
            out.append(f"   {clock(at)}  {'+' + str(at - job['result_ms']):>7}  {what}")
    for at, what in store.rows(
            "SELECT acked_ms, 'page acknowledged by ' || acked_by || ' (' || sends || ' page(s))'"
            " FROM notifications WHERE study_uid = ? AND acked_ms IS NOT NULL UNION ALL"
            " SELECT verdict_ms, 'final report: the AI finding ' || verdict || ' by ' ||"
            " coalesce(verdict_by, '?') FROM ai_findings WHERE study_uid = ? AND verdict IS NOT"
            " NULL ORDER BY 1", uid, uid):
        out.append(f"   {clock(at)}  {'+' + str(at - job['result_ms']):>7}  {what}")
    ris = store.delivered(uid, "imaging.ris")
    page = store.delivered(uid, "imaging.pager")
    summary = (f"   stable -> AI request sent: {job['sent_ms'] - s[1]} ms; AI result -> ORU"
               f" acknowledged: {ris - job['result_ms']} ms")
    if page:
        summary += f", and the page delivered: {max(ris, page) - job['result_ms']} ms"
    out.append(summary)
    audit = store.rows("SELECT seq, kind FROM audit WHERE subject IN (?, ?) ORDER BY seq",
                       uid, job["id"])
    kinds = []
    for _, k in audit:
        if kinds and kinds[-1][0] == k:
            kinds[-1][1] += 1
        else:
            kinds.append([k, 1])
    if audit:
        out.append(f"   audit trail: records {audit[0][0]}..{audit[-1][0]}: " +
                   ", ".join(k if n == 1 else f"{k} x{n}" for k, n in kinds))
    return out


# ---- the demo ----------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--radrelay", required=True)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--keep", dest="keep", action="store_true", default=None,
                   help="keep serving after the story until Ctrl-C")
    g.add_argument("--no-keep", dest="keep", action="store_false", help="stop after the story")
    args = ap.parse_args()
    keep = args.keep if args.keep is not None else sys.stdin.isatty()
    radrelay = os.path.abspath(args.radrelay)
    why = orthanc.missing()
    if not why and not shutil.which("storescu"):
        why = "storescu (Debian package dcmtk) is missing"
    for mod in ("pydicom", "numpy", "hl7"):
        try:
            __import__(mod)
        except ImportError:
            why = why or f"the Python module {mod} is missing (scripts/setup installs it)"
    if why:
        print(f"demo: {why}", file=sys.stderr)
        return 1

    store_path = os.path.abspath(os.environ.get("RR_STORE") or os.path.join(ROOT, "var",
                                                                            "radrelay.db"))
    spool = os.path.abspath(os.environ.get("RR_SPOOL") or os.path.join(ROOT, "var", "spool"))
    work = os.path.join(os.path.dirname(store_path), "demo")
    os.makedirs(work, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="rr-demo-")
    stack = []   # what to stop, in reverse order
    done = []    # the story happened
    status = 1

    def on_term(*_):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)
    try:
        status = run(radrelay, keep, store_path, spool, work, tmp, stack, done)
    except (StoryFailed, orthanc.OrthancError) as e:
        say("", f"demo: FAILED: {e}")
        eng = next((x for x in stack if isinstance(x, Engine)), None)
        if eng and eng.problems():
            say("demo: the engine's last warnings and errors "
                f"({os.path.join(work, 'radrelay.log')}):", *("  " + l for l in eng.problems()))
        status = 1
    except KeyboardInterrupt:
        say("", "demo: stopping")
        status = 0 if done else 130
    finally:
        for x in reversed(stack):
            try:
                if isinstance(x, orthanc.Orthanc):
                    x.close()
                elif isinstance(x, Engine):
                    rc = x.stop()
                    if rc:
                        say(f"demo: the engine exited with {rc} when stopped"
                            f" (see {os.path.join(work, 'radrelay.log')})")
                        status = status or 1
                else:
                    x.stop()
            except Exception as e:  # keep stopping the others
                print(f"demo: stopping {x}: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return status


def run(radrelay, keep, store_path, spool, work, tmp, stack, done):
    rel = lambda p: os.path.relpath(p, ROOT) if p.startswith(ROOT + "/") else p  # noqa: E731
    # ---- the peers
    section("peers on this machine (loopback)")
    ports = {
        "orders": pick_port("RR_ORDERS_PORT", 2575, "the orders feed"),
        "reports": pick_port("RR_REPORTS_PORT", 2576, "the reports feed"),
        "dicom": pick_port("RR_DICOM_PORT", 11112, "radrelay's DICOM listener"),
        "api": pick_port("RR_API_PORT", 8480, "radrelay's REST API"),
        "ris": pick_port("RR_RIS_PORT", 2578, "the RIS"),
        "ai": pick_port("RR_AI_PORT", 8700, "the reference AI"),
        "pager": pick_port("RR_PAGER_PORT", 8590, "the pager gateway"),
    }
    pacs = orthanc.Orthanc(os.path.join(tmp, "pacs"), auth=False,
                           http_port=8042, dicom_port=4242)
    pacs.start()
    stack.append(pacs)
    say(f"   PACS        Orthanc {pacs.http_url} (DICOM {pacs.dicom_port}, AE {pacs.aet}),"
        f" DICOMweb {pacs.dicomweb_url}")

    def on_ris(ev):
        """What the RIS gets from the AI story, as it comes (the ADT passed
        on to the patient index are not shown)."""
        if ev.get("event") != "message":
            return
        if ev["type"].startswith("ORU^R01"):
            what = "the AI's preliminary result"
        elif "STAT_AI_POSITIVE" in ev.get("text", ""):
            what = "worklist update: priority STAT (STAT_AI_POSITIVE)"
        else:
            return
        say(f"   RIS: {ev['type']} {ev['control_id']}, {what}; answered AA")

    ai = Peer("the reference AI", [PY, os.path.join(PEERS, "reference_ai.py"), "--mode", "sync",
                                   "--port", str(ports["ai"])],
              log_path=os.path.join(work, "reference_ai.log"))
    stack.append(ai)
    say(f"   AI          reference AI (NOT A MEDICAL DEVICE) {ai.ready['url']}/analyze")
    ris = Peer("the RIS", [PY, os.path.join(PEERS, "ris_peer.py"), "--port", str(ports["ris"])],
               log_path=os.path.join(work, "ris.log"), on_event=on_ris)
    stack.append(ris)
    say(f"   RIS         python-hl7 MLLP server on {HOST}:{ris.ready['port']}")
    def on_page(ev):
        if ev.get("event") != "notification":
            return
        b = ev["body"]
        if ev["path"].startswith("/notify"):
            say(f"   pager gateway: PAGE {b.get('finding')} (ACR category"
                f" {b.get('acr_category')}), accession {b.get('accession')}, {b.get('model')}")
        else:
            say(f"   gateway: got POST {ev['path']} (the AI audit's verdict of a final report)")

    pager = Peer("the pager gateway", [PY, os.path.join(PEERS, "gateway.py"),
                                       "--port", str(ports["pager"])],
                 log_path=os.path.join(work, "gateway.log"), on_event=on_page)
    stack.append(pager)
    say(f"   pager       notification gateway {pager.ready['url']}")

    # ---- the engine
    with open(os.path.join(ROOT, "channels", "radrelay.json")) as f:
        engine_file = json.load(f)
    engine_file["store"]["path"] = store_path
    # The bundled channels, linked (not copied) beside this engine file: a
    # folder of channels holds no other engine file than the one run.
    chdir = os.path.join(work, "channels")
    shutil.rmtree(chdir, ignore_errors=True)
    os.makedirs(chdir)
    for name in sorted(os.listdir(os.path.join(ROOT, "channels"))):
        if name != "radrelay.json":
            os.symlink(os.path.join(ROOT, "channels", name), os.path.join(chdir, name))
    engine_file["channels"] = "channels"
    engine_file["http"] = {"host": HOST, "port": ports["api"], "token_file": "api.tokens",
                           "public_url": f"http://{HOST}:{ports['api']}"}
    config = os.path.join(work, "radrelay.json")
    with open(config, "w") as f:
        json.dump(engine_file, f, indent=2)
    tokens = {role: "rr-demo-" + secrets.token_urlsafe(24) for role in ("viewer", "operator")}
    old = os.umask(0o077)
    try:
        with open(os.path.join(work, "api.tokens"), "w") as f:
            for role, tok in tokens.items():
                f.write(f"{role} demo-{role} {hashlib.sha256(tok.encode()).hexdigest()}\n")
        with open(os.path.join(work, "viewer.token"), "w") as f:
            f.write(tokens["viewer"] + "\n")
    finally:
        os.umask(old)
    env = dict(os.environ)
    env.update({
        "RR_STORE": store_path, "RR_SPOOL": spool,
        "RR_ORDERS_PORT": str(ports["orders"]), "RR_REPORTS_PORT": str(ports["reports"]),
        "RR_DICOM_PORT": str(ports["dicom"]),
        "RR_AI_URL": ai.ready["url"].rstrip("/") + "/analyze", "RR_AI_MODE": "active",
        "RR_PACS_DICOMWEB": pacs.dicomweb_url,
        "RR_PACS_HOST": HOST, "RR_PACS_DICOM_PORT": str(pacs.dicom_port), "RR_PACS_AE": pacs.aet,
        "RR_RIS_HOST": HOST, "RR_RIS_PORT": str(ris.ready["port"]),
        "RR_PATIENT_INDEX_HOST": HOST, "RR_PATIENT_INDEX_PORT": str(ris.ready["port"]),
        "RR_PAGER_URL": pager.ready["url"],
        "RR_VERDICTS_URL": pager.ready["url"].rsplit("/", 1)[0] + "/verdicts",
    })
    chk = subprocess.run([radrelay, "check", "-c", config], env=env, capture_output=True,
                         text=True)
    if chk.returncode != 0:
        raise StoryFailed(f"radrelay check -c {rel(config)}:\n{chk.stdout}{chk.stderr}")
    engine = Engine(radrelay, config, os.path.join(work, "radrelay.log"), env)
    stack.append(engine)
    wait_for(lambda: engine.proc.poll() is not None or (
        engine.grep("event=api_ready") and len(engine.grep("event=ready channel=")) >= 3),
        30, "the engine's listeners")
    if engine.proc.poll() is not None:
        raise StoryFailed(f"the engine exited with {engine.proc.returncode}")
    say(f"   radrelay    orders {HOST}:{ports['orders']}, reports {HOST}:{ports['reports']},"
        f" DICOM {HOST}:{ports['dicom']} (AE RADRELAY), REST API http://{HOST}:{ports['api']}",
        f"               engine file {rel(config)}, store {rel(store_path)},"
        f" log {rel(os.path.join(work, 'radrelay.log'))}")
    api = Api(ports["api"], tokens)
    store = Store(store_path)

    # ---- the sample feed (as before)
    d = os.path.join(ROOT, "tests", "data", "hl7")
    section(f"orders feed (ADT, ORM, OMI) -> {HOST}:{ports['orders']}")
    subprocess.run([radrelay, "send", f"{HOST}:{ports['orders']}"] + [os.path.join(d, f) for f in (
        "adt_a01.hl7", "adt_a04.hl7", "adt_a08.hl7", "adt_a31.hl7", "adt_a40.hl7", "orm_o01.hl7",
        "omi_o23.hl7", "zsegments.hl7")])
    section(f"results and reports (ORU) -> {HOST}:{ports['reports']}")
    subprocess.run([radrelay, "send", f"{HOST}:{ports['reports']}"] + [os.path.join(d, f) for f in (
        "oru_r01.hl7", "multi_obx.hl7", "latin1.hl7", "oru_r01_ed_big.hl7")])

    # ---- the AI story
    now = time.localtime()
    run_id = time.strftime("%y%m%d%H%M%S", now)
    ts = time.strftime("%Y%m%d%H%M%S", now)
    studies = [
        {"title": "head CT with a planted bleed", "bleed": True, "given": "BLEED", "sex": "F",
         "reason": "FALL ON ANTICOAGULANTS", "accession": f"B{run_id}", "mrn": f"DMB{run_id}"},
        {"title": "head CT without a bleed", "bleed": False, "given": "CLEAN", "sex": "M",
         "reason": "HEADACHE", "accession": f"C{run_id}", "mrn": f"DMC{run_id}"},
    ]
    section(f"the AI story: two head CTs ordered -> orders feed {HOST}:{ports['orders']}")
    files = []
    for i, s in enumerate(studies):
        for kind, text in (
                ("adt", adt_a04(f"DM{run_id}-A{i + 1}", s["mrn"], s["given"], s["sex"], ts)),
                ("orm", orm_o01(f"DM{run_id}-O{i + 1}", s["mrn"], s["given"], s["sex"],
                                s["accession"], s["reason"], ts))):
            path = os.path.join(tmp, f"{kind}{i + 1}.hl7")
            with open(path, "w") as f:
                f.write(text)
            files.append(path)
    r = subprocess.run([radrelay, "send", f"{HOST}:{ports['orders']}"] + files)
    if r.returncode != 0:
        raise StoryFailed("the orders were not all acknowledged AA")
    for i, s in enumerate(studies):
        section(f"study {i + 1}: {s['title']} (accession {s['accession']}, 24 slices)"
                f" -> the PACS and radrelay")
        folder = os.path.join(tmp, f"study{i + 1}")
        s["uid"] = make_study(folder, s["accession"], s["mrn"], 100 + i, s["bleed"], now)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                resp = pacs.request("POST", "/instances", body=f.read(),
                                    headers={"Content-Type": "application/dicom"})
            if resp.status != 200:
                raise StoryFailed(f"Orthanc refused an instance: {resp!r}")
        say(f"   in the PACS (Orthanc REST); C-STORE to radrelay with DCMTK's storescu")
        r = subprocess.run(["storescu", "-aet", "RRTEST", "-aec", "RADRELAY", "+sd", HOST,
                            str(ports["dicom"]), folder], env=orthanc.dcmtk_env(),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise StoryFailed(f"storescu to radrelay failed: {r.stderr.strip()[-500:]}")
        st, body = api.call("POST", f"/api/studies/{s['uid']}/complete", role="operator")
        if st != 200:
            raise StoryFailed(f"POST /api/studies/.../complete answered {st}: {body}")
        say("   the modality says it is complete: POST /api/studies/{uid}/complete -> 200")

    section("what the AI made of them (waiting for the results and their deliveries)")

    def settled(s):
        if engine.proc.poll() is not None:
            raise StoryFailed(f"the engine exited with {engine.proc.returncode}")
        job = store.job(s["uid"])
        if job and job["state"] in ("failed", "rejected", "expired"):
            raise StoryFailed(f"study {s['accession']}: the AI job {job['id']} is {job['state']}"
                              f" ({(job['result'] or {}).get('error', 'see the log')})")
        if not job or job["result_ms"] is None or not store.delivered(s["uid"], "imaging.ris"):
            return False
        if job["critical"]:
            return all(store.delivered(s["uid"], d) for d, _ in STEPS_AFTER_RESULT)
        return True

    for s in studies:
        try:
            wait_for(lambda: settled(s), 180, f"the AI result of study {s['accession']} and its"
                     " deliveries")
        except StoryFailed:
            job = store.job(s["uid"])
            missing = [w for d, w in STEPS_AFTER_RESULT if not store.delivered(s["uid"], d)]
            raise StoryFailed(f"study {s['accession']}: AI job "
                              f"{job['state'] if job else 'never sent'}; missing: "
                              f"{', '.join(missing)}") from None

    # ---- the checks: the story happened
    bleed, clean = studies
    jb, jc = store.job(bleed["uid"]), store.job(clean["uid"])
    if jb["critical"] != 1:
        raise StoryFailed(f"the planted bleed was not found critical (job {jb['id']}: "
                          f"{len(jb['result'].get('findings', []))} finding(s))")
    if jc["critical"]:
        raise StoryFailed(f"the study without a bleed came back critical (job {jc['id']})")
    for dest, what in STEPS_AFTER_RESULT[1:]:
        if store.routed_to(clean["uid"], dest):
            raise StoryFailed(f"the study without findings was routed to {dest}")
    srs = pacs.post_json("/tools/find", {"Level": "Instance", "Query": {
        "StudyInstanceUID": bleed["uid"], "Modality": "SR"}})
    if len(srs) != 1:
        raise StoryFailed(f"{len(srs)} SR instances in the PACS for the bleed study, not 1")
    pages = [e["body"] for e in pager.events if e.get("event") == "notification"
             and e["body"].get("study_uid") == bleed["uid"]]
    if len(pages) != 1:
        raise StoryFailed(f"the pager gateway got {len(pages)} pages for the bleed study")
    orus = [e for e in ris.events if e.get("type", "").startswith("ORU")
            and any(s["uid"] in e["text"] for s in studies)]
    if len(orus) != 2:
        raise StoryFailed(f"the RIS got {len(orus)} ORU^R01 for the two studies, not 2")

    # The on-call radiologist acknowledges the page (the gateway calls back),
    # then signs the final report, which confirms the AI's finding.
    nid = pages[0].get("notification_id")
    section(f"the page is acknowledged: POST /api/notifications/{nid}/ack (operator token)")
    st, note = api.call("POST", f"/api/notifications/{nid}/ack", role="operator",
                        body={"by": "ZZDEMO^ONCALL^RADIOLOGIST", "note": "called the ED"})
    if st != 200 or note.get("state") != "acked":
        raise StoryFailed(f"the acknowledgement answered {st}: {note}")
    say(f"   {nid}: paged {pages[0].get('recipient')} (ACR category"
        f" {note['acr_category']}), acknowledged by {note['ack']['by']} after"
        f" {note['ack']['at_ms'] - note['created_ms']} ms, {note['pages']} page(s);"
        " no escalation follows")
    section(f"the radiologist's final report -> reports feed {HOST}:{ports['reports']}")
    rpt = os.path.join(tmp, "final_report.hl7")
    with open(rpt, "w") as f:
        f.write(final_report(f"DM{run_id}-R1", bleed["accession"], bleed["mrn"], bleed["uid"],
                             time.strftime("%Y%m%d%H%M%S", now)))
    r = subprocess.run([radrelay, "send", f"{HOST}:{ports['reports']}", rpt])
    if r.returncode != 0:
        raise StoryFailed("the final report was not acknowledged AA")
    deadline = time.monotonic() + 30
    verdict = None
    while time.monotonic() < deadline and not verdict:
        verdict = store.verdict(bleed["uid"])
        if not verdict:
            time.sleep(0.1)  # poll interval; the condition is the verdict in the store
    if not verdict or verdict[0] != "confirmed":
        raise StoryFailed(f"the report's verdict on the AI finding is {verdict}, not confirmed")
    say(f"   the AI finding: {verdict[0]} by {verdict[1]} (reports channel, ai.verdict)")

    for i, s in enumerate(studies):
        job = store.job(s["uid"])
        section(f"timeline of study {i + 1}: {s['title']} (accession {s['accession']};"
                " from the store, in ms)")
        say(*timeline(store, s))
        fs = job["result"].get("findings") or []
        model = job["result"].get("model", {})
        for f in fs:
            say(f"   finding: {f['label']} (SCT {f['code']['code']}), confidence"
                f" {f['confidence']:.2f}, {'critical' if f['critical'] else 'not critical'}"
                f"; model {model.get('name')} {model.get('version')} (job {job['id']})")
        if not fs:
            say(f"   no findings; model {model.get('name')} {model.get('version')}"
                f" (job {job['id']})")

    st, wl = api.call("GET", "/api/worklist")
    if st != 200:
        raise StoryFailed(f"GET /api/worklist answered {st}")
    rows = wl["studies"]
    mine = {s["uid"]: s for s in studies}
    pos_bleed = next((i for i, r in enumerate(rows) if r["study_uid"] == bleed["uid"]), None)
    if pos_bleed is None:
        raise StoryFailed("the bleed study is not on the worklist")
    section(f"the reading worklist (GET /api/worklist: {len(rows)} studies of the last 7 days)")
    for pos, row in enumerate(rows, 1):
        if row["study_uid"] in mine:
            flag = "AI CRITICAL: " + ", ".join(row["ai_findings"]) if row["ai_critical"] else \
                "no AI flag"
            say(f"   #{pos:<3} {row['accession']:<16} {row['description'] or ''} {flag}")
    if not rows[pos_bleed]["ai_critical"]:
        raise StoryFailed("the bleed study is not flagged AI-critical on the worklist")
    if any(not r["ai_critical"] for r in rows[:pos_bleed]):
        raise StoryFailed("the bleed study is not among the AI-critical studies at the top")

    v = subprocess.run([radrelay, "audit", "verify", "-c", config], env=env, capture_output=True,
                       text=True)
    section(f"the audit trail (radrelay audit verify -c {rel(config)})")
    say("   " + (v.stdout.strip() or v.stderr.strip()))
    if v.returncode != 0:
        raise StoryFailed("the audit trail does not verify")

    section("the journal (on a second run the sample feed is resent: answered from the journal)")
    subprocess.run(["sqlite3", "-header", "-column", store_path,
                    "SELECT channel, message_type, status, count(*) AS messages FROM messages"
                    " GROUP BY 1, 2, 3 ORDER BY 1, 2;"])
    section("destination queues")
    subprocess.run([radrelay, "queue", "ls", "-c", config], env=env)

    section("where to look")
    tok = rel(os.path.join(work, "viewer.token"))
    say(f"   worklist:  curl -H \"Authorization: Bearer $(cat {tok})\""
        f" http://{HOST}:{ports['api']}/api/worklist",
        f"   AI job:    curl -H \"Authorization: Bearer $(cat {tok})\""
        f" http://{HOST}:{ports['api']}/api/ai/jobs/{jb['id']}",
        f"   audit:     {rel(radrelay)} audit verify -c {rel(config)}",
        f"              {rel(radrelay)} audit export -c {rel(config)}",
        f"   PACS:      {pacs.http_url}/app/explorer.html (Orthanc; the SR is in the bleed study)",
        f"   store:     sqlite3 {rel(store_path)} 'SELECT * FROM ai_jobs'"
        " (also studies, deliveries, audit)",
        f"   logs:      {rel(os.path.join(work, 'radrelay.log'))},"
        f" {rel(os.path.join(work, 'reference_ai.log'))}")
    say("", "demo: the story happened: bleed -> critical ORU, SR in the PACS, worklist update,"
        " page; no bleed -> ORU without findings")
    done.append(True)
    if keep:
        say("", f"Everything keeps running (the web addresses above work until then);"
            f" send more with: {rel(radrelay)} send {HOST}:{ports['orders']} FILE.hl7."
            " Ctrl-C stops.")
        while engine.proc.poll() is None:
            time.sleep(0.5)
        raise StoryFailed(f"the engine exited with {engine.proc.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A DICOMweb source in the running engine, against a real PACS: Orthanc
with its DICOMweb plugin (Debian packages), started here on loopback ports.
The study is put in Orthanc (its REST API), not sent to radrelay: radrelay
finds it with QIDO-RS (basic authentication, the password from a file),
lists its instances, marks it stable after the quiet period, matches it to
the ORM sent earlier over MLLP (python-hl7's client) and hands the study
context, with the order's priority and indication and the study's WADO-RS
URL, to on_study, which routes it to an HTTP receiver here. More instances
of the study arriving later in Orthanc are found by the next search. A
second study is announced by the PACS itself: Orthanc's Lua hook
(OnStableStudy -> HttpPost) calls radrelay's REST API (POST
/api/sources/{channel}/notify with "complete", an operator token; checked
here too: 401 without a token, 403 with a viewer's, 404, 400), and the study
is routed with polling and the quiet period both set to an hour. A wrong
password is logged as a failed search.

Run: test_dicomweb_source.py --radrelay build/radrelay (exits 77 without
Orthanc, its DICOMweb plugin, pydicom or python3-hl7)."""
import argparse
import hashlib
import http.client
import json
import socket
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
import orthanc  # noqa: E402
from test_study_matching import (Engine, Receiver, make_study, orm, send_hl7,  # noqa: E402
                                 wait_for)

SKIP = 77


def upload(pacs, folder, names=None):
    for name in sorted(names or os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            r = pacs.request("POST", "/instances", body=f.read(),
                             headers={"Content-Type": "application/dicom"})
        assert r.status == 200, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    why = orthanc.missing()
    if why:
        print(f"SKIPPED: {why}")
        return SKIP
    for mod in ("pydicom", "hl7"):
        if subprocess.run(["/usr/bin/python3", "-c", "import " + mod],
                          capture_output=True).returncode != 0:
            print(f"SKIPPED: {mod} not importable by /usr/bin/python3")
            return SKIP
    rx = Receiver()
    tokens = {"hook": "rr-test-token-hook-0001", "viewer": "rr-test-token-viewer-0001"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        api = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="rr-dwsrc-") as tmp:
        # Orthanc's own hook: once a study is stable there, its Lua tells
        # radrelay (the study is complete in the PACS)
        hook = os.path.join(tmp, "notify.lua")
        with open(hook, "w") as f:
            f.write(ORTHANC_HOOK.replace("API_PORT", str(api)).replace("TOKEN", tokens["hook"]))
        pacs = orthanc.Orthanc(os.path.join(tmp, "pacs"), extra_config={"LuaScripts": [hook]})
        with pacs:
            return run(args, rx, tmp, pacs, tokens, api)


ORTHANC_HOOK = r"""
function OnStableStudy(studyId, tags, metadata)
  local ok, err = pcall(HttpPost,
    "http://127.0.0.1:API_PORT/api/sources/imaging/notify",
    '{"study_uid": "' .. tags["StudyInstanceUID"] .. '", "complete": true}',
    {["Authorization"] = "Bearer TOKEN", ["Content-Type"] = "application/json"})
  if not ok then print("radrelay not reachable: " .. tostring(err)) end
end
"""


def run(args, rx, tmp, pacs, tokens, api):
    e = Engine(os.path.abspath(args.radrelay), tmp, rx.port)
    secret = os.path.join(tmp, "pacs.password")
    with open(secret, "w") as f:
        f.write(orthanc.PASSWORD + "\n")
    os.chmod(secret, 0o600)
    path = os.path.join(tmp, "channels", "imaging.json")
    with open(path) as f:
        ch = json.load(f)
    ch["source"] = {"type": "dicomweb", "url": pacs.dicomweb_url, "user": orthanc.USER,
                    "password_file": secret, "poll_interval_s": 1, "lookback_hours": 48,
                    "modalities": ["CT"], "stable_after_s": 2}
    with open(path, "w") as f:
        json.dump(ch, f)
    e.start_ready = 1
    e.start = lambda: start_one(e)
    e.start()
    try:
        import time
        today = time.strftime("%Y%m%d")
        acks = send_hl7(e.orders_port, [
            orm("RRW-1", "NW", "RRACC-W1", "RRPAT-W1", "CT", "S", "FALL, ON ANTICOAGULANTS",
                today + "0800")])
        assert all("MSA|AA|" in (a.decode() if isinstance(a, bytes) else a) for a in acks)
        folder = os.path.join(tmp, "w1")
        uid = make_study(folder, 31, "RRACC-W1", "RRPAT-W1", slices=6, date=today,
                         time_="081500")
        names = sorted(os.listdir(folder))
        upload(pacs, folder, names[:4])
        wait_for(lambda: e.sql("SELECT instances FROM studies WHERE study_uid = ?", uid)
                 == [(4,)], 30, "the study found over QIDO-RS")
        upload(pacs, folder, names[4:])  # more of it: the next search sees the count grow
        wait_for(lambda: rx.for_study(uid), 60, "the study routed")
        (ctx,) = rx.for_study(uid)
        assert ctx["instances"] == 6, ctx["instances"]
        assert ctx["match"] == "accession", ctx["match"]
        assert ctx["order"]["priority"] == "STAT", ctx["order"]
        assert ctx["order"]["reason"] == "FALL, ON ANTICOAGULANTS", ctx["order"]
        assert ctx["retrieve_url"] == f"{pacs.dicomweb_url}/studies/{uid}", ctx
        paths = [p for (p,) in e.sql("SELECT path FROM instances WHERE study_uid = ?", uid)]
        assert len(paths) == 6 and all(p.startswith(ctx["retrieve_url"] + "/series/")
                                       for p in paths), paths
        # the recorded URL is a WADO-RS URL Orthanc answers
        r = pacs.request("GET", paths[0][len(pacs.http_url):],
                         headers={"Accept": "multipart/related; type=\"application/dicom\""})
        assert r.status == 200, r
        assert e.grep("event=searched", "new_or_changed=1")
    finally:
        e.stop()
    # the PACS calls radrelay's API instead (an Orthanc hook would): with
    # polling and the quiet period both an hour, only the notification
    # finds the study and only "complete" makes it stable
    with open(os.path.join(tmp, "tokens"), "w") as f:
        f.write("# role name sha256(token)\n")
        f.write(f"operator pacs-hook {hashlib.sha256(tokens['hook'].encode()).hexdigest()}\n")
        f.write(f"viewer ward-screen {hashlib.sha256(tokens['viewer'].encode()).hexdigest()}\n")
    with open(e.config) as f:
        conf = json.load(f)
    conf["http"] = {"host": "127.0.0.1", "port": api, "token_file": "tokens"}
    with open(e.config, "w") as f:
        json.dump(conf, f)
    with open(path) as f:
        ch = json.load(f)
    ch["source"]["poll_interval_s"] = 3600
    ch["source"]["stable_after_s"] = 3600
    with open(path, "w") as f:
        json.dump(ch, f)
    e.start()
    try:
        wait_for(lambda: e.grep("event=api_ready", f"port={api}"), 10, "the API ready")
        wait_for(lambda: e.grep("event=searched"), 10, "the first search")  # at start
        folder2 = os.path.join(tmp, "w2")
        uid2 = make_study(folder2, 32, "RRACC-W1", "RRPAT-W1", slices=2, date=today,
                          time_="083000")
        upload(pacs, folder2)
        body = json.dumps({"study_uid": uid2, "complete": True})
        st, _ = call(api, "POST", "/api/sources/imaging/notify", body)
        assert st == 401, st
        st, _ = call(api, "POST", "/api/sources/imaging/notify", body, tokens["viewer"])
        assert st == 403, st
        st, r = call(api, "POST", "/api/sources/nosuch/notify", body, tokens["hook"])
        assert st == 404 and r["error"] == "not_found", (st, r)
        st, r = call(api, "POST", "/api/sources/imaging/notify", '{"study_uid": "x"}',
                     tokens["hook"])
        assert st == 400 and "error" in r, (st, r)
        # the valid notification comes from Orthanc's hook, once the
        # study is stable in Orthanc (its StableAge)
        wait_for(lambda: rx.for_study(uid2), 60, "the study routed on Orthanc's notification")
        assert e.grep("event=source_notified", "principal=pacs-hook")
        assert rx.for_study(uid2)[0]["instances"] == 2
        assert not e.grep("event=searched", "new_or_changed=1"), "found by polling"
        st, r = call(api, "GET", f"/api/studies/{uid2}", None, tokens["viewer"])
        assert st == 200 and r["match"] == "accession" and r["instances"] == 2, (st, r)
        st, r = call(api, "GET", "/api/orders/RRACC-W1", None, tokens["viewer"])
        assert st == 200 and r["priority"] == "STAT" and r["status"] == "active", (st, r)
        st, r = call(api, "GET", "/api/orders/RRACC-NONE", None, tokens["viewer"])
        assert st == 404, (st, r)
        st, r = call(api, "POST", f"/api/studies/{uid2}/complete", "", tokens["hook"])
        assert st == 200 and r == {"study_uid": uid2, "changed": False}, (st, r)
        st, r = call(api, "GET", "/health", None)
        assert st == 200 and r == {"status": "ok"}, (st, r)
    finally:
        e.stop()
    # a wrong password: the searches fail, logged; the engine keeps running
    with open(secret, "w") as f:
        f.write("not-the-password\n")
    e.start()
    try:
        wait_for(lambda: e.grep("event=search_failed", "http_status=401"), 30,
                 "a failed search logged")
    finally:
        e.stop()
    leaks = [l for l in e.all_lines if "level=debug" not in l and
             any(s in l for s in ("RRPAT-", "RRACC-", uid, uid2, orthanc.PASSWORD))]
    assert not leaks, leaks[:5]
    assert len(rx.for_study(uid)) == 1 and len(rx.for_study(uid2)) == 1
    assert not [l for l in e.all_lines if any(t in l for t in tokens.values())]
    print("dicomweb source: a study put in Orthanc found by QIDO-RS, grown, stable, matched to "
          "its ORM by accession, routed once with its WADO-RS URL; another announced by "
          "Orthanc's Lua hook through the REST API (roles checked); a wrong password logged")
    return 0


def call(port, method, path, body=None, token=None):
    """One request to radrelay's API with Python's http.client: (status, JSON)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        h = {"Content-Type": "application/json"}
        if token:
            h["Authorization"] = f"Bearer {token}"
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None
    finally:
        c.close()


def start_one(e):
    """Engine.start for an engine whose imaging channel listens on nothing."""
    import re
    import threading
    e.lines = []
    e.proc = subprocess.Popen([e.radrelay, "run", "-c", e.config], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=e._read, args=(e.proc,), daemon=True).start()
    wait_for(lambda: e.grep("event=ready", "channel=orders"), 20, "the orders channel ready")
    e.orders_port = int(re.search(r"port=(\d+)",
                                  e.grep("event=ready", "channel=orders")[0]).group(1))
    return e


if __name__ == "__main__":
    sys.exit(main())

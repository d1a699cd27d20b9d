#!/usr/bin/env python3
"""DICOM destinations through the durable queue, against Orthanc (Debian's
orthanc + orthanc-dicomweb, started here on loopback ports).

A DICOM source channel receives synthetic CT studies from DCMTK's storescu;
its on_study routes them on:

- C-STORE to Orthanc ({"study_uid": ...}: the instances as received):
  delivered; Orthanc has every instance;
- STOW-RS to Orthanc's DICOMweb root (basic authentication, the password
  from a file): delivered; Orthanc has every instance;
- C-STORE with a called AE title Orthanc does not answer to: association
  rejected, dead-lettered with the reason, never "sent";
- STOW-RS with a wrong password: HTTP 401, dead-lettered;
- C-STORE of a file whose SOP Instance UID is not a UID to a DICOM
  listener that answers 0xC000 (a second channel of the same engine):
  a failure status, dead-lettered with the status;
- C-STORE to a port where nothing listens: retried with back-off (never
  dead while attempts remain).

Run: test_dicom_destinations.py --radrelay build/radrelay (exits 77 without
Orthanc, its DICOMweb plugin, pydicom or storescu)."""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
import orthanc  # noqa: E402
from test_study_matching import make_study, store, wait_for  # noqa: E402

SKIP = 77
HOST = "127.0.0.1"

SCRIPT = r"""
function on_study(study, ctx)
  local s = {study_uid = study.study_uid}
  if study.accession == "RRACC-D1" then
    ctx:route("pacs_cstore", s)
    ctx:route("pacs_bad_ae", s)
    ctx:route("self", {files = {BAD_FILE}})
    ctx:route("nobody", s)
  elseif study.accession == "RRACC-D2" then
    ctx:route("pacs_stow", s)
    ctx:route("pacs_bad_password", s)
  end
end
"""


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    why = orthanc.missing()
    if why:
        print(f"SKIPPED: {why}")
        return SKIP
    if not shutil.which("storescu") or subprocess.run(
            ["/usr/bin/python3", "-c", "import pydicom"], capture_output=True).returncode:
        print("SKIPPED: storescu or pydicom missing")
        return SKIP
    with tempfile.TemporaryDirectory(prefix="rr-dicomdst-") as tmp, \
            orthanc.Orthanc(os.path.join(tmp, "pacs")) as pacs:
        good = os.path.join(tmp, "good.password")
        bad = os.path.join(tmp, "bad.password")
        with open(good, "w") as f:
            f.write(orthanc.PASSWORD + "\n")
        with open(bad, "w") as f:
            f.write("not-the-password\n")
        # a CT instance whose SOP Instance UID is not a UID
        d1 = os.path.join(tmp, "d1")
        uid1 = make_study(d1, 41, "RRACC-D1", "RRPAT-D1", slices=20)
        bad_file = os.path.join(tmp, "bad-uid.dcm")
        subprocess.run(["/usr/bin/python3", "-W", "ignore", "-c", f"""
import pydicom, sys
ds = pydicom.dcmread({os.path.join(d1, sorted(os.listdir(d1))[0])!r})
ds.SOPInstanceUID = "1.2.NOT.A.UID"
ds.file_meta.MediaStorageSOPInstanceUID = "1.2.NOT.A.UID"
ds.save_as({bad_file!r})
"""], check=True)
        self_port, dead_port = free_port(), free_port()
        chdir = os.path.join(tmp, "channels")
        os.makedirs(chdir)
        retry = {"max_attempts": 3, "backoff_base_ms": 100, "backoff_max_ms": 200}
        dests = {
            "pacs_cstore": {"type": "dicom", "host": HOST, "port": pacs.dicom_port,
                            "called_ae": pacs.aet, "calling_ae": orthanc.ENGINE_AET},
            "pacs_bad_ae": dict(retry, type="dicom", host=HOST, port=pacs.dicom_port,
                                called_ae="NOT-ORTHANC", calling_ae=orthanc.ENGINE_AET),
            "self": dict(retry, type="dicom", host=HOST, port=self_port, called_ae="SELFPACS",
                         calling_ae="RADRELAY"),
            "nobody": {"type": "dicom", "host": HOST, "port": dead_port, "called_ae": "NOBODY",
                       "max_attempts": 1000, "backoff_base_ms": 100, "backoff_max_ms": 300},
            "pacs_stow": {"type": "stow", "url": pacs.dicomweb_url, "user": orthanc.USER,
                          "password_file": good},
            "pacs_bad_password": dict(retry, type="stow", url=pacs.dicomweb_url,
                                      user=orthanc.USER, password_file=bad),
        }
        with open(os.path.join(chdir, "imaging.json"), "w") as f:
            json.dump({"name": "imaging",
                       "source": {"type": "dicom", "host": HOST, "port": 0,
                                  "ae_title": "RADRELAY", "calling_aes": ["RRTEST"],
                                  "spool": "spool", "min_free_mb": 1, "stable_after_s": 1},
                       "script": "imaging.lua", "destinations": dests}, f)
        with open(os.path.join(chdir, "imaging.lua"), "w") as f:
            f.write(SCRIPT.replace("BAD_FILE", json.dumps(bad_file)))
        with open(os.path.join(chdir, "selfpacs.json"), "w") as f:
            json.dump({"name": "selfpacs",
                       "source": {"type": "dicom", "host": HOST, "port": self_port,
                                  "ae_title": "SELFPACS", "calling_aes": ["RADRELAY"],
                                  "spool": "spool-self", "min_free_mb": 1}}, f)
        config = os.path.join(tmp, "radrelay.json")
        with open(config, "w") as f:
            json.dump({"store": {"path": "store/radrelay.db"}, "channels": "channels"}, f)
        lines, lock = [], threading.Lock()
        proc = subprocess.Popen([os.path.abspath(args.radrelay), "run", "-c", config],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

        def read():
            for line in proc.stderr:
                with lock:
                    lines.append(line.rstrip("\n"))
        threading.Thread(target=read, daemon=True).start()

        def grep(*needles):
            with lock:
                return [l for l in lines if all(n in l for n in needles)]

        def sql(q, *a):
            import sqlite3
            db = sqlite3.connect(os.path.join(tmp, "store", "radrelay.db"), timeout=10)
            try:
                return db.execute(q, a).fetchall()
            finally:
                db.close()

        def orthanc_instances(study_uid):
            r = pacs.request("POST", "/tools/find", body=json.dumps(
                {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}).encode(),
                headers={"Content-Type": "application/json"})
            assert r.status == 200, r
            return len(r.json())

        try:
            wait_for(lambda: grep("event=ready", "channel=imaging"), 20, "the engine ready")
            port = int(re.search(r"port=(\d+)", grep("event=ready", "channel=imaging")[0]).group(1))
            store(port, d1)
            d2 = os.path.join(tmp, "d2")
            uid2 = make_study(d2, 42, "RRACC-D2", "RRPAT-D2", slices=4)
            store(port, d2)

            def outcome(dest):
                return sql("SELECT outcome, detail FROM deliveries WHERE destination = ?"
                           " ORDER BY id", "imaging." + dest)
            wait_for(lambda: any(o == "delivered" for o, _ in outcome("pacs_cstore")), 60,
                     "C-STORE to Orthanc delivered")
            assert orthanc_instances(uid1) == 20
            wait_for(lambda: any(o == "delivered" for o, _ in outcome("pacs_stow")), 60,
                     "STOW-RS to Orthanc delivered")
            assert orthanc_instances(uid2) == 4
            for dest, words in (("pacs_bad_ae", "rejected"), ("pacs_bad_password", "401"),
                                ("self", "0xC000")):
                wait_for(lambda: any(o == "dead" for o, _ in outcome(dest)), 60,
                         f"{dest} dead-lettered")
                hist = outcome(dest)
                assert not any(o == "delivered" for o, _ in hist), (dest, hist)
                assert words in hist[-1][1], (dest, hist)
            # nothing listens: retried, still pending
            wait_for(lambda: len(outcome("nobody")) >= 2, 60, "retries to a closed port")
            assert all(o == "retry" for o, _ in outcome("nobody")), outcome("nobody")
            assert sql("SELECT state FROM queue WHERE destination = 'imaging.nobody'") == [
                ("pending",)]
            ms = sql("SELECT d.at_ms - m.received_ms FROM deliveries d JOIN messages m"
                     " ON m.id = d.message_id WHERE d.destination = 'imaging.pacs_cstore'"
                     " AND d.outcome = 'delivered'")[0][0]
        finally:
            proc.terminate()
            rc = proc.wait(timeout=30)
        assert rc == 0, "\n".join(lines[-20:])
        bad_lines = [l for l in lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad_lines, bad_lines
        leaks = [l for l in lines if "level=debug" not in l and
                 any(s in l for s in ("RRPAT-", "RRACC-", uid1, uid2, orthanc.PASSWORD))]
        assert not leaks, leaks[:5]
    print(f"dicom destinations: C-STORE (20 instances, {ms} ms from routing to delivered) and "
          "STOW-RS into Orthanc delivered; rejected association, HTTP 401 and status 0xC000 "
          "dead-lettered; a closed port retried")
    return 0


if __name__ == "__main__":
    sys.exit(main())

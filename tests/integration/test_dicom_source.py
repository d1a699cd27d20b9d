#!/usr/bin/env python3
"""A DICOM source channel in the running engine: DCMTK's storescu (the
modality) sends a synthetic CT head study (scripts/make-study) to radrelay;
every instance lands in the spool folder and in table instances, the study
in table studies with its accession, patient and instance count, and
becomes stable after the quiet period; a resend of the study records no
second row and leaves it stable (late_series ignore); an unknown calling AE
title is refused and the refusal logged; a study interrupted by a restart
becomes stable once, after it; with late_series reopen an instance of a
stable study makes it arriving, then stable, again; `radrelay study
complete UID` makes a study stable at once; SIGTERM stops cleanly.

Run: test_dicom_source.py --radrelay build/radrelay (needs /usr/bin/python3
with pydicom, and storescu/echoscu; skips with exit status 77 otherwise)."""
import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SKIP = 77


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)  # poll interval; the condition is pred()
    raise AssertionError(f"timed out waiting for {what}")


class Engine:
    def __init__(self, radrelay, workdir, channel):
        self.radrelay, self.dir = radrelay, workdir
        os.makedirs(os.path.join(workdir, "channels"), exist_ok=True)
        with open(os.path.join(workdir, "channels", channel["name"] + ".json"), "w") as f:
            json.dump(channel, f)
        self.config = os.path.join(workdir, "radrelay.json")
        with open(self.config, "w") as f:
            json.dump({"store": {"path": "store/radrelay.db"}, "channels": "channels",
                       "log": {"level": "info"}}, f)
        self.store = os.path.join(workdir, "store", "radrelay.db")
        self.lines, self.lock = [], threading.Lock()

    def start(self):
        self.proc = subprocess.Popen([self.radrelay, "run", "-c", self.config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: self.grep("event=ready"), 20, "event=ready")
        m = re.search(r"port=(\d+)", self.grep("event=ready")[0])
        self.port = int(m.group(1))
        return self

    def _read(self):
        for line in self.proc.stderr:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def grep(self, *needles):
        with self.lock:
            return [l for l in self.lines if all(n in l for n in needles)]

    def sql(self, q):
        db = sqlite3.connect(self.store, timeout=10)
        try:
            return db.execute(q).fetchall()
        finally:
            db.close()

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    for tool in ("storescu", "echoscu"):
        if not shutil.which(tool):
            print(f"SKIPPED: {tool} not found (Debian package dcmtk)")
            return SKIP
    if subprocess.run(["/usr/bin/python3", "-c", "import pydicom"],
                      capture_output=True).returncode != 0:
        print("SKIPPED: pydicom not importable by /usr/bin/python3 (python3-pydicom)")
        return SKIP
    env = dict(os.environ, TCP_NODELAY="1")  # DCMTK's tools leave Nagle on otherwise
    with tempfile.TemporaryDirectory(prefix="rr-dicom-src-") as tmp:
        study = os.path.join(tmp, "study")
        r = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "scripts", "make-study"),
                            "--out", study, "--slices", "6", "--size", "64",
                            "--accession", "RRACC0001", "--patient-id", "RRTEST-0001",
                            "--seed", "7"], capture_output=True, text=True, check=True)
        made = json.loads(r.stdout.strip().splitlines()[-1])
        ch = {"name": "modality", "source": {"type": "dicom", "host": "127.0.0.1", "port": 0,
                                             "ae_title": "RADRELAY", "calling_aes": ["RRTEST"],
                                             "spool": "spool", "min_free_mb": 1,
                                             "stable_after_s": 2}}
        e = Engine(os.path.abspath(args.radrelay), tmp, ch).start()
        try:
            ok = subprocess.run(["echoscu", "-aet", "RRTEST", "-aec", "RADRELAY", "127.0.0.1",
                                 str(e.port)], capture_output=True, env=env)
            assert ok.returncode == 0, ok.stderr
            t0 = time.monotonic()
            st = subprocess.run(["storescu", "-aet", "RRTEST", "-aec", "RADRELAY", "+sd", "-xe",
                                 "127.0.0.1", str(e.port), study], capture_output=True, env=env)
            took = time.monotonic() - t0
            assert st.returncode == 0, st.stderr
            uid = made["study_instance_uid"]
            wait_for(lambda: e.sql("SELECT instances FROM studies") == [(6,)], 20,
                     "one study with 6 instances")
            (row,) = e.sql("SELECT study_uid, accession, patient_id, modality, body_part, state"
                           " FROM studies")
            assert row[1:] == ("RRACC0001", "RRTEST-0001", "CT", "HEAD", "arriving"), row
            assert row[0] == uid, (row[0], uid)
            wait_for(lambda: e.sql("SELECT state FROM studies") == [("stable",)], 20,
                     "the study stable after the quiet period")
            assert len(e.grep("event=studies_stable", "studies=1")) == 1
            paths = [p for (p,) in e.sql("SELECT path FROM instances")]
            assert len(paths) == 6 and all(os.path.isfile(p) for p in paths), paths
            assert all(os.path.dirname(p) == os.path.join(tmp, "spool") for p in paths), paths
            # the same study again: same rows, the count stays 6
            st = subprocess.run(["storescu", "-aet", "RRTEST", "-aec", "RADRELAY", "+sd", "-xe",
                                 "127.0.0.1", str(e.port), study], capture_output=True, env=env)
            assert st.returncode == 0, st.stderr
            wait_for(lambda: len(e.grep("event=association_ended")) >= 3, 20, "3 associations")
            assert e.sql("SELECT count(*), sum(instances), min(state) FROM studies") == [
                (1, 6, "stable")]
            assert e.sql("SELECT count(*) FROM instances") == [(6,)]
            # an unknown calling AE title: refused, logged with the reason
            bad = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "RADRELAY",
                                  "127.0.0.1", str(e.port)], capture_output=True, env=env)
            assert bad.returncode != 0, "an unknown calling AE was accepted"
            wait_for(lambda: e.grep("event=association_refused", "calling=INTRUDER"), 10,
                     "the refusal logged")
            # a second study, half of it before a restart and half after
            second = os.path.join(tmp, "second")
            r = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "scripts", "make-study"),
                                "--out", second, "--slices", "6", "--size", "64",
                                "--accession", "RRACC0002", "--patient-id", "RRTEST-0002",
                                "--seed", "8"], capture_output=True, text=True, check=True)
            files = sorted(os.path.join(second, f) for f in os.listdir(second))
            st = subprocess.run(["storescu", "-aet", "RRTEST", "-aec", "RADRELAY", "-xe",
                                 "127.0.0.1", str(e.port), *files[:3]], capture_output=True,
                                env=env)
            assert st.returncode == 0, st.stderr
            wait_for(lambda: e.sql("SELECT instances, state FROM studies WHERE accession ="
                                   " 'RRACC0002'") == [(3, "arriving")], 10, "half the study")
        finally:
            rc = e.stop()
        assert rc == 0, f"radrelay exited {rc} on SIGTERM:\n" + "\n".join(e.lines[-20:])
        assert e.sql("SELECT state FROM studies WHERE accession = 'RRACC0002'") == [
            ("arriving",)], "stopped before its quiet period ended"
        first_run = list(e.lines)
        e.lines = []
        e.start()
        try:
            st = subprocess.run(["storescu", "-aet", "RRTEST", "-aec", "RADRELAY", "-xe",
                                 "127.0.0.1", str(e.port), *files[3:]], capture_output=True,
                                env=env)
            assert st.returncode == 0, st.stderr
            wait_for(lambda: e.sql("SELECT instances, state FROM studies WHERE accession ="
                                   " 'RRACC0002'") == [(6, "stable")], 20,
                     "the interrupted study complete and stable")
            wait_for(lambda: e.grep("event=studies_stable"), 10, "its stable event")
            assert [l for l in e.grep("event=studies_stable")
                    if "studies=1" not in l] == [], e.grep("event=studies_stable")
            assert len(e.grep("event=studies_stable")) == 1
        finally:
            rc = e.stop()
        assert rc == 0, f"radrelay exited {rc} on SIGTERM:\n" + "\n".join(e.lines[-20:])
        second_run = list(e.lines)
        # late_series reopen: an instance of a stable study makes it arriving
        # again, and it becomes stable once more
        chf = os.path.join(tmp, "channels", "modality.json")
        with open(chf) as f:
            cfg = json.load(f)
        cfg["source"]["late_series"] = "reopen"
        with open(chf, "w") as f:
            json.dump(cfg, f)
        e.lines = []
        e.start()
        try:
            one = sorted(os.path.join(study, f) for f in os.listdir(study))[0]
            st = subprocess.run(["storescu", "-aet", "RRTEST", "-aec", "RADRELAY", "-xe",
                                 "127.0.0.1", str(e.port), one], capture_output=True, env=env)
            assert st.returncode == 0, st.stderr
            wait_for(lambda: e.grep("event=studies_stable", "studies=1"), 20,
                     "the reopened study stable again")
            assert e.sql("SELECT instances, state FROM studies WHERE accession ="
                         " 'RRACC0001'") == [(6, "stable")]
        finally:
            rc = e.stop()
        assert rc == 0, f"radrelay exited {rc} on SIGTERM:\n" + "\n".join(e.lines[-20:])
        third_run = list(e.lines)
        # an explicit "complete": stable at once, whatever the quiet period
        cfg["source"]["stable_after_s"] = 3600
        with open(chf, "w") as f:
            json.dump(cfg, f)
        third = os.path.join(tmp, "third")
        r = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "scripts", "make-study"),
                            "--out", third, "--slices", "2", "--size", "64",
                            "--accession", "RRACC0003", "--patient-id", "RRTEST-0003",
                            "--seed", "9"], capture_output=True, text=True, check=True)
        uid3 = json.loads(r.stdout.strip().splitlines()[-1])["study_instance_uid"]
        e.lines = []
        e.start()
        try:
            st = subprocess.run(["storescu", "-aet", "RRTEST", "-aec", "RADRELAY", "+sd", "-xe",
                                 "127.0.0.1", str(e.port), third], capture_output=True, env=env)
            assert st.returncode == 0, st.stderr
            wait_for(lambda: e.sql("SELECT instances, state FROM studies WHERE study_uid = '"
                                   + uid3 + "'") == [(2, "arriving")], 10, "the third study")
            cli = subprocess.run([e.radrelay, "study", "complete", uid3, "-c", e.config],
                                 capture_output=True, text=True)
            assert cli.returncode == 0, cli.stderr
            wait_for(lambda: e.sql("SELECT state FROM studies WHERE study_uid = '" + uid3 + "'")
                     == [("stable",)], 10, "the completed study stable")
            wait_for(lambda: e.grep("event=study_completed", "changed=yes"), 10,
                     "event=study_completed logged")
            assert not [l for l in e.lines if uid3 in l and "level=debug" not in l], \
                "a Study UID logged above debug"
        finally:
            rc = e.stop()
        fourth_run = list(e.lines)
        # DICOM TLS: storescu with a client certificate from the test CA
        # stores; one without a certificate is refused before any association
        certs = os.path.join(tmp, "certs")
        subprocess.run([os.path.join(ROOT, "scripts", "gen-certs"), certs], check=True)
        cfg["source"]["tls"] = {"cert": os.path.join(certs, "server.pem"),
                                "key": os.path.join(certs, "server.key"),
                                "ca": os.path.join(certs, "ca.pem")}
        with open(chf, "w") as f:
            json.dump(cfg, f)
        fourth = os.path.join(tmp, "fourth")
        r = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "scripts", "make-study"),
                            "--out", fourth, "--slices", "2", "--size", "64",
                            "--accession", "RRACC0004", "--patient-id", "RRTEST-0004",
                            "--seed", "10"], capture_output=True, text=True, check=True)
        e.lines = []
        e.start()
        try:
            tls = ["+tls", os.path.join(certs, "client.key"), os.path.join(certs, "client.pem"),
                   "+cf", os.path.join(certs, "ca.pem")]
            st = subprocess.run(["storescu", *tls, "-aet", "RRTEST", "-aec", "RADRELAY", "+sd",
                                 "-xe", "127.0.0.1", str(e.port), fourth], capture_output=True,
                                env=env)
            assert st.returncode == 0, st.stderr
            wait_for(lambda: e.sql("SELECT instances FROM studies WHERE accession ="
                                   " 'RRACC0004'") == [(2,)], 10, "the study over DICOM TLS")
            anon = subprocess.run(["storescu", "+tla", "+cf", os.path.join(certs, "ca.pem"),
                                   "-aet", "RRTEST", "-aec", "RADRELAY", "127.0.0.1",
                                   str(e.port), os.path.join(fourth, os.listdir(fourth)[0])],
                                  capture_output=True, env=env)
            assert anon.returncode != 0, "a client without a certificate was served"
            plain = subprocess.run(["echoscu", "-aet", "RRTEST", "-aec", "RADRELAY",
                                    "127.0.0.1", str(e.port)], capture_output=True, env=env)
            assert plain.returncode != 0, "plain DICOM was served on the TLS port"
        finally:
            rc = e.stop()
        e.lines = first_run + second_run + third_run + fourth_run + e.lines
        assert rc == 0, f"radrelay exited {rc} on SIGTERM:\n" + "\n".join(e.lines[-20:])
        assert e.grep("event=stopped"), "no event=stopped"
        bad = [l for l in e.lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad, bad
        db = sqlite3.connect(e.store)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        print(f"dicom source: 6 instances stored in {took:.2f} s, stable after the quiet "
              f"period, resend recorded once, unknown AE refused, restart mid-study: stable once, "
              f"reopened by a late instance: stable again, study complete: stable at once, "
              f"DICOM TLS with a client certificate stored, without one refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A result's DICOM SR is written while its ORU and page go out; only the
SR's own delivery waits for the file. If the process ends after the commit
that kept the result and before the file is on disk, the restarted engine
writes the SR again from the kept result, with the SOP Instance UID the
result recorded, and delivers it.

With the bundled channels and real peers (the same as test_ai_workflow.py:
Orthanc as the PACS the reference AI reads from and the SR goes to, the
reference AI, python-hl7's MLLP server as the RIS, an HTTP receiver as the
pager):

1. the PACS destination points at a port nobody listens on, so the SR
   stays queued; an ORM and a head CT with a planted bleed: the ORU
   reaches the RIS and the page the pager, the SR is written in the
   channel's results folder and its delivery is retried;
2. kill -9; the SR file is removed (what a crash between the commit and
   the file leaves); the PACS destination now points at Orthanc;
3. the restarted engine logs event=sr_missing and event=sr_written_again,
   and Orthanc gets an SR for the study whose SOP Instance UID is the one
   recorded with the result (the AI_RESULT entry's sr_uid); DCMTK's dsrdump
   reads it; the RIS got no second ORU; the queue is empty.

Run: test_ai_sr_again.py --radrelay build/radrelay (exits 77 without the
peers test_ai_workflow.py needs)."""
import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
import orthanc  # noqa: E402
import test_ai_workflow as wf  # noqa: E402
from test_study_matching import Receiver, orm, send_hl7, store, wait_for  # noqa: E402


def pacs_port(tmp, port):
    wf.edit_imaging(tmp, lambda imaging: imaging["destinations"]["pacs"].update(
        {"port": port, "backoff_base_ms": 200, "backoff_max_ms": 500}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    why = wf.missing_peers()
    if why:
        print(f"SKIPPED: {why}")
        return wf.SKIP
    peers = os.path.join(wf.ROOT, "tests", "peers")
    pager = Receiver()
    wf.VERDICTS[0] = Receiver()
    api_port = wf.free_port()
    with tempfile.TemporaryDirectory(prefix="rr-sragain-") as tmp, \
            orthanc.Orthanc(os.path.join(tmp, "pacs"), auth=False) as pacs:
        wf.IMAGES_ROOT[0] = pacs.dicomweb_url
        wf.PACS[0] = pacs
        ris = wf.Peer(["/usr/bin/python3", os.path.join(peers, "ris_peer.py")])
        ai = wf.Peer(["/usr/bin/python3", os.path.join(peers, "reference_ai.py"),
                      "--mode", "sync"])
        e = wf.Engine(os.path.abspath(args.radrelay), tmp)
        try:
            # ---- 1. the SR cannot be delivered: the PACS port is closed
            wf.configure(tmp, ai.ready["url"].rstrip("/") + "/analyze", "active", "sync",
                         ris.ready["port"], pager.port, api_port)
            pacs_port(tmp, wf.free_port())
            e.start()
            acks = send_hl7(e.orders_port, [orm("RRSR-1", "NW", "RRACC-SR1", "RRPAT-SR1", "CT",
                                                "R", "HEADACHE", time.strftime("%Y%m%d") + "0800")])
            assert all("MSA|AA|" in (a.decode() if isinstance(a, bytes) else a) for a in acks)
            bleed = os.path.join(tmp, "bleed")
            uid = wf.make_study_bleed(bleed, 61, "RRACC-SR1", "RRPAT-SR1", True)
            wf.upload(pacs, bleed)
            store(e.dicom_port, bleed)
            wait_for(lambda: len(ris.messages("ORU")) == 1, 120, "the ORU at the RIS")
            wait_for(lambda: pager.for_study(uid), 30, "the page")
            results = os.path.join(tmp, "spool", "results")
            wait_for(lambda: glob.glob(os.path.join(results, "AJ-*.dcm")), 30,
                     "the SR file written")
            (sr_path,) = glob.glob(os.path.join(results, "AJ-*.dcm"))
            wait_for(lambda: e.sql("SELECT count(*) FROM deliveries d JOIN queue q"
                                   " ON q.id = d.queue_id WHERE q.destination = 'imaging.pacs'"
                                   " AND d.outcome <> 'delivered'")[0][0] >= 1, 30,
                     "a failed SR delivery (the PACS port is closed)")
            ((raw,),) = e.sql("SELECT raw FROM messages WHERE message_type = 'AI_RESULT'"
                              " AND study_uid = ?", uid)
            kept = json.loads(raw)
            assert kept["sr"] == os.path.realpath(sr_path) or kept["sr"] == sr_path, \
                (kept["sr"], sr_path)
            sr_uid = kept["sr_uid"]
            assert sr_uid.startswith("2.25."), sr_uid

            # ---- 2. the process ends before the file would have been on disk
            e.proc.send_signal(signal.SIGKILL)
            e.proc.wait(timeout=10)
            os.remove(sr_path)
            pacs_port(tmp, pacs.dicom_port)

            # ---- 3. written again with the recorded UID, and delivered
            e.start()
            wait_for(lambda: e.grep("event=sr_missing", "action=write_again"), 30,
                     "the missing SR noticed")
            wait_for(lambda: e.grep("event=sr_written_again"), 30, "the SR written again")

            def srs():
                r = pacs.request("POST", "/tools/find", body=json.dumps(
                    {"Level": "Instance", "Query": {"StudyInstanceUID": uid, "Modality": "SR"},
                     "Expand": True}).encode(), headers={"Content-Type": "application/json"})
                return r.json()
            wait_for(lambda: len(srs()) == 1, 60, "the SR in the PACS")
            (inst,) = srs()
            assert inst["MainDicomTags"]["SOPInstanceUID"] == sr_uid, inst["MainDicomTags"]
            r = pacs.request("GET", f"/instances/{inst['ID']}/file")
            sr_file = os.path.join(tmp, "sr.dcm")
            with open(sr_file, "wb") as f:
                f.write(r.body)
            dump = subprocess.run(["dsrdump", sr_file], capture_output=True, text=True)
            assert dump.returncode == 0 and "radrelay-reference-hemorrhage" in dump.stdout, dump
            wait_for(lambda: e.sql("SELECT count(*) FROM queue WHERE destination ="
                                   " 'imaging.pacs'")[0][0] == 0, 30, "the SR's row delivered")
            assert len(ris.messages("ORU")) == 1, "a second ORU"
            e.stop()
        except BaseException:
            with e.lock:
                sys.stderr.write("\n".join(e.all_lines[-60:]) + "\n")
            raise
        finally:
            proc = getattr(e, "proc", None)
            if proc and proc.poll() is None:
                proc.kill()
            ris.stop()
            ai.stop()
    print("ai sr again: SR written while the ORU and page went out; after kill -9 and the file "
          "removed, written again with the recorded SOP Instance UID and delivered to Orthanc")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""AI results by polling: the reference AI in async mode answers a request
with 202 and a status_url, and serves the result there once its analysis
is done (held back with --delay-ms); radrelay GETs the status_url every
poll_s until the result is there, then handles it like any other result
(the ORU reaches the RIS). With the engine killed (-9) while the job runs,
polling resumes after the restart from what the store says.

Peers: Orthanc (the PACS the AI fetches from), tests/peers/reference_ai.py
(not a medical device), python-hl7's RIS peer and client, DCMTK storescu.

Run: test_ai_poll.py --radrelay build/radrelay (exits 77 without Orthanc,
its DICOMweb plugin, pydicom, numpy, python3-hl7 or storescu)."""
import argparse
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
import orthanc  # noqa: E402
import test_ai_workflow as wf  # noqa: E402
from test_study_matching import Receiver, orm, send_hl7, store, wait_for  # noqa: E402

SKIP = 77


def set_poll(tmp, seconds):
    wf.edit_imaging(tmp, lambda imaging: imaging["destinations"]["hemorrhage"].update(
        {"poll_s": seconds}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    why = wf.missing_peers()
    if why:
        print(f"SKIPPED: {why}")
        return SKIP
    peers = os.path.join(ROOT, "tests", "peers")
    pager = Receiver()
    api_port = wf.free_port()
    with tempfile.TemporaryDirectory(prefix="rr-aipoll-") as tmp, \
            orthanc.Orthanc(os.path.join(tmp, "pacs"), auth=False) as pacs:
        wf.IMAGES_ROOT[0] = pacs.dicomweb_url
        wf.PACS[0] = pacs
        ris = wf.Peer(["/usr/bin/python3", os.path.join(peers, "ris_peer.py")])
        ai = wf.Peer(["/usr/bin/python3", os.path.join(peers, "reference_ai.py"), "--mode",
                      "async", "--delay-ms", "4000"])
        e = wf.Engine(os.path.abspath(args.radrelay), tmp)
        try:
            wf.configure(tmp, ai.ready["url"].rstrip("/") + "/analyze", "assistant", "sync",
                         ris.ready["port"], pager.port, api_port)
            set_poll(tmp, 1)
            e.start()
            today = time.strftime("%Y%m%d")
            send_hl7(e.orders_port, [orm("RRPL-1", "NW", "RRACC-PL1", "RRPAT-PL1", "CT", "R",
                                         "HEADACHE", today + "0800")])
            bleed = os.path.join(tmp, "bleed")
            uid = wf.make_study_bleed(bleed, 71, "RRACC-PL1", "RRPAT-PL1", True)
            wf.upload(pacs, bleed)
            store(e.dicom_port, bleed)
            # accepted (202 with a status_url): running, with the URL kept
            wait_for(lambda: e.sql("SELECT state FROM ai_jobs WHERE study_uid = ? AND status_url"
                                   " IS NOT NULL", uid) == [("running",)], 60,
                     "the job accepted with a status_url")
            # killed while the job runs; polling resumes from the store
            e.proc.send_signal(signal.SIGKILL)
            e.proc.wait(timeout=10)
            e.start()
            wait_for(lambda: ris.messages("ORU"), 60, "the ORU of the polled result")
            assert wf.oru_study(ris.messages("ORU")[0]["text"]) == uid
            (state, critical), = e.sql("SELECT state, critical FROM ai_jobs WHERE study_uid = ?",
                                       uid)
            assert state == "completed" and critical == 1, (state, critical)
            assert e.grep("event=result", "via=poll"), e.lines[-20:]
            # the endpoint saw the GETs: more than one (202 while it ran), then 200
            with urllib.request.urlopen(ai.ready["url"].rstrip("/") + "/stats") as r:
                st = json.load(r)
            gets = [r for r in st["requests"] if r["method"] == "GET"
                    and r["path"].startswith("/jobs/")]
            assert len(gets) >= 2 and gets[-1]["status"] == 200, gets
            assert any(g["status"] == 202 for g in gets), gets
            e.stop()
        except BaseException:
            sys.stderr.write("\n".join(l for l in e.all_lines[-60:]) + "\n")
            raise
        finally:
            if e.__dict__.get("proc") and e.proc.poll() is None:
                e.proc.kill()
            ai.stop()
            ris.stop()
        bad = [l for l in e.all_lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad, bad
    print(f"ai poll: 202 + status_url, kill -9 while running, polling resumed, result taken "
          f"({len(gets)} GETs), ORU at the RIS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

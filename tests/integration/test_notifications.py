#!/usr/bin/env python3
"""Critical-result notifications: their lifecycle with the bundled channels
and real peers (Orthanc as the PACS, the reference AI, python-hl7's RIS, an
HTTP receiver here as the pager gateway), with escalation timers shortened
to seconds in the test's copy of channels/imaging.json:

1. a head CT with a planted bleed comes back critical (ACR category 1):
   the gateway gets a page for the first person of the chain, with a
   notification id, the recipient, the attempt and an ack_url;
2. nobody acknowledges: the same person is paged again (repeat), then the
   next person in the chain (escalation);
3. kill -9 while the notification is open: after the restart the
   notification is still open and its next page comes;
4. the same finding again (a late series reopens the study, the AI runs
   again and finds the bleed again): no new page, a duplicate recorded;
5. acknowledgement: POST /api/notifications/{id}/ack without a token is
   401, with a viewer's 403, with an operator's 200 (who and when
   recorded); a second one 409; no page after it;
6. GET /api/notifications and /api/notifications/{id} (with its history),
   and the audit trail verifies and holds every step with its actor.

Run: test_notifications.py --radrelay build/radrelay (exits 77 without
Orthanc, its DICOMweb plugin, pydicom, numpy, python3-hl7 or storescu)."""
import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
import orthanc  # noqa: E402
import test_ai_workflow as wf  # noqa: E402
from test_study_matching import Receiver, orm, send_hl7, store, wait_for  # noqa: E402

SKIP = 77
OPERATOR = "rr-test-token-operator-notify-0001"
CHAIN = ["rrtest-neuro-on-call", "rrtest-neuro-attending", "rrtest-chief"] + [
    f"rrtest-backup-{i}" for i in range(1, 5)]
REPEAT_S, NEXT_S = 2, 5


def configure(tmp, ai_url, ris_port, pager_port, api_port):
    wf.configure(tmp, ai_url, "active", "sync", ris_port, pager_port, api_port)
    def change(imaging):
        imaging["source"]["late_series"] = "reopen"
        imaging["destinations"]["pager"]["escalation"] = {
            "chain": CHAIN, "categories": {"1": {"repeat_s": REPEAT_S, "next_s": NEXT_S}}}
    wf.edit_imaging(tmp, change)
    with open(os.path.join(tmp, "tokens"), "a") as f:
        f.write(f"operator pager-gateway {hashlib.sha256(OPERATOR.encode()).hexdigest()}\n")


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
    api = lambda *a, **k: wf.api(api_port, *a, **k)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="rr-notify-") as tmp, \
            orthanc.Orthanc(os.path.join(tmp, "pacs"), auth=False) as pacs:
        wf.IMAGES_ROOT[0] = pacs.dicomweb_url
        wf.PACS[0] = pacs
        ris = wf.Peer(["/usr/bin/python3", os.path.join(peers, "ris_peer.py")])
        ai = wf.Peer(["/usr/bin/python3", os.path.join(peers, "reference_ai.py"), "--mode",
                      "sync"])
        e = wf.Engine(os.path.abspath(args.radrelay), tmp)
        try:
            configure(tmp, ai.ready["url"].rstrip("/") + "/analyze", ris.ready["port"],
                      pager.port, api_port)
            e.start()
            today = time.strftime("%Y%m%d")
            send_hl7(e.orders_port, [orm("RRNT-1", "NW", "RRACC-NT1", "RRPAT-NT1", "CT", "R",
                                         "HEADACHE", today + "0800")])
            bleed = os.path.join(tmp, "bleed")
            uid = wf.make_study_bleed(bleed, 61, "RRACC-NT1", "RRPAT-NT1", True)
            wf.upload(pacs, bleed)
            store(e.dicom_port, bleed)

            # ---- 1. the first page
            wait_for(lambda: pager.bodies, 120, "the first page")
            first = pager.bodies[0]
            nid = first["notification_id"]
            assert nid.startswith("N-") and first["study_uid"] == uid, first
            assert first["recipient"] == CHAIN[0] and first["attempt"] == 1, first
            assert first["escalation_level"] == 0 and first["acr_category"] == 1, first
            assert first["ack_url"] == f"http://{wf.HOST}:{api_port}/api/notifications/{nid}/ack"
            st, n = api(f"/api/notifications/{nid}")
            assert st == 200 and n["state"] == "open" and n["pages"] == 1, n

            # ---- 2. repeat, then escalation to the next person
            wait_for(lambda: len(pager.bodies) >= 2, REPEAT_S + 10, "the repeated page")
            rep = pager.bodies[1]
            assert rep["notification_id"] == nid and rep["recipient"] == CHAIN[0], rep
            assert rep["attempt"] == 2, rep
            wait_for(lambda: any(b["recipient"] == CHAIN[1] for b in pager.bodies), NEXT_S + 10,
                     "the escalation")
            esc = [b for b in pager.bodies if b["recipient"] == CHAIN[1]][0]
            assert esc["escalation_level"] == 1 and esc["attempt"] == 1, esc
            # paced by the policy: repeats at +2 s and +4 s, the next person at +5 s
            times = [t - n["created_ms"] for (t,) in e.sql(
                "SELECT received_ms FROM messages WHERE message_type = 'NOTIFICATION'"
                " ORDER BY id")]
            expected = [REPEAT_S * 1000, 2 * REPEAT_S * 1000, NEXT_S * 1000]
            assert len(times) >= 3 and all(t >= x for t, x in zip(times, expected)), times

            # ---- 3. kill -9 while open: still open after the restart, paging goes on
            e.proc.send_signal(signal.SIGKILL)
            e.proc.wait(timeout=10)
            pages_before = len(pager.bodies)
            e.start()
            assert e.grep("event=notifications_loaded", "open=1"), e.lines[-20:]
            wait_for(lambda: len(pager.bodies) > pages_before, NEXT_S + 10,
                     "a page after the restart")
            after = pager.bodies[pages_before]
            assert after["notification_id"] == nid and after["recipient"] in CHAIN[1:], after
            st, lst = api("/api/notifications?state=open")
            assert st == 200 and [x["id"] for x in lst["notifications"]] == [nid], lst

            # ---- 4. the same finding again: a duplicate, no page
            late = os.path.join(tmp, "late")
            wf.make_study_bleed(late, 62, "RRACC-NT1", "RRPAT-NT1", True)
            from pydicom import dcmread  # only to put the late series into the same study
            names = sorted(os.listdir(late))
            for name in names[1:]:
                os.unlink(os.path.join(late, name))
            p = os.path.join(late, names[0])
            ds = dcmread(p)
            ds.StudyInstanceUID = uid
            ds.save_as(p)
            jobs_before = len(e.sql("SELECT 1 FROM ai_jobs WHERE study_uid = ?", uid))
            store(e.dicom_port, late)
            wait_for(lambda: len(e.sql("SELECT 1 FROM ai_jobs WHERE study_uid = ? AND state ="
                                       " 'completed'", uid)) > jobs_before, 120,
                     "the second AI result for the study")
            wait_for(lambda: e.grep("event=notification_duplicate", nid), 10,
                     "the duplicate recorded")
            assert len(e.sql("SELECT 1 FROM notifications")) == 1

            # ---- 5. acknowledgement
            st, n = api(f"/api/notifications/{nid}")
            assert st == 200 and n["state"] == "open", n
            st, _ = api(f"/api/notifications/{nid}/ack", token=None, method="POST")
            assert st == 401
            st, _ = api(f"/api/notifications/{nid}/ack", method="POST")  # the viewer's token
            assert st == 403
            st, _ = api("/api/notifications/N-0000000000000000/ack", token=OPERATOR,
                        method="POST")
            assert st == 404
            body = json.dumps({"by": "ZZTEST^READER^ONE", "note": "called the ED"})
            st, acked = api(f"/api/notifications/{nid}/ack", token=OPERATOR, method="POST",
                            body=body, headers={"Content-Type": "application/json"})
            assert st == 200 and acked["state"] == "acked", (st, acked)
            assert acked["ack"]["by"] == "ZZTEST^READER^ONE", acked
            assert acked["ack"]["via"] == "pager-gateway" and acked["next_ms"] == 0, acked
            assert acked["ack"]["at_ms"] >= acked["created_ms"], acked
            st, again = api(f"/api/notifications/{nid}/ack", token=OPERATOR, method="POST")
            assert st == 409 and "ZZTEST^READER^ONE" in again["message"], again
            pages = len(pager.bodies)
            # no page after the acknowledgement: one repeat period and a half passes quietly
            time.sleep(REPEAT_S * 1.5)  # an observation window, not a synchronization
            assert len(pager.bodies) == pages, pager.bodies[pages:]
            st, n = api(f"/api/notifications/{nid}")
            kinds = [ev["event"] for ev in n["events"]]
            assert kinds[0] == "notification" and kinds[-1] == "notification_ack", kinds
            for k in ("notification_repeat", "notification_escalated", "notification_duplicate"):
                assert k in kinds, kinds
            e.stop()
        except BaseException:
            sys.stderr.write("\n".join(l for l in e.all_lines[-60:]) + "\n")
            raise
        finally:
            if e.__dict__.get("proc") and e.proc.poll() is None:
                e.proc.kill()
            ai.stop()
            ris.stop()
        v = subprocess.run([e.radrelay, "audit", "verify", "-c", e.config], capture_output=True,
                           text=True)
        assert v.returncode == 0 and "chain intact" in v.stdout, (v.stdout, v.stderr)
        x = subprocess.run([e.radrelay, "audit", "export", "-c", e.config], capture_output=True,
                           text=True, check=True)
        recs = [json.loads(l) for l in x.stdout.splitlines() if l.strip()]
        ack = [r for r in recs if r["kind"] == "notification_ack"]
        assert len(ack) == 1 and ack[0]["actor"] == "ZZTEST^READER^ONE", ack
        assert ack[0]["data"]["via"] == "pager-gateway", ack
        leaks = [l for l in e.all_lines if "level=debug" not in l and
                 any(s in l for s in ("RRPAT-", "RRACC-", uid))]
        assert not leaks, leaks[:5]
        bad = [l for l in e.all_lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad, bad
    print(f"notifications: page -> repeat -> escalation ({len(pager.bodies)} pages), open across "
          "kill -9, duplicate finding not paged, ack 401/403/404/200/409, quiet after the ack, "
          "history and audit chain verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())

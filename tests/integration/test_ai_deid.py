#!/usr/bin/env python3
"""De-identification for an external AI endpoint, end to end, with the
bundled channels and real peers (as test_ai_workflow.py, whose helpers it
uses): the imaging channel's hemorrhage endpoint has "deidentify": true.

- the study goes to radrelay only (DCMTK's storescu), never to Orthanc,
  so the reference AI (tests/peers/reference_ai.py) can only have read it
  through radrelay's own WADO-RS routes;
- the request the AI got carries only pseudonyms: its Study and Series
  UIDs are the HMAC pseudonyms of the real ones (the secret is the engine's
  generated deid.secret), the accession a pseudonym, no patient name, ID
  or birth date, and images.wado_rs points at radrelay with the job's
  token;
- what radrelay serves there (fetched by the test with that token while
  the AI holds the job) has no patient name, ID, birth date, accession,
  institution or real UID, Patient Identity Removed YES, and the same
  pixel data as the files sent; another token gets 401, no token 401;
- a result naming a UID that is not one of the job's pseudonyms is
  refused (400, the job goes on);
- the bleed study still comes back critical; the ORU^R01 at the RIS and
  the SR in Orthanc carry the real Study Instance UID, the stored result
  names the real series and instance;
- the dispatch's audit record shows the pseudonymous request; the copies
  are removed once the job has ended and the images are then 404;
- with results by callback from an AI that fetches at once: the same
  token serves images and callback, the result comes back under the real
  UIDs;
- no identifier in the log above debug.

Run: test_ai_deid.py --radrelay build/radrelay (exits 77 without Orthanc,
its DICOMweb plugin, pydicom, numpy, python3-hl7 or storescu)."""
import argparse
import hashlib
import hmac
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
import orthanc  # noqa: E402
import test_ai_workflow as wf  # noqa: E402
from test_study_matching import Receiver, orm, send_hl7, store, wait_for  # noqa: E402

SKIP = 77
HOST = wf.HOST


def pseudo_uid(secret, uid):
    return "2.25.%d" % int.from_bytes(hmac.new(secret, uid.encode(), hashlib.sha256)
                                      .digest()[:16], "big")


def pseudo_text(secret, kind, value):
    return "RR" + hmac.new(secret, f"{kind}:{value}".encode(), hashlib.sha256).digest()[:7] \
        .hex().upper()


def get(url, token, accept='multipart/related; type="application/dicom"'):
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        h = {"Accept": accept}
        if token:
            h["Authorization"] = f"Bearer {token}"
        c.request("GET", u.path, headers=h)
        r = c.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        c.close()


def parts(body, ctype):
    sys.path.insert(0, os.path.join(ROOT, "tests", "peers"))
    import reference_ai
    return reference_ai.multipart_parts(body, ctype)


def configure(tmp, ai_url, ris_port, pager_port, api_port, result="sync"):
    wf.configure(tmp, ai_url, "active", result, ris_port, pager_port, api_port)
    wf.edit_imaging(tmp, lambda imaging: imaging["destinations"]["hemorrhage"].update(
        {"deidentify": True}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    why = wf.missing_peers()
    if why:
        print(f"SKIPPED: {why}")
        return SKIP
    import pydicom
    peers = os.path.join(ROOT, "tests", "peers")
    pager = Receiver()
    api_port = wf.free_port()
    with tempfile.TemporaryDirectory(prefix="rr-aideid-") as tmp, \
            orthanc.Orthanc(os.path.join(tmp, "pacs"), auth=False) as pacs:
        wf.IMAGES_ROOT[0] = pacs.dicomweb_url
        wf.PACS[0] = pacs
        ris = wf.Peer(["/usr/bin/python3", os.path.join(peers, "ris_peer.py")])
        # the AI holds each job 6 s before it fetches: the test looks meanwhile
        ai = wf.Peer(["/usr/bin/python3", os.path.join(peers, "reference_ai.py"), "--mode",
                      "sync", "--delay-ms", "6000"])
        e = wf.Engine(os.path.abspath(args.radrelay), tmp)
        public = f"http://{HOST}:{api_port}"
        try:
            configure(tmp, ai.ready["url"].rstrip("/") + "/analyze", ris.ready["port"],
                      pager.port, api_port)
            e.start()
            secret_file = os.path.join(tmp, "store", "deid.secret")
            assert os.stat(secret_file).st_mode & 0o777 == 0o600
            with open(secret_file, "rb") as f:
                secret = f.readline().strip()
            assert len(secret) == 64, secret
            today = time.strftime("%Y%m%d")
            acks = send_hl7(e.orders_port, [orm("RRDEID-1", "NW", "RRACC-DEID1", "RRPAT-DEID1",
                                                "CT", "R", "HEADACHE", today + "0800")])
            assert all("MSA|AA|" in (a.decode() if isinstance(a, bytes) else a) for a in acks)
            bleed = os.path.join(tmp, "bleed")
            uid = wf.make_study_bleed(bleed, 61, "RRACC-DEID1", "RRPAT-DEID1", True)
            sent = {}
            for n in sorted(os.listdir(bleed)):
                ds = pydicom.dcmread(os.path.join(bleed, n))
                sent[ds.SOPInstanceUID] = ds
            series_uid = next(iter(sent.values())).SeriesInstanceUID
            store(e.dicom_port, bleed)   # to radrelay only: Orthanc never has it

            # ---- the request, as sent (the AI's own record of it is compared below)
            wait_for(lambda: e.sql("SELECT request FROM ai_jobs WHERE request IS NOT NULL"), 60,
                     "the request sent")
            ((req_text,),) = e.sql("SELECT request FROM ai_jobs")
            req = json.loads(req_text)
            text = json.dumps(req)
            for needle in ("RRPAT-", "RRACC-", "ZZTEST", "19700101", uid, series_uid):
                assert needle not in text, (needle, text)
            st = req["study"]
            assert st["study_uid"] == pseudo_uid(secret, uid), st
            assert [s["series_uid"] for s in st["series"]] == [pseudo_uid(secret, series_uid)]
            assert st["accession"] == pseudo_text(secret, "accession", "RRACC-DEID1"), st
            assert st["description"] is None and st["study_date"] is None, st
            assert st["instances"] == len(sent) and st["body_part"] == "HEAD", st
            job = req["job_id"]
            wado = req["images"]["wado_rs"]
            assert wado == f"{public}/api/ai/jobs/{job}/dicomweb/studies/{st['study_uid']}", wado
            auth = req["images"]["auth"]
            assert auth["type"] == "bearer" and len(auth["token"]) >= 32, auth

            # ---- what radrelay serves the AI for it
            status, ctype, body = get(wado, auth["token"])
            assert status == 200, (status, body[:300])
            served = [pydicom.dcmread(io.BytesIO(d)) for _, d in parts(body, ctype)]
            assert len(served) == len(sent)
            needles = [b"RRPAT-", b"RRACC-", b"ZZTEST", b"RRTEST SYNTHETIC", uid.encode(),
                       series_uid.encode()] + [s.encode() for s in sent]
            for _, d in parts(body, ctype):
                for needle in needles:
                    assert needle not in d, needle
            by_pixels = {ds.PixelData: ds for ds in sent.values()}
            for ds in served:
                assert ds.PatientIdentityRemoved == "YES"
                assert ds.PatientName == "" and ds.PatientBirthDate == ""
                assert ds.PatientID == pseudo_text(secret, "patient_id", "RRPAT-DEID1")
                assert ds.AccessionNumber == st["accession"]
                assert ds.StudyInstanceUID == st["study_uid"]
                assert ds.SeriesInstanceUID == st["series"][0]["series_uid"]
                assert "InstitutionName" not in ds and "StudyDescription" not in ds
                orig = by_pixels[ds.PixelData]   # the pixels are the ones sent
                assert ds.SOPInstanceUID == pseudo_uid(secret, orig.SOPInstanceUID)
                assert ds.ImagePositionPatient == orig.ImagePositionPatient
                assert ds.PixelSpacing == orig.PixelSpacing
            one = served[0]
            status, ctype, body = get(f"{wado}/series/{one.SeriesInstanceUID}/instances/"
                                      f"{one.SOPInstanceUID}", auth["token"])
            assert status == 200 and len(parts(body, ctype)) == 1, status
            status, _, _ = get(f"{wado}/series/{one.SeriesInstanceUID}", auth["token"])
            assert status == 200
            assert get(wado, "not-the-token")[0] == 401
            assert get(wado, None)[0] == 401
            assert get(f"{public}/api/ai/jobs/{job}/dicomweb/studies/{uid}",
                       auth["token"])[0] == 404   # the real UID is not served
            assert get(wado, auth["token"], accept="application/json")[0] == 406

            # ---- a result naming a UID the job never sent: a contract error
            bogus = {"schema": "radrelay.ai-result/1", "job_id": job, "status": "completed",
                     "completed": "2026-01-01T00:00:00Z",
                     "model": {"name": "x", "version": "1", "manufacturer": "test",
                               "device_uid": "2.25.1"},
                     "findings": [{"id": "F1", "code": {"system": "SCT", "code": "1386000",
                                                        "meaning": "Intracranial hemorrhage"},
                                   "label": "x", "critical": True, "confidence": 0.9,
                                   "location": {"series_uid": one.SeriesInstanceUID,
                                                "instance_uid": next(iter(sent))}}]}
            status, r = wf.api(api_port, f"/api/ai/jobs/{job}/result", token=auth["token"],
                               method="POST", body=json.dumps(bogus),
                               headers={"Content-Type": "application/json"})
            assert status == 400 and "instance_uid" in r["message"], (status, r)

            # ---- the result: critical, back under the real UIDs
            wait_for(lambda: len(ris.messages("ORU")) == 1, 120, "the ORU at the RIS")
            oru = ris.messages("ORU")[0]["text"]
            assert wf.oru_study(oru) == uid, oru
            obx = [s.split("|") for s in oru.split("\r") if s.startswith("OBX|")]
            assert any(o[8] == "AA" for o in obx), obx
            st_, jb = wf.api(api_port, f"/api/ai/jobs/{job}")
            assert st_ == 200 and jb["state"] == "completed" and jb["critical"] == 1, jb
            assert jb["study_uid"] == uid
            loc = jb["result"]["findings"][0]["location"]
            assert loc["series_uid"] == series_uid and loc["instance_uid"] in sent, loc
            assert loc["frame_of_reference_uid"] == orig.FrameOfReferenceUID, loc

            def srs():
                r = pacs.request("POST", "/tools/find", body=json.dumps(
                    {"Level": "Instance", "Query": {"StudyInstanceUID": uid, "Modality": "SR"}})
                    .encode(), headers={"Content-Type": "application/json"})
                return r.json()
            wait_for(lambda: len(srs()) == 1, 60, "the SR in the PACS, in the real study")
            assert e.grep("event=deid_served", f"job={job}")
            got = [r["body"] for r in ai_stats(ai)["requests"] if r["path"] == "/analyze"]
            assert got == [req], got   # the AI got exactly that

            # ---- the copies go once the job has ended
            spool = os.path.join(tmp, "channels", "spool", "deid", job)
            wait_for(lambda: not os.path.exists(spool), 30, "the de-identified copies removed")
            assert get(wado, auth["token"])[0] == 404
            e.stop()

            # ---- results by callback, from an AI that fetches at once
            ai.stop()
            ai = wf.Peer(["/usr/bin/python3", os.path.join(peers, "reference_ai.py"), "--mode",
                          "callback"])
            configure(tmp, ai.ready["url"].rstrip("/") + "/analyze", ris.ready["port"],
                      pager.port, api_port, result="callback")
            e.start()
            send_hl7(e.orders_port, [orm("RRDEID-2", "NW", "RRACC-DEID2", "RRPAT-DEID2", "CT",
                                         "R", "FALL", today + "0800")])
            cbdir = os.path.join(tmp, "cb")
            uid2 = wf.make_study_bleed(cbdir, 62, "RRACC-DEID2", "RRPAT-DEID2", True)
            store(e.dicom_port, cbdir)
            wait_for(lambda: len(ris.messages("ORU")) == 2, 120, "the ORU of a callback result")
            assert e.grep("event=result", "via=callback", "critical=yes")
            assert wf.oru_study(ris.messages("ORU")[1]["text"]) == uid2
            ((job2, req2),) = e.sql("SELECT job_id, request FROM ai_jobs WHERE study_uid = ?", uid2)
            req2 = json.loads(req2)
            assert req2["study"]["study_uid"] == pseudo_uid(secret, uid2)
            assert req2["callback"]["token"] == req2["images"]["auth"]["token"]
            st_, jb = wf.api(api_port, f"/api/ai/jobs/{job2}")
            assert jb["state"] == "completed", jb
            sops2 = {pydicom.dcmread(os.path.join(cbdir, n)).SOPInstanceUID
                     for n in os.listdir(cbdir)}
            assert jb["result"]["findings"][0]["location"]["instance_uid"] in sops2, jb
            e.stop()
        except BaseException:
            sys.stderr.write("\n".join(l for l in e.all_lines[-60:]) + "\n")
            raise
        finally:
            if e.__dict__.get("proc") and e.proc.poll() is None:
                e.proc.kill()
            ai.stop()
            ris.stop()
        x = subprocess.run([e.radrelay, "audit", "export", "-c", e.config], capture_output=True,
                           text=True, check=True)
        recs = [json.loads(l) for l in x.stdout.splitlines() if l.strip()]
        disp = [r for r in recs if r["kind"] == "dispatch"][0]
        assert disp["data"]["deidentified"] is True
        assert disp["data"]["request"]["study"]["study_uid"] == pseudo_uid(secret, uid)
        assert "RRPAT-" not in json.dumps(disp["data"]) and "RRACC-" not in json.dumps(disp["data"])
        leaks = [l for l in e.all_lines if "level=debug" not in l and
                 any(s in l for s in ("RRPAT-", "RRACC-", "ZZTEST", uid, series_uid))]
        assert not leaks, leaks[:5]
        bad = [l for l in e.all_lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad, bad
    print("ai deid: request with pseudonyms only, images from radrelay de-identified (token "
          "checked), unknown pseudonym refused, bleed critical, ORU and SR under the real "
          "Study UID, copies removed, audit shows what was sent")
    return 0


def ai_stats(ai):
    c = http.client.HTTPConnection(HOST, ai.ready["port"], timeout=10)
    try:
        c.request("GET", "/stats")
        return json.loads(c.getresponse().read())
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())

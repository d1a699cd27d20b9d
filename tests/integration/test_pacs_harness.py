#!/usr/bin/python3
"""The imaging test harness: synthetic CT studies (scripts/make-study) in a
private Orthanc (tests/integration/peers/orthanc.py), over DICOM and DICOMweb.

    /usr/bin/python3 tests/integration/test_pacs_harness.py \
        [--make-study scripts/make-study] [unittest args...]

One Orthanc for the whole run (its own folder, ephemeral HTTP and DICOM
ports, basic auth, the DICOMweb plugin), two generated studies of the
default shape (24 slices of 512 x 512): one with a planted bleed, one
without. Cases:

  1 the generated files are valid DICOM (dcmdump, pydicom), consistent
    (UIDs, positions, instance numbers), deterministic for a seed, and hold
    the tissues they claim (the bleed's voxels, ~70 HU, where the manifest
    says; none without --bleed)
  2 access control: C-ECHO from the test AE; an unknown calling AE and a
    wrong called AE are rejected; HTTP without credentials gets 401
  3 C-STORE of both studies with storescu (folder mode, timed and printed),
    then found with the REST API and with QIDO-RS at study, series and
    instance level with the right number of instances
  4 WADO-RS of one instance (multipart/related) gives back the same SOP
    Instance UID and pixel bytes; its metadata names the pixel bulk data
  5 STOW-RS of one more instance into a stored study; an instance of another
    study posted to that study's URL is refused (409, FailedSOPSequence)

DCMTK tools run with TCP_NODELAY=1 like Orthanc (Debian's DCMTK leaves
Nagle's algorithm on otherwise); case 3 also times the second study with
Nagle left on on the storescu side, for comparison. Synchronisation is by
condition with a deadline, never a fixed sleep.

Needs Orthanc + orthanc-dicomweb, python3-pydicom (this runs on
/usr/bin/python3) and DCMTK's storescu, echoscu and dcmdump; when one is
missing it prints why and exits 77 (ctest: skipped). Ends with
"N passed, M failed"; exit status 0 when everything passed, 1 otherwise,
2 on a usage error.
"""
import argparse
import array
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peers"))
import orthanc  # noqa: E402  (tests/integration/peers/orthanc.py)

try:
    import pydicom
except ImportError:
    pydicom = None

MAKE_STUDY = None  # set from the command line
SKIPPED = 77
HU_OFFSET = 1024          # make-study: stored value = HU + 1024
BLEED_WINDOW = (55, 90)   # HU; only the bleed lies in it (brain is ~30-38, noise sigma 4)
DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
IO_TIMEOUT = 120


def run(args, env=None, timeout=IO_TIMEOUT):
    return subprocess.run(args, capture_output=True, env=env, timeout=timeout)


def make_study(out, *extra):
    """Runs make-study; returns its manifest (the JSON it prints)."""
    r = run([MAKE_STUDY, "--out", out] + list(extra))
    if r.returncode != 0:
        raise AssertionError(f"make-study {extra} failed ({r.returncode}): {r.stderr.decode()}")
    return json.loads(r.stdout)


def dicom_bytes(ds):
    """A pydicom dataset as DICOM file bytes (pydicom 2 and 3)."""
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def value(item, tag):
    """The first value of tag in a DICOM JSON object, or None."""
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


def hu_counts(pixel_bytes, lo, hi):
    """How many 16-bit little-endian stored values are within [lo, hi] HU."""
    a = array.array("H")
    a.frombytes(pixel_bytes)
    if sys.byteorder == "big":
        a.byteswap()
    lo, hi = lo + HU_OFFSET, hi + HU_OFFSET
    return sum(1 for v in a if lo <= v <= hi)


class PacsHarnessTest(unittest.TestCase):
    pacs = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="rr-pacs-")
        cls.bleed = make_study(os.path.join(cls.tmp.name, "bleed"), "--bleed",
                               "--accession", "RRTEST-ACC-0101",
                               "--patient-id", "RRTEST-PAT-0101", "--seed", "101")
        cls.clean = make_study(os.path.join(cls.tmp.name, "clean"), "--no-bleed",
                               "--accession", "RRTEST-ACC-0102",
                               "--patient-id", "RRTEST-PAT-0102", "--seed", "102")
        cls.stored = {}
        cls.pacs = orthanc.Orthanc(os.path.join(cls.tmp.name, "orthanc"))
        try:
            cls.pacs.start()
        except orthanc.OrthancError:
            cls.tmp.cleanup()
            raise
        print(f"orthanc: http={cls.pacs.http_url} dicom={cls.pacs.dicom_port} "
              f"aet={cls.pacs.aet} plugin={cls.pacs.plugin}", flush=True)

    @classmethod
    def tearDownClass(cls):
        rc = cls.pacs.stop()
        log = cls.pacs.log_tail(200)
        cls.tmp.cleanup()
        if rc != 0:
            raise AssertionError(f"Orthanc exited with {rc} after SIGTERM:\n{log}")

    # -- helpers --
    def storescu(self, folder, tcp_nodelay=True, calling=orthanc.TEST_AET):
        """C-STORE every file of folder (storescu folder mode); returns
        (seconds, completed process)."""
        args = ["storescu", "-aet", calling, "-aec", self.pacs.aet,
                "-xe",          # explicit VR little endian first, all uncompressed
                "-R",           # only the SOP classes of the files
                "+sd",          # folder mode
                "-to", "30", "-ta", "30", "-td", "60",
                orthanc.HOST, str(self.pacs.dicom_port), folder]
        t0 = time.monotonic()
        r = run(args, env=orthanc.dcmtk_env(tcp_nodelay))
        return time.monotonic() - t0, r

    def ensure_stored(self, study, tcp_nodelay=True):
        """Stores study once per run (case 3 does, or whichever case comes
        first); returns storescu's seconds."""
        key = study["study_instance_uid"]
        if key not in self.stored:
            secs, r = self.storescu(study["out"], tcp_nodelay)
            self.assertEqual(r.returncode, 0, f"storescu: {r.stderr.decode()}\n"
                             f"{self.pacs.log_tail()}")
            self.stored[key] = secs
        return self.stored[key]

    def qido(self, path):
        r = self.pacs.request("GET", path, headers={"Accept": DICOM_JSON})
        self.assertEqual(r.status, 200, f"GET {path}: {r!r}")
        self.assertEqual(r.headers.get("Content-Type", "").split(";")[0], DICOM_JSON)
        return r.json()

    def orthanc_study(self, accession):
        """Orthanc's id of the one study with this accession number."""
        ids = self.pacs.post_json("/tools/find", {"Level": "Study",
                                                  "Query": {"AccessionNumber": accession}})
        self.assertEqual(len(ids), 1, f"studies with accession {accession}: {ids}")
        return ids[0]

    # ---- 1 ------------------------------------------------------------------
    def test_1_generated_study_is_valid(self):
        """dcmdump reads every file without a complaint; the attributes hang
        together; the same arguments give the same bytes; the bleed is where
        the manifest says, and absent from the clean study."""
        for m in (self.bleed, self.clean):
            paths = [os.path.join(m["out"], f) for f in m["files"]]
            self.assertEqual(len(paths), 24)
            r = run(["dcmdump", "-E", "-q"] + paths)
            self.assertEqual(r.returncode, 0, r.stderr.decode())
            self.assertEqual(r.stderr, b"")
            dump = run(["dcmdump", "-E", paths[0]]).stdout.decode()
            self.assertIn("=CTImageStorage", dump)
            self.assertIn("=LittleEndianExplicit", dump)
            self.assertIn("[ZZTEST^HEAD]", dump)
            previous_z = None
            sops = []
            for n, path in enumerate(paths, 1):
                ds = pydicom.dcmread(path)
                self.assertEqual(ds.file_meta.TransferSyntaxUID, "1.2.840.10008.1.2.1")
                self.assertEqual(ds.SOPClassUID, "1.2.840.10008.5.1.4.1.1.2")
                self.assertEqual(ds.file_meta.MediaStorageSOPInstanceUID, ds.SOPInstanceUID)
                self.assertEqual(ds.StudyInstanceUID, m["study_instance_uid"])
                self.assertEqual(ds.SeriesInstanceUID, m["series_instance_uid"])
                self.assertEqual(ds.FrameOfReferenceUID, m["frame_of_reference_uid"])
                self.assertTrue(ds.StudyInstanceUID.startswith("2.25."))
                self.assertEqual(ds.AccessionNumber, m["accession_number"])
                self.assertEqual(ds.PatientID, m["patient_id"])
                self.assertEqual(str(ds.PatientName), "ZZTEST^HEAD")
                self.assertEqual((ds.Modality, ds.BodyPartExamined, ds.StudyDescription),
                                 ("CT", "HEAD", "CT HEAD WO CONTRAST"))
                self.assertEqual(ds.InstanceNumber, n)
                self.assertEqual((ds.Rows, ds.Columns, ds.BitsAllocated), (512, 512, 16))
                self.assertEqual((float(ds.RescaleSlope), float(ds.RescaleIntercept)),
                                 (1.0, -1024.0))
                self.assertEqual(len(ds.PixelData), 512 * 512 * 2)
                z = float(ds.ImagePositionPatient[2])
                if previous_z is not None:
                    self.assertAlmostEqual(z - previous_z, float(ds.SliceThickness))
                previous_z = z
                sops.append(ds.SOPInstanceUID)
            self.assertEqual(sops, m["sop_instance_uids"])
            self.assertEqual(len(set(sops)), 24)
        self.assertNotEqual(self.bleed["study_instance_uid"], self.clean["study_instance_uid"])

        # the tissues: centre of the middle slice is white matter (~30 HU),
        # the centre row crosses the skull (~1000 HU)
        mid = pydicom.dcmread(os.path.join(self.clean["out"], self.clean["files"][11]))
        px = array.array("H")
        px.frombytes(mid.PixelData)
        block = [px[r * 512 + c] - HU_OFFSET for r in range(251, 261) for c in range(251, 261)]
        self.assertTrue(25 <= sum(block) / len(block) <= 35, f"centre {sum(block) / 100}")
        self.assertGreater(max(px[256 * 512:257 * 512]) - HU_OFFSET, 800)

        # the bleed: voxels in the bleed window only on the manifest's slices
        truth = self.bleed["bleed"]
        self.assertIsNotNone(truth)
        self.assertIsNone(self.clean["bleed"])
        self.assertGreater(truth["voxels"], 1000)
        found, where = 0, []
        for n, f in enumerate(self.bleed["files"], 1):
            k = hu_counts(pydicom.dcmread(os.path.join(self.bleed["out"], f)).PixelData,
                          *BLEED_WINDOW)
            found += k
            if k > 50:
                where.append(n)
        self.assertEqual(where, truth["instances"])
        self.assertLess(abs(found - truth["voxels"]), 0.02 * truth["voxels"],
                        f"{found} voxels in {BLEED_WINDOW} HU, manifest says {truth['voxels']}")
        stray = sum(hu_counts(pydicom.dcmread(os.path.join(self.clean["out"], f)).PixelData,
                              *BLEED_WINDOW) for f in self.clean["files"])
        self.assertLess(stray, 0.01 * truth["voxels"], "bleed-like voxels without --bleed")

        # deterministic: the same arguments again give the same bytes
        again = make_study(os.path.join(self.tmp.name, "bleed-again"), "--bleed",
                           "--accession", "RRTEST-ACC-0101",
                           "--patient-id", "RRTEST-PAT-0101", "--seed", "101")
        self.assertEqual(again["sop_instance_uids"], self.bleed["sop_instance_uids"])
        for f in self.bleed["files"]:
            with open(os.path.join(self.bleed["out"], f), "rb") as a, \
                    open(os.path.join(again["out"], f), "rb") as b:
                self.assertEqual(a.read(), b.read(), f)

    # ---- 2 ------------------------------------------------------------------
    def test_2_access_control(self):
        """C-ECHO from RRTEST works; an unknown calling AE and a wrong called
        AE are rejected; HTTP needs the credentials."""
        def echo(calling, called):
            return run(["echoscu", "-aet", calling, "-aec", called, "-to", "10",
                        orthanc.HOST, str(self.pacs.dicom_port)], env=orthanc.dcmtk_env())
        r = echo(orthanc.TEST_AET, self.pacs.aet)
        self.assertEqual(r.returncode, 0, r.stderr.decode())
        r = echo("RRINTRUDER", self.pacs.aet)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"Calling AE Title Not Recognized", r.stderr)
        r = echo(orthanc.TEST_AET, "NOTORTHANC")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"Called AE Title Not Recognized", r.stderr)
        self.assertEqual(self.pacs.request("GET", "/system", auth=False).status, 401)
        self.assertEqual(self.pacs.request("GET", "/dicom-web/studies", auth=False,
                                           headers={"Accept": DICOM_JSON}).status, 401)
        system = self.pacs.get_json("/system")
        self.assertEqual((system["DicomAet"], system["DicomPort"], system["HttpPort"]),
                         (self.pacs.aet, self.pacs.dicom_port, self.pacs.http_port))
        plugins = self.pacs.get_json("/plugins")
        self.assertIn("dicom-web", plugins)

    # ---- 3 ------------------------------------------------------------------
    def test_3_store_and_find(self):
        """storescu stores both studies; the REST API and QIDO-RS find each
        by its accession number with its 24 instances."""
        size = sum(os.path.getsize(os.path.join(self.bleed["out"], f))
                   for f in self.bleed["files"])
        secs = self.ensure_stored(self.bleed)
        print(f"storescu: {len(self.bleed['files'])} instances, {size / 1e6:.1f} MB, "
              f"{secs:.3f}s (TCP_NODELAY=1 on both sides)", flush=True)
        secs = self.ensure_stored(self.clean, tcp_nodelay=False)
        print(f"storescu: {len(self.clean['files'])} instances, {size / 1e6:.1f} MB, "
              f"{secs:.3f}s (Nagle left on in storescu, TCP_NODELAY=1 in Orthanc)", flush=True)

        for m in (self.bleed, self.clean):
            study_uid, series_uid = m["study_instance_uid"], m["series_instance_uid"]
            # REST API
            oid = self.orthanc_study(m["accession_number"])
            study = self.pacs.get_json(f"/studies/{oid}")
            self.assertEqual(study["MainDicomTags"]["StudyInstanceUID"], study_uid)
            self.assertEqual(study["PatientMainDicomTags"]["PatientID"], m["patient_id"])
            self.assertEqual(len(study["Series"]), 1)
            instances = self.pacs.get_json(f"/studies/{oid}/instances")
            self.assertEqual(sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances),
                             sorted(m["sop_instance_uids"]))
            # QIDO-RS
            found = self.qido(f"/dicom-web/studies?AccessionNumber={m['accession_number']}")
            self.assertEqual(len(found), 1, found)
            s = found[0]
            self.assertEqual(value(s, "0020000D"), study_uid)
            self.assertEqual(value(s, "00080050"), m["accession_number"])
            self.assertEqual(value(s, "00100020"), m["patient_id"])
            self.assertEqual(value(s, "00201208"), 24)            # NumberOfStudyRelatedInstances
            self.assertIn("CT", s["00080061"]["Value"])           # ModalitiesInStudy
            self.assertTrue(value(s, "00081190").startswith(self.pacs.dicomweb_url + "/studies/"),
                            value(s, "00081190"))                 # RetrieveURL
            series = self.qido(f"/dicom-web/studies/{study_uid}/series")
            self.assertEqual([value(x, "0020000E") for x in series], [series_uid])
            self.assertEqual(value(series[0], "00201209"), 24)    # NumberOfSeriesRelatedInstances
            inst = self.qido(f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances")
            self.assertEqual(sorted(value(x, "00080018") for x in inst),
                             sorted(m["sop_instance_uids"]))
        self.assertEqual(self.qido("/dicom-web/studies?AccessionNumber=RRTEST-NO-SUCH"), [])
        self.assertEqual(len(self.qido("/dicom-web/studies?PatientID=RRTEST-PAT-01*")), 2)

    # ---- 4 ------------------------------------------------------------------
    def test_4_wado_rs_instance(self):
        """WADO-RS gives one application/dicom part with the same SOP
        Instance UID and pixel bytes as the file sent."""
        self.ensure_stored(self.bleed)
        m = self.bleed
        n = m["bleed"]["instances"][0]
        sop = m["sop_instance_uids"][n - 1]
        path = (f"/dicom-web/studies/{m['study_instance_uid']}/series/"
                f"{m['series_instance_uid']}/instances/{sop}")
        r = self.pacs.request("GET", path, headers={"Accept": MULTIPART_DICOM})
        self.assertEqual(r.status, 200, repr(r))
        ctype = r.headers.get("Content-Type", "")
        mtype, params = orthanc.content_type_params(ctype)
        self.assertEqual((mtype, params.get("type")), ("multipart/related", "application/dicom"))
        parts = orthanc.multipart_decode(r.body, ctype)
        self.assertEqual(len(parts), 1)
        headers, data = parts[0]
        self.assertEqual(headers.get("content-type"), "application/dicom")
        got = pydicom.dcmread(io.BytesIO(data))
        sent = pydicom.dcmread(os.path.join(m["out"], m["files"][n - 1]))
        self.assertEqual(got.SOPInstanceUID, sop)
        self.assertEqual(got.StudyInstanceUID, m["study_instance_uid"])
        self.assertEqual(got.PixelData, sent.PixelData)
        self.assertGreater(hu_counts(got.PixelData, *BLEED_WINDOW), 50)

        meta = self.qido(path + "/metadata")
        self.assertEqual(len(meta), 1)
        self.assertEqual(value(meta[0], "00080018"), sop)
        self.assertIn("/bulk/7fe00010", meta[0]["7FE00010"]["BulkDataURI"])

        r = self.pacs.request("GET", path[:path.rindex("/") + 1] + "2.25.1",
                              headers={"Accept": MULTIPART_DICOM})
        self.assertEqual(r.status, 404, repr(r))

    # ---- 5 ------------------------------------------------------------------
    def test_5_stow_rs(self):
        """STOW-RS adds a 25th slice to the clean study; an instance of
        another study posted to that study's URL is refused."""
        self.ensure_stored(self.clean)
        m = self.clean
        ds = pydicom.dcmread(os.path.join(m["out"], m["files"][-1]))
        sop = f"2.25.{uuid.uuid4().int}"
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = 25
        z = float(ds.ImagePositionPatient[2]) + float(ds.SliceThickness)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                   f"{z:g}"]
        ds.SliceLocation = f"{z:g}"
        body, ctype = orthanc.multipart_encode([dicom_bytes(ds)])
        r = self.pacs.request("POST", f"/dicom-web/studies/{m['study_instance_uid']}",
                              body=body, headers={"Content-Type": ctype, "Accept": DICOM_JSON})
        self.assertEqual(r.status, 200, repr(r))
        answer = r.json()
        self.assertNotIn("Value", answer.get("00081198", {}), answer)   # FailedSOPSequence
        refs = answer["00081199"]["Value"]                              # ReferencedSOPSequence
        self.assertEqual([value(x, "00081155") for x in refs], [sop])
        found = self.qido(f"/dicom-web/studies?AccessionNumber={m['accession_number']}")
        self.assertEqual(value(found[0], "00201208"), 25)
        inst = self.qido(f"/dicom-web/studies/{m['study_instance_uid']}/series/"
                         f"{m['series_instance_uid']}/instances?InstanceNumber=25")
        self.assertEqual([value(x, "00080018") for x in inst], [sop])

        # an instance of the bleed study, posted to the clean study's URL
        other = pydicom.dcmread(os.path.join(self.bleed["out"], self.bleed["files"][0]))
        other_sop = f"2.25.{uuid.uuid4().int}"
        other.SOPInstanceUID = other_sop
        other.file_meta.MediaStorageSOPInstanceUID = other_sop
        body, ctype = orthanc.multipart_encode([dicom_bytes(other)])
        r = self.pacs.request("POST", f"/dicom-web/studies/{m['study_instance_uid']}",
                              body=body, headers={"Content-Type": ctype, "Accept": DICOM_JSON})
        self.assertEqual(r.status, 409, repr(r))
        failed = r.json()["00081198"]["Value"]
        self.assertEqual([value(x, "00081155") for x in failed], [other_sop])
        self.assertEqual(self.qido(f"/dicom-web/studies?SOPInstanceUID={other_sop}"), [])


def missing_tools():
    """Why this cannot run here, or None."""
    why = []
    if orthanc.missing():
        why.append(orthanc.missing())
    if pydicom is None:
        why.append(f"pydicom not importable by {sys.executable} (Debian package "
                   "python3-pydicom; run with /usr/bin/python3)")
    for tool in ("storescu", "echoscu", "dcmdump"):
        if not shutil.which(tool):
            why.append(f"{tool} not found (Debian package dcmtk)")
    return "; ".join(why) or None


def main():
    global MAKE_STUDY
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-study", default=os.path.join(HERE, "..", "..", "scripts",
                                                         "make-study"))
    args, rest = ap.parse_known_args()
    if not os.access(args.make_study, os.X_OK):
        print(f"make-study not found: --make-study PATH (got {args.make_study!r})",
              file=sys.stderr)
        return 2
    MAKE_STUDY = os.path.abspath(args.make_study)
    why = missing_tools()
    if why:
        print(f"SKIPPED: {why}; scripts/setup installs what is missing", flush=True)
        return SKIPPED
    t0 = time.monotonic()
    prog = unittest.main(module=__name__, argv=[sys.argv[0], "-v"] + rest, exit=False)
    r = prog.result
    bad = {getattr(t, "test_case", t).id() for t, _ in r.failures + r.errors}
    bad |= {t.id() for t in r.unexpectedSuccesses}
    skipped = {t.id() for t, _ in r.skipped} - bad
    passed = r.testsRun - len(bad) - len(skipped)
    print(f"took {time.monotonic() - t0:.1f}s", flush=True)
    print(f"{passed} passed, {len(bad)} failed", flush=True)
    return 0 if not bad and r.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Fixtures and checks for the de-identifier's unit test (test_dicom_deid.c).

    deid_fixture.py make MAKE_STUDY DIR
        writes a synthetic CT study (scripts/make-study, 4 slices) into DIR
        with synthetic identifying data added to every instance: every name,
        address, ID, date, description and comment attribute the profile
        covers, nested sequences, private elements (also inside an item),
        an overlay; plus DIR/burned.dcm (Burned In Annotation YES) and
        DIR/sc.dcm (Secondary Capture: a SOP class the profile does not
        cover). Every planted value holds "RRPHI" (or is a UID/date below).
        Prints {"study_uid", "series_uid", "accession", "patient_id"}.

    deid_fixture.py check SECRET IN_DIR OUT_DIR
        reads every de-identified file in OUT_DIR (same name as its source
        in IN_DIR) with pydicom and checks it; exits 1 with one line per
        problem.
"""
import hashlib
import hmac
import json
import os
import subprocess
import sys

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

ACCESSION = "RRPHI-ACC-1"
BIRTH = "19610203"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def plant(ds, other_uid):
    ds.PatientName = "RRPHI^PATIENT^NAME"
    ds.PatientBirthDate = BIRTH
    ds.PatientBirthTime = "101112"
    ds.PatientSex = "F"
    ds.PatientAge = "093Y"
    ds.PatientWeight = "71.5"
    ds.PatientSize = "1.62"
    ds.OtherPatientIDs = "RRPHI-OTHER-ID"
    ds.OtherPatientNames = "RRPHI^OTHER"
    ds.PatientAddress = "1 RRPHI Street"
    ds.PatientTelephoneNumbers = "RRPHI-555-0100"
    ds.PatientMotherBirthName = "RRPHI^MOTHER"
    ds.MedicalRecordLocator = "RRPHI-MRL"
    ds.EthnicGroup = "RRPHI"
    ds.Occupation = "RRPHI occupation"
    ds.AdditionalPatientHistory = "RRPHI history"
    ds.PatientComments = "RRPHI comments"
    ds.IssuerOfPatientID = "RRPHI-ISSUER"
    op = Dataset()
    op.PatientID = "RRPHI-OTHER-SEQ-ID"
    op.IssuerOfPatientID = "RRPHI-OTHER-ISSUER"
    ds.OtherPatientIDsSequence = Sequence([op])
    ds.InstitutionName = "RRPHI Hospital"
    ds.InstitutionAddress = "2 RRPHI Avenue"
    ds.InstitutionalDepartmentName = "RRPHI Radiology"
    ds.ReferringPhysicianName = "RRPHI^REFERRER"
    ds.ReferringPhysicianTelephoneNumbers = "RRPHI-555-0101"
    ds.PerformingPhysicianName = "RRPHI^PERFORMER"
    ds.NameOfPhysiciansReadingStudy = "RRPHI^READER"
    ds.PhysiciansOfRecord = "RRPHI^RECORD"
    ds.OperatorsName = "RRPHI^OPERATOR"
    ds.RequestingPhysician = "RRPHI^REQUESTER"
    ds.StationName = "RRPHI-STATION"
    ds.DeviceSerialNumber = "RRPHI-SERIAL"
    ds.DetectorID = "RRPHI-DETECTOR"
    ds.GantryID = "RRPHI-GANTRY"
    ds.StudyID = "RRPHI-SID"
    ds.StudyDescription = "RRPHI study description"
    ds.SeriesDescription = "RRPHI series description"
    ds.ProtocolName = "RRPHI protocol"
    ds.ImageComments = "RRPHI image comments"
    ds.StudyComments = "RRPHI study comments"
    ds.DerivationDescription = "RRPHI derivation"
    ds.RequestedProcedureDescription = "RRPHI requested procedure"
    ds.PerformedProcedureStepDescription = "RRPHI pps"
    ds.PerformedProcedureStepID = "RRPHI-PPSID"
    ds.PerformedStationName = "RRPHI-PSTATION"
    ds.PerformedLocation = "RRPHI location"
    ds.ReasonForStudy = "RRPHI reason"
    ds.AdmissionID = "RRPHI-ADM"
    ds.AccessionNumber = ACCESSION
    ds.InstanceCreationDate = "20240316"
    ds.InstanceCreationTime = "090000"
    ds.AcquisitionDateTime = "20240315083000"
    ds.TimezoneOffsetFromUTC = "+0100"
    ds.ContrastBolusAgent = "RRPHI contrast"
    ds.PatientIdentityRemoved = "NO"
    ds.DeviceUID = "1.2.3.4.5.6.7"
    ra = Dataset()
    ra.RequestedProcedureID = "RRPHI-RPID"
    ra.ScheduledProcedureStepID = "RRPHI-SPSID"
    ra.ReasonForTheRequestedProcedure = "RRPHI request reason"
    ds.RequestAttributesSequence = Sequence([ra])
    rs = Dataset()
    rs.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    rs.ReferencedSOPInstanceUID = "1.2.3.999.1"
    ds.ReferencedStudySequence = Sequence([rs])
    ri = Dataset()
    ri.ReferencedSOPClassUID = ds.SOPClassUID
    ri.ReferencedSOPInstanceUID = other_uid
    ri.add_new(0x00111010, "LO", "RRPHI private in an item")
    ds.ReferencedImageSequence = Sequence([ri])
    ds.add_new(0x00090010, "LO", "RRPHI CREATOR")
    ds.add_new(0x00091001, "LO", "RRPHI private value")
    ds.add_new(0x00091002, "UN", b"RRPHI-UNKNOWN")
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60000011, "US", 4)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60000022, "LO", "RRPHI overlay description")
    ds.add_new(0x60003000, "OW", b"\xff\x00")


def make(make_study, out):
    r = subprocess.run(["/usr/bin/python3", make_study, "--out", out, "--slices", "4",
                        "--size", "32", "--accession", "RRTESTACC", "--patient-id",
                        "RRTEST-DEID", "--seed", "7", "--bleed"],
                       capture_output=True, text=True, check=True)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    names = sorted(n for n in os.listdir(out) if n.endswith(".dcm"))
    sops = [pydicom.dcmread(os.path.join(out, n)).SOPInstanceUID for n in names]
    for i, n in enumerate(names):
        p = os.path.join(out, n)
        ds = pydicom.dcmread(p)
        plant(ds, sops[(i + 1) % len(sops)])
        ds.save_as(p, write_like_original=False)
    base = pydicom.dcmread(os.path.join(out, names[0]))
    b = base.copy()
    b.SOPInstanceUID = b.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID + ".77"
    b.BurnedInAnnotation = "YES"
    b.save_as(os.path.join(out, "burned.dcm"), write_like_original=False)
    s = base.copy()
    s.SOPInstanceUID = s.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID + ".78"
    s.SOPClassUID = s.file_meta.MediaStorageSOPClassUID = SC_STORAGE
    s.save_as(os.path.join(out, "sc.dcm"), write_like_original=False)
    print(json.dumps({"study_uid": info["study_instance_uid"], "series_uid": base.SeriesInstanceUID,
                      "accession": ACCESSION, "patient_id": str(base.PatientID)}))


def pseudo_uid(secret, uid):
    return "2.25.%d" % int.from_bytes(hmac.new(secret, uid.encode(), hashlib.sha256)
                                      .digest()[:16], "big")


def pseudo_text(secret, kind, value):
    return "RR" + hmac.new(secret, f"{kind}:{value}".encode(), hashlib.sha256).digest()[:7] \
        .hex().upper()


def walk(ds, path=""):
    for el in ds:
        yield f"{path}{el.tag}", el
        if el.VR == "SQ":
            for i, item in enumerate(el.value):
                yield from walk(item, f"{path}{el.tag}[{i}].")


REMOVED = ["OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "PatientAddress",
           "PatientTelephoneNumbers", "PatientMotherBirthName", "MedicalRecordLocator",
           "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
           "IssuerOfPatientID", "PatientBirthTime", "InstitutionName", "InstitutionAddress",
           "InstitutionalDepartmentName", "ReferringPhysicianTelephoneNumbers",
           "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
           "OperatorsName", "RequestingPhysician", "StationName", "DeviceSerialNumber",
           "DetectorID", "GantryID", "StudyDescription", "SeriesDescription", "ProtocolName",
           "ImageComments", "StudyComments", "DerivationDescription",
           "RequestedProcedureDescription", "PerformedProcedureStepDescription",
           "PerformedProcedureStepID", "PerformedStationName", "PerformedLocation",
           "ReasonForStudy", "AdmissionID", "InstanceCreationDate", "InstanceCreationTime",
           "AcquisitionDateTime", "TimezoneOffsetFromUTC", "RequestAttributesSequence",
           "ReferencedStudySequence", "SeriesDate", "SeriesTime", "AcquisitionDate",
           "AcquisitionTime"]
EMPTIED = ["PatientName", "PatientBirthDate", "StudyDate", "StudyTime", "ContentDate",
           "ContentTime", "ReferringPhysicianName", "StudyID", "ContrastBolusAgent"]
KEPT = ["Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient",
        "SliceThickness", "KVP", "RescaleSlope", "RescaleIntercept", "BodyPartExamined",
        "Modality", "SOPClassUID", "BitsAllocated", "BitsStored", "PixelRepresentation",
        "PhotometricInterpretation", "PatientSex", "PatientWeight", "PatientSize",
        "Manufacturer", "SeriesNumber", "InstanceNumber", "WindowCenter", "WindowWidth"]


def check(secret, src, out):
    secret = secret.encode()
    problems = []
    names = sorted(n for n in os.listdir(out) if n.endswith(".dcm"))
    if not names:
        problems.append("no de-identified file")
    studies, series, frames, sops = set(), set(), set(), {}
    for n in names:
        a = pydicom.dcmread(os.path.join(src, n))
        b = pydicom.dcmread(os.path.join(out, n))
        raw = open(os.path.join(out, n), "rb").read()
        say = lambda m: problems.append(f"{n}: {m}")  # noqa: E731
        for needle in (b"RRPHI", b"ZZTEST", BIRTH.encode(), b"RRTEST-DEID", b"RRTESTACC",
                       a.StudyInstanceUID.encode(), a.SeriesInstanceUID.encode(),
                       a.SOPInstanceUID.encode(), a.FrameOfReferenceUID.encode()):
            if needle in raw:
                say(f"the file still holds {needle!r}")
        for kw in REMOVED:
            if kw in b:
                say(f"{kw} not removed")
        for kw in EMPTIED:
            if kw not in b or b.data_element(kw).value not in ("", None, b""):
                say(f"{kw} not present and empty")
        for kw in KEPT:
            if kw in a and (kw not in b or a.data_element(kw).value != b.data_element(kw).value):
                say(f"{kw} not kept")
        if a.PixelData != b.PixelData:
            say("pixel data changed")
        if b.PatientID != pseudo_text(secret, "patient_id", a.PatientID):
            say("Patient ID is not its pseudonym")
        if b.AccessionNumber != pseudo_text(secret, "accession", a.AccessionNumber):
            say("Accession Number is not its pseudonym")
        if b.PatientAge != "090Y":
            say(f"Patient's Age {b.PatientAge} (an age over 89 is 090Y)")
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                   "FrameOfReferenceUID", "DeviceUID"):
            if b.data_element(kw).value != pseudo_uid(secret, a.data_element(kw).value):
                say(f"{kw} is not the pseudonym of the original")
        if b.file_meta.MediaStorageSOPInstanceUID != b.SOPInstanceUID:
            say("Media Storage SOP Instance UID is not the SOP Instance UID")
        if b.file_meta.TransferSyntaxUID != a.file_meta.TransferSyntaxUID:
            say("transfer syntax changed")
        ref = b.ReferencedImageSequence[0]
        if ref.ReferencedSOPInstanceUID != pseudo_uid(
                secret, a.ReferencedImageSequence[0].ReferencedSOPInstanceUID):
            say("Referenced SOP Instance UID is not the pseudonym of the original")
        if ref.ReferencedSOPClassUID != a.SOPClassUID:
            say("Referenced SOP Class UID changed")
        if b.PatientIdentityRemoved != "YES":
            say("Patient Identity Removed is not YES")
        codes = {(c.CodeValue, c.CodingSchemeDesignator)
                 for c in b.get("DeidentificationMethodCodeSequence", [])}
        if codes != {("113100", "DCM"), ("113108", "DCM")}:
            say(f"De-identification Method Code Sequence {sorted(codes)}")
        if not b.get("DeidentificationMethod"):
            say("no De-identification Method")
        if b.get("LongitudinalTemporalInformationModified") != "REMOVED":
            say("Longitudinal Temporal Information Modified is not REMOVED")
        for path, el in walk(b):
            if el.tag.is_private:
                say(f"private element {path}")
            if el.tag.group & 0xFF00 == 0x6000:
                say(f"overlay element {path}")
            if el.VR in ("PN", "DA", "DT", "TM") and el.value not in ("", None):
                say(f"{path} ({el.VR}) has a value")
            if el.VR in ("LT", "ST", "UT", "UN"):
                say(f"{path} ({el.VR}) kept")
        studies.add(b.StudyInstanceUID)
        series.add(b.SeriesInstanceUID)
        frames.add(b.FrameOfReferenceUID)
        sops[b.SOPInstanceUID] = n
    if len(studies) != 1 or len(series) != 1 or len(frames) != 1:
        problems.append("the instances of one study do not share their pseudonymous study, "
                        "series and frame of reference UIDs")
    if len(sops) != len(names):
        problems.append("two instances got the same SOP Instance UID")
    for n in names:
        b = pydicom.dcmread(os.path.join(out, n))
        if b.ReferencedImageSequence[0].ReferencedSOPInstanceUID not in sops:
            problems.append(f"{n}: the referenced instance's pseudonym is not that instance's")
    for p in problems:
        print(p)
    print(f"checked {len(names)} de-identified instances: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
        sys.exit(0)
    if len(sys.argv) == 5 and sys.argv[1] == "check":
        sys.exit(check(sys.argv[2], sys.argv[3], sys.argv[4]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)

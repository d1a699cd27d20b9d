#!/usr/bin/env python3
"""Generate tests/data/hl7/oru_r01_ed_big.hl7 (synthetic, deterministic).

An HL7 v2.5.1 ORU^R01 radiology result whose OBX-5 (type ED) carries about
2.5 MB of base64:

    OBX|2|ED|18748-4^Diagnostic imaging study^LN||^application^pdf^Base64^<b64>||||||F

The payload is PAYLOAD_SIZE pseudo-random bytes (SHA-256 in counter mode over a
fixed seed, so the output is byte-identical on every Python version) behind a
short "%PDF-1.4" marker; it is not a real PDF. The base64 text has no line
breaks and uses only A-Z a-z 0-9 + / =, none of which is an HL7 delimiter.
All names, identifiers and facilities are fake (ZZTEST, RADRELAY_TEST_HOSP,
SSN 999-xx-xxxx, 2.25.* UIDs).

Usage: python3 gen_big_oru.py [OUTPUT]   (default: oru_r01_ed_big.hl7 next to
this script). Prints the size and SHA-256 of what it wrote.
"""
import base64
import hashlib
import os
import sys

SEED = b"radrelay-synthetic-ed-payload-v1"
PAYLOAD_SIZE = 1966080  # bytes; base64 of it is exactly 2,621,440 chars (2.5 MiB)
HOSP = "RADRELAY_TEST_HOSP"
STUDY_UID = "2.25.99887766554433221100998877665544332211"


def payload(size=PAYLOAD_SIZE):
    head = b"%PDF-1.4\n%RADRELAY synthetic payload: pseudo-random bytes, not a real PDF\n"
    out = bytearray(head)
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(SEED + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def message():
    b64 = base64.b64encode(payload()).decode("ascii")
    segs = [
        "MSH|^~\\&|RIS_SIM|" + HOSP + "|RADRELAY|RADRELAY_TEST_AI|20240321140000+0100||"
        "ORU^R01^ORU_R01|RRT-BIG-0001|P|2.5.1|||AL|NE",
        "PID|1||MRN00012345^^^" + HOSP + "&1.3.6.1.4.1.99999.1&ISO^MR"
        "~999000111^^^SSA&2.16.840.1.113883.4.1&ISO^SS"
        "||ZZTEST^ALPHA^QUINCY^JR^MR^^L||19700101|M",
        "PV1|1|O|RAD^CT01^1^" + HOSP,
        "ORC|RE|PLC0000201^RIS_SIM|FIL0000201^RADRELAY||CM",
        "OBR|1|PLC0000201^RIS_SIM|FIL0000201^RADRELAY|CTCHEST^CT CHEST^L"
        "|||20240321120000+0100|||||||||ORD001^ZZORDER^ZETA^^^DR||ACC0000201"
        "||||20240321140000+0100||CT|F",
        "OBX|1|ST|113014^DICOM Study^DCM||" + STUDY_UID + "||||||F",
        "OBX|2|ED|18748-4^Diagnostic imaging study^LN||^application^pdf^Base64^"
        + b64 + "||||||F",
        "OBX|3|TX|19005-8^Radiology Imaging study [Impression] (narrative)^LN"
        "||IMPRESSION: Synthetic report attached as PDF.||||||F",
    ]
    return "".join(s + "\r" for s in segs).encode("ascii")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "oru_r01_ed_big.hl7")
    data = message()
    with open(out, "wb") as fh:
        fh.write(data)
    print(f"{out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()

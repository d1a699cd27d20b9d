#!/usr/bin/python3
"""reference_ai.py: radrelay's reference AI service, for tests and demos.

NOT A MEDICAL DEVICE. It is a reference implementation of the AI endpoint
side of radrelay's contract (schemas/ai-request.schema.json,
ai-result.schema.json, ai-accepted.schema.json) with a deliberately simple
detector of hyperdense regions in CT head studies. It is tuned to the
synthetic studies of scripts/make-study and must never be pointed at
images of real patients to inform care. Every result it produces says so:
model name "radrelay-reference-hemorrhage", manufacturer "radrelay
reference (not a medical device)".

    reference_ai.py [--host 127.0.0.1] [--port 0] [--mode sync|async|callback]
                    [--token-file F] [--fail-first N] [--delay-ms N]
                    [--schemas DIR]

It prints one JSON line {"url": ..., "port": ...} on stdout when it
listens, and serves until stdin closes (or SIGTERM / SIGINT).

HTTP:
  POST /analyze   an ai-request (application/json). It is checked against
                  schemas/ai-request.schema.json (400 with the problems when
                  it does not follow it; 415 for another content type, 413
                  over 1 MiB) and, with --token-file, needs
                  "Authorization: Bearer <the file's first line>" (401).
                  --fail-first N: the first N POSTs are answered 503 (with
                  Retry-After: 1) before anything else is looked at.
                  sync:     200 with the ai-result.
                  async:    202 with an ai-accepted carrying status_url.
                  callback: 202 with an ai-accepted (no status_url); the
                            result is POSTed to request.callback.url with
                            "Authorization: Bearer <callback.token>",
                            retried with back-off (0.2 s doubling, at most
                            6 attempts, never past the request's deadline)
                            until it gets a 2xx. The request must carry a
                            callback (400 otherwise).
                  A job_id already seen is not analysed again: the answer
                  is that job's (same result, or 202 while it runs).
  GET /jobs/ID    the job: 200 with its ai-result once done, 202 with its
                  ai-accepted while running, 404 unknown (any mode).
  GET /stats      JSON counters, every request seen (method, path, status,
                  whether it carried Authorization, its JSON body), every
                  callback attempt, and per job its figures (fetch and
                  analysis time, slices, candidate voxels, cluster size).

--delay-ms N holds each job for N ms before it is analysed (a slow model).

The analysis (per job, in a worker thread):
  1 rejected unless the study is CT of the head (request.study modalities,
    body part HEAD/BRAIN/SKULL or a description naming the head; then the
    images' Body Part Examined when present);
  2 fetch the study with WADO-RS (images.wado_rs, Accept: multipart/related;
    type="application/dicom", with images.auth); failed on any error;
  3 take the CT series with the most slices of one geometry, sort the
    slices along their normal, convert to HU (Rescale Slope/Intercept);
  4 per slice, the intracranial region: pixels below 300 HU with bone
    (> 300 HU) somewhere to their left, right, above and below; minus a
    3 mm rim along the bone (partial volume of the skull);
  5 a 3 x 3 in-plane mean of the HU (noise), then candidates: intracranial
    pixels whose mean is within 50..90 HU (acute blood; brain is ~20-45);
  6 the largest 6-connected 3D cluster of candidates (breadth-first
    search); its volume = voxels x pixel area x slice spacing;
  7 at MIN_VOLUME_MM3 or more: one critical finding, SNOMED CT 1386000
    "Intracranial hemorrhage" (as in DICOM PS3.16, e.g. pydicom's
    codes.SCT.IntracranialHemorrhage), ACR category 1, confidence
    0.5 + 0.49 * (1 - exp(-(volume - MIN_VOLUME_MM3) / 1000 mm3)), located
    on the slice where the cluster is widest (its centroid there, in
    pixels) and at the cluster's centroid in patient coordinates (mm,
    LPS); measurements SCT 118565006 Volume (mm3) and DCM 112031
    Attenuation Coefficient (mean HU of the cluster, [hnsf'U]);
    below it: completed with no findings.

Needs /usr/bin/python3 with Debian's python3-pydicom and python3-numpy.
"""
import argparse
import base64
import collections
import hashlib
import hmac
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import numpy as np
    import pydicom
except ImportError as e:
    np = pydicom = None
    IMPORT_ERROR = str(e)
else:
    IMPORT_ERROR = None

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SCHEMAS = os.path.normpath(os.path.join(HERE, "..", "..", "schemas"))

MODEL = {
    "name": "radrelay-reference-hemorrhage",
    "version": "1.0.0",
    "manufacturer": "radrelay reference (not a medical device)",
}
MODEL["device_uid"] = "2.25.%d" % uuid.UUID(
    bytes=hashlib.sha256(f"{MODEL['name']}|{MODEL['version']}".encode()).digest()[:16],
    version=5).int

CODE_ICH = {"system": "SCT", "code": "1386000", "meaning": "Intracranial hemorrhage"}
CODE_VOLUME = {"system": "SCT", "code": "118565006", "meaning": "Volume"}
CODE_ATTENUATION = {"system": "DCM", "code": "112031", "meaning": "Attenuation Coefficient"}

HEAD_PARTS = {"HEAD", "BRAIN", "SKULL"}
BONE_HU = 300.0
BLEED_HU = (50.0, 90.0)
RIM_MM = 3.0
MIN_VOLUME_MM3 = 200.0
MAX_BODY = 1 << 20
CALLBACK_ATTEMPTS = 6
CALLBACK_FIRST_DELAY = 0.2
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'


def log(event, **kv):
    """One structured line on stderr (no patient data: there is none here)."""
    fields = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in kv.items())
    print(f"reference_ai event={event} {fields}".rstrip(), file=sys.stderr, flush=True)


def now_rfc3339():
    t = datetime.now(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_rfc3339(text):
    """Seconds since the epoch of an RFC 3339 time, or None."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


# ---- the contract: a validator for the JSON Schema subset radrelay uses ----

class Schema:
    """Draft 2020-12 subset, the same keywords and meaning as radrelay's own
    validator (engine/core/json_schema.c): a schema using another keyword,
    or a pattern POSIX extended regular expressions do not have (\\d, \\w,
    \\s, (?...)), is refused when loaded. validate() returns a list of
    "$.path: problem" strings, empty when the document is valid."""

    KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum",
                "const", "pattern", "minimum", "maximum", "minLength", "maxLength",
                "minItems", "maxItems", "oneOf", "anyOf", "allOf", "$ref", "$defs",
                "$schema", "$id", "title", "description", "default", "examples", "$comment"}
    NOT_POSIX = re.compile(r"\\[dDwWsSbB]|\(\?")

    def __init__(self, root):
        self.root = root
        self.patterns = {}
        problems = []
        self._compile(root, "#", problems)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def _compile(self, node, where, problems):
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            problems.append(f"schema {where}: not an object")
            return
        for k, v in node.items():
            if k not in self.KEYWORDS:
                problems.append(f'schema {where}: keyword "{k}" is not supported')
            elif k in ("properties", "$defs"):
                for pk, pv in v.items():
                    self._compile(pv, f"{where}/{k}/{pk}", problems)
            elif k in ("items", "additionalProperties"):
                self._compile(v, f"{where}/{k}", problems)
            elif k in ("oneOf", "anyOf", "allOf"):
                for i, e in enumerate(v):
                    self._compile(e, f"{where}/{k}/{i}", problems)
            elif k == "pattern":
                if not isinstance(v, str) or self.NOT_POSIX.search(v):
                    problems.append(f"schema {where}: pattern {v!r} is not POSIX ERE")
                else:
                    self.patterns[v] = re.compile(v)
            elif k == "$ref":
                if not (isinstance(v, str) and v.startswith("#/$defs/")
                        and v[8:] in self.root.get("$defs", {})):
                    problems.append(f'schema {where}: $ref "{v}" does not name an entry of $defs')

    @staticmethod
    def _type_of(v):
        if isinstance(v, bool):
            return "boolean"
        if isinstance(v, int):
            return "integer"
        if isinstance(v, float):
            return "number"
        if isinstance(v, str):
            return "string"
        if isinstance(v, list):
            return "array"
        if isinstance(v, dict):
            return "object"
        return "null"

    @classmethod
    def _is(cls, v, t):
        actual = cls._type_of(v)
        if t == "number":
            return actual in ("integer", "number")
        if t == "integer":
            return actual == "integer" or (actual == "number" and float(v).is_integer())
        return actual == t

    @classmethod
    def _equal(cls, a, b):
        """JSON equality as jansson's json_equal: 1 and 1.0 differ."""
        if cls._type_of(a) != cls._type_of(b):
            return False
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(cls._equal(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(cls._equal(x, y) for x, y in zip(a, b))
        return a == b

    def validate(self, doc):
        out = []
        self._validate(self.root, doc, "$", out)
        return out

    def _validate(self, sch, v, path, out):
        if sch is True:
            return
        if sch is False:
            out.append(f"{path}: not allowed here")
            return
        if "$ref" in sch:
            self._validate(self.root["$defs"][sch["$ref"][8:]], v, path, out)
        t = sch.get("type")
        if t is not None:
            types = [t] if isinstance(t, str) else t
            if not any(self._is(v, x) for x in types):
                out.append(f"{path}: must be {' or '.join(types)}, not {self._type_of(v)}")
                return
        if "const" in sch and not self._equal(sch["const"], v):
            out.append(f"{path}: must be {json.dumps(sch['const'])}")
        if "enum" in sch and not any(self._equal(e, v) for e in sch["enum"]):
            out.append(f"{path}: must be one of {json.dumps(sch['enum'])}")
        if isinstance(v, str):
            if "minLength" in sch and len(v) < sch["minLength"]:
                out.append(f"{path}: must be at least {sch['minLength']} characters")
            if "maxLength" in sch and len(v) > sch["maxLength"]:
                out.append(f"{path}: must be at most {sch['maxLength']} characters")
            if "pattern" in sch and not self.patterns[sch["pattern"]].search(v):
                out.append(f"{path}: {json.dumps(v)} does not match {sch['pattern']}")
        if self._type_of(v) in ("integer", "number"):
            if "minimum" in sch and v < sch["minimum"]:
                out.append(f"{path}: must be at least {sch['minimum']}")
            if "maximum" in sch and v > sch["maximum"]:
                out.append(f"{path}: must be at most {sch['maximum']}")
        if isinstance(v, dict):
            for k in sch.get("required", []):
                if k not in v:
                    out.append(f"{path}.{k}: required")
            props = sch.get("properties", {})
            addl = sch.get("additionalProperties")
            for k, pv in v.items():
                if k in props:
                    self._validate(props[k], pv, f"{path}.{k}", out)
                elif addl is False:
                    out.append(f"{path}.{k}: unknown key")
                elif addl is not None:
                    self._validate(addl, pv, f"{path}.{k}", out)
        if isinstance(v, list):
            if "minItems" in sch and len(v) < sch["minItems"]:
                out.append(f"{path}: must have at least {sch['minItems']} items")
            if "maxItems" in sch and len(v) > sch["maxItems"]:
                out.append(f"{path}: must have at most {sch['maxItems']} items")
            if "items" in sch:
                for i, e in enumerate(v):
                    self._validate(sch["items"], e, f"{path}[{i}]", out)
        for e in sch.get("allOf", []):
            self._validate(e, v, path, out)
        alts = sch.get("oneOf", sch.get("anyOf"))
        if alts is not None:
            subs = []
            for e in alts:
                sub = []
                self._validate(e, v, path, sub)
                subs.append(sub)
            matches = sum(1 for s in subs if not s)
            if matches == 0:
                out.append(f"{path}: matches none of the allowed forms: "
                           + " | ".join("; ".join(s) for s in subs))
            elif "oneOf" in sch and matches > 1:
                out.append(f"{path}: matches more than one of the allowed forms")


def result_problems(result, schema):
    """What the schema finds in a result, plus what it cannot express:
    finding ids unique within the result."""
    problems = schema.validate(result)
    ids = [f.get("id") for f in result.get("findings", []) if isinstance(f, dict)]
    if len(ids) != len(set(ids)):
        problems.append("$.findings: ids are not unique")
    return problems


# ---- WADO-RS --------------------------------------------------------------

def content_type_params(value):
    """('multipart/related', {'type': ..., 'boundary': ...}) of a header."""
    main, _, rest = value.partition(";")
    params = {}
    for m in re.finditer(r'\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*;?', rest):
        k, v = m.group(1).lower(), m.group(2).strip()
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params[k] = v
    return main.strip().lower(), params


def multipart_parts(body, content_type):
    """The parts of a multipart/related body (RFC 2046): a list of
    (headers with lower-case names, bytes). Preamble and epilogue are
    skipped; a boundary line may carry transport padding; a part's
    Content-Length, when given, must agree. Raises ValueError."""
    mtype, params = content_type_params(content_type)
    if mtype != "multipart/related" or not params.get("boundary"):
        raise ValueError(f"not multipart/related with a boundary: {content_type!r}")
    delim = b"--" + params["boundary"].encode("latin-1")
    line = re.compile(rb"(?:^|\r\n)" + re.escape(delim) + rb"(--)?[ \t]*(?:\r\n|$)")
    marks = list(line.finditer(body))
    if not marks:
        raise ValueError("no boundary in the body")
    if not any(m.group(1) for m in marks):
        raise ValueError("no closing boundary (truncated body?)")
    parts = []
    for m, nxt in zip(marks, marks[1:]):
        if m.group(1):
            break
        chunk = body[m.end():nxt.start()]
        head_end = chunk.find(b"\r\n\r\n")
        if chunk.startswith(b"\r\n"):
            head, data = b"", chunk[2:]
        elif head_end >= 0:
            head, data = chunk[:head_end], chunk[head_end + 4:]
        else:
            raise ValueError("part headers do not end")
        headers = {}
        for h in head.decode("latin-1").split("\r\n"):
            if h:
                k, sep, v = h.partition(":")
                if not sep:
                    raise ValueError(f"bad part header {h!r}")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers and headers["content-length"].isdigit() \
                and int(headers["content-length"]) != len(data):
            raise ValueError(f"part length {len(data)} != Content-Length "
                             f"{headers['content-length']}")
        parts.append((headers, data))
    return parts


def auth_header(auth):
    if not auth:
        return {}
    if auth["type"] == "basic":
        pair = f"{auth['username']}:{auth['password']}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    return {"Authorization": f"Bearer {auth['token']}"}


def fetch_study(images, timeout):
    """The instances of the study as pydicom datasets. Raises OSError or
    ValueError with what went wrong."""
    headers = {"Accept": DICOM_ACCEPT}
    headers.update(auth_header(images.get("auth")))
    req = urllib.request.Request(images["wado_rs"], headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body, ctype = r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raise OSError(f"WADO-RS {images['wado_rs']}: HTTP {e.code}") from None
    datasets = []
    for headers, data in multipart_parts(body, ctype):
        ptype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if ptype != "application/dicom":
            raise ValueError(f"WADO-RS part of type {ptype!r}")
        datasets.append(pydicom.dcmread(io.BytesIO(data), force=True))
    if not datasets:
        raise ValueError("WADO-RS answered no instances")
    return datasets


# ---- the analysis -----------------------------------------------------------

class Volume:
    """One CT series as a stack of axial slices (HU, float32 [z, row, col])."""

    def __init__(self, slices):
        first = slices[0]
        self.iop = np.array([float(x) for x in first.ImageOrientationPatient])
        self.normal = np.cross(self.iop[:3], self.iop[3:])
        self.slices = sorted(slices, key=lambda d: float(np.dot(
            self.normal, [float(x) for x in d.ImagePositionPatient])))
        self.positions = np.array([[float(x) for x in d.ImagePositionPatient]
                                   for d in self.slices])
        self.row_mm, self.col_mm = (float(x) for x in first.PixelSpacing)
        steps = np.diff(self.positions @ self.normal)
        self.step_mm = float(np.median(steps)) if len(steps) else float(
            getattr(first, "SliceThickness", 1.0) or 1.0)
        self.hu = np.stack([
            d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1) or 1)
            + float(getattr(d, "RescaleIntercept", 0) or 0) for d in self.slices])

    def to_patient(self, k, row, col):
        """Patient coordinates (mm, LPS) of voxel centres (arrays)."""
        return (self.positions[k]
                + np.outer(col * self.col_mm, self.iop[:3])
                + np.outer(row * self.row_mm, self.iop[3:]))


def pick_series(datasets):
    """The CT slices of the series with the most slices of one geometry."""
    groups = collections.defaultdict(list)
    for d in datasets:
        if getattr(d, "Modality", None) != "CT" or "PixelData" not in d:
            continue
        try:
            key = (d.SeriesInstanceUID, int(d.Rows), int(d.Columns),
                   tuple(round(float(x), 3) for x in d.ImageOrientationPatient),
                   tuple(round(float(x), 4) for x in d.PixelSpacing))
            [float(x) for x in d.ImagePositionPatient]
        except (AttributeError, TypeError, ValueError):
            continue
        groups[key].append(d)
    if not groups:
        return None
    return max(groups.values(), key=len)


def shift_or(mask, r):
    """mask dilated in-plane by r pixels (a (2r+1) square), per slice."""
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[:, 1:, :] |= out[:, :-1, :]
        grown[:, :-1, :] |= out[:, 1:, :]
        grown[:, :, 1:] |= out[:, :, :-1]
        grown[:, :, :-1] |= out[:, :, 1:]
        out = grown
    return out


def mean3x3(a):
    """3 x 3 in-plane mean, edges replicated."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
    s = np.zeros_like(a)
    n = a.shape
    for dy in range(3):
        for dx in range(3):
            s += p[:, dy:dy + n[1], dx:dx + n[2]]
    return s / 9.0


def largest_cluster(mask):
    """The largest 6-connected component of a boolean [z, y, x] array, as
    flat indices (numpy array), by breadth-first search over the candidate
    voxels only."""
    nz, ny, nx = mask.shape
    todo = set(np.flatnonzero(mask).tolist())
    best = []
    plane = ny * nx
    while todo:
        seed = todo.pop()
        comp = [seed]
        queue = collections.deque([seed])
        while queue:
            i = queue.popleft()
            z, rem = divmod(i, plane)
            y, x = divmod(rem, nx)
            for j, ok in ((i - 1, x > 0), (i + 1, x < nx - 1), (i - nx, y > 0),
                          (i + nx, y < ny - 1), (i - plane, z > 0), (i + plane, z < nz - 1)):
                if ok and j in todo:
                    todo.discard(j)
                    comp.append(j)
                    queue.append(j)
        if len(comp) > len(best):
            best = comp
    return np.array(sorted(best), dtype=np.int64)


def analyse(vol):
    """Finds the largest hyperdense intracranial cluster. Returns a dict of
    figures (and the cluster's voxels as 'cluster')."""
    hu = vol.hu
    bone = hu > BONE_HU
    seen = [np.maximum.accumulate(bone, axis=2), np.maximum.accumulate(bone[:, :, ::-1], axis=2)[:, :, ::-1],
            np.maximum.accumulate(bone, axis=1), np.maximum.accumulate(bone[:, ::-1, :], axis=1)[:, ::-1, :]]
    inside = seen[0] & seen[1] & seen[2] & seen[3] & ~bone
    rim = shift_or(bone, max(1, math.ceil(RIM_MM / min(vol.row_mm, vol.col_mm))))
    smooth = mean3x3(hu)
    candidates = inside & ~rim & (smooth >= BLEED_HU[0]) & (smooth <= BLEED_HU[1])
    cluster = largest_cluster(candidates)
    voxel_mm3 = vol.row_mm * vol.col_mm * abs(vol.step_mm)
    return {"slices": int(hu.shape[0]), "rows": int(hu.shape[1]), "columns": int(hu.shape[2]),
            "intracranial_voxels": int(np.count_nonzero(inside & ~rim)),
            "candidate_voxels": int(np.count_nonzero(candidates)),
            "cluster_voxels": int(len(cluster)), "voxel_mm3": voxel_mm3,
            "cluster_mm3": float(len(cluster) * voxel_mm3), "cluster": cluster}


def confidence_for(volume_mm3):
    return round(min(0.99, 0.5 + 0.49 * (1.0 - math.exp(-(volume_mm3 - MIN_VOLUME_MM3) / 1000.0))),
                 3)


def finding_for(vol, figures):
    """The critical finding for the cluster in figures."""
    nz, ny, nx = vol.hu.shape
    k, rem = np.divmod(figures["cluster"], ny * nx)
    row, col = np.divmod(rem, nx)
    key = int(np.bincount(k).argmax())                 # the slice where it is widest
    on_key = k == key
    key_ds = vol.slices[key]
    centre = vol.to_patient(k, row.astype(float), col.astype(float)).mean(axis=0)
    mean_hu = float(vol.hu.reshape(-1)[figures["cluster"]].mean())
    figures.update(key_slice=key, centre_mm=[round(float(c), 2) for c in centre],
                   mean_hu=round(mean_hu, 1))
    return {
        "id": "F1",
        "code": CODE_ICH,
        "label": "Intracranial hemorrhage",
        "confidence": confidence_for(figures["cluster_mm3"]),
        "critical": True,
        "acr_category": 1,
        "location": {
            "series_uid": str(key_ds.SeriesInstanceUID),
            "instance_uid": str(key_ds.SOPInstanceUID),
            "point": [round(float(col[on_key].mean()) + 0.5, 2),
                      round(float(row[on_key].mean()) + 0.5, 2)],
            "point3d": [round(float(c), 2) for c in centre],
            "frame_of_reference_uid": str(key_ds.FrameOfReferenceUID),
        },
        "measurements": [
            {"code": CODE_VOLUME, "value": round(figures["cluster_mm3"], 1), "unit": "mm3"},
            {"code": CODE_ATTENUATION, "value": round(mean_hu, 1), "unit": "[hnsf'U]"},
        ],
    }


def is_head(study):
    part = (study.get("body_part") or "").upper()
    if part:
        return part in HEAD_PARTS
    desc = (study.get("description") or "").upper()
    return not desc or any(w in desc for w in ("HEAD", "BRAIN", "SKULL", "CRAN"))


def run_job(request, fetch_timeout):
    """The ai-result for an ai-request (never raises), and the job's figures."""
    job_id, study = request["job_id"], request["study"]
    base = {"schema": "radrelay.ai-result/1", "job_id": job_id}
    figures = {}

    def refuse(status, why):
        figures["outcome"] = status
        return dict(base, status=status, error=why), figures

    if "CT" not in study["modalities"]:
        return refuse("rejected", f"not a CT study (modalities {', '.join(study['modalities'])}); "
                      "this model reads CT head")
    if not is_head(study):
        return refuse("rejected", f"not a head study (body part {study.get('body_part')!r}, "
                      f"description {study.get('description')!r}); this model reads CT head")
    t0 = time.monotonic()
    try:
        datasets = fetch_study(request["images"], fetch_timeout)
    except (OSError, ValueError, pydicom.errors.InvalidDicomError) as e:
        return refuse("failed", f"could not fetch the images: {e}")
    figures["fetch_ms"] = round((time.monotonic() - t0) * 1000)
    figures["instances"] = len(datasets)
    parts = {str(getattr(d, "BodyPartExamined", "") or "").upper() for d in datasets} - {""}
    if parts and not parts & HEAD_PARTS:
        return refuse("rejected", f"the images are not of the head (body part {sorted(parts)})")
    slices = pick_series(datasets)
    if not slices:
        return refuse("failed", "no CT image with pixel data and geometry in the study")
    t1 = time.monotonic()
    try:
        vol = Volume(slices)
        figures.update(analyse(vol))
        findings = []
        if figures["cluster_mm3"] >= MIN_VOLUME_MM3:
            findings.append(finding_for(vol, figures))
    except (AttributeError, ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        return refuse("failed", f"could not read the pixel data: {e}")
    figures.pop("cluster")
    figures["analysis_ms"] = round((time.monotonic() - t1) * 1000)
    figures["outcome"] = "critical" if findings else "negative"
    result = dict(base, status="completed", model=dict(MODEL), completed=now_rfc3339(),
                  findings=findings)
    return result, figures


# ---- the service ------------------------------------------------------------

class Service:
    """State shared by the HTTP handler threads and the job threads."""

    def __init__(self, args, schemas):
        self.args = args
        self.schemas = schemas
        self.token = None
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                self.token = f.readline().strip()
            if not self.token:
                raise ValueError(f"{args.token_file}: empty token")
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.fail_left = args.fail_first
        self.jobs = {}           # job_id -> {"state", "result", "figures", "request"}
        self.requests = []       # every request seen
        self.callbacks = []      # every callback attempt
        self.counters = collections.Counter()
        self.base_url = None

    def stats(self):
        with self.lock:
            return {"counters": dict(self.counters), "requests": list(self.requests),
                    "callbacks": list(self.callbacks),
                    "jobs": {k: {"state": v["state"], "figures": v["figures"],
                                 "status": (v["result"] or {}).get("status")}
                             for k, v in self.jobs.items()},
                    "mode": self.args.mode, "model": MODEL}

    def accepted(self, job_id, with_status_url):
        doc = {"schema": "radrelay.ai-accepted/1", "job_id": job_id}
        if with_status_url:
            doc["status_url"] = f"{self.base_url}/jobs/{job_id}"
        return doc

    def start_job(self, request):
        """Registers the job; returns (job, new)."""
        with self.lock:
            job = self.jobs.get(request["job_id"])
            if job:
                return job, False
            job = {"state": "running", "result": None, "figures": {}, "request": request,
                   "done": threading.Event()}
            self.jobs[request["job_id"]] = job
        threading.Thread(target=self._work, args=(job,), daemon=True).start()
        return job, True

    def _work(self, job):
        request = job["request"]
        if self.args.delay_ms and self.stop.wait(self.args.delay_ms / 1000.0):
            return
        deadline = parse_rfc3339(request["deadline"])
        timeout = max(5.0, min(300.0, deadline - time.time())) if deadline else 120.0
        result, figures = run_job(request, timeout)
        problems = result_problems(result, self.schemas["ai-result"])
        if problems:   # our own output breaks the contract: say so loudly
            log("result_invalid", job_id=request["job_id"], problems="; ".join(problems))
            result = {"schema": "radrelay.ai-result/1", "job_id": request["job_id"],
                      "status": "failed", "error": "internal: result does not follow the "
                      "contract: " + "; ".join(problems)[:1500]}
        with self.lock:
            job.update(state="done", result=result, figures=figures)
            self.counters["jobs_" + result["status"]] += 1
        log("job_done", job_id=request["job_id"], status=result["status"],
            findings=len(result.get("findings", [])),
            **{k: v for k, v in figures.items() if k in ("cluster_mm3", "fetch_ms", "analysis_ms")})
        job["done"].set()
        if self.args.mode == "callback":
            self._deliver(request, result)

    def _deliver(self, request, result):
        cb = request["callback"]
        deadline = parse_rfc3339(request["deadline"]) or (time.time() + 60)
        body = json.dumps(result).encode()
        delay = CALLBACK_FIRST_DELAY
        for attempt in range(1, CALLBACK_ATTEMPTS + 1):
            status, error = None, None
            req = urllib.request.Request(cb["url"], data=body, method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {cb['token']}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    status = r.status
                    r.read()
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError as e:
                error = str(e)
            with self.lock:
                self.callbacks.append({"job_id": request["job_id"], "attempt": attempt,
                                       "status": status, "error": error, "at": time.time()})
            if status is not None and 200 <= status < 300:
                log("callback_delivered", job_id=request["job_id"], attempt=attempt, status=status)
                return
            log("callback_failed", job_id=request["job_id"], attempt=attempt,
                status=status, error=error or "")
            if attempt == CALLBACK_ATTEMPTS or time.time() + delay > deadline:
                break
            if self.stop.wait(delay):   # back-off; ends early on shutdown
                return
            delay *= 2
        with self.lock:
            self.counters["callbacks_abandoned"] += 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "radrelay-reference-ai/1"
    service = None   # set on the subclass

    def log_message(self, fmt, *a):
        pass

    def _send(self, status, doc, headers=None, record=True):
        """Answers; the request is recorded first, so whoever got the
        answer finds it in /stats."""
        self._status = status
        if record:
            self._record(getattr(self, "_doc", None))
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _record(self, body_doc):
        with self.service.lock:
            self.service.counters[f"http_{self._status}"] += 1
            self.service.requests.append({
                "method": self.command, "path": self.path, "status": self._status,
                "authorization": "Authorization" in self.headers, "body": body_doc})

    def do_GET(self):
        self._doc = None
        svc = self.service
        if self.path == "/stats":
            self._send(200, svc.stats(), record=False)   # tests poll it
            return
        m = re.fullmatch(r"/jobs/([A-Za-z0-9._-]{1,64})", self.path)
        if m:
            if not self._authorized():
                return
            with svc.lock:
                job = svc.jobs.get(m.group(1))
            if not job:
                self._send(404, {"error": f"no job {m.group(1)}"})
            elif job["state"] == "done":
                self._send(200, job["result"])
            else:
                self._send(202, svc.accepted(m.group(1), True))
        else:
            self._send(404, {"error": f"no such resource {self.path}"})

    def _authorized(self):
        tok = self.service.token
        if tok is None:
            return True
        got = self.headers.get("Authorization", "")
        if got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(),
                                                             tok.encode()):
            return True
        self._send(401, {"error": "a bearer token is required"},
                   {"WWW-Authenticate": 'Bearer realm="reference-ai"'})
        return False

    def do_POST(self):
        self._doc = None
        svc = self.service
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(411, {"error": "Content-Length required"})
            self.close_connection = True
            return
        n = int(length)
        if n > MAX_BODY:
            self._send(413, {"error": f"request over {MAX_BODY} bytes"})
            self.close_connection = True
            return
        raw = self.rfile.read(n)
        if self.path != "/analyze":
            self._send(404, {"error": f"no such resource {self.path}"})
            return
        with svc.lock:
            failing = svc.fail_left > 0
            if failing:
                svc.fail_left -= 1
        if failing:
            self._send(503, {"error": "unavailable (--fail-first)"}, {"Retry-After": "1"})
            return
        if not self._authorized():
            return
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._send(415, {"error": "Content-Type must be application/json"})
            return
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            self._send(400, {"error": f"not JSON: {e}"})
            return
        self._doc = doc
        problems = svc.schemas["ai-request"].validate(doc)
        if not problems:
            problems = self._semantics(doc)
        if problems:
            self._send(400, {"error": "the request does not follow radrelay.ai-request/1",
                             "problems": problems})
            return
        job, new = svc.start_job(doc)
        mode = svc.args.mode
        if mode == "sync":
            job["done"].wait()
            self._send(200, job["result"])
        else:
            self._send(202, svc.accepted(doc["job_id"], mode == "async"))
        if not new:
            log("job_repeated", job_id=doc["job_id"])

    def _semantics(self, doc):
        """What the schema cannot say."""
        problems = []
        wado = doc["images"]["wado_rs"].rstrip("/")
        if not wado.endswith("/studies/" + doc["study"]["study_uid"]):
            problems.append("$.images.wado_rs: does not end with /studies/<study.study_uid>")
        created, deadline = parse_rfc3339(doc["created"]), parse_rfc3339(doc["deadline"])
        if created is None or deadline is None:
            problems.append("$.created/$.deadline: not valid times")
        elif deadline <= created:
            problems.append("$.deadline: not after $.created")
        if sum(s["instances"] for s in doc["study"]["series"]) != doc["study"]["instances"]:
            problems.append("$.study.instances: not the sum of the series' instances")
        if self.service.args.mode == "callback" and "callback" not in doc:
            problems.append("$.callback: required by this endpoint (results by callback)")
        return problems


def load_schemas(folder):
    return {name: Schema.load(os.path.join(folder, f"{name}.schema.json"))
            for name in ("ai-request", "ai-result", "ai-accepted")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--mode", choices=("sync", "async", "callback"), default="sync")
    ap.add_argument("--token-file", help="require Authorization: Bearer <first line of F>")
    ap.add_argument("--fail-first", type=int, default=0, metavar="N",
                    help="answer the first N POST /analyze with 503")
    ap.add_argument("--delay-ms", type=int, default=0, metavar="N",
                    help="hold each job N ms before analysing it")
    ap.add_argument("--schemas", default=DEFAULT_SCHEMAS, help="folder of the JSON Schemas")
    args = ap.parse_args(argv)
    if IMPORT_ERROR:
        print(f"reference_ai.py: {IMPORT_ERROR}; install python3-pydicom and python3-numpy "
              "(scripts/setup) and run with /usr/bin/python3", file=sys.stderr)
        return 1
    if args.fail_first < 0 or args.delay_ms < 0:
        ap.error("--fail-first and --delay-ms must not be negative")
    try:
        service = Service(args, load_schemas(args.schemas))
    except (OSError, ValueError) as e:
        print(f"reference_ai.py: {e}", file=sys.stderr)
        return 1
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    port = server.server_address[1]
    service.base_url = f"http://{args.host}:{port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log("ready", url=service.base_url, mode=args.mode, model=MODEL["name"])
    print(json.dumps({"url": service.base_url, "port": port, "mode": args.mode,
                      "model": MODEL}), flush=True)
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        service.stop.set()
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

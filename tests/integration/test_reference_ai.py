#!/usr/bin/python3
"""The AI contract and the reference AI service.

    /usr/bin/python3 tests/integration/test_reference_ai.py \
        [--contract-only] [--schema-module librr_json_schema_module.so] \
        [--make-study scripts/make-study] [unittest args...]

Contract (always; no peer needed): schemas/ai-request, ai-result and
ai-accepted.schema.json against the examples in tests/data/ai (valid/ must
pass; each file of invalid/ must fail, at the path tests/data/ai/invalid.json
names), with three validators: Debian's python3-jsonschema (draft 2020-12,
written by others), radrelay's own (engine/core/json_schema.c, loaded with
ctypes from --schema-module; without it that validator is left out and the
run says so) and the reference service's mirror of it. The three must also
agree on every one-step mutation of the valid examples (a key dropped, a
value of another type). The service's multipart/related reader is checked
on bodies built here.

Service (not with --contract-only): a private Orthanc (its DICOMweb plugin,
basic auth) holding three synthetic CT head studies from scripts/make-study:
a bleed of the default shape, a clean one, and a smaller bleed elsewhere in
a 128 x 128 study. tests/peers/reference_ai.py runs as a command in each
mode; requests follow the contract:

  1 sync: bleed -> one critical finding within 3 mm of the planted centre,
    on a slice the bleed is on, its volume within 15% of the planted one;
    clean -> completed with no findings; results valid per the schema
  2 rejected (MR, chest) and failed (wrong DICOMweb password) results
  3 async: 202 + status_url, 202 while running, 200 with the result; a
    repeated job_id is not analysed twice
  4 callback: the result POSTed to a server of this test with the request's
    bearer token, after one refused delivery (retried)
  5 requests that break the contract: 400 with the problems, 415, and no
    job started
  6 --token-file: 401 without or with a wrong token, 200 with it
  7 --fail-first 2: 503 (Retry-After) twice, then 200

Synchronisation is by condition with a deadline, never a fixed sleep.
Exits 77 (ctest: skipped) when Orthanc, its DICOMweb plugin, pydicom or
numpy are missing (never with --contract-only). Ends with
"N passed, M failed"; exit status 0 when everything passed, 1 otherwise.
"""
import argparse
import copy
import ctypes
import ctypes.util
import glob
import hmac
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "peers"))
sys.path.insert(0, os.path.join(ROOT, "tests", "peers"))
import orthanc          # noqa: E402  (tests/integration/peers/orthanc.py)
import reference_ai     # noqa: E402  (tests/peers/reference_ai.py)

try:
    import jsonschema
except ImportError:
    jsonschema = None

SKIPPED = 77
JSON_DECODE_ANY = 0x4   # jansson: any value at the top, not only an object or array
SCHEMAS = os.path.join(ROOT, "schemas")
DATA = os.path.join(ROOT, "tests", "data", "ai")
SERVICE = os.path.join(ROOT, "tests", "peers", "reference_ai.py")
KINDS = ("ai-request", "ai-result", "ai-accepted")
MAKE_STUDY = None
SCHEMA_MODULE = None
WAIT = 60           # seconds any awaited condition may take


def kind_of(name):
    """ai-request / ai-result / ai-accepted from an example's file name."""
    return "ai-" + name.split("_")[0].split(".")[0]


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def wait_for(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)   # poll interval, not a synchronisation point


# ---- radrelay's own validator, through ctypes -------------------------------

class RrBuf(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("len", ctypes.c_size_t),
                ("cap", ctypes.c_size_t), ("limit", ctypes.c_size_t)]


class EngineValidator:
    """engine/core/json_schema.c: rr_json_schema_new / _validate on jansson
    values parsed by jansson."""

    def __init__(self, module):
        self.lib = ctypes.CDLL(module)
        self.jansson = ctypes.CDLL(ctypes.util.find_library("jansson") or "libjansson.so.4")
        self.jansson.json_loads.restype = ctypes.c_void_p
        self.jansson.json_loads.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
        self.jansson.json_delete.argtypes = [ctypes.c_void_p]
        self.lib.rr_buf_init.argtypes = [ctypes.POINTER(RrBuf), ctypes.c_size_t]
        self.lib.rr_buf_close.argtypes = [ctypes.POINTER(RrBuf)]
        self.lib.rr_json_schema_new.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                                ctypes.POINTER(RrBuf)]
        self.lib.rr_json_schema_validate.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                     ctypes.c_char_p, ctypes.POINTER(RrBuf)]
        self.lib.rr_json_schema_free.argtypes = [ctypes.c_void_p]
        self.compiled = []

    def _parse(self, value):
        err = ctypes.create_string_buffer(512)
        j = self.jansson.json_loads(json.dumps(value).encode(), JSON_DECODE_ANY, err)
        if not j:
            raise ValueError(f"jansson: {err.raw[12:92]!r}")
        return j

    @staticmethod
    def _text(buf):
        return ctypes.string_at(buf.data, buf.len).decode() if buf.data else ""

    def compile(self, schema):
        """(handle or None, error text)."""
        j = self._parse(schema)
        out = ctypes.c_void_p()
        buf = RrBuf()
        self.lib.rr_buf_init(ctypes.byref(buf), 1 << 20)
        rc = self.lib.rr_json_schema_new(j, ctypes.byref(out), ctypes.byref(buf))
        text = self._text(buf)
        self.lib.rr_buf_close(ctypes.byref(buf))
        if rc != 0:
            self.jansson.json_delete(j)
            return None, text
        self.compiled.append((out.value, j))
        return out.value, text

    def validate(self, handle, doc):
        """(number of problems, the text it writes about them)."""
        j = self._parse(doc)
        buf = RrBuf()
        self.lib.rr_buf_init(ctypes.byref(buf), 1 << 20)
        n = self.lib.rr_json_schema_validate(handle, j, None, ctypes.byref(buf))
        text = self._text(buf)
        self.lib.rr_buf_close(ctypes.byref(buf))
        self.jansson.json_delete(j)
        if n < 0 or (n > 0) != bool(text):
            raise AssertionError(f"rr_json_schema_validate: {n} and {text!r}")
        return n, text

    def close(self):
        for handle, j in self.compiled:
            self.lib.rr_json_schema_free(handle)
            self.jansson.json_delete(j)
        self.compiled = []


def paths(problems):
    return sorted({p.split(": ", 1)[0] for p in problems})


def lines_at(text, path):
    """Whether radrelay's validator wrote a problem at path."""
    return any(x.lstrip(" -").startswith(path + ": ") for x in text.splitlines())


def mutations(doc, path="$"):
    """(path, mutated document) for every one-step change of doc: each key
    dropped, each value replaced by values of other JSON types."""
    others = [None, "x", 1.5, 7, True, [], {}]

    def walk(node, here, setter, deleter):
        if deleter:
            yield here + " dropped", deleter
        for o in others:
            if reference_ai.Schema._type_of(o) != reference_ai.Schema._type_of(node):
                yield f"{here} = {json.dumps(o)}", (lambda o=o: setter(o))
        if isinstance(node, dict):
            for k in list(node):
                yield from walk(node[k], f"{here}.{k}",
                                lambda v, k=k: node.__setitem__(k, v),
                                lambda k=k: node.pop(k))
        elif isinstance(node, list):
            for i in range(len(node)):
                yield from walk(node[i], f"{here}[{i}]",
                                lambda v, i=i: node.__setitem__(i, v), None)

    n = sum(1 for _ in walk(doc, path, lambda v: None, None))
    for i in range(n):
        d = copy.deepcopy(doc)
        holder = {"root": d}
        for j, (what, change) in enumerate(walk(d, path, lambda v: holder.__setitem__("root", v),
                                                None)):
            if j == i:
                change()
                yield what, holder["root"]
                break


class ContractTest(unittest.TestCase):
    """The schemas and their examples, three validators."""

    @classmethod
    def setUpClass(cls):
        cls.raw = {k: load(os.path.join(SCHEMAS, f"{k}.schema.json")) for k in KINDS}
        cls.mirror = reference_ai.load_schemas(SCHEMAS)
        cls.theirs = {k: jsonschema.Draft202012Validator(s) for k, s in cls.raw.items()}
        cls.engine = EngineValidator(SCHEMA_MODULE) if SCHEMA_MODULE else None
        cls.handles = {}
        if cls.engine:
            for k, s in cls.raw.items():
                cls.handles[k], text = cls.engine.compile(s)
                if not cls.handles[k]:
                    raise AssertionError(f"radrelay's validator refuses {k}: {text}")
        else:
            print("radrelay's validator not loaded (no --schema-module): "
                  "checked with jsonschema and the mirror only", flush=True)
        cls.valid = {os.path.basename(p): load(p)
                     for p in sorted(glob.glob(os.path.join(DATA, "valid", "*.json")))}
        cls.invalid = load(os.path.join(DATA, "invalid.json"))

    @classmethod
    def tearDownClass(cls):
        if cls.engine:
            cls.engine.close()

    def verdicts(self, kind, doc):
        """{validator: number of problems} and the mirror's problem paths
        and radrelay's text. The mirror counts problems as radrelay's
        validator does (a failed oneOf is one); jsonschema counts its own
        way."""
        problems = self.mirror[kind].validate(doc)
        out = {"mirror": len(problems), "jsonschema": len(list(self.theirs[kind].iter_errors(doc))),
               "paths": paths(problems)}
        if self.engine:
            out["radrelay"], out["text"] = self.engine.validate(self.handles[kind], doc)
        return out

    def test_1_schemas(self):
        """Draft 2020-12 schemas, descriptions on every property, only the
        keywords radrelay's validator knows (it and the mirror refuse a
        schema with another one)."""
        for k, s in self.raw.items():
            jsonschema.Draft202012Validator.check_schema(s)
            self.assertEqual(s["$schema"], "https://json-schema.org/draft/2020-12/schema")
            self.assertTrue(s.get("description"))

            def props(node, where):
                if isinstance(node, dict):
                    for name, sub in node.get("properties", {}).items():
                        if isinstance(sub, dict) and len(sub) > 1:
                            self.assertTrue(sub.get("description"),
                                            f"{k}: {where}/properties/{name} has no description")
                    for key, sub in node.items():
                        props(sub, f"{where}/{key}")
                elif isinstance(node, list):
                    for i, sub in enumerate(node):
                        props(sub, f"{where}/{i}")
            props(s, "#")
        for extra in ({"not": {}}, {"format": "date-time"}, {"uniqueItems": True},
                      {"pattern": "^\\d+$"}):
            schema = dict({"type": "object"}, **extra)
            with self.assertRaises(ValueError, msg=f"mirror accepts {extra}"):
                reference_ai.Schema(schema)
            if self.engine and "pattern" not in extra:
                handle, text = self.engine.compile(schema)
                self.assertIsNone(handle, f"radrelay accepts {extra}")
                self.assertIn("is not supported", text)

    def test_2_valid_examples(self):
        """Every example of valid/ passes all validators; every kind has
        at least two."""
        self.assertEqual(sorted({kind_of(n) for n in self.valid}), sorted(KINDS))
        for name, doc in self.valid.items():
            v = self.verdicts(kind_of(name), doc)
            self.assertEqual((v["mirror"], v["jsonschema"], v.get("radrelay", 0)), (0, 0, 0),
                             f"{name}: {v}")
            if kind_of(name) == "ai-result":
                self.assertEqual(reference_ai.result_problems(doc, self.mirror["ai-result"]), [])

    def test_3_invalid_examples(self):
        """Every file of invalid/ is in the manifest and fails with every
        validator, the mirror and radrelay's at the path the manifest names."""
        files = sorted(os.path.basename(p)
                       for p in glob.glob(os.path.join(DATA, "invalid", "*.json")))
        self.assertEqual(files, sorted(self.invalid))
        for name, want in self.invalid.items():
            doc = load(os.path.join(DATA, "invalid", name))
            self.assertEqual(kind_of(name), want["schema"], name)
            v = self.verdicts(want["schema"], doc)
            self.assertGreater(v["jsonschema"], 0, f"{name}: jsonschema accepts it")
            self.assertIn(want["at"], v["paths"], f"{name}: mirror {v['paths']}")
            if self.engine:
                self.assertEqual(v["radrelay"], v["mirror"], f"{name}: {v}")
                self.assertTrue(lines_at(v["text"], want["at"]), f"{name}: {v['text']}")

    def test_4_validators_agree_on_mutations(self):
        """Each one-step mutation of each valid example: the three agree on
        valid / invalid; radrelay's and the mirror on where."""
        count = refused = 0
        for name, doc in self.valid.items():
            kind = kind_of(name)
            for what, mutated in mutations(doc):
                v = self.verdicts(kind, mutated)
                count += 1
                refused += bool(v["mirror"])
                self.assertEqual(bool(v["mirror"]), v["jsonschema"] > 0,
                                 f"{name}: {what}: mirror {v['paths']}, jsonschema "
                                 f"{v['jsonschema']} errors")
                if self.engine:
                    self.assertEqual(v["radrelay"], v["mirror"],
                                     f"{name}: {what}: mirror {v['paths']}, radrelay {v['text']}")
                    for p in v["paths"]:
                        self.assertTrue(lines_at(v["text"], p), f"{name}: {what}: {p}")
        print(f"  {count} mutations, {refused} refused", flush=True)
        self.assertGreater(count, 500)
        self.assertGreater(refused, count // 2)

    def test_5_no_patient_identity_in_a_request(self):
        """A request cannot carry the patient's name, birth date, MRN or ID,
        anywhere."""
        base = self.valid["request.json"]
        for key in ("patient_name", "patient_id", "mrn", "birth_date"):
            for where in ((), ("study",), ("order",), ("study", "series", 0)):
                doc = copy.deepcopy(base)
                node = doc
                for step in where:
                    node = node[step]
                node[key] = "ZZTEST"
                v = self.verdicts("ai-request", doc)
                self.assertTrue(v["mirror"] and v["jsonschema"] and v.get("radrelay", 1),
                                f"{key} in {where}: {v}")

    def test_6_multipart(self):
        """The service's multipart/related reader (WADO-RS answers): quoted
        boundary and parameters in any order, preamble, transport padding,
        epilogue, parts without headers; truncated or inconsistent bodies
        are refused."""
        a, b = b"DICM\r\n--not-it\r\n", bytes(range(256))
        body = (b"preamble\r\n--b0.1 \t\r\nContent-Type: application/dicom\r\n"
                b"Content-Length: 16\r\n\r\n" + a + b"\r\n--b0.1\r\n\r\n" + b
                + b"\r\n--b0.1--\r\nepilogue")
        ctype = 'multipart/related; boundary="b0.1"; type="application/dicom"'
        parts = reference_ai.multipart_parts(body, ctype)
        self.assertEqual([p[1] for p in parts], [a, b])
        self.assertEqual(parts[0][0]["content-type"], "application/dicom")
        self.assertEqual(reference_ai.multipart_parts(body, ctype.replace('"b0.1"', "b0.1")),
                         parts)
        for broken, ct in ((body[:body.rindex(b"--b0.1--")], ctype),
                           (body.replace(b"Length: 16", b"Length: 17"), ctype),
                           (body, "application/dicom"),
                           (body, "multipart/related; type=application/dicom"),
                           (body.replace(b"b0.1", b"x"), ctype)):
            with self.assertRaises(ValueError, msg=f"{ct}: {broken[:40]!r}"):
                reference_ai.multipart_parts(broken, ct)


# ---- the service --------------------------------------------------------------

def make_study(out, *extra):
    r = subprocess.run([MAKE_STUDY, "--out", out] + list(extra), capture_output=True,
                       timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"make-study {extra}: {r.stderr.decode()}")
    return json.loads(r.stdout)


def rfc3339(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class Service:
    """tests/peers/reference_ai.py as a command."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, SERVICE, "--port", "0"] + list(args),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + WAIT
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0, left))
            if not ready:
                self.stop()
                raise AssertionError("reference_ai.py printed no ready line")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"reference_ai.py exited: {self.proc.stderr.read().decode()}")
            line += chunk
        self.info = json.loads(line)
        self.url = self.info["url"]

    def stop(self):
        """Closes stdin (how it is told to end); returns the exit status."""
        if self.proc.stdin:
            self.proc.stdin.close()
            self.proc.stdin = None
        try:
            rc = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self.stderr = self.proc.stderr.read().decode()
        self.proc.stderr.close()
        self.proc.stdout.close()
        return rc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        rc = self.stop()
        if rc != 0 and exc[0] is None:
            raise AssertionError(f"reference_ai.py exited {rc}: {self.stderr}")

    def call(self, method, path_or_url, doc=None, headers=None, raw=None):
        """(status, headers, JSON body or None)."""
        url = path_or_url if path_or_url.startswith("http") else self.url + path_or_url
        h = {"Content-Type": "application/json"} if doc is not None or raw is not None else {}
        h.update(headers or {})
        body = raw if raw is not None else (json.dumps(doc).encode() if doc is not None else None)
        req = urllib.request.Request(url, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as r:
                status, rh, data = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, rh, data = e.code, e.headers, e.read()
        return status, rh, (json.loads(data) if data else None)

    def stats(self):
        return self.call("GET", "/stats")[2]


class CallbackReceiver:
    """A small HTTP server that takes results POSTed to /results/<job>:
    refuses the first `refuse` posts with 500, then answers 204."""

    def __init__(self, refuse=0):
        self.received = []      # (path, authorization, body)
        self.refuse = refuse
        self.cond = threading.Condition()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.cond:
                    refuse = outer.refuse > 0
                    outer.refuse -= refuse
                    status = 500 if refuse else 204
                    outer.received.append((self.path, self.headers.get("Authorization"),
                                           self.headers.get("Content-Type"), body, status))
                    outer.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, n):
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.received) >= n, WAIT):
                raise AssertionError(f"{len(self.received)} callbacks, waited for {n}")
            return list(self.received)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class ServiceTest(unittest.TestCase):
    """The reference AI against a private Orthanc."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="rr-refai-")
        t = cls.tmp.name
        cls.studies = {
            "bleed": make_study(f"{t}/bleed", "--bleed", "--seed", "301",
                                "--accession", "RRTEST-ACC-0301", "--patient-id", "RRTEST-PAT-0301"),
            "clean": make_study(f"{t}/clean", "--no-bleed", "--seed", "302",
                                "--accession", "RRTEST-ACC-0302", "--patient-id", "RRTEST-PAT-0302"),
            "small": make_study(f"{t}/small", "--bleed", "--seed", "303", "--size", "128",
                                "--slices", "30", "--thickness", "4",
                                "--bleed-center=-30,-25,10", "--bleed-radius", "7",
                                "--accession", "RRTEST-ACC-0303", "--patient-id", "RRTEST-PAT-0303"),
        }
        cls.pacs = orthanc.Orthanc(os.path.join(t, "orthanc"))
        cls.pacs.start()
        for m in cls.studies.values():
            for f in m["files"]:
                with open(os.path.join(m["out"], f), "rb") as fh:
                    r = cls.pacs.request("POST", "/instances", body=fh.read(),
                                         headers={"Content-Type": "application/dicom"})
                if r.status != 200:
                    raise AssertionError(f"POST /instances: {r!r}")
        cls.schemas = reference_ai.load_schemas(SCHEMAS)
        cls.figures = {}

    @classmethod
    def tearDownClass(cls):
        cls.pacs.stop()
        cls.tmp.cleanup()
        for name, f in sorted(cls.figures.items()):
            print(f"  figures {name}: {json.dumps(f, sort_keys=True)}", flush=True)

    # -- helpers --
    def request_for(self, name, job_id=None, **over):
        """A contract-valid ai-request for one of the stored studies."""
        m = self.studies[name]
        created = datetime.now(timezone.utc)
        n = len(m["files"])
        doc = {
            "schema": "radrelay.ai-request/1",
            "job_id": job_id or f"AJ-{uuid.uuid4().hex[:12]}",
            "endpoint": "hemorrhage",
            "created": rfc3339(created),
            "deadline": rfc3339(created + timedelta(minutes=10)),
            "study": {"study_uid": m["study_instance_uid"], "accession": m["accession_number"],
                      "modality": "CT", "modalities": ["CT"], "body_part": "HEAD",
                      "description": "CT HEAD WO CONTRAST", "study_date": "20240315",
                      "study_time": "083000", "instances": n,
                      "series": [{"series_uid": m["series_instance_uid"], "modality": "CT",
                                  "series_number": 2, "instances": n, "body_part": "HEAD"}]},
            "order": {"priority": "STAT", "reason": "headache, rule out bleed",
                      "procedure": {"code": "CTHEADWO", "text": "CT head without contrast",
                                    "system": "L"}, "patient_class": "E"},
            "images": {"wado_rs": f"{self.pacs.dicomweb_url}/studies/{m['study_instance_uid']}",
                       "auth": {"type": "basic", "username": orthanc.USER,
                                "password": orthanc.PASSWORD}},
        }
        doc.update(over)
        self.assertEqual(self.schemas["ai-request"].validate(doc), [])
        return doc

    def assert_result(self, result, job_id):
        problems = reference_ai.result_problems(result, self.schemas["ai-result"])
        self.assertEqual(problems, [], json.dumps(result))
        self.assertEqual(result["job_id"], job_id)
        if result["status"] == "completed":
            self.assertEqual(result["model"]["name"], "radrelay-reference-hemorrhage")
            self.assertIn("not a medical device", result["model"]["manufacturer"])

    def assert_critical(self, result, name):
        """One critical finding where make-study planted the bleed."""
        m = self.studies[name]
        truth = m["bleed"]
        self.assertEqual(result["status"], "completed")
        self.assertEqual(len(result["findings"]), 1, result)
        f = result["findings"][0]
        self.assertEqual(f["code"], {"system": "SCT", "code": "1386000",
                                     "meaning": "Intracranial hemorrhage"})
        self.assertTrue(f["critical"])
        self.assertEqual(f["acr_category"], 1)
        loc = f["location"]
        self.assertEqual(loc["series_uid"], m["series_instance_uid"])
        self.assertEqual(loc["frame_of_reference_uid"], m["frame_of_reference_uid"])
        self.assertIn(loc["instance_uid"], m["sop_instance_uids"])
        number = m["sop_instance_uids"].index(loc["instance_uid"]) + 1
        self.assertIn(number, truth["instances"])
        off = math.dist(loc["point3d"], truth["center_mm"])
        self.assertLess(off, 3.0, f"found at {loc['point3d']}, planted at {truth['center_mm']}")
        # the 2D point: the planted centre's column and row (SCOORD: +0.5)
        spacing = m["pixel_spacing_mm"]
        first = -spacing * m["columns"] / 2 + spacing / 2
        want = [(truth["center_mm"][0] - first) / spacing + 0.5,
                (truth["center_mm"][1] - first) / spacing + 0.5]
        self.assertLess(math.dist(loc["point"], want), 3.0 / spacing, f"{loc['point']} vs {want}")
        volume = {x["unit"]: x["value"] for x in f["measurements"]}
        planted = truth["voxels"] * truth["voxel_mm3"]
        self.assertLess(abs(volume["mm3"] - planted), 0.15 * planted, f"{volume} vs {planted}")
        self.assertLess(abs(volume["[hnsf'U]"] - truth["hu"]), 5)
        self.assertGreater(f["confidence"], 0.7)
        return f, off

    def analyze(self, svc, doc, headers=None):
        return svc.call("POST", "/analyze", doc, headers)

    # ---- 1 ------------------------------------------------------------------
    def test_1_sync(self):
        """Bleed: critical and where it was planted (two studies of different
        shape); clean: no findings."""
        with Service("--mode", "sync") as svc:
            for name in ("bleed", "small", "clean"):
                doc = self.request_for(name)
                t0 = time.monotonic()
                status, _, result = self.analyze(svc, doc)
                secs = time.monotonic() - t0
                self.assertEqual(status, 200, result)
                self.assert_result(result, doc["job_id"])
                job = svc.stats()["jobs"][doc["job_id"]]["figures"]
                figures = {k: job.get(k) for k in ("cluster_mm3", "candidate_voxels", "fetch_ms",
                                                   "analysis_ms", "slices", "rows", "centre_mm")}
                figures["round_trip_s"] = round(secs, 2)
                if name == "clean":
                    self.assertEqual(result["status"], "completed")
                    self.assertEqual(result["findings"], [])
                    self.assertLess(job["cluster_mm3"], reference_ai.MIN_VOLUME_MM3)
                else:
                    f, off = self.assert_critical(result, name)
                    figures.update(confidence=f["confidence"], offset_mm=round(off, 2),
                                   planted_mm3=round(self.studies[name]["bleed"]["voxels"]
                                                     * self.studies[name]["bleed"]["voxel_mm3"], 1))
                self.figures[name] = figures
            seen = [r for r in svc.stats()["requests"] if r["path"] == "/analyze"]
            self.assertEqual([r["status"] for r in seen], [200, 200, 200])
            self.assertEqual(seen[0]["body"]["study"]["study_uid"],
                             self.studies["bleed"]["study_instance_uid"])

    # ---- 2 ------------------------------------------------------------------
    def test_2_rejected_and_failed(self):
        """Not CT, not head: rejected; images it cannot fetch: failed."""
        with Service() as svc:
            mr = self.request_for("bleed")
            mr["study"].update(modality="MR", modalities=["MR"])
            mr["study"]["series"][0]["modality"] = "MR"
            chest = self.request_for("bleed")
            chest["study"].update(body_part="CHEST", description="CT CHEST")
            for doc, words in ((mr, "not a CT study"), (chest, "not a head study")):
                status, _, result = self.analyze(svc, doc)
                self.assertEqual(status, 200)
                self.assert_result(result, doc["job_id"])
                self.assertEqual(result["status"], "rejected")
                self.assertIn(words, result["error"])
            wrong = self.request_for("bleed")
            wrong["images"]["auth"]["password"] = "not-the-password"
            status, _, result = self.analyze(svc, wrong)
            self.assertEqual(status, 200)
            self.assert_result(result, wrong["job_id"])
            self.assertEqual(result["status"], "failed")
            self.assertIn("HTTP 401", result["error"])

    # ---- 3 ------------------------------------------------------------------
    def test_3_async(self):
        """202 with a status_url; 202 there while the job runs (held 3 s by
        --delay-ms), then 200 with the result; the same job_id again is
        answered from the job, not analysed again."""
        with Service("--mode", "async", "--delay-ms", "3000") as svc:
            doc = self.request_for("bleed")
            status, _, accepted = self.analyze(svc, doc)
            self.assertEqual(status, 202, accepted)
            self.assertEqual(self.schemas["ai-accepted"].validate(accepted), [])
            self.assertEqual(accepted["job_id"], doc["job_id"])
            self.assertTrue(accepted["status_url"].startswith(svc.url + "/"))
            status, _, running = svc.call("GET", accepted["status_url"])
            self.assertEqual((status, running), (202, accepted))
            status, _, again = self.analyze(svc, doc)
            self.assertEqual((status, again), (202, accepted))
            result = wait_for(lambda: (lambda r: r[2] if r[0] == 200 else None)(
                svc.call("GET", accepted["status_url"])), "the async result")
            self.assert_result(result, doc["job_id"])
            self.assert_critical(result, "bleed")
            stats = svc.stats()
            self.assertEqual(list(stats["jobs"]), [doc["job_id"]])
            self.assertEqual(stats["counters"].get("jobs_completed"), 1)
            self.assertEqual(svc.call("GET", "/jobs/AJ-unknown")[0], 404)

    # ---- 4 ------------------------------------------------------------------
    def test_4_callback(self):
        """The result comes to callback.url with the request's token; a
        refused delivery is retried."""
        rx = CallbackReceiver(refuse=1)
        try:
            with Service("--mode", "callback") as svc:
                results = {}
                for name in ("bleed", "clean"):
                    doc = self.request_for(name)
                    token = uuid.uuid4().hex + uuid.uuid4().hex
                    doc["callback"] = {"url": f"{rx.url}/results/{doc['job_id']}", "token": token}
                    self.assertEqual(self.schemas["ai-request"].validate(doc), [])
                    status, _, accepted = self.analyze(svc, doc)
                    self.assertEqual(status, 202, accepted)
                    self.assertEqual(self.schemas["ai-accepted"].validate(accepted), [])
                    self.assertNotIn("status_url", accepted)
                    results[doc["job_id"]] = (name, token)
                got = rx.wait(3)    # one refused + two delivered
                delivered = [g for g in got if g[4] == 204]
                self.assertEqual(len(delivered), 2)
                for path, auth, ctype, body, _ in got:
                    job_id = path.rsplit("/", 1)[1]
                    name, token = results[job_id]
                    self.assertTrue(hmac.compare_digest(auth, f"Bearer {token}"), auth)
                    self.assertEqual(ctype, "application/json")
                    result = json.loads(body)
                    self.assert_result(result, job_id)
                    if name == "bleed":
                        self.assert_critical(result, "bleed")
                    else:
                        self.assertEqual(result["findings"], [])
                # the service records an attempt once its answer is back
                refused_job = got[0][0].rsplit("/", 1)[1]
                attempts = wait_for(lambda: (lambda a: a if len(a) >= 2 else None)(
                    [c for c in svc.stats()["callbacks"] if c["job_id"] == refused_job]),
                    "the second callback attempt in /stats")
                self.assertEqual([(c["attempt"], c["status"]) for c in attempts],
                                 [(1, 500), (2, 204)])
                # callback mode without a callback in the request: 400
                status, _, body = self.analyze(svc, self.request_for("clean"))
                self.assertEqual(status, 400)
                self.assertIn("$.callback", " ".join(body["problems"]))
        finally:
            rx.close()

    # ---- 5 ------------------------------------------------------------------
    def test_5_contract_violations(self):
        """400 with the problems (schema and what it cannot say), 415 for
        another content type; none of them starts a job."""
        with Service() as svc:
            good = self.request_for("clean")
            cases = []
            d = copy.deepcopy(good)
            d["study"]["patient_name"] = "ZZTEST^HEAD"
            cases.append((d, "$.study.patient_name"))
            d = copy.deepcopy(good)
            del d["study"]
            cases.append((d, "$.study"))
            d = copy.deepcopy(good)
            d["created"] = "yesterday"
            cases.append((d, "$.created"))
            d = copy.deepcopy(good)
            d["images"]["wado_rs"] = f"{self.pacs.dicomweb_url}/studies/1.2.3"
            cases.append((d, "$.images.wado_rs"))
            d = copy.deepcopy(good)
            d["deadline"] = d["created"]
            cases.append((d, "$.deadline"))
            for doc, where in cases:
                status, _, body = self.analyze(svc, doc)
                self.assertEqual(status, 400, f"{where}: {body}")
                self.assertTrue(any(p.startswith(where) for p in body["problems"]),
                                f"{where}: {body['problems']}")
            status, _, body = svc.call("POST", "/analyze", raw=b"{not json")
            self.assertEqual(status, 400)
            status, _, body = svc.call("POST", "/analyze", raw=json.dumps(good).encode(),
                                       headers={"Content-Type": "text/plain"})
            self.assertEqual(status, 415)
            self.assertEqual(svc.stats()["jobs"], {})
            status, _, result = self.analyze(svc, good)     # the same service still works
            self.assertEqual((status, result["status"]), (200, "completed"))

    # ---- 6 ------------------------------------------------------------------
    def test_6_token(self):
        """--token-file: 401 without the bearer token or with another."""
        with tempfile.NamedTemporaryFile("w", suffix=".token") as tf:
            token = uuid.uuid4().hex
            tf.write(token + "\n")
            tf.flush()
            with Service("--token-file", tf.name) as svc:
                doc = self.request_for("clean")
                status, headers, _ = self.analyze(svc, doc)
                self.assertEqual(status, 401)
                self.assertTrue(headers.get("WWW-Authenticate", "").startswith("Bearer"))
                status, _, _ = self.analyze(svc, doc, {"Authorization": "Bearer " + token[::-1]})
                self.assertEqual(status, 401)
                status, _, _ = self.analyze(svc, doc, {"Authorization": "Basic " + token})
                self.assertEqual(status, 401)
                self.assertEqual(svc.stats()["jobs"], {})
                status, _, result = self.analyze(svc, doc, {"Authorization": "Bearer " + token})
                self.assertEqual(status, 200, result)
                self.assertEqual(result["status"], "completed")
                seen = [(r["status"], r["authorization"]) for r in svc.stats()["requests"]]
                self.assertEqual(seen, [(401, False), (401, True), (401, True), (200, True)])

    # ---- 7 ------------------------------------------------------------------
    def test_7_fail_first(self):
        """--fail-first 2: two 503s with Retry-After, then the result."""
        with Service("--fail-first", "2") as svc:
            doc = self.request_for("clean")
            for _ in range(2):
                status, headers, body = self.analyze(svc, doc)
                self.assertEqual(status, 503, body)
                self.assertEqual(headers.get("Retry-After"), "1")
            status, _, result = self.analyze(svc, doc)
            self.assertEqual(status, 200)
            self.assert_result(result, doc["job_id"])
            self.assertEqual(svc.stats()["counters"].get("http_503"), 2)


def missing_for_service():
    why = orthanc.missing()
    if why:
        return why
    if reference_ai.IMPORT_ERROR:
        return f"{reference_ai.IMPORT_ERROR} (python3-pydicom, python3-numpy)"
    return None


def main():
    global MAKE_STUDY, SCHEMA_MODULE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contract-only", action="store_true")
    ap.add_argument("--schema-module", help="radrelay's validator as a shared module")
    ap.add_argument("--make-study", default=os.path.join(ROOT, "scripts", "make-study"))
    args, rest = ap.parse_known_args()
    if jsonschema is None:
        print("python3-jsonschema is missing (scripts/setup installs it)", file=sys.stderr)
        return 1
    SCHEMA_MODULE = args.schema_module
    MAKE_STUDY = os.path.abspath(args.make_study)
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    suite.addTests(loader.loadTestsFromTestCase(ContractTest))
    if not args.contract_only:
        why = missing_for_service()
        if why:
            print(f"SKIPPED: {why}; scripts/setup installs what is missing", flush=True)
            return SKIPPED
        suite.addTests(loader.loadTestsFromTestCase(ServiceTest))
    if rest:    # test or class names: run only those
        names = set(rest)
        suite = unittest.TestSuite(t for t in suite
                                   if names & set(t.id().split(".")[-2:]))
    t0 = time.monotonic()
    r = unittest.TextTestRunner(verbosity=2).run(suite)
    bad = len(r.failures) + len(r.errors) + len(r.unexpectedSuccesses)
    passed = r.testsRun - bad - len(r.skipped)
    print(f"took {time.monotonic() - t0:.1f}s", flush=True)
    print(f"{passed} passed, {bad} failed", flush=True)
    return 0 if not bad and r.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

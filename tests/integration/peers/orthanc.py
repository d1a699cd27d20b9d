#!/usr/bin/python3
"""A private Orthanc (Debian's orthanc + orthanc-dicomweb) for tests.

As a module:

    from orthanc import Orthanc, missing
    if missing(): skip(missing())
    with Orthanc(workdir) as pacs:          # started, /system answering
        pacs.dicom_port, pacs.http_port, pacs.aet, pacs.http_url, pacs.dicomweb_url
        pacs.get_json("/studies"); pacs.request("GET", "/dicom-web/studies", ...)

As a command (a PACS for manual runs and for tests written in other
languages): starts one, prints one JSON line with its addresses and
credentials on stdout, and runs until stdin closes:

    orthanc.py [--dir DIR] [--no-auth] [--verbose]

Everything lives in one folder (a new temporary one, or DIR): the
configuration orthanc.json, storage/ and index/, and orthanc.log (Orthanc's
stdout and stderr). The HTTP and DICOM ports are free loopback ports picked at
start (or the ones asked for, http_port= and dicom_port=, when nothing listens
there); Orthanc has no bind-address option, so it listens on every interface
but answers HTTP from loopback only (RemoteAccessAllowed false) and DICOM
associations only from the AEs in DicomModalities at 127.0.0.1
(DicomCheckModalityHost, no DicomAlwaysAllow*), and it checks the called AET.

Known AEs (DicomModalities): RRTEST (the tests' DCMTK tools) and RADRELAY
(the engine), both 127.0.0.1; their ports (for C-MOVE / C-STORE from Orthanc)
are free ports picked at start unless given.

HTTP: basic authentication with USER/PASSWORD below (off with auth=False);
DICOMweb under /dicom-web/ (QIDO-RS, WADO-RS, STOW-RS), WADO-URI under
/wado. Orthanc 1.10 has no DICOM-side TCP_NODELAY option ("TcpNoDelay" is the
HTTP server's); the DICOM server is Debian's DCMTK, built to leave Nagle's
algorithm on, which reads the environment variable TCP_NODELAY=1 to turn it
off: Orthanc is started with it (tcp_nodelay=True) and so should every DCMTK
tool that talks to it (see dcmtk_env()).
"""
import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
USER = "rrtest"
PASSWORD = "rrtest-password"
AET = "ORTHANC"
TEST_AET = "RRTEST"
ENGINE_AET = "RADRELAY"
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                       "/usr/lib/orthanc/libOrthancDicomWeb.so")
START_ATTEMPTS = 3   # a picked port can be taken by someone else before Orthanc binds it


class OrthancError(Exception):
    pass


def orthanc_binary():
    """Path of the Orthanc executable ($RR_ORTHANC, PATH, /usr/sbin) or None.
    /usr/sbin is often not on a normal user's PATH."""
    env = os.environ.get("RR_ORTHANC")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((p for p in ORTHANC_CANDIDATES if os.access(p, os.X_OK)), None)


def dicomweb_plugin():
    """Path of the DICOMweb plugin ($RR_ORTHANC_DICOMWEB or Debian's) or None."""
    env = os.environ.get("RR_ORTHANC_DICOMWEB")
    if env:
        return env if os.path.isfile(env) else None
    return next((p for p in DICOMWEB_CANDIDATES if os.path.isfile(p)), None)


def missing():
    """Why a private Orthanc cannot run here (a message), or None."""
    if not orthanc_binary():
        where = os.environ.get("RR_ORTHANC") or f"PATH, {', '.join(ORTHANC_CANDIDATES)}"
        return f"Orthanc not found in {where} (Debian package orthanc)"
    if not dicomweb_plugin():
        where = os.environ.get("RR_ORTHANC_DICOMWEB") or ", ".join(DICOMWEB_CANDIDATES)
        return f"Orthanc's DICOMweb plugin not found in {where} (Debian package orthanc-dicomweb)"
    return None


def free_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_free(port):
    """Whether nothing accepts connections on the loopback port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) != 0


def dcmtk_env(tcp_nodelay=True):
    """The environment for DCMTK tools talking to it: Debian's DCMTK leaves
    Nagle's algorithm on unless TCP_NODELAY=1."""
    env = dict(os.environ)
    if tcp_nodelay:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    return env


def wait_for(predicate, timeout, what="condition"):
    """Polls predicate until it returns a true value (returned) or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise OrthancError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)  # poll interval, not a synchronisation point


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers    # http.client.HTTPMessage (case-insensitive)
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<HTTP {self.status} {self.headers.get('Content-Type')} {self.body[:200]!r}>"


class Orthanc:
    """One Orthanc process with its own folder. start() returns once its REST
    API answers; stop() (SIGTERM, wait) ends it. Not thread-safe."""

    def __init__(self, workdir=None, auth=True, tcp_nodelay=True, aet=AET,
                 test_port=None, engine_port=None, stable_age=2, verbose=False,
                 extra_config=None, http_port=None, dicom_port=None):
        self._own_tmp = None
        if workdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="rr-orthanc-")
            workdir = self._own_tmp.name
        self.dir = os.path.abspath(workdir)
        self.auth = auth
        self.tcp_nodelay = tcp_nodelay
        self.aet = aet
        self.test_port = test_port
        self.engine_port = engine_port
        self.stable_age = stable_age
        self.verbose = verbose
        self.extra_config = extra_config or {}
        self.config_path = os.path.join(self.dir, "orthanc.json")
        self.log_path = os.path.join(self.dir, "orthanc.log")
        self.http_port = self.dicom_port = None
        self.want_ports = (http_port, dicom_port)   # tried first when free
        self.proc = None
        self.plugin = dicomweb_plugin()

    # -- addresses --
    @property
    def http_url(self):
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb_url(self):
        return f"{self.http_url}/dicom-web"

    @property
    def credentials(self):
        """(user, password), or None when authentication is off."""
        return (USER, PASSWORD) if self.auth else None

    def describe(self):
        """What a client needs, as a dict (the CLI prints it)."""
        return {"pid": self.proc.pid if self.proc else None, "dir": self.dir,
                "host": HOST, "http_port": self.http_port, "http_url": self.http_url,
                "dicomweb_url": self.dicomweb_url, "dicom_port": self.dicom_port,
                "aet": self.aet, "test_aet": TEST_AET, "test_port": self.test_port,
                "engine_aet": ENGINE_AET, "engine_port": self.engine_port,
                "user": USER if self.auth else None,
                "password": PASSWORD if self.auth else None,
                "plugin": self.plugin, "tcp_nodelay": self.tcp_nodelay}

    # -- configuration --
    def config(self):
        def modality(aet, port):
            return {"AET": aet, "Host": HOST, "Port": port, "AllowEcho": True,
                    "AllowFind": True, "AllowGet": True, "AllowMove": True,
                    "AllowStore": True}
        cfg = {
            "Name": "RRTEST-PACS",
            "StorageDirectory": os.path.join(self.dir, "storage"),
            "IndexDirectory": os.path.join(self.dir, "index"),
            "StorageCompression": False,
            "Plugins": [self.plugin],
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "WebDavEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.auth,
            "RegisteredUsers": {USER: PASSWORD} if self.auth else {},
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "UnknownSopClassAccepted": False,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 10,
            "DicomModalities": {"rrtest": modality(TEST_AET, self.test_port),
                                "radrelay": modality(ENGINE_AET, self.engine_port)},
            "StableAge": self.stable_age,
            "OverwriteInstances": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "WadoRoot": "/wado", "Ssl": False},
        }
        cfg.update(self.extra_config)
        return cfg

    # -- process --
    def start(self, timeout=30):
        why = missing()
        if why:
            raise OrthancError(why)
        binary = orthanc_binary()
        for d in ("storage", "index"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        pick_test, pick_engine = self.test_port is None, self.engine_port is None
        last = None
        for attempt in range(START_ATTEMPTS):
            self.http_port, self.dicom_port = (
                want if attempt == 0 and want and port_free(want) else free_port()
                for want in self.want_ports)
            if pick_test:
                self.test_port = free_port()
            if pick_engine:
                self.engine_port = free_port()
            with open(self.config_path, "w") as f:
                json.dump(self.config(), f, indent=2)
            env = dict(os.environ)
            if self.tcp_nodelay:
                env["TCP_NODELAY"] = "1"
            args = [binary] + (["--verbose"] if self.verbose else []) + [self.config_path]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(args, cwd=self.dir, env=env,
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            try:
                wait_for(self._ready, timeout, f"Orthanc answering on {self.http_url}/system")
                return self
            except OrthancError as e:
                last = e
                if self.proc.poll() is None:   # alive but not answering: give up
                    self.stop()
                    raise OrthancError(f"{e}\n{self.log_tail()}") from None
                # it exited (a port taken meanwhile?): try other ports
        raise OrthancError(f"Orthanc did not start ({last}):\n{self.log_tail()}")

    def _ready(self):
        if self.proc.poll() is not None:
            raise OrthancError(f"Orthanc exited with {self.proc.returncode}")
        try:
            r = self.request("GET", "/system", timeout=2)
        except OSError:
            return False
        if r.status != 200:
            return False
        # /system answers once the HTTP server runs; the DICOM server starts
        # before it, so its port accepts by now.
        return r.json()

    def stop(self, timeout=15):
        """SIGTERM and wait; SIGKILL after timeout. Returns the exit status
        (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def close(self):
        self.stop()
        if self._own_tmp:
            self._own_tmp.cleanup()
            self._own_tmp = None

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.close()

    def log_tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # -- HTTP --
    def request(self, method, path, body=None, headers=None, timeout=30, auth=True):
        """One HTTP request to the REST API / DICOMweb (path starts with /).
        auth=False sends no credentials."""
        h = dict(headers or {})
        if auth and self.auth:
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            h["Authorization"] = f"Basic {token}"
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return Response(r.status, r.headers, r.read())
        finally:
            conn.close()

    def get_json(self, path, accept="application/json"):
        r = self.request("GET", path, headers={"Accept": accept})
        if r.status != 200:
            raise OrthancError(f"GET {path}: {r!r}")
        return r.json()

    def post_json(self, path, value):
        r = self.request("POST", path, body=json.dumps(value).encode(),
                         headers={"Content-Type": "application/json"})
        if r.status != 200:
            raise OrthancError(f"POST {path}: {r!r}")
        return r.json()


# ---- multipart/related (DICOMweb) ---------------------------------------------

def content_type_params(value):
    """'multipart/related; type="application/dicom"; boundary=x' ->
    ('multipart/related', {'type': 'application/dicom', 'boundary': 'x'})."""
    parts = value.split(";")
    params = {}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            params[k.strip().lower()] = v
    return parts[0].strip().lower(), params


def multipart_encode(parts, part_type="application/dicom"):
    """Body and Content-Type of a multipart/related of parts (bytes each)."""
    boundary = "rrtest-" + base64.b32encode(os.urandom(10)).decode().lower()
    body = bytearray()
    for p in parts:
        body += (f"--{boundary}\r\nContent-Type: {part_type}\r\n"
                 f"Content-Length: {len(p)}\r\n\r\n").encode()
        body += p + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f'multipart/related; type="{part_type}"; boundary={boundary}'


def multipart_decode(body, content_type):
    """The parts of a multipart/related body: a list of (headers dict with
    lower-case names, bytes). Raises ValueError on anything malformed."""
    mtype, params = content_type_params(content_type)
    if mtype != "multipart/related" or "boundary" not in params:
        raise ValueError(f"not multipart/related with a boundary: {content_type!r}")
    delim = b"--" + params["boundary"].encode()
    pos = body.find(delim)
    if pos < 0:
        raise ValueError("no first boundary")
    parts = []
    while True:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":
            return parts
        if body[pos:pos + 2] != b"\r\n":
            raise ValueError(f"boundary not followed by CRLF at {pos}")
        head_end = body.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            raise ValueError("part headers do not end")
        headers = {}
        for line in body[pos + 2:head_end].decode("latin-1").split("\r\n"):
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            raise ValueError("part does not end with a boundary")
        parts.append((headers, body[head_end + 4:nxt]))
        pos = nxt + 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="folder for config, storage and log (default: temporary)")
    ap.add_argument("--no-auth", action="store_true", help="no HTTP authentication")
    ap.add_argument("--nagle", action="store_true",
                    help="leave Nagle's algorithm on for DICOM (no TCP_NODELAY=1)")
    ap.add_argument("--verbose", action="store_true", help="Orthanc --verbose")
    args = ap.parse_args()
    why = missing()
    if why:
        print(f"orthanc.py: {why}", file=sys.stderr)
        return 1
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    pacs = Orthanc(args.dir, auth=not args.no_auth, tcp_nodelay=not args.nagle,
                   verbose=args.verbose)
    try:
        pacs.start()
    except OrthancError as e:
        print(f"orthanc.py: {e}", file=sys.stderr)
        pacs.close()
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print(json.dumps(pacs.describe()), flush=True)
        while sys.stdin.buffer.read(65536):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        pacs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

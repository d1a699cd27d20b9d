#!/usr/bin/python3
"""A scripted DICOMweb server for the client's error paths (answers Orthanc
does not give on purpose): STOW-RS 409/202/short acknowledgements, QIDO-RS
malformed JSON and 5xx, WADO-RS bodies cut short or malformed.

    dicomweb_peer.py

Listens on a free loopback port, prints "ready port=N" on stdout and serves
until stdin closes. The first path segment picks the answer:

    POST /stow-409-a700/studies   409, one failed instance, FailureReason A700
    POST /stow-202-warn/studies   202, one instance stored with a WarningReason
    POST /stow-202-fail/studies   202, one stored, one failed (C000)
    POST /stow-200-short/studies  200, no instance acknowledged
    POST /stow-200-badjson/...    200 with a body that is not JSON
    GET  /qido-badjson/studies    200 with JSON cut short
    GET  /qido-503/studies        503
    GET  /qido-204/studies        204
    GET  /wado-truncated/...      one whole part, then the connection closes
                                  inside the second
    GET  /wado-stall/...          one whole part and the start of a second,
                                  then nothing more (for cancel) until the
                                  client goes or 60 s pass
    GET  /wado-badheader/...      a part header line without ':'
    GET  /wado-json/...           200 application/json instead of multipart

Request bodies are read whole before answering (and counted: the answer to
every POST carries X-Body-Bytes).
"""
import http.server
import json
import sys
import threading

BOUNDARY = "rrpeer-boundary"


def sq(items):
    return {"vr": "SQ", "Value": items}


def ref(uid, warning=None):
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def failed(uid, reason):
    item = ref(uid)
    item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


STOW = {
    "stow-409-a700": (409, {"00081198": sq([failed("2.25.1", 0xA700)])}),
    "stow-202-warn": (202, {"00081199": sq([ref("2.25.1", 0xB000)])}),
    "stow-202-fail": (202, {"00081199": sq([ref("2.25.1")]),
                            "00081198": sq([failed("2.25.2", 0xC000)])}),
    "stow-200-short": (200, {"00081199": {"vr": "SQ"}}),
}


def part(data):
    return (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n").encode() + data + b"\r\n"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", ctype=None, extra=None):
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = 0
        length = self.headers.get("Content-Length")
        if length is not None:
            n = len(self.rfile.read(int(length)))
        kind = self.path.split("/")[1]
        extra = {"X-Body-Bytes": str(n)}
        if kind == "stow-200-badjson":
            return self.reply(200, b"{\"00081199\": [", "application/dicom+json", extra)
        status, body = STOW.get(kind, (404, {}))
        self.reply(status, json.dumps(body).encode(), "application/dicom+json", extra)

    def do_GET(self):
        kind = self.path.split("/")[1]
        mp = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        if kind == "qido-badjson":
            return self.reply(200, b'[{"0020000D": {"vr": "UI", "Value": ["1.2', "application/dicom+json")
        if kind == "qido-503":
            return self.reply(503, b"busy", "text/plain")
        if kind == "qido-204":
            return self.reply(204)
        if kind == "wado-truncated":
            body = part(b"A" * 1000) + (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n"
                                        ).encode() + b"B" * 500
            return self.reply(200, body, mp)
        if kind == "wado-stall":
            self.reply(200, part(b"A" * 1000) + part(b"B" * 500)[:-100], mp)
            self.wfile.flush()
            self.connection.settimeout(60)
            try:
                self.connection.recv(1)   # returns when the client closes
            except OSError:
                pass
            return None
        if kind == "wado-badheader":
            body = f"--{BOUNDARY}\r\nNoColonHere\r\n\r\ndata\r\n--{BOUNDARY}--\r\n".encode()
            return self.reply(200, body, mp)
        if kind == "wado-json":
            return self.reply(200, b"[]", "application/json")
        self.reply(404)


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"ready port={server.server_address[1]}", flush=True)
    while sys.stdin.buffer.read(65536):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

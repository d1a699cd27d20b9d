#!/usr/bin/python3
"""A notification gateway (pager / secure chat) that receives and prints
radrelay's pages, for the demo, tests and benchmarks: Python's standard
http.server, loopback only.

    gateway.py [--host 127.0.0.1] [--port 0] [--print]

It writes JSON lines on stdout, so a caller can read what arrived:

    {"event": "ready", "port": N, "url": "http://127.0.0.1:N/notify"}
    {"event": "notification", "n": 1, "path": "/notify", "at_ms": ..., "body": {...}}

and, with --print, one line per page on stderr for people:

    gateway: PAGE #1 Intracranial hemorrhage (ACR 1) accession ACC... model ...

HTTP: POST any path with a JSON object (application/json, at most 1 MiB):
200 {"status": "delivered", "n": N}; 415 another content type, 400 not a
JSON object, 413 too large. GET /notifications: every body received so
far, as a JSON array. HTTP/1.1 with keep-alive, one thread per connection.

Delivering a page to people (SMS, secure chat, escalation) is the real
gateway's job: this one stops at "delivered" (the 200). It runs until stdin
closes, or SIGTERM / SIGINT.
"""
import argparse
import http.server
import json
import signal
import sys
import threading
import time

MAX_BODY = 1 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--print", dest="show", action="store_true",
                    help="one line per page on stderr")
    args = ap.parse_args()

    received, lock = [], threading.Lock()
    out_lock = threading.Lock()

    def emit(obj):
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The status line and headers, then the body, are two writes: with
        # Nagle's algorithm on, the body would wait for the client's delayed
        # ACK of the first (~40 ms on Linux).
        disable_nagle_algorithm = True

        def log_message(self, fmt, *a):
            pass

        def _send(self, status, doc):
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.split("?")[0] != "/notifications":
                self._send(404, {"error": "not_found"})
                return
            with lock:
                self._send(200, list(received))

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                self.close_connection = True
                self._send(413, {"error": "too_large"})
                return
            raw = self.rfile.read(n)
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                self._send(415, {"error": "unsupported_media_type"})
                return
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                self._send(400, {"error": "bad_request", "message": "not a JSON object"})
                return
            with lock:
                received.append(body)
                k = len(received)
            self._send(200, {"status": "delivered", "n": k})
            emit({"event": "notification", "n": k, "path": self.path,
                  "at_ms": int(time.time() * 1000), "body": body})
            if args.show:
                what = body.get("finding") or "notification"
                acr = body.get("acr_category")
                line = f"gateway: PAGE #{k} {what}"
                if acr is not None:
                    line += f" (ACR {acr})"
                for key in ("accession", "model"):
                    if body.get(key):
                        line += f" {key} {body[key]}"
                if self.path.split("?")[0] != "/notify":
                    line = f"gateway: got POST {self.path.split('?')[0]} (#{k})"
                print(line, file=sys.stderr, flush=True)

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    emit({"event": "ready", "port": port, "url": f"http://{args.host}:{port}/notify"})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while sys.stdin.buffer.read1(4096):
            pass
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

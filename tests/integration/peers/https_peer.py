#!/usr/bin/env python3
"""HTTPS test peer for tests/integration/test_http_client.c: Python's own
http.server + ssl, requiring a client certificate signed by --ca.

    https_peer.py --cert server.pem --key server.key --ca ca.pem

Listens on an ephemeral loopback port, prints "ready port=N" on stdout and
runs until its stdin closes. HTTP/1.1 with keep-alive. Paths (any method):

    /echo          200; body = the request body; X-Seen-Authorization,
                   X-Seen-Content-Type, X-Seen-Method = what it received
    /status/N      status N, body "status N"
    /delay/MS      200 after MS milliseconds
    /large/N       200 with N bytes, Content-Length
    /chunked/N     200 with N bytes, chunked (no Content-Length)
    /close         closes the connection without answering
    /slow          200 after 50 ms (the concurrency test's workload)
    /stats         JSON: requests (all paths but /stats), active and
                   max_active (/slow requests being answered at once),
                   connections and max_connections (TLS connections at
                   once), counted since the last /stats/reset
    /stats/reset   zeroes the counters
    /flaky/N/WHAT  the first N requests to this exact path get WHAT, later
                   ones are answered like /echo. WHAT: an HTTP status
                   (e.g. /flaky/2/503), delay-MS (200 after MS
                   milliseconds, for client timeouts) or close
    /requests      JSON list of the requests received (all paths but
                   /stats and /requests; the last 10,000): method, path,
                   content_type, authorization, body (its first 64 KiB,
                   as latin-1 text)
"""
import argparse
import json
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
stats = {"requests": 0, "active": 0, "max_active": 0, "connections": 0,
         "max_connections": 0, "open": 0}
flaky_seen = {}  # /flaky/... path -> requests so far
received = []    # what /requests lists
RECEIVED_KEEP = 10000
RECEIVED_BODY = 65536  # bytes of each body kept


def bump(key, peak, delta):
    with lock:
        stats[key] += delta
        if delta > 0:
            stats[peak] = max(stats[peak], stats[key])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        # The handshake runs here, in the connection's thread, so one slow or
        # failing client never holds up the accept loop.
        self.request.settimeout(10)
        self.request.do_handshake()
        bump("open", "max_connections", 1)
        with lock:
            stats["connections"] += 1
        self.counted = True
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            if getattr(self, "counted", False):
                bump("open", "max_connections", -1)

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body, headers=(), content_type="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def handle_any(self):
        body = self.read_body()
        path = self.path
        if path == "/stats":
            with lock:
                out = json.dumps(stats).encode()
            return self.reply(200, out, content_type="application/json")
        if path == "/stats/reset":
            with lock:
                for k in ("requests", "max_active", "connections"):
                    stats[k] = 0
                stats["max_connections"] = stats["open"]
            return self.reply(200, b"reset")
        if path == "/requests":
            with lock:
                out = json.dumps(received).encode()
            return self.reply(200, out, content_type="application/json")
        with lock:
            stats["requests"] += 1
            received.append({"method": self.command, "path": path,
                              "content_type": self.headers.get("Content-Type", ""),
                              "authorization": self.headers.get("Authorization", ""),
                              "body": body[:RECEIVED_BODY].decode("latin-1")})
            del received[:-RECEIVED_KEEP]
        self.route(path, body)

    def route(self, path, body):
        if path.startswith("/flaky/"):
            parts = path.split("/", 3)
            with lock:
                n = flaky_seen.get(path, 0)
                flaky_seen[path] = n + 1
            if len(parts) == 4 and parts[2].isdigit() and n < int(parts[2]):
                what = parts[3]
                if what.startswith("delay-"):
                    time.sleep(int(what[len("delay-"):]) / 1000.0)
                    return self.reply(200, b"late")
                if what == "close":
                    path = "/close"
                else:
                    code = int(what)
                    return self.reply(code, b"status %d" % code)
            else:
                path = "/echo"
        if path == "/echo":
            seen = [("X-Seen-Authorization", self.headers.get("Authorization", "")),
                    ("X-Seen-Content-Type", self.headers.get("Content-Type", "")),
                    ("X-Seen-Method", self.command)]
            return self.reply(200, body, seen,
                              self.headers.get("Content-Type", "application/octet-stream"))
        if path.startswith("/status/"):
            code = int(path[len("/status/"):])
            return self.reply(code, b"status %d" % code)
        if path.startswith("/delay/"):
            time.sleep(int(path[len("/delay/"):]) / 1000.0)
            return self.reply(200, b"late")
        if path == "/slow":
            bump("active", "max_active", 1)
            try:
                time.sleep(0.05)
                return self.reply(200, b"slow")
            finally:
                bump("active", "max_active", -1)
        if path.startswith("/large/"):
            return self.reply(200, b"x" * int(path[len("/large/"):]))
        if path.startswith("/chunked/"):
            n = int(path[len("/chunked/"):])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * 16384
            while n > 0:
                part = chunk[:min(n, len(chunk))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                n -= len(part)
            self.wfile.write(b"0\r\n\r\n")
            return None
        if path == "/close":
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return None
        return self.reply(404, b"no such path")

    do_GET = do_POST = do_PUT = do_DELETE = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ctx):
        self.ctx = ctx
        super().__init__(("127.0.0.1", 0), Handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True,
                                    do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        print("peer: %s: %s" % (type(exc).__name__, exc), file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    a = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    ctx.load_verify_locations(a.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    srv = Server(ctx)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("ready port=%d" % srv.server_address[1], flush=True)
    sys.stdin.read()
    srv.shutdown()


if __name__ == "__main__":
    main()

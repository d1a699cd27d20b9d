#!/usr/bin/env python3
"""The HTTP server (tests/integration/test_http_server.c) driven by
third-party clients: the curl CLI, Python's http.client and ssl, and raw
sockets, over plain TCP and TLS with certificates from scripts/gen-certs.

Every wait is on a condition with a deadline (a socket read with a timeout,
or polling /stats), never a sleep."""
import argparse
import hashlib
import http.client
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

CURL = "/usr/bin/curl"
failures = []
checks = 0


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


def sha(token):
    return hashlib.sha256(token.encode()).hexdigest()


class Server:
    def __init__(self, binary, workdir, name, *args):
        self.log = open(os.path.join(workdir, name + ".log"), "w+")
        self.proc = subprocess.Popen([binary, *args], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port="):
            self.log.seek(0)
            raise SystemExit("server did not start: %r\n%s" % (line, self.log.read()))
        self.port = int(line.strip().split("=")[1])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return rc, text


def raw(port, data, timeout=10, until_close=True, expect=None):
    """Sends data at once on a fresh socket; reads until the server closes
    (or until `expect` responses have fully arrived)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expect is not None and count_responses(out) >= expect:
            break
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def count_responses(buf):
    """Complete HTTP responses (with Content-Length bodies) in buf."""
    n = 0
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return n
        head = buf[:end].decode("latin1")
        length = 0
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        if head.startswith("HTTP/1.1 1"):
            length = 0
        if len(buf) < end + 4 + length:
            return n
        buf = buf[end + 4 + length:]
        n += 1


def split_responses(buf):
    out = []
    while buf:
        end = buf.find(b"\r\n\r\n")
        head = buf[:end].decode("latin1")
        lines = head.split("\r\n")
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        length = int(hdrs.get("content-length", "0"))
        status = int(lines[0].split()[1])
        out.append((status, hdrs, buf[end + 4:end + 4 + length]))
        buf = buf[end + 4 + length:]
    return out


def curl(*args):
    p = subprocess.run([CURL, "-sS", "--max-time", "20", *args], capture_output=True)
    return p.returncode, p.stdout, p.stderr.decode()


def get_stats(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/stats")
    r = c.getresponse()
    body = json.loads(r.read())
    c.close()
    return body


def wait_stats(port, cond, what, timeout=10):
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = get_stats(port)
        if cond(st):
            return st
        # /stats itself is the wait: one round trip per try
    check(False, "%s (last stats %s)" % (what, st))
    return st


def json_error(body, code):
    try:
        j = json.loads(body)
    except ValueError:
        return False
    return j.get("error") == code and isinstance(j.get("message"), str) and set(j) == {
        "error", "message"}


# ---------------------------------------------------------------------------


def test_plain(port, tokens):
    # curl: public route, JSON, HEAD
    rc, out, err = curl("-i", "http://127.0.0.1:%d/health" % port)
    check(rc == 0 and out.startswith(b"HTTP/1.1 200 OK\r\n"), "curl /health: %r %s" % (out, err))
    check(b"Content-Type: application/json\r\n" in out, "curl /health content type")
    check(out.endswith(b'{"status":"ok"}'), "curl /health body")
    rc, out, _ = curl("-I", "http://127.0.0.1:%d/health" % port)
    check(out.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 15" in out, "curl -I /health")

    # http.client: params, percent and plus decoding, principal, keep-alive reuse
    before = get_stats(port)["accepted"]
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(3):
        c.request("GET", "/api/studies/1.2.840%2F" + str(i) + "?acc=A%2B1+x&flag&acc=2",
                  headers={"Authorization": "Bearer " + tokens["viewer"], "X-Thing": "t"})
        r = c.getresponse()
        j = json.loads(r.read())
        check(r.status == 200, "study GET status %d" % r.status)
        check(j["uid"] == "1.2.840/" + str(i) and j["route"] == "/api/studies/{uid}",
              "uid param %r" % j)
        check(j["query"] == [["acc", "A+1 x"], ["flag", ""], ["acc", "2"]], "query %r" % j)
        check(j["principal"] == "dash" and j["role"] == "viewer" and j["thing"] == "t",
              "principal %r" % j)
    c.close()
    after = get_stats(port)["accepted"]
    check(after - before == 2, "keep-alive: one connection for three requests (+1 for stats): "
          "%d" % (after - before))

    # 401, 403, 404, 405
    rc, out, _ = curl("-i", "http://127.0.0.1:%d/api/studies/1" % port)
    check(out.startswith(b"HTTP/1.1 401 "), "401 without token")
    check(b"WWW-Authenticate: Bearer\r\n" in out, "401 WWW-Authenticate")
    check(json_error(out.split(b"\r\n\r\n", 1)[1], "unauthorized"), "401 JSON")
    rc, out, _ = curl("-i", "-H", "Authorization: Bearer not-a-token",
                      "http://127.0.0.1:%d/api/studies/1" % port)
    check(out.startswith(b"HTTP/1.1 401 "), "401 unknown token")
    rc, out, _ = curl("-i", "-X", "POST", "-H", "Authorization: Bearer " + tokens["viewer"],
                      "-H", "Content-Type: application/json", "--data", "{}",
                      "http://127.0.0.1:%d/api/studies/1/complete" % port)
    check(out.startswith(b"HTTP/1.1 403 "), "403 viewer on operator route: %r" % out[:40])
    check(json_error(out.split(b"\r\n\r\n", 1)[1], "forbidden"), "403 JSON")
    rc, out, _ = curl("-i", "http://127.0.0.1:%d/nothing/here" % port)
    check(out.startswith(b"HTTP/1.1 404 ") and json_error(out.split(b"\r\n\r\n", 1)[1],
                                                          "not_found"), "404 JSON")
    rc, out, _ = curl("-i", "-X", "DELETE", "http://127.0.0.1:%d/health" % port)
    check(out.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD\r\n" in out, "405 Allow")
    check(json_error(out.split(b"\r\n\r\n", 1)[1], "method_not_allowed"), "405 JSON")

    # async reply after the program's uv_timer (202 after 50 ms)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/api/studies/1.2.3/complete", body=b'{"source":"pacs"}',
              headers={"Authorization": "Bearer " + tokens["operator"],
                       "Content-Type": "application/json"})
    r = c.getresponse()
    j = json.loads(r.read())
    check(r.status == 202 and j == {"uid": "1.2.3", "by": "ops", "body_bytes": 17},
          "async 202 %d %r" % (r.status, j))
    # 415 and 413 on the same route (1 KiB limit)
    c.request("POST", "/api/studies/1.2.3/complete", body=b"x",
              headers={"Authorization": "Bearer " + tokens["operator"],
                       "Content-Type": "text/plain"})
    r = c.getresponse()
    check(r.status == 415 and json_error(r.read(), "unsupported_media_type"), "415")
    c.close()
    big = b"[" + b"1," * 600 + b"1]"
    p = subprocess.run([CURL, "-sS", "-i", "--max-time", "20", "-H",
                        "Authorization: Bearer " + tokens["admin"], "-H",
                        "Content-Type: application/json", "--data-binary", "@-",
                        "http://127.0.0.1:%d/api/studies/9/complete" % port],
                       input=big, capture_output=True)
    check(p.stdout.startswith(b"HTTP/1.1 413 ") and
          json_error(p.stdout.split(b"\r\n\r\n", 1)[1], "payload_too_large"),
          "413 %r" % p.stdout[:60])

    # 414, 431, 400
    out = raw(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = split_responses(out)
    check(len(resp) == 1 and resp[0][0] == 414 and json_error(resp[0][2], "uri_too_long"),
          "414 %r" % out[:60])
    out = raw(port, b"GET /health HTTP/1.1\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n")
    resp = split_responses(out)
    check(len(resp) == 1 and resp[0][0] == 431 and json_error(resp[0][2], "headers_too_large"),
          "431 %r" % out[:60])
    out = raw(port, b"NOT HTTP AT ALL\r\n\r\n")
    resp = split_responses(out)
    check(len(resp) == 1 and resp[0][0] == 400 and resp[0][1].get("connection") == "close",
          "400 %r" % out[:60])

    # chunked request body (http.client encodes it), echoed back
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/echo", body=iter([b"hello ", b"chunked ", b"world"]),
              headers={"Content-Type": "text/plain"}, encode_chunked=True)
    r = c.getresponse()
    check(r.status == 200 and r.read() == b"hello chunked world", "chunked body")
    c.close()
    # curl with an explicit chunked upload and Expect: 100-continue
    p = subprocess.run([CURL, "-sS", "-i", "--max-time", "20", "-H",
                        "Transfer-Encoding: chunked", "-H", "Expect: 100-continue", "-H",
                        "Content-Type: application/octet-stream", "--data-binary", "@-",
                        "http://127.0.0.1:%d/echo" % port], input=b"z" * 5000,
                       capture_output=True)
    check(b"HTTP/1.1 100 Continue\r\n" in p.stdout, "curl saw 100 Continue: %r" % p.stdout[:80])
    check(p.stdout.endswith(b"z" * 5000) and b"HTTP/1.1 200 OK" in p.stdout, "curl chunked echo")

    # Expect: 100-continue by hand: the 100 comes before the body is sent
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
              b"Expect: 100-continue\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    check(got == b"HTTP/1.1 100 Continue\r\n\r\n", "100 Continue first: %r" % got)
    s.sendall(b"ping")
    got = b""
    while count_responses(got) < 1:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    check(got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"ping"), "body after 100")
    s.close()

    # pipelining: two requests in one write; the slow one is answered first
    out = raw(port, b"GET /slow?ms=150 HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    resp = split_responses(out)
    check([r[0] for r in resp] == [200, 200, 404], "pipelined statuses %r" % [r[0] for r in resp])
    if len(resp) == 3:
        check(json.loads(resp[0][2]) == {"slow": "done", "ms": "150"}, "pipelined first")
        check(json.loads(resp[1][2]) == {"status": "ok"}, "pipelined second")

    # HTTP/1.0: answered and closed
    out = raw(port, b"GET /health HTTP/1.0\r\n\r\n")
    check(out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out, "HTTP/1.0")


def test_slow_clients(port):
    # slow headers: 408 JSON after the header timeout (500 ms), then closed
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    t0 = time.monotonic()
    got = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    elapsed = time.monotonic() - t0
    resp = split_responses(got)
    check(len(resp) == 1 and resp[0][0] == 408 and json_error(resp[0][2], "request_timeout"),
          "408 slow headers %r" % got[:80])
    check(0.3 < elapsed < 5, "408 after the header timeout, not at once: %.2fs" % elapsed)
    s.close()
    # slow body
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    got = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    resp = split_responses(got)
    check(len(resp) == 1 and resp[0][0] == 408, "408 slow body %r" % got[:80])
    s.close()

    # the client goes away before its asynchronous reply
    before = get_stats(port)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_stats(port, lambda st: st["slow_started"] == before["slow_started"] + 1,
               "the slow request is with its handler")
    s.close()
    wait_stats(port, lambda st: st["late_canceled"] == before["late_canceled"] + 1,
               "the late reply was a no-op (UV_ECANCELED)")
    # and the server still answers
    rc, out, _ = curl("http://127.0.0.1:%d/health" % port)
    check(out == b'{"status":"ok"}', "alive after a vanished client")


def test_many_connections(port, n=1000):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 500), hard))
    sel = selectors.DefaultSelector()
    socks = []
    req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

    def round_trip(tag, connect):
        bufs = {}
        for i in range(n):
            # a fresh connection must send its request within the header
            # timeout (500 ms here), so each sends as soon as it is open
            if connect:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            s = socks[i]
            s.sendall(req)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            bufs[s] = b""
        done = 0
        deadline = time.monotonic() + 60
        while done < n and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                s = key.fileobj
                chunk = s.recv(65536)
                if not chunk:
                    sel.unregister(s)
                    done += 1
                    continue
                bufs[s] += chunk
                if count_responses(bufs[s]) == 1:
                    sel.unregister(s)
                    done += 1
        ok = sum(1 for s in socks if split_responses(bufs[s])[:1] and
                 split_responses(bufs[s])[0][0] == 200)
        for s in socks:
            try:
                sel.unregister(s)
            except KeyError:
                pass
            s.setblocking(True)
        check(ok == n, "%s: %d of %d connections answered 200" % (tag, ok, n))

    round_trip("first request", True)
    st = get_stats(port)
    check(st["connections"] >= n + 1, "%d keep-alive connections open: %r" % (n, st))
    round_trip("second request on the same connections", False)
    for s in socks:
        s.close()
    wait_stats(port, lambda st: st["connections"] <= 1, "connections closed")


def test_static(port, static_dir):
    base = "http://127.0.0.1:%d/dashboard" % port
    rc, out, _ = curl("-i", base + "/")
    check(out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"<h1>dashboard</h1>\n"),
          "index.html %r" % out[:60])
    check(b"Content-Type: text/html; charset=utf-8\r\n" in out, "index content type")
    rc, out, _ = curl("-i", base + "/js/app.js")
    check(out.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/javascript" in out,
          "app.js %r" % out[:80])
    hdrs = dict(l.split(": ", 1) for l in out.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:])
    etag, lm = hdrs.get("ETag"), hdrs.get("Last-Modified")
    check(etag and lm, "ETag and Last-Modified")
    rc, out, _ = curl("-i", "-H", "If-None-Match: " + (etag or ""), base + "/js/app.js")
    check(out.startswith(b"HTTP/1.1 304 ") and out.endswith(b"\r\n\r\n"), "304 by ETag %r" % out)
    rc, out, _ = curl("-i", "-H", "If-Modified-Since: " + (lm or ""), base + "/js/app.js")
    check(out.startswith(b"HTTP/1.1 304 "), "304 by date")
    rc, out, _ = curl("-i", "-H", "If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT",
                      base + "/js/app.js")
    check(out.startswith(b"HTTP/1.1 200 "), "200 when modified since")
    rc, out, _ = curl("-I", base + "/js/app.js")
    check(out.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 18" in out, "HEAD static")
    # escapes: the secret beside the served directory must never come out
    for target, want in [(b"/dashboard/../secret.txt", 400),
                         (b"/dashboard/%2e%2e/secret.txt", 400),
                         (b"/dashboard/..%2Fsecret.txt", 404),
                         (b"/dashboard/js/..%2F..%2Fsecret.txt", 404),
                         (b"/dashboard/%2E%2E%2Fsecret.txt", 404),
                         (b"/dashboard/link.txt", 404),
                         (b"/dashboard/.hidden", 404),
                         (b"/dashboard/js", 404)]:
        out = raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = split_responses(out)
        check(len(resp) == 1 and resp[0][0] == want, "%s -> %r" % (target, out[:40]))
        check(b"TOP SECRET" not in out, "%s leaked the secret" % target)
    rc, out, _ = curl("--path-as-is", "-i", base + "/../secret.txt")
    check(b"TOP SECRET" not in out and out.startswith(b"HTTP/1.1 400 "), "curl --path-as-is ..")
    rc, out, _ = curl("-i", "-X", "POST", "--data", "x", base + "/js/app.js")
    check(out.startswith(b"HTTP/1.1 405 "), "POST static 405")


def test_reload(port, tokens, token_file):
    # a new operator token, the viewer dropped
    with open(token_file, "w") as f:
        f.write("admin root %s\noperator ops %s\noperator night.shift %s\n" %
                (sha(tokens["admin"]), sha(tokens["operator"]), sha("tok-night")))
    rc, out, _ = curl("-i", "-X", "POST", "-H", "Authorization: Bearer " + tokens["operator"],
                      "http://127.0.0.1:%d/admin/reload" % port)
    check(out.startswith(b"HTTP/1.1 403 "), "operator may not reload")
    rc, out, _ = curl("-i", "-X", "POST", "-H", "Authorization: Bearer " + tokens["admin"],
                      "http://127.0.0.1:%d/admin/reload" % port)
    check(out.startswith(b"HTTP/1.1 200 "), "admin reload %r" % out[:80])
    rc, out, _ = curl("-i", "-H", "Authorization: Bearer tok-night",
                      "http://127.0.0.1:%d/api/studies/1" % port)
    check(out.startswith(b"HTTP/1.1 200 ") and b'"principal":"night.shift"' in out,
          "new token after reload")
    rc, out, _ = curl("-i", "-H", "Authorization: Bearer " + tokens["viewer"],
                      "http://127.0.0.1:%d/api/studies/1" % port)
    check(out.startswith(b"HTTP/1.1 401 "), "dropped token refused after reload")
    # a broken file: reload fails, the tokens in use stay
    with open(token_file, "w") as f:
        f.write("root admin not-a-hash\n")
    rc, out, _ = curl("-i", "-X", "POST", "-H", "Authorization: Bearer " + tokens["admin"],
                      "http://127.0.0.1:%d/admin/reload" % port)
    check(out.startswith(b"HTTP/1.1 500 ") and b"reload_failed" in out, "bad file refused")
    rc, out, _ = curl("-H", "Authorization: Bearer tok-night",
                      "http://127.0.0.1:%d/api/studies/1" % port)
    check(b'"principal":"night.shift"' in out, "old tokens kept after a failed reload")


def test_tls(binary, workdir, certs, tokens, token_file):
    c = lambda n: os.path.join(certs, n)
    # the server's own copies, replaced by the renewed certificate for reload
    live = os.path.join(workdir, "live")
    os.makedirs(live)
    shutil.copy(c("server.pem"), os.path.join(live, "server.pem"))
    shutil.copy(c("server.key"), os.path.join(live, "server.key"))
    srv = Server(binary, workdir, "tls", "--tokens", token_file, "--cert",
                 os.path.join(live, "server.pem"), "--key", os.path.join(live, "server.key"),
                 "--ca", c("ca.pem"), "--require-client-cert",
                 "--crl", c("crl.pem"), "--allow", "ris.test")
    port = srv.port
    url = "https://127.0.0.1:%d" % port
    try:
        rc, out, err = curl("-i", "--cacert", c("ca.pem"), "--cert", c("client.pem"), "--key",
                            c("client.key"), url + "/health")
        check(rc == 0 and out.startswith(b"HTTP/1.1 200 ") and out.endswith(b'{"status":"ok"}'),
              "curl mTLS /health: %d %r %s" % (rc, out[:60], err))
        rc, out, err = curl("-i", "--cacert", c("ca.pem"), "--cert", c("client.pem"), "--key",
                            c("client.key"), "-H", "Authorization: Bearer " + tokens["admin"],
                            url + "/api/studies/7?x=1")
        check(b'"uid":"7"' in out and b'"principal":"root"' in out, "curl mTLS with token")
        # refused before any request is read: no client cert, not on the allow-list, revoked
        st0 = None
        for name, args in [("no client cert", []),
                           ("not on the allow-list", ["--cert", c("intruder.pem"), "--key",
                                                      c("intruder.key")]),
                           ("revoked", ["--cert", c("revoked.pem"), "--key", c("revoked.key")]),
                           ("other CA", ["--cert", c("other-client.pem"), "--key",
                                         c("other-client.key")])]:
            rc, out, err = curl("-i", "--cacert", c("ca.pem"), *args, url + "/health")
            check(rc != 0 and b"HTTP/1.1" not in out, "TLS refused (%s): %d %r" % (name, rc, out))
        # Python's ssl + http.client, and pipelining over TLS
        ctx = ssl.create_default_context(cafile=c("ca.pem"))
        ctx.load_cert_chain(c("client.pem"), c("client.key"))
        hc = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        for _ in range(2):
            hc.request("GET", "/stats")
            r = hc.getresponse()
            st0 = json.loads(r.read())
            check(r.status == 200, "http.client over mTLS")
        hc.close()
        check(st0 and st0["tls_refused"] == 4, "4 TLS refusals counted: %r" % st0)
        check(st0 and st0["requests"] == 3, "refused clients sent no request: %r" % st0)
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                            server_hostname="localhost")
        s.sendall(b"GET /slow?ms=100 HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n"
                  b"Host: x\r\nConnection: close\r\n\r\n")
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        s.close()
        resp = split_responses(got)
        check([r[0] for r in resp] == [200, 200] and b"slow" in resp[0][2],
              "TLS pipelining %r" % got[:100])
        # plaintext to the TLS port gets no HTTP answer
        out = raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        check(b"HTTP/1.1 200" not in out, "plaintext on the TLS port")

        # reload: the renewed certificate (CN radrelay-2) for new connections
        def server_cn():
            t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                server_hostname="localhost")
            cert = t.getpeercert()
            t.close()
            return dict(x[0] for x in cert["subject"]).get("commonName")

        check(server_cn() == "localhost", "server certificate before reload")
        shutil.copy(c("server2.pem"), os.path.join(live, "server.pem"))
        shutil.copy(c("server2.key"), os.path.join(live, "server.key"))
        hc = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        hc.request("POST", "/admin/reload", headers={"Authorization": "Bearer " + tokens["admin"]})
        r = hc.getresponse()
        check(r.status == 200, "TLS reload: %d %r" % (r.status, r.read()))
        hc.close()
        check(server_cn() == "radrelay-2", "renewed server certificate after reload")
    finally:
        rc, log = srv.stop()
        check(rc == 0, "TLS server exit %d" % rc)
        check("tls_refused" in log and "tls_fail=not_allowed" in log and
              "tls_fail=revoked" in log, "refusals logged")
        if failures:
            print(log[-4000:], file=sys.stderr)


def test_capacity(binary, workdir):
    srv = Server(binary, workdir, "capacity", "--max-connections", "2")
    try:
        a = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        b = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        for s in (a, b):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while count_responses(got) < 1:
                got += s.recv(4096)
            check(got.startswith(b"HTTP/1.1 200 "), "under capacity")
        out = raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = split_responses(out)
        check(len(resp) == 1 and resp[0][0] == 503 and json_error(resp[0][2], "over_capacity"),
              "503 over capacity %r" % out[:80])
        a.close()
        b.close()
    finally:
        rc, log = srv.stop()
        check(rc == 0, "capacity server exit %d" % rc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--gen-certs", required=True)
    ap.add_argument("--connections", type=int, default=1000)
    a = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="rr-http-server-")
    try:
        certs = os.path.join(workdir, "certs")
        subprocess.run([a.gen_certs, certs], check=True)
        tokens = {"viewer": "tok-v-" + os.urandom(8).hex(),
                  "operator": "tok-o-" + os.urandom(8).hex(),
                  "admin": "tok-a-" + os.urandom(8).hex()}
        token_file = os.path.join(workdir, "tokens")
        with open(token_file, "w") as f:
            f.write("# role name sha256(token)\nviewer dash %s\noperator ops %s\n"
                    "admin root %s\n" % (sha(tokens["viewer"]), sha(tokens["operator"]),
                                         sha(tokens["admin"])))
        static_dir = os.path.join(workdir, "www")
        os.makedirs(os.path.join(static_dir, "js"))
        with open(os.path.join(static_dir, "index.html"), "w") as f:
            f.write("<h1>dashboard</h1>\n")
        with open(os.path.join(static_dir, "js", "app.js"), "w") as f:
            f.write("console.log('ok');")
        with open(os.path.join(static_dir, ".hidden"), "w") as f:
            f.write("TOP SECRET hidden\n")
        with open(os.path.join(workdir, "secret.txt"), "w") as f:
            f.write("TOP SECRET\n")
        os.symlink(os.path.join(workdir, "secret.txt"), os.path.join(static_dir, "link.txt"))

        srv = Server(a.server, workdir, "plain", "--tokens", token_file, "--static", static_dir,
                     "--header-timeout", "500", "--body-timeout", "500",
                     "--max-connections", "4096", "--max-per-peer", "4096")
        try:
            test_plain(srv.port, tokens)
            test_slow_clients(srv.port)
            test_static(srv.port, static_dir)
            test_many_connections(srv.port, a.connections)
            test_reload(srv.port, tokens, token_file)
        finally:
            rc, log = srv.stop()
            check(rc == 0, "plain server exit %d" % rc)
            check('route="/api/studies/{uid}"' in log, "access log names the route pattern")
            check("1.2.840" not in "\n".join(l for l in log.splitlines() if "level=info" in l),
                  "no raw path (study UID) in info logs")
            if failures:
                print(log[-4000:], file=sys.stderr)
        # restore a valid token file for the TLS server
        with open(token_file, "w") as f:
            f.write("admin root %s\n" % sha(tokens["admin"]))
        test_tls(a.server, workdir, certs, tokens, token_file)
        test_capacity(a.server, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("%d checks, %d failed" % (checks, len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

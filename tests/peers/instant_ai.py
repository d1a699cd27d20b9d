#!/usr/bin/python3
"""An AI endpoint that answers every request at once with a fixed,
contract-valid result (schemas/ai-result.schema.json), for benchmarks of
radrelay's own latency, where the AI's time is not what is measured. It
looks at no image. NOT A MEDICAL DEVICE, and not a model: the result is
the same whatever the study.

    instant_ai.py [--host 127.0.0.1] [--port 0] [--findings critical|none]

critical (default): one critical finding, SNOMED CT 1386000 "Intracranial
hemorrhage", confidence 0.9, ACR category 1; none: completed without
findings. It prints one JSON line {"url": ..., "port": ...} on stdout when
it listens and serves until stdin closes (or SIGTERM / SIGINT).

HTTP: POST /analyze with an ai-request (application/json): 200 with the
result for its job_id; 400 when the body is not a JSON object with a
job_id. GET /stats: {"requests": N}. HTTP/1.1 keep-alive, a thread per
connection.
"""
import argparse
import http.server
import json
import signal
import sys
import threading
import time

MODEL = {"name": "radrelay-instant-responder", "version": "1",
         "manufacturer": "radrelay test peer (not a medical device)",
         "device_uid": "2.25.247114318874226213766446035329553920386"}
FINDING = {"id": "F1",
           "code": {"system": "SCT", "code": "1386000", "meaning": "Intracranial hemorrhage"},
           "label": "Intracranial hemorrhage", "confidence": 0.9, "critical": True,
           "acr_category": 1}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--findings", choices=("critical", "none"), default="critical")
    args = ap.parse_args()
    findings = [FINDING] if args.findings == "critical" else []
    count, lock = [0], threading.Lock()

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
            if self.path != "/stats":
                self._send(404, {"error": "not_found"})
                return
            with lock:
                self._send(200, {"requests": count[0]})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                req = json.loads(raw)
                job_id = req["job_id"]
            except (ValueError, KeyError, TypeError):
                self._send(400, {"error": "bad_request", "message": "not an ai-request"})
                return
            with lock:
                count[0] += 1
            now = time.time()
            completed = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + \
                f".{int(now * 1000) % 1000:03d}Z"
            self._send(200, {"schema": "radrelay.ai-result/1", "job_id": job_id,
                             "status": "completed", "model": MODEL, "completed": completed,
                             "findings": findings})

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"url": f"http://{args.host}:{port}", "port": port}), flush=True)
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

#!/usr/bin/python3
"""A scripted MLLP receiver that fails some messages the FIRST time it sees
them and accepts every resend: failure injection for radrelay's destination
queue tests (tests/integration/test_queues.py).

    flaky_mllp_peer.py [--port N] [--fail-rate R] [--seed S] [--modes ae,close,silent]

Why not the npm peer (mllp_peer.mjs): that one answers by a prefix of
MSH-10, the same way every time, so an "AE-" message is refused forever
and never arrives. Transient failures (fail once, then take the resend)
need state per control id, which a scripted peer of our own has.

Whether a message's first arrival fails is decided by a hash of (seed,
MSH-10), so a run is reproducible; the mode is picked the same way from
--modes:

    ae      answers AE (MSA-2 = MSH-10)
    close   closes the connection on receipt, no answer
    silent  keeps the connection open and never answers (the sender's ACK
            timeout fires)

Everything else (every resend, and first arrivals not picked) gets AA.
Stdlib only; one thread per connection. Lines on stdout, one write each:

    ready port=N                       listening
    conn n=K                           K-th connection accepted
    msg conn=K id=MSH-10 answer=A      a message received; A = AA, AE, CLOSE, SILENT
    closed n=K                         connection K closed

Exits when stdin reaches end of file (its parent went away) or on SIGTERM.
"""
import argparse
import hashlib
import signal
import socket
import sys
import threading
import time

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
MAX_FRAME = 16 << 20

out_lock = threading.Lock()
seen_lock = threading.Lock()
seen = set()


def say(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def fields(segment):
    return segment.split(segment[3:4] or b"|")


def ack(msg, code):
    """An original-mode ACK for msg (bytes of one HL7 message)."""
    msh = fields(msg.split(CR, 1)[0])
    get = lambda n: msh[n - 1].decode("latin-1") if len(msh) >= n else ""  # noqa: E731
    # fields()[0] is "MSH", [1] the encoding characters: MSH-n is index n-1.
    ts = time.strftime("%Y%m%d%H%M%S")
    text = (f"MSH|^~\\&|{get(5)}|{get(6)}|{get(3)}|{get(4)}|{ts}||ACK|ACK{get(10)}|P|{get(12)}\r"
            f"MSA|{code}|{get(10)}\r")
    return SB + text.encode("latin-1") + EB + CR


def control_id(msg):
    msh = fields(msg.split(CR, 1)[0])
    return msh[9].decode("latin-1") if len(msh) > 9 else ""


class Peer:
    def __init__(self, rate, seed, modes):
        self.rate = rate
        self.seed = seed
        self.modes = modes
        self.nconn = 0

    def first_answer(self, cid):
        h = hashlib.sha256(f"{self.seed}:{cid}".encode()).digest()
        if int.from_bytes(h[:8], "big") / 2.0**64 >= self.rate:
            return "AA"
        return self.modes[h[8] % len(self.modes)]

    def serve(self, sock, k):
        buf = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_FRAME:
                    return
                while True:
                    start = buf.find(SB)
                    end = buf.find(EB + CR, start + 1)
                    if start < 0 or end < 0:
                        break
                    msg, buf = buf[start + 1:end], buf[end + 2:]
                    cid = control_id(msg)
                    with seen_lock:
                        first = cid not in seen
                        seen.add(cid)
                    answer = self.first_answer(cid) if first else "AA"
                    if answer in ("ae", "close", "silent"):
                        answer = answer.upper()
                    say(f"msg conn={k} id={cid} answer={answer}")
                    if answer == "CLOSE":
                        return
                    if answer == "SILENT":
                        continue
                    sock.sendall(ack(msg, answer))
        except OSError:
            pass
        finally:
            sock.close()
            say(f"closed n={k}")

    def run(self, lsock):
        while True:
            s, _ = lsock.accept()
            self.nconn += 1
            say(f"conn n={self.nconn}")
            threading.Thread(target=self.serve, args=(s, self.nconn), daemon=True).start()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--fail-rate", type=float, default=0.1)
    ap.add_argument("--seed", default="1")
    ap.add_argument("--modes", default="ae,close,silent")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    if not modes or any(m not in ("ae", "close", "silent") for m in modes):
        ap.error("--modes: a comma-separated list of ae, close, silent")
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", a.port))
    lsock.listen(128)
    peer = Peer(a.fail_rate, a.seed, modes)
    threading.Thread(target=peer.run, args=(lsock,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    say(f"ready port={lsock.getsockname()[1]}")
    sys.stdin.read()


if __name__ == "__main__":
    main()

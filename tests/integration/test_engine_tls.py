#!/usr/bin/python3
"""radrelay's MLLP listener over (mutual) TLS, driven by third-party clients.

The HL7/MLLP client is python-hl7's hl7.client.MLLPClient (Debian's
python3-hl7) with its socket wrapped by Python's ssl module (OpenSSL), so the
framing and ACK handling are code we did not write. Certificates come from
scripts/gen-certs, made fresh in a temporary folder for every run. Refusals
are checked on both sides: the client gets no ACK, the engine logs
tls_refused with the reason, and nothing reaches the journal.

usage: test_engine_tls.py --radrelay PATH --data tests/data/hl7 --gen-certs scripts/gen-certs
"""
import argparse
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_engine_mllp as base  # noqa: E402  (helpers: Engine, framing, ACK parsing)

import hl7.client  # noqa: E402

GEN_CERTS = None
PKI = None


def client_ctx(cert=None, ca="ca.pem", tls_max=None, tls_min=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(PKI, ca))
    if cert:
        ctx.load_cert_chain(os.path.join(PKI, cert + ".pem"), os.path.join(PKI, cert + ".key"))
    if tls_max:
        ctx.maximum_version = tls_max
    if tls_min:
        ctx.minimum_version = tls_min
    return ctx


def tls_mllp_client(port, ctx, server_hostname="localhost"):
    """python-hl7's MLLP client, its socket wrapped in TLS."""
    c = hl7.client.MLLPClient(base.HOST, port)
    c.socket = ctx.wrap_socket(c.socket, server_hostname=server_hostname)
    c.socket.settimeout(base.IO_TIMEOUT)
    return c


def recv_all(sock, want_frames=1):
    buf = b""
    while buf.count(base.EB + base.CR) < want_frames:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


class TlsTest(unittest.TestCase):
    setUp = base.EngineTest.setUp
    tearDown = base.EngineTest.tearDown
    engine = base.EngineTest.engine
    channel = staticmethod(base.EngineTest.channel)
    stop_ok = base.EngineTest.stop_ok

    def tls_channel(self, name="orders", allow=("ris.test",), crl=False, **tls):
        ch = self.channel(name, accept=("ADT^A01", "ADT^A04", "ADT^A08", "ORM^O01", "OMI^O23",
                                        "ORU^R01", "ADT^A31", "ADT^A40"))
        t = {"cert": os.path.join(PKI, "server.pem"), "key": os.path.join(PKI, "server.key"),
             "ca": os.path.join(PKI, "ca.pem")}
        if allow:
            t["allow"] = list(allow)
        if crl:
            t["crl"] = os.path.join(PKI, "crl.pem")
        t.update(tls)
        ch["source"]["tls"] = t
        return ch

    # ---- 1 ----------------------------------------------------------------
    def test_1_corpus_over_mutual_tls_13_and_12(self):
        e = self.engine([self.tls_channel()]).start()
        msgs = []
        for name in ("adt_a01.hl7", "adt_a04.hl7", "orm_o01.hl7", "omi_o23.hl7", "oru_r01.hl7",
                     "escapes.hl7", "latin1.hl7", "custom_delims.hl7"):
            with open(os.path.join(base.DATA, name), "rb") as f:
                msgs += base.split_messages(f.read())
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            with self.subTest(version=version.name):
                ctx = client_ctx("client", tls_max=version, tls_min=version)
                with tls_mllp_client(e.port(), ctx) as c:
                    self.assertEqual(c.socket.version(), version.name.replace("v1_", "v1."))
                    for m in msgs:
                        ack = base.parse_ack(base.unframe(c.send_message(m)))
                        code, ref = base.msa(ack)
                        self.assertIn(code, ("AA", "CA"))
                        self.assertEqual(ref, base.fld(base.msh(m), 10))
        e.wait_log("event=tls_established", 'identity="ris.test"', "version=TLSv1.2")
        self.stop_ok(e)
        # the second round resends the same messages: answered, not stored again
        self.assertEqual(len(e.rows()), len(msgs))

    # ---- 2 ----------------------------------------------------------------
    def test_2_refused_clients_never_reach_hl7(self):
        e = self.engine([self.tls_channel(crl=True)]).start()
        cases = [
            ("no client certificate", None, "ca.pem", "no_cert"),
            ("certificate from another CA", "other-client", "ca.pem", "unknown_ca"),
            ("expired certificate", "expired", "ca.pem", "expired"),
            ("revoked certificate", "revoked", "ca.pem", "revoked"),
            ("valid, not on the allow-list", "intruder", "ca.pem", "not_allowed"),
        ]
        for what, cert, ca, reason in cases:
            with self.subTest(what):
                before = len([l for l in e.snapshot() if "event=tls_refused" in l])
                ctx = client_ctx(cert, ca)
                got = b""
                try:
                    with tls_mllp_client(e.port(), ctx) as c:
                        # TLS 1.3 ends the client's handshake before the server
                        # has judged its certificate: the refusal comes back on
                        # the first read, and the message must not be taken.
                        c.socket.sendall(base.frame(base.make_msg(f"REFUSED-{reason}")))
                        got = recv_all(c.socket)
                except (ssl.SSLError, ConnectionError, OSError):
                    pass
                self.assertEqual(got, b"", f"{what}: got an answer")
                base.wait_for(lambda: len([l for l in e.snapshot()
                                           if "event=tls_refused" in l]) > before, 10,
                              f"tls_refused for {what}")
                line = [l for l in e.snapshot() if "event=tls_refused" in l][before]
                self.assertIn(f"tls_fail={reason}", line)
                self.assertIn("reason=", line)
        # plain MLLP on the TLS port: refused too
        with socket.create_connection((base.HOST, e.port()), timeout=base.IO_TIMEOUT) as s:
            s.sendall(base.frame(base.make_msg("PLAIN-0001")))
            self.assertEqual(recv_all(s), b"")
        e.wait_log("event=tls_refused", "not speaking TLS")
        self.stop_ok(e)
        self.assertEqual(e.rows(), [], "no refused client's message reached the journal")

    # ---- 3 ----------------------------------------------------------------
    def test_3_old_protocol_versions_refused(self):
        e = self.engine([self.tls_channel(allow=())]).start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
            ctx = client_ctx("client", tls_max=ssl.TLSVersion.TLSv1_1)
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        with self.assertRaises((ssl.SSLError, ConnectionError, OSError)):
            with tls_mllp_client(e.port(), ctx) as c:
                c.send_message(base.make_msg("OLD-0001"))
        e.wait_log("event=tls_refused", "tls_fail=protocol_version")
        self.stop_ok(e)

    # ---- 4 ----------------------------------------------------------------
    def test_4_sender_checks_the_server_name(self):
        """radrelay's own sender refuses a server whose certificate does not
        name the host it was asked to reach."""
        e = self.engine([self.tls_channel()]).start()
        msg = os.path.join(base.DATA, "adt_a01.hl7")
        common = [base.RADRELAY, "send", "--ca", os.path.join(PKI, "ca.pem"),
                  "--cert", os.path.join(PKI, "client.pem"),
                  "--key", os.path.join(PKI, "client.key")]
        bad = subprocess.run(common + ["--server-name", "wrong.test", f"127.0.0.1:{e.port()}", msg],
                             capture_output=True, text=True, timeout=30)
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn("hostname", bad.stderr)
        good = subprocess.run(common + [f"localhost:{e.port()}", msg], capture_output=True,
                              text=True, timeout=30)
        self.assertEqual(good.returncode, 0, good.stderr)
        self.stop_ok(e)
        self.assertEqual(len(e.rows()), 1)

    # ---- 5 ----------------------------------------------------------------
    def test_5_sighup_reloads_certificates_without_dropping_connections(self):
        live = os.path.join(self.tmp.name, "live")
        os.makedirs(live)
        for f in ("server.pem", "server.key"):
            shutil.copy2(os.path.join(PKI, f), os.path.join(live, f))
        e = self.engine([self.tls_channel(cert=os.path.join(live, "server.pem"),
                                          key=os.path.join(live, "server.key"))]).start()
        old = tls_mllp_client(e.port(), client_ctx("client"))
        self.assertEqual(old.socket.getpeercert()["subject"][0][0][1], "localhost")
        base.unframe(old.send_message(base.make_msg("HUP-0001")))
        # Renewed certificate in place, then SIGHUP.
        for src, dst in (("server2.pem", "server.pem"), ("server2.key", "server.key")):
            shutil.copy2(os.path.join(PKI, src), os.path.join(live, dst + ".new"))
            os.replace(os.path.join(live, dst + ".new"), os.path.join(live, dst))
        e.proc.send_signal(signal.SIGHUP)
        e.wait_log("event=tls_reloaded", "channel=orders")
        with tls_mllp_client(e.port(), client_ctx("client")) as new:
            self.assertEqual(new.socket.getpeercert()["subject"][0][0][1], "radrelay-2")
            base.unframe(new.send_message(base.make_msg("HUP-0002")))
        # the connection made before the reload still works
        ack = base.parse_ack(base.unframe(old.send_message(base.make_msg("HUP-0003"))))
        self.assertEqual(base.msa(ack)[1], "HUP-0003")
        old.close()
        # A broken file on reload: the old certificate stays.
        with open(os.path.join(live, "server.pem"), "w") as f:
            f.write("not a certificate\n")
        e.proc.send_signal(signal.SIGHUP)
        e.wait_log("event=tls_reload_failed", "channel=orders")
        with tls_mllp_client(e.port(), client_ctx("client")) as again:
            self.assertEqual(again.socket.getpeercert()["subject"][0][0][1], "radrelay-2")
        self.stop_ok(e)
        self.assertEqual([r["control_id"] for r in e.rows()], ["HUP-0001", "HUP-0002", "HUP-0003"])


def main():
    global GEN_CERTS, PKI
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", default=os.environ.get("RADRELAY"))
    ap.add_argument("--data", default=os.environ.get("RR_DATA_HL7"))
    ap.add_argument("--gen-certs", required=True)
    args, rest = ap.parse_known_args()
    base.RADRELAY = os.path.abspath(args.radrelay)
    base.DATA = os.path.abspath(args.data)
    GEN_CERTS = os.path.abspath(args.gen_certs)
    with tempfile.TemporaryDirectory(prefix="rr-pki-") as d:
        PKI = d
        subprocess.run([GEN_CERTS, d], check=True)
        prog = unittest.main(module=__name__, argv=[sys.argv[0], "-v"] + rest, exit=False)
    r = prog.result
    bad = {getattr(t, "test_case", t).id() for t, _ in r.failures + r.errors}
    print(f"{r.testsRun - len(bad)} passed, {len(bad)} failed", flush=True)
    return 0 if not bad and r.testsRun else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The REST API's routes and roles, /ready and /metrics, with the real
binary and the bundled orders and reports channels:

1. every route answers 401 without a token (public ones excepted), 403 for
   a token below its role, and not 401/403 with the role it needs;
2. GET /ready is 200 while the engine runs;
3. GET /metrics is Prometheus text that the Prometheus client library's
   own parser (Debian's python3-prometheus-client) reads, and its figures
   are the engine's: messages received and accepted per channel after a
   feed sent with python-hl7's MLLP client, one ACK latency observation
   per message, queue depth per destination, store commits.

Run: test_admin_api.py --radrelay build/radrelay (exits 77 without
python3-hl7 or python3-prometheus-client)."""
import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_study_matching import orm, send_hl7, wait_for  # noqa: E402

SKIP = 77
ADT = ("MSH|^~\\&|ADT_SIM|RRTEST_HOSP|RADRELAY|RRTEST|202611280700||ADT^A04|RRADM-ADT1|P|2.5\r"
       "EVN|A04|202611280700\r"
       "PID|1||RRPAT-ADM1^^^RRTEST_HOSP^MR||ZZTEST^ADMIN||19700101|F\r"
       "PV1|1|E|ED^BAY1^1\r")
HOST = "127.0.0.1"
TOKENS = {"viewer": "rr-test-token-viewer-admin-0001",
          "operator": "rr-test-token-operator-admin-0001",
          "admin": "rr-test-token-admin-admin-0001"}
RANK = {None: 0, "viewer": 1, "operator": 2, "admin": 3}

# (method, path, role needed or None for public)
ROUTES = [
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/metrics", "viewer"),
    ("GET", "/api/studies/2.25.1", "viewer"),
    ("GET", "/api/orders/RRACC-ADM1", "viewer"),
    ("GET", "/api/ai/jobs/AJ-1", "viewer"),
    ("GET", "/api/ai/jobs?state=completed", "viewer"),
    ("GET", "/api/ai/summary", "viewer"),
    ("GET", "/api/worklist", "viewer"),
    ("GET", "/api/messages?channel=orders", "viewer"),
    ("GET", "/api/messages/1", "viewer"),
    ("GET", "/api/timeline?accession=RRACC-ADM1", "viewer"),
    ("GET", "/api/notifications", "viewer"),
    ("GET", "/api/notifications/N-0000000000000000", "viewer"),
    ("POST", "/api/notifications/N-0000000000000000/ack", "operator"),
    ("POST", "/api/studies/2.25.1/complete", "operator"),
    ("POST", "/api/sources/imaging/notify", "operator"),
    ("GET", "/api/channels", "viewer"),
    ("POST", "/api/channels/nosuch/stop", "operator"),
    ("POST", "/api/channels/nosuch/start", "operator"),
    ("POST", "/api/channels/nosuch/reload", "admin"),
    ("GET", "/api/queues", "viewer"),
    ("GET", "/api/queues/orders.patient_index", "viewer"),
    ("POST", "/api/queues/nosuch.dest/retry", "operator"),
    ("POST", "/api/queues/nosuch.dest/drop", "operator"),
    ("POST", "/api/replay", "operator"),
    ("GET", "/api/audit?limit=1", "admin"),
    ("GET", "/api/audit/verify", "admin"),
]


def call(port, method, path, token=None, body=None):
    c = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        h = {}
        if token:
            h["Authorization"] = f"Bearer {token}"
        if body is not None:
            h["Content-Type"] = "application/json"
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radrelay", required=True)
    args = ap.parse_args()
    for mod in ("hl7", "prometheus_client"):
        if subprocess.run(["/usr/bin/python3", "-c", "import " + mod],
                          capture_output=True).returncode != 0:
            print(f"SKIPPED: {mod} not importable by /usr/bin/python3")
            return SKIP
    from prometheus_client.parser import text_string_to_metric_families
    with tempfile.TemporaryDirectory(prefix="rr-admin-") as tmp:
        ch = os.path.join(tmp, "channels")
        os.makedirs(ch)
        shutil.copytree(os.path.join(ROOT, "channels", "lib"), os.path.join(ch, "lib"))
        for name in os.listdir(os.path.join(ROOT, "channels")):
            if name.endswith(".csv"):  # lookup tables of the scripts
                shutil.copy(os.path.join(ROOT, "channels", name), ch)
        for name in ("orders", "reports"):
            shutil.copy(os.path.join(ROOT, "channels", name + ".lua"), ch)
            with open(os.path.join(ROOT, "channels", name + ".json")) as f:
                c = json.load(f)
            c["source"]["port"] = 0
            with open(os.path.join(ch, name + ".json"), "w") as f:
                json.dump(c, f)
        with open(os.path.join(tmp, "tokens"), "w") as f:
            for role, tok in TOKENS.items():
                f.write(f"{role} test-{role} {hashlib.sha256(tok.encode()).hexdigest()}\n")
        config = os.path.join(tmp, "radrelay.json")
        with open(config, "w") as f:
            json.dump({"store": {"path": "store/radrelay.db"}, "channels": "channels",
                       "http": {"host": HOST, "port": 0, "token_file": "tokens"}}, f)
        lines, lock = [], threading.Lock()
        proc = subprocess.Popen([args.radrelay, "run", "-c", config], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def read():
            for line in proc.stderr:
                with lock:
                    lines.append(line.rstrip("\n"))
        threading.Thread(target=read, daemon=True).start()

        def grep(*needles):
            with lock:
                return [l for l in lines if all(n in l for n in needles)]
        try:
            wait_for(lambda: grep("event=api_ready"), 20, "the API ready")
            port = int(grep("event=api_ready")[0].split("port=")[1].split()[0])
            orders_port = int(grep("event=ready", "channel=orders")[0].split("port=")[1].split()[0])

            # ---- 1. roles
            for method, path, need in ROUTES:
                body = "{}" if method == "POST" else None
                for role in (None, "viewer", "operator", "admin"):
                    st, _, data = call(port, method, path, TOKENS.get(role), body)
                    if need is None or RANK[role] >= RANK[need]:
                        assert st not in (401, 403), (method, path, role, st, data)
                    elif role is None:
                        assert st == 401, (method, path, role, st)
                        assert json.loads(data)["error"] == "unauthorized", data
                    else:
                        assert st == 403, (method, path, role, st)
                        assert json.loads(data)["error"] == "forbidden", data

            # ---- 2. ready
            st, ctype, data = call(port, "GET", "/ready")
            assert st == 200 and json.loads(data)["status"] == "ready", data

            # ---- 3. metrics after a feed
            msgs = [orm(f"RRADM-{i}", "NW", f"RRACC-ADM{i}", f"RRPAT-ADM{i}", "CT", "R",
                        "HEADACHE", "202611280800") for i in range(1, 6)]
            acks = send_hl7(orders_port, msgs)
            assert all("MSA|AA|" in (a.decode() if isinstance(a, bytes) else a) for a in acks)
            st, ctype, data = call(port, "GET", "/metrics", TOKENS["viewer"])
            assert st == 200 and ctype.startswith("text/plain; version=0.0.4"), (st, ctype)
            fams = {f.name: f for f in text_string_to_metric_families(data.decode())}

            def value(fam, sample, **labels):
                for s in fams[fam].samples:
                    if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                        return s.value
                raise AssertionError(f"no {sample} {labels} in {fam}")
            assert value("radrelay_channel_messages", "radrelay_channel_messages_total",
                         channel="orders", outcome="received") == 5
            assert value("radrelay_channel_messages", "radrelay_channel_messages_total",
                         channel="orders", outcome="accepted") == 5
            assert value("radrelay_channel_messages", "radrelay_channel_messages_total",
                         channel="reports", outcome="received") == 0
            assert value("radrelay_ack_latency_seconds", "radrelay_ack_latency_seconds_count",
                         channel="orders") == 5
            assert value("radrelay_ack_latency_seconds", "radrelay_ack_latency_seconds_bucket",
                         channel="orders", le="+Inf") == 5
            assert value("radrelay_store_commits", "radrelay_store_commits_total") >= 1
            assert value("radrelay_ready", "radrelay_ready") == 1
            # an ADT routed to the patient index waits in its queue (nobody listens there)
            acks = send_hl7(orders_port, [ADT])
            assert "MSA|AA|" in (acks[0].decode() if isinstance(acks[0], bytes) else acks[0])

            def depth():
                _, _, d = call(port, "GET", "/metrics", TOKENS["viewer"])
                for f in text_string_to_metric_families(d.decode()):
                    for s in f.samples:
                        if s.name == "radrelay_queue_depth" and s.labels == {
                                "destination": "orders.patient_index", "state": "pending"}:
                            return s.value
                return 0
            wait_for(lambda: depth() == 1, 20, "the ADT in the patient index's queue")

            # ---- 4. message search, detail, timeline
            def get(path):
                st, _, d = call(port, "GET", path, TOKENS["viewer"])
                assert st == 200, (path, st, d)
                return json.loads(d)
            found = get("/api/messages?mrn=RRPAT-ADM3")["messages"]
            assert [m["control_id"] for m in found] == ["RRADM-3"], found
            assert get("/api/messages?accession=RRACC-ADM2")["messages"][0]["control_id"] == \
                "RRADM-2"
            assert len(get("/api/messages?control_id=RRADM-ADT1")["messages"]) == 1
            assert len(get("/api/messages?channel=orders")["messages"]) == 6
            assert get("/api/messages?channel=reports")["messages"] == []
            assert len(get("/api/messages?status=accepted&type=ORM^O01")["messages"]) == 5
            # paging: 6 messages, 4 then 2, newest first, no overlap
            p1 = get("/api/messages?channel=orders&limit=4")
            assert len(p1["messages"]) == 4 and p1["next_before"] is not None
            p2 = get(f"/api/messages?channel=orders&limit=4&before={p1['next_before']}")
            assert len(p2["messages"]) == 2 and p2["next_before"] is None, p2
            ids = [m["id"] for m in p1["messages"] + p2["messages"]]
            assert len(set(ids)) == 6 and ids == sorted(ids, reverse=True), ids
            st, _, d = call(port, "GET", "/api/messages?since=abc", TOKENS["viewer"])
            assert st == 400 and json.loads(d)["error"] == "bad_query"
            (adt,) = get("/api/messages?control_id=RRADM-ADT1")["messages"]
            detail = get(f"/api/messages/{adt['id']}")
            assert detail["raw"].startswith("MSH|") and "MSA|AA|RRADM-ADT1" in detail["ack"]
            assert [q["destination"] for q in detail["queued"]] == ["orders.patient_index"]
            assert detail["queued"][0]["payload"].startswith("MSH|"), detail["queued"]
            assert isinstance(detail["deliveries"], list)
            st, _, _ = call(port, "GET", "/api/messages/999999", TOKENS["viewer"])
            assert st == 404
            tl = get("/api/timeline?accession=RRACC-ADM1")
            kinds = [ev["event"] for ev in tl["events"]]
            assert "order" in kinds and "message" in kinds, tl
            assert [ev["at_ms"] for ev in tl["events"]] == sorted(ev["at_ms"] for ev in tl["events"])

            # ---- 5. operators' controls: queues, replay, channels, audit
            def post(path, body, role="operator"):
                st, _, d = call(port, "POST", path, TOKENS[role], json.dumps(body))
                return st, json.loads(d) if d else None
            qs = {q["destination"]: q for q in get("/api/queues")["queues"]}
            pi = qs["orders.patient_index"]
            assert pi["pending"] == 1 and pi["kind"] == "mllp" and pi["configured"], pi
            (row,) = get("/api/queues/orders.patient_index")["rows"]
            assert row["message_id"] == adt["id"] and row["state"] == "pending", row
            # a pending row in back-off is tried again now (409 while in flight)
            assert post("/api/queues/orders.patient_index/retry", {"id": row["id"]})[0] in (200,
                                                                                          409)
            assert post("/api/queues/orders.patient_index/retry", {"id": 987654})[0] == 404
            assert post("/api/queues/orders.patient_index/retry", {"all_dead": True})[0] == 200
            assert post("/api/queues/orders.patient_index/drop", {})[0] == 400
            st, r = post("/api/queues/orders.patient_index/drop", {"id": row["id"]})
            assert st in (200, 409), (st, r)  # 409: being delivered at that moment
            if st == 200:
                wait_for(lambda: get("/api/queues/orders.patient_index")["rows"] == [], 10,
                         "the row dropped")
            st, r = post("/api/replay", {"message_id": adt["id"],
                                         "destination": "orders.patient_index"})
            assert st == 200 and r["queued"] == 1, (st, r)
            assert post("/api/replay", {"message_id": 999999,
                                        "destination": "orders.patient_index"})[0] == 404
            assert post("/api/replay", {"message_id": adt["id"],
                                        "destination": "nosuch.dest"})[0] == 404
            chans = {c["name"]: c for c in get("/api/channels")["channels"]}
            assert chans["orders"]["state"] == "running" and chans["orders"]["messages"][
                "received"] == 6, chans["orders"]
            assert post("/api/channels/orders/stop", {})[0] == 200
            assert post("/api/channels/orders/stop", {})[0] == 409
            assert {c["name"]: c for c in get("/api/channels")["channels"]}["orders"][
                "state"] == "stopped"
            refused = False
            try:
                socket.create_connection((HOST, orders_port), timeout=5).close()
            except OSError:
                refused = True
            assert refused, "the stopped channel still listens"
            assert post("/api/channels/orders/start", {})[0] == 200
            new_port = {c["name"]: c for c in get("/api/channels")["channels"]}["orders"]["port"]
            acks = send_hl7(new_port, [orm("RRADM-9", "NW", "RRACC-ADM9", "RRPAT-ADM9", "CT",
                                           "R", "FALL", "202611280800")])
            assert "MSA|AA|" in (acks[0].decode() if isinstance(acks[0], bytes) else acks[0])
            st, r = post("/api/channels/orders/reload", {}, role="admin")
            assert st == 200, (st, r)
            st, _, d = call(port, "GET", "/api/audit?kind=channel_stop", TOKENS["admin"])
            recs = json.loads(d)["records"]
            assert st == 200 and [r["actor"] for r in recs] == ["test-operator"], recs
            st, _, d = call(port, "GET", "/api/audit/verify", TOKENS["admin"])
            v = json.loads(d)
            assert st == 200 and v["intact"] and v["records"] >= 5, v
            # ---- 5. the AI summary of a store without AI jobs
            summary = get("/api/ai/summary")
            assert summary["endpoints"] == [] and summary["since_ms"] is None, summary
            assert get("/api/ai/summary?since=1000")["since_ms"] == 1000
            st, _, d = call(port, "GET", "/api/ai/summary?since=-1", TOKENS["viewer"])
            assert st == 400 and json.loads(d)["error"] == "bad_query", (st, d)
            assert value("radrelay_destination_circuit_open", "radrelay_destination_circuit_open",
                         destination="orders.patient_index") in (0, 0.5, 1)
            text = data.decode()
            assert "RRPAT-" not in text and "RRACC-" not in text
        finally:
            proc.terminate()
            rc = proc.wait(timeout=30)
        assert rc == 0, lines[-20:]
        bad = [l for l in lines if "Sanitizer" in l or "runtime error" in l]
        assert not bad, bad
    print(f"admin api: {len(ROUTES)} routes x 4 principals (401/403 as their roles say), ready, "
          "metrics parsed by prometheus_client with the engine's figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())

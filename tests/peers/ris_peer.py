#!/usr/bin/python3
"""A RIS that receives HL7 over MLLP, for tests and the demo: python-hl7's
asyncio MLLP server (Debian's python3-hl7, a third-party MLLP
implementation); it answers every message AA (its create_ack) and writes
each one to stdout as a JSON line, so a test can read what arrived:

    {"event": "ready", "port": N}
    {"event": "message", "type": "ORU^R01", "control_id": "...", "text": "MSH|..."}

    ris_peer.py [--port 0]

It runs until stdin closes.
"""
import argparse
import asyncio
import json
import sys

import hl7
import hl7.mllp


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve(port):
    async def on_client(reader, writer):
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                text = str(msg)
                emit({"event": "message", "type": str(msg.segment("MSH")[9]),
                      "control_id": str(msg.segment("MSH")[10]), "text": text})
                writer.writemessage(msg.create_ack())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await hl7.mllp.start_hl7_server(on_client, host="127.0.0.1", port=port)
    emit({"event": "ready", "port": server.sockets[0].getsockname()[1]})
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: done.done() or (
        sys.stdin.buffer.read1(4096) or done.set_result(None)))
    await done
    server.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()

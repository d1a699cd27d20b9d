"""The bundled configuration matches the published JSON Schemas (checked with
Debian's python3-jsonschema, a validator we did not write), after ${VAR} and
${VAR:-default} substitution as the engine does it; radrelay's own loader
(which validates with the same schemas, compiled in) accepts it too; and
both validators refuse the same broken files. Run with /usr/bin/python3."""
import json
import os
import pathlib
import re
import tempfile
import subprocess
import sys

import jsonschema


VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute(node):
    if isinstance(node, dict):
        return {k: substitute(v) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v) for v in node]
    if isinstance(node, str):
        return VAR.sub(lambda m: os.environ.get(m.group(1)) or m.group(2) or "", node)
    return node


BROKEN = [
    {"name": "o", "source": {"type": "mllp", "port": "abc"}},
    {"name": "o", "source": {"type": "mllp", "bogus": 1}},
    {"name": "o bad", "source": {"type": "mllp"}},
    {"name": "o", "source": {"type": "tcp"}},
    {"name": "o", "source": {"type": "mllp"}, "accept": ["ADT_A01"]},
    {"name": "o", "source": {"type": "mllp"}, "hl7": {"strict": "yes"}},
    {"source": {"type": "mllp"}},
]


def main():
    root = pathlib.Path(sys.argv[1])
    radrelay = sys.argv[2]
    engine = json.loads((root / "schemas/engine.schema.json").read_text())
    channel = json.loads((root / "schemas/channel.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(engine)
    jsonschema.Draft202012Validator.check_schema(channel)
    passed = failed = 0
    cfg = root / "channels/radrelay.json"
    for path in sorted((root / "channels").glob("*.json")):
        schema = engine if path == cfg else channel
        doc = substitute(json.loads(path.read_text()))
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
        for e in errors:
            print(f"{path}: {e.json_path}: {e.message}")
        failed += bool(errors)
        passed += not errors
    r = subprocess.run([radrelay, "check", "-c", str(cfg)], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        failed += 1
    else:
        passed += 1
    # Both validators refuse each broken channel file.
    with tempfile.TemporaryDirectory() as d:
        os.mkdir(f"{d}/ch")
        with open(f"{d}/radrelay.json", "w") as f:
            json.dump({"store": {"path": "db"}, "channels": "ch"}, f)
        for doc in BROKEN:
            with open(f"{d}/ch/c.json", "w") as f:
                json.dump(doc, f)
            theirs = list(jsonschema.Draft202012Validator(channel).iter_errors(doc))
            r = subprocess.run([radrelay, "check", "-c", f"{d}/radrelay.json"],
                               capture_output=True, text=True)
            if not theirs or r.returncode == 0 or "c.json: $" not in r.stderr:
                print(f"not refused by both: {doc}: jsonschema {len(theirs)} errors, "
                      f"radrelay exit {r.returncode}: {r.stderr}")
                failed += 1
            else:
                passed += 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

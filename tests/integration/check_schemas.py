"""The bundled configuration matches the published JSON Schemas (checked with
Debian's python3-jsonschema, a validator we did not write), and radrelay's own
loader accepts it too. Run with /usr/bin/python3."""
import json
import pathlib
import subprocess
import sys

import jsonschema


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
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(json.loads(path.read_text())))
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
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

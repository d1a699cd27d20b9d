#!/usr/bin/python3
"""HL7 v2 parser benchmark for python-hl7 (Debian's python3-hl7).

    /usr/bin/python3 bench_python_hl7.py ADT_FILE ORU_FILE
    /usr/bin/python3 bench_python_hl7.py --reference ADT_FILE ORU_FILE

Run it with /usr/bin/python3: Debian's python3-hl7 is not importable from
another Python (e.g. a pyenv one first on PATH).

Same operations, values, checksums and JSON lines as
tests/bench/peers/node/bench.mjs (see the comments there and in
tests/bench/peers/node/adapters.mjs):
  parse_read10:    checksum = sum of the UTF-8 byte lengths of the ten values
  parse_serialize: checksum = UTF-8 byte length of the serialized text

--reference prints the checksums computed by plain string splitting, without
any HL7 library, as {"impl":"reference","case","op","checksum"} lines: what
every implementation should print.

Environment: RR_BENCH_SECONDS (default 2), RR_BENCH_WARMUP_SECONDS (default
0.5), RR_BENCH_DEBUG=1 (print the ten values on stderr).
"""
import json
import os
import sys
import time

SECONDS = float(os.environ.get("RR_BENCH_SECONDS", "2"))
WARMUP = float(os.environ.get("RR_BENCH_WARMUP_SECONDS", "0.5"))
DEBUG = os.environ.get("RR_BENCH_DEBUG") == "1"


def read_text(path):
    # bytes then decode: text mode would turn the CR segment terminators into LF
    with open(path, "rb") as f:
        data = f.read()
    return data, data.decode("utf-8")


# ------------------------------------------------------------------ python-hl7
def read10(case, m):
    """The ten values, raw (str() of python-hl7's containers gives raw ER7)."""
    msh = m.segment("MSH")
    pid = m.segment("PID")
    pid3 = pid(3)
    r = []
    if case == "adt_a01":
        r.append(str(msh(9)(1)(1)))
    r += [str(msh(9)(1)(2)), str(msh(10))]
    r += [str(pid3(1)(1)), str(pid3(2)(1)), str(pid(5)(1)(1))]
    if case == "adt_a01":
        pv1 = m.segment("PV1")
        r += [str(pid(5)(1)(2)), str(pid(7)), str(pv1(3)(1)(1)), str(pv1(19))]
    else:
        obr = m.segment("OBR")
        obxs = m.segments("OBX")
        ed = next(s for s in obxs if str(s(2)) == "ED")
        r += [str(obr(3)), str(obr(4)(1)(1)), str(obr(25)), str(obxs(1)(3)(1)(1)), str(ed(5)(1)(5))]
    return r


# ------------------------------------------------------------------ reference
def ref_values(case, text):
    """The ten values by plain splitting, with the standard separators."""
    segs = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]

    def seg(name):
        return next(s for s in segs if s[:3] == name)

    def field(s, n):
        f = s.split("|")
        if s[:3] == "MSH":
            n -= 1  # MSH-1 is the field separator itself
        return f[n] if n < len(f) else ""

    def comp(s, n, c, rep=1):
        reps = field(s, n).split("~")
        r = reps[rep - 1] if rep <= len(reps) else ""
        cs = r.split("^")
        return cs[c - 1] if c <= len(cs) else ""

    msh, pid = seg("MSH"), seg("PID")
    r = []
    if case == "adt_a01":
        r.append(comp(msh, 9, 1))
    r += [comp(msh, 9, 2), field(msh, 10)]
    r += [comp(pid, 3, 1, 1), comp(pid, 3, 1, 2), comp(pid, 5, 1)]
    if case == "adt_a01":
        pv1 = seg("PV1")
        r += [comp(pid, 5, 2), field(pid, 7), comp(pv1, 3, 1), field(pv1, 19)]
    else:
        obr = seg("OBR")
        obxs = [s for s in segs if s[:3] == "OBX"]
        ed = next(s for s in obxs if field(s, 2) == "ED")
        r += [field(obr, 3), comp(obr, 4, 1), field(obr, 25), comp(obxs[0], 3, 1), comp(ed, 5, 5)]
    return r


# ------------------------------------------------------------------ timing
def time_it(body):
    """body(n) runs n iterations and returns a number; warm up, then batches
    of about 10 ms until SECONDS have passed."""
    sink = 0
    n = 0
    t0 = time.perf_counter()
    while True:
        sink += body(1)
        n += 1
        if time.perf_counter() - t0 >= WARMUP:
            break
    per = (time.perf_counter() - t0) / n
    batch = max(1, int(0.010 / max(per, 1e-9)))
    iterations = 0
    t0 = time.perf_counter()
    while True:
        sink += body(batch)
        iterations += batch
        el = time.perf_counter() - t0
        if el >= SECONDS:
            break
    return iterations, el, sink


def out(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main():
    args = sys.argv[1:]
    reference = False
    if args and args[0] == "--reference":
        reference = True
        args = args[1:]
    if len(args) != 2:
        sys.stderr.write(__doc__)
        sys.exit(2)
    cases = [("adt_a01", args[0]), ("oru_big", args[1])]

    if reference:
        for case, path in cases:
            data, text = read_text(path)
            vals = ref_values(case, text)
            out({"impl": "reference", "case": case, "op": "parse_read10",
                 "checksum": sum(len(v.encode("utf-8")) for v in vals)})
            out({"impl": "reference", "case": case, "op": "parse_serialize", "checksum": len(data)})
        return

    import hl7
    try:
        import hl7.version
        version = hl7.version.get_version()
    except Exception:  # pragma: no cover
        version = getattr(hl7, "__version__", "unknown")
    impl = "python-hl7@" + version
    parse = hl7.parse

    for case, path in cases:
        data, text = read_text(path)
        in_bytes = len(data)
        try:
            vals = read10(case, parse(text))
            if DEBUG:
                sys.stderr.write("%s %s: %r\n" % (impl, case, [v if len(v) <= 40 else "%s...(%d)" % (v[:20], len(v)) for v in vals]))
            checksum = sum(len(v.encode("utf-8")) for v in vals)
            chars = sum(len(v) for v in vals)

            def body(n):
                s = 0
                for _ in range(n):
                    for v in read10(case, parse(text)):
                        s += len(v)
                return s

            it, el, sink = time_it(body)
            if sink % chars:
                raise RuntimeError("values changed between iterations")
            out({"impl": impl, "case": case, "op": "parse_read10", "msgs_per_s": round(it / el, 3),
                 "mb_per_s": round(it * in_bytes / el / 1e6, 3), "checksum": checksum,
                 "iterations": it, "seconds": round(el, 3)})
        except Exception as e:
            out({"impl": impl, "case": case, "op": "parse_read10", "error": str(e)[:200]})

        try:
            s = str(parse(text))
            checksum = len(s.encode("utf-8"))
            roundtrip = s == text
            if not roundtrip and DEBUG:
                i = 0
                while i < min(len(s), len(text)) and s[i] == text[i]:
                    i += 1
                sys.stderr.write("%s %s: round-trip differs at char %d: in %r out %r\n"
                                 % (impl, case, i, text[max(0, i - 20):i + 20], s[max(0, i - 20):i + 20]))

            def body(n):
                acc = 0
                for _ in range(n):
                    acc += len(str(parse(text)))
                return acc

            it, el, _ = time_it(body)
            out({"impl": impl, "case": case, "op": "parse_serialize", "msgs_per_s": round(it / el, 3),
                 "mb_per_s": round(it * in_bytes / el / 1e6, 3), "checksum": checksum,
                 "iterations": it, "seconds": round(el, 3), "roundtrip": roundtrip})
        except Exception as e:
            out({"impl": impl, "case": case, "op": "parse_serialize", "error": str(e)[:200]})


if __name__ == "__main__":
    main()

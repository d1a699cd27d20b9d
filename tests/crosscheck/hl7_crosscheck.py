#!/usr/bin/env python3
"""Cross-check `radrelay hl7 dump` against python-hl7 (via hl7_dump.py).

    tests/crosscheck/hl7_crosscheck.py --radrelay build/radrelay FILE...

For every FILE it compares

    <radrelay> hl7 dump FILE            with  hl7_dump.py FILE
    <radrelay> hl7 dump --decoded FILE  with  hl7_dump.py --decoded FILE

byte for byte, prints "ok   FILE" or "FAIL FILE" followed by the first
differences (line and column, long lines cut around the first differing
character; missing and unexpected lines), and ends with the line
"N passed, M failed" (N, M counted in files; a file passes when both its
raw and its decoded dumps are identical and radrelay exits 0).
Exit status: 0 if all files passed, 1 if any failed, 2 on a usage error.

This script itself runs on any Python 3; hl7_dump.py is run with --python
(default /usr/bin/python3, the interpreter Debian's python3-hl7 is installed
for).
"""
import argparse
import difflib
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DUMP = os.path.join(HERE, "hl7_dump.py")
MAX_LINE = 160  # chars of a differing line shown
MAX_DIFF_LINES = 24  # diff lines shown per file and mode


def run(cmd, timeout):
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, b"", f"timed out after {timeout}s".encode()
    except OSError as e:
        return None, b"", str(e).encode()
    return p.returncode, p.stdout, p.stderr


def cut(line, start=0):
    """At most MAX_LINE chars of line from about start, marking what is left out."""
    start = max(0, min(start - MAX_LINE // 4, len(line) - MAX_LINE))
    piece = line[start:start + MAX_LINE]
    pre = f"[{start} chars]..." if start else ""
    post = f"...[{len(line) - start - len(piece)} more]" if start + len(piece) < len(line) else ""
    return pre + piece + post


def first_differences(expected, actual):
    """Lines describing the first differences between two dumps."""
    exp = expected.decode("utf-8", errors="replace").split("\n")
    act = actual.decode("utf-8", errors="replace").split("\n")
    out = []
    sm = difflib.SequenceMatcher(None, exp, act, autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        pairs = min(i2 - i1, j2 - j1) if tag == "replace" else 0
        for d in range(pairs):
            e, a = exp[i1 + d], act[j1 + d]
            col = next((n for n, (x, y) in enumerate(zip(e, a)) if x != y), min(len(e), len(a)))
            out.append(f"    line {i1 + d + 1}, column {col + 1}:")
            out.append(f"      python-hl7: {cut(e, col)}")
            out.append(f"      radrelay:   {cut(a, col)}")
        for i in range(i1 + pairs, i2):
            out.append(f"    line {i + 1} missing from radrelay: {cut(exp[i])}")
        for j in range(j1 + pairs, j2):
            out.append(f"    radrelay line {j + 1} not expected: {cut(act[j])}")
        if len(out) >= MAX_DIFF_LINES:
            break
    if len(out) > MAX_DIFF_LINES:
        out = out[:MAX_DIFF_LINES] + ["    ..."]
    if not out:
        out.append("    (outputs differ in bytes but not in decoded lines)")
    return out


def check_file(args, path):
    problems = []
    for mode in ([], ["--decoded"]):
        label = "decoded" if mode else "raw"
        rc, exp, err = run([args.python, DUMP] + mode + [path], args.timeout)
        if rc != 0:
            problems.append(f"  [{label}] hl7_dump.py failed (exit {rc}): "
                            + cut(err.decode("utf-8", "replace").strip()))
            continue
        rc, act, err = run([args.radrelay, "hl7", "dump"] + mode + [path], args.timeout)
        if rc != 0:
            problems.append(f"  [{label}] radrelay failed (exit {rc}): "
                            + cut(err.decode("utf-8", "replace").strip()))
            continue
        if act != exp:
            problems.append(f"  [{label}] output differs:")
            problems.extend(first_differences(exp, act))
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--radrelay", required=True, help="path of the radrelay binary")
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="interpreter with python-hl7 for hl7_dump.py (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds allowed per command (default %(default)s)")
    ap.add_argument("files", nargs="+", metavar="FILE")
    args = ap.parse_args()
    if not os.access(args.radrelay, os.X_OK):
        print(f"hl7_crosscheck: not executable: {args.radrelay}", file=sys.stderr)
        return 2

    passed = failed = 0
    for path in args.files:
        problems = check_file(args, path)
        if problems:
            failed += 1
            print(f"FAIL {path}")
            for line in problems:
                print(line)
        else:
            passed += 1
            print(f"ok   {path}")
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

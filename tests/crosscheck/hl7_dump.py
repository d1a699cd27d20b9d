#!/usr/bin/python3
"""Canonical dump of HL7 v2 files using python-hl7 (reference for radrelay).

Run with Debian's interpreter, where python3-hl7 (0.4.5) is installed:

    /usr/bin/python3 tests/crosscheck/hl7_dump.py [--decoded] FILE...

Prints exactly what `radrelay hl7 dump [--decoded] FILE` is meant to print:

* The file is read as bytes, line endings CR, LF and CRLF are all accepted
  (normalised to CR), empty lines are ignored. It is split into messages at
  each line starting with "MSH"; FHS/BHS/BTS/FTS lines belong to no message
  and are skipped (so are, with a warning on stderr, lines before the first
  MSH).
* Per message a header line "=== message N" (N 1-based within the file).
* Per segment, k = its occurrence number among the segments of that name in
  the message (1-based). MSH gives "MSH[1]-1<TAB>|" (field separator) and
  "MSH[1]-2<TAB>^~\\&" (encoding characters as written, never split or
  decoded), then fields 3.. numbered as HL7 does; other segments fields 1..
* One line "SEG[k]-F[r].c.s<TAB>value" for every NON-EMPTY leaf (r
  repetition, c component, s subcomponent, all 1-based, always all four).
* Raw mode: the value as written (escape sequences kept). --decoded: escape
  sequences resolved (see Decoder below) and, in decoded output only,
  backslash, LF and TAB in a value are written as \\\\, \\n and \\t; any other
  character, CR included, is written as is. Whether a leaf is empty (and so
  left out) is decided on the raw value, so both modes print the same keys.
* Character set: a message whose MSH-18 (first repetition, component 1) is
  "8859/1" is decoded as ISO-8859-1, every other message as UTF-8 (invalid
  bytes become U+FFFD). Output is always UTF-8, raw mode included.

With more than one FILE, each file's dump is preceded by a line "### FILE".

The parsing into segments/fields/repetitions/components/subcomponents is
entirely python-hl7's. Quirks of python-hl7 0.4.5 and what this script does
about them:

1. hl7.parse() calls text.strip() on the whole message, which would drop
   leading/trailing whitespace of the values at the very start/end of the
   message. We call the two steps hl7.parse() is made of
   (hl7.parser.create_parse_plan + hl7.parser._split) without the strip.
2. The tree is ragged: a field/repetition/component without a lower-level
   delimiter in it is stored as a plain str instead of a container, and a
   segment with no field separator at all (e.g. "PV1") is Segment(["PV1"])
   whose first element is a str, not a Field. walk() treats a str at any
   level as a single child; segment names are taken with str(segment[0]).
3. MSH: python-hl7 stores MSH-1 and MSH-2 as segment[1] and segment[2], so
   segment[i] is MSH-i, as HL7 numbers them. Custom delimiters (any five
   characters, e.g. "MSH*:!/@") are taken from MSH and work.
4. A 5th encoding character (v2.7+ truncation character, "^~\\&#") is
   ignored by python-hl7 (fine for splitting: it is no delimiter), but its
   unescape() does not know \\P\\; handled here (see Decoder).
5. Message.unescape() maps \\H\\ and \\N\\ to "_" and \\.br\\ to CR by default;
   we pass an app_map so they become "" and "\\n". It turns \\Xhh..\\ into one
   code point per byte (i.e. Latin-1), wrong for UTF-8 multi-byte sequences;
   it drops unknown sequences and logs an error. So \\X..\\ and unknown
   sequences never reach python-hl7 here (see Decoder).
6. python-hl7 has no notion of MSH-18; the bytes are decoded here before
   parsing (see charset above).
7. hl7.parse_hl7/parse_file/split_file are not used to split a file into
   messages: split_file strips whitespace off every segment and parse_file
   needs a leading FHS/BHS or more than one MSH; the split into messages is
   the simple line rule above, and each message is then parsed on its own.
"""
import re
import sys
from collections import Counter

import hl7

try:  # same steps as hl7.parse(), minus its .strip() (quirk 1)
    from hl7.parser import _split as _hl7_split
    from hl7.parser import create_parse_plan as _hl7_plan

    def parse_message(text):
        return _hl7_split(text, _hl7_plan(text))

except ImportError:  # pragma: no cover - other python-hl7 versions
    def parse_message(text):
        return hl7.parse(text)


NON_MESSAGE = (b"FHS", b"BHS", b"BTS", b"FTS")
# Message.unescape() app_map for the sequences python-hl7 does handle but
# maps differently from our definition (quirk 5).
APP_MAP = {"H": "", "N": "", ".br": "\n"}
# Sequences handed to python-hl7's unescape().
HL7_SIMPLE = {"F", "S", "T", "R", "E", "H", "N", ".br"}
HEX_RE = re.compile(r"X((?:[0-9A-Fa-f]{2})+)")


def split_messages(data, path):
    """bytes of a file -> list of messages (bytes, segments joined by CR)."""
    msgs = []
    cur = None
    for line in re.split(rb"\r\n|\r|\n", data):
        if not line:
            continue
        tag = line[:3]
        if tag in NON_MESSAGE:
            cur = None
            continue
        if tag == b"MSH" and len(line) > 3:
            cur = [line]
            msgs.append(cur)
        elif cur is None:
            sys.stderr.write(f"hl7_dump: {path}: skipping segment outside a message: "
                             f"{line[:40]!r}\n")
        else:
            cur.append(line)
    return [b"\r".join(m) for m in msgs]


def kids(node):
    """Children of a python-hl7 node; a str leaf is its own only child (quirk 2)."""
    return [node] if isinstance(node, str) else list(node)


def walk(field):
    """Yield (r, c, s, value) for every leaf of a python-hl7 Field."""
    for r, rep in enumerate(kids(field), 1):
        for c, comp in enumerate(kids(rep), 1):
            for s, sub in enumerate(kids(comp), 1):
                yield r, c, s, str(sub)


def leaf(segment, field_num):
    """Value of SEG-F[1].1.1 ("" if absent)."""
    if len(segment) <= field_num:
        return ""
    for r, c, s, v in walk(segment[field_num]):
        return v if (r, c, s) == (1, 1, 1) else ""
    return ""


def charset_of(msg_bytes):
    """'latin-1' if MSH-18 is 8859/1, else 'utf-8'."""
    # Latin-1 maps every byte to one code point, so the delimiters and MSH-18
    # are found whatever the real charset is.
    msg = parse_message(msg_bytes.decode("latin-1"))
    msh = msg[0]
    return "latin-1" if leaf(msh, 18).strip() == "8859/1" else "utf-8"


class Decoder:
    """Escape-sequence decoding, HL7 v2 chapter 2.7 (v2.5.1 numbering):

    \\F\\ \\S\\ \\T\\ \\R\\ \\E\\  field/component/subcomponent/repetition/escape char
    \\P\\                truncation char (5th char of MSH-2, v2.7+)
    \\Xhh..\\            the bytes hh.., decoded in the message charset; runs of
                        adjacent \\X..\\ sequences are joined before decoding so
                        a multi-byte UTF-8 character may be split across them
    \\.br\\              "\\n"
    \\H\\ \\N\\            removed (start/end highlighting)

    python-hl7 does F S T R E H N .br (with APP_MAP). It does not cover, so
    this class does: \\P\\ (unknown to it), \\X..\\ (it yields one code point
    per byte, wrong for UTF-8), the message charset. Kept verbatim, escape
    characters included (our choice, python-hl7 would drop them): \\P\\ when
    MSH-2 has no 5th character, the other formatting commands (\\.sp\\,
    \\.in\\, \\.ti\\, \\.sk\\, \\.ce\\, \\.fi\\, \\.nf\\), \\Cxxyy\\, \\Mxxyyzz\\, \\Zxx\\,
    \\X\\ with an odd number of or non-hex digits, an empty sequence (two escape
    characters in a row) and an escape character with no closing one.
    """

    def __init__(self, msg, charset):
        self.msg = msg
        self.esc = msg.esc
        enc = str(msg[0][2])  # MSH-2 as written
        self.trunc = enc[4] if len(enc) > 4 else None
        self.charset = charset

    def __call__(self, value):
        esc = self.esc
        if not esc or esc not in value:
            return value
        out = []
        pending = bytearray()  # bytes of adjacent \X..\ sequences

        def flush():
            if pending:
                out.append(pending.decode(self.charset, errors="replace"))
                pending.clear()

        i = 0
        n = len(value)
        while i < n:
            j = value.find(esc, i)
            if j < 0:
                flush()
                out.append(value[i:])
                break
            if j > i:
                flush()
                out.append(value[i:j])
            k = value.find(esc, j + 1)
            if k < 0:  # unterminated: keep verbatim
                flush()
                out.append(value[j:])
                break
            seq = value[j + 1:k]
            m = HEX_RE.fullmatch(seq)
            if m:
                pending += bytes.fromhex(m.group(1))
            else:
                flush()
                if seq in HL7_SIMPLE:
                    out.append(self.msg.unescape(esc + seq + esc, app_map=APP_MAP))
                elif seq == "P" and self.trunc:
                    out.append(self.trunc)
                else:
                    out.append(esc + seq + esc)
            i = k + 1
        flush()
        return "".join(out)


def show_decoded(value):
    # As specified: only backslash, LF and TAB are escaped. A CR (e.g. from
    # \X0D\) is written as is; the output is split into lines at LF only.
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def dump_message(msg_bytes, decoded, out):
    charset = charset_of(msg_bytes)
    msg = parse_message(msg_bytes.decode(charset, errors="replace"))
    dec = Decoder(msg, charset) if decoded else None
    seen = Counter()
    for seg in msg:
        name = str(seg[0])
        seen[name] += 1
        k = seen[name]
        first = 1
        if name == "MSH":
            out.append(f"MSH[{k}]-1\t{seg[1]}")
            out.append(f"MSH[{k}]-2\t{seg[2]}")
            first = 3
        for f in range(first, len(seg)):
            for r, c, s, v in walk(seg[f]):
                if v == "":
                    continue
                if dec is not None:
                    v = show_decoded(dec(v))
                out.append(f"{name}[{k}]-{f}[{r}].{c}.{s}\t{v}")


def dump_file(path, decoded):
    with open(path, "rb") as fh:
        data = fh.read()
    out = []
    for n, m in enumerate(split_messages(data, path), 1):
        out.append(f"=== message {n}")
        dump_message(m, decoded, out)
    return out


def main(argv):
    args = argv[1:]
    decoded = False
    if args and args[0] == "--decoded":
        decoded = True
        args = args[1:]
    if not args or any(a.startswith("--") for a in args):
        sys.stderr.write("usage: hl7_dump.py [--decoded] FILE...\n")
        return 2
    w = sys.stdout.buffer
    for path in args:
        lines = dump_file(path, decoded)
        if len(args) > 1:
            lines.insert(0, f"### {path}")
        w.write("".join(line + "\n" for line in lines).encode("utf-8"))
    w.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

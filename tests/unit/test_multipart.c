/* Unit tests of the multipart/related codec (engine/dicomweb/multipart.c). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "dicomweb/multipart.h"
#include "rr_test.h"

/* ---- allocation failure injection (linked with --wrap) ----------------- */
void *__real_malloc(size_t n);
void *__real_realloc(void *p, size_t n);
void *__real_calloc(size_t a, size_t b);
void *__wrap_malloc(size_t n);
void *__wrap_realloc(void *p, size_t n);
void *__wrap_calloc(size_t a, size_t b);
static long g_fail_at = -1; /* fail the Nth allocation from now; -1 = never */
static long g_allocs;
static int should_fail(void) {
  return g_fail_at >= 0 && g_allocs++ == g_fail_at;
}
void *__wrap_malloc(size_t n) {
  return should_fail() ? NULL : __real_malloc(n);
}
void *__wrap_realloc(void *p, size_t n) {
  return should_fail() ? NULL : __real_realloc(p, n);
}
void *__wrap_calloc(size_t a, size_t b) {
  return should_fail() ? NULL : __real_calloc(a, b);
}

#define CT "multipart/related; type=\"application/dicom\"; boundary=bnd"

static unsigned rnd_next(unsigned *s) {
  *s = *s * 1103515245u + 12345u;
  return *s >> 8;
}

/* ---- event transcript ---------------------------------------------------------
 * "[Name=Value;...]" at part begin, the data (escaped, coalesced), "(len)\n"
 * at part end, "END n" at the end. Data events are coalesced so that the
 * transcript does not depend on chunking. */
typedef struct rec {
  rr_buf_t t;
  int stop_at_begin; /* part_begin returns this when non-zero */
  int events;
} rec_t;

static void put_escaped(rr_buf_t *b, const char *d, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)d[i];
    if (c == '\r')
      rr_buf_puts(b, "\\r");
    else if (c == '\n')
      rr_buf_puts(b, "\\n");
    else if (c == '\\')
      rr_buf_puts(b, "\\\\");
    else if (c < 0x20 || c >= 0x7f)
      rr_buf_printf(b, "\\x%02x", c);
    else
      rr_buf_putc(b, (char)c);
  }
}

static int rec_begin(void *ud, const rr_multipart_part_t *pt) {
  rec_t *r = ud;
  r->events++;
  rr_buf_putc(&r->t, '[');
  for (size_t i = 0; i < pt->nheaders; i++)
    rr_buf_printf(&r->t, "%s=%s;", pt->headers[i].name, pt->headers[i].value);
  rr_buf_putc(&r->t, ']');
  return r->stop_at_begin;
}

static int rec_data(void *ud, const rr_multipart_part_t *pt, const char *d, size_t n) {
  rec_t *r = ud;
  (void)pt;
  r->events++;
  CHECK(n > 0);
  put_escaped(&r->t, d, n);
  return 0;
}

static int rec_end_part(void *ud, const rr_multipart_part_t *pt) {
  rec_t *r = ud;
  r->events++;
  rr_buf_printf(&r->t, "(%llu)\n", (unsigned long long)pt->length);
  return 0;
}

static int rec_end(void *ud, size_t parts) {
  rec_t *r = ud;
  r->events++;
  rr_buf_printf(&r->t, "END %zu", parts);
  return 0;
}

static const rr_multipart_callbacks_t rec_cb = {rec_begin, rec_data, rec_end_part, rec_end};

typedef struct outcome {
  char text[48 << 10];
  int rc; /* first non-zero of feed, then finish */
  rr_multipart_error_t err;
} outcome_t;

/* Parses body split by `step` bytes (0: random 1..13 from seed). */
static void parse(const char *ct, const rr_multipart_options_t *o, const char *body, size_t n,
                  size_t step, unsigned seed, int stop_at_begin, outcome_t *out) {
  rec_t r;
  memset(&r, 0, sizeof r);
  rr_buf_init(&r.t, sizeof out->text - 1);
  r.stop_at_begin = stop_at_begin;
  memset(out, 0, sizeof *out);
  rr_multipart_parser_t *p = NULL;
  out->rc = rr_multipart_parser_new(ct, strlen(ct), o, &rec_cb, &r, &p, &out->err);
  if (out->rc == 0) {
    for (size_t i = 0; i < n && out->rc == 0;) {
      size_t k = step ? step : 1 + rnd_next(&seed) % 13;
      if (k > n - i)
        k = n - i;
      out->rc = rr_multipart_parser_feed(p, body + i, k);
      i += k;
    }
    int frc = rr_multipart_parser_finish(p);
    if (!out->rc)
      out->rc = frc;
    out->err = *rr_multipart_parser_error(p);
    if (out->rc) { /* after an error: the same code, no events */
      int before = r.events;
      CHECK_EQ_INT(rr_multipart_parser_feed(p, "--bnd--", 7), out->rc);
      CHECK_EQ_INT(r.events, before);
    }
    rr_multipart_parser_free(p);
  }
  if (r.t.len)
    memcpy(out->text, r.t.data, r.t.len);
  rr_buf_close(&r.t);
}

static int same_outcome(const outcome_t *a, const outcome_t *b) {
  return strcmp(a->text, b->text) == 0 && a->rc == b->rc && a->err.code == b->err.code &&
         a->err.offset == b->err.offset &&
         (a->err.reason == b->err.reason ||
          (a->err.reason && b->err.reason && strcmp(a->err.reason, b->err.reason) == 0));
}

/* Whole, byte by byte and 40 random splits must agree; returns the whole. */
static void parse_all_ways(const char *ct, const rr_multipart_options_t *o, const char *body,
                           size_t n, outcome_t *whole) {
  static outcome_t other;
  parse(ct, o, body, n, n ? n : 1, 0, 0, whole);
  parse(ct, o, body, n, 1, 0, 0, &other);
  CHECK(same_outcome(whole, &other));
  for (unsigned seed = 1; seed <= 40; seed++) {
    parse(ct, o, body, n, 0, seed, 0, &other);
    CHECK(same_outcome(whole, &other));
  }
}

/* ---- data-driven cases ------------------------------------------------------- */

typedef struct pcase {
  const char *name;
  const char *ct;   /* NULL: CT */
  int bare_lf;      /* options.allow_bare_lf */
  const char *body; /* NUL-terminated (the cases hold no NUL) */
  const char *want; /* transcript */
  int code;         /* 0 or the error */
  uint64_t offset;
  const char *reason;
} pcase_t;

static const pcase_t cases[] = {
    {"two parts", NULL, 0,
     "--bnd\r\nContent-Type: text/plain\r\n\r\nhello\r\n--bnd\r\nContent-Type: a/b\r\n"
     "X-Other:  v  \r\n\r\nworld\r\n--bnd--\r\n",
     "[Content-Type=text/plain;]hello(5)\n[Content-Type=a/b;X-Other=v;]world(5)\nEND 2", 0, 0,
     NULL},
    {"preamble and epilogue", NULL, 0,
     "preamble line\r\n--bndx not a boundary\r\n-bnd\r\n--bnd\r\n\r\nx\r\n--bnd--\r\n"
     "epilogue\r\n--bnd\r\n\r\nignored",
     "[]x(1)\nEND 1", 0, 0, NULL},
    {"transport padding", NULL, 0, "--bnd \t \r\n\r\nA\r\n--bnd\t\r\n\r\nB\r\n--bnd--",
     "[]A(1)\n[]B(1)\nEND 2", 0, 0, NULL},
    {"boundary inside data", NULL, 0,
     "--bnd\r\n\r\nxx--bnd bnd\r\n-bnd\r\n--bn\r\n--bndx\r\n--bnd-x\r\n--bnd z\r\n--bnd \r"
     "x\n--bnd\r\n\r\r\n--bnd--",
     "[]xx--bnd bnd\\r\\n-bnd\\r\\n--bn\\r\\n--bndx\\r\\n--bnd-x\\r\\n--bnd z\\r\\n--bnd "
     "\\rx\\n--bnd\\r\\n\\r(68)\nEND 1",
     0, 0, NULL},
    {"empty parts and parts without headers", NULL, 0,
     "--bnd\r\n\r\n--bnd\r\n\r\n\r\n--bnd\r\nA: 1\r\n\r\n\r\n--bnd--",
     "[](0)\n[](0)\n[A=1;](0)\nEND 3", 0, 0, NULL},
    {"no parts", NULL, 0, "--bnd--", "END 0", 0, 0, NULL},
    {"folded header", NULL, 0, "--bnd\r\nX-Long: a\r\n  b\r\n\tc \r\n \r\nY:\r\n\r\nd\r\n--bnd--",
     "[X-Long=a b c;Y=;]d(1)\nEND 1", 0, 0, NULL},
    {"Content-Length agrees", NULL, 0,
     "--bnd\r\nContent-Length: 3\r\n\r\nabc\r\n--bnd\r\ncontent-length:0\r\n\r\n\r\n--bnd--",
     "[Content-Length=3;]abc(3)\n[content-length=0;](0)\nEND 2", 0, 0, NULL},
    {"bare LF allowed", NULL, 1,
     "pre\n--bnd\nContent-Type: t\n\nab\r\ncd\n--bnd\r\n\r\nx\r\n--bnd  \nC: 1\n\ny\r\r\n--bnd--\n",
     "[Content-Type=t;]ab\\r\\ncd(6)\n[]x(1)\n[C=1;]y\\r(2)\nEND 3", 0, 0, NULL},
    {"bare LF is data when strict", NULL, 0, "--bnd\r\n\r\nab\n--bnd\r\ncd\r\n--bnd--",
     "[]ab\\n--bnd\\r\\ncd(12)\nEND 1", 0, 0, NULL},
    {"quoted boundary with specials", "multipart/related; boundary=\"a'()+_,-./:=? z\"", 0,
     "--a'()+_,-./:=? z\r\n\r\n1\r\n--a'()+_,-./:=? z--", "[]1(1)\nEND 1", 0, 0, NULL},
    /* errors */
    {"header line without colon", NULL, 0, "--bnd\r\nA: 1\r\nbogus\r\n\r\n", "", RR_EPARSE, 13,
     "header line without colon"},
    {"bad header name", NULL, 0, "--bnd\r\nA B: 1\r\n\r\n", "", RR_EPARSE, 8, "bad header name"},
    {"empty header name", NULL, 0, "--bnd\r\n: 1\r\n\r\n", "", RR_EPARSE, 7, "bad header name"},
    {"control character", NULL, 0, "--bnd\r\nA: x\x01y\r\n\r\n", "", RR_EPARSE, 11,
     "control character in part headers"},
    {"bare CR in header", NULL, 0, "--bnd\r\nA: x\ry\r\n\r\n", "", RR_EPARSE, 11,
     "control character in part headers"},
    {"continuation without header", NULL, 0, "--bnd\r\n folded\r\n\r\n", "", RR_EPARSE, 7,
     "continuation line without a header"},
    {"bare LF in headers", NULL, 0, "--bnd\r\nA: 1\n\r\n", "", RR_EPARSE, 11,
     "bare LF in part headers"},
    {"bad Content-Length", NULL, 0, "--bnd\r\nContent-Length: 12a\r\n\r\n", "", RR_EPARSE, 7,
     "bad Content-Length"},
    {"Content-Length overflow", NULL, 0, "--bnd\r\nContent-Length: 18446744073709551616\r\n\r\n",
     "", RR_EPARSE, 7, "bad Content-Length"},
    {"duplicate Content-Length", NULL, 0,
     "--bnd\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nx\r\n--bnd--", "", RR_EPARSE, 26,
     "duplicate Content-Length"},
    {"Content-Length differs", NULL, 0,
     "--bnd\r\n\r\nok\r\n--bnd\r\nContent-Length: 5\r\n\r\nabc\r\n--bnd--",
     "[]ok(2)\n[Content-Length=5;]abc", RR_EPARSE, 44, "part length differs from Content-Length"},
    {"stream ended inside a part", NULL, 0, "--bnd\r\n\r\nabc\r\n--bnd", "[]abc", RR_EPARSE, 19,
     "stream ended inside a part"},
    {"stream ended inside headers", NULL, 0, "--bnd\r\nA: 1\r\n", "", RR_EPARSE, 13,
     "stream ended inside part headers"},
    {"stream ended before the first boundary", NULL, 0, "preamble only\r\n--bn", "", RR_EPARSE, 19,
     "stream ended before the first boundary"},
    {"empty stream", NULL, 0, "", "", RR_EPARSE, 0, "stream ended before the first boundary"},
};

static void test_cases(void) {
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const pcase_t *c = &cases[i];
    rr_multipart_options_t o;
    rr_multipart_options_default(&o);
    o.allow_bare_lf = c->bare_lf;
    outcome_t w;
    parse_all_ways(c->ct ? c->ct : CT, &o, c->body, strlen(c->body), &w);
    int ok = strcmp(w.text, c->want) == 0 && w.rc == c->code && w.err.code == c->code &&
             w.err.offset == c->offset &&
             (c->reason ? w.err.reason && strcmp(w.err.reason, c->reason) == 0 : !w.err.reason);
    CHECK(ok);
    if (!ok)
      fprintf(stderr, "case '%s': got text '%s' rc %d offset %llu reason %s\n", c->name, w.text,
              w.rc, (unsigned long long)w.err.offset, w.err.reason ? w.err.reason : "-");
  }
}

/* ---- limits ------------------------------------------------------------------ */

static void expect(const rr_multipart_options_t *o, const char *body, size_t n, int code,
                   uint64_t offset, const char *reason) {
  outcome_t w;
  parse_all_ways(CT, o, body, n, &w);
  CHECK_EQ_INT(w.rc, code);
  CHECK_EQ_INT(w.err.code, code);
  CHECK_EQ_INT(w.err.offset, offset);
  if (reason)
    CHECK(w.err.reason && strcmp(w.err.reason, reason) == 0);
  else
    CHECK(w.err.reason == NULL);
}

static void test_limits(void) {
  rr_multipart_options_t o;
  rr_multipart_options_default(&o);
  CHECK_EQ_INT(o.max_header_block, 16384);
  CHECK_EQ_INT(o.max_headers, 64);
  CHECK_EQ_INT(o.max_parts, 100000);
  CHECK_EQ_INT(o.max_boundary, 70);
  CHECK_EQ_INT(o.allow_bare_lf, 0);

  /* header block: "A: xxxx\r\n\r\n" is 11 bytes; a limit of 11 fits, 10 not */
  static const char hb[] = "--bnd\r\nA: xxxx\r\n\r\nd\r\n--bnd--";
  o.max_header_block = 11;
  expect(&o, hb, sizeof hb - 1, 0, 0, NULL);
  o.max_header_block = 10;
  expect(&o, hb, sizeof hb - 1, RR_ELIMIT, 7 + 10, "header block over limit");
  /* a header line that never ends is cut at the limit */
  char big[200];
  memcpy(big, "--bnd\r\nA: ", 10);
  memset(big + 10, 'x', sizeof big - 10);
  o.max_header_block = 100;
  expect(&o, big, sizeof big, RR_ELIMIT, 107, "header block over limit");

  /* headers per part */
  rr_multipart_options_default(&o);
  o.max_headers = 2;
  static const char h2[] = "--bnd\r\nA: 1\r\nB: 2\r\n\r\n\r\n--bnd--";
  static const char h3[] = "--bnd\r\nA: 1\r\nB: 2\r\n C\r\nC: 3\r\n\r\n\r\n--bnd--";
  expect(&o, h2, sizeof h2 - 1, 0, 0, NULL);
  expect(&o, h3, sizeof h3 - 1, RR_ELIMIT, 23, "too many headers");

  /* parts per body: the third part is refused right after its delimiter line */
  rr_multipart_options_default(&o);
  o.max_parts = 2;
  static const char p2[] = "--bnd\r\n\r\nx\r\n--bnd\r\n\r\ny\r\n--bnd--";
  static const char p3[] = "--bnd\r\n\r\nx\r\n--bnd\r\n\r\ny\r\n--bnd\r\n\r\nz\r\n--bnd--";
  expect(&o, p2, sizeof p2 - 1, 0, 0, NULL);
  expect(&o, p3, sizeof p3 - 1, RR_ELIMIT, 31, "too many parts");

  /* transport padding: 256 bytes pass, the 257th is refused */
  rr_multipart_options_default(&o);
  char pad[5 + 257 + 12];
  memcpy(pad, "--bnd", 5);
  memset(pad + 5, ' ', 256);
  memcpy(pad + 5 + 256, "\r\n\r\n\r\n--bnd--", 13);
  expect(&o, pad, 5 + 256 + 13, 0, 0, NULL);
  memset(pad + 5, '\t', 257);
  expect(&o, pad, sizeof pad, RR_ELIMIT, 5 + 256, "transport padding over limit");

  /* boundary length: 70 by default, up to the cap when raised */
  char ct[200], body[300];
  char b71[72];
  memset(b71, 'b', 71);
  b71[71] = '\0';
  snprintf(ct, sizeof ct, "multipart/related; boundary=%s", b71);
  rr_multipart_parser_t *p = NULL;
  rr_multipart_error_t err;
  CHECK_EQ_INT(rr_multipart_parser_new(ct, strlen(ct), NULL, &rec_cb, NULL, &p, &err), RR_ELIMIT);
  CHECK(p == NULL);
  CHECK_EQ_INT(err.offset, 28 + 70);
  CHECK(strcmp(err.reason, "boundary too long") == 0);
  rr_multipart_options_default(&o);
  o.max_boundary = 71;
  int n = snprintf(body, sizeof body, "--%s\r\n\r\nq\r\n--%s--", b71, b71);
  outcome_t w;
  parse_all_ways(ct, &o, body, (size_t)n, &w);
  CHECK_EQ_INT(w.rc, 0);
  CHECK(strcmp(w.text, "[]q(1)\nEND 1") == 0);
  o.max_boundary = RR_MULTIPART_BOUNDARY_CAP + 1;
  CHECK_EQ_INT(rr_multipart_parser_new(ct, strlen(ct), &o, &rec_cb, NULL, &p, &err), RR_EINVAL);
}

/* ---- callbacks, error state, accessors ----------------------------------------- */

static int count_data(void *ud, const rr_multipart_part_t *pt, const char *d, size_t n) {
  (void)pt;
  (void)d;
  *(size_t *)ud += n;
  return 0;
}

static int check_part(void *ud, const rr_multipart_part_t *pt) {
  (void)ud;
  CHECK(strcmp(pt->content_type, "application/dicom") == 0);
  CHECK(strcmp(pt->content_location, "/studies/1") == 0);
  CHECK(pt->has_content_length && pt->content_length == 4);
  CHECK(strcmp(rr_multipart_part_header(pt, "x-custom"), "v") == 0);
  CHECK(rr_multipart_part_header(pt, "x-none") == NULL);
  CHECK_EQ_INT(pt->offset, 7);
  CHECK_EQ_INT(pt->data_offset, 104);
  return 0;
}

static void test_callbacks(void) {
  /* a callback's non-zero return stops the parser for good */
  outcome_t w;
  parse(CT, NULL, "--bnd\r\n\r\nx\r\n--bnd--", 18, 18, 0, 7, &w);
  CHECK_EQ_INT(w.rc, 7);
  CHECK_EQ_INT(w.err.code, 7);
  CHECK(w.err.reason && strcmp(w.err.reason, "stopped by callback") == 0);
  CHECK(strcmp(w.text, "[]") == 0);

  static const char body[] =
      "--bnd\r\nContent-Type: application/dicom\r\nContent-Location: "
      "/studies/1\r\nContent-Length: 4\r\nX-Custom: v\r\n\r\nDICM\r\n--bnd--";
  rr_multipart_callbacks_t cb = {check_part, count_data, NULL, NULL};
  size_t got = 0;
  rr_multipart_parser_t *p = NULL;
  CHECK_EQ_INT(rr_multipart_parser_new(CT, strlen(CT), NULL, &cb, &got, &p, NULL), 0);
  CHECK_EQ_INT(rr_multipart_parser_feed(p, body, sizeof body - 1), 0);
  CHECK_EQ_INT(rr_multipart_parser_finish(p), 0);
  CHECK_EQ_INT(rr_multipart_parser_parts(p), 1);
  CHECK_EQ_INT(got, 4);
  CHECK(strcmp(rr_multipart_parser_content_type(p)->type, "application/dicom") == 0);
  CHECK_EQ_INT(rr_multipart_parser_error(p)->code, 0);
  /* the epilogue is ignored, however long */
  CHECK_EQ_INT(rr_multipart_parser_feed(p, "--bnd\r\n\r\nmore", 13), 0);
  CHECK_EQ_INT(rr_multipart_parser_finish(p), 0);
  rr_multipart_parser_free(p);
  rr_multipart_parser_free(NULL);

  /* no callbacks at all */
  CHECK_EQ_INT(rr_multipart_parser_new(CT, strlen(CT), NULL, NULL, NULL, &p, NULL), 0);
  CHECK_EQ_INT(rr_multipart_parser_feed(p, body, sizeof body - 1), 0);
  CHECK_EQ_INT(rr_multipart_parser_finish(p), 0);
  rr_multipart_parser_free(p);

  /* ignore_content_length */
  static const char bad[] = "--bnd\r\nContent-Length: 5\r\n\r\nabc\r\n--bnd--";
  rr_multipart_options_t o;
  rr_multipart_options_default(&o);
  o.ignore_content_length = 1;
  parse_all_ways(CT, &o, bad, sizeof bad - 1, &w);
  CHECK_EQ_INT(w.rc, 0);
  CHECK(strcmp(w.text, "[Content-Length=5;]abc(3)\nEND 1") == 0);
}

/* ---- Content-Type -------------------------------------------------------------- */

typedef struct ctcase {
  const char *value;
  int code;
  const char *boundary; /* or the error reason */
  const char *type;     /* or the error offset as text */
  int related;
} ctcase_t;

static const ctcase_t ctcases[] = {
    {"multipart/related; type=\"application/dicom\"; boundary=abc", 0, "abc", "application/dicom",
     1},
    {"Multipart/Related;BOUNDARY=\"a'()+_,-./:=? z\";TYPE=application/dicom", 0, "a'()+_,-./:=? z",
     "application/dicom", 1},
    {"  multipart/related ; boundary = \"x\\\"y\" ; start=\"<1@x>\" ; type = "
     "\"application/dicom+json\"  ",
     0, "x\"y", "application/dicom+json", 1},
    {"multipart/related; boundary=abc; transfer-syntax=1.2.840.10008.1.2.1;", 0, "abc", "", 1},
    {"multipart/related;\tboundary=----=_Part_0_1.2/x:y?z", 0, "----=_Part_0_1.2/x:y?z", "", 1},
    {"multipart/mixed; boundary=b", 0, "b", "", 0},
    {"multipart/related; start-info=\"a very long value that is skipped, not stored\"; "
     "boundary=\"{b}\"",
     0, "{b}", "", 1},
    {"application/dicom", RR_EPARSE, "not a multipart media type", "0", 0},
    {"text/related; boundary=b", RR_EPARSE, "not a multipart media type", "0", 0},
    {"multipart", RR_EPARSE, "malformed media type", "9", 0},
    {"multipart/; boundary=b", RR_EPARSE, "malformed media type", "10", 0},
    {"multipart/related; type=x", RR_EPARSE, "no boundary parameter", "25", 0},
    {"multipart/related", RR_EPARSE, "no boundary parameter", "17", 0},
    {"multipart/related; boundary=\"\"", RR_EPARSE, "empty boundary", "28", 0},
    {"multipart/related; boundary=", RR_EPARSE, "malformed parameter", "28", 0},
    {"multipart/related; boundary", RR_EPARSE, "malformed parameter", "27", 0},
    {"multipart/related boundary=a", RR_EPARSE, "malformed parameter", "18", 0},
    {"multipart/related; =a", RR_EPARSE, "malformed parameter", "19", 0},
    {"multipart/related; boundary=\"abc \"", RR_EPARSE, "boundary ends with a space", "32", 0},
    {"multipart/related; boundary=\"ab", RR_EPARSE, "unterminated quoted string", "28", 0},
    {"multipart/related; boundary=\"a\rb\"", RR_EPARSE, "control character in parameter", "30", 0},
    {"multipart/related; boundary=\"a\xc3\xa9\"", RR_EPARSE, "bad character in boundary", "30", 0},
    {"multipart/related; boundary=a; Boundary=b", RR_EPARSE, "duplicate boundary parameter", "31",
     0},
    {"multipart/related; type=a; type=b; boundary=c", RR_EPARSE, "duplicate type parameter", "27",
     0},
};

static void test_content_type(void) {
  for (size_t i = 0; i < sizeof ctcases / sizeof ctcases[0]; i++) {
    const ctcase_t *c = &ctcases[i];
    rr_multipart_content_type_t ct;
    rr_multipart_error_t err;
    int rc = rr_multipart_content_type_parse(c->value, strlen(c->value), 0, &ct, &err);
    int ok;
    if (c->code == 0)
      ok = rc == 0 && strcmp(ct.boundary, c->boundary) == 0 &&
           ct.boundary_len == strlen(c->boundary) && strcmp(ct.type, c->type) == 0 &&
           ct.related == c->related && err.code == 0;
    else
      ok = rc == c->code && err.code == c->code && strcmp(err.reason, c->boundary) == 0 &&
           err.offset == strtoull(c->type, NULL, 10);
    CHECK(ok);
    if (!ok)
      fprintf(stderr, "content type '%s': rc %d reason %s offset %llu boundary '%s'\n", c->value,
              rc, err.reason ? err.reason : "-", (unsigned long long)err.offset,
              rc ? "" : ct.boundary);
  }
  /* not NUL-terminated: only len bytes count */
  rr_multipart_content_type_t ct;
  CHECK_EQ_INT(
      rr_multipart_content_type_parse("multipart/related; boundary=abcdef", 31, 0, &ct, NULL), 0);
  CHECK(strcmp(ct.boundary, "abc") == 0);
  /* a long boundary, and a type over its limit */
  char v[600];
  int n = snprintf(v, sizeof v, "multipart/related; boundary=\"%0200d\"", 7);
  CHECK_EQ_INT(rr_multipart_content_type_parse(v, (size_t)n, RR_MULTIPART_BOUNDARY_CAP, &ct, NULL),
               0);
  CHECK_EQ_INT(ct.boundary_len, 200);
  CHECK_EQ_INT(
      rr_multipart_content_type_parse(v, (size_t)n, RR_MULTIPART_BOUNDARY_CAP + 1, &ct, NULL),
      RR_EINVAL);
  memcpy(v, "multipart/related; boundary=b; type=", 36);
  memset(v + 36, 't', 300);
  rr_multipart_error_t err;
  CHECK_EQ_INT(rr_multipart_content_type_parse(v, 336, 0, &ct, &err), RR_ELIMIT);
  CHECK_EQ_INT(err.offset, 36 + 255);
  /* over the scratch space entirely */
  memset(v + 36, 't', 500);
  CHECK_EQ_INT(rr_multipart_content_type_parse(v, 536, 0, &ct, &err), RR_ELIMIT);
}

/* ---- builder ------------------------------------------------------------------- */

static void test_builder(void) {
  rr_multipart_builder_t b;
  rr_buf_t out;
  rr_buf_init(&out, 1 << 20);
  static const unsigned char r16[16] = {0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                                        0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff};
  CHECK_EQ_INT(rr_multipart_builder_init(&b, NULL, r16, 16), 0);
  CHECK(strcmp(b.boundary, "radrelay-00112233445566778899aabbccddeeff") == 0);
  CHECK_EQ_INT(rr_multipart_builder_init(&b, NULL, r16, 15), RR_EINVAL);
  unsigned char r40[40] = {0};
  CHECK_EQ_INT(rr_multipart_builder_init(&b, NULL, r40, 40), 0);
  CHECK_EQ_INT(b.boundary_len, 9 + 60);
  CHECK_EQ_INT(rr_multipart_builder_init(&b, NULL, NULL, 0), 0);
  CHECK_EQ_INT(b.boundary_len, 9 + 48);
  rr_multipart_builder_t b2;
  CHECK_EQ_INT(rr_multipart_builder_init(&b2, NULL, NULL, 0), 0);
  CHECK(strcmp(b.boundary, b2.boundary) != 0);
  CHECK_EQ_INT(rr_multipart_builder_init(&b, "", NULL, 0), RR_EINVAL);
  CHECK_EQ_INT(rr_multipart_builder_init(&b, "ab ", NULL, 0), RR_EINVAL);
  CHECK_EQ_INT(rr_multipart_builder_init(&b, "a\"b", NULL, 0), RR_EINVAL);
  char b71[72];
  memset(b71, 'x', 71);
  b71[71] = '\0';
  CHECK_EQ_INT(rr_multipart_builder_init(&b, b71, NULL, 0), RR_EINVAL);
  CHECK_EQ_INT(rr_multipart_builder_init(&b, "a'()+_,-./:=? z", NULL, 0), 0);

  /* the exact bytes */
  CHECK_EQ_INT(rr_multipart_builder_init(&b, "B0", NULL, 0), 0);
  CHECK_EQ_INT(rr_multipart_builder_content_type(&b, "application/dicom", &out), 0);
  CHECK_MEM_STR(out.data, out.len,
                "multipart/related; type=\"application/dicom\"; boundary=\"B0\"");
  rr_buf_reset(&out);
  CHECK_EQ_INT(rr_multipart_builder_content_type(&b, NULL, &out), 0);
  CHECK_MEM_STR(out.data, out.len, "multipart/related; boundary=\"B0\"");
  rr_buf_reset(&out);
  CHECK_EQ_INT(rr_multipart_builder_content_type(&b, "a\"b", &out), RR_EINVAL);
  CHECK_EQ_INT(out.len, 0);

  rr_multipart_header_t h[] = {{"Content-Type", "application/dicom"}, {"X-A", ""}};
  CHECK_EQ_INT(rr_multipart_builder_end_part(&b, &out), RR_EINVAL);
  CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, h, 2, &out), 0);
  CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, h, 2, &out), RR_EINVAL);
  CHECK_EQ_INT(rr_multipart_builder_close(&b, &out), RR_EINVAL);
  rr_buf_puts(&out, "DATA");
  CHECK_EQ_INT(rr_multipart_builder_end_part(&b, &out), 0);
  CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, NULL, 0, &out), 0);
  CHECK_EQ_INT(rr_multipart_builder_end_part(&b, &out), 0);
  CHECK_EQ_INT(rr_multipart_builder_close(&b, &out), 0);
  CHECK_EQ_INT(rr_multipart_builder_close(&b, &out), RR_EINVAL);
  CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, NULL, 0, &out), RR_EINVAL);
  CHECK_MEM_STR(out.data, out.len,
                "--B0\r\nContent-Type: application/dicom\r\nX-A: \r\n\r\nDATA\r\n"
                "--B0\r\n\r\n\r\n--B0--\r\n");
  outcome_t w;
  parse_all_ways("multipart/related; boundary=\"B0\"", NULL, out.data, out.len, &w);
  CHECK_EQ_INT(w.rc, 0);
  CHECK(strcmp(w.text, "[Content-Type=application/dicom;X-A=;]DATA(4)\n[](0)\nEND 2") == 0);

  /* bad headers, and a full buffer, leave out unchanged */
  rr_multipart_builder_init(&b, "B0", NULL, 0);
  rr_buf_reset(&out);
  rr_multipart_header_t bad1[] = {{"Bad Name", "v"}};
  rr_multipart_header_t bad2[] = {{"N", "a\r\nb"}};
  rr_multipart_header_t bad3[] = {{"", "v"}};
  CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, bad1, 1, &out), RR_EINVAL);
  CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, bad2, 1, &out), RR_EINVAL);
  CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, bad3, 1, &out), RR_EINVAL);
  rr_buf_t small;
  rr_buf_init(&small, 10);
  rr_buf_puts(&small, "abc");
  CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, h, 2, &small), RR_ELIMIT);
  CHECK_MEM_STR(small.data, small.len, "abc");
  CHECK_EQ_INT(b.in_part, 0);
  rr_buf_close(&small);
  CHECK_EQ_INT(out.len, 0);
  rr_buf_close(&out);
}

/* ---- round trip: builder -> parser, random parts --------------------------------- */

typedef struct collect {
  char **data;
  size_t *len, *cap;
  size_t nparts, max;
  char loc[8][64];
  int bad;
} collect_t;

static int col_begin(void *ud, const rr_multipart_part_t *pt) {
  collect_t *c = ud;
  if (pt->index >= c->max || !pt->content_location) {
    c->bad = 1;
    return 0;
  }
  snprintf(c->loc[pt->index], sizeof c->loc[0], "%s", pt->content_location);
  c->len[pt->index] = 0;
  c->nparts++;
  return 0;
}

static int col_data(void *ud, const rr_multipart_part_t *pt, const char *d, size_t n) {
  collect_t *c = ud;
  size_t i = pt->index;
  if (c->len[i] + n > c->cap[i]) {
    c->bad = 1;
    return RR_ELIMIT;
  }
  memcpy(c->data[i] + c->len[i], d, n);
  c->len[i] += n;
  return 0;
}

/* Random bytes rich in CR, LF, '-' and fragments of the boundary. */
static void fill(char *d, size_t n, const char *bnd, unsigned *seed) {
  char frag[160];
  size_t bl = strlen(bnd);
  size_t i = 0;
  while (i < n) {
    unsigned r = rnd_next(seed);
    size_t fl = 0;
    switch (r % 16) {
    case 0: fl = (size_t)snprintf(frag, sizeof frag, "%s", bnd); break;
    case 1: fl = (size_t)snprintf(frag, sizeof frag, "#--%s", bnd); break;
    case 2: fl = (size_t)snprintf(frag, sizeof frag, "\r\n--%.*s#", (int)(r / 16 % bl), bnd); break;
    case 3: fl = (size_t)snprintf(frag, sizeof frag, "\r\n--%sx", bnd); break;
    case 4: fl = (size_t)snprintf(frag, sizeof frag, "\r\n--%s-x", bnd); break;
    case 5: fl = (size_t)snprintf(frag, sizeof frag, "\r\n--%s \t y", bnd); break;
    case 6: fl = (size_t)snprintf(frag, sizeof frag, "#\n--%s\r\n", bnd); break;
    case 7: fl = (size_t)snprintf(frag, sizeof frag, "\r--%s--", bnd); break;
    case 8: fl = (size_t)snprintf(frag, sizeof frag, "\r\n\r\n-#"); break;
    default:
      frag[0] = (char)(r >> 4);
      fl = 1;
      break;
    }
    if (fl > n - i) { /* a cut fragment could end in a real delimiter */
      memset(frag, '#', sizeof frag);
      fl = n - i;
    }
    memcpy(d + i, frag, fl);
    i += fl;
  }
}

static void test_round_trip(void) {
  unsigned seed = 20240611u;
  enum { MAXP = 5 };
  size_t cap = (size_t)1 << 20;
  char *src[MAXP], *dst[MAXP];
  size_t slen[MAXP], dlen[MAXP], dcap[MAXP];
  for (int i = 0; i < MAXP; i++) {
    src[i] = malloc(cap);
    dst[i] = malloc(cap);
    dcap[i] = cap;
  }
  rr_buf_t body, ct;
  rr_buf_init(&body, (size_t)8 << 20);
  rr_buf_init(&ct, 512);
  for (int round = 0; round < 12; round++) {
    unsigned char rnd[24];
    for (size_t k = 0; k < sizeof rnd; k++)
      rnd[k] = (unsigned char)rnd_next(&seed);
    rr_multipart_builder_t b;
    CHECK_EQ_INT(rr_multipart_builder_init(&b, NULL, rnd, sizeof rnd), 0);
    rr_buf_reset(&body);
    rr_buf_reset(&ct);
    CHECK_EQ_INT(rr_multipart_builder_content_type(&b, "application/dicom", &ct), 0);
    size_t nparts = rnd_next(&seed) % (MAXP + 1);
    for (size_t i = 0; i < nparts; i++) {
      unsigned kind = rnd_next(&seed) % 4;
      slen[i] = kind == 0 ? 0 : kind == 1 ? rnd_next(&seed) % 64 : rnd_next(&seed) % (cap + 1);
      if (round == 0 && i == 0)
        slen[i] = cap; /* the largest size at least once */
      fill(src[i], slen[i], b.boundary, &seed);
      char loc[64], len[32];
      snprintf(loc, sizeof loc, "/studies/1.2.%zu/instances/%d", i, round);
      snprintf(len, sizeof len, "%zu", slen[i]);
      rr_multipart_header_t h[] = {
          {"Content-Type", "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"},
          {"Content-Location", loc},
          {"Content-Length", len}};
      CHECK_EQ_INT(rr_multipart_builder_begin_part(&b, h, i % 2 ? 3 : 2, &body), 0);
      CHECK_EQ_INT(rr_buf_append(&body, src[i], slen[i]), 0);
      CHECK_EQ_INT(rr_multipart_builder_end_part(&b, &body), 0);
    }
    CHECK_EQ_INT(rr_multipart_builder_close(&b, &body), 0);

    for (int way = 0; way < 3; way++) {
      collect_t c;
      memset(&c, 0, sizeof c);
      c.data = dst;
      c.len = dlen;
      c.cap = dcap;
      c.max = MAXP;
      rr_multipart_callbacks_t cb = {col_begin, col_data, NULL, NULL};
      rr_multipart_parser_t *p = NULL;
      CHECK_EQ_INT(rr_multipart_parser_new(ct.data, ct.len, NULL, &cb, &c, &p, NULL), 0);
      int rc = 0;
      unsigned s2 = seed + (unsigned)way;
      /* whole; 1-byte chunks for the smaller bodies; random splits up to 64 KiB */
      size_t step = way == 0 ? body.len : way == 1 && body.len < (256u << 10) ? 1 : 0;
      for (size_t i = 0; i < body.len && rc == 0;) {
        size_t k = step ? step : 1 + rnd_next(&s2) % (64u << 10);
        if (k > body.len - i)
          k = body.len - i;
        rc = rr_multipart_parser_feed(p, body.data + i, k);
        i += k;
      }
      CHECK_EQ_INT(rc, 0);
      CHECK_EQ_INT(rr_multipart_parser_finish(p), 0);
      rr_multipart_parser_free(p);
      CHECK(!c.bad);
      CHECK_EQ_INT(c.nparts, nparts);
      for (size_t i = 0; i < nparts && i < c.nparts; i++) {
        char loc[64];
        snprintf(loc, sizeof loc, "/studies/1.2.%zu/instances/%d", i, round);
        CHECK(strcmp(c.loc[i], loc) == 0);
        CHECK_EQ_INT(dlen[i], slen[i]);
        CHECK(dlen[i] == slen[i] && memcmp(dst[i], src[i], slen[i]) == 0);
      }
    }
  }
  rr_buf_close(&body);
  rr_buf_close(&ct);
  for (int i = 0; i < MAXP; i++) {
    free(src[i]);
    free(dst[i]);
  }
}

/* ---- a WADO-RS response -----------------------------------------------------------
 * Framing after the PS3.18 §8.6 multipart examples (not captured from a
 * server): a quoted type, a transfer-syntax parameter, a CRLF preamble, each
 * part with Content-Type (and transfer-syntax) and Content-Location, binary
 * DICOM Part 10 data (128-byte preamble, "DICM", explicit VR little endian
 * meta group, then "pixel" bytes holding CR, LF and dashes). */
static size_t fake_dicom(char *d, const char *sop_uid, unsigned seed) {
  size_t n = 0;
  memset(d, 0, 128);
  n = 128;
  memcpy(d + n, "DICM", 4);
  n += 4;
  /* (0002,0010) UI transfer syntax, (0008,0018) UI SOP Instance UID */
  static const char ts[] = "1.2.840.10008.1.2.1";
  const char *vals[2] = {ts, sop_uid};
  const unsigned short tags[2][2] = {{0x0002, 0x0010}, {0x0008, 0x0018}};
  for (int k = 0; k < 2; k++) {
    size_t vl = strlen(vals[k]);
    size_t padded = vl + (vl & 1);
    d[n++] = (char)(tags[k][0] & 0xff);
    d[n++] = (char)(tags[k][0] >> 8);
    d[n++] = (char)(tags[k][1] & 0xff);
    d[n++] = (char)(tags[k][1] >> 8);
    d[n++] = 'U';
    d[n++] = 'I';
    d[n++] = (char)(padded & 0xff);
    d[n++] = (char)(padded >> 8);
    memcpy(d + n, vals[k], vl);
    n += vl;
    if (vl & 1)
      d[n++] = '\0';
  }
  /* (7FE0,0010) OB pixel data, 4 KiB */
  static const char px[] = {(char)0xe0, 0x7f, 0x10, 0x00, 'O', 'B', 0, 0, 0x00, 0x10, 0x00, 0x00};
  memcpy(d + n, px, sizeof px);
  n += sizeof px;
  for (int k = 0; k < 4096; k++) {
    unsigned r = rnd_next(&seed);
    d[n++] = r % 5 == 0 ? '\r' : r % 5 == 1 ? '\n' : r % 5 == 2 ? '-' : (char)(r >> 8);
  }
  return n;
}

static int wado_begin(void *ud, const rr_multipart_part_t *pt) {
  int *seen = ud;
  CHECK(strcmp(pt->content_type, "application/dicom; transfer-syntax=1.2.840.10008.1.2.1") == 0);
  CHECK(strncmp(pt->content_location, "https://pacs.example.org/dicom-web/studies/", 43) == 0);
  CHECK(!pt->has_content_length);
  (*seen)++;
  return 0;
}

static void test_wado_response(void) {
  static const char ct[] =
      "multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.1; "
      "boundary=\"DICOMwebBoundary-7f3a9c21\"";
  static char d1[8192], d2[8192], body[20000];
  size_t n1 = fake_dicom(d1, "1.2.826.0.1.3680043.8.498.1", 1);
  size_t n2 = fake_dicom(d2, "1.2.826.0.1.3680043.8.498.22", 2);
  size_t n = 0;
  const char *loc = "https://pacs.example.org/dicom-web/studies/1.2.826.0.1.3680043.8.498.0/"
                    "series/1.2.826.0.1.3680043.8.498.9/instances/";
  n += (size_t)snprintf(body + n, sizeof body - n,
                        "\r\n--DICOMwebBoundary-7f3a9c21\r\n"
                        "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
                        "Content-Location: %s1.2.826.0.1.3680043.8.498.1\r\n\r\n",
                        loc);
  memcpy(body + n, d1, n1);
  n += n1;
  n += (size_t)snprintf(body + n, sizeof body - n,
                        "\r\n--DICOMwebBoundary-7f3a9c21\r\n"
                        "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
                        "Content-Location: %s1.2.826.0.1.3680043.8.498.22\r\n\r\n",
                        loc);
  memcpy(body + n, d2, n2);
  n += n2;
  n += (size_t)snprintf(body + n, sizeof body - n, "\r\n--DICOMwebBoundary-7f3a9c21--\r\n");

  outcome_t w;
  parse_all_ways(ct, NULL, body, n, &w);
  CHECK_EQ_INT(w.rc, 0);
  CHECK(strstr(w.text, "END 2") != NULL);

  int seen = 0;
  rr_multipart_callbacks_t cb = {wado_begin, NULL, NULL, NULL};
  rr_multipart_parser_t *p = NULL;
  CHECK_EQ_INT(rr_multipart_parser_new(ct, sizeof ct - 1, NULL, &cb, &seen, &p, NULL), 0);
  CHECK(strcmp(rr_multipart_parser_content_type(p)->type, "application/dicom") == 0);
  CHECK_EQ_INT(rr_multipart_parser_feed(p, body, n), 0);
  CHECK_EQ_INT(rr_multipart_parser_finish(p), 0);
  CHECK_EQ_INT(seen, 2);
  rr_multipart_parser_free(p);

  /* the data comes back byte for byte */
  char *dst[2] = {malloc(8192), malloc(8192)};
  size_t dlen[2], dcap[2] = {8192, 8192};
  collect_t c;
  memset(&c, 0, sizeof c);
  c.data = dst;
  c.len = dlen;
  c.cap = dcap;
  c.max = 2;
  rr_multipart_callbacks_t ccb = {col_begin, col_data, NULL, NULL};
  CHECK_EQ_INT(rr_multipart_parser_new(ct, sizeof ct - 1, NULL, &ccb, &c, &p, NULL), 0);
  for (size_t i = 0; i < n; i += 7)
    CHECK_EQ_INT(rr_multipart_parser_feed(p, body + i, n - i < 7 ? n - i : 7), 0);
  CHECK_EQ_INT(rr_multipart_parser_finish(p), 0);
  rr_multipart_parser_free(p);
  CHECK(c.nparts == 2 && dlen[0] == n1 && dlen[1] == n2);
  CHECK(memcmp(dst[0], d1, n1) == 0 && memcmp(dst[1], d2, n2) == 0);
  CHECK(memcmp(dst[0] + 128, "DICM", 4) == 0);
  free(dst[0]);
  free(dst[1]);
}

/* ---- allocation failures ------------------------------------------------------------ */

static void test_oom(void) {
  static const char body[] = "--bnd\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\nF: 6\r\nG: 7\r\n"
                             "H: 8\r\nI: 9\r\n folded\r\n\r\ndata\r\n--bnd--";
  rr_multipart_callbacks_t cb = {NULL, count_data, NULL, NULL};
  int ok_runs = 0;
  for (long k = 0; k < 100; k++) {
    size_t got = 0;
    rr_multipart_parser_t *p = NULL;
    rr_multipart_error_t err = {0, 0, NULL};
    g_allocs = 0;
    g_fail_at = k;
    int rc = rr_multipart_parser_new(CT, strlen(CT), NULL, &cb, &got, &p, &err);
    for (size_t i = 0; rc == 0 && i < sizeof body - 1; i += 3)
      rc = rr_multipart_parser_feed(p, body + i, sizeof body - 1 - i < 3 ? sizeof body - 1 - i : 3);
    if (rc == 0)
      rc = rr_multipart_parser_finish(p);
    g_fail_at = -1;
    CHECK(rc == 0 || rc == RR_ENOMEM);
    if (rc && p)
      CHECK(rr_multipart_parser_error(p)->code == RR_ENOMEM &&
            strcmp(rr_multipart_parser_error(p)->reason, "out of memory") == 0);
    rr_multipart_parser_free(p);
    ok_runs += rc == 0;
    if (rc == 0) {
      CHECK_EQ_INT(got, 4);
      if (g_allocs <= k)
        break; /* fewer allocations than k: every point has been tried */
    }
  }
  CHECK_EQ_INT(ok_runs, 1);
}

int main(void) {
  RUN(test_cases);
  RUN(test_limits);
  RUN(test_callbacks);
  RUN(test_content_type);
  RUN(test_builder);
  RUN(test_round_trip);
  RUN(test_wado_response);
  RUN(test_oom);
  return TEST_SUMMARY();
}

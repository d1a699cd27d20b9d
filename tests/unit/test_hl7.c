/* Unit tests of the HL7 codec (engine/hl7). argv[1] = tests/data/hl7. */
#include <dirent.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "hl7/hl7.h"
#include "rr_test.h"

static const char *g_data;

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

static char *load(const char *name, size_t *len) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", g_data, name);
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path);
    return NULL;
  }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *d = malloc((size_t)n + 1);
  size_t got = fread(d, 1, (size_t)n, f);
  fclose(f);
  d[got] = '\0';
  *len = got;
  return d;
}

/* Expected serialization: every line terminator (CR, LF, CRLF) becomes one
 * CR, blank lines go, and the last segment ends with CR. */
static size_t normalize(const char *in, size_t n, char *out) {
  size_t w = 0;
  size_t i = 0;
  while (i < n) {
    size_t s = i;
    while (i < n && in[i] != '\r' && in[i] != '\n')
      i++;
    if (i > s) {
      memcpy(out + w, in + s, i - s);
      w += i - s;
      out[w++] = '\r';
    }
    while (i < n && (in[i] == '\r' || in[i] == '\n'))
      i++;
  }
  return w;
}

static int is_hl7(const char *name) {
  size_t n = strlen(name);
  return n > 4 && strcmp(name + n - 4, ".hl7") == 0;
}

/* ---- corpus: every message parses and round-trips byte for byte --------- */

typedef struct items {
  char kinds[64];
  size_t lens[64];
  size_t offs[64];
  uint64_t sums[64];
  size_t n;
} items_t;

static int collect(void *ud, rr_hl7_item_kind_t kind, const char *d, size_t len, size_t off) {
  items_t *it = ud;
  if (it->n == 64)
    return 1;
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < len; i++)
    h = (h ^ (unsigned char)d[i]) * 1099511628211ull;
  it->kinds[it->n] = (char)kind;
  it->lens[it->n] = len;
  it->offs[it->n] = off;
  it->sums[it->n] = h;
  it->n++;
  return 0;
}

static void feed_split(const char *d, size_t n, size_t (*next)(size_t, void *), void *ud,
                       items_t *out) {
  rr_hl7_reader_t r;
  rr_hl7_reader_init(&r, n + 16);
  memset(out, 0, sizeof *out);
  size_t i = 0;
  while (i < n) {
    size_t k = next(n - i, ud);
    CHECK_EQ_INT(rr_hl7_reader_feed(&r, d + i, k, collect, out), 0);
    i += k;
  }
  CHECK_EQ_INT(rr_hl7_reader_finish(&r, collect, out), 0);
  rr_hl7_reader_close(&r);
}

static size_t whole(size_t left, void *ud) {
  (void)ud;
  return left;
}
static size_t one(size_t left, void *ud) {
  (void)ud;
  (void)left;
  return 1;
}
static size_t random_split(size_t left, void *ud) {
  unsigned *seed = ud;
  *seed = *seed * 1103515245u + 12345u;
  size_t k = 1 + (*seed >> 8) % 97;
  return k < left ? k : left;
}

static void test_corpus_roundtrip(void) {
  DIR *dir = opendir(g_data);
  CHECK(dir != NULL);
  if (!dir)
    return;
  struct dirent *e;
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  rr_buf_t out;
  rr_buf_init(&out, (size_t)1 << 30);
  int files = 0;
  while ((e = readdir(dir))) {
    if (!is_hl7(e->d_name))
      continue;
    files++;
    size_t n;
    char *d = load(e->d_name, &n);
    rr_hl7_batch_t b;
    rr_hl7_error_t err;
    CHECK_EQ_INT(rr_hl7_batch_split(d, n, RR_HL7_LENIENT, &b, &err), 0);
    CHECK(b.nmsgs >= 1);
    for (size_t i = 0; i < b.nmsgs; i++) {
      int rc = rr_hl7_parse(m, b.msgs[i].p, b.msgs[i].len, NULL, &err);
      if (rc)
        fprintf(stderr, "%s: %s\n", e->d_name, err.text);
      CHECK_EQ_INT(rc, 0);
      rr_buf_reset(&out);
      CHECK_EQ_INT(rr_hl7_serialize(m, &out), 0);
      char *want = malloc(b.msgs[i].len + 2);
      size_t wn = normalize(b.msgs[i].p, b.msgs[i].len, want);
      CHECK(out.len == wn && memcmp(out.data, want, wn) == 0);
      free(want);
    }
    /* The stream splitter finds the same items whole, byte by byte and in
     * random splits. */
    items_t a, bb, c;
    unsigned seed = 7;
    feed_split(d, n, whole, NULL, &a);
    if (n < 100000)
      feed_split(d, n, one, NULL, &bb);
    else
      bb = a;
    feed_split(d, n, random_split, &seed, &c);
    CHECK(a.n >= b.nmsgs);
    CHECK(a.n == bb.n && a.n == c.n);
    CHECK(memcmp(a.sums, bb.sums, sizeof a.sums) == 0 &&
          memcmp(a.sums, c.sums, sizeof a.sums) == 0);
    CHECK(memcmp(a.offs, c.offs, sizeof a.offs) == 0);
    rr_hl7_batch_close(&b);
    free(d);
  }
  closedir(dir);
  CHECK(files >= 18);
  rr_buf_close(&out);
  rr_hl7_msg_free(m);
}

/* ---- values.tsv: expected decoded values -------------------------------- */

static size_t unescape_tsv(const char *s, char *out) {
  size_t w = 0;
  for (; *s; s++) {
    if (*s == '\\' && s[1]) {
      s++;
      out[w++] = *s == 'n' ? '\n' : *s == 't' ? '\t' : *s == 'r' ? '\r' : *s;
    } else {
      out[w++] = *s;
    }
  }
  out[w] = '\0';
  return w;
}

static void test_values(void) {
  size_t n;
  char *tsv = load("values.tsv", &n);
  CHECK(tsv != NULL);
  if (!tsv)
    return;
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  rr_buf_t v;
  rr_buf_init(&v, 1 << 24);
  int rows = 0;
  char *save = NULL;
  for (char *line = strtok_r(tsv, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    if (line[0] == '#' || !line[0])
      continue;
    char *file = line, *path = strchr(file, '\t');
    if (!path)
      continue;
    *path++ = '\0';
    char *want = strchr(path, '\t');
    char empty[1] = "";
    if (want)
      *want++ = '\0';
    else
      want = empty;
    char expect[4096];
    size_t elen = unescape_tsv(want, expect);
    size_t which = 1;
    char *hash = strchr(file, '#');
    if (hash) {
      *hash = '\0';
      which = (size_t)strtoul(hash + 1, NULL, 10);
    }
    size_t dn;
    char *d = load(file, &dn);
    if (!d) {
      CHECK(d != NULL);
      continue;
    }
    rr_hl7_batch_t b;
    CHECK_EQ_INT(rr_hl7_batch_split(d, dn, RR_HL7_LENIENT, &b, NULL), 0);
    CHECK(which <= b.nmsgs);
    if (which <= b.nmsgs) {
      CHECK_EQ_INT(rr_hl7_parse(m, b.msgs[which - 1].p, b.msgs[which - 1].len, NULL, NULL), 0);
      rr_buf_reset(&v);
      int rc = rr_hl7_get_s(m, path, &v);
      CHECK_EQ_INT(rc, 0);
      if (v.len != elen || memcmp(v.data ? v.data : "", expect, elen) != 0) {
        rr_test_failures++;
        fprintf(stderr, "%s %s: got '%.*s' want '%s'\n", file, path, (int)v.len,
                v.data ? v.data : "", expect);
      }
      rows++;
    }
    rr_hl7_batch_close(&b);
    free(d);
  }
  CHECK(rows >= 60);
  rr_buf_close(&v);
  rr_hl7_msg_free(m);
  free(tsv);
}

/* ---- parsing details ---------------------------------------------------- */

static const char ADT[] =
    "MSH|^~\\&|RIS|HOSP|RR|AI|20260101120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1\r"
    "EVN|A01|20260101120000\r"
    "PID|1||MRN1^^^H^MR~SS9^^^SSA^SS&X&Y||ZZTEST^ALPHA^B||19700101|F\r"
    "PV1|1|I|WARD^101^A\r";

static void test_paths(void) {
  rr_hl7_path_t p;
  CHECK_EQ_INT(rr_hl7_path_parse("PID-3[2].4.2", 12, &p), 0);
  CHECK(strcmp(p.segment, "PID") == 0 && p.occ == 1 && p.field == 3 && p.rep == 2 && p.comp == 4 &&
        p.sub == 2);
  CHECK_EQ_INT(rr_hl7_path_parse("OBX[3]-5", 8, &p), 0);
  CHECK(p.occ == 3 && p.field == 5 && p.rep == 0 && p.comp == 0);
  CHECK_EQ_INT(rr_hl7_path_parse("MSH-9.2", 7, &p), 0);
  CHECK(p.field == 9 && p.comp == 2);
  CHECK_EQ_INT(rr_hl7_path_parse("ZDS", 3, &p), 0);
  CHECK(p.field == 0);
  CHECK_EQ_INT(rr_hl7_path_parse("PID.3.1", 7, &p), 0);
  static const char *bad[] = {"PI",      "PID-",  "PID-0",       "PID-3[", "PID-3[0]",
                              "PID-3.x", "pid-3", "PID-3.1.2.3", "PID-3]"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    CHECK_EQ_INT(rr_hl7_path_parse(bad[i], strlen(bad[i]), &p), RR_EPATH);
  char buf[64];
  rr_hl7_path_parse("OBX[3]-5[2].1.2", 15, &p);
  rr_hl7_path_format(&p, buf, sizeof buf);
  CHECK(strcmp(buf, "OBX[3]-5[2].1.2") == 0);
}

static void test_get(void) {
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  CHECK_EQ_INT(rr_hl7_parse(m, ADT, sizeof ADT - 1, NULL, NULL), 0);
  rr_hl7_slice_t s;
  CHECK_EQ_INT(rr_hl7_get_raw_s(m, "MSH-1", &s), 0);
  CHECK_MEM_STR(s.p, s.len, "|");
  CHECK_EQ_INT(rr_hl7_get_raw_s(m, "MSH-2", &s), 0);
  CHECK_MEM_STR(s.p, s.len, "^~\\&");
  rr_hl7_get_raw_s(m, "MSH-3", &s);
  CHECK_MEM_STR(s.p, s.len, "RIS");
  rr_hl7_get_raw_s(m, "MSH-9.2", &s);
  CHECK_MEM_STR(s.p, s.len, "A01");
  rr_hl7_get_raw_s(m, "PID-3", &s);
  CHECK_MEM_STR(s.p, s.len, "MRN1^^^H^MR~SS9^^^SSA^SS&X&Y");
  rr_hl7_get_raw_s(m, "PID-3[2]", &s);
  CHECK_MEM_STR(s.p, s.len, "SS9^^^SSA^SS&X&Y");
  rr_hl7_get_raw_s(m, "PID-3[2].1", &s);
  CHECK_MEM_STR(s.p, s.len, "SS9");
  rr_hl7_get_raw_s(m, "PID-3[2].5.2", &s);
  CHECK_MEM_STR(s.p, s.len, "X");
  rr_hl7_get_raw_s(m, "PID-3.1", &s);
  CHECK_MEM_STR(s.p, s.len, "MRN1");
  rr_hl7_get_raw_s(m, "PID-3[3].1", &s);
  CHECK_EQ_INT(s.len, 0);
  CHECK_EQ_INT(rr_hl7_get_raw_s(m, "PID-30", &s), 0);
  CHECK_EQ_INT(s.len, 0);
  CHECK_EQ_INT(rr_hl7_get_raw_s(m, "OBX-5", &s), RR_ENOTFOUND);
  CHECK_EQ_INT(rr_hl7_get_raw_s(m, "PV1", &s), 0);
  CHECK_MEM_STR(s.p, s.len, "PV1|1|I|WARD^101^A");
  CHECK_EQ_INT(rr_hl7_segment_count(m), 4);
  CHECK(strcmp(rr_hl7_segment_name(m, 2), "PID") == 0);
  CHECK_EQ_INT(rr_hl7_segment_fields(m, 0), 12);
  CHECK_EQ_INT(rr_hl7_segment_fields(m, 2), 8);
  CHECK_EQ_INT(rr_hl7_segment_index(m, "PV1", 1), 3);
  CHECK(rr_hl7_segment_index(m, "PV1", 2) == SIZE_MAX);
  rr_hl7_msg_free(m);
}

static void test_delimiters(void) {
  static const char msg[] = "MSH*:!/@*APP*FAC*R*F*20260101**ORU:R01*ID1*P*2.5\r"
                            "PID*1**A:B:C!D:E@F**N/F/X/S/Y\r";
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  CHECK_EQ_INT(rr_hl7_parse(m, msg, sizeof msg - 1, NULL, NULL), 0);
  const rr_hl7_delims_t *d = rr_hl7_delims(m);
  CHECK(d->field == '*' && d->component == ':' && d->repetition == '!' && d->escape == '/' &&
        d->subcomponent == '@' && d->truncation == 0);
  rr_hl7_slice_t s;
  rr_hl7_get_raw_s(m, "PID-3[2].2.2", &s);
  CHECK_MEM_STR(s.p, s.len, "F");
  rr_buf_t v;
  rr_buf_init(&v, 1024);
  rr_hl7_get_s(m, "PID-5", &v);
  CHECK_MEM_STR(v.data, v.len, "N*X:Y");
  rr_hl7_get_raw_s(m, "MSH-9.2", &s);
  CHECK_MEM_STR(s.p, s.len, "R01");
  /* v2.7 truncation character */
  static const char m27[] = "MSH|^~\\&#|A|B|C|D|20260101||ADT^A01|X|P|2.7\rNTE|1||a\\P\\b#c\r";
  CHECK_EQ_INT(rr_hl7_parse(m, m27, sizeof m27 - 1, NULL, NULL), 0);
  CHECK(rr_hl7_delims(m)->truncation == '#');
  rr_buf_reset(&v);
  rr_hl7_get_s(m, "NTE-3", &v);
  CHECK_MEM_STR(v.data, v.len, "a#b#c");
  rr_hl7_get_raw_s(m, "MSH-2", &s);
  CHECK_MEM_STR(s.p, s.len, "^~\\&#");
  rr_buf_close(&v);
  rr_hl7_msg_free(m);
}

static void test_escapes(void) {
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  CHECK_EQ_INT(rr_hl7_parse(m, ADT, sizeof ADT - 1, NULL, NULL), 0);
  rr_buf_t v;
  rr_buf_init(&v, 1 << 20);
  static const struct {
    const char *in, *out;
  } cases[] = {
      {"a\\F\\b", "a|b"},
      {"\\S\\\\T\\\\R\\\\E\\", "^&~\\"},
      {"x\\X414243\\y", "xABCy"},
      {"l1\\.br\\l2", "l1\nl2"},
      {"\\H\\bold\\N\\", "bold"},
      {"a\\.sp2\\b", "a\n\nb"},
      {"\\Z99\\", "\\Z99\\"},
      {"open\\F", "open\\F"},
      {"\\X4\\", "\\X4\\"},
      {"\\X41ZZ\\", "\\X41ZZ\\"},
      {"\\Q\\", "\\Q\\"},
      {"caf\\XE9\\", "caf\xc3\xa9"}, /* undeclared charset, not UTF-8: read as Latin-1 */
      {"\\C2D41\\\xe9t\xe9\\C2842\\", "\xc3\xa9t\xc3\xa9"},
      {"\\.fi\\x", "x"},
      {"\\M2442\\\x24\x22", "\xe3\x81\x82"}, /* JIS X 0208 0x2422 = HIRAGANA A */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    rr_buf_reset(&v);
    CHECK_EQ_INT(rr_hl7_decode(m, cases[i].in, strlen(cases[i].in), &v), 0);
    if (v.len != strlen(cases[i].out) || memcmp(v.data, cases[i].out, v.len) != 0) {
      rr_test_failures++;
      fprintf(stderr, "decode case %zu: got '%.*s' want '%s'\n", i, (int)v.len, v.data,
              cases[i].out);
    }
  }
  /* encode then decode is the identity, for random text full of delimiters */
  unsigned seed = 1;
  static const char alphabet[] = "ab|^~\\&#\n\r xyz";
  rr_buf_t enc;
  rr_buf_init(&enc, 1 << 20);
  for (int round = 0; round < 2000; round++) {
    char text[64];
    size_t n = (size_t)(round % 40);
    for (size_t i = 0; i < n; i++) {
      seed = seed * 1103515245u + 12345u;
      text[i] = alphabet[(seed >> 16) % (sizeof alphabet - 1)];
    }
    /* a lone CR is written as \X0D\ and a CRLF as \.br\, which reads back
     * as LF: compare against the text with CRLF folded to LF */
    char want[64];
    size_t wn = 0;
    for (size_t i = 0; i < n; i++) {
      if (text[i] == '\r' && i + 1 < n && text[i + 1] == '\n')
        continue;
      want[wn++] = text[i];
    }
    rr_buf_reset(&enc);
    rr_buf_reset(&v);
    CHECK_EQ_INT(rr_hl7_encode(m, text, n, &enc), 0);
    CHECK(enc.len == 0 || (!memchr(enc.data, '|', enc.len) && !memchr(enc.data, '^', enc.len) &&
                           !memchr(enc.data, '\r', enc.len) && !memchr(enc.data, '\n', enc.len)));
    CHECK_EQ_INT(rr_hl7_decode(m, enc.data ? enc.data : "", enc.len, &v), 0);
    CHECK(v.len == wn && memcmp(v.data ? v.data : "", want, wn) == 0);
  }
  rr_buf_close(&enc);
  rr_buf_close(&v);
  rr_hl7_msg_free(m);
}

static void test_charsets(void) {
  static const char latin1[] = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08|X|P|2.5||||||8859/1\r"
                               "PID|1||1||M\xfcller^J\xe9r\xf4me\r";
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  CHECK_EQ_INT(rr_hl7_parse(m, latin1, sizeof latin1 - 1, NULL, NULL), 0);
  CHECK(strcmp(rr_hl7_charset(m), "8859/1") == 0);
  rr_buf_t v;
  rr_buf_init(&v, 1 << 20);
  rr_hl7_get_s(m, "PID-5.1", &v);
  CHECK_MEM_STR(v.data, v.len, "M\xc3\xbcller");
  /* writing UTF-8 into a Latin-1 message stores Latin-1 bytes */
  CHECK_EQ_INT(rr_hl7_set_s(m, "PID-5.2", "Ren\xc3\xa9"), 0);
  rr_hl7_slice_t s;
  rr_hl7_get_raw_s(m, "PID-5.2", &s);
  CHECK_MEM_STR(s.p, s.len, "Ren\xe9");
  CHECK_EQ_INT(rr_hl7_set_s(m, "PID-5.3", "\xe2\x82\xac"), RR_ECHARSET); /* euro sign */
  static const char l2[] = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08|X|P|2.5||||||8859/2\r"
                           "PID|1||1||\xb3\xf3\x64\xbc\r"; /* Łódź in ISO 8859-2 */
  CHECK_EQ_INT(rr_hl7_parse(m, l2, sizeof l2 - 1, NULL, NULL), 0);
  rr_buf_reset(&v);
  rr_hl7_get_s(m, "PID-5", &v);
  CHECK_MEM_STR(v.data, v.len, "\xc5\x82\xc3\xb3\x64\xc5\xba");
  static const char bad[] = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08|X|P|2.5||||||KLINGON\r";
  rr_hl7_options_t o;
  rr_hl7_options_default(&o);
  o.mode = RR_HL7_STRICT;
  rr_hl7_error_t e;
  CHECK_EQ_INT(rr_hl7_parse(m, bad, sizeof bad - 1, &o, &e), RR_ECHARSET);
  CHECK_EQ_INT(e.hl7_code, 103);
  CHECK_EQ_INT(e.field, 18);
  CHECK_EQ_INT(rr_hl7_parse(m, bad, sizeof bad - 1, NULL, NULL), 0); /* lenient */
  rr_buf_close(&v);
  rr_hl7_msg_free(m);
}

static void test_edit(void) {
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  CHECK_EQ_INT(rr_hl7_parse(m, ADT, sizeof ADT - 1, NULL, NULL), 0);
  rr_hl7_slice_t s;
  rr_buf_t out;
  rr_buf_init(&out, 1 << 20);
  /* growth inside a field */
  CHECK_EQ_INT(rr_hl7_set_s(m, "PID-3[3].4.2", "NEW"), 0);
  rr_hl7_get_raw_s(m, "PID-3", &s);
  CHECK_MEM_STR(s.p, s.len, "MRN1^^^H^MR~SS9^^^SSA^SS&X&Y~^^^&NEW");
  /* growth of fields */
  CHECK_EQ_INT(rr_hl7_set_s(m, "PV1-19", "V123"), 0);
  rr_hl7_get_raw_s(m, "PV1", &s);
  CHECK_MEM_STR(s.p, s.len, "PV1|1|I|WARD^101^A||||||||||||||||V123");
  /* escaping on write */
  CHECK_EQ_INT(rr_hl7_set_s(m, "PID-5.2", "A|B^C"), 0);
  rr_hl7_get_raw_s(m, "PID-5", &s);
  CHECK_MEM_STR(s.p, s.len, "ZZTEST^A\\F\\B\\S\\C^B");
  /* replace a component in the middle */
  CHECK_EQ_INT(rr_hl7_set_s(m, "PV1-3.2", "202"), 0);
  rr_hl7_get_raw_s(m, "PV1-3", &s);
  CHECK_MEM_STR(s.p, s.len, "WARD^202^A");
  /* new segments: OBX[3] creates three OBX after the last one of its kind */
  CHECK_EQ_INT(rr_hl7_set_s(m, "OBX[3]-5", "x"), 0);
  CHECK_EQ_INT(rr_hl7_segment_count(m), 7);
  CHECK(strcmp(rr_hl7_segment_name(m, 6), "OBX") == 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "OBX[1]-1", "1"), 0);
  CHECK_EQ_INT(rr_hl7_segment_count(m), 7);
  /* delete: trailing empties trimmed */
  rr_hl7_path_t p;
  rr_hl7_path_parse("PV1-19", 6, &p);
  CHECK_EQ_INT(rr_hl7_delete(m, &p), 0);
  rr_hl7_get_raw_s(m, "PV1", &s);
  CHECK_MEM_STR(s.p, s.len, "PV1|1|I|WARD^202^A");
  rr_hl7_path_parse("PV1-3.3", 7, &p);
  CHECK_EQ_INT(rr_hl7_delete(m, &p), 0);
  rr_hl7_get_raw_s(m, "PV1-3", &s);
  CHECK_MEM_STR(s.p, s.len, "WARD^202");
  rr_hl7_path_parse("PV1-3.1", 7, &p);
  CHECK_EQ_INT(rr_hl7_delete(m, &p), 0);
  rr_hl7_get_raw_s(m, "PV1-3", &s);
  CHECK_MEM_STR(s.p, s.len, "^202");
  rr_hl7_path_parse("OBX[2]", 6, &p);
  CHECK_EQ_INT(rr_hl7_delete(m, &p), 0);
  CHECK_EQ_INT(rr_hl7_segment_count(m), 6);
  rr_hl7_path_parse("ZZZ-1", 5, &p);
  CHECK_EQ_INT(rr_hl7_delete(m, &p), 0); /* nothing there: fine */
  /* MSH-1/2 are not settable */
  CHECK_EQ_INT(rr_hl7_set_s(m, "MSH-2", "x"), RR_EINVAL);
  /* insert and raw set */
  CHECK_EQ_INT(rr_hl7_segment_insert(m, 3, "ZDS|1.2.840.99^RR^Application^DICOM", 35), 0);
  rr_hl7_get_raw_s(m, "ZDS-1.1", &s);
  CHECK_MEM_STR(s.p, s.len, "1.2.840.99");
  CHECK_EQ_INT(rr_hl7_segment_insert(m, 3, "ZDS|a\rb", 7), RR_EPARSE);
  rr_hl7_path_parse("PID-13", 6, &p);
  CHECK_EQ_INT(rr_hl7_set_raw(m, &p, "555^PRN^PH~^NET^Internet^x@example.org", 38), 0);
  rr_hl7_get_raw_s(m, "PID-13[2].4", &s);
  CHECK_MEM_STR(s.p, s.len, "x@example.org");
  /* serialization: untouched segments byte for byte, edited ones rebuilt */
  CHECK_EQ_INT(rr_hl7_serialize(m, &out), 0);
  static const char want[] =
      "MSH|^~\\&|RIS|HOSP|RR|AI|20260101120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1\r"
      "EVN|A01|20260101120000\r"
      "PID|1||MRN1^^^H^MR~SS9^^^SSA^SS&X&Y~^^^&NEW||ZZTEST^A\\F\\B\\S\\C^B||19700101|F|||||"
      "555^PRN^PH~^NET^Internet^x@example.org\r"
      "ZDS|1.2.840.99^RR^Application^DICOM\r"
      "PV1|1|I|^202\r"
      "OBX|1\r"
      "OBX|||||x\r";
  CHECK_MEM_STR(out.data, out.len, want);
  /* the edited message parses back to the same values */
  rr_hl7_msg_t *m2 = rr_hl7_msg_new();
  CHECK_EQ_INT(rr_hl7_parse(m2, out.data, out.len, NULL, NULL), 0);
  rr_buf_t v;
  rr_buf_init(&v, 1024);
  rr_hl7_get_s(m2, "PID-5.2", &v);
  CHECK_MEM_STR(v.data, v.len, "A|B^C");
  rr_buf_close(&v);
  rr_hl7_msg_free(m2);
  rr_buf_close(&out);
  rr_hl7_msg_free(m);
}

static void test_create(void) {
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  CHECK_EQ_INT(rr_hl7_msg_create(m, NULL, "2.5.1"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "MSH-3", "RADRELAY"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "MSH-9.1", "ORU"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "MSH-9.2", "R01"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "MSH-10", "C1"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "MSH-11", "P"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "PID-3.1", "MRN9"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "OBR-25", "P"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "OBX-3.1", "113014"), 0);
  CHECK_EQ_INT(rr_hl7_set_s(m, "OBX-8", "AA"), 0);
  rr_buf_t out;
  rr_buf_init(&out, 1 << 20);
  CHECK_EQ_INT(rr_hl7_serialize(m, &out), 0);
  CHECK_MEM_STR(out.data, out.len,
                "MSH|^~\\&|RADRELAY||||||ORU^R01|C1|P|2.5.1\rPID|||MRN9\rOBR|||||||||||||||||||||"
                "||||P\rOBX|||113014|||||AA\r");
  rr_hl7_options_t o;
  rr_hl7_options_default(&o);
  o.mode = RR_HL7_STRICT;
  CHECK_EQ_INT(rr_hl7_parse(m, out.data, out.len, &o, NULL), 0);
  rr_buf_close(&out);
  rr_hl7_msg_free(m);
}

/* ---- errors and limits -------------------------------------------------- */

static void test_errors(void) {
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  rr_hl7_error_t e;
  rr_hl7_options_t o;
  rr_hl7_options_default(&o);
  static const char badseg[] = "MSH|^~\\&|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1\rPIDX|2\r";
  CHECK_EQ_INT(rr_hl7_parse(m, badseg, sizeof badseg - 1, NULL, &e), RR_EPARSE);
  CHECK_EQ_INT(e.offset, (size_t)(strstr(badseg, "PIDX") - badseg));
  CHECK_EQ_INT(e.segment, 3);
  CHECK_EQ_INT(e.hl7_code, 100);
  /* the header stays readable for the ACK */
  rr_hl7_slice_t s;
  CHECK_EQ_INT(rr_hl7_get_raw_s(m, "MSH-10", &s), 0);
  CHECK_MEM_STR(s.p, s.len, "X");
  static const char nomsh[] = "PID|1\r";
  CHECK_EQ_INT(rr_hl7_parse(m, nomsh, sizeof nomsh - 1, NULL, &e), RR_EPARSE);
  CHECK_EQ_INT(e.hl7_code, 100);
  static const char enc3[] = "MSH|^~\\|A\r";
  o.mode = RR_HL7_STRICT;
  CHECK_EQ_INT(rr_hl7_parse(m, enc3, sizeof enc3 - 1, &o, &e), RR_EPARSE);
  CHECK_EQ_INT(e.field, 2);
  static const char dup[] = "MSH|^^\\&|A\r";
  CHECK_EQ_INT(rr_hl7_parse(m, dup, sizeof dup - 1, NULL, &e), RR_EPARSE);
  /* strict: LF terminators, required fields */
  static const char lf[] = "MSH|^~\\&|A|B|C|D|1||ADT^A01|X|P|2.5\nPID|1\n";
  CHECK_EQ_INT(rr_hl7_parse(m, lf, sizeof lf - 1, &o, &e), RR_EPARSE);
  CHECK_EQ_INT(e.offset, (size_t)(strchr(lf, '\n') - lf));
  CHECK_EQ_INT(rr_hl7_parse(m, lf, sizeof lf - 1, NULL, &e), 0);
  static const char noid[] = "MSH|^~\\&|A|B|C|D|1||ADT^A01||P|2.5\rPID|1\r";
  CHECK_EQ_INT(rr_hl7_parse(m, noid, sizeof noid - 1, &o, &e), RR_EPARSE);
  CHECK_EQ_INT(e.hl7_code, 101);
  CHECK_EQ_INT(e.field, 10);
  CHECK(strcmp(e.segment_id, "MSH") == 0);
  /* limits */
  rr_hl7_options_default(&o);
  o.max_message_size = 20;
  CHECK_EQ_INT(rr_hl7_parse(m, ADT, sizeof ADT - 1, &o, &e), RR_ELIMIT);
  rr_hl7_options_default(&o);
  o.max_segments = 3;
  CHECK_EQ_INT(rr_hl7_parse(m, ADT, sizeof ADT - 1, &o, &e), RR_ELIMIT);
  CHECK_EQ_INT(e.offset, (size_t)(strstr(ADT, "PV1") - ADT));
  rr_hl7_options_default(&o);
  o.max_field_length = 10;
  CHECK_EQ_INT(rr_hl7_parse(m, ADT, sizeof ADT - 1, &o, &e), RR_ELIMIT);
  CHECK_EQ_INT(e.hl7_code, 104);
  CHECK(strcmp(e.segment_id, "MSH") == 0);
  CHECK_EQ_INT(e.field, 7);
  CHECK_EQ_INT(e.offset, 24);
  rr_hl7_msg_free(m);
}

/* ---- acknowledgements --------------------------------------------------- */

static void test_ack(void) {
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  rr_buf_t out;
  rr_buf_init(&out, 1 << 20);
  CHECK_EQ_INT(rr_hl7_parse(m, ADT, sizeof ADT - 1, NULL, NULL), 0);
  CHECK(!rr_hl7_ack_mode(m).enhanced);
  CHECK_EQ_INT(rr_hl7_ack_code_for(m, RR_HL7_ACCEPT), RR_HL7_AA);
  rr_hl7_ack_options_t o = {"RR1", "20260101120001", NULL, NULL, 0};
  CHECK_EQ_INT(rr_hl7_ack_build(m, RR_HL7_AA, &o, &out), 0);
  CHECK_MEM_STR(
      out.data, out.len,
      "MSH|^~\\&|RR|AI|RIS|HOSP|20260101120001||ACK^A01^ACK|RR1|P|2.5.1\rMSA|AA|MSG00001\r");
  /* AE with an ERR segment in v2.5 layout */
  rr_hl7_error_t e = {0};
  e.hl7_code = 101;
  memcpy(e.segment_id, "PID", 4);
  e.occurrence = 1;
  e.field = 3;
  snprintf(e.text, sizeof e.text, "PID-3 required");
  o.errors = &e;
  o.nerrors = 1;
  o.text = "PID-3 required";
  rr_buf_reset(&out);
  CHECK_EQ_INT(rr_hl7_ack_build(m, RR_HL7_AE, &o, &out), 0);
  CHECK(strstr(out.data, "\rMSA|AE|MSG00001\r") != NULL);
  CHECK(strstr(out.data,
               "\rERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 required\r") != NULL);
  /* v2.3: ERR-1 ELD layout and MSA-3 text; MSH-9 without structure */
  static const char v23[] = "MSH|^~\\&|RIS|HOSP|RR|AI|20260101||ORM^O01|M23|P|2.3\rPID|1\r";
  CHECK_EQ_INT(rr_hl7_parse(m, v23, sizeof v23 - 1, NULL, NULL), 0);
  rr_buf_reset(&out);
  CHECK_EQ_INT(rr_hl7_ack_build(m, RR_HL7_AR, &o, &out), 0);
  CHECK_MEM_STR(out.data, out.len,
                "MSH|^~\\&|RR|AI|RIS|HOSP|20260101120001||ACK^O01|RR1|P|2.3\r"
                "MSA|AR|M23|PID-3 required\r"
                "ERR|PID^1^3^101&Required field missing&HL70357\r");
  /* enhanced mode: MSH-15/16 drive CA and whether answers are wanted */
  static const char enh[] =
      "MSH|^~\\&|RIS|HOSP|RR|AI|20260101||ORM^O01^ORM_O01|E1|P|2.5.1|||AL|ER\rPID|1\r";
  CHECK_EQ_INT(rr_hl7_parse(m, enh, sizeof enh - 1, NULL, NULL), 0);
  rr_hl7_ack_mode_t md = rr_hl7_ack_mode(m);
  CHECK(md.enhanced && md.accept == RR_HL7_ACK_AL && md.app == RR_HL7_ACK_ER);
  CHECK_EQ_INT(rr_hl7_ack_code_for(m, RR_HL7_ACCEPT), RR_HL7_CA);
  CHECK_EQ_INT(rr_hl7_ack_code_for(m, RR_HL7_REJECT), RR_HL7_CR);
  CHECK(rr_hl7_ack_wanted(m, RR_HL7_CA));
  CHECK(!rr_hl7_ack_wanted(m, RR_HL7_AA));
  CHECK(rr_hl7_ack_wanted(m, RR_HL7_AE));
  o.errors = NULL;
  o.nerrors = 0;
  o.text = NULL;
  rr_buf_reset(&out);
  CHECK_EQ_INT(rr_hl7_ack_build(m, RR_HL7_CA, &o, &out), 0);
  CHECK_MEM_STR(out.data, out.len,
                "MSH|^~\\&|RR|AI|RIS|HOSP|20260101120001||ACK^O01^ACK|RR1|P|2.5.1|||NE|NE\r"
                "MSA|CA|E1\r");
  /* the ACK parses, strictly */
  rr_hl7_msg_t *a = rr_hl7_msg_new();
  rr_hl7_options_t so;
  rr_hl7_options_default(&so);
  so.mode = RR_HL7_STRICT;
  CHECK_EQ_INT(rr_hl7_parse(a, out.data, out.len, &so, NULL), 0);
  rr_hl7_msg_free(a);
  /* custom delimiters are kept in the ACK */
  static const char cus[] = "MSH*:!/@*A*B*C*D*1**ADT:A04*C9*P*2.4\r";
  CHECK_EQ_INT(rr_hl7_parse(m, cus, sizeof cus - 1, NULL, NULL), 0);
  rr_buf_reset(&out);
  CHECK_EQ_INT(rr_hl7_ack_build(m, RR_HL7_AA, &o, &out), 0);
  CHECK_MEM_STR(out.data, out.len,
                "MSH*:!/@*C*D*A*B*20260101120001**ACK:A04:ACK*RR1*P*2.4\rMSA*AA*C9\r");
  /* no MSH at all: still a well-formed NAK */
  rr_hl7_error_t pe;
  CHECK_EQ_INT(rr_hl7_parse(m, "garbage", 7, NULL, &pe), RR_EPARSE);
  rr_buf_reset(&out);
  o.errors = &pe;
  o.nerrors = 1;
  CHECK_EQ_INT(rr_hl7_ack_build(m, RR_HL7_AE, &o, &out), 0);
  static const char nak[] = "MSH|^~\\&|||||20260101120001||ACK|RR1|P|2.5.1\rMSA|AE|\r"
                            "ERR|||100^Segment sequence error^HL70357|E||||";
  CHECK(strncmp(out.data, nak, sizeof nak - 1) == 0);
  char ts[32];
  rr_hl7_ts_format(1767225600, 5, -300, ts);
  CHECK(strcmp(ts, "20251231190000.005-0500") == 0);
  rr_buf_close(&out);
  rr_hl7_msg_free(m);
}

/* ---- batches ------------------------------------------------------------ */

static void test_batch(void) {
  size_t n;
  char *d = load("batch.hl7", &n);
  CHECK(d != NULL);
  if (!d)
    return;
  rr_hl7_batch_t b;
  rr_hl7_error_t e;
  CHECK_EQ_INT(rr_hl7_batch_split(d, n, RR_HL7_STRICT, &b, &e), 0);
  CHECK_EQ_INT(b.nmsgs, 3);
  CHECK_EQ_INT(b.declared_msgs, 3);
  CHECK_EQ_INT(b.declared_batches, 1);
  CHECK(b.fhs.len > 3 && memcmp(b.fhs.p, "FHS", 3) == 0);
  CHECK(b.bts.len > 3 && memcmp(b.bts.p, "BTS", 3) == 0);
  /* build a batch from the split messages and split it again */
  rr_buf_t out;
  rr_buf_init(&out, 1 << 20);
  rr_hl7_batch_header_t h = {NULL, "RADRELAY", "HOSP", "RIS", "HOSP", "20260101", "B1", true};
  CHECK_EQ_INT(rr_hl7_batch_build(&h, b.msgs, b.nmsgs, &out), 0);
  CHECK(strncmp(out.data, "FHS|^~\\&|RADRELAY|HOSP|RIS|HOSP|20260101||||B1\rBHS|", 50) == 0);
  CHECK(strstr(out.data, "\rBTS|3\rFTS|1\r") != NULL);
  rr_hl7_batch_t b2;
  CHECK_EQ_INT(rr_hl7_batch_split(out.data, out.len, RR_HL7_STRICT, &b2, &e), 0);
  CHECK_EQ_INT(b2.nmsgs, 3);
  for (size_t i = 0; i < 3 && b2.nmsgs == 3; i++) {
    char *w = malloc(b.msgs[i].len + 2);
    size_t wn = normalize(b.msgs[i].p, b.msgs[i].len, w);
    CHECK(b2.msgs[i].len + 1 == wn && memcmp(b2.msgs[i].p, w, wn - 1) == 0);
    free(w);
  }
  rr_hl7_batch_close(&b2);
  /* a wrong count is an error in strict mode only */
  char *bad = strstr(out.data, "BTS|3");
  bad[4] = '4';
  CHECK_EQ_INT(rr_hl7_batch_split(out.data, out.len, RR_HL7_STRICT, &b2, &e), RR_EPARSE);
  CHECK(strcmp(e.segment_id, "BTS") == 0);
  CHECK_EQ_INT(rr_hl7_batch_split(out.data, out.len, RR_HL7_LENIENT, &b2, &e), 0);
  CHECK_EQ_INT(b2.declared_msgs, 4);
  rr_hl7_batch_close(&b2);
  rr_hl7_batch_close(&b);
  rr_buf_close(&out);
  free(d);
}

/* ---- out of memory: every allocation failure is reported, never a crash */

static void test_oom(void) {
  int ok_runs = 0;
  for (long k = 0; k < 400; k++) {
    g_allocs = 0;
    g_fail_at = k;
    rr_hl7_msg_t *m = rr_hl7_msg_new();
    int rc = RR_ENOMEM;
    rr_buf_t out;
    rr_buf_init(&out, 1 << 20);
    if (m) {
      rc = rr_hl7_parse(m, ADT, sizeof ADT - 1, NULL, NULL);
      if (rc == 0)
        rc = rr_hl7_set_s(m, "OBX[2]-5.3", "value|x");
      if (rc == 0)
        rc = rr_hl7_set_s(m, "PID-3[3].1", "A");
      if (rc == 0)
        rc = rr_hl7_serialize(m, &out);
      if (rc == 0) {
        rr_hl7_ack_options_t o = {"A", "1", NULL, NULL, 0};
        rc = rr_hl7_ack_build(m, RR_HL7_AA, &o, &out);
      }
    }
    CHECK(rc == 0 || rc == RR_ENOMEM);
    ok_runs += rc == 0;
    rr_buf_close(&out);
    rr_hl7_msg_free(m);
    g_fail_at = -1;
    if (rc == 0 && g_allocs <= k)
      break; /* fewer allocations than k: every point has been tried */
  }
  CHECK(ok_runs == 1);
}

int main(int argc, char **argv) {
  g_data = argc > 1 ? argv[1] : "tests/data/hl7";
  RUN(test_paths);
  RUN(test_get);
  RUN(test_delimiters);
  RUN(test_escapes);
  RUN(test_charsets);
  RUN(test_edit);
  RUN(test_create);
  RUN(test_errors);
  RUN(test_ack);
  RUN(test_batch);
  RUN(test_corpus_roundtrip);
  RUN(test_values);
  RUN(test_oom);
  return TEST_SUMMARY();
}

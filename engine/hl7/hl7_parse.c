/* ER7 parsing: one pass over the bytes that splits segments and fields.
 * Repetitions, components and subcomponents are split on demand by the
 * accessors, so a message is parsed in roughly the time it takes to scan it. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "hl7/hl7_int.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Finds the first of a, b, c in [p, end); end when there is none.
 *
 * Short runs (most fields) are scanned inline with SSE2, 16 bytes at a time;
 * a run still unfinished after 64 bytes (base64 payloads, report text) goes
 * to a wider AVX2 loop when the CPU has one. Never reads past end. */
typedef const char *(*scan_fn)(const char *p, const char *end, char a, char b, char c);

static const char *scan3_tail(const char *p, const char *end, char a, char b, char c) {
  while (p < end && *p != a && *p != b && *p != c)
    p++;
  return p;
}

#if defined(__SSE2__)
static const char *scan3_sse2(const char *p, const char *end, char a, char b, char c) {
  const __m128i va = _mm_set1_epi8(a), vb = _mm_set1_epi8(b), vc = _mm_set1_epi8(c);
  for (; end - p >= 16; p += 16) {
    __m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
    __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, va), _mm_cmpeq_epi8(x, vb)),
                               _mm_cmpeq_epi8(x, vc));
    unsigned mask = (unsigned)_mm_movemask_epi8(hit);
    if (mask)
      return p + __builtin_ctz(mask);
  }
  return scan3_tail(p, end, a, b, c);
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
__attribute__((target("avx2"))) static const char *scan3_avx2(const char *p, const char *end,
                                                               char a, char b, char c) {
  const __m256i va = _mm256_set1_epi8(a), vb = _mm256_set1_epi8(b), vc = _mm256_set1_epi8(c);
  for (; end - p >= 64; p += 64) {
    __m256i x0 = _mm256_loadu_si256((const __m256i *)(const void *)p);
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(const void *)(p + 32));
    __m256i h0 = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(x0, va), _mm256_cmpeq_epi8(x0, vb)),
                                 _mm256_cmpeq_epi8(x0, vc));
    __m256i h1 = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(x1, va), _mm256_cmpeq_epi8(x1, vb)),
                                 _mm256_cmpeq_epi8(x1, vc));
    if (!_mm256_testz_si256(_mm256_or_si256(h0, h1), _mm256_or_si256(h0, h1))) {
      uint64_t m0 = (uint32_t)_mm256_movemask_epi8(h0);
      uint64_t m1 = (uint32_t)_mm256_movemask_epi8(h1);
      return p + __builtin_ctzll(m0 | (m1 << 32));
    }
  }
  return scan3_sse2(p, end, a, b, c);
}

static scan_fn pick_long_scan(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? scan3_avx2 : scan3_sse2;
}
#else
static scan_fn pick_long_scan(void) { return scan3_sse2; }
#endif

static scan_fn long_scan;

static inline const char *scan3(const char *p, const char *end, char a, char b, char c) {
  const __m128i va = _mm_set1_epi8(a), vb = _mm_set1_epi8(b), vc = _mm_set1_epi8(c);
  for (int i = 0; i < 4 && end - p >= 16; i++, p += 16) {
    __m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
    __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, va), _mm_cmpeq_epi8(x, vb)),
                               _mm_cmpeq_epi8(x, vc));
    unsigned mask = (unsigned)_mm_movemask_epi8(hit);
    if (mask)
      return p + __builtin_ctz(mask);
  }
  if (end - p >= 16)
    return long_scan(p, end, a, b, c);
  return scan3_tail(p, end, a, b, c);
}
#else
static scan_fn pick_long_scan(void) { return scan3_tail; }
static scan_fn long_scan;
static inline const char *scan3(const char *p, const char *end, char a, char b, char c) {
  return scan3_tail(p, end, a, b, c);
}
#endif

void rr_hl7_options_default(rr_hl7_options_t *o) {
  o->max_message_size = (size_t)64 << 20;
  o->max_segments = 100000;
  o->max_field_length = (size_t)64 << 20;
  o->mode = RR_HL7_LENIENT;
  o->borrow = false;
}

void hl7_set_error(rr_hl7_error_t *err, int code, int hl7_code, size_t offset,
                   const char *fmt, ...) {
  if (!err)
    return;
  memset(err, 0, sizeof *err);
  err->code = code;
  err->hl7_code = hl7_code;
  err->offset = offset;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->text, sizeof err->text, fmt, ap);
  va_end(ap);
}

rr_hl7_msg_t *rr_hl7_msg_new(void) {
  /* Every thread computes the same value: a benign race, no lock needed. */
  if (!__atomic_load_n(&long_scan, __ATOMIC_ACQUIRE))
    __atomic_store_n(&long_scan, pick_long_scan(), __ATOMIC_RELEASE);
  rr_hl7_msg_t *m = calloc(1, sizeof *m);
  if (!m)
    return NULL;
  rr_hl7_options_default(&m->opt);
  rr_buf_init(&m->text, (size_t)-1 / 2);
  m->to_utf8 = (iconv_t)-1;
  m->from_utf8 = (iconv_t)-1;
  m->d = (rr_hl7_delims_t){'|', '^', '~', '\\', '&', 0};
  return m;
}

void rr_hl7_msg_free(rr_hl7_msg_t *m) {
  if (!m)
    return;
  hl7_arena_reset(m);
  free(m->arena);
  hl7_msg_close_iconv(m);
  rr_buf_close(&m->text);
  free(m->segs);
  free(m->ftab);
  free(m);
}

const rr_hl7_delims_t *rr_hl7_delims(const rr_hl7_msg_t *m) { return &m->d; }

const char *rr_hl7_charset(const rr_hl7_msg_t *m) { return m->cs_name; }

bool hl7_segment_id_ok(const char *p, size_t len, bool strict) {
  if (len != 3)
    return false;
  for (size_t i = 0; i < 3; i++) {
    unsigned char c = (unsigned char)p[i];
    if (strict ? !((c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) : (c <= ' ' || c >= 0x7f))
      return false;
  }
  return true;
}

bool hl7_is_header(const char *name) {
  return (name[0] == 'M' && name[1] == 'S' && name[2] == 'H') ||
         (name[0] == 'F' && name[1] == 'H' && name[2] == 'S') ||
         (name[0] == 'B' && name[1] == 'H' && name[2] == 'S');
}

static int push_field(fld_t **tab, size_t *n, size_t *cap, const char *p, size_t len) {
  if (*n == *cap) {
    size_t nc = *cap ? *cap * 2 : 256;
    fld_t *t = realloc(*tab, nc * sizeof *t);
    if (!t)
      return RR_ENOMEM;
    *tab = t;
    *cap = nc;
  }
  (*tab)[(*n)++] = (fld_t){p, len};
  return 0;
}

int hl7_split_fields(const rr_hl7_msg_t *m, const char *p, const char *end, fld_t **tab,
                     size_t *n, size_t *cap, size_t base_offset, const char **stop,
                     rr_hl7_error_t *err) {
  const char fs = m->d.field;
  const bool strict = m->opt.mode == RR_HL7_STRICT;
  const char *s = p;
  const char *q = scan3(p, end, fs, '\r', '\n');
  size_t first = *n;
  if (!hl7_segment_id_ok(p, (size_t)(q - p), strict)) {
    hl7_set_error(err, RR_EPARSE, RR_HL7_E_SEGMENT_SEQUENCE, base_offset,
                  "invalid segment ID at byte %zu", base_offset);
    return RR_EPARSE;
  }
  int rc = push_field(tab, n, cap, p, 3);
  if (rc)
    return rc;
  if (q < end && *q == fs && hl7_is_header(p)) {
    rc = push_field(tab, n, cap, q, 1); /* MSH-1 is the separator itself */
    if (rc)
      return rc;
  }
  while (q < end && *q == fs) {
    const char *f = q + 1;
    q = scan3(f, end, fs, '\r', '\n');
    size_t flen = (size_t)(q - f);
    if (flen > m->opt.max_field_length) {
      hl7_set_error(err, RR_ELIMIT, RR_HL7_E_VALUE_TOO_LONG, base_offset + (size_t)(f - s),
                    "field %zu longer than %zu bytes", *n - first, m->opt.max_field_length);
      if (err)
        err->field = (unsigned)(*n - first);
      return RR_ELIMIT;
    }
    rc = push_field(tab, n, cap, f, flen);
    if (rc)
      return rc;
  }
  *stop = q;
  return 0;
}

static void locate_error(const rr_hl7_msg_t *m, rr_hl7_error_t *err, const seg_t *sg) {
  if (!err)
    return;
  err->segment = (unsigned)(m->nsegs + 1);
  memcpy(err->segment_id, sg->name, 4);
  unsigned occ = 1;
  for (size_t i = 0; i < m->nsegs; i++)
    occ += memcmp(m->segs[i].name, sg->name, 3) == 0;
  err->occurrence = occ;
}

/* Reads MSH-1/MSH-2 into m->d. p points at "MSH", end at the end of input. */
static int read_delimiters(rr_hl7_msg_t *m, const char *p, const char *end, rr_hl7_error_t *err) {
  const bool strict = m->opt.mode == RR_HL7_STRICT;
  if (end - p < 4) {
    hl7_set_error(err, RR_EPARSE, RR_HL7_E_REQUIRED_FIELD, 3, "MSH-1 (field separator) missing");
    return RR_EPARSE;
  }
  char fs = p[3];
  if (fs == '\r' || fs == '\n' || fs == '\0') {
    hl7_set_error(err, RR_EPARSE, RR_HL7_E_REQUIRED_FIELD, 3, "MSH-1 (field separator) missing");
    return RR_EPARSE;
  }
  const char *e = p + 4;
  while (e < end && *e != fs && *e != '\r' && *e != '\n')
    e++;
  size_t n = (size_t)(e - (p + 4));
  if (n < 4 || n > 5) {
    if (strict || n < 1 || n > 5) {
      hl7_set_error(err, RR_EPARSE, RR_HL7_E_DATA_TYPE, 4,
                    "MSH-2 must hold 4 or 5 encoding characters, found %zu", n);
      if (err)
        err->field = 2, memcpy(err->segment_id, "MSH", 4), err->segment = 1, err->occurrence = 1;
      return RR_EPARSE;
    }
  }
  char c[5] = {0};
  memcpy(c, p + 4, n);
  /* Lenient: fill missing encoding characters with the standard ones. */
  static const char std[4] = {'^', '~', '\\', '&'};
  for (size_t i = n; i < 4; i++)
    c[i] = std[i];
  rr_hl7_delims_t d = {fs, c[0], c[1], c[2], c[3], n == 5 ? c[4] : 0};
  char all[6] = {d.field, d.component, d.repetition, d.escape, d.subcomponent, d.truncation};
  size_t nall = d.truncation ? 6 : 5;
  for (size_t i = 0; i < nall; i++) {
    unsigned char ch = (unsigned char)all[i];
    bool bad = ch == '\r' || ch == '\n' || ch == 0 ||
               (strict && ((ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'Z') ||
                           (ch >= 'a' && ch <= 'z') || ch == ' '));
    for (size_t j = 0; j < i; j++)
      bad |= all[j] == all[i];
    if (bad) {
      hl7_set_error(err, RR_EPARSE, RR_HL7_E_DATA_TYPE, 3 + i,
                    "delimiter %zu (0x%02x) is repeated or not allowed", i + 1, ch);
      if (err)
        err->field = i ? 2 : 1, memcpy(err->segment_id, "MSH", 4), err->segment = 1,
        err->occurrence = 1;
      return RR_EPARSE;
    }
  }
  m->d = d;
  return 0;
}

static void reset(rr_hl7_msg_t *m) {
  m->nsegs = 0;
  m->nf = 0;
  hl7_arena_reset(m);
  m->cs = CS_DEFAULT;
  m->cs_name[0] = '\0';
  m->cs_iconv[0] = '\0';
}

/* Points every parsed segment's fields at the (now stable) parse table. */
static void fix_fields(rr_hl7_msg_t *m) {
  for (size_t i = 0; i < m->nsegs; i++) {
    seg_t *sg = &m->segs[i];
    if (sg->cap == 0)
      sg->fields = m->ftab + sg->first;
  }
}

static int check_required(rr_hl7_msg_t *m, rr_hl7_error_t *err) {
  static const struct { unsigned field; const char *name; } req[] = {
      {9, "message type"}, {10, "message control ID"}, {11, "processing ID"}, {12, "version ID"}};
  seg_t *msh = &m->segs[0];
  for (size_t i = 0; i < sizeof req / sizeof req[0]; i++) {
    unsigned f = req[i].field;
    if (f >= msh->nfields || msh->fields[f].len == 0) {
      hl7_set_error(err, RR_EPARSE, RR_HL7_E_REQUIRED_FIELD, msh->offset + msh->raw_len,
                    "MSH-%u (%s) is required", f, req[i].name);
      if (err)
        err->field = f, err->segment = 1, err->occurrence = 1, memcpy(err->segment_id, "MSH", 4);
      return RR_EPARSE;
    }
  }
  return 0;
}

int rr_hl7_parse(rr_hl7_msg_t *m, const char *data, size_t len, const rr_hl7_options_t *opt,
                 rr_hl7_error_t *err) {
  int rc;
  reset(m);
  if (opt)
    m->opt = *opt;
  else
    rr_hl7_options_default(&m->opt);
  const bool strict = m->opt.mode == RR_HL7_STRICT;
  if (err)
    memset(err, 0, sizeof *err);
  if (len > m->opt.max_message_size) {
    hl7_set_error(err, RR_ELIMIT, RR_HL7_E_INTERNAL, m->opt.max_message_size,
                  "message of %zu bytes exceeds the limit of %zu", len, m->opt.max_message_size);
    return RR_ELIMIT;
  }
  const char *base = data;
  if (!m->opt.borrow) {
    rr_buf_reset(&m->text);
    if ((rc = rr_buf_reserve(&m->text, len + HL7_PAD)))
      return rc;
    if (len)
      memcpy(m->text.data, data, len);
    memset(m->text.data + len, 0, HL7_PAD);
    m->text.len = len;
    base = m->text.data;
  }
  const char *p = base, *end = base + len;
  if (!strict)
    while (p < end && (*p == '\r' || *p == '\n' || *p == ' ' || *p == '\t'))
      p++;
  if (end - p < 3 || memcmp(p, "MSH", 3) != 0) {
    hl7_set_error(err, RR_EPARSE, RR_HL7_E_SEGMENT_SEQUENCE, (size_t)(p - base),
                  "message does not start with an MSH segment");
    if (err)
      err->segment = 1, err->occurrence = 1;
    return RR_EPARSE;
  }
  if ((rc = read_delimiters(m, p, end, err)))
    return rc;

  while (p < end) {
    if (*p == '\r' || *p == '\n') {
      /* A blank line. Harmless at the end; strict mode refuses it inside. */
      if (strict) {
        const char *t = p;
        while (t < end && (*t == '\r' || *t == '\n'))
          t++;
        if (t < end || *p == '\n') {
          hl7_set_error(err, RR_EPARSE, RR_HL7_E_SEGMENT_SEQUENCE, (size_t)(p - base),
                        "%s at byte %zu", *p == '\n' ? "LF segment terminator" : "empty segment",
                        (size_t)(p - base));
          rc = RR_EPARSE;
          goto out;
        }
      }
      p++;
      continue;
    }
    if (m->nsegs == m->opt.max_segments) {
      hl7_set_error(err, RR_ELIMIT, RR_HL7_E_INTERNAL, (size_t)(p - base),
                    "more than %zu segments", m->opt.max_segments);
      rc = RR_ELIMIT;
      goto out;
    }
    if (m->nsegs == m->segcap) {
      size_t nc = m->segcap ? m->segcap * 2 : 32;
      seg_t *t = realloc(m->segs, nc * sizeof *t);
      if (!t) {
        rc = RR_ENOMEM;
        goto out;
      }
      m->segs = t;
      m->segcap = nc;
    }
    seg_t *sg = &m->segs[m->nsegs];
    memset(sg, 0, sizeof *sg);
    sg->offset = (size_t)(p - base);
    sg->first = m->nf;
    const char *stop = p;
    rc = hl7_split_fields(m, p, end, &m->ftab, &m->nf, &m->fcap, sg->offset, &stop, err);
    if (rc) {
      if (err && rc != RR_ENOMEM) {
        memcpy(sg->name, p, (end - p) >= 3 ? 3 : 0);
        locate_error(m, err, sg);
      }
      goto out;
    }
    memcpy(sg->name, p, 3);
    sg->name[3] = '\0';
    sg->nfields = (uint32_t)(m->nf - sg->first);
    sg->raw = p;
    sg->raw_len = (size_t)(stop - p);
    m->nsegs++;
    p = stop;
    if (p < end) {
      if (*p == '\n' && strict) {
        hl7_set_error(err, RR_EPARSE, RR_HL7_E_SEGMENT_SEQUENCE, (size_t)(p - base),
                      "LF segment terminator at byte %zu (strict mode wants CR)", (size_t)(p - base));
        rc = RR_EPARSE;
        goto out;
      }
      if (*p == '\r' && p + 1 < end && p[1] == '\n' && !strict)
        p++;
      p++;
    }
  }
  fix_fields(m);

  rr_hl7_slice_t cs = {0};
  seg_t *msh = &m->segs[0];
  if (msh->nfields > 18) {
    rr_hl7_piece(msh->fields[18].p, msh->fields[18].len, m->d.repetition, 1, &cs);
  }
  hl7_charset_setup(m, cs.p, cs.len);
  if (strict) {
    if ((rc = check_required(m, err)))
      goto out;
    if (!hl7_charset_known(m)) {
      hl7_set_error(err, RR_ECHARSET, RR_HL7_E_TABLE_VALUE, msh->offset,
                    "MSH-18 names an unsupported character set");
      if (err)
        err->field = 18, err->segment = 1, err->occurrence = 1, memcpy(err->segment_id, "MSH", 4);
      rc = RR_ECHARSET;
      goto out;
    }
  }
  return 0;
out:
  fix_fields(m);
  if (err && err->code == 0)
    hl7_set_error(err, rc, RR_HL7_E_INTERNAL, 0, "%s", rr_strerror(rc));
  return rc;
}

int rr_hl7_msg_create(rr_hl7_msg_t *m, const rr_hl7_delims_t *d, const char *version) {
  rr_hl7_delims_t dd = d ? *d : (rr_hl7_delims_t){'|', '^', '~', '\\', '&', 0};
  char head[16];
  size_t n = 0;
  head[n++] = 'M', head[n++] = 'S', head[n++] = 'H';
  head[n++] = dd.field;
  head[n++] = dd.component;
  head[n++] = dd.repetition;
  head[n++] = dd.escape;
  head[n++] = dd.subcomponent;
  if (dd.truncation)
    head[n++] = dd.truncation;
  rr_hl7_error_t e;
  int rc = rr_hl7_parse(m, head, n, NULL, &e);
  if (rc)
    return rc == RR_EPARSE ? RR_EINVAL : rc;
  if (version && *version) {
    rr_hl7_path_t p = {"MSH", 1, 12, 0, 0, 0};
    rc = rr_hl7_set(m, &p, version, strlen(version));
  }
  return rc;
}

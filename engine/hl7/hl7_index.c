/* Segment and field indexing, in two stages (after simdjson):
 *
 *   1. find every field separator, CR and LF, 64 bytes at a time with SIMD,
 *      into a small array of positions;
 *   2. walk the positions to build segments and fields.
 *
 * Stage 1 has no data-dependent branches inside a block, and stage 2 is a
 * simple loop over an array, so the cost per field is a few cycles instead
 * of a mispredicted branch at the end of every field. */
#include <string.h>

#include "core/array.h"
#include "core/error.h"
#include "hl7/hl7_int.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_TARGET 1
#endif

#define POS_CAP 1024

/* Stage 1: positions (relative to base) of fs, CR and LF in whole 64-byte
 * blocks from `from`, while the array has room for a full block. Returns
 * where it stopped (always a block boundary after from, or from). */
typedef size_t (*stage1_fn)(const char *base, size_t from, size_t len, char fs, uint32_t *pos,
                            size_t *npos);

static inline size_t drain(uint64_t mask, size_t at, uint32_t *pos, size_t n) {
  while (mask) {
    pos[n++] = (uint32_t)(at + (size_t)__builtin_ctzll(mask));
    mask &= mask - 1;
  }
  return n;
}

#if defined(__SSE2__)
static size_t stage1_sse2(const char *base, size_t from, size_t len, char fs, uint32_t *pos,
                          size_t *npos) {
  const __m128i vf = _mm_set1_epi8(fs), vcr = _mm_set1_epi8('\r'), vlf = _mm_set1_epi8('\n');
  size_t n = *npos, at = from;
  while (at + 64 <= len && n + 64 <= POS_CAP) {
    uint64_t mask = 0;
    for (int i = 0; i < 4; i++) {
      __m128i x = _mm_loadu_si128((const __m128i *)(const void *)(base + at + 16 * i));
      __m128i h = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, vf), _mm_cmpeq_epi8(x, vcr)),
                               _mm_cmpeq_epi8(x, vlf));
      mask |= (uint64_t)(uint32_t)_mm_movemask_epi8(h) << (16 * i);
    }
    n = drain(mask, at, pos, n);
    at += 64;
  }
  *npos = n;
  return at;
}
#endif

#if defined(HAVE_AVX2_TARGET)
__attribute__((target("avx2"))) static size_t stage1_avx2(const char *base, size_t from, size_t len,
                                                          char fs, uint32_t *pos, size_t *npos) {
  const __m256i vf = _mm256_set1_epi8(fs), vcr = _mm256_set1_epi8('\r'),
                vlf = _mm256_set1_epi8('\n');
  size_t n = *npos, at = from;
  while (at + 64 <= len && n + 64 <= POS_CAP) {
    __m256i x0 = _mm256_loadu_si256((const __m256i *)(const void *)(base + at));
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(const void *)(base + at + 32));
    __m256i h0 =
        _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(x0, vf), _mm256_cmpeq_epi8(x0, vcr)),
                        _mm256_cmpeq_epi8(x0, vlf));
    __m256i h1 =
        _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(x1, vf), _mm256_cmpeq_epi8(x1, vcr)),
                        _mm256_cmpeq_epi8(x1, vlf));
    uint64_t mask = (uint64_t)(uint32_t)_mm256_movemask_epi8(h0) |
                    ((uint64_t)(uint32_t)_mm256_movemask_epi8(h1) << 32);
    n = drain(mask, at, pos, n);
    at += 64;
  }
  *npos = n;
  return at;
}
#endif

static size_t stage1_scalar(const char *base, size_t from, size_t len, char fs, uint32_t *pos,
                            size_t *npos) {
  size_t n = *npos, at = from;
  while (at + 64 <= len && n + 64 <= POS_CAP) {
    for (size_t i = 0; i < 64; i++) {
      char c = base[at + i];
      if (c == fs || c == '\r' || c == '\n')
        pos[n++] = (uint32_t)(at + i);
    }
    at += 64;
  }
  *npos = n;
  return at;
}

static stage1_fn stage1;

void hl7_index_init(void) {
  if (__atomic_load_n(&stage1, __ATOMIC_ACQUIRE))
    return;
  stage1_fn f = stage1_scalar;
#if defined(__SSE2__)
  f = stage1_sse2;
#endif
#if defined(HAVE_AVX2_TARGET)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2"))
    f = stage1_avx2;
#endif
  /* Every thread computes the same value: a benign race, no lock needed. */
  __atomic_store_n(&stage1, f, __ATOMIC_RELEASE);
}

/* ---- stage 2 ------------------------------------------------------------ */

typedef struct ix {
  rr_hl7_msg_t *m;
  const char *base;
  size_t len;
  size_t off0; /* offset of base in the input, for errors */
  rr_hl7_error_t *err;
  char fs;
  bool strict;
  bool in_seg, first;
  size_t next; /* where the next segment starts */
  size_t seg_start, field_start;
  size_t skip;  /* an LF to ignore (the LF of CRLF), SIZE_MAX for none */
  size_t blank; /* strict: first blank line seen, SIZE_MAX for none */
} ix_t;

static int push_field(rr_hl7_msg_t *m, const char *p, size_t len) {
  if (rr_array_grow((void **)&m->ftab, &m->fcap, m->nf + 1, sizeof *m->ftab, 256))
    return RR_ENOMEM;
  m->ftab[m->nf++] = (fld_t){p, len};
  return 0;
}

static void locate(ix_t *x, const char *id, size_t idlen) {
  rr_hl7_error_t *err = x->err;
  rr_hl7_msg_t *m = x->m;
  if (!err)
    return;
  err->segment = (unsigned)(m->nsegs + 1);
  memset(err->segment_id, 0, sizeof err->segment_id);
  memcpy(err->segment_id, id, idlen < 3 ? idlen : 3);
  unsigned occ = 1;
  for (size_t i = 0; i < m->nsegs; i++)
    occ += memcmp(m->segs[i].name, err->segment_id, 3) == 0;
  err->occurrence = occ;
}

static int begin_segment(ix_t *x) {
  rr_hl7_msg_t *m = x->m;
  if (x->blank != SIZE_MAX) {
    hl7_set_error(
        x->err, RR_EPARSE, RR_HL7_E_SEGMENT_SEQUENCE, x->off0 + x->blank, "%s at byte %zu",
        x->base[x->blank] == '\n' ? "LF segment terminator" : "empty segment", x->off0 + x->blank);
    return RR_EPARSE;
  }
  if (m->nsegs == m->opt.max_segments) {
    hl7_set_error(x->err, RR_ELIMIT, RR_HL7_E_INTERNAL, x->off0 + x->next, "more than %zu segments",
                  m->opt.max_segments);
    return RR_ELIMIT;
  }
  if (rr_array_grow((void **)&m->segs, &m->segcap, m->nsegs + 1, sizeof *m->segs, 32))
    return RR_ENOMEM;
  seg_t *sg = &m->segs[m->nsegs];
  memset(sg, 0, sizeof *sg);
  sg->offset = x->off0 + x->next;
  sg->first = m->nf;
  x->seg_start = x->next;
  x->in_seg = true;
  x->first = true;
  return 0;
}

/* One delimiter at q (q == len: the end of the text). */
static int delimiter(ix_t *x, size_t q) {
  rr_hl7_msg_t *m = x->m;
  const char *b = x->base;
  char c = q < x->len ? b[q] : '\r';
  int rc;
  if (q == x->skip) {
    x->skip = SIZE_MAX;
    x->next = q + 1;
    return 0;
  }
  if (!x->in_seg) {
    if (q == x->next && c != x->fs) {
      /* A blank line: harmless at the end, refused inside in strict mode. */
      if (q < x->len) {
        if (x->strict && x->blank == SIZE_MAX)
          x->blank = q;
        if (c == '\r' && q + 1 < x->len && b[q + 1] == '\n' && !x->strict)
          x->skip = q + 1;
        x->next = q + 1;
      }
      return 0;
    }
    if ((rc = begin_segment(x)))
      return rc;
  }
  if (x->first) {
    size_t idlen = q - x->seg_start;
    if (!hl7_segment_id_ok(b + x->seg_start, idlen, x->strict)) {
      hl7_set_error(x->err, RR_EPARSE, RR_HL7_E_SEGMENT_SEQUENCE, x->off0 + x->seg_start,
                    "invalid segment ID at byte %zu", x->off0 + x->seg_start);
      if (x->err) /* position only: the ID itself is what is wrong */
        x->err->segment = (unsigned)(m->nsegs + 1);
      return RR_EPARSE;
    }
    if ((rc = push_field(m, b + x->seg_start, 3)))
      return rc;
    if (c == x->fs && hl7_is_header(b + x->seg_start) && (rc = push_field(m, b + q, 1)))
      return rc; /* MSH-1 is the separator itself */
    x->first = false;
  } else {
    size_t flen = q - x->field_start;
    if (flen > m->opt.max_field_length) {
      seg_t *sg = &m->segs[m->nsegs];
      hl7_set_error(x->err, RR_ELIMIT, RR_HL7_E_VALUE_TOO_LONG, x->off0 + x->field_start,
                    "field %zu longer than %zu bytes", m->nf - sg->first, m->opt.max_field_length);
      locate(x, b + x->seg_start, 3);
      if (x->err)
        x->err->field = (unsigned)(m->nf - sg->first);
      return RR_ELIMIT;
    }
    if ((rc = push_field(m, b + x->field_start, flen)))
      return rc;
  }
  if (c == x->fs) {
    x->field_start = q + 1;
    return 0;
  }
  /* End of the segment. */
  seg_t *sg = &m->segs[m->nsegs];
  memcpy(sg->name, b + x->seg_start, 3);
  sg->name[3] = '\0';
  sg->nfields = (uint32_t)(m->nf - sg->first);
  sg->raw = b + x->seg_start;
  sg->raw_len = q - x->seg_start;
  m->nsegs++;
  x->in_seg = false;
  x->next = q + 1;
  if (q < x->len) {
    if (c == '\n' && x->strict) {
      hl7_set_error(x->err, RR_EPARSE, RR_HL7_E_SEGMENT_SEQUENCE, x->off0 + q,
                    "LF segment terminator at byte %zu (strict mode wants CR)", x->off0 + q);
      return RR_EPARSE;
    }
    if (c == '\r' && q + 1 < x->len && b[q + 1] == '\n' && !x->strict)
      x->skip = q + 1;
  }
  return 0;
}

int hl7_index(rr_hl7_msg_t *m, const char *base, size_t len, size_t off0, rr_hl7_error_t *err) {
  ix_t x = {m,     base,  len, off0, err, m->d.field, m->opt.mode == RR_HL7_STRICT,
            false, false, 0,   0,    0,   SIZE_MAX,   SIZE_MAX};
  uint32_t pos[POS_CAP];
  size_t at = 0;
  int rc = 0;
  hl7_index_init();
  while (at < len && rc == 0) {
    size_t n = 0;
    at = stage1(base, at, len, x.fs, pos, &n);
    if (len - at < 64 && n + 64 <= POS_CAP) {
      for (; at < len; at++) {
        char c = base[at];
        if (c == x.fs || c == '\r' || c == '\n')
          pos[n++] = (uint32_t)at;
      }
    }
    /* Room for every field this batch can make (at most two per
     * delimiter), so the common case below needs no capacity check. */
    if (rr_array_grow((void **)&m->ftab, &m->fcap, m->nf + 2 * n + 2, sizeof *m->ftab, 256))
      return RR_ENOMEM;
    const size_t maxf = m->opt.max_field_length;
    for (size_t k = 0; k < n && rc == 0; k++) {
      size_t q = pos[k];
      /* The common case: a field separator inside a segment. */
      if (x.in_seg && !x.first && base[q] == x.fs && q - x.field_start <= maxf) {
        m->ftab[m->nf++] = (fld_t){base + x.field_start, q - x.field_start};
        x.field_start = q + 1;
        continue;
      }
      rc = delimiter(&x, q);
    }
  }
  if (rc == 0 && (x.in_seg || x.next < len))
    rc = delimiter(&x, len);
  return rc;
}

/* Path access and editing: get, set, delete, segments. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "hl7/hl7_int.h"

/* ---- edit arena --------------------------------------------------------- */

void *hl7_arena_alloc(rr_hl7_msg_t *m, size_t n) {
  n = (n + 15) & ~(size_t)15;
  arena_chunk_t *c = m->arena;
  if (!c || c->cap - c->used < n) {
    size_t cap = n > 4096 ? n : 4096;
    if (c && cap < c->cap * 2 && c->cap * 2 <= ((size_t)1 << 26))
      cap = c->cap * 2 > n ? c->cap * 2 : n;
    arena_chunk_t *nc = malloc(sizeof *nc + cap);
    if (!nc)
      return NULL;
    nc->next = c;
    nc->used = 0;
    nc->cap = cap;
    m->arena = c = nc;
  }
  void *p = (char *)c->data + c->used;
  c->used += n;
  return p;
}

void hl7_arena_reset(rr_hl7_msg_t *m) {
  /* Keep the newest (largest) chunk for reuse, free the rest. */
  arena_chunk_t *c = m->arena;
  if (!c)
    return;
  arena_chunk_t *rest = c->next;
  while (rest) {
    arena_chunk_t *n = rest->next;
    free(rest);
    rest = n;
  }
  c->next = NULL;
  c->used = 0;
}

/* Copies n bytes into the arena followed by HL7_PAD zero bytes. */
static char *arena_dup(rr_hl7_msg_t *m, const char *p, size_t n) {
  char *d = hl7_arena_alloc(m, n + HL7_PAD);
  if (!d)
    return NULL;
  if (n)
    memcpy(d, p, n);
  memset(d + n, 0, HL7_PAD);
  return d;
}

/* ---- paths -------------------------------------------------------------- */

static bool read_num(const char **s, const char *end, unsigned *out) {
  const char *p = *s;
  unsigned long v = 0;
  if (p >= end || *p < '0' || *p > '9')
    return false;
  while (p < end && *p >= '0' && *p <= '9') {
    v = v * 10 + (unsigned long)(*p - '0');
    if (v > 1000000)
      return false;
    p++;
  }
  *s = p;
  *out = (unsigned)v;
  return v > 0;
}

static bool read_index(const char **s, const char *end, unsigned *out) {
  if (*s >= end || **s != '[')
    return true;
  (*s)++;
  if (!read_num(s, end, out) || *s >= end || **s != ']')
    return false;
  (*s)++;
  return true;
}

int rr_hl7_path_parse(const char *s, size_t len, rr_hl7_path_t *p) {
  const char *end = s + len;
  memset(p, 0, sizeof *p);
  p->occ = 1;
  if (len < 3 || !hl7_segment_id_ok(s, 3, true))
    return RR_EPATH;
  memcpy(p->segment, s, 3);
  s += 3;
  if (!read_index(&s, end, &p->occ))
    return RR_EPATH;
  if (s == end)
    return 0;
  if (*s != '-' && *s != '.')
    return RR_EPATH;
  s++;
  if (!read_num(&s, end, &p->field) || !read_index(&s, end, &p->rep))
    return RR_EPATH;
  if (s < end && *s == '.') {
    s++;
    if (!read_num(&s, end, &p->comp))
      return RR_EPATH;
    if (s < end && *s == '.') {
      s++;
      if (!read_num(&s, end, &p->sub))
        return RR_EPATH;
    }
  }
  return s == end ? 0 : RR_EPATH;
}

size_t rr_hl7_path_format(const rr_hl7_path_t *p, char *out, size_t cap) {
  char tmp[96];
  int n = snprintf(tmp, sizeof tmp, "%s", p->segment);
  if (p->occ > 1)
    n += snprintf(tmp + n, sizeof tmp - (size_t)n, "[%u]", p->occ);
  if (p->field) {
    n += snprintf(tmp + n, sizeof tmp - (size_t)n, "-%u", p->field);
    if (p->rep)
      n += snprintf(tmp + n, sizeof tmp - (size_t)n, "[%u]", p->rep);
    if (p->comp)
      n += snprintf(tmp + n, sizeof tmp - (size_t)n, ".%u", p->comp);
    if (p->sub)
      n += snprintf(tmp + n, sizeof tmp - (size_t)n, ".%u", p->sub);
  }
  if (cap)
    snprintf(out, cap, "%s", tmp);
  return (size_t)n;
}

/* ---- pieces ------------------------------------------------------------- */

/* memchr for the short runs typical inside a field, without a call. */
static inline const char *find_sep(const char *p, const char *end, char sep) {
  const char *stop = end - p > 48 ? p + 48 : end;
  for (; p < stop; p++)
    if (*p == sep)
      return p;
  return p < end ? memchr(p, sep, (size_t)(end - p)) : NULL;
}

bool rr_hl7_piece(const char *s, size_t len, char sep, unsigned idx, rr_hl7_slice_t *out) {
  const char *p = s, *end = s + len;
  for (unsigned i = 1; i < idx; i++) {
    const char *q = find_sep(p, end, sep);
    if (!q) {
      out->p = end;
      out->len = 0;
      return false;
    }
    p = q + 1;
  }
  const char *q = find_sep(p, end, sep);
  out->p = p;
  out->len = (size_t)((q ? q : end) - p);
  return true;
}

/* ---- segments ----------------------------------------------------------- */

size_t rr_hl7_segment_count(const rr_hl7_msg_t *m) {
  return m->nsegs;
}

const char *rr_hl7_segment_name(const rr_hl7_msg_t *m, size_t i) {
  return i < m->nsegs ? m->segs[i].name : NULL;
}

unsigned rr_hl7_segment_fields(const rr_hl7_msg_t *m, size_t i) {
  return i < m->nsegs ? m->segs[i].nfields - 1 : 0;
}

size_t rr_hl7_segment_index(const rr_hl7_msg_t *m, const char *id, unsigned occ) {
  if (occ == 0)
    occ = 1;
  for (size_t i = 0; i < m->nsegs; i++) {
    const char *n = m->segs[i].name;
    if (n[0] == id[0] && n[1] == id[1] && n[2] == id[2] && --occ == 0)
      return i;
  }
  return SIZE_MAX;
}

int rr_hl7_field_raw(const rr_hl7_msg_t *m, size_t i, unsigned f, rr_hl7_slice_t *out) {
  if (i >= m->nsegs)
    return RR_ENOTFOUND;
  const seg_t *sg = &m->segs[i];
  if (f < sg->nfields) {
    out->p = sg->fields[f].p;
    out->len = sg->fields[f].len;
  } else {
    out->p = "";
    out->len = 0;
  }
  return 0;
}

int rr_hl7_segment_insert(rr_hl7_msg_t *m, size_t i, const char *raw, size_t len) {
  if (i > m->nsegs || m->nsegs == 0)
    return RR_EINVAL;
  if (m->nsegs >= m->opt.max_segments)
    return RR_ELIMIT;
  if (memchr(raw, '\r', len) || memchr(raw, '\n', len))
    return RR_EPARSE; /* one segment, no terminator inside */
  char *copy = arena_dup(m, raw, len);
  if (!copy)
    return RR_ENOMEM;
  /* Index it at the end of the tables, then move it into place with its
   * fields copied out of the parse table. */
  size_t nsegs = m->nsegs, nf = m->nf;
  int rc = hl7_index(m, copy, len, 0, NULL);
  if (rc == 0 && m->nsegs != nsegs + 1)
    rc = RR_EPARSE;
  if (rc == 0 && hl7_is_header(copy))
    rc = RR_EINVAL; /* MSH/BHS/FHS cannot be inserted */
  fld_t *fields = NULL;
  size_t n = m->nf - nf;
  if (rc == 0 && !(fields = hl7_arena_alloc(m, n * sizeof *fields)))
    rc = RR_ENOMEM;
  if (rc == 0) {
    memcpy(fields, m->ftab + nf, n * sizeof *fields);
    seg_t sg = m->segs[nsegs];
    sg.fields = fields;
    sg.cap = (uint32_t)n;
    sg.offset = 0;
    memmove(&m->segs[i + 1], &m->segs[i], (nsegs - i) * sizeof *m->segs);
    m->segs[i] = sg;
  } else {
    m->nsegs = nsegs;
  }
  m->nf = nf;
  hl7_fix_fields(m); /* the parse table may have moved */
  return rc;
}

int rr_hl7_segment_delete(rr_hl7_msg_t *m, size_t i) {
  if (i >= m->nsegs)
    return RR_ENOTFOUND;
  if (i == 0)
    return RR_EINVAL; /* the MSH carries the delimiters */
  memmove(&m->segs[i], &m->segs[i + 1], (m->nsegs - i - 1) * sizeof *m->segs);
  m->nsegs--;
  return 0;
}

/* Makes segment fields owned (arena) with room for field index f. */
static int own_fields(rr_hl7_msg_t *m, seg_t *sg, unsigned f) {
  uint32_t need = f + 1 > sg->nfields ? f + 1 : sg->nfields;
  if (sg->cap >= need)
    goto fill;
  uint32_t cap = need < 16 ? 16 : need + need / 2;
  fld_t *t = hl7_arena_alloc(m, cap * sizeof *t);
  if (!t)
    return RR_ENOMEM;
  memcpy(t, sg->fields, sg->nfields * sizeof *t);
  sg->fields = t;
  sg->cap = cap;
fill:
  for (uint32_t k = sg->nfields; k < need; k++)
    sg->fields[k] = (fld_t){"", 0};
  sg->nfields = need;
  return 0;
}

/* Finds the path's segment, creating missing occurrences when create. */
static int find_segment(rr_hl7_msg_t *m, const rr_hl7_path_t *p, bool create, size_t *out) {
  size_t have = 0, last = SIZE_MAX;
  for (size_t i = 0; i < m->nsegs; i++) {
    const char *n = m->segs[i].name;
    if (n[0] == p->segment[0] && n[1] == p->segment[1] && n[2] == p->segment[2]) {
      last = i;
      if (++have == (p->occ ? p->occ : 1)) {
        *out = i;
        return 0;
      }
    }
  }
  if (!create)
    return RR_ENOTFOUND;
  if (hl7_is_header(p->segment))
    return RR_EINVAL;
  if (m->nsegs == 0)
    return RR_EINVAL;
  unsigned occ = p->occ ? p->occ : 1;
  size_t at = last == SIZE_MAX ? m->nsegs : last + 1;
  for (; have < occ; have++, at++) {
    int rc = rr_hl7_segment_insert(m, at, p->segment, 3);
    if (rc)
      return rc;
  }
  *out = at - 1;
  return 0;
}

/* Builds the text of a dirty segment in the arena and makes it the raw text. */
static int materialize(rr_hl7_msg_t *m, seg_t *sg) {
  if (!sg->dirty)
    return 0;
  bool hdr = hl7_is_header(sg->name);
  size_t n = 3;
  for (uint32_t i = 1; i < sg->nfields; i++)
    n += sg->fields[i].len + (hdr && i <= 2 ? 0 : 1);
  char *t = hl7_arena_alloc(m, n + HL7_PAD);
  if (!t)
    return RR_ENOMEM;
  char *w = t;
  memcpy(w, sg->name, 3);
  w += 3;
  for (uint32_t i = 1; i < sg->nfields; i++) {
    if (!(hdr && i <= 2))
      *w++ = m->d.field;
    memcpy(w, sg->fields[i].p, sg->fields[i].len);
    w += sg->fields[i].len;
  }
  memset(w, 0, HL7_PAD);
  sg->raw = t;
  sg->raw_len = (size_t)(w - t);
  sg->dirty = false;
  return 0;
}

int hl7_segment_text(const rr_hl7_msg_t *cm, size_t i, rr_hl7_slice_t *out) {
  /* Building the text of an edited segment caches it in the message: the
   * message is logically unchanged, and one thread owns it at a time. */
  rr_hl7_msg_t *m = (rr_hl7_msg_t *)(uintptr_t)cm;
  seg_t *sg = &m->segs[i];
  int rc = materialize(m, sg);
  if (rc)
    return rc;
  out->p = sg->raw;
  out->len = sg->raw_len;
  return 0;
}

/* ---- reading ------------------------------------------------------------ */

int rr_hl7_get_raw(const rr_hl7_msg_t *m, const rr_hl7_path_t *p, rr_hl7_slice_t *out) {
  size_t si;
  int rc = find_segment((rr_hl7_msg_t *)(uintptr_t)m, p, false, &si);
  if (rc)
    return rc;
  if (p->field == 0)
    return hl7_segment_text(m, si, out);
  const seg_t *sg = &m->segs[si];
  if (p->field >= sg->nfields) {
    out->p = "";
    out->len = 0;
    return 0;
  }
  rr_hl7_slice_t v = {sg->fields[p->field].p, sg->fields[p->field].len};
  if (p->field <= 2 && hl7_is_header(sg->name)) {
    *out = v; /* MSH-1 and MSH-2 are not split */
    return 0;
  }
  if (p->rep || p->comp)
    rr_hl7_piece(v.p, v.len, m->d.repetition, p->rep ? p->rep : 1, &v);
  if (p->comp) {
    rr_hl7_piece(v.p, v.len, m->d.component, p->comp, &v);
    if (p->sub)
      rr_hl7_piece(v.p, v.len, m->d.subcomponent, p->sub, &v);
  }
  *out = v;
  return 0;
}

int rr_hl7_get(const rr_hl7_msg_t *m, const rr_hl7_path_t *p, rr_buf_t *out) {
  rr_hl7_slice_t v;
  int rc = rr_hl7_get_raw(m, p, &v);
  if (rc)
    return rc;
  if (p->field && p->field <= 2 && hl7_is_header(p->segment))
    return rr_buf_append(out, v.p, v.len);
  return rr_hl7_decode(m, v.p, v.len, out);
}

int rr_hl7_get_raw_s(const rr_hl7_msg_t *m, const char *path, rr_hl7_slice_t *out) {
  rr_hl7_path_t p;
  int rc = rr_hl7_path_parse(path, strlen(path), &p);
  return rc ? rc : rr_hl7_get_raw(m, &p, out);
}

int rr_hl7_get_s(const rr_hl7_msg_t *m, const char *path, rr_buf_t *out) {
  rr_hl7_path_t p;
  int rc = rr_hl7_path_parse(path, strlen(path), &p);
  return rc ? rc : rr_hl7_get(m, &p, out);
}

bool rr_hl7_is_null(const rr_hl7_msg_t *m, const rr_hl7_path_t *p) {
  rr_hl7_slice_t v;
  return rr_hl7_get_raw(m, p, &v) == 0 && v.len == 2 && v.p[0] == '"' && v.p[1] == '"';
}

/* ---- writing ------------------------------------------------------------ */

/* Replaces the piece the path addresses inside field text f with val.
 * With trim (delete), trailing empty pieces of that level are dropped. */
static int splice(const rr_hl7_msg_t *m, const rr_hl7_path_t *p, const fld_t *f, const char *val,
                  size_t vlen, bool trim, rr_buf_t *out) {
  const char seps[3] = {m->d.repetition, m->d.component, m->d.subcomponent};
  const unsigned idx[3] = {p->rep ? p->rep : 1, p->comp, p->sub};
  unsigned depth = p->sub ? 3 : p->comp ? 2 : 1;
  size_t ca = 0, cb = f->len; /* container of the current level */
  size_t a = 0, b = f->len;   /* the addressed piece */
  unsigned pad[3] = {0, 0, 0};
  bool missing = false;
  char last_sep = 0;
  for (unsigned lv = 0; lv < depth; lv++) {
    ca = a;
    cb = b;
    last_sep = seps[lv];
    if (missing) {
      pad[lv] = idx[lv] - 1;
      continue;
    }
    rr_hl7_slice_t s;
    if (rr_hl7_piece(f->p + ca, cb - ca, seps[lv], idx[lv], &s)) {
      a = (size_t)(s.p - f->p);
      b = a + s.len;
    } else {
      /* count pieces to know how many separators are missing */
      unsigned have = 1;
      for (size_t k = ca; k < cb; k++)
        have += f->p[k] == seps[lv];
      pad[lv] = idx[lv] - have;
      a = b = cb;
      missing = true;
    }
  }
  size_t keep = a;
  if (trim && !missing && b == cb) {
    while (keep > ca && f->p[keep - 1] == last_sep)
      keep--;
  }
  int rc = rr_buf_append(out, f->p, keep);
  if (trim && missing)
    return rr_buf_append(out, f->p + b, f->len - b); /* nothing to delete */
  for (unsigned lv = 0; rc == 0 && lv < depth; lv++)
    for (unsigned k = 0; rc == 0 && k < pad[lv]; k++)
      rc = rr_buf_putc(out, seps[lv]);
  if (rc == 0)
    rc = rr_buf_append(out, val, vlen);
  if (rc == 0)
    rc = rr_buf_append(out, f->p + b, f->len - b);
  return rc;
}

static int store_field(rr_hl7_msg_t *m, const rr_hl7_path_t *p, const char *raw, size_t len,
                       bool trim) {
  if (hl7_is_header(p->segment) && p->field <= 2)
    return RR_EINVAL;
  if (len > m->opt.max_field_length)
    return RR_ELIMIT;
  size_t si;
  int rc = find_segment(m, p, !trim, &si);
  if (rc)
    return trim && rc == RR_ENOTFOUND ? 0 : rc;
  seg_t *sg = &m->segs[si];
  if (trim && p->field >= sg->nfields)
    return 0;
  if ((rc = own_fields(m, sg, p->field)))
    return rc;
  fld_t *f = &sg->fields[p->field];
  rr_buf_t nb;
  rr_buf_init(&nb, m->opt.max_field_length);
  const char *src = raw;
  size_t slen = len;
  if (p->rep || p->comp) {
    if ((rc = splice(m, p, f, raw, len, trim, &nb)))
      goto out;
    src = nb.data ? nb.data : "";
    slen = nb.len;
  }
  char *copy = arena_dup(m, src, slen);
  if (!copy) {
    rc = RR_ENOMEM;
    goto out;
  }
  *f = (fld_t){copy, slen};
  sg->dirty = true;
  if (trim) {
    uint32_t min = hl7_is_header(sg->name) ? 3 : 1;
    while (sg->nfields > min && sg->fields[sg->nfields - 1].len == 0)
      sg->nfields--;
  }
out:
  rr_buf_close(&nb);
  return rc;
}

int rr_hl7_set_raw(rr_hl7_msg_t *m, const rr_hl7_path_t *p, const char *raw, size_t len) {
  if (p->field == 0) {
    /* Replace the whole segment. */
    size_t si;
    int rc = find_segment(m, p, true, &si);
    if (rc)
      return rc;
    if (len < 3 || memcmp(raw, p->segment, 3) != 0)
      return RR_EINVAL;
    if ((rc = rr_hl7_segment_insert(m, si, raw, len)))
      return rc;
    return rr_hl7_segment_delete(m, si + 1);
  }
  return store_field(m, p, raw, len, false);
}

int rr_hl7_set(rr_hl7_msg_t *m, const rr_hl7_path_t *p, const char *utf8, size_t len) {
  if (p->field == 0)
    return RR_EINVAL;
  rr_buf_t enc;
  rr_buf_init(&enc, m->opt.max_field_length);
  int rc = rr_hl7_encode(m, utf8, len, &enc);
  if (rc == 0)
    rc = store_field(m, p, enc.data ? enc.data : "", enc.len, false);
  rr_buf_close(&enc);
  return rc;
}

int rr_hl7_set_s(rr_hl7_msg_t *m, const char *path, const char *utf8) {
  rr_hl7_path_t p;
  int rc = rr_hl7_path_parse(path, strlen(path), &p);
  return rc ? rc : rr_hl7_set(m, &p, utf8, strlen(utf8));
}

int rr_hl7_delete(rr_hl7_msg_t *m, const rr_hl7_path_t *p) {
  if (p->field == 0) {
    size_t si;
    int rc = find_segment(m, p, false, &si);
    if (rc)
      return rc == RR_ENOTFOUND ? 0 : rc;
    return rr_hl7_segment_delete(m, si);
  }
  return store_field(m, p, "", 0, true);
}

/* ER7 parsing: delimiters from MSH, then one indexing pass (hl7_index.c)
 * that splits segments and fields. Repetitions, components and
 * subcomponents are split on demand by the accessors. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "hl7/hl7_int.h"

void rr_hl7_options_default(rr_hl7_options_t *o) {
  o->max_message_size = (size_t)64 << 20;
  o->max_segments = 100000;
  o->max_field_length = (size_t)64 << 20;
  o->mode = RR_HL7_LENIENT;
  o->borrow = false;
}

void hl7_set_error(rr_hl7_error_t *err, int code, int hl7_code, size_t offset, const char *fmt,
                   ...) {
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
  hl7_index_init();
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

const rr_hl7_delims_t *rr_hl7_delims(const rr_hl7_msg_t *m) {
  return &m->d;
}

const char *rr_hl7_charset(const rr_hl7_msg_t *m) {
  return m->cs_name;
}

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
void hl7_fix_fields(rr_hl7_msg_t *m) {
  for (size_t i = 0; i < m->nsegs; i++) {
    seg_t *sg = &m->segs[i];
    if (sg->cap == 0)
      sg->fields = m->ftab + sg->first;
  }
}

static int check_required(rr_hl7_msg_t *m, rr_hl7_error_t *err) {
  static const struct {
    unsigned field;
    const char *name;
  } req[] = {
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

  if ((rc = hl7_index(m, p, (size_t)(end - p), (size_t)(p - base), err)))
    goto out;
  hl7_fix_fields(m);

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
  hl7_fix_fields(m);
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

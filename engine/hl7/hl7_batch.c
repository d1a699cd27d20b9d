/* Batches (FHS/BHS ... BTS/FTS) and the streaming splitter for files of
 * messages. Both find items by the segment ID at the start of a line. */
#include <stdlib.h>
#include <string.h>

#include "core/array.h"
#include "core/error.h"
#include "hl7/hl7_int.h"

static rr_hl7_item_kind_t line_kind(const char *p) {
  if (memcmp(p, "MSH", 3) == 0)
    return RR_HL7_ITEM_MESSAGE;
  if (memcmp(p, "FHS", 3) == 0)
    return RR_HL7_ITEM_FHS;
  if (memcmp(p, "BHS", 3) == 0)
    return RR_HL7_ITEM_BHS;
  if (memcmp(p, "BTS", 3) == 0)
    return RR_HL7_ITEM_BTS;
  if (memcmp(p, "FTS", 3) == 0)
    return RR_HL7_ITEM_FTS;
  return RR_HL7_ITEM_OTHER;
}

static size_t trim_end(const char *p, size_t n) {
  while (n && (p[n - 1] == '\r' || p[n - 1] == '\n'))
    n--;
  return n;
}

static bool blank(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != '\r' && p[i] != '\n' && p[i] != ' ' && p[i] != '\t')
      return false;
  return true;
}

/* Number in field 1 of an envelope segment ("BTS|3"), -1 when absent. */
static long count_field(const char *p, size_t n) {
  if (n < 5)
    return -1;
  long v = 0;
  size_t i = 4;
  if (i >= n || p[i] < '0' || p[i] > '9')
    return -1;
  for (; i < n && p[i] >= '0' && p[i] <= '9' && v < 100000000; i++)
    v = v * 10 + (p[i] - '0');
  return v;
}

/* ---- streaming reader --------------------------------------------------- */

void rr_hl7_reader_init(rr_hl7_reader_t *r, size_t max_item) {
  rr_buf_init(&r->buf, max_item + 4);
  r->scan = 0;
  r->offset = 0;
  r->item_start = 0;
}

void rr_hl7_reader_close(rr_hl7_reader_t *r) {
  rr_buf_close(&r->buf);
}

static int emit(rr_hl7_reader_t *r, size_t end, rr_hl7_item_cb cb, void *ud) {
  const char *p = r->buf.data + r->item_start;
  size_t n = trim_end(p, end - r->item_start);
  size_t off = r->offset + r->item_start;
  r->item_start = end;
  if (n == 0)
    return 0;
  rr_hl7_item_kind_t k = n >= 3 ? line_kind(p) : RR_HL7_ITEM_OTHER;
  if (k == RR_HL7_ITEM_OTHER && blank(p, n))
    return 0;
  return cb(ud, k, p, n, off);
}

int rr_hl7_reader_feed(rr_hl7_reader_t *r, const char *data, size_t len, rr_hl7_item_cb cb,
                       void *ud) {
  int rc = rr_buf_append(&r->buf, data, len);
  if (rc)
    return rc;
  const char *b = r->buf.data;
  size_t n = r->buf.len;
  size_t i = r->scan;
  while (i < n) {
    bool at_line = i == 0 ? r->offset == 0 : (b[i - 1] == '\r' || b[i - 1] == '\n');
    if (at_line && b[i] != '\r' && b[i] != '\n') {
      if (i + 3 > n)
        break; /* need the segment ID */
      if (line_kind(b + i) != RR_HL7_ITEM_OTHER && i > r->item_start) {
        if ((rc = emit(r, i, cb, ud)))
          return rc;
      }
    }
    i++;
  }
  r->scan = i;
  /* Drop what was emitted. */
  if (r->item_start > 0) {
    size_t keep = n - r->item_start;
    memmove(r->buf.data, r->buf.data + r->item_start, keep);
    r->buf.len = keep;
    r->offset += r->item_start;
    r->scan -= r->item_start;
    r->item_start = 0;
  }
  if (r->buf.len + 4 > r->buf.limit)
    return RR_ELIMIT;
  return 0;
}

int rr_hl7_reader_finish(rr_hl7_reader_t *r, rr_hl7_item_cb cb, void *ud) {
  int rc = 0;
  if (r->buf.len > r->item_start)
    rc = emit(r, r->buf.len, cb, ud);
  r->buf.len = 0;
  r->scan = r->item_start = 0;
  return rc;
}

/* ---- batch split -------------------------------------------------------- */

typedef struct split_ctx {
  rr_hl7_batch_t *b;
  size_t cap;
  const char *data;
  long in_batch; /* messages since the last BHS */
  long batches;
  bool strict;
  rr_hl7_error_t *err;
  int rc;
} split_ctx_t;

static int split_item(void *ud, rr_hl7_item_kind_t kind, const char *p, size_t n, size_t off) {
  split_ctx_t *c = ud;
  rr_hl7_batch_t *b = c->b;
  rr_hl7_slice_t s = {c->data + off, n};
  (void)p;
  switch (kind) {
  case RR_HL7_ITEM_MESSAGE:
    if (rr_array_grow((void **)&b->msgs, &c->cap, b->nmsgs + 1, sizeof *b->msgs, 16))
      return RR_ENOMEM;
    b->msgs[b->nmsgs++] = s;
    c->in_batch++;
    return 0;
  case RR_HL7_ITEM_FHS: b->fhs = s; return 0;
  case RR_HL7_ITEM_BHS:
    b->bhs = s;
    c->in_batch = 0;
    c->batches++;
    return 0;
  case RR_HL7_ITEM_BTS:
    b->bts = s;
    b->declared_msgs = count_field(s.p, s.len);
    if (c->strict && b->declared_msgs >= 0 && b->declared_msgs != c->in_batch) {
      hl7_set_error(c->err, RR_EPARSE, RR_HL7_E_DATA_TYPE, off,
                    "BTS-1 declares %ld messages, the batch holds %ld", b->declared_msgs,
                    c->in_batch);
      if (c->err)
        memcpy(c->err->segment_id, "BTS", 4), c->err->field = 1;
      return RR_EPARSE;
    }
    return 0;
  case RR_HL7_ITEM_FTS:
    b->fts = s;
    b->declared_batches = count_field(s.p, s.len);
    if (c->strict && b->declared_batches >= 0 && b->declared_batches != c->batches) {
      hl7_set_error(c->err, RR_EPARSE, RR_HL7_E_DATA_TYPE, off,
                    "FTS-1 declares %ld batches, the file holds %ld", b->declared_batches,
                    c->batches);
      if (c->err)
        memcpy(c->err->segment_id, "FTS", 4), c->err->field = 1;
      return RR_EPARSE;
    }
    return 0;
  case RR_HL7_ITEM_OTHER:
    if (c->strict) {
      hl7_set_error(c->err, RR_EPARSE, RR_HL7_E_SEGMENT_SEQUENCE, off,
                    "text outside any message at byte %zu", off);
      return RR_EPARSE;
    }
    return 0;
  }
  return 0;
}

int rr_hl7_batch_split(const char *data, size_t len, rr_hl7_mode_t mode, rr_hl7_batch_t *out,
                       rr_hl7_error_t *err) {
  memset(out, 0, sizeof *out);
  out->declared_msgs = out->declared_batches = -1;
  if (err)
    memset(err, 0, sizeof *err);
  split_ctx_t c = {out, 0, data, 0, 0, mode == RR_HL7_STRICT, err, 0};
  rr_hl7_reader_t r;
  rr_hl7_reader_init(&r, len + 1);
  int rc = rr_hl7_reader_feed(&r, data, len, split_item, &c);
  if (rc == 0)
    rc = rr_hl7_reader_finish(&r, split_item, &c);
  rr_hl7_reader_close(&r);
  if (rc)
    rr_hl7_batch_close(out);
  return rc;
}

void rr_hl7_batch_close(rr_hl7_batch_t *b) {
  free(b->msgs);
  b->msgs = NULL;
  b->nmsgs = 0;
}

/* ---- batch build -------------------------------------------------------- */

static int header(rr_buf_t *out, const char *id, const rr_hl7_delims_t *d,
                  const rr_hl7_batch_header_t *h) {
  const char fs = d->field;
  int rc = rr_buf_printf(out, "%s%c%c%c%c%c", id, fs, d->component, d->repetition, d->escape,
                         d->subcomponent);
  if (rc == 0 && d->truncation)
    rc = rr_buf_putc(out, d->truncation);
  const char *v[8] = {h->sending_app,
                      h->sending_facility,
                      h->receiving_app,
                      h->receiving_facility,
                      h->timestamp,
                      NULL,
                      NULL,
                      NULL};
  for (int i = 0; rc == 0 && i < 8; i++)
    rc = rr_buf_printf(out, "%c%s", fs, v[i] ? v[i] : "");
  /* field 11: control id */
  if (rc == 0 && h->control_id)
    rc = rr_buf_printf(out, "%c%s", fs, h->control_id);
  return rc ? rc : rr_buf_putc(out, '\r');
}

int rr_hl7_batch_build(const rr_hl7_batch_header_t *h, const rr_hl7_slice_t *msgs, size_t n,
                       rr_buf_t *out) {
  static const rr_hl7_delims_t std = {'|', '^', '~', '\\', '&', 0};
  const rr_hl7_delims_t *d = h->delims ? h->delims : &std;
  size_t start = out->len;
  int rc = 0;
  if (h->file)
    rc = header(out, "FHS", d, h);
  if (rc == 0)
    rc = header(out, "BHS", d, h);
  for (size_t i = 0; rc == 0 && i < n; i++) {
    size_t len = trim_end(msgs[i].p, msgs[i].len);
    rc = rr_buf_append(out, msgs[i].p, len);
    if (rc == 0)
      rc = rr_buf_putc(out, '\r');
  }
  if (rc == 0)
    rc = rr_buf_printf(out, "BTS%c%zu\r", d->field, n);
  if (rc == 0 && h->file)
    rc = rr_buf_printf(out, "FTS%c1\r", d->field);
  if (rc)
    out->len = start;
  return rc;
}

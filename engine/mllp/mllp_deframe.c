/* MLLP deframing: pure, chunk-size independent. */
#include <string.h>

#include "core/error.h"
#include "mllp/mllp.h"

void rr_mllp_options_default(rr_mllp_options_t *o) {
  o->start = 0x0B;
  o->end1 = 0x1C;
  o->end2 = 0x0D;
  o->max_frame = (size_t)16 << 20;
}

void rr_mllp_deframer_init(rr_mllp_deframer_t *d, const rr_mllp_options_t *opt) {
  memset(d, 0, sizeof *d);
  if (opt)
    d->opt = *opt;
  else
    rr_mllp_options_default(&d->opt);
  rr_buf_init(&d->frame, d->opt.max_frame + 1);
}

void rr_mllp_deframer_close(rr_mllp_deframer_t *d) {
  rr_buf_close(&d->frame);
}

size_t rr_mllp_deframer_pending(const rr_mllp_deframer_t *d) {
  return d->in_frame ? d->frame.len : 0;
}

int rr_mllp_deframer_in_frame(const rr_mllp_deframer_t *d) {
  return d->in_frame;
}

static int flush_junk(rr_mllp_deframer_t *d, rr_mllp_cb cb, void *ud) {
  if (!d->junk)
    return 0;
  size_t n = d->junk;
  d->junk = 0;
  return cb(ud, RR_MLLP_JUNK, NULL, n, d->junk_start);
}

int rr_mllp_deframer_feed(rr_mllp_deframer_t *d, const char *data, size_t len, rr_mllp_cb cb,
                          void *ud) {
  const rr_mllp_options_t *o = &d->opt;
  const char *p = data, *end = data + len;
  int rc = 0;
  if (d->failed)
    return RR_ELIMIT;
  while (p < end) {
    if (!d->in_frame) {
      /* Outside a frame: everything up to the start byte is junk. Stray
       * CR/LF between frames (sent by some systems) is not worth a report. */
      const char *s = memchr(p, o->start, (size_t)(end - p));
      const char *stop = s ? s : end;
      for (const char *q = p; q < stop; q++) {
        if (*q == '\r' || *q == '\n')
          continue;
        if (!d->junk)
          d->junk_start = d->offset + (uint64_t)(q - p);
        d->junk++;
      }
      d->offset += (uint64_t)(stop - p);
      p = stop;
      if (!s)
        break;
      if ((rc = flush_junk(d, cb, ud)))
        return rc;
      d->in_frame = 1;
      d->saw_end1 = 0;
      d->frame_start = d->offset;
      rr_buf_reset(&d->frame);
      p++;
      d->offset++;
      continue;
    }
    /* Inside a frame: find end1 followed by end2. */
    if (d->saw_end1) {
      d->saw_end1 = 0;
      if ((unsigned char)*p == o->end2) {
        p++;
        d->offset++;
        d->in_frame = 0;
        d->frame.len--; /* drop end1 */
        rc = cb(ud, RR_MLLP_FRAME, d->frame.data, d->frame.len, d->frame_start);
        rr_buf_reset(&d->frame);
        if (rc)
          return rc;
        continue;
      }
    }
    const char *e = memchr(p, o->end1, (size_t)(end - p));
    const char *stop = e ? e + 1 : end;
    if (d->frame.len + (size_t)(stop - p) > o->max_frame + 1) {
      d->failed = 1;
      cb(ud, RR_MLLP_OVERSIZE, NULL, d->frame.len + (size_t)(stop - p), d->frame_start);
      return RR_ELIMIT;
    }
    if ((rc = rr_buf_append(&d->frame, p, (size_t)(stop - p))))
      return rc;
    d->offset += (uint64_t)(stop - p);
    p = stop;
    if (e)
      d->saw_end1 = 1;
  }
  return flush_junk(d, cb, ud);
}

int rr_mllp_frame(const rr_mllp_options_t *opt, const char *payload, size_t len, rr_buf_t *out) {
  rr_mllp_options_t def;
  if (!opt) {
    rr_mllp_options_default(&def);
    opt = &def;
  }
  int rc = rr_buf_reserve(out, len + 3);
  if (rc)
    return rc;
  out->data[out->len++] = (char)opt->start;
  memcpy(out->data + out->len, payload, len);
  out->len += len;
  out->data[out->len++] = (char)opt->end1;
  out->data[out->len++] = (char)opt->end2;
  out->data[out->len] = '\0';
  return 0;
}

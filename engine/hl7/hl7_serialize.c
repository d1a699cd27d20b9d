/* ER7 serialization: untouched segments are copied byte for byte. */
#include "core/error.h"
#include "hl7/hl7_int.h"

int rr_hl7_serialize(const rr_hl7_msg_t *m, rr_buf_t *out) {
  size_t total = 0;
  for (size_t i = 0; i < m->nsegs; i++)
    total += m->segs[i].raw_len + 1;
  int rc = rr_buf_reserve(out, total);
  for (size_t i = 0; rc == 0 && i < m->nsegs; i++) {
    rr_hl7_slice_t s;
    rc = hl7_segment_text(m, i, &s);
    if (rc == 0)
      rc = rr_buf_append(out, s.p, s.len);
    if (rc == 0)
      rc = rr_buf_putc(out, '\r');
  }
  return rc;
}

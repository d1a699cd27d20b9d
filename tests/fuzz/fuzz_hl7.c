/* libFuzzer target for the HL7 codec: parse (lenient and strict), read every
 * leaf decoded, edit, serialize and re-parse, build an ACK, split batches and
 * stream the input through the reader in odd-sized chunks. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "hl7/hl7.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int count_item(void *ud, rr_hl7_item_kind_t kind, const char *d, size_t len, size_t off) {
  (void)kind, (void)d, (void)off;
  *(size_t *)ud += len;
  return 0;
}

static void exercise(rr_hl7_msg_t *m, const char *d, size_t n, rr_hl7_mode_t mode) {
  rr_hl7_options_t o;
  rr_hl7_options_default(&o);
  o.mode = mode;
  o.max_segments = 2000;
  o.borrow = mode == RR_HL7_STRICT; /* in place: overreads of the input show */
  rr_hl7_error_t err;
  int rc = rr_hl7_parse(m, d, n, &o, &err);
  rr_buf_t b;
  rr_buf_init(&b, 1 << 24);
  rr_hl7_ack_options_t ao = {"F1", "20260101", rc ? err.text : NULL, rc ? &err : NULL, rc ? 1 : 0};
  if (rr_hl7_ack_build(m, rr_hl7_ack_code_for(m, rc ? RR_HL7_ERROR : RR_HL7_ACCEPT), &ao, &b) != 0)
    abort();
  if (rc == 0) {
    const rr_hl7_delims_t *dl = rr_hl7_delims(m);
    for (size_t i = 0; i < rr_hl7_segment_count(m); i++) {
      unsigned nf = rr_hl7_segment_fields(m, i);
      for (unsigned f = 1; f <= nf && f < 64; f++) {
        rr_hl7_slice_t fv, rv, cv;
        rr_hl7_field_raw(m, i, f, &fv);
        for (unsigned r = 1; r < 8 && rr_hl7_piece(fv.p, fv.len, dl->repetition, r, &rv); r++)
          for (unsigned c = 1; c < 16 && rr_hl7_piece(rv.p, rv.len, dl->component, c, &cv); c++) {
            rr_buf_reset(&b);
            rr_hl7_decode(m, cv.p, cv.len, &b);
          }
      }
    }
    /* serialize, re-parse: same text again */
    rr_buf_t s1, s2;
    rr_buf_init(&s1, 1 << 26);
    rr_buf_init(&s2, 1 << 26);
    if (rr_hl7_serialize(m, &s1) == 0) {
      rr_hl7_msg_t *m2 = rr_hl7_msg_new();
      if (m2 && rr_hl7_parse(m2, s1.data, s1.len, &o, NULL) == 0) {
        if (rr_hl7_serialize(m2, &s2) == 0 &&
            (s1.len != s2.len || memcmp(s1.data, s2.data, s1.len)))
          abort();
      }
      rr_hl7_msg_free(m2);
    }
    /* edits driven by the input's first bytes */
    char val[16];
    size_t vn = n < sizeof val ? n : sizeof val;
    memcpy(val, d, vn);
    rr_hl7_path_t p = {
        "OBX", 1u + (unsigned)(n % 3), 1u + (unsigned)(n % 7), (unsigned)(n % 3), (unsigned)(n % 4),
        0};
    rr_hl7_set(m, &p, val, vn);
    p.field = 3;
    rr_hl7_delete(m, &p);
    rr_buf_reset(&s1);
    if (rr_hl7_serialize(m, &s1) == 0 && rr_hl7_parse(m, s1.data, s1.len, &o, NULL) != 0 &&
        mode == RR_HL7_LENIENT)
      abort(); /* an edited message must still parse */
    rr_buf_close(&s1);
    rr_buf_close(&s2);
  }
  rr_buf_close(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *d = (const char *)data;
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  if (!m)
    return 0;
  exercise(m, d, size, RR_HL7_LENIENT);
  exercise(m, d, size, RR_HL7_STRICT);
  rr_hl7_msg_free(m);

  rr_hl7_batch_t b;
  if (rr_hl7_batch_split(d, size, RR_HL7_STRICT, &b, NULL) == 0)
    rr_hl7_batch_close(&b);
  size_t whole = 0, chunked = 0;
  rr_hl7_reader_t r;
  rr_hl7_reader_init(&r, size + 1);
  rr_hl7_reader_feed(&r, d, size, count_item, &whole);
  rr_hl7_reader_finish(&r, count_item, &whole);
  rr_hl7_reader_close(&r);
  rr_hl7_reader_init(&r, size + 1);
  size_t step = size % 7 + 1;
  for (size_t i = 0; i < size; i += step)
    rr_hl7_reader_feed(&r, d + i, size - i < step ? size - i : step, count_item, &chunked);
  rr_hl7_reader_finish(&r, count_item, &chunked);
  rr_hl7_reader_close(&r);
  if (whole != chunked)
    abort();
  return 0;
}

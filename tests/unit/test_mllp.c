/* Unit tests of the MLLP deframer (engine/mllp/mllp_deframe.c). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "mllp/mllp.h"
#include "rr_test.h"

typedef struct events {
  int frames, junk, oversize;
  char text[4096];
  size_t tlen;
  uint64_t offsets[64];
  size_t junk_bytes;
} events_t;

static int record(void *ud, rr_mllp_event_t ev, const char *d, size_t len, uint64_t off) {
  events_t *e = ud;
  if (ev == RR_MLLP_FRAME) {
    if (e->frames < 64)
      e->offsets[e->frames] = off;
    e->frames++;
    memcpy(e->text + e->tlen, d, len);
    e->tlen += len;
    e->text[e->tlen++] = '|';
  } else if (ev == RR_MLLP_JUNK) {
    e->junk++;
    e->junk_bytes += len;
  } else {
    e->oversize++;
  }
  return 0;
}

static void feed(const char *d, size_t n, size_t step, unsigned seed, events_t *e,
                 const rr_mllp_options_t *o, int *rc_out) {
  rr_mllp_deframer_t df;
  rr_mllp_deframer_init(&df, o);
  memset(e, 0, sizeof *e);
  int rc = 0;
  for (size_t i = 0; i < n && rc == 0;) {
    size_t k = step;
    if (!step) {
      seed = seed * 1103515245u + 12345u;
      k = 1 + (seed >> 8) % 13;
    }
    if (k > n - i)
      k = n - i;
    rc = rr_mllp_deframer_feed(&df, d + i, k, record, e);
    i += k;
  }
  if (rc_out)
    *rc_out = rc;
  rr_mllp_deframer_close(&df);
}

static void test_frames_any_split(void) {
  static const char s[] = "\x0b"
                          "MSH|A\rPID|1\r"
                          "\x1c\r"
                          "\r\n"
                          "\x0b"
                          "MSH|B\x1cX\r"
                          "\x1c\r"
                          "\x0b\x1c\r";
  const size_t n = sizeof s - 1;
  events_t whole, one, rnd;
  feed(s, n, n, 0, &whole, NULL, NULL);
  CHECK_EQ_INT(whole.frames, 3);
  CHECK_MEM_STR(whole.text, whole.tlen, "MSH|A\rPID|1\r|MSH|B\x1cX\r||");
  CHECK_EQ_INT(whole.junk, 0); /* CR/LF between frames is not junk */
  CHECK_EQ_INT(whole.offsets[0], 0);
  CHECK_EQ_INT(whole.offsets[1], 17);
  feed(s, n, 1, 0, &one, NULL, NULL);
  for (unsigned seed = 1; seed < 50; seed++) {
    feed(s, n, 0, seed, &rnd, NULL, NULL);
    CHECK(rnd.frames == 3 && rnd.tlen == whole.tlen && memcmp(rnd.text, whole.text, rnd.tlen) == 0);
    CHECK(memcmp(rnd.offsets, whole.offsets, sizeof whole.offsets) == 0);
  }
  CHECK(one.frames == 3 && one.tlen == whole.tlen && memcmp(one.text, whole.text, one.tlen) == 0);
}

static void test_junk(void) {
  static const char s[] = "GET / HTTP/1.0\r\n\x0bMSH|A\x1c\rxx\x0bMSH|B\x1c\r";
  events_t e;
  feed(s, sizeof s - 1, 1, 0, &e, NULL, NULL);
  CHECK_EQ_INT(e.frames, 2);
  CHECK_EQ_INT(e.junk_bytes, 14 + 2);
  CHECK(e.junk >= 2);
}

static void test_oversize(void) {
  rr_mllp_options_t o;
  rr_mllp_options_default(&o);
  o.max_frame = 8;
  events_t e;
  int rc;
  static const char ok[] = "\x0b"
                           "12345678"
                           "\x1c\r";
  feed(ok, sizeof ok - 1, 3, 0, &e, &o, &rc);
  CHECK_EQ_INT(rc, 0);
  CHECK_EQ_INT(e.frames, 1);
  static const char big[] = "\x0b"
                            "123456789"
                            "\x1c\r";
  feed(big, sizeof big - 1, 1, 0, &e, &o, &rc);
  CHECK_EQ_INT(rc, RR_ELIMIT);
  CHECK_EQ_INT(e.oversize, 1);
  CHECK_EQ_INT(e.frames, 0);
}

static void test_custom_bytes_and_frame(void) {
  rr_mllp_options_t o;
  rr_mllp_options_default(&o);
  o.start = 0x02;
  o.end1 = 0x03;
  o.end2 = 0x0a;
  rr_buf_t b;
  rr_buf_init(&b, 1024);
  CHECK_EQ_INT(rr_mllp_frame(&o, "MSH|X\r", 6, &b), 0);
  CHECK_MEM_STR(b.data, b.len, "\x02MSH|X\r\x03\n");
  events_t e;
  feed(b.data, b.len, 1, 0, &e, &o, NULL);
  CHECK_EQ_INT(e.frames, 1);
  CHECK_MEM_STR(e.text, e.tlen, "MSH|X\r|");
  rr_buf_close(&b);
  /* an unfinished frame is pending, not delivered */
  rr_mllp_deframer_t df;
  rr_mllp_deframer_init(&df, NULL);
  memset(&e, 0, sizeof e);
  CHECK_EQ_INT(rr_mllp_deframer_feed(&df, "\x0bMSH|", 5, record, &e), 0);
  CHECK_EQ_INT(e.frames, 0);
  CHECK(rr_mllp_deframer_in_frame(&df));
  CHECK_EQ_INT(rr_mllp_deframer_pending(&df), 4);
  rr_mllp_deframer_close(&df);
}

int main(void) {
  RUN(test_frames_any_split);
  RUN(test_junk);
  RUN(test_oversize);
  RUN(test_custom_bytes_and_frame);
  return TEST_SUMMARY();
}

/* libFuzzer target for the MLLP deframer: the frames found must not depend
 * on how the stream is split. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mllp/mllp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct sum {
  uint64_t h;
  size_t frames, junk;
} sum_t;

static int on_ev(void *ud, rr_mllp_event_t ev, const char *d, size_t len, uint64_t off) {
  sum_t *s = ud;
  if (ev == RR_MLLP_FRAME) {
    s->frames++;
    s->h = (s->h ^ off) * 1099511628211ull;
    for (size_t i = 0; i < len; i++)
      s->h = (s->h ^ (unsigned char)d[i]) * 1099511628211ull;
  } else if (ev == RR_MLLP_JUNK) {
    s->junk += len;
  }
  return 0;
}

static sum_t run(const uint8_t *data, size_t size, size_t step) {
  rr_mllp_options_t o;
  rr_mllp_options_default(&o);
  o.max_frame = 1024;
  rr_mllp_deframer_t df;
  rr_mllp_deframer_init(&df, &o);
  sum_t s = {1469598103934665603ull, 0, 0};
  for (size_t i = 0; i < size; i += step)
    if (rr_mllp_deframer_feed(&df, (const char *)data + i, size - i < step ? size - i : step, on_ev,
                              &s) != 0)
      break;
  rr_mllp_deframer_close(&df);
  return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0)
    return 0;
  sum_t a = run(data, size, size);
  sum_t b = run(data, size, 1);
  sum_t c = run(data, size, (size_t)data[0] % 11 + 1);
  if (a.frames != b.frames || a.h != b.h || a.frames != c.frames || a.h != c.h)
    abort();
  return 0;
}

/* libFuzzer target for the multipart/related parser. Input: byte 0 picks
 * options, byte 1 seeds the chunk sizes, then a Content-Type value up to the
 * first LF, then the body. The events (part headers, data, lengths, end) and
 * the error must not depend on how the body is split. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dicomweb/multipart.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct sum {
  uint64_t h;
  size_t parts, data_events;
  int ended, in_part;
} sum_t;

static void mix(sum_t *s, const void *d, size_t n) {
  const unsigned char *b = d;
  for (size_t i = 0; i < n; i++)
    s->h = (s->h ^ b[i]) * 1099511628211ull;
}

static void mix_str(sum_t *s, const char *str) {
  if (str)
    mix(s, str, strlen(str) + 1);
  else
    mix(s, "-", 1);
}

static int on_begin(void *ud, const rr_multipart_part_t *pt) {
  sum_t *s = ud;
  if (s->in_part || s->ended || pt->index != s->parts)
    abort();
  s->in_part = 1;
  s->parts++;
  mix(s, &pt->offset, sizeof pt->offset);
  mix(s, &pt->data_offset, sizeof pt->data_offset);
  mix_str(s, pt->content_type);
  mix_str(s, pt->content_location);
  mix(s, &pt->content_length, sizeof pt->content_length);
  for (size_t i = 0; i < pt->nheaders; i++) {
    mix_str(s, pt->headers[i].name);
    mix_str(s, pt->headers[i].value);
  }
  if (pt->content_type != rr_multipart_part_header(pt, "content-type"))
    abort();
  return 0;
}

static int on_data(void *ud, const rr_multipart_part_t *pt, const char *d, size_t n) {
  sum_t *s = ud;
  (void)pt;
  if (!s->in_part || n == 0)
    abort();
  s->data_events++;
  mix(s, d, n);
  return 0;
}

static int on_end_part(void *ud, const rr_multipart_part_t *pt) {
  sum_t *s = ud;
  if (!s->in_part)
    abort();
  s->in_part = 0;
  mix(s, &pt->length, sizeof pt->length);
  return 0;
}

static int on_end(void *ud, size_t parts) {
  sum_t *s = ud;
  if (s->in_part || s->ended || parts != s->parts)
    abort();
  s->ended = 1;
  return 0;
}

typedef struct result {
  sum_t s;
  int rc, frc;
  rr_multipart_error_t err;
} result_t;

static result_t run(const char *ct, size_t ctlen, const rr_multipart_options_t *o, const char *body,
                    size_t n, size_t step, unsigned seed) {
  static const rr_multipart_callbacks_t cb = {on_begin, on_data, on_end_part, on_end};
  result_t r;
  memset(&r, 0, sizeof r);
  r.s.h = 1469598103934665603ull;
  rr_multipart_parser_t *p = NULL;
  rr_multipart_error_t cterr;
  r.rc = rr_multipart_parser_new(ct, ctlen, o, &cb, &r.s, &p, &cterr);
  if (r.rc) {
    r.frc = r.rc;
    r.err = cterr;
    return r;
  }
  for (size_t i = 0; i < n && r.rc == 0;) {
    size_t k = step;
    if (!k) {
      seed = seed * 1103515245u + 12345u;
      k = 1 + (seed >> 16) % 64;
    }
    if (k > n - i)
      k = n - i;
    r.rc = rr_multipart_parser_feed(p, body + i, k);
    i += k;
  }
  r.frc = rr_multipart_parser_finish(p);
  r.err = *rr_multipart_parser_error(p);
  /* after an error (or the end) nothing more is reported */
  if (r.rc && rr_multipart_parser_feed(p, "\r\n", 2) != r.rc)
    abort();
  rr_multipart_parser_free(p);
  return r;
}

static void same(const result_t *a, const result_t *b) {
  if (a->rc != b->rc || a->frc != b->frc || a->s.h != b->s.h || a->s.parts != b->s.parts ||
      a->s.ended != b->s.ended || a->err.code != b->err.code || a->err.offset != b->err.offset ||
      (a->err.reason != b->err.reason && strcmp(a->err.reason, b->err.reason) != 0))
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2)
    return 0;
  rr_multipart_options_t o;
  rr_multipart_options_default(&o);
  o.allow_bare_lf = data[0] & 1;
  o.ignore_content_length = (data[0] >> 1) & 1;
  if (data[0] & 4) {
    o.max_header_block = 64 + (size_t)(data[0] >> 4) * 16;
    o.max_headers = 1 + ((data[0] >> 3) & 3);
    o.max_parts = 1 + (data[0] >> 5);
  }
  unsigned seed = data[1];
  const char *ct = (const char *)data + 2;
  const char *nl = memchr(ct, '\n', size - 2);
  size_t ctlen = nl ? (size_t)(nl - ct) : size - 2;
  const char *body = nl ? nl + 1 : ct + ctlen;
  size_t n = size - (size_t)(body - (const char *)data);

  result_t whole = run(ct, ctlen, &o, body, n, n ? n : 1, 0);
  result_t one = run(ct, ctlen, &o, body, n, 1, 0);
  result_t rnd = run(ct, ctlen, &o, body, n, 0, seed);
  same(&whole, &one);
  same(&whole, &rnd);
  if (whole.err.code && !whole.err.reason)
    abort();
  if (whole.frc == 0 && (!whole.s.ended || whole.rc != 0))
    abort();
  return 0;
}

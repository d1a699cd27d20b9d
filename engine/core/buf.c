#include "core/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

void rr_buf_init(rr_buf_t *b, size_t limit) {
  b->data = NULL;
  b->len = 0;
  b->cap = 0;
  b->limit = limit;
}

void rr_buf_close(rr_buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->len = 0;
  b->cap = 0;
}

void rr_buf_reset(rr_buf_t *b) {
  b->len = 0;
  if (b->data)
    b->data[0] = '\0';
}

int rr_buf_reserve(rr_buf_t *b, size_t n) {
  if (n > b->limit || b->len > b->limit - n)
    return RR_ELIMIT;
  size_t need = b->len + n + 1;
  if (need <= b->cap)
    return 0;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < need)
    cap = cap > ((size_t)-1) / 2 ? need : cap * 2;
  char *p = realloc(b->data, cap);
  if (!p)
    return RR_ENOMEM;
  b->data = p;
  b->cap = cap;
  return 0;
}

int rr_buf_append(rr_buf_t *b, const void *p, size_t n) {
  int rc = rr_buf_reserve(b, n);
  if (rc)
    return rc;
  if (n)
    memcpy(b->data + b->len, p, n);
  b->len += n;
  b->data[b->len] = '\0';
  return 0;
}

int rr_buf_putc(rr_buf_t *b, char c) {
  return rr_buf_append(b, &c, 1);
}

int rr_buf_puts(rr_buf_t *b, const char *s) {
  return rr_buf_append(b, s, strlen(s));
}

int rr_buf_printf(rr_buf_t *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0)
    return RR_EINVAL;
  int rc = rr_buf_reserve(b, (size_t)n);
  if (rc)
    return rc;
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
  return 0;
}

char *rr_buf_steal(rr_buf_t *b, size_t *len) {
  char *p = b->data;
  if (len)
    *len = b->len;
  b->data = NULL;
  b->len = 0;
  b->cap = 0;
  return p;
}

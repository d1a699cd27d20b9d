/* rr_buf: a growable byte buffer with a hard size limit (after curl's dynbuf).
 *
 * The buffer always keeps a NUL after the data so it can be handed to C
 * string functions, but the data itself may contain NUL bytes.
 * An rr_buf_t is embedded by value: rr_buf_init / rr_buf_close.
 */
#ifndef RR_CORE_BUF_H
#define RR_CORE_BUF_H

#include <stddef.h>

typedef struct rr_buf {
  char *data;   /* owned; NULL until the first append */
  size_t len;   /* bytes used, excluding the trailing NUL */
  size_t cap;   /* bytes allocated */
  size_t limit; /* maximum len; appending past it fails with RR_ELIMIT */
} rr_buf_t;

/* rr_buf_init: empty buffer that may grow to `limit` bytes. No allocation. */
void rr_buf_init(rr_buf_t *b, size_t limit);
/* rr_buf_close: frees the memory; the buffer may be re-initialised. */
void rr_buf_close(rr_buf_t *b);
/* rr_buf_reset: length back to 0, memory kept for reuse. */
void rr_buf_reset(rr_buf_t *b);
/* rr_buf_append: copies n bytes. RR_ELIMIT past the limit, RR_ENOMEM;
 * on error the buffer is unchanged. */
int rr_buf_append(rr_buf_t *b, const void *p, size_t n);
int rr_buf_putc(rr_buf_t *b, char c);
int rr_buf_puts(rr_buf_t *b, const char *s);
/* rr_buf_printf: formatted append; same errors as rr_buf_append. */
int rr_buf_printf(rr_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* rr_buf_reserve: make room for n more bytes without changing len. */
int rr_buf_reserve(rr_buf_t *b, size_t n);
/* rr_buf_steal: hands the data (NUL-terminated, possibly NULL when empty)
 * to the caller, who frees it with free(); the buffer is left empty. */
char *rr_buf_steal(rr_buf_t *b, size_t *len);

#endif

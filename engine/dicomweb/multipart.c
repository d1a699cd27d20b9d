/* multipart/related codec: Content-Type parsing, the streaming parser, the
 * builder. Pure; chunk-size independent. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "core/error.h"
#include "dicomweb/multipart.h"

#define DEF_HEADER_BLOCK ((size_t)16 << 10)
#define DEF_HEADERS 64
#define DEF_PARTS 100000

/* ---- characters ------------------------------------------------------------ */

static int is_ws(int c) {
  return c == ' ' || c == '\t';
}

static int is_ctl(unsigned char c) {
  return (c < 0x20 && c != '\t') || c == 0x7f;
}

/* RFC 2045 token character: printable ASCII except tspecials. */
static int is_token(unsigned char c) {
  return c > 0x20 && c < 0x7f && !strchr("()<>@,;:\\\"/[]?=", c);
}

/* RFC 2046 bcharsnospace. */
static int is_bchar(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
         (c && strchr("'()+_,-./:=?", c));
}

static int set_err(rr_multipart_error_t *err, int code, uint64_t off, const char *reason) {
  if (err) {
    err->code = code;
    err->offset = off;
    err->reason = reason;
  }
  return code;
}

/* ---- Content-Type ------------------------------------------------------------ */

typedef struct ct_scan {
  const char *s;
  size_t len, i;
} ct_scan_t;

static void ct_skip_ws(ct_scan_t *c) {
  while (c->i < c->len && is_ws(c->s[c->i]))
    c->i++;
}

static size_t ct_token(ct_scan_t *c) {
  size_t start = c->i;
  while (c->i < c->len && is_token((unsigned char)c->s[c->i]))
    c->i++;
  return c->i - start;
}

/* Reads a parameter value (token or quoted string) into dst (cap bytes incl.
 * NUL), or only skips it when dst is NULL. raw[k] gets the offset in the
 * header value of dst[k]. */
static int ct_value(ct_scan_t *c, char *dst, size_t cap, size_t *n, size_t *raw,
                    rr_multipart_error_t *err) {
  size_t k = 0;
  if (c->i < c->len && c->s[c->i] == '"') {
    size_t open = c->i++;
    for (;;) {
      if (c->i >= c->len)
        return set_err(err, RR_EPARSE, open, "unterminated quoted string");
      unsigned char ch = (unsigned char)c->s[c->i];
      if (ch == '"') {
        c->i++;
        break;
      }
      if (ch == '\\') {
        if (++c->i >= c->len)
          return set_err(err, RR_EPARSE, open, "unterminated quoted string");
        ch = (unsigned char)c->s[c->i];
      }
      if (is_ctl(ch))
        return set_err(err, RR_EPARSE, c->i, "control character in parameter");
      if (dst) {
        if (k + 1 >= cap)
          return set_err(err, RR_ELIMIT, c->i, "parameter value too long");
        raw[k] = c->i;
        dst[k] = (char)ch;
      }
      c->i++;
      k++;
    }
  } else {
    while (c->i < c->len) {
      unsigned char ch = (unsigned char)c->s[c->i];
      if (ch <= 0x20 || ch >= 0x7f || ch == ';' || ch == '"')
        break;
      if (dst) {
        if (k + 1 >= cap)
          return set_err(err, RR_ELIMIT, c->i, "parameter value too long");
        raw[k] = c->i;
        dst[k] = (char)ch;
      }
      c->i++;
      k++;
    }
    if (!k)
      return set_err(err, RR_EPARSE, c->i, "malformed parameter");
  }
  if (dst)
    dst[k] = '\0';
  *n = k;
  return 0;
}

int rr_multipart_content_type_parse(const char *value, size_t len, size_t max_boundary,
                                    rr_multipart_content_type_t *out, rr_multipart_error_t *err) {
  ct_scan_t c = {value, len, 0};
  char tmp[RR_MULTIPART_BOUNDARY_CAP + RR_MULTIPART_TYPE_MAX + 2];
  size_t raw[sizeof tmp];
  int have_boundary = 0, have_type = 0;
  if (max_boundary == 0)
    max_boundary = RR_MULTIPART_BOUNDARY_RFC;
  if (max_boundary > RR_MULTIPART_BOUNDARY_CAP)
    return set_err(err, RR_EINVAL, 0, "boundary limit over the cap");
  memset(out, 0, sizeof *out);
  set_err(err, 0, 0, NULL);

  ct_skip_ws(&c);
  size_t type_at = c.i;
  size_t tn = ct_token(&c);
  if (!tn || c.i >= len || value[c.i] != '/')
    return set_err(err, RR_EPARSE, c.i, "malformed media type");
  if (tn != 9 || strncasecmp(value + type_at, "multipart", 9) != 0)
    return set_err(err, RR_EPARSE, type_at, "not a multipart media type");
  c.i++;
  size_t sub_at = c.i;
  size_t sn = ct_token(&c);
  if (!sn)
    return set_err(err, RR_EPARSE, c.i, "malformed media type");
  out->related = sn == 7 && strncasecmp(value + sub_at, "related", 7) == 0;

  for (;;) {
    ct_skip_ws(&c);
    if (c.i >= len)
      break;
    if (value[c.i] != ';')
      return set_err(err, RR_EPARSE, c.i, "malformed parameter");
    c.i++;
    ct_skip_ws(&c);
    if (c.i >= len)
      break; /* a trailing ';' */
    size_t name_at = c.i;
    size_t nn = ct_token(&c);
    if (!nn)
      return set_err(err, RR_EPARSE, c.i, "malformed parameter");
    ct_skip_ws(&c);
    if (c.i >= len || value[c.i] != '=')
      return set_err(err, RR_EPARSE, c.i, "malformed parameter");
    c.i++;
    ct_skip_ws(&c);
    size_t value_at = c.i, vn = 0;
    int is_boundary = nn == 8 && strncasecmp(value + name_at, "boundary", 8) == 0;
    int is_type = nn == 4 && strncasecmp(value + name_at, "type", 4) == 0;
    int rc = ct_value(&c, is_boundary || is_type ? tmp : NULL, sizeof tmp, &vn, raw, err);
    if (rc)
      return rc;
    if (is_boundary) {
      if (have_boundary)
        return set_err(err, RR_EPARSE, name_at, "duplicate boundary parameter");
      have_boundary = 1;
      if (vn == 0)
        return set_err(err, RR_EPARSE, value_at, "empty boundary");
      if (vn > max_boundary)
        return set_err(err, RR_ELIMIT, raw[max_boundary], "boundary too long");
      for (size_t k = 0; k < vn; k++)
        if ((unsigned char)tmp[k] < 0x20 || (unsigned char)tmp[k] > 0x7e)
          return set_err(err, RR_EPARSE, raw[k], "bad character in boundary");
      if (tmp[vn - 1] == ' ')
        return set_err(err, RR_EPARSE, raw[vn - 1], "boundary ends with a space");
      memcpy(out->boundary, tmp, vn + 1);
      out->boundary_len = vn;
    } else if (is_type) {
      if (have_type)
        return set_err(err, RR_EPARSE, name_at, "duplicate type parameter");
      have_type = 1;
      if (vn > RR_MULTIPART_TYPE_MAX)
        return set_err(err, RR_ELIMIT, raw[RR_MULTIPART_TYPE_MAX], "type parameter too long");
      memcpy(out->type, tmp, vn + 1);
    }
  }
  if (!have_boundary)
    return set_err(err, RR_EPARSE, len, "no boundary parameter");
  return 0;
}

/* ---- parser ------------------------------------------------------------------ */

typedef enum state { S_PREAMBLE, S_HEADERS, S_BODY, S_EPILOGUE, S_FAILED } state_t;

/* What follows a matched CRLF "--" boundary. */
typedef enum after { A_NONE, A_START, A_DASH, A_PAD, A_CR } after_t;

/* One header of the current part: offsets into p->strings. */
typedef struct hdr {
  size_t name, value;
  uint64_t line_offset;
} hdr_t;

#define HOLD_CAP (4 + RR_MULTIPART_BOUNDARY_CAP + RR_MULTIPART_MAX_PADDING + 2)

struct rr_multipart_parser {
  rr_multipart_options_t opt;
  rr_multipart_callbacks_t cb;
  void *ud;
  rr_multipart_content_type_t ct;
  rr_multipart_error_t err;
  state_t state;
  uint64_t offset; /* stream offset of the next byte */

  /* Delimiter matcher: delim = CRLF "--" boundary; `match` bytes of it are
   * matched (the first two may be virtual: at the stream's start and at the
   * start of data no CRLF is needed). hold keeps the real bytes matched so
   * far, which become data again if the match fails. */
  char delim[4 + RR_MULTIPART_BOUNDARY_CAP];
  size_t dlen, match, pad;
  after_t after;
  char hold[HOLD_CAP];
  size_t hold_len;

  /* Current part's header block. */
  rr_buf_t line;    /* the header line being read, raw */
  rr_buf_t strings; /* name NUL value NUL ... */
  size_t block;     /* raw header block bytes so far */
  hdr_t *hdrs;
  rr_multipart_header_t *pub;
  size_t nhdrs, hdr_cap;

  rr_multipart_part_t part;
  size_t parts;
};

void rr_multipart_options_default(rr_multipart_options_t *o) {
  memset(o, 0, sizeof *o);
  o->max_header_block = DEF_HEADER_BLOCK;
  o->max_headers = DEF_HEADERS;
  o->max_parts = DEF_PARTS;
  o->max_boundary = RR_MULTIPART_BOUNDARY_RFC;
}

int rr_multipart_parser_new(const char *content_type, size_t len, const rr_multipart_options_t *opt,
                            const rr_multipart_callbacks_t *cb, void *ud,
                            rr_multipart_parser_t **out, rr_multipart_error_t *err) {
  rr_multipart_options_t o;
  rr_multipart_options_default(&o);
  *out = NULL;
  if (opt) {
    o.allow_bare_lf = opt->allow_bare_lf;
    o.ignore_content_length = opt->ignore_content_length;
    if (opt->max_header_block)
      o.max_header_block = opt->max_header_block;
    if (opt->max_headers)
      o.max_headers = opt->max_headers;
    if (opt->max_parts)
      o.max_parts = opt->max_parts;
    if (opt->max_boundary)
      o.max_boundary = opt->max_boundary;
  }
  if (o.max_boundary > RR_MULTIPART_BOUNDARY_CAP || o.max_header_block > SIZE_MAX / 4 ||
      o.max_headers > SIZE_MAX / sizeof(hdr_t))
    return set_err(err, RR_EINVAL, 0, "bad options");
  rr_multipart_content_type_t ct;
  int rc = rr_multipart_content_type_parse(content_type, len, o.max_boundary, &ct, err);
  if (rc)
    return rc;
  rr_multipart_parser_t *p = calloc(1, sizeof *p);
  if (!p)
    return set_err(err, RR_ENOMEM, 0, "out of memory");
  p->opt = o;
  if (cb)
    p->cb = *cb;
  p->ud = ud;
  p->ct = ct;
  memcpy(p->delim, "\r\n--", 4);
  memcpy(p->delim + 4, ct.boundary, ct.boundary_len);
  p->dlen = 4 + ct.boundary_len;
  p->state = S_PREAMBLE;
  p->match = 2; /* the first boundary needs no CRLF before it */
  rr_buf_init(&p->line, o.max_header_block);
  rr_buf_init(&p->strings, o.max_header_block);
  *out = p;
  return 0;
}

void rr_multipart_parser_free(rr_multipart_parser_t *p) {
  if (!p)
    return;
  rr_buf_close(&p->line);
  rr_buf_close(&p->strings);
  free(p->hdrs);
  free(p->pub);
  free(p);
}

const rr_multipart_error_t *rr_multipart_parser_error(const rr_multipart_parser_t *p) {
  return &p->err;
}

const rr_multipart_content_type_t *
rr_multipart_parser_content_type(const rr_multipart_parser_t *p) {
  return &p->ct;
}

size_t rr_multipart_parser_parts(const rr_multipart_parser_t *p) {
  return p->parts;
}

const char *rr_multipart_part_header(const rr_multipart_part_t *part, const char *name) {
  for (size_t i = 0; i < part->nheaders; i++)
    if (strcasecmp(part->headers[i].name, name) == 0)
      return part->headers[i].value;
  return NULL;
}

static int fail(rr_multipart_parser_t *p, int code, uint64_t off, const char *reason) {
  p->state = S_FAILED;
  return set_err(&p->err, code, off, reason);
}

/* A callback's verdict: non-zero stops the parser for good. */
static int cb_result(rr_multipart_parser_t *p, int rc) {
  return rc ? fail(p, rc, p->offset, "stopped by callback") : 0;
}

static int emit_data(rr_multipart_parser_t *p, const char *d, size_t n) {
  if (!n || p->state != S_BODY)
    return 0;
  p->part.length += n;
  return p->cb.part_data ? cb_result(p, p->cb.part_data(p->ud, &p->part, d, n)) : 0;
}

static void reset_match(rr_multipart_parser_t *p) {
  p->match = 0;
  p->after = A_NONE;
  p->pad = 0;
  p->hold_len = 0;
}

/* The bytes held as a possible delimiter were not one: they are data (or
 * preamble/epilogue, dropped). */
static int release_hold(rr_multipart_parser_t *p) {
  size_t n = p->hold_len;
  reset_match(p);
  return emit_data(p, p->hold, n);
}

static int end_part(rr_multipart_parser_t *p) {
  rr_multipart_part_t *pt = &p->part;
  if (pt->has_content_length && !p->opt.ignore_content_length && pt->length != pt->content_length)
    return fail(p, RR_EPARSE, pt->data_offset + pt->length,
                "part length differs from Content-Length");
  return p->cb.part_end ? cb_result(p, p->cb.part_end(p->ud, pt)) : 0;
}

static void start_headers(rr_multipart_parser_t *p) {
  p->state = S_HEADERS;
  rr_buf_reset(&p->line);
  rr_buf_reset(&p->strings);
  p->block = 0;
  p->nhdrs = 0;
  memset(&p->part, 0, sizeof p->part);
  p->part.index = p->parts;
  p->part.offset = p->offset;
}

/* A delimiter line ended (close = 0) or the close delimiter was read. The
 * byte that completed it has been counted in p->offset. */
static int on_delimiter(rr_multipart_parser_t *p, int close) {
  int rc;
  int in_body = p->state == S_BODY;
  reset_match(p);
  if (in_body && (rc = end_part(p)))
    return rc;
  if (close) {
    p->state = S_EPILOGUE;
    return p->cb.end ? cb_result(p, p->cb.end(p->ud, p->parts)) : 0;
  }
  if (p->parts >= p->opt.max_parts)
    return fail(p, RR_ELIMIT, p->offset, "too many parts");
  start_headers(p);
  return 0;
}

typedef enum step { ST_MORE, ST_DATA, ST_MISMATCH, ST_LINE, ST_CLOSE } step_t;

/* Feeds one byte to the delimiter matcher. ST_MORE: held. ST_DATA: not a
 * delimiter start, plain data. ST_MISMATCH: the held bytes are data and c
 * must be looked at again from scratch (it cannot be among the held bytes'
 * continuations: the boundary holds no CR or LF). */
static step_t match_byte(rr_multipart_parser_t *p, char c, int *err) {
  int lf = p->opt.allow_bare_lf;
  step_t r = ST_MORE;
  if (p->match < p->dlen) {
    if (c == p->delim[p->match])
      p->match++;
    else if (lf && p->match <= 1 && c == '\n')
      p->match = 2;
    else
      return p->match == 0 ? ST_DATA : ST_MISMATCH;
    if (p->match == p->dlen)
      p->after = A_START;
  } else {
    switch (p->after) {
    case A_START:
      if (c == '-') {
        p->after = A_DASH;
        break;
      }
      /* fall through */
    case A_PAD:
      if (is_ws(c)) {
        if (++p->pad > RR_MULTIPART_MAX_PADDING) {
          *err = fail(p, RR_ELIMIT, p->offset, "transport padding over limit");
          return ST_MORE;
        }
        p->after = A_PAD;
      } else if (c == '\r') {
        p->after = A_CR;
      } else if (c == '\n' && lf) {
        r = ST_LINE;
      } else {
        return ST_MISMATCH;
      }
      break;
    case A_DASH:
      if (c != '-')
        return ST_MISMATCH;
      r = ST_CLOSE;
      break;
    case A_CR:
      if (c != '\n')
        return ST_MISMATCH;
      r = ST_LINE;
      break;
    case A_NONE: return ST_MISMATCH;
    }
  }
  p->hold[p->hold_len++] = c;
  return r;
}

/* Where a delimiter could start in d[0..n): the first CR (or, with bare LF
 * allowed, the first LF, or the CR just before it, or a CR ending the
 * chunk). NULL when none. */
static const char *candidate(const rr_multipart_parser_t *p, const char *d, size_t n) {
  if (!p->opt.allow_bare_lf)
    return memchr(d, '\r', n);
  const char *q = memchr(d, '\n', n);
  if (q)
    return q > d && q[-1] == '\r' ? q - 1 : q;
  return n && d[n - 1] == '\r' ? d + n - 1 : NULL;
}

/* Preamble or data: looks for the delimiter. Returns bytes consumed. */
static size_t scan(rr_multipart_parser_t *p, const char *d, size_t n, int *rc) {
  size_t i = 0;
  state_t st = p->state;
  while (i < n && p->state == st) {
    if (p->match == 0) {
      const char *c = candidate(p, d + i, n - i);
      size_t run = c ? (size_t)(c - (d + i)) : n - i;
      if (run) {
        if ((*rc = emit_data(p, d + i, run)))
          return i;
        p->offset += run;
        i += run;
      }
      if (!c)
        break;
    }
    step_t s = match_byte(p, d[i], rc);
    if (*rc)
      return i;
    switch (s) {
    case ST_MISMATCH:
      if ((*rc = release_hold(p)))
        return i;
      continue; /* d[i] again, from scratch */
    case ST_DATA:
      if ((*rc = emit_data(p, d + i, 1)))
        return i;
      break;
    case ST_MORE: break;
    case ST_LINE:
    case ST_CLOSE:
      p->offset++;
      i++;
      *rc = on_delimiter(p, s == ST_CLOSE);
      if (*rc)
        return i;
      continue;
    }
    p->offset++;
    i++;
  }
  return i;
}

static int append_string(rr_buf_t *b, const char *s, size_t n) {
  int rc = rr_buf_append(b, s, n);
  return rc ? rc : rr_buf_putc(b, '\0');
}

static int parse_length(const char *s, uint64_t *out) {
  uint64_t v = 0;
  if (!*s)
    return -1;
  for (; *s; s++) {
    if (*s < '0' || *s > '9')
      return -1;
    unsigned d = (unsigned)(*s - '0');
    if (v > (UINT64_MAX - d) / 10)
      return -1;
    v = v * 10 + d;
  }
  *out = v;
  return 0;
}

/* The empty line ended the header block: publish the part. */
static int headers_done(rr_multipart_parser_t *p) {
  rr_multipart_part_t *pt = &p->part;
  for (size_t i = 0; i < p->nhdrs; i++) {
    const char *name = p->strings.data + p->hdrs[i].name;
    const char *value = p->strings.data + p->hdrs[i].value;
    p->pub[i].name = name;
    p->pub[i].value = value;
    if (!pt->content_type && strcasecmp(name, "Content-Type") == 0) {
      pt->content_type = value;
    } else if (!pt->content_location && strcasecmp(name, "Content-Location") == 0) {
      pt->content_location = value;
    } else if (strcasecmp(name, "Content-Length") == 0) {
      if (pt->has_content_length)
        return fail(p, RR_EPARSE, p->hdrs[i].line_offset, "duplicate Content-Length");
      if (parse_length(value, &pt->content_length))
        return fail(p, RR_EPARSE, p->hdrs[i].line_offset, "bad Content-Length");
      pt->has_content_length = 1;
    }
  }
  pt->headers = p->nhdrs ? p->pub : NULL;
  pt->nheaders = p->nhdrs;
  pt->data_offset = p->offset;
  p->parts++;
  p->state = S_BODY;
  p->match = 2; /* data may start with the delimiter, its CRLF being the empty line's */
  return p->cb.part_begin ? cb_result(p, p->cb.part_begin(p->ud, pt)) : 0;
}

static int grow_headers(rr_multipart_parser_t *p) {
  size_t cap = p->hdr_cap ? p->hdr_cap * 2 : 8;
  if (cap > p->opt.max_headers)
    cap = p->opt.max_headers;
  hdr_t *h = realloc(p->hdrs, cap * sizeof *h);
  if (!h)
    return RR_ENOMEM;
  p->hdrs = h;
  rr_multipart_header_t *pub = realloc(p->pub, cap * sizeof *pub);
  if (!pub)
    return RR_ENOMEM;
  p->pub = pub;
  p->hdr_cap = cap;
  return 0;
}

/* A complete header line (with its LF) is in p->line. */
static int header_line(rr_multipart_parser_t *p) {
  char *s = p->line.data;
  size_t n = p->line.len;
  uint64_t at = p->offset - n; /* stream offset of the line */
  int rc;
  n--; /* the LF */
  if (n && s[n - 1] == '\r')
    n--;
  else if (!p->opt.allow_bare_lf)
    return fail(p, RR_EPARSE, at + n, "bare LF in part headers");
  if (n == 0)
    return headers_done(p);
  for (size_t k = 0; k < n; k++)
    if (is_ctl((unsigned char)s[k]))
      return fail(p, RR_EPARSE, at + k, "control character in part headers");
  size_t b = 0, e = n;
  if (is_ws(s[0])) { /* folded: continues the previous value */
    if (!p->nhdrs)
      return fail(p, RR_EPARSE, at, "continuation line without a header");
    while (b < e && is_ws(s[b]))
      b++;
    while (e > b && is_ws(s[e - 1]))
      e--;
    if (e == b)
      return 0;
    p->strings.len--; /* reopen the previous value */
    if (p->strings.data[p->strings.len - 1] != '\0' && (rc = rr_buf_putc(&p->strings, ' ')))
      return fail(p, rc, at, "out of memory");
    if ((rc = append_string(&p->strings, s + b, e - b)))
      return fail(p, rc, at, rc == RR_ELIMIT ? "header block over limit" : "out of memory");
    return 0;
  }
  const char *colon = memchr(s, ':', n);
  if (!colon)
    return fail(p, RR_EPARSE, at, "header line without colon");
  size_t nl = (size_t)(colon - s);
  if (!nl)
    return fail(p, RR_EPARSE, at, "bad header name");
  for (size_t k = 0; k < nl; k++)
    if (!is_token((unsigned char)s[k]))
      return fail(p, RR_EPARSE, at + k, "bad header name");
  if (p->nhdrs >= p->opt.max_headers)
    return fail(p, RR_ELIMIT, at, "too many headers");
  if (p->nhdrs == p->hdr_cap && (rc = grow_headers(p)))
    return fail(p, rc, at, "out of memory");
  b = nl + 1;
  while (b < e && is_ws(s[b]))
    b++;
  while (e > b && is_ws(s[e - 1]))
    e--;
  hdr_t *h = &p->hdrs[p->nhdrs];
  h->name = p->strings.len;
  h->line_offset = at;
  if ((rc = append_string(&p->strings, s, nl)))
    return fail(p, rc, at, rc == RR_ELIMIT ? "header block over limit" : "out of memory");
  h->value = p->strings.len;
  if ((rc = append_string(&p->strings, s + b, e - b)))
    return fail(p, rc, at, rc == RR_ELIMIT ? "header block over limit" : "out of memory");
  p->nhdrs++;
  return 0;
}

/* Header block: collects lines. Returns bytes consumed. */
static size_t read_headers(rr_multipart_parser_t *p, const char *d, size_t n, int *rc) {
  size_t i = 0;
  while (i < n && p->state == S_HEADERS) {
    const char *nl = memchr(d + i, '\n', n - i);
    size_t run = nl ? (size_t)(nl - (d + i)) + 1 : n - i;
    if (run > p->opt.max_header_block - p->block) {
      *rc = fail(p, RR_ELIMIT, p->offset + (p->opt.max_header_block - p->block),
                 "header block over limit");
      return i;
    }
    if ((*rc = rr_buf_append(&p->line, d + i, run))) {
      *rc = fail(p, *rc, p->offset, "out of memory");
      return i;
    }
    p->block += run;
    p->offset += run;
    i += run;
    if (nl) {
      *rc = header_line(p);
      rr_buf_reset(&p->line);
      if (*rc)
        return i;
    }
  }
  return i;
}

int rr_multipart_parser_feed(rr_multipart_parser_t *p, const char *data, size_t len) {
  size_t i = 0;
  int rc = 0;
  if (p->state == S_FAILED)
    return p->err.code;
  while (i < len && rc == 0) {
    switch (p->state) {
    case S_PREAMBLE:
    case S_BODY: i += scan(p, data + i, len - i, &rc); break;
    case S_HEADERS: i += read_headers(p, data + i, len - i, &rc); break;
    case S_EPILOGUE:
      p->offset += len - i;
      i = len;
      break;
    case S_FAILED: return p->err.code;
    }
  }
  return rc;
}

int rr_multipart_parser_finish(rr_multipart_parser_t *p) {
  switch (p->state) {
  case S_EPILOGUE: return 0;
  case S_FAILED: return p->err.code;
  case S_PREAMBLE: return fail(p, RR_EPARSE, p->offset, "stream ended before the first boundary");
  case S_HEADERS: return fail(p, RR_EPARSE, p->offset, "stream ended inside part headers");
  case S_BODY: break;
  }
  return fail(p, RR_EPARSE, p->offset, "stream ended inside a part");
}

/* ---- builder ----------------------------------------------------------------- */

int rr_multipart_builder_init(rr_multipart_builder_t *b, const char *boundary, const void *random,
                              size_t nrandom) {
  static const char hex[] = "0123456789abcdef";
  memset(b, 0, sizeof *b);
  if (boundary) {
    size_t n = strlen(boundary);
    if (n == 0 || n > RR_MULTIPART_BOUNDARY_RFC || boundary[n - 1] == ' ')
      return RR_EINVAL;
    for (size_t i = 0; i < n; i++)
      if (!is_bchar((unsigned char)boundary[i]) && boundary[i] != ' ')
        return RR_EINVAL;
    memcpy(b->boundary, boundary, n + 1);
    b->boundary_len = n;
    return 0;
  }
  unsigned char own[24];
  if (!random) {
    if (getentropy(own, sizeof own) != 0)
      return RR_EIO;
    random = own;
    nrandom = sizeof own;
  }
  if (nrandom < 16)
    return RR_EINVAL;
  if (nrandom > 30)
    nrandom = 30;
  const unsigned char *r = random;
  memcpy(b->boundary, "radrelay-", 9);
  size_t k = 9;
  for (size_t i = 0; i < nrandom; i++) {
    b->boundary[k++] = hex[r[i] >> 4];
    b->boundary[k++] = hex[r[i] & 15];
  }
  b->boundary[k] = '\0';
  b->boundary_len = k;
  return 0;
}

int rr_multipart_builder_content_type(const rr_multipart_builder_t *b, const char *type,
                                      rr_buf_t *out) {
  if (type)
    for (const char *s = type; *s; s++)
      if (*s == '"' || *s == '\\' || is_ctl((unsigned char)*s))
        return RR_EINVAL;
  size_t mark = out->len;
  int rc = rr_buf_puts(out, "multipart/related");
  if (!rc && type)
    rc = rr_buf_printf(out, "; type=\"%s\"", type);
  if (!rc)
    rc = rr_buf_printf(out, "; boundary=\"%s\"", b->boundary);
  if (rc && out->data) {
    out->len = mark;
    out->data[mark] = '\0';
  }
  return rc;
}

int rr_multipart_builder_begin_part(rr_multipart_builder_t *b, const rr_multipart_header_t *headers,
                                    size_t n, rr_buf_t *out) {
  if (b->in_part || b->closed)
    return RR_EINVAL;
  for (size_t i = 0; i < n; i++) {
    const char *s = headers[i].name;
    if (!*s)
      return RR_EINVAL;
    for (; *s; s++)
      if (!is_token((unsigned char)*s))
        return RR_EINVAL;
    for (s = headers[i].value; *s; s++)
      if (is_ctl((unsigned char)*s))
        return RR_EINVAL;
  }
  size_t mark = out->len;
  int rc = rr_buf_printf(out, "--%s\r\n", b->boundary);
  for (size_t i = 0; i < n && !rc; i++)
    rc = rr_buf_printf(out, "%s: %s\r\n", headers[i].name, headers[i].value);
  if (!rc)
    rc = rr_buf_puts(out, "\r\n");
  if (rc) {
    if (out->data) {
      out->len = mark;
      out->data[mark] = '\0';
    }
    return rc;
  }
  b->in_part = 1;
  b->parts++;
  return 0;
}

int rr_multipart_builder_end_part(rr_multipart_builder_t *b, rr_buf_t *out) {
  if (!b->in_part)
    return RR_EINVAL;
  int rc = rr_buf_puts(out, "\r\n");
  if (!rc)
    b->in_part = 0;
  return rc;
}

int rr_multipart_builder_close(rr_multipart_builder_t *b, rr_buf_t *out) {
  if (b->in_part || b->closed)
    return RR_EINVAL;
  int rc = rr_buf_printf(out, "--%s--\r\n", b->boundary);
  if (!rc)
    b->closed = 1;
  return rc;
}

/* HTTP server: route patterns, request target decoding, query strings. Pure. */
#include <stdlib.h>
#include <string.h>

#include "http/server_int.h"

static char *dup_str(const char *s) {
  size_t n = strlen(s);
  char *p = malloc(n + 1);
  if (p)
    memcpy(p, s, n + 1);
  return p;
}

static int is_token_char(char ch) {
  return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
         strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

void hs_route_free(hs_route_t *r) {
  if (!r)
    return;
  for (size_t i = 0; i < r->nsegs; i++)
    free(r->segs[i]);
  free(r->segs);
  free(r->is_param);
  free(r->method);
  free(r->pattern);
  free(r->content_type);
  memset(r, 0, sizeof *r);
}

static int bad_route(rr_buf_t *err, const rr_http_route_t *r, const char *why) {
  if (err)
    rr_buf_printf(err, "http route %s %s: %s", r->method ? r->method : "(null)",
                  r->pattern ? r->pattern : "(null)", why);
  return RR_EINVAL;
}

int hs_route_compile(const rr_http_route_t *r, hs_route_t *out, rr_buf_t *err) {
  memset(out, 0, sizeof *out);
  if (!r->method || !*r->method || strlen(r->method) >= 16)
    return bad_route(err, r, "method missing or too long");
  for (const char *p = r->method; *p; p++)
    if (!is_token_char(*p))
      return bad_route(err, r, "method is not an HTTP token");
  if (!r->pattern || r->pattern[0] != '/')
    return bad_route(err, r, "pattern must start with '/'");
  if (!r->handler)
    return bad_route(err, r, "no handler");
  if ((unsigned)r->min_role > RR_HTTP_ADMIN)
    return bad_route(err, r, "unknown role");
  if (r->own_auth && r->min_role != RR_HTTP_PUBLIC)
    return bad_route(err, r, "own_auth needs RR_HTTP_PUBLIC");
  int rc = RR_ENOMEM;
  size_t nsegs = 1;
  for (const char *p = r->pattern + 1; *p; p++)
    nsegs += *p == '/';
  out->segs = calloc(nsegs, sizeof *out->segs);
  out->is_param = calloc(nsegs, 1);
  out->method = dup_str(r->method);
  out->pattern = dup_str(r->pattern);
  out->content_type = r->content_type ? dup_str(r->content_type) : NULL;
  if (!out->segs || !out->is_param || !out->method || !out->pattern ||
      (r->content_type && !out->content_type))
    goto out;
  const char *p = r->pattern + 1;
  for (size_t i = 0; i < nsegs; i++) {
    const char *end = strchr(p, '/');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    int param = n >= 2 && p[0] == '{' && p[n - 1] == '}';
    if (param && n == 2) {
      rc = bad_route(err, r, "empty parameter name");
      goto out;
    }
    if (!param && (memchr(p, '{', n) || memchr(p, '}', n))) {
      rc = bad_route(err, r, "a parameter must be a whole segment");
      goto out;
    }
    if (!param && ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))) {
      rc = bad_route(err, r, "'.' and '..' segments never match");
      goto out;
    }
    const char *src = param ? p + 1 : p;
    size_t len = param ? n - 2 : n;
    out->segs[i] = malloc(len + 1);
    if (!out->segs[i])
      goto out;
    memcpy(out->segs[i], src, len);
    out->segs[i][len] = '\0';
    out->is_param[i] = (unsigned char)param;
    out->nsegs = i + 1;
    for (size_t j = 0; param && j < i; j++)
      if (out->is_param[j] && strcmp(out->segs[j], out->segs[i]) == 0) {
        rc = bad_route(err, r, "parameter named twice");
        goto out;
      }
    p = end ? end + 1 : p + n;
  }
  out->min_role = r->min_role;
  out->max_body = r->max_body;
  out->handler = r->handler;
  out->own_auth = r->own_auth;
  out->ud = r->ud;
  return 0;
out:
  if (rc == RR_ENOMEM && err)
    rr_buf_printf(err, "http route: out of memory");
  hs_route_free(out);
  return rc;
}

static int hexval(char ch) {
  if (ch >= '0' && ch <= '9')
    return ch - '0';
  if (ch >= 'a' && ch <= 'f')
    return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F')
    return ch - 'A' + 10;
  return -1;
}

int hs_pct_decode(const char *in, size_t n, int plus, rr_buf_t *out) {
  for (size_t i = 0; i < n; i++) {
    char ch = in[i];
    if (ch == '%') {
      if (i + 2 >= n)
        return RR_EPARSE;
      int hi = hexval(in[i + 1]);
      int lo = hexval(in[i + 2]);
      if (hi < 0 || lo < 0)
        return RR_EPARSE;
      ch = (char)(hi * 16 + lo);
      i += 2;
    } else if (plus && ch == '+') {
      ch = ' ';
    }
    if (ch == '\0')
      return RR_EPARSE;
    int rc = rr_buf_putc(out, ch);
    if (rc)
      return rc;
  }
  return 0;
}

static int parse_query(rr_http_req_t *req, const char *q, size_t n) {
  size_t i = 0;
  while (i < n) {
    const char *amp = memchr(q + i, '&', n - i);
    size_t end = amp ? (size_t)(amp - q) : n;
    if (end > i) {
      const char *eq = memchr(q + i, '=', end - i);
      size_t kend = eq ? (size_t)(eq - q) : end;
      int rc = hs_pct_decode(q + i, kend - i, 1, &req->query);
      if (!rc)
        rc = rr_buf_putc(&req->query, '\0');
      if (!rc && eq)
        rc = hs_pct_decode(eq + 1, end - kend - 1, 1, &req->query);
      if (!rc)
        rc = rr_buf_putc(&req->query, '\0');
      if (rc)
        return rc;
      req->nquery++;
    }
    i = end + 1;
  }
  if (!req->nquery)
    return 0;
  req->qkeys = calloc(req->nquery, sizeof *req->qkeys);
  req->qvalues = calloc(req->nquery, sizeof *req->qvalues);
  if (!req->qkeys || !req->qvalues)
    return RR_ENOMEM;
  const char *p = req->query.data;
  for (size_t k = 0; k < req->nquery; k++) {
    req->qkeys[k] = p;
    p += strlen(p) + 1;
    req->qvalues[k] = p;
    p += strlen(p) + 1;
  }
  return 0;
}

int hs_target_parse(rr_http_req_t *req) {
  const char *u = req->url.data ? req->url.data : "";
  size_t n = req->url.len;
  const char *path = u, *query = NULL;
  size_t plen = n, qlen = 0;
  if (n == 0)
    return RR_EPARSE;
  if (u[0] != '/') {
    /* absolute-form (RFC 9112 3.2.2): take its path and query */
    struct http_parser_url pu;
    http_parser_url_init(&pu);
    if (n > 65535 || http_parser_parse_url(u, n, 0, &pu) != 0 || !(pu.field_set & (1 << UF_HOST)))
      return RR_EPARSE;
    if (pu.field_set & (1 << UF_PATH)) {
      path = u + pu.field_data[UF_PATH].off;
      plen = pu.field_data[UF_PATH].len;
    } else {
      path = "/";
      plen = 1;
    }
    if (pu.field_set & (1 << UF_QUERY)) {
      query = u + pu.field_data[UF_QUERY].off;
      qlen = pu.field_data[UF_QUERY].len;
    }
  } else {
    const char *hash = memchr(u, '#', n);
    if (hash)
      n = (size_t)(hash - u);
    const char *qm = memchr(u, '?', n);
    plen = qm ? (size_t)(qm - u) : n;
    if (qm) {
      query = qm + 1;
      qlen = n - plen - 1;
    }
  }
  if (plen == 0 || path[0] != '/')
    return RR_EPARSE;
  /* Segments are split on the raw '/' and decoded one by one, so an
   * escaped %2F stays inside its segment. */
  rr_buf_t full;
  rr_buf_init(&full, plen + 1);
  int rc = 0;
  size_t i = 1;
  for (;;) {
    const char *slash = memchr(path + i, '/', plen - i);
    size_t end = slash ? (size_t)(slash - path) : plen;
    size_t start = req->segs.len;
    rc = hs_pct_decode(path + i, end - i, 0, &req->segs);
    if (rc)
      break;
    const char *seg = req->segs.data ? req->segs.data + start : "";
    size_t slen = req->segs.len - start;
    if ((slen == 1 && seg[0] == '.') || (slen == 2 && seg[0] == '.' && seg[1] == '.')) {
      rc = RR_EPARSE;
      break;
    }
    if ((rc = rr_buf_putc(&full, '/')) || (rc = rr_buf_append(&full, seg, slen)) ||
        (rc = rr_buf_putc(&req->segs, '\0')))
      break;
    req->nsegs++;
    if (!slash)
      break;
    i = end + 1;
  }
  if (!rc) {
    req->path = rr_buf_steal(&full, NULL);
    if (!req->path)
      rc = RR_ENOMEM;
  }
  rr_buf_close(&full);
  if (!rc && query)
    rc = parse_query(req, query, qlen);
  return rc;
}

int hs_route_match(const hs_route_t *r, rr_http_req_t *req) {
  if (r->nsegs != req->nsegs)
    return 0;
  const char *seg = req->segs.data;
  for (size_t i = 0; i < r->nsegs; i++, seg += strlen(seg) + 1) {
    if (r->is_param[i] ? seg[0] == '\0' : strcmp(r->segs[i], seg) != 0)
      return 0;
  }
  rr_buf_reset(&req->params);
  req->nparams = 0;
  seg = req->segs.data;
  for (size_t i = 0; i < r->nsegs; i++, seg += strlen(seg) + 1) {
    if (!r->is_param[i])
      continue;
    if (rr_buf_append(&req->params, r->segs[i], strlen(r->segs[i]) + 1) ||
        rr_buf_append(&req->params, seg, strlen(seg) + 1))
      return -1;
    req->nparams++;
  }
  return 1;
}

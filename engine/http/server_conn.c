/* HTTP server: the request state machine of one connection, without
 * sockets. Bytes come in through hs_conn_input, replies leave through the
 * connection's hs_io_t. One request of a connection is with its handler at
 * a time: the parser pauses at the end of each request and resumes once
 * that request is answered, so pipelined requests are answered in order. */
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/log.h"
#include "http/server_int.h"

enum { PAUSE_NONE = 0, PAUSE_HEAD, PAUSE_MESSAGE };

void rr_http_server_config_default(rr_http_server_config_t *c) {
  memset(c, 0, sizeof *c);
  c->name = "http";
  c->host = "127.0.0.1";
  c->max_connections = 1024;
  c->max_per_peer = 256;
  c->max_url_bytes = 8 * 1024;
  c->max_header_bytes = 16 * 1024;
  c->max_headers = 100;
  c->max_body = 1024 * 1024;
  c->max_static_bytes = 16 * 1024 * 1024;
  c->max_write_queue = 1024 * 1024;
  c->header_timeout_ms = 10000;
  c->body_timeout_ms = 30000;
  c->idle_timeout_ms = 60000;
  c->handshake_timeout_ms = 10000;
  c->drain_timeout_ms = 5000;
}

uint64_t hs_now(const rr_http_server_t *s) {
  return s->loop ? uv_now(s->loop) : s->now_ms;
}

static char *dup_str(const char *s) {
  size_t n = strlen(s);
  char *p = malloc(n + 1);
  if (p)
    memcpy(p, s, n + 1);
  return p;
}

void hs_server_free(rr_http_server_t *s) {
  if (!s)
    return;
  for (size_t i = 0; i < s->nroutes; i++)
    hs_route_free(&s->routes[i]);
  free(s->routes);
  for (size_t i = 0; i < s->nstatics; i++) {
    free(s->statics[i].prefix);
    free(s->statics[i].dir);
    free(s->statics[i].route_name);
  }
  free(s->statics);
  hs_tokens_free(&s->tokens);
  free(s->token_file);
  rr_tls_ctx_free(s->tls);
  for (size_t i = 0; i < s->ntls_strings; i++)
    free(s->tls_strings[i]);
  free(s->tls_strings);
  free((void *)s->tls_cfg.allow);
  free(s);
}

static int add_static(rr_http_server_t *s, const rr_http_static_dir_t *d, rr_buf_t *err) {
  hs_static_t *st = &s->statics[s->nstatics];
  if (!d->prefix || d->prefix[0] != '/' || !d->dir || (unsigned)d->min_role > RR_HTTP_ADMIN) {
    if (err)
      rr_buf_printf(err, "http static directory: prefix must start with '/', dir is required");
    return RR_EINVAL;
  }
  size_t n = strlen(d->prefix);
  while (n > 1 && d->prefix[n - 1] == '/')
    n--;
  st->prefix = malloc(n + 1);
  st->dir = dup_str(d->dir);
  st->route_name = malloc(n + 3);
  if (!st->prefix || !st->dir || !st->route_name) {
    free(st->prefix);
    free(st->dir);
    free(st->route_name);
    return RR_ENOMEM;
  }
  memcpy(st->prefix, d->prefix, n);
  st->prefix[n] = '\0';
  st->prefix_len = n == 1 ? 0 : n;
  if (n == 1)
    st->prefix[0] = '\0';
  snprintf(st->route_name, n + 3, "%s/*", st->prefix);
  st->min_role = d->min_role;
  s->nstatics++;
  return 0;
}

int hs_server_new(uv_loop_t *loop, const rr_http_server_config_t *cfg, rr_http_server_t **out,
                  rr_buf_t *err) {
  if (!cfg->max_connections || !cfg->max_per_peer || cfg->max_header_bytes < 256 ||
      !cfg->max_url_bytes || !cfg->max_headers || !cfg->max_write_queue) {
    if (err)
      rr_buf_printf(err, "http server: limits must be positive (start from "
                         "rr_http_server_config_default)");
    return RR_EINVAL;
  }
  rr_http_server_t *s = calloc(1, sizeof *s);
  if (!s)
    return RR_ENOMEM;
  int rc = RR_ENOMEM;
  s->loop = loop;
  s->cfg = *cfg;
  snprintf(s->name, sizeof s->name, "%s", cfg->name ? cfg->name : "http");
  s->cfg.name = s->name;
  s->cfg.host = NULL;
  s->cfg.tls = NULL;
  s->cfg.token_file = NULL;
  s->cfg.routes = NULL;
  s->cfg.statics = NULL;
  if (cfg->nroutes && !(s->routes = calloc(cfg->nroutes, sizeof *s->routes)))
    goto out;
  for (size_t i = 0; i < cfg->nroutes; i++) {
    if ((rc = hs_route_compile(&cfg->routes[i], &s->routes[i], err)) != 0)
      goto out;
    s->nroutes++;
  }
  rc = RR_ENOMEM;
  if (cfg->nstatics && !(s->statics = calloc(cfg->nstatics, sizeof *s->statics)))
    goto out;
  for (size_t i = 0; i < cfg->nstatics; i++)
    if ((rc = add_static(s, &cfg->statics[i], err)) != 0)
      goto out;
  *out = s;
  return 0;
out:
  hs_server_free(s);
  return rc;
}

/* ---- connections ---------------------------------------------------- */

hs_conn_t *hs_conn_new(rr_http_server_t *s, const hs_io_t *io, void *io_ud) {
  hs_conn_t *c = calloc(1, sizeof *c);
  if (!c)
    return NULL;
  c->s = s;
  c->io = io;
  c->io_ud = io_ud;
  c->refs = 1;
  c->id = ++s->next_id;
  snprintf(c->name, sizeof c->name, "%s", s->name);
  snprintf(c->peer, sizeof c->peer, "-");
  size_t in_high = s->cfg.max_header_bytes > 16384 ? s->cfg.max_header_bytes : 16384;
  rr_buf_init(&c->in, in_high + 256 * 1024);
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  c->accepted_ms = c->last_activity_ms = hs_now(s);
  c->next = s->conns;
  if (s->conns)
    s->conns->prev = c;
  s->conns = c;
  s->nconns++;
  return c;
}

void hs_conn_hold(hs_conn_t *c) {
  c->refs++;
}

static void req_free(rr_http_req_t *req);

void hs_conn_release(hs_conn_t *c) {
  if (--c->refs)
    return;
  rr_buf_close(&c->in);
  rr_tls_conn_free(c->tls);
  free(c);
}

void hs_conn_closed(hs_conn_t *c) {
  c->gone = 1;
  rr_http_server_t *s = c->s;
  if (s) {
    if (c->prev)
      c->prev->next = c->next;
    else
      s->conns = c->next;
    if (c->next)
      c->next->prev = c->prev;
    s->nconns--;
    if (c->over_capacity && s->noverflow)
      s->noverflow--;
    c->prev = c->next = NULL;
    if (c->kicked) {
      for (hs_conn_t **pp = &s->kick_head; *pp; pp = &(*pp)->kick_next)
        if (*pp == c) {
          *pp = c->kick_next;
          c->kicked = 0;
          hs_conn_release(c);
          break;
        }
    }
    c->s = NULL;
  }
  if (c->req) {
    rr_http_req_t *req = c->req;
    c->req = NULL;
    req_free(req); /* may drop the last reference but one: the caller's */
  }
}

int hs_conn_idle(const hs_conn_t *c) {
  return !c->req && !c->active && c->in.len == c->in_off;
}

int hs_conn_wants_input(const hs_conn_t *c) {
  if (c->gone || c->finishing || c->eof || c->wait_write || !c->s)
    return 0;
  size_t in_high = c->s->cfg.max_header_bytes > 16384 ? c->s->cfg.max_header_bytes : 16384;
  return c->in.len - c->in_off < in_high;
}

/* ---- requests ------------------------------------------------------- */

static rr_http_req_t *req_new(hs_conn_t *c) {
  rr_http_req_t *req = calloc(1, sizeof *req);
  if (!req)
    return NULL;
  req->c = c;
  hs_conn_hold(c);
  rr_buf_init(&req->url, c->s->cfg.max_url_bytes);
  rr_buf_init(&req->hdrs, c->s->cfg.max_header_bytes);
  rr_buf_init(&req->segs, c->s->cfg.max_url_bytes + 1);
  rr_buf_init(&req->params, c->s->cfg.max_url_bytes + 256);
  rr_buf_init(&req->query, c->s->cfg.max_url_bytes + 1);
  rr_buf_init(&req->body, c->s->cfg.max_body);
  req->principal.name = "-";
  req->principal.role = RR_HTTP_PUBLIC;
  req->start_ms = hs_now(c->s);
  return req;
}

static void req_free(rr_http_req_t *req) {
  if (!req)
    return;
  hs_conn_t *c = req->c;
  rr_buf_close(&req->url);
  rr_buf_close(&req->hdrs);
  rr_buf_close(&req->segs);
  rr_buf_close(&req->params);
  rr_buf_close(&req->query);
  rr_buf_close(&req->body);
  free(req->hnames);
  free(req->hvalues);
  free(req->qkeys);
  free(req->qvalues);
  free(req->path);
  free(req->route_name);
  free(req);
  hs_conn_release(c);
}

static int set_cb_error(hs_conn_t *c, int status, const char *code, const char *msg) {
  c->cb_status = status;
  c->cb_code = code;
  c->cb_msg = msg;
  return -1;
}

static int on_message_begin(http_parser *p) {
  hs_conn_t *c = p->data;
  if (c->req)
    return set_cb_error(c, 500, "internal_error", "The server lost track of the request.");
  c->req = req_new(c);
  if (!c->req)
    return set_cb_error(c, 500, "internal_error", "The server is out of memory.");
  c->head_started_ms = hs_now(c->s);
  c->nreq++;
  return 0;
}

static int on_url(http_parser *p, const char *at, size_t len) {
  hs_conn_t *c = p->data;
  if (!c->req->method[0])
    snprintf(c->req->method, sizeof c->req->method, "%s",
             http_method_str((enum http_method)p->method));
  int rc = rr_buf_append(&c->req->url, at, len);
  if (rc == RR_ELIMIT)
    return set_cb_error(c, 414, "uri_too_long", "The request target is longer than allowed.");
  if (rc)
    return set_cb_error(c, 500, "internal_error", "The server is out of memory.");
  return 0;
}

static int hdr_error(hs_conn_t *c, int rc) {
  if (rc == RR_ELIMIT)
    return set_cb_error(c, 431, "headers_too_large",
                        "The request header block is larger than allowed.");
  return set_cb_error(c, 500, "internal_error", "The server is out of memory.");
}

/* Trailer fields of a chunked body (after the last chunk) are dropped: the
 * handler sees the header block as it came before the body, and the header
 * buffer it reads from must not move under it. */
static int on_header_field(http_parser *p, const char *at, size_t len) {
  hs_conn_t *c = p->data;
  rr_http_req_t *req = c->req;
  int rc = 0;
  if (req->headers_done)
    return 0;
  if (req->hdr_state == 2) {
    if ((rc = rr_buf_putc(&req->hdrs, '\0')) != 0)
      return hdr_error(c, rc);
    req->nheaders++;
  }
  if (req->hdr_state != 1 && req->nheaders >= c->s->cfg.max_headers)
    return set_cb_error(c, 431, "headers_too_large",
                        "The request has more header fields than allowed.");
  req->hdr_state = 1;
  if ((rc = rr_buf_append(&req->hdrs, at, len)) != 0)
    return hdr_error(c, rc);
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
  hs_conn_t *c = p->data;
  rr_http_req_t *req = c->req;
  int rc = 0;
  if (req->headers_done)
    return 0;
  if (req->hdr_state == 1 && (rc = rr_buf_putc(&req->hdrs, '\0')) != 0)
    return hdr_error(c, rc);
  req->hdr_state = 2;
  if ((rc = rr_buf_append(&req->hdrs, at, len)) != 0)
    return hdr_error(c, rc);
  return 0;
}

static int on_headers_complete(http_parser *p) {
  hs_conn_t *c = p->data;
  rr_http_req_t *req = c->req;
  if (req->hdr_state == 2) {
    int rc = rr_buf_putc(&req->hdrs, '\0');
    if (rc)
      return hdr_error(c, rc);
    req->nheaders++;
    req->hdr_state = 0;
  }
  req->headers_done = 1;
  req->http_major = p->http_major;
  req->http_minor = p->http_minor;
  req->keep_alive = p->http_major == 1 && p->http_minor >= 1 && http_should_keep_alive(p);
  req->has_body =
      (p->flags & F_CHUNKED) || (p->content_length > 0 && p->content_length != ULLONG_MAX);
  snprintf(req->method, sizeof req->method, "%s", http_method_str((enum http_method)p->method));
  req->is_head = p->method == HTTP_HEAD;
  c->pause = PAUSE_HEAD;
  http_parser_pause(p, 1);
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
  hs_conn_t *c = p->data;
  c->last_body_ms = hs_now(c->s);
  int rc = rr_buf_append(&c->req->body, at, len);
  if (rc == RR_ELIMIT)
    return set_cb_error(c, 413, "payload_too_large", "The request body is larger than allowed.");
  if (rc)
    return set_cb_error(c, 500, "internal_error", "The server is out of memory.");
  return 0;
}

static int on_message_complete(http_parser *p) {
  hs_conn_t *c = p->data;
  c->pause = PAUSE_MESSAGE;
  http_parser_pause(p, 1);
  return 0;
}

static const http_parser_settings parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- checks after the header block ---------------------------------- */

static int ci_eq(const char *a, const char *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (tolower((unsigned char)a[i]) != tolower((unsigned char)b[i]))
      return 0;
  return 1;
}

static int build_header_index(rr_http_req_t *req) {
  if (!req->nheaders)
    return 0;
  req->hnames = calloc(req->nheaders, sizeof *req->hnames);
  req->hvalues = calloc(req->nheaders, sizeof *req->hvalues);
  if (!req->hnames || !req->hvalues)
    return RR_ENOMEM;
  char *p = req->hdrs.data;
  for (size_t i = 0; i < req->nheaders; i++) {
    req->hnames[i] = p;
    p += strlen(p) + 1;
    char *v = p;
    size_t n = strlen(v);
    p += n + 1;
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
      v[--n] = '\0';
    while (*v == ' ' || *v == '\t')
      v++;
    req->hvalues[i] = v;
  }
  return 0;
}

const char *rr_http_req_header(const rr_http_req_t *req, const char *name) {
  size_t n = strlen(name);
  for (size_t i = 0; i < req->nheaders; i++)
    if (strlen(req->hnames[i]) == n && ci_eq(req->hnames[i], name, n))
      return req->hvalues[i];
  return NULL;
}

/* The early error of a request whose header block is in: answered now
 * (closing) when a body would follow or close is set, else at its end. */
static void early_error(hs_conn_t *c, int status, const char *code, const char *msg, int close) {
  rr_http_req_t *req = c->req;
  if (close || req->has_body) {
    c->req = NULL;
    c->active = req;
    req->close_after = 1;
    hs_reply_error(req, status, code, msg, NULL);
    return;
  }
  req->err_status = status;
  req->err_code = code;
  req->err_msg = msg;
}

static int method_matches(const hs_route_t *r, const rr_http_req_t *req) {
  return strcmp(r->method, req->method) == 0 || (req->is_head && strcmp(r->method, "GET") == 0);
}

static void allow_add(rr_http_req_t *req, const char *m) {
  size_t n = strlen(req->allow_buf), ml = strlen(m);
  /* already listed? */
  for (const char *p = req->allow_buf; (p = strstr(p, m)) != NULL; p += ml)
    if ((p == req->allow_buf || p[-1] == ' ') && (p[ml] == ',' || p[ml] == '\0'))
      return;
  if (n + ml + 3 >= sizeof req->allow_buf)
    return;
  snprintf(req->allow_buf + n, sizeof req->allow_buf - n, "%s%s", n ? ", " : "", m);
}

static int static_matches(const hs_static_t *st, const rr_http_req_t *req) {
  if (st->prefix_len == 0)
    return 1;
  /* compare the decoded path's leading segments with the prefix's */
  const char *pre = st->prefix + 1; /* after the leading '/' */
  const char *seg = req->segs.data;
  size_t left = req->nsegs;
  while (*pre) {
    const char *slash = strchr(pre, '/');
    size_t n = slash ? (size_t)(slash - pre) : strlen(pre);
    if (!left || strlen(seg) != n || memcmp(seg, pre, n) != 0)
      return 0;
    seg += n + 1;
    left--;
    pre += n + (slash ? 1 : 0);
  }
  return 1;
}

static int find_route(hs_conn_t *c, rr_http_req_t *req) {
  rr_http_server_t *s = c->s;
  int path_known = 0;
  for (int pass = 0; pass < 2 && !req->route; pass++) {
    for (size_t i = 0; i < s->nroutes; i++) {
      const hs_route_t *r = &s->routes[i];
      if (pass == 0 ? strcmp(r->method, req->method) != 0 : !method_matches(r, req))
        continue;
      int m = hs_route_match(r, req);
      if (m < 0)
        return RR_ENOMEM;
      if (m) {
        req->route = r;
        break;
      }
    }
  }
  if (req->route)
    return 0;
  for (size_t i = 0; i < s->nroutes; i++) {
    const hs_route_t *r = &s->routes[i];
    int m = hs_route_match(r, req);
    if (m < 0)
      return RR_ENOMEM;
    if (m) {
      path_known = 1;
      allow_add(req, r->method);
      if (strcmp(r->method, "GET") == 0)
        allow_add(req, "HEAD");
    }
  }
  rr_buf_reset(&req->params);
  req->nparams = 0;
  if (path_known)
    return RR_EINVAL; /* 405 */
  for (size_t i = 0; i < s->nstatics; i++) {
    if (!static_matches(&s->statics[i], req))
      continue;
    if (strcmp(req->method, "GET") != 0 && !req->is_head) {
      snprintf(req->allow_buf, sizeof req->allow_buf, "GET, HEAD");
      return RR_EINVAL;
    }
    req->statik = &s->statics[i];
    return 0;
  }
  return RR_ENOTFOUND;
}

/* 0: authenticated well enough; else the status (401, 403). */
static int authenticate(hs_conn_t *c, rr_http_req_t *req, rr_http_role_t need) {
  const char *auth = rr_http_req_header(req, "authorization");
  if (!auth)
    return need > RR_HTTP_PUBLIC ? 401 : 0;
  if (strlen(auth) < 7 || !ci_eq(auth, "bearer ", 7))
    return 401;
  const char *tok = auth + 7;
  while (*tok == ' ')
    tok++;
  size_t n = strlen(tok);
  if (n == 0 || n > 4096)
    return 401;
  const hs_token_t *t = hs_tokens_find(&c->s->tokens, tok, n);
  if (!t)
    return 401;
  snprintf(req->principal_name, sizeof req->principal_name, "%s", t->name);
  req->principal.name = req->principal_name;
  req->principal.role = t->role;
  return t->role >= need ? 0 : 403;
}

static int media_type_is(const char *value, const char *want) {
  if (!value)
    return 0;
  size_t n = strcspn(value, ";");
  while (n && (value[n - 1] == ' ' || value[n - 1] == '\t'))
    n--;
  return n == strlen(want) && ci_eq(value, want, n);
}

static void head_done(hs_conn_t *c) {
  rr_http_server_t *s = c->s;
  rr_http_req_t *req = c->req;
  if (build_header_index(req)) {
    early_error(c, 500, "internal_error", "The server is out of memory.", 1);
    return;
  }
  rr_log(RR_LOG_DEBUG, "http", "event=request_target server=%s conn=%llu method=%s target=\"%s\"",
         c->name, (unsigned long long)c->id, req->method, req->url.data ? req->url.data : "");
  if (c->over_capacity) {
    early_error(c, 503, "over_capacity", "The server is at its connection limit; try again later.",
                1);
    return;
  }
  if (req->http_major != 1) {
    early_error(c, 400, "bad_request", "Only HTTP/1.0 and HTTP/1.1 are supported.", 1);
    return;
  }
  int rc = hs_target_parse(req);
  if (rc == RR_ENOMEM) {
    early_error(c, 500, "internal_error", "The server is out of memory.", 1);
    return;
  }
  if (rc) {
    early_error(c, 400, "bad_request", "The request target is not a valid path.", 1);
    return;
  }
  rc = find_route(c, req);
  if (rc == RR_ENOMEM) {
    early_error(c, 500, "internal_error", "The server is out of memory.", 1);
    return;
  }
  if (rc == RR_EINVAL) {
    req->allow = req->allow_buf;
    early_error(c, 405, "method_not_allowed", "This path does not support the request method.", 0);
    return;
  }
  if (rc) {
    early_error(c, 404, "not_found", "No resource matches the request path.", 0);
    return;
  }
  const char *pattern = req->route ? req->route->pattern : req->statik->route_name;
  if (!(req->route_name = dup_str(pattern))) {
    early_error(c, 500, "internal_error", "The server is out of memory.", 1);
    return;
  }
  rr_http_role_t need = req->route ? req->route->min_role : req->statik->min_role;
  int auth = req->route && req->route->own_auth ? 0 : authenticate(c, req, need);
  if (auth == 401) {
    early_error(c, 401, "unauthorized", "A valid bearer token is required.", 0);
    return;
  }
  if (auth == 403) {
    early_error(c, 403, "forbidden", "The token's role may not use this resource.", 0);
    return;
  }
  const char *expect = rr_http_req_header(req, "expect");
  int cont = 0;
  if (expect) {
    if (strlen(expect) != 12 || !ci_eq(expect, "100-continue", 12)) {
      early_error(c, 417, "expectation_failed", "Only \"Expect: 100-continue\" is supported.", 0);
      return;
    }
    cont = req->has_body && req->http_minor >= 1;
  }
  if (req->route && req->route->content_type) {
    if (!(c->parser.flags & (F_CHUNKED | F_CONTENTLENGTH))) {
      early_error(c, 411, "length_required",
                  "The request needs a Content-Length or a chunked body.", 0);
      return;
    }
    if (!media_type_is(rr_http_req_header(req, "content-type"), req->route->content_type)) {
      early_error(c, 415, "unsupported_media_type",
                  "The request body does not have the content type this resource takes.", 0);
      return;
    }
  }
  size_t max = req->route && req->route->max_body ? req->route->max_body : s->cfg.max_body;
  req->body.limit = max;
  if ((c->parser.flags & F_CONTENTLENGTH) && c->parser.content_length > max) {
    early_error(c, 413, "payload_too_large", "The request body is larger than allowed.", 1);
    return;
  }
  if (cont) {
    static const char k100[] = "HTTP/1.1 100 Continue\r\n\r\n";
    s->st.bytes_out += sizeof k100 - 1;
    c->io->send(c, k100, sizeof k100 - 1);
  }
}

static void message_done(hs_conn_t *c) {
  rr_http_req_t *req = c->req;
  c->req = NULL;
  c->head_bytes = 0;
  c->head_started_ms = 0;
  c->last_body_ms = 0;
  c->active = req;
  if (req->err_status) {
    if (req->allow)
      req->allow = req->allow_buf;
    hs_reply_error(req, req->err_status, req->err_code, req->err_msg, NULL);
  } else if (req->statik) {
    hs_static_serve(req, req->statik);
  } else {
    req->route->handler(req->route->ud, req);
  }
}

/* The parser stopped on an error: answer 400 (or what a callback chose)
 * and close. */
static void protocol_error(hs_conn_t *c, enum http_errno e) {
  int status = c->cb_status ? c->cb_status : 400;
  const char *code = c->cb_code ? c->cb_code : "bad_request";
  const char *msg = c->cb_msg ? c->cb_msg : "The request is not valid HTTP/1.1.";
  if (!c->cb_status && e == HPE_HEADER_OVERFLOW) {
    status = 431;
    code = "headers_too_large";
    msg = "The request header block is larger than allowed.";
  }
  rr_http_req_t *req = c->req;
  if (!req) {
    req = req_new(c);
    if (!req) {
      c->finishing = 1;
      c->io->finish(c);
      return;
    }
    snprintf(req->method, sizeof req->method, "-");
  }
  c->req = NULL;
  c->active = req;
  req->close_after = 1;
  hs_reply_error(req, status, code, msg, NULL);
}

/* Over the header budget without the end of the header block. */
static void head_too_large(hs_conn_t *c) {
  int in_url = c->req && c->req->nheaders == 0 && c->req->hdr_state == 0;
  c->cb_status = in_url ? 414 : 431;
  c->cb_code = in_url ? "uri_too_long" : "headers_too_large";
  c->cb_msg = in_url ? "The request target is longer than allowed."
                     : "The request header block is larger than allowed.";
  protocol_error(c, HPE_HEADER_OVERFLOW);
}

static void kick(hs_conn_t *c);

void hs_conn_process(hs_conn_t *c) {
  if (c->processing || c->gone)
    return;
  c->processing = 1;
  hs_conn_hold(c);
  rr_http_server_t *s = c->s;
  while (!c->gone && !c->finishing && !c->active && c->s) {
    if (c->io->queued(c) > s->cfg.max_write_queue) {
      c->wait_write = 1;
      break;
    }
    size_t avail = c->in.len - c->in_off;
    if (avail == 0)
      break;
    int head = !c->req || !c->req->headers_done;
    size_t n = avail;
    if (head && n > s->cfg.max_header_bytes - c->head_bytes + 1)
      n = s->cfg.max_header_bytes - c->head_bytes + 1;
    c->pause = PAUSE_NONE;
    size_t used = http_parser_execute(&c->parser, &parser_settings, c->in.data + c->in_off, n);
    c->in_off += used;
    if (head)
      c->head_bytes += used;
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (e == HPE_PAUSED) {
      http_parser_pause(&c->parser, 0);
      if (c->pause == PAUSE_HEAD)
        head_done(c);
      else if (c->pause == PAUSE_MESSAGE)
        message_done(c);
      continue;
    }
    if (e != HPE_OK) {
      protocol_error(c, e);
      break;
    }
    if (head && c->head_bytes > s->cfg.max_header_bytes && (!c->req || !c->req->headers_done)) {
      head_too_large(c);
      break;
    }
    if (used < n) {
      protocol_error(c, HPE_UNKNOWN);
      break;
    }
  }
  if (c->in_off == c->in.len) {
    rr_buf_reset(&c->in);
    c->in_off = 0;
  } else if (c->in_off > 4096 && c->in_off * 2 > c->in.len) {
    memmove(c->in.data, c->in.data + c->in_off, c->in.len - c->in_off);
    c->in.len -= c->in_off;
    c->in_off = 0;
  }
  c->processing = 0;
  if (c->eof && !c->active && !c->finishing && !c->gone && !c->wait_write) {
    c->finishing = 1;
    c->io->finish(c);
  }
  if (!c->gone)
    c->io->update(c);
  hs_conn_release(c);
}

int hs_conn_input(hs_conn_t *c, const char *data, size_t len) {
  if (c->gone || c->finishing || c->eof)
    return 0;
  if (c->s) {
    c->s->st.bytes_in += len;
    c->last_activity_ms = hs_now(c->s);
  }
  int rc = rr_buf_append(&c->in, data, len);
  if (rc)
    return rc;
  hs_conn_process(c);
  return 0;
}

void hs_conn_eof(hs_conn_t *c) {
  c->eof = 1;
  if (!c->processing)
    hs_conn_process(c);
}

void hs_conn_written(hs_conn_t *c) {
  if (!c->wait_write || !c->s || c->gone)
    return;
  if (c->io->queued(c) <= c->s->cfg.max_write_queue / 2) {
    c->wait_write = 0;
    kick(c);
  }
}

static void timeout_reply(hs_conn_t *c) {
  rr_http_req_t *req = c->req;
  c->req = NULL;
  c->active = req;
  req->close_after = 1;
  c->s->st.timeouts++;
  hs_reply_error(req, 408, "request_timeout", "The request did not arrive in time.", NULL);
}

int hs_conn_tick(hs_conn_t *c, uint64_t now) {
  rr_http_server_t *s = c->s;
  if (!s || c->gone || c->finishing || c->active || c->processing)
    return 0;
  if (c->req && !c->req->headers_done) {
    if (s->cfg.header_timeout_ms && now - c->head_started_ms > s->cfg.header_timeout_ms)
      timeout_reply(c);
    return 0;
  }
  if (c->req) {
    uint64_t since = c->last_body_ms ? c->last_body_ms : c->head_started_ms;
    if (s->cfg.body_timeout_ms && now - since > s->cfg.body_timeout_ms)
      timeout_reply(c);
    return 0;
  }
  if (c->in.len != c->in_off || c->wait_write)
    return 0;
  /* A connection that never sent a request gets the header timeout. */
  uint64_t limit = s->cfg.idle_timeout_ms;
  if (c->nreq == 0 && s->cfg.header_timeout_ms && (!limit || s->cfg.header_timeout_ms < limit))
    limit = s->cfg.header_timeout_ms;
  if (limit && now - c->last_activity_ms > limit) {
    s->st.timeouts++;
    return 1;
  }
  return 0;
}

/* ---- the kick list: connections to process from the loop ------------ */

static void kick(hs_conn_t *c) {
  rr_http_server_t *s = c->s;
  if (!s || c->kicked || c->gone)
    return;
  c->kicked = 1;
  hs_conn_hold(c);
  c->kick_next = s->kick_head;
  s->kick_head = c;
  if (s->on_kick)
    s->on_kick(s);
}

void hs_server_kick(rr_http_server_t *s) {
  hs_conn_t *list = s->kick_head;
  s->kick_head = NULL;
  while (list) {
    hs_conn_t *c = list;
    list = c->kick_next;
    c->kick_next = NULL;
    c->kicked = 0;
    hs_conn_process(c);
    hs_conn_release(c);
  }
}

/* ---- replies -------------------------------------------------------- */

static const char *http_date(const rr_http_server_t *s) {
  static _Thread_local char buf[40];
  static _Thread_local time_t last;
  if (s && s->fixed_date)
    return s->fixed_date;
  time_t now = time(NULL);
  if (now != last) {
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    last = now;
  }
  return buf;
}

static int header_line_ok(const char *h) {
  const char *colon = strchr(h, ':');
  if (!colon || colon == h || strpbrk(h, "\r\n"))
    return 0;
  for (const char *p = h; p < colon; p++)
    if (!isalnum((unsigned char)*p) && !strchr("!#$%&'*+-.^_`|~", *p))
      return 0;
  size_t n = (size_t)(colon - h);
  static const char *const banned[] = {"content-length", "transfer-encoding", "connection"};
  for (size_t i = 0; i < 3; i++)
    if (strlen(banned[i]) == n && ci_eq(h, banned[i], n))
      return 0;
  return 1;
}

static void access_log(hs_conn_t *c, rr_http_req_t *req, int status, size_t bytes) {
  rr_http_server_t *s = c->s;
  uint64_t ms = s ? hs_now(s) - req->start_ms : 0;
  rr_log(RR_LOG_INFO, "http",
         "event=request server=%s conn=%llu method=%s route=\"%s\" status=%d bytes=%zu ms=%llu "
         "principal=%s peer=%s",
         c->name, (unsigned long long)c->id, req->method[0] ? req->method : "-",
         req->route_name ? req->route_name : "-", status, bytes, (unsigned long long)ms,
         req->principal.name, c->peer);
}

/* Status line, headers and body of one reply. */
static int serialize(hs_conn_t *c, rr_http_req_t *req, int status, const char *const *headers,
                     size_t nheaders, const char *content_type, const void *body, size_t len,
                     int close, rr_buf_t *out) {
  const char *reason = http_status_str((enum http_status)status);
  int no_body = status == 204 || status == 304;
  int rc = rr_buf_printf(out, "HTTP/1.1 %d %s\r\nDate: %s\r\n", status,
                         strcmp(reason, "<unknown>") ? reason : "Status", http_date(c->s));
  if (!rc && content_type && !no_body)
    rc = rr_buf_printf(out, "Content-Type: %s\r\n", content_type);
  if (!rc && !no_body)
    rc = rr_buf_printf(out, "Content-Length: %zu\r\n", len);
  for (size_t i = 0; i < nheaders && !rc; i++)
    rc = rr_buf_printf(out, "%s\r\n", headers[i]);
  if (!rc && close)
    rc = rr_buf_puts(out, "Connection: close\r\n");
  if (!rc)
    rc = rr_buf_puts(out, "\r\n");
  if (!rc && !no_body && !req->is_head && len)
    rc = rr_buf_append(out, body, len);
  return rc;
}

int rr_http_reply_ex(rr_http_req_t *req, int status, const char *const *headers, size_t nheaders,
                     const char *content_type, const void *body, size_t len) {
  hs_conn_t *c = req->c;
  int rc = 0;
  hs_conn_hold(c);
  if (c->active == req)
    c->active = NULL;
  int close = 0;
  if (c->gone || c->finishing || !c->s) {
    rc = UV_ECANCELED;
    if (c->s)
      c->s->st.status[0]++;
  } else {
    rr_http_server_t *s = c->s;
    int bad = status < 200 || status > 599 || (len && !body) || (nheaders && !headers);
    for (size_t i = 0; i < nheaders && !bad; i++)
      bad = !headers[i] || !header_line_ok(headers[i]);
    if (content_type && strpbrk(content_type, "\r\n"))
      bad = 1;
    close = req->close_after || !req->keep_alive || s->stopping;
    rr_buf_t out;
    rr_buf_init(&out, (size_t)1 << 31);
    int ser;
    if (bad) {
      static const char k500[] =
          "{\"error\":\"internal_error\",\"message\":\"The server built an invalid reply.\"}";
      status = 500;
      ser = serialize(c, req, 500, NULL, 0, "application/json", k500, sizeof k500 - 1, close, &out);
      len = sizeof k500 - 1;
      rc = RR_EINVAL;
    } else {
      if (len && !content_type)
        content_type = "application/octet-stream";
      ser = serialize(c, req, status, headers, nheaders, content_type, body, len, close, &out);
    }
    if (ser) {
      rc = ser;
      close = 1;
      status = 500;
      s->st.status[0]++;
      c->finishing = 1;
      c->io->finish(c);
    } else {
      s->st.requests++;
      s->st.status[status / 100]++;
      s->st.bytes_out += out.len;
      access_log(c, req, status, req->is_head ? 0 : len);
      int src = c->io->send(c, out.data, out.len);
      if (src && !rc)
        rc = src;
    }
    rr_buf_close(&out);
  }
  req_free(req);
  if (!c->gone && !c->finishing) {
    if (close) {
      c->finishing = 1;
      c->io->finish(c);
    } else if (!c->processing) {
      kick(c);
    }
  }
  hs_conn_release(c);
  return rc;
}

int rr_http_reply(rr_http_req_t *req, int status, const char *content_type, const void *body,
                  size_t len) {
  return rr_http_reply_ex(req, status, NULL, 0, content_type, body, len);
}

int rr_http_reply_json(rr_http_req_t *req, int status, json_t *json) {
  char *text = json ? json_dumps(json, JSON_COMPACT) : NULL;
  json_decref(json);
  if (!text)
    return hs_reply_error(req, 500, "internal_error", "The server could not build its reply.",
                          NULL);
  int rc = rr_http_reply(req, status, "application/json", text, strlen(text));
  free(text);
  return rc;
}

int hs_reply_error(rr_http_req_t *req, int status, const char *code, const char *msg,
                   const char *extra) {
  json_t *j = json_pack("{s:s, s:s}", "error", code ? code : "error", "message", msg ? msg : "");
  char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
  json_decref(j);
  const char *h[3];
  size_t nh = 0;
  char allow[128];
  if (status == 405 && req->allow) {
    snprintf(allow, sizeof allow, "Allow: %s", req->allow);
    h[nh++] = allow;
  }
  if (status == 401)
    h[nh++] = "WWW-Authenticate: Bearer";
  if (status == 503)
    h[nh++] = "Retry-After: 1";
  if (extra && nh < 3)
    h[nh++] = extra;
  static const char fallback[] = "{\"error\":\"internal_error\",\"message\":\"Out of memory.\"}";
  int rc =
      text ? rr_http_reply_ex(req, status, h, nh, "application/json", text, strlen(text))
           : rr_http_reply_ex(req, 500, NULL, 0, "application/json", fallback, sizeof fallback - 1);
  free(text);
  return rc;
}

int rr_http_reply_error(rr_http_req_t *req, int status, const char *code, const char *message) {
  return hs_reply_error(req, status, code, message, NULL);
}

/* ---- accessors ------------------------------------------------------ */

const char *rr_http_req_method(const rr_http_req_t *req) {
  return req->method;
}
const char *rr_http_req_route(const rr_http_req_t *req) {
  return req->route_name ? req->route_name : "-";
}
const char *rr_http_req_path(const rr_http_req_t *req) {
  return req->path ? req->path : "";
}
const char *rr_http_req_param(const rr_http_req_t *req, const char *name) {
  const char *p = req->params.data;
  for (size_t i = 0; i < req->nparams; i++) {
    const char *v = p + strlen(p) + 1;
    if (strcmp(p, name) == 0)
      return v;
    p = v + strlen(v) + 1;
  }
  return NULL;
}
const char *rr_http_req_query(const rr_http_req_t *req, const char *key) {
  for (size_t i = 0; i < req->nquery; i++)
    if (strcmp(req->qkeys[i], key) == 0)
      return req->qvalues[i];
  return NULL;
}
size_t rr_http_req_query_count(const rr_http_req_t *req) {
  return req->nquery;
}
void rr_http_req_query_at(const rr_http_req_t *req, size_t i, const char **key,
                          const char **value) {
  *key = i < req->nquery ? req->qkeys[i] : NULL;
  *value = i < req->nquery ? req->qvalues[i] : NULL;
}
const char *rr_http_req_body(const rr_http_req_t *req, size_t *len) {
  if (len)
    *len = req->body.len;
  return req->body.data ? req->body.data : "";
}
const rr_http_principal_t *rr_http_req_principal(const rr_http_req_t *req) {
  return &req->principal;
}
const char *rr_http_req_peer(const rr_http_req_t *req) {
  return req->c->peer;
}
const char *rr_http_req_tls_identity(const rr_http_req_t *req) {
  return req->c->tls ? rr_tls_peer_identity(req->c->tls) : "";
}
int rr_http_req_gone(const rr_http_req_t *req) {
  return req->c->gone || req->c->finishing;
}

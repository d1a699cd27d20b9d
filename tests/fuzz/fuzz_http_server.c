/* libFuzzer target for the HTTP server's request processing (parser,
 * limits, routing, authentication, replies, pipelining), driven without
 * sockets through the connection state machine. Input: byte 0 picks
 * options (bit 0: the client goes away before the last parked request is
 * answered; bits 1-7 seed the chunk sizes), the rest is what the client
 * sends. The bytes sent back must not depend on how the input is split,
 * and every reply starts with a status line. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "http/server_int.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct sink {
  rr_buf_t out;
  size_t last_send; /* where the last send began: the last reply's start */
  int finished;
} sink_t;

static int m_send(hs_conn_t *c, const char *d, size_t n) {
  sink_t *k = c->io_ud;
  if (k->finished)
    abort(); /* nothing may be sent after the last reply */
  k->last_send = k->out.len;
  return rr_buf_append(&k->out, d, n);
}
static size_t m_queued(hs_conn_t *c) {
  (void)c;
  return 0;
}
static void m_finish(hs_conn_t *c) {
  ((sink_t *)c->io_ud)->finished = 1;
}
static void m_update(hs_conn_t *c) {
  (void)c;
}
static const hs_io_t mem_io = {m_send, m_queued, m_finish, m_update};

static rr_http_req_t *parked[8];
static size_t nparked;

static void h_echo(void *ud, rr_http_req_t *req) {
  (void)ud;
  size_t len;
  const char *body = rr_http_req_body(req, &len);
  json_t *q = json_object();
  for (size_t i = 0; i < rr_http_req_query_count(req); i++) {
    const char *k, *v;
    rr_http_req_query_at(req, i, &k, &v);
    json_object_set_new(q, k, json_string(v));
  }
  const char *id = rr_http_req_param(req, "id");
  const char *ct = rr_http_req_header(req, "content-type");
  rr_http_reply_json(req, 200,
                     json_pack("{s:s, s:s, s:s?, s:o, s:s%, s:s?, s:s}", "route",
                               rr_http_req_route(req), "path", rr_http_req_path(req), "id", id, "q",
                               q, "body", body, len, "ct", ct, "who",
                               rr_http_req_principal(req)->name));
}

static void h_park(void *ud, rr_http_req_t *req) {
  (void)ud;
  if (nparked < 8)
    parked[nparked++] = req;
  else
    rr_http_reply_error(req, 503, "busy", "Too many parked.");
}

static void h_raw(void *ud, rr_http_req_t *req) {
  (void)ud;
  const char *h[] = {"X-A: 1", "Bad Header"};
  const char *n = rr_http_req_query(req, "n");
  rr_http_reply_ex(req, n && n[0] == 'b' ? 299 : 204, h, n && n[0] == 'x' ? 2 : 1, NULL, NULL, 0);
}

static rr_http_server_t *server(void) {
  static rr_http_server_t *s;
  if (s)
    return s;
  rr_log_set_level(RR_LOG_ERROR);
  static const rr_http_route_t routes[] = {
      {"GET", "/", RR_HTTP_PUBLIC, NULL, 0, h_echo, NULL, 0},
      {"GET", "/a/{id}", RR_HTTP_PUBLIC, NULL, 0, h_echo, NULL, 0},
      {"POST", "/a/{id}/ack", RR_HTTP_OPERATOR, "application/json", 64, h_echo, NULL, 0},
      {"PUT", "/p", RR_HTTP_PUBLIC, NULL, 0, h_park, NULL, 0},
      {"GET", "/p", RR_HTTP_VIEWER, NULL, 0, h_park, NULL, 0},
      {"DELETE", "/r", RR_HTTP_ADMIN, NULL, 0, h_raw, NULL, 0},
      {"GET", "/r", RR_HTTP_PUBLIC, NULL, 0, h_raw, NULL, 0},
  };
  rr_http_server_config_t cfg;
  rr_http_server_config_default(&cfg);
  cfg.routes = routes;
  cfg.nroutes = sizeof routes / sizeof routes[0];
  cfg.max_url_bytes = 128;
  cfg.max_header_bytes = 512;
  cfg.max_headers = 12;
  cfg.max_body = 256;
  cfg.header_timeout_ms = 100;
  cfg.body_timeout_ms = 100;
  if (hs_server_new(NULL, &cfg, &s, NULL) != 0)
    abort();
  /* tokens "v", "o", "a" */
  static const char tokens[] =
      "viewer v 4c94485e0c21ae6c41ce1dfe7b6bfaceea5ab68e40a2476f50208e526f506080\n"
      "operator o 65c74c15a686187bb6bbf9958f494fc6b80068034a659a9ad44991b08c58f2d2\n"
      "admin a ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb\n";
  if (hs_tokens_parse(tokens, sizeof tokens - 1, "fuzz", &s->tokens, NULL) != 0)
    abort();
  s->fixed_date = "Thu, 01 Jan 2026 00:00:00 GMT";
  return s;
}

static void answer_parked(int leave) {
  for (size_t i = 0; i < nparked; i++) {
    rr_http_req_t *req = parked[i];
    int gone = rr_http_req_gone(req);
    int rc = rr_http_reply(req, 200, "text/plain", "parked", 6);
    if (gone && rc != UV_ECANCELED)
      abort();
    (void)leave;
  }
  nparked = 0;
}

/* One connection through the whole input; the output is returned (owned). */
static char *run(const uint8_t *in, size_t n, unsigned seed, int leave, size_t *outlen,
                 size_t *last) {
  rr_http_server_t *s = server();
  s->now_ms = 0;
  sink_t k;
  memset(&k, 0, sizeof k);
  rr_buf_init(&k.out, (size_t)1 << 26);
  nparked = 0;
  hs_conn_t *c = hs_conn_new(s, &mem_io, &k);
  size_t i = 0;
  while (i < n && !k.finished) {
    size_t step = n - i;
    if (seed) {
      seed = seed * 1103515245u + 12345u;
      step = 1 + (seed >> 16) % 23;
      if (step > n - i)
        step = n - i;
    }
    if (hs_conn_input(c, (const char *)in + i, step) != 0)
      abort(); /* the input limit is far above the fuzzer's max_len */
    i += step;
    /* parked requests are answered only once everything is in, so the
     * answers do not depend on the split */
  }
  while (nparked && !k.finished) {
    if (leave && nparked) {
      hs_conn_closed(c);
      answer_parked(1);
      break;
    }
    answer_parked(0);
    hs_server_kick(s);
  }
  hs_server_kick(s);
  if (!c->gone) {
    s->now_ms += 1000; /* a request still incomplete gets its 408 */
    hs_conn_tick(c, s->now_ms);
    hs_conn_eof(c);
    answer_parked(0);
    hs_server_kick(s);
    hs_conn_closed(c);
  }
  answer_parked(1);
  hs_conn_release(c);
  if (s->nconns != 0 || s->kick_head)
    abort();
  *last = k.last_send;
  return rr_buf_steal(&k.out, outlen);
}

/* 1 when p[0..n) is exactly one reply whose status says the request was
 * malformed or over a limit (and so ends the connection). */
static int one_final_error(const char *p, size_t n) {
  static const char *const codes[] = {"400 ", "413 ", "414 ", "431 "};
  if (n < 13 || strncmp(p, "HTTP/1.1 ", 9) != 0)
    return 0;
  int known = 0;
  for (size_t i = 0; i < 4; i++)
    known |= strncmp(p + 9, codes[i], 4) == 0;
  const char *end = memmem(p, n, "\r\n\r\n", 4);
  const char *cl = memmem(p, n, "\r\nContent-Length: ", 18);
  if (!known || !end || !cl || cl > end || !memmem(p, (size_t)(end - p), "Connection: close", 17))
    return 0;
  return (size_t)(end + 4 - p) + strtoul(cl + 18, NULL, 10) == n;
}

/* The bytes sent back must not depend on how the input was split, with
 * one exception: for input that is both malformed and over a limit, which
 * of the two is reported first depends on when the parser hands over its
 * pieces; either way that is the last reply and the connection closes. */
static int same_outcome(const char *a, size_t na, size_t la, const char *b, size_t nb, size_t lb) {
  if (na == nb && (na == 0 || memcmp(a, b, na) == 0))
    return 1;
  return la == lb && memcmp(a, b, la) == 0 && one_final_error(a + la, na - la) &&
         one_final_error(b + lb, nb - lb);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  int leave = data[0] & 1;
  unsigned seed = (unsigned)(data[0] >> 1) + 1;
  size_t n1 = 0, n2 = 0, l1 = 0, l2 = 0;
  char *whole = run(data + 1, size - 1, 0, leave, &n1, &l1);
  char *split = run(data + 1, size - 1, seed, leave, &n2, &l2);
  if (!same_outcome(whole, n1, l1, split, n2, l2))
    abort();
  if (n1 && strncmp(whole, "HTTP/1.1 ", 9) != 0)
    abort();
  free(whole);
  free(split);
  return 0;
}

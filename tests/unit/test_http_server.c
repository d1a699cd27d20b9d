/* HTTP server without sockets: the request state machine fed from memory
 * (whole, byte by byte, in random splits), its replies checked byte for
 * byte; routes, decoding, tokens, limits, timeouts, pipelining, replies
 * after the client has gone. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "core/log.h"
#include "http/server_int.h"
#include "rr_test.h"

#define DATE "Thu, 01 Jan 2026 00:00:00 GMT"
/* "viewer dash.board", "operator ops@site", "admin root": tokens tok-<role> */
static char tokens_text[1024];

typedef struct sink {
  rr_buf_t out;
  int finished;
  size_t queued;
} sink_t;

static int m_send(hs_conn_t *c, const char *d, size_t n) {
  sink_t *k = c->io_ud;
  return rr_buf_append(&k->out, d, n);
}
static size_t m_queued(hs_conn_t *c) {
  return ((sink_t *)c->io_ud)->queued;
}
static void m_finish(hs_conn_t *c) {
  ((sink_t *)c->io_ud)->finished = 1;
}
static void m_update(hs_conn_t *c) {
  (void)c;
}
static const hs_io_t mem_io = {m_send, m_queued, m_finish, m_update};

/* Requests parked by the "defer" handler, answered by the test. */
static rr_http_req_t *parked[16];
static size_t nparked;

static void h_echo(void *ud, rr_http_req_t *req) {
  (void)ud;
  json_t *q = json_array();
  for (size_t i = 0; i < rr_http_req_query_count(req); i++) {
    const char *k, *v;
    rr_http_req_query_at(req, i, &k, &v);
    json_array_append_new(q, json_pack("[s,s]", k, v));
  }
  size_t blen;
  const char *body = rr_http_req_body(req, &blen);
  const char *id = rr_http_req_param(req, "id");
  const char *ua = rr_http_req_header(req, "X-Thing");
  rr_http_reply_json(req, 200,
                     json_pack("{s:s, s:s, s:s, s:s?, s:o, s:s, s:s, s:s%, s:s?}", "method",
                               rr_http_req_method(req), "route", rr_http_req_route(req), "path",
                               rr_http_req_path(req), "id", id, "query", q, "principal",
                               rr_http_req_principal(req)->name, "role",
                               rr_http_role_name(rr_http_req_principal(req)->role), "body", body,
                               blen, "thing", ua));
}

static void h_defer(void *ud, rr_http_req_t *req) {
  (void)ud;
  if (nparked < 16)
    parked[nparked++] = req;
  else
    rr_http_reply(req, 500, NULL, NULL, 0);
}

static void h_text(void *ud, rr_http_req_t *req) {
  rr_http_reply(req, 200, "text/plain", ud, strlen(ud));
}

static rr_http_server_t *make_server(rr_http_server_config_t *cfg) {
  static const rr_http_route_t routes[] = {
      {"GET", "/health", RR_HTTP_PUBLIC, NULL, 0, h_text, "ok", 0},
      {"GET", "/a", RR_HTTP_PUBLIC, NULL, 0, h_text, "A", 0},
      {"GET", "/b", RR_HTTP_PUBLIC, NULL, 0, h_text, "B", 0},
      {"GET", "/api/studies/{id}", RR_HTTP_VIEWER, NULL, 0, h_echo, NULL, 0},
      {"POST", "/api/notifications/{id}/ack", RR_HTTP_OPERATOR, "application/json", 64, h_echo,
       NULL, 0},
      {"DELETE", "/api/studies/{id}", RR_HTTP_ADMIN, NULL, 0, h_echo, NULL, 0},
      {"POST", "/echo", RR_HTTP_PUBLIC, NULL, 0, h_echo, NULL, 0},
      {"GET", "/defer", RR_HTTP_PUBLIC, NULL, 0, h_defer, NULL, 0},
  };
  rr_http_server_config_t def;
  if (!cfg) {
    rr_http_server_config_default(&def);
    cfg = &def;
  }
  cfg->routes = routes;
  cfg->nroutes = sizeof routes / sizeof routes[0];
  rr_http_server_t *s = NULL;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  int rc = hs_server_new(NULL, cfg, &s, &err);
  if (rc)
    fprintf(stderr, "hs_server_new: %s\n", err.data);
  CHECK_EQ_INT(rc, 0);
  rc = hs_tokens_parse(tokens_text, strlen(tokens_text), "tokens", &s->tokens, &err);
  CHECK_EQ_INT(rc, 0);
  rr_buf_close(&err);
  s->fixed_date = DATE;
  return s;
}

static void conn_end(hs_conn_t *c) {
  hs_conn_closed(c);
  hs_conn_release(c);
}

/* Feeds in in pieces (split: 0 whole, 1 byte by byte, else a seed for
 * random sizes), runs the kick list, returns the output (owned). */
static char *run(rr_http_server_t *s, const char *in, size_t n, unsigned split, int *finished) {
  sink_t k;
  memset(&k, 0, sizeof k);
  rr_buf_init(&k.out, 1 << 24);
  hs_conn_t *c = hs_conn_new(s, &mem_io, &k);
  size_t i = 0;
  unsigned seed = split;
  while (i < n && !k.finished) {
    size_t step = n - i;
    if (split == 1)
      step = 1;
    else if (split > 1) {
      seed = seed * 1103515245u + 12345u;
      step = 1 + (seed >> 16) % 37;
      if (step > n - i)
        step = n - i;
    }
    hs_conn_input(c, in + i, step);
    hs_server_kick(s);
    i += step;
  }
  if (finished)
    *finished = k.finished;
  conn_end(c);
  char *out = rr_buf_steal(&k.out, NULL);
  return out ? out : strdup("");
}

static char *run_str(rr_http_server_t *s, const char *in, int *finished) {
  return run(s, in, strlen(in), 0, finished);
}

/* SHA-256 hex of s, computed with OpenSSL (same as sha256sum). */
static void sha_hex(const char *s, char out[65]) {
  unsigned char md[32];
  unsigned int n = 0;
  EVP_Digest(s, strlen(s), md, &n, EVP_sha256(), NULL);
  for (int i = 0; i < 32; i++)
    snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void setup_tokens(void) {
  char v[65], o[65], a[65];
  sha_hex("tok-viewer", v);
  sha_hex("tok-operator", o);
  sha_hex("tok-admin", a);
  snprintf(tokens_text, sizeof tokens_text,
           "# role name sha256\n"
           "viewer  dash.board %s\n"
           "\n"
           "operator ops@site %s\r\n"
           "admin root %s\n",
           v, o, a);
}

static int contains(const char *hay, const char *needle) {
  return strstr(hay, needle) != NULL;
}

static void test_simple_get(void) {
  rr_http_server_t *s = make_server(NULL);
  int fin = 0;
  char *out = run_str(s, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", &fin);
  CHECK_MEM_STR(out, strlen(out),
                "HTTP/1.1 200 OK\r\nDate: " DATE "\r\nContent-Type: text/plain\r\n"
                "Content-Length: 2\r\n\r\nok");
  CHECK_EQ_INT(fin, 0);
  free(out);
  /* HEAD: same headers, no body */
  out = run_str(s, "HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n", &fin);
  CHECK_MEM_STR(out, strlen(out),
                "HTTP/1.1 200 OK\r\nDate: " DATE "\r\nContent-Type: text/plain\r\n"
                "Content-Length: 2\r\n\r\n");
  free(out);
  /* HTTP/1.0: answered, then closed */
  out = run_str(s, "GET /health HTTP/1.0\r\n\r\n", &fin);
  CHECK_MEM_STR(out, strlen(out),
                "HTTP/1.1 200 OK\r\nDate: " DATE "\r\nContent-Type: text/plain\r\n"
                "Content-Length: 2\r\nConnection: close\r\n\r\nok");
  CHECK_EQ_INT(fin, 1);
  free(out);
  /* Connection: close from a 1.1 client */
  out = run_str(s, "GET /a HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n", &fin);
  CHECK(contains(out, "Connection: close\r\n\r\nA"));
  CHECK(!contains(out, "\r\n\r\nB"));
  CHECK_EQ_INT(fin, 1);
  free(out);
  CHECK_EQ_INT(s->st.status[2], 4);
  CHECK_EQ_INT(s->nconns, 0);
  hs_server_free(s);
}

static void test_params_query_auth(void) {
  rr_http_server_t *s = make_server(NULL);
  int fin = 0;
  char *out =
      run_str(s,
              "GET /api/studies/1.2.840%2F99%20x?a=1&b=x+y%26z&flag&=e&a=2#frag HTTP/1.1\r\n"
              "authorization: bearer   tok-viewer\r\nX-THING:  spaced value  \r\n\r\n",
              &fin);
  const char *body = strstr(out, "\r\n\r\n");
  CHECK(contains(out, "HTTP/1.1 200 OK\r\n"));
  CHECK(body != NULL);
  if (body)
    CHECK_MEM_STR(body + 4, strlen(body + 4),
                  "{\"method\":\"GET\",\"route\":\"/api/studies/{id}\","
                  "\"path\":\"/api/studies/1.2.840/99 x\",\"id\":\"1.2.840/99 x\","
                  "\"query\":[[\"a\",\"1\"],[\"b\",\"x y&z\"],[\"flag\",\"\"],[\"\",\"e\"],"
                  "[\"a\",\"2\"]],\"principal\":\"dash.board\",\"role\":\"viewer\",\"body\":\"\","
                  "\"thing\":\"spaced value\"}");
  free(out);
  /* no token: 401 with WWW-Authenticate, keep-alive */
  out = run_str(s, "GET /api/studies/1 HTTP/1.1\r\n\r\n", &fin);
  CHECK_MEM_STR(out, strlen(out),
                "HTTP/1.1 401 Unauthorized\r\nDate: " DATE "\r\nContent-Type: application/json\r\n"
                "Content-Length: 70\r\nWWW-Authenticate: Bearer\r\n\r\n"
                "{\"error\":\"unauthorized\",\"message\":\"A valid bearer token is required.\"}");
  CHECK_EQ_INT(fin, 0);
  free(out);
  /* unknown token, other scheme: 401 */
  out = run_str(s, "GET /api/studies/1 HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n", NULL);
  CHECK(contains(out, "HTTP/1.1 401 "));
  free(out);
  out =
      run_str(s, "GET /api/studies/1 HTTP/1.1\r\nAuthorization: Basic dG9rLWFkbWlu\r\n\r\n", NULL);
  CHECK(contains(out, "HTTP/1.1 401 "));
  free(out);
  /* viewer on an admin route: 403; admin: allowed */
  out = run_str(s, "DELETE /api/studies/1 HTTP/1.1\r\nAuthorization: Bearer tok-viewer\r\n\r\n",
                NULL);
  CHECK(contains(out, "HTTP/1.1 403 Forbidden\r\n"));
  CHECK(contains(out, "{\"error\":\"forbidden\","));
  free(out);
  out =
      run_str(s, "DELETE /api/studies/1 HTTP/1.1\r\nAuthorization: Bearer tok-admin\r\n\r\n", NULL);
  CHECK(contains(out, "HTTP/1.1 200 OK\r\n"));
  CHECK(contains(out, "\"principal\":\"root\",\"role\":\"admin\""));
  free(out);
  /* a bad token on a public route is refused too */
  out = run_str(s, "GET /health HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n", NULL);
  CHECK(contains(out, "HTTP/1.1 401 "));
  free(out);
  hs_server_free(s);
}

static void test_errors(void) {
  rr_http_server_config_t cfg;
  rr_http_server_config_default(&cfg);
  cfg.max_url_bytes = 64;
  cfg.max_header_bytes = 512;
  cfg.max_headers = 8;
  rr_http_server_t *s = make_server(&cfg);
  int fin = 0;
  char *out = run_str(s, "GET /nope HTTP/1.1\r\n\r\n", &fin);
  CHECK(contains(out, "HTTP/1.1 404 Not Found\r\n"));
  CHECK(contains(out, "{\"error\":\"not_found\","));
  CHECK_EQ_INT(fin, 0);
  free(out);
  out = run_str(s, "PUT /api/studies/7 HTTP/1.1\r\nContent-Length: 0\r\n\r\n", &fin);
  CHECK(contains(out, "HTTP/1.1 405 Method Not Allowed\r\n"));
  CHECK(contains(out, "Allow: GET, HEAD, DELETE\r\n"));
  CHECK(contains(out, "\"error\":\"method_not_allowed\""));
  CHECK_EQ_INT(fin, 0);
  free(out);
  /* 405 with a body: answered at once, closed */
  out = run_str(s, "PUT /api/studies/7 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", &fin);
  CHECK(contains(out, "HTTP/1.1 405 "));
  CHECK(contains(out, "Connection: close\r\n"));
  CHECK_EQ_INT(fin, 1);
  free(out);
  char big[256];
  snprintf(big, sizeof big, "GET /%0100d HTTP/1.1\r\n\r\n", 7);
  out = run_str(s, big, &fin);
  CHECK(contains(out, "HTTP/1.1 414 URI Too Long\r\n"));
  CHECK(contains(out, "\"error\":\"uri_too_long\""));
  CHECK_EQ_INT(fin, 1);
  free(out);
  char hdrs[2048];
  size_t n = (size_t)snprintf(hdrs, sizeof hdrs, "GET /health HTTP/1.1\r\n");
  for (int i = 0; i < 20; i++)
    n += (size_t)snprintf(hdrs + n, sizeof hdrs - n, "X-Long-%d: %040d\r\n", i, i);
  snprintf(hdrs + n, sizeof hdrs - n, "\r\n");
  out = run_str(s, hdrs, &fin);
  CHECK(contains(out, "HTTP/1.1 431 Request Header Fields Too Large\r\n"));
  CHECK(contains(out, "\"error\":\"headers_too_large\""));
  CHECK_EQ_INT(fin, 1);
  free(out);
  /* too many (short) header fields */
  n = (size_t)snprintf(hdrs, sizeof hdrs, "GET /health HTTP/1.1\r\n");
  for (int i = 0; i < 9; i++)
    n += (size_t)snprintf(hdrs + n, sizeof hdrs - n, "X%d: 1\r\n", i);
  snprintf(hdrs + n, sizeof hdrs - n, "\r\n");
  out = run_str(s, hdrs, &fin);
  CHECK(contains(out, "HTTP/1.1 431 "));
  free(out);
  out = run_str(s, "GARBAGE\r\n\r\n", &fin);
  CHECK(contains(out, "HTTP/1.1 400 Bad Request\r\n"));
  CHECK(contains(out, "\"error\":\"bad_request\""));
  CHECK_EQ_INT(fin, 1);
  free(out);
  out = run_str(s, "GET /a/../health HTTP/1.1\r\n\r\n", &fin);
  CHECK(contains(out, "HTTP/1.1 400 "));
  free(out);
  out = run_str(s, "GET /a%2 HTTP/1.1\r\n\r\n", &fin);
  CHECK(contains(out, "HTTP/1.1 400 "));
  free(out);
  out = run_str(s, "GET /a%00 HTTP/1.1\r\n\r\n", &fin);
  CHECK(contains(out, "HTTP/1.1 400 "));
  free(out);
  /* request smuggling shape: both Content-Length and chunked */
  out = run_str(s,
                "POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                "0\r\n\r\n",
                &fin);
  CHECK(contains(out, "HTTP/1.1 400 "));
  CHECK_EQ_INT(fin, 1);
  free(out);
  hs_server_free(s);
}

static const char *ack_auth = "Authorization: Bearer tok-operator\r\n";

static void test_body_checks(void) {
  rr_http_server_t *s = make_server(NULL);
  int fin = 0;
  char req[1024];
  /* 411: declared content type, no length */
  snprintf(req, sizeof req, "POST /api/notifications/5/ack HTTP/1.1\r\n%s\r\n", ack_auth);
  char *out = run_str(s, req, &fin);
  CHECK(contains(out, "HTTP/1.1 411 Length Required\r\n"));
  CHECK(contains(out, "\"error\":\"length_required\""));
  free(out);
  /* 415 */
  snprintf(req, sizeof req,
           "POST /api/notifications/5/ack HTTP/1.1\r\n%sContent-Type: text/plain\r\n"
           "Content-Length: 2\r\n\r\n{}",
           ack_auth);
  out = run_str(s, req, &fin);
  CHECK(contains(out, "HTTP/1.1 415 Unsupported Media Type\r\n"));
  CHECK_EQ_INT(fin, 1);
  free(out);
  /* ok, with a charset parameter; the viewer may not */
  snprintf(req, sizeof req,
           "POST /api/notifications/5/ack HTTP/1.1\r\n%sContent-Type: Application/JSON; "
           "charset=utf-8\r\nContent-Length: 11\r\n\r\n{\"by\":\"dr\"}",
           ack_auth);
  out = run_str(s, req, &fin);
  CHECK(contains(out, "HTTP/1.1 200 OK\r\n"));
  CHECK(contains(out, "\"id\":\"5\""));
  CHECK(contains(out, "\"body\":\"{\\\"by\\\":\\\"dr\\\"}\""));
  free(out);
  /* 413 by Content-Length (route max 64): before the body, closed */
  snprintf(req, sizeof req,
           "POST /api/notifications/5/ack HTTP/1.1\r\n%sContent-Type: application/json\r\n"
           "Content-Length: 65\r\n\r\n",
           ack_auth);
  out = run_str(s, req, &fin);
  CHECK(contains(out, "HTTP/1.1 413 Payload Too Large\r\n"));
  CHECK(contains(out, "\"error\":\"payload_too_large\""));
  CHECK_EQ_INT(fin, 1);
  free(out);
  /* 413 by chunks */
  snprintf(req, sizeof req,
           "POST /api/notifications/5/ack HTTP/1.1\r\n%sContent-Type: application/json\r\n"
           "Transfer-Encoding: chunked\r\n\r\n20\r\n%032d\r\n21\r\n%033d\r\n0\r\n\r\n",
           ack_auth, 0, 0);
  out = run_str(s, req, &fin);
  CHECK(contains(out, "HTTP/1.1 413 "));
  CHECK_EQ_INT(fin, 1);
  free(out);
  /* chunked body decoded, with Expect: 100-continue answered first */
  out = run_str(s,
                "POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
                "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n",
                &fin);
  CHECK(strncmp(out, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n", 42) == 0);
  CHECK(contains(out, "\"body\":\"hello world\""));
  CHECK_EQ_INT(fin, 0);
  free(out);
  /* an unknown expectation */
  out = run_str(s, "GET /a HTTP/1.1\r\nExpect: magic\r\n\r\n", &fin);
  CHECK(contains(out, "HTTP/1.1 417 "));
  free(out);
  /* 100-continue refused early: 401 instead of 100 */
  snprintf(req, sizeof req,
           "POST /api/notifications/5/ack HTTP/1.1\r\nExpect: 100-continue\r\n"
           "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n");
  out = run_str(s, req, &fin);
  CHECK(strncmp(out, "HTTP/1.1 401 ", 13) == 0);
  CHECK(!contains(out, "100 Continue"));
  free(out);
  hs_server_free(s);
}

static void test_pipelining_and_splits(void) {
  rr_http_server_t *s = make_server(NULL);
  const char *in = "GET /a HTTP/1.1\r\n\r\nPOST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz"
                   "GET /nope HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
                   "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
  int fin = 0;
  char *whole = run(s, in, strlen(in), 0, &fin);
  const char *a = strstr(whole, "\r\n\r\nA");
  const char *xyz = strstr(whole, "\"body\":\"xyz\"");
  const char *nf = strstr(whole, "404 Not Found");
  const char *b = strstr(whole, "\r\n\r\nB");
  const char *abc = strstr(whole, "\"body\":\"abc\"");
  CHECK(a && xyz && nf && b && abc);
  CHECK(a < xyz && xyz < nf && nf < b && b < abc);
  CHECK_EQ_INT(fin, 0);
  for (unsigned split = 1; split < 40; split++) {
    char *out = run(s, in, strlen(in), split, NULL);
    CHECK(strcmp(out, whole) == 0);
    free(out);
  }
  free(whole);
  hs_server_free(s);
}

static void test_async_and_gone(void) {
  rr_http_server_t *s = make_server(NULL);
  sink_t k;
  memset(&k, 0, sizeof k);
  rr_buf_init(&k.out, 1 << 20);
  nparked = 0;
  hs_conn_t *c = hs_conn_new(s, &mem_io, &k);
  const char *in =
      "GET /defer?n=1 HTTP/1.1\r\n\r\nGET /a HTTP/1.1\r\n\r\nGET /defer?n=2 HTTP/1.1\r\n\r\n";
  hs_conn_input(c, in, strlen(in));
  /* the first is with its handler; nothing is answered yet, the rest waits */
  CHECK_EQ_INT(nparked, 1);
  CHECK_EQ_INT(k.out.len, 0);
  CHECK_EQ_INT(rr_http_req_gone(parked[0]), 0);
  CHECK_MEM_STR(rr_http_req_query(parked[0], "n"), 1, "1");
  CHECK_EQ_INT(rr_http_reply(parked[0], 202, "text/plain", "one", 3), 0);
  /* the reply came from outside the processing loop: the rest follows
   * from the loop (the kick list), not inside rr_http_reply */
  CHECK_EQ_INT(nparked, 1);
  hs_server_kick(s);
  CHECK_EQ_INT(nparked, 2);
  CHECK(contains(k.out.data, "202 Accepted"));
  CHECK(contains(k.out.data, "\r\n\r\nA"));
  /* the client goes away while the second deferred request is pending */
  rr_http_req_t *pending = parked[1];
  hs_conn_closed(c);
  hs_conn_release(c); /* the glue's reference; the request keeps c alive */
  CHECK_EQ_INT(rr_http_req_gone(pending), 1);
  size_t before = s->st.status[0];
  CHECK_EQ_INT(rr_http_reply(pending, 200, "text/plain", "late", 4), UV_ECANCELED);
  CHECK_EQ_INT(s->st.status[0], before); /* unlinked: not counted on the server */
  CHECK(!contains(k.out.data, "late"));
  rr_buf_close(&k.out);
  nparked = 0;
  hs_server_free(s);
}

static void test_timeouts(void) {
  rr_http_server_config_t cfg;
  rr_http_server_config_default(&cfg);
  cfg.header_timeout_ms = 100;
  cfg.body_timeout_ms = 200;
  cfg.idle_timeout_ms = 1000;
  rr_http_server_t *s = make_server(&cfg);
  sink_t k;
  memset(&k, 0, sizeof k);
  rr_buf_init(&k.out, 1 << 20);
  s->now_ms = 1000;
  hs_conn_t *c = hs_conn_new(s, &mem_io, &k);
  /* never a byte: closed after the header timeout, no reply */
  CHECK_EQ_INT(hs_conn_tick(c, 1100), 0);
  CHECK_EQ_INT(hs_conn_tick(c, 1101), 1);
  conn_end(c);
  /* slow headers: 408 */
  c = hs_conn_new(s, &mem_io, &k);
  hs_conn_input(c, "GET /a HTTP/1.1\r\nX: ", 21);
  CHECK_EQ_INT(hs_conn_tick(c, 1100), 0);
  CHECK_EQ_INT(k.out.len, 0);
  CHECK_EQ_INT(hs_conn_tick(c, 1101), 0);
  CHECK(contains(k.out.data, "HTTP/1.1 408 Request Timeout\r\n"));
  CHECK(contains(k.out.data, "\"error\":\"request_timeout\""));
  CHECK_EQ_INT(k.finished, 1);
  conn_end(c);
  rr_buf_reset(&k.out);
  k.finished = 0;
  /* slow body: 408 after body_timeout without progress */
  c = hs_conn_new(s, &mem_io, &k);
  hs_conn_input(c, "POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\n12", 45);
  s->now_ms = 1150;
  hs_conn_input(c, "34", 2);
  CHECK_EQ_INT(hs_conn_tick(c, 1300), 0);
  CHECK_EQ_INT(k.out.len, 0);
  CHECK_EQ_INT(hs_conn_tick(c, 1351), 0);
  CHECK(contains(k.out.data, "HTTP/1.1 408 "));
  conn_end(c);
  rr_buf_reset(&k.out);
  k.finished = 0;
  /* keep-alive idle: after a request, idle_timeout applies */
  s->now_ms = 2000;
  c = hs_conn_new(s, &mem_io, &k);
  hs_conn_input(c, "GET /a HTTP/1.1\r\n\r\n", 19);
  CHECK(contains(k.out.data, "200 OK"));
  CHECK_EQ_INT(hs_conn_tick(c, 2900), 0);
  CHECK_EQ_INT(hs_conn_tick(c, 3001), 1);
  conn_end(c);
  CHECK_EQ_INT(s->st.timeouts, 4);
  rr_buf_close(&k.out);
  hs_server_free(s);
}

static void test_backpressure(void) {
  rr_http_server_config_t cfg;
  rr_http_server_config_default(&cfg);
  cfg.max_write_queue = 100;
  rr_http_server_t *s = make_server(&cfg);
  sink_t k;
  memset(&k, 0, sizeof k);
  rr_buf_init(&k.out, 1 << 20);
  hs_conn_t *c = hs_conn_new(s, &mem_io, &k);
  k.queued = 1000; /* the socket is not draining */
  hs_conn_input(c, "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", 38);
  CHECK_EQ_INT(k.out.len, 0);
  CHECK_EQ_INT(hs_conn_wants_input(c), 0);
  k.queued = 0;
  hs_conn_written(c);
  hs_server_kick(s);
  CHECK(contains(k.out.data, "\r\n\r\nA"));
  CHECK(contains(k.out.data, "\r\n\r\nB"));
  CHECK_EQ_INT(hs_conn_wants_input(c), 1);
  /* a request with its handler: pipelined bytes are buffered up to a
   * header block's worth, then reading stops */
  nparked = 0;
  hs_conn_input(c, "GET /defer HTTP/1.1\r\n\r\n", 23);
  CHECK_EQ_INT(nparked, 1);
  char junk[20000];
  memset(junk, 'a', sizeof junk);
  hs_conn_input(c, junk, sizeof junk);
  CHECK_EQ_INT(hs_conn_wants_input(c), 0);
  rr_http_reply(parked[0], 204, NULL, NULL, 0);
  nparked = 0;
  hs_server_kick(s);
  CHECK(contains(k.out.data, "HTTP/1.1 204 No Content\r\n"));
  CHECK(contains(k.out.data, "HTTP/1.1 400 ")); /* the junk */
  conn_end(c);
  rr_buf_close(&k.out);
  hs_server_free(s);
}

static void test_tokens_file(void) {
  hs_tokens_t t = {0};
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  CHECK_EQ_INT(hs_tokens_parse(tokens_text, strlen(tokens_text), "f", &t, &err), 0);
  CHECK_EQ_INT(t.n, 3);
  const hs_token_t *e = hs_tokens_find(&t, "tok-operator", 12);
  CHECK(e && strcmp(e->name, "ops@site") == 0 && e->role == RR_HTTP_OPERATOR);
  CHECK(hs_tokens_find(&t, "tok-operato", 11) == NULL);
  static const char *const bad[] = {
      "superuser x 8f7c4dd9e7b4ad2c4d0b8ed9a1ee4dd9d0f4b1c3b4d0b3f5b0b4a5f6d3e2c1b0\n",
      "viewer x 8f7c4dd9e7b4ad2c4d0b8ed9a1ee4dd9d0f4b1c3b4d0b3f5b0b4a5f6d3e2c1b\n",
      "viewer x tok-in-plain-text\n",
      "viewer bad/name 8f7c4dd9e7b4ad2c4d0b8ed9a1ee4dd9d0f4b1c3b4d0b3f5b0b4a5f6d3e2c1b0\n",
      "viewer x\n",
      "viewer a 8f7c4dd9e7b4ad2c4d0b8ed9a1ee4dd9d0f4b1c3b4d0b3f5b0b4a5f6d3e2c1b0 extra\n",
      "viewer a 8f7c4dd9e7b4ad2c4d0b8ed9a1ee4dd9d0f4b1c3b4d0b3f5b0b4a5f6d3e2c1b0\n"
      "admin b 8f7c4dd9e7b4ad2c4d0b8ed9a1ee4dd9d0f4b1c3b4d0b3f5b0b4a5f6d3e2c1b0\n",
      "public a 8f7c4dd9e7b4ad2c4d0b8ed9a1ee4dd9d0f4b1c3b4d0b3f5b0b4a5f6d3e2c1b0\n",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    rr_buf_reset(&err);
    CHECK_EQ_INT(hs_tokens_parse(bad[i], strlen(bad[i]), "f", &t, &err), RR_EINVAL);
    CHECK(err.data && strncmp(err.data, "f:", 2) == 0);
    CHECK_EQ_INT(t.n, 3); /* unchanged */
  }
  rr_buf_reset(&err);
  CHECK_EQ_INT(hs_tokens_load("/nonexistent/tokens", &t, &err), -ENOENT);
  hs_tokens_free(&t);
  rr_buf_close(&err);
}

static void test_routes_and_paths(void) {
  hs_route_t r;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  rr_http_route_t bad[] = {
      {"GET", "nope", 0, NULL, 0, h_echo, NULL, 0},
      {"GET", "/a/{}", 0, NULL, 0, h_echo, NULL, 0},
      {"GET", "/a/x{y}", 0, NULL, 0, h_echo, NULL, 0},
      {"G T", "/a", 0, NULL, 0, h_echo, NULL, 0},
      {"GET", "/own", RR_HTTP_VIEWER, NULL, 0, h_echo, NULL, 1},
      {"GET", "/{a}/{a}", 0, NULL, 0, h_echo, NULL, 0},
      {"GET", "/a", 0, NULL, 0, NULL, NULL, 0},
      {"GET", "/a/../b", 0, NULL, 0, h_echo, NULL, 0},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    CHECK_EQ_INT(hs_route_compile(&bad[i], &r, &err), RR_EINVAL);
  rr_http_route_t good = {
      "POST", "/api/studies/{uid}/complete", RR_HTTP_OPERATOR, NULL, 0, h_echo, NULL, 0};
  CHECK_EQ_INT(hs_route_compile(&good, &r, &err), 0);
  CHECK_EQ_INT(r.nsegs, 4);
  rr_http_req_t req;
  memset(&req, 0, sizeof req);
  rr_buf_init(&req.url, 1024);
  rr_buf_init(&req.segs, 1024);
  rr_buf_init(&req.params, 1024);
  rr_buf_init(&req.query, 1024);
  rr_buf_append(&req.url, "/api/studies/1.2.3/complete", 27);
  CHECK_EQ_INT(hs_target_parse(&req), 0);
  CHECK_EQ_INT(hs_route_match(&r, &req), 1);
  CHECK_MEM_STR(rr_http_req_param(&req, "uid"), 5, "1.2.3");
  CHECK(rr_http_req_param(&req, "id") == NULL);
  hs_route_free(&r);
  /* static relative paths */
  hs_static_t st = {"/dash", 5, "/srv", "/dash/*", RR_HTTP_PUBLIC};
  static const char *const cases[][2] = {
      {"/dash", ""},
      {"/dash/", ""},
      {"/dash/app.js", "app.js"},
      {"/dash/img/a%20b.png", "img/a b.png"},
      {"/dash/.env", NULL},
      {"/dash/a//b", NULL},
      {"/dash/a%2F..%2Fb", NULL},
      {"/dash/a%5Cb", NULL},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    rr_buf_reset(&req.url);
    rr_buf_reset(&req.segs);
    req.nsegs = 0;
    free(req.path);
    req.path = NULL;
    rr_buf_append(&req.url, cases[i][0], strlen(cases[i][0]));
    CHECK_EQ_INT(hs_target_parse(&req), 0);
    rr_buf_t rel;
    rr_buf_init(&rel, 4096);
    int rc = hs_static_relpath(&req, &st, &rel);
    if (cases[i][1]) {
      CHECK_EQ_INT(rc, 0);
      CHECK_MEM_STR(rel.data, rel.len, cases[i][1]);
    } else {
      CHECK_EQ_INT(rc, RR_EPARSE);
    }
    rr_buf_close(&rel);
  }
  CHECK(strcmp(hs_static_type("x/app.JS"), "text/javascript; charset=utf-8") == 0);
  CHECK(strcmp(hs_static_type("index.html"), "text/html; charset=utf-8") == 0);
  CHECK(strcmp(hs_static_type("noext"), "application/octet-stream") == 0);
  free(req.path);
  free(req.qkeys);
  free(req.qvalues);
  rr_buf_close(&req.url);
  rr_buf_close(&req.segs);
  rr_buf_close(&req.params);
  rr_buf_close(&req.query);
  rr_buf_close(&err);
}

static void test_bad_replies(void) {
  rr_http_server_t *s = make_server(NULL);
  sink_t k;
  memset(&k, 0, sizeof k);
  rr_buf_init(&k.out, 1 << 20);
  nparked = 0;
  hs_conn_t *c = hs_conn_new(s, &mem_io, &k);
  hs_conn_input(c, "GET /defer HTTP/1.1\r\n\r\n", 23);
  const char *h[] = {"Content-Length: 5"};
  CHECK_EQ_INT(rr_http_reply_ex(parked[0], 200, h, 1, NULL, NULL, 0), RR_EINVAL);
  CHECK(contains(k.out.data, "HTTP/1.1 500 Internal Server Error\r\n"));
  hs_server_kick(s);
  rr_buf_reset(&k.out);
  nparked = 0;
  hs_conn_input(c, "GET /defer HTTP/1.1\r\n\r\n", 23);
  const char *ok[] = {"X-Request-Id: 42", "Location: /api/x"};
  CHECK_EQ_INT(rr_http_reply_ex(parked[0], 201, ok, 2, "application/json", "{}", 2), 0);
  CHECK(contains(k.out.data, "HTTP/1.1 201 Created\r\n"));
  CHECK(contains(k.out.data, "X-Request-Id: 42\r\nLocation: /api/x\r\n\r\n{}"));
  hs_server_kick(s);
  rr_buf_reset(&k.out);
  nparked = 0;
  hs_conn_input(c, "GET /defer HTTP/1.1\r\n\r\n", 23);
  CHECK_EQ_INT(rr_http_reply_error(parked[0], 409, "conflict", "Already acknowledged \"x\"."), 0);
  CHECK(contains(k.out.data,
                 "{\"error\":\"conflict\",\"message\":\"Already acknowledged \\\"x\\\".\"}"));
  nparked = 0;
  conn_end(c);
  rr_buf_close(&k.out);
  hs_server_free(s);
}

int main(void) {
  rr_log_set_level(RR_LOG_WARN);
  setup_tokens();
  RUN(test_simple_get);
  RUN(test_params_query_auth);
  RUN(test_errors);
  RUN(test_body_checks);
  RUN(test_pipelining_and_splits);
  RUN(test_async_and_gone);
  RUN(test_timeouts);
  RUN(test_backpressure);
  RUN(test_tokens_file);
  RUN(test_routes_and_paths);
  RUN(test_bad_replies);
  return TEST_SUMMARY();
}

/* Integration tests of the HTTP client (engine/http/client.c) against an
 * HTTPS server we did not write: Python's http.server + ssl, driven by
 * tests/integration/peers/https_peer.py (mutual TLS, certificates from
 * scripts/gen-certs; see that file for its paths).
 *
 *   test_http_client PYTHON PEER_SCRIPT GEN_CERTS
 *
 * Everything runs on one libuv loop: the client, the peer process (spawned
 * with uv_spawn, its stdout read for "ready port=N"), and the waits. A wait
 * is a condition with a deadline (WAIT_UNTIL), never a sleep.
 * $RR_TEST_VERBOSE=1 shows the client's debug log lines. Ends with
 * "N passed, M failed". */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "core/log.h"
#include "http/client.h"
#include "rr_test.h"

static uv_loop_t loop;
static char dir[256];
static int in_api; /* inside an rr_http_client_* call: no callback may run */
static int sync_callbacks;

/* ---- waiting ------------------------------------------------------------ */

static uv_timer_t deadline_timer;
static void on_deadline(uv_timer_t *t) {
  (void)t;
}

static uint64_t now_ms(void) {
  return uv_hrtime() / 1000000u;
}

/* Runs the loop until cond holds or ms pass; the timer makes sure one loop
 * iteration never blocks past the deadline. Evaluates to cond. */
#define WAIT_UNTIL(cond, ms)                                                                       \
  ({                                                                                               \
    uint64_t dl_ = now_ms() + (ms);                                                                \
    uv_timer_start(&deadline_timer, on_deadline, (ms), 0);                                         \
    while (!(cond) && now_ms() < dl_)                                                              \
      uv_run(&loop, UV_RUN_ONCE);                                                                  \
    uv_timer_stop(&deadline_timer);                                                                \
    int ok_ = (cond) ? 1 : 0;                                                                      \
    if (!ok_)                                                                                      \
      fprintf(stderr, "%s:%d: timed out after %d ms waiting for %s\n", __FILE__, __LINE__,         \
              (int)(ms), #cond);                                                                   \
    ok_;                                                                                           \
  })

/* ---- the peer process --------------------------------------------------- */

typedef struct peer {
  uv_process_t proc;
  uv_pipe_t in, out;
  int open_handles;
  int exited;
  int port;
  char line[1024];
  size_t line_len;
} peer_t;

static peer_t peer;

static void peer_handle_closed(uv_handle_t *h) {
  peer_t *p = h->data;
  p->open_handles--;
}

static void peer_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
  static char buf[4096];
  (void)h;
  (void)sz;
  b->base = buf;
  b->len = sizeof buf;
}

static void peer_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  peer_t *p = st->data;
  if (n < 0) {
    if (!uv_is_closing((uv_handle_t *)st))
      uv_close((uv_handle_t *)st, peer_handle_closed);
    return;
  }
  for (ssize_t i = 0; i < n; i++) {
    char c = b->base[i];
    if (c == '\n') {
      p->line[p->line_len] = '\0';
      if (strncmp(p->line, "ready port=", 11) == 0)
        p->port = (int)strtol(p->line + 11, NULL, 10);
      p->line_len = 0;
    } else if (p->line_len + 1 < sizeof p->line) {
      p->line[p->line_len++] = c;
    }
  }
}

static void peer_exit(uv_process_t *proc, int64_t status, int sig) {
  peer_t *p = proc->data;
  (void)status;
  (void)sig;
  p->exited = 1;
  uv_close((uv_handle_t *)proc, peer_handle_closed);
}

static int peer_start(const char *python, const char *script) {
  char cert[512], key[512], ca[512];
  snprintf(cert, sizeof cert, "%s/pki/server.pem", dir);
  snprintf(key, sizeof key, "%s/pki/server.key", dir);
  snprintf(ca, sizeof ca, "%s/pki/ca.pem", dir);
  char *args[] = {(char *)python, (char *)script, "--cert", cert, "--key", key, "--ca", ca, NULL};
  uv_stdio_container_t io[3];
  peer_t *p = &peer;
  uv_pipe_init(&loop, &p->in, 0);
  uv_pipe_init(&loop, &p->out, 0);
  p->in.data = p->out.data = p->proc.data = p;
  p->open_handles = 2;
  io[0].flags = UV_CREATE_PIPE | UV_READABLE_PIPE;
  io[0].data.stream = (uv_stream_t *)&p->in;
  io[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  io[1].data.stream = (uv_stream_t *)&p->out;
  io[2].flags = UV_INHERIT_FD;
  io[2].data.fd = 2;
  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.file = python;
  o.args = args;
  o.exit_cb = peer_exit;
  o.stdio = io;
  o.stdio_count = 3;
  int rc = uv_spawn(&loop, &p->proc, &o);
  if (rc) {
    fprintf(stderr, "cannot start %s: %s\n", python, uv_strerror(rc));
    return -1;
  }
  p->open_handles++;
  uv_read_start((uv_stream_t *)&p->out, peer_alloc, peer_read);
  if (!WAIT_UNTIL(p->port > 0 || p->exited, 20000) || !p->port)
    return -1;
  return 0;
}

/* Closes the peer's stdin (it exits on end of input) and waits for it. */
static void peer_stop(void) {
  if (!uv_is_closing((uv_handle_t *)&peer.in))
    uv_close((uv_handle_t *)&peer.in, peer_handle_closed);
  if (!WAIT_UNTIL(peer.exited, 10000)) {
    uv_process_kill(&peer.proc, SIGKILL);
    WAIT_UNTIL(peer.exited, 10000);
  }
  WAIT_UNTIL(peer.open_handles == 0, 10000);
}

/* ---- requests and results ----------------------------------------------- */

typedef struct result {
  int calls;
  int status;
  long http;
  char body[1024];
  size_t body_len;
  uint64_t body_bytes;
  char auth[256], seen_ct[128], seen_method[16], ctype[128], message[512];
  uint64_t elapsed_ms;
} result_t;

static void copy_header(const rr_http_response_t *r, const char *name, char *out, size_t cap) {
  const char *v;
  size_t n;
  out[0] = '\0';
  if (rr_http_response_header(r, name, &v, &n) == 0)
    snprintf(out, cap, "%.*s", (int)n, v);
}

static void on_done(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r) {
  result_t *x = ud;
  (void)t;
  if (in_api)
    sync_callbacks++;
  x->calls++;
  x->status = r->status;
  x->http = r->http_status;
  x->body_len = r->body_len;
  x->body_bytes = r->body_bytes;
  snprintf(x->body, sizeof x->body, "%.*s", (int)r->body_len, r->body);
  copy_header(r, "x-seen-authorization", x->auth, sizeof x->auth);
  copy_header(r, "X-Seen-Content-Type", x->seen_ct, sizeof x->seen_ct);
  copy_header(r, "X-SEEN-METHOD", x->seen_method, sizeof x->seen_method);
  snprintf(x->ctype, sizeof x->ctype, "%s", r->content_type ? r->content_type : "");
  snprintf(x->message, sizeof x->message, "%s", r->message);
  x->elapsed_ms = r->elapsed_ms;
  if (getenv("RR_TEST_VERBOSE"))
    fprintf(stderr, "  done status=%d (%s) http=%ld message=\"%s\" ms=%llu\n", r->status,
            rr_http_client_strerror(r->status), r->http_status, r->message,
            (unsigned long long)r->elapsed_ms);
}

static char url_buf[4][256];
/* https://localhost:PORT/PATH in one of four rotating buffers. */
static const char *url(const char *path) {
  static int i;
  char *u = url_buf[i++ % 4];
  snprintf(u, sizeof url_buf[0], "https://localhost:%d%s", peer.port, path);
  return u;
}

static char pki_buf[8][512];
static const char *pki(const char *file) {
  static int i;
  char *p = pki_buf[i++ % 8];
  snprintf(p, sizeof pki_buf[0], "%s/pki/%s", dir, file);
  return p;
}

/* A request with the good client certificate and CA. */
static void base_request(rr_http_request_t *r, rr_http_method_t m, const char *path) {
  rr_http_client_request_default(r);
  r->method = m;
  r->url = url(path);
  r->ca_file = pki("ca.pem");
  r->cert_file = pki("client.pem");
  r->key_file = pki("client.key");
  r->connect_timeout_ms = 5000;
  r->timeout_ms = 10000;
}

static int submit(rr_http_client_t *c, const rr_http_request_t *r, result_t *x,
                  rr_http_transfer_t **t) {
  memset(x, 0, sizeof *x);
  in_api = 1;
  int rc = rr_http_client_submit(c, r, on_done, x, t);
  in_api = 0;
  return rc;
}

/* Submits r and waits for its callback. */
static void run(rr_http_client_t *c, const rr_http_request_t *r, result_t *x) {
  CHECK_EQ_INT(submit(c, r, x, NULL), 0);
  CHECK(WAIT_UNTIL(x->calls > 0, 20000));
  CHECK_EQ_INT(x->calls, 1);
}

static rr_http_client_t *new_client(unsigned max_concurrent) {
  rr_http_client_config_t cfg;
  rr_http_client_config_default(&cfg);
  cfg.name = "test";
  cfg.max_concurrent = max_concurrent;
  rr_http_client_t *c = NULL;
  CHECK_EQ_INT(rr_http_client_new(&loop, &cfg, &c), 0);
  return c;
}

static void on_closed(void *ud) {
  (*(int *)ud)++;
}

static void close_client(rr_http_client_t *c) {
  int closed = 0;
  in_api = 1;
  rr_http_client_close(c, on_closed, &closed);
  in_api = 0;
  CHECK(WAIT_UNTIL(closed == 1, 10000));
}

static rr_http_client_stats_t stats(rr_http_client_t *c) {
  rr_http_client_stats_t st;
  rr_http_client_stats(c, &st);
  return st;
}

/* The peer's counter `key` from /stats; -1 when it cannot be read. */
static long peer_stat(rr_http_client_t *c, const char *key) {
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_GET, "/stats");
  run(c, &r, &x);
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\": ", key);
  const char *p = strstr(x.body, pat);
  return p ? strtol(p + strlen(pat), NULL, 10) : -1;
}

static void peer_stats_reset(rr_http_client_t *c) {
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_POST, "/stats/reset");
  run(c, &r, &x);
  CHECK_EQ_INT(x.http, 200);
}

static rr_http_client_t *client; /* shared by the simple tests */

/* ---- tests -------------------------------------------------------------- */

/* POST of JSON with a bearer token: 200, the body echoed, the token and
 * content type seen by the server; PUT with a borrowed body; DELETE. */
static void test_post_json(void) {
  rr_http_request_t r;
  result_t x;
  const char *json = "{\"accession\":\"ACC123\",\"priority\":\"STAT\"}";
  base_request(&r, RR_HTTP_POST, "/echo");
  r.body = json;
  r.body_len = strlen(json);
  r.content_type = "application/json";
  r.bearer_token = "tok-123.abc";
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, 0);
  CHECK_EQ_INT(x.http, 200);
  CHECK_MEM_STR(x.body, x.body_len, json);
  CHECK_MEM_STR(x.auth, strlen(x.auth), "Bearer tok-123.abc");
  CHECK_MEM_STR(x.seen_ct, strlen(x.seen_ct), "application/json");
  CHECK_MEM_STR(x.ctype, strlen(x.ctype), "application/json");
  CHECK_MEM_STR(x.seen_method, strlen(x.seen_method), "POST");
  CHECK_MEM_STR(x.message, strlen(x.message), "");

  char hl7[] = "MSH|^~\\&|RR|FAC|EHR|FAC|20260101||ORU^R01|C1|P|2.5.1\rOBX|1|TX|||x\r";
  base_request(&r, RR_HTTP_PUT, "/echo");
  r.body = hl7;
  r.body_len = strlen(hl7);
  r.body_borrowed = 1;
  r.content_type = "x-application/hl7-v2+er7";
  const char *hdrs[] = {"X-Trace: 42"};
  r.headers = hdrs;
  r.nheaders = 1;
  run(client, &r, &x);
  CHECK_EQ_INT(x.http, 200);
  CHECK_MEM_STR(x.body, x.body_len, hl7);
  CHECK_MEM_STR(x.seen_method, strlen(x.seen_method), "PUT");
  CHECK_MEM_STR(x.auth, strlen(x.auth), "");

  base_request(&r, RR_HTTP_DELETE, "/echo");
  run(client, &r, &x);
  CHECK_EQ_INT(x.http, 200);
  CHECK_MEM_STR(x.seen_method, strlen(x.seen_method), "DELETE");
  CHECK_EQ_INT(x.body_len, 0);
}

/* 2xx, 4xx and 5xx are responses: status 0 and the HTTP code. */
static void test_statuses(void) {
  static const int codes[] = {201, 404, 500, 503};
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    char path[32], want[32];
    snprintf(path, sizeof path, "/status/%d", codes[i]);
    snprintf(want, sizeof want, "status %d", codes[i]);
    rr_http_request_t r;
    result_t x;
    base_request(&r, RR_HTTP_POST, path);
    r.body = "{}";
    r.body_len = 2;
    run(client, &r, &x);
    CHECK_EQ_INT(x.status, 0);
    CHECK_EQ_INT(x.http, codes[i]);
    CHECK_MEM_STR(x.body, x.body_len, want);
  }
}

/* The server answers after 3 s; the client gives up after 300 ms. */
static void test_timeout(void) {
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_GET, "/delay/3000");
  r.timeout_ms = 300;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, UV_ETIMEDOUT);
  CHECK_EQ_INT(x.http, 0);
  CHECK(x.elapsed_ms >= 250 && x.elapsed_ms < 2500);
  CHECK(x.message[0] != '\0');
}

/* A port that was bound and closed: nothing listens there. */
static void test_refused(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  CHECK_EQ_INT(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
  CHECK_EQ_INT(getsockname(fd, (struct sockaddr *)&a, &len), 0);
  close(fd);
  char u[64];
  snprintf(u, sizeof u, "https://127.0.0.1:%d/echo", ntohs(a.sin_port));
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_GET, "/");
  r.url = u;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, UV_ECONNREFUSED);
  CHECK_EQ_INT(x.http, 0);
}

/* The client trusts only an unrelated CA: the server is refused. */
static void test_wrong_ca(void) {
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_GET, "/echo");
  r.ca_file = pki("other-ca.pem");
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, RR_ETLS);
  CHECK_EQ_INT(x.http, 0);
  CHECK(strstr(x.message, "certificate") != NULL);
}

/* No client certificate: the server refuses the handshake. Under TLS 1.3
 * the client learns it after its own side of the handshake, as an alert or
 * a closed connection. */
static void test_no_client_cert(void) {
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_GET, "/echo");
  r.cert_file = NULL;
  r.key_file = NULL;
  run(client, &r, &x);
  CHECK(x.status == RR_ETLS || x.status == RR_HTTP_ECONNLOST);
  CHECK_EQ_INT(x.http, 0);
  /* A client certificate from another CA is refused the same way. */
  base_request(&r, RR_HTTP_GET, "/echo");
  r.cert_file = pki("other-client.pem");
  r.key_file = pki("other-client.key");
  run(client, &r, &x);
  CHECK(x.status == RR_ETLS || x.status == RR_HTTP_ECONNLOST);
  /* A certificate file that does not exist. */
  base_request(&r, RR_HTTP_GET, "/echo");
  r.cert_file = pki("missing.pem");
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, RR_ETLS);
}

/* Bodies over max_response_bytes: announced (Content-Length) and not
 * (chunked); exactly at the limit is fine. */
static void test_body_limit(void) {
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_GET, "/large/200000");
  r.max_response_bytes = 100000;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, RR_ELIMIT);
  CHECK_EQ_INT(x.http, 0);
  CHECK_EQ_INT(x.body_len, 0);

  base_request(&r, RR_HTTP_GET, "/chunked/200000");
  r.max_response_bytes = 100000;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, RR_ELIMIT);
  CHECK(x.body_bytes <= 100000);

  base_request(&r, RR_HTTP_GET, "/large/100000");
  r.max_response_bytes = 100000;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, 0);
  CHECK_EQ_INT(x.body_len, 100000);

  base_request(&r, RR_HTTP_GET, "/chunked/100000");
  r.max_response_bytes = 100000;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, 0);
  CHECK_EQ_INT(x.body_len, 100000);

  /* Headers over their own limit. */
  base_request(&r, RR_HTTP_GET, "/echo");
  r.max_header_bytes = 16;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, RR_ELIMIT);
}

typedef struct sink {
  uint64_t bytes;
  int calls, bad;
  uint64_t stop_after;
} sink_t;

static int count_sink(void *ud, const char *data, size_t len) {
  sink_t *s = ud;
  s->calls++;
  for (size_t i = 0; i < len; i++)
    s->bad += data[i] != 'y';
  s->bytes += len;
  return s->stop_after && s->bytes >= s->stop_after ? RR_EIO : 0;
}

/* A sink gets the body instead of the buffer; its error aborts. */
static void test_sink(void) {
  rr_http_request_t r;
  result_t x;
  sink_t s = {0};
  base_request(&r, RR_HTTP_GET, "/chunked/300000");
  r.sink = count_sink;
  r.sink_ud = &s;
  r.max_response_bytes = 1 << 20;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, 0);
  CHECK_EQ_INT(x.http, 200);
  CHECK_EQ_INT(s.bytes, 300000);
  CHECK_EQ_INT(x.body_bytes, 300000);
  CHECK_EQ_INT(x.body_len, 0);
  CHECK_EQ_INT(s.bad, 0);
  CHECK(s.calls > 1);

  memset(&s, 0, sizeof s);
  s.stop_after = 1;
  base_request(&r, RR_HTTP_GET, "/chunked/300000");
  r.sink = count_sink;
  r.sink_ud = &s;
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, RR_EIO);
}

/* The server closes the connection without answering. */
static void test_closed_without_answer(void) {
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_GET, "/close");
  run(client, &r, &x);
  CHECK_EQ_INT(x.status, RR_HTTP_ECONNLOST);
  CHECK_EQ_INT(x.http, 0);
  /* The client goes on working. */
  base_request(&r, RR_HTTP_GET, "/status/201");
  run(client, &r, &x);
  CHECK_EQ_INT(x.http, 201);
}

static int calls_total(const result_t *xs, int n) {
  int sum = 0;
  for (int i = 0; i < n; i++)
    sum += xs[i].calls;
  return sum;
}

/* 100 requests at once, at most 8 running: all complete once, the peer
 * never sees more than 8 at a time, and connections are reused. */
static void test_concurrency(void) {
  enum { N = 100, LIMIT = 8 };
  static result_t xs[N];
  rr_http_client_t *c = new_client(LIMIT);
  peer_stats_reset(c);
  long conns_before = peer_stat(c, "connections");
  rr_http_request_t r;
  for (int i = 0; i < N; i++) {
    base_request(&r, RR_HTTP_GET, "/slow");
    CHECK_EQ_INT(submit(c, &r, &xs[i], NULL), 0);
  }
  rr_http_client_stats_t st = stats(c);
  CHECK_EQ_INT(st.running, LIMIT);
  CHECK_EQ_INT(st.waiting, N - LIMIT);
  CHECK(WAIT_UNTIL(calls_total(xs, N) == N, 60000));
  int ok = 0, once = 0;
  for (int i = 0; i < N; i++) {
    ok += xs[i].status == 0 && xs[i].http == 200;
    once += xs[i].calls == 1;
  }
  CHECK_EQ_INT(ok, N);
  CHECK_EQ_INT(once, N);
  st = stats(c);
  CHECK_EQ_INT(st.max_running, LIMIT);
  long max_active = peer_stat(c, "max_active");
  long conns = peer_stat(c, "connections") - conns_before;
  if (getenv("RR_TEST_VERBOSE"))
    fprintf(stderr, "  peer: max_active=%ld new_connections=%ld\n", max_active, conns);
  CHECK(max_active >= 2 && max_active <= LIMIT);
  CHECK(conns >= 1 && conns <= LIMIT);
  close_client(c);
}

/* Cancel a running and a waiting transfer: each callback once, with
 * UV_ECANCELED, never inside the cancel call. */
static void test_cancel(void) {
  rr_http_client_t *c = new_client(1);
  rr_http_request_t r;
  result_t a, b, d;
  rr_http_transfer_t *ta = NULL, *tb = NULL;
  base_request(&r, RR_HTTP_GET, "/delay/5000");
  CHECK_EQ_INT(submit(c, &r, &a, &ta), 0);
  base_request(&r, RR_HTTP_GET, "/echo");
  CHECK_EQ_INT(submit(c, &r, &b, &tb), 0);
  CHECK(ta && tb);
  CHECK(WAIT_UNTIL(stats(c).sockets > 0, 5000)); /* a is in flight */
  CHECK_EQ_INT(stats(c).waiting, 1);
  in_api = 1;
  rr_http_client_cancel(tb);
  rr_http_client_cancel(tb);
  in_api = 0;
  CHECK(WAIT_UNTIL(b.calls > 0, 5000));
  CHECK_EQ_INT(b.status, UV_ECANCELED);
  CHECK_EQ_INT(a.calls, 0);
  in_api = 1;
  rr_http_client_cancel(ta);
  in_api = 0;
  CHECK(WAIT_UNTIL(a.calls > 0, 5000));
  CHECK_EQ_INT(a.status, UV_ECANCELED);
  CHECK(a.elapsed_ms < 4000);
  /* The client serves the next request; nothing more comes for a or b. */
  base_request(&r, RR_HTTP_GET, "/status/404");
  run(c, &r, &d);
  CHECK_EQ_INT(d.http, 404);
  CHECK_EQ_INT(a.calls, 1);
  CHECK_EQ_INT(b.calls, 1);
  rr_http_client_stats_t st = stats(c);
  CHECK_EQ_INT(st.canceled, 2);
  CHECK_EQ_INT(st.running, 0);
  close_client(c);
}

/* Closing with transfers running and waiting: each callback exactly once
 * with UV_ECANCELED, then closed_cb; submit is refused meanwhile. */
static void test_close_in_flight(void) {
  enum { N = 6 };
  result_t xs[N];
  rr_http_client_t *c = new_client(2);
  rr_http_request_t r;
  for (int i = 0; i < N; i++) {
    base_request(&r, RR_HTTP_POST, "/delay/5000");
    r.body = "{\"n\":1}";
    r.body_len = 7;
    CHECK_EQ_INT(submit(c, &r, &xs[i], NULL), 0);
  }
  CHECK(WAIT_UNTIL(stats(c).sockets >= 2, 5000));
  int closed = 0;
  in_api = 1;
  rr_http_client_close(c, on_closed, &closed);
  rr_http_client_close(c, on_closed, &closed);
  in_api = 0;
  result_t late;
  CHECK_EQ_INT(submit(c, &r, &late, NULL), UV_ECANCELED);
  CHECK(WAIT_UNTIL(closed == 1, 5000));
  for (int i = 0; i < N; i++) {
    CHECK_EQ_INT(xs[i].calls, 1);
    CHECK_EQ_INT(xs[i].status, UV_ECANCELED);
  }
  CHECK_EQ_INT(late.calls, 0);
}

/* A completion callback that submits the next request, and one that closes
 * its own client. */
static rr_http_client_t *chain_client;
static int chain_left, chain_closed;
static void on_chain(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r) {
  result_t *x = ud;
  on_done(ud, t, r);
  if (--chain_left > 0) {
    rr_http_request_t next;
    base_request(&next, RR_HTTP_GET, "/status/201");
    memset(x, 0, sizeof *x);
    in_api = 1;
    CHECK_EQ_INT(rr_http_client_submit(chain_client, &next, on_chain, x, NULL), 0);
    in_api = 0;
  } else {
    in_api = 1;
    rr_http_client_close(chain_client, on_closed, &chain_closed);
    in_api = 0;
  }
}

static void test_submit_from_callback(void) {
  chain_client = new_client(4);
  chain_left = 5;
  chain_closed = 0;
  result_t x;
  memset(&x, 0, sizeof x);
  rr_http_request_t r;
  base_request(&r, RR_HTTP_GET, "/status/201");
  CHECK_EQ_INT(rr_http_client_submit(chain_client, &r, on_chain, &x, NULL), 0);
  CHECK(WAIT_UNTIL(chain_closed == 1, 20000));
  CHECK_EQ_INT(chain_left, 0);
  CHECK_EQ_INT(x.http, 201);
}

static void test_invalid(void) {
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_GET, "/echo");
  r.url = "ftp://localhost/x";
  CHECK_EQ_INT(submit(client, &r, &x, NULL), RR_EINVAL);
  r.url = "not a url";
  CHECK_EQ_INT(submit(client, &r, &x, NULL), RR_EINVAL);
  base_request(&r, RR_HTTP_GET, "/echo");
  r.body = "x";
  r.body_len = 1;
  CHECK_EQ_INT(submit(client, &r, &x, NULL), RR_EINVAL);
  base_request(&r, RR_HTTP_POST, "/echo");
  r.bearer_token = "abc\r\nX-Evil: 1";
  CHECK_EQ_INT(submit(client, &r, &x, NULL), RR_EINVAL);
  const char *bad[] = {"NoColon"};
  base_request(&r, RR_HTTP_POST, "/echo");
  r.headers = bad;
  r.nheaders = 1;
  CHECK_EQ_INT(submit(client, &r, &x, NULL), RR_EINVAL);
  base_request(&r, RR_HTTP_GET, "/echo");
  r.timeout_ms = 0;
  CHECK_EQ_INT(submit(client, &r, &x, NULL), RR_EINVAL);
  base_request(&r, RR_HTTP_GET, "/echo");
  CHECK_EQ_INT(rr_http_client_submit(client, &r, NULL, NULL, NULL), RR_EINVAL);
  CHECK_EQ_INT(x.calls, 0);
  rr_http_client_config_t cfg;
  rr_http_client_config_default(&cfg);
  cfg.max_concurrent = 0;
  rr_http_client_t *c = NULL;
  CHECK_EQ_INT(rr_http_client_new(&loop, &cfg, &c), RR_EINVAL);
  CHECK(c == NULL);
  rr_http_client_close(NULL, NULL, NULL);
}

static void write_file(const char *path, const char *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (f) {
    fwrite(data, 1, len, f);
    fclose(f);
  }
}

static void test_token_file(void) {
  char path[512];
  snprintf(path, sizeof path, "%s/token", dir);
  char *tok = NULL;
  rr_buf_t err;
  rr_buf_init(&err, 4096);

  write_file(path, "secret-token.1\n", 15);
  CHECK_EQ_INT(rr_http_client_read_token(path, &tok, &err), 0);
  CHECK(tok && strcmp(tok, "secret-token.1") == 0);
  rr_http_client_token_free(tok);
  tok = NULL;

  write_file(path, "abc\r\n", 5);
  CHECK_EQ_INT(rr_http_client_read_token(path, &tok, NULL), 0);
  CHECK(tok && strcmp(tok, "abc") == 0);
  rr_http_client_token_free(tok);
  tok = NULL;

  write_file(path, "abc", 3);
  CHECK_EQ_INT(rr_http_client_read_token(path, &tok, NULL), 0);
  CHECK(tok && strcmp(tok, "abc") == 0);
  rr_http_client_token_free(tok);
  tok = NULL;

  write_file(path, "\n", 1);
  CHECK_EQ_INT(rr_http_client_read_token(path, &tok, &err), RR_EINVAL);
  CHECK(strstr(err.data, "empty") != NULL);
  rr_buf_reset(&err);

  write_file(path, "one\ntwo\n", 8);
  CHECK_EQ_INT(rr_http_client_read_token(path, &tok, &err), RR_EINVAL);
  CHECK(tok == NULL);
  rr_buf_reset(&err);

  static char big[20000];
  memset(big, 'a', sizeof big);
  write_file(path, big, sizeof big);
  CHECK_EQ_INT(rr_http_client_read_token(path, &tok, &err), RR_ELIMIT);
  rr_buf_reset(&err);

  snprintf(path, sizeof path, "%s/no-such-token", dir);
  CHECK_EQ_INT(rr_http_client_read_token(path, &tok, &err), -ENOENT);
  CHECK(err.data && strstr(err.data, path) != NULL);
  CHECK(err.data && strstr(err.data, "No such file") != NULL);
  CHECK(tok == NULL);
  rr_http_client_token_free(NULL);
  rr_buf_close(&err);
}

/* The token from a file is what the server sees. */
static void test_token_file_request(void) {
  char path[512];
  snprintf(path, sizeof path, "%s/token2", dir);
  write_file(path, "from-file-42\n", 13);
  char *tok = NULL;
  CHECK_EQ_INT(rr_http_client_read_token(path, &tok, NULL), 0);
  rr_http_request_t r;
  result_t x;
  base_request(&r, RR_HTTP_POST, "/echo");
  r.bearer_token = tok;
  run(client, &r, &x);
  rr_http_client_token_free(tok);
  CHECK_MEM_STR(x.auth, strlen(x.auth), "Bearer from-file-42");
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s PYTHON PEER_SCRIPT GEN_CERTS\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  const char *v = getenv("RR_TEST_VERBOSE");
  rr_log_set_level(v && v[0] == '1' ? RR_LOG_DEBUG : RR_LOG_ERROR);
  snprintf(dir, sizeof dir, "/tmp/rr-http-client-XXXXXX");
  if (!mkdtemp(dir))
    return 2;
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "%s %s/pki", argv[3], dir);
  if (system(cmd) != 0) {
    fprintf(stderr, "gen-certs failed\n");
    return 2;
  }
  uv_loop_init(&loop);
  uv_timer_init(&loop, &deadline_timer);
  if (peer_start(argv[1], argv[2]) != 0) {
    fprintf(stderr, "peer did not start\n");
    return 2;
  }
  client = new_client(8);

  RUN(test_post_json);
  RUN(test_statuses);
  RUN(test_timeout);
  RUN(test_refused);
  RUN(test_wrong_ca);
  RUN(test_no_client_cert);
  RUN(test_body_limit);
  RUN(test_sink);
  RUN(test_closed_without_answer);
  RUN(test_concurrency);
  RUN(test_cancel);
  RUN(test_close_in_flight);
  RUN(test_submit_from_callback);
  RUN(test_invalid);
  RUN(test_token_file);
  RUN(test_token_file_request);

  close_client(client);
  CHECK_EQ_INT(sync_callbacks, 0);
  peer_stop();
  uv_close((uv_handle_t *)&deadline_timer, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "cannot remove %s\n", dir);
  return TEST_SUMMARY();
}

/* The HTTP server in a small program for test_http_server.py to drive with
 * curl, Python's http.client and raw sockets. Prints "port=N" once
 * listening; SIGTERM stops the server and exits once it has freed itself.
 *
 *   test_http_server [--tokens FILE] [--static DIR] [--cert F --key F]
 *                    [--ca F [--require-client-cert] [--allow ID]...]
 *                    [--max-connections N] [--max-per-peer N]
 *                    [--header-timeout MS] [--body-timeout MS] [--idle-timeout MS]
 *
 * Routes:
 *   GET  /health                         public    {"status":"ok"}
 *   GET  /stats                          public    server counters + this program's
 *   GET  /api/studies/{uid}              viewer    echo of the request (JSON)
 *   POST /api/studies/{uid}/complete     operator  application/json, max 1 KiB;
 *                                                  202 after a 50 ms timer
 *   POST /echo                           public    the body back, same type
 *   GET  /slow?ms=N                      public    200 after an N ms timer
 *   POST /admin/reload                   admin     rr_http_server_reload
 *   GET  /dashboard/...                  public    static files from --static
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "core/log.h"
#include "http/server.h"

static uv_loop_t *loop;
static rr_http_server_t *server;
static uint64_t late_canceled, late_sent, slow_started;
static unsigned timers_running;

typedef struct later {
  uv_timer_t timer;
  rr_http_req_t *req;
  int status;
  json_t *body;
} later_t;

static void on_later_closed(uv_handle_t *h) {
  free(h->data);
}

static void on_later(uv_timer_t *t) {
  later_t *l = t->data;
  int gone = rr_http_req_gone(l->req);
  int rc = rr_http_reply_json(l->req, l->status, l->body);
  if (rc == UV_ECANCELED && gone)
    late_canceled++;
  else if (rc == 0)
    late_sent++;
  timers_running--;
  uv_close((uv_handle_t *)t, on_later_closed);
}

/* Answers req after ms on the loop's clock, from a timer: an asynchronous
 * reply such as one after a database commit. */
static void reply_later(rr_http_req_t *req, uint64_t ms, int status, json_t *body) {
  later_t *l = calloc(1, sizeof *l);
  if (!l) {
    json_decref(body);
    rr_http_reply_error(req, 500, "internal_error", "Out of memory.");
    return;
  }
  l->req = req;
  l->status = status;
  l->body = body;
  uv_timer_init(loop, &l->timer);
  l->timer.data = l;
  timers_running++;
  uv_timer_start(&l->timer, on_later, ms, 0);
}

static void h_health(void *ud, rr_http_req_t *req) {
  (void)ud;
  rr_http_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

static void h_stats(void *ud, rr_http_req_t *req) {
  (void)ud;
  rr_http_server_stats_t st;
  rr_http_server_stats(server, &st);
  rr_http_reply_json(
      req, 200,
      json_pack("{s:I, s:I, s:I, s:i, s:I, s:[I,I,I,I,I,I], s:I, s:I, s:I, s:I, s:I}", "accepted",
                (json_int_t)st.accepted, "refused", (json_int_t)st.refused, "tls_refused",
                (json_int_t)st.tls_refused, "connections", (int)st.connections, "requests",
                (json_int_t)st.requests, "status", (json_int_t)st.status[0],
                (json_int_t)st.status[1], (json_int_t)st.status[2], (json_int_t)st.status[3],
                (json_int_t)st.status[4], (json_int_t)st.status[5], "timeouts",
                (json_int_t)st.timeouts, "late_canceled", (json_int_t)late_canceled, "late_sent",
                (json_int_t)late_sent, "bytes_in", (json_int_t)st.bytes_in, "slow_started",
                (json_int_t)slow_started));
}

static void h_study(void *ud, rr_http_req_t *req) {
  (void)ud;
  json_t *q = json_array();
  for (size_t i = 0; i < rr_http_req_query_count(req); i++) {
    const char *k, *v;
    rr_http_req_query_at(req, i, &k, &v);
    json_array_append_new(q, json_pack("[s,s]", k, v));
  }
  const rr_http_principal_t *p = rr_http_req_principal(req);
  rr_http_reply_json(
      req, 200,
      json_pack("{s:s, s:s, s:s, s:o, s:s, s:s, s:s?, s:s}", "route", rr_http_req_route(req), "uid",
                rr_http_req_param(req, "uid"), "path", rr_http_req_path(req), "query", q,
                "principal", p->name, "role", rr_http_role_name(p->role), "thing",
                rr_http_req_header(req, "x-thing"), "method", rr_http_req_method(req)));
}

static void h_complete(void *ud, rr_http_req_t *req) {
  (void)ud;
  size_t len;
  const char *body = rr_http_req_body(req, &len);
  json_error_t je;
  json_t *j = json_loadb(body, len, 0, &je);
  if (!j) {
    rr_http_reply_error(req, 400, "bad_json", "The body is not JSON.");
    return;
  }
  json_decref(j);
  reply_later(req, 50, 202,
              json_pack("{s:s, s:s, s:I}", "uid", rr_http_req_param(req, "uid"), "by",
                        rr_http_req_principal(req)->name, "body_bytes", (json_int_t)len));
}

static void h_echo(void *ud, rr_http_req_t *req) {
  (void)ud;
  size_t len;
  const char *body = rr_http_req_body(req, &len);
  const char *ct = rr_http_req_header(req, "content-type");
  rr_http_reply(req, 200, ct ? ct : "application/octet-stream", body, len);
}

static void h_slow(void *ud, rr_http_req_t *req) {
  (void)ud;
  const char *ms = rr_http_req_query(req, "ms");
  char *end = NULL;
  unsigned long v = ms ? strtoul(ms, &end, 10) : 100;
  slow_started++;
  reply_later(req, v, 200, json_pack("{s:s, s:s}", "slow", "done", "ms", ms ? ms : "100"));
}

static void h_reload(void *ud, rr_http_req_t *req) {
  (void)ud;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  int rc = rr_http_server_reload(server, &err);
  if (rc)
    rr_http_reply_error(req, 500, "reload_failed", err.data ? err.data : rr_strerror(rc));
  else
    rr_http_reply_json(req, 200, json_pack("{s:b}", "reloaded", 1));
  rr_buf_close(&err);
}

static uv_signal_t sigterm;

static void on_walk_close(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h))
    uv_close(h, NULL);
}

static void on_sigterm(uv_signal_t *h, int signum) {
  (void)signum;
  rr_http_server_stop(server);
  server = NULL;
  uv_close((uv_handle_t *)h, NULL);
}

int main(int argc, char **argv) {
  rr_http_server_config_t cfg;
  rr_http_server_config_default(&cfg);
  rr_tls_config_t tls;
  memset(&tls, 0, sizeof tls);
  tls.role = RR_TLS_SERVER;
  const char *allow[8];
  rr_http_static_dir_t st = {"/dashboard", NULL, RR_HTTP_PUBLIC};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--require-client-cert") == 0) {
      tls.require_client_cert = 1;
      continue;
    }
    if (!v) {
      fprintf(stderr, "test_http_server: %s needs a value\n", a);
      return 2;
    }
    i++;
    if (strcmp(a, "--tokens") == 0)
      cfg.token_file = v;
    else if (strcmp(a, "--static") == 0)
      st.dir = v;
    else if (strcmp(a, "--cert") == 0)
      tls.cert_file = v;
    else if (strcmp(a, "--key") == 0)
      tls.key_file = v;
    else if (strcmp(a, "--ca") == 0)
      tls.ca_file = v;
    else if (strcmp(a, "--crl") == 0)
      tls.crl_file = v;
    else if (strcmp(a, "--allow") == 0 && tls.nallow < 8)
      allow[tls.nallow++] = v;
    else if (strcmp(a, "--max-connections") == 0)
      cfg.max_connections = (unsigned)strtoul(v, NULL, 10);
    else if (strcmp(a, "--max-per-peer") == 0)
      cfg.max_per_peer = (unsigned)strtoul(v, NULL, 10);
    else if (strcmp(a, "--header-timeout") == 0)
      cfg.header_timeout_ms = strtoull(v, NULL, 10);
    else if (strcmp(a, "--body-timeout") == 0)
      cfg.body_timeout_ms = strtoull(v, NULL, 10);
    else if (strcmp(a, "--idle-timeout") == 0)
      cfg.idle_timeout_ms = strtoull(v, NULL, 10);
    else {
      fprintf(stderr, "test_http_server: unknown option %s\n", a);
      return 2;
    }
  }
  tls.allow = allow;
  /* enough descriptors for the many-connections case */
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  static const rr_http_route_t routes[] = {
      {"GET", "/health", RR_HTTP_PUBLIC, NULL, 0, h_health, NULL, 0},
      {"GET", "/stats", RR_HTTP_PUBLIC, NULL, 0, h_stats, NULL, 0},
      {"GET", "/api/studies/{uid}", RR_HTTP_VIEWER, NULL, 0, h_study, NULL, 0},
      {"POST", "/api/studies/{uid}/complete", RR_HTTP_OPERATOR, "application/json", 1024,
       h_complete, NULL, 0},
      {"POST", "/echo", RR_HTTP_PUBLIC, NULL, 0, h_echo, NULL, 0},
      {"GET", "/slow", RR_HTTP_PUBLIC, NULL, 0, h_slow, NULL, 0},
      {"POST", "/admin/reload", RR_HTTP_ADMIN, NULL, 0, h_reload, NULL, 0},
  };
  cfg.routes = routes;
  cfg.nroutes = sizeof routes / sizeof routes[0];
  if (st.dir) {
    cfg.statics = &st;
    cfg.nstatics = 1;
  }
  if (tls.cert_file)
    cfg.tls = &tls;
  loop = uv_default_loop();
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  int rc = rr_http_server_start(loop, &cfg, &server, &err);
  if (rc) {
    fprintf(stderr, "test_http_server: %s (%s)\n", err.data ? err.data : "", rr_strerror(rc));
    rr_buf_close(&err);
    return 1;
  }
  rr_buf_close(&err);
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigterm, on_sigterm, SIGTERM);
  printf("port=%d\n", rr_http_server_port(server));
  fflush(stdout);
  uv_run(loop, UV_RUN_DEFAULT);
  if (timers_running)
    fprintf(stderr, "test_http_server: %u replies still pending at exit\n", timers_running);
  uv_walk(loop, on_walk_close, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  return timers_running ? 1 : 0;
}

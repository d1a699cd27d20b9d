/* The engine's REST API: routes on the HTTP server, answered from the
 * engine and its journal. */
#include "admin/api.h"

#include <stdlib.h>
#include <string.h>

#include "core/log.h"

struct rr_admin {
  rr_http_server_t *server;
  rr_engine_t *engine;
  rr_journal_t *journal;
};

/* A DICOM UID: 1..64 digits and dots. */
static bool is_uid(const char *s) {
  size_t n = s ? strlen(s) : 0;
  return n > 0 && n <= 64 && strspn(s, "0123456789.") == n;
}

static const char *who(const rr_http_req_t *req) {
  return rr_http_req_principal(req)->name;
}

static void health(void *ud, rr_http_req_t *req) {
  (void)ud;
  rr_http_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

typedef struct completing {
  rr_http_req_t *req;
  char uid[65];
} completing_t;

static void on_completed(void *ud, int status, bool changed) {
  completing_t *c = ud;
  if (status)
    rr_http_reply_error(c->req, 503, "store_unavailable", "the store could not record it");
  else
    rr_http_reply_json(c->req, 200,
                       json_pack("{s:s, s:b}", "study_uid", c->uid, "changed", changed));
  free(c);
}

static void study_complete(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *uid = rr_http_req_param(req, "uid");
  if (!is_uid(uid)) {
    rr_http_reply_error(req, 400, "bad_uid", "a Study Instance UID is 1 to 64 digits and dots");
    return;
  }
  completing_t *c = malloc(sizeof *c);
  if (!c) {
    rr_http_reply_error(req, 500, "internal_error", "out of memory");
    return;
  }
  c->req = req;
  strcpy(c->uid, uid);
  rr_log(RR_LOG_INFO, "api", "event=study_complete_requested principal=%s", who(req));
  rr_log(RR_LOG_DEBUG, "api", "event=study_complete_requested study_uid=%s", uid);
  int rc = rr_engine_complete_study(a->engine, uid, on_completed, c);
  if (rc) {
    free(c);
    rr_http_reply_error(req, 503, "unavailable", rr_strerror(rc));
  }
}

static void source_notify(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  size_t len;
  const char *body = rr_http_req_body(req, &len);
  json_error_t jerr;
  json_t *o = json_loadb(body, len, 0, &jerr);
  const char *uid = json_string_value(json_object_get(o, "study_uid"));
  json_t *complete = json_object_get(o, "complete");
  if (!json_is_object(o) || !is_uid(uid) || (complete && !json_is_boolean(complete))) {
    json_decref(o);
    rr_http_reply_error(req, 400, "bad_request",
                        "the body is {\"study_uid\": \"<UID>\", \"complete\": true|false}");
    return;
  }
  const char *channel = rr_http_req_param(req, "channel");
  int rc = rr_engine_dicomweb_notify(a->engine, channel, uid, json_is_true(complete));
  if (rc == 0) /* before the reply, which frees req and what it holds */
    rr_log(RR_LOG_INFO, "api", "event=source_notified principal=%s channel=%s", who(req), channel);
  if (rc == RR_ENOTFOUND)
    rr_http_reply_error(req, 404, "not_found", "no DICOMweb source channel of that name");
  else if (rc)
    rr_http_reply_error(req, 503, "unavailable", rr_strerror(rc));
  else
    rr_http_reply_json(req, 202, json_pack("{s:s, s:s}", "channel", channel, "status", "queued"));
  json_decref(o);
}

static void reply_text_json(rr_http_req_t *req, int rc, rr_buf_t *out, const char *what) {
  json_t *v = rc == 0 ? json_loadb(out->data, out->len, 0, NULL) : NULL;
  if (rc == RR_ENOTFOUND)
    rr_http_reply_error(req, 404, "not_found", what);
  else if (!v)
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
  else
    rr_http_reply_json(req, 200, v);
}

static void study_get(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *uid = rr_http_req_param(req, "uid");
  if (!is_uid(uid)) {
    rr_http_reply_error(req, 400, "bad_uid", "a Study Instance UID is 1 to 64 digits and dots");
    return;
  }
  rr_buf_t out;
  rr_buf_init(&out, (size_t)64 << 20);
  int64_t order_id;
  const char *method;
  /* The match as routing made it is in the store; this shows the current
   * best match with a one-day window. */
  int rc = rr_journal_study_context(a->journal, uid, 24 * 3600 * 1000, &out, &order_id, &method);
  reply_text_json(req, rc, &out, "no study with that Study Instance UID");
  rr_buf_close(&out);
}

static void order_get(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *acc = rr_http_req_param(req, "accession");
  if (!acc || !*acc || strlen(acc) > 256) {
    rr_http_reply_error(req, 400, "bad_accession", "an accession number is 1 to 256 bytes");
    return;
  }
  rr_buf_t out;
  rr_buf_init(&out, (size_t)16 << 20);
  int rc = rr_journal_order_get(a->journal, acc, &out);
  reply_text_json(req, rc, &out, "no order with that accession number");
  rr_buf_close(&out);
}

int rr_admin_start(uv_loop_t *loop, rr_engine_t *e, rr_journal_t *j, const rr_admin_config_t *cfg,
                   rr_admin_t **out, rr_buf_t *err) {
  rr_admin_t *a = calloc(1, sizeof *a);
  if (!a)
    return RR_ENOMEM;
  a->engine = e;
  a->journal = j;
  const rr_http_route_t routes[] = {
      {"GET", "/health", RR_HTTP_PUBLIC, NULL, 0, health, a},
      {"POST", "/api/studies/{uid}/complete", RR_HTTP_OPERATOR, NULL, 4096, study_complete, a},
      {"POST", "/api/sources/{channel}/notify", RR_HTTP_OPERATOR, "application/json", 4096,
       source_notify, a},
      {"GET", "/api/studies/{uid}", RR_HTTP_VIEWER, NULL, 0, study_get, a},
      {"GET", "/api/orders/{accession}", RR_HTTP_VIEWER, NULL, 0, order_get, a},
  };
  rr_http_server_config_t sc;
  rr_http_server_config_default(&sc);
  sc.name = "api";
  sc.host = cfg->host && *cfg->host ? cfg->host : "127.0.0.1";
  sc.port = cfg->port;
  sc.tls = cfg->tls;
  sc.token_file = cfg->token_file && *cfg->token_file ? cfg->token_file : NULL;
  sc.routes = routes;
  sc.nroutes = sizeof routes / sizeof routes[0];
  int rc = rr_http_server_start(loop, &sc, &a->server, err);
  if (rc) {
    free(a);
    return rc;
  }
  *out = a;
  return 0;
}

int rr_admin_port(const rr_admin_t *a) {
  return rr_http_server_port(a->server);
}

int rr_admin_reload(rr_admin_t *a, rr_buf_t *err) {
  return rr_http_server_reload(a->server, err);
}

void rr_admin_stop(rr_admin_t *a) {
  if (!a)
    return;
  rr_http_server_stop(a->server);
  free(a);
}

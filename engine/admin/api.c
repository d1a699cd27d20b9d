/* The engine's REST API: routes on the HTTP server, answered from the
 * engine and its journal. */
#include "admin/api.h"

#include <errno.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "admin/api_dicomweb.h"
#include "ai/ai.h"
#include "core/log.h"
#include "notify/notify.h"

#include "admin/api_int.h"

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
  snprintf(c->uid, sizeof c->uid, "%s", uid);
  rr_log(RR_LOG_INFO, "api", "event=study_complete_requested principal=%s", who(req));
  rr_journal_audit_json(a->journal, who(req), "study_complete", uid,
                        json_pack("{s:s}", "via", "api"));
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
  if (rc == 0) { /* before the reply, which frees req and what it holds */
    rr_log(RR_LOG_INFO, "api", "event=source_notified principal=%s channel=%s", who(req), channel);
    rr_journal_audit_json(
        a->journal, who(req), "source_notify", uid,
        json_pack("{s:s, s:b}", "channel", channel, "complete", json_is_true(complete)));
  }
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

/* ---- AI jobs -------------------------------------------------------------- */

typedef struct result_kept {
  rr_http_req_t *req;
  char job_id[RR_AI_JOB_ID_MAX];
} result_kept_t;

static void on_result_kept(void *ud, int status, int64_t id) {
  result_kept_t *k = ud;
  (void)id;
  if (status)
    rr_http_reply_error(k->req, 503, "store_unavailable", "the result could not be recorded");
  else
    rr_http_reply_json(k->req, 200,
                       json_pack("{s:s, s:s}", "job_id", k->job_id, "status", "recorded"));
  free(k);
}

/* POST /api/ai/jobs/{id}/result: an endpoint's result, with the one-job
 * token the request carried; answered once it is recorded. */
static void ai_result(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *id = rr_http_req_param(req, "id");
  const char *auth = rr_http_req_header(req, "authorization");
  const char *token = auth && strncasecmp(auth, "bearer ", 7) == 0 ? auth + 7 : NULL;
  if (!id || strlen(id) >= RR_AI_JOB_ID_MAX) {
    rr_http_reply_error(req, 404, "not_found", "no such job");
    return;
  }
  if (!token) {
    rr_http_reply_error(req, 401, "unauthorized", "the job's bearer token is required");
    return;
  }
  result_kept_t *k = malloc(sizeof *k);
  if (!k) {
    rr_http_reply_error(req, 500, "internal_error", "out of memory");
    return;
  }
  k->req = req;
  snprintf(k->job_id, sizeof k->job_id, "%s", id);
  size_t len;
  const char *body = rr_http_req_body(req, &len);
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  int rc = rr_engine_ai_callback(a->engine, id, token, body, len, on_result_kept, k, &err);
  if (rc) {
    free(k);
    char msg[300];
    snprintf(msg, sizeof msg, "%s", err.data ? err.data : rr_strerror(rc));
    if (rc == RR_ENOTFOUND)
      rr_http_reply_error(req, 404, "not_found", msg);
    else if (rc == -EPERM)
      rr_http_reply_error(req, 401, "unauthorized", msg);
    else if (rc == -EEXIST)
      rr_http_reply_error(req, 409, "conflict", msg);
    else if (rc == RR_EPARSE)
      rr_http_reply_error(req, 400, "bad_result", msg);
    else
      rr_http_reply_error(req, 503, "unavailable", msg);
  }
  rr_buf_close(&err);
}

/* An AI job as the API shows it: JOB_COLUMNS as job_fields. */
#define JOB_COLUMNS                                                                                \
  "job_id, destination, study_uid, mode, state, sent_ms, deadline_ms, result_ms, model_name,"      \
  " model_version, critical, acr_category, reason"
#define JOB_FIELDS 13
static const char *const job_fields[JOB_FIELDS] = {
    "job_id",   "endpoint",     "study_uid", "mode",       "state",
    "sent_ms",  "deadline_ms",  "result_ms", "model_name", "model_version",
    "critical", "acr_category", "reason"};

/* GET /api/ai/jobs?state=&endpoint=&study_uid=&since=&limit=: jobs, newest
 * first, without their request and result documents. */
static void ai_jobs_list(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *state = rr_http_req_query(req, "state");
  const char *endpoint = rr_http_req_query(req, "endpoint");
  const char *uid = rr_http_req_query(req, "study_uid");
  const char *qs = rr_http_req_query(req, "since"), *ql = rr_http_req_query(req, "limit");
  long long since = qs ? strtoll(qs, NULL, 10) : 0;
  long limit = ql ? strtol(ql, NULL, 10) : 100;
  if (limit < 1 || limit > 1000)
    limit = 100;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(a->journal),
                         "SELECT " JOB_COLUMNS " FROM ai_jobs WHERE (?1 IS NULL OR state = ?1)"
                         " AND (?2 IS NULL OR destination = ?2) AND (?3 IS NULL OR study_uid = ?3)"
                         " AND coalesce(sent_ms, 0) >= ?4 ORDER BY sent_ms DESC LIMIT ?5",
                         -1, &st, NULL) != SQLITE_OK) {
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  const char *binds[] = {state, endpoint, uid};
  for (int i = 0; i < 3; i++)
    if (binds[i])
      sqlite3_bind_text(st, i + 1, binds[i], -1, SQLITE_TRANSIENT);
    else
      sqlite3_bind_null(st, i + 1);
  sqlite3_bind_int64(st, 4, since);
  sqlite3_bind_int64(st, 5, limit);
  json_t *rows = json_array();
  while (sqlite3_step(st) == SQLITE_ROW) {
    json_t *o = json_object();
    rr_admin_columns(o, st, job_fields, JOB_FIELDS);
    json_array_append_new(rows, o);
  }
  sqlite3_finalize(st);
  rr_http_reply_json(req, 200, json_pack("{s:o}", "jobs", rows));
}

/* GET /api/ai/jobs/{id}: the job's state and result. */
static void ai_job_get(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(a->journal),
                         "SELECT " JOB_COLUMNS ", result FROM ai_jobs WHERE job_id = ?", -1, &st,
                         NULL) != SQLITE_OK) {
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  sqlite3_bind_text(st, 1, rr_http_req_param(req, "id"), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st) != SQLITE_ROW) {
    sqlite3_finalize(st);
    rr_http_reply_error(req, 404, "not_found", "no such job");
    return;
  }
  json_t *o = json_object();
  rr_admin_columns(o, st, job_fields, JOB_FIELDS);
  json_t *res = sqlite3_column_type(st, JOB_FIELDS) == SQLITE_NULL
                    ? json_null()
                    : json_loads((const char *)sqlite3_column_text(st, JOB_FIELDS), 0, NULL);
  json_object_set_new(o, "result", res ? res : json_null());
  sqlite3_finalize(st);
  rr_http_reply_json(req, 200, o);
}

/* GET /api/worklist: stable studies of the last days, AI-critical first
 * (findings of endpoints in active mode only), then STAT orders, then the
 * oldest. */
static void worklist(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *d = rr_http_req_query(req, "days");
  long days = d ? strtol(d, NULL, 10) : 7;
  if (days < 1 || days > 366)
    days = 7;
  sqlite3_stmt *st;
  const char *sql =
      "SELECT s.study_uid, s.accession, s.modality, s.body_part, s.description, s.stable_ms,"
      " o.priority, json_extract(o.record, '$.reason'),"
      " (SELECT max(f.critical) FROM ai_findings f JOIN ai_jobs j USING (job_id)"
      "   WHERE f.study_uid = s.study_uid AND j.mode = 'active') AS critical,"
      " (SELECT min(f.acr_category) FROM ai_findings f JOIN ai_jobs j USING (job_id)"
      "   WHERE f.study_uid = s.study_uid AND j.mode = 'active') AS acr,"
      " (SELECT json_group_array(f.label) FROM ai_findings f JOIN ai_jobs j USING (job_id)"
      "   WHERE f.study_uid = s.study_uid AND j.mode = 'active' AND f.critical) AS labels"
      " FROM studies s LEFT JOIN orders o ON o.id = s.order_id"
      " WHERE s.state = 'stable' AND s.stable_ms >= ?1"
      " ORDER BY coalesce(critical, 0) DESC, coalesce(acr, 9),"
      " (o.priority IN ('S', 'STAT')) DESC, s.stable_ms LIMIT 1000";
  if (sqlite3_prepare_v2(rr_journal_reader(a->journal), sql, -1, &st, NULL) != SQLITE_OK) {
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  sqlite3_bind_int64(st, 1, ((int64_t)ts.tv_sec - days * 86400) * 1000);
  json_t *rows = json_array();
  while (sqlite3_step(st) == SQLITE_ROW) {
    json_t *labels = sqlite3_column_type(st, 10) == SQLITE_NULL
                         ? NULL
                         : json_loads((const char *)sqlite3_column_text(st, 10), 0, NULL);
    json_t *row = json_object();
    static const char *const cols[] = {"study_uid",   "accession", "modality", "body_part",
                                       "description", "stable_ms", "priority", "reason"};
    rr_admin_columns(row, st, cols, 8);
    json_object_set_new(row, "ai_critical", json_boolean(sqlite3_column_int(st, 8) == 1));
    json_object_set_new(row, "acr_category",
                        sqlite3_column_type(st, 9) == SQLITE_NULL
                            ? json_null()
                            : json_integer(sqlite3_column_int(st, 9)));
    json_object_set_new(row, "ai_findings", labels ? labels : json_array());
    json_array_append_new(rows, row);
  }
  sqlite3_finalize(st);
  rr_http_reply_json(req, 200, json_pack("{s:o}", "studies", rows));
}

/* GET /api/notifications[?state=open|acked|unacknowledged][&limit=N] */
static void notifications_list(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *state = rr_http_req_query(req, "state");
  if (state && strcmp(state, "open") != 0 && strcmp(state, "acked") != 0 &&
      strcmp(state, "unacknowledged") != 0) {
    rr_http_reply_error(req, 400, "bad_state", "state is one of open, acked, unacknowledged");
    return;
  }
  const char *l = rr_http_req_query(req, "limit");
  long limit = l ? strtol(l, NULL, 10) : 200;
  if (limit < 1 || limit > 10000)
    limit = 200;
  json_t *rows = NULL;
  if (rr_notify_list_json(a->journal, state, (size_t)limit, &rows) != 0) {
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  rr_http_reply_json(req, 200, json_pack("{s:o}", "notifications", rows));
}

/* GET /api/notifications/{id}: the notification and its history. */
static void notification_get(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  json_t *o = NULL;
  int rc = rr_notify_json(a->journal, rr_http_req_param(req, "id"), &o);
  if (rc == RR_ENOTFOUND)
    rr_http_reply_error(req, 404, "not_found", "no such notification");
  else if (rc)
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
  else
    rr_http_reply_json(req, 200, o);
}

typedef struct acking {
  rr_admin_t *admin;
  rr_http_req_t *req;
  char id[24];
} acking_t;

static void on_acked(void *ud, int status, int64_t rowid) {
  (void)rowid;
  acking_t *k = ud;
  json_t *o = NULL;
  if (status)
    rr_http_reply_error(k->req, 503, "store_unavailable", "the store could not record it");
  else if (rr_notify_json(k->admin->journal, k->id, &o) != 0)
    rr_http_reply_error(k->req, 500, "internal_error", "the store could not be read");
  else
    rr_http_reply_json(k->req, 200, o);
  free(k);
}

/* POST /api/notifications/{id}/ack, body (optional) {"by": who, "note": text}:
 * answered after the commit that records it. */
static void notification_ack(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  size_t len;
  const char *body = rr_http_req_body(req, &len);
  json_t *o = len ? json_loadb(body, len, 0, NULL) : json_object();
  json_t *by = json_object_get(o, "by"), *note = json_object_get(o, "note");
  if (!json_is_object(o) || (by && (!json_is_string(by) || json_string_length(by) > 127)) ||
      (note && (!json_is_string(note) || json_string_length(note) > 511))) {
    json_decref(o);
    rr_http_reply_error(req, 400, "bad_request",
                        "the body is empty or {\"by\": \"<who>\", \"note\": \"<text>\"}");
    return;
  }
  const char *id = rr_http_req_param(req, "id");
  acking_t *k = calloc(1, sizeof *k);
  if (!k || strlen(id) >= sizeof k->id) {
    free(k);
    json_decref(o);
    rr_http_reply_error(req, k ? 404 : 500, k ? "not_found" : "internal_error",
                        k ? "no such notification" : "out of memory");
    return;
  }
  k->admin = a;
  k->req = req;
  snprintf(k->id, sizeof k->id, "%s", id);
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  int rc = rr_engine_notification_ack(a->engine, k->id, json_string_value(by), who(req),
                                      json_string_value(note), on_acked, k, &err);
  json_decref(o);
  if (rc) {
    const char *msg = err.data ? err.data : rr_strerror(rc);
    if (rc == RR_ENOTFOUND)
      rr_http_reply_error(req, 404, "not_found", msg);
    else if (rc == -EEXIST)
      rr_http_reply_error(req, 409, "conflict", msg);
    else
      rr_http_reply_error(req, 503, "unavailable", msg);
    free(k);
  }
  rr_buf_close(&err);
}

int rr_admin_start(uv_loop_t *loop, rr_engine_t *e, rr_journal_t *j, const rr_admin_config_t *cfg,
                   rr_admin_t **out, rr_buf_t *err) {
  rr_admin_t *a = calloc(1, sizeof *a);
  if (!a)
    return RR_ENOMEM;
  a->engine = e;
  a->journal = j;
  a->dispatch = cfg->dispatch;
  a->start_ms = rr_admin_now_ms();
  a->loop = loop;
  a->dicomweb = (rr_api_dicomweb_t){.loop = loop, .journal = j};
  const rr_http_route_t routes[] = {
      {"GET", "/health", RR_HTTP_PUBLIC, NULL, 0, health, a, 0},
      {"GET", "/ready", RR_HTTP_PUBLIC, NULL, 0, rr_admin_ready, a, 0},
      {"GET", "/metrics", RR_HTTP_VIEWER, NULL, 0, rr_admin_metrics, a, 0},
      {"POST", "/api/studies/{uid}/complete", RR_HTTP_OPERATOR, NULL, 4096, study_complete, a, 0},
      {"POST", "/api/sources/{channel}/notify", RR_HTTP_OPERATOR, "application/json", 4096,
       source_notify, a, 0},
      {"GET", "/api/studies/{uid}", RR_HTTP_VIEWER, NULL, 0, study_get, a, 0},
      {"GET", "/api/orders/{accession}", RR_HTTP_VIEWER, NULL, 0, order_get, a, 0},
      {"POST", "/api/ai/jobs/{id}/result", RR_HTTP_PUBLIC, "application/json", (size_t)16 << 20,
       ai_result, a, 1},
      {"GET", "/api/ai/jobs", RR_HTTP_VIEWER, NULL, 0, ai_jobs_list, a, 0},
      {"GET", "/api/ai/jobs/{id}", RR_HTTP_VIEWER, NULL, 0, ai_job_get, a, 0},
      {"GET", "/api/ai/summary", RR_HTTP_VIEWER, NULL, 0, rr_admin_ai_summary, a, 0},
      {"GET", "/api/worklist", RR_HTTP_VIEWER, NULL, 0, worklist, a, 0},
      {"GET", "/api/messages", RR_HTTP_VIEWER, NULL, 0, rr_admin_messages, a, 0},
      {"GET", "/api/messages/{id}", RR_HTTP_VIEWER, NULL, 0, rr_admin_message, a, 0},
      {"GET", "/api/timeline", RR_HTTP_VIEWER, NULL, 0, rr_admin_timeline, a, 0},
      {"GET", "/api/notifications", RR_HTTP_VIEWER, NULL, 0, notifications_list, a, 0},
      {"GET", "/api/notifications/{id}", RR_HTTP_VIEWER, NULL, 0, notification_get, a, 0},
      {"POST", "/api/notifications/{id}/ack", RR_HTTP_OPERATOR, NULL, 4096, notification_ack, a, 0},
      RR_API_DICOMWEB_ROUTES(&a->dicomweb),
      {"GET", "/", RR_HTTP_PUBLIC, NULL, 0, rr_admin_dashboard_redirect, a, 0},
      {"GET", "/ui", RR_HTTP_PUBLIC, NULL, 0, rr_admin_dashboard_redirect, a, 0},
  };
  a->dashboard = cfg->dashboard && *cfg->dashboard;
  const rr_http_static_dir_t ui = {
      .prefix = "/ui", .dir = cfg->dashboard, .min_role = RR_HTTP_PUBLIC};
  rr_http_server_config_t sc;
  rr_http_server_config_default(&sc);
  sc.name = "api";
  sc.host = cfg->host && *cfg->host ? cfg->host : "127.0.0.1";
  sc.port = cfg->port;
  sc.tls = cfg->tls;
  sc.token_file = cfg->token_file && *cfg->token_file ? cfg->token_file : NULL;
  rr_http_route_t all[sizeof routes / sizeof routes[0] + 16];
  size_t nall = sizeof routes / sizeof routes[0];
  memcpy(all, routes, sizeof routes);
  nall += rr_admin_ops_routes(a, all + nall, 16);
  sc.routes = all;
  sc.nroutes = nall;
  sc.statics = a->dashboard ? &ui : NULL;
  sc.nstatics = a->dashboard ? 1 : 0;
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

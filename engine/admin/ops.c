/* Operators' routes: channels, queues, replays, the audit trail.
 *
 *   GET  /api/channels                       viewer   status and counters
 *   POST /api/channels/{name}/stop|start     operator an MLLP channel stops / resumes listening
 *   POST /api/channels/{name}/reload         admin    its script and TLS files read again
 *   GET  /api/queues                         viewer   per destination: depth, dead, oldest,
 *                                                     circuit, counters
 *   GET  /api/queues/{dest}?state=&limit=    viewer   its rows (no payloads)
 *   POST /api/queues/{dest}/retry            operator {"id": N} or {"all_dead": true}
 *   POST /api/queues/{dest}/drop             operator {"id": N}
 *   POST /api/replay                         operator {"message_id": N, "destination": "c.d"}
 *   GET  /api/audit?since=&until=&kind=&subject=&limit=   admin   records, oldest first
 *   GET  /api/audit/verify                   admin    the chain re-checked (in the thread pool)
 *
 * Every action is recorded in the audit trail with the token's name as
 * its actor, before it is answered. */
#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin/api_int.h"
#include "audit/audit.h"
#include "core/error.h"
#include "core/log.h"

static const char *who(const rr_http_req_t *req) {
  return rr_http_req_principal(req)->name;
}

static json_t *body_json(rr_http_req_t *req) {
  size_t len;
  const char *body = rr_http_req_body(req, &len);
  return len ? json_loadb(body, len, 0, NULL) : json_object();
}

/* ---- channels ----------------------------------------------------------------------------- */

static void on_channel(void *ud, const rr_channel_stats_t *s) {
  json_t *rows = ud;
  const rr_histo_t *h = s->ack_latency;
  json_array_append_new(
      rows,
      json_pack("{s:s, s:s, s:i, s:s, s:{s:I, s:I, s:I, s:I, s:I, s:I, s:I}, s:{s:I, s:I},"
                " s:{s:I, s:f}}",
                "name", s->name, "kind", s->kind, "port", s->port, "state",
                s->running ? "running" : "stopped", "messages", "received", (json_int_t)s->received,
                "accepted", (json_int_t)s->accepted, "errored", (json_int_t)s->errored, "rejected",
                (json_int_t)s->rejected, "duplicates", (json_int_t)s->duplicates, "filtered",
                (json_int_t)s->filtered, "script_errors", (json_int_t)s->script_errors, "studies",
                "routed", (json_int_t)s->studies_routed, "matched", (json_int_t)s->studies_matched,
                "ack_latency", "count", (json_int_t)h->count, "mean_ms",
                h->count ? h->sum * 1000.0 / (double)h->count : 0.0));
}

static void channels_list(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  json_t *rows = json_array();
  rr_engine_channel_stats(a->engine, on_channel, rows);
  rr_http_reply_json(req, 200, json_pack("{s:o}", "channels", rows));
}

static void channel_action(rr_admin_t *a, rr_http_req_t *req, const char *action,
                           int (*fn)(rr_engine_t *, const char *)) {
  const char *name = rr_http_req_param(req, "name");
  int rc = fn(a->engine, name);
  if (rc == RR_ENOTFOUND) {
    rr_http_reply_error(req, 404, "not_found", "no channel of that name");
    return;
  }
  if (rc == RR_EINVAL) {
    rr_http_reply_error(req, 409, "conflict",
                        "a DICOM channel is not stopped or started this way (stop the engine)");
    return;
  }
  if (rc == -EALREADY) {
    rr_http_reply_error(req, 409, "conflict",
                        strcmp(action, "stop") == 0 ? "the channel is stopped already"
                                                    : "the channel is running already");
    return;
  }
  char kind[32];
  snprintf(kind, sizeof kind, "channel_%s", action);
  rr_journal_audit_json(
      a->journal, who(req), kind, name,
      json_pack("{s:s, s:s}", "action", action, "outcome", rc ? rr_strerror(rc) : "done"));
  rr_journal_kick(a->journal);
  rr_log(RR_LOG_INFO, "api", "event=channel_%s principal=%s channel=%s result=%s", action, who(req),
         name, rc ? rr_strerror(rc) : "done");
  if (rc)
    rr_http_reply_error(req, 500, "failed", rr_strerror(rc));
  else
    rr_http_reply_json(req, 200, json_pack("{s:s, s:s}", "channel", name, "done", action));
}

static void channel_stop(void *ud, rr_http_req_t *req) {
  channel_action(ud, req, "stop", rr_engine_channel_stop);
}
static void channel_start(void *ud, rr_http_req_t *req) {
  channel_action(ud, req, "start", rr_engine_channel_start);
}
static void channel_reload(void *ud, rr_http_req_t *req) {
  channel_action(ud, req, "reload", rr_engine_channel_reload);
}

/* ---- queues ------------------------------------------------------------------------------- */

typedef struct qpass {
  json_t *by_name;
  int64_t now;
} qpass_t;

static json_t *entry(qpass_t *p, const char *name) {
  json_t *o = json_object_get(p->by_name, name);
  if (!o) {
    o = json_pack("{s:s, s:I, s:I, s:n}", "destination", name, "pending", (json_int_t)0, "dead",
                  (json_int_t)0, "oldest_age_s");
    json_object_set_new(p->by_name, name, o);
  }
  return o;
}

static void on_depth(void *ud, const char *destination, int64_t pending, int64_t dead,
                     int64_t oldest_ms) {
  qpass_t *p = ud;
  json_t *o = entry(p, destination);
  json_object_set_new(o, "pending", json_integer(pending));
  json_object_set_new(o, "dead", json_integer(dead));
  json_object_set_new(o, "oldest_age_s",
                      oldest_ms > 0 && p->now > oldest_ms
                          ? json_real((double)(p->now - oldest_ms) / 1000.0)
                          : json_null());
}

static void on_dest(void *ud, const rr_dispatch_dest_stats_t *s) {
  qpass_t *p = ud;
  json_t *o = entry(p, s->name);
  json_object_set_new(o, "kind", json_string(rr_dest_kind_name(s->kind)));
  json_object_set_new(o, "circuit",
                      json_string(s->breaker == RR_QSCHED_OPEN        ? "open"
                                  : s->breaker == RR_QSCHED_HALF_OPEN ? "half_open"
                                                                      : "closed"));
  json_object_set_new(o, "delivered", json_integer((json_int_t)s->delivered));
  json_object_set_new(o, "retried", json_integer((json_int_t)s->retried));
  json_object_set_new(o, "dead_lettered", json_integer((json_int_t)s->dead));
  json_object_set_new(o, "configured", json_true());
}

static void queues_list(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  qpass_t p = {json_object(), rr_admin_now_ms()};
  if (a->dispatch)
    rr_dispatch_stats(a->dispatch, on_dest, &p);
  rr_journal_queue_depth(a->journal, on_depth, &p);
  json_t *rows = json_array();
  const char *k;
  json_t *v;
  json_object_foreach(p.by_name, k, v) {
    if (!json_object_get(v, "configured"))
      json_object_set_new(v, "configured", json_false());
    json_array_append(rows, v);
  }
  json_decref(p.by_name);
  rr_http_reply_json(req, 200, json_pack("{s:o}", "queues", rows));
}

static void queue_rows(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *dest = rr_http_req_param(req, "dest");
  const char *state = rr_http_req_query(req, "state");
  if (state && strcmp(state, "pending") != 0 && strcmp(state, "dead") != 0) {
    rr_http_reply_error(req, 400, "bad_state", "state is pending or dead");
    return;
  }
  const char *l = rr_http_req_query(req, "limit");
  long limit = l ? strtol(l, NULL, 10) : 100;
  if (limit < 1 || limit > 1000)
    limit = 100;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(a->journal),
                         "SELECT id, message_id, key, lane, state, attempts, not_before_ms,"
                         " enqueued_ms, last_error, content_type, length(payload) FROM queue"
                         " WHERE destination = ?1 AND (?2 IS NULL OR state = ?2)"
                         " ORDER BY id LIMIT ?3",
                         -1, &st, NULL) != SQLITE_OK) {
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  sqlite3_bind_text(st, 1, dest, -1, SQLITE_TRANSIENT);
  if (state)
    sqlite3_bind_text(st, 2, state, -1, SQLITE_TRANSIENT);
  else
    sqlite3_bind_null(st, 2);
  sqlite3_bind_int64(st, 3, limit);
  static const char *const cols[] = {"id",         "message_id",   "key",           "lane",
                                     "state",      "attempts",     "not_before_ms", "enqueued_ms",
                                     "last_error", "content_type", "bytes"};
  json_t *rows = json_array();
  while (sqlite3_step(st) == SQLITE_ROW) {
    json_t *o = json_object();
    rr_admin_columns(o, st, cols, 11);
    json_array_append_new(rows, o);
  }
  sqlite3_finalize(st);
  if (json_array_size(rows) == 0 && a->dispatch && !rr_dispatch_known(a->dispatch, dest)) {
    json_decref(rows);
    rr_http_reply_error(req, 404, "not_found", "no destination of that name");
    return;
  }
  rr_http_reply_json(req, 200, json_pack("{s:s, s:o}", "destination", dest, "rows", rows));
}

static void queue_op(rr_admin_t *a, rr_http_req_t *req, bool retry) {
  const char *dest = rr_http_req_param(req, "dest");
  json_t *o = body_json(req);
  json_t *id = json_object_get(o, "id");
  bool all = json_is_true(json_object_get(o, "all_dead"));
  if (!json_is_object(o) || (!json_is_integer(id) && !(retry && all)) ||
      (json_is_integer(id) && json_integer_value(id) <= 0)) {
    json_decref(o);
    rr_http_reply_error(req, 400, "bad_request",
                        retry ? "the body is {\"id\": N} or {\"all_dead\": true}"
                              : "the body is {\"id\": N}");
    return;
  }
  int64_t qid = json_is_integer(id) ? json_integer_value(id) : 0;
  json_decref(o);
  if (!a->dispatch || !rr_dispatch_known(a->dispatch, dest)) {
    rr_http_reply_error(req, 404, "not_found", "no destination of that name");
    return;
  }
  int rc =
      retry ? rr_dispatch_retry(a->dispatch, dest, qid) : rr_dispatch_drop(a->dispatch, dest, qid);
  if (rc == RR_ENOTFOUND) {
    rr_http_reply_error(req, 404, "not_found",
                        retry ? "no dead letter of that id in this queue"
                              : "no such row in this queue");
    return;
  }
  if (rc == RR_EINVAL) {
    rr_http_reply_error(req, 409, "conflict", "the row is being delivered now");
    return;
  }
  rr_journal_audit_json(a->journal, who(req), retry ? "queue_retry" : "queue_drop", dest,
                        json_pack("{s:I, s:b, s:s}", "queue_id", (json_int_t)qid, "all_dead",
                                  qid == 0, "outcome", rc ? rr_strerror(rc) : "done"));
  rr_journal_kick(a->journal);
  rr_log(RR_LOG_INFO, "api", "event=queue_%s principal=%s destination=%s queue_id=%lld result=%s",
         retry ? "retry" : "drop", who(req), dest, (long long)qid, rc ? rr_strerror(rc) : "done");
  if (rc)
    rr_http_reply_error(req, 500, "failed", rr_strerror(rc));
  else
    rr_http_reply_json(req, 200,
                       json_pack("{s:s, s:I, s:s}", "destination", dest, "queue_id",
                                 (json_int_t)qid, "done", retry ? "retry" : "drop"));
}

static void queue_retry(void *ud, rr_http_req_t *req) {
  queue_op(ud, req, true);
}
static void queue_drop(void *ud, rr_http_req_t *req) {
  queue_op(ud, req, false);
}

static void replay(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  json_t *o = body_json(req);
  json_t *mid = json_object_get(o, "message_id");
  const char *dest = json_string_value(json_object_get(o, "destination"));
  if (!json_is_integer(mid) || json_integer_value(mid) <= 0 || !dest || strlen(dest) > 159) {
    json_decref(o);
    rr_http_reply_error(
        req, 400, "bad_request",
        "the body is {\"message_id\": N, \"destination\": \"channel.destination\"}");
    return;
  }
  char d[160];
  snprintf(d, sizeof d, "%s", dest);
  int64_t id = json_integer_value(mid);
  json_decref(o);
  if (!a->dispatch || !rr_dispatch_known(a->dispatch, d)) {
    rr_http_reply_error(req, 404, "not_found", "no destination of that name");
    return;
  }
  int n = rr_engine_replay(a->engine, id, d);
  if (n == RR_ENOTFOUND) {
    rr_http_reply_error(req, 404, "not_found", "no such message");
    return;
  }
  rr_journal_audit_json(
      a->journal, who(req), "replay", d,
      json_pack("{s:I, s:i}", "message_id", (json_int_t)id, "queued", n > 0 ? n : 0));
  rr_journal_kick(a->journal);
  rr_log(RR_LOG_INFO, "api", "event=replay principal=%s destination=%s message_id=%lld queued=%d",
         who(req), d, (long long)id, n);
  if (n < 0)
    rr_http_reply_error(req, 500, "failed", rr_strerror(n));
  else
    rr_http_reply_json(
        req, 200,
        json_pack("{s:I, s:s, s:i}", "message_id", (json_int_t)id, "destination", d, "queued", n));
}

/* ---- the audit trail ---------------------------------------------------------------------- */

static void audit_list(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *qs = rr_http_req_query(req, "since"), *qu = rr_http_req_query(req, "until");
  const char *kind = rr_http_req_query(req, "kind"), *subject = rr_http_req_query(req, "subject");
  const char *ql = rr_http_req_query(req, "limit"), *qa = rr_http_req_query(req, "after");
  long long since = qs ? strtoll(qs, NULL, 10) : 0, until = qu ? strtoll(qu, NULL, 10) : 0;
  long long after = qa ? strtoll(qa, NULL, 10) : 0;
  long limit = ql ? strtol(ql, NULL, 10) : 500;
  if (limit < 1 || limit > 10000)
    limit = 500;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(a->journal),
                         "SELECT seq, at_ms, actor, kind, subject, data, hash FROM audit"
                         " WHERE seq > ?1 AND at_ms >= ?2 AND (?3 = 0 OR at_ms < ?3)"
                         " AND (?4 IS NULL OR kind = ?4) AND (?5 IS NULL OR subject = ?5)"
                         " ORDER BY seq LIMIT ?6",
                         -1, &st, NULL) != SQLITE_OK) {
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  sqlite3_bind_int64(st, 1, after);
  sqlite3_bind_int64(st, 2, since);
  sqlite3_bind_int64(st, 3, until);
  if (kind)
    sqlite3_bind_text(st, 4, kind, -1, SQLITE_TRANSIENT);
  else
    sqlite3_bind_null(st, 4);
  if (subject)
    sqlite3_bind_text(st, 5, subject, -1, SQLITE_TRANSIENT);
  else
    sqlite3_bind_null(st, 5);
  sqlite3_bind_int64(st, 6, limit);
  json_t *rows = json_array();
  while (sqlite3_step(st) == SQLITE_ROW) {
    json_t *data = json_loads((const char *)sqlite3_column_text(st, 5), JSON_DECODE_ANY, NULL);
    json_array_append_new(rows, json_pack("{s:I, s:I, s:s, s:s, s:s, s:o, s:s}", "seq",
                                          (json_int_t)sqlite3_column_int64(st, 0), "at_ms",
                                          (json_int_t)sqlite3_column_int64(st, 1), "actor",
                                          (const char *)sqlite3_column_text(st, 2), "kind",
                                          (const char *)sqlite3_column_text(st, 3), "subject",
                                          (const char *)sqlite3_column_text(st, 4), "data",
                                          data ? data : json_null(), "hash",
                                          (const char *)sqlite3_column_text(st, 6)));
  }
  sqlite3_finalize(st);
  rr_journal_audit_json(a->journal, who(req), "audit_read", "audit",
                        json_pack("{s:I, s:I, s:s?, s:s?, s:i}", "since", (json_int_t)since,
                                  "until", (json_int_t)until, "kind", kind, "subject", subject,
                                  "records", (int)json_array_size(rows)));
  rr_journal_kick(a->journal);
  rr_http_reply_json(req, 200, json_pack("{s:o}", "records", rows));
}

typedef struct verifying {
  uv_work_t work;
  rr_http_req_t *req;
  char path[4096];
  int rc;
  rr_audit_report_t report;
} verifying_t;

static void verify_work(uv_work_t *w) {
  verifying_t *v = w->data;
  sqlite3 *db = NULL;
  if (sqlite3_open_v2(v->path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
    v->rc = RR_EIO;
  } else {
    sqlite3_busy_timeout(db, 5000);
    v->rc = rr_audit_verify(db, &v->report);
  }
  sqlite3_close(db);
}

static void verify_done(uv_work_t *w, int status) {
  verifying_t *v = w->data;
  if (status || v->rc) {
    rr_http_reply_error(v->req, 500, "internal_error", "the audit trail could not be read");
  } else {
    const rr_audit_report_t *r = &v->report;
    json_t *o = json_pack("{s:b, s:I, s:s}", "intact", r->fault == RR_AUDIT_INTACT, "records",
                          (json_int_t)r->records, "fault", rr_audit_fault_name(r->fault));
    if (r->fault == RR_AUDIT_INTACT) {
      json_object_set_new(o, "head_seq", json_integer((json_int_t)r->head.seq));
      json_object_set_new(o, "head_hash", json_string(r->head.hash));
    } else {
      json_object_set_new(o, "first_bad_seq", json_integer((json_int_t)r->seq));
      json_object_set_new(o, "detail", json_string(r->detail));
    }
    rr_http_reply_json(v->req, 200, o);
  }
  free(v);
}

static void audit_verify(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  verifying_t *v = calloc(1, sizeof *v);
  const char *path = sqlite3_db_filename(rr_journal_reader(a->journal), "main");
  if (!v || !path || !*path) {
    free(v);
    rr_http_reply_error(req, 500, "internal_error", "the store's file is unknown");
    return;
  }
  v->req = req;
  v->work.data = v;
  snprintf(v->path, sizeof v->path, "%s", path);
  rr_journal_audit_json(a->journal, who(req), "audit_verify", "audit", json_object());
  rr_journal_kick(a->journal);
  if (uv_queue_work(a->loop, &v->work, verify_work, verify_done) != 0) {
    free(v);
    rr_http_reply_error(req, 503, "unavailable", "could not start the check");
  }
}

size_t rr_admin_ops_routes(rr_admin_t *a, rr_http_route_t *out, size_t cap) {
  const rr_http_route_t routes[] = {
      {"GET", "/api/channels", RR_HTTP_VIEWER, NULL, 0, channels_list, a, 0},
      {"POST", "/api/channels/{name}/stop", RR_HTTP_OPERATOR, NULL, 4096, channel_stop, a, 0},
      {"POST", "/api/channels/{name}/start", RR_HTTP_OPERATOR, NULL, 4096, channel_start, a, 0},
      {"POST", "/api/channels/{name}/reload", RR_HTTP_ADMIN, NULL, 4096, channel_reload, a, 0},
      {"GET", "/api/queues", RR_HTTP_VIEWER, NULL, 0, queues_list, a, 0},
      {"GET", "/api/queues/{dest}", RR_HTTP_VIEWER, NULL, 0, queue_rows, a, 0},
      {"POST", "/api/queues/{dest}/retry", RR_HTTP_OPERATOR, NULL, 4096, queue_retry, a, 0},
      {"POST", "/api/queues/{dest}/drop", RR_HTTP_OPERATOR, NULL, 4096, queue_drop, a, 0},
      {"POST", "/api/replay", RR_HTTP_OPERATOR, NULL, 4096, replay, a, 0},
      {"GET", "/api/audit", RR_HTTP_ADMIN, NULL, 0, audit_list, a, 0},
      {"GET", "/api/audit/verify", RR_HTTP_ADMIN, NULL, 0, audit_verify, a, 0},
  };
  size_t n = sizeof routes / sizeof routes[0];
  for (size_t i = 0; i < n && i < cap; i++)
    out[i] = routes[i];
  return n;
}

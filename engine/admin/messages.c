/* Message search, a message's detail, and a study's timeline, answered
 * from the store's indexes through the loop's read connection.
 *
 *   GET /api/messages?mrn=&accession=&study_uid=&control_id=&channel=
 *                    &status=&type=&since=&until=&before=&limit=
 *       newest first (received time, then id); since/until are Unix
 *       milliseconds; before is the id of the last row of the previous
 *       page (keyset paging); limit 1..1000, default 100.
 *   GET /api/messages/{id}
 *       metadata, raw message, ACK, the deliveries it queued (pending and
 *       dead rows with their payloads) and every attempt, and the timeline
 *       of its study or order.
 *   GET /api/timeline?accession=|study_uid=
 *       order -> study -> AI jobs -> results -> publications ->
 *       notifications -> the radiologist's verdicts, by time. */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin/api_int.h"
#include "core/error.h"

#define SEARCH_MAX 1000

json_t *rr_admin_column(sqlite3_stmt *st, int i) {
  switch (sqlite3_column_type(st, i)) {
  case SQLITE_NULL: return json_null();
  case SQLITE_INTEGER: return json_integer(sqlite3_column_int64(st, i));
  case SQLITE_FLOAT: return json_real(sqlite3_column_double(st, i));
  default: {
    const char *t = (const char *)sqlite3_column_text(st, i);
    int n = sqlite3_column_bytes(st, i);
    json_t *s = json_stringn(t, (size_t)n);
    return s ? s : json_null(); /* not UTF-8: see the _b64 twin where one is given */
  }
  }
}

void rr_admin_columns(json_t *o, sqlite3_stmt *st, const char *const *names, int n) {
  for (int i = 0; i < n; i++)
    json_object_set_new(o, names[i], rr_admin_column(st, i));
}

static json_t *row_object(sqlite3_stmt *st) {
  json_t *o = json_object();
  for (int i = 0; i < sqlite3_column_count(st); i++)
    json_object_set_new(o, sqlite3_column_name(st, i), rr_admin_column(st, i));
  return o;
}

/* Bytes as text when they are UTF-8, else as Latin-1 decoded into UTF-8
 * (HL7 v2 without MSH-18 is often ISO 8859-1); the original is in the
 * store and in `radrelay` exports. */
static json_t *text_of(const void *data, size_t len) {
  if (!data)
    return json_null();
  json_t *s = json_stringn(data, len);
  if (s)
    return s;
  char *u = malloc(len * 2 + 1);
  if (!u)
    return json_null();
  size_t k = 0;
  const unsigned char *p = data;
  for (size_t i = 0; i < len; i++) {
    if (p[i] < 0x80) {
      u[k++] = (char)(p[i] ? p[i] : '?');
    } else {
      u[k++] = (char)(0xC0 | (p[i] >> 6));
      u[k++] = (char)(0x80 | (p[i] & 0x3F));
    }
  }
  s = json_stringn(u, k);
  free(u);
  return s ? s : json_null();
}

static bool parse_i64(const char *s, int64_t *out) {
  if (!s || !*s)
    return false;
  char *end;
  long long v = strtoll(s, &end, 10);
  if (*end)
    return false;
  *out = v;
  return true;
}

void rr_admin_messages(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  static const struct {
    const char *param, *column;
  } eq[] = {{"mrn", "mrn"},
            {"accession", "accession"},
            {"study_uid", "study_uid"},
            {"control_id", "control_id"},
            {"channel", "channel"},
            {"type", "message_type"}};
  char sql[1400];
  size_t n = (size_t)snprintf(sql, sizeof sql,
                              "SELECT id, channel, peer, received_ms, sending_app,"
                              " sending_facility, message_type, control_id, mrn, accession,"
                              " study_uid, status, error, length(raw) AS bytes FROM messages"
                              " WHERE 1");
  const char *vals[16];
  size_t nv = 0;
  for (size_t i = 0; i < sizeof eq / sizeof eq[0]; i++) {
    const char *v = rr_http_req_query(req, eq[i].param);
    if (!v)
      continue;
    if (!*v || strlen(v) > 256) {
      rr_http_reply_error(req, 400, "bad_query", "a search value is 1 to 256 characters");
      return;
    }
    if (strcmp(eq[i].column, "control_id") == 0) /* through the journal's control-id index */
      n += (size_t)snprintf(sql + n, sizeof sql - n,
                            " AND id IN (SELECT message_id FROM dedupe WHERE control_id = ?%zu"
                            " UNION ALL SELECT id FROM messages WHERE control_id = ?%zu AND id >"
                            " (SELECT coalesce(max(upto), 0) FROM dedupe_merged))",
                            nv + 1, nv + 1);
    else
      n += (size_t)snprintf(sql + n, sizeof sql - n, " AND %s = ?%zu", eq[i].column, nv + 1);
    vals[nv++] = v;
  }
  /* status is written into the query (one of the journal's few values), so
   * that the partial index of messages that are not accepted can serve it */
  const char *status = rr_http_req_query(req, "status");
  if (status) {
    static const char *const known[] = {"accepted", "error", "rejected", "filtered"};
    bool ok = false;
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
      ok |= strcmp(status, known[i]) == 0;
    if (!ok) {
      rr_http_reply_error(req, 400, "bad_query",
                          "status is one of accepted, error, rejected, filtered");
      return;
    }
    n += (size_t)snprintf(sql + n, sizeof sql - n, " AND status = '%s'%s", status,
                          strcmp(status, "accepted") != 0 ? " AND status <> 'accepted'" : "");
  }
  int64_t since = 0, until = 0, before = 0, limit = 100;
  const char *qs = rr_http_req_query(req, "since"), *qu = rr_http_req_query(req, "until");
  const char *qb = rr_http_req_query(req, "before"), *ql = rr_http_req_query(req, "limit");
  if ((qs && !parse_i64(qs, &since)) || (qu && !parse_i64(qu, &until)) ||
      (qb && !parse_i64(qb, &before)) || (ql && (!parse_i64(ql, &limit) || limit < 1))) {
    rr_http_reply_error(req, 400, "bad_query",
                        "since, until (Unix milliseconds), before (a message id) and limit are "
                        "whole numbers");
    return;
  }
  if (limit > SEARCH_MAX)
    limit = SEARCH_MAX;
  if (qs)
    n += (size_t)snprintf(sql + n, sizeof sql - n, " AND received_ms >= %lld", (long long)since);
  if (qu)
    n += (size_t)snprintf(sql + n, sizeof sql - n, " AND received_ms < %lld", (long long)until);
  if (qb) /* keyset paging: rows after the last one shown (time, then id, descending) */
    n += (size_t)snprintf(sql + n, sizeof sql - n,
                          " AND (received_ms, id) < (SELECT received_ms, id FROM messages WHERE"
                          " id = %lld)",
                          (long long)before);
  snprintf(sql + n, sizeof sql - n, " ORDER BY received_ms DESC, id DESC LIMIT %lld",
           (long long)limit + 1);
  /* Messages that went wrong are few: their partial index, rather than a
   * walk back through time that SQLite prefers for the ORDER BY, unless a
   * patient, order, study or control id narrows the search more. */
  bool narrow = false;
  for (size_t i = 0; i < 4; i++)
    narrow |= rr_http_req_query(req, eq[i].param) != NULL;
  char forced[sizeof sql];
  const char *from = strstr(sql, " FROM messages WHERE");
  if (status && strcmp(status, "accepted") != 0 && !narrow && from) {
    int w = snprintf(forced, sizeof forced, "%.*s FROM messages INDEXED BY messages_problems%s",
                     (int)(from - sql), sql, from + strlen(" FROM messages"));
    if (w > 0 && (size_t)w < sizeof forced)
      memcpy(sql, forced, (size_t)w + 1);
  }
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(a->journal), sql, -1, &st, NULL) != SQLITE_OK) {
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  for (size_t i = 0; i < nv; i++)
    sqlite3_bind_text(st, (int)i + 1, vals[i], -1, SQLITE_TRANSIENT);
  json_t *rows = json_array();
  int64_t count = 0, last = 0;
  bool more = false;
  while (sqlite3_step(st) == SQLITE_ROW) {
    if (count == limit) {
      more = true;
      break;
    }
    json_t *o = row_object(st);
    last = sqlite3_column_int64(st, 0);
    json_array_append_new(rows, o);
    count++;
  }
  sqlite3_finalize(st);
  json_t *out = json_pack("{s:o}", "messages", rows);
  json_object_set_new(out, "next_before", more ? json_integer(last) : json_null());
  rr_http_reply_json(req, 200, out);
}

/* ---- the timeline ------------------------------------------------------------------------- */

static void add_event(json_t *events, int64_t at, const char *kind, json_t *detail) {
  if (at <= 0) {
    json_decref(detail);
    return;
  }
  json_t *e = json_pack("{s:I, s:s}", "at_ms", (json_int_t)at, "event", kind);
  if (detail)
    json_object_update(e, detail);
  json_decref(detail);
  json_array_append_new(events, e);
}

static int by_time(const void *x, const void *y) {
  json_t *const *a = x, *const *b = y;
  json_int_t ta = json_integer_value(json_object_get(*a, "at_ms"));
  json_int_t tb = json_integer_value(json_object_get(*b, "at_ms"));
  return ta < tb ? -1 : ta > tb;
}

/* Runs sql (one text parameter) and hands each row to fn. */
static void each(sqlite3 *db, const char *sql, const char *param,
                 void (*fn)(json_t *events, sqlite3_stmt *st), json_t *events) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
    return;
  sqlite3_bind_text(st, 1, param, -1, SQLITE_TRANSIENT);
  while (sqlite3_step(st) == SQLITE_ROW)
    fn(events, st);
  sqlite3_finalize(st);
}

static const char *txt(sqlite3_stmt *st, int i) {
  const char *t = (const char *)sqlite3_column_text(st, i);
  return t ? t : "";
}

static void ev_order(json_t *ev, sqlite3_stmt *st) {
  add_event(ev, sqlite3_column_int64(st, 0), "order",
            json_pack("{s:s, s:s, s:s}", "accession", txt(st, 1), "status", txt(st, 2), "priority",
                      txt(st, 3)));
}

static void ev_study(json_t *ev, sqlite3_stmt *st) {
  const char *uid = txt(st, 0);
  add_event(ev, sqlite3_column_int64(st, 1), "study_first_instance",
            json_pack("{s:s}", "study_uid", uid));
  add_event(ev, sqlite3_column_int64(st, 2), "study_stable",
            json_pack("{s:s, s:I}", "study_uid", uid, "instances",
                      (json_int_t)sqlite3_column_int64(st, 4)));
  add_event(ev, sqlite3_column_int64(st, 3), "study_routed",
            json_pack("{s:s, s:s}", "study_uid", uid, "match", txt(st, 5)));
}

static void ev_job(json_t *ev, sqlite3_stmt *st) {
  const char *job = txt(st, 0);
  add_event(
      ev, sqlite3_column_int64(st, 2), "ai_request_sent",
      json_pack("{s:s, s:s, s:s}", "job_id", job, "endpoint", txt(st, 1), "mode", txt(st, 5)));
  add_event(ev, sqlite3_column_int64(st, 3), "ai_result",
            json_pack("{s:s, s:s, s:s, s:b}", "job_id", job, "state", txt(st, 4), "model",
                      txt(st, 6), "critical", sqlite3_column_int(st, 7) == 1));
}

static void ev_delivery(json_t *ev, sqlite3_stmt *st) {
  add_event(ev, sqlite3_column_int64(st, 0), "delivered",
            json_pack("{s:s, s:s, s:I, s:s?}", "destination", txt(st, 1), "message_type",
                      txt(st, 2), "message_id", (json_int_t)sqlite3_column_int64(st, 3), "detail",
                      sqlite3_column_type(st, 4) == SQLITE_NULL ? NULL : txt(st, 4)));
}

static void ev_message(json_t *ev, sqlite3_stmt *st) {
  add_event(ev, sqlite3_column_int64(st, 0), "message",
            json_pack("{s:I, s:s, s:s, s:s}", "message_id", (json_int_t)sqlite3_column_int64(st, 1),
                      "channel", txt(st, 2), "message_type", txt(st, 3), "status", txt(st, 4)));
}

static void ev_notification(json_t *ev, sqlite3_stmt *st) {
  const char *id = txt(st, 0);
  add_event(ev, sqlite3_column_int64(st, 1), "notification",
            json_pack("{s:s, s:I}", "notification_id", id, "acr_category",
                      (json_int_t)sqlite3_column_int64(st, 4)));
  if (sqlite3_column_type(st, 2) != SQLITE_NULL)
    add_event(ev, sqlite3_column_int64(st, 2), "notification_acked",
              json_pack("{s:s, s:s, s:I}", "notification_id", id, "by", txt(st, 3), "pages",
                        (json_int_t)sqlite3_column_int64(st, 5)));
}

static void ev_verdict(json_t *ev, sqlite3_stmt *st) {
  add_event(ev, sqlite3_column_int64(st, 0), "radiologist_verdict",
            json_pack("{s:s, s:s, s:s, s:s}", "job_id", txt(st, 1), "finding_id", txt(st, 2),
                      "verdict", txt(st, 3), "by", txt(st, 4)));
}

/* The events of the study uid, or of the order accession (either may be
 * NULL; the study of an accession and the accession of a study are found). */
static json_t *timeline(sqlite3 *db, const char *accession, const char *uid) {
  char acc[128] = "", study[65] = "";
  snprintf(acc, sizeof acc, "%s", accession ? accession : "");
  snprintf(study, sizeof study, "%s", uid ? uid : "");
  sqlite3_stmt *st;
  if (!*study && *acc &&
      sqlite3_prepare_v2(db,
                         "SELECT study_uid FROM studies WHERE accession = ?1 UNION ALL"
                         " SELECT study_uid FROM orders WHERE accession = ?1 AND study_uid IS NOT"
                         " NULL LIMIT 1",
                         -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, acc, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(st) == SQLITE_ROW)
      snprintf(study, sizeof study, "%s", txt(st, 0));
    sqlite3_finalize(st);
  }
  if (!*acc && *study &&
      sqlite3_prepare_v2(db, "SELECT accession FROM studies WHERE study_uid = ?1", -1, &st, NULL) ==
          SQLITE_OK) {
    sqlite3_bind_text(st, 1, study, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(st) == SQLITE_ROW)
      snprintf(acc, sizeof acc, "%s", txt(st, 0));
    sqlite3_finalize(st);
  }
  json_t *ev = json_array();
  if (*acc) {
    each(db,
         "SELECT created_ms, accession, status, priority FROM orders"
         " WHERE accession = ?1",
         acc, ev_order, ev);
    each(db,
         "SELECT received_ms, id, channel, message_type, status FROM messages WHERE accession ="
         " ?1 AND (study_uid IS NULL OR study_uid != ?1) LIMIT 200",
         acc, ev_message, ev);
  }
  if (*study) {
    each(db,
         "SELECT study_uid, first_ms, stable_ms, routed_ms, instances, match_method FROM studies"
         " WHERE study_uid = ?1",
         study, ev_study, ev);
    each(db,
         "SELECT job_id, destination, sent_ms, result_ms, state, mode,"
         " coalesce(model_name || ' ' || model_version, ''), critical FROM ai_jobs"
         " WHERE study_uid = ?1",
         study, ev_job, ev);
    /* what the results and pages of this study became, once delivered */
    each(db,
         "SELECT d.at_ms, d.destination, m.message_type, m.id, d.detail FROM messages m"
         " JOIN deliveries d ON d.message_id = m.id AND d.outcome = 'delivered'"
         " WHERE m.study_uid = ?1 AND m.message_type IN ('AI_RESULT', 'NOTIFICATION') LIMIT 500",
         study, ev_delivery, ev);
    each(db,
         "SELECT id, created_ms, acked_ms, acked_by, category, sends FROM notifications"
         " WHERE study_uid = ?1",
         study, ev_notification, ev);
    each(db,
         "SELECT verdict_ms, job_id, finding_id, verdict, coalesce(verdict_by, '') FROM"
         " ai_findings WHERE study_uid = ?1 AND verdict IS NOT NULL",
         study, ev_verdict, ev);
    each(db,
         "SELECT received_ms, id, channel, message_type, status FROM messages WHERE study_uid ="
         " ?1 AND message_type NOT IN ('AI_RESULT', 'NOTIFICATION') LIMIT 200",
         study, ev_message, ev);
  }
  size_t n = json_array_size(ev);
  json_t **v = n ? malloc(n * sizeof *v) : NULL;
  json_t *sorted = json_array();
  if (v) {
    for (size_t i = 0; i < n; i++)
      v[i] = json_array_get(ev, i);
    qsort(v, n, sizeof *v, by_time);
    for (size_t i = 0; i < n; i++)
      json_array_append(sorted, v[i]);
    free(v);
  }
  json_decref(ev);
  return json_pack("{s:s?, s:s?, s:o}", "accession", *acc ? acc : NULL, "study_uid",
                   *study ? study : NULL, "events", sorted);
}

void rr_admin_timeline(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *acc = rr_http_req_query(req, "accession");
  const char *uid = rr_http_req_query(req, "study_uid");
  if ((!acc || !*acc) && (!uid || !*uid)) {
    rr_http_reply_error(req, 400, "bad_query", "give accession or study_uid");
    return;
  }
  if ((acc && strlen(acc) > 64) || (uid && strlen(uid) > 64)) {
    rr_http_reply_error(req, 400, "bad_query", "accession and study_uid are at most 64 characters");
    return;
  }
  rr_http_reply_json(req, 200, timeline(rr_journal_reader(a->journal), acc, uid));
}

void rr_admin_message(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  int64_t id;
  if (!parse_i64(rr_http_req_param(req, "id"), &id)) {
    rr_http_reply_error(req, 400, "bad_id", "a message id is a whole number");
    return;
  }
  sqlite3 *db = rr_journal_reader(a->journal);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "SELECT id, channel, peer, received_ms, sending_app, sending_facility,"
                         " message_type, control_id, mrn, accession, study_uid, status, error,"
                         " raw, ack FROM messages WHERE id = ?1",
                         -1, &st, NULL) != SQLITE_OK) {
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  sqlite3_bind_int64(st, 1, id);
  if (sqlite3_step(st) != SQLITE_ROW) {
    sqlite3_finalize(st);
    rr_http_reply_error(req, 404, "not_found", "no such message");
    return;
  }
  json_t *o = json_object();
  for (int i = 0; i < 13; i++)
    json_object_set_new(o, sqlite3_column_name(st, i), rr_admin_column(st, i));
  json_object_set_new(o, "raw",
                      text_of(sqlite3_column_blob(st, 13), (size_t)sqlite3_column_bytes(st, 13)));
  json_object_set_new(
      o, "ack",
      sqlite3_column_type(st, 14) == SQLITE_NULL
          ? json_null()
          : text_of(sqlite3_column_blob(st, 14), (size_t)sqlite3_column_bytes(st, 14)));
  char acc[128] = "", uid[65] = "";
  if (sqlite3_column_type(st, 9) != SQLITE_NULL)
    snprintf(acc, sizeof acc, "%s", txt(st, 9));
  if (sqlite3_column_type(st, 10) != SQLITE_NULL)
    snprintf(uid, sizeof uid, "%s", txt(st, 10));
  sqlite3_finalize(st);
  /* what it queued: rows still queued (pending or dead) with their payload */
  json_t *queued = json_array();
  if (sqlite3_prepare_v2(db,
                         "SELECT id, destination, key, lane, state, attempts, not_before_ms,"
                         " enqueued_ms, last_error, content_type, payload FROM queue WHERE"
                         " message_id = ?1 ORDER BY id",
                         -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, id);
    while (sqlite3_step(st) == SQLITE_ROW) {
      json_t *q = json_object();
      for (int i = 0; i < 10; i++)
        json_object_set_new(q, sqlite3_column_name(st, i), rr_admin_column(st, i));
      json_object_set_new(
          q, "payload", text_of(sqlite3_column_blob(st, 10), (size_t)sqlite3_column_bytes(st, 10)));
      json_array_append_new(queued, q);
    }
    sqlite3_finalize(st);
  }
  json_object_set_new(o, "queued", queued);
  json_t *attempts = json_array();
  if (sqlite3_prepare_v2(db,
                         "SELECT queue_id, destination, attempt, at_ms, outcome, detail, response"
                         " FROM deliveries WHERE message_id = ?1 ORDER BY id",
                         -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, id);
    while (sqlite3_step(st) == SQLITE_ROW) {
      json_t *d = json_object();
      for (int i = 0; i < 6; i++)
        json_object_set_new(d, sqlite3_column_name(st, i), rr_admin_column(st, i));
      json_object_set_new(
          d, "response",
          sqlite3_column_type(st, 6) == SQLITE_NULL
              ? json_null()
              : text_of(sqlite3_column_blob(st, 6), (size_t)sqlite3_column_bytes(st, 6)));
      json_array_append_new(attempts, d);
    }
    sqlite3_finalize(st);
  }
  json_object_set_new(o, "deliveries", attempts);
  /* what was sent, per delivered row (store.keep_sent) */
  json_t *sent = json_array();
  if (sqlite3_prepare_v2(db,
                         "SELECT queue_id, destination, at_ms, content_type, payload FROM sent"
                         " WHERE message_id = ?1 ORDER BY queue_id",
                         -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, id);
    while (sqlite3_step(st) == SQLITE_ROW) {
      json_t *q = json_object();
      for (int i = 0; i < 4; i++)
        json_object_set_new(q, sqlite3_column_name(st, i), rr_admin_column(st, i));
      json_object_set_new(q, "payload",
                          text_of(sqlite3_column_blob(st, 4), (size_t)sqlite3_column_bytes(st, 4)));
      json_array_append_new(sent, q);
    }
    sqlite3_finalize(st);
  }
  json_object_set_new(o, "sent", sent);
  if (*acc || *uid)
    json_object_set_new(o, "timeline", timeline(db, *acc ? acc : NULL, *uid ? uid : NULL));
  rr_http_reply_json(req, 200, o);
}

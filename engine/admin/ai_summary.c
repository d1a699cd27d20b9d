/* GET /api/ai/summary[?since=<Unix ms>]: how each AI endpoint and model
 * does, from the store (ai_jobs, ai_findings, studies):
 *
 *   {"since_ms": null, "generated_ms": ..., "endpoints": [
 *     {"endpoint", "model_name", "model_version" (null: jobs that never
 *      reported a model: running, expired, most failures), "modes": [...],
 *      "jobs", "studies" (distinct studies analysed), "running",
 *      "completed", "failed", "rejected", "expired",
 *      "critical" (completed jobs with a critical result), "critical_rate"
 *      (critical / completed), "findings", "confirmed", "overridden" (the
 *      radiologists' verdicts on the findings), "agreement_rate"
 *      (confirmed / (confirmed + overridden)),
 *      "turnaround_ms" (request sent -> result),
 *      "arrival_to_result_ms" (the study's first instance -> result),
 *      "result_to_report_ms" (result -> the first verdict of a final report),
 *      each {"n", "p50", "p90"}: nearest-rank percentiles over the jobs
 *      that have both times}]}
 *
 * Rates are null when their denominator is 0; percentiles are null when
 * n is 0. since counts the jobs sent at or after it. Endpoint and model
 * names only: nothing that identifies a patient or a study. */
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

#include "admin/api_int.h"
#include "core/error.h"

/* The columns every query below starts with: destination, model_name,
 * model_version. */
#define GROUP_COLS "j.destination, j.model_name, j.model_version"
#define SINCE "(?1 IS NULL OR j.sent_ms >= ?1)"

static const char *col_text(sqlite3_stmt *st, int i) {
  return (const char *)sqlite3_column_text(st, i);
}

/* The group's key: its three names, NULL written as "\x01". */
static int group_key(sqlite3_stmt *st, rr_buf_t *key) {
  rr_buf_reset(key);
  for (int i = 0; i < 3; i++) {
    const char *t = col_text(st, i);
    int rc = rr_buf_printf(key, "%s%s", i ? "\n" : "", t ? t : "\x01");
    if (rc)
      return rc;
  }
  return 0;
}

static json_t *text_or_null(sqlite3_stmt *st, int i) {
  const char *t = col_text(st, i);
  json_t *s = t ? json_string(t) : NULL;
  return s ? s : json_null();
}

static json_t *ratio(json_int_t num, json_int_t den) {
  return den > 0 ? json_real((double)num / (double)den) : json_null();
}

/* The group of the row's first three columns in index (key -> object),
 * appended to list when new. Borrowed; NULL on allocation failure. */
static json_t *group_of(json_t *index, json_t *list, sqlite3_stmt *st, rr_buf_t *key) {
  if (group_key(st, key) != 0)
    return NULL;
  json_t *g = json_object_get(index, key->data);
  if (g)
    return g;
  g = json_object();
  if (!g)
    return NULL;
  json_object_set_new(g, "endpoint", text_or_null(st, 0));
  json_object_set_new(g, "model_name", text_or_null(st, 1));
  json_object_set_new(g, "model_version", text_or_null(st, 2));
  json_object_set(index, key->data, g);
  json_array_append_new(list, g);
  return g;
}

static void set_int(json_t *g, const char *name, sqlite3_stmt *st, int i) {
  json_object_set_new(g, name, json_integer(sqlite3_column_int64(st, i)));
}

static json_int_t get_int(json_t *g, const char *name) {
  return json_integer_value(json_object_get(g, name));
}

static sqlite3_stmt *prepare(sqlite3 *db, const char *sql, const int64_t *since) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
    return NULL;
  if (since)
    sqlite3_bind_int64(st, 1, *since);
  else
    sqlite3_bind_null(st, 1);
  return st;
}

/* Nearest rank: the smallest value with at least p of them at or below. */
static json_t *percentiles(const int64_t *v, size_t n) {
  if (n == 0)
    return json_pack("{s:i, s:n, s:n}", "n", 0, "p50", "p90");
  size_t i50 = (n + 1) / 2 - 1, i90 = (9 * n + 9) / 10 - 1;
  return json_pack("{s:I, s:I, s:I}", "n", (json_int_t)n, "p50", (json_int_t)v[i50], "p90",
                   (json_int_t)v[i90]);
}

/* Runs sql (group columns, then one duration, ordered by all four) and
 * sets field of each group to the durations' percentiles. */
static int durations(sqlite3 *db, const char *sql, const int64_t *since, json_t *index,
                     json_t *list, const char *field, rr_buf_t *key) {
  sqlite3_stmt *st = prepare(db, sql, since);
  if (!st)
    return RR_EIO;
  int64_t *v = NULL;
  size_t n = 0, cap = 0;
  json_t *cur = NULL;
  int rc = 0, step;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    json_t *g = group_of(index, list, st, key);
    if (!g) {
      rc = RR_ENOMEM;
      break;
    }
    if (g != cur) {
      if (cur)
        json_object_set_new(cur, field, percentiles(v, n));
      cur = g;
      n = 0;
    }
    if (n == cap) {
      size_t ncap = cap ? cap * 2 : 64;
      int64_t *nv = realloc(v, ncap * sizeof *v);
      if (!nv) {
        rc = RR_ENOMEM;
        break;
      }
      v = nv;
      cap = ncap;
    }
    v[n++] = sqlite3_column_int64(st, 3);
  }
  if (rc == 0 && step != SQLITE_DONE)
    rc = RR_EIO;
  if (rc == 0 && cur)
    json_object_set_new(cur, field, percentiles(v, n));
  free(v);
  sqlite3_finalize(st);
  return rc;
}

static int summarize(sqlite3 *db, const int64_t *since, json_t *index, json_t *list) {
  rr_buf_t key;
  rr_buf_init(&key, (size_t)1 << 20);
  int rc = 0;
  sqlite3_stmt *st =
      prepare(db,
              "SELECT " GROUP_COLS ", count(*), count(DISTINCT j.study_uid),"
              " sum(j.state = 'running'), sum(j.state = 'completed'), sum(j.state = 'failed'),"
              " sum(j.state = 'rejected'), sum(j.state = 'expired'),"
              " sum(j.state = 'completed' AND j.critical = 1),"
              " json_group_array(DISTINCT j.mode)"
              " FROM ai_jobs j WHERE " SINCE " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
              since);
  if (!st) {
    rc = RR_EIO;
    goto out;
  }
  static const char *const counts[] = {"jobs",   "studies",  "running", "completed",
                                       "failed", "rejected", "expired", "critical"};
  while (sqlite3_step(st) == SQLITE_ROW) {
    json_t *g = group_of(index, list, st, &key);
    if (!g) {
      rc = RR_ENOMEM;
      break;
    }
    for (int i = 0; i < 8; i++)
      set_int(g, counts[i], st, 3 + i);
    json_t *modes = json_loads(col_text(st, 11) ? col_text(st, 11) : "[]", 0, NULL);
    json_object_set_new(g, "modes", modes ? modes : json_array());
  }
  sqlite3_finalize(st);
  if (rc)
    goto out;
  st = prepare(db,
               "SELECT " GROUP_COLS ", count(*), sum(f.verdict = 'confirmed'),"
               " sum(f.verdict = 'overridden')"
               " FROM ai_findings f JOIN ai_jobs j USING (job_id) WHERE " SINCE " GROUP BY 1, 2, 3",
               since);
  if (!st) {
    rc = RR_EIO;
    goto out;
  }
  while (sqlite3_step(st) == SQLITE_ROW) {
    json_t *g = group_of(index, list, st, &key);
    if (!g) {
      rc = RR_ENOMEM;
      break;
    }
    set_int(g, "findings", st, 3);
    set_int(g, "confirmed", st, 4);
    set_int(g, "overridden", st, 5);
  }
  sqlite3_finalize(st);
  if (rc)
    goto out;
  rc = durations(db,
                 "SELECT " GROUP_COLS ", j.result_ms - j.sent_ms FROM ai_jobs j"
                 " WHERE " SINCE " AND j.result_ms >= j.sent_ms ORDER BY 1, 2, 3, 4",
                 since, index, list, "turnaround_ms", &key);
  if (rc == 0)
    rc = durations(db,
                   "SELECT " GROUP_COLS ", j.result_ms - s.first_ms FROM ai_jobs j"
                   " JOIN studies s USING (study_uid)"
                   " WHERE " SINCE " AND j.result_ms >= s.first_ms ORDER BY 1, 2, 3, 4",
                   since, index, list, "arrival_to_result_ms", &key);
  if (rc == 0)
    rc = durations(db,
                   "SELECT * FROM (SELECT " GROUP_COLS ", min(f.verdict_ms) - j.result_ms AS d"
                   " FROM ai_jobs j JOIN ai_findings f USING (job_id)"
                   " WHERE " SINCE " AND f.verdict_ms IS NOT NULL AND j.result_ms IS NOT NULL"
                   " GROUP BY j.job_id) WHERE d >= 0 ORDER BY 1, 2, 3, 4",
                   since, index, list, "result_to_report_ms", &key);
out:
  rr_buf_close(&key);
  return rc;
}

/* Fills what a group has no rows for, and the rates. */
static void complete(json_t *g) {
  static const char *const zero[] = {"jobs",     "studies",   "running",   "completed",
                                     "failed",   "rejected",  "expired",   "critical",
                                     "findings", "confirmed", "overridden"};
  for (size_t i = 0; i < sizeof zero / sizeof zero[0]; i++)
    if (!json_object_get(g, zero[i]))
      json_object_set_new(g, zero[i], json_integer(0));
  if (!json_object_get(g, "modes"))
    json_object_set_new(g, "modes", json_array());
  static const char *const times[] = {"turnaround_ms", "arrival_to_result_ms",
                                      "result_to_report_ms"};
  for (size_t i = 0; i < 3; i++)
    if (!json_object_get(g, times[i]))
      json_object_set_new(g, times[i], percentiles(NULL, 0));
  json_object_set_new(g, "critical_rate", ratio(get_int(g, "critical"), get_int(g, "completed")));
  json_object_set_new(
      g, "agreement_rate",
      ratio(get_int(g, "confirmed"), get_int(g, "confirmed") + get_int(g, "overridden")));
}

void rr_admin_ai_summary(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  const char *qs = rr_http_req_query(req, "since");
  int64_t since = 0;
  if (qs) {
    char *end;
    long long v = strtoll(qs, &end, 10);
    if (!*qs || *end || v < 0) {
      rr_http_reply_error(req, 400, "bad_query", "since is Unix milliseconds");
      return;
    }
    since = v;
  }
  json_t *index = json_object(), *list = json_array();
  int rc = index && list ? summarize(rr_journal_reader(a->journal), qs ? &since : NULL, index, list)
                         : RR_ENOMEM;
  json_decref(index);
  if (rc) {
    json_decref(list);
    rr_http_reply_error(req, 500, "internal_error",
                        rc == RR_ENOMEM ? "out of memory" : "the store could not be read");
    return;
  }
  for (size_t i = 0; i < json_array_size(list); i++)
    complete(json_array_get(list, i));
  json_t *out = json_pack("{s:o, s:I, s:o}", "since_ms", qs ? json_integer(since) : json_null(),
                          "generated_ms", (json_int_t)rr_admin_now_ms(), "endpoints", list);
  rr_http_reply_json(req, 200, out);
}

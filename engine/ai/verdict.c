/* The radiologist's verdict on AI findings: table ai_findings' verdict
 * columns and the audit records of kind "verdict". */
#include "ai/verdict.h"

#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* Columns ai_findings got after its first release (ALTER TABLE ADD COLUMN
 * when missing). */
static const char *const columns[][2] = {{"verdict_report", "TEXT"}, {"verdict_note", "TEXT"}};

int rr_ai_verdict_schema(rr_journal_t *j, char **errmsg) {
  for (size_t i = 0; i < sizeof columns / sizeof columns[0]; i++) {
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(rr_journal_reader(j),
                           "SELECT 1 FROM pragma_table_info('ai_findings') WHERE name = ?", -1, &st,
                           NULL) != SQLITE_OK) {
      if (errmsg && !*errmsg)
        *errmsg = strdup(sqlite3_errmsg(rr_journal_reader(j)));
      return RR_EIO;
    }
    sqlite3_bind_text(st, 1, columns[i][0], -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_ROW)
      continue;
    char sql[128];
    snprintf(sql, sizeof sql, "ALTER TABLE ai_findings ADD COLUMN %s %s", columns[i][0],
             columns[i][1]);
    if ((rc = rr_journal_schema(j, sql, errmsg)) != 0)
      return rc;
  }
  return 0;
}

const char *rr_ai_verdict_outcome_name(rr_ai_verdict_outcome_t o) {
  switch (o) {
  case RR_AI_VERDICT_RECORDED: return "recorded";
  case RR_AI_VERDICT_REPLACED: return "replaced";
  default: return "unchanged";
  }
}

/* ---- a verdict on its way to the store ------------------------------------ */

typedef struct verdict_write {
  char *job_id, *finding_id, *verdict, *by, *note, *report; /* by, note, report may be NULL */
  int64_t at_ms;
} verdict_write_t;

static void verdict_free(void *data) {
  verdict_write_t *w = data;
  free(w->job_id);
  free(w->finding_id);
  free(w->verdict);
  free(w->by);
  free(w->note);
  free(w->report);
  free(w);
}

static int bind_text(sqlite3_stmt *st, int i, const char *s) {
  return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

/* Worker thread, inside the batch's transaction. A finding that is gone
 * (its result stored again) is no reason to fail the batch. */
static int verdict_write(sqlite3 *db, void *data) {
  const verdict_write_t *w = data;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "UPDATE ai_findings SET verdict = ?3, verdict_ms = ?4, verdict_by = ?5,"
                         " verdict_report = ?6, verdict_note = ?7"
                         " WHERE job_id = ?1 AND finding_id = ?2",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, w->job_id);
  bind_text(st, 2, w->finding_id);
  bind_text(st, 3, w->verdict);
  sqlite3_bind_int64(st, 4, w->at_ms);
  bind_text(st, 5, w->by);
  bind_text(st, 6, w->report);
  bind_text(st, 7, w->note);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

/* The newest queued or in-flight verdict on one finding. */
typedef struct pending_find {
  const char *job_id, *finding_id;
  const verdict_write_t *found;
} pending_find_t;

static void find_pending(void *ud, const void *data) {
  pending_find_t *f = ud;
  const verdict_write_t *w = data;
  if (strcmp(w->job_id, f->job_id) == 0 && strcmp(w->finding_id, f->finding_id) == 0)
    f->found = w; /* oldest first: the last one seen wins */
}

static const verdict_write_t *pending_for(rr_journal_t *j, const char *job_id,
                                          const char *finding_id) {
  pending_find_t f = {job_id, finding_id, NULL};
  rr_journal_custom_each(j, verdict_write, find_pending, &f);
  return f.found;
}

/* ---- findings -------------------------------------------------------------- */

static void set_text(json_t *o, const char *key, sqlite3_stmt *st, int col) {
  const char *v = (const char *)sqlite3_column_text(st, col);
  if (v && *v)
    json_object_set_new(o, key, json_string(v));
}

/* Sets the verdict fields of finding o from a queued verdict. */
static void set_verdict(json_t *o, const char *verdict, const char *by, const char *report,
                        const char *note, int64_t at_ms) {
  json_object_set_new(o, "verdict", json_string(verdict));
  json_object_set_new(o, "verdict_ms", json_integer(at_ms));
  const char *keys[] = {"verdict_by", "verdict_report", "verdict_note"};
  const char *vals[] = {by, report, note};
  for (int i = 0; i < 3; i++)
    if (vals[i] && *vals[i])
      json_object_set_new(o, keys[i], json_string(vals[i]));
    else
      json_object_del(o, keys[i]);
}

static json_t *finding_row(sqlite3_stmt *st) {
  json_t *o = json_object();
  if (!o)
    return NULL;
  set_text(o, "job_id", st, 0);
  const char *dest = (const char *)sqlite3_column_text(st, 1);
  const char *chan = (const char *)sqlite3_column_text(st, 2);
  size_t cl = chan ? strlen(chan) : 0;
  /* the destination is "<channel>.<endpoint>": the endpoint is its short name */
  if (dest && chan && strncmp(dest, chan, cl) == 0 && dest[cl] == '.')
    dest += cl + 1;
  if (dest)
    json_object_set_new(o, "endpoint", json_string(dest));
  set_text(o, "channel", st, 2);
  set_text(o, "mode", st, 3);
  json_t *model = json_object();
  set_text(model, "name", st, 4);
  set_text(model, "version", st, 5);
  json_object_set_new(o, "model", model);
  set_text(o, "finding_id", st, 6);
  set_text(o, "study_uid", st, 7);
  set_text(o, "accession", st, 8);
  json_t *code = json_object();
  set_text(code, "system", st, 9);
  set_text(code, "code", st, 10);
  set_text(code, "meaning", st, 11);
  json_object_set_new(o, "code", code);
  set_text(o, "label", st, 12);
  if (sqlite3_column_type(st, 13) != SQLITE_NULL)
    json_object_set_new(o, "confidence", json_real(sqlite3_column_double(st, 13)));
  json_object_set_new(o, "critical", json_boolean(sqlite3_column_int(st, 14) != 0));
  if (sqlite3_column_type(st, 15) != SQLITE_NULL)
    json_object_set_new(o, "acr_category", json_integer(sqlite3_column_int(st, 15)));
  if (sqlite3_column_type(st, 16) != SQLITE_NULL) {
    set_text(o, "verdict", st, 16);
    set_text(o, "verdict_by", st, 17);
    set_text(o, "verdict_report", st, 18);
    set_text(o, "verdict_note", st, 19);
    json_object_set_new(o, "verdict_ms", json_integer(sqlite3_column_int64(st, 20)));
  }
  return o;
}

/* A queued verdict laid over the finding it is about, when listed. */
static void overlay(void *ud, const void *data) {
  json_t *list = ud;
  const verdict_write_t *w = data;
  size_t i;
  json_t *o;
  json_array_foreach(list, i, o) {
    const char *job = json_string_value(json_object_get(o, "job_id"));
    const char *fid = json_string_value(json_object_get(o, "finding_id"));
    if (job && fid && strcmp(job, w->job_id) == 0 && strcmp(fid, w->finding_id) == 0)
      set_verdict(o, w->verdict, w->by, w->report, w->note, w->at_ms);
  }
}

int rr_ai_findings_json(rr_journal_t *j, const char *accession, const char *study_uid,
                        json_t **out) {
  *out = NULL;
  if (accession && !*accession)
    accession = NULL;
  if (study_uid && !*study_uid)
    study_uid = NULL;
  if (!accession && !study_uid)
    return RR_EINVAL;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(
          rr_journal_reader(j),
          "SELECT f.job_id, j.destination, j.channel, j.mode, j.model_name, j.model_version,"
          " f.finding_id, f.study_uid,"
          " (SELECT coalesce(nullif(s.accession, ''), o.accession) FROM studies s"
          "  LEFT JOIN orders o ON o.id = s.order_id WHERE s.study_uid = f.study_uid),"
          " f.code_system, f.code, f.meaning, f.label, f.confidence, f.critical, f.acr_category,"
          " f.verdict, f.verdict_by, f.verdict_report, f.verdict_note, f.verdict_ms"
          " FROM ai_findings f JOIN ai_jobs j ON j.job_id = f.job_id"
          " WHERE f.study_uid = ?1 OR f.study_uid IN ("
          "  SELECT study_uid FROM studies WHERE accession = ?2"
          "  UNION SELECT s.study_uid FROM studies s JOIN orders o ON o.id = s.order_id"
          "   WHERE o.accession = ?2"
          "  UNION SELECT study_uid FROM orders WHERE accession = ?2 AND study_uid IS NOT NULL)"
          " ORDER BY j.result_ms, f.job_id, f.finding_id LIMIT ?3",
          -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, study_uid);
  bind_text(st, 2, accession);
  sqlite3_bind_int(st, 3, RR_AI_FINDINGS_MAX);
  json_t *list = json_array();
  int rc = list ? 0 : RR_ENOMEM, step;
  while (rc == 0 && (step = sqlite3_step(st)) == SQLITE_ROW) {
    json_t *o = finding_row(st);
    if (!o || json_array_append_new(list, o) != 0)
      rc = RR_ENOMEM;
  }
  if (rc == 0 && step != SQLITE_DONE)
    rc = RR_EIO;
  sqlite3_finalize(st);
  if (rc) {
    json_decref(list);
    return rc;
  }
  rr_journal_custom_each(j, verdict_write, overlay, list);
  *out = list;
  return 0;
}

/* ---- recording a verdict ----------------------------------------------------- */

static bool too_long(const char *s, size_t max) {
  return s && strlen(s) > max;
}

static char *dup_or_null(const char *s, bool *fail) {
  if (!s || !*s)
    return NULL;
  char *d = strdup(s);
  if (!d)
    *fail = true;
  return d;
}

static bool same(const char *a, const char *b) {
  return strcmp(a ? a : "", b ? b : "") == 0;
}

static const char *col(sqlite3_stmt *st, int i) {
  const char *v = (const char *)sqlite3_column_text(st, i);
  return v && *v ? v : NULL;
}

/* The audit record's data: what the verdict is about, and what it says. */
static json_t *audit_data(sqlite3_stmt *st, const rr_ai_verdict_t *v, json_t *replaces) {
  json_t *d = json_object();
  json_object_set_new(d, "finding_id", json_string(v->finding_id));
  json_object_set_new(d, "verdict", json_string(v->verdict));
  const char *text[][2] = {{"study_uid", col(st, 0)},
                           {"by", v->by},
                           {"note", v->note},
                           {"report", v->report},
                           {"channel", v->channel}};
  for (size_t i = 0; i < sizeof text / sizeof text[0]; i++)
    if (text[i][1] && *text[i][1])
      json_object_set_new(d, text[i][0], json_string(text[i][1]));
  json_t *code = json_object();
  const char *ck[] = {"system", "code", "meaning"};
  for (int i = 0; i < 3; i++)
    if (col(st, 1 + i))
      json_object_set_new(code, ck[i], json_string(col(st, 1 + i)));
  json_object_set_new(d, "code", code);
  if (col(st, 4))
    json_object_set_new(d, "label", json_string(col(st, 4)));
  json_t *model = json_object();
  if (col(st, 5))
    json_object_set_new(model, "name", json_string(col(st, 5)));
  if (col(st, 6))
    json_object_set_new(model, "version", json_string(col(st, 6)));
  json_object_set_new(d, "model", model);
  if (col(st, 7))
    json_object_set_new(d, "endpoint", json_string(col(st, 7)));
  if (replaces)
    json_object_set_new(d, "replaces", replaces);
  return d;
}

static int job_exists(rr_journal_t *j, const char *job_id) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j), "SELECT 1 FROM ai_jobs WHERE job_id = ?", -1, &st,
                         NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, job_id);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : RR_EIO;
}

int rr_ai_verdict_record(rr_journal_t *j, const rr_ai_verdict_t *v,
                         rr_ai_verdict_outcome_t *outcome, rr_buf_t *err) {
  if (!v->verdict ||
      (strcmp(v->verdict, "confirmed") != 0 && strcmp(v->verdict, "overridden") != 0)) {
    if (err)
      rr_buf_printf(err, "a verdict is \"confirmed\" or \"overridden\"");
    return RR_EINVAL;
  }
  if (!v->job_id || !*v->job_id || !v->finding_id || !*v->finding_id ||
      too_long(v->job_id, RR_AI_VERDICT_TEXT_MAX) ||
      too_long(v->finding_id, RR_AI_VERDICT_TEXT_MAX) || too_long(v->by, RR_AI_VERDICT_TEXT_MAX) ||
      too_long(v->report, RR_AI_VERDICT_TEXT_MAX) || too_long(v->note, RR_AI_VERDICT_NOTE_MAX)) {
    if (err)
      rr_buf_printf(err, "job and finding ids, by and report are 1 to %d bytes, a note at most %d",
                    RR_AI_VERDICT_TEXT_MAX, RR_AI_VERDICT_NOTE_MAX);
    return RR_EINVAL;
  }
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT f.study_uid, f.code_system, f.code, f.meaning, f.label,"
                         " j.model_name, j.model_version,"
                         " CASE WHEN substr(j.destination, 1, length(j.channel) + 1)"
                         "  = j.channel || '.' THEN substr(j.destination, length(j.channel) + 2)"
                         "  ELSE j.destination END,"
                         " f.verdict, f.verdict_by, f.verdict_report, f.verdict_ms"
                         " FROM ai_findings f JOIN ai_jobs j ON j.job_id = f.job_id"
                         " WHERE f.job_id = ?1 AND f.finding_id = ?2",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, v->job_id);
  bind_text(st, 2, v->finding_id);
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
      return RR_EIO;
    int known = job_exists(j, v->job_id);
    if (known < 0)
      return known;
    if (err) {
      if (known)
        rr_buf_printf(err, "AI job %s has no finding \"%s\"", v->job_id, v->finding_id);
      else
        rr_buf_printf(err, "no AI job \"%s\" with findings", v->job_id);
    }
    return RR_ENOTFOUND;
  }
  /* The current verdict: queued, else as stored. */
  const char *cur = col(st, 8), *cur_by = col(st, 9), *cur_report = col(st, 10);
  int64_t cur_ms = sqlite3_column_int64(st, 11);
  const verdict_write_t *q = pending_for(j, v->job_id, v->finding_id);
  if (q) {
    cur = q->verdict;
    cur_by = q->by;
    cur_report = q->report;
    cur_ms = q->at_ms;
  }
  if (cur && same(cur, v->verdict) && same(cur_by, v->by) && same(cur_report, v->report)) {
    sqlite3_finalize(st);
    *outcome = RR_AI_VERDICT_UNCHANGED;
    return 0;
  }
  json_t *replaces = NULL;
  if (cur) {
    replaces = json_pack("{s:s, s:I}", "verdict", cur, "at_ms", (json_int_t)cur_ms);
    if (replaces && cur_by)
      json_object_set_new(replaces, "by", json_string(cur_by));
    if (replaces && cur_report)
      json_object_set_new(replaces, "report", json_string(cur_report));
  }
  json_t *data = audit_data(st, v, replaces);
  sqlite3_finalize(st);
  bool fail = !data || (cur && !replaces);
  verdict_write_t *w = calloc(1, sizeof *w);
  if (w) {
    w->job_id = dup_or_null(v->job_id, &fail);
    w->finding_id = dup_or_null(v->finding_id, &fail);
    w->verdict = dup_or_null(v->verdict, &fail);
    w->by = dup_or_null(v->by, &fail);
    w->note = dup_or_null(v->note, &fail);
    w->report = dup_or_null(v->report, &fail);
    w->at_ms = v->at_ms;
  }
  if (!w || fail) {
    if (w)
      verdict_free(w);
    json_decref(data);
    return RR_ENOMEM;
  }
  if ((rc = rr_journal_custom(j, verdict_write, w, verdict_free, NULL, NULL)) != 0) {
    json_decref(data);
    return rc;
  }
  const char *actor = v->by && *v->by ? v->by : v->channel;
  if ((rc = rr_journal_audit_json(j, actor ? actor : "engine", "verdict", v->job_id, data)) != 0)
    return rc;
  *outcome = cur ? RR_AI_VERDICT_REPLACED : RR_AI_VERDICT_RECORDED;
  return 0;
}

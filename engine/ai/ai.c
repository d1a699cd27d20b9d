/* AI jobs: request documents, result checks, and their rows in the store. */
#include "ai/ai.h"
#include "ai/verdict.h"

#include <math.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "cli/schemas.h"
#include "core/error.h"
#include "core/json_schema.h"

/* ---- pure --------------------------------------------------------------------- */

const char *rr_ai_mode_name(rr_ai_mode_t m) {
  return m == RR_AI_ACTIVE ? "active" : m == RR_AI_ASSISTANT ? "assistant" : "silent";
}

int rr_ai_mode_parse(const char *s) {
  if (!s)
    return -1;
  if (strcmp(s, "silent") == 0)
    return RR_AI_SILENT;
  if (strcmp(s, "assistant") == 0)
    return RR_AI_ASSISTANT;
  if (strcmp(s, "active") == 0)
    return RR_AI_ACTIVE;
  return -1;
}

static bool in_list(char **list, const char *v, bool nocase) {
  for (; v && list && *list; list++)
    if (nocase ? strcasecmp(*list, v) == 0 : strcmp(*list, v) == 0)
      return true;
  return false;
}

bool rr_ai_takes_match(const rr_ai_takes_t *t, json_t *study, const char **why) {
  *why = NULL;
  if (t->modalities && *t->modalities) {
    bool ok = in_list(t->modalities, json_string_value(json_object_get(study, "modality")), false);
    json_t *mods = json_object_get(study, "modalities");
    for (size_t i = 0; !ok && i < json_array_size(mods); i++)
      ok = in_list(t->modalities, json_string_value(json_array_get(mods, i)), false);
    if (!ok) {
      *why = "modality";
      return false;
    }
  }
  if (t->body_parts && *t->body_parts &&
      !in_list(t->body_parts, json_string_value(json_object_get(study, "body_part")), true)) {
    *why = "body part";
    return false;
  }
  if (t->procedures && *t->procedures) {
    json_t *proc = json_object_get(json_object_get(study, "order"), "procedure");
    if (!in_list(t->procedures, json_string_value(json_object_get(proc, "code")), false)) {
      *why = "procedure";
      return false;
    }
  }
  return true;
}

static void rfc3339(int64_t ms, char out[32]) {
  time_t t = (time_t)(ms / 1000);
  struct tm tm;
  gmtime_r(&t, &tm);
  char base[24];
  strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(out, 32, "%s.%03dZ", base, (int)(ms % 1000));
}

/* Copies key of from into to when present (null stays null). */
static void copy_field(json_t *to, json_t *from, const char *key) {
  json_t *v = json_object_get(from, key);
  json_object_set_new(to, key, v ? json_deep_copy(v) : json_null());
}

int rr_ai_build_request(json_t *ctx, const rr_ai_request_opts_t *o, rr_buf_t *out) {
  const char *uid = json_string_value(json_object_get(ctx, "study_uid"));
  if (!uid || !o->job_id || !o->endpoint)
    return RR_EINVAL;
  char created[32], deadline[32];
  rfc3339(o->created_ms, created);
  rfc3339(o->deadline_ms, deadline);
  json_t *req = json_object();
  json_object_set_new(req, "schema", json_string("radrelay.ai-request/1"));
  json_object_set_new(req, "job_id", json_string(o->job_id));
  json_object_set_new(req, "endpoint", json_string(o->endpoint));
  json_object_set_new(req, "created", json_string(created));
  json_object_set_new(req, "deadline", json_string(deadline));
  if (o->callback_url)
    json_object_set_new(req, "callback",
                        json_pack("{s:s, s:s}", "url", o->callback_url, "token", o->token));
  /* The study: identifiers of the study, never of the patient. */
  json_t *study = json_object();
  static const char *const keys[] = {"study_uid",  "accession",  "modality",
                                     "modalities", "body_part",  "description",
                                     "study_date", "study_time", "instances"};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
    copy_field(study, ctx, keys[i]);
  json_t *series = json_array();
  json_t *src = json_object_get(ctx, "series");
  for (size_t i = 0; i < json_array_size(src); i++) {
    json_t *s = json_array_get(src, i), *d = json_object();
    static const char *const skeys[] = {"series_uid", "modality", "series_number", "instances",
                                        "body_part"};
    for (size_t k = 0; k < sizeof skeys / sizeof skeys[0]; k++)
      copy_field(d, s, skeys[k]);
    /* Series Number is an IS: a number in the request */
    const char *sn = json_string_value(json_object_get(s, "series_number"));
    char *end = NULL;
    long n = sn ? strtol(sn, &end, 10) : 0;
    json_object_set_new(d, "series_number",
                        sn && *sn && end && *end == '\0' ? json_integer(n) : json_null());
    json_array_append_new(series, d);
  }
  json_object_set_new(study, "series", series);
  json_object_set_new(req, "study", study);
  json_t *order = json_object_get(ctx, "order");
  if (json_is_object(order)) {
    json_t *ro = json_object();
    static const char *const okeys[] = {"priority", "reason", "procedure", "patient_class"};
    for (size_t i = 0; i < sizeof okeys / sizeof okeys[0]; i++)
      copy_field(ro, order, okeys[i]);
    /* The procedure as a coded text with its three parts (null when unknown). */
    json_t *proc = json_object_get(order, "procedure");
    if (json_is_object(proc) && json_is_string(json_object_get(proc, "code"))) {
      json_t *p = json_object();
      copy_field(p, proc, "code");
      copy_field(p, proc, "text");
      copy_field(p, proc, "system");
      json_object_set_new(ro, "procedure", p);
    } else {
      json_object_set_new(ro, "procedure", json_null());
    }
    json_object_set_new(req, "order", ro);
  } else {
    json_object_set_new(req, "order", json_null());
  }
  const char *url = json_string_value(json_object_get(ctx, "retrieve_url"));
  char *built = NULL;
  if (!url && o->images_root) {
    size_t n = strlen(o->images_root);
    while (n && o->images_root[n - 1] == '/')
      n--;
    built = malloc(n + strlen(uid) + 16);
    if (built) {
      snprintf(built, n + strlen(uid) + 16, "%.*s/studies/%s", (int)n, o->images_root, uid);
      url = built;
    }
  }
  json_t *auth = o->images_token
                     ? json_pack("{s:s, s:s}", "type", "bearer", "token", o->images_token)
                     : json_null();
  json_object_set_new(req, "images", json_pack("{s:s?, s:o}", "wado_rs", url, "auth", auth));
  free(built);
  char *text = json_dumps(req, JSON_COMPACT);
  json_decref(req);
  if (!text)
    return RR_ENOMEM;
  int rc = rr_buf_append(out, text, strlen(text));
  free(text);
  return rc;
}

static void hex(const unsigned char *b, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = digits[b[i] >> 4];
    out[2 * i + 1] = digits[b[i] & 15];
  }
  out[2 * n] = '\0';
}

void rr_ai_token_hash(const char *token, char hash[65]) {
  unsigned char md[32];
  unsigned int n = 0;
  EVP_Digest(token, strlen(token), md, &n, EVP_sha256(), NULL);
  hex(md, 32, hash);
}

int rr_ai_token(char token[RR_AI_TOKEN_HEX + 1], char hash[65]) {
  unsigned char b[RR_AI_TOKEN_HEX / 2];
  if (RAND_bytes(b, sizeof b) != 1)
    return RR_EIO;
  hex(b, sizeof b, token);
  rr_ai_token_hash(token, hash);
  return 0;
}

/* ---- result checks ---------------------------------------------------------- */

static int bad(rr_buf_t *err, const char *path, const char *what) {
  if (err)
    rr_buf_printf(err, "%s: %s", path, what);
  return RR_EPARSE;
}

static bool is_code(json_t *c) {
  return json_is_object(c) && json_is_string(json_object_get(c, "system")) &&
         json_is_string(json_object_get(c, "code")) &&
         json_is_string(json_object_get(c, "meaning")) &&
         json_string_length(json_object_get(c, "code")) > 0;
}

static bool numbers(json_t *a, size_t n) {
  if (!json_is_array(a) || json_array_size(a) != n)
    return false;
  for (size_t i = 0; i < n; i++)
    if (!json_is_number(json_array_get(a, i)) || !isfinite(json_number_value(json_array_get(a, i))))
      return false;
  return true;
}

static int check_finding(json_t *f, size_t i, rr_ai_finding_t *out, rr_buf_t *err) {
  char path[64];
  snprintf(path, sizeof path, "$.findings[%zu]", i);
  if (!json_is_object(f))
    return bad(err, path, "must be an object");
  json_t *id = json_object_get(f, "id"), *code = json_object_get(f, "code");
  if (!json_is_string(id) || json_string_length(id) == 0 || json_string_length(id) > 64)
    return bad(err, path, "id must be a string of 1 to 64 characters");
  if (!is_code(code))
    return bad(err, path, "code must be {system, code, meaning} strings");
  json_t *label = json_object_get(f, "label"), *conf = json_object_get(f, "confidence");
  json_t *crit = json_object_get(f, "critical"), *cat = json_object_get(f, "acr_category");
  if (label && !json_is_string(label))
    return bad(err, path, "label must be a string");
  if (conf &&
      (!json_is_number(conf) || !(json_number_value(conf) >= 0.0) || json_number_value(conf) > 1.0))
    return bad(err, path, "confidence must be a number from 0 to 1");
  if (crit && !json_is_boolean(crit))
    return bad(err, path, "critical must be true or false");
  if (cat && (!json_is_integer(cat) || json_integer_value(cat) < 1 || json_integer_value(cat) > 3))
    return bad(err, path, "acr_category must be 1, 2 or 3");
  json_t *loc = json_object_get(f, "location");
  if (loc) {
    if (!json_is_object(loc))
      return bad(err, path, "location must be an object");
    json_t *p = json_object_get(loc, "point"), *b = json_object_get(loc, "box");
    json_t *p3 = json_object_get(loc, "point3d"), *b3 = json_object_get(loc, "box3d");
    if ((p && !numbers(p, 2)) || (b && !numbers(b, 4)) || (p3 && !numbers(p3, 3)) ||
        (b3 && !numbers(b3, 6)))
      return bad(err, path, "location: point [x,y], box [4], point3d [3], box3d [6] numbers");
    json_t *fr = json_object_get(loc, "frame");
    if (fr && (!json_is_integer(fr) || json_integer_value(fr) < 1))
      return bad(err, path, "location.frame must be a whole number from 1");
  }
  json_t *ms = json_object_get(f, "measurements");
  if (ms && !json_is_array(ms))
    return bad(err, path, "measurements must be an array");
  for (size_t k = 0; k < json_array_size(ms); k++) {
    json_t *m = json_array_get(ms, k);
    if (!json_is_object(m) || !is_code(json_object_get(m, "code")) ||
        !json_is_number(json_object_get(m, "value")) || !json_is_string(json_object_get(m, "unit")))
      return bad(err, path, "a measurement is {code, value (number), unit (UCUM string)}");
  }
  out->id = json_string_value(id);
  out->label = label ? json_string_value(label) : "";
  out->code_system = json_string_value(json_object_get(code, "system"));
  out->code = json_string_value(json_object_get(code, "code"));
  out->meaning = json_string_value(json_object_get(code, "meaning"));
  out->confidence = conf ? json_number_value(conf) : -1.0;
  out->critical = crit && json_is_true(crit);
  out->acr_category = cat ? (int)json_integer_value(cat) : 0;
  out->json = f;
  return 0;
}

int rr_ai_parse_result(const char *text, size_t len, rr_ai_result_t **out, rr_buf_t *err) {
  *out = NULL;
  json_error_t je;
  json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
  if (!doc) {
    if (err)
      rr_buf_printf(err, "not JSON (byte %d): %s", je.position, je.text);
    return RR_EPARSE;
  }
  rr_ai_result_t *r = calloc(1, sizeof *r);
  if (!r) {
    json_decref(doc);
    return RR_ENOMEM;
  }
  r->json = doc;
  int rc = 0;
  const char *schema = json_string_value(json_object_get(doc, "schema"));
  const char *job = json_string_value(json_object_get(doc, "job_id"));
  const char *status = json_string_value(json_object_get(doc, "status"));
  json_t *model = json_object_get(doc, "model");
  json_t *findings = json_object_get(doc, "findings");
  if (!json_is_object(doc))
    rc = bad(err, "$", "must be an object");
  else if (!schema || strcmp(schema, "radrelay.ai-result/1") != 0)
    rc = bad(err, "$.schema", "must be \"radrelay.ai-result/1\"");
  else if (!job || !*job || strlen(job) >= RR_AI_JOB_ID_MAX)
    rc = bad(err, "$.job_id", "must be the job's id");
  else if (!status || (strcmp(status, "completed") != 0 && strcmp(status, "failed") != 0 &&
                       strcmp(status, "rejected") != 0))
    rc = bad(err, "$.status", "must be completed, failed or rejected");
  else if ((model || strcmp(status, "completed") == 0) &&
           (!json_is_object(model) || !json_is_string(json_object_get(model, "name")) ||
            !json_is_string(json_object_get(model, "version"))))
    rc = bad(err, "$.model", "must have name and version strings");
  else if (strcmp(status, "completed") != 0 && !json_is_string(json_object_get(doc, "error")))
    rc = bad(err, "$.error", "a failed or rejected result says why");
  else if (findings && !json_is_array(findings))
    rc = bad(err, "$.findings", "must be an array");
  else if (json_array_size(findings) > 1000)
    rc = bad(err, "$.findings", "more than 1000 findings");
  if (rc == 0 && json_array_size(findings)) {
    r->findings = calloc(json_array_size(findings), sizeof *r->findings);
    if (!r->findings)
      rc = RR_ENOMEM;
  }
  for (size_t i = 0; rc == 0 && i < json_array_size(findings); i++) {
    rc = check_finding(json_array_get(findings, i), i, &r->findings[i], err);
    for (size_t k = 0; rc == 0 && k < i; k++)
      if (strcmp(r->findings[k].id, r->findings[i].id) == 0)
        rc = bad(err, "$.findings", "two findings with the same id");
    if (rc == 0) {
      r->nfindings++;
      r->critical = r->critical || r->findings[i].critical;
      int c = r->findings[i].acr_category;
      if (c && (!r->acr_category || c < r->acr_category))
        r->acr_category = c;
    }
  }
  if (rc) {
    rr_ai_result_free(r);
    return rc;
  }
  r->job_id = job;
  r->status = status;
  r->error = json_string_value(json_object_get(doc, "error"));
  r->model_name = json_string_value(json_object_get(model, "name"));
  r->model_version = json_string_value(json_object_get(model, "version"));
  *out = r;
  return 0;
}

void rr_ai_result_free(rr_ai_result_t *r) {
  if (!r)
    return;
  json_decref(r->json);
  free(r->findings);
  free(r);
}

/* ---- the store ------------------------------------------------------------- */

static const char ai_schema[] =
    "CREATE TABLE IF NOT EXISTS ai_jobs("
    " job_id TEXT PRIMARY KEY,"
    " queue_id INTEGER,"
    " destination TEXT NOT NULL, channel TEXT NOT NULL, study_uid TEXT NOT NULL,"
    " mode TEXT NOT NULL,"
    " state TEXT NOT NULL," /* running, completed, failed, rejected, expired */
    " token_hash TEXT, status_url TEXT,"
    " sent_ms INTEGER, deadline_ms INTEGER, result_ms INTEGER,"
    " model_name TEXT, model_version TEXT, critical INTEGER, acr_category INTEGER,"
    " reason TEXT, request TEXT, result TEXT) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS ai_jobs_state ON ai_jobs(state, deadline_ms);"
    "CREATE INDEX IF NOT EXISTS ai_jobs_study ON ai_jobs(study_uid);"
    "CREATE TABLE IF NOT EXISTS ai_findings("
    " job_id TEXT NOT NULL, finding_id TEXT NOT NULL, study_uid TEXT NOT NULL,"
    " code_system TEXT, code TEXT, meaning TEXT, label TEXT, confidence REAL,"
    " critical INTEGER NOT NULL, acr_category INTEGER, finding TEXT NOT NULL,"
    " verdict TEXT, verdict_ms INTEGER, verdict_by TEXT,"
    " PRIMARY KEY(job_id, finding_id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS ai_findings_study ON ai_findings(study_uid);";

int rr_ai_schema(rr_journal_t *j, char **errmsg) {
  int rc = rr_journal_schema(j, ai_schema, errmsg);
  return rc ? rc : rr_ai_verdict_schema(j, errmsg);
}

static int bind_text(sqlite3_stmt *st, int i, const char *s) {
  return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

static int step_done(sqlite3_stmt *st) {
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

typedef struct job_write {
  rr_ai_job_t job;
  char *strs[9];
} job_write_t;

static void job_free(void *data) {
  job_write_t *w = data;
  for (size_t i = 0; i < 9; i++)
    free(w->strs[i]);
  free(w);
}

static int job_write(sqlite3 *db, void *data) {
  const job_write_t *w = data;
  const rr_ai_job_t *jb = &w->job;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "INSERT INTO ai_jobs(job_id, queue_id, destination, channel, study_uid,"
                         " mode, state, token_hash, status_url, sent_ms, deadline_ms, request)"
                         " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"
                         " ON CONFLICT(job_id) DO UPDATE SET state = excluded.state,"
                         " token_hash = coalesce(excluded.token_hash, token_hash),"
                         " status_url = coalesce(excluded.status_url, status_url),"
                         " sent_ms = excluded.sent_ms,"
                         " request = coalesce(excluded.request, request)"
                         " WHERE ai_jobs.result_ms IS NULL",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, jb->job_id);
  sqlite3_bind_int64(st, 2, jb->queue_id);
  bind_text(st, 3, jb->destination);
  bind_text(st, 4, jb->channel);
  bind_text(st, 5, jb->study_uid);
  bind_text(st, 6, rr_ai_mode_name(jb->mode));
  bind_text(st, 7, jb->state);
  bind_text(st, 8, jb->token_hash);
  bind_text(st, 9, jb->status_url);
  sqlite3_bind_int64(st, 10, jb->sent_ms);
  sqlite3_bind_int64(st, 11, jb->deadline_ms);
  bind_text(st, 12, jb->request);
  return step_done(st);
}

static char *dup0(const char *s, bool *fail) {
  if (!s)
    return NULL;
  char *d = strdup(s);
  if (!d)
    *fail = true;
  return d;
}

int rr_ai_job_sent(rr_journal_t *j, const rr_ai_job_t *job) {
  job_write_t *w = calloc(1, sizeof *w);
  if (!w)
    return RR_ENOMEM;
  bool fail = false;
  w->job = *job;
  const char *src[9] = {job->job_id,     job->destination, job->channel,
                        job->study_uid,  job->state,       job->token_hash,
                        job->status_url, job->request,     NULL};
  const char **dst[9] = {&w->job.job_id,     &w->job.destination, &w->job.channel,
                         &w->job.study_uid,  &w->job.state,       &w->job.token_hash,
                         &w->job.status_url, &w->job.request,     NULL};
  for (size_t i = 0; i < 8; i++)
    *dst[i] = w->strs[i] = dup0(src[i], &fail);
  if (fail) {
    job_free(w);
    return RR_ENOMEM;
  }
  return rr_journal_custom(j, job_write, w, job_free, NULL, NULL);
}

static void copy_col(sqlite3_stmt *st, int col, char *out, size_t cap) {
  const char *v = (const char *)sqlite3_column_text(st, col);
  snprintf(out, cap, "%s", v ? v : "");
}

int rr_ai_job_get(rr_journal_t *j, const char *job_id, rr_ai_job_info_t *out) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT job_id, destination, channel, study_uid, state, token_hash,"
                         " status_url, mode, sent_ms, deadline_ms, result_ms FROM ai_jobs"
                         " WHERE job_id = ?",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, job_id);
  int rc = sqlite3_step(st), result = RR_ENOTFOUND;
  if (rc == SQLITE_ROW) {
    memset(out, 0, sizeof *out);
    copy_col(st, 0, out->job_id, sizeof out->job_id);
    copy_col(st, 1, out->destination, sizeof out->destination);
    copy_col(st, 2, out->channel, sizeof out->channel);
    copy_col(st, 3, out->study_uid, sizeof out->study_uid);
    copy_col(st, 4, out->state, sizeof out->state);
    copy_col(st, 5, out->token_hash, sizeof out->token_hash);
    copy_col(st, 6, out->status_url, sizeof out->status_url);
    int m = rr_ai_mode_parse((const char *)sqlite3_column_text(st, 7));
    out->mode = m < 0 ? RR_AI_SILENT : (rr_ai_mode_t)m;
    out->sent_ms = sqlite3_column_int64(st, 8);
    out->deadline_ms = sqlite3_column_int64(st, 9);
    out->result_ms = sqlite3_column_int64(st, 10);
    result = 0;
  } else if (rc != SQLITE_DONE) {
    result = RR_EIO;
  }
  sqlite3_finalize(st);
  return result;
}

typedef struct result_write {
  char *json; /* the whole document */
  int64_t at_ms;
} result_write_t;

static void result_free(void *data) {
  result_write_t *w = data;
  free(w->json);
  free(w);
}

/* Worker side: parses its own copy (the loop's result is not shared). */
static int result_write(sqlite3 *db, void *data) {
  const result_write_t *w = data;
  rr_ai_result_t *r;
  if (rr_ai_parse_result(w->json, strlen(w->json), &r, NULL) != 0)
    return RR_EIO;
  sqlite3_stmt *st;
  int rc = RR_EIO;
  if (sqlite3_prepare_v2(db,
                         "UPDATE ai_jobs SET state = ?2, result = ?3, result_ms = ?4,"
                         " model_name = ?5, model_version = ?6, critical = ?7, acr_category = ?8,"
                         " reason = ?9 WHERE job_id = ?1",
                         -1, &st, NULL) != SQLITE_OK)
    goto out;
  bind_text(st, 1, r->job_id);
  bind_text(st, 2, r->status);
  bind_text(st, 3, w->json);
  sqlite3_bind_int64(st, 4, w->at_ms);
  bind_text(st, 5, r->model_name);
  bind_text(st, 6, r->model_version);
  sqlite3_bind_int(st, 7, r->critical);
  if (r->acr_category)
    sqlite3_bind_int(st, 8, r->acr_category);
  bind_text(st, 9, r->error);
  if ((rc = step_done(st)) != 0)
    goto out;
  for (size_t i = 0; i < r->nfindings; i++) {
    const rr_ai_finding_t *f = &r->findings[i];
    if (sqlite3_prepare_v2(
            db,
            "INSERT OR REPLACE INTO ai_findings(job_id, finding_id, study_uid, code_system, code,"
            " meaning, label, confidence, critical, acr_category, finding)"
            " SELECT ?1, ?2, study_uid, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10 FROM ai_jobs"
            " WHERE job_id = ?1",
            -1, &st, NULL) != SQLITE_OK) {
      rc = RR_EIO;
      goto out;
    }
    char *fj = json_dumps(f->json, JSON_COMPACT);
    bind_text(st, 1, r->job_id);
    bind_text(st, 2, f->id);
    bind_text(st, 3, f->code_system);
    bind_text(st, 4, f->code);
    bind_text(st, 5, f->meaning);
    bind_text(st, 6, f->label);
    if (f->confidence >= 0)
      sqlite3_bind_double(st, 7, f->confidence);
    sqlite3_bind_int(st, 8, f->critical);
    if (f->acr_category)
      sqlite3_bind_int(st, 9, f->acr_category);
    bind_text(st, 10, fj ? fj : "{}");
    rc = step_done(st);
    free(fj);
    if (rc)
      goto out;
  }
out:
  rr_ai_result_free(r);
  return rc;
}

int rr_ai_store_result(rr_journal_t *j, const rr_ai_result_t *r, int64_t at_ms,
                       rr_journal_done_cb cb, void *ud) {
  result_write_t *w = calloc(1, sizeof *w);
  if (!w)
    return RR_ENOMEM;
  w->json = json_dumps(r->json, JSON_COMPACT);
  w->at_ms = at_ms;
  if (!w->json) {
    free(w);
    return RR_ENOMEM;
  }
  return rr_journal_custom(j, result_write, w, result_free, cb, ud);
}

typedef struct state_write {
  char job_id[RR_AI_JOB_ID_MAX], state[16], reason[256];
  int64_t at_ms;
} state_write_t;

static int state_write(sqlite3 *db, void *data) {
  const state_write_t *w = data;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "UPDATE ai_jobs SET state = ?2, reason = ?3, result_ms = ?4"
                         " WHERE job_id = ?1 AND result IS NULL",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, w->job_id);
  bind_text(st, 2, w->state);
  bind_text(st, 3, w->reason);
  sqlite3_bind_int64(st, 4, w->at_ms);
  return step_done(st);
}

int rr_ai_job_state(rr_journal_t *j, const char *job_id, const char *state, const char *reason,
                    int64_t at_ms) {
  state_write_t *w = calloc(1, sizeof *w);
  if (!w)
    return RR_ENOMEM;
  snprintf(w->job_id, sizeof w->job_id, "%s", job_id);
  snprintf(w->state, sizeof w->state, "%s", state);
  snprintf(w->reason, sizeof w->reason, "%s", reason ? reason : "");
  w->at_ms = at_ms;
  return rr_journal_custom(j, state_write, w, free, NULL, NULL);
}

int rr_ai_jobs_overdue(rr_journal_t *j, int64_t now_ms,
                       void (*cb)(void *ud, const char *job_id, const char *destination),
                       void *ud) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT job_id, destination FROM ai_jobs WHERE state = 'running'"
                         " AND deadline_ms < ?",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_int64(st, 1, now_ms);
  int n = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    cb(ud, (const char *)sqlite3_column_text(st, 0), (const char *)sqlite3_column_text(st, 1));
    n++;
  }
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? n : RR_EIO;
}

int rr_ai_jobs_polled(rr_journal_t *j,
                      void (*cb)(void *ud, const char *job_id, const char *destination,
                                 const char *study_uid, const char *status_url, int64_t sent_ms),
                      void *ud) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT job_id, destination, study_uid, status_url, sent_ms FROM ai_jobs"
                         " WHERE state = 'running' AND status_url IS NOT NULL",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  int n = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    cb(ud, (const char *)sqlite3_column_text(st, 0), (const char *)sqlite3_column_text(st, 1),
       (const char *)sqlite3_column_text(st, 2), (const char *)sqlite3_column_text(st, 3),
       sqlite3_column_int64(st, 4));
    n++;
  }
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? n : RR_EIO;
}

int rr_ai_validate(const char *kind, json_t *doc, rr_buf_t *err) {
  static rr_json_schema_t *compiled[3];
  static const char *const names[] = {"result", "request", "accepted"};
  const char *texts[] = {rr_schema_ai_result, rr_schema_ai_request, rr_schema_ai_accepted};
  size_t k = 0;
  while (k < 3 && strcmp(names[k], kind) != 0)
    k++;
  if (k == 3)
    return RR_EINVAL;
  if (!compiled[k]) {
    json_t *sj = json_loads(texts[k], 0, NULL);
    int rc = sj ? rr_json_schema_new(sj, &compiled[k], err) : RR_ENOMEM;
    json_decref(sj);
    if (rc)
      return rc;
  }
  int n = rr_json_schema_validate(compiled[k], doc, NULL, err);
  return n < 0 ? n : n > 0 ? RR_EPARSE : 0;
}

/* The radiologist's verdicts on AI findings in a real store: findings by
 * Study UID and by accession number, verdicts recorded, replaced and
 * repeated, queued verdicts seen before their commit, unknown findings
 * refused, the audit records, and an older store's ai_findings migrated. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sqlite3.h>
#include <uv.h>

#include "ai/ai.h"
#include "ai/verdict.h"
#include "audit/audit.h"
#include "core/error.h"
#include "rr_test.h"

static char g_dir[] = "/tmp/rr-test-verdict-XXXXXX";

typedef struct waiter {
  int done, status;
} waiter_t;

static void on_done(void *ud, int status, int64_t id) {
  waiter_t *w = ud;
  (void)id;
  w->done++;
  w->status = status;
}

/* Commits everything queued; returns the commit's status. */
static int commit(uv_loop_t *loop, rr_journal_t *j) {
  waiter_t w = {0};
  if (rr_journal_add_barrier(j, on_done, &w) != 0)
    return -1;
  rr_journal_kick(j);
  while (!w.done)
    uv_run(loop, UV_RUN_ONCE);
  return w.status;
}

static const char *str(json_t *o, const char *key) {
  const char *v = json_string_value(json_object_get(o, key));
  return v ? v : "";
}

/* A completed job with two findings on study uid. */
static void add_job(rr_journal_t *j, const char *job_id, const char *uid) {
  rr_ai_job_t job = {.job_id = job_id,
                     .queue_id = 1,
                     .destination = "imaging.hemorrhage",
                     .channel = "imaging",
                     .study_uid = uid,
                     .mode = RR_AI_ASSISTANT,
                     .state = "running",
                     .sent_ms = 1000,
                     .deadline_ms = 9000,
                     .request = "{}"};
  CHECK_EQ_INT(rr_ai_job_sent(j, &job), 0);
  char res[1024];
  snprintf(res, sizeof res,
           "{\"schema\":\"radrelay.ai-result/1\",\"job_id\":\"%s\",\"status\":\"completed\","
           "\"model\":{\"name\":\"ref\",\"version\":\"2\"},\"findings\":["
           "{\"id\":\"F1\",\"code\":{\"system\":\"SCT\",\"code\":\"1386000\","
           "\"meaning\":\"Intracranial hemorrhage\"},\"label\":\"ICH\",\"critical\":true,"
           "\"acr_category\":1,\"confidence\":0.75},"
           "{\"id\":\"F2\",\"code\":{\"system\":\"SCT\",\"code\":\"125605004\","
           "\"meaning\":\"Fracture of bone\"},\"critical\":false}]}",
           job_id);
  rr_ai_result_t *r;
  CHECK_EQ_INT(rr_ai_parse_result(res, strlen(res), &r, NULL), 0);
  CHECK_EQ_INT(rr_ai_store_result(j, r, 3000, NULL, NULL), 0);
  rr_ai_result_free(r);
}

static void test_verdicts(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char path[1024];
  snprintf(path, sizeof path, "%s/verdict.db", g_dir);
  rr_journal_t *j;
  char *emsg = NULL;
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_OFF, &j, &emsg), 0);
  CHECK_EQ_INT(rr_ai_schema(j, &emsg), 0);
  /* study 2.25.71 came with accession RRACC-71 in its images; study 2.25.72
   * has none, but an order RRACC-72 names its UID */
  rr_journal_instance_t in = {.channel = "imaging",
                              .path = "/nonexistent/1.dcm",
                              .sop_class_uid = "1.2.840.10008.5.1.4.1.1.2",
                              .sop_instance_uid = "2.25.7101",
                              .study_uid = "2.25.71",
                              .series_uid = "2.25.7100",
                              .patient_id = "RRPAT-71",
                              .accession = "RRACC-71",
                              .modality = "CT",
                              .size = 1,
                              .received_ms = 1000};
  CHECK_EQ_INT(rr_journal_add_instance(j, &in, NULL, NULL), 0);
  const char *rec = "{\"accession\":\"RRACC-72\",\"study_uid\":\"2.25.72\"}";
  rr_journal_order_t o = {.channel = "orders",
                          .accession = "RRACC-72",
                          .study_uid = "2.25.72",
                          .order_control = "NW",
                          .record = rec,
                          .record_len = strlen(rec),
                          .received_ms = 1000};
  CHECK_EQ_INT(rr_journal_keep_order(j, &o), 0);
  add_job(j, "AJ-71", "2.25.71");
  add_job(j, "AJ-72", "2.25.72");
  CHECK_EQ_INT(commit(&loop, j), 0);

  json_t *list;
  CHECK_EQ_INT(rr_ai_findings_json(j, NULL, NULL, &list), RR_EINVAL);
  CHECK_EQ_INT(rr_ai_findings_json(j, "", "", &list), RR_EINVAL);
  CHECK_EQ_INT(rr_ai_findings_json(j, NULL, "2.25.71", &list), 0);
  CHECK_EQ_INT(json_array_size(list), 2);
  json_t *f = json_array_get(list, 0);
  CHECK(strcmp(str(f, "job_id"), "AJ-71") == 0 && strcmp(str(f, "finding_id"), "F1") == 0);
  CHECK(strcmp(str(f, "endpoint"), "hemorrhage") == 0 && strcmp(str(f, "mode"), "assistant") == 0);
  CHECK(strcmp(str(json_object_get(f, "model"), "version"), "2") == 0);
  CHECK(strcmp(str(json_object_get(f, "code"), "code"), "1386000") == 0);
  CHECK(strcmp(str(f, "accession"), "RRACC-71") == 0);
  CHECK(json_is_true(json_object_get(f, "critical")));
  CHECK_EQ_INT(json_integer_value(json_object_get(f, "acr_category")), 1);
  CHECK(!json_object_get(f, "verdict"));
  CHECK(!json_object_get(json_array_get(list, 1), "label"));
  json_decref(list);
  /* by the images' accession, by the order's, and both ways at once */
  CHECK_EQ_INT(rr_ai_findings_json(j, "RRACC-71", NULL, &list), 0);
  CHECK_EQ_INT(json_array_size(list), 2);
  json_decref(list);
  CHECK_EQ_INT(rr_ai_findings_json(j, "RRACC-72", NULL, &list), 0);
  CHECK_EQ_INT(json_array_size(list), 2);
  CHECK(strcmp(str(json_array_get(list, 0), "job_id"), "AJ-72") == 0);
  json_decref(list);
  CHECK_EQ_INT(rr_ai_findings_json(j, "RRACC-72", "2.25.71", &list), 0);
  CHECK_EQ_INT(json_array_size(list), 4);
  json_decref(list);
  CHECK_EQ_INT(rr_ai_findings_json(j, "RRACC-404", NULL, &list), 0);
  CHECK_EQ_INT(json_array_size(list), 0);
  json_decref(list);

  /* unknown job, unknown finding, a verdict that is neither */
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  rr_ai_verdict_outcome_t oc;
  rr_ai_verdict_t v = {.job_id = "AJ-404",
                       .finding_id = "F1",
                       .verdict = "confirmed",
                       .by = "RAD01",
                       .report = "RPT-1",
                       .channel = "reports",
                       .at_ms = 5000};
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, &err), RR_ENOTFOUND);
  CHECK(err.data && strstr(err.data, "no AI job \"AJ-404\""));
  rr_buf_reset(&err);
  v.job_id = "AJ-71";
  v.finding_id = "F9";
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, &err), RR_ENOTFOUND);
  CHECK(err.data && strstr(err.data, "AI job AJ-71 has no finding \"F9\""));
  rr_buf_reset(&err);
  v.finding_id = "F1";
  v.verdict = "maybe";
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, &err), RR_EINVAL);
  CHECK_EQ_INT(rr_journal_pending(j), 0);

  /* the final report confirms F1; the same again (a replay) changes nothing */
  v.verdict = "confirmed";
  v.note = "impression: \"acute hemorrhage\"";
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, &err), 0);
  CHECK_EQ_INT(oc, RR_AI_VERDICT_RECORDED);
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, &err), 0);
  CHECK_EQ_INT(oc, RR_AI_VERDICT_UNCHANGED);
  /* queued, not committed: the findings show it already */
  CHECK_EQ_INT(rr_ai_findings_json(j, "RRACC-71", NULL, &list), 0);
  f = json_array_get(list, 0);
  CHECK(strcmp(str(f, "verdict"), "confirmed") == 0 && strcmp(str(f, "verdict_by"), "RAD01") == 0);
  CHECK(strcmp(str(f, "verdict_report"), "RPT-1") == 0);
  CHECK(!json_object_get(json_array_get(list, 1), "verdict"));
  json_decref(list);
  CHECK_EQ_INT(commit(&loop, j), 0);
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, &err), 0);
  CHECK_EQ_INT(oc, RR_AI_VERDICT_UNCHANGED);

  /* the corrected report overrides it: replaced, and audited as such */
  v.verdict = "overridden";
  v.report = "RPT-2";
  v.note = "negated in the impression: \"no hemorrhage\"";
  v.at_ms = 6000;
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, &err), 0);
  CHECK_EQ_INT(oc, RR_AI_VERDICT_REPLACED);
  /* a verdict without a radiologist: the channel is the actor */
  v.finding_id = "F2";
  v.by = NULL;
  v.note = NULL;
  v.verdict = "confirmed";
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, &err), 0);
  CHECK_EQ_INT(oc, RR_AI_VERDICT_RECORDED);
  CHECK_EQ_INT(commit(&loop, j), 0);
  rr_buf_close(&err);

  sqlite3 *db = rr_journal_reader(j);
  sqlite3_stmt *st;
  CHECK(sqlite3_prepare_v2(db,
                           "SELECT finding_id, verdict, verdict_ms, verdict_by, verdict_report,"
                           " verdict_note FROM ai_findings WHERE job_id = 'AJ-71'"
                           " ORDER BY finding_id",
                           -1, &st, NULL) == SQLITE_OK);
  CHECK(sqlite3_step(st) == SQLITE_ROW);
  CHECK(strcmp((const char *)sqlite3_column_text(st, 1), "overridden") == 0);
  CHECK_EQ_INT(sqlite3_column_int64(st, 2), 6000);
  CHECK(strcmp((const char *)sqlite3_column_text(st, 3), "RAD01") == 0);
  CHECK(strcmp((const char *)sqlite3_column_text(st, 4), "RPT-2") == 0);
  CHECK(strstr((const char *)sqlite3_column_text(st, 5), "no hemorrhage") != NULL);
  CHECK(sqlite3_step(st) == SQLITE_ROW);
  CHECK(strcmp((const char *)sqlite3_column_text(st, 1), "confirmed") == 0);
  CHECK(sqlite3_column_type(st, 3) == SQLITE_NULL);
  CHECK(sqlite3_step(st) == SQLITE_DONE);
  sqlite3_finalize(st);
  /* AJ-72 untouched */
  CHECK(sqlite3_prepare_v2(db, "SELECT count(*) FROM ai_findings WHERE verdict IS NOT NULL", -1,
                           &st, NULL) == SQLITE_OK);
  CHECK(sqlite3_step(st) == SQLITE_ROW);
  CHECK_EQ_INT(sqlite3_column_int(st, 0), 2);
  sqlite3_finalize(st);

  /* three audit records (the unchanged ones made none), chained */
  CHECK(sqlite3_prepare_v2(db,
                           "SELECT actor, subject, data FROM audit WHERE kind = 'verdict'"
                           " ORDER BY seq",
                           -1, &st, NULL) == SQLITE_OK);
  json_t *d[3] = {NULL, NULL, NULL};
  const char *want_actor[3] = {"RAD01", "RAD01", "reports"};
  for (int i = 0; i < 3; i++) {
    CHECK(sqlite3_step(st) == SQLITE_ROW);
    CHECK(strcmp((const char *)sqlite3_column_text(st, 0), want_actor[i]) == 0);
    CHECK(strcmp((const char *)sqlite3_column_text(st, 1), "AJ-71") == 0);
    d[i] = json_loads((const char *)sqlite3_column_text(st, 2), 0, NULL);
  }
  CHECK(sqlite3_step(st) == SQLITE_DONE);
  sqlite3_finalize(st);
  CHECK(strcmp(str(d[0], "verdict"), "confirmed") == 0 && !json_object_get(d[0], "replaces"));
  CHECK(strcmp(str(d[0], "study_uid"), "2.25.71") == 0);
  CHECK(strcmp(str(d[0], "endpoint"), "hemorrhage") == 0);
  CHECK(strcmp(str(json_object_get(d[0], "model"), "name"), "ref") == 0);
  CHECK(strcmp(str(json_object_get(d[0], "code"), "code"), "1386000") == 0);
  CHECK(strcmp(str(d[0], "report"), "RPT-1") == 0 && strcmp(str(d[0], "channel"), "reports") == 0);
  CHECK(strcmp(str(d[1], "verdict"), "overridden") == 0);
  json_t *rep = json_object_get(d[1], "replaces");
  CHECK(strcmp(str(rep, "verdict"), "confirmed") == 0 && strcmp(str(rep, "report"), "RPT-1") == 0);
  CHECK(strcmp(str(rep, "by"), "RAD01") == 0 &&
        json_integer_value(json_object_get(rep, "at_ms")) == 5000);
  CHECK(strcmp(str(d[2], "finding_id"), "F2") == 0 && !json_object_get(d[2], "by"));
  for (int i = 0; i < 3; i++)
    json_decref(d[i]);
  rr_audit_report_t ar;
  CHECK_EQ_INT(rr_audit_verify(db, &ar), 0);
  CHECK_EQ_INT(ar.fault, RR_AUDIT_INTACT);
  CHECK(rr_journal_idle(j));
  rr_journal_close(j);
  uv_loop_close(&loop);
}

/* Two verdicts on one finding in one batch: the second sees the first. */
static void test_same_batch(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char path[1024];
  snprintf(path, sizeof path, "%s/batch.db", g_dir);
  rr_journal_t *j;
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_OFF, &j, NULL), 0);
  CHECK_EQ_INT(rr_ai_schema(j, NULL), 0);
  add_job(j, "AJ-81", "2.25.81");
  CHECK_EQ_INT(commit(&loop, j), 0);
  rr_ai_verdict_t v = {.job_id = "AJ-81",
                       .finding_id = "F1",
                       .verdict = "confirmed",
                       .by = "RAD01",
                       .report = "RPT-1",
                       .channel = "reports",
                       .at_ms = 1};
  rr_ai_verdict_outcome_t oc;
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, NULL), 0);
  CHECK_EQ_INT(oc, RR_AI_VERDICT_RECORDED);
  v.verdict = "overridden";
  v.report = "RPT-2";
  CHECK_EQ_INT(rr_ai_verdict_record(j, &v, &oc, NULL), 0);
  CHECK_EQ_INT(oc, RR_AI_VERDICT_REPLACED);
  CHECK_EQ_INT(commit(&loop, j), 0);
  sqlite3_stmt *st;
  CHECK(sqlite3_prepare_v2(rr_journal_reader(j),
                           "SELECT verdict, verdict_report FROM ai_findings WHERE job_id = 'AJ-81'"
                           " AND finding_id = 'F1'",
                           -1, &st, NULL) == SQLITE_OK);
  CHECK(sqlite3_step(st) == SQLITE_ROW);
  CHECK(strcmp((const char *)sqlite3_column_text(st, 0), "overridden") == 0);
  CHECK(strcmp((const char *)sqlite3_column_text(st, 1), "RPT-2") == 0);
  sqlite3_finalize(st);
  rr_journal_close(j);
  uv_loop_close(&loop);
}

/* A store whose ai_findings predates verdict_report and verdict_note. */
static void test_migration(void) {
  char path[1024];
  snprintf(path, sizeof path, "%s/old.db", g_dir);
  sqlite3 *db;
  CHECK(sqlite3_open(path, &db) == SQLITE_OK);
  CHECK(sqlite3_exec(db,
                     "CREATE TABLE ai_findings("
                     " job_id TEXT NOT NULL, finding_id TEXT NOT NULL, study_uid TEXT NOT NULL,"
                     " code_system TEXT, code TEXT, meaning TEXT, label TEXT, confidence REAL,"
                     " critical INTEGER NOT NULL, acr_category INTEGER, finding TEXT NOT NULL,"
                     " verdict TEXT, verdict_ms INTEGER, verdict_by TEXT,"
                     " PRIMARY KEY(job_id, finding_id)) WITHOUT ROWID;"
                     "INSERT INTO ai_findings(job_id, finding_id, study_uid, critical, finding)"
                     " VALUES('AJ-1', 'F1', '2.25.1', 0, '{}');",
                     NULL, NULL, NULL) == SQLITE_OK);
  sqlite3_close(db);
  uv_loop_t loop;
  uv_loop_init(&loop);
  rr_journal_t *j;
  char *emsg = NULL;
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_OFF, &j, &emsg), 0);
  CHECK_EQ_INT(rr_ai_schema(j, &emsg), 0);
  free(emsg);
  CHECK_EQ_INT(rr_ai_schema(j, NULL), 0); /* again: nothing to add */
  sqlite3_stmt *st;
  CHECK(sqlite3_prepare_v2(rr_journal_reader(j),
                           "SELECT count(*) FROM pragma_table_info('ai_findings')"
                           " WHERE name IN ('verdict_report', 'verdict_note')",
                           -1, &st, NULL) == SQLITE_OK);
  CHECK(sqlite3_step(st) == SQLITE_ROW);
  CHECK_EQ_INT(sqlite3_column_int(st, 0), 2);
  sqlite3_finalize(st);
  rr_journal_close(j);
  uv_loop_close(&loop);
}

int main(void) {
  if (!mkdtemp(g_dir))
    return 2;
  RUN(test_verdicts);
  RUN(test_same_batch);
  RUN(test_migration);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
  if (system(cmd) != 0)
    return 2;
  return TEST_SUMMARY();
}

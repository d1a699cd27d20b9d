/* AI jobs: request documents built from study contexts, result checks,
 * takes-filters, tokens; and the job and result rows in a real store. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>
#include <uv.h>

#include "ai/ai.h"
#include "ai/deid.h"
#include "core/error.h"
#include "rr_test.h"

static const char *const ctx_text =
    "{\"study_uid\":\"2.25.1001\",\"channel\":\"imaging\",\"patient_id\":\"RRPAT-1\","
    "\"accession\":\"RRACC-1\",\"modality\":\"CT\",\"modalities\":[\"CT\",\"SR\"],"
    "\"body_part\":\"HEAD\",\"description\":\"CT HEAD\",\"study_date\":\"20261128\","
    "\"study_time\":\"091500\",\"instances\":24,\"calling_ae\":\"CT01\","
    "\"series\":[{\"series_uid\":\"2.25.1002\",\"modality\":\"CT\",\"series_number\":\"1\","
    "\"instances\":24,\"body_part\":\"HEAD\"}],\"match\":\"accession\","
    "\"order\":{\"id\":7,\"status\":\"active\",\"accession\":\"RRACC-1\",\"mrn\":\"RRPAT-1\","
    "\"patient\":{\"family\":\"ZZTEST\"},\"priority\":\"STAT\",\"reason\":\"FALL\","
    "\"procedure\":{\"code\":\"CTHEAD\",\"text\":\"CT HEAD\"},\"patient_class\":\"E\"}}";

static void test_request(void) {
  json_t *ctx = json_loads(ctx_text, 0, NULL);
  rr_buf_t out;
  rr_buf_init(&out, 1 << 20);
  rr_ai_request_opts_t o = {.job_id = "AJ-1",
                            .endpoint = "hemorrhage",
                            .created_ms = 1795856102123,
                            .deadline_ms = 1795857902123,
                            .callback_url = "http://127.0.0.1:8480/api/ai/jobs/AJ-1/result",
                            .token = "abc",
                            .images_root = "http://pacs:8042/dicom-web/"};
  CHECK_EQ_INT(rr_ai_build_request(ctx, &o, &out), 0);
  json_t *req = json_loadb(out.data, out.len, 0, NULL);
  CHECK(req != NULL);
  CHECK(strcmp(json_string_value(json_object_get(req, "schema")), "radrelay.ai-request/1") == 0);
  CHECK(strcmp(json_string_value(json_object_get(req, "created")), "2026-11-28T08:55:02.123Z") ==
        0);
  json_t *study = json_object_get(req, "study");
  CHECK(strcmp(json_string_value(json_object_get(study, "study_uid")), "2.25.1001") == 0);
  CHECK_EQ_INT(json_integer_value(json_object_get(study, "instances")), 24);
  CHECK_EQ_INT(json_array_size(json_object_get(study, "series")), 1);
  /* nothing that names the patient leaves */
  CHECK(strstr(out.data, "RRPAT-1") == NULL);
  CHECK(strstr(out.data, "ZZTEST") == NULL);
  CHECK(json_object_get(study, "patient_id") == NULL);
  CHECK(strcmp(json_string_value(json_object_get(json_object_get(req, "order"), "priority")),
               "STAT") == 0);
  CHECK(strcmp(json_string_value(json_object_get(json_object_get(req, "images"), "wado_rs")),
               "http://pacs:8042/dicom-web/studies/2.25.1001") == 0);
  CHECK(strcmp(json_string_value(json_object_get(json_object_get(req, "callback"), "token")),
               "abc") == 0);
  json_decref(req);
  /* a DICOMweb source's study: its own retrieve URL wins */
  json_object_set_new(ctx, "retrieve_url", json_string("http://other/dw/studies/2.25.1001"));
  rr_buf_reset(&out);
  o.callback_url = NULL;
  CHECK_EQ_INT(rr_ai_build_request(ctx, &o, &out), 0);
  req = json_loadb(out.data, out.len, 0, NULL);
  CHECK(strcmp(json_string_value(json_object_get(json_object_get(req, "images"), "wado_rs")),
               "http://other/dw/studies/2.25.1001") == 0);
  CHECK(json_object_get(req, "callback") == NULL);
  json_decref(req);
  json_object_del(ctx, "study_uid");
  CHECK_EQ_INT(rr_ai_build_request(ctx, &o, &out), RR_EINVAL);
  json_decref(ctx);
  rr_buf_close(&out);
}

static void test_takes(void) {
  json_t *ctx = json_loads(ctx_text, 0, NULL);
  char *ct[] = {"CT", NULL}, *mr[] = {"MR", NULL}, *head[] = {"head", NULL},
       *chest[] = {"CHEST", NULL}, *proc[] = {"CTHEAD", NULL}, *other[] = {"XRCHEST", NULL};
  const char *why;
  rr_ai_takes_t any = {0};
  CHECK(rr_ai_takes_match(&any, ctx, &why));
  rr_ai_takes_t t = {ct, head, proc};
  CHECK(rr_ai_takes_match(&t, ctx, &why));
  t.modalities = mr;
  CHECK(!rr_ai_takes_match(&t, ctx, &why) && strcmp(why, "modality") == 0);
  t.modalities = ct;
  t.body_parts = chest;
  CHECK(!rr_ai_takes_match(&t, ctx, &why) && strcmp(why, "body part") == 0);
  t.body_parts = head;
  t.procedures = other;
  CHECK(!rr_ai_takes_match(&t, ctx, &why) && strcmp(why, "procedure") == 0);
  json_decref(ctx);
}

static const char *g_data = "tests/data/ai";

#define RESULT_HEAD "{\"schema\":\"radrelay.ai-result/1\",\"job_id\":\"AJ-1\","

static void test_parse(void) {
  const char *good = RESULT_HEAD
      "\"status\":\"completed\",\"model\":{\"name\":\"ref\",\"version\":\"1.0\"},"
      "\"findings\":[{\"id\":\"F1\",\"code\":{\"system\":\"SCT\",\"code\":\"274100004\","
      "\"meaning\":\"Cerebral hemorrhage\"},\"label\":\"bleed\",\"confidence\":0.93,"
      "\"critical\":true,\"acr_category\":1,\"location\":{\"series_uid\":\"2.25.1\","
      "\"instance_uid\":\"2.25.2\",\"frame\":1,\"point\":[10,20],\"point3d\":[1,2,3]},"
      "\"measurements\":[{\"code\":{\"system\":\"DCM\",\"code\":\"118565006\","
      "\"meaning\":\"Volume\"},\"value\":1234.5,\"unit\":\"mm3\"}]},"
      "{\"id\":\"F2\",\"code\":{\"system\":\"SCT\",\"code\":\"1\",\"meaning\":\"x\"},"
      "\"acr_category\":2}]}";
  rr_ai_result_t *r;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  CHECK_EQ_INT(rr_ai_parse_result(good, strlen(good), &r, &err), 0);
  CHECK_EQ_INT(r->nfindings, 2);
  CHECK(r->critical);
  CHECK_EQ_INT(r->acr_category, 1);
  CHECK(strcmp(r->findings[0].code, "274100004") == 0);
  CHECK(r->findings[0].confidence > 0.92 && r->findings[0].confidence < 0.94);
  CHECK(r->findings[1].confidence < 0 && !r->findings[1].critical);
  CHECK(strcmp(r->model_version, "1.0") == 0);
  rr_ai_result_free(r);
  /* a failed or rejected result needs no model, only its reason */
  const char *failed =
      RESULT_HEAD "\"status\":\"failed\",\"error\":\"could not fetch the images\"}";
  CHECK_EQ_INT(rr_ai_parse_result(failed, strlen(failed), &r, &err), 0);
  CHECK(r->model_name == NULL && strcmp(r->status, "failed") == 0 && r->nfindings == 0);
  rr_ai_result_free(r);
  const char *bad[] = {
      RESULT_HEAD "\"status\":\"failed\"}",
      RESULT_HEAD "\"status\":\"rejected\",\"error\":\"x\",\"model\":{\"name\":1}}",
      "not json",
      "[]",
      "{\"schema\":\"other/1\",\"job_id\":\"AJ-1\",\"status\":\"completed\","
      "\"model\":{\"name\":\"a\",\"version\":\"1\"}}",
      RESULT_HEAD "\"status\":\"done\",\"model\":{\"name\":\"a\",\"version\":\"1\"}}",
      RESULT_HEAD "\"status\":\"completed\"}",
      RESULT_HEAD "\"status\":\"completed\",\"model\":{\"name\":\"a\",\"version\":\"1\"},"
                  "\"findings\":[{\"id\":\"F1\",\"code\":{\"system\":\"S\",\"code\":\"1\"}}]}",
      RESULT_HEAD "\"status\":\"completed\",\"model\":{\"name\":\"a\",\"version\":\"1\"},"
                  "\"findings\":[{\"id\":\"F1\",\"code\":{\"system\":\"S\",\"code\":\"1\","
                  "\"meaning\":\"m\"},\"confidence\":1.5}]}",
      RESULT_HEAD "\"status\":\"completed\",\"model\":{\"name\":\"a\",\"version\":\"1\"},"
                  "\"findings\":[{\"id\":\"F1\",\"code\":{\"system\":\"S\",\"code\":\"1\","
                  "\"meaning\":\"m\"},\"acr_category\":4}]}",
      RESULT_HEAD "\"status\":\"completed\",\"model\":{\"name\":\"a\",\"version\":\"1\"},"
                  "\"findings\":[{\"id\":\"F1\",\"code\":{\"system\":\"S\",\"code\":\"1\","
                  "\"meaning\":\"m\"},\"location\":{\"point\":[1]}}]}",
      RESULT_HEAD "\"status\":\"completed\",\"model\":{\"name\":\"a\",\"version\":\"1\"},"
                  "\"findings\":[{\"id\":\"F1\",\"code\":{\"system\":\"S\",\"code\":\"1\","
                  "\"meaning\":\"m\"}},{\"id\":\"F1\",\"code\":{\"system\":\"S\",\"code\":\"2\","
                  "\"meaning\":\"n\"}}]}",
      RESULT_HEAD "\"status\":\"completed\",\"model\":{\"name\":\"a\",\"version\":\"1\"},"
                  "\"findings\":[{\"id\":\"F1\",\"code\":{\"system\":\"S\",\"code\":\"1\","
                  "\"meaning\":\"m\"},\"measurements\":[{\"value\":\"3\"}]}]}",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    rr_buf_reset(&err);
    r = NULL;
    CHECK_EQ_INT(rr_ai_parse_result(bad[i], strlen(bad[i]), &r, &err), RR_EPARSE);
    CHECK(r == NULL && err.len > 0);
  }
  rr_buf_close(&err);
}

/* The published schemas, compiled into the binary, on the examples. */
static void test_validate(void) {
  static const char *const valid[] = {"result_critical.json", "result_negative.json",
                                      "request.json", "accepted.json", "result_failed.json"};
  static const char *const kinds[] = {"result", "result", "request", "accepted", "result"};
  for (size_t i = 0; i < 5; i++) {
    char path[1024];
    snprintf(path, sizeof path, "%s/valid/%s", g_data, valid[i]);
    json_t *doc = json_load_file(path, 0, NULL);
    CHECK(doc != NULL);
    if (!doc)
      continue;
    rr_buf_t err;
    rr_buf_init(&err, 4096);
    CHECK_EQ_INT(rr_ai_validate(kinds[i], doc, &err), 0);
    if (err.len)
      fprintf(stderr, "%s: %s\n", valid[i], err.data);
    if (i == 0) { /* without the model's device UID it breaks the contract */
      json_object_del(json_object_get(doc, "model"), "device_uid");
      CHECK_EQ_INT(rr_ai_validate("result", doc, &err), RR_EPARSE);
      CHECK(err.len > 0);
    }
    rr_buf_close(&err);
    json_decref(doc);
  }
  CHECK_EQ_INT(rr_ai_validate("nonsense", NULL, NULL), RR_EINVAL);
}

static void test_tokens(void) {
  char t1[RR_AI_TOKEN_HEX + 1], h1[65], t2[RR_AI_TOKEN_HEX + 1], h2[65], h[65];
  CHECK_EQ_INT(rr_ai_token(t1, h1), 0);
  CHECK_EQ_INT(rr_ai_token(t2, h2), 0);
  CHECK(strlen(t1) == RR_AI_TOKEN_HEX && strcmp(t1, t2) != 0 && strcmp(h1, h2) != 0);
  rr_ai_token_hash(t1, h);
  CHECK(strcmp(h, h1) == 0);
  rr_ai_token_hash("abc", h); /* SHA-256("abc") */
  CHECK(strcmp(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0);
}

typedef struct {
  int done, status;
} waiter_t;

static void on_done(void *ud, int status, int64_t id) {
  waiter_t *w = ud;
  (void)id;
  w->done++;
  w->status = status;
}

static char g_dir[] = "/tmp/rr-test-ai-XXXXXX";

static void test_store(void) {
  const char *dir = g_dir;
  uv_loop_t loop;
  uv_loop_init(&loop);
  char path[1024];
  snprintf(path, sizeof path, "%s/ai.db", dir);
  rr_journal_t *j;
  char *emsg = NULL;
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_FULL, &j, &emsg), 0);
  CHECK_EQ_INT(rr_ai_schema(j, &emsg), 0);
  rr_ai_job_t job = {.job_id = "AJ-5",
                     .queue_id = 5,
                     .destination = "imaging.hemorrhage",
                     .channel = "imaging",
                     .study_uid = "2.25.1001",
                     .mode = RR_AI_ACTIVE,
                     .state = "sending",
                     .token_hash = "00ff",
                     .sent_ms = 1000,
                     .deadline_ms = 5000,
                     .request = "{}"};
  CHECK_EQ_INT(rr_ai_job_sent(j, &job), 0);
  /* accepted later (202): the state changes, the token and request stay */
  rr_ai_job_t accepted = {.job_id = "AJ-5",
                          .queue_id = 5,
                          .destination = "imaging.hemorrhage",
                          .channel = "imaging",
                          .study_uid = "2.25.1001",
                          .mode = RR_AI_ACTIVE,
                          .state = "running",
                          .sent_ms = 1100};
  CHECK_EQ_INT(rr_ai_job_sent(j, &accepted), 0);
  job.job_id = "AJ-6";
  job.state = "running";
  job.deadline_ms = 2000;
  CHECK_EQ_INT(rr_ai_job_sent(j, &job), 0);
  waiter_t w = {0};
  CHECK_EQ_INT(rr_journal_add_barrier(j, on_done, &w), 0);
  rr_journal_kick(j);
  while (!w.done)
    uv_run(&loop, UV_RUN_ONCE);
  rr_ai_job_info_t info;
  CHECK_EQ_INT(rr_ai_job_get(j, "AJ-5", &info), 0);
  CHECK(strcmp(info.state, "running") == 0 && info.mode == RR_AI_ACTIVE);
  CHECK(strcmp(info.token_hash, "00ff") == 0 && info.deadline_ms == 5000);
  CHECK_EQ_INT(rr_ai_job_get(j, "AJ-404", &info), RR_ENOTFOUND);
  const char *res = "{\"schema\":\"radrelay.ai-result/1\",\"job_id\":\"AJ-5\","
                    "\"status\":\"completed\",\"model\":{\"name\":\"ref\",\"version\":\"2\"},"
                    "\"findings\":[{\"id\":\"F1\",\"code\":{\"system\":\"SCT\",\"code\":\"1\","
                    "\"meaning\":\"m\"},\"critical\":true,\"acr_category\":1,\"confidence\":0.5}]}";
  rr_ai_result_t *r;
  CHECK_EQ_INT(rr_ai_parse_result(res, strlen(res), &r, NULL), 0);
  w.done = 0;
  CHECK_EQ_INT(rr_ai_store_result(j, r, 3000, on_done, &w), 0);
  rr_ai_result_free(r);
  /* expired: only a job without a result changes */
  CHECK_EQ_INT(rr_ai_job_state(j, "AJ-5", "expired", "too late", 4000), 0);
  rr_journal_kick(j);
  while (!w.done)
    uv_run(&loop, UV_RUN_ONCE);
  CHECK_EQ_INT(w.status, 0);
  w.done = 0;
  CHECK_EQ_INT(rr_journal_add_barrier(j, on_done, &w), 0);
  rr_journal_kick(j);
  while (!w.done)
    uv_run(&loop, UV_RUN_ONCE);
  CHECK_EQ_INT(rr_ai_job_get(j, "AJ-5", &info), 0);
  CHECK(strcmp(info.state, "completed") == 0 && info.result_ms == 3000);
  sqlite3 *db = rr_journal_reader(j);
  sqlite3_stmt *st;
  CHECK(sqlite3_prepare_v2(db,
                           "SELECT study_uid, critical, acr_category, confidence FROM ai_findings",
                           -1, &st, NULL) == SQLITE_OK);
  CHECK(sqlite3_step(st) == SQLITE_ROW);
  CHECK(strcmp((const char *)sqlite3_column_text(st, 0), "2.25.1001") == 0);
  CHECK_EQ_INT(sqlite3_column_int(st, 1), 1);
  CHECK_EQ_INT(sqlite3_column_int(st, 2), 1);
  CHECK(sqlite3_step(st) == SQLITE_DONE);
  sqlite3_finalize(st);
  CHECK(rr_journal_idle(j));
  rr_journal_close(j);
  uv_loop_close(&loop);
}

static void count_overdue(void *ud, const char *job_id, const char *destination) {
  int *n = ud;
  (void)destination;
  if (strcmp(job_id, "AJ-6") == 0)
    (*n)++;
}

static void test_overdue(void) {
  const char *dir = g_dir;
  uv_loop_t loop;
  uv_loop_init(&loop);
  char path[1024];
  snprintf(path, sizeof path, "%s/ai.db", dir);
  rr_journal_t *j;
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_FULL, &j, NULL), 0);
  /* AJ-6 (deadline 2000) is overdue at 2500; AJ-5 has its result */
  int n = 0;
  CHECK_EQ_INT(rr_ai_jobs_overdue(j, 2500, count_overdue, &n), 1);
  CHECK_EQ_INT(n, 1);
  CHECK_EQ_INT(rr_ai_jobs_overdue(j, 1500, count_overdue, &n), 0);
  rr_journal_close(j);
  uv_loop_close(&loop);
}

/* A de-identifying endpoint's request: images from radrelay with the job's
 * token; the secret made once (0600), read again, refused when short. */
static void test_deid_request_and_secret(void) {
  json_t *ctx = json_loads(ctx_text, 0, NULL);
  rr_buf_t out;
  rr_buf_init(&out, 1 << 20);
  rr_ai_request_opts_t o = {.job_id = "AJ-9",
                            .endpoint = "hemorrhage",
                            .created_ms = 1795856102123,
                            .deadline_ms = 1795857902123,
                            .images_root = "http://rr:8480/api/ai/jobs/AJ-9/dicomweb",
                            .images_token = "tok-0123456789abcdef"};
  CHECK_EQ_INT(rr_ai_build_request(ctx, &o, &out), 0);
  json_t *req = json_loadb(out.data, out.len, 0, NULL);
  json_t *auth = json_object_get(json_object_get(req, "images"), "auth");
  CHECK(strcmp(json_string_value(json_object_get(auth, "type")), "bearer") == 0);
  CHECK(strcmp(json_string_value(json_object_get(auth, "token")), "tok-0123456789abcdef") == 0);
  CHECK(strcmp(json_string_value(json_object_get(json_object_get(req, "images"), "wado_rs")),
               "http://rr:8480/api/ai/jobs/AJ-9/dicomweb/studies/2.25.1001") == 0);
  CHECK_EQ_INT(rr_ai_validate("request", req, NULL), 0);
  json_decref(req);
  json_decref(ctx);
  rr_buf_close(&out);

  char path[300];
  snprintf(path, sizeof path, "%s/deid.secret", g_dir);
  char *a = NULL, *b = NULL;
  size_t na = 0, nb = 0;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  CHECK(rr_ai_deid_secret_load(path, false, &a, &na, &err) == -ENOENT && a == NULL);
  CHECK_EQ_INT(rr_ai_deid_secret_load(path, true, &a, &na, &err), 0);
  CHECK(na == 64 && a && strspn(a, "0123456789abcdef") == 64);
  struct stat st;
  CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600);
  CHECK_EQ_INT(rr_ai_deid_secret_load(path, true, &b, &nb, &err), 0);
  CHECK(nb == na && a && b && memcmp(a, b, na) == 0); /* not made again */
  free(a);
  free(b);
  FILE *f = fopen(path, "w");
  if (f) {
    fputs("  short \n", f);
    fclose(f);
  }
  CHECK_EQ_INT(rr_ai_deid_secret_load(path, true, &a, &na, &err), RR_EINVAL);
  CHECK(a == NULL && strstr(err.data ? err.data : "", "at least 16 bytes"));
  rr_buf_close(&err);
}

typedef struct deid_outcome {
  int calls, status;
  bool permanent;
  char detail[300];
} deid_outcome_t;

static void on_deid(void *ud, int status, bool permanent, const char *detail, json_t *ctx) {
  deid_outcome_t *o = ud;
  o->calls++;
  o->status = status;
  o->permanent = permanent;
  snprintf(o->detail, sizeof o->detail, "%s", detail ? detail : "");
  json_decref(ctx);
}

/* A study that a DICOMweb source found (its instances are URLs) is
 * refused for a de-identifying endpoint, from the loop, for good. */
static void test_deid_refuses_remote_study(void) {
  char dir[300], path[400], secret[400];
  snprintf(dir, sizeof dir, "%s/deid-remote", g_dir);
  mkdir(dir, 0700);
  snprintf(path, sizeof path, "%s/ai.db", dir);
  snprintf(secret, sizeof secret, "%s/deid.secret", dir);
  uv_loop_t loop;
  uv_loop_init(&loop);
  rr_journal_t *j;
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_FULL, &j, NULL), 0);
  CHECK_EQ_INT(rr_ai_deid_schema(j, NULL), 0);
  sqlite3 *db;
  CHECK(sqlite3_open(path, &db) == SQLITE_OK);
  CHECK(sqlite3_exec(db,
                     "INSERT INTO instances(sop_instance_uid, study_uid, series_uid,"
                     " sop_class_uid, channel, path, size, received_ms) VALUES('2.25.3',"
                     " '2.25.1001', '2.25.1002', '1.2.840.10008.5.1.4.1.1.2', 'web',"
                     " 'http://pacs/dicom-web/studies/2.25.1001/series/2.25.1002/instances/2.25.3',"
                     " 0, 1)",
                     NULL, NULL, NULL) == SQLITE_OK);
  sqlite3_close(db);
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  rr_ai_deid_t *d = NULL;
  char root[400];
  snprintf(root, sizeof root, "%s/spool/deid", dir);
  CHECK_EQ_INT(rr_ai_deid_new(&loop, j, "web.ai", root, secret, true, &d, &err), 0);
  json_t *ctx = json_loads(ctx_text, 0, NULL);
  deid_outcome_t o = {0};
  CHECK_EQ_INT(rr_ai_deid_start(d, "AJ-77", ctx, on_deid, &o), 0);
  CHECK_EQ_INT(o.calls, 0); /* never inside the call */
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(o.calls, 1);
  CHECK(o.status == RR_EINVAL && o.permanent);
  CHECK(strstr(o.detail, "DICOMweb source") != NULL);
  json_decref(ctx);
  rr_ai_deid_free(d);
  rr_buf_close(&err);
  rr_journal_close(j);
  uv_loop_close(&loop);
}

int main(int argc, char **argv) {
  if (argc > 1)
    g_data = argv[1];
  if (!mkdtemp(g_dir))
    return 2;
  RUN(test_request);
  RUN(test_takes);
  RUN(test_parse);
  RUN(test_tokens);
  RUN(test_validate);
  RUN(test_store);
  RUN(test_overdue);
  RUN(test_deid_request_and_secret);
  RUN(test_deid_refuses_remote_study);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
  if (system(cmd) != 0)
    return 2;
  return TEST_SUMMARY();
}

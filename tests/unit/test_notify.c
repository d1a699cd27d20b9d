/* Critical-result notifications: the escalation policy step by step
 * (defaults per ACR category, chains, exhaustion, acknowledgement), the
 * de-duplication key, the page document, and the rows in a real store. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "core/error.h"
#include "notify/notify.h"
#include "rr_test.h"

#define MINUTE (60 * 1000)

static char g_dir[] = "/tmp/rr-test-notify-XXXXXX";

static rr_notification_t fresh(int category, int64_t now, const rr_notify_policy_t *p) {
  rr_notification_t n;
  memset(&n, 0, sizeof n);
  snprintf(n.id, sizeof n.id, "N-0123456789abcdef");
  n.category = category;
  n.attempt = n.sends = 1;
  n.created_ms = n.level_ms = n.last_ms = now;
  n.next_ms = rr_notify_due(&n, p);
  return n;
}

static void test_category1_defaults(void) {
  rr_notify_policy_t p;
  rr_notify_policy_default(&p);
  const char *chain[] = {"on-call", "attending", NULL};
  p.chain = chain;
  rr_notification_t n = fresh(1, 0, &p);
  /* repeat after 5 minutes, the next person after 10 */
  CHECK_EQ_INT(n.next_ms, 5 * MINUTE);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 5 * MINUTE - 1), RR_NOTIFY_NOTHING);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 5 * MINUTE), RR_NOTIFY_REPEAT);
  CHECK_EQ_INT(n.attempt, 2);
  CHECK_EQ_INT(n.level, 0);
  CHECK(strcmp(rr_notify_recipient(&p, n.level), "on-call") == 0);
  CHECK_EQ_INT(n.next_ms, 10 * MINUTE);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 10 * MINUTE), RR_NOTIFY_ESCALATE);
  CHECK_EQ_INT(n.level, 1);
  CHECK_EQ_INT(n.attempt, 1);
  CHECK_EQ_INT(n.sends, 3);
  CHECK(strcmp(rr_notify_recipient(&p, n.level), "attending") == 0);
  CHECK_EQ_INT(n.next_ms, 15 * MINUTE);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 15 * MINUTE), RR_NOTIFY_REPEAT);
  /* the last person's time runs out: unacknowledged, nothing more due */
  CHECK_EQ_INT(rr_notify_step(&n, &p, 20 * MINUTE), RR_NOTIFY_EXHAUSTED);
  CHECK_EQ_INT(n.state, RR_NOTIFY_UNACKNOWLEDGED);
  CHECK_EQ_INT(n.next_ms, 0);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 60 * MINUTE), RR_NOTIFY_NOTHING);
}

static void test_categories(void) {
  rr_notify_policy_t p;
  rr_notify_policy_default(&p);
  /* category 2: hours */
  rr_notification_t n = fresh(2, 0, &p);
  CHECK_EQ_INT(n.next_ms, 60 * MINUTE);
  /* category 3: no repeat, the next person (here: none) after a day */
  n = fresh(3, 0, &p);
  CHECK_EQ_INT(n.next_ms, 24 * 60 * MINUTE);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 12 * 60 * MINUTE), RR_NOTIFY_NOTHING);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 24 * 60 * MINUTE), RR_NOTIFY_EXHAUSTED);
  /* no chain: "on-call" */
  CHECK(strcmp(rr_notify_recipient(&p, 0), "on-call") == 0);
  /* a category out of range counts as 1 */
  n = fresh(7, 0, &p);
  CHECK_EQ_INT(n.next_ms, 5 * MINUTE);
  /* both timers off: nothing ever due */
  p.repeat_ms[1] = p.next_ms[1] = 0;
  n = fresh(1, 0, &p);
  CHECK_EQ_INT(n.next_ms, 0);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 1000 * MINUTE), RR_NOTIFY_NOTHING);
}

static void test_late_and_acked(void) {
  rr_notify_policy_t p;
  rr_notify_policy_default(&p);
  const char *chain[] = {"a", "b", "c", NULL};
  p.chain = chain;
  rr_notification_t n = fresh(1, 0, &p);
  /* the engine was down for an hour: one step, then the clock restarts */
  CHECK_EQ_INT(rr_notify_step(&n, &p, 60 * MINUTE), RR_NOTIFY_ESCALATE);
  CHECK_EQ_INT(n.level, 1);
  CHECK_EQ_INT(n.next_ms, 65 * MINUTE);
  n.state = RR_NOTIFY_ACKED;
  CHECK_EQ_INT(rr_notify_due(&n, &p), 0);
  CHECK_EQ_INT(rr_notify_step(&n, &p, 120 * MINUTE), RR_NOTIFY_NOTHING);
  CHECK_EQ_INT(n.level, 1);
  /* past the end of the chain, the last person */
  CHECK(strcmp(rr_notify_recipient(&p, 9), "c") == 0);
}

static void test_key_and_payload(void) {
  json_t *a =
      json_loads("{\"study_uid\":\"2.25.7\",\"code\":{\"system\":\"SCT\",\"code\":"
                 "\"1386000\"},\"finding\":\"Intracranial hemorrhage\",\"job_id\":\"AJ-1\"}",
                 0, NULL);
  json_t *b = json_loads("{\"study_uid\":\"2.25.7\",\"code\":{\"system\":\"SCT\",\"code\":"
                         "\"1386000\"},\"finding\":\"ICH\",\"job_id\":\"AJ-2\"}",
                         0, NULL);
  json_t *c = json_loads("{\"study_uid\":\"2.25.8\",\"code\":{\"system\":\"SCT\",\"code\":"
                         "\"1386000\"}}",
                         0, NULL);
  json_t *none = json_loads("{\"finding\":\"x\"}", 0, NULL);
  char ka[600], kb[600], kc[600], kx[600], ia[24], ib[24], ic[24], ix[24];
  CHECK(rr_notify_key("imaging.pager", a, ka, sizeof ka, ia));
  CHECK(rr_notify_key("imaging.pager", b, kb, sizeof kb, ib));
  CHECK(rr_notify_key("imaging.pager", c, kc, sizeof kc, ic));
  CHECK(rr_notify_key("imaging.chat", a, kx, sizeof kx, ix));
  /* the same finding of the same study: the same notification, whatever
   * the job or label; another study or another gateway: another one */
  CHECK(strcmp(ia, ib) == 0 && strcmp(ka, kb) == 0);
  CHECK(strcmp(ia, ic) != 0 && strcmp(ia, ix) != 0);
  CHECK(strncmp(ia, "N-", 2) == 0 && strlen(ia) == 18);
  CHECK(!rr_notify_key("imaging.pager", none, kx, sizeof kx, ix));

  rr_notify_policy_t p;
  rr_notify_policy_default(&p);
  const char *chain[] = {"neuro-on-call", "neuro-attending", NULL};
  p.chain = chain;
  rr_notification_t n = fresh(1, 0, &p);
  snprintf(n.id, sizeof n.id, "%s", ia);
  n.payload = json_dumps(a, JSON_COMPACT);
  n.level = 1;
  n.attempt = 2;
  char *text = rr_notify_payload(&n, &p, "https://rr.example.org:8443/");
  json_t *doc = json_loads(text, 0, NULL);
  CHECK(doc != NULL);
  CHECK(strcmp(json_string_value(json_object_get(doc, "notification_id")), ia) == 0);
  CHECK(strcmp(json_string_value(json_object_get(doc, "recipient")), "neuro-attending") == 0);
  CHECK_EQ_INT(json_integer_value(json_object_get(doc, "escalation_level")), 1);
  CHECK_EQ_INT(json_integer_value(json_object_get(doc, "attempt")), 2);
  char url[200];
  snprintf(url, sizeof url, "https://rr.example.org:8443/api/notifications/%s/ack", ia);
  CHECK(strcmp(json_string_value(json_object_get(doc, "ack_url")), url) == 0);
  CHECK(strcmp(json_string_value(json_object_get(doc, "finding")), "Intracranial hemorrhage") == 0);
  json_decref(doc);
  free(text);
  text = rr_notify_payload(&n, &p, NULL);
  doc = json_loads(text, 0, NULL);
  CHECK(json_object_get(doc, "ack_url") == NULL);
  json_decref(doc);
  free(text);
  free(n.payload);
  json_decref(a);
  json_decref(b);
  json_decref(c);
  json_decref(none);
}

typedef struct loaded {
  int n;
  rr_notification_t last;
} loaded_t;

static void on_loaded(void *ud, rr_notification_t *n) {
  loaded_t *l = ud;
  l->n++;
  free(l->last.payload);
  l->last = *n;
  l->last.payload = n->payload;
  free(n);
}

static void on_done(void *ud, int status, int64_t id) {
  (void)id;
  *(int *)ud = status == 0 ? 1 : -1;
}

static void test_store(void) {
  char path[128];
  snprintf(path, sizeof path, "%s/store.db", g_dir);
  uv_loop_t loop;
  uv_loop_init(&loop);
  rr_journal_t *j = NULL;
  char *emsg = NULL;
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_FULL, &j, &emsg), 0);
  CHECK_EQ_INT(rr_notify_schema(j, &emsg), 0);
  rr_notify_policy_t p;
  rr_notify_policy_default(&p);
  rr_notification_t n = fresh(1, 1000, &p);
  snprintf(n.key, sizeof n.key, "imaging.pager|2.25.7|SCT^1386000");
  snprintf(n.destination, sizeof n.destination, "imaging.pager");
  snprintf(n.channel, sizeof n.channel, "imaging");
  snprintf(n.job_id, sizeof n.job_id, "AJ-1");
  snprintf(n.study_uid, sizeof n.study_uid, "2.25.7");
  n.payload = strdup("{\"study_uid\":\"2.25.7\",\"finding\":\"ICH\"}");
  CHECK_EQ_INT(rr_notify_save(j, &n), 0);
  /* an acknowledged one, long ago */
  rr_notification_t old = n;
  snprintf(old.id, sizeof old.id, "N-ffffffffffffffff");
  snprintf(old.key, sizeof old.key, "imaging.pager|2.25.6|SCT^1386000");
  old.state = RR_NOTIFY_ACKED;
  old.created_ms = 10;
  old.acked_ms = 20;
  snprintf(old.acked_by, sizeof old.acked_by, "ZZTEST^READER");
  snprintf(old.ack_via, sizeof old.ack_via, "gateway");
  CHECK_EQ_INT(rr_notify_save(j, &old), 0);
  int done = 0;
  CHECK_EQ_INT(rr_journal_add_barrier(j, on_done, &done), 0);
  rr_journal_kick(j);
  while (!done)
    uv_run(&loop, UV_RUN_ONCE);
  CHECK_EQ_INT(done, 1);
  /* the open one comes back whatever its age; settled ones only when recent */
  loaded_t l;
  memset(&l, 0, sizeof l);
  CHECK_EQ_INT(rr_notify_load(j, 500, on_loaded, &l), 1);
  CHECK(strcmp(l.last.id, n.id) == 0 && l.last.state == RR_NOTIFY_OPEN);
  CHECK(strcmp(l.last.payload, n.payload) == 0 && l.last.next_ms == n.next_ms);
  CHECK_EQ_INT(rr_notify_load(j, 0, on_loaded, &l), 2);
  free(l.last.payload);
  json_t *o = NULL;
  CHECK_EQ_INT(rr_notify_json(j, "N-ffffffffffffffff", &o), 0);
  CHECK(strcmp(json_string_value(json_object_get(o, "state")), "acked") == 0);
  CHECK(strcmp(json_string_value(json_object_get(json_object_get(o, "ack"), "by")),
               "ZZTEST^READER") == 0);
  json_decref(o);
  CHECK_EQ_INT(rr_notify_json(j, "N-404", &o), RR_ENOTFOUND);
  CHECK_EQ_INT(rr_notify_list_json(j, "open", 10, &o), 0);
  CHECK_EQ_INT(json_array_size(o), 1);
  json_decref(o);
  CHECK_EQ_INT(rr_notify_list_json(j, NULL, 10, &o), 0);
  CHECK_EQ_INT(json_array_size(o), 2);
  json_decref(o);
  free(n.payload);
  rr_journal_close(j);
  uv_loop_close(&loop);
}

int main(void) {
  if (!mkdtemp(g_dir))
    return 2;
  RUN(test_category1_defaults);
  RUN(test_categories);
  RUN(test_late_and_acked);
  RUN(test_key_and_payload);
  RUN(test_store);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
  if (system(cmd) != 0)
    return 2;
  return TEST_SUMMARY();
}

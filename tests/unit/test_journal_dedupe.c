/* The journal's duplicate lookup across its two halves: control ids merged
 * into table dedupe (every 512 messages) and the tail of committed
 * messages not yet merged, which is merged at the next open. Also: two
 * senders with the same control id, a missing sender matching an empty one,
 * pruned messages leaving table dedupe, and a store written with the old
 * messages_dedupe index upgraded at open. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include <sqlite3.h>

#include "rr_test.h"
#include "store/journal.h"

#define MESSAGES 5000 /* several merges' worth */

static int answered, failed;

static void on_done(void *ud, int status, int64_t id) {
  (void)ud;
  (void)id;
  answered++;
  failed += status != 0;
}

static void add(rr_journal_t *j, const char *app, const char *ctl, const char *raw, int64_t ms) {
  rr_journal_entry_t e = {.channel = "orders",
                          .peer = "127.0.0.1:5000",
                          .received_ms = ms,
                          .sending_app = app,
                          .sending_facility = "HOSP",
                          .message_type = "ADT^A01",
                          .control_id = ctl,
                          .status = "accepted",
                          .raw = raw,
                          .raw_len = strlen(raw),
                          .ack = "ACK-",
                          .ack_len = 4};
  CHECK_EQ_INT(rr_journal_add(j, &e, on_done, NULL), 0);
}

static void settle(uv_loop_t *loop, rr_journal_t *j) {
  rr_journal_kick(j);
  while (!rr_journal_idle(j))
    uv_run(loop, UV_RUN_ONCE);
}

/* The message found for (app, ctl), or 0; *same: its content is raw. */
static int64_t find(rr_journal_t *j, const char *app, const char *ctl, const char *raw,
                    bool *same) {
  rr_journal_dup_t d;
  CHECK_EQ_INT(rr_journal_find(j, "orders", app, "HOSP", ctl, raw, strlen(raw), &d), 0);
  int64_t id = d.found ? d.id : 0;
  if (d.found)
    CHECK(d.ack_len == 4 && memcmp(d.ack, "ACK-", 4) == 0);
  if (same)
    *same = d.same_content;
  free(d.ack);
  return id;
}

static long long scalar(const char *path, const char *sql) {
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  long long v = -1;
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
      sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return v;
}

static void raw_of(char *buf, size_t cap, int i) {
  snprintf(buf, cap, "MSH|^~\\&|RIS|HOSP|||||ADT^A01|C%05d|P|2.5\rPID|1||SYN%05d\r", i, i);
}

static void cleanup(const char *dir, const char *path) {
  char f[96];
  snprintf(f, sizeof f, "%s-wal", path);
  unlink(f);
  snprintf(f, sizeof f, "%s-shm", path);
  unlink(f);
  unlink(path);
  rmdir(dir);
}

/* A new store in a new folder dir (a mkdtemp template), opened on loop. */
static rr_journal_t *open_new(char *dir, char *path, size_t cap, uv_loop_t *loop,
                              rr_journal_sync_t sync) {
  CHECK(mkdtemp(dir) != NULL);
  snprintf(path, cap, "%s/journal.db", dir);
  uv_loop_init(loop);
  rr_journal_t *j = NULL;
  CHECK_EQ_INT(rr_journal_open(loop, path, sync, &j, NULL), 0);
  return j;
}

static void test_merged_tail_restart_prune(void) {
  char dir[] = "/tmp/rr-dedupe-XXXXXX", path[64];
  uv_loop_t loop;
  rr_journal_t *j = open_new(dir, path, sizeof path, &loop, RR_JOURNAL_SYNC_FULL);
  if (!j)
    return;
  char raw[128], ctl[16];
  answered = failed = 0;
  for (int i = 0; i < MESSAGES; i++) {
    raw_of(raw, sizeof raw, i);
    snprintf(ctl, sizeof ctl, "C%05d", i);
    add(j, i % 2 ? "RIS" : "EHR", ctl, raw, 1000 + i); /* two senders */
    if (i % 16 == 15)
      settle(&loop, j); /* batches as senders make them */
  }
  /* the same control id from a sender without MSH-3 */
  add(j, NULL, "C00001", "no sender", 900000);
  settle(&loop, j);
  CHECK_EQ_INT(answered, MESSAGES + 1);
  CHECK_EQ_INT(failed, 0);
  rr_journal_stats_t js;
  rr_journal_stats(j, &js);
  CHECK((long long)js.dedupe_merges >= MESSAGES / 512 - 1);

  bool same = false;
  raw_of(raw, sizeof raw, 7);
  int64_t merged = find(j, "RIS", "C00007", raw, &same); /* in table dedupe */
  CHECK(merged > 0 && same);
  raw_of(raw, sizeof raw, 4999);
  int64_t recent = find(j, "RIS", "C04999", raw, &same); /* in the tail */
  CHECK(recent > merged && same);
  CHECK_EQ_INT(find(j, "RIS", "C04999", "other content", &same), recent);
  CHECK(!same);
  CHECK_EQ_INT(find(j, "EHR", "C04999", raw, NULL), 0); /* another sender */
  CHECK_EQ_INT(find(j, "RIS", "C05000", raw, NULL), 0); /* never sent */
  int64_t nosender = find(j, NULL, "C00001", "no sender", &same);
  CHECK(nosender > recent && same);
  CHECK_EQ_INT(find(j, "", "C00001", "no sender", NULL), nosender); /* "" is no sender */
  rr_journal_close(j);
  uv_run(&loop, UV_RUN_DEFAULT);

  long long upto = scalar(path, "SELECT upto FROM dedupe_merged");
  CHECK(upto >= MESSAGES - 2 * 512 && upto < MESSAGES); /* the tail was not merged */
  CHECK_EQ_INT(scalar(path, "SELECT count(*) FROM dedupe"), upto);
  CHECK_EQ_INT(scalar(path, "SELECT count(*) FROM sqlite_master WHERE name = 'messages_dedupe'"),
               0);

  /* at the next open the tail is merged */
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_FULL, &j, NULL), 0);
  if (!j)
    return;
  raw_of(raw, sizeof raw, 4999);
  CHECK_EQ_INT(find(j, "RIS", "C04999", raw, NULL), recent);
  raw_of(raw, sizeof raw, 7);
  CHECK_EQ_INT(find(j, "RIS", "C00007", raw, NULL), merged);
  CHECK_EQ_INT(find(j, NULL, "C00001", "no sender", NULL), nosender);
  CHECK_EQ_INT(scalar(path, "SELECT count(*) FROM dedupe"), MESSAGES + 1);
  CHECK_EQ_INT(scalar(path, "SELECT upto FROM dedupe_merged"), MESSAGES + 1);

  /* pruning the first 100 takes their control ids out of table dedupe */
  answered = 0;
  CHECK_EQ_INT(rr_journal_prune(j, 1100, 1000, on_done, NULL), 0);
  settle(&loop, j);
  CHECK_EQ_INT(answered, 1);
  CHECK_EQ_INT(find(j, "RIS", "C00007", raw, NULL), 0);
  rr_journal_close(j);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(scalar(path, "SELECT count(*) FROM dedupe"), MESSAGES + 1 - 100);
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  cleanup(dir, path);
}

/* A store from before table dedupe: the index is turned into the table. */
static void test_upgrade_from_index(void) {
  char dir[] = "/tmp/rr-dedupe-XXXXXX", path[64];
  uv_loop_t loop;
  rr_journal_t *j = open_new(dir, path, sizeof path, &loop, RR_JOURNAL_SYNC_NORMAL);
  if (!j)
    return;
  answered = failed = 0;
  add(j, "RIS", "OLD1", "first", 1000);
  add(j, "RIS", "OLD2", "second", 1001);
  settle(&loop, j);
  rr_journal_close(j);
  uv_run(&loop, UV_RUN_DEFAULT);
  sqlite3 *db = NULL;
  CHECK_EQ_INT(sqlite3_open(path, &db), SQLITE_OK);
  CHECK_EQ_INT(sqlite3_exec(db,
                            "DROP TABLE dedupe; DROP TABLE dedupe_merged;"
                            " CREATE INDEX messages_dedupe ON messages(control_id, sending_app,"
                            " sending_facility, channel)",
                            NULL, NULL, NULL),
               SQLITE_OK);
  sqlite3_close(db);

  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_NORMAL, &j, NULL), 0);
  if (!j)
    return;
  bool same = false;
  CHECK(find(j, "RIS", "OLD2", "second", &same) > 0 && same);
  rr_journal_close(j);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(scalar(path, "SELECT count(*) FROM dedupe"), 2);
  CHECK_EQ_INT(scalar(path, "SELECT upto FROM dedupe_merged"), 2);
  CHECK_EQ_INT(scalar(path, "SELECT count(*) FROM sqlite_master WHERE name = 'messages_dedupe'"),
               0);
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  cleanup(dir, path);
}

int main(void) {
  RUN(test_merged_tail_restart_prune);
  RUN(test_upgrade_from_index);
  return TEST_SUMMARY();
}

/* The journal's WAL checkpoints (beside the commits, then the writer's
 * short one between two batches), while new entries keep arriving from
 * the answers' callbacks (as MLLP clients send their next message on an
 * ACK): the WAL stays bounded, every entry is committed once and answered
 * in order. A reader holding an old snapshot makes the WAL grow meanwhile;
 * once it lets go, the WAL starts over again. With synchronous=FULL the
 * fdatasync runs after the COMMIT, for several batches at a time, and the
 * answers still come in commit order, barriers after what came before. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <sqlite3.h>

#include "rr_test.h"
#include "store/journal.h"

#define TOTAL 20000
#define CLIENTS 8

typedef struct run {
  rr_journal_t *j;
  const char *path;
  bool hold;    /* a reader holds a snapshot from TOTAL/4 to TOTAL/2 */
  bool full;    /* synchronous=FULL: no answer before an fdatasync */
  int unsynced; /* answers that came before any fdatasync had ended */
  sqlite3 *reader;
  int sent, answered, failed;
  int64_t last_id;
  int out_of_order;
  int barriers, barrier_early; /* barriers answered; ... before an entry added earlier */
  char raw[1100];
} run_t;

static void send_one(run_t *r);

typedef struct barrier {
  run_t *r;
  int before; /* entries added before it */
} barrier_t;

static void on_barrier(void *ud, int status, int64_t id) {
  barrier_t *b = ud;
  (void)id;
  CHECK_EQ_INT(status, 0);
  b->r->barriers++;
  if (b->r->answered < b->before)
    b->r->barrier_early++;
  free(b);
}

static void on_done(void *ud, int status, int64_t id) {
  run_t *r = ud;
  r->answered++;
  if (r->hold && r->answered == TOTAL / 4) {
    sqlite3_stmt *st = NULL;
    CHECK_EQ_INT(sqlite3_open_v2(r->path, &r->reader, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    CHECK_EQ_INT(sqlite3_exec(r->reader, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
    CHECK_EQ_INT(sqlite3_prepare_v2(r->reader, "SELECT count(*) FROM messages", -1, &st, NULL),
                 SQLITE_OK);
    CHECK_EQ_INT(sqlite3_step(st), SQLITE_ROW); /* the snapshot is taken */
    sqlite3_finalize(st);
  } else if (r->hold && r->answered == TOTAL / 2) {
    CHECK_EQ_INT(sqlite3_exec(r->reader, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(r->reader);
    r->reader = NULL;
  }
  if (status) {
    r->failed++;
    return;
  }
  if (r->full) {
    rr_journal_stats_t js;
    rr_journal_stats(r->j, &js);
    r->unsynced += js.syncs == 0;
  }
  if (id <= r->last_id)
    r->out_of_order++;
  r->last_id = id;
  if (r->sent < TOTAL)
    send_one(r); /* the client's next message, while the journal may be busy */
}

static void send_one(run_t *r) {
  char ctl[32], mrn[32];
  snprintf(ctl, sizeof ctl, "J%06d", r->sent);
  snprintf(mrn, sizeof mrn, "MRN%04d", r->sent % 100);
  rr_journal_entry_t e = {.channel = "orders",
                          .peer = "127.0.0.1:5000",
                          .received_ms = 1764000000000 + r->sent,
                          .sending_app = "RIS",
                          .sending_facility = "HOSP",
                          .message_type = "ADT^A01",
                          .control_id = ctl,
                          .mrn = mrn,
                          .status = "accepted",
                          .raw = r->raw,
                          .raw_len = sizeof r->raw,
                          .ack = "ACK",
                          .ack_len = 3,
                          .source = (uint64_t)(r->sent % CLIENTS) + 1};
  r->sent++;
  CHECK_EQ_INT(rr_journal_add(r->j, &e, on_done, r), 0);
  if (r->sent % 50 == 0) { /* answered once every entry before it is */
    barrier_t *b = malloc(sizeof *b);
    CHECK(b != NULL);
    b->r = r;
    b->before = r->sent;
    CHECK_EQ_INT(rr_journal_add_barrier(r->j, on_barrier, b), 0);
  }
  rr_journal_kick(r->j);
}

/* Frames in path's WAL now (a PASSIVE checkpoint's count). */
static int wal_frames(const char *path) {
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  int frames = -1;
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK &&
      sqlite3_prepare_v2(db, "PRAGMA wal_checkpoint(PASSIVE)", -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    frames = sqlite3_column_int(st, 1);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return frames;
}

static void run_checkpoints(bool hold, rr_journal_sync_t sync) {
  char dir[] = "/tmp/rr-journal-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[64], wal[80];
  snprintf(path, sizeof path, "%s/journal.db", dir);
  snprintf(wal, sizeof wal, "%s-wal", path);
  uv_loop_t loop;
  uv_loop_init(&loop);
  static run_t r;
  memset(&r, 0, sizeof r);
  memset(r.raw, 'x', sizeof r.raw);
  r.path = path;
  r.hold = hold;
  r.full = sync == RR_JOURNAL_SYNC_FULL;
  char *err = NULL;
  CHECK_EQ_INT(rr_journal_open(&loop, path, sync, &r.j, &err), 0);
  if (!r.j) {
    fprintf(stderr, "%s\n", err ? err : "open failed");
    return;
  }
  off_t wal_max = 0;
  for (int i = 0; i < CLIENTS; i++)
    send_one(&r);
  while (r.answered < TOTAL) {
    uv_run(&loop, UV_RUN_ONCE);
    struct stat st;
    if (stat(wal, &st) == 0 && st.st_size > wal_max)
      wal_max = st.st_size;
  }
  while (!rr_journal_idle(r.j)) /* a checkpoint may still run */
    uv_run(&loop, UV_RUN_ONCE);
  rr_journal_stats_t js;
  rr_journal_stats(r.j, &js);
  CHECK_EQ_INT(r.failed, 0);
  CHECK_EQ_INT(r.out_of_order, 0);
  CHECK_EQ_INT(r.barriers, TOTAL / 50);
  CHECK_EQ_INT(r.barrier_early, 0);
  CHECK_EQ_INT(r.unsynced, 0);
  if (sync == RR_JOURNAL_SYNC_FULL) /* one per commit (of messages, or of a merge) at most */
    CHECK(js.syncs > 0 && js.syncs <= js.commits + js.dedupe_merges);
  else
    CHECK_EQ_INT((long long)js.syncs, 0);
  CHECK_EQ_INT(rr_journal_count(r.j), TOTAL);
  CHECK_EQ_INT((long long)js.entries, TOTAL);
  CHECK(js.checkpoints >= 3); /* ~25 MB written through a 1000-page WAL */
  int frames = wal_frames(path);
  /* Bounded: 1000 pages of 4 KiB, what came during the checkpoint (more on
   * a loaded machine, whose disk is slow to checkpoint), the batch; well
   * under the 20-40 MB of a WAL that never starts over. */
  if (!hold)
    CHECK(wal_max > 0 && wal_max < (off_t)16 << 20);
  else /* grown while the reader held on */
    CHECK(wal_max > (off_t)16 << 20);
  CHECK(frames >= 0 && frames < 4000); /* started over since */
  if (rr_test_failures)
    fprintf(stderr, "hold=%d sync=%d wal_max=%lld frames=%d checkpoints=%llu syncs=%llu\n", hold,
            (int)sync, (long long)wal_max, frames, (unsigned long long)js.checkpoints,
            (unsigned long long)js.syncs);
  rr_journal_close(r.j);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  unlink(wal);
  snprintf(wal, sizeof wal, "%s-shm", path);
  unlink(wal);
  unlink(path);
  rmdir(dir);
}

static void test_checkpoints_bound_the_wal(void) {
  run_checkpoints(false, RR_JOURNAL_SYNC_NORMAL);
}

static void test_wal_starts_over_after_a_reader(void) {
  run_checkpoints(true, RR_JOURNAL_SYNC_NORMAL);
}

static void test_full_sync_answers_in_commit_order(void) {
  run_checkpoints(false, RR_JOURNAL_SYNC_FULL);
}

int main(void) {
  RUN(test_checkpoints_bound_the_wal);
  RUN(test_wal_starts_over_after_a_reader);
  RUN(test_full_sync_answers_in_commit_order);
  return TEST_SUMMARY();
}

/* The journal's WAL checkpoints: run after a batch has been answered, on
 * the writer, while new entries keep arriving from the answers' callbacks
 * (as MLLP clients send their next message on an ACK). The WAL stays
 * bounded, every entry is committed once and answered in order. */
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "rr_test.h"
#include "store/journal.h"

#define TOTAL 20000
#define CLIENTS 8

typedef struct run {
  rr_journal_t *j;
  int sent, answered, failed;
  int64_t last_id;
  int out_of_order;
  char raw[1100];
} run_t;

static void send_one(run_t *r);

static void on_done(void *ud, int status, int64_t id) {
  run_t *r = ud;
  r->answered++;
  if (status) {
    r->failed++;
    return;
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
  rr_journal_kick(r->j);
}

static void test_checkpoints_bound_the_wal(void) {
  char dir[] = "/tmp/rr-journal-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[64], wal[80];
  snprintf(path, sizeof path, "%s/journal.db", dir);
  snprintf(wal, sizeof wal, "%s-wal", path);
  uv_loop_t loop;
  uv_loop_init(&loop);
  static run_t r;
  memset(r.raw, 'x', sizeof r.raw);
  char *err = NULL;
  CHECK_EQ_INT(rr_journal_open(&loop, path, RR_JOURNAL_SYNC_NORMAL, &r.j, &err), 0);
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
  rr_journal_stats_t js;
  rr_journal_stats(r.j, &js);
  CHECK_EQ_INT(r.failed, 0);
  CHECK_EQ_INT(r.out_of_order, 0);
  CHECK_EQ_INT(rr_journal_count(r.j), TOTAL);
  CHECK_EQ_INT((long long)js.entries, TOTAL);
  CHECK(js.checkpoints >= 3); /* ~25 MB written through a 1000-page WAL */
  /* 1000 pages of 4 KiB, plus the batch that crossed it. */
  CHECK(wal_max > 0 && wal_max < (off_t)8 << 20);
  if (wal_max >= (off_t)8 << 20 || js.checkpoints < 3)
    fprintf(stderr, "wal_max=%lld checkpoints=%llu\n", (long long)wal_max,
            (unsigned long long)js.checkpoints);
  rr_journal_close(r.j);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  unlink(wal);
  snprintf(wal, sizeof wal, "%s-shm", path);
  unlink(wal);
  unlink(path);
  rmdir(dir);
}

int main(void) {
  RUN(test_checkpoints_bound_the_wal);
  return TEST_SUMMARY();
}

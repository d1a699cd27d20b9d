/* Journal commit cost by batch size, on the real journal code: for each
 * batch size, queue that many ~1.1 KB messages, commit, wait for the
 * callbacks, repeat. Prints one JSON line per batch size with the mean time
 * per commit and messages/s through one writer.
 *
 *   bench_journal DIR [full|normal|off]      (DIR on the disk to measure)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "store/journal.h"

static int done;

static void on_done(void *ud, int status, int64_t id) {
  (void)ud;
  (void)id;
  if (status) {
    fprintf(stderr, "commit failed: %d\n", status);
    exit(1);
  }
  done++;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bench_journal DIR [full|normal|off]\n");
    return 2;
  }
  rr_journal_sync_t sync = RR_JOURNAL_SYNC_FULL;
  if (argc > 2 && strcmp(argv[2], "normal") == 0)
    sync = RR_JOURNAL_SYNC_NORMAL;
  else if (argc > 2 && strcmp(argv[2], "off") == 0)
    sync = RR_JOURNAL_SYNC_OFF;
  static const size_t sizes[] = {1, 4, 16, 64};
  char raw[1100], ack[160];
  memset(raw, 'x', sizeof raw);
  memset(ack, 'a', sizeof ack);
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/bench-journal-%zu.db", argv[1], sizes[s]);
    for (const char *suffix = ""; suffix; suffix = *suffix ? NULL : "-wal") {
      char p[4200];
      snprintf(p, sizeof p, "%s%s", path, suffix);
      unlink(p);
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    rr_journal_t *j;
    char *err = NULL;
    if (rr_journal_open(&loop, path, sync, &j, &err) != 0) {
      fprintf(stderr, "%s\n", err ? err : "open failed");
      return 1;
    }
    size_t batch = sizes[s];
    size_t commits = 4000 / batch < 200 ? 200 : 4000 / batch;
    uint64_t seq = 0, t0 = uv_hrtime();
    for (size_t c = 0; c < commits; c++) {
      for (size_t i = 0; i < batch; i++) {
        char ctl[32], mrn[32];
        snprintf(ctl, sizeof ctl, "B%zu-%llu", i, (unsigned long long)++seq);
        snprintf(mrn, sizeof mrn, "MRN%06zu", c % 1000);
        rr_journal_entry_t e = {.channel = "orders",
                                .peer = "127.0.0.1:5000",
                                .received_ms = 1764000000000 + (int64_t)seq,
                                .sending_app = "RIS",
                                .sending_facility = "HOSP",
                                .message_type = "ADT^A01",
                                .control_id = ctl,
                                .mrn = mrn,
                                .status = "accepted",
                                .raw = raw,
                                .raw_len = sizeof raw,
                                .ack = ack,
                                .ack_len = sizeof ack,
                                .source = i + 1};
        rr_journal_add(j, &e, on_done, NULL);
      }
      done = 0;
      rr_journal_kick(j);
      while (done < (int)batch)
        uv_run(&loop, UV_RUN_ONCE);
    }
    double secs = (double)(uv_hrtime() - t0) / 1e9;
    rr_journal_stats_t st;
    rr_journal_stats(j, &st);
    printf("{\"batch\":%zu,\"commits\":%zu,\"mean_commit_us\":%.0f,\"wall_us_per_commit\":%.0f,"
           "\"msgs_per_s\":%.0f}\n",
           batch, commits, (double)st.commit_us_total / (double)st.commits,
           secs * 1e6 / (double)commits, (double)(commits * batch) / secs);
    fflush(stdout);
    rr_journal_close(j);
    uv_loop_close(&loop);
  }
  return 0;
}

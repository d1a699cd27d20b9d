/* The message journal: every inbound message, its metadata and the ACK sent,
 * in SQLite (WAL).
 *
 * Writes are batched and pipelined. rr_journal_add queues an entry;
 * rr_journal_kick hands everything queued to a libuv worker thread, which
 * writes it in one transaction; back on the loop thread each entry's
 * callback runs, in queue order, after the COMMIT has returned. An ACK that
 * promises the message is kept is sent from that callback. While one batch
 * is being committed the next one collects, so under load batches grow and
 * the fsync cost is shared.
 *
 * Threading: every function runs on the loop thread given to
 * rr_journal_open; callbacks run there too, never synchronously from
 * rr_journal_add. The worker owns the writer connection while a batch is in
 * flight; the loop thread reads through a second connection. */
#ifndef RR_STORE_JOURNAL_H
#define RR_STORE_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/buf.h"

typedef struct rr_journal rr_journal_t;

typedef enum rr_journal_sync {
  RR_JOURNAL_SYNC_FULL = 0, /* fsync at every commit: nothing acknowledged is lost */
  RR_JOURNAL_SYNC_NORMAL,   /* WAL fsync at checkpoints: power loss may lose recent commits */
  RR_JOURNAL_SYNC_OFF       /* no fsync: tests and benchmarks only */
} rr_journal_sync_t;

typedef struct rr_journal_entry {
  const char *channel; /* borrowed for the rr_journal_add call; all copied */
  const char *peer;
  int64_t received_ms;
  const char *sending_app, *sending_facility, *message_type, *control_id;
  const char *mrn, *accession, *study_uid; /* NULL when absent */
  const char *status;                      /* "accepted", "error", "rejected" */
  const char *error;                       /* diagnostic for error/rejected, may be NULL */
  const void *raw;
  size_t raw_len;
  const void *ack; /* the answer sent, NULL when none is sent */
  size_t ack_len;
  uint64_t source; /* who sent it (e.g. a connection id), for group
                      commit: not stored; 0 = unknown */
} rr_journal_entry_t;

/* Called once per entry after its batch's commit (status 0) or the commit's
 * failure (negative code; nothing of the batch was kept). id is the row id
 * (0 for barriers and on failure). Loop thread. */
typedef void (*rr_journal_done_cb)(void *ud, int status, int64_t id);

/* What is known about an earlier message with the same sender and control
 * id (rr_journal_find). */
typedef struct rr_journal_dup {
  bool found;
  bool same_content; /* byte-identical raw message */
  bool committed;    /* false: still queued or being committed */
  int64_t id;
  void *ack; /* malloc'd copy of the ACK it got (NULL when none); caller frees */
  size_t ack_len;
} rr_journal_dup_t;

/* rr_journal_open: opens or creates the store file and its schema. On error
 * returns a negative code and, when errmsg is not NULL, a malloc'd
 * description the caller frees. */
int rr_journal_open(uv_loop_t *loop, const char *path, rr_journal_sync_t sync, rr_journal_t **out,
                    char **errmsg);
/* rr_journal_set_gather: how long (microseconds; default 0 = never wait)
 * a commit may wait for the senders of the last two batches to send again,
 * so that senders that wait for each ACK land in one batch instead of
 * splitting into groups that alternate between fsyncs. Measured on the
 * reference machine it did not pay: commit time grows with rows as much as
 * the wait saves (docs/benchmarks.md). */
void rr_journal_set_gather(rr_journal_t *j, unsigned usec);
/* rr_journal_close: the journal must be idle (rr_journal_idle); queued
 * entries are reported failed (RR_EIO). NULL is a no-op. */
void rr_journal_close(rr_journal_t *j);
/* rr_journal_add: queues an entry (copied). RR_ENOMEM. */
int rr_journal_add(rr_journal_t *j, const rr_journal_entry_t *e, rr_journal_done_cb cb, void *ud);
/* rr_journal_add_barrier: queues a callback that runs after everything
 * queued before it has been committed (keeps answers in order). */
int rr_journal_add_barrier(rr_journal_t *j, rr_journal_done_cb cb, void *ud);
/* rr_journal_kick: starts committing what is queued, unless a batch is
 * already in flight (then it starts when that one is done), or the queue
 * is still smaller than the last batch and the gather time has not passed
 * (then it starts when either happens). */
void rr_journal_kick(rr_journal_t *j);
/* rr_journal_idle: nothing queued and nothing in flight. */
bool rr_journal_idle(const rr_journal_t *j);
/* rr_journal_set_idle_cb: called (once per registration) when the journal
 * becomes idle after a kick; for shutdown. */
void rr_journal_set_idle_cb(rr_journal_t *j, void (*cb)(void *ud), void *ud);
size_t rr_journal_pending(const rr_journal_t *j);
/* rr_journal_find: an earlier message from (app, facility) with this
 * control id, among queued, in-flight and committed ones; compares raw.
 * The earliest such message wins. */
int rr_journal_find(rr_journal_t *j, const char *app, const char *facility, const char *control_id,
                    const void *raw, size_t raw_len, rr_journal_dup_t *out);
/* Counters since open (loop thread). */
typedef struct rr_journal_stats {
  uint64_t commits, entries, max_batch, failed_commits;
  uint64_t commit_us_total; /* time spent in BEGIN..COMMIT on the worker */
} rr_journal_stats_t;
void rr_journal_stats(const rr_journal_t *j, rr_journal_stats_t *out);

/* rr_journal_kv_set: queues a key-value write (value NULL: remove the key),
 * committed with the batch it joins, so a script's enrichment and its
 * message are kept together. Copies key and value. RR_ENOMEM. */
int rr_journal_kv_set(rr_journal_t *j, const char *key, const void *value, size_t len,
                      int64_t now_ms);
/* rr_journal_kv_get: appends the newest value of key (queued writes
 * included) to out; RR_ENOTFOUND when there is none, RR_EIO. */
int rr_journal_kv_get(rr_journal_t *j, const char *key, rr_buf_t *out);

/* rr_journal_count: rows in the journal (for tools and tests). */
int64_t rr_journal_count(rr_journal_t *j);

#endif

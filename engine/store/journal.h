/* The message journal: every inbound message, its metadata and the ACK sent,
 * in SQLite (WAL). Writes are batched: rr_journal_add queues an entry, and
 * rr_journal_commit writes every queued entry in one transaction, then
 * reports each entry's outcome through its callback. An ACK that promises
 * the message is kept is sent from that callback, after the commit returned.
 *
 * Threading: a journal belongs to the loop thread that opened it. */
#ifndef RR_STORE_JOURNAL_H
#define RR_STORE_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

typedef struct rr_journal rr_journal_t;

typedef enum rr_journal_sync {
  RR_JOURNAL_SYNC_FULL = 0, /* fsync at every commit: nothing acknowledged is lost */
  RR_JOURNAL_SYNC_NORMAL,   /* WAL fsync at checkpoints: power loss may lose recent commits */
  RR_JOURNAL_SYNC_OFF       /* no fsync: tests and benchmarks only */
} rr_journal_sync_t;

typedef struct rr_journal_entry {
  const char *channel;      /* borrowed for the rr_journal_add call; all copied */
  const char *peer;
  int64_t received_ms;
  const char *sending_app, *sending_facility, *message_type, *control_id;
  const char *mrn, *accession, *study_uid; /* NULL when absent */
  const char *status;       /* "accepted", "error", "rejected" */
  const char *error;        /* diagnostic for error/rejected, may be NULL */
  const void *raw;
  size_t raw_len;
  const void *ack;
  size_t ack_len;
} rr_journal_entry_t;

/* Called once per entry after the commit (status 0) or its failure
 * (negative code; nothing of the batch was kept). id is the row id. */
typedef void (*rr_journal_done_cb)(void *ud, int status, int64_t id);

/* rr_journal_open: opens or creates the store file and its schema.
 * On error returns a negative code and, when errmsg is not NULL, a
 * malloc'd description the caller frees. */
int rr_journal_open(const char *path, rr_journal_sync_t sync, rr_journal_t **out, char **errmsg);
/* rr_journal_close: commits nothing; queued entries are reported failed
 * (RR_EIO). NULL is a no-op. */
void rr_journal_close(rr_journal_t *j);
/* rr_journal_add: queues an entry (copied). RR_ENOMEM; never calls back
 * synchronously. */
int rr_journal_add(rr_journal_t *j, const rr_journal_entry_t *e, rr_journal_done_cb cb, void *ud);
/* rr_journal_pending: entries queued and not yet committed. */
size_t rr_journal_pending(const rr_journal_t *j);
/* rr_journal_commit: writes every queued entry in one transaction and calls
 * each callback, in queue order. Returns the commit's status. */
int rr_journal_commit(rr_journal_t *j);
/* rr_journal_count: rows in the journal (for tools and tests). */
int64_t rr_journal_count(rr_journal_t *j);

#endif

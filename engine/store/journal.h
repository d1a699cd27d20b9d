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
#include "core/histogram.h"

typedef struct rr_journal rr_journal_t;

typedef enum rr_journal_sync {
  RR_JOURNAL_SYNC_FULL = 0, /* fsync at every commit: nothing acknowledged is lost */
  RR_JOURNAL_SYNC_NORMAL,   /* WAL fsync at checkpoints: power loss may lose recent commits */
  RR_JOURNAL_SYNC_OFF       /* no fsync: tests and benchmarks only */
} rr_journal_sync_t;

/* A delivery the message's script asked for: queued for a destination in
 * the transaction that journals the message, so an acknowledged message's
 * deliveries are never lost. */
typedef struct rr_journal_route {
  const char *destination;
  const char *key;          /* per-key order (e.g. the MRN); NULL or "" = none */
  int lane;                 /* priority lane: 0 routine, 1 STAT, 2 critical */
  const char *content_type; /* "hl7" or "json" */
  const void *payload;
  size_t len;
} rr_journal_route_t;

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
  uint64_t source;                  /* who sent it (e.g. a connection id), for group
                                       commit: not stored; 0 = unknown */
  const rr_journal_route_t *routes; /* queued with the message; copied */
  size_t nroutes;
  /* A study event (the context a DICOM source's script was given): the
   * study is marked routed, with its order match, in the same transaction
   * as this entry and its routes. NULL for an HL7 message. */
  const char *routed_study;
  int64_t order_id;         /* the matched order (orders.id); 0 = none */
  const char *match_method; /* "accession", "study_uid", "patient_modality_time", "none" */
} rr_journal_entry_t;

/* A queued delivery as the store has it (payload not included). */
typedef struct rr_journal_qitem {
  int64_t id, message_id;
  const char *destination; /* borrowed for the call */
  const char *key;         /* "" = none */
  int lane;
  bool dead;
  unsigned attempts;
  int64_t not_before_ms, enqueued_ms;
  const char *content_type; /* "hl7"/"json" (static) when payload is given */
  const void *payload;      /* borrowed for the call; NULL when not at hand */
  size_t len;
} rr_journal_qitem_t;

/* What became of one delivery attempt, or an operator's action. */
typedef enum rr_journal_outcome {
  RR_JOURNAL_DELIVERED = 0, /* removed from the queue */
  RR_JOURNAL_RETRY,         /* stays, attempts and not_before updated */
  RR_JOURNAL_DEAD,          /* stays as a dead letter */
  RR_JOURNAL_DROPPED,       /* removed by an operator */
  RR_JOURNAL_REQUEUED       /* a dead letter made pending again by an operator
                               (queue_id 0: every dead row of the destination) */
} rr_journal_outcome_t;

typedef struct rr_journal_delivery {
  int64_t queue_id, message_id;
  const char *destination;
  rr_journal_outcome_t outcome;
  unsigned attempts;     /* after this attempt */
  int64_t at_ms;         /* when it ended */
  int64_t not_before_ms; /* RR_JOURNAL_RETRY: earliest next attempt */
  const char *detail;    /* error or peer's answer summary; may be NULL */
  const void *response;  /* the peer's answer (an ACK, an HTTP body); may be NULL */
  size_t response_len;
} rr_journal_delivery_t;

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
/* rr_journal_set_keep_sent: a delivered queue row's payload is copied to
 * table sent (with the delivery's commit) so what was sent can be read
 * later (GET /api/messages/{id}); pruned with its message. Costs one more
 * write of each payload. Default off; the engine turns it on unless the
 * configuration says "keep_sent": false. */
void rr_journal_set_keep_sent(rr_journal_t *j, bool keep);
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
/* rr_journal_find: an earlier message of channel from (app, facility)
 * with this control id, among queued, in-flight and committed ones;
 * compares raw. The earliest such message wins. */
int rr_journal_find(rr_journal_t *j, const char *channel, const char *app, const char *facility,
                    const char *control_id, const void *raw, size_t raw_len, rr_journal_dup_t *out);
/* Counters since open (loop thread). */
typedef struct rr_journal_stats {
  uint64_t commits, entries, max_batch, failed_commits;
  uint64_t commit_us_total; /* BEGIN..COMMIT on the worker plus the wait for the disk */
  uint64_t checkpoints;     /* WAL checkpoints run after answered batches */
  uint64_t checkpoint_us_total;
  uint64_t syncs; /* fdatasyncs of the WAL that made commits durable */
  uint64_t sync_us_total;
  uint64_t dedupe_merges; /* control ids merged into table dedupe, in batches */
  uint64_t dedupe_merge_us_total;
  bool last_failed;          /* the last batch's commit failed */
  rr_histo_t commit_latency; /* the same, per batch with entries */
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

/* ---- destination queues --------------------------------------------------
 * Rows of table queue: what is waiting for each destination (pending or
 * dead); table deliveries keeps every attempt and operator action. */

/* rr_journal_set_enqueue_cb: called on the loop thread, after the commit
 * that kept them, once per route of each message, in id order. */
typedef void (*rr_journal_enqueue_cb)(void *ud, const rr_journal_qitem_t *item);
void rr_journal_set_enqueue_cb(rr_journal_t *j, rr_journal_enqueue_cb cb, void *ud);
/* rr_journal_queue_load: committed queue rows of destination with
 * id > after_id, in id order, at most limit; cb per row. Returns the number
 * of rows or RR_EIO. Pending and dead rows both come (item->dead). With
 * payloads, each pending row's payload comes too (item->payload). */
int rr_journal_queue_load(rr_journal_t *j, const char *destination, int64_t after_id, size_t limit,
                          bool payloads, void (*cb)(void *ud, const rr_journal_qitem_t *item),
                          void *ud);
/* rr_journal_queue_payload: appends the row's payload to out, sets
 * *content_type ("hl7"/"json", static) and *message_id. RR_ENOTFOUND,
 * RR_EIO, RR_ENOMEM. */
int rr_journal_queue_payload(rr_journal_t *j, int64_t id, rr_buf_t *out, const char **content_type,
                             int64_t *message_id);
/* rr_journal_queue_record: queues the outcome of an attempt (copied); it
 * commits with the next batch; cb (may be NULL) after that commit. */
int rr_journal_queue_record(rr_journal_t *j, const rr_journal_delivery_t *d, rr_journal_done_cb cb,
                            void *ud);
/* rr_journal_queue_depth: pending and dead rows per destination in the
 * store (committed), via cb; returns the number of destinations or RR_EIO. */
int rr_journal_queue_depth(rr_journal_t *j,
                           void (*cb)(void *ud, const char *destination, int64_t pending,
                                      int64_t dead, int64_t oldest_ms),
                           void *ud);

/* rr_journal_queue_routes: queues deliveries for an already journaled
 * message (a replay), in the next batch; the enqueue callback reports them.
 * Copies everything. RR_ENOMEM. */
int rr_journal_queue_routes(rr_journal_t *j, int64_t message_id, int64_t now_ms,
                            const rr_journal_route_t *routes, size_t n);
/* rr_journal_message: a journaled message's channel (into channel, cap
 * bytes) and raw bytes (appended to raw). RR_ENOTFOUND, RR_EIO, RR_ENOMEM. */
int rr_journal_message(rr_journal_t *j, int64_t id, char *channel, size_t cap, rr_buf_t *raw);

/* Operator requests left in table queue_ops by `radrelay queue` and
 * `radrelay replay` for the running engine: cb once per row, oldest first;
 * the rows read are deleted with the next batch. Returns the number read or
 * RR_EIO. */
typedef struct rr_journal_op {
  const char *op; /* "retry", "retry_dead", "drop", "replay" */
  const char *destination;
  int64_t queue_id, message_id;
} rr_journal_op_t;
int rr_journal_ops_take(rr_journal_t *j, void (*cb)(void *ud, const rr_journal_op_t *op), void *ud);

/* rr_journal_prune: queues the removal of up to limit messages received
 * before cutoff_ms, with their delivery history, except messages with
 * status "error" and messages with a queued delivery; the freed pages go
 * back to the file system (incremental vacuum). cb (may be NULL) after the
 * commit with the number removed as id (status 0). RR_ENOMEM. */
int rr_journal_prune(rr_journal_t *j, int64_t cutoff_ms, unsigned limit, rr_journal_done_cb cb,
                     void *ud);

/* ---- studies ---------------------------------------------------------------
 * Table instances: one row per stored DICOM instance (its spool file and
 * header fields); table studies: one row per Study Instance UID with the
 * count of its instances and when the first and the last came. */
typedef struct rr_journal_instance {
  const char *channel, *calling_ae, *peer, *path;
  const char *sop_class_uid, *sop_instance_uid, *study_uid, *series_uid;
  const char *patient_id, *accession, *modality, *body_part, *description;
  const char *study_date, *study_time, *series_number, *instance_number;
  uint64_t size;
  int64_t received_ms;
  bool reopen; /* an instance of a study no longer arriving makes it arriving again */
} rr_journal_instance_t;
/* rr_journal_add_instance: queues the instance (copied) for the next batch;
 * a SOP Instance UID already stored keeps its first row (the new file is
 * recorded in place of the old). cb (may be NULL) after the commit.
 * RR_ENOMEM. */
int rr_journal_add_instance(rr_journal_t *j, const rr_journal_instance_t *in, rr_journal_done_cb cb,
                            void *ud);
/* rr_journal_mark_stable: queues, for the next batch, "every study of
 * channel still arriving whose last instance came before cutoff_ms is
 * stable"; after the commit cb gets the Study Instance UIDs that changed
 * (borrowed for the call; n may be 0), or a negative status. RR_ENOMEM. */
typedef void (*rr_journal_stable_cb)(void *ud, int status, const char *const *uids, size_t n);
int rr_journal_mark_stable(rr_journal_t *j, const char *channel, int64_t cutoff_ms,
                           rr_journal_stable_cb cb, void *ud);
/* rr_journal_mark_study_stable: the same for one study, whatever its
 * quiet period (an explicit "complete" at at_ms, the wall clock when it was
 * asked for); cb gets its UID when it was still arriving, nothing
 * otherwise. RR_ENOMEM. */
int rr_journal_mark_study_stable(rr_journal_t *j, const char *study_uid, int64_t at_ms,
                                 rr_journal_stable_cb cb, void *ud);

/* rr_journal_study_instances: the instances recorded for a study
 * (committed), 0 when the study is unknown; RR_EIO. */
int64_t rr_journal_study_instances(rr_journal_t *j, const char *study_uid);

/* rr_journal_study_paths: the files (paths as recorded) of a study's
 * instances, by series then instance number; cb per path. Returns how
 * many, or RR_EIO. */
int rr_journal_study_paths(rr_journal_t *j, const char *study_uid,
                           void (*cb)(void *ud, const char *path), void *ud);

/* rr_journal_quiet: the committed studies that rr_journal_mark_stable
 * (same channel and cutoff) or, with study_uid, rr_journal_mark_study_stable
 * would make stable now (arriving, not routed); cb per Study Instance UID
 * (borrowed) with its channel. So the study event can be journaled in the
 * same batch as the mark. Returns how many, or RR_EIO. */
int rr_journal_quiet(rr_journal_t *j, const char *channel, int64_t cutoff_ms, const char *study_uid,
                     void (*cb)(void *ud, const char *study_uid, const char *channel), void *ud);

/* rr_journal_unrouted: the studies of channel that are stable but whose
 * study event has not been journaled yet (a restart between the two, or a
 * study made stable by `radrelay study complete`), oldest first; cb per
 * Study Instance UID (borrowed). Returns how many, or RR_EIO. */
int rr_journal_unrouted(rr_journal_t *j, const char *channel,
                        void (*cb)(void *ud, const char *study_uid), void *ud);

/* ---- orders ----------------------------------------------------------------
 * Table orders: what the orders channel keeps (orders.keep in its script),
 * one row per accession number (or placer order number when there is no
 * accession), with the whole record as JSON. Arriving studies are matched
 * against it. */
typedef struct rr_journal_order {
  const char *channel;
  const char *accession, *placer, *filler; /* accession or placer required */
  const char *mrn, *study_uid, *modality, *priority;
  const char *order_control; /* ORC-1 (NW, XO, CA, ...); CA, OC, DC, CR, OD and DR
                                cancel the order, anything else makes it active */
  const char *ordered_at;    /* HL7 timestamp, site local time; NULL = received_ms */
  const char *record;        /* the JSON object the script kept */
  size_t record_len;
  int64_t received_ms;
} rr_journal_order_t;
/* rr_journal_keep_order: queues the order (copied) for the next batch, so
 * it commits with the message that carried it: a new accession is
 * inserted, a known one replaced (a cancel keeps the record and changes
 * the status only). RR_EINVAL (neither accession nor placer), RR_ENOMEM. */
int rr_journal_keep_order(rr_journal_t *j, const rr_journal_order_t *o);
/* rr_journal_order_get: appends the record of the order with this
 * accession (queued orders included) to out, as a JSON object with "id"
 * and "status" added. RR_ENOTFOUND, RR_EIO, RR_ENOMEM. */
int rr_journal_order_get(rr_journal_t *j, const char *accession, rr_buf_t *out);

/* rr_journal_study_context: the study as routing sees it, as a JSON object
 * appended to out: its header fields, series, counts and times, the order
 * it matches and how ("match": accession, else Study Instance UID, else
 * the same patient ID and modality with the order time within window_ms of
 * the study date and time, preferring an order not yet matched to another
 * study, then the nearest in time; "none" otherwise). *order_id (0 when
 * none) and *method (static) are set for rr_journal_entry_t. Reads
 * committed rows. RR_ENOTFOUND (no such study), RR_EIO, RR_ENOMEM. */
int rr_journal_study_context(rr_journal_t *j, const char *study_uid, int64_t window_ms,
                             rr_buf_t *out, int64_t *order_id, const char **method);

/* ---- other modules' tables -------------------------------------------------
 * A module with tables of its own in the store (AI jobs, audit, ...) writes
 * through the journal, so its rows commit in the same transactions as the
 * messages: write runs on the worker thread, inside the batch's
 * transaction, on the writer connection (it must not BEGIN or COMMIT);
 * a negative return fails the whole batch. free_data (may be NULL) is
 * called once the batch is done, committed or not; cb (may be NULL) after
 * the commit, like an entry's. */
struct sqlite3;
typedef int (*rr_journal_write_fn)(struct sqlite3 *db, void *data);
int rr_journal_custom(rr_journal_t *j, rr_journal_write_fn write, void *data,
                      void (*free_data)(void *data), rr_journal_done_cb cb, void *ud);
/* rr_journal_custom_each: cb for the data of every custom write with this
 * write function that is queued or being committed (not yet in the rows
 * the reader sees), oldest first; data is borrowed for the call and must
 * only be read. Loop thread; cb runs synchronously. */
void rr_journal_custom_each(rr_journal_t *j, rr_journal_write_fn write,
                            void (*cb)(void *ud, const void *data), void *ud);
/* rr_journal_schema: runs a module's schema SQL (CREATE TABLE IF NOT
 * EXISTS ...) on the writer connection, now. Only while the journal is
 * idle (at start): RR_EAGAIN otherwise; RR_EIO with a malloc'd message in
 * *errmsg (may be NULL). */
int rr_journal_schema(rr_journal_t *j, const char *sql, char **errmsg);
/* rr_journal_reader: the loop thread's read connection (committed rows). */
struct sqlite3 *rr_journal_reader(rr_journal_t *j);

/* rr_journal_audit: queues an audit record (copied; see audit/audit.h) for
 * the next batch: it is chained and kept in the same transaction as what
 * the batch holds with it. r->data must be JSON (RR_EIO at the commit
 * otherwise: the batch fails). RR_ENOMEM. */
struct rr_audit_record;
int rr_journal_audit(rr_journal_t *j, const struct rr_audit_record *r);
/* rr_journal_audit_json: the same with the time now and data a JSON value
 * (the reference is stolen, also on error). */
typedef struct json_t json_t;
int rr_journal_audit_json(rr_journal_t *j, const char *actor, const char *kind, const char *subject,
                          json_t *data);

/* rr_journal_count: rows in the journal (for tools and tests). */
int64_t rr_journal_count(rr_journal_t *j);

#endif

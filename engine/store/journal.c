/* SQLite journal: pipelined group commit on a libuv worker thread. */
#include "store/journal.h"

#include <errno.h>
#include <jansson.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "audit/audit.h"
#include "core/array.h"
#include "core/error.h"
#include "core/log.h"
#include "store/wal_vfs.h"

typedef struct pending {
  rr_journal_entry_t e; /* strings and blobs point into blob */
  bool barrier;
  bool kv;        /* a key-value write: key in e.control_id, value in e.raw */
  bool kv_delete; /* ... or its removal */
  bool delivery;  /* an attempt's outcome: in d, strings in blob */
  bool replay;    /* routes only, for message replay_of (queued again) */
  int64_t replay_of;
  int64_t ops_upto;                /* > 0: delete queue_ops rows up to this id */
  int64_t prune_before;            /* > 0: remove messages received before (prune_limit at most) */
  rr_journal_instance_t *instance; /* a DICOM instance (strings in blob) */
  rr_journal_order_t *order;       /* an order (strings in blob) */
  rr_audit_record_t *audit;        /* an audit record (strings in blob) */
  rr_journal_write_fn custom;      /* another module's write (custom_data) */
  void *custom_data;
  void (*custom_free)(void *data);
  int64_t order_ms;      /* its ordered_at read as if UTC */
  int64_t stable_before; /* > 0: studies of channel e.channel quiet since then */
  rr_journal_stable_cb stable_cb;
  char **stable_uids; /* written by the worker: the studies that became stable */
  size_t nstable;
  unsigned prune_limit;
  rr_journal_delivery_t d;
  rr_journal_done_cb cb;
  void *ud;
  int64_t id; /* written by the worker */
  char *blob;
  rr_journal_route_t *routes; /* e.routes copied; one allocation with qids */
  int64_t *qids;              /* queue row ids, written by the worker */
} pending_t;

typedef struct batch {
  pending_t *v;
  size_t n, cap;
} batch_t;

/* A committed message's control id not yet merged into table dedupe. */
typedef struct tail_ent {
  int64_t id;
  uint64_t h; /* fp_hash of the four strings */
  char *keys; /* control id, sender, facility, channel: each NUL-terminated */
} tail_ent_t;

/* A batch whose transaction has ended, waiting for its turn to be answered:
 * batches are answered in the order they were committed, each once its
 * commit is on disk (see "durability" below). */
typedef struct done_batch {
  batch_t b;
  int rc;
  uint64_t us; /* BEGIN..COMMIT, plus the fdatasync that made it durable */
  bool ready;  /* durable, failed, or nothing to wait for */
  int sync;    /* the work item (slot + 1) whose fdatasync it waits for, or 0 */
} done_batch_t;
#define DONE_MAX 64 /* more committed and unanswered: the next commit waits */

/* A batch's work item in the thread pool: its transaction, then (with
 * synchronous=FULL) the fdatasync of the WAL that makes it durable. Two may
 * run at once: once the first has committed (and tells the loop so), the
 * next batch is written while the first waits for the disk (which serves
 * two fdatasyncs about 1.5 times as fast as one). */
#define JOBS_MAX 2
typedef struct job {
  uv_work_t work;
  struct rr_journal *j;
  bool running;         /* its work item runs */
  bool seen;            /* the loop took the commit's outcome */
  atomic_int committed; /* worker: the transaction ended (flight_* written) */
  bool synced;          /* worker: it ran an fdatasync */
  int err;              /* written by the worker */
  uint64_t us;          /* written by the worker */
} job_t;

/* The reader's queries run on the loop thread after nearly every commit
 * (study contexts, orders, what to route); preparing one costs about as
 * much as running it, so they stay prepared, the least recently used
 * dropped first. A statement in use is not handed out twice. */
#define READER_STMTS 24
typedef struct reader_stmt {
  char *sql;
  sqlite3_stmt *st;
  bool busy;
  uint64_t used;
} reader_stmt_t;

struct rr_journal {
  uv_loop_t *loop;
  sqlite3 *wdb; /* writer: the worker's while a batch is in flight */
  sqlite3 *rdb; /* reader: loop thread */
  sqlite3_stmt *insert, *begin, *commit, *rollback;                             /* on wdb */
  sqlite3_stmt *find, *find_raw, *count;                                        /* on rdb */
  sqlite3_stmt *kv_put, *kv_del;                                                /* on wdb */
  sqlite3_stmt *kv_get;                                                         /* on rdb */
  sqlite3_stmt *q_insert, *q_history, *q_delete, *q_retry, *q_dead, *q_requeue; /* wdb */
  sqlite3_stmt *q_keep_sent; /* wdb: a delivered row's payload into table sent */
  bool keep_sent;
  sqlite3_stmt *q_requeue_all, *ops_delete;                                             /* wdb */
  sqlite3_stmt *ops_read, *msg_get;                                                     /* rdb */
  sqlite3_stmt *q_load, *q_payload, *q_depth;                                           /* rdb */
  sqlite3_stmt *study_routed, *order_find, *order_insert, *order_update, *order_cancel; /* wdb */
  rr_journal_enqueue_cb enqueue_cb;
  void *enqueue_ud;
  rr_audit_chain_t audit;    /* the audit trail's chain (head as committed) */
  rr_audit_head_t audit_tip; /* the batch in flight's working head (worker) */
  bool audit_open;
  batch_t queue;  /* collecting (loop thread) */
  batch_t flight; /* being committed */
  bool busy;
  /* Committed batches not yet answered, oldest first, and the fdatasync of
   * the WAL that makes them durable (see "durability" below). */
  done_batch_t done[DONE_MAX];
  size_t ndone;
  bool draining;
  int wal_fd;        /* the WAL, for that fdatasync; -1: SQLite's commit syncs */
  bool sync_failing; /* the last fdatasync failed (logged once per streak) */
  job_t jobs[JOBS_MAX];
  job_t *committing;    /* the one whose transaction has not been taken */
  uv_async_t committed; /* a work item's transaction ended */
  bool committed_open;
  int flight_rc;
  char flight_err[256];
  uv_work_t work;
  void (*idle_cb)(void *ud);
  void *idle_ud;
  uv_timer_t gather; /* deadline for a small batch */
  bool gather_armed;
  unsigned gather_us;
  size_t last_batch;      /* entries written by the last commit */
  uint64_t *prev_sources; /* sources of the last completed batch */
  size_t nprev, prev_cap;
  size_t expect;         /* distinct sources of the last two batches */
  size_t queued_entries; /* non-barrier entries in the queue */
  rr_journal_stats_t stats;
  uint64_t flight_us; /* written by the worker */
  /* WAL checkpoints (see "checkpoints" below). */
  int wal_pages;      /* frames in the WAL after the last commit (worker) */
  int ckpt_pages;     /* frames in the WAL when the checkpoint started */
  bool ckpt_due;      /* a checkpoint follows the batch being answered */
  bool ckpt_failing;  /* the last checkpoint failed (logged once per streak) */
  int ckpt_rc;        /* written by the worker */
  char ckpt_err[128]; /* written by the worker */
  uint64_t ckpt_us;   /* written by the worker */
  sqlite3 *cdb;       /* the checkpointer's connection (thread pool), or NULL */
  uv_work_t bg_work;
  bool bg_running;  /* a checkpoint on cdb is running */
  bool bg_ran;      /* one ran since the WAL last started over */
  int bg_rc;        /* written by the worker */
  char bg_err[128]; /* written by the worker */
  uint64_t bg_us;   /* written by the worker */
  /* Control ids of committed messages not yet in table dedupe, in id
   * order (see "duplicates" below). */
  tail_ent_t *tail;
  size_t ntail, tail_cap;
  int64_t max_id;        /* the newest message committed */
  bool merging;          /* a merge into table dedupe is queued or running */
  sqlite3_stmt *id_find; /* on rdb: a tail entry's message */
  /* Fingerprints of (sender, control id) of every message journaled or
   * queued: a resend check that misses here needs no read of the store. */
  uint32_t *fp;
  size_t fp_cap, fp_n;               /* fp_cap: a power of two (or 0) */
  reader_stmt_t rstmt[READER_STMTS]; /* the reader's statements, kept prepared */
  uint64_t rstmt_tick;
};

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS messages("
    " id INTEGER PRIMARY KEY AUTOINCREMENT," /* never reused, also after pruning */
    " channel TEXT NOT NULL,"
    " peer TEXT,"
    " received_ms INTEGER NOT NULL,"
    " sending_app TEXT, sending_facility TEXT, message_type TEXT, control_id TEXT,"
    " mrn TEXT, accession TEXT, study_uid TEXT,"
    " status TEXT NOT NULL,"
    " error TEXT,"
    " raw BLOB NOT NULL,"
    " ack BLOB);"
    /* Duplicates are per channel (a resend comes to the channel it was sent
     * to). Table dedupe is the control-id index of the messages up to
     * dedupe_merged.upto, written in batches (see "duplicates" below); no
     * sender, facility: ''. */
    "DROP INDEX IF EXISTS messages_control;"
    "CREATE TABLE IF NOT EXISTS dedupe(control_id TEXT NOT NULL, sending_app TEXT NOT NULL,"
    " sending_facility TEXT NOT NULL, channel TEXT NOT NULL, message_id INTEGER NOT NULL,"
    " PRIMARY KEY(control_id, sending_app, sending_facility, channel, message_id))"
    " WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS dedupe_merged(one INTEGER PRIMARY KEY CHECK(one = 1),"
    " upto INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS messages_mrn ON messages(mrn) WHERE mrn IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS messages_accession ON messages(accession) WHERE accession IS NOT "
    "NULL;"
    "CREATE INDEX IF NOT EXISTS messages_study ON messages(study_uid) WHERE study_uid IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS messages_time ON messages(received_ms);"
    /* message search (GET /api/messages): what went wrong, by channel and
     * time; a partial index, so accepted messages (nearly all) cost nothing */
    "DROP INDEX IF EXISTS messages_channel;"
    "DROP INDEX IF EXISTS messages_status;"
    "CREATE INDEX IF NOT EXISTS messages_problems ON messages(status, channel, received_ms)"
    " WHERE status <> 'accepted';"
    "CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value BLOB NOT NULL,"
    " updated_ms INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS queue("
    " id INTEGER PRIMARY KEY AUTOINCREMENT," /* never reused: rows go once delivered */
    " message_id INTEGER NOT NULL,"
    " destination TEXT NOT NULL,"
    " key TEXT NOT NULL,"
    " lane INTEGER NOT NULL,"
    " state TEXT NOT NULL," /* pending, dead */
    " attempts INTEGER NOT NULL,"
    " not_before_ms INTEGER NOT NULL,"
    " enqueued_ms INTEGER NOT NULL,"
    " last_error TEXT,"
    " content_type TEXT NOT NULL,"
    " payload BLOB NOT NULL);"
    "CREATE INDEX IF NOT EXISTS queue_destination ON queue(destination, id);"
    "CREATE INDEX IF NOT EXISTS queue_message ON queue(message_id);"
    "CREATE TABLE IF NOT EXISTS deliveries("
    " id INTEGER PRIMARY KEY,"
    " queue_id INTEGER NOT NULL,"
    " message_id INTEGER NOT NULL,"
    " destination TEXT NOT NULL,"
    " attempt INTEGER NOT NULL,"
    " at_ms INTEGER NOT NULL,"
    " outcome TEXT NOT NULL," /* delivered, retry, dead, dropped, requeued */
    " detail TEXT,"
    " response BLOB);"
    "CREATE INDEX IF NOT EXISTS deliveries_message ON deliveries(message_id);"
    /* what each delivered queue row carried (store.keep_sent) */
    "CREATE TABLE IF NOT EXISTS sent(queue_id INTEGER PRIMARY KEY, message_id INTEGER NOT NULL,"
    " destination TEXT NOT NULL, at_ms INTEGER NOT NULL, content_type TEXT NOT NULL,"
    " payload BLOB NOT NULL);"
    "CREATE INDEX IF NOT EXISTS sent_message ON sent(message_id);"
    "CREATE TABLE IF NOT EXISTS instances("
    " sop_instance_uid TEXT PRIMARY KEY,"
    " study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL,"
    " channel TEXT NOT NULL, calling_ae TEXT, peer TEXT,"
    " path TEXT NOT NULL, size INTEGER NOT NULL,"
    " patient_id TEXT, accession TEXT, modality TEXT, body_part TEXT, description TEXT,"
    " study_date TEXT, study_time TEXT, series_number TEXT, instance_number TEXT,"
    " received_ms INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);"
    "CREATE TABLE IF NOT EXISTS studies("
    " study_uid TEXT PRIMARY KEY,"
    " channel TEXT NOT NULL,"
    " patient_id TEXT, accession TEXT, modality TEXT, body_part TEXT, description TEXT,"
    " study_date TEXT, study_time TEXT,"
    " instances INTEGER NOT NULL,"
    " first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL,"
    " state TEXT NOT NULL," /* arriving, stable */
    " stable_ms INTEGER,"
    " routed_ms INTEGER,"  /* when its study event was journaled; NULL = not yet */
    " message_id INTEGER," /* that event */
    " order_id INTEGER,"   /* the matched order; NULL = none */
    " match_method TEXT) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS studies_state ON studies(state, last_ms);"
    "CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession);"
    "CREATE TABLE IF NOT EXISTS orders("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " channel TEXT NOT NULL,"
    " accession TEXT, placer TEXT, filler TEXT, mrn TEXT, study_uid TEXT, modality TEXT,"
    " priority TEXT, order_control TEXT,"
    " status TEXT NOT NULL," /* active, cancelled */
    " ordered_at TEXT,"
    " ordered_ms INTEGER NOT NULL," /* ordered_at read as if UTC: compares with study times */
    " created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,"
    " record TEXT NOT NULL);"
    "CREATE UNIQUE INDEX IF NOT EXISTS orders_accession ON orders(accession)"
    " WHERE accession IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS orders_placer ON orders(placer) WHERE placer IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS orders_study ON orders(study_uid) WHERE study_uid IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS orders_patient ON orders(mrn, modality, ordered_ms);"
    "CREATE TABLE IF NOT EXISTS queue_ops("
    " id INTEGER PRIMARY KEY,"
    " op TEXT NOT NULL," /* retry, retry_dead, drop, replay */
    " destination TEXT NOT NULL,"
    " queue_id INTEGER NOT NULL DEFAULT 0,"
    " message_id INTEGER NOT NULL DEFAULT 0,"
    " at_ms INTEGER NOT NULL);"
    "PRAGMA user_version=3;";

/* Columns added to tables of an older store (ALTER TABLE ADD COLUMN runs
 * when the column is missing). */
static const char *const migrations[][2] = {{"studies", "routed_ms INTEGER"},
                                            {"studies", "message_id INTEGER"},
                                            {"studies", "order_id INTEGER"},
                                            {"studies", "match_method TEXT"}};

/* A queue table of an early store has plain rowids, which SQLite gives out
 * again once the newest row is gone (delivered): a queue row id must never
 * come back (it names deliveries, and AI jobs are "AJ-<id>"). The table is
 * rebuilt with AUTOINCREMENT, its sequence past every id ever used. */
static int migrate_queue_ids(sqlite3 *db) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'queue'",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bool old = sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0) &&
             !strstr((const char *)sqlite3_column_text(st, 0), "AUTOINCREMENT");
  sqlite3_finalize(st);
  if (!old)
    return 0;
  static const char sql[] =
      "BEGIN IMMEDIATE;"
      "CREATE TABLE queue_v2(id INTEGER PRIMARY KEY AUTOINCREMENT,"
      " message_id INTEGER NOT NULL, destination TEXT NOT NULL, key TEXT NOT NULL,"
      " lane INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,"
      " not_before_ms INTEGER NOT NULL, enqueued_ms INTEGER NOT NULL, last_error TEXT,"
      " content_type TEXT NOT NULL, payload BLOB NOT NULL);"
      "INSERT INTO queue_v2(id, message_id, destination, key, lane, state, attempts,"
      " not_before_ms, enqueued_ms, last_error, content_type, payload)"
      " SELECT id, message_id, destination, key, lane, state, attempts, not_before_ms,"
      " enqueued_ms, last_error, content_type, payload FROM queue;"
      "DROP TABLE queue;"
      "ALTER TABLE queue_v2 RENAME TO queue;"
      "CREATE INDEX IF NOT EXISTS queue_destination ON queue(destination, id);"
      "CREATE INDEX IF NOT EXISTS queue_message ON queue(message_id);"
      "DELETE FROM sqlite_sequence WHERE name = 'queue';"
      "INSERT INTO sqlite_sequence(name, seq) SELECT 'queue', max("
      " coalesce((SELECT max(id) FROM queue), 0),"
      " coalesce((SELECT max(queue_id) FROM deliveries), 0));"
      "COMMIT;";
  if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK) {
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return RR_EIO;
  }
  /* past the AI jobs' ids too, when there are any */
  if (sqlite3_exec(db,
                   "UPDATE sqlite_sequence SET seq = max(seq, coalesce((SELECT"
                   " max(queue_id) FROM ai_jobs), 0)) WHERE name = 'queue'",
                   NULL, NULL, NULL) != SQLITE_OK) {
    /* no ai_jobs table (yet): nothing named by a queue row there */
  }
  rr_log(RR_LOG_WARN, "journal",
         "event=store_upgraded table=queue detail=\"row ids never reused from now on\"");
  return 0;
}

static int migrate(sqlite3 *db) {
  if (migrate_queue_ids(db) != 0)
    return RR_EIO;
  for (size_t i = 0; i < sizeof migrations / sizeof migrations[0]; i++) {
    char sql[256], col[64];
    sscanf(migrations[i][1], "%63s", col);
    snprintf(sql, sizeof sql, "SELECT 1 FROM pragma_table_info('%s') WHERE name = '%s'",
             migrations[i][0], col);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
      return RR_EIO;
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_ROW)
      continue;
    if (rc != SQLITE_DONE)
      return RR_EIO;
    snprintf(sql, sizeof sql, "ALTER TABLE %s ADD COLUMN %s", migrations[i][0], migrations[i][1]);
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK)
      return RR_EIO;
  }
  return 0;
}

static int fail(sqlite3 *db, const char *what, char **errmsg) {
  if (errmsg && !*errmsg) {
    const char *m = db ? sqlite3_errmsg(db) : "out of memory";
    size_t n = strlen(what) + strlen(m) + 4;
    *errmsg = malloc(n);
    if (*errmsg)
      snprintf(*errmsg, n, "%s: %s", what, m);
  }
  return RR_EIO;
}

static int prepare(sqlite3 *db, const char *sql, sqlite3_stmt **st, char **errmsg) {
  if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL) != SQLITE_OK)
    return fail(db, sql, errmsg);
  return 0;
}

/* ---- sender + control id fingerprints ------------------------------------ */

static uint64_t fp_mix(uint64_t h, const char *s) {
  /* FNV-1a over the string and its terminator (NULL as ""). */
  if (!s)
    s = "";
  for (;; s++) {
    h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    if (!*s)
      return h;
  }
}

static uint64_t fp_hash(const char *channel, const char *app, const char *fac, const char *ctl) {
  uint64_t h = fp_mix(fp_mix(fp_mix(fp_mix(0xcbf29ce484222325ull, channel), app), fac), ctl);
  h ^= h >> 29; /* spread the low bits, which pick the slot */
  h *= 0xbf58476d1ce4e5b9ull;
  return h ^ (h >> 32);
}

/* The set keeps 32-bit tags only, each in the slot its own bits choose:
 * two different senders or ids share a tag about once in 4 billion, and
 * then the store is read (a false "maybe", never a false "no"). */
static uint32_t fp_tag(uint64_t h) {
  uint32_t t = (uint32_t)(h >> 32) ^ (uint32_t)h;
  return t ? t : 1; /* 0 marks an empty slot */
}

static size_t fp_home(uint32_t t, size_t cap) {
  return (size_t)(((uint64_t)t * 0x9e3779b97f4a7c15ull) >> 24) & (cap - 1);
}

static bool fp_has(const rr_journal_t *j, uint32_t t) {
  if (!j->fp_cap)
    return false;
  for (size_t i = fp_home(t, j->fp_cap);; i = (i + 1) & (j->fp_cap - 1)) {
    if (j->fp[i] == t)
      return true;
    if (j->fp[i] == 0)
      return false;
  }
}

static int fp_add(rr_journal_t *j, uint32_t t) {
  if ((j->fp_n + 1) * 2 > j->fp_cap) { /* load factor at most 1/2 */
    size_t cap = j->fp_cap ? j->fp_cap * 2 : 4096;
    uint32_t *v = calloc(cap, sizeof *v);
    if (!v)
      return RR_ENOMEM;
    for (size_t i = 0; i < j->fp_cap; i++)
      if (j->fp[i]) {
        size_t k = fp_home(j->fp[i], cap);
        while (v[k] != 0)
          k = (k + 1) & (cap - 1);
        v[k] = j->fp[i];
      }
    free(j->fp);
    j->fp = v;
    j->fp_cap = cap;
  }
  size_t i = fp_home(t, j->fp_cap);
  while (j->fp[i] != 0) {
    if (j->fp[i] == t)
      return 0;
    i = (i + 1) & (j->fp_cap - 1);
  }
  j->fp[i] = t;
  j->fp_n++;
  return 0;
}

/* Fills the set from table dedupe (its key covers the columns; the tail is
 * empty at open). */
static int fp_load(rr_journal_t *j, char **errmsg) {
  sqlite3_stmt *st = NULL;
  int rc = prepare(j->rdb, "SELECT sending_app, sending_facility, control_id, channel FROM dedupe",
                   &st, errmsg);
  while (rc == 0) {
    int step = sqlite3_step(st);
    if (step == SQLITE_DONE)
      break;
    if (step != SQLITE_ROW) {
      rc = fail(j->rdb, "load control ids", errmsg);
      break;
    }
    rc = fp_add(j, fp_tag(fp_hash((const char *)sqlite3_column_text(st, 3),
                                  (const char *)sqlite3_column_text(st, 0),
                                  (const char *)sqlite3_column_text(st, 1),
                                  (const char *)sqlite3_column_text(st, 2))));
  }
  sqlite3_finalize(st);
  st = NULL;
  if (rc == 0)
    rc = prepare(j->rdb, "SELECT coalesce(max(id), 0) FROM messages", &st, errmsg);
  if (rc == 0 && sqlite3_step(st) == SQLITE_ROW)
    j->max_id = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return rc;
}

/* At open: the control ids of the messages after dedupe_merged.upto (the
 * tail when the process ended) go into table dedupe, in key order. The
 * first time, from a store that kept them in index messages_dedupe, that
 * is every message, and the index goes. */
static int dedupe_merge_all(sqlite3 *db) {
  if (sqlite3_exec(db,
                   "BEGIN IMMEDIATE;"
                   "INSERT OR IGNORE INTO dedupe SELECT control_id, coalesce(sending_app, ''),"
                   " coalesce(sending_facility, ''), channel, id FROM messages"
                   " WHERE id > (SELECT coalesce(max(upto), 0) FROM dedupe_merged)"
                   " AND control_id <> '' ORDER BY 1, 2, 3, 4, 5;"
                   "INSERT OR REPLACE INTO dedupe_merged VALUES(1, max("
                   "(SELECT coalesce(max(id), 0) FROM messages),"
                   " (SELECT coalesce(max(upto), 0) FROM dedupe_merged)));"
                   "DROP INDEX IF EXISTS messages_dedupe;"
                   "COMMIT",
                   NULL, NULL, NULL) != SQLITE_OK) {
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return RR_EIO;
  }
  return 0;
}

/* The frames a checkpoint is due at: SQLite's own default. */
#define CKPT_PAGES 1000

/* Worker thread, inside a COMMIT that wrote to the WAL. */
static int on_wal_commit(void *ud, sqlite3 *db, const char *name, int pages) {
  (void)db;
  (void)name;
  ((rr_journal_t *)ud)->wal_pages = pages;
  return SQLITE_OK;
}

static void on_committed(uv_async_t *a);

/* Work items running (a transaction, or an fdatasync after it). */
static bool jobs_running(const rr_journal_t *j) {
  for (int k = 0; k < JOBS_MAX; k++)
    if (j->jobs[k].running)
      return true;
  return false;
}

int rr_journal_open(uv_loop_t *loop, const char *path, rr_journal_sync_t sync, rr_journal_t **out,
                    char **errmsg) {
  rr_journal_t *j = calloc(1, sizeof *j);
  int rc = RR_ENOMEM;
  if (errmsg)
    *errmsg = NULL;
  if (!j)
    goto out;
  j->loop = loop;
  j->wal_fd = -1;
  j->gather_us = 0;
  uv_timer_init(loop, &j->gather);
  j->gather.data = j;
  uv_unref((uv_handle_t *)&j->gather);
  if (uv_async_init(loop, &j->committed, on_committed) != 0)
    goto out;
  j->committed.data = j;
  j->committed_open = true;
  uv_unref((uv_handle_t *)&j->committed);
  const int wflags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
  /* With synchronous=FULL every commit ends in a sync, so its WAL writes
   * can be handed to the kernel as one (store/wal_vfs.c). */
  const char *vfs =
      sync == RR_JOURNAL_SYNC_FULL && rr_wal_vfs_register() == 0 ? RR_WAL_VFS_NAME : NULL;
  if (sqlite3_open_v2(path, &j->wdb, wflags, vfs) != SQLITE_OK) {
    rc = fail(j->wdb, "open", errmsg);
    goto out;
  }
  static const char *const syncs[] = {"PRAGMA synchronous=FULL", "PRAGMA synchronous=NORMAL",
                                      "PRAGMA synchronous=OFF"};
  /* auto_vacuum takes effect in a new file only (before its first table):
   * pruned pages then go back to the file system. */
  const char *setup[] = {"PRAGMA busy_timeout=5000", "PRAGMA auto_vacuum=INCREMENTAL",
                         "PRAGMA journal_mode=WAL", syncs[sync], schema};
  for (size_t i = 0; i < sizeof setup / sizeof setup[0]; i++) {
    if (sqlite3_exec(j->wdb, setup[i], NULL, NULL, NULL) != SQLITE_OK) {
      rc = fail(j->wdb, setup[i], errmsg);
      goto out;
    }
  }
  if (migrate(j->wdb) != 0 || dedupe_merge_all(j->wdb) != 0 ||
      sqlite3_exec(j->wdb,
                   "CREATE INDEX IF NOT EXISTS studies_order ON studies(order_id)"
                   " WHERE order_id IS NOT NULL;"
                   "CREATE INDEX IF NOT EXISTS studies_unrouted ON studies(channel, stable_ms)"
                   " WHERE state = 'stable' AND routed_ms IS NULL",
                   NULL, NULL, NULL) != SQLITE_OK) {
    rc = fail(j->wdb, "schema upgrade", errmsg);
    goto out;
  }
  if (rr_audit_schema(j->wdb) != 0 || rr_audit_chain_load(j->wdb, &j->audit) != 0) {
    rc = fail(j->wdb, "audit trail", errmsg);
    goto out;
  }
  j->audit_open = true;
  sqlite3_wal_hook(j->wdb, on_wal_commit, j); /* replaces the automatic checkpoint */
  if (sqlite3_open_v2(path, &j->rdb, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL) !=
          SQLITE_OK ||
      sqlite3_exec(j->rdb, "PRAGMA busy_timeout=5000", NULL, NULL, NULL) != SQLITE_OK) {
    rc = fail(j->rdb, "open reader", errmsg);
    goto out;
  }
  /* Without it the writer checkpoints alone; with it, the checkpoint's
   * fsyncs are as the writer's (synchronous). */
  if (sqlite3_open_v2(path, &j->cdb, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) !=
          SQLITE_OK ||
      sqlite3_exec(j->cdb, syncs[sync], NULL, NULL, NULL) != SQLITE_OK) {
    rr_log(RR_LOG_WARN, "journal", "event=checkpointer_unavailable error=\"%s\"",
           j->cdb ? sqlite3_errmsg(j->cdb) : "out of memory");
    sqlite3_close(j->cdb);
    j->cdb = NULL;
  }
  if ((rc = prepare(j->wdb,
                    "INSERT INTO messages(channel, peer, received_ms, sending_app,"
                    " sending_facility, message_type, control_id, mrn, accession, study_uid,"
                    " status, error, raw, ack) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    &j->insert, errmsg)) ||
      (rc = prepare(j->wdb, "BEGIN IMMEDIATE", &j->begin, errmsg)) ||
      (rc = prepare(j->wdb, "COMMIT", &j->commit, errmsg)) ||
      (rc = prepare(j->wdb, "ROLLBACK", &j->rollback, errmsg)) ||
      (rc =
           prepare(j->rdb,
                   "SELECT m.id, length(m.raw), m.ack FROM dedupe d JOIN messages m"
                   " ON m.id = d.message_id WHERE d.control_id = ?1"
                   " AND d.sending_app = coalesce(?2, '') AND d.sending_facility = coalesce(?3, '')"
                   " AND d.channel = ?4 ORDER BY d.message_id LIMIT 1",
                   &j->find, errmsg)) ||
      (rc = prepare(j->rdb,
                    "SELECT id, length(raw), ack FROM messages WHERE id = ?1 AND control_id = ?2"
                    " AND coalesce(sending_app, '') = coalesce(?3, '')"
                    " AND coalesce(sending_facility, '') = coalesce(?4, '') AND channel = ?5",
                    &j->id_find, errmsg)) ||
      (rc = prepare(j->rdb, "SELECT raw FROM messages WHERE id = ?", &j->find_raw, errmsg)) ||
      (rc = prepare(j->rdb, "SELECT count(*) FROM messages", &j->count, errmsg)) ||
      (rc = prepare(j->wdb, "INSERT OR REPLACE INTO kv(key, value, updated_ms) VALUES(?,?,?)",
                    &j->kv_put, errmsg)) ||
      (rc = prepare(j->wdb, "DELETE FROM kv WHERE key = ?", &j->kv_del, errmsg)) ||
      (rc = prepare(j->rdb, "SELECT value FROM kv WHERE key = ?", &j->kv_get, errmsg)) ||
      (rc = prepare(j->wdb,
                    "INSERT INTO queue(message_id, destination, key, lane, state, attempts,"
                    " not_before_ms, enqueued_ms, content_type, payload)"
                    " VALUES(?,?,?,?,'pending',0,0,?,?,?)",
                    &j->q_insert, errmsg)) ||
      (rc = prepare(j->wdb,
                    "INSERT INTO deliveries(queue_id, message_id, destination, attempt, at_ms,"
                    " outcome, detail, response) VALUES(?,?,?,?,?,?,?,?)",
                    &j->q_history, errmsg)) ||
      (rc = prepare(j->wdb, "DELETE FROM queue WHERE id = ?", &j->q_delete, errmsg)) ||
      (rc = prepare(j->wdb,
                    "INSERT OR REPLACE INTO sent(queue_id, message_id, destination, at_ms,"
                    " content_type, payload) SELECT id, message_id, destination, ?2,"
                    " content_type, payload FROM queue WHERE id = ?1",
                    &j->q_keep_sent, errmsg)) ||
      (rc = prepare(j->wdb,
                    "UPDATE queue SET attempts = ?2, not_before_ms = ?3, last_error = ?4"
                    " WHERE id = ?1",
                    &j->q_retry, errmsg)) ||
      (rc = prepare(j->wdb,
                    "UPDATE queue SET state = 'dead', attempts = ?2, last_error = ?3"
                    " WHERE id = ?1",
                    &j->q_dead, errmsg)) ||
      (rc = prepare(j->wdb,
                    "UPDATE queue SET state = 'pending', attempts = 0, not_before_ms = 0"
                    " WHERE id = ?1",
                    &j->q_requeue, errmsg)) ||
      (rc = prepare(j->wdb,
                    "UPDATE queue SET state = 'pending', attempts = 0, not_before_ms = 0"
                    " WHERE destination = ? AND state = 'dead'",
                    &j->q_requeue_all, errmsg)) ||
      (rc = prepare(j->wdb, "DELETE FROM queue_ops WHERE id <= ?", &j->ops_delete, errmsg)) ||
      (rc = prepare(j->rdb,
                    "SELECT id, op, destination, queue_id, message_id FROM queue_ops ORDER BY id",
                    &j->ops_read, errmsg)) ||
      (rc = prepare(j->rdb, "SELECT channel, raw FROM messages WHERE id = ?", &j->msg_get,
                    errmsg)) ||
      (rc = prepare(j->rdb,
                    "SELECT id, message_id, key, lane, state = 'dead', attempts, not_before_ms,"
                    " enqueued_ms, content_type, CASE WHEN ?4 AND state = 'pending' THEN payload"
                    " END FROM queue WHERE destination = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                    &j->q_load, errmsg)) ||
      (rc = prepare(j->rdb, "SELECT content_type, payload, message_id FROM queue WHERE id = ?",
                    &j->q_payload, errmsg)) ||
      (rc = prepare(j->rdb,
                    "SELECT destination, sum(state = 'pending'), sum(state = 'dead'),"
                    " min(enqueued_ms) FROM queue GROUP BY destination ORDER BY destination",
                    &j->q_depth, errmsg)) ||
      (rc = prepare(j->wdb,
                    "UPDATE studies SET routed_ms = ?2, message_id = ?3, order_id = ?4,"
                    " match_method = ?5 WHERE study_uid = ?1",
                    &j->study_routed, errmsg)) ||
      (rc = prepare(j->wdb,
                    "SELECT id FROM orders WHERE accession = ?1 UNION ALL"
                    " SELECT id FROM orders WHERE ?1 IS NULL AND placer = ?2 AND accession IS NULL"
                    " LIMIT 1",
                    &j->order_find, errmsg)) ||
      (rc = prepare(j->wdb,
                    "INSERT INTO orders(channel, accession, placer, filler, mrn, study_uid,"
                    " modality, priority, order_control, status, ordered_at, ordered_ms,"
                    " created_ms, updated_ms, record)"
                    " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?13,?14)",
                    &j->order_insert, errmsg)) ||
      (rc = prepare(j->wdb,
                    "UPDATE orders SET channel = ?1, accession = coalesce(?2, accession),"
                    " placer = coalesce(?3, placer), filler = coalesce(?4, filler),"
                    " mrn = coalesce(?5, mrn), study_uid = coalesce(?6, study_uid),"
                    " modality = coalesce(?7, modality), priority = coalesce(?8, priority),"
                    " order_control = ?9, status = ?10, ordered_at = coalesce(?11, ordered_at),"
                    " ordered_ms = CASE WHEN ?11 IS NULL THEN ordered_ms ELSE ?12 END,"
                    " updated_ms = ?13, record = ?14 WHERE id = ?15",
                    &j->order_update, errmsg)) ||
      (rc = prepare(j->wdb,
                    "UPDATE orders SET status = 'cancelled', order_control = ?2, updated_ms = ?3"
                    " WHERE id = ?1",
                    &j->order_cancel, errmsg)) ||
      (rc = fp_load(j, errmsg)))
    goto out;
  /* The WAL is open now (the schema was written through it). */
  if (vfs)
    j->wal_fd = rr_wal_vfs_wal_fd(j->wdb);
  *out = j;
  return 0;
out:
  rr_journal_close(j);
  return rc;
}

/* An inbound message (a row of table messages), not another kind of write. */
static bool is_message(const pending_t *p) {
  return !p->barrier && !p->kv && !p->delivery && !p->replay && !p->ops_upto && !p->prune_before &&
         !p->instance && !p->stable_before && !p->order && !p->custom && !p->audit;
}

static void free_batch(batch_t *b) {
  for (size_t i = 0; i < b->n; i++) {
    free(b->v[i].blob);
    free(b->v[i].routes);
    if (b->v[i].custom_free)
      b->v[i].custom_free(b->v[i].custom_data);
    for (size_t k = 0; k < b->v[i].nstable; k++)
      free(b->v[i].stable_uids[k]);
    free(b->v[i].stable_uids);
  }
  free(b->v);
  memset(b, 0, sizeof *b);
}

static void report(rr_journal_t *j, batch_t *b, int status) {
  for (size_t i = 0; i < b->n; i++) {
    pending_t *p = &b->v[i];
    for (size_t r = 0; status == 0 && j && j->enqueue_cb && r < p->e.nroutes; r++) {
      const rr_journal_route_t *rt = &p->routes[r];
      rr_journal_qitem_t q = {.id = p->qids[r],
                              .message_id = p->id,
                              .destination = rt->destination,
                              .key = rt->key ? rt->key : "",
                              .lane = rt->lane,
                              .enqueued_ms = p->e.received_ms,
                              .content_type =
                                  rt->content_type && strcmp(rt->content_type, "json") == 0 ? "json"
                                                                                            : "hl7",
                              .payload = rt->payload,
                              .len = rt->len};
      j->enqueue_cb(j->enqueue_ud, &q);
    }
    if (p->stable_cb)
      p->stable_cb(p->ud, status, (const char *const *)p->stable_uids, status ? 0 : p->nstable);
    if (p->cb)
      p->cb(p->ud, status, status || p->barrier ? 0 : p->id);
  }
}

void rr_journal_close(rr_journal_t *j) {
  if (!j)
    return;
  /* the checkpointer's connection closes below; committed batches are
   * answered once durable */
  while (j->loop && (j->bg_running || jobs_running(j) || j->ndone))
    uv_run(j->loop, UV_RUN_ONCE);
  if (j->loop && !uv_is_closing((uv_handle_t *)&j->gather)) {
    uv_close((uv_handle_t *)&j->gather, NULL);
    if (j->committed_open)
      uv_close((uv_handle_t *)&j->committed, NULL);
    uv_run(j->loop, UV_RUN_NOWAIT); /* lets libuv finish closing them */
  }
  batch_t q = j->queue;
  memset(&j->queue, 0, sizeof j->queue);
  report(NULL, &q, RR_EIO);
  free_batch(&q);
  sqlite3_stmt *sts[] = {
      j->insert,        j->begin,        j->commit,       j->rollback,     j->find,
      j->find_raw,      j->count,        j->kv_put,       j->kv_del,       j->kv_get,
      j->q_insert,      j->q_history,    j->q_keep_sent,  j->q_delete,     j->q_retry,
      j->q_dead,        j->q_requeue,    j->q_load,       j->q_payload,    j->q_depth,
      j->q_requeue_all, j->ops_delete,   j->ops_read,     j->msg_get,      j->study_routed,
      j->order_find,    j->order_insert, j->order_update, j->order_cancel, j->id_find};
  for (size_t i = 0; i < sizeof sts / sizeof sts[0]; i++)
    sqlite3_finalize(sts[i]);
  if (j->audit_open)
    rr_audit_chain_close(&j->audit);
  for (size_t i = 0; i < READER_STMTS; i++) {
    sqlite3_finalize(j->rstmt[i].st);
    free(j->rstmt[i].sql);
  }
  sqlite3_close(j->rdb);
  sqlite3_close(j->cdb);
  sqlite3_close(j->wdb);
  if (j->wal_fd >= 0)
    close(j->wal_fd);
  free(j->prev_sources);
  for (size_t i = 0; i < j->ntail; i++)
    free(j->tail[i].keys);
  free(j->tail);
  free(j->fp);
  free(j);
}

size_t rr_journal_pending(const rr_journal_t *j) {
  return j->queue.n;
}

bool rr_journal_idle(const rr_journal_t *j) {
  return !j->busy && j->queue.n == 0 && !j->bg_running && !j->ndone && !jobs_running(j);
}

void rr_journal_set_idle_cb(rr_journal_t *j, void (*cb)(void *ud), void *ud) {
  j->idle_cb = cb;
  j->idle_ud = ud;
}

static pending_t *slot(batch_t *b) {
  if (rr_array_grow((void **)&b->v, &b->cap, b->n + 1, sizeof *b->v, 64))
    return NULL;
  pending_t *p = &b->v[b->n];
  memset(p, 0, sizeof *p);
  return p;
}

/* Copies a string into the blob at *w; NULL stays NULL. */
static const char *put_str(char **w, const char *s) {
  if (!s)
    return NULL;
  size_t n = strlen(s) + 1;
  memcpy(*w, s, n);
  const char *r = *w;
  *w += n;
  return r;
}

/* Copies the routes (array, ids, strings, payloads) into one allocation. */
static int copy_routes(pending_t *p, const rr_journal_route_t *routes, size_t n) {
  size_t need = n * (sizeof *p->routes + sizeof *p->qids);
  for (size_t i = 0; i < n; i++) {
    const rr_journal_route_t *r = &routes[i];
    need += strlen(r->destination) + 1 + (r->key ? strlen(r->key) + 1 : 0) +
            (r->content_type ? strlen(r->content_type) + 1 : 0) + r->len + 1;
  }
  char *mem = malloc(need);
  if (!mem)
    return RR_ENOMEM;
  p->routes = (rr_journal_route_t *)(void *)mem;
  p->qids = (int64_t *)(void *)(mem + n * sizeof *p->routes);
  char *w = mem + n * (sizeof *p->routes + sizeof *p->qids);
  for (size_t i = 0; i < n; i++) {
    rr_journal_route_t *r = &p->routes[i];
    *r = routes[i];
    r->destination = put_str(&w, routes[i].destination);
    r->key = put_str(&w, routes[i].key);
    r->content_type = put_str(&w, routes[i].content_type);
    if (routes[i].len)
      memcpy(w, routes[i].payload, routes[i].len);
    r->payload = w;
    w += routes[i].len;
    p->qids[i] = 0;
  }
  p->e.routes = p->routes;
  return 0;
}

static int add_entry(rr_journal_t *j, const rr_journal_entry_t *e, rr_journal_done_cb cb, void *ud,
                     bool kv) {
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  if (e->nroutes && copy_routes(p, e->routes, e->nroutes))
    return RR_ENOMEM;
  if (!kv && e->control_id && *e->control_id &&
      fp_add(j, fp_tag(fp_hash(e->channel, e->sending_app, e->sending_facility, e->control_id))))
    return RR_ENOMEM;
  const char *strs[] = {e->channel,      e->peer,       e->sending_app, e->sending_facility,
                        e->message_type, e->control_id, e->mrn,         e->accession,
                        e->study_uid,    e->status,     e->error,       e->routed_study,
                        e->match_method};
  size_t need = e->raw_len + e->ack_len + 1;
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    need += strs[i] ? strlen(strs[i]) + 1 : 0;
  char *blob = malloc(need);
  if (!blob) {
    free(p->routes);
    return RR_ENOMEM;
  }
  char *w = blob;
  rr_journal_route_t *routes = p->routes;
  p->e = *e;
  p->e.routes = routes;
  p->e.channel = put_str(&w, e->channel);
  p->e.peer = put_str(&w, e->peer);
  p->e.sending_app = put_str(&w, e->sending_app);
  p->e.sending_facility = put_str(&w, e->sending_facility);
  p->e.message_type = put_str(&w, e->message_type);
  p->e.control_id = put_str(&w, e->control_id);
  p->e.mrn = put_str(&w, e->mrn);
  p->e.accession = put_str(&w, e->accession);
  p->e.study_uid = put_str(&w, e->study_uid);
  p->e.status = put_str(&w, e->status);
  p->e.error = put_str(&w, e->error);
  p->e.routed_study = put_str(&w, e->routed_study);
  p->e.match_method = put_str(&w, e->match_method);
  if (e->raw_len)
    memcpy(w, e->raw, e->raw_len);
  p->e.raw = w;
  w += e->raw_len;
  if (e->ack_len)
    memcpy(w, e->ack, e->ack_len);
  p->e.ack = e->ack ? w : NULL;
  p->blob = blob;
  p->cb = cb;
  p->ud = ud;
  p->kv = kv;
  j->queue.n++;
  j->queued_entries += !kv; /* group commit does not wait for key-value writes */
  return 0;
}

int rr_journal_add(rr_journal_t *j, const rr_journal_entry_t *e, rr_journal_done_cb cb, void *ud) {
  return add_entry(j, e, cb, ud, false);
}

void rr_journal_set_keep_sent(rr_journal_t *j, bool keep) {
  j->keep_sent = keep;
}

void rr_journal_set_gather(rr_journal_t *j, unsigned usec) {
  j->gather_us = usec;
}

int rr_journal_add_barrier(rr_journal_t *j, rr_journal_done_cb cb, void *ud) {
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  p->barrier = true;
  p->cb = cb;
  p->ud = ud;
  j->queue.n++;
  return 0;
}

/* ---- worker side -------------------------------------------------------- */

static int bind_text(sqlite3_stmt *st, int i, const char *s) {
  return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC) : sqlite3_bind_null(st, i);
}

static int insert_routes(rr_journal_t *j, pending_t *p);

static int insert_one(rr_journal_t *j, pending_t *p) {
  sqlite3_stmt *st = j->insert;
  const rr_journal_entry_t *e = &p->e;
  bind_text(st, 1, e->channel);
  bind_text(st, 2, e->peer);
  sqlite3_bind_int64(st, 3, e->received_ms);
  bind_text(st, 4, e->sending_app);
  bind_text(st, 5, e->sending_facility);
  bind_text(st, 6, e->message_type);
  bind_text(st, 7, e->control_id);
  bind_text(st, 8, e->mrn);
  bind_text(st, 9, e->accession);
  bind_text(st, 10, e->study_uid);
  bind_text(st, 11, e->status ? e->status : "accepted");
  bind_text(st, 12, e->error);
  sqlite3_bind_blob64(st, 13, e->raw, e->raw_len, SQLITE_STATIC);
  if (e->ack)
    sqlite3_bind_blob64(st, 14, e->ack, e->ack_len, SQLITE_STATIC);
  else
    sqlite3_bind_null(st, 14);
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  if (rc != SQLITE_DONE)
    return RR_EIO;
  p->id = sqlite3_last_insert_rowid(j->wdb);
  if (e->routed_study) {
    st = j->study_routed;
    bind_text(st, 1, e->routed_study);
    sqlite3_bind_int64(st, 2, e->received_ms);
    sqlite3_bind_int64(st, 3, p->id);
    if (e->order_id > 0)
      sqlite3_bind_int64(st, 4, e->order_id);
    else
      sqlite3_bind_null(st, 4);
    bind_text(st, 5, e->match_method ? e->match_method : "none");
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE)
      return RR_EIO;
  }
  return insert_routes(j, p);
}

/* The entry's routes as queue rows of message p->id. */
static int insert_routes(rr_journal_t *j, pending_t *p) {
  const rr_journal_entry_t *e = &p->e;
  sqlite3_stmt *st;
  int rc;
  for (size_t i = 0; i < e->nroutes; i++) {
    const rr_journal_route_t *r = &p->routes[i];
    st = j->q_insert;
    sqlite3_bind_int64(st, 1, p->id);
    bind_text(st, 2, r->destination);
    bind_text(st, 3, r->key ? r->key : "");
    sqlite3_bind_int(st, 4, r->lane);
    sqlite3_bind_int64(st, 5, e->received_ms);
    bind_text(st, 6, r->content_type ? r->content_type : "hl7");
    sqlite3_bind_blob64(st, 7, r->len ? r->payload : "", r->len, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE)
      return RR_EIO;
    p->qids[i] = sqlite3_last_insert_rowid(j->wdb);
  }
  return 0;
}

static const char *const outcome_names[] = {"delivered", "retry", "dead", "dropped", "requeued"};

/* An attempt's outcome: its history row, and the queue row's new state. */
static int delivery_write(rr_journal_t *j, pending_t *p) {
  const rr_journal_delivery_t *d = &p->d;
  sqlite3_stmt *st = j->q_history;
  sqlite3_bind_int64(st, 1, d->queue_id);
  sqlite3_bind_int64(st, 2, d->message_id);
  bind_text(st, 3, d->destination);
  sqlite3_bind_int64(st, 4, d->attempts);
  sqlite3_bind_int64(st, 5, d->at_ms);
  bind_text(st, 6, outcome_names[d->outcome]);
  bind_text(st, 7, d->detail);
  if (d->response)
    sqlite3_bind_blob64(st, 8, d->response, d->response_len, SQLITE_STATIC);
  else
    sqlite3_bind_null(st, 8);
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  if (rc != SQLITE_DONE)
    return RR_EIO;
  if (d->outcome == RR_JOURNAL_DELIVERED && j->keep_sent) {
    /* what was sent stays readable after its queue row goes */
    sqlite3_bind_int64(j->q_keep_sent, 1, d->queue_id);
    sqlite3_bind_int64(j->q_keep_sent, 2, d->at_ms);
    rc = sqlite3_step(j->q_keep_sent);
    sqlite3_reset(j->q_keep_sent);
    if (rc != SQLITE_DONE)
      return RR_EIO;
  }
  switch (d->outcome) {
  case RR_JOURNAL_DELIVERED:
  case RR_JOURNAL_DROPPED: st = j->q_delete; break;
  case RR_JOURNAL_RETRY:
    st = j->q_retry;
    sqlite3_bind_int64(st, 2, d->attempts);
    sqlite3_bind_int64(st, 3, d->not_before_ms);
    bind_text(st, 4, d->detail);
    break;
  case RR_JOURNAL_DEAD:
    st = j->q_dead;
    sqlite3_bind_int64(st, 2, d->attempts);
    bind_text(st, 3, d->detail);
    break;
  default:
    st = j->q_requeue;
    if (d->queue_id == 0) { /* every dead row of the destination */
      st = j->q_requeue_all;
      bind_text(st, 1, d->destination);
      rc = sqlite3_step(st);
      sqlite3_reset(st);
      sqlite3_clear_bindings(st);
      return rc == SQLITE_DONE ? 0 : RR_EIO;
    }
    break;
  }
  sqlite3_bind_int64(st, 1, d->queue_id);
  rc = sqlite3_step(st);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

static int kv_write(rr_journal_t *j, const pending_t *p) {
  sqlite3_stmt *st = p->kv_delete ? j->kv_del : j->kv_put;
  bind_text(st, 1, p->e.control_id);
  if (!p->kv_delete) {
    sqlite3_bind_blob64(st, 2, p->e.raw, p->e.raw_len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, p->e.received_ms);
  }
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

static int step_once(sqlite3_stmt *st) {
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

static int replay_write(rr_journal_t *j, pending_t *p) {
  p->id = p->replay_of;
  return insert_routes(j, p);
}

static int prune_write(rr_journal_t *j, pending_t *p) {
  static const char *const sql[] = {
      "DELETE FROM dedupe WHERE (control_id, sending_app, sending_facility, channel, message_id)"
      " IN (SELECT control_id, coalesce(sending_app, ''), coalesce(sending_facility, ''),"
      " channel, id FROM messages WHERE received_ms < ?1 AND status <> 'error'"
      " AND id NOT IN (SELECT message_id FROM queue) ORDER BY id LIMIT ?2)",
      "DELETE FROM sent WHERE message_id IN (SELECT id FROM messages"
      " WHERE received_ms < ?1 AND status <> 'error'"
      " AND id NOT IN (SELECT message_id FROM queue) ORDER BY id LIMIT ?2)",
      "DELETE FROM deliveries WHERE message_id IN (SELECT id FROM messages"
      " WHERE received_ms < ?1 AND status <> 'error'"
      " AND id NOT IN (SELECT message_id FROM queue) ORDER BY id LIMIT ?2)",
      "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
      " WHERE received_ms < ?1 AND status <> 'error'"
      " AND id NOT IN (SELECT message_id FROM queue) ORDER BY id LIMIT ?2)"};
  for (size_t i = 0; i < sizeof sql / sizeof sql[0]; i++) {
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(j->wdb, sql[i], -1, &st, NULL) != SQLITE_OK)
      return RR_EIO;
    sqlite3_bind_int64(st, 1, p->prune_before);
    sqlite3_bind_int64(st, 2, p->prune_limit);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
      return RR_EIO;
  }
  p->id = sqlite3_changes(j->wdb);
  if (p->id > 0 && sqlite3_exec(j->wdb, "PRAGMA incremental_vacuum", NULL, NULL, NULL) != SQLITE_OK)
    return RR_EIO;
  return 0;
}

static int instance_write(rr_journal_t *j, pending_t *p) {
  static const char *const sql[] = {
      "INSERT INTO instances(sop_instance_uid, study_uid, series_uid, sop_class_uid, channel,"
      " calling_ae, peer, path, size, patient_id, accession, modality, body_part, description,"
      " study_date, study_time, series_number, instance_number, received_ms)"
      " VALUES(?3,?4,?5,?6,?1,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?2)"
      " ON CONFLICT(sop_instance_uid) DO UPDATE SET path = excluded.path, size = excluded.size,"
      " received_ms = excluded.received_ms",
      "INSERT INTO studies(study_uid, channel, patient_id, accession, modality, body_part,"
      " description, study_date, study_time, instances, first_ms, last_ms, state)"
      " VALUES(?4, ?1, ?11, ?12, ?13, ?14, ?15, ?16, ?17, 1, ?2, ?2, 'arriving')"
      " ON CONFLICT(study_uid) DO UPDATE SET last_ms = excluded.last_ms,"
      " instances = (SELECT count(*) FROM instances WHERE study_uid = excluded.study_uid),"
      " routed_ms = CASE WHEN ?20 AND state = 'stable' THEN NULL ELSE routed_ms END,"
      " state = CASE WHEN ?20 THEN 'arriving' ELSE state END"};
  const rr_journal_instance_t *in = p->instance;
  const char *text[] = {in->channel,
                        NULL,
                        in->sop_instance_uid,
                        in->study_uid,
                        in->series_uid,
                        in->sop_class_uid,
                        in->calling_ae,
                        in->peer,
                        in->path,
                        NULL,
                        in->patient_id,
                        in->accession,
                        in->modality,
                        in->body_part,
                        in->description,
                        in->study_date,
                        in->study_time,
                        in->series_number,
                        in->instance_number};
  for (int k = 0; k < 2; k++) {
    sqlite3_stmt *st;
    if (sqlite3_prepare_v3(j->wdb, sql[k], -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK)
      return RR_EIO;
    int np = sqlite3_bind_parameter_count(st);
    for (int i = 1; i <= np && i <= 20; i++) {
      if (i == 20)
        sqlite3_bind_int(st, i, in->reopen);
      else if (i == 2)
        sqlite3_bind_int64(st, i, in->received_ms);
      else if (i == 10)
        sqlite3_bind_int64(st, i, (sqlite3_int64)in->size);
      else
        bind_text(st, i, text[i - 1] && *text[i - 1] ? text[i - 1] : NULL);
    }
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
      return RR_EIO;
  }
  return 0;
}

static int stable_write(rr_journal_t *j, pending_t *p) {
  sqlite3_stmt *st;
  const char *sql = p->e.study_uid
                        ? "UPDATE studies SET state = 'stable', stable_ms = ?3 WHERE study_uid = ?1"
                          " AND state = 'arriving' RETURNING study_uid"
                        : "UPDATE studies SET state = 'stable', stable_ms = ?3 WHERE channel = ?1"
                          " AND state = 'arriving' AND last_ms < ?2 RETURNING study_uid";
  if (sqlite3_prepare_v3(j->wdb, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, p->e.study_uid ? p->e.study_uid : p->e.channel);
  if (!p->e.study_uid)
    sqlite3_bind_int64(st, 2, p->stable_before);
  sqlite3_bind_int64(st, 3, p->e.received_ms);
  int rc, result = 0;
  size_t cap = 0;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    if (p->nstable == cap) {
      size_t nc = cap ? cap * 2 : 16;
      char **v = realloc(p->stable_uids, nc * sizeof *v);
      if (!v) {
        result = RR_ENOMEM;
        break;
      }
      p->stable_uids = v;
      cap = nc;
    }
    char *u = strdup((const char *)sqlite3_column_text(st, 0));
    if (!u) {
      result = RR_ENOMEM;
      break;
    }
    p->stable_uids[p->nstable++] = u;
  }
  if (result == 0 && rc != SQLITE_DONE)
    result = RR_EIO;
  sqlite3_finalize(st);
  return result;
}

static bool is_cancel(const char *control);

/* An order: inserted, replaced, or (a cancel) its status changed. */
static int order_write(rr_journal_t *j, pending_t *p) {
  const rr_journal_order_t *o = p->order;
  sqlite3_stmt *st = j->order_find;
  bind_text(st, 1, o->accession);
  bind_text(st, 2, o->placer);
  int rc = sqlite3_step(st);
  int64_t id = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE)
    return RR_EIO;
  bool cancel = is_cancel(o->order_control);
  if (id && cancel) {
    st = j->order_cancel;
    sqlite3_bind_int64(st, 1, id);
    bind_text(st, 2, o->order_control);
    sqlite3_bind_int64(st, 3, o->received_ms);
    return step_once(st);
  }
  st = id ? j->order_update : j->order_insert;
  const char *text[] = {
      o->channel,   o->accession, o->placer,   o->filler,        o->mrn,
      o->study_uid, o->modality,  o->priority, o->order_control, cancel ? "cancelled" : "active",
      o->ordered_at};
  for (int i = 0; i < 11; i++)
    bind_text(st, i + 1, text[i] && *text[i] ? text[i] : NULL);
  sqlite3_bind_int64(st, 12, p->order_ms);
  sqlite3_bind_int64(st, 13, o->received_ms);
  sqlite3_bind_text(st, 14, o->record, (int)o->record_len, SQLITE_STATIC);
  if (id)
    sqlite3_bind_int64(st, 15, id);
  rc = sqlite3_step(st);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

static int ops_delete(rr_journal_t *j, pending_t *p) {
  sqlite3_bind_int64(j->ops_delete, 1, p->ops_upto);
  return step_once(j->ops_delete);
}

/* Worker thread: writes the in-flight batch in one transaction. */
static void write_flight(rr_journal_t *j) {
  batch_t *b = &j->flight;
  uint64_t t0 = uv_hrtime();
  if (j->wal_fd >= 0)
    rr_wal_vfs_defer_sync(j->wdb, 1); /* the fdatasync follows outside the lock */
  int rc = step_once(j->begin);
  j->audit_tip = j->audit.head; /* appends advance this; kept only if the COMMIT is */
  for (size_t i = 0; rc == 0 && i < b->n; i++)
    if (b->v[i].kv)
      rc = kv_write(j, &b->v[i]);
    else if (b->v[i].replay)
      rc = replay_write(j, &b->v[i]);
    else if (b->v[i].ops_upto)
      rc = ops_delete(j, &b->v[i]);
    else if (b->v[i].prune_before)
      rc = prune_write(j, &b->v[i]);
    else if (b->v[i].instance)
      rc = instance_write(j, &b->v[i]);
    else if (b->v[i].order)
      rc = order_write(j, &b->v[i]);
    else if (b->v[i].custom)
      rc = b->v[i].custom(j->wdb, b->v[i].custom_data);
    else if (b->v[i].audit)
      rc =
          j->audit_open ? rr_audit_append(j->wdb, &j->audit, &j->audit_tip, b->v[i].audit) : RR_EIO;
    else if (b->v[i].stable_before)
      rc = stable_write(j, &b->v[i]);
    else if (b->v[i].delivery)
      rc = delivery_write(j, &b->v[i]);
    else if (!b->v[i].barrier)
      rc = insert_one(j, &b->v[i]);
  if (rc == 0)
    rc = step_once(j->commit);
  if (rc == 0 && j->audit_open)
    rr_audit_chain_commit(&j->audit, &j->audit_tip);
  if (rc) {
    snprintf(j->flight_err, sizeof j->flight_err, "%s", sqlite3_errmsg(j->wdb));
    if (!sqlite3_get_autocommit(j->wdb))
      step_once(j->rollback);
  }
  if (j->wal_fd >= 0)
    rr_wal_vfs_defer_sync(j->wdb, 0);
  j->flight_rc = rc;
  j->flight_us = (uv_hrtime() - t0) / 1000;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Who is likely to send again soon: the distinct senders of this batch and
 * the one before (with two groups alternating, both are needed). */
static void learn_sources(rr_journal_t *j, const batch_t *b) {
  size_t n = 0;
  for (size_t i = 0; i < b->n; i++)
    n += !b->v[i].barrier && b->v[i].e.source;
  size_t need = n + j->nprev;
  uint64_t *all = malloc((need ? need : 1) * sizeof *all);
  uint64_t *cur = malloc((n ? n : 1) * sizeof *cur);
  if (!all || !cur) {
    free(all);
    free(cur);
    return;
  }
  size_t k = 0;
  for (size_t i = 0; i < b->n; i++)
    if (!b->v[i].barrier && b->v[i].e.source)
      cur[k++] = b->v[i].e.source;
  if (n)
    memcpy(all, cur, n * sizeof *all);
  if (j->nprev)
    memcpy(all + n, j->prev_sources, j->nprev * sizeof *all);
  qsort(all, need, sizeof *all, cmp_u64);
  size_t distinct = 0;
  for (size_t i = 0; i < need; i++)
    distinct += i == 0 || all[i] != all[i - 1];
  j->expect = distinct;
  free(all);
  free(j->prev_sources);
  j->prev_sources = cur;
  j->nprev = n;
}

/* Answers one batch: statistics, then its callbacks in order. */
static void complete(rr_journal_t *j, batch_t b, int rc, uint64_t us) {
  size_t entries = 0;
  for (size_t i = 0; i < b.n; i++)
    entries += is_message(&b.v[i]);
  j->last_batch = entries;
  if (entries)
    learn_sources(j, &b);
  if (entries) {
    j->stats.commits++;
    j->stats.entries += entries;
    j->stats.commit_us_total += us;
    if (entries > j->stats.max_batch)
      j->stats.max_batch = entries;
    if (rc)
      j->stats.failed_commits++;
    rr_histo_observe(&j->stats.commit_latency, (double)us / 1e6);
  }
  j->stats.last_failed = rc != 0;
  report(j, &b, rc);
  free_batch(&b);
}

/* ---- duplicates: the control-id index ---------------------------------------
 * A resend is found by (control id, sender, facility, channel). Kept as an
 * index of table messages, every commit would write one of its leaf pages
 * per message: each sender's control ids grow in a part of the index of
 * their own, so a batch from sixteen senders touched some twelve leaves,
 * half of what a commit wrote to the WAL. Instead, the control ids of
 * committed messages wait in memory (the tail, in id order) and are merged
 * into table dedupe every DEDUPE_MERGE messages, sorted, in one write that
 * touches each sender's last leaves once; dedupe_merged.upto says how far
 * the table goes, and at open the messages after it are merged (what was
 * the tail when the process ended). A lookup reads table dedupe, then the
 * tail, then the batches not yet committed. */

#define DEDUPE_MERGE 512
#define DEDUPE_MERGE_MAX (4 * DEDUPE_MERGE) /* entries in one merge at most */

static char *tail_keys(const char *ctl, const char *app, const char *fac, const char *channel) {
  const char *part[4] = {ctl, app ? app : "", fac ? fac : "", channel ? channel : ""};
  size_t len[4], n = 0;
  for (int i = 0; i < 4; i++)
    n += (len[i] = strlen(part[i])) + 1;
  char *k = malloc(n), *w = k;
  if (!k)
    return NULL;
  for (int i = 0; i < 4; i++) {
    memcpy(w, part[i], len[i] + 1);
    w += len[i] + 1;
  }
  return k;
}

static int tail_add(rr_journal_t *j, int64_t id, const char *channel, const char *app,
                    const char *fac, const char *ctl) {
  if (rr_array_grow((void **)&j->tail, &j->tail_cap, j->ntail + 1, sizeof *j->tail, 256))
    return RR_ENOMEM;
  char *k = tail_keys(ctl, app, fac, channel);
  if (!k)
    return RR_ENOMEM;
  j->tail[j->ntail++] = (tail_ent_t){.id = id, .h = fp_hash(channel, app, fac, ctl), .keys = k};
  return 0;
}

/* Orders keys as table dedupe's primary key does (BINARY: bytes). */
static int keys_cmp(const char *a, const char *b) {
  for (int i = 0; i < 4; i++) {
    int c = strcmp(a, b);
    if (c)
      return c;
    a += strlen(a) + 1;
    b += strlen(b) + 1;
  }
  return 0;
}

static int tail_cmp(const void *x, const void *y) {
  const tail_ent_t *a = x, *b = y;
  int c = keys_cmp(a->keys, b->keys);
  return c ? c : (a->id > b->id) - (a->id < b->id);
}

typedef struct merge {
  rr_journal_t *j;
  int64_t upto;  /* every message up to this id is in v or has no control id */
  tail_ent_t *v; /* sorted copies; keys belong to the tail */
  size_t n;
  uint64_t us;
} merge_t;

/* Worker thread, inside a batch's transaction. A message pruned meanwhile
 * is left out. */
static int merge_write(sqlite3 *db, void *data) {
  merge_t *m = data;
  uint64_t t0 = uv_hrtime();
  sqlite3_stmt *ins = NULL, *upto = NULL;
  int rc = RR_EIO;
  if (sqlite3_prepare_v2(db,
                         "INSERT OR IGNORE INTO dedupe SELECT ?1, ?2, ?3, ?4, ?5"
                         " WHERE EXISTS (SELECT 1 FROM messages WHERE id = ?5)",
                         -1, &ins, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(db, "UPDATE dedupe_merged SET upto = ?1 WHERE upto < ?1", -1, &upto,
                         NULL) != SQLITE_OK)
    goto out;
  for (size_t i = 0; i < m->n; i++) {
    const char *k = m->v[i].keys;
    for (int c = 1; c <= 4; c++) {
      sqlite3_bind_text(ins, c, k, -1, SQLITE_STATIC);
      k += strlen(k) + 1;
    }
    sqlite3_bind_int64(ins, 5, m->v[i].id);
    int step = sqlite3_step(ins);
    sqlite3_reset(ins);
    if (step != SQLITE_DONE)
      goto out;
  }
  sqlite3_bind_int64(upto, 1, m->upto);
  rc = sqlite3_step(upto) == SQLITE_DONE ? 0 : RR_EIO;
out:
  sqlite3_finalize(ins);
  sqlite3_finalize(upto);
  m->us = (uv_hrtime() - t0) / 1000;
  return rc;
}

static void merge_free(void *data) {
  merge_t *m = data;
  free(m->v);
  free(m);
}

/* Loop thread: the merge's batch was answered; on success its ids leave
 * the tail (they are at its front, in id order). */
static void merge_done(void *ud, int status, int64_t id) {
  merge_t *m = ud;
  rr_journal_t *j = m->j;
  (void)id;
  j->merging = false;
  if (status) {
    rr_log(RR_LOG_WARN, "journal", "event=dedupe_merge_failed entries=%zu", m->n);
    return;
  }
  size_t k = 0;
  while (k < j->ntail && j->tail[k].id <= m->upto)
    free(j->tail[k++].keys);
  memmove(j->tail, j->tail + k, (j->ntail - k) * sizeof *j->tail);
  j->ntail -= k;
  j->stats.dedupe_merges++;
  j->stats.dedupe_merge_us_total += m->us;
}

/* Loop thread, after a commit: its messages' control ids join the tail; a
 * merge is queued once enough wait. */
static void tail_note(rr_journal_t *j, const batch_t *b) {
  for (size_t i = 0; i < b->n; i++) {
    const pending_t *p = &b->v[i];
    if (!is_message(p))
      continue;
    if (p->id > j->max_id)
      j->max_id = p->id;
    const rr_journal_entry_t *e = &p->e;
    if (e->control_id && *e->control_id &&
        tail_add(j, p->id, e->channel, e->sending_app, e->sending_facility, e->control_id) != 0)
      rr_log(RR_LOG_WARN, "journal", "event=dedupe_tail_full id=%lld", (long long)p->id);
  }
  if (j->merging || j->ntail < DEDUPE_MERGE)
    return;
  merge_t *m = calloc(1, sizeof *m);
  if (!m || !(m->v = malloc(j->ntail * sizeof *m->v))) {
    free(m);
    return;
  }
  m->j = j;
  m->n = j->ntail < DEDUPE_MERGE_MAX ? j->ntail : DEDUPE_MERGE_MAX;
  m->upto = m->n == j->ntail ? j->max_id : j->tail[m->n - 1].id;
  memcpy(m->v, j->tail, m->n * sizeof *m->v);
  qsort(m->v, m->n, sizeof *m->v, tail_cmp);
  if (rr_journal_custom(j, merge_write, m, merge_free, merge_done, m) == 0)
    j->merging = true;
}

/* ---- durability ---------------------------------------------------------------
 * With synchronous=FULL, SQLite would hold the write lock while its COMMIT
 * waits for fdatasync of the WAL, so the next batch could not start until
 * the disk answered. The journal's WAL shim instead writes the commit's
 * frames and leaves the wait to the journal (store/wal_vfs.c): the work
 * item that wrote a batch tells the loop its COMMIT ended, so the next batch
 * can be written, then runs an fdatasync of the WAL for it. A batch is
 * answered (ACKs, enqueue callbacks) only once that fdatasync returned, in
 * commit order; one that failed to commit waits for those before it. A
 * failed fdatasync fails the batches it covered (their senders get a
 * negative answer and send again; the rows, already visible to readers,
 * are then found as duplicates). What readers see before the sync is what
 * a crash could still take back: no callback runs on it before (a
 * dispatcher refilling its window from the store may deliver it early; its
 * sender, never acknowledged, would send it again). */

static void drain_done(rr_journal_t *j) {
  if (j->draining)
    return; /* an answer's callback committed more: the loop below takes it */
  j->draining = true;
  while (j->ndone && j->done[0].ready) {
    done_batch_t d = j->done[0];
    memmove(j->done, j->done + 1, --j->ndone * sizeof *j->done);
    complete(j, d.b, d.rc, d.us);
  }
  j->draining = false;
}

/* Loop thread: a committed batch (or one that needs no commit) joins the
 * answer queue (never full here: no commit starts while it is). */
static void push_done(rr_journal_t *j, batch_t b, int rc, uint64_t us, int sync) {
  j->done[j->ndone++] =
      (done_batch_t){.b = b, .rc = rc, .us = us, .ready = sync == 0, .sync = sync};
  drain_done(j);
}

/* ---- checkpoints ------------------------------------------------------------
 * SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL
 * past 1,000 pages, so that batch's answers would wait for it (copying
 * the pages to the database file and two fsyncs: milliseconds). The
 * journal's WAL hook replaces it. Once the WAL has 1,000 pages, a PASSIVE
 * checkpoint runs on a connection of its own in the thread pool while
 * commits go on; it copies what the WAL held when it started. The writer
 * then, between two batches (after the first one's answers went out),
 * runs one more PASSIVE checkpoint for what came meanwhile, short, so that
 * the WAL starts over at the next commit: a checkpointer alone never
 * catches up with a writer that never pauses, and the WAL would grow
 * without end. Commits wait for the writer's checkpoint (busy stays set).
 * Without the second connection the writer does it all. */

static void note_checkpoint(rr_journal_t *j, bool ok, const char *err, uint64_t us) {
  j->stats.checkpoints++;
  j->stats.checkpoint_us_total += us;
  if (!ok && !j->ckpt_failing)
    rr_log(RR_LOG_WARN, "journal", "event=checkpoint_failed wal_pages=%d error=\"%s\"",
           j->ckpt_pages, err);
  else if (ok && j->ckpt_failing)
    rr_log(RR_LOG_INFO, "journal", "event=checkpoint_recovered wal_pages=%d", j->ckpt_pages);
  j->ckpt_failing = !ok;
}

/* Worker thread: one PASSIVE checkpoint on db; its status, error and time. */
static void checkpoint(sqlite3 *db, int *rc, char err[128], uint64_t *us) {
  uint64_t t0 = uv_hrtime();
  int log = 0, done = 0;
  *rc = sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_PASSIVE, &log, &done);
  if (*rc != SQLITE_OK)
    snprintf(err, 128, "%s", sqlite3_errmsg(db));
  *us = (uv_hrtime() - t0) / 1000;
}

/* Worker thread: the writer's checkpoint after an answered batch. */
static void ckpt_work(uv_work_t *w) {
  rr_journal_t *j = w->data;
  checkpoint(j->wdb, &j->ckpt_rc, j->ckpt_err, &j->ckpt_us);
}

static void ckpt_done(uv_work_t *w, int status) {
  rr_journal_t *j = w->data;
  /* BUSY: another connection (an operator's sqlite3) was checkpointing */
  bool ok = status == 0 && (j->ckpt_rc == SQLITE_OK || j->ckpt_rc == SQLITE_BUSY);
  note_checkpoint(j, ok, status ? "cancelled" : j->ckpt_err, j->ckpt_us);
  j->ckpt_due = false;
  j->bg_ran = false;
  j->busy = false;
  rr_journal_kick(j);
}

/* Worker thread: the checkpointer's, beside the commits. */
static void bg_work(uv_work_t *w) {
  rr_journal_t *j = w->data;
  checkpoint(j->cdb, &j->bg_rc, j->bg_err, &j->bg_us);
}

static void bg_done(uv_work_t *w, int status) {
  rr_journal_t *j = w->data;
  j->bg_running = false;
  j->bg_ran = true; /* the writer finishes after its next batch, also after a failure */
  bool ok = status == 0 && (j->bg_rc == SQLITE_OK || j->bg_rc == SQLITE_BUSY);
  note_checkpoint(j, ok, status ? "cancelled" : j->bg_err, j->bg_us);
  rr_journal_kick(j); /* a shutdown may have waited for it */
}

/* Loop thread: the transaction of sl's batch ended; the writer is free. The
 * batch waits for sl's fdatasync (if any) to be answered. */
static void take_commit(rr_journal_t *j, job_t *sl) {
  sl->seen = true;
  j->committing = NULL;
  if (j->flight_rc)
    rr_log(RR_LOG_ERROR, "journal", "event=commit_failed entries=%zu error=\"%s\"", j->flight.n,
           j->flight_err);
  int pages = j->wal_pages;
  j->wal_pages = 0;
  bool full = j->flight_rc == 0 && pages >= CKPT_PAGES;
  if (j->flight_rc == 0 && pages > 0 && pages < CKPT_PAGES)
    j->bg_ran = false; /* the WAL started over */
  j->ckpt_due = full && (j->bg_ran || !j->cdb);
  j->ckpt_pages = pages;
  if (full && !j->ckpt_due && !j->bg_running) {
    j->bg_work.data = j;
    j->bg_running = uv_queue_work(j->loop, &j->bg_work, bg_work, bg_done) == 0;
    if (!j->bg_running)
      j->ckpt_due = true;
  }
  batch_t b = j->flight;
  memset(&j->flight, 0, sizeof j->flight);
  if (j->flight_rc == 0)
    tail_note(j, &b);
  j->busy = j->ckpt_due; /* what the answers queue waits for the checkpoint */
  push_done(j, b, j->flight_rc, j->flight_us,
            j->flight_rc == 0 && j->wal_fd >= 0 ? (int)(sl - j->jobs) + 1 : 0);
  if (j->ckpt_due) {
    j->work.data = j;
    if (uv_queue_work(j->loop, &j->work, ckpt_work, ckpt_done) == 0)
      return;
    j->ckpt_due = false;
    j->busy = false;
  }
  rr_journal_kick(j);
}

/* Worker thread: the batch's transaction; the loop hears when it ended (the
 * writer is then free for the next batch); then the fdatasync. */
static void job_work(uv_work_t *w) {
  job_t *sl = w->data;
  rr_journal_t *j = sl->j;
  write_flight(j);
  if (j->flight_rc == 0 && j->wal_fd >= 0) { /* otherwise job_done takes it all */
    int fd = j->wal_fd;
    atomic_store(&sl->committed, 1); /* j->flight and flight_* are the loop's from here */
    uv_async_send(&j->committed);
    uint64_t t0 = uv_hrtime();
    sl->err = fdatasync(fd) == 0 ? 0 : errno;
    sl->us = (uv_hrtime() - t0) / 1000;
    sl->synced = true;
  }
}

static void on_committed(uv_async_t *a) {
  rr_journal_t *j = a->data;
  job_t *sl = j->committing;
  if (sl && !sl->seen && atomic_load(&sl->committed))
    take_commit(j, sl);
}

static void job_done(uv_work_t *w, int status) {
  job_t *sl = w->data;
  rr_journal_t *j = sl->j;
  if (!sl->seen) { /* before on_committed ran, or the work never did */
    if (status == UV_ECANCELED)
      j->flight_rc = RR_EIO;
    take_commit(j, sl);
  }
  sl->running = false;
  if (sl->synced) {
    int slot = (int)(sl - j->jobs) + 1, err = sl->err;
    sl->synced = false;
    j->stats.syncs++;
    j->stats.sync_us_total += sl->us;
    if (err && !j->sync_failing)
      rr_log(RR_LOG_ERROR, "journal", "event=sync_failed error=\"%s\"", strerror(err));
    else if (!err && j->sync_failing)
      rr_log(RR_LOG_INFO, "journal", "event=sync_recovered");
    j->sync_failing = err != 0;
    for (size_t i = 0; i < j->ndone; i++)
      if (j->done[i].sync == slot) {
        j->done[i].sync = 0;
        j->done[i].ready = true;
        j->done[i].us += sl->us;
        if (err && !j->done[i].rc)
          j->done[i].rc = RR_EIO;
      }
  }
  drain_done(j);
  rr_journal_kick(j); /* the next batch, or a shutdown waiting */
}

static job_t *free_slot(rr_journal_t *j) {
  for (int k = 0; k < JOBS_MAX; k++)
    if (!j->jobs[k].running)
      return &j->jobs[k];
  return NULL;
}

static void start_commit(rr_journal_t *j);

/* A commit may start while another batch waits for its fdatasync only when
 * at least this many messages wait: each commit costs the disk an
 * fdatasync and rewrites the same few pages (the table's last leaf and
 * parents, the time index's last leaf, sqlite_sequence), so a second one
 * for one or two messages slowed everyone at moderate rates (at 5,000
 * msgs/s over 16 connections: ACK p90 3.5-4.1 ms with 4, 4.5-6.5 ms
 * without). */
#define OVERLAP_MIN 4

static bool may_start(rr_journal_t *j) {
  if (jobs_running(j) && j->queued_entries < OVERLAP_MIN && !j->idle_cb)
    return false;
  return free_slot(j) != NULL;
}

static void on_gather(uv_timer_t *t) {
  rr_journal_t *j = t->data;
  j->gather_armed = false;
  if (!j->busy && j->ndone < DONE_MAX && may_start(j))
    start_commit(j);
}

void rr_journal_kick(rr_journal_t *j) {
  if (j->busy || j->ndone == DONE_MAX || !may_start(j))
    return;
  if (j->queue.n == 0) {
    if (j->idle_cb && !j->bg_running && !j->ndone && !jobs_running(j)) {
      void (*cb)(void *) = j->idle_cb;
      j->idle_cb = NULL;
      cb(j->idle_ud);
    }
    return;
  }
  /* Group commit: the senders of the last two batches are likely to send
   * again within a round trip; wait (briefly) until that many messages have
   * come, so one fsync serves them all. Shutdown does not wait. */
  size_t expect = j->expect > j->last_batch ? j->expect : j->last_batch;
  if (j->queued_entries > 0 && j->queued_entries < expect && j->gather_us && !j->idle_cb) {
    if (!j->gather_armed) {
      j->gather_armed = true;
      uint64_t ms = (j->gather_us + 999) / 1000;
      uv_timer_start(&j->gather, on_gather, ms, 0);
    }
    return;
  }
  start_commit(j);
}

static void start_commit(rr_journal_t *j) {
  if (j->queue.n == 0)
    return rr_journal_kick(j);
  if (j->gather_armed) {
    uv_timer_stop(&j->gather);
    j->gather_armed = false;
  }
  j->flight = j->queue;
  memset(&j->queue, 0, sizeof j->queue);
  j->queued_entries = 0;
  j->flight_rc = 0;
  j->busy = true;
  bool only_barriers = true;
  for (size_t i = 0; i < j->flight.n && only_barriers; i++)
    only_barriers = j->flight.v[i].barrier;
  if (only_barriers) { /* nothing to write: answered after what came before */
    size_t keep = j->last_batch;
    batch_t b = j->flight;
    memset(&j->flight, 0, sizeof j->flight);
    j->busy = false;
    push_done(j, b, 0, 0, 0);
    j->last_batch = keep;
    rr_journal_kick(j);
    return;
  }
  job_t *sl = free_slot(j); /* kick checked there is one */
  sl->j = j;
  sl->running = true;
  sl->seen = false;
  sl->synced = false;
  atomic_store(&sl->committed, 0);
  sl->work.data = sl;
  j->committing = sl;
  if (uv_queue_work(j->loop, &sl->work, job_work, job_done) != 0) {
    sl->running = false;
    j->committing = NULL;
    batch_t b = j->flight;
    memset(&j->flight, 0, sizeof j->flight);
    j->busy = false;
    push_done(j, b, RR_EIO, 0, 0);
  }
}

/* ---- duplicates --------------------------------------------------------- */

static bool same_str(const char *a, const char *b) {
  return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static bool find_in(const batch_t *b, const char *channel, const char *app, const char *fac,
                    const char *ctl, const void *raw, size_t raw_len, rr_journal_dup_t *out) {
  for (size_t i = 0; i < b->n; i++) {
    const rr_journal_entry_t *e = &b->v[i].e;
    if (!is_message(&b->v[i]) || !e->control_id || strcmp(e->control_id, ctl) != 0 ||
        !same_str(e->sending_app, app) || !same_str(e->sending_facility, fac) ||
        !same_str(e->channel, channel))
      continue;
    out->found = true;
    out->committed = false;
    out->same_content = e->raw_len == raw_len && memcmp(e->raw, raw, raw_len) == 0;
    if (e->ack && (out->ack = malloc(e->ack_len ? e->ack_len : 1)))
      memcpy(out->ack, e->ack, e->ack_len), out->ack_len = e->ack_len;
    return true;
  }
  return false;
}

/* Steps st (id, length(raw), ack of a message) once: the message found,
 * the answer it got and whether its content is raw. Resets st. */
static int take_row(rr_journal_t *j, sqlite3_stmt *st, const void *raw, size_t raw_len,
                    rr_journal_dup_t *out) {
  int rc = sqlite3_step(st), result = 0;
  if (rc == SQLITE_ROW) {
    out->found = true;
    out->committed = true;
    out->id = sqlite3_column_int64(st, 0);
    size_t len = (size_t)sqlite3_column_int64(st, 1);
    if (sqlite3_column_type(st, 2) != SQLITE_NULL) {
      const void *a = sqlite3_column_blob(st, 2);
      size_t al = (size_t)sqlite3_column_bytes(st, 2);
      if ((out->ack = malloc(al ? al : 1)))
        memcpy(out->ack, a, al), out->ack_len = al;
      else
        result = RR_ENOMEM;
    }
    if (len == raw_len) {
      sqlite3_stmt *rs = j->find_raw;
      sqlite3_bind_int64(rs, 1, out->id);
      if (sqlite3_step(rs) == SQLITE_ROW)
        out->same_content = (size_t)sqlite3_column_bytes(rs, 0) == raw_len &&
                            memcmp(sqlite3_column_blob(rs, 0), raw, raw_len) == 0;
      sqlite3_reset(rs);
    }
  } else if (rc != SQLITE_DONE) {
    result = RR_EIO;
  }
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return result;
}

int rr_journal_find(rr_journal_t *j, const char *channel, const char *app, const char *facility,
                    const char *control_id, const void *raw, size_t raw_len,
                    rr_journal_dup_t *out) {
  memset(out, 0, sizeof *out);
  if (!control_id || !*control_id ||
      !fp_has(j, fp_tag(fp_hash(channel, app, facility, control_id))))
    return 0;
  /* Oldest first: table dedupe, the tail of committed messages not yet in
   * it, then the batch in flight, then the queue. */
  sqlite3_stmt *st = j->find;
  bind_text(st, 1, control_id);
  bind_text(st, 2, app);
  bind_text(st, 3, facility);
  bind_text(st, 4, channel);
  int result = take_row(j, st, raw, raw_len, out);
  uint64_t h = fp_hash(channel, app, facility, control_id);
  for (size_t i = 0; i < j->ntail && !out->found && result == 0; i++) {
    if (j->tail[i].h != h)
      continue;
    st = j->id_find;
    sqlite3_bind_int64(st, 1, j->tail[i].id);
    bind_text(st, 2, control_id);
    bind_text(st, 3, app);
    bind_text(st, 4, facility);
    bind_text(st, 5, channel);
    result = take_row(j, st, raw, raw_len, out);
  }
  if (!out->found && !find_in(&j->flight, channel, app, facility, control_id, raw, raw_len, out))
    find_in(&j->queue, channel, app, facility, control_id, raw, raw_len, out);
  return result;
}

void rr_journal_stats(const rr_journal_t *j, rr_journal_stats_t *out) {
  *out = j->stats;
}

/* ---- key-value store ------------------------------------------------------ */

int rr_journal_kv_set(rr_journal_t *j, const char *key, const void *value, size_t len,
                      int64_t now_ms) {
  rr_journal_entry_t e = {.control_id = key,
                          .raw = value ? value : "",
                          .raw_len = value ? len : 0,
                          .received_ms = now_ms};
  int rc = add_entry(j, &e, NULL, NULL, true);
  if (rc)
    return rc;
  j->queue.v[j->queue.n - 1].kv_delete = value == NULL;
  return 0;
}

/* The newest write of key in b, or NULL. */
static const pending_t *kv_in(const batch_t *b, const char *key) {
  for (size_t i = b->n; i-- > 0;)
    if (b->v[i].kv && strcmp(b->v[i].e.control_id, key) == 0)
      return &b->v[i];
  return NULL;
}

int rr_journal_kv_get(rr_journal_t *j, const char *key, rr_buf_t *out) {
  /* Newest first: what is queued, then what is being committed, then the store. */
  const pending_t *p = kv_in(&j->queue, key);
  if (!p)
    p = kv_in(&j->flight, key);
  if (p)
    return p->kv_delete ? RR_ENOTFOUND : rr_buf_append(out, p->e.raw, p->e.raw_len);
  sqlite3_stmt *st = j->kv_get;
  bind_text(st, 1, key);
  int rc = sqlite3_step(st);
  int result = RR_ENOTFOUND;
  if (rc == SQLITE_ROW)
    result = rr_buf_append(out, sqlite3_column_blob(st, 0), (size_t)sqlite3_column_bytes(st, 0));
  else if (rc != SQLITE_DONE)
    result = RR_EIO;
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return result;
}

int64_t rr_journal_count(rr_journal_t *j) {
  int64_t n = -1;
  if (sqlite3_step(j->count) == SQLITE_ROW)
    n = sqlite3_column_int64(j->count, 0);
  sqlite3_reset(j->count);
  return n;
}

/* ---- destination queues --------------------------------------------------- */

void rr_journal_set_enqueue_cb(rr_journal_t *j, rr_journal_enqueue_cb cb, void *ud) {
  j->enqueue_cb = cb;
  j->enqueue_ud = ud;
}

int rr_journal_queue_load(rr_journal_t *j, const char *destination, int64_t after_id, size_t limit,
                          bool payloads, void (*cb)(void *ud, const rr_journal_qitem_t *item),
                          void *ud) {
  sqlite3_stmt *st = j->q_load;
  bind_text(st, 1, destination);
  sqlite3_bind_int64(st, 2, after_id);
  sqlite3_bind_int64(st, 3, (sqlite3_int64)limit);
  sqlite3_bind_int(st, 4, payloads);
  int n = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    rr_journal_qitem_t q = {.id = sqlite3_column_int64(st, 0),
                            .message_id = sqlite3_column_int64(st, 1),
                            .destination = destination,
                            .key = (const char *)sqlite3_column_text(st, 2),
                            .lane = sqlite3_column_int(st, 3),
                            .dead = sqlite3_column_int(st, 4) != 0,
                            .attempts = (unsigned)sqlite3_column_int64(st, 5),
                            .not_before_ms = sqlite3_column_int64(st, 6),
                            .enqueued_ms = sqlite3_column_int64(st, 7)};
    if (!q.key)
      q.key = "";
    if (sqlite3_column_type(st, 9) != SQLITE_NULL) {
      const char *ct = (const char *)sqlite3_column_text(st, 8);
      q.content_type = ct && strcmp(ct, "json") == 0 ? "json" : "hl7";
      q.payload = sqlite3_column_blob(st, 9);
      q.len = (size_t)sqlite3_column_bytes(st, 9);
      if (!q.payload)
        q.payload = "";
    }
    cb(ud, &q);
    n++;
  }
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return rc == SQLITE_DONE ? n : RR_EIO;
}

int rr_journal_queue_payload(rr_journal_t *j, int64_t id, rr_buf_t *out, const char **content_type,
                             int64_t *message_id) {
  sqlite3_stmt *st = j->q_payload;
  sqlite3_bind_int64(st, 1, id);
  int rc = sqlite3_step(st), result = RR_ENOTFOUND;
  if (rc == SQLITE_ROW) {
    const char *ct = (const char *)sqlite3_column_text(st, 0);
    *content_type = ct && strcmp(ct, "json") == 0 ? "json" : "hl7";
    *message_id = sqlite3_column_int64(st, 2);
    result = rr_buf_append(out, sqlite3_column_blob(st, 1), (size_t)sqlite3_column_bytes(st, 1));
  } else if (rc != SQLITE_DONE) {
    result = RR_EIO;
  }
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return result;
}

int rr_journal_queue_record(rr_journal_t *j, const rr_journal_delivery_t *d, rr_journal_done_cb cb,
                            void *ud) {
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  size_t need =
      strlen(d->destination) + 1 + (d->detail ? strlen(d->detail) + 1 : 0) + d->response_len + 1;
  char *blob = malloc(need);
  if (!blob)
    return RR_ENOMEM;
  char *w = blob;
  p->d = *d;
  p->d.destination = put_str(&w, d->destination);
  p->d.detail = put_str(&w, d->detail);
  if (d->response) {
    if (d->response_len)
      memcpy(w, d->response, d->response_len);
    p->d.response = w;
  }
  p->delivery = true;
  p->blob = blob;
  p->cb = cb;
  p->ud = ud;
  j->queue.n++; /* not a message: group commit does not wait for it */
  return 0;
}

int rr_journal_queue_depth(rr_journal_t *j,
                           void (*cb)(void *ud, const char *destination, int64_t pending,
                                      int64_t dead, int64_t oldest_ms),
                           void *ud) {
  sqlite3_stmt *st = j->q_depth;
  int n = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    cb(ud, (const char *)sqlite3_column_text(st, 0), sqlite3_column_int64(st, 1),
       sqlite3_column_int64(st, 2), sqlite3_column_int64(st, 3));
    n++;
  }
  sqlite3_reset(st);
  return rc == SQLITE_DONE ? n : RR_EIO;
}

int rr_journal_queue_routes(rr_journal_t *j, int64_t message_id, int64_t now_ms,
                            const rr_journal_route_t *routes, size_t n) {
  if (n == 0)
    return 0;
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  if (copy_routes(p, routes, n))
    return RR_ENOMEM;
  p->e.nroutes = n;
  p->e.received_ms = now_ms;
  p->replay = true;
  p->replay_of = message_id;
  j->queue.n++;
  return 0;
}

int rr_journal_message(rr_journal_t *j, int64_t id, char *channel, size_t cap, rr_buf_t *raw) {
  sqlite3_stmt *st = j->msg_get;
  sqlite3_bind_int64(st, 1, id);
  int rc = sqlite3_step(st), result = RR_ENOTFOUND;
  if (rc == SQLITE_ROW) {
    snprintf(channel, cap, "%s", (const char *)sqlite3_column_text(st, 0));
    result = rr_buf_append(raw, sqlite3_column_blob(st, 1), (size_t)sqlite3_column_bytes(st, 1));
  } else if (rc != SQLITE_DONE) {
    result = RR_EIO;
  }
  sqlite3_reset(st);
  return result;
}

int rr_journal_ops_take(rr_journal_t *j, void (*cb)(void *ud, const rr_journal_op_t *op),
                        void *ud) {
  sqlite3_stmt *st = j->ops_read;
  int n = 0, rc;
  int64_t upto = 0;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    rr_journal_op_t op = {.op = (const char *)sqlite3_column_text(st, 1),
                          .destination = (const char *)sqlite3_column_text(st, 2),
                          .queue_id = sqlite3_column_int64(st, 3),
                          .message_id = sqlite3_column_int64(st, 4)};
    upto = sqlite3_column_int64(st, 0);
    if (op.op && op.destination)
      cb(ud, &op);
    n++;
  }
  sqlite3_reset(st);
  if (rc != SQLITE_DONE)
    return RR_EIO;
  if (upto) {
    pending_t *p = slot(&j->queue);
    if (!p)
      return RR_ENOMEM;
    p->ops_upto = upto;
    j->queue.n++;
  }
  return n;
}

int rr_journal_prune(rr_journal_t *j, int64_t cutoff_ms, unsigned limit, rr_journal_done_cb cb,
                     void *ud) {
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  p->prune_before = cutoff_ms > 0 ? cutoff_ms : 1;
  p->prune_limit = limit ? limit : 1;
  p->cb = cb;
  p->ud = ud;
  j->queue.n++;
  return 0;
}

int rr_journal_add_instance(rr_journal_t *j, const rr_journal_instance_t *in, rr_journal_done_cb cb,
                            void *ud) {
  const char *strs[] = {in->channel,        in->calling_ae,       in->peer,       in->path,
                        in->sop_class_uid,  in->sop_instance_uid, in->study_uid,  in->series_uid,
                        in->patient_id,     in->accession,        in->modality,   in->body_part,
                        in->description,    in->study_date,       in->study_time, in->series_number,
                        in->instance_number};
  size_t need = sizeof(rr_journal_instance_t);
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    need += (strs[i] ? strlen(strs[i]) : 0) + 1;
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  char *blob = malloc(need);
  if (!blob)
    return RR_ENOMEM;
  rr_journal_instance_t *c = (rr_journal_instance_t *)(void *)blob;
  *c = *in;
  char *w = blob + sizeof *c;
  const char **dst[] = {&c->channel,        &c->calling_ae,       &c->peer,       &c->path,
                        &c->sop_class_uid,  &c->sop_instance_uid, &c->study_uid,  &c->series_uid,
                        &c->patient_id,     &c->accession,        &c->modality,   &c->body_part,
                        &c->description,    &c->study_date,       &c->study_time, &c->series_number,
                        &c->instance_number};
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    *dst[i] = put_str(&w, strs[i] ? strs[i] : "");
  p->instance = c;
  p->blob = blob;
  p->cb = cb;
  p->ud = ud;
  j->queue.n++;
  return 0;
}

int rr_journal_mark_stable(rr_journal_t *j, const char *channel, int64_t cutoff_ms,
                           rr_journal_stable_cb cb, void *ud) {
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  char *blob = strdup(channel);
  if (!blob)
    return RR_ENOMEM;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  p->e.channel = blob;
  p->e.received_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
  p->blob = blob;
  p->stable_before = cutoff_ms > 0 ? cutoff_ms : 1;
  p->stable_cb = cb;
  p->ud = ud;
  j->queue.n++;
  return 0;
}

int rr_journal_mark_study_stable(rr_journal_t *j, const char *study_uid, int64_t at_ms,
                                 rr_journal_stable_cb cb, void *ud) {
  int rc = rr_journal_mark_stable(j, study_uid, INT64_MAX, cb, ud);
  if (rc == 0) { /* the string copied as the channel is the study's UID */
    pending_t *p = &j->queue.v[j->queue.n - 1];
    p->e.study_uid = p->e.channel;
    p->e.channel = NULL;
    p->e.received_ms = at_ms;
  }
  return rc;
}

/* ---- orders and study matching -------------------------------------------- */

/* "YYYYMMDD[HH[MM[SS[.f]]]]" (an HL7 TS or DICOM DA + TM, site local time)
 * as milliseconds since the epoch read as if UTC, so that two site-local
 * times compare; -1 when it does not start with a date. */
static int64_t naive_ms(const char *date, const char *time) {
  int f[6] = {0, 1, 1, 0, 0, 0};
  const int width[6] = {4, 2, 2, 2, 2, 2};
  const char *s = date;
  for (int i = 0; i < 6; i++) {
    if (i == 3 && time)
      s = time;
    int v = 0, k = 0;
    for (; k < width[i] && s && s[k] >= '0' && s[k] <= '9'; k++)
      v = v * 10 + (s[k] - '0');
    if (k < width[i]) {
      if (i < 3)
        return -1;
      break;
    }
    f[i] = v;
    s += k;
  }
  if (f[1] < 1 || f[1] > 12 || f[2] < 1 || f[2] > 31 || f[3] > 23 || f[4] > 59 || f[5] > 60)
    return -1;
  struct tm tm = {.tm_year = f[0] - 1900,
                  .tm_mon = f[1] - 1,
                  .tm_mday = f[2],
                  .tm_hour = f[3],
                  .tm_min = f[4],
                  .tm_sec = f[5]};
  return (int64_t)timegm(&tm) * 1000;
}

/* A wall-clock time as the site's local time read as if UTC. */
static int64_t naive_from_epoch(int64_t ms) {
  time_t t = (time_t)(ms / 1000);
  struct tm tm;
  localtime_r(&t, &tm);
  return (int64_t)timegm(&tm) * 1000 + ms % 1000;
}

int rr_journal_keep_order(rr_journal_t *j, const rr_journal_order_t *o) {
  if ((!o->accession || !*o->accession) && (!o->placer || !*o->placer))
    return RR_EINVAL;
  const char *strs[] = {o->channel,   o->accession, o->placer,   o->filler,        o->mrn,
                        o->study_uid, o->modality,  o->priority, o->order_control, o->ordered_at};
  size_t need = sizeof(rr_journal_order_t) + o->record_len + 1;
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    need += (strs[i] ? strlen(strs[i]) : 0) + 1;
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  char *blob = malloc(need);
  if (!blob)
    return RR_ENOMEM;
  rr_journal_order_t *c = (rr_journal_order_t *)(void *)blob;
  *c = *o;
  char *w = blob + sizeof *c;
  const char **dst[] = {&c->channel,       &c->accession, &c->placer,   &c->filler,
                        &c->mrn,           &c->study_uid, &c->modality, &c->priority,
                        &c->order_control, &c->ordered_at};
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    *dst[i] = strs[i] && *strs[i] ? put_str(&w, strs[i]) : NULL;
  memcpy(w, o->record, o->record_len);
  w[o->record_len] = '\0';
  c->record = w;
  int64_t ms = c->ordered_at ? naive_ms(c->ordered_at, NULL) : -1;
  p->order_ms = ms >= 0 ? ms : naive_from_epoch(o->received_ms);
  p->order = c;
  p->blob = blob;
  j->queue.n++; /* not a message: group commit does not wait for it */
  return 0;
}

/* The newest queued order with this accession in b, or NULL. */
static const pending_t *order_in(const batch_t *b, const char *accession) {
  for (size_t i = b->n; i-- > 0;)
    if (b->v[i].order && b->v[i].order->accession &&
        strcmp(b->v[i].order->accession, accession) == 0)
      return &b->v[i];
  return NULL;
}

/* Appends record with "id" and "status" set. */
static int order_json(const char *record, size_t len, int64_t id, const char *status,
                      rr_buf_t *out) {
  json_t *o = json_loadb(record, len, 0, NULL);
  if (!json_is_object(o)) {
    json_decref(o);
    return RR_EIO;
  }
  if (id > 0)
    json_object_set_new(o, "id", json_integer(id));
  json_object_set_new(o, "status", json_string(status));
  char *t = json_dumps(o, JSON_COMPACT);
  json_decref(o);
  if (!t)
    return RR_ENOMEM;
  int rc = rr_buf_append(out, t, strlen(t));
  free(t);
  return rc;
}

static bool is_cancel(const char *control) {
  static const char *const cancels[] = {"CA", "OC", "DC", "CR", "OD", "DR"};
  for (size_t i = 0; control && i < sizeof cancels / sizeof cancels[0]; i++)
    if (strcmp(control, cancels[i]) == 0)
      return true;
  return false;
}

static sqlite3_stmt *reader_stmt(rr_journal_t *j, const char *sql);
static void reader_done(rr_journal_t *j, sqlite3_stmt *st);

int rr_journal_order_get(rr_journal_t *j, const char *accession, rr_buf_t *out) {
  const pending_t *p = order_in(&j->queue, accession);
  if (!p)
    p = order_in(&j->flight, accession);
  if (p)
    return order_json(p->order->record, p->order->record_len, 0,
                      is_cancel(p->order->order_control) ? "cancelled" : "active", out);
  sqlite3_stmt *st = reader_stmt(j, "SELECT id, status, record FROM orders WHERE accession = ?");
  if (!st)
    return RR_EIO;
  bind_text(st, 1, accession);
  int rc = sqlite3_step(st), result = RR_ENOTFOUND;
  if (rc == SQLITE_ROW)
    result =
        order_json((const char *)sqlite3_column_text(st, 2), (size_t)sqlite3_column_bytes(st, 2),
                   sqlite3_column_int64(st, 0), (const char *)sqlite3_column_text(st, 1), out);
  else if (rc != SQLITE_DONE)
    result = RR_EIO;
  reader_done(j, st);
  return result;
}

/* A prepared statement of the reader for sql (reset, nothing bound), or
 * NULL; give it back with reader_done. */
static sqlite3_stmt *reader_stmt(rr_journal_t *j, const char *sql) {
  reader_stmt_t *slot = NULL;
  for (size_t i = 0; i < READER_STMTS; i++) {
    reader_stmt_t *c = &j->rstmt[i];
    if (c->sql && !c->busy && strcmp(c->sql, sql) == 0) {
      c->busy = true;
      c->used = ++j->rstmt_tick;
      return c->st;
    }
    if (!c->busy && (!slot || (slot->sql && (!c->sql || c->used < slot->used))))
      slot = c;
  }
  sqlite3_stmt *st;
  if (sqlite3_prepare_v3(j->rdb, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK)
    return NULL;
  char *copy = slot ? strdup(sql) : NULL;
  if (!copy)
    return st; /* not kept: reader_done finalizes it */
  if (slot->sql) {
    sqlite3_finalize(slot->st);
    free(slot->sql);
  }
  *slot = (reader_stmt_t){.sql = copy, .st = st, .busy = true, .used = ++j->rstmt_tick};
  return st;
}

static void reader_done(rr_journal_t *j, sqlite3_stmt *st) {
  for (size_t i = 0; i < READER_STMTS; i++)
    if (j->rstmt[i].st == st && j->rstmt[i].busy) {
      sqlite3_reset(st); /* ends its read transaction */
      sqlite3_clear_bindings(st);
      j->rstmt[i].busy = false;
      return;
    }
  sqlite3_finalize(st);
}

/* cb per row with the first column of sql (one text parameter, arg) on the
 * reader; the number of rows, or RR_EIO. */
static int each_text(rr_journal_t *j, const char *sql, const char *arg,
                     void (*cb)(void *ud, const char *text), void *ud) {
  sqlite3_stmt *st = reader_stmt(j, sql);
  if (!st)
    return RR_EIO;
  bind_text(st, 1, arg);
  int n = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    cb(ud, (const char *)sqlite3_column_text(st, 0));
    n++;
  }
  reader_done(j, st);
  return rc == SQLITE_DONE ? n : RR_EIO;
}

int rr_journal_quiet(rr_journal_t *j, const char *channel, int64_t cutoff_ms, const char *study_uid,
                     void (*cb)(void *ud, const char *study_uid, const char *channel), void *ud) {
  sqlite3_stmt *st;
  const char *sql = study_uid ? "SELECT study_uid, channel FROM studies WHERE study_uid = ?1"
                                " AND state = 'arriving' AND routed_ms IS NULL"
                              : "SELECT study_uid, channel FROM studies WHERE channel = ?1"
                                " AND state = 'arriving' AND last_ms < ?2 AND routed_ms IS NULL"
                                " ORDER BY last_ms";
  if (!(st = reader_stmt(j, sql)))
    return RR_EIO;
  bind_text(st, 1, study_uid ? study_uid : channel);
  if (!study_uid)
    sqlite3_bind_int64(st, 2, cutoff_ms);
  int n = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    cb(ud, (const char *)sqlite3_column_text(st, 0), (const char *)sqlite3_column_text(st, 1));
    n++;
  }
  reader_done(j, st);
  return rc == SQLITE_DONE ? n : RR_EIO;
}

int rr_journal_unrouted(rr_journal_t *j, const char *channel,
                        void (*cb)(void *ud, const char *study_uid), void *ud) {
  return each_text(j,
                   "SELECT study_uid FROM studies WHERE channel = ? AND state = 'stable'"
                   " AND routed_ms IS NULL ORDER BY stable_ms",
                   channel, cb, ud);
}

static void set_text(json_t *o, const char *key, sqlite3_stmt *st, int col) {
  const char *v = (const char *)sqlite3_column_text(st, col);
  json_object_set_new(o, key, v ? json_string(v) : json_null());
}

/* The order found by sql (bound with the study's values) into ctx. */
static int match_order(rr_journal_t *j, const char *sql, const char *const *text, size_t ntext,
                       const int64_t *num, size_t nnum, json_t *ctx, int64_t *order_id) {
  sqlite3_stmt *st = reader_stmt(j, sql);
  if (!st)
    return RR_EIO;
  for (size_t i = 0; i < ntext; i++)
    bind_text(st, (int)i + 1, text[i]);
  for (size_t i = 0; i < nnum; i++)
    sqlite3_bind_int64(st, (int)(ntext + i) + 1, num[i]);
  int rc = sqlite3_step(st), result = RR_ENOTFOUND;
  if (rc == SQLITE_ROW) {
    json_t *o = json_loadb((const char *)sqlite3_column_text(st, 2),
                           (size_t)sqlite3_column_bytes(st, 2), 0, NULL);
    if (!json_is_object(o)) {
      json_decref(o);
      o = json_object();
    }
    *order_id = sqlite3_column_int64(st, 0);
    json_object_set_new(o, "id", json_integer(*order_id));
    set_text(o, "status", st, 1);
    json_object_set_new(ctx, "order", o);
    result = 0;
  } else if (rc != SQLITE_DONE) {
    result = RR_EIO;
  }
  reader_done(j, st);
  return result;
}

int rr_journal_study_context(rr_journal_t *j, const char *study_uid, int64_t window_ms,
                             rr_buf_t *out, int64_t *order_id, const char **method) {
  *order_id = 0;
  *method = "none";
  sqlite3_stmt *st;
  if (!(st = reader_stmt(j, "SELECT channel, patient_id, accession, modality, body_part,"
                            " description, study_date, study_time, instances, first_ms,"
                            " last_ms, stable_ms FROM studies WHERE study_uid = ?")))
    return RR_EIO;
  bind_text(st, 1, study_uid);
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) {
    reader_done(j, st);
    return rc == SQLITE_DONE ? RR_ENOTFOUND : RR_EIO;
  }
  json_t *ctx = json_object();
  json_object_set_new(ctx, "study_uid", json_string(study_uid));
  static const char *const keys[] = {"channel",   "patient_id",  "accession",  "modality",
                                     "body_part", "description", "study_date", "study_time"};
  for (int i = 0; i < 8; i++)
    set_text(ctx, keys[i], st, i);
  json_object_set_new(ctx, "instances", json_integer(sqlite3_column_int64(st, 8)));
  json_object_set_new(ctx, "first_ms", json_integer(sqlite3_column_int64(st, 9)));
  json_object_set_new(ctx, "last_ms", json_integer(sqlite3_column_int64(st, 10)));
  json_object_set_new(ctx, "stable_ms", json_integer(sqlite3_column_int64(st, 11)));
  char acc[128] = "", pid[128] = "", date[16] = "", tim[32] = "";
  const char *v;
  if ((v = (const char *)sqlite3_column_text(st, 2)))
    snprintf(acc, sizeof acc, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 1)))
    snprintf(pid, sizeof pid, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 6)))
    snprintf(date, sizeof date, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 7)))
    snprintf(tim, sizeof tim, "%s", v);
  int64_t first_ms = sqlite3_column_int64(st, 9);
  reader_done(j, st);

  int result = 0;
  json_t *series = json_array(), *mods = json_array();
  json_object_set_new(ctx, "series", series);
  json_object_set_new(ctx, "modalities", mods);
  if (!(st = reader_stmt(j, "SELECT series_uid, min(modality), min(series_number), count(*),"
                            " min(calling_ae), min(body_part) FROM instances WHERE study_uid = ?"
                            " GROUP BY series_uid ORDER BY min(received_ms)"))) {
    json_decref(ctx);
    return RR_EIO;
  }
  bind_text(st, 1, study_uid);
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    json_t *s = json_object();
    set_text(s, "series_uid", st, 0);
    set_text(s, "modality", st, 1);
    set_text(s, "series_number", st, 2);
    json_object_set_new(s, "instances", json_integer(sqlite3_column_int64(st, 3)));
    set_text(s, "body_part", st, 5);
    json_array_append_new(series, s);
    const char *m = (const char *)sqlite3_column_text(st, 1);
    bool seen = !m;
    for (size_t i = 0; m && i < json_array_size(mods); i++)
      seen = seen || strcmp(json_string_value(json_array_get(mods, i)), m) == 0;
    if (!seen)
      json_array_append_new(mods, json_string(m));
    if (!json_object_get(ctx, "calling_ae") && sqlite3_column_text(st, 4))
      set_text(ctx, "calling_ae", st, 4);
  }
  reader_done(j, st);
  if (rc != SQLITE_DONE)
    result = RR_EIO;

  /* Matching: accession, else Study Instance UID, else patient + modality +
   * time window (active orders only, one not matched to another study
   * first, then the nearest in time). */
  const char *cols = "SELECT id, status, record FROM orders";
  char sql[1024];
  if (result == 0 && *acc) {
    snprintf(sql, sizeof sql, "%s WHERE accession = ?", cols);
    const char *t[] = {acc};
    result = match_order(j, sql, t, 1, NULL, 0, ctx, order_id);
    if (result == 0)
      *method = "accession";
  } else if (result == 0) {
    result = RR_ENOTFOUND;
  }
  if (result == RR_ENOTFOUND) {
    snprintf(sql, sizeof sql, "%s WHERE study_uid = ? ORDER BY id DESC LIMIT 1", cols);
    const char *t[] = {study_uid};
    result = match_order(j, sql, t, 1, NULL, 0, ctx, order_id);
    if (result == 0)
      *method = "study_uid";
  }
  if (result == RR_ENOTFOUND && *pid && window_ms > 0) {
    int64_t at = *date ? naive_ms(date, tim) : -1;
    if (at < 0)
      at = naive_from_epoch(first_ms);
    snprintf(sql, sizeof sql,
             "%s WHERE mrn = ?1 AND status = 'active' AND modality IN"
             " (SELECT modality FROM instances WHERE study_uid = ?2)"
             " AND ordered_ms BETWEEN ?3 - ?4 AND ?3 + ?4"
             " ORDER BY EXISTS(SELECT 1 FROM studies s WHERE s.order_id = orders.id"
             " AND s.study_uid != ?2), abs(ordered_ms - ?3) LIMIT 1",
             cols);
    const char *t[] = {pid, study_uid};
    int64_t n[] = {at, window_ms};
    result = match_order(j, sql, t, 2, n, 2, ctx, order_id);
    if (result == 0)
      *method = "patient_modality_time";
  }
  if (result == RR_ENOTFOUND) {
    json_object_set_new(ctx, "order", json_null());
    result = 0;
  }
  json_object_set_new(ctx, "match", json_string(*method));
  char *t = result == 0 ? json_dumps(ctx, JSON_COMPACT) : NULL;
  json_decref(ctx);
  if (result)
    return result;
  if (!t)
    return RR_ENOMEM;
  result = rr_buf_append(out, t, strlen(t));
  free(t);
  return result;
}

int64_t rr_journal_study_instances(rr_journal_t *j, const char *study_uid) {
  sqlite3_stmt *st;
  if (!(st = reader_stmt(j, "SELECT instances FROM studies WHERE study_uid = ?")))
    return RR_EIO;
  bind_text(st, 1, study_uid);
  int rc = sqlite3_step(st);
  int64_t n = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : rc == SQLITE_DONE ? 0 : RR_EIO;
  reader_done(j, st);
  return n;
}

int rr_journal_study_paths(rr_journal_t *j, const char *study_uid,
                           void (*cb)(void *ud, const char *path), void *ud) {
  return each_text(j,
                   "SELECT path FROM instances WHERE study_uid = ? ORDER BY series_uid,"
                   " CAST(instance_number AS INTEGER), sop_instance_uid",
                   study_uid, cb, ud);
}

int rr_journal_custom(rr_journal_t *j, rr_journal_write_fn write, void *data,
                      void (*free_data)(void *data), rr_journal_done_cb cb, void *ud) {
  pending_t *p = slot(&j->queue);
  if (!p) {
    if (free_data)
      free_data(data);
    return RR_ENOMEM;
  }
  p->custom = write;
  p->custom_data = data;
  p->custom_free = free_data;
  p->cb = cb;
  p->ud = ud;
  j->queue.n++; /* not a message: group commit does not wait for it */
  return 0;
}

void rr_journal_custom_each(rr_journal_t *j, rr_journal_write_fn write,
                            void (*cb)(void *ud, const void *data), void *ud) {
  const batch_t *b[2] = {&j->flight, &j->queue}; /* oldest first */
  for (int k = 0; k < 2; k++)
    for (size_t i = 0; i < b[k]->n; i++)
      if (b[k]->v[i].custom == write)
        cb(ud, b[k]->v[i].custom_data);
}

sqlite3 *rr_journal_reader(rr_journal_t *j) {
  return j->rdb;
}

int rr_journal_schema(rr_journal_t *j, const char *sql, char **errmsg) {
  if (j->busy)
    return RR_EAGAIN;
  if (sqlite3_exec(j->wdb, sql, NULL, NULL, NULL) != SQLITE_OK)
    return fail(j->wdb, "schema", errmsg);
  return 0;
}

int rr_journal_audit(rr_journal_t *j, const rr_audit_record_t *r) {
  /* Checked here: a record the chain would refuse at the commit would fail
   * the whole batch, messages included. */
  if (r->data_len > RR_AUDIT_DATA_MAX || (r->actor && strlen(r->actor) > RR_AUDIT_FIELD_MAX) ||
      (r->kind && strlen(r->kind) > RR_AUDIT_FIELD_MAX) ||
      (r->subject && strlen(r->subject) > RR_AUDIT_FIELD_MAX))
    return RR_ELIMIT;
  json_t *doc = json_loadb(r->data ? r->data : "", r->data_len, JSON_DECODE_ANY, NULL);
  if (!doc)
    return RR_EINVAL;
  json_decref(doc);
  const char *strs[] = {r->actor, r->kind, r->subject};
  size_t need = sizeof *r + r->data_len + 1;
  for (size_t i = 0; i < 3; i++)
    need += (strs[i] ? strlen(strs[i]) : 0) + 1;
  pending_t *p = slot(&j->queue);
  if (!p)
    return RR_ENOMEM;
  char *blob = malloc(need);
  if (!blob)
    return RR_ENOMEM;
  rr_audit_record_t *c = (rr_audit_record_t *)(void *)blob;
  *c = *r;
  char *w = blob + sizeof *c;
  c->actor = put_str(&w, r->actor ? r->actor : "engine");
  c->kind = put_str(&w, r->kind ? r->kind : "event");
  c->subject = put_str(&w, r->subject ? r->subject : "");
  if (r->data_len)
    memcpy(w, r->data, r->data_len);
  w[r->data_len] = '\0';
  c->data = w;
  p->audit = c;
  p->blob = blob;
  j->queue.n++; /* not a message: group commit does not wait for it */
  return 0;
}

int rr_journal_audit_json(rr_journal_t *j, const char *actor, const char *kind, const char *subject,
                          json_t *data) {
  char *text = data ? json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
  json_decref(data);
  if (!text)
    return RR_ENOMEM;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  rr_audit_record_t r = {.at_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000,
                         .actor = actor,
                         .kind = kind,
                         .subject = subject,
                         .data = text,
                         .data_len = strlen(text)};
  int rc = rr_journal_audit(j, &r);
  free(text);
  return rc;
}

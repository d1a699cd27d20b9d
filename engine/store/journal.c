/* SQLite journal with group commit. */
#include "store/journal.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/log.h"

typedef struct pending {
  rr_journal_entry_t e; /* strings and blobs point into blob */
  rr_journal_done_cb cb;
  void *ud;
  int64_t id;
  char *blob;
} pending_t;

struct rr_journal {
  sqlite3 *db;
  sqlite3_stmt *insert, *begin, *commit, *rollback;
  pending_t *q;
  size_t nq, capq;
};

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS messages("
    " id INTEGER PRIMARY KEY,"
    " channel TEXT NOT NULL,"
    " peer TEXT,"
    " received_ms INTEGER NOT NULL,"
    " sending_app TEXT, sending_facility TEXT, message_type TEXT, control_id TEXT,"
    " mrn TEXT, accession TEXT, study_uid TEXT,"
    " status TEXT NOT NULL,"
    " error TEXT,"
    " raw BLOB NOT NULL,"
    " ack BLOB);"
    "CREATE INDEX IF NOT EXISTS messages_control ON messages(sending_app, sending_facility, control_id);"
    "CREATE INDEX IF NOT EXISTS messages_mrn ON messages(mrn) WHERE mrn IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS messages_accession ON messages(accession) WHERE accession IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS messages_study ON messages(study_uid) WHERE study_uid IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS messages_time ON messages(received_ms);"
    "PRAGMA user_version=1;";

static int fail(sqlite3 *db, const char *what, char **errmsg) {
  if (errmsg) {
    const char *m = db ? sqlite3_errmsg(db) : "out of memory";
    size_t n = strlen(what) + strlen(m) + 4;
    *errmsg = malloc(n);
    if (*errmsg)
      snprintf(*errmsg, n, "%s: %s", what, m);
  }
  return RR_EIO;
}

int rr_journal_open(const char *path, rr_journal_sync_t sync, rr_journal_t **out, char **errmsg) {
  rr_journal_t *j = calloc(1, sizeof *j);
  int rc = RR_ENOMEM;
  if (errmsg)
    *errmsg = NULL;
  if (!j)
    goto out;
  if (sqlite3_open_v2(path, &j->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                      NULL) != SQLITE_OK) {
    rc = fail(j->db, "open", errmsg);
    goto out;
  }
  static const char *const syncs[] = {"PRAGMA synchronous=FULL", "PRAGMA synchronous=NORMAL",
                                      "PRAGMA synchronous=OFF"};
  const char *setup[] = {"PRAGMA journal_mode=WAL", syncs[sync], "PRAGMA foreign_keys=ON",
                         "PRAGMA busy_timeout=5000", schema};
  for (size_t i = 0; i < sizeof setup / sizeof setup[0]; i++) {
    if (sqlite3_exec(j->db, setup[i], NULL, NULL, NULL) != SQLITE_OK) {
      rc = fail(j->db, setup[i], errmsg);
      goto out;
    }
  }
  if (sqlite3_prepare_v2(j->db,
                         "INSERT INTO messages(channel, peer, received_ms, sending_app,"
                         " sending_facility, message_type, control_id, mrn, accession, study_uid,"
                         " status, error, raw, ack) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         -1, &j->insert, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(j->db, "BEGIN IMMEDIATE", -1, &j->begin, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(j->db, "COMMIT", -1, &j->commit, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(j->db, "ROLLBACK", -1, &j->rollback, NULL) != SQLITE_OK) {
    rc = fail(j->db, "prepare", errmsg);
    goto out;
  }
  *out = j;
  return 0;
out:
  rr_journal_close(j);
  return rc;
}

static void report_all(rr_journal_t *j, int status) {
  /* Callbacks may queue new entries: take the batch off the queue first. */
  pending_t *q = j->q;
  size_t n = j->nq;
  j->q = NULL;
  j->nq = j->capq = 0;
  for (size_t i = 0; i < n; i++) {
    if (q[i].cb)
      q[i].cb(q[i].ud, status, status ? 0 : q[i].id);
    free(q[i].blob);
  }
  free(q);
}

void rr_journal_close(rr_journal_t *j) {
  if (!j)
    return;
  report_all(j, RR_EIO);
  sqlite3_finalize(j->insert);
  sqlite3_finalize(j->begin);
  sqlite3_finalize(j->commit);
  sqlite3_finalize(j->rollback);
  sqlite3_close(j->db);
  free(j);
}

size_t rr_journal_pending(const rr_journal_t *j) { return j->nq; }

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

int rr_journal_add(rr_journal_t *j, const rr_journal_entry_t *e, rr_journal_done_cb cb, void *ud) {
  if (j->nq == j->capq) {
    size_t nc = j->capq ? j->capq * 2 : 64;
    pending_t *t = realloc(j->q, nc * sizeof *t);
    if (!t)
      return RR_ENOMEM;
    j->q = t;
    j->capq = nc;
  }
  const char *strs[] = {e->channel, e->peer, e->sending_app, e->sending_facility, e->message_type,
                        e->control_id, e->mrn, e->accession, e->study_uid, e->status, e->error};
  size_t need = e->raw_len + e->ack_len + 1;
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    need += strs[i] ? strlen(strs[i]) + 1 : 0;
  char *blob = malloc(need);
  if (!blob)
    return RR_ENOMEM;
  pending_t *p = &j->q[j->nq];
  memset(p, 0, sizeof *p);
  char *w = blob;
  p->e = *e;
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
  j->nq++;
  return 0;
}

static int bind_text(sqlite3_stmt *st, int i, const char *s) {
  return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC) : sqlite3_bind_null(st, i);
}

static int insert_one(rr_journal_t *j, pending_t *p) {
  sqlite3_stmt *st = j->insert;
  const rr_journal_entry_t *e = &p->e;
  sqlite3_reset(st);
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
  if (rc != SQLITE_DONE)
    return RR_EIO;
  p->id = sqlite3_last_insert_rowid(j->db);
  return 0;
}

static int step_once(sqlite3_stmt *st) {
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

int rr_journal_commit(rr_journal_t *j) {
  if (j->nq == 0)
    return 0;
  int rc = step_once(j->begin);
  for (size_t i = 0; rc == 0 && i < j->nq; i++)
    rc = insert_one(j, &j->q[i]);
  if (rc == 0)
    rc = step_once(j->commit);
  if (rc) {
    rr_log(RR_LOG_ERROR, "journal", "event=commit_failed entries=%zu error=\"%s\"", j->nq,
           sqlite3_errmsg(j->db));
    if (!sqlite3_get_autocommit(j->db))
      step_once(j->rollback);
  }
  report_all(j, rc);
  return rc;
}

int64_t rr_journal_count(rr_journal_t *j) {
  sqlite3_stmt *st;
  int64_t n = -1;
  if (sqlite3_prepare_v2(j->db, "SELECT count(*) FROM messages", -1, &st, NULL) != SQLITE_OK)
    return -1;
  if (sqlite3_step(st) == SQLITE_ROW)
    n = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return n;
}

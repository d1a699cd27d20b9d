/* The audit trail: an append-only, hash-chained table in the store.
 *
 * Model. Table audit holds one row per event: who (actor), what (kind),
 * about what (subject), when (at_ms) and the event's details as JSON
 * (data). Rows are numbered seq = 1, 2, 3, ... without gaps. Each row
 * carries prev, the hash of the row before it (64 zeros for seq 1), and
 * hash, the SHA-256 of its own fields and prev, so editing, inserting,
 * deleting or reordering rows breaks the chain at the first row touched
 * and rr_audit_verify names that row. Triggers refuse UPDATE and DELETE on
 * the table; they only stop mistakes (whoever can write the file can drop
 * them), which is why verify does not rely on them.
 *
 * What the chain cannot show: anyone who can write the file can rewrite
 * every row from the edited one onward with fresh hashes, or remove the
 * newest rows (the rest is still a valid chain). Both show only against a
 * head recorded elsewhere: rr_audit_head gives the newest seq and hash,
 * for the engine to log now and then (or send to a remote log) so an
 * auditor can check that the chain still reaches it.
 *
 * Hash (version 1). With u64(n) the 8-byte big-endian encoding of n (at_ms
 * as two's complement) and str(s) = u64(byte length of s) followed by the
 * bytes of s (UTF-8, no terminator):
 *
 *   hash = hex(SHA-256( str("radrelay-audit-v1") || u64(seq) || u64(at_ms)
 *                       || str(actor) || str(kind) || str(subject)
 *                       || str(data) || the 32 bytes prev is the hex of ))
 *
 * in lower-case hex. data is kept in canonical form, which is exactly
 * what Python's json.dumps(value, sort_keys=True, separators=(",", ":"),
 * ensure_ascii=False) writes: no spaces; object members sorted by key;
 * strings with only '"', '\\' and the control characters escaped (\b \f
 * \n \r \t, else \u00xx) and everything else as UTF-8; integers in
 * decimal; reals as the shortest text that reads back as the same double
 * (Python's repr: 0.1, 1.0, 1e-05, 1e+16). Any record can be checked from
 * an export line with a few lines of Python:
 *
 *   def s(b): return struct.pack(">Q", len(b)) + b
 *   r = json.loads(line)
 *   d = json.dumps(r["data"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
 *   m = s(b"radrelay-audit-v1") + struct.pack(">Qq", r["seq"], r["at_ms"])
 *   for f in (r["actor"], r["kind"], r["subject"], d): m += s(f.encode())
 *   assert hashlib.sha256(m + bytes.fromhex(r["prev"])).hexdigest() == r["hash"]
 *
 * Transactions. Nothing here begins or commits a transaction for its
 * writes: rr_audit_append inserts inside the caller's transaction (the
 * journal's worker appends in the batch it commits), so a record and what
 * it is about are kept or lost together. The chain's head in memory
 * (rr_audit_chain_t.head) moves only when the caller says the transaction
 * committed: appends advance a working head the caller holds, and
 * rr_audit_chain_commit makes it the chain's head after COMMIT returned.
 * After a rollback or a failed COMMIT the caller drops the working head
 * and starts the next transaction from chain.head again; nothing to undo.
 * As a last guard the INSERT itself checks that the working head is the
 * table's newest row, so a stale or wrong head fails the append
 * (RR_EINVAL) instead of forking the chain; rr_audit_head(db,
 * &chain.head) then reloads the head from the table.
 *
 *   rr_audit_head_t tip = chain.head;          // at BEGIN
 *   rr_audit_append(db, &chain, &tip, &rec1);  // any number of appends
 *   rr_audit_append(db, &chain, &tip, &rec2);
 *   if (COMMIT succeeded) rr_audit_chain_commit(&chain, &tip);
 *   else ROLLBACK;                             // tip is simply dropped
 *
 * Threading. No globals: functions may run on any thread; one chain and
 * its connection are used by one thread at a time (SQLite connections
 * opened NOMUTEX). Nothing calls back.
 *
 * Errors. 0 or a negative RR_E* code: RR_EINVAL (bad argument, data not
 * JSON, text not UTF-8, stale head), RR_ELIMIT (data over
 * RR_AUDIT_DATA_MAX, actor, kind or subject over RR_AUDIT_FIELD_MAX),
 * RR_ENOMEM, RR_EIO (SQLite or OpenSSL failed; the connection's
 * sqlite3_errmsg tells more).
 *
 * Privacy: data may hold patient identifiers. Nothing here logs, and
 * callers never log data above DEBUG. */
#ifndef RR_AUDIT_AUDIT_H
#define RR_AUDIT_AUDIT_H

#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define RR_AUDIT_HASH_HEX 64            /* characters of a hex SHA-256 */
#define RR_AUDIT_DATA_MAX (1024 * 1024) /* bytes of canonical data per record */
#define RR_AUDIT_FIELD_MAX 4096         /* bytes of actor, kind and subject each */

/* A position in the chain: the newest record's seq and hash (seq 0 and 64
 * zeros for an empty chain). A plain value: copy it freely. */
typedef struct rr_audit_head {
  int64_t seq;
  char hash[RR_AUDIT_HASH_HEX + 1]; /* lower-case hex, NUL-terminated */
} rr_audit_head_t;

/* The writer's state for one connection. Embedded by value:
 * rr_audit_chain_load / rr_audit_chain_close. */
typedef struct rr_audit_chain {
  rr_audit_head_t head;          /* newest committed record */
  struct rr_audit_chain_int *in; /* owned: prepared INSERT, digest context */
} rr_audit_chain_t;

/* One event to append. Every pointer is borrowed for the call. */
typedef struct rr_audit_record {
  int64_t at_ms;       /* when (ms since 1970); 0 = now */
  const char *actor;   /* who: a principal, "engine", a channel, "radrelay-cli"; required */
  const char *kind;    /* dispatch, result, finding, publish_oru, ack, verdict, ...; required */
  const char *subject; /* a job id, a Study Instance UID, ...; NULL = "" */
  const char *data;    /* JSON text of any value; NULL = null */
  size_t data_len;     /* bytes of data; 0 = up to its NUL */
} rr_audit_record_t;

/* What rr_audit_verify found. */
typedef enum rr_audit_fault {
  RR_AUDIT_INTACT = 0,
  RR_AUDIT_EDITED,   /* a record's fields no longer match its hash, or it was rewritten */
  RR_AUDIT_INSERTED, /* a record that was not appended sits in the chain */
  RR_AUDIT_DELETED,  /* records are missing (a gap, a missing start, or renumbering) */
  RR_AUDIT_REORDERED /* an intact record sits at another place than it was appended */
} rr_audit_fault_t;

typedef struct rr_audit_report {
  rr_audit_fault_t fault;
  int64_t records;      /* records read (all of them when intact) */
  rr_audit_head_t head; /* intact: the newest record (external anchoring) */
  int64_t seq;          /* not intact: the first bad record's seq */
  char detail[256];     /* not intact: why, in words; never the record's data */
} rr_audit_report_t;

/* rr_audit_schema: creates table audit and its triggers when missing (the
 * caller's connection; inside or outside a transaction). RR_EIO. */
int rr_audit_schema(sqlite3 *db);

/* rr_audit_chain_load: prepares the chain for appending on db (borrowed;
 * must outlive the chain's use) and reads the newest record into
 * chain->head; it does not re-check the chain (rr_audit_verify does).
 * chain is overwritten (close a loaded chain first). RR_EIO (no table:
 * call rr_audit_schema first), RR_ENOMEM. */
int rr_audit_chain_load(sqlite3 *db, rr_audit_chain_t *chain);
/* rr_audit_chain_close: frees what the chain owns; then it may be loaded
 * again. A zeroed chain closes as a no-op. */
void rr_audit_chain_close(rr_audit_chain_t *chain);

/* rr_audit_append: inserts rec (inside the caller's transaction) as the
 * record after *tip, then sets *tip to it. *tip starts as a copy of
 * chain->head when the transaction begins. data is checked (any JSON
 * value, no duplicate keys, no NUL in strings, integers within int64) and
 * stored in canonical form. On error nothing is inserted and *tip is
 * unchanged; the transaction is the caller's to roll back or go on with.
 * RR_EINVAL (bad record, or *tip is not the table's newest record),
 * RR_ELIMIT, RR_ENOMEM, RR_EIO (also SQLITE_BUSY or a full disk). Thread: the one using db. */
int rr_audit_append(sqlite3 *db, rr_audit_chain_t *chain, rr_audit_head_t *tip,
                    const rr_audit_record_t *rec);
/* rr_audit_chain_commit: the transaction holding the appends that led to
 * *tip committed: it becomes chain->head. Call only after COMMIT returned
 * SQLITE_OK. */
void rr_audit_chain_commit(rr_audit_chain_t *chain, const rr_audit_head_t *tip);

/* rr_audit_head: the newest record in the table (seq 0 and zeros when
 * there is none or no table), committed or in the connection's open
 * transaction. RR_EIO. */
int rr_audit_head(sqlite3 *db, rr_audit_head_t *out);

/* rr_audit_verify: re-checks the whole chain from seq 1 and fills *report:
 * intact, or the first bad record and why. Reads one snapshot (inside a
 * savepoint). A store without an audit table is an intact empty chain.
 * Returns 0 when the check ran, whatever it found; RR_EIO, RR_ENOMEM.
 * Cost: one SHA-256 per record; on a fault, up to one per record again to
 * find where a moved record came from. */
int rr_audit_verify(sqlite3 *db, rr_audit_report_t *report);

/* rr_audit_fault_name: "intact", "edited", "inserted", "deleted",
 * "reordered" (static). */
const char *rr_audit_fault_name(rr_audit_fault_t fault);

/* rr_audit_export: writes the records with since_ms <= at_ms < until_ms,
 * in seq order, to out (borrowed) as JSON lines: one object per record
 * with every column (seq, at_ms, actor, kind, subject, data, prev, hash),
 * data as a JSON value. Returns the number of records written, RR_EIO
 * (store or write error), RR_ENOMEM. Reads one snapshot. */
int64_t rr_audit_export(sqlite3 *db, int64_t since_ms, int64_t until_ms, FILE *out);

/* rr_audit_canonical: *out gets the canonical form of the JSON text (len
 * bytes; 0 = up to its NUL), malloc'd and NUL-terminated (owned by the
 * caller), and *out_len its length. RR_EINVAL (not JSON, or not within
 * what append accepts), RR_ELIMIT, RR_ENOMEM. Any thread. */
int rr_audit_canonical(const char *json, size_t len, char **out, size_t *out_len);

#endif

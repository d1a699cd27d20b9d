/* Unit tests of the audit trail (engine/audit): canonical data, append in
 * committed and rolled-back transactions, verify against every kind of
 * tampering, and the export's records re-hashed by an independent
 * implementation of the documented encoding. On real SQLite files in a
 * temporary folder.
 *
 *   test_audit                   run the tests
 *   test_audit --make-store DB   write a store with sample records (for
 *                                tests/integration/test_audit_cli.py) */
#include <inttypes.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "audit/audit.h"
#include "core/error.h"
#include "rr_test.h"

#define NRECORDS 10000

static char g_dir[256];
static char g_main[512];                                   /* the store with NRECORDS records */
static rr_audit_head_t g_head;                             /* its head after the appends */
static char g_hashes[NRECORDS + 1][RR_AUDIT_HASH_HEX + 1]; /* hash of each seq */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static sqlite3 *open_db(const char *path) {
  sqlite3 *db = NULL;
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK ||
      sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL", NULL, NULL, NULL) !=
          SQLITE_OK) {
    fprintf(stderr, "open %s: %s\n", path, sqlite3_errmsg(db));
    sqlite3_close(db);
    return NULL;
  }
  return db;
}

static int exec(sqlite3 *db, const char *sql) {
  char *err = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
  if (rc != SQLITE_OK && err && getenv("RR_TEST_VERBOSE"))
    fprintf(stderr, "sql: %s: %s\n", sql, err);
  sqlite3_free(err);
  return rc;
}

static int64_t query_int(sqlite3 *db, const char *sql) {
  sqlite3_stmt *st;
  int64_t v = -1;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

/* ---- the documented hash, written again from the header's description -- */

static void put_u64(unsigned char **p, uint64_t v) {
  for (int i = 7; i >= 0; i--)
    *(*p)++ = (unsigned char)(v >> (8 * i));
}

static void put_str(unsigned char **p, const char *s, size_t n) {
  put_u64(p, n);
  memcpy(*p, s, n);
  *p += n;
}

static void ref_hash(int64_t seq, int64_t at_ms, const char *actor, const char *kind,
                     const char *subject, const char *data, const char *prev,
                     char out[RR_AUDIT_HASH_HEX + 1]) {
  size_t cap = 128 + strlen(actor) + strlen(kind) + strlen(subject) + strlen(data);
  unsigned char *buf = malloc(cap), *p = buf;
  put_str(&p, "radrelay-audit-v1", 17);
  put_u64(&p, (uint64_t)seq);
  put_u64(&p, (uint64_t)at_ms);
  put_str(&p, actor, strlen(actor));
  put_str(&p, kind, strlen(kind));
  put_str(&p, subject, strlen(subject));
  put_str(&p, data, strlen(data));
  for (int i = 0; i < 32; i++) {
    unsigned v;
    sscanf(prev + 2 * i, "%2x", &v);
    *p++ = (unsigned char)v;
  }
  unsigned char md[32];
  unsigned int n = 0;
  EVP_Digest(buf, (size_t)(p - buf), md, &n, EVP_sha256(), NULL);
  for (int i = 0; i < 32; i++)
    snprintf(out + 2 * i, 3, "%02x", md[i]);
  free(buf);
}

/* ---- canonical data ------------------------------------------------------ */

static void test_canonical(void) {
  static const char *const cases[][2] = {
      {"{ \"b\" : 1, \"a\" : [true, false, null] }", "{\"a\":[true,false,null],\"b\":1}"},
      {"{\"z\":{\"y\":2,\"x\":1},\"\\u00e9\":0,\"e\":0,\"E\":0}",
       "{\"E\":0,\"e\":0,\"z\":{\"x\":1,\"y\":2},\"\xc3\xa9\":0}"},
      {"\"a/b \\\"q\\\" \\\\ \\n\\r\\t\\b\\f \\u0001 \\u001f \\u007f \\u00e9 \\u20ac\"",
       "\"a/b \\\"q\\\" \\\\ \\n\\r\\t\\b\\f \\u0001 \\u001f \x7f \xc3\xa9 \xe2\x82\xac\""},
      {"\"\\ud83d\\ude00\"", "\"\xf0\x9f\x98\x80\""},
      {"-0", "0"},
      {"9223372036854775807", "9223372036854775807"},
      {"-9223372036854775808", "-9223372036854775808"},
      {"0.1", "0.1"},
      {"1.0", "1.0"},
      {"-0.0", "-0.0"},
      {"1e2", "100.0"},
      {"1E5", "100000.0"},
      {"0.0001", "0.0001"},
      {"0.00001", "1e-05"},
      {"1e15", "1000000000000000.0"},
      {"1e16", "1e+16"},
      {"1.5e16", "1.5e+16"},
      {"123456789012345678.0", "1.2345678901234568e+17"},
      {"0.30000000000000004", "0.30000000000000004"},
      {"2.5e-7", "2.5e-07"},
      {"1.7976931348623157e308", "1.7976931348623157e+308"},
      {"5e-324", "5e-324"},
      {"3.14159", "3.14159"},
      {"[1, 2.50, \"x\", {}, []]", "[1,2.5,\"x\",{},[]]"},
      {"null", "null"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char *out = NULL;
    size_t n = 0;
    int rc = rr_audit_canonical(cases[i][0], 0, &out, &n);
    CHECK_EQ_INT(rc, 0);
    if (rc == 0)
      CHECK_MEM_STR(out, n, cases[i][1]);
    free(out);
  }
  static const char *const bad[] = {"",
                                    "{",
                                    "not json",
                                    "{\"a\":1,\"a\":2}",
                                    "\"\\u0000\"",
                                    "1e400",
                                    "NaN",
                                    "[1,]",
                                    "9223372036854775808",
                                    "\"\\ud800\"",
                                    "\"\xff\"",
                                    "{\"a\":1} trailing"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char *out = NULL;
    size_t n = 0;
    CHECK_EQ_INT(rr_audit_canonical(bad[i], 0, &out, &n), RR_EINVAL);
    CHECK(out == NULL);
  }
}

/* ---- append --------------------------------------------------------------- */

static const char *const actors[] = {"engine", "channel:results", "token:dr.smith", "radrelay-cli",
                                     "cxr-triage@2.1"};
static const char *const kinds[] = {"dispatch", "result",  "finding",   "notification",
                                    "ack",      "verdict", "publish_sr"};

/* Record i's fields: data written loosely (spaces, key order, floats) so
 * that canonicalization matters. */
static void sample(int i, rr_audit_record_t *r, char *subject, size_t scap, char *data, size_t dcap,
                   const char *tag) {
  snprintf(subject, scap, "%s1.2.840.113619.2.55.3.%d", tag, i);
  snprintf(data, dcap,
           "{ \"score\": %.17g, \"mrn\": \"MRN%06d\", \"model\": {\"version\": \"2.1.%d\","
           " \"name\": \"cxr-triage\"}, \"findings\": [\"pneumothorax\", %d],"
           " \"note\": \"na\\u00efve \\\"q\\\"\\n\", \"ratio\": %g }",
           i / 7.0, i, i % 13, i, i * 1e-6);
  memset(r, 0, sizeof *r);
  r->at_ms = 1795000000000LL + (int64_t)i * 1000;
  r->actor = actors[i % 5];
  r->kind = kinds[i % 7];
  r->subject = subject;
  r->data = data;
}

/* Appends records first..first+n-1 in one transaction; rolls it back
 * instead of committing when rollback is set. */
static int append_txn(sqlite3 *db, rr_audit_chain_t *chain, int first, int n, bool rollback,
                      double *append_s, rr_audit_head_t *tip_out) {
  if (exec(db, "BEGIN IMMEDIATE") != SQLITE_OK)
    return RR_EIO;
  rr_audit_head_t tip = chain->head;
  int rc = 0;
  for (int i = first; rc == 0 && i < first + n; i++) {
    rr_audit_record_t r;
    char subject[96], data[512];
    sample(i, &r, subject, sizeof subject, data, sizeof data, rollback ? "rolled-back-" : "");
    double t0 = now_s();
    rc = rr_audit_append(db, chain, &tip, &r);
    *append_s += now_s() - t0;
  }
  if (rc != 0 || rollback) {
    exec(db, "ROLLBACK");
  } else if (exec(db, "COMMIT") == SQLITE_OK) {
    rr_audit_chain_commit(chain, &tip);
  } else {
    exec(db, "ROLLBACK");
    rc = RR_EIO;
  }
  if (tip_out)
    *tip_out = tip;
  return rc;
}

static void test_append(void) {
  snprintf(g_main, sizeof g_main, "%s/main.db", g_dir);
  sqlite3 *db = open_db(g_main);
  CHECK(db != NULL);
  if (!db)
    return;
  CHECK_EQ_INT(rr_audit_schema(db), 0);
  CHECK_EQ_INT(rr_audit_schema(db), 0); /* again: IF NOT EXISTS */
  rr_audit_chain_t chain;
  CHECK_EQ_INT(rr_audit_chain_load(db, &chain), 0);
  CHECK_EQ_INT(chain.head.seq, 0);
  CHECK(strspn(chain.head.hash, "0") == RR_AUDIT_HASH_HEX);

  static const int sizes[] = {1, 2, 7, 100, 1000, 3, 250, 13, 500, 64, 1, 977};
  double append_s = 0, t0 = now_s();
  int done = 0, txns = 0;
  bool rolled = false;
  rr_audit_head_t stale = chain.head;
  while (done < NRECORDS) {
    int n = sizes[txns++ % (sizeof sizes / sizeof sizes[0])];
    if (n > NRECORDS - done)
      n = NRECORDS - done;
    if (!rolled && done > 3000) {
      /* A transaction that rolls back: its records must not appear, and
       * the head it reached must not be usable. */
      rr_audit_head_t lost;
      rr_audit_head_t before = chain.head;
      CHECK_EQ_INT(append_txn(db, &chain, done + 1, 40, true, &append_s, &lost), 0);
      CHECK_EQ_INT(lost.seq, before.seq + 40);
      CHECK_EQ_INT(chain.head.seq, before.seq);
      CHECK(strcmp(chain.head.hash, before.hash) == 0);
      rr_audit_record_t r;
      char subject[96], data[512];
      sample(0, &r, subject, sizeof subject, data, sizeof data, "stale-");
      CHECK_EQ_INT(rr_audit_append(db, &chain, &lost, &r), RR_EINVAL);  /* ahead */
      CHECK_EQ_INT(rr_audit_append(db, &chain, &stale, &r), RR_EINVAL); /* behind */
      CHECK_EQ_INT(lost.seq, before.seq + 40);
      rolled = true;
    }
    CHECK_EQ_INT(append_txn(db, &chain, done + 1, n, false, &append_s, NULL), 0);
    done += n;
  }
  double total_s = now_s() - t0;
  printf("# %d appends in %d transactions: %.0f appends/s in rr_audit_append, %.0f/s with "
         "commits (WAL, synchronous=NORMAL)\n",
         NRECORDS, txns + 1, NRECORDS / append_s, NRECORDS / total_s);

  CHECK_EQ_INT(chain.head.seq, NRECORDS);
  CHECK_EQ_INT(query_int(db, "SELECT count(*) FROM audit"), NRECORDS);
  CHECK_EQ_INT(query_int(db, "SELECT count(*) FROM audit WHERE subject LIKE 'rolled-back-%'"), 0);
  CHECK_EQ_INT(query_int(db, "SELECT count(*) FROM audit WHERE subject LIKE 'stale-%'"), 0);
  CHECK_EQ_INT(query_int(db, "SELECT max(seq) - min(seq) + 1 FROM audit"), NRECORDS);

  /* Records are stored canonical, and hash as the header says. */
  sqlite3_stmt *st;
  CHECK(sqlite3_prepare_v2(db,
                           "SELECT seq, at_ms, actor, kind, subject, data, prev, hash FROM audit"
                           " ORDER BY seq",
                           -1, &st, NULL) == SQLITE_OK);
  int mismatches = 0;
  char prev[RR_AUDIT_HASH_HEX + 1];
  memset(prev, '0', RR_AUDIT_HASH_HEX);
  prev[RR_AUDIT_HASH_HEX] = '\0';
  while (sqlite3_step(st) == SQLITE_ROW) {
    int64_t seq = sqlite3_column_int64(st, 0);
    char want[RR_AUDIT_HASH_HEX + 1];
    ref_hash(seq, sqlite3_column_int64(st, 1), (const char *)sqlite3_column_text(st, 2),
             (const char *)sqlite3_column_text(st, 3), (const char *)sqlite3_column_text(st, 4),
             (const char *)sqlite3_column_text(st, 5), prev, want);
    const char *hash = (const char *)sqlite3_column_text(st, 7);
    mismatches +=
        strcmp(want, hash) != 0 || strcmp(prev, (const char *)sqlite3_column_text(st, 6)) != 0;
    if (seq >= 1 && seq <= NRECORDS)
      memcpy(g_hashes[seq], hash, RR_AUDIT_HASH_HEX + 1);
    memcpy(prev, hash, sizeof prev);
    if (seq == 1) {
      CHECK(strcmp((const char *)sqlite3_column_text(st, 5),
                   "{\"findings\":[\"pneumothorax\",1],\"model\":{\"name\":\"cxr-triage\","
                   "\"version\":\"2.1.1\"},\"mrn\":\"MRN000001\",\"note\":\"na\xc3\xafve "
                   "\\\"q\\\"\\n\",\"ratio\":1e-06,\"score\":0.14285714285714285}") == 0);
      CHECK(strcmp((const char *)sqlite3_column_text(st, 2), "channel:results") == 0);
    }
  }
  sqlite3_finalize(st);
  CHECK_EQ_INT(mismatches, 0);

  rr_audit_report_t rep;
  CHECK_EQ_INT(rr_audit_verify(db, &rep), 0);
  CHECK_EQ_INT(rep.fault, RR_AUDIT_INTACT);
  CHECK_EQ_INT(rep.records, NRECORDS);
  CHECK_EQ_INT(rep.head.seq, NRECORDS);
  CHECK(strcmp(rep.head.hash, chain.head.hash) == 0);
  rr_audit_head_t h;
  CHECK_EQ_INT(rr_audit_head(db, &h), 0);
  CHECK(h.seq == chain.head.seq && strcmp(h.hash, chain.head.hash) == 0);
  g_head = chain.head;

  /* Bad records are refused and leave nothing behind. */
  rr_audit_head_t tip = chain.head;
  rr_audit_record_t r = {.actor = "engine", .kind = "result", .data = "{\"a\":1}"};
  const rr_audit_record_t bad[] = {
      {.actor = "", .kind = "result"},
      {.actor = "engine", .kind = NULL},
      {.actor = "engine", .kind = "result", .data = "not json"},
      {.actor = "engine", .kind = "result", .data = "{\"a\":1,\"a\":2}"},
      {.actor = "engine\xff", .kind = "result"},
      {.actor = "engine", .kind = "result", .subject = "\xc3("},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    CHECK_EQ_INT(rr_audit_append(db, &chain, &tip, &bad[i]), RR_EINVAL);
  CHECK_EQ_INT(tip.seq, NRECORDS);
  CHECK_EQ_INT(rr_audit_append(NULL, &chain, &tip, &r), RR_EINVAL);
  char *big = malloc(RR_AUDIT_DATA_MAX + 16);
  memset(big, ' ', RR_AUDIT_DATA_MAX + 15);
  big[0] = '"';
  big[RR_AUDIT_DATA_MAX + 14] = '"';
  big[RR_AUDIT_DATA_MAX + 15] = '\0';
  r.data = big;
  CHECK_EQ_INT(rr_audit_append(db, &chain, &tip, &r), RR_ELIMIT);
  r.data = NULL;
  big[RR_AUDIT_FIELD_MAX + 1] = '\0';
  r.subject = big;
  CHECK_EQ_INT(rr_audit_append(db, &chain, &tip, &r), RR_ELIMIT);
  r.subject = NULL;
  free(big);
  CHECK_EQ_INT(query_int(db, "SELECT count(*) FROM audit"), NRECORDS);

  /* The triggers refuse changes. */
  CHECK(exec(db, "UPDATE audit SET data = '{}' WHERE seq = 5") != SQLITE_OK);
  CHECK(exec(db, "DELETE FROM audit WHERE seq = 5") != SQLITE_OK);
  CHECK(exec(db, "DELETE FROM audit") != SQLITE_OK);
  CHECK_EQ_INT(query_int(db, "SELECT count(*) FROM audit"), NRECORDS);

  /* A reloaded chain carries on from the same head. */
  rr_audit_chain_close(&chain);
  rr_audit_chain_close(&chain); /* twice: no-op */
  CHECK_EQ_INT(rr_audit_chain_load(db, &chain), 0);
  CHECK(chain.head.seq == g_head.seq && strcmp(chain.head.hash, g_head.hash) == 0);
  rr_audit_chain_close(&chain);
  CHECK_EQ_INT(exec(db, "PRAGMA wal_checkpoint(TRUNCATE)"), SQLITE_OK);
  sqlite3_close(db);
}

/* A store without the table: verify says empty, load says no table. */
static void test_empty(void) {
  char path[512];
  snprintf(path, sizeof path, "%s/empty.db", g_dir);
  sqlite3 *db = open_db(path);
  if (!db)
    return;
  rr_audit_report_t rep;
  CHECK_EQ_INT(rr_audit_verify(db, &rep), 0);
  CHECK_EQ_INT(rep.fault, RR_AUDIT_INTACT);
  CHECK_EQ_INT(rep.records, 0);
  rr_audit_chain_t chain;
  CHECK_EQ_INT(rr_audit_chain_load(db, &chain), RR_EIO);
  CHECK(chain.in == NULL);
  CHECK_EQ_INT(rr_audit_export(db, 0, INT64_MAX, stdout), 0);
  /* With the table: a null data and a subject-less record. */
  CHECK_EQ_INT(rr_audit_schema(db), 0);
  CHECK_EQ_INT(rr_audit_chain_load(db, &chain), 0);
  rr_audit_head_t tip = chain.head;
  rr_audit_record_t r = {.actor = "engine", .kind = "config_change"};
  CHECK_EQ_INT(rr_audit_append(db, &chain, &tip, &r), 0); /* autocommit: its own txn */
  rr_audit_chain_commit(&chain, &tip);
  CHECK_EQ_INT(query_int(db, "SELECT count(*) FROM audit WHERE data = 'null' AND subject = ''"
                             " AND at_ms > 1700000000000"),
               1);
  CHECK_EQ_INT(rr_audit_verify(db, &rep), 0);
  CHECK_EQ_INT(rep.fault, RR_AUDIT_INTACT);
  CHECK_EQ_INT(rep.records, 1);
  rr_audit_chain_close(&chain);
  sqlite3_close(db);
}

/* ---- tampering ------------------------------------------------------------ */

typedef void (*tamper_fn)(sqlite3 *db);

static void run_sql(sqlite3 *db, const char *sql) {
  int rc = exec(db, sql);
  CHECK_EQ_INT(rc, SQLITE_OK);
  if (rc != SQLITE_OK)
    fprintf(stderr, "  %s: %s\n", sql, sqlite3_errmsg(db));
}

/* Renumbers records seq >= from by delta (+1 or -1), as an attacker who
 * wants no gap would. */
static void renumber(sqlite3 *db, int64_t from, int delta) {
  char sql[200];
  snprintf(sql, sizeof sql, "UPDATE audit SET seq = -(seq + %d) WHERE seq >= %" PRId64, delta,
           from);
  run_sql(db, sql);
  run_sql(db, "UPDATE audit SET seq = -seq WHERE seq < 0");
}

static void edit_data(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET data = replace(data, 'MRN005000', 'MRN999999') WHERE seq = 5000");
}
static void edit_at(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET at_ms = at_ms + 1 WHERE seq = 1234");
}
static void edit_actor(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET actor = 'token:someone-else' WHERE seq = 42");
}
static void edit_prev(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET prev = (SELECT prev FROM audit WHERE seq = 10) WHERE seq = 600");
}
static void delete_mid(sqlite3 *db) {
  run_sql(db, "DELETE FROM audit WHERE seq = 777");
}
static void delete_first(sqlite3 *db) {
  run_sql(db, "DELETE FROM audit WHERE seq = 1");
}
static void delete_first_renumber(sqlite3 *db) {
  run_sql(db, "DELETE FROM audit WHERE seq = 1");
  renumber(db, 2, -1);
}
static void delete_renumber(sqlite3 *db) {
  run_sql(db, "DELETE FROM audit WHERE seq BETWEEN 3000 AND 3002");
  renumber(db, 3003, -3);
}
static void swap_records(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET seq = -1 WHERE seq = 2000");
  run_sql(db, "UPDATE audit SET seq = 2000 WHERE seq = 6000");
  run_sql(db, "UPDATE audit SET seq = 6000 WHERE seq = -1");
}
static void swap_adjacent(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET seq = -1 WHERE seq = 100");
  run_sql(db, "UPDATE audit SET seq = 100 WHERE seq = 101");
  run_sql(db, "UPDATE audit SET seq = 101 WHERE seq = -1");
}
static void swap_data(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET data = CASE seq WHEN 8000 THEN"
              " (SELECT data FROM audit WHERE seq = 8001) ELSE"
              " (SELECT data FROM audit WHERE seq = 8000) END WHERE seq IN (8000, 8001)");
}

/* A forged record made as the writer would make it (hash and prev right
 * for its place), inserted at 4000 with the later ones renumbered. */
static void insert_forged(sqlite3 *db) {
  renumber(db, 4000, 1);
  char hash[RR_AUDIT_HASH_HEX + 1];
  const char *data = "{\"finding\":\"none\"}";
  ref_hash(4000, 1795003999500LL, "engine", "verdict", "1.2.3", data, g_hashes[3999], hash);
  char sql[512];
  snprintf(sql, sizeof sql,
           "INSERT INTO audit VALUES(4000, 1795003999500, 'engine', 'verdict', '1.2.3', '%s',"
           " '%s', '%s')",
           data, g_hashes[3999], hash);
  run_sql(db, sql);
}

/* Record 500 edited and given a fresh, correct hash: 501 no longer follows. */
static void rewrite_one(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET data = '{\"edited\":true}' WHERE seq = 500");
  sqlite3_stmt *st;
  CHECK(sqlite3_prepare_v2(db,
                           "SELECT at_ms, actor, kind, subject, data, prev FROM audit"
                           " WHERE seq = 500",
                           -1, &st, NULL) == SQLITE_OK);
  CHECK(sqlite3_step(st) == SQLITE_ROW);
  char hash[RR_AUDIT_HASH_HEX + 1];
  ref_hash(500, sqlite3_column_int64(st, 0), (const char *)sqlite3_column_text(st, 1),
           (const char *)sqlite3_column_text(st, 2), (const char *)sqlite3_column_text(st, 3),
           (const char *)sqlite3_column_text(st, 4), (const char *)sqlite3_column_text(st, 5),
           hash);
  sqlite3_finalize(st);
  char sql[200];
  snprintf(sql, sizeof sql, "UPDATE audit SET hash = '%s' WHERE seq = 500", hash);
  run_sql(db, sql);
}

static void delete_last(sqlite3 *db) {
  char sql[100];
  snprintf(sql, sizeof sql, "DELETE FROM audit WHERE seq = %d", NRECORDS);
  run_sql(db, sql);
}

/* Every record from 9990 on rewritten with fresh hashes: a valid chain
 * that only an anchored head tells apart. */
static void rewrite_tail(sqlite3 *db) {
  run_sql(db, "UPDATE audit SET data = '{\"rewritten\":true}' WHERE seq >= 9990");
  sqlite3_stmt *st, *up;
  CHECK(sqlite3_prepare_v2(db,
                           "SELECT seq, at_ms, actor, kind, subject, data FROM audit"
                           " WHERE seq >= 9990 ORDER BY seq",
                           -1, &st, NULL) == SQLITE_OK);
  CHECK(sqlite3_prepare_v2(db, "UPDATE audit SET prev = ?2, hash = ?3 WHERE seq = ?1", -1, &up,
                           NULL) == SQLITE_OK);
  char prev[RR_AUDIT_HASH_HEX + 1], hash[RR_AUDIT_HASH_HEX + 1];
  memcpy(prev, g_hashes[9989], sizeof prev);
  while (sqlite3_step(st) == SQLITE_ROW) {
    ref_hash(sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1),
             (const char *)sqlite3_column_text(st, 2), (const char *)sqlite3_column_text(st, 3),
             (const char *)sqlite3_column_text(st, 4), (const char *)sqlite3_column_text(st, 5),
             prev, hash);
    sqlite3_bind_int64(up, 1, sqlite3_column_int64(st, 0));
    sqlite3_bind_text(up, 2, prev, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(up, 3, hash, -1, SQLITE_TRANSIENT);
    CHECK(sqlite3_step(up) == SQLITE_DONE);
    sqlite3_reset(up);
    memcpy(prev, hash, sizeof prev);
  }
  sqlite3_finalize(st);
  sqlite3_finalize(up);
}

/* Copies the main store, drops the triggers (as an attacker would),
 * tampers, verifies. */
static void tamper(const char *name, tamper_fn fn, rr_audit_fault_t want, int64_t want_seq,
                   rr_audit_report_t *out) {
  char path[512], sql[600];
  snprintf(path, sizeof path, "%s/%s.db", g_dir, name);
  unlink(path);
  sqlite3 *src = open_db(g_main);
  if (!src)
    return;
  snprintf(sql, sizeof sql, "VACUUM INTO '%s'", path);
  CHECK_EQ_INT(exec(src, sql), SQLITE_OK);
  sqlite3_close(src);
  sqlite3 *db = open_db(path);
  if (!db)
    return;
  run_sql(db, "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete");
  fn(db);
  rr_audit_report_t rep;
  double t0 = now_s();
  CHECK_EQ_INT(rr_audit_verify(db, &rep), 0);
  double dt = now_s() - t0;
  int failures = rr_test_failures;
  CHECK_EQ_INT(rep.fault, want);
  if (want != RR_AUDIT_INTACT)
    CHECK_EQ_INT(rep.seq, want_seq);
  if (rep.fault)
    printf("# %-22s record %" PRId64 ": %s: %s (%.0f ms)\n", name, rep.seq,
           rr_audit_fault_name(rep.fault), rep.detail, dt * 1e3);
  else
    printf("# %-22s %" PRId64 " records, chain intact, head %.12s... (%.0f ms)\n", name,
           rep.records, rep.head.hash, dt * 1e3);
  if (rr_test_failures != failures)
    fprintf(stderr, "  case %s: got %s at %" PRId64 " (%s)\n", name, rr_audit_fault_name(rep.fault),
            rep.seq, rep.detail);
  if (out)
    *out = rep;
  sqlite3_close(db);
  unlink(path);
}

static void test_tamper(void) {
  tamper("edit_data", edit_data, RR_AUDIT_EDITED, 5000, NULL);
  tamper("edit_at_ms", edit_at, RR_AUDIT_EDITED, 1234, NULL);
  tamper("edit_actor", edit_actor, RR_AUDIT_EDITED, 42, NULL);
  tamper("edit_prev", edit_prev, RR_AUDIT_EDITED, 600, NULL);
  tamper("rewrite_one", rewrite_one, RR_AUDIT_EDITED, 500, NULL);
  tamper("delete_mid", delete_mid, RR_AUDIT_DELETED, 777, NULL);
  tamper("delete_first", delete_first, RR_AUDIT_DELETED, 1, NULL);
  tamper("delete_first_renumber", delete_first_renumber, RR_AUDIT_DELETED, 1, NULL);
  tamper("delete_renumber", delete_renumber, RR_AUDIT_DELETED, 3000, NULL);
  tamper("insert_forged", insert_forged, RR_AUDIT_INSERTED, 4000, NULL);
  tamper("swap_records", swap_records, RR_AUDIT_REORDERED, 2000, NULL);
  tamper("swap_adjacent", swap_adjacent, RR_AUDIT_REORDERED, 100, NULL);
  tamper("swap_data", swap_data, RR_AUDIT_EDITED, 8000, NULL);

  /* Tail truncation and a rewritten tail leave a valid chain: only the
   * head anchored earlier shows them. */
  rr_audit_report_t rep;
  tamper("delete_last", delete_last, RR_AUDIT_INTACT, 0, &rep);
  CHECK_EQ_INT(rep.records, NRECORDS - 1);
  CHECK_EQ_INT(rep.head.seq, NRECORDS - 1);
  CHECK(strcmp(rep.head.hash, g_hashes[NRECORDS - 1]) == 0);
  CHECK(rep.head.seq < g_head.seq);
  tamper("rewrite_tail", rewrite_tail, RR_AUDIT_INTACT, 0, &rep);
  CHECK_EQ_INT(rep.head.seq, g_head.seq);
  CHECK(strcmp(rep.head.hash, g_head.hash) != 0);
}

/* ---- export ----------------------------------------------------------------- */

/* Re-hashes every exported line with ref_hash; returns the lines read. */
static int64_t check_export(const char *path, int64_t first_seq, char *last_hash) {
  FILE *f = fopen(path, "r");
  CHECK(f != NULL);
  if (!f)
    return -1;
  char *line = NULL;
  size_t cap = 0;
  int64_t n = 0, bad = 0;
  char prev[RR_AUDIT_HASH_HEX + 1] = "";
  while (getline(&line, &cap, f) > 0) {
    json_error_t err;
    json_t *o = json_loads(line, 0, &err);
    CHECK(o != NULL);
    if (!o)
      break;
    int64_t seq = json_integer_value(json_object_get(o, "seq"));
    const char *p = json_string_value(json_object_get(o, "prev"));
    const char *h = json_string_value(json_object_get(o, "hash"));
    CHECK_EQ_INT(json_object_size(o), 8);
    CHECK(json_is_object(json_object_get(o, "data")));
    char *dumped = json_dumps(json_object_get(o, "data"), JSON_ENCODE_ANY | JSON_COMPACT);
    char *canon = NULL;
    size_t clen;
    CHECK_EQ_INT(rr_audit_canonical(dumped, 0, &canon, &clen), 0);
    char want[RR_AUDIT_HASH_HEX + 1];
    ref_hash(seq, json_integer_value(json_object_get(o, "at_ms")),
             json_string_value(json_object_get(o, "actor")),
             json_string_value(json_object_get(o, "kind")),
             json_string_value(json_object_get(o, "subject")), canon ? canon : "", p ? p : "",
             want);
    bad += seq != first_seq + n || !h || strcmp(want, h) != 0 || (n > 0 && strcmp(prev, p) != 0);
    if (h)
      snprintf(prev, sizeof prev, "%s", h);
    free(canon);
    free(dumped);
    json_decref(o);
    n++;
  }
  free(line);
  fclose(f);
  CHECK_EQ_INT(bad, 0);
  if (last_hash)
    memcpy(last_hash, prev, sizeof prev);
  return n;
}

static void test_export(void) {
  sqlite3 *db;
  CHECK(sqlite3_open_v2(g_main, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK);
  char path[512];
  snprintf(path, sizeof path, "%s/export.jsonl", g_dir);
  FILE *f = fopen(path, "w");
  double t0 = now_s();
  CHECK_EQ_INT(rr_audit_export(db, INT64_MIN, INT64_MAX, f), NRECORDS);
  double dt = now_s() - t0;
  fclose(f);
  printf("# export: %d records in %.0f ms\n", NRECORDS, dt * 1e3);
  char last[RR_AUDIT_HASH_HEX + 1];
  CHECK_EQ_INT(check_export(path, 1, last), NRECORDS);
  CHECK(strcmp(last, g_head.hash) == 0);

  /* A window: records 101..200 by time (at_ms = base + i s), until excluded. */
  f = fopen(path, "w");
  CHECK_EQ_INT(rr_audit_export(db, 1795000000000LL + 101000, 1795000000000LL + 201000, f), 100);
  fclose(f);
  CHECK_EQ_INT(check_export(path, 101, NULL), 100);
  f = fopen(path, "w");
  CHECK_EQ_INT(rr_audit_export(db, 0, 1, f), 0);
  fclose(f);
  unlink(path);
  sqlite3_close(db);
}

/* ---- a store for the CLI test ---------------------------------------------- */

static int make_store(const char *path) {
  unlink(path);
  sqlite3 *db = open_db(path);
  if (!db || rr_audit_schema(db) != 0)
    return 1;
  rr_audit_chain_t chain;
  if (rr_audit_chain_load(db, &chain) != 0)
    return 1;
  static const char *const extra[] = {
      "{\"reals\":[0.1,1.0,-0.0,1e-05,1e16,2.5e-7,1.7976931348623157e308,5e-324,"
      "0.30000000000000004,123456789012345678.0,3.14159]}",
      "{\"text\":\"tab\\there \\u0001 \\u001f \\u007f / \\u00e9 \\u20ac \\ud83d\\ude00\","
      "\"\\u00e9\":1,\"e\":2,\"E\":3,\"\":4}",
      "[1,\"two\",{\"b\":null,\"a\":true}]",
      "\"just a string\"",
      "42",
      "null"};
  int rc = exec(db, "BEGIN") == SQLITE_OK ? 0 : 1;
  rr_audit_head_t tip = chain.head;
  for (int i = 1; rc == 0 && i <= 200; i++) {
    rr_audit_record_t r;
    char subject[96], data[512];
    sample(i, &r, subject, sizeof subject, data, sizeof data, "");
    if (i <= (int)(sizeof extra / sizeof extra[0]))
      r.data = extra[i - 1];
    rc = rr_audit_append(db, &chain, &tip, &r);
  }
  if (rc == 0 && exec(db, "COMMIT") == SQLITE_OK)
    rr_audit_chain_commit(&chain, &tip);
  else
    rc = 1;
  if (rc == 0)
    printf("%" PRId64 " %s\n", chain.head.seq, chain.head.hash);
  rr_audit_chain_close(&chain);
  exec(db, "PRAGMA wal_checkpoint(TRUNCATE)");
  sqlite3_close(db);
  return rc ? 1 : 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "--make-store") == 0)
    return make_store(argv[2]);
  const char *tmp = getenv("TMPDIR");
  snprintf(g_dir, sizeof g_dir, "%s/rr-audit-XXXXXX",
           tmp && *tmp && strlen(tmp) < 200 ? tmp : "/tmp");
  if (!mkdtemp(g_dir)) {
    perror("mkdtemp");
    return 1;
  }
  RUN(test_canonical);
  RUN(test_append);
  RUN(test_empty);
  RUN(test_tamper);
  RUN(test_export);
  char cmd[512];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", g_dir);
  return TEST_SUMMARY();
}

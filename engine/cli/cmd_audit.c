/* radrelay audit verify|export: the audit trail of a store, from the
 * command line. Both read the store read-only (SQLite allows it beside the
 * running engine) and see one snapshot of it. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "audit/audit.h"
#include "cli/cli.h"
#include "cli/config.h"
#include "core/error.h"

static void usage(FILE *f) {
  fprintf(f, "usage: radrelay audit verify -c CONFIG [--anchor SEQ:HASH]\n"
             "       radrelay audit export -c CONFIG [--since TIME] [--until TIME] [--out FILE]\n"
             "  verify: re-check the hash chain; exit 0 when intact, 1 when not.\n"
             "          --anchor: also check that record SEQ still has the hash logged earlier\n"
             "  export: records with since <= time < until as JSON lines (stdout by default)\n"
             "  TIME: 2026-11-27, 2026-11-27T10:00[:00][Z] (UTC) or milliseconds since 1970\n");
}

static const char *opt(int argc, char **argv, const char *name, const char *alias) {
  for (int i = 0; i + 1 < argc; i++)
    if (strcmp(argv[i], name) == 0 || (alias && strcmp(argv[i], alias) == 0))
      return argv[i + 1];
  return NULL;
}

/* Every argument is a known option with its value. */
static bool args_ok(int argc, char **argv, const char *const *known) {
  for (int i = 0; i < argc; i += 2) {
    bool found = false;
    for (const char *const *k = known; *k; k++)
      found |= strcmp(argv[i], *k) == 0;
    if (!found || i + 1 >= argc)
      return false;
  }
  return true;
}

/* "2026-11-27", "2026-11-27T10:00", "2026-11-27T10:00:00", optionally
 * ending in Z (all UTC), or ms since 1970. */
static int parse_time(const char *s, int64_t *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (*s && *end == '\0' && errno == 0 && v >= 0) {
    *out = v;
    return 0;
  }
  static const char *const formats[] = {"%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"};
  for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++) {
    struct tm tm = {0};
    const char *r = strptime(s, formats[i], &tm);
    if (r && (*r == '\0' || strcmp(r, "Z") == 0)) {
      *out = (int64_t)timegm(&tm) * 1000;
      return 0;
    }
  }
  return -1;
}

static int open_store(int argc, char **argv, sqlite3 **db) {
  *db = NULL;
  const char *path = opt(argc, argv, "-c", "--config");
  if (!path) {
    fprintf(stderr, "radrelay audit: -c CONFIG is required\n");
    return 2;
  }
  rr_config_t cfg;
  rr_buf_t err;
  rr_buf_init(&err, 1 << 20);
  int rc = 0;
  if (rr_config_load(path, &cfg, &err) != 0) {
    fputs(err.data ? err.data : "configuration invalid\n", stderr);
    rc = 1;
  } else if (sqlite3_open_v2(cfg.store_path, db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK ||
             sqlite3_exec(*db, "PRAGMA busy_timeout=10000", NULL, NULL, NULL) != SQLITE_OK) {
    fprintf(stderr, "radrelay audit: store %s: %s\n", cfg.store_path, sqlite3_errmsg(*db));
    sqlite3_close(*db);
    *db = NULL;
    rc = 1;
  }
  rr_buf_close(&err);
  rr_config_free(&cfg);
  return rc;
}

/* With an anchor SEQ:HASH: 0 when record SEQ has that hash, 1 otherwise. */
static int check_anchor(sqlite3 *db, const char *anchor, const rr_audit_report_t *r) {
  char *end;
  errno = 0;
  long long seq = strtoll(anchor, &end, 10);
  const char *hash = *end == ':' ? end + 1 : NULL;
  if (errno || seq <= 0 || !hash || strlen(hash) != RR_AUDIT_HASH_HEX) {
    fprintf(stderr, "radrelay audit: --anchor wants SEQ:HASH (64 hex digits)\n");
    return 2;
  }
  if (seq > r->head.seq) {
    printf("audit: anchor %lld is past the newest record (%" PRId64 "): records deleted from "
           "the end\n",
           seq, r->head.seq);
    return 1;
  }
  sqlite3_stmt *st;
  int rc = 1;
  if (sqlite3_prepare_v2(db, "SELECT hash FROM audit WHERE seq = ?", -1, &st, NULL) != SQLITE_OK) {
    fprintf(stderr, "radrelay audit: %s\n", sqlite3_errmsg(db));
    return 1;
  }
  sqlite3_bind_int64(st, 1, seq);
  if (sqlite3_step(st) == SQLITE_ROW) {
    const char *got = (const char *)sqlite3_column_text(st, 0);
    if (got && strcasecmp(got, hash) == 0)
      rc = 0;
    else
      printf("audit: anchor %lld does not match: the chain was rewritten up to it\n", seq);
  } else {
    fprintf(stderr, "radrelay audit: %s\n", sqlite3_errmsg(db));
  }
  sqlite3_finalize(st);
  return rc;
}

static int verify_cmd(int argc, char **argv) {
  static const char *const known[] = {"-c", "--config", "--anchor", NULL};
  if (!args_ok(argc, argv, known)) {
    usage(stderr);
    return 2;
  }
  sqlite3 *db;
  int rc = open_store(argc, argv, &db);
  if (rc != 0)
    return rc;
  rr_audit_report_t r;
  int err = rr_audit_verify(db, &r);
  const char *anchor = opt(argc, argv, "--anchor", NULL);
  if (err != 0) {
    fprintf(stderr, "radrelay audit: verify: %s (%s)\n", rr_strerror(err), sqlite3_errmsg(db));
    rc = 1;
  } else if (r.fault != RR_AUDIT_INTACT) {
    printf("audit: record %" PRId64 ": %s: %s\n", r.seq, rr_audit_fault_name(r.fault), r.detail);
    rc = 1;
  } else if ((rc = anchor ? check_anchor(db, anchor, &r) : 0) == 0) {
    printf("audit: %" PRId64 " records, chain intact, head %s%s\n", r.records, r.head.hash,
           anchor ? ", anchor matches" : "");
  }
  sqlite3_close(db);
  return rc;
}

static int export_cmd(int argc, char **argv) {
  static const char *const known[] = {"-c", "--config", "--since", "--until", "--out", NULL};
  const char *since = opt(argc, argv, "--since", NULL), *until = opt(argc, argv, "--until", NULL);
  const char *path = opt(argc, argv, "--out", NULL);
  int64_t t0 = INT64_MIN, t1 = INT64_MAX;
  if (!args_ok(argc, argv, known) || (since && parse_time(since, &t0)) ||
      (until && parse_time(until, &t1))) {
    usage(stderr);
    return 2;
  }
  sqlite3 *db;
  int rc = open_store(argc, argv, &db);
  if (rc != 0)
    return rc;
  FILE *out = stdout;
  if (path) {
    /* The trail may hold patient identifiers: the file is the owner's only. */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    out = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!out) {
      fprintf(stderr, "radrelay audit: %s: %s\n", path, strerror(errno));
      if (fd >= 0)
        close(fd);
      sqlite3_close(db);
      return 1;
    }
  }
  int64_t n = rr_audit_export(db, t0, t1, out);
  if (n < 0) {
    fprintf(stderr, "radrelay audit: export: %s (%s)\n", rr_strerror((int)n), sqlite3_errmsg(db));
    rc = 1;
  }
  if (path) {
    if (fclose(out) != 0 && rc == 0) {
      fprintf(stderr, "radrelay audit: %s: %s\n", path, strerror(errno));
      rc = 1;
    }
    if (rc == 0)
      fprintf(stderr, "audit: %" PRId64 " records written to %s\n", n, path);
  }
  sqlite3_close(db);
  return rc;
}

int rr_cmd_audit(int argc, char **argv) {
  if (argc >= 1 && strcmp(argv[0], "verify") == 0)
    return verify_cmd(argc - 1, argv + 1);
  if (argc >= 1 && strcmp(argv[0], "export") == 0)
    return export_cmd(argc - 1, argv + 1);
  if (argc >= 1 && (strcmp(argv[0], "--help") == 0 || strcmp(argv[0], "-h") == 0)) {
    usage(stdout);
    return 0;
  }
  usage(stderr);
  return 2;
}

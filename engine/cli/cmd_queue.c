/* radrelay queue ls|show|retry|drop and radrelay replay: the destination
 * queues of a store, from the command line.
 *
 * Reading commands read the store directly (SQLite allows it beside the
 * running engine). Changing commands go through the running engine when
 * there is one (a row in queue_ops and SIGUSR2: the engine's scheduler
 * applies it and records it), else retry and drop change the store
 * directly, for the next start. A replay runs the message through its
 * channel's script again and queues what the script routes to the chosen
 * destination: only the engine does that, so without a running engine the
 * request waits in queue_ops for its next start. */
#include <errno.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/config.h"

typedef struct qcli {
  rr_config_t cfg;
  sqlite3 *db;
  long pid; /* the running engine, or 0 */
} qcli_t;

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void age(int64_t ms, char *out, size_t cap) {
  if (ms <= 0) {
    snprintf(out, cap, "-");
    return;
  }
  int64_t s = (now_ms() - ms) / 1000;
  if (s < 0)
    s = 0;
  if (s < 120)
    snprintf(out, cap, "%llds", (long long)s);
  else if (s < 7200)
    snprintf(out, cap, "%lldm", (long long)(s / 60));
  else if (s < 172800)
    snprintf(out, cap, "%lldh", (long long)(s / 3600));
  else
    snprintf(out, cap, "%lldd", (long long)(s / 86400));
}

static const char *config_path(int argc, char **argv) {
  for (int i = 0; i + 1 < argc; i++)
    if (strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0)
      return argv[i + 1];
  return NULL;
}

/* Arguments that are not options (nor option values). */
static int positional(int argc, char **argv, const char **out, int max) {
  static const char *const with_value[] = {"-c",    "--config",    "--limit", "--to",    "--id",
                                           "--mrn", "--accession", "--since", "--until", NULL};
  int n = 0;
  for (int i = 0; i < argc; i++) {
    bool takes = false;
    for (const char *const *w = with_value; *w; w++)
      takes |= strcmp(argv[i], *w) == 0;
    if (takes) {
      i++;
      continue;
    }
    if (argv[i][0] == '-')
      continue;
    if (n < max)
      out[n] = argv[i];
    n++;
  }
  return n;
}

static const char *opt(int argc, char **argv, const char *name) {
  for (int i = 0; i + 1 < argc; i++)
    if (strcmp(argv[i], name) == 0)
      return argv[i + 1];
  return NULL;
}

static bool flag(int argc, char **argv, const char *name) {
  for (int i = 0; i < argc; i++)
    if (strcmp(argv[i], name) == 0)
      return true;
  return false;
}

static int open_store(qcli_t *q, int argc, char **argv, bool write) {
  memset(q, 0, sizeof *q);
  const char *path = config_path(argc, argv);
  if (!path) {
    fprintf(stderr, "radrelay: -c CONFIG is required\n");
    return 2;
  }
  rr_buf_t err;
  rr_buf_init(&err, 1 << 20);
  if (rr_config_load(path, &q->cfg, &err) != 0) {
    fputs(err.data ? err.data : "configuration invalid\n", stderr);
    rr_buf_close(&err);
    rr_config_free(&q->cfg);
    return 1;
  }
  rr_buf_close(&err);
  int flags = write ? SQLITE_OPEN_READWRITE : SQLITE_OPEN_READONLY;
  if (sqlite3_open_v2(q->cfg.store_path, &q->db, flags, NULL) != SQLITE_OK ||
      sqlite3_exec(q->db, "PRAGMA busy_timeout=10000", NULL, NULL, NULL) != SQLITE_OK) {
    fprintf(stderr, "radrelay: store %s: %s\n", q->cfg.store_path, sqlite3_errmsg(q->db));
    sqlite3_close(q->db);
    rr_config_free(&q->cfg);
    return 1;
  }
  char pidfile[4200];
  snprintf(pidfile, sizeof pidfile, "%s.pid", q->cfg.store_path);
  FILE *f = fopen(pidfile, "r");
  if (f) {
    if (fscanf(f, "%ld", &q->pid) != 1 || q->pid <= 1 || kill((pid_t)q->pid, 0) != 0)
      q->pid = 0;
    fclose(f);
  }
  return 0;
}

static void close_store(qcli_t *q) {
  sqlite3_close(q->db);
  rr_config_free(&q->cfg);
}

static const rr_destination_config_t *configured(const qcli_t *q, const char *name) {
  for (size_t i = 0; i < q->cfg.nchannels; i++)
    for (size_t k = 0; k < q->cfg.channels[i].ndestinations; k++)
      if (strcmp(q->cfg.channels[i].destinations[k].name, name) == 0)
        return &q->cfg.channels[i].destinations[k];
  return NULL;
}

static int queue_ls(qcli_t *q) {
  printf("%-32s %-5s %9s %7s %7s\n", "DESTINATION", "KIND", "PENDING", "DEAD", "OLDEST");
  /* Configured destinations first (also when empty), then any the store
   * still holds rows for. */
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(q->db,
                         "SELECT sum(state = 'pending'), sum(state = 'dead'), min(enqueued_ms)"
                         " FROM queue WHERE destination = ?",
                         -1, &st, NULL) != SQLITE_OK)
    goto fail;
  for (size_t i = 0; i < q->cfg.nchannels; i++)
    for (size_t k = 0; k < q->cfg.channels[i].ndestinations; k++) {
      const rr_destination_config_t *d = &q->cfg.channels[i].destinations[k];
      sqlite3_bind_text(st, 1, d->name, -1, SQLITE_STATIC);
      char a[32] = "-";
      long long pending = 0, dead = 0;
      if (sqlite3_step(st) == SQLITE_ROW) {
        pending = sqlite3_column_int64(st, 0);
        dead = sqlite3_column_int64(st, 1);
        age(sqlite3_column_int64(st, 2), a, sizeof a);
      }
      sqlite3_reset(st);
      printf("%-32s %-5s %9lld %7lld %7s\n", d->name, rr_dest_kind_name(d->kind), pending, dead, a);
    }
  sqlite3_finalize(st);
  if (sqlite3_prepare_v2(q->db,
                         "SELECT destination, sum(state = 'pending'), sum(state = 'dead'),"
                         " min(enqueued_ms) FROM queue GROUP BY destination ORDER BY destination",
                         -1, &st, NULL) != SQLITE_OK)
    goto fail;
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *name = (const char *)sqlite3_column_text(st, 0);
    if (configured(q, name))
      continue;
    char a[32];
    age(sqlite3_column_int64(st, 3), a, sizeof a);
    printf("%-32s %-5s %9lld %7lld %7s  (not configured)\n", name, "?",
           (long long)sqlite3_column_int64(st, 1), (long long)sqlite3_column_int64(st, 2), a);
  }
  sqlite3_finalize(st);
  return 0;
fail:
  fprintf(stderr, "radrelay queue: %s\n", sqlite3_errmsg(q->db));
  return 1;
}

static int queue_show(qcli_t *q, const char *dest, bool dead_only, long limit) {
  sqlite3_stmt *st;
  const char *sql =
      "SELECT q.id, q.message_id, coalesce(m.control_id, ''), coalesce(m.message_type, ''),"
      " q.lane, q.state, q.attempts, q.not_before_ms, coalesce(q.last_error, ''), q.enqueued_ms"
      " FROM queue q LEFT JOIN messages m ON m.id = q.message_id"
      " WHERE q.destination = ?1 AND (?2 = 0 OR q.state = 'dead') ORDER BY q.id LIMIT ?3";
  if (sqlite3_prepare_v2(q->db, sql, -1, &st, NULL) != SQLITE_OK) {
    fprintf(stderr, "radrelay queue: %s\n", sqlite3_errmsg(q->db));
    return 1;
  }
  sqlite3_bind_text(st, 1, dest, -1, SQLITE_STATIC);
  sqlite3_bind_int(st, 2, dead_only);
  sqlite3_bind_int64(st, 3, limit);
  printf("%-10s %-10s %-24s %-10s %-8s %-7s %8s %7s  %s\n", "ID", "MESSAGE", "CONTROL ID", "TYPE",
         "PRIORITY", "STATE", "ATTEMPTS", "AGE", "LAST ERROR");
  static const char *const lanes[] = {"routine", "stat", "critical"};
  int n = 0;
  while (sqlite3_step(st) == SQLITE_ROW) {
    int lane = sqlite3_column_int(st, 4);
    char a[32];
    age(sqlite3_column_int64(st, 9), a, sizeof a);
    printf("%-10lld %-10lld %-24.24s %-10.10s %-8s %-7s %8lld %7s  %s\n",
           (long long)sqlite3_column_int64(st, 0), (long long)sqlite3_column_int64(st, 1),
           sqlite3_column_text(st, 2), sqlite3_column_text(st, 3),
           lane >= 0 && lane <= 2 ? lanes[lane] : "?", sqlite3_column_text(st, 5),
           (long long)sqlite3_column_int64(st, 6), a, sqlite3_column_text(st, 8));
    n++;
  }
  sqlite3_finalize(st);
  if (n == 0)
    printf("(nothing queued%s for %s)\n", dead_only ? " dead" : "", dest);
  return 0;
}

static int exec1(sqlite3 *db, const char *sql, const char *dest, int64_t a, int64_t b) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
    return -1;
  int np = sqlite3_bind_parameter_count(st);
  sqlite3_bind_text(st, 1, dest, -1, SQLITE_STATIC);
  if (np >= 2)
    sqlite3_bind_int64(st, 2, a);
  if (np >= 3)
    sqlite3_bind_int64(st, 3, b);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? sqlite3_changes(db) : -1;
}

/* An operator request: through the running engine (queue_ops), else on
 * the store. Returns the rows changed (or 1 when handed over), -1 on error. */
static int apply(qcli_t *q, const char *op, const char *dest, int64_t queue_id,
                 int64_t message_id) {
  int64_t t = now_ms();
  /* A replay runs the channel's script, which only the engine has: it is
   * always left for the engine (now, or when it next starts). */
  if (q->pid || strcmp(op, "replay") == 0) {
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(q->db,
                           "INSERT INTO queue_ops(op, destination, queue_id, message_id, at_ms)"
                           " VALUES(?, ?, ?, ?, ?)",
                           -1, &st, NULL) != SQLITE_OK)
      return -1;
    sqlite3_bind_text(st, 1, op, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, dest, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, queue_id);
    sqlite3_bind_int64(st, 4, message_id);
    sqlite3_bind_int64(st, 5, t);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 1 : -1;
  }
  if (strcmp(op, "retry") == 0 || strcmp(op, "retry_dead") == 0) {
    int n = exec1(q->db,
                  strcmp(op, "retry") == 0
                      ? "UPDATE queue SET state = 'pending', attempts = 0, not_before_ms = 0"
                        " WHERE destination = ?1 AND id = ?2 AND state = 'dead'"
                      : "UPDATE queue SET state = 'pending', attempts = 0, not_before_ms = 0"
                        " WHERE destination = ?1 AND state = 'dead'",
                  dest, queue_id, t);
    if (n >= 0)
      exec1(q->db,
            "INSERT INTO deliveries(queue_id, message_id, destination, attempt, at_ms, outcome,"
            " detail) VALUES(?2, 0, ?1, 0, ?3, 'requeued', 'retried by an operator')",
            dest, queue_id, t);
    return n;
  }
  if (strcmp(op, "drop") == 0) {
    int n = exec1(q->db, "DELETE FROM queue WHERE destination = ?1 AND id = ?2", dest, queue_id, t);
    if (n > 0)
      exec1(q->db,
            "INSERT INTO deliveries(queue_id, message_id, destination, attempt, at_ms, outcome,"
            " detail) VALUES(?2, 0, ?1, 0, ?3, 'dropped', 'dropped by an operator')",
            dest, queue_id, t);
    return n;
  }
  return -1;
}

static int signal_engine(qcli_t *q) {
  if (kill((pid_t)q->pid, SIGUSR2) != 0) {
    fprintf(stderr, "radrelay: pid %ld: %s\n", q->pid, strerror(errno));
    return 1;
  }
  return 0;
}

static int queue_change(qcli_t *q, const char *op, const char *dest, int64_t id) {
  if (!configured(q, dest)) {
    fprintf(stderr, "radrelay queue: no destination %s in this configuration (see queue ls)\n",
            dest);
    return 1;
  }
  int n = apply(q, op, dest, id, 0);
  if (n < 0) {
    fprintf(stderr, "radrelay queue: %s\n", sqlite3_errmsg(q->db));
    return 1;
  }
  if (q->pid) {
    if (signal_engine(q))
      return 1;
    if (id)
      printf("%s %s %lld: handed to the running engine (pid %ld)\n", op, dest, (long long)id,
             q->pid);
    else
      printf("%s %s: handed to the running engine (pid %ld)\n", op, dest, q->pid);
    return 0;
  }
  if (n == 0) {
    fprintf(stderr, "radrelay queue: nothing to %s in %s%s\n", op, dest,
            strcmp(op, "drop") == 0 ? " with that id" : " (no dead letter with that id)");
    return 1;
  }
  printf("%s: %d row(s) of %s changed in the store (the engine is not running)\n", op, n, dest);
  return 0;
}

int rr_cmd_queue(int argc, char **argv) {
  const char *pos[4] = {0};
  int npos = positional(argc, argv, pos, 4);
  if (npos < 1) {
    fprintf(stderr, "usage: radrelay queue ls|show|retry|drop -c CONFIG ...\n");
    return 2;
  }
  const char *sub = pos[0];
  bool writes = strcmp(sub, "retry") == 0 || strcmp(sub, "drop") == 0;
  qcli_t q;
  int rc = open_store(&q, argc, argv, writes);
  if (rc)
    return rc;
  if (strcmp(sub, "ls") == 0) {
    rc = queue_ls(&q);
  } else if (strcmp(sub, "show") == 0 && npos == 2) {
    const char *lim = opt(argc, argv, "--limit");
    rc = queue_show(&q, pos[1], flag(argc, argv, "--dead"), lim ? atol(lim) : 50);
  } else if (strcmp(sub, "retry") == 0 && npos == 2 && flag(argc, argv, "--dead")) {
    rc = queue_change(&q, "retry_dead", pos[1], 0);
  } else if ((strcmp(sub, "retry") == 0 || strcmp(sub, "drop") == 0) && npos == 3 &&
             atoll(pos[2]) > 0) {
    rc = queue_change(&q, sub, pos[1], atoll(pos[2]));
  } else {
    fprintf(stderr, "usage: radrelay queue ls -c CONFIG\n"
                    "       radrelay queue show DESTINATION [--dead] [--limit N] -c CONFIG\n"
                    "       radrelay queue retry DESTINATION (ID | --dead) -c CONFIG\n"
                    "       radrelay queue drop DESTINATION ID -c CONFIG\n");
    rc = 2;
  }
  close_store(&q);
  return rc;
}

/* "2026-11-27", "2026-11-27T10:00", "2026-11-27T10:00:00" (UTC), or ms. */
static int parse_time(const char *s, int64_t *out) {
  char *end;
  long long v = strtoll(s, &end, 10);
  if (*end == '\0' && v > 100000) {
    *out = v;
    return 0;
  }
  struct tm tm = {0};
  const char *r = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
  if (!r || *r) {
    memset(&tm, 0, sizeof tm);
    r = strptime(s, "%Y-%m-%dT%H:%M", &tm);
  }
  if (!r || *r) {
    memset(&tm, 0, sizeof tm);
    r = strptime(s, "%Y-%m-%d", &tm);
  }
  if (!r || *r)
    return -1;
  *out = (int64_t)timegm(&tm) * 1000;
  return 0;
}

int rr_cmd_replay(int argc, char **argv) {
  const char *to = opt(argc, argv, "--to");
  const char *id = opt(argc, argv, "--id"), *mrn = opt(argc, argv, "--mrn");
  const char *acc = opt(argc, argv, "--accession");
  const char *since = opt(argc, argv, "--since"), *until = opt(argc, argv, "--until");
  int64_t t0 = 0, t1 = INT64_MAX;
  if (!to || !(id || mrn || acc || since) || (since && parse_time(since, &t0)) ||
      (until && parse_time(until, &t1))) {
    fprintf(stderr,
            "usage: radrelay replay -c CONFIG --to DESTINATION\n"
            "         (--id N | --mrn MRN | --accession ACC | --since TIME [--until TIME])\n"
            "         [--dry-run]\n"
            "  TIME: 2026-11-27, 2026-11-27T10:00[:00] (UTC) or milliseconds since 1970\n");
    return 2;
  }
  bool dry = flag(argc, argv, "--dry-run");
  qcli_t q;
  int rc = open_store(&q, argc, argv, !dry);
  if (rc)
    return rc;
  if (!configured(&q, to)) {
    fprintf(stderr, "radrelay replay: no destination %s in this configuration (see queue ls)\n",
            to);
    close_store(&q);
    return 1;
  }
  sqlite3_stmt *st;
  const char *sql = "SELECT id FROM messages WHERE status IN ('accepted', 'filtered', 'error')"
                    " AND (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR mrn = ?2)"
                    " AND (?3 IS NULL OR accession = ?3) AND received_ms >= ?4 AND received_ms < ?5"
                    " ORDER BY id";
  if (sqlite3_prepare_v2(q.db, sql, -1, &st, NULL) != SQLITE_OK) {
    fprintf(stderr, "radrelay replay: %s\n", sqlite3_errmsg(q.db));
    close_store(&q);
    return 1;
  }
  if (id)
    sqlite3_bind_int64(st, 1, atoll(id));
  if (mrn)
    sqlite3_bind_text(st, 2, mrn, -1, SQLITE_STATIC);
  if (acc)
    sqlite3_bind_text(st, 3, acc, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 4, t0);
  sqlite3_bind_int64(st, 5, t1);
  int64_t *ids = NULL;
  size_t n = 0, cap = 0;
  while (sqlite3_step(st) == SQLITE_ROW) {
    if (n == cap) {
      cap = cap ? cap * 2 : 256;
      int64_t *v = realloc(ids, cap * sizeof *v);
      if (!v)
        break;
      ids = v;
    }
    ids[n++] = sqlite3_column_int64(st, 0);
  }
  sqlite3_finalize(st);
  if (dry) {
    printf("%zu message(s) would be queued again for %s\n", n, to);
  } else if (n) {
    sqlite3_exec(q.db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    size_t done = 0;
    for (size_t i = 0; i < n; i++)
      done += apply(&q, "replay", to, 0, ids[i]) > 0;
    if (sqlite3_exec(q.db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
      fprintf(stderr, "radrelay replay: %s\n", sqlite3_errmsg(q.db));
      rc = 1;
    } else if (q.pid) {
      rc = signal_engine(&q);
      if (!rc)
        printf("%zu message(s) handed to the running engine (pid %ld) for %s\n", done, q.pid, to);
    } else {
      printf("%zu message(s) left for the engine: replayed to %s when it next starts\n", done, to);
    }
  } else {
    printf("no message matches\n");
  }
  free(ids);
  close_store(&q);
  return rc;
}

/* radrelay study complete UID -c CONFIG: the study is complete now. */
int rr_cmd_study(int argc, char **argv) {
  const char *pos[3] = {0};
  int npos = positional(argc, argv, pos, 3);
  if (npos != 2 || strcmp(pos[0], "complete") != 0) {
    fprintf(stderr, "usage: radrelay study complete STUDY_INSTANCE_UID -c CONFIG\n");
    return 2;
  }
  qcli_t q;
  int rc = open_store(&q, argc, argv, true);
  if (rc)
    return rc;
  sqlite3_stmt *st;
  const char *sql = q.pid ? "INSERT INTO queue_ops(op, destination, queue_id, message_id, at_ms)"
                            " VALUES('study_complete', ?1, 0, 0, ?2)"
                          : "UPDATE studies SET state = 'stable', stable_ms = ?2"
                            " WHERE study_uid = ?1 AND state = 'arriving'";
  if (sqlite3_prepare_v2(q.db, sql, -1, &st, NULL) != SQLITE_OK) {
    fprintf(stderr, "radrelay study: %s\n", sqlite3_errmsg(q.db));
    close_store(&q);
    return 1;
  }
  sqlite3_bind_text(st, 1, pos[1], -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, now_ms());
  int step = sqlite3_step(st);
  sqlite3_finalize(st);
  if (step != SQLITE_DONE) {
    fprintf(stderr, "radrelay study: %s\n", sqlite3_errmsg(q.db));
    rc = 1;
  } else if (q.pid) {
    rc = signal_engine(&q);
    if (!rc)
      printf("study complete: handed to the running engine (pid %ld)\n", q.pid);
  } else if (sqlite3_changes(q.db) == 0) {
    fprintf(stderr, "radrelay study: no arriving study with that UID\n");
    rc = 1;
  } else {
    printf("study complete: stable in the store (the engine is not running)\n");
  }
  close_store(&q);
  return rc;
}

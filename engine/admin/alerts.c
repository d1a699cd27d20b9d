/* Operational alerts: one when a condition starts, one when it clears. */
#include "admin/alerts.h"

#include <jansson.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"
#include "core/log.h"

#define CLEAR_BELOW 0.8 /* of the threshold */

typedef struct alert {
  struct alert *next;
  char key[240]; /* kind|subject */
  char kind[24];
  char subject[160];
  bool raised;
  int64_t raised_ms;
  double value, threshold;
  bool seen; /* the subject still exists at this check */
} alert_t;

typedef struct chan_seen {
  struct chan_seen *next;
  char name[64];
  uint64_t received, bad;
} chan_seen_t;

struct rr_alerts {
  uv_timer_t timer;
  rr_engine_t *engine;
  rr_journal_t *journal;
  rr_alerts_config_t cfg;
  alert_t *alerts;
  chan_seen_t *chans;
  int64_t now;
  int changed;
};

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void rfc3339(int64_t ms, char out[48]) {
  time_t s = (time_t)(ms / 1000);
  struct tm tm;
  gmtime_r(&s, &tm);
  snprintf(out, 48, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
           tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
}

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS alerts(key TEXT PRIMARY KEY, kind TEXT NOT NULL,"
    " subject TEXT NOT NULL, state TEXT NOT NULL, value REAL, threshold REAL,"
    " raised_ms INTEGER, cleared_ms INTEGER) WITHOUT ROWID;";

int rr_alerts_schema(rr_journal_t *j, char **errmsg) {
  return rr_journal_schema(j, schema, errmsg);
}

typedef struct row {
  alert_t a;
  int64_t cleared_ms;
} row_t;

static int write_row(sqlite3 *db, void *data) {
  const row_t *r = data;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "INSERT OR REPLACE INTO alerts(key, kind, subject, state, value,"
                         " threshold, raised_ms, cleared_ms) VALUES(?1,?2,?3,?4,?5,?6,?7,?8)",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_text(st, 1, r->a.key, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, r->a.kind, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 3, r->a.subject, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 4, r->a.raised ? "raised" : "cleared", -1, SQLITE_STATIC);
  sqlite3_bind_double(st, 5, r->a.value);
  sqlite3_bind_double(st, 6, r->a.threshold);
  sqlite3_bind_int64(st, 7, r->a.raised_ms);
  if (r->cleared_ms)
    sqlite3_bind_int64(st, 8, r->cleared_ms);
  else
    sqlite3_bind_null(st, 8);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

static alert_t *find(rr_alerts_t *a, const char *kind, const char *subject) {
  char key[240];
  snprintf(key, sizeof key, "%s|%s", kind, subject);
  for (alert_t *x = a->alerts; x; x = x->next)
    if (strcmp(x->key, key) == 0)
      return x;
  alert_t *x = calloc(1, sizeof *x);
  if (!x)
    return NULL;
  snprintf(x->key, sizeof x->key, "%s", key);
  snprintf(x->kind, sizeof x->kind, "%s", kind);
  snprintf(x->subject, sizeof x->subject, "%s", subject);
  x->next = a->alerts;
  a->alerts = x;
  return x;
}

/* The raise or clear of x: its row, its audit record and its delivery. */
static void emit(rr_alerts_t *a, alert_t *x) {
  char at[48], since[48];
  rfc3339(a->now, at);
  rfc3339(x->raised_ms, since);
  const char *state = x->raised ? "raised" : "cleared";
  json_t *doc = json_pack("{s:s, s:s, s:s, s:f, s:f, s:s, s:s}", "alert", x->kind, "subject",
                          x->subject, "state", state, "value", x->value, "threshold", x->threshold,
                          "at", at, "since", since);
  char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
  row_t *r = calloc(1, sizeof *r);
  if (!text || !r) {
    json_decref(doc);
    free(text);
    free(r);
    return;
  }
  r->a = *x;
  r->a.next = NULL;
  r->cleared_ms = x->raised ? 0 : a->now;
  rr_journal_custom(a->journal, write_row, r, free, NULL, NULL);
  rr_journal_audit_json(a->journal, "engine", x->raised ? "alert_raised" : "alert_cleared",
                        x->subject, doc);
  rr_journal_route_t route = {.destination = RR_ALERTS_DESTINATION,
                              .key = NULL,
                              .lane = 2,
                              .content_type = "json",
                              .payload = text,
                              .len = strlen(text)};
  rr_journal_entry_t je = {.channel = "engine",
                           .peer = "engine",
                           .received_ms = a->now,
                           .message_type = "ALERT",
                           .status = "accepted",
                           .raw = text,
                           .raw_len = strlen(text),
                           .routes = &route,
                           .nroutes = 1};
  rr_journal_add(a->journal, &je, NULL, NULL);
  rr_log(x->raised ? RR_LOG_WARN : RR_LOG_INFO, "alerts",
         "event=alert_%s alert=%s subject=%s value=%.3f threshold=%.3f", state, x->kind, x->subject,
         x->value, x->threshold);
  free(text);
  a->changed++;
}

/* One condition's value at this check. */
static void observe(rr_alerts_t *a, const char *kind, const char *subject, double value,
                    double threshold) {
  if (threshold <= 0)
    return;
  alert_t *x = find(a, kind, subject);
  if (!x)
    return;
  x->seen = true;
  x->value = value;
  x->threshold = threshold;
  if (!x->raised && value >= threshold) {
    x->raised = true;
    x->raised_ms = a->now;
    emit(a, x);
  } else if (x->raised && value < threshold * CLEAR_BELOW) {
    x->raised = false;
    emit(a, x);
  }
}

static void on_depth(void *ud, const char *destination, int64_t pending, int64_t dead,
                     int64_t oldest_ms) {
  rr_alerts_t *a = ud;
  (void)dead;
  if (strcmp(destination, RR_ALERTS_DESTINATION) == 0)
    return; /* alerts about the alerts' own queue would feed themselves */
  observe(a, "queue_depth", destination, (double)pending, (double)a->cfg.queue_depth);
  double age = pending > 0 && oldest_ms > 0 && a->now > oldest_ms
                   ? (double)(a->now - oldest_ms) / 1000.0
                   : 0.0;
  observe(a, "queue_oldest_age", destination, age, (double)a->cfg.oldest_age_ms / 1000.0);
}

static void on_channel(void *ud, const rr_channel_stats_t *s) {
  rr_alerts_t *a = ud;
  chan_seen_t *c = a->chans;
  while (c && strcmp(c->name, s->name) != 0)
    c = c->next;
  uint64_t bad = s->errored + s->rejected;
  if (!c) { /* the first check only sets the baseline */
    if (!(c = calloc(1, sizeof *c)))
      return;
    snprintf(c->name, sizeof c->name, "%s", s->name);
    c->received = s->received;
    c->bad = bad;
    c->next = a->chans;
    a->chans = c;
    return;
  }
  uint64_t n = s->received - c->received, b = bad - c->bad;
  c->received = s->received;
  c->bad = bad;
  if (n >= a->cfg.min_messages)
    observe(a, "error_rate", s->name, (double)b / (double)n, a->cfg.error_rate);
  else if (n == 0) /* no traffic: a raised rate clears, nothing new is raised */
    for (alert_t *x = a->alerts; x; x = x->next)
      if (x->raised && strcmp(x->kind, "error_rate") == 0 && strcmp(x->subject, s->name) == 0)
        observe(a, "error_rate", s->name, 0.0, a->cfg.error_rate);
}

int rr_alerts_check(rr_alerts_t *a) {
  a->now = now_ms();
  a->changed = 0;
  for (alert_t *x = a->alerts; x; x = x->next)
    x->seen = false;
  if (a->cfg.queue_depth > 0 || a->cfg.oldest_age_ms > 0)
    rr_journal_queue_depth(a->journal, on_depth, a);
  if (a->cfg.error_rate > 0)
    rr_engine_channel_stats(a->engine, on_channel, a);
  /* A queue that emptied has no row in the depth query: its alerts clear. */
  for (alert_t *x = a->alerts; x; x = x->next)
    if (x->raised && !x->seen && strcmp(x->kind, "error_rate") != 0) {
      x->value = 0;
      x->raised = false;
      emit(a, x);
    }
  if (a->changed)
    rr_journal_kick(a->journal);
  return a->changed;
}

static void on_timer(uv_timer_t *t) {
  rr_alerts_check(t->data);
}

int rr_alerts_start(uv_loop_t *loop, rr_engine_t *e, rr_journal_t *j, const rr_alerts_config_t *cfg,
                    rr_alerts_t **out) {
  rr_alerts_t *a = calloc(1, sizeof *a);
  if (!a)
    return RR_ENOMEM;
  a->engine = e;
  a->journal = j;
  a->cfg = *cfg;
  if (!a->cfg.check_ms)
    a->cfg.check_ms = 30000;
  if (!a->cfg.min_messages)
    a->cfg.min_messages = 20;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT kind, subject, value, threshold, raised_ms FROM alerts WHERE"
                         " state = 'raised'",
                         -1, &st, NULL) != SQLITE_OK) {
    free(a);
    return RR_EIO;
  }
  while (sqlite3_step(st) == SQLITE_ROW) {
    alert_t *x =
        find(a, (const char *)sqlite3_column_text(st, 0), (const char *)sqlite3_column_text(st, 1));
    if (!x)
      continue;
    x->raised = true;
    x->value = sqlite3_column_double(st, 2);
    x->threshold = sqlite3_column_double(st, 3);
    x->raised_ms = sqlite3_column_int64(st, 4);
  }
  sqlite3_finalize(st);
  uv_timer_init(loop, &a->timer);
  a->timer.data = a;
  uv_timer_start(&a->timer, on_timer, a->cfg.check_ms, a->cfg.check_ms);
  uv_unref((uv_handle_t *)&a->timer);
  rr_alerts_check(a); /* the channels' baseline, and queues already over */
  *out = a;
  return 0;
}

static void on_closed(uv_handle_t *h) {
  rr_alerts_t *a = h->data;
  for (alert_t *x = a->alerts, *n; x; x = n) {
    n = x->next;
    free(x);
  }
  for (chan_seen_t *c = a->chans, *n; c; c = n) {
    n = c->next;
    free(c);
  }
  free(a);
}

void rr_alerts_stop(rr_alerts_t *a) {
  if (!a)
    return;
  uv_close((uv_handle_t *)&a->timer, on_closed);
}

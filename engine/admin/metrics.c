/* GET /metrics: the engine's counters in the Prometheus text format
 * (version 0.0.4), and GET /ready.
 *
 * Channel counters and latency histograms come from memory (since the
 * process started); queue depths, AI jobs and notifications from the
 * store (so they hold across restarts and count every row). Label values
 * are channel and destination names from the configuration: never a
 * patient's, never a UID. */
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "admin/api_int.h"
#include "core/error.h"

int64_t rr_admin_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

typedef struct out {
  rr_buf_t b;
  const char *last; /* the metric family whose HELP/TYPE was written */
} out_t;

static void family(out_t *o, const char *name, const char *type, const char *help) {
  if (o->last && strcmp(o->last, name) == 0)
    return;
  rr_buf_printf(&o->b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
  o->last = name;
}

static void histo(out_t *o, const char *name, const char *label, const char *value,
                  const rr_histo_t *h) {
  uint64_t cum = 0;
  for (size_t i = 0; i < RR_HISTO_BUCKETS; i++) {
    cum += h->bucket[i];
    if (i + 1 < RR_HISTO_BUCKETS)
      rr_buf_printf(&o->b, "%s_bucket{%s=\"%s\",le=\"%g\"} %llu\n", name, label, value,
                    rr_histo_bounds[i], (unsigned long long)cum);
    else
      rr_buf_printf(&o->b, "%s_bucket{%s=\"%s\",le=\"+Inf\"} %llu\n", name, label, value,
                    (unsigned long long)cum);
  }
  rr_buf_printf(&o->b, "%s_sum{%s=\"%s\"} %.6f\n%s_count{%s=\"%s\"} %llu\n", name, label, value,
                h->sum, name, label, value, (unsigned long long)h->count);
}

typedef struct chan_pass {
  out_t *o;
  int which;
} chan_pass_t;

static void on_channel(void *ud, const rr_channel_stats_t *s) {
  chan_pass_t *p = ud;
  out_t *o = p->o;
  if (p->which == 0) {
    family(o, "radrelay_channel_messages_total", "counter",
           "Messages (or study events) per channel and outcome since the engine started.");
    const struct {
      const char *outcome;
      uint64_t v;
    } rows[] = {{"received", s->received},         {"accepted", s->accepted},
                {"errored", s->errored},           {"rejected", s->rejected},
                {"duplicate", s->duplicates},      {"filtered", s->filtered},
                {"script_error", s->script_errors}};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
      rr_buf_printf(&o->b, "radrelay_channel_messages_total{channel=\"%s\",outcome=\"%s\"} %llu\n",
                    s->name, rows[i].outcome, (unsigned long long)rows[i].v);
  } else if (p->which == 1) {
    family(o, "radrelay_channel_studies_routed_total", "counter",
           "Stable studies handed to on_study, and how many matched an order.");
    rr_buf_printf(&o->b,
                  "radrelay_channel_studies_routed_total{channel=\"%s\",matched=\"yes\"} %llu\n"
                  "radrelay_channel_studies_routed_total{channel=\"%s\",matched=\"no\"} %llu\n",
                  s->name, (unsigned long long)s->studies_matched, s->name,
                  (unsigned long long)(s->studies_routed - s->studies_matched));
  } else if (strcmp(s->kind, "mllp") == 0) {
    family(o, "radrelay_ack_latency_seconds", "histogram",
           "From a message taken off the connection to its ACK written, after the commit "
           "that keeps it.");
    histo(o, "radrelay_ack_latency_seconds", "channel", s->name, s->ack_latency);
  }
}

typedef struct dest_pass {
  out_t *o;
  int which;
} dest_pass_t;

static void on_dest(void *ud, const rr_dispatch_dest_stats_t *s) {
  dest_pass_t *p = ud;
  out_t *o = p->o;
  if (p->which == 0) {
    family(o, "radrelay_deliveries_total", "counter",
           "Delivery attempts per destination and outcome since the engine started.");
    rr_buf_printf(&o->b,
                  "radrelay_deliveries_total{destination=\"%s\",outcome=\"delivered\"} %llu\n"
                  "radrelay_deliveries_total{destination=\"%s\",outcome=\"retried\"} %llu\n"
                  "radrelay_deliveries_total{destination=\"%s\",outcome=\"dead\"} %llu\n",
                  s->name, (unsigned long long)s->delivered, s->name,
                  (unsigned long long)s->retried, s->name, (unsigned long long)s->dead);
  } else {
    family(o, "radrelay_destination_circuit_open", "gauge",
           "The destination's circuit breaker: 0 closed, 1 open, 0.5 half-open (one probe).");
    rr_buf_printf(&o->b, "radrelay_destination_circuit_open{destination=\"%s\",kind=\"%s\"} %s\n",
                  s->name, rr_dest_kind_name(s->kind),
                  s->breaker == RR_QSCHED_OPEN        ? "1"
                  : s->breaker == RR_QSCHED_HALF_OPEN ? "0.5"
                                                      : "0");
  }
}

typedef struct depth_pass {
  out_t *o;
  int which;
  int64_t now;
} depth_pass_t;

static void on_depth(void *ud, const char *destination, int64_t pending, int64_t dead,
                     int64_t oldest_ms) {
  depth_pass_t *p = ud;
  out_t *o = p->o;
  if (p->which == 0) {
    family(o, "radrelay_queue_depth", "gauge", "Queued deliveries per destination and state.");
    rr_buf_printf(&o->b,
                  "radrelay_queue_depth{destination=\"%s\",state=\"pending\"} %lld\n"
                  "radrelay_queue_depth{destination=\"%s\",state=\"dead\"} %lld\n",
                  destination, (long long)pending, destination, (long long)dead);
  } else {
    family(o, "radrelay_queue_oldest_age_seconds", "gauge",
           "Age of the oldest queued delivery per destination (0: none).");
    rr_buf_printf(
        &o->b, "radrelay_queue_oldest_age_seconds{destination=\"%s\"} %.3f\n", destination,
        oldest_ms > 0 && p->now > oldest_ms ? (double)(p->now - oldest_ms) / 1000.0 : 0.0);
  }
}

/* AI jobs per endpoint and state, and the endpoint's turnaround (request
 * sent -> result) as a histogram over the jobs with a result. */
static void ai_metrics(out_t *o, sqlite3 *db) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "SELECT destination, state, count(*) FROM ai_jobs GROUP BY 1, 2 ORDER BY"
                         " 1, 2",
                         -1, &st, NULL) == SQLITE_OK) {
    family(o, "radrelay_ai_jobs", "gauge", "AI jobs in the store per endpoint and state.");
    while (sqlite3_step(st) == SQLITE_ROW)
      rr_buf_printf(&o->b, "radrelay_ai_jobs{endpoint=\"%s\",state=\"%s\"} %lld\n",
                    (const char *)sqlite3_column_text(st, 0),
                    (const char *)sqlite3_column_text(st, 1),
                    (long long)sqlite3_column_int64(st, 2));
    sqlite3_finalize(st);
  }
  if (sqlite3_prepare_v2(db,
                         "SELECT destination, (result_ms - sent_ms) / 1000.0 FROM ai_jobs"
                         " WHERE result_ms IS NOT NULL AND sent_ms IS NOT NULL AND state IN"
                         " ('completed', 'failed', 'rejected') ORDER BY 1",
                         -1, &st, NULL) != SQLITE_OK)
    return;
  family(o, "radrelay_ai_turnaround_seconds", "histogram",
         "AI endpoints: request sent to result received, per endpoint.");
  rr_histo_t h;
  char cur[160] = "";
  bool any = false;
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *d = (const char *)sqlite3_column_text(st, 0);
    if (!any || strcmp(d, cur) != 0) {
      if (any)
        histo(o, "radrelay_ai_turnaround_seconds", "endpoint", cur, &h);
      memset(&h, 0, sizeof h);
      snprintf(cur, sizeof cur, "%s", d);
      any = true;
    }
    rr_histo_observe(&h, sqlite3_column_double(st, 1));
  }
  if (any)
    histo(o, "radrelay_ai_turnaround_seconds", "endpoint", cur, &h);
  sqlite3_finalize(st);
}

static void notification_metrics(out_t *o, sqlite3 *db) {
  sqlite3_stmt *st;
  static const char *const states[] = {"open", "acked", "unacknowledged"};
  if (sqlite3_prepare_v2(db,
                         "SELECT sum(state = 'open'), sum(state = 'acked'),"
                         " sum(state = 'unacknowledged'), sum(level > 0),"
                         " sum(state = 'open' AND level > 0) FROM notifications",
                         -1, &st, NULL) != SQLITE_OK)
    return;
  if (sqlite3_step(st) == SQLITE_ROW) {
    family(o, "radrelay_notifications", "gauge",
           "Critical-result notifications per state (open: waiting for an acknowledgement).");
    for (int i = 0; i < 3; i++)
      rr_buf_printf(&o->b, "radrelay_notifications{state=\"%s\"} %lld\n", states[i],
                    (long long)sqlite3_column_int64(st, i));
    family(o, "radrelay_notifications_escalated", "gauge",
           "Notifications that reached the next person in their chain (all, and still open).");
    rr_buf_printf(&o->b,
                  "radrelay_notifications_escalated{state=\"any\"} %lld\n"
                  "radrelay_notifications_escalated{state=\"open\"} %lld\n",
                  (long long)sqlite3_column_int64(st, 3), (long long)sqlite3_column_int64(st, 4));
  }
  sqlite3_finalize(st);
}

void rr_admin_metrics(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  out_t o = {.last = NULL};
  rr_buf_init(&o.b, (size_t)16 << 20);
  for (int which = 0; which < 3; which++) {
    chan_pass_t p = {&o, which};
    rr_engine_channel_stats(a->engine, on_channel, &p);
  }
  rr_journal_stats_t js;
  rr_journal_stats(a->journal, &js);
  family(&o, "radrelay_store_commits_total", "counter", "Store transactions with entries.");
  rr_buf_printf(&o.b, "radrelay_store_commits_total %llu\n", (unsigned long long)js.commits);
  family(&o, "radrelay_store_commit_failures_total", "counter", "Store transactions that failed.");
  rr_buf_printf(&o.b, "radrelay_store_commit_failures_total %llu\n",
                (unsigned long long)js.failed_commits);
  family(&o, "radrelay_store_entries_total", "counter", "Entries committed to the journal.");
  rr_buf_printf(&o.b, "radrelay_store_entries_total %llu\n", (unsigned long long)js.entries);
  family(&o, "radrelay_store_commit_seconds", "histogram",
         "BEGIN to COMMIT of a batch (with its fsync).");
  histo(&o, "radrelay_store_commit_seconds", "store", "journal", &js.commit_latency);
  family(&o, "radrelay_store_checkpoints_total", "counter",
         "WAL checkpoints run after a batch was answered.");
  rr_buf_printf(&o.b, "radrelay_store_checkpoints_total %llu\n",
                (unsigned long long)js.checkpoints);
  family(&o, "radrelay_store_checkpoint_seconds_total", "counter",
         "Time spent in WAL checkpoints.");
  rr_buf_printf(&o.b, "radrelay_store_checkpoint_seconds_total %.6f\n",
                (double)js.checkpoint_us_total / 1e6);
  family(&o, "radrelay_store_syncs_total", "counter",
         "fdatasyncs of the WAL that made committed batches durable.");
  rr_buf_printf(&o.b, "radrelay_store_syncs_total %llu\n", (unsigned long long)js.syncs);
  family(&o, "radrelay_store_sync_seconds_total", "counter", "Time spent in those fdatasyncs.");
  rr_buf_printf(&o.b, "radrelay_store_sync_seconds_total %.6f\n", (double)js.sync_us_total / 1e6);
  if (a->dispatch)
    for (int which = 0; which < 2; which++) {
      dest_pass_t p = {&o, which};
      rr_dispatch_stats(a->dispatch, on_dest, &p);
    }
  for (int which = 0; which < 2; which++) {
    depth_pass_t p = {&o, which, rr_admin_now_ms()};
    rr_journal_queue_depth(a->journal, on_depth, &p);
  }
  sqlite3 *db = rr_journal_reader(a->journal);
  ai_metrics(&o, db);
  notification_metrics(&o, db);
  family(&o, "radrelay_start_time_seconds", "gauge", "When the engine started (Unix time).");
  rr_buf_printf(&o.b, "radrelay_start_time_seconds %.3f\n", (double)a->start_ms / 1000.0);
  char why[128];
  family(&o, "radrelay_ready", "gauge", "1 when the engine takes messages (GET /ready).");
  rr_buf_printf(&o.b, "radrelay_ready %d\n", rr_engine_ready(a->engine, why, sizeof why) ? 1 : 0);
  if (o.b.len == 0 && rr_buf_printf(&o.b, "\n") != 0) {
    rr_http_reply_error(req, 500, "internal_error", "out of memory");
    rr_buf_close(&o.b);
    return;
  }
  rr_http_reply(req, 200, "text/plain; version=0.0.4; charset=utf-8", o.b.data, o.b.len);
  rr_buf_close(&o.b);
}

void rr_admin_ready(void *ud, rr_http_req_t *req) {
  rr_admin_t *a = ud;
  char why[128];
  if (rr_engine_ready(a->engine, why, sizeof why))
    rr_http_reply_json(req, 200, json_pack("{s:s}", "status", "ready"));
  else
    rr_http_reply_json(req, 503, json_pack("{s:s, s:s}", "status", "not_ready", "reason", why));
}

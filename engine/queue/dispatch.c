/* Destination queues on the loop: scheduler + transports + journal. */
#include "queue/dispatch.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "ai/ai.h"
#include "ai/deid.h"
#include "core/error.h"
#include "core/log.h"
#include "dicom/scu.h"
#include "dicomweb/client.h"
#include "http/client.h"
#include "mllp/sender.h"
#include "tls/tls.h"

#define RESPONSE_KEEP 65536 /* bytes of a peer's answer kept in the history */
#define CACHE_BUCKETS 4096
#define CACHE_BYTES ((size_t)16 << 20) /* payloads held per destination at most */

/* A payload at hand (from the commit that queued it, or a window load), so
 * a delivery needs no read of the store. */
typedef struct cached {
  struct cached *next;
  int64_t id, message_id;
  const char *content_type; /* static */
  size_t len;
  char data[];
} cached_t;

typedef struct dest dest_t;

/* An outcome on its way to the store; kept and written again when its
 * commit fails (e.g. the disk is full), so the store catches up with what
 * was delivered once it can. */
typedef struct record {
  struct record *next;
  rr_dispatch_t *owner;
  rr_journal_delivery_t d; /* strings and response point into data */
  char data[];
} record_t;

typedef struct attempt {
  dest_t *d;
  int64_t id, message_id;
  rr_buf_t payload;
  const char *content_type; /* static */
  unsigned slot;            /* MLLP: the sender used */
  rr_http_transfer_t *xfer; /* HTTP: while running */
  rr_dicom_scu_send_t *scu; /* DICOM: while running */
  rr_dicomweb_op_t *stow;   /* STOW-RS: while running */
  char **paths;             /* DICOM, STOW-RS: the files */
  size_t npaths, paths_cap;
  char job_id[RR_AI_JOB_ID_MAX];                   /* AI: the job */
  char token[RR_AI_TOKEN_HEX + 1], token_hash[65]; /* AI, de-identifying: made first */
  char study_uid[65];
  rr_buf_t request; /* AI: the request document */
  struct attempt *next;
} attempt_t;

struct dest {
  rr_dispatch_t *owner;
  rr_destination_config_t cfg;
  rr_qsched_t *s;
  uv_timer_t timer;
  bool timer_open;
  /* MLLP: one sender per concurrent delivery */
  rr_mllp_sender_t **senders;
  bool *busy;
  unsigned nsenders, open_senders;
  rr_tls_ctx_t *tls;
  /* HTTP */
  rr_http_client_t *http;
  bool http_open;
  char *token;
  rr_dicomweb_client_t *dw; /* STOW-RS */
  rr_ai_deid_t *deid;       /* AI endpoints with deidentify */
  attempt_t *inflight;
  cached_t **cache; /* CACHE_BUCKETS chains by id */
  size_t cache_bytes;
  int64_t loaded_upto; /* highest row id held or known delivered */
  bool backlog;        /* rows beyond the window wait in the store */
  bool pumping;
  uint64_t rng;
  uint64_t delivered, retried, dead;
  dest_t *next;
};

struct rr_dispatch {
  uv_loop_t *loop;
  rr_journal_t *journal;
  dest_t *dests, *last;
  rr_dispatch_inject_fn inject;
  void *inject_ud;
  rr_dispatch_replay_fn replay;
  void *replay_ud;
  int (*complete)(void *ud, const char *study_uid);
  void *complete_ud;
  rr_dispatch_file_gate_fn file_gate;
  void *file_gate_ud;
  char *ai_callback_base;
  rr_dispatch_ai_result_fn ai_result;
  void *ai_result_ud;
  bool stopping;
  record_t *unrecorded; /* outcomes whose commit failed, to write again */
  uv_timer_t rewrite;   /* when to try them again */
  bool rewrite_open;
  uint64_t record_failures;
  unsigned closing; /* handles and transports not yet closed */
  void (*stopped)(void *ud);
  void *stopped_ud;
};

static int64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t next_rand(void *ud) {
  uint64_t *x = ud; /* xorshift64* */
  *x ^= *x >> 12;
  *x ^= *x << 25;
  *x ^= *x >> 27;
  return *x * 0x2545F4914F6CDD1DULL;
}

void rr_destination_config_default(rr_destination_config_t *c) {
  memset(c, 0, sizeof *c);
  rr_qsched_config_default(&c->sched);
  c->window = 20000;
  c->keep_alive = 1;
  c->connect_timeout_ms = 5000;
  c->ack_timeout_ms = 10000;
  c->mllp_release = 1;
  c->method = RR_HTTP_POST;
  c->timeout_ms = 30000;
}

void rr_destination_config_free_lists(rr_destination_config_t *c) {
  char ***lists[] = {&c->ai_modalities, &c->ai_body_parts, &c->ai_procedures, &c->notify_chain};
  for (size_t i = 0; i < 4; i++) {
    for (char **a = *lists[i]; a && *a; a++)
      free(*a);
    free(*lists[i]);
    *lists[i] = NULL;
  }
}

const char *rr_dest_kind_name(rr_dest_kind_t k) {
  static const char *const names[] = {"mllp", "http", "channel", "dicom", "stow", "ai"};
  return k <= RR_DEST_AI ? names[k] : "?";
}

static dest_t *find_dest(const rr_dispatch_t *d, const char *name) {
  for (dest_t *x = d->dests; x; x = x->next)
    if (strcmp(x->cfg.name, name) == 0)
      return x;
  return NULL;
}

bool rr_dispatch_known(const rr_dispatch_t *d, const char *name) {
  return find_dest(d, name) != NULL;
}

/* ---- payloads at hand --------------------------------------------------------- */

static void cache_put(dest_t *x, int64_t id, int64_t message_id, const char *content_type,
                      const void *data, size_t len) {
  if (!x->cache || x->cache_bytes + len > CACHE_BYTES)
    return; /* read from the store when its turn comes */
  cached_t *c = malloc(sizeof *c + len);
  if (!c)
    return;
  c->id = id;
  c->message_id = message_id;
  c->content_type = content_type;
  c->len = len;
  if (len)
    memcpy(c->data, data, len);
  cached_t **b = &x->cache[(uint64_t)id % CACHE_BUCKETS];
  c->next = *b;
  *b = c;
  x->cache_bytes += len;
}

/* Removes and returns the payload of id, or NULL. */
static cached_t *cache_take(dest_t *x, int64_t id) {
  if (!x->cache)
    return NULL;
  for (cached_t **p = &x->cache[(uint64_t)id % CACHE_BUCKETS]; *p; p = &(*p)->next)
    if ((*p)->id == id) {
      cached_t *c = *p;
      *p = c->next;
      x->cache_bytes -= c->len;
      return c;
    }
  return NULL;
}

static void cache_free(dest_t *x) {
  for (size_t i = 0; x->cache && i < CACHE_BUCKETS; i++)
    for (cached_t *c = x->cache[i], *n; c; c = n) {
      n = c->next;
      free(c);
    }
  free(x->cache);
  x->cache = NULL;
}

/* ---- the window ------------------------------------------------------------ */

static void add_item(dest_t *x, const rr_journal_qitem_t *q) {
  rr_qsched_item_t it = {.id = q->id,
                         .key = q->key,
                         .lane = (uint32_t)(q->lane < 0                  ? 0
                                            : q->lane >= RR_QSCHED_LANES ? RR_QSCHED_LANES - 1
                                                                         : q->lane),
                         .enqueued_ms = q->enqueued_ms,
                         .attempts = q->attempts,
                         .not_before_ms = q->not_before_ms,
                         .dead = q->dead};
  int rc = rr_qsched_add(x->s, &it);
  if (rc == 0) {
    if (q->id > x->loaded_upto)
      x->loaded_upto = q->id;
    if (q->payload && !q->dead)
      cache_put(x, q->id, q->message_id, q->content_type, q->payload, q->len);
  } else {
    x->backlog = true; /* no room: it waits in the store */
  }
}

static void on_loaded_row(void *ud, const rr_journal_qitem_t *q) {
  dest_t *x = ud;
  if (q->id > x->loaded_upto)
    add_item(x, q);
}

/* Loads rows after the window's newest, up to the room there is. */
static void refill(dest_t *x) {
  size_t room = rr_qsched_room(x->s);
  size_t want = x->cfg.window > rr_qsched_loaded(x->s) ? x->cfg.window - rr_qsched_loaded(x->s) : 0;
  if (want > room)
    want = room;
  if (want == 0)
    return;
  int n = rr_journal_queue_load(x->owner->journal, x->cfg.name, x->loaded_upto, want,
                                x->cache_bytes < CACHE_BYTES / 2, on_loaded_row, x);
  if (n < 0) {
    rr_log(RR_LOG_ERROR, "queue", "event=load_failed destination=%s", x->cfg.name);
    return;
  }
  x->backlog = (size_t)n == want;
}

static void pump(dest_t *x);

static void on_enqueued(void *ud, const rr_journal_qitem_t *q) {
  rr_dispatch_t *d = ud;
  dest_t *x = find_dest(d, q->destination);
  if (!x) {
    rr_log(RR_LOG_WARN, "queue", "event=no_destination destination=%s queue_id=%lld",
           q->destination, (long long)q->id);
    return;
  }
  if (x->backlog || rr_qsched_loaded(x->s) >= x->cfg.window)
    x->backlog = true; /* loaded in id order once the window drains */
  else
    add_item(x, q);
  pump(x);
}

/* ---- outcomes to the store ---------------------------------------------------- */

#define REWRITE_MS 1000 /* after a failed commit of outcomes */

static void submit_record(record_t *r);

static void on_rewrite(uv_timer_t *t) {
  rr_dispatch_t *d = t->data;
  record_t *list = d->unrecorded;
  d->unrecorded = NULL;
  while (list) { /* oldest first: the list is kept in failure order */
    record_t *r = list;
    list = r->next;
    r->next = NULL;
    submit_record(r);
  }
  rr_journal_kick(d->journal);
}

static void keep_unrecorded(record_t *r) {
  rr_dispatch_t *d = r->owner;
  if (d->stopping || !d->rewrite_open) { /* made again after the restart */
    free(r);
    return;
  }
  record_t **tail = &d->unrecorded;
  while (*tail)
    tail = &(*tail)->next;
  *tail = r;
  if (!uv_is_active((uv_handle_t *)&d->rewrite))
    uv_timer_start(&d->rewrite, on_rewrite, REWRITE_MS, 0);
}

static void on_recorded(void *ud, int status, int64_t id) {
  (void)id;
  record_t *r = ud;
  if (status == 0) {
    free(r);
    return;
  }
  if (r->owner->record_failures++ % 100 == 0)
    rr_log(RR_LOG_ERROR, "queue",
           "event=record_failed destination=%s queue_id=%lld error=\"%s\" detail=\"kept in memory "
           "and written again when the store can\"",
           r->d.destination, (long long)r->d.queue_id, rr_strerror(status));
  keep_unrecorded(r);
}

static void submit_record(record_t *r) {
  if (rr_journal_queue_record(r->owner->journal, &r->d, on_recorded, r) != 0)
    keep_unrecorded(r);
}

/* Copies rec and queues it for the next commit. */
static void record(rr_dispatch_t *d, const rr_journal_delivery_t *rec) {
  size_t dl = strlen(rec->destination) + 1, tl = rec->detail ? strlen(rec->detail) + 1 : 0;
  record_t *r = malloc(sizeof *r + dl + tl + rec->response_len);
  if (!r) {
    rr_log(RR_LOG_ERROR, "queue", "event=record_failed destination=%s queue_id=%lld error=%s",
           rec->destination, (long long)rec->queue_id, rr_strerror(RR_ENOMEM));
    return;
  }
  r->next = NULL;
  r->owner = d;
  r->d = *rec;
  char *w = r->data;
  memcpy(w, rec->destination, dl);
  r->d.destination = w;
  w += dl;
  if (tl) {
    memcpy(w, rec->detail, tl);
    r->d.detail = w;
    w += tl;
  }
  if (rec->response) {
    if (rec->response_len)
      memcpy(w, rec->response, rec->response_len);
    r->d.response = w;
  }
  submit_record(r);
  rr_journal_kick(d->journal);
}

/* ---- delivering ------------------------------------------------------------- */

static void on_timer(uv_timer_t *t) {
  pump(t->data);
}

static void rearm(dest_t *x) {
  if (x->owner->stopping || !x->timer_open)
    return;
  int64_t now = wall_ms();
  int64_t at = rr_qsched_next_wakeup(x->s, now);
  if (at == RR_QSCHED_NEVER)
    uv_timer_stop(&x->timer);
  else
    uv_timer_start(&x->timer, on_timer, (uint64_t)(at > now ? at - now : 0), 0);
}

static void unlink_attempt(dest_t *x, attempt_t *a) {
  for (attempt_t **p = &x->inflight; *p; p = &(*p)->next)
    if (*p == a) {
      *p = a->next;
      return;
    }
}

static void free_attempt(attempt_t *a) {
  rr_buf_close(&a->payload);
  rr_buf_close(&a->request);
  for (size_t i = 0; i < a->npaths; i++)
    free(a->paths[i]);
  free(a->paths);
  free(a);
}

/* The outcome of one attempt: scheduler, history, counters; then more. */
static void finish(attempt_t *a, rr_qsched_outcome_t outcome, const char *detail,
                   const void *response, size_t response_len) {
  dest_t *x = a->d;
  rr_dispatch_t *d = x->owner;
  unlink_attempt(x, a);
  if (x->senders)
    x->busy[a->slot] = false;
  if (d->stopping) { /* canceled by the stop: the row stays queued */
    rr_qsched_return(x->s, a->id);
    free_attempt(a);
    return;
  }
  int64_t now = wall_ms();
  rr_qsched_result_t r;
  if (rr_qsched_done(x->s, a->id, outcome, now, next_rand, &x->rng, &r) != 0) {
    free_attempt(a);
    return;
  }
  rr_journal_delivery_t rec = {.queue_id = a->id,
                               .message_id = a->message_id,
                               .destination = x->cfg.name,
                               .attempts = r.attempts,
                               .at_ms = now,
                               .detail = detail,
                               .response = response,
                               .response_len =
                                   response_len > RESPONSE_KEEP ? RESPONSE_KEEP : response_len};
  switch (r.action) {
  case RR_QSCHED_DELIVERED:
    rec.outcome = RR_JOURNAL_DELIVERED;
    x->delivered++;
    break;
  case RR_QSCHED_RESCHEDULED:
    cache_put(x, a->id, a->message_id, a->content_type, a->payload.data, a->payload.len);
    rec.outcome = RR_JOURNAL_RETRY;
    rec.not_before_ms = r.not_before_ms;
    x->retried++;
    rr_log(RR_LOG_WARN, "queue",
           "event=retry destination=%s queue_id=%lld attempts=%u delay_ms=%lld error=\"%s\"",
           x->cfg.name, (long long)a->id, r.attempts, (long long)r.delay_ms, detail ? detail : "");
    break;
  default:
    rec.outcome = RR_JOURNAL_DEAD;
    x->dead++;
    if (x->cfg.kind == RR_DEST_AI && a->job_id[0] &&
        rr_ai_job_state(d->journal, a->job_id, "expired", detail, now) == 0) {
      rr_journal_audit_json(d->journal, "engine", "expired", a->job_id,
                            json_pack("{s:s, s:s, s:i}", "endpoint", x->cfg.name, "reason",
                                      detail ? detail : "", "attempts", (int)r.attempts));
      rr_log(RR_LOG_WARN, "ai", "event=job_expired destination=%s job=%s error=\"%s\"", x->cfg.name,
             a->job_id, detail ? detail : "");
    }
    rr_log(RR_LOG_ERROR, "queue",
           "event=dead_letter destination=%s queue_id=%lld attempts=%u error=\"%s\"", x->cfg.name,
           (long long)a->id, r.attempts, detail ? detail : "");
    break;
  }
  if (r.breaker_changed)
    rr_log(r.breaker == RR_QSCHED_CLOSED ? RR_LOG_INFO : RR_LOG_WARN, "queue",
           "event=breaker destination=%s state=%s", x->cfg.name,
           r.breaker == RR_QSCHED_CLOSED ? "closed"
           : r.breaker == RR_QSCHED_OPEN ? "open"
                                         : "half_open");
  record(d, &rec);
  free_attempt(a);
  if (x->backlog && rr_qsched_loaded(x->s) < x->cfg.window / 2)
    refill(x);
  pump(x);
}

static void on_mllp_sent(void *ud, const rr_mllp_send_result_t *r) {
  attempt_t *a = ud;
  char detail[200];
  rr_qsched_outcome_t o;
  if (r->status == 0 && (strcmp(r->ack_code, "AA") == 0 || strcmp(r->ack_code, "CA") == 0)) {
    o = RR_QSCHED_OK;
    detail[0] = '\0';
  } else if (r->status == 0) {
    bool permanent = r->ack_code[1] == 'R' || a->d->cfg.ae_is_permanent;
    o = permanent ? RR_QSCHED_PERMANENT : RR_QSCHED_RETRY;
    snprintf(detail, sizeof detail, "negative acknowledgement %s", r->ack_code);
  } else {
    o = RR_QSCHED_RETRY;
    snprintf(detail, sizeof detail, "%s", rr_mllp_sender_strerror(r->status));
  }
  finish(a, o, detail[0] ? detail : NULL, r->ack, r->ack ? r->ack_len : 0);
}

static void on_http_done(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r) {
  (void)t;
  attempt_t *a = ud;
  a->xfer = NULL;
  char detail[300];
  rr_qsched_outcome_t o;
  long st = r->http_status;
  if (r->status != 0) {
    o = RR_QSCHED_RETRY;
    snprintf(detail, sizeof detail, "%s", r->message);
  } else if (st >= 200 && st < 300) {
    o = RR_QSCHED_OK;
    detail[0] = '\0';
  } else {
    o = st >= 500 || st == 408 || st == 425 || st == 429 ? RR_QSCHED_RETRY : RR_QSCHED_PERMANENT;
    snprintf(detail, sizeof detail, "HTTP %ld", st);
  }
  finish(a, o, detail[0] ? detail : NULL, r->body, r->body_len);
}

/* DIMSE statuses that no retry can change (PS3.4 B.2.3, PS3.7 C): refused
 * SOP class (0x0122), data set does not match (0xA9xx), cannot understand
 * (0xCxxx). Out of resources (0xA7xx) and the rest are retried. */
static bool permanent_status(int st) {
  return st == 0x0122 || (st & 0xFF00) == 0xA900 || (st & 0xF000) == 0xC000;
}

static void on_scu_done(void *ud, const rr_dicom_scu_report_t *r) {
  attempt_t *a = ud;
  a->scu = NULL;
  char detail[300];
  rr_qsched_outcome_t o = RR_QSCHED_OK;
  detail[0] = '\0';
  if (r->rc == 0 && r->failed == 0) {
    if (r->warnings)
      snprintf(detail, sizeof detail, "stored %u, %u with a warning", r->stored, r->warnings);
  } else {
    int st = -1;
    const char *why = r->reason;
    for (size_t i = 0; i < r->n_files; i++)
      if (r->files[i].outcome == RR_DICOM_SCU_FAILED) {
        st = r->files[i].status;
        why = r->files[i].reason;
        break;
      }
    bool permanent = (r->rc == 0 && permanent_status(st)) ||
                     (r->rc == RR_DICOM_EREJECTED && r->reject_result == 1) || r->rc == RR_EINVAL;
    o = permanent ? RR_QSCHED_PERMANENT : RR_QSCHED_RETRY;
    if (st >= 0)
      snprintf(detail, sizeof detail, "%u of %zu not stored: status 0x%04X (%s)", r->failed,
               r->n_files, (unsigned)st, why);
    else
      snprintf(detail, sizeof detail, "%u of %zu not stored: %s", r->failed ? r->failed : 1,
               r->n_files, why);
  }
  finish(a, o, detail[0] ? detail : NULL, NULL, 0);
}

static void on_stow_done(void *ud, rr_dicomweb_op_t *op, const rr_dicomweb_outcome_t *r) {
  (void)op;
  attempt_t *a = ud;
  a->stow = NULL;
  char detail[300];
  detail[0] = '\0';
  rr_qsched_outcome_t o = RR_QSCHED_OK;
  if (r->status) {
    o = r->retryable ? RR_QSCHED_RETRY : RR_QSCHED_PERMANENT;
    if (r->failure_reason)
      snprintf(detail, sizeof detail, "%zu of %zu not stored: FailureReason 0x%04X (%s)", r->failed,
               r->sent, r->failure_reason, r->message);
    else
      snprintf(detail, sizeof detail, "%s", r->message);
  } else if (r->warnings) {
    snprintf(detail, sizeof detail, "stored %zu, %zu with a warning", r->stored, r->warnings);
  }
  finish(a, o, detail[0] ? detail : NULL, NULL, 0);
}

/* The channel of a destination ("<channel>.<name>"). */
static const char *channel_of(const dest_t *x, char *out, size_t cap) {
  const char *dot = strchr(x->cfg.name, '.');
  snprintf(out, cap, "%.*s", dot ? (int)(dot - x->cfg.name) : (int)strlen(x->cfg.name),
           x->cfg.name);
  return out;
}

/* An AI endpoint's answer: 200 with the result, or 202 (the result comes
 * by callback or from a status URL). */
static void on_ai_done(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r) {
  (void)t;
  attempt_t *a = ud;
  dest_t *x = a->d;
  rr_dispatch_t *d = x->owner;
  a->xfer = NULL;
  char detail[300];
  detail[0] = '\0';
  rr_qsched_outcome_t o = RR_QSCHED_OK;
  long st = r->http_status;
  if (r->status != 0) {
    o = RR_QSCHED_RETRY;
    snprintf(detail, sizeof detail, "%s", r->message);
  } else if (st == 200) {
    rr_buf_t err;
    rr_buf_init(&err, 1024);
    rr_ai_result_t *res = NULL;
    if (rr_ai_parse_result(r->body, r->body_len, &res, &err) != 0 ||
        rr_ai_validate("result", res->json, &err) != 0) {
      o = RR_QSCHED_PERMANENT;
      snprintf(detail, sizeof detail, "result does not follow the contract: %s",
               err.data ? err.data : "?");
    } else if (strcmp(res->job_id, a->job_id) != 0) {
      o = RR_QSCHED_PERMANENT;
      snprintf(detail, sizeof detail, "result for another job");
    } else if (x->deid && rr_ai_deid_reidentify(d->journal, a->job_id, res, &err) != 0) {
      o = RR_QSCHED_PERMANENT;
      snprintf(detail, sizeof detail, "result does not follow the contract: %s",
               err.data ? err.data : "?");
    } else if (d->ai_result) {
      d->ai_result(d->ai_result_ud, &x->cfg, a->job_id, a->study_uid, res);
      snprintf(detail, sizeof detail, "result %s, %zu finding(s)", res->status, res->nfindings);
    }
    rr_ai_result_free(res);
    rr_buf_close(&err);
  } else if (st == 202) {
    char chan[64];
    json_t *acc = json_loadb(r->body, r->body_len, 0, NULL);
    const char *status_url = json_string_value(json_object_get(acc, "status_url"));
    rr_ai_job_t job = {.job_id = a->job_id,
                       .queue_id = a->id,
                       .destination = x->cfg.name,
                       .channel = channel_of(x, chan, sizeof chan),
                       .study_uid = a->study_uid,
                       .mode = (rr_ai_mode_t)x->cfg.ai_mode,
                       .state = "running",
                       .status_url = status_url,
                       .sent_ms = wall_ms()};
    /* only the fields the upsert changes matter here; the row exists */
    rr_ai_job_sent(d->journal, &job);
    snprintf(detail, sizeof detail, "accepted, result to come");
    json_decref(acc);
  } else {
    o = st >= 500 || st == 408 || st == 425 || st == 429 ? RR_QSCHED_RETRY : RR_QSCHED_PERMANENT;
    snprintf(detail, sizeof detail, "HTTP %ld", st);
  }
  finish(a, o, detail[0] ? detail : NULL, r->body, r->body_len);
}

static int send_ai(dest_t *x, attempt_t *a, json_t *ctx);
static void one_closed(rr_dispatch_t *d);

/* A de-identifying endpoint's job is ready (or refused): the request goes
 * out with the pseudonymous context, or the attempt ends. A refusal no
 * retry can change fails the job. */
static void on_deid_ready(void *ud, int status, bool permanent, const char *detail, json_t *ctx) {
  attempt_t *a = ud;
  dest_t *x = a->d;
  rr_dispatch_t *d = x->owner;
  char why[400];
  int rc = status;
  if (rc == 0 && !d->stopping && (rc = send_ai(x, a, ctx)) != 0) {
    permanent = rc == RR_EINVAL || rc == RR_EPARSE || rc == RR_ENOTFOUND;
    detail = rr_strerror(rc);
  }
  json_decref(ctx);
  if (d->stopping) {
    finish(a, RR_QSCHED_RETRY, "stopping", NULL, 0); /* the row stays queued */
  } else if (rc && permanent) {
    int64_t now = wall_ms();
    char chan[64];
    rr_ai_job_t job = {.job_id = a->job_id,
                       .queue_id = a->id,
                       .destination = x->cfg.name,
                       .channel = channel_of(x, chan, sizeof chan),
                       .study_uid = a->study_uid,
                       .mode = (rr_ai_mode_t)x->cfg.ai_mode,
                       .state = "sending",
                       .sent_ms = now,
                       .deadline_ms = now};
    snprintf(why, sizeof why, "not sent: %s", detail);
    if (rr_ai_job_sent(d->journal, &job) == 0 &&
        rr_ai_job_state(d->journal, a->job_id, "failed", why, now) == 0)
      rr_journal_audit_json(d->journal, "engine", "failed", a->job_id,
                            json_pack("{s:s, s:s}", "endpoint", x->cfg.name, "reason", why));
    rr_log(RR_LOG_ERROR, "ai", "event=job_failed destination=%s job=%s error=\"%s\"", x->cfg.name,
           a->job_id, why);
    a->job_id[0] = '\0'; /* failed, not expired */
    finish(a, RR_QSCHED_PERMANENT, why, NULL, 0);
  } else if (rc) {
    snprintf(why, sizeof why, "not sent: %s", detail ? detail : rr_strerror(rc));
    finish(a, RR_QSCHED_RETRY, why, NULL, 0);
  }
  one_closed(d);
}

/* Builds and sends the AI request of a queued study context. */
static int start_ai(dest_t *x, attempt_t *a) {
  rr_dispatch_t *d = x->owner;
  json_t *ctx = json_loadb(a->payload.data ? a->payload.data : "", a->payload.len, 0, NULL);
  const char *uid = json_string_value(json_object_get(ctx, "study_uid"));
  if (!json_is_object(ctx) || !uid || strlen(uid) > 64) {
    json_decref(ctx);
    return RR_EPARSE;
  }
  snprintf(a->study_uid, sizeof a->study_uid, "%s", uid);
  rr_ai_takes_t takes = {x->cfg.ai_modalities, x->cfg.ai_body_parts, x->cfg.ai_procedures};
  const char *why;
  if (!rr_ai_takes_match(&takes, ctx, &why)) {
    json_decref(ctx);
    char detail[80];
    snprintf(detail, sizeof detail, "not taken by this endpoint (%s)", why);
    finish(a, RR_QSCHED_OK, detail, NULL, 0);
    return 0;
  }
  snprintf(a->job_id, sizeof a->job_id, "AJ-%lld", (long long)a->id);
  if (x->deid) {
    /* The job and its token first, then the copies and the map: both are
     * committed before the request leaves (on_deid_ready goes on), so the
     * endpoint's first fetch finds them. */
    int64_t now = wall_ms();
    char chan[64];
    rr_ai_job_t job = {
        .job_id = a->job_id,
        .queue_id = a->id,
        .destination = x->cfg.name,
        .channel = channel_of(x, chan, sizeof chan),
        .study_uid = a->study_uid,
        .mode = (rr_ai_mode_t)x->cfg.ai_mode,
        .state = "sending",
        .token_hash = a->token_hash,
        .sent_ms = now,
        .deadline_ms =
            now + (x->cfg.sched.max_age_ms ? (int64_t)x->cfg.sched.max_age_ms : 3600 * 1000)};
    int rc = rr_ai_token(a->token, a->token_hash);
    if (rc == 0 && (rc = rr_ai_job_sent(d->journal, &job)) == 0) {
      d->closing++;
      if ((rc = rr_ai_deid_start(x->deid, a->job_id, ctx, on_deid_ready, a)) != 0)
        d->closing--;
    }
    json_decref(ctx);
    return rc;
  }
  int rc = send_ai(x, a, ctx);
  json_decref(ctx);
  return rc;
}

/* Builds the request from ctx (borrowed) and sends it. */
static int send_ai(dest_t *x, attempt_t *a, json_t *ctx) {
  rr_dispatch_t *d = x->owner;
  int64_t now = wall_ms();
  int64_t age = x->cfg.sched.max_age_ms ? (int64_t)x->cfg.sched.max_age_ms : 3600 * 1000;
  char token[RR_AI_TOKEN_HEX + 1], hash[65], url[1200], chan[64], images[1200];
  bool cb = x->cfg.ai_callback && d->ai_callback_base;
  bool tok = cb || x->deid; /* a de-identifying endpoint fetches from us with it */
  int rc = x->deid ? 0 : tok ? rr_ai_token(token, hash) : 0;
  if (x->deid) { /* the token the job was recorded with */
    memcpy(token, a->token, sizeof token);
    memcpy(hash, a->token_hash, sizeof hash);
  }
  if (cb)
    snprintf(url, sizeof url, "%s/api/ai/jobs/%s/result", d->ai_callback_base, a->job_id);
  if (x->deid)
    snprintf(images, sizeof images, "%s/api/ai/jobs/%s/dicomweb", d->ai_callback_base, a->job_id);
  rr_ai_request_opts_t o = {.job_id = a->job_id,
                            .endpoint = x->cfg.short_name,
                            .created_ms = now,
                            .deadline_ms = now + age,
                            .callback_url = cb ? url : NULL,
                            .token = cb ? token : NULL,
                            .images_root = x->deid                    ? images
                                           : x->cfg.ai_images_root[0] ? x->cfg.ai_images_root
                                                                      : NULL,
                            .images_token = x->deid ? token : NULL};
  if (rc == 0)
    rc = rr_ai_build_request(ctx, &o, &a->request);
  if (rc)
    return rc;
  rr_ai_job_t job = {.job_id = a->job_id,
                     .queue_id = a->id,
                     .destination = x->cfg.name,
                     .channel = channel_of(x, chan, sizeof chan),
                     .study_uid = a->study_uid,
                     .mode = (rr_ai_mode_t)x->cfg.ai_mode,
                     .state = "sending",
                     .token_hash = tok ? hash : NULL,
                     .sent_ms = now,
                     .deadline_ms = now + age,
                     .request = a->request.data};
  if ((rc = rr_ai_job_sent(d->journal, &job)) != 0)
    return rc;
  /* The audit trail: what is sent, to whom, for which study (the request
   * carries no patient identifier). */
  rr_journal_audit_json(d->journal, "engine", "dispatch", a->job_id,
                        json_pack("{s:s, s:s, s:s, s:s, s:b, s:o*}", "endpoint", x->cfg.name, "url",
                                  x->cfg.url, "mode", rr_ai_mode_name((rr_ai_mode_t)x->cfg.ai_mode),
                                  "study_uid", a->study_uid, "deidentified", x->deid != NULL,
                                  "request", json_loadb(a->request.data, a->request.len, 0, NULL)));
  rr_http_request_t req;
  rr_http_client_request_default(&req);
  req.method = RR_HTTP_POST;
  req.url = x->cfg.url;
  req.body = a->request.data;
  req.body_len = a->request.len;
  req.body_borrowed = 1;
  req.content_type = "application/json";
  req.bearer_token = x->token;
  req.ca_file = x->cfg.tls_ca[0] ? x->cfg.tls_ca : NULL;
  req.cert_file = x->cfg.tls_cert[0] ? x->cfg.tls_cert : NULL;
  req.key_file = x->cfg.tls_key[0] ? x->cfg.tls_key : NULL;
  req.connect_timeout_ms = x->cfg.connect_timeout_ms;
  req.timeout_ms = x->cfg.timeout_ms;
  return rr_http_client_submit(x->http, &req, on_ai_done, a, &a->xfer);
}

static void add_path(void *ud, const char *path) {
  attempt_t *a = ud;
  if (a->npaths == a->paths_cap) {
    size_t cap = a->paths_cap ? a->paths_cap * 2 : 16;
    char **v = realloc(a->paths, cap * sizeof *v);
    if (!v)
      return;
    a->paths = v;
    a->paths_cap = cap;
  }
  char *p = strdup(path);
  if (p)
    a->paths[a->npaths++] = p;
}

/* The files a DICOM or STOW-RS delivery sends: {"files": [...]} or
 * {"study_uid": ...}. RR_EPARSE for another payload, RR_ENOTFOUND for a
 * study with no instance file on this machine. */
static int delivery_files(dest_t *x, attempt_t *a) {
  json_t *o = json_loadb(a->payload.data ? a->payload.data : "", a->payload.len, 0, NULL);
  json_t *files = json_object_get(o, "files");
  const char *uid = json_string_value(json_object_get(o, "study_uid"));
  int rc = 0;
  if (json_is_array(files) && json_array_size(files)) {
    for (size_t i = 0; i < json_array_size(files); i++) {
      const char *p = json_string_value(json_array_get(files, i));
      if (!p || p[0] != '/') {
        rc = RR_EPARSE;
        break;
      }
      add_path(a, p);
    }
  } else if (uid) {
    if (rr_journal_study_paths(x->owner->journal, uid, add_path, a) < 0)
      rc = RR_EIO;
    else if (a->npaths == 0)
      rc = RR_ENOTFOUND;
    for (size_t i = 0; rc == 0 && i < a->npaths; i++)
      if (a->paths[i][0] != '/') /* recorded by a DICOMweb source: a URL, not a file */
        rc = RR_EPARSE;
  } else {
    rc = RR_EPARSE;
  }
  json_decref(o);
  rr_dispatch_t *d = x->owner;
  for (size_t i = 0; rc == 0 && d->file_gate && i < a->npaths; i++)
    rc = d->file_gate(d->file_gate_ud, a->paths[i]);
  return rc;
}

static void on_injected(void *ud, int status, const char *detail) {
  attempt_t *a = ud;
  /* Refused by the channel (its accept list, its script): never taken. */
  finish(a,
         status == 0           ? RR_QSCHED_OK
         : status == RR_EINVAL ? RR_QSCHED_PERMANENT
                               : RR_QSCHED_RETRY,
         status ? detail : NULL, NULL, 0);
}

/* Starts one delivery of row id. */
static int start(dest_t *x, int64_t id) {
  rr_dispatch_t *d = x->owner;
  attempt_t *a = calloc(1, sizeof *a);
  if (!a)
    return RR_ENOMEM;
  a->d = x;
  a->id = id;
  rr_buf_init(&a->payload, (size_t)1 << 30);
  rr_buf_init(&a->request, (size_t)64 << 20);
  int rc;
  cached_t *c = cache_take(x, id);
  if (c) {
    a->content_type = c->content_type;
    a->message_id = c->message_id;
    rc = rr_buf_append(&a->payload, c->data, c->len);
    free(c);
  } else {
    rc = rr_journal_queue_payload(d->journal, id, &a->payload, &a->content_type, &a->message_id);
  }
  if (rc) {
    free_attempt(a);
    return rc;
  }
  a->next = x->inflight;
  x->inflight = a;
  switch (x->cfg.kind) {
  case RR_DEST_MLLP: {
    unsigned k = 0;
    while (k < x->nsenders && x->busy[k])
      k++;
    if (k == x->nsenders) {
      rc = RR_EAGAIN;
      break;
    }
    a->slot = k;
    x->busy[k] = true;
    /* The sender takes the control id (for the MSA-2 check) from MSH-10. */
    rc = rr_mllp_sender_send(x->senders[k], a->payload.data, a->payload.len, NULL, on_mllp_sent, a);
    if (rc)
      x->busy[k] = false;
    break;
  }
  case RR_DEST_HTTP: {
    rr_http_request_t req;
    rr_http_client_request_default(&req);
    req.method = (rr_http_method_t)x->cfg.method;
    req.url = x->cfg.url;
    req.body = a->payload.data;
    req.body_len = a->payload.len;
    req.body_borrowed = 1;
    req.content_type = x->cfg.content_type[0]                 ? x->cfg.content_type
                       : strcmp(a->content_type, "json") == 0 ? "application/json"
                                                              : "application/hl7-v2";
    req.bearer_token = x->token;
    req.ca_file = x->cfg.tls_ca[0] ? x->cfg.tls_ca : NULL;
    req.cert_file = x->cfg.tls_cert[0] ? x->cfg.tls_cert : NULL;
    req.key_file = x->cfg.tls_key[0] ? x->cfg.tls_key : NULL;
    req.connect_timeout_ms = x->cfg.connect_timeout_ms;
    req.timeout_ms = x->cfg.timeout_ms;
    rc = rr_http_client_submit(x->http, &req, on_http_done, a, &a->xfer);
    break;
  }
  case RR_DEST_CHANNEL:
    rc = d->inject ? d->inject(d->inject_ud, x->cfg.channel, a->payload.data, a->payload.len,
                               on_injected, a)
                   : RR_EINVAL;
    break;
  case RR_DEST_DICOM: {
    if ((rc = delivery_files(x, a)) != 0)
      break;
    rr_dicom_tls_config_t tls = {.cert_file = x->cfg.tls_cert[0] ? x->cfg.tls_cert : NULL,
                                 .key_file = x->cfg.tls_key[0] ? x->cfg.tls_key : NULL,
                                 .ca_file = x->cfg.tls_ca[0] ? x->cfg.tls_ca : NULL};
    rr_dicom_scu_config_t sc = {.name = x->cfg.name,
                                .calling_ae = x->cfg.calling_ae,
                                .called_ae = x->cfg.called_ae,
                                .host = x->cfg.host,
                                .port = x->cfg.port,
                                .dimse_timeout_s = x->cfg.dimse_timeout_s,
                                .tls = x->cfg.tls ? &tls : NULL};
    rc = rr_dicom_scu_send(d->loop, &sc, (const char *const *)a->paths, a->npaths, on_scu_done, a,
                           &a->scu);
    break;
  }
  case RR_DEST_AI: rc = start_ai(x, a); break;
  case RR_DEST_STOW:
    if ((rc = delivery_files(x, a)) != 0)
      break;
    rc = rr_dicomweb_store(x->dw, (const char *const *)a->paths, a->npaths, on_stow_done, a,
                           &a->stow);
    break;
  }
  if (rc == RR_EAGAIN) { /* no free connection: not an attempt */
    unlink_attempt(x, a);
    free_attempt(a);
    return rc;
  }
  if (rc) {
    /* Refused before it left (a payload that cannot be framed or parsed,
     * a limit): an attempt that failed, so back-off and dead letters
     * apply; one the destination could never take is dead at once. */
    char detail[160];
    snprintf(detail, sizeof detail, "not sent: %s", rr_strerror(rc));
    bool permanent = rc == RR_EINVAL || rc == RR_EPARSE || rc == RR_ENOTFOUND ||
                     (x->cfg.kind == RR_DEST_STOW && rc == -ENOENT);
    finish(a, permanent ? RR_QSCHED_PERMANENT : RR_QSCHED_RETRY, detail, NULL, 0);
  }
  return 0;
}

static void pump(dest_t *x) {
  rr_dispatch_t *d = x->owner;
  if (d->stopping || x->pumping)
    return;
  x->pumping = true;
  bool blocked = false; /* startable work waits for a transport: a finish pumps again */
  int64_t id;
  while (rr_qsched_next(x->s, wall_ms(), &id) == 0) {
    int rc = start(x, id);
    if (rc == RR_ENOTFOUND) { /* no longer in the store */
      rr_qsched_return(x->s, id);
      rr_qsched_drop(x->s, id);
      continue;
    }
    if (rc) {
      rr_qsched_return(x->s, id);
      blocked = true;
      if (rc != RR_EAGAIN)
        rr_log(RR_LOG_ERROR, "queue", "event=start_failed destination=%s queue_id=%lld error=%s",
               x->cfg.name, (long long)id, rr_strerror(rc));
      break;
    }
  }
  x->pumping = false;
  if (!blocked)
    rearm(x);
}

/* ---- setup and teardown --------------------------------------------------------- */

int rr_dispatch_new(uv_loop_t *loop, rr_journal_t *journal, rr_dispatch_t **out) {
  rr_dispatch_t *d = calloc(1, sizeof *d);
  if (!d)
    return RR_ENOMEM;
  d->loop = loop;
  d->journal = journal;
  uv_timer_init(loop, &d->rewrite);
  d->rewrite.data = d;
  d->rewrite_open = true;
  uv_unref((uv_handle_t *)&d->rewrite);
  rr_journal_set_enqueue_cb(journal, on_enqueued, d);
  *out = d;
  return 0;
}

void rr_dispatch_set_study_complete(rr_dispatch_t *d, int (*fn)(void *ud, const char *study_uid),
                                    void *ud) {
  d->complete = fn;
  d->complete_ud = ud;
}

void rr_dispatch_set_file_gate(rr_dispatch_t *d, rr_dispatch_file_gate_fn fn, void *ud) {
  d->file_gate = fn;
  d->file_gate_ud = ud;
}

void rr_dispatch_kick(rr_dispatch_t *d) {
  for (dest_t *x = d->dests; x; x = x->next)
    pump(x);
}

void rr_dispatch_set_ai(rr_dispatch_t *d, const char *callback_base, rr_dispatch_ai_result_fn fn,
                        void *ud) {
  free(d->ai_callback_base);
  d->ai_callback_base = callback_base ? strdup(callback_base) : NULL;
  d->ai_result = fn;
  d->ai_result_ud = ud;
}

void rr_dispatch_set_replay(rr_dispatch_t *d, rr_dispatch_replay_fn fn, void *ud) {
  d->replay = fn;
  d->replay_ud = ud;
}

void rr_dispatch_set_inject(rr_dispatch_t *d, rr_dispatch_inject_fn fn, void *ud) {
  d->inject = fn;
  d->inject_ud = ud;
}

static int open_transport(dest_t *x, rr_buf_t *err) {
  rr_dispatch_t *d = x->owner;
  const rr_destination_config_t *c = &x->cfg;
  if (c->kind == RR_DEST_MLLP) {
    if (c->tls) {
      rr_tls_config_t tc = {.role = RR_TLS_CLIENT,
                            .cert_file = c->tls_cert[0] ? c->tls_cert : NULL,
                            .key_file = c->tls_key[0] ? c->tls_key : NULL,
                            .ca_file = c->tls_ca[0] ? c->tls_ca : NULL,
                            .server_name = c->tls_server_name[0] ? c->tls_server_name : c->host};
      int rc = rr_tls_ctx_new(&tc, &x->tls, err);
      if (rc)
        return rc;
    }
    x->nsenders = c->sched.concurrency ? c->sched.concurrency : 1;
    x->senders = calloc(x->nsenders, sizeof *x->senders);
    x->busy = calloc(x->nsenders, sizeof *x->busy);
    if (!x->senders || !x->busy)
      return RR_ENOMEM;
    for (unsigned i = 0; i < x->nsenders; i++) {
      rr_mllp_sender_config_t sc;
      rr_mllp_sender_config_default(&sc);
      sc.name = c->name;
      sc.host = c->host;
      sc.port = c->port;
      sc.keep_alive = c->keep_alive;
      sc.connect_timeout_ms = c->connect_timeout_ms;
      sc.ack_timeout_ms = c->ack_timeout_ms;
      sc.mllp_release = c->mllp_release;
      sc.max_queue = 1;
      /* Pacing after failures is the queue's (back-off per delivery, the
       * circuit breaker): a sender that waited on its own would hold the
       * delivery handed to it long after its peer came back. */
      sc.backoff_base_ms = 0;
      sc.backoff_cap_ms = 0;
      if (x->tls) {
        sc.transport_new = rr_mllp_transport_tls_new;
        sc.transport_arg = x->tls;
      }
      int rc = rr_mllp_sender_new(d->loop, &sc, &x->senders[i]);
      if (rc) {
        rr_buf_printf(err, "destination %s: %s", c->name, rr_strerror(rc));
        return rc;
      }
      x->open_senders++;
    }
  } else if (c->kind == RR_DEST_HTTP || c->kind == RR_DEST_STOW || c->kind == RR_DEST_AI) {
    if (c->kind == RR_DEST_AI && c->ai_deidentify) {
      if (!d->ai_callback_base) {
        rr_buf_printf(err, "destination %s: deidentify needs http.public_url", c->name);
        return RR_EINVAL;
      }
      int rc = rr_ai_deid_new(d->loop, d->journal, c->name, c->ai_deid_dir, c->ai_deid_secret,
                              c->ai_deid_secret_create, &x->deid, err);
      if (rc)
        return rc;
    }
    if (c->kind != RR_DEST_STOW && c->token_file[0]) {
      int rc = rr_http_client_read_token(c->token_file, &x->token, err);
      if (rc)
        return rc;
    }
    rr_http_client_config_t hc;
    rr_http_client_config_default(&hc);
    hc.name = c->name;
    hc.max_concurrent = c->sched.concurrency ? c->sched.concurrency : 1;
    int rc = rr_http_client_new(d->loop, &hc, &x->http);
    if (rc) {
      rr_buf_printf(err, "destination %s: %s", c->name, rr_strerror(rc));
      return rc;
    }
    x->http_open = true;
    if (c->kind == RR_DEST_STOW) {
      rr_dicomweb_config_t dc;
      rr_dicomweb_config_default(&dc);
      dc.name = c->name;
      dc.base_url = c->url;
      dc.auth = c->user[0]         ? RR_DICOMWEB_AUTH_BASIC
                : c->token_file[0] ? RR_DICOMWEB_AUTH_BEARER
                                   : RR_DICOMWEB_AUTH_NONE;
      dc.user = c->user[0] ? c->user : NULL;
      dc.password_file = c->password_file[0] ? c->password_file : NULL;
      dc.token_file = c->token_file[0] ? c->token_file : NULL;
      dc.ca_file = c->tls_ca[0] ? c->tls_ca : NULL;
      dc.cert_file = c->tls_cert[0] ? c->tls_cert : NULL;
      dc.key_file = c->tls_key[0] ? c->tls_key : NULL;
      dc.connect_timeout_ms = c->connect_timeout_ms;
      rc = rr_dicomweb_client_new(x->http, &dc, &x->dw, err);
      if (rc)
        return rc;
    }
  }
  return 0;
}

static void close_transports(dest_t *x);

int rr_dispatch_add(rr_dispatch_t *d, const rr_destination_config_t *cfg, rr_buf_t *err) {
  if (find_dest(d, cfg->name)) {
    rr_buf_printf(err, "destination %s is defined twice", cfg->name);
    return RR_EINVAL;
  }
  dest_t *x = calloc(1, sizeof *x);
  if (!x)
    return RR_ENOMEM;
  x->owner = d;
  x->cfg = *cfg;
  if (x->cfg.window == 0)
    x->cfg.window = 20000;
  x->cfg.sched.max_items = x->cfg.window;
  x->cache = calloc(CACHE_BUCKETS, sizeof *x->cache); /* NULL: every payload is read */
  x->rng = (uint64_t)wall_ms() * 0x9E3779B97F4A7C15ULL ^ (uintptr_t)x;
  if (!x->rng)
    x->rng = 1;
  int rc = rr_qsched_new(&x->cfg.sched, &x->s);
  if (rc) {
    rr_buf_printf(err, "destination %s: queue settings: %s", cfg->name, rr_strerror(rc));
    free(x->cache);
    free(x);
    return rc;
  }
  uv_timer_init(d->loop, &x->timer);
  x->timer.data = x;
  x->timer_open = true;
  /* Linked first, so that a failure below closes through the same path. */
  if (d->last)
    d->last->next = x;
  else
    d->dests = x;
  d->last = x;
  if ((rc = open_transport(x, err)) != 0) {
    if (!err->len)
      rr_buf_printf(err, "destination %s: %s", cfg->name, rr_strerror(rc));
    return rc;
  }
  refill(x);
  rr_qsched_stats_t st;
  rr_qsched_stats(x->s, &st);
  rr_log(RR_LOG_INFO, "queue",
         "event=destination_ready destination=%s kind=%s pending=%zu dead=%zu backlog=%s",
         x->cfg.name, rr_dest_kind_name(x->cfg.kind), st.total.pending, st.total.dead,
         x->backlog ? "yes" : "no");
  pump(x);
  return 0;
}

/* The message a queue row delivers (0 when the row is gone), for the
 * history of operator actions. */
static int64_t message_of(rr_dispatch_t *d, int64_t id) {
  rr_buf_t b;
  rr_buf_init(&b, (size_t)1 << 30);
  const char *ct;
  int64_t mid = 0;
  if (rr_journal_queue_payload(d->journal, id, &b, &ct, &mid) != 0)
    mid = 0;
  rr_buf_close(&b);
  return mid;
}

int rr_dispatch_retry(rr_dispatch_t *d, const char *name, int64_t id) {
  dest_t *x = find_dest(d, name);
  if (!x)
    return RR_ENOTFOUND;
  rr_journal_delivery_t rec = {.destination = x->cfg.name,
                               .outcome = RR_JOURNAL_REQUEUED,
                               .at_ms = wall_ms(),
                               .detail = "retried by an operator"};
  int rc = 0;
  if (id) {
    if ((rc = rr_qsched_retry(x->s, id)) != 0)
      return rc;
    rec.queue_id = id;
    rec.message_id = message_of(d, id);
  } else {
    /* queue_id 0: every dead row of the destination, in the store too. */
    rr_qsched_retry_all_dead(x->s);
  }
  record(d, &rec);
  pump(x);
  return 0;
}

int rr_dispatch_drop(rr_dispatch_t *d, const char *name, int64_t id) {
  dest_t *x = find_dest(d, name);
  if (!x)
    return RR_ENOTFOUND;
  int rc = rr_qsched_drop(x->s, id);
  if (rc)
    return rc;
  free(cache_take(x, id));
  rr_journal_delivery_t rec = {.queue_id = id,
                               .message_id = message_of(d, id),
                               .destination = x->cfg.name,
                               .outcome = RR_JOURNAL_DROPPED,
                               .at_ms = wall_ms(),
                               .detail = "dropped by an operator"};
  record(d, &rec);
  pump(x);
  return 0;
}

static void on_op(void *ud, const rr_journal_op_t *op) {
  rr_dispatch_t *d = ud;
  int rc;
  if (strcmp(op->op, "retry") == 0)
    rc = rr_dispatch_retry(d, op->destination, op->queue_id);
  else if (strcmp(op->op, "retry_dead") == 0)
    rc = rr_dispatch_retry(d, op->destination, 0);
  else if (strcmp(op->op, "drop") == 0)
    rc = rr_dispatch_drop(d, op->destination, op->queue_id);
  else if (strcmp(op->op, "replay") == 0)
    rc = !find_dest(d, op->destination) ? RR_ENOTFOUND
         : d->replay                    ? d->replay(d->replay_ud, op->message_id, op->destination)
                                        : RR_EINVAL;
  else if (strcmp(op->op, "study_complete") == 0)
    rc = d->complete ? d->complete(d->complete_ud, op->destination) : RR_EINVAL;
  else
    rc = RR_EINVAL;
  if (strcmp(op->op, "study_complete") == 0) { /* the UID is an identifier: debug only */
    rr_log(rc < 0 ? RR_LOG_WARN : RR_LOG_INFO, "dicom",
           "event=operator_request op=study_complete result=%s", rc < 0 ? rr_strerror(rc) : "ok");
    return;
  }
  rr_log(rc < 0 ? RR_LOG_WARN : RR_LOG_INFO, "queue",
         "event=operator_request op=%s destination=%s queue_id=%lld message_id=%lld result=%s",
         op->op, op->destination, (long long)op->queue_id, (long long)op->message_id,
         rc < 0 ? rr_strerror(rc) : "ok");
}

int rr_dispatch_apply_ops(rr_dispatch_t *d) {
  int n = rr_journal_ops_take(d->journal, on_op, d);
  rr_journal_kick(d->journal);
  return n;
}

void rr_dispatch_stats(const rr_dispatch_t *d,
                       void (*cb)(void *ud, const rr_dispatch_dest_stats_t *s), void *ud) {
  for (dest_t *x = d->dests; x; x = x->next) {
    rr_qsched_stats_t st;
    rr_qsched_breaker_t br;
    rr_qsched_stats(x->s, &st);
    rr_qsched_breaker(x->s, wall_ms(), &br);
    rr_dispatch_dest_stats_t s = {.name = x->cfg.name,
                                  .kind = x->cfg.kind,
                                  .window = st.total,
                                  .backlog = x->backlog,
                                  .delivered = x->delivered,
                                  .retried = x->retried,
                                  .dead = x->dead,
                                  .breaker = br.state};
    cb(ud, &s);
  }
}

static void one_closed(rr_dispatch_t *d) {
  if (d->closing && --d->closing == 0 && d->stopped) {
    void (*cb)(void *) = d->stopped;
    d->stopped = NULL;
    cb(d->stopped_ud);
  }
}

static void on_timer_closed(uv_handle_t *h) {
  dest_t *x = h->data;
  one_closed(x->owner);
}

static void on_sender_closed(void *ud) {
  dest_t *x = ud;
  x->open_senders--;
  one_closed(x->owner);
}

static void on_http_closed(void *ud) {
  dest_t *x = ud;
  x->http_open = false;
  one_closed(x->owner);
}

static void on_rewrite_closed(uv_handle_t *h) {
  one_closed(h->data);
}

static void close_transports(dest_t *x) {
  rr_dispatch_t *d = x->owner;
  if (x->timer_open) {
    x->timer_open = false;
    d->closing++;
    uv_close((uv_handle_t *)&x->timer, on_timer_closed);
  }
  for (unsigned i = 0; i < x->nsenders; i++)
    if (x->senders[i]) {
      d->closing++;
      rr_mllp_sender_close(x->senders[i], on_sender_closed, x);
      x->senders[i] = NULL;
    }
  if (x->http && x->http_open) {
    d->closing++;
    rr_http_client_close(x->http, on_http_closed, x);
  }
}

void rr_dispatch_stop(rr_dispatch_t *d, void (*done)(void *ud), void *ud) {
  d->stopping = true;
  d->stopped = done;
  d->stopped_ud = ud;
  d->closing++; /* held until every close below has been started */
  for (dest_t *x = d->dests; x; x = x->next) {
    for (attempt_t *a = x->inflight; a; a = a->next)
      if (a->scu) /* its callback comes (from its thread, via the loop) */
        rr_dicom_scu_cancel(a->scu);
    close_transports(x);
  }
  if (d->rewrite_open) {
    d->rewrite_open = false;
    d->closing++;
    uv_close((uv_handle_t *)&d->rewrite, on_rewrite_closed);
  }
  one_closed(d);
}

void rr_dispatch_free(rr_dispatch_t *d) {
  if (!d)
    return;
  for (record_t *r = d->unrecorded, *n; r; r = n) {
    n = r->next;
    free(r);
  }
  free(d->ai_callback_base);
  for (dest_t *x = d->dests, *n; x; x = n) {
    n = x->next;
    for (attempt_t *a = x->inflight, *an; a; a = an) {
      an = a->next;
      free_attempt(a);
    }
    rr_qsched_free(x->s);
    cache_free(x);
    free(x->senders);
    free(x->busy);
    rr_tls_ctx_free(x->tls);
    if (x->token)
      rr_http_client_token_free(x->token);
    rr_dicomweb_client_free(x->dw);
    rr_ai_deid_free(x->deid);
    free(x);
  }
  free(d);
}

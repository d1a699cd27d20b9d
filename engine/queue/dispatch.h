/* Destination queues on the loop: what scripts route is delivered from the
 * store, per destination, by the pure scheduler (queue/sched.h).
 *
 * Model
 *   Every destination has a durable queue: rows of the journal's queue
 *   table, written in the transaction that journals the routed message.
 *   The dispatcher holds a window of each queue in a scheduler (at most
 *   cfg.window items: the oldest rows by id), starts deliveries as the
 *   scheduler allows (per-key FIFO, priority lanes, concurrency, back-off,
 *   circuit breaker), and records every outcome in the journal (history row
 *   plus the queue row removed, rescheduled or dead-lettered). When the
 *   window is full, newer rows wait in the store and are loaded, in id
 *   order, as the window drains; a backlog of any size costs the memory of
 *   one window.
 *
 * Delivery is at least once: an outcome recorded in the store is never
 *   repeated, but a delivery whose outcome was not yet committed when the
 *   process died is made again after the restart (with the same payload,
 *   so the receiver can drop it by its control id).
 *
 * Destinations: an MLLP sender (plain or TLS; AA/CA delivered, AR/CR dead
 *   at once, AE/CE retried unless ae_is_permanent), an HTTP(S) request
 *   (2xx delivered; 408, 425, 429 and 5xx retried; other 4xx dead at once;
 *   transport errors and timeouts retried), another channel (through the
 *   inject function the engine sets).
 *
 * Threading: loop thread only. Callbacks never run synchronously inside
 *   the call that caused them. */
#ifndef RR_QUEUE_DISPATCH_H
#define RR_QUEUE_DISPATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/buf.h"
#include "queue/sched.h"
#include "store/journal.h"

typedef enum rr_dest_kind {
  RR_DEST_MLLP = 0,
  RR_DEST_HTTP,
  RR_DEST_CHANNEL,
  RR_DEST_DICOM, /* C-STORE to a DICOM SCP (a PACS) */
  RR_DEST_STOW,  /* STOW-RS to a DICOMweb server */
  RR_DEST_AI     /* an AI endpoint: the payload is a study context, sent as an
                    AI request (ai/ai.h) */
} rr_dest_kind_t;

typedef struct rr_destination_config {
  char name[160]; /* the queue's name: "<channel>.<destination>" */
  rr_dest_kind_t kind;
  rr_qsched_config_t sched; /* concurrency, retries, age, back-off, breaker, dead_blocks_key */
  size_t window;            /* queue rows held in memory at most; default 20,000 */
  /* MLLP */
  char host[256];
  int port;
  int keep_alive;              /* default 1 */
  uint64_t connect_timeout_ms; /* default 5000 */
  uint64_t ack_timeout_ms;     /* default 10000 */
  int mllp_release;            /* 1 (default) or 2 */
  bool ae_is_permanent;        /* AE/CE dead-letters at once instead of retrying */
  bool tls;
  char tls_ca[1024], tls_cert[1024], tls_key[1024], tls_server_name[256];
  /* HTTP */
  char url[2048];
  int method;             /* rr_http_method_t; default POST */
  char content_type[128]; /* "" = application/json for JSON, application/hl7-v2 for HL7 */
  char token_file[1024];  /* bearer token, read at start; "" = none */
  uint64_t timeout_ms;    /* default 30000 */
  /* another channel */
  char channel[64];
  /* DICOM (host, port, tls_* above): payload {"files": [paths]} or
   * {"study_uid": UID} (the study's instances as recorded) */
  char called_ae[17], calling_ae[17];
  unsigned dimse_timeout_s; /* per C-STORE response; default 60 */
  /* STOW-RS (url = the DICOMweb root, token_file, tls_* above); same payloads */
  char user[128], password_file[1024]; /* basic authentication */
  /* AI (url, token_file, tls_*, timeout_ms above) */
  int ai_mode;                                            /* rr_ai_mode_t */
  char **ai_modalities, **ai_body_parts, **ai_procedures; /* owned; NULL = any */
  char ai_images_root[1024];  /* DICOMweb root for studies without a retrieve_url */
  bool ai_callback;           /* ask for the result by callback (else: in the answer) */
  bool ai_deidentify;         /* send de-identified copies through the engine (ai/deid.h) */
  char ai_deid_secret[1024];  /* the pseudonyms' secret file */
  bool ai_deid_secret_create; /* made when missing (the default one beside the store) */
  char ai_deid_dir[1024];     /* where the copies go: "<spool>/deid"; "" = no spool */
  uint64_t ai_poll_ms;        /* GET an accepted job's status_url this often; default 5000 */
  /* what routes to it publish, for AI rollout modes: "result" (default: the
   * PACS, the RIS), "worklist" or "notification" */
  char role[16];
  /* notification destinations: the escalation policy (notify/notify.h), by
   * ACR category 1..3 ([0] unused); chain: NULL-terminated, owned */
  char **notify_chain;
  int64_t notify_repeat_ms[4], notify_next_ms[4];
  /* routing (used by the channel, not the dispatcher) */
  char short_name[64]; /* the name scripts route to */
  bool key_none;       /* routes without a key of their own have none (default: the MRN) */
} rr_destination_config_t;

/* Injects a payload into another channel; calls done (status 0 = kept by
 * that channel's journal) later, from the loop. Returns 0 or a negative
 * code (then done is not called). */
typedef void (*rr_dispatch_inject_done)(void *ud, int status, const char *detail);
typedef int (*rr_dispatch_inject_fn)(void *ud, const char *channel, const char *payload, size_t len,
                                     rr_dispatch_inject_done done, void *done_ud);

/* Routes a journaled message again for one destination (runs its
 * channel's script; queues what the script routes there). Returns the
 * number of deliveries queued, or a negative code. */
typedef int (*rr_dispatch_replay_fn)(void *ud, int64_t message_id, const char *destination);

typedef struct rr_dispatch rr_dispatch_t;

typedef struct rr_dispatch_dest_stats {
  const char *name; /* borrowed for the call */
  rr_dest_kind_t kind;
  rr_qsched_counts_t window; /* of the rows held in memory */
  bool backlog;              /* more rows wait in the store beyond the window */
  uint64_t delivered, retried, dead;
  rr_qsched_breaker_state_t breaker;
} rr_dispatch_dest_stats_t;

void rr_destination_config_default(rr_destination_config_t *c);

/* rr_dispatch_new: a dispatcher for the journal's queues (journal borrowed;
 * it must outlive the dispatcher). Registers itself as the journal's
 * enqueue callback. */
int rr_dispatch_new(uv_loop_t *loop, rr_journal_t *journal, rr_dispatch_t **out);
void rr_dispatch_set_inject(rr_dispatch_t *d, rr_dispatch_inject_fn fn, void *ud);
void rr_dispatch_set_replay(rr_dispatch_t *d, rr_dispatch_replay_fn fn, void *ud);
/* The engine's handler of `radrelay study complete` requests (an op of
 * table queue_ops whose destination column holds the Study Instance UID). */
/* rr_dest_kind_name: "mllp", "http", "channel", "dicom", "stow", "ai". */
const char *rr_dest_kind_name(rr_dest_kind_t k);

/* rr_destination_config_free_lists: frees the lists a configuration owns
 * (AI takes) and sets them to NULL. */
void rr_destination_config_free_lists(rr_destination_config_t *c);

/* An AI endpoint answered with a result (r, borrowed for the call) for job
 * job_id of destination dest (its configuration, borrowed). */
struct rr_ai_result;
typedef void (*rr_dispatch_ai_result_fn)(void *ud, const rr_destination_config_t *dest,
                                         const char *job_id, const char *study_uid,
                                         const struct rr_ai_result *r);
/* rr_dispatch_set_ai: where AI results go, and the URL callbacks are sent
 * to ("<base>/api/ai/jobs/<job>/result"; NULL: endpoints that want a
 * callback cannot be used). */
void rr_dispatch_set_ai(rr_dispatch_t *d, const char *callback_base, rr_dispatch_ai_result_fn fn,
                        void *ud);
void rr_dispatch_set_study_complete(rr_dispatch_t *d, int (*fn)(void *ud, const char *study_uid),
                                    void *ud);
/* rr_dispatch_set_file_gate: asked before a DICOM (C-STORE or STOW-RS)
 * delivery sends a file: 0 it may go, RR_EAGAIN it is still being written
 * (the destination waits; rr_dispatch_kick when it is ready), RR_ENOTFOUND
 * it never will be (the delivery is dead). */
typedef int (*rr_dispatch_file_gate_fn)(void *ud, const char *path);
void rr_dispatch_set_file_gate(rr_dispatch_t *d, rr_dispatch_file_gate_fn fn, void *ud);
/* rr_dispatch_kick: every destination tries its next deliveries again. */
void rr_dispatch_kick(rr_dispatch_t *d);
/* rr_dispatch_add: a destination (cfg copied): opens its transport, loads
 * its queue's first window and starts delivering. On failure a description
 * is appended to err. */
int rr_dispatch_add(rr_dispatch_t *d, const rr_destination_config_t *cfg, rr_buf_t *err);
/* rr_dispatch_known: whether a destination of that queue name exists. */
bool rr_dispatch_known(const rr_dispatch_t *d, const char *name);
/* Operator actions, for the queue of name: retry one dead letter (id) or
 * all (id == 0), drop one pending or dead row. Recorded in the history.
 * RR_ENOTFOUND, RR_EINVAL (in flight). */
int rr_dispatch_retry(rr_dispatch_t *d, const char *name, int64_t id);
int rr_dispatch_drop(rr_dispatch_t *d, const char *name, int64_t id);
/* rr_dispatch_apply_ops: carries out the operator requests waiting in the
 * store (`radrelay queue retry|drop`, `radrelay replay`), then removes
 * them. Returns how many were read, or a negative code. */
int rr_dispatch_apply_ops(rr_dispatch_t *d);
/* rr_dispatch_stats: cb once per destination, in the order added. */
void rr_dispatch_stats(const rr_dispatch_t *d,
                       void (*cb)(void *ud, const rr_dispatch_dest_stats_t *s), void *ud);
/* rr_dispatch_stop: starts nothing more; deliveries in flight are canceled
 * (their rows stay queued); done runs once every transport has closed. */
void rr_dispatch_stop(rr_dispatch_t *d, void (*done)(void *ud), void *ud);
/* rr_dispatch_free: after stop's done (or when nothing was added), and
 * after the journal has been closed: the journal reports to the dispatcher
 * until then (outcomes still queued when it closes). NULL is a no-op. */
void rr_dispatch_free(rr_dispatch_t *d);

#endif

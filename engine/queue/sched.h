/* Delivery scheduler of one destination's store-and-forward queue.
 *
 * The in-memory decision logic for ONE destination: which queued item to
 * deliver next, what to do with an outcome (retry with backoff, dead-letter),
 * and the destination's circuit breaker. It is pure: no I/O, no clock, no
 * randomness of its own. Time (milliseconds, monotonic, e.g. uv_now()) and a
 * random source are passed in, so every decision is reproducible.
 *
 * The durable queue lives in the store. The caller loads a window of items
 * from it (rr_qsched_add, in id order), asks for the next one to deliver
 * (rr_qsched_next), reports the outcome (rr_qsched_done) and persists the
 * change that rr_qsched_done reports. The scheduler never calls back.
 *
 * Rules, in order of precedence:
 *  - Per-key FIFO: of a key's items only the lowest-id one that is not
 *    finished may start, and at most one item per key is in flight. A key's
 *    later items wait while its head waits for a retry, and (with
 *    dead_blocks_key) while its head is dead. The empty key orders nothing.
 *  - Up to `concurrency` items in flight at once.
 *  - Circuit breaker: after `breaker_failures` consecutive RETRY outcomes
 *    nothing starts for `breaker_open_ms`; then one probe item may start; its
 *    success closes the breaker, its failure opens it again.
 *  - Among the items allowed to start: the highest lane first, then the
 *    lowest id.
 *
 * Threading: none. A scheduler belongs to one thread (the loop thread); calls
 * on different schedulers are independent.
 * Memory: only rr_qsched_new and rr_qsched_add allocate. Every other call is
 * allocation-free and cannot fail with RR_ENOMEM. Memory stays at the
 * high-water mark of the loaded window until rr_qsched_free.
 * Cost: add, next, done, return, retry and drop are O(log n) in the number of
 * loaded items (retry of a dead item that its key has moved past, with
 * dead_blocks_key false, also walks that key's earlier pending items). */
#ifndef RR_QUEUE_SCHED_H
#define RR_QUEUE_SCHED_H

#include <stddef.h>
#include <stdint.h>

#define RR_QSCHED_LANES 4         /* priority lanes 0 (routine) .. 3 */
#define RR_QSCHED_KEY_MAX 1024    /* bytes of a key, without the NUL */
#define RR_QSCHED_NEVER INT64_MAX /* rr_qsched_next_wakeup: no timer needed */

typedef struct rr_qsched rr_qsched_t;

typedef struct rr_qsched_config {
  uint32_t concurrency;      /* items in flight at most; >= 1. Default 1 */
  uint32_t max_attempts;     /* dead after this many failed attempts; 0 = unlimited. Default 10 */
  int64_t max_age_ms;        /* dead when older than this at a failure; 0 = unlimited */
  int64_t backoff_base_ms;   /* cap of the first retry delay. Default 1000 */
  int64_t backoff_max_ms;    /* the cap never exceeds this. Default 300000 */
  int dead_blocks_key;       /* a dead item holds back its key's later items. Default 1 */
  uint32_t breaker_failures; /* consecutive RETRY outcomes that open it; 0 = none. Default 5 */
  int64_t breaker_open_ms;   /* how long it stays open before a probe. Default 30000 */
  size_t max_items;          /* items loaded at most (1 .. 2^31); add beyond: RR_ELIMIT.
                                Default 1048576 */
} rr_qsched_config_t;

/* An item as the store knows it. */
typedef struct rr_qsched_item {
  int64_t id;            /* unique; increasing in enqueue order */
  const char *key;       /* ordering key (e.g. an MRN); NULL or "" = none. Copied */
  uint32_t lane;         /* 0 .. RR_QSCHED_LANES-1; higher is more urgent */
  int64_t enqueued_ms;   /* when it was queued (for max_age_ms and stats) */
  uint32_t attempts;     /* failed attempts so far */
  int64_t not_before_ms; /* earliest next attempt */
  int dead;              /* loaded as a dead letter (so it can block its key) */
} rr_qsched_item_t;

typedef enum rr_qsched_outcome {
  RR_QSCHED_OK,       /* delivered (and acknowledged) */
  RR_QSCHED_RETRY,    /* transient failure: connection, timeout, 5xx, AE ACK */
  RR_QSCHED_PERMANENT /* rejected for good: 4xx, AR ACK; dead at once */
} rr_qsched_outcome_t;

typedef enum rr_qsched_action {
  RR_QSCHED_DELIVERED,   /* remove it from the store; the scheduler forgot it */
  RR_QSCHED_RESCHEDULED, /* store attempts and not_before_ms */
  RR_QSCHED_DEAD         /* store attempts and the dead state */
} rr_qsched_action_t;

typedef enum rr_qsched_dead_reason {
  RR_QSCHED_NOT_DEAD,
  RR_QSCHED_MAX_ATTEMPTS,
  RR_QSCHED_MAX_AGE,
  RR_QSCHED_REJECTED /* a RR_QSCHED_PERMANENT outcome */
} rr_qsched_dead_reason_t;

typedef enum rr_qsched_breaker_state {
  RR_QSCHED_CLOSED,
  RR_QSCHED_OPEN,     /* nothing starts until open_until_ms */
  RR_QSCHED_HALF_OPEN /* one probe item may start */
} rr_qsched_breaker_state_t;

typedef struct rr_qsched_breaker {
  rr_qsched_breaker_state_t state;
  uint32_t failures;     /* consecutive failures counted so far */
  int64_t open_until_ms; /* OPEN: when the probe is allowed */
  int64_t probe_id;      /* HALF_OPEN: the probe in flight; 0 = not started yet */
} rr_qsched_breaker_t;

/* What rr_qsched_done decided; the caller persists it. */
typedef struct rr_qsched_result {
  rr_qsched_action_t action;
  int64_t id;
  uint32_t attempts;                 /* RESCHEDULED, DEAD: the new count */
  int64_t not_before_ms;             /* RESCHEDULED: now_ms + delay_ms */
  int64_t delay_ms;                  /* RESCHEDULED: the jittered backoff */
  rr_qsched_dead_reason_t reason;    /* DEAD: why */
  rr_qsched_breaker_state_t breaker; /* the breaker after this outcome */
  int breaker_changed;               /* this outcome opened or closed it */
} rr_qsched_result_t;

typedef enum rr_qsched_state {
  RR_QSCHED_PENDING,
  RR_QSCHED_INFLIGHT,
  RR_QSCHED_DEAD_LETTER
} rr_qsched_state_t;

typedef struct rr_qsched_counts {
  size_t pending;  /* waiting to start, including those waiting for a retry */
  size_t inflight; /* started, no outcome yet */
  size_t dead;
  size_t retrying;            /* pending items that have failed before (attempts > 0) */
  int64_t oldest_enqueued_ms; /* of the pending and in-flight items; 0 if none */
} rr_qsched_counts_t;

typedef struct rr_qsched_stats {
  rr_qsched_counts_t total;
  rr_qsched_counts_t lane[RR_QSCHED_LANES];
} rr_qsched_stats_t;

/* 64 uniformly random bits. ud is the caller's. */
typedef uint64_t (*rr_qsched_rand_fn)(void *ud);

/* rr_qsched_config_default: the defaults documented in rr_qsched_config_t. */
void rr_qsched_config_default(rr_qsched_config_t *c);

/* rr_qsched_new: *out = a new empty scheduler (owned; rr_qsched_free). c is
 * copied; NULL = the defaults. RR_EINVAL for an invalid config, RR_ENOMEM. */
int rr_qsched_new(const rr_qsched_config_t *c, rr_qsched_t **out);

/* rr_qsched_free: frees s and every item it holds. NULL is a no-op. */
void rr_qsched_free(rr_qsched_t *s);

/* rr_qsched_add: loads one item (pending, or dead when it->dead). The item
 * and its key string are copied. The caller adds a key's items in id order:
 * every earlier item of the key that is not finished must already be loaded,
 * dead ones included when dead_blocks_key is set (else, after a restart, the
 * key would move past its dead item). RR_EINVAL: bad lane, duplicate id. RR_ELIMIT: max_items
 * reached, or the key is longer than RR_QSCHED_KEY_MAX. RR_ENOMEM. On error nothing changed. */
int rr_qsched_add(rr_qsched_t *s, const rr_qsched_item_t *it);

/* rr_qsched_loaded: items held (pending + in flight + dead). */
size_t rr_qsched_loaded(const rr_qsched_t *s);

/* rr_qsched_room: how many more items rr_qsched_add accepts (max_items minus
 * loaded). The loop glue loads the next window from the store when it is
 * large enough to be worth a query. */
size_t rr_qsched_room(const rr_qsched_t *s);

/* rr_qsched_next: the item to deliver now. 0 and *id_out: it is in flight
 * until rr_qsched_done or rr_qsched_return. RR_EAGAIN (*id_out untouched):
 * nothing may start at now_ms (nothing eligible, concurrency reached, or the
 * breaker holds); rr_qsched_next_wakeup says when to ask again. */
int rr_qsched_next(rr_qsched_t *s, int64_t now_ms, int64_t *id_out);

/* rr_qsched_done: the outcome of in-flight item id at now_ms. On RETRY the
 * delay is uniform in [0, min(backoff_max_ms, backoff_base_ms *
 * 2^(attempts-1))] drawn with rand (required for RETRY; may be NULL else).
 * It dead-letters the item when attempts reach max_attempts or the item is
 * older than max_age_ms. A PERMANENT outcome dead-letters at once and, like
 * OK, counts as an answer from the destination for the breaker. *out (may be
 * NULL) says what to persist. RR_ENOTFOUND: unknown id. RR_EINVAL: not in
 * flight, bad outcome, RETRY without rand. */
int rr_qsched_done(rr_qsched_t *s, int64_t id, rr_qsched_outcome_t outcome, int64_t now_ms,
                   rr_qsched_rand_fn rand, void *rand_ud, rr_qsched_result_t *out);

/* rr_qsched_return: puts in-flight item id back unchanged (it was neither
 * delivered nor failed, e.g. on shutdown); nothing to persist. A returned
 * breaker probe frees the probe slot. RR_ENOTFOUND, RR_EINVAL (not in
 * flight). */
int rr_qsched_return(rr_qsched_t *s, int64_t id);

/* rr_qsched_retry: operator retry of dead item id: pending again with
 * attempts 0, eligible at once (in its key's id order). The caller persists
 * attempts 0 and not_before 0. RR_ENOTFOUND, RR_EINVAL (not dead). */
int rr_qsched_retry(rr_qsched_t *s, int64_t id);

/* rr_qsched_retry_all_dead: rr_qsched_retry of every dead item; returns how
 * many. */
size_t rr_qsched_retry_all_dead(rr_qsched_t *s);

/* rr_qsched_drop: forgets pending or dead item id (the caller deletes it
 * from the store); its key's next item may go. RR_ENOTFOUND, RR_EINVAL (in
 * flight: wait for its outcome). */
int rr_qsched_drop(rr_qsched_t *s, int64_t id);

/* rr_qsched_lookup: the state of item id, and *it (may be NULL) its fields;
 * it->key is borrowed (valid while the item is loaded), NULL for no key.
 * RR_ENOTFOUND. */
int rr_qsched_lookup(const rr_qsched_t *s, int64_t id, rr_qsched_state_t *state,
                     rr_qsched_item_t *it);

/* rr_qsched_next_wakeup: when rr_qsched_next could next succeed without
 * anything else happening: now_ms if something may start now, a later time
 * (a retry's not_before, the breaker's probe time), or RR_QSCHED_NEVER when
 * only an outcome, an add or an operator action can change that. The loop
 * glue arms one timer for it. */
int64_t rr_qsched_next_wakeup(const rr_qsched_t *s, int64_t now_ms);

/* rr_qsched_stats: counts for metrics, in total and per lane. O(lanes). */
void rr_qsched_stats(const rr_qsched_t *s, rr_qsched_stats_t *out);

/* rr_qsched_breaker: the breaker as seen at now_ms (an OPEN breaker whose
 * time is up reads HALF_OPEN). */
void rr_qsched_breaker(const rr_qsched_t *s, int64_t now_ms, rr_qsched_breaker_t *out);

#endif

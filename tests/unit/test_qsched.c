/* Unit tests of the destination queue's delivery scheduler
 * (engine/queue/sched.c). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "core/error.h"
#include "queue/sched.h"
#include "rr_test.h"

/* ---- allocation failure injection (linked with --wrap) ----------------- */
void *__real_malloc(size_t n);
void *__real_realloc(void *p, size_t n);
void *__real_calloc(size_t a, size_t b);
void *__wrap_malloc(size_t n);
void *__wrap_realloc(void *p, size_t n);
void *__wrap_calloc(size_t a, size_t b);
static long g_fail_at = -1; /* fail the Nth allocation from now; -1 = never */
static long g_allocs;
static int should_fail(void) {
  return g_fail_at >= 0 && g_allocs++ == g_fail_at;
}
void *__wrap_malloc(size_t n) {
  return should_fail() ? NULL : __real_malloc(n);
}
void *__wrap_realloc(void *p, size_t n) {
  return should_fail() ? NULL : __real_realloc(p, n);
}
void *__wrap_calloc(size_t a, size_t b) {
  return should_fail() ? NULL : __real_calloc(a, b);
}

/* ---- helpers ------------------------------------------------------------ */

static uint64_t splitmix(void *ud) {
  uint64_t *x = ud;
  uint64_t z = (*x += 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

/* Returns *ud: the test picks the "random" value. */
static uint64_t fixed(void *ud) {
  return *(uint64_t *)ud;
}

static uint32_t rnd(uint64_t *st, uint32_t n) {
  return (uint32_t)(splitmix(st) % n);
}

static void config(rr_qsched_config_t *c, uint32_t concurrency) {
  rr_qsched_config_default(c);
  c->concurrency = concurrency;
  c->breaker_failures = 0;
}

static rr_qsched_t *make(const rr_qsched_config_t *c) {
  rr_qsched_t *s = NULL;
  CHECK_EQ_INT(rr_qsched_new(c, &s), 0);
  return s;
}

static int add(rr_qsched_t *s, int64_t id, const char *key, uint32_t lane) {
  rr_qsched_item_t it = {id, key, lane, 0, 0, 0, 0};
  return rr_qsched_add(s, &it);
}

/* The next startable id at now, or 0. */
static int64_t next(rr_qsched_t *s, int64_t now) {
  int64_t id = -1;
  int rc = rr_qsched_next(s, now, &id);
  if (rc == RR_EAGAIN)
    return 0;
  CHECK_EQ_INT(rc, 0);
  return id;
}

static int done(rr_qsched_t *s, int64_t id, rr_qsched_outcome_t o, int64_t now,
                rr_qsched_result_t *r) {
  static uint64_t seed = 42;
  return rr_qsched_done(s, id, o, now, splitmix, &seed, r);
}

/* ---- per-key FIFO ------------------------------------------------------- */

static void test_key_fifo(void) {
  rr_qsched_config_t c;
  config(&c, 10);
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(add(s, 1, "A", 0), 0);
  CHECK_EQ_INT(add(s, 2, "A", 0), 0);
  CHECK_EQ_INT(add(s, 3, "A", 0), 0);
  CHECK_EQ_INT(add(s, 4, "B", 0), 0);
  CHECK_EQ_INT(next(s, 0), 1);
  CHECK_EQ_INT(next(s, 0), 4);
  CHECK_EQ_INT(next(s, 0), 0); /* 2 waits behind 1 */
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_OK, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 2);
  rr_qsched_result_t r;
  CHECK_EQ_INT(done(s, 2, RR_QSCHED_RETRY, 10, &r), 0);
  CHECK_EQ_INT(r.action, RR_QSCHED_RESCHEDULED);
  CHECK_EQ_INT(r.attempts, 1);
  CHECK(r.delay_ms >= 0 && r.delay_ms <= c.backoff_base_ms);
  CHECK_EQ_INT(r.not_before_ms, 10 + r.delay_ms);
  if (r.delay_ms > 0) {
    CHECK_EQ_INT(next(s, 10 + r.delay_ms - 1), 0); /* 3 waits with its head */
    CHECK_EQ_INT(rr_qsched_next_wakeup(s, 10), 10 + r.delay_ms);
  }
  CHECK_EQ_INT(next(s, r.not_before_ms), 2);
  CHECK_EQ_INT(done(s, 2, RR_QSCHED_OK, r.not_before_ms, NULL), 0);
  CHECK_EQ_INT(next(s, r.not_before_ms), 3);
  CHECK_EQ_INT(done(s, 3, RR_QSCHED_OK, r.not_before_ms, NULL), 0);
  CHECK_EQ_INT(done(s, 4, RR_QSCHED_OK, r.not_before_ms, NULL), 0);
  CHECK_EQ_INT(rr_qsched_loaded(s), 0);
  CHECK_EQ_INT(next(s, r.not_before_ms), 0);
  /* A key freed with its last item can come back. */
  CHECK_EQ_INT(add(s, 9, "A", 0), 0);
  CHECK_EQ_INT(next(s, 100000), 9);
  rr_qsched_free(s);
}

/* ---- concurrency -------------------------------------------------------- */

static void test_concurrency(void) {
  rr_qsched_config_t c;
  config(&c, 3);
  rr_qsched_t *s = make(&c);
  char k[8];
  for (int i = 1; i <= 10; i++) {
    snprintf(k, sizeof k, "K%d", i);
    CHECK_EQ_INT(add(s, i, i <= 5 ? k : NULL, 0), 0); /* 6..10 have no key */
  }
  CHECK_EQ_INT(next(s, 0), 1);
  CHECK_EQ_INT(next(s, 0), 2);
  CHECK_EQ_INT(next(s, 0), 3);
  CHECK_EQ_INT(next(s, 0), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 0), RR_QSCHED_NEVER);
  rr_qsched_stats_t st;
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.total.inflight, 3);
  CHECK_EQ_INT(st.total.pending, 7);
  CHECK_EQ_INT(done(s, 2, RR_QSCHED_OK, 0, NULL), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 0), 0);
  CHECK_EQ_INT(next(s, 0), 4);
  CHECK_EQ_INT(next(s, 0), 0);
  int64_t started = 4;
  for (int64_t t = 1; t < 100 && started < 10; t++) {
    int64_t a = next(s, t);
    CHECK_EQ_INT(a, 0); /* full */
    rr_qsched_stats(s, &st);
    CHECK(st.total.inflight <= 3);
    /* finish the lowest in-flight id */
    for (int64_t id = 1; id <= 10; id++) {
      rr_qsched_state_t state;
      if (rr_qsched_lookup(s, id, &state, NULL) == 0 && state == RR_QSCHED_INFLIGHT) {
        CHECK_EQ_INT(done(s, id, RR_QSCHED_OK, t, NULL), 0);
        break;
      }
    }
    CHECK_EQ_INT(next(s, t), ++started);
  }
  CHECK_EQ_INT(started, 10);
  /* Unkeyed items run side by side. */
  rr_qsched_free(s);
  config(&c, 4);
  s = make(&c);
  for (int i = 1; i <= 6; i++)
    CHECK_EQ_INT(add(s, i, "", 0), 0);
  for (int i = 1; i <= 4; i++)
    CHECK_EQ_INT(next(s, 0), i);
  CHECK_EQ_INT(next(s, 0), 0);
  rr_qsched_free(s);
}

/* ---- lanes -------------------------------------------------------------- */

static void test_lanes(void) {
  rr_qsched_config_t c;
  config(&c, 1);
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(add(s, 1, "A", 0), 0);
  CHECK_EQ_INT(add(s, 2, "B", 0), 0);
  CHECK_EQ_INT(add(s, 3, "C", 2), 0);
  CHECK_EQ_INT(add(s, 4, "A", 1), 0); /* STAT, behind A's routine 1 */
  CHECK_EQ_INT(add(s, 5, NULL, 1), 0);
  CHECK_EQ_INT(add(s, 6, "D", 3), 0);
  static const int64_t order[] = {6, 3, 5, 1, 4, 2};
  for (size_t i = 0; i < 6; i++) {
    int64_t id = next(s, 0);
    CHECK_EQ_INT(id, order[i]);
    CHECK_EQ_INT(done(s, id, RR_QSCHED_OK, 0, NULL), 0);
  }
  rr_qsched_stats_t st;
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.total.pending + st.total.inflight + st.total.dead, 0);
  rr_qsched_free(s);
}

/* ---- backoff ------------------------------------------------------------ */

static void test_backoff(void) {
  rr_qsched_config_t c;
  config(&c, 1);
  c.max_attempts = 0;
  c.backoff_base_ms = 100;
  c.backoff_max_ms = 1000;
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(add(s, 1, "A", 0), 0);
  static const int64_t caps[] = {100, 200, 400, 800, 1000, 1000, 1000};
  int64_t now = 0;
  /* The value of the random source picks the delay: cap gives the cap,
   * cap + 1 wraps to 0, so the cap is exactly what the table says. */
  for (int a = 0; a < 7; a++) {
    rr_qsched_result_t r;
    uint64_t v = (uint64_t)caps[a] + (uint64_t)(a % 2);
    CHECK_EQ_INT(next(s, now), 1);
    CHECK_EQ_INT(rr_qsched_done(s, 1, RR_QSCHED_RETRY, now, fixed, &v, &r), 0);
    CHECK_EQ_INT(r.attempts, a + 1);
    CHECK_EQ_INT(r.delay_ms, a % 2 ? 0 : caps[a]);
    now = r.not_before_ms;
  }
  CHECK_EQ_INT(next(s, now), 1);
  /* RETRY needs a random source. */
  CHECK_EQ_INT(rr_qsched_done(s, 1, RR_QSCHED_RETRY, now, NULL, NULL, NULL), RR_EINVAL);
  CHECK_EQ_INT(rr_qsched_done(s, 1, (rr_qsched_outcome_t)7, now, NULL, NULL, NULL), RR_EINVAL);
  CHECK_EQ_INT(rr_qsched_done(s, 1, RR_QSCHED_OK, now, NULL, NULL, NULL), 0);
  rr_qsched_free(s);

  /* Seeded: within [0, cap], spread over the range, reproducible. */
  int64_t delays[2][8][200];
  for (int run = 0; run < 2; run++) {
    uint64_t seed = 7;
    s = make(&c);
    now = 0;
    for (int a = 0; a < 8; a++) {
      int64_t lo = INT64_MAX, hi = -1;
      for (int k = 0; k < 200; k++) {
        int64_t id = 1000 * a + k + 1;
        rr_qsched_item_t it = {id, NULL, 0, 0, (uint32_t)a, 0, 0};
        CHECK_EQ_INT(rr_qsched_add(s, &it), 0);
        CHECK_EQ_INT(next(s, now), id);
        rr_qsched_result_t r;
        CHECK_EQ_INT(rr_qsched_done(s, id, RR_QSCHED_RETRY, now, splitmix, &seed, &r), 0);
        int64_t cap = a < 4 ? 100 << a : 1000;
        CHECK(r.delay_ms >= 0 && r.delay_ms <= cap);
        delays[run][a][k] = r.delay_ms;
        lo = r.delay_ms < lo ? r.delay_ms : lo;
        hi = r.delay_ms > hi ? r.delay_ms : hi;
        CHECK_EQ_INT(rr_qsched_drop(s, id), 0);
      }
      int64_t cap = a < 4 ? 100 << a : 1000;
      CHECK(lo < cap / 10 && hi > cap - cap / 10); /* full jitter */
    }
    rr_qsched_free(s);
  }
  CHECK(memcmp(delays[0], delays[1], sizeof delays[0]) == 0);

  /* A huge attempt count saturates at the maximum instead of overflowing. */
  c.backoff_base_ms = 1;
  c.backoff_max_ms = INT64_MAX / 2;
  s = make(&c);
  rr_qsched_item_t it = {1, NULL, 0, 0, 4000000000u, 0, 0};
  CHECK_EQ_INT(rr_qsched_add(s, &it), 0);
  CHECK_EQ_INT(next(s, 0), 1);
  uint64_t v = (uint64_t)INT64_MAX / 2;
  rr_qsched_result_t r;
  CHECK_EQ_INT(rr_qsched_done(s, 1, RR_QSCHED_RETRY, 5, fixed, &v, &r), 0);
  CHECK_EQ_INT(r.delay_ms, INT64_MAX / 2);
  CHECK_EQ_INT(r.not_before_ms, 5 + INT64_MAX / 2);
  rr_qsched_free(s);
}

/* ---- dead letters ------------------------------------------------------- */

static void test_dead_max_attempts_and_age(void) {
  rr_qsched_config_t c;
  config(&c, 4);
  c.max_attempts = 3;
  c.backoff_base_ms = 10;
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(add(s, 1, "A", 0), 0);
  CHECK_EQ_INT(add(s, 2, "A", 0), 0);
  int64_t now = 0;
  rr_qsched_result_t r;
  for (int a = 1; a <= 3; a++) {
    CHECK_EQ_INT(next(s, now), 1);
    CHECK_EQ_INT(done(s, 1, RR_QSCHED_RETRY, now, &r), 0);
    CHECK_EQ_INT(r.attempts, a);
    CHECK_EQ_INT(r.action, a < 3 ? RR_QSCHED_RESCHEDULED : RR_QSCHED_DEAD);
    now += 1000;
  }
  CHECK_EQ_INT(r.reason, RR_QSCHED_MAX_ATTEMPTS);
  rr_qsched_state_t state;
  CHECK_EQ_INT(rr_qsched_lookup(s, 1, &state, NULL), 0);
  CHECK_EQ_INT(state, RR_QSCHED_DEAD_LETTER);
  CHECK_EQ_INT(next(s, now), 0); /* 2 is held by the dead 1 */
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, now), RR_QSCHED_NEVER);
  rr_qsched_stats_t st;
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.total.dead, 1);
  CHECK_EQ_INT(st.total.pending, 1);
  rr_qsched_free(s);

  /* max_age_ms: judged at a failure, against enqueued_ms. */
  c.max_attempts = 0;
  c.max_age_ms = 5000;
  s = make(&c);
  rr_qsched_item_t it = {1, "A", 0, 1000, 0, 0, 0};
  CHECK_EQ_INT(rr_qsched_add(s, &it), 0);
  CHECK_EQ_INT(next(s, 6000), 1);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_RETRY, 6000, &r), 0); /* exactly 5000 old */
  CHECK_EQ_INT(r.action, RR_QSCHED_RESCHEDULED);
  CHECK_EQ_INT(next(s, r.not_before_ms), 1);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_RETRY, 6001, &r), 0);
  CHECK_EQ_INT(r.action, RR_QSCHED_DEAD);
  CHECK_EQ_INT(r.reason, RR_QSCHED_MAX_AGE);
  CHECK_EQ_INT(r.attempts, 2);
  rr_qsched_free(s);
}

static void test_permanent(void) {
  rr_qsched_config_t c;
  config(&c, 4);
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(add(s, 1, "A", 1), 0);
  CHECK_EQ_INT(add(s, 2, "A", 0), 0);
  CHECK_EQ_INT(next(s, 0), 1);
  rr_qsched_result_t r;
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_PERMANENT, 0, &r), 0);
  CHECK_EQ_INT(r.action, RR_QSCHED_DEAD);
  CHECK_EQ_INT(r.reason, RR_QSCHED_REJECTED);
  CHECK_EQ_INT(r.attempts, 1);
  CHECK_EQ_INT(next(s, 0), 0);
  rr_qsched_stats_t st;
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.lane[1].dead, 1);
  CHECK_EQ_INT(st.lane[0].pending, 1);
  rr_qsched_free(s);
}

static void test_dead_blocks_key(void) {
  rr_qsched_config_t c;
  config(&c, 4);
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(add(s, 1, "A", 0), 0);
  CHECK_EQ_INT(add(s, 2, "A", 0), 0);
  CHECK_EQ_INT(add(s, 3, "B", 0), 0);
  CHECK_EQ_INT(next(s, 0), 1);
  CHECK_EQ_INT(next(s, 0), 3);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_PERMANENT, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 0); /* 2 waits for the operator */
  /* Operator retry: 1 goes first again, then 2. */
  CHECK_EQ_INT(rr_qsched_retry(s, 1), 0);
  rr_qsched_item_t it;
  rr_qsched_state_t state;
  CHECK_EQ_INT(rr_qsched_lookup(s, 1, &state, &it), 0);
  CHECK_EQ_INT(state, RR_QSCHED_PENDING);
  CHECK_EQ_INT(it.attempts, 0);
  CHECK(it.key && strcmp(it.key, "A") == 0);
  CHECK_EQ_INT(next(s, 0), 1);
  CHECK_EQ_INT(next(s, 0), 0);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_PERMANENT, 0, NULL), 0);
  /* Operator drop: the key moves on. */
  CHECK_EQ_INT(rr_qsched_drop(s, 1), 0);
  CHECK_EQ_INT(rr_qsched_lookup(s, 1, NULL, NULL), RR_ENOTFOUND);
  CHECK_EQ_INT(next(s, 0), 2);
  rr_qsched_free(s);

  /* Loaded from the store as dead: it still holds its key. */
  s = make(&c);
  rr_qsched_item_t d = {1, "A", 0, 0, 3, 0, 1};
  CHECK_EQ_INT(rr_qsched_add(s, &d), 0);
  CHECK_EQ_INT(add(s, 2, "A", 0), 0);
  CHECK_EQ_INT(next(s, 0), 0);
  CHECK_EQ_INT(rr_qsched_retry_all_dead(s), 1);
  CHECK_EQ_INT(next(s, 0), 1);
  rr_qsched_free(s);

  /* dead_blocks_key false: the key moves on; a retried item keeps its place
   * in id order but waits for the key's item in flight. */
  c.dead_blocks_key = 0;
  s = make(&c);
  for (int64_t id = 1; id <= 4; id++)
    CHECK_EQ_INT(add(s, id, "A", 0), 0);
  CHECK_EQ_INT(next(s, 0), 1);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_PERMANENT, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 2);
  CHECK_EQ_INT(rr_qsched_retry(s, 1), 0);
  CHECK_EQ_INT(next(s, 0), 0); /* 2 is in flight */
  CHECK_EQ_INT(done(s, 2, RR_QSCHED_PERMANENT, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 1);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_OK, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 3);
  CHECK_EQ_INT(rr_qsched_retry(s, 2), 0); /* before 4, after 3 (in flight) */
  CHECK_EQ_INT(done(s, 3, RR_QSCHED_OK, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 2);
  CHECK_EQ_INT(done(s, 2, RR_QSCHED_OK, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 4);
  CHECK_EQ_INT(done(s, 4, RR_QSCHED_OK, 0, NULL), 0);
  CHECK_EQ_INT(rr_qsched_loaded(s), 0);
  /* A dead item loaded from the store does not hold its key either. */
  rr_qsched_item_t d2 = {10, "A", 0, 0, 3, 0, 1};
  CHECK_EQ_INT(rr_qsched_add(s, &d2), 0);
  CHECK_EQ_INT(add(s, 11, "A", 0), 0);
  CHECK_EQ_INT(next(s, 0), 11);
  CHECK_EQ_INT(rr_qsched_retry(s, 10), 0);
  CHECK_EQ_INT(next(s, 0), 0);
  CHECK_EQ_INT(done(s, 11, RR_QSCHED_OK, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 10);
  rr_qsched_free(s);
}

static void test_operator_errors(void) {
  rr_qsched_config_t c;
  config(&c, 4);
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(add(s, 1, "A", 0), 0);
  CHECK_EQ_INT(add(s, 2, "A", 0), 0);
  CHECK_EQ_INT(add(s, 3, "B", 0), 0);
  CHECK_EQ_INT(rr_qsched_retry(s, 1), RR_EINVAL); /* pending, not dead */
  CHECK_EQ_INT(rr_qsched_retry(s, 99), RR_ENOTFOUND);
  CHECK_EQ_INT(rr_qsched_drop(s, 99), RR_ENOTFOUND);
  CHECK_EQ_INT(done(s, 99, RR_QSCHED_OK, 0, NULL), RR_ENOTFOUND);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_OK, 0, NULL), RR_EINVAL); /* not in flight */
  CHECK_EQ_INT(rr_qsched_return(s, 1), RR_EINVAL);
  CHECK_EQ_INT(rr_qsched_return(s, 99), RR_ENOTFOUND);
  CHECK_EQ_INT(next(s, 0), 1);
  CHECK_EQ_INT(rr_qsched_drop(s, 1), RR_EINVAL); /* in flight */
  /* Dropping a pending item that is not its key's head. */
  CHECK_EQ_INT(add(s, 4, "A", 0), 0);
  CHECK_EQ_INT(rr_qsched_drop(s, 2), 0);
  /* Dropping a queued head. */
  CHECK_EQ_INT(rr_qsched_drop(s, 3), 0);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_OK, 0, NULL), 0);
  CHECK_EQ_INT(next(s, 0), 4);
  CHECK_EQ_INT(next(s, 0), 0);
  CHECK_EQ_INT(rr_qsched_retry_all_dead(s), 0);
  rr_qsched_free(s);
}

/* ---- breaker ------------------------------------------------------------ */

static void test_breaker(void) {
  rr_qsched_config_t c;
  config(&c, 5);
  c.breaker_failures = 3;
  c.breaker_open_ms = 1000;
  c.max_attempts = 0;
  c.backoff_base_ms = 0; /* retries are due at once: only the breaker holds */
  rr_qsched_t *s = make(&c);
  for (int64_t id = 1; id <= 10; id++)
    CHECK_EQ_INT(add(s, id, NULL, 0), 0);
  rr_qsched_result_t r;
  rr_qsched_breaker_t b;
  for (int64_t id = 1; id <= 5; id++)
    CHECK_EQ_INT(next(s, 0), id);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_RETRY, 10, &r), 0);
  CHECK_EQ_INT(done(s, 2, RR_QSCHED_OK, 10, &r), 0); /* a success resets the count */
  CHECK_EQ_INT(done(s, 3, RR_QSCHED_RETRY, 10, &r), 0);
  CHECK_EQ_INT(done(s, 4, RR_QSCHED_PERMANENT, 10, &r), 0); /* an answer: resets too */
  CHECK_EQ_INT(r.breaker, RR_QSCHED_CLOSED);
  rr_qsched_breaker(s, 10, &b);
  CHECK_EQ_INT(b.failures, 0);
  CHECK_EQ_INT(done(s, 5, RR_QSCHED_RETRY, 10, &r), 0);
  CHECK_EQ_INT(next(s, 10), 1);
  CHECK_EQ_INT(next(s, 10), 3);
  CHECK_EQ_INT(next(s, 10), 5);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_RETRY, 20, &r), 0);
  CHECK_EQ_INT(r.breaker_changed, 0);
  CHECK_EQ_INT(done(s, 3, RR_QSCHED_RETRY, 20, &r), 0);
  CHECK_EQ_INT(r.breaker, RR_QSCHED_OPEN);
  CHECK_EQ_INT(r.breaker_changed, 1);
  rr_qsched_breaker(s, 20, &b);
  CHECK_EQ_INT(b.state, RR_QSCHED_OPEN);
  CHECK_EQ_INT(b.open_until_ms, 1020);
  /* Open: nothing starts; an outcome of an item started before changes
   * nothing. */
  CHECK_EQ_INT(next(s, 500), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 500), 1020);
  CHECK_EQ_INT(done(s, 5, RR_QSCHED_OK, 600, &r), 0);
  CHECK_EQ_INT(r.breaker, RR_QSCHED_OPEN);
  CHECK_EQ_INT(next(s, 1019), 0);
  /* Half-open: exactly one probe. */
  rr_qsched_breaker(s, 1020, &b);
  CHECK_EQ_INT(b.state, RR_QSCHED_HALF_OPEN);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 1020), 1020);
  CHECK_EQ_INT(next(s, 1020), 1);
  CHECK_EQ_INT(next(s, 1020), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 1020), RR_QSCHED_NEVER);
  rr_qsched_breaker(s, 1020, &b);
  CHECK_EQ_INT(b.probe_id, 1);
  /* A returned probe frees the slot. */
  CHECK_EQ_INT(rr_qsched_return(s, 1), 0);
  CHECK_EQ_INT(next(s, 1021), 1);
  /* The probe fails: open again for the same period. */
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_RETRY, 1100, &r), 0);
  CHECK_EQ_INT(r.breaker, RR_QSCHED_OPEN);
  CHECK_EQ_INT(r.breaker_changed, 1);
  CHECK_EQ_INT(next(s, 1100), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 1100), 2100);
  /* The probe succeeds: closed, everything flows. */
  CHECK_EQ_INT(next(s, 2100), 1);
  CHECK_EQ_INT(next(s, 2100), 0);
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_OK, 2100, &r), 0);
  CHECK_EQ_INT(r.breaker, RR_QSCHED_CLOSED);
  CHECK_EQ_INT(r.breaker_changed, 1);
  CHECK_EQ_INT(next(s, 2100), 3);
  CHECK_EQ_INT(next(s, 2100), 6);
  CHECK_EQ_INT(next(s, 2100), 7);
  rr_qsched_free(s);
}

/* ---- return, next_wakeup, stats, add ------------------------------------ */

static void test_return(void) {
  rr_qsched_config_t c;
  config(&c, 2);
  rr_qsched_t *s = make(&c);
  rr_qsched_item_t it = {1, "A", 1, 5, 2, 0, 0};
  CHECK_EQ_INT(rr_qsched_add(s, &it), 0);
  CHECK_EQ_INT(add(s, 2, "A", 0), 0);
  CHECK_EQ_INT(next(s, 0), 1);
  CHECK_EQ_INT(rr_qsched_return(s, 1), 0);
  rr_qsched_item_t got;
  rr_qsched_state_t state;
  CHECK_EQ_INT(rr_qsched_lookup(s, 1, &state, &got), 0);
  CHECK_EQ_INT(state, RR_QSCHED_PENDING);
  CHECK_EQ_INT(got.attempts, 2);
  CHECK_EQ_INT(got.lane, 1);
  CHECK_EQ_INT(got.enqueued_ms, 5);
  CHECK_EQ_INT(next(s, 0), 1); /* still first for its key */
  CHECK_EQ_INT(next(s, 0), 0);
  rr_qsched_stats_t st;
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.total.inflight, 1);
  CHECK_EQ_INT(st.total.retrying, 0);
  CHECK_EQ_INT(rr_qsched_return(s, 1), 0);
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.total.inflight, 0);
  CHECK_EQ_INT(st.total.retrying, 1);
  CHECK_EQ_INT(st.lane[1].retrying, 1);
  rr_qsched_free(s);
}

static void test_next_wakeup(void) {
  rr_qsched_config_t c;
  config(&c, 2);
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 0), RR_QSCHED_NEVER);
  rr_qsched_item_t a = {1, "A", 0, 0, 1, 500, 0};
  rr_qsched_item_t b = {2, "B", 0, 0, 1, 300, 0};
  rr_qsched_item_t d = {3, "A", 0, 0, 0, 0, 0}; /* due, but behind 1 */
  CHECK_EQ_INT(rr_qsched_add(s, &a), 0);
  CHECK_EQ_INT(rr_qsched_add(s, &b), 0);
  CHECK_EQ_INT(rr_qsched_add(s, &d), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 0), 300);
  CHECK_EQ_INT(next(s, 299), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 299), 300);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 400), 400);
  CHECK_EQ_INT(next(s, 400), 2);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 400), 500);
  CHECK_EQ_INT(next(s, 500), 1);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 500), RR_QSCHED_NEVER); /* full */
  CHECK_EQ_INT(done(s, 2, RR_QSCHED_OK, 500, NULL), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 500), RR_QSCHED_NEVER); /* 3 behind 1 */
  CHECK_EQ_INT(done(s, 1, RR_QSCHED_OK, 500, NULL), 0);
  CHECK_EQ_INT(rr_qsched_next_wakeup(s, 600), 600);
  rr_qsched_free(s);
}

static void test_stats_and_add(void) {
  rr_qsched_config_t c;
  config(&c, 8);
  c.max_items = 5;
  rr_qsched_t *s = make(&c);
  CHECK_EQ_INT(rr_qsched_room(s), 5);
  rr_qsched_item_t items[] = {
      {10, "A", 0, 300, 0, 0, 0}, {11, "B", 2, 100, 1, 0, 0},  {12, "C", 2, 200, 0, 0, 0},
      {13, "D", 1, 400, 0, 0, 1}, {14, NULL, 0, 250, 0, 0, 0},
  };
  for (size_t i = 0; i < 5; i++)
    CHECK_EQ_INT(rr_qsched_add(s, &items[i]), 0);
  CHECK_EQ_INT(rr_qsched_loaded(s), 5);
  CHECK_EQ_INT(rr_qsched_room(s), 0);
  CHECK_EQ_INT(add(s, 15, "E", 0), RR_ELIMIT);
  rr_qsched_stats_t st;
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.total.pending, 4);
  CHECK_EQ_INT(st.total.dead, 1);
  CHECK_EQ_INT(st.total.retrying, 1);
  CHECK_EQ_INT(st.total.oldest_enqueued_ms, 100);
  CHECK_EQ_INT(st.lane[0].oldest_enqueued_ms, 250);
  CHECK_EQ_INT(st.lane[2].oldest_enqueued_ms, 100);
  CHECK_EQ_INT(st.lane[1].oldest_enqueued_ms, 0); /* only a dead item */
  CHECK_EQ_INT(st.lane[2].pending, 2);
  CHECK_EQ_INT(next(s, 0), 11);
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.lane[2].oldest_enqueued_ms, 100); /* in flight still counts */
  CHECK_EQ_INT(st.lane[2].inflight, 1);
  CHECK_EQ_INT(st.total.retrying, 0);
  CHECK_EQ_INT(done(s, 11, RR_QSCHED_OK, 0, NULL), 0);
  rr_qsched_stats(s, &st);
  CHECK_EQ_INT(st.total.oldest_enqueued_ms, 200);
  CHECK_EQ_INT(rr_qsched_room(s), 1);
  rr_qsched_free(s);

  /* Invalid input changes nothing. */
  config(&c, 1);
  s = make(&c);
  CHECK_EQ_INT(add(s, 1, "A", RR_QSCHED_LANES), RR_EINVAL);
  CHECK_EQ_INT(add(s, 1, "A", 0), 0);
  CHECK_EQ_INT(add(s, 1, "B", 0), RR_EINVAL); /* duplicate id */
  char big[RR_QSCHED_KEY_MAX + 2];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  CHECK_EQ_INT(add(s, 2, big, 0), RR_ELIMIT);
  big[RR_QSCHED_KEY_MAX] = '\0';
  CHECK_EQ_INT(add(s, 2, big, 0), 0);
  CHECK_EQ_INT(rr_qsched_loaded(s), 2);
  rr_qsched_free(s);
  rr_qsched_free(NULL);

  rr_qsched_t *bad = NULL;
  config(&c, 0);
  CHECK_EQ_INT(rr_qsched_new(&c, &bad), RR_EINVAL);
  config(&c, 1);
  c.max_items = 0;
  CHECK_EQ_INT(rr_qsched_new(&c, &bad), RR_EINVAL);
  config(&c, 1);
  c.backoff_base_ms = -1;
  CHECK_EQ_INT(rr_qsched_new(&c, &bad), RR_EINVAL);
  CHECK(bad == NULL);
  CHECK_EQ_INT(rr_qsched_new(NULL, &bad), 0);
  rr_qsched_free(bad);
}

/* ---- randomized: a model of the rules against the scheduler ------------- */

enum { M_UNLOADED, M_PENDING, M_INFLIGHT, M_DEAD, M_DELIVERED };

#define P_KEYS 100
#define P_PER_KEY 100
#define P_ITEMS (P_KEYS * P_PER_KEY)

typedef struct model {
  uint8_t state[P_ITEMS + 1];
  int key[P_ITEMS + 1];
  int64_t key_items[P_KEYS][P_PER_KEY]; /* each key's ids, ascending */
  int deliveries[P_ITEMS + 1];
  int64_t last_delivered[P_KEYS]; /* per key */
  int64_t inflight[P_ITEMS];
  size_t ninflight;
  int order_violations;
} model_t;

static void property_run(uint64_t seed) {
  uint64_t st = seed;
  rr_qsched_config_t c;
  rr_qsched_config_default(&c);
  c.concurrency = 1 + rnd(&st, 16);
  c.max_attempts = 2 + rnd(&st, 4);
  c.backoff_base_ms = 5;
  c.backoff_max_ms = 100;
  c.dead_blocks_key = (int)(seed % 2);
  c.breaker_failures = rnd(&st, 2) ? 0 : 4 + rnd(&st, 4);
  c.breaker_open_ms = 50;
  c.max_items = 200 + rnd(&st, 3000);
  rr_qsched_t *s = make(&c);
  static model_t m;
  memset(&m, 0, sizeof m);
  /* Each key gets 100 items; ids interleave keys at random. */
  int left[P_KEYS];
  for (int k = 0; k < P_KEYS; k++)
    left[k] = P_PER_KEY;
  for (int id = 1; id <= P_ITEMS; id++) {
    int k = (int)rnd(&st, P_KEYS);
    while (!left[k])
      k = (k + 1) % P_KEYS;
    m.key_items[k][P_PER_KEY - left[k]] = id;
    left[k]--;
    m.key[id] = k;
  }
  int64_t now = 1000, loaded_upto = 0, delivered = 0;
  uint64_t rs = seed * 31 + 7;
  int rounds = 0, stuck = 0;
  while (delivered < P_ITEMS && rounds++ < 2000000 && !stuck) {
    uint32_t act = rnd(&st, 100);
    if (act < 25 || loaded_upto == 0) { /* load the next part of the window */
      uint32_t want = 1 + rnd(&st, 500);
      for (uint32_t n = 0; n < want && loaded_upto < P_ITEMS && rr_qsched_room(s); n++) {
        int64_t id = ++loaded_upto;
        char key[16];
        snprintf(key, sizeof key, "MRN%03d", m.key[id]);
        rr_qsched_item_t it = {id, key, rnd(&st, RR_QSCHED_LANES), now, 0, 0, 0};
        CHECK_EQ_INT(rr_qsched_add(s, &it), 0);
        m.state[id] = M_PENDING;
      }
    } else if (act < 60) { /* start what may start */
      int64_t wake = rr_qsched_next_wakeup(s, now);
      int64_t id;
      int rc = rr_qsched_next(s, now, &id);
      CHECK(rc == 0 || rc == RR_EAGAIN);
      CHECK((rc == 0) == (wake == now));
      for (; rc == 0; rc = rr_qsched_next(s, now, &id)) {
        CHECK(id >= 1 && id <= loaded_upto);
        CHECK_EQ_INT(m.state[id], M_PENDING);
        /* No earlier item of its key may be unfinished (nor dead, when dead
         * items hold their key). */
        const int64_t *ki = m.key_items[m.key[id]];
        for (int j = 0; j < P_PER_KEY && ki[j] < id; j++) {
          int64_t e = ki[j];
          if (m.state[e] == M_PENDING || m.state[e] == M_INFLIGHT ||
              (c.dead_blocks_key && m.state[e] == M_DEAD)) {
            m.order_violations++;
            break;
          }
        }
        m.state[id] = M_INFLIGHT;
        m.inflight[m.ninflight++] = id;
        CHECK(m.ninflight <= c.concurrency);
        if (rnd(&st, 3) == 0)
          break;
      }
    } else if (act < 88 && m.ninflight) { /* an outcome */
      size_t j = rnd(&st, (uint32_t)m.ninflight);
      int64_t id = m.inflight[j];
      m.inflight[j] = m.inflight[--m.ninflight];
      uint32_t o = rnd(&st, 100);
      rr_qsched_outcome_t out = o < 70   ? RR_QSCHED_OK
                                : o < 97 ? RR_QSCHED_RETRY
                                         : RR_QSCHED_PERMANENT;
      rr_qsched_result_t r;
      CHECK_EQ_INT(rr_qsched_done(s, id, out, now, splitmix, &rs, &r), 0);
      CHECK_EQ_INT(r.id, id);
      if (r.action == RR_QSCHED_DELIVERED) {
        m.state[id] = M_DELIVERED;
        m.deliveries[id]++;
        delivered++;
        if (id < m.last_delivered[m.key[id]] && c.dead_blocks_key)
          m.order_violations++;
        m.last_delivered[m.key[id]] = id;
      } else if (r.action == RR_QSCHED_DEAD) {
        m.state[id] = M_DEAD;
        CHECK(out == RR_QSCHED_PERMANENT || r.attempts >= c.max_attempts);
      } else {
        m.state[id] = M_PENDING;
        CHECK(r.delay_ms >= 0 && r.delay_ms <= c.backoff_max_ms);
      }
    } else if (act < 90 && m.ninflight) { /* given back, e.g. shutdown */
      size_t j = rnd(&st, (uint32_t)m.ninflight);
      int64_t id = m.inflight[j];
      m.inflight[j] = m.inflight[--m.ninflight];
      CHECK_EQ_INT(rr_qsched_return(s, id), 0);
      m.state[id] = M_PENDING;
    } else if (act < 93) { /* the operator retries one dead item */
      for (int64_t id = 1 + rnd(&st, (uint32_t)loaded_upto), n = 0; n < 50; n++, id++) {
        if (id > loaded_upto)
          id = 1;
        if (m.state[id] == M_DEAD) {
          CHECK_EQ_INT(rr_qsched_retry(s, id), 0);
          m.state[id] = M_PENDING;
          break;
        }
      }
    } else { /* time passes */
      int64_t wake = rr_qsched_next_wakeup(s, now);
      now += rnd(&st, 20);
      if (wake != RR_QSCHED_NEVER && wake > now && rnd(&st, 2))
        now = wake;
      if (wake == RR_QSCHED_NEVER && !m.ninflight &&
          (loaded_upto == P_ITEMS || !rr_qsched_room(s))) {
        /* Nothing will move by itself: the operator retries the dead. */
        size_t n = rr_qsched_retry_all_dead(s);
        size_t dead = 0;
        for (int id = 1; id <= P_ITEMS; id++)
          if (m.state[id] == M_DEAD) {
            m.state[id] = M_PENDING;
            dead++;
          }
        CHECK_EQ_INT(n, dead);
        if (!n && rr_qsched_next_wakeup(s, now) == RR_QSCHED_NEVER)
          stuck = 1;
      }
    }
    if ((rounds & 1023) == 0) {
      rr_qsched_stats_t sts;
      rr_qsched_stats(s, &sts);
      size_t pending = 0, dead = 0;
      for (int64_t id = 1; id <= loaded_upto; id++) {
        pending += m.state[id] == M_PENDING;
        dead += m.state[id] == M_DEAD;
      }
      CHECK_EQ_INT(sts.total.pending, pending);
      CHECK_EQ_INT(sts.total.dead, dead);
      CHECK_EQ_INT(sts.total.inflight, m.ninflight);
      CHECK_EQ_INT(rr_qsched_loaded(s), pending + dead + m.ninflight);
    }
  }
  CHECK(!stuck);
  CHECK_EQ_INT(delivered, P_ITEMS);
  CHECK_EQ_INT(m.order_violations, 0);
  int once = 1;
  for (int id = 1; id <= P_ITEMS; id++)
    once &= m.deliveries[id] == 1;
  CHECK(once);
  CHECK_EQ_INT(rr_qsched_loaded(s), 0);
  rr_qsched_free(s);
}

static void test_property(void) {
  for (uint64_t seed = 1; seed <= 24; seed++)
    property_run(seed);
}

/* ---- scale: a million items in, a million out ---------------------------- */

static double secs(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void test_scale(void) {
  enum { N = 1000000, KEYS = 200000, CONC = 64 };
  rr_qsched_config_t c;
  config(&c, CONC);
  c.max_items = N;
  rr_qsched_t *s = make(&c);
  static int64_t last[KEYS];
  memset(last, 0, sizeof last);
  uint64_t st = 99;
  double t0 = secs();
  char key[16];
  int ok = 1;
  for (int64_t id = 1; id <= N; id++) {
    snprintf(key, sizeof key, "MRN%07d", (int)(id % KEYS));
    rr_qsched_item_t it = {id, key, rnd(&st, RR_QSCHED_LANES), id, 0, 0, 0};
    ok &= rr_qsched_add(s, &it) == 0;
  }
  CHECK(ok);
  double t1 = secs();
  int64_t inflight[CONC];
  size_t n = 0, delivered = 0, violations = 0;
  while (delivered < N) {
    int64_t id;
    while (rr_qsched_next(s, 0, &id) == 0)
      inflight[n++] = id;
    CHECK(n > 0 && n <= CONC);
    if (n == 0)
      break;
    for (size_t j = 0; j < n; j++) {
      int k = (int)(inflight[j] % KEYS);
      violations += inflight[j] < last[k];
      last[k] = inflight[j];
      ok &= rr_qsched_done(s, inflight[j], RR_QSCHED_OK, 0, NULL, NULL, NULL) == 0;
      delivered++;
    }
    n = 0;
  }
  double t2 = secs();
  CHECK(ok);
  CHECK_EQ_INT(delivered, N);
  CHECK_EQ_INT(violations, 0);
  CHECK_EQ_INT(rr_qsched_loaded(s), 0);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("scale: %d items, %d keys: add %.3f s, drain %.3f s, peak RSS %ld MiB\n", N, KEYS, t1 - t0,
         t2 - t1, ru.ru_maxrss / 1024);
  rr_qsched_free(s);
}

/* ---- out of memory: every allocation failure is reported, never a crash */

static void test_oom(void) {
  int ok_runs = 0;
  for (long k = 0; k < 1000; k++) {
    rr_qsched_t *s = NULL;
    rr_qsched_config_t c;
    config(&c, 8);
    g_allocs = 0;
    g_fail_at = k;
    int rc = rr_qsched_new(&c, &s);
    int64_t added = 0;
    char key[16];
    for (int64_t id = 1; rc == 0 && id <= 5000; id++) {
      snprintf(key, sizeof key, "K%d", (int)(id % 300));
      rc = add(s, id, id % 5 ? key : NULL, (uint32_t)id % RR_QSCHED_LANES);
      added += rc == 0;
    }
    g_fail_at = -1;
    CHECK(rc == 0 || rc == RR_ENOMEM);
    ok_runs += rc == 0;
    if (s) {
      /* What went in comes out, in per-key order; nothing half-added. */
      CHECK_EQ_INT(rr_qsched_loaded(s), added);
      CHECK_EQ_INT(rr_qsched_lookup(s, added + 1, NULL, NULL), RR_ENOTFOUND);
      int64_t id, out = 0;
      while (rr_qsched_next(s, 0, &id) == 0) {
        CHECK_EQ_INT(rr_qsched_done(s, id, RR_QSCHED_OK, 0, NULL, NULL, NULL), 0);
        out++;
      }
      CHECK_EQ_INT(out, added);
      rr_qsched_free(s);
    }
    if (rc == 0 && g_allocs <= k)
      break; /* fewer allocations than k: every point has been tried */
  }
  CHECK(ok_runs == 1);
}

int main(int argc, char **argv) {
  int scale = !(argc > 1 && strcmp(argv[1], "--no-scale") == 0);
  RUN(test_key_fifo);
  RUN(test_concurrency);
  RUN(test_lanes);
  RUN(test_backoff);
  RUN(test_dead_max_attempts_and_age);
  RUN(test_permanent);
  RUN(test_dead_blocks_key);
  RUN(test_operator_errors);
  RUN(test_breaker);
  RUN(test_return);
  RUN(test_next_wakeup);
  RUN(test_stats_and_add);
  RUN(test_property);
  RUN(test_oom);
  if (scale)
    RUN(test_scale);
  return TEST_SUMMARY();
}

/* Delivery scheduler of one destination: pure, see queue/sched.h.
 *
 * Items live in a chunked slab and are named by their slab index. An id
 * table maps ids to indexes; a key table interns keys. Each key keeps its
 * items in a doubly linked FIFO in id order. At most one item per key is a
 * candidate at any time: the key's head, when it is pending and the key has
 * nothing in flight (an item without a key is always its own candidate).
 * Candidates sit in the timer heap (by not_before) until their time comes,
 * then in the ready heap of their lane (by id), so "next" pops a heap instead
 * of scanning. A heap per lane ordered by enqueue time gives the oldest
 * pending item for metrics. Every array an item can move into is reserved
 * when the item is added, so only new and add can fail for memory. */
#include <stdlib.h>
#include <string.h>

#include "core/array.h"
#include "core/error.h"
#include "queue/sched.h"

#define NIL UINT32_MAX
#define CHUNK_BITS 12
#define CHUNK_ITEMS ((uint32_t)1 << CHUNK_BITS)
#define CHUNK_MASK (CHUNK_ITEMS - 1)
#define MAX_ITEMS_LIMIT ((size_t)1 << 31)

enum { ST_FREE, ST_PENDING, ST_INFLIGHT, ST_DEAD }; /* FREE: unused, or between states */
enum { IN_NONE, IN_READY, IN_TIMER, IN_DEAD };
enum { BY_ID, BY_NOT_BEFORE, BY_AGE };

typedef struct qkey {
  uint64_t hash;
  uint32_t head, tail; /* the key's linked items, in id order */
  uint32_t refs;       /* items naming this key, linked or not */
  uint32_t inflight;   /* 0 or 1 */
  size_t len;
  char name[];
} qkey_t;

typedef struct item {
  int64_t id, enqueued_ms, not_before_ms;
  qkey_t *key;         /* NULL: no key */
  uint32_t prev, next; /* key FIFO; next also links the free list */
  uint32_t attempts;
  uint32_t pos;  /* index in the ready, timer or dead array (see where) */
  uint32_t apos; /* index in the age heap of its lane (pending, in flight) */
  uint8_t lane, state, where, linked;
} item_t;

typedef struct heap {
  uint32_t *v;
  size_t n, cap;
} heap_t;

struct rr_qsched {
  rr_qsched_config_t cfg;
  item_t **chunks;
  size_t nchunks, chunks_cap;
  uint32_t free_head;
  size_t loaded;
  size_t lane_items[RR_QSCHED_LANES]; /* loaded items per lane */
  uint32_t *ids;                      /* open addressing, linear probing; NIL = empty */
  size_t ids_cap;
  qkey_t **keys; /* open addressing, linear probing; NULL = empty */
  size_t keys_cap, nkeys;
  heap_t ready[RR_QSCHED_LANES]; /* by id */
  heap_t age[RR_QSCHED_LANES];   /* by enqueued_ms, id */
  heap_t timer;                  /* by not_before_ms, id */
  heap_t dead;                   /* unordered */
  rr_qsched_counts_t counts[RR_QSCHED_LANES];
  size_t inflight;
  int64_t clock; /* the latest now_ms seen */
  rr_qsched_breaker_t br;
};

static inline item_t *IT(const rr_qsched_t *s, uint32_t i) {
  return &s->chunks[i >> CHUNK_BITS][i & CHUNK_MASK];
}

static uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9u;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebu;
  x ^= x >> 31;
  return x;
}

static uint64_t hash_str(const char *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325u;
  for (size_t i = 0; i < n; i++) {
    h ^= (unsigned char)p[i];
    h *= 0x100000001b3u;
  }
  return mix64(h);
}

/* ---- heaps of item indexes ------------------------------------------------ */

static int before(const rr_qsched_t *s, int by, uint32_t a, uint32_t b) {
  const item_t *x = IT(s, a), *y = IT(s, b);
  if (by == BY_NOT_BEFORE && x->not_before_ms != y->not_before_ms)
    return x->not_before_ms < y->not_before_ms;
  if (by == BY_AGE && x->enqueued_ms != y->enqueued_ms)
    return x->enqueued_ms < y->enqueued_ms;
  return x->id < y->id;
}

static void place(rr_qsched_t *s, heap_t *h, int by, size_t i, uint32_t v) {
  h->v[i] = v;
  if (by == BY_AGE)
    IT(s, v)->apos = (uint32_t)i;
  else
    IT(s, v)->pos = (uint32_t)i;
}

static void sift_up(rr_qsched_t *s, heap_t *h, int by, size_t i) {
  uint32_t v = h->v[i];
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!before(s, by, v, h->v[p]))
      break;
    place(s, h, by, i, h->v[p]);
    i = p;
  }
  place(s, h, by, i, v);
}

static void sift_down(rr_qsched_t *s, heap_t *h, int by, size_t i) {
  uint32_t v = h->v[i];
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= h->n)
      break;
    if (c + 1 < h->n && before(s, by, h->v[c + 1], h->v[c]))
      c++;
    if (!before(s, by, h->v[c], v))
      break;
    place(s, h, by, i, h->v[c]);
    i = c;
  }
  place(s, h, by, i, v);
}

/* Capacity was reserved by rr_qsched_add. */
static void heap_push(rr_qsched_t *s, heap_t *h, int by, uint32_t v) {
  h->v[h->n++] = v;
  sift_up(s, h, by, h->n - 1);
}

static void heap_remove(rr_qsched_t *s, heap_t *h, int by, size_t i) {
  uint32_t last = h->v[--h->n];
  if (i == h->n)
    return;
  place(s, h, by, i, last);
  if (i > 0 && before(s, by, last, h->v[(i - 1) / 2]))
    sift_up(s, h, by, i);
  else
    sift_down(s, h, by, i);
}

static int heap_reserve(heap_t *h, size_t need) {
  return rr_array_grow((void **)&h->v, &h->cap, need, sizeof *h->v, 64);
}

/* ---- id table ------------------------------------------------------------- */

static size_t id_slot(const rr_qsched_t *s, int64_t id) {
  size_t mask = s->ids_cap - 1;
  size_t i = (size_t)mix64((uint64_t)id) & mask;
  while (s->ids[i] != NIL && IT(s, s->ids[i])->id != id)
    i = (i + 1) & mask;
  return i;
}

static uint32_t id_find(const rr_qsched_t *s, int64_t id) {
  return s->ids_cap ? s->ids[id_slot(s, id)] : NIL;
}

/* Keeps the load at or below 70%. */
static int ids_reserve(rr_qsched_t *s, size_t need) {
  if (need * 10 <= s->ids_cap * 7)
    return 0;
  size_t cap = s->ids_cap ? s->ids_cap * 2 : 1024;
  while (need * 10 > cap * 7)
    cap *= 2;
  uint32_t *t = malloc(cap * sizeof *t);
  if (!t)
    return RR_ENOMEM;
  memset(t, 0xff, cap * sizeof *t);
  uint32_t *old = s->ids;
  size_t old_cap = s->ids_cap;
  s->ids = t;
  s->ids_cap = cap;
  for (size_t i = 0; i < old_cap; i++)
    if (old[i] != NIL)
      s->ids[id_slot(s, IT(s, old[i])->id)] = old[i];
  free(old);
  return 0;
}

/* Backward-shift deletion: no tombstones, probes stay short. */
static void id_delete(rr_qsched_t *s, int64_t id) {
  size_t mask = s->ids_cap - 1;
  size_t i = id_slot(s, id), j = i;
  s->ids[i] = NIL;
  for (;;) {
    j = (j + 1) & mask;
    if (s->ids[j] == NIL)
      return;
    size_t home = (size_t)mix64((uint64_t)IT(s, s->ids[j])->id) & mask;
    /* The entry at j may fill the hole at i unless its home lies in (i, j]. */
    int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
    if (!stays) {
      s->ids[i] = s->ids[j];
      s->ids[j] = NIL;
      i = j;
    }
  }
}

/* ---- key table ------------------------------------------------------------ */

static size_t key_slot(const rr_qsched_t *s, const char *name, size_t len, uint64_t h) {
  size_t mask = s->keys_cap - 1;
  size_t i = (size_t)h & mask;
  for (; s->keys[i]; i = (i + 1) & mask) {
    const qkey_t *k = s->keys[i];
    if (k->hash == h && k->len == len && memcmp(k->name, name, len) == 0)
      break;
  }
  return i;
}

static int keys_reserve(rr_qsched_t *s, size_t need) {
  if (need * 10 <= s->keys_cap * 7)
    return 0;
  size_t cap = s->keys_cap ? s->keys_cap * 2 : 256;
  while (need * 10 > cap * 7)
    cap *= 2;
  qkey_t **t = calloc(cap, sizeof *t);
  if (!t)
    return RR_ENOMEM;
  qkey_t **old = s->keys;
  size_t old_cap = s->keys_cap;
  s->keys = t;
  s->keys_cap = cap;
  for (size_t i = 0; i < old_cap; i++)
    if (old[i])
      s->keys[key_slot(s, old[i]->name, old[i]->len, old[i]->hash)] = old[i];
  free(old);
  return 0;
}

static void key_delete(rr_qsched_t *s, qkey_t *k) {
  size_t mask = s->keys_cap - 1;
  size_t i = key_slot(s, k->name, k->len, k->hash), j = i;
  s->keys[i] = NULL;
  s->nkeys--;
  for (;;) {
    j = (j + 1) & mask;
    if (!s->keys[j])
      return;
    size_t home = (size_t)s->keys[j]->hash & mask;
    int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
    if (!stays) {
      s->keys[i] = s->keys[j];
      s->keys[j] = NULL;
      i = j;
    }
  }
}

/* ---- bookkeeping ---------------------------------------------------------- */

/* Adds (add = 1) or removes (add = 0) the item's share of the counts. */
static void account(rr_qsched_t *s, const item_t *it, int add) {
  rr_qsched_counts_t *c = &s->counts[it->lane];
  size_t *n = NULL;
  if (it->state == ST_PENDING) {
    n = &c->pending;
    if (it->attempts > 0) {
      if (add)
        c->retrying++;
      else
        c->retrying--;
    }
  } else if (it->state == ST_INFLIGHT) {
    n = &c->inflight;
  } else if (it->state == ST_DEAD) {
    n = &c->dead;
  }
  if (n) {
    if (add)
      (*n)++;
    else
      (*n)--;
  }
}

/* Gives an uncounted item (new, or just landed) its state and counts it. */
static void become(rr_qsched_t *s, item_t *it, uint8_t state) {
  it->state = state;
  account(s, it, 1);
}

/* Uncounts an item that is about to change state. */
static void uncount(rr_qsched_t *s, item_t *it) {
  account(s, it, 0);
  it->state = ST_FREE;
}

/* Makes a pending, unqueued item a candidate. */
static void enqueue(rr_qsched_t *s, uint32_t i) {
  item_t *it = IT(s, i);
  if (it->not_before_ms <= s->clock) {
    it->where = IN_READY;
    heap_push(s, &s->ready[it->lane], BY_ID, i);
  } else {
    it->where = IN_TIMER;
    heap_push(s, &s->timer, BY_NOT_BEFORE, i);
  }
}

static void dequeue(rr_qsched_t *s, uint32_t i) {
  item_t *it = IT(s, i);
  if (it->where == IN_READY)
    heap_remove(s, &s->ready[it->lane], BY_ID, it->pos);
  else if (it->where == IN_TIMER)
    heap_remove(s, &s->timer, BY_NOT_BEFORE, it->pos);
  else
    return;
  it->where = IN_NONE;
}

/* After any change to a key (or a keyless item): queue whatever may start. */
static void kick(rr_qsched_t *s, qkey_t *k, uint32_t keyless) {
  uint32_t i = k ? k->head : keyless;
  if ((k && k->inflight) || i == NIL)
    return;
  item_t *it = IT(s, i);
  if (it->state == ST_PENDING && it->where == IN_NONE)
    enqueue(s, i);
}

/* Links item i into its key's FIFO in id order, walking from the head (an
 * operator retry: the item is old) or from the tail (an add: it is new). */
static void link_item(rr_qsched_t *s, uint32_t i, int from_head) {
  item_t *it = IT(s, i);
  qkey_t *k = it->key;
  uint32_t old_head = k->head, prev, next;
  if (from_head) {
    prev = NIL;
    next = k->head;
    while (next != NIL && IT(s, next)->id < it->id) {
      prev = next;
      next = IT(s, next)->next;
    }
  } else {
    next = NIL;
    prev = k->tail;
    while (prev != NIL && IT(s, prev)->id > it->id) {
      next = prev;
      prev = IT(s, prev)->prev;
    }
  }
  it->prev = prev;
  it->next = next;
  if (prev != NIL)
    IT(s, prev)->next = i;
  else
    k->head = i;
  if (next != NIL)
    IT(s, next)->prev = i;
  else
    k->tail = i;
  it->linked = 1;
  /* A new head displaces the old one as the key's candidate. */
  if (old_head != NIL && k->head != old_head)
    dequeue(s, old_head);
}

static void unlink_item(rr_qsched_t *s, uint32_t i) {
  item_t *it = IT(s, i);
  qkey_t *k = it->key;
  if (it->prev != NIL)
    IT(s, it->prev)->next = it->next;
  else
    k->head = it->next;
  if (it->next != NIL)
    IT(s, it->next)->prev = it->prev;
  else
    k->tail = it->prev;
  it->prev = it->next = NIL;
  it->linked = 0;
}

/* Forgets item i (no longer queued, counted or in the age heap). */
static void release(rr_qsched_t *s, uint32_t i) {
  item_t *it = IT(s, i);
  qkey_t *k = it->key;
  if (it->linked)
    unlink_item(s, i);
  id_delete(s, it->id);
  s->lane_items[it->lane]--;
  s->loaded--;
  it->state = ST_FREE;
  it->key = NULL;
  it->next = s->free_head;
  s->free_head = i;
  if (k && --k->refs == 0) {
    key_delete(s, k);
    free(k);
  } else if (k) {
    kick(s, k, NIL);
  }
}

/* Files an uncounted item as dead. */
static void to_dead(rr_qsched_t *s, uint32_t i) {
  item_t *it = IT(s, i);
  become(s, it, ST_DEAD);
  it->where = IN_DEAD;
  it->pos = (uint32_t)s->dead.n;
  s->dead.v[s->dead.n++] = i;
  if (it->key && it->linked && !s->cfg.dead_blocks_key)
    unlink_item(s, i);
}

static void dead_remove(rr_qsched_t *s, uint32_t i) {
  item_t *it = IT(s, i);
  uint32_t last = s->dead.v[--s->dead.n];
  if (last != i) {
    s->dead.v[it->pos] = last;
    IT(s, last)->pos = it->pos;
  }
  it->where = IN_NONE;
}

/* ---- breaker -------------------------------------------------------------- */

static void breaker_tick(rr_qsched_t *s, int64_t now_ms) {
  if (s->br.state == RR_QSCHED_OPEN && now_ms >= s->br.open_until_ms) {
    s->br.state = RR_QSCHED_HALF_OPEN;
    s->br.probe_id = 0;
  }
}

/* Only the probe decides a half-open breaker; outcomes of items started
 * before the breaker opened change nothing until it is closed again. */
static void breaker_answer(rr_qsched_t *s, int64_t id) {
  if (s->br.state == RR_QSCHED_CLOSED) {
    s->br.failures = 0;
  } else if (s->br.state == RR_QSCHED_HALF_OPEN && s->br.probe_id == id) {
    s->br.state = RR_QSCHED_CLOSED;
    s->br.failures = 0;
    s->br.probe_id = 0;
  }
}

static int64_t add_clamped(int64_t a, int64_t b) {
  return b > 0 && a > INT64_MAX - b ? INT64_MAX : a + b;
}

static void breaker_failure(rr_qsched_t *s, int64_t id, int64_t now_ms) {
  if (s->cfg.breaker_failures == 0)
    return;
  if (s->br.state == RR_QSCHED_CLOSED) {
    if (s->br.failures < UINT32_MAX)
      s->br.failures++;
    if (s->br.failures < s->cfg.breaker_failures)
      return;
  } else if (s->br.state != RR_QSCHED_HALF_OPEN || s->br.probe_id != id) {
    return;
  }
  s->br.state = RR_QSCHED_OPEN;
  s->br.open_until_ms = add_clamped(now_ms, s->cfg.breaker_open_ms);
  s->br.probe_id = 0;
}

/* ---- backoff -------------------------------------------------------------- */

static int64_t backoff_cap(const rr_qsched_config_t *c, uint32_t attempts) {
  int64_t cap = c->backoff_base_ms, max = c->backoff_max_ms;
  if (cap == 0 || cap >= max)
    return cap < max ? cap : max;
  for (uint32_t n = 1; n < attempts; n++) {
    if (cap > max / 2)
      return max;
    cap *= 2;
  }
  return cap;
}

/* Uniform in [0, cap] without modulo bias (rejection sampling). */
static int64_t uniform(rr_qsched_rand_fn rand, void *ud, int64_t cap) {
  uint64_t range = (uint64_t)cap + 1;
  uint64_t rem = (UINT64_MAX % range + 1) % range; /* 2^64 mod range */
  uint64_t r = rand(ud);
  for (int tries = 0; rem && r >= 0 - rem && tries < 64; tries++)
    r = rand(ud);
  return (int64_t)(r % range);
}

static int older_than(int64_t now_ms, int64_t t, int64_t age) {
  return now_ms > t && (uint64_t)now_ms - (uint64_t)t > (uint64_t)age;
}

/* ---- public --------------------------------------------------------------- */

void rr_qsched_config_default(rr_qsched_config_t *c) {
  memset(c, 0, sizeof *c);
  c->concurrency = 1;
  c->max_attempts = 10;
  c->max_age_ms = 0;
  c->backoff_base_ms = 1000;
  c->backoff_max_ms = 300000;
  c->dead_blocks_key = 1;
  c->breaker_failures = 5;
  c->breaker_open_ms = 30000;
  c->max_items = (size_t)1 << 20;
}

int rr_qsched_new(const rr_qsched_config_t *c, rr_qsched_t **out) {
  rr_qsched_config_t def;
  *out = NULL;
  if (!c) {
    rr_qsched_config_default(&def);
    c = &def;
  }
  if (c->concurrency < 1 || c->max_items < 1 || c->max_items > MAX_ITEMS_LIMIT ||
      c->max_age_ms < 0 || c->backoff_base_ms < 0 || c->backoff_max_ms < 0 ||
      c->breaker_open_ms < 0)
    return RR_EINVAL;
  rr_qsched_t *s = calloc(1, sizeof *s);
  if (!s)
    return RR_ENOMEM;
  s->cfg = *c;
  s->cfg.dead_blocks_key = c->dead_blocks_key != 0;
  s->free_head = NIL;
  s->clock = INT64_MIN;
  s->br.state = RR_QSCHED_CLOSED;
  *out = s;
  return 0;
}

void rr_qsched_free(rr_qsched_t *s) {
  if (!s)
    return;
  for (size_t i = 0; i < s->keys_cap; i++)
    free(s->keys[i]);
  free(s->keys);
  for (size_t i = 0; i < s->nchunks; i++)
    free(s->chunks[i]);
  free(s->chunks);
  free(s->ids);
  for (int l = 0; l < RR_QSCHED_LANES; l++) {
    free(s->ready[l].v);
    free(s->age[l].v);
  }
  free(s->timer.v);
  free(s->dead.v);
  free(s);
}

/* A new slab chunk; its items go on the free list. */
static int grow_slab(rr_qsched_t *s) {
  if (rr_array_grow((void **)&s->chunks, &s->chunks_cap, s->nchunks + 1, sizeof *s->chunks, 16))
    return RR_ENOMEM;
  item_t *c = malloc(CHUNK_ITEMS * sizeof *c);
  if (!c)
    return RR_ENOMEM;
  uint32_t base = (uint32_t)(s->nchunks << CHUNK_BITS);
  s->chunks[s->nchunks++] = c;
  for (uint32_t j = CHUNK_ITEMS; j-- > 0;) {
    c[j].state = ST_FREE;
    c[j].next = s->free_head;
    s->free_head = base + j;
  }
  return 0;
}

/* The key named it->key: found, or made (and not yet in the table: the
 * caller inserts it once nothing else can fail). */
static int key_get(rr_qsched_t *s, const char *name, size_t len, qkey_t **out, size_t *slot) {
  uint64_t h = hash_str(name, len);
  *out = NULL;
  if (s->keys_cap) {
    *slot = key_slot(s, name, len, h);
    if (s->keys[*slot]) {
      *out = s->keys[*slot];
      return 0;
    }
  }
  if (keys_reserve(s, s->nkeys + 1))
    return RR_ENOMEM;
  qkey_t *k = malloc(sizeof *k + len + 1);
  if (!k)
    return RR_ENOMEM;
  k->hash = h;
  k->head = k->tail = NIL;
  k->refs = 0;
  k->inflight = 0;
  k->len = len;
  memcpy(k->name, name, len);
  k->name[len] = '\0';
  *slot = key_slot(s, name, len, h);
  *out = k;
  return 0;
}

int rr_qsched_add(rr_qsched_t *s, const rr_qsched_item_t *in) {
  if (in->lane >= RR_QSCHED_LANES)
    return RR_EINVAL;
  size_t klen = in->key ? strnlen(in->key, RR_QSCHED_KEY_MAX + 1) : 0;
  if (klen > RR_QSCHED_KEY_MAX)
    return RR_ELIMIT;
  if (s->loaded >= s->cfg.max_items)
    return RR_ELIMIT;
  if (id_find(s, in->id) != NIL)
    return RR_EINVAL;
  /* Reserve everything the item may ever need; none of it has to be undone. */
  if (heap_reserve(&s->ready[in->lane], s->lane_items[in->lane] + 1) ||
      heap_reserve(&s->age[in->lane], s->lane_items[in->lane] + 1) ||
      heap_reserve(&s->timer, s->loaded + 1) || heap_reserve(&s->dead, s->loaded + 1) ||
      ids_reserve(s, s->loaded + 1) || (s->free_head == NIL && grow_slab(s)))
    return RR_ENOMEM;
  qkey_t *k = NULL;
  size_t kslot = 0;
  if (klen && key_get(s, in->key, klen, &k, &kslot))
    return RR_ENOMEM;
  /* Commit: nothing below fails. */
  if (k && !s->keys[kslot]) {
    s->keys[kslot] = k;
    s->nkeys++;
  }
  uint32_t i = s->free_head;
  item_t *it = IT(s, i);
  s->free_head = it->next;
  memset(it, 0, sizeof *it);
  it->id = in->id;
  it->enqueued_ms = in->enqueued_ms;
  it->not_before_ms = in->not_before_ms;
  it->attempts = in->attempts;
  it->lane = (uint8_t)in->lane;
  it->key = k;
  it->prev = it->next = NIL;
  it->where = IN_NONE;
  s->ids[id_slot(s, in->id)] = i;
  s->loaded++;
  s->lane_items[in->lane]++;
  if (k) {
    k->refs++;
    if (!in->dead || s->cfg.dead_blocks_key)
      link_item(s, i, 0);
  }
  if (in->dead) {
    to_dead(s, i);
  } else {
    become(s, it, ST_PENDING);
    heap_push(s, &s->age[it->lane], BY_AGE, i);
  }
  kick(s, k, i);
  return 0;
}

size_t rr_qsched_loaded(const rr_qsched_t *s) {
  return s->loaded;
}

size_t rr_qsched_room(const rr_qsched_t *s) {
  return s->cfg.max_items - s->loaded;
}

int rr_qsched_next(rr_qsched_t *s, int64_t now_ms, int64_t *id_out) {
  if (now_ms > s->clock)
    s->clock = now_ms;
  breaker_tick(s, now_ms);
  if (s->inflight >= s->cfg.concurrency || s->br.state == RR_QSCHED_OPEN ||
      (s->br.state == RR_QSCHED_HALF_OPEN && s->br.probe_id != 0))
    return RR_EAGAIN;
  while (s->timer.n && IT(s, s->timer.v[0])->not_before_ms <= s->clock) {
    uint32_t i = s->timer.v[0];
    heap_remove(s, &s->timer, BY_NOT_BEFORE, 0);
    IT(s, i)->where = IN_NONE;
    enqueue(s, i);
  }
  int l = RR_QSCHED_LANES - 1;
  while (l >= 0 && s->ready[l].n == 0)
    l--;
  if (l < 0)
    return RR_EAGAIN;
  uint32_t i = s->ready[l].v[0];
  item_t *it = IT(s, i);
  heap_remove(s, &s->ready[l], BY_ID, 0);
  it->where = IN_NONE;
  uncount(s, it);
  become(s, it, ST_INFLIGHT);
  s->inflight++;
  if (it->key)
    it->key->inflight = 1;
  if (s->br.state == RR_QSCHED_HALF_OPEN)
    s->br.probe_id = it->id;
  *id_out = it->id;
  return 0;
}

/* The in-flight item id, or NIL with *rc set. */
static uint32_t find_inflight(const rr_qsched_t *s, int64_t id, int *rc) {
  uint32_t i = id_find(s, id);
  *rc = i == NIL ? RR_ENOTFOUND : IT(s, i)->state != ST_INFLIGHT ? RR_EINVAL : 0;
  return *rc ? NIL : i;
}

/* An in-flight item stops being in flight; the caller gives it a state. */
static void land(rr_qsched_t *s, item_t *it) {
  uncount(s, it);
  s->inflight--;
  if (it->key)
    it->key->inflight = 0;
}

/* A failed attempt: dead (and why), or when to try again. */
static void fail(rr_qsched_t *s, uint32_t i, rr_qsched_outcome_t outcome, int64_t now_ms,
                 rr_qsched_rand_fn rand, void *rand_ud, rr_qsched_result_t *r) {
  item_t *it = IT(s, i);
  if (it->attempts < UINT32_MAX)
    it->attempts++;
  r->attempts = it->attempts;
  if (outcome == RR_QSCHED_PERMANENT) {
    breaker_answer(s, it->id);
    r->reason = RR_QSCHED_REJECTED;
  } else {
    breaker_failure(s, it->id, now_ms);
    if (s->cfg.max_attempts && it->attempts >= s->cfg.max_attempts)
      r->reason = RR_QSCHED_MAX_ATTEMPTS;
    else if (s->cfg.max_age_ms && older_than(now_ms, it->enqueued_ms, s->cfg.max_age_ms))
      r->reason = RR_QSCHED_MAX_AGE;
  }
  if (r->reason != RR_QSCHED_NOT_DEAD) {
    r->action = RR_QSCHED_DEAD;
    heap_remove(s, &s->age[it->lane], BY_AGE, it->apos);
    to_dead(s, i);
  } else {
    r->action = RR_QSCHED_RESCHEDULED;
    r->delay_ms = uniform(rand, rand_ud, backoff_cap(&s->cfg, it->attempts));
    r->not_before_ms = add_clamped(now_ms, r->delay_ms);
    it->not_before_ms = r->not_before_ms;
    become(s, it, ST_PENDING);
  }
  kick(s, it->key, i);
}

int rr_qsched_done(rr_qsched_t *s, int64_t id, rr_qsched_outcome_t outcome, int64_t now_ms,
                   rr_qsched_rand_fn rand, void *rand_ud, rr_qsched_result_t *out) {
  rr_qsched_result_t r;
  int rc;
  uint32_t i = find_inflight(s, id, &rc);
  if (rc)
    return rc;
  if ((outcome != RR_QSCHED_OK && outcome != RR_QSCHED_RETRY && outcome != RR_QSCHED_PERMANENT) ||
      (outcome == RR_QSCHED_RETRY && !rand))
    return RR_EINVAL;
  if (now_ms > s->clock)
    s->clock = now_ms;
  breaker_tick(s, now_ms);
  rr_qsched_breaker_state_t before_state = s->br.state;
  memset(&r, 0, sizeof r);
  r.id = id;
  item_t *it = IT(s, i);
  land(s, it);
  if (outcome == RR_QSCHED_OK) {
    breaker_answer(s, id);
    r.action = RR_QSCHED_DELIVERED;
    r.attempts = it->attempts;
    heap_remove(s, &s->age[it->lane], BY_AGE, it->apos);
    release(s, i);
  } else {
    fail(s, i, outcome, now_ms, rand, rand_ud, &r);
  }
  r.breaker = s->br.state;
  r.breaker_changed = before_state != s->br.state;
  if (out)
    *out = r;
  return 0;
}

int rr_qsched_return(rr_qsched_t *s, int64_t id) {
  int rc;
  uint32_t i = find_inflight(s, id, &rc);
  if (rc)
    return rc;
  item_t *it = IT(s, i);
  land(s, it);
  become(s, it, ST_PENDING);
  if (s->br.state == RR_QSCHED_HALF_OPEN && s->br.probe_id == id)
    s->br.probe_id = 0;
  kick(s, it->key, i);
  return 0;
}

int rr_qsched_retry(rr_qsched_t *s, int64_t id) {
  uint32_t i = id_find(s, id);
  if (i == NIL)
    return RR_ENOTFOUND;
  item_t *it = IT(s, i);
  if (it->state != ST_DEAD)
    return RR_EINVAL;
  dead_remove(s, i);
  uncount(s, it);
  it->attempts = 0;
  it->not_before_ms = 0;
  become(s, it, ST_PENDING);
  heap_push(s, &s->age[it->lane], BY_AGE, i);
  if (it->key && !it->linked)
    link_item(s, i, 1);
  kick(s, it->key, i);
  return 0;
}

size_t rr_qsched_retry_all_dead(rr_qsched_t *s) {
  size_t n = 0;
  while (s->dead.n) {
    rr_qsched_retry(s, IT(s, s->dead.v[s->dead.n - 1])->id);
    n++;
  }
  return n;
}

int rr_qsched_drop(rr_qsched_t *s, int64_t id) {
  uint32_t i = id_find(s, id);
  if (i == NIL)
    return RR_ENOTFOUND;
  item_t *it = IT(s, i);
  if (it->state == ST_INFLIGHT)
    return RR_EINVAL;
  if (it->state == ST_DEAD) {
    dead_remove(s, i);
  } else {
    dequeue(s, i);
    heap_remove(s, &s->age[it->lane], BY_AGE, it->apos);
  }
  uncount(s, it);
  release(s, i);
  return 0;
}

int rr_qsched_lookup(const rr_qsched_t *s, int64_t id, rr_qsched_state_t *state,
                     rr_qsched_item_t *out) {
  uint32_t i = id_find(s, id);
  if (i == NIL)
    return RR_ENOTFOUND;
  const item_t *it = IT(s, i);
  if (state)
    *state = it->state == ST_PENDING    ? RR_QSCHED_PENDING
             : it->state == ST_INFLIGHT ? RR_QSCHED_INFLIGHT
                                        : RR_QSCHED_DEAD_LETTER;
  if (out) {
    out->id = it->id;
    out->key = it->key ? it->key->name : NULL;
    out->lane = it->lane;
    out->enqueued_ms = it->enqueued_ms;
    out->attempts = it->attempts;
    out->not_before_ms = it->not_before_ms;
    out->dead = it->state == ST_DEAD;
  }
  return 0;
}

int64_t rr_qsched_next_wakeup(const rr_qsched_t *s, int64_t now_ms) {
  rr_qsched_breaker_t br;
  rr_qsched_breaker(s, now_ms, &br);
  if (s->inflight >= s->cfg.concurrency || (br.state == RR_QSCHED_HALF_OPEN && br.probe_id))
    return RR_QSCHED_NEVER;
  int64_t t = RR_QSCHED_NEVER;
  for (int l = 0; l < RR_QSCHED_LANES; l++)
    if (s->ready[l].n)
      t = now_ms;
  if (t == RR_QSCHED_NEVER && s->timer.n) {
    int64_t nb = IT(s, s->timer.v[0])->not_before_ms;
    t = nb > now_ms ? nb : now_ms;
  }
  if (t != RR_QSCHED_NEVER && br.state == RR_QSCHED_OPEN && br.open_until_ms > t)
    t = br.open_until_ms;
  return t;
}

void rr_qsched_stats(const rr_qsched_t *s, rr_qsched_stats_t *out) {
  memset(out, 0, sizeof *out);
  int any = 0;
  for (int l = 0; l < RR_QSCHED_LANES; l++) {
    rr_qsched_counts_t *c = &out->lane[l];
    *c = s->counts[l];
    c->oldest_enqueued_ms = s->age[l].n ? IT(s, s->age[l].v[0])->enqueued_ms : 0;
    out->total.pending += c->pending;
    out->total.inflight += c->inflight;
    out->total.dead += c->dead;
    out->total.retrying += c->retrying;
    if (s->age[l].n && (!any || c->oldest_enqueued_ms < out->total.oldest_enqueued_ms)) {
      out->total.oldest_enqueued_ms = c->oldest_enqueued_ms;
      any = 1;
    }
  }
}

void rr_qsched_breaker(const rr_qsched_t *s, int64_t now_ms, rr_qsched_breaker_t *out) {
  *out = s->br;
  if (out->state == RR_QSCHED_OPEN && now_ms >= out->open_until_ms) {
    out->state = RR_QSCHED_HALF_OPEN;
    out->probe_id = 0;
  }
}

/* Integration tests of the MLLP sender (engine/mllp/sender.c) against a
 * third-party MLLP server: npm's @medplum/hl7 Hl7Server, driven by
 * tests/integration/peers/mllp_peer.mjs, which chooses its answer from a
 * prefix of MSH-10 (see that file).
 *
 *   test_mllp_sender NODE PEER_SCRIPT
 *
 * Everything runs on one libuv loop: the sender, the peer process (spawned
 * with uv_spawn, its stdout read line by line), and the waits. A wait is a
 * condition with a deadline (WAIT_UNTIL), never a sleep. $RR_TEST_VERBOSE=1
 * shows the sender's log lines. Ends with "N passed, M failed". */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "core/log.h"
#include "mllp/sender.h"
#include "rr_test.h"

static uv_loop_t loop;
static const char *node_path, *peer_script;
static int in_api; /* inside rr_mllp_sender_send/close: no callback may run */
static int sync_callbacks;

/* ---- waiting ------------------------------------------------------------ */

static uv_timer_t deadline_timer;
static void on_deadline(uv_timer_t *t) {
  (void)t;
}

static uint64_t now_ms(void) {
  return uv_hrtime() / 1000000u;
}

/* Runs the loop until cond holds or ms pass; the timer makes sure one loop
 * iteration never blocks past the deadline. Evaluates to cond. */
#define WAIT_UNTIL(cond, ms)                                                                       \
  ({                                                                                               \
    uint64_t dl_ = now_ms() + (ms);                                                                \
    uv_timer_start(&deadline_timer, on_deadline, (ms), 0);                                         \
    while (!(cond) && now_ms() < dl_)                                                              \
      uv_run(&loop, UV_RUN_ONCE);                                                                  \
    uv_timer_stop(&deadline_timer);                                                                \
    int ok_ = (cond) ? 1 : 0;                                                                      \
    if (!ok_)                                                                                      \
      fprintf(stderr, "%s:%d: timed out after %d ms waiting for %s\n", __FILE__, __LINE__,         \
              (int)(ms), #cond);                                                                   \
    ok_;                                                                                           \
  })

/* ---- the peer process --------------------------------------------------- */

typedef struct peer {
  uv_process_t proc;
  uv_pipe_t in, out;
  int open_handles;
  int exited;
  int port;
  char line[8192];
  size_t line_len;
  int conns, closed, msgs;
  char **ids; /* MSH-10 of every message received, in order */
  size_t nids, cap;
} peer_t;

static void peer_handle_closed(uv_handle_t *h) {
  peer_t *p = h->data;
  p->open_handles--;
}

static void peer_line(peer_t *p, const char *l) {
  if (strncmp(l, "ready port=", 11) == 0) {
    p->port = (int)strtol(l + 11, NULL, 10);
  } else if (strncmp(l, "conn n=", 7) == 0) {
    p->conns++;
  } else if (strncmp(l, "closed n=", 9) == 0) {
    p->closed++;
  } else if (strncmp(l, "msg ", 4) == 0) {
    const char *id = strstr(l, " id=");
    if (p->nids == p->cap) {
      p->cap = p->cap ? p->cap * 2 : 64;
      p->ids = realloc(p->ids, p->cap * sizeof *p->ids);
    }
    p->ids[p->nids++] = strdup(id ? id + 4 : "");
    p->msgs++;
  }
}

static void peer_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
  (void)h;
  static char buf[65536];
  (void)sz;
  b->base = buf;
  b->len = sizeof buf;
}

static void peer_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  peer_t *p = st->data;
  if (n < 0) {
    if (!uv_is_closing((uv_handle_t *)st))
      uv_close((uv_handle_t *)st, peer_handle_closed);
    return;
  }
  for (ssize_t i = 0; i < n; i++) {
    char c = b->base[i];
    if (c == '\n') {
      p->line[p->line_len] = '\0';
      peer_line(p, p->line);
      p->line_len = 0;
    } else if (p->line_len + 1 < sizeof p->line) {
      p->line[p->line_len++] = c;
    }
  }
}

static void peer_exit(uv_process_t *proc, int64_t status, int sig) {
  peer_t *p = proc->data;
  (void)status;
  (void)sig;
  p->exited = 1;
  uv_close((uv_handle_t *)proc, peer_handle_closed);
}

/* Starts the peer on port (0 = any) and waits for "ready". */
static peer_t *peer_start(int port) {
  peer_t *p = calloc(1, sizeof *p);
  char portarg[16];
  snprintf(portarg, sizeof portarg, "%d", port);
  char *args[] = {(char *)node_path, (char *)peer_script, "--port", portarg, NULL};
  uv_stdio_container_t io[3];
  uv_pipe_init(&loop, &p->in, 0);
  uv_pipe_init(&loop, &p->out, 0);
  p->in.data = p->out.data = p->proc.data = p;
  p->open_handles = 2;
  io[0].flags = UV_CREATE_PIPE | UV_READABLE_PIPE;
  io[0].data.stream = (uv_stream_t *)&p->in;
  io[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  io[1].data.stream = (uv_stream_t *)&p->out;
  io[2].flags = UV_INHERIT_FD;
  io[2].data.fd = 2;
  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.file = node_path;
  o.args = args;
  o.exit_cb = peer_exit;
  o.stdio = io;
  o.stdio_count = 3;
  int rc = uv_spawn(&loop, &p->proc, &o);
  if (rc) {
    fprintf(stderr, "cannot start %s: %s\n", node_path, uv_strerror(rc));
    exit(2);
  }
  p->open_handles++;
  uv_read_start((uv_stream_t *)&p->out, peer_alloc, peer_read);
  if (!WAIT_UNTIL(p->port > 0 || p->exited, 20000) || !p->port) {
    fprintf(stderr, "peer did not start\n");
    exit(2);
  }
  return p;
}

/* SIGKILL (kill = 1) or end of stdin (kill = 0); waits until it is gone. */
static void peer_stop(peer_t *p, int kill) {
  if (kill)
    uv_process_kill(&p->proc, SIGKILL);
  if (!uv_is_closing((uv_handle_t *)&p->in))
    uv_close((uv_handle_t *)&p->in, peer_handle_closed);
  if (!WAIT_UNTIL(p->exited, 10000)) {
    uv_process_kill(&p->proc, SIGKILL);
    WAIT_UNTIL(p->exited, 10000);
  }
}

static void peer_free(peer_t *p) {
  peer_stop(p, 0);
  WAIT_UNTIL(p->open_handles == 0, 10000);
  for (size_t i = 0; i < p->nids; i++)
    free(p->ids[i]);
  free(p->ids);
  free(p);
}

static int peer_has(const peer_t *p, const char *id) {
  for (size_t i = 0; i < p->nids; i++)
    if (strcmp(p->ids[i], id) == 0)
      return 1;
  return 0;
}

/* ---- messages and results ----------------------------------------------- */

typedef struct sent {
  int idx;
  int done;
  int order; /* completion sequence number */
  int status, cause, written;
  char ack_code[3];
  char control_id[64];
  char want_id[64];
  int ack_present;
  size_t ack_len;
  uint64_t elapsed_ms, ack_ms;
  uint64_t at_ms; /* uv_now() at the callback */
} sent_t;

static int completions;

static void on_result(void *ud, const rr_mllp_send_result_t *r) {
  sent_t *m = ud;
  if (in_api)
    sync_callbacks++;
  m->done++;
  m->order = completions++;
  m->status = r->status;
  m->cause = r->cause;
  m->written = r->written;
  memcpy(m->ack_code, r->ack_code, 3);
  snprintf(m->control_id, sizeof m->control_id, "%s", r->control_id);
  m->ack_present = r->ack != NULL;
  m->ack_len = r->ack_len;
  m->elapsed_ms = r->elapsed_ms;
  m->ack_ms = r->ack_ms;
  m->at_ms = uv_now(&loop);
}

static size_t make_msg(char *out, size_t cap, const char *id) {
  int n = snprintf(out, cap,
                   "MSH|^~\\&|RADRELAY|TEST|PEER|TEST|20240101120000||ADT^A01|%s|P|2.5\r"
                   "EVN|A01|20240101120000\r"
                   "PID|1||12345^^^HOSP^MR||DOE^JOHN||19700101|M\r",
                   id);
  return (size_t)n;
}

static int send_msg(rr_mllp_sender_t *s, sent_t *m, const char *id) {
  char buf[1024];
  size_t n = make_msg(buf, sizeof buf, id);
  memset(m, 0, sizeof *m);
  snprintf(m->want_id, sizeof m->want_id, "%s", id);
  in_api = 1;
  int rc = rr_mllp_sender_send(s, buf, n, id, on_result, m);
  in_api = 0;
  return rc;
}

static int closed_flag;
static void on_closed(void *ud) {
  int *f = ud;
  (*f)++;
}

static void close_sender(rr_mllp_sender_t *s) {
  closed_flag = 0;
  in_api = 1;
  rr_mllp_sender_close(s, on_closed, &closed_flag);
  in_api = 0;
  CHECK(WAIT_UNTIL(closed_flag == 1, 10000));
}

static rr_mllp_sender_t *new_sender(rr_mllp_sender_config_t *c) {
  rr_mllp_sender_t *s = NULL;
  int rc = rr_mllp_sender_new(&loop, c, &s);
  CHECK_EQ_INT(rc, 0);
  return s;
}

static rr_mllp_sender_stats_t stats(rr_mllp_sender_t *s) {
  rr_mllp_sender_stats_t st;
  rr_mllp_sender_stats(s, &st);
  return st;
}

static peer_t *peer; /* the normal peer most tests share */

/* ---- tests -------------------------------------------------------------- */

/* 200 messages queued at once on one kept-alive connection: all AA, called
 * back in order, received by the peer in order on one connection. */
static void test_keepalive_200(void) {
  enum { N = 200 };
  static sent_t m[N];
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = peer->port;
  rr_mllp_sender_t *s = new_sender(&c);
  int conns0 = peer->conns;
  size_t ids0 = peer->nids;
  int base = completions;
  for (int i = 0; i < N; i++) {
    char id[32];
    snprintf(id, sizeof id, "KA-%04d", i);
    CHECK_EQ_INT(send_msg(s, &m[i], id), 0);
    m[i].idx = i;
  }
  CHECK(WAIT_UNTIL(m[N - 1].done, 30000));
  int in_order = 1, all_aa = 1;
  for (int i = 0; i < N; i++) {
    in_order &= m[i].done == 1 && m[i].order == base + i;
    all_aa &= m[i].status == 0 && strcmp(m[i].ack_code, "AA") == 0 &&
              strcmp(m[i].control_id, m[i].want_id) == 0 && m[i].ack_present && m[i].written;
  }
  CHECK(in_order);
  CHECK(all_aa);
  rr_mllp_sender_stats_t st = stats(s);
  CHECK_EQ_INT(st.connects, 1);
  CHECK_EQ_INT(st.sends, N);
  CHECK_EQ_INT(st.acks, N);
  CHECK_EQ_INT(st.errors, 0);
  CHECK_EQ_INT(st.queued, 0);
  CHECK_EQ_INT(st.queued_bytes, 0);
  CHECK(WAIT_UNTIL(peer->nids >= ids0 + N, 10000));
  CHECK_EQ_INT(peer->conns - conns0, 1);
  int peer_order = peer->nids == ids0 + N;
  for (int i = 0; peer_order && i < N; i++)
    peer_order = strcmp(peer->ids[ids0 + (size_t)i], m[i].want_id) == 0;
  CHECK(peer_order);
  close_sender(s);
}

/* A connection per message, to a host name (resolver path): every message
 * gets its own connection, closed after its ACK. */
static void test_connect_per_message(void) {
  enum { N = 20 };
  static sent_t m[N];
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "localhost";
  c.port = peer->port;
  c.keep_alive = 0;
  rr_mllp_sender_t *s = new_sender(&c);
  int conns0 = peer->conns, closed0 = peer->closed;
  int base = completions;
  for (int i = 0; i < N; i++) {
    char id[32];
    snprintf(id, sizeof id, "PM-%04d", i);
    CHECK_EQ_INT(send_msg(s, &m[i], id), 0);
  }
  CHECK(WAIT_UNTIL(m[N - 1].done, 30000));
  int ok = 1;
  for (int i = 0; i < N; i++)
    ok &= m[i].status == 0 && strcmp(m[i].ack_code, "AA") == 0 && m[i].order == base + i;
  CHECK(ok);
  rr_mllp_sender_stats_t st = stats(s);
  CHECK_EQ_INT(st.connects, N);
  CHECK_EQ_INT(st.acks, N);
  CHECK(WAIT_UNTIL(peer->conns - conns0 == N && peer->closed - closed0 == N, 10000));
  close_sender(s);
}

/* One follow-up message that must go through after a failure. */
static void follow_up(rr_mllp_sender_t *s, const char *after) {
  sent_t n;
  char id[64];
  snprintf(id, sizeof id, "NEXT-%s", after);
  CHECK_EQ_INT(send_msg(s, &n, id), 0);
  CHECK(WAIT_UNTIL(n.done, 10000));
  if (n.status != 0)
    fprintf(stderr, "follow-up after %s: %s\n", after, rr_mllp_sender_strerror(n.status));
  CHECK_EQ_INT(n.status, 0);
  CHECK(strcmp(n.ack_code, "AA") == 0);
}

/* After a failure: the peer sees its connection closed, and the next
 * message goes through on a new one. */
static void reconnects(rr_mllp_sender_t *s, const char *after, int peer_closed_before) {
  uint64_t conns = stats(s).connects;
  CHECK(WAIT_UNTIL(peer->closed > peer_closed_before, 5000));
  follow_up(s, after);
  CHECK_EQ_INT(stats(s).connects, conns + 1);
}

static void one(rr_mllp_sender_t *s, sent_t *m, const char *id) {
  CHECK_EQ_INT(send_msg(s, m, id), 0);
  CHECK(WAIT_UNTIL(m->done, 10000));
  CHECK_EQ_INT(m->done, 1);
  CHECK(strcmp(m->control_id, id) == 0);
}

/* Every way a peer can answer wrongly gives its own status, closes the
 * connection, and the next message goes through on a new one. */
static void test_bad_answers(void) {
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = peer->port;
  c.ack_timeout_ms = 500;
  c.backoff_base_ms = 20;
  c.backoff_cap_ms = 200;
  c.framing.max_frame = 8192;
  rr_mllp_sender_t *s = new_sender(&c);
  sent_t m;
  uint64_t conns;
  int closed;

  /* AE is an ACK: status 0, the connection stays. */
  one(s, &m, "AE-1");
  CHECK_EQ_INT(m.status, 0);
  CHECK(strcmp(m.ack_code, "AE") == 0);
  conns = stats(s).connects;
  follow_up(s, "AE");
  CHECK_EQ_INT(stats(s).connects, conns);
  CHECK_EQ_INT(stats(s).acks_negative, 1);

  closed = peer->closed;
  one(s, &m, "WRONG-1");
  CHECK_EQ_INT(m.status, RR_MLLP_EACKMISMATCH);
  CHECK(strcmp(m.ack_code, "AA") == 0);
  CHECK(m.ack_present && m.written);
  reconnects(s, "WRONG", closed);

  /* Late, but within the timeout: fine. */
  one(s, &m, "LATE-150-1");
  CHECK_EQ_INT(m.status, 0);
  CHECK(m.ack_ms >= 140);

  /* Late past the timeout: timed out, and the ACK that comes afterwards
   * never reaches anything (its connection is closed). */
  closed = peer->closed;
  one(s, &m, "LATE-1200-2");
  CHECK_EQ_INT(m.status, RR_MLLP_EACKTIMEDOUT);
  CHECK(m.elapsed_ms >= 490 && m.elapsed_ms < 1200);
  CHECK(!m.ack_present && m.written);
  reconnects(s, "LATE", closed);

  closed = peer->closed;
  one(s, &m, "SILENT-1");
  CHECK_EQ_INT(m.status, RR_MLLP_EACKTIMEDOUT);
  reconnects(s, "SILENT", closed);

  closed = peer->closed;
  one(s, &m, "CLOSE-1");
  CHECK_EQ_INT(m.status, RR_MLLP_ECONNLOST);
  CHECK(m.cause == UV_EOF || m.cause == UV_ECONNRESET);
  CHECK(m.written);
  reconnects(s, "CLOSE", closed);

  closed = peer->closed;
  one(s, &m, "BAD-1");
  CHECK_EQ_INT(m.status, RR_MLLP_EBADACK);
  CHECK(m.ack_present && m.ack_code[0] == '\0');
  reconnects(s, "BAD", closed);

  closed = peer->closed;
  one(s, &m, "NOMSA-1");
  CHECK_EQ_INT(m.status, RR_MLLP_EBADACK);
  reconnects(s, "NOMSA", closed);

  closed = peer->closed;
  one(s, &m, "BIG-1");
  CHECK_EQ_INT(m.status, RR_ELIMIT);
  reconnects(s, "BIG", closed);

  /* Two ACKs for one message: the first counts, the second is unsolicited
   * and closes the connection before the next message is written. */
  uint64_t unsolicited = stats(s).unsolicited;
  closed = peer->closed;
  one(s, &m, "DOUBLE-1");
  CHECK_EQ_INT(m.status, 0);
  CHECK(WAIT_UNTIL(stats(s).unsolicited == unsolicited + 1, 5000));
  reconnects(s, "DOUBLE", closed);

  /* A late ACK on a connection kept open would be taken for the next
   * message's: LATE-500 times out at 300 ms, the silent next message is
   * written right after and is still waiting when the stale ACK is due. */
  close_sender(s);
  c.ack_timeout_ms = 300;
  s = new_sender(&c);
  one(s, &m, "LATE-500-3");
  CHECK_EQ_INT(m.status, RR_MLLP_EACKTIMEDOUT);
  sent_t n;
  CHECK_EQ_INT(send_msg(s, &n, "SILENT-3"), 0);
  CHECK(WAIT_UNTIL(n.done, 5000));
  CHECK_EQ_INT(n.status, RR_MLLP_EACKTIMEDOUT); /* not EACKMISMATCH: no stale ACK seen */
  CHECK_EQ_INT(stats(s).unsolicited, 0);
  CHECK_EQ_INT(stats(s).queued, 0);
  close_sender(s);
}

/* An ordered destination: one message at a time, resent at once after a
 * failure; the sender paces the reconnects. */
typedef struct failure {
  uint64_t at_ms;
  unsigned n;        /* consecutive failures after this one */
  uint64_t delay_ms; /* back-off drawn for it */
  int status;
} failure_t;

typedef struct ordered {
  rr_mllp_sender_t *s;
  int next;   /* index of the message in flight */
  int acked;  /* messages acknowledged */
  int target; /* stop after this many */
  sent_t cur;
  failure_t fail[256];
  int nfail;
  int other_errors;
  char acked_ids[64][32];
} ordered_t;

static void ordered_send(ordered_t *o);

static void on_ordered(void *ud, const rr_mllp_send_result_t *r) {
  ordered_t *o = ud;
  if (in_api)
    sync_callbacks++;
  if (r->status == 0) {
    if (o->acked < 64)
      snprintf(o->acked_ids[o->acked], sizeof o->acked_ids[0], "%s", r->control_id);
    o->acked++;
    o->next++;
  } else {
    rr_mllp_sender_stats_t st = stats(o->s);
    if (r->status != UV_ECONNREFUSED && r->status != RR_MLLP_ECONNLOST &&
        r->status != RR_MLLP_ECONNTIMEDOUT)
      o->other_errors++;
    if (o->nfail < 256)
      o->fail[o->nfail++] =
          (failure_t){uv_now(&loop), st.consecutive_failures, st.backoff_ms, r->status};
  }
  if (o->acked < o->target)
    ordered_send(o); /* from inside the callback */
}

static void ordered_send(ordered_t *o) {
  char buf[1024], id[32];
  snprintf(id, sizeof id, "RS-%04d", o->next);
  size_t n = make_msg(buf, sizeof buf, id);
  int rc = rr_mllp_sender_send(o->s, buf, n, id, on_ordered, o);
  if (rc)
    o->other_errors++;
}

/* The peer is killed mid-run and restarted on the same port: sends fail
 * with connection errors meanwhile, the back-off grows within its jitter
 * bounds, and delivery resumes without any help. */
static void test_peer_restart(void) {
  peer_t *a = peer_start(0);
  int port = a->port;
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = port;
  c.connect_timeout_ms = 2000;
  c.ack_timeout_ms = 3000;
  c.backoff_base_ms = 50;
  c.backoff_cap_ms = 400;
  static ordered_t o;
  memset(&o, 0, sizeof o);
  o.s = new_sender(&c);
  o.target = 40;
  ordered_send(&o);
  CHECK(WAIT_UNTIL(o.acked >= 10, 10000));
  peer_stop(a, 1);
  /* Down: wait for a run of consecutive failures long enough to reach the cap. */
  CHECK(WAIT_UNTIL(stats(o.s).consecutive_failures >= 8, 20000));
  peer_t *b = peer_start(port);
  CHECK_EQ_INT(b->port, port);
  CHECK(WAIT_UNTIL(o.acked >= o.target, 20000));
  CHECK_EQ_INT(o.other_errors, 0);
  CHECK(o.nfail >= 8);
  /* Acknowledged in order, none skipped. */
  int in_order = 1;
  for (int i = 0; i < o.acked && i < 64; i++) {
    char want[32];
    snprintf(want, sizeof want, "RS-%04d", i);
    in_order &= strcmp(o.acked_ids[i], want) == 0;
  }
  CHECK(in_order);
  /* Back-off: each delay within [0, min(cap, base * 2^(n-1))]; the next
   * attempt not before it and not much after; the ceiling reaches the cap
   * and the delays drawn are not all tiny. */
  int bounds_ok = 1, gaps_ok = 1, above_base = 0, reached_cap = 0;
  for (int i = 0; i < o.nfail; i++) {
    failure_t *f = &o.fail[i];
    uint64_t ceiling = c.backoff_base_ms;
    for (unsigned k = 1; k < f->n && ceiling < c.backoff_cap_ms; k++)
      ceiling *= 2;
    if (ceiling > c.backoff_cap_ms)
      ceiling = c.backoff_cap_ms;
    reached_cap |= ceiling == c.backoff_cap_ms;
    above_base |= f->delay_ms > c.backoff_base_ms;
    if (f->n == 0 || f->delay_ms > ceiling) {
      bounds_ok = 0;
      fprintf(stderr, "failure %d: n=%u delay=%llu ceiling=%llu\n", i, f->n,
              (unsigned long long)f->delay_ms, (unsigned long long)ceiling);
    }
    if (i + 1 < o.nfail && o.fail[i + 1].n == f->n + 1 && o.fail[i + 1].status == UV_ECONNREFUSED) {
      uint64_t gap = o.fail[i + 1].at_ms - f->at_ms;
      if (gap < f->delay_ms || gap > f->delay_ms + 250) {
        gaps_ok = 0;
        fprintf(stderr, "failure %d: delay=%llu but the next attempt failed after %llu ms\n", i,
                (unsigned long long)f->delay_ms, (unsigned long long)gap);
      }
    }
  }
  CHECK(bounds_ok);
  CHECK(gaps_ok);
  CHECK(reached_cap);
  CHECK(above_base);
  /* Every acknowledged message reached one of the two peers, the last
   * ones the restarted one (a may have answered a few more while dying). */
  char last[32];
  snprintf(last, sizeof last, "RS-%04d", o.target - 1);
  CHECK(WAIT_UNTIL(b->nids > 0 && strcmp(b->ids[b->nids - 1], last) == 0, 10000));
  int all_delivered = 1;
  for (int i = 0; i < o.target; i++) {
    char want[32];
    snprintf(want, sizeof want, "RS-%04d", i);
    all_delivered &= peer_has(a, want) || peer_has(b, want);
  }
  CHECK(all_delivered);
  rr_mllp_sender_stats_t st = stats(o.s);
  CHECK_EQ_INT(st.consecutive_failures, 0);
  CHECK(st.connects >= 2);
  close_sender(o.s);
  peer_free(a);
  peer_free(b);
}

/* A TCP socket bound to a port but not listening: connections are refused. */
static void test_connection_refused(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t al = sizeof a;
  CHECK(bind(fd, (struct sockaddr *)&a, sizeof a) == 0);
  getsockname(fd, (struct sockaddr *)&a, &al);
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = ntohs(a.sin_port);
  c.connect_timeout_ms = 3000;
  rr_mllp_sender_t *s = new_sender(&c);
  sent_t m;
  one(s, &m, "REFUSED-1");
  CHECK_EQ_INT(m.status, UV_ECONNREFUSED);
  CHECK_EQ_INT(m.written, 0);
  CHECK(m.elapsed_ms < 1000);
  rr_mllp_sender_stats_t st = stats(s);
  CHECK_EQ_INT(st.connect_failures, 1);
  CHECK_EQ_INT(st.consecutive_failures, 1);
  CHECK(st.backoff_ms <= 250);
  close_sender(s);
  close(fd);
}

/* A listener whose accept queue is full never completes a handshake: the
 * connect timeout ends the attempt. */
static void test_connect_timeout(void) {
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t al = sizeof a;
  CHECK(bind(lfd, (struct sockaddr *)&a, sizeof a) == 0);
  CHECK(listen(lfd, 0) == 0);
  getsockname(lfd, (struct sockaddr *)&a, &al);
  int fill[3];
  for (int i = 0; i < 3; i++) {
    fill[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    connect(fill[i], (struct sockaddr *)&a, sizeof a);
  }
  /* The first filler is established (in the accept queue) once writable. */
  struct pollfd pf = {fill[0], POLLOUT, 0};
  CHECK(poll(&pf, 1, 5000) == 1);
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = ntohs(a.sin_port);
  c.connect_timeout_ms = 300;
  rr_mllp_sender_t *s = new_sender(&c);
  sent_t m;
  one(s, &m, "NOACCEPT-1");
  CHECK_EQ_INT(m.status, RR_MLLP_ECONNTIMEDOUT);
  CHECK_EQ_INT(m.written, 0);
  CHECK(m.elapsed_ms >= 290 && m.elapsed_ms < 2000);
  CHECK_EQ_INT(stats(s).connect_failures, 1);
  close_sender(s);
  for (int i = 0; i < 3; i++)
    close(fill[i]);
  close(lfd);
}

static int close_seen_at; /* completions when closed_cb ran */
static void on_closed_order(void *ud) {
  (void)ud;
  close_seen_at = completions;
  closed_flag++;
}

/* close(): the message in flight and the queued ones are cancelled, in
 * order, after close returns; then the closed callback; send is refused. */
static void test_close_cancels(void) {
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = peer->port;
  rr_mllp_sender_t *s = new_sender(&c);
  sent_t m[4];
  CHECK_EQ_INT(send_msg(s, &m[0], "SILENT-CLOSE"), 0);
  CHECK_EQ_INT(send_msg(s, &m[1], "Q-1"), 0);
  CHECK_EQ_INT(send_msg(s, &m[2], "Q-2"), 0);
  CHECK_EQ_INT(send_msg(s, &m[3], "Q-3"), 0);
  CHECK(WAIT_UNTIL(stats(s).sends == 1, 5000));
  int base = completions;
  closed_flag = 0;
  in_api = 1;
  rr_mllp_sender_close(s, on_closed_order, NULL);
  in_api = 0;
  CHECK_EQ_INT(completions, base); /* nothing called back inside close */
  sent_t late;
  CHECK_EQ_INT(send_msg(s, &late, "AFTER-CLOSE"), UV_ECANCELED);
  CHECK(WAIT_UNTIL(closed_flag == 1, 5000));
  for (int i = 0; i < 4; i++) {
    CHECK_EQ_INT(m[i].done, 1);
    CHECK_EQ_INT(m[i].status, UV_ECANCELED);
    CHECK_EQ_INT(m[i].order, base + i);
    CHECK_EQ_INT(m[i].written, i == 0);
  }
  CHECK_EQ_INT(close_seen_at, base + 4);
  CHECK_EQ_INT(late.done, 0);
}

/* Limits and arguments: max_queue, max_queue_bytes, control ids. */
static void test_limits(void) {
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = peer->port;
  c.max_queue = 2;
  rr_mllp_sender_t *s = new_sender(&c);
  sent_t m[4];
  CHECK_EQ_INT(send_msg(s, &m[0], "LIM-0"), 0);
  CHECK_EQ_INT(send_msg(s, &m[1], "LIM-1"), 0);
  CHECK_EQ_INT(send_msg(s, &m[2], "LIM-2"), 0);
  CHECK_EQ_INT(send_msg(s, &m[3], "LIM-3"), RR_ELIMIT); /* one in flight + 2 */
  CHECK(WAIT_UNTIL(m[2].done, 10000));
  CHECK(m[0].status == 0 && m[1].status == 0 && m[2].status == 0);
  CHECK_EQ_INT(m[3].done, 0);

  /* control_id NULL: MSH-10 is read from the payload. */
  char buf[1024];
  size_t n = make_msg(buf, sizeof buf, "FROM-MSH10");
  sent_t k;
  memset(&k, 0, sizeof k);
  in_api = 1;
  CHECK_EQ_INT(rr_mllp_sender_send(s, buf, n, NULL, on_result, &k), 0);
  CHECK_EQ_INT(rr_mllp_sender_send(s, buf, n, "", on_result, &k), RR_EINVAL);
  CHECK_EQ_INT(rr_mllp_sender_send(s, "PID|1\r", 6, NULL, on_result, &k), RR_EPARSE);
  CHECK_EQ_INT(rr_mllp_sender_send(s, buf, 0, "X", on_result, &k), RR_EINVAL);
  CHECK_EQ_INT(rr_mllp_sender_send(s, "MSH|^~\\&|\x1c\r", 11, "X", on_result, &k), RR_EINVAL);
  in_api = 0;
  CHECK(WAIT_UNTIL(k.done, 10000));
  CHECK_EQ_INT(k.status, 0);
  CHECK(strcmp(k.control_id, "FROM-MSH10") == 0);
  close_sender(s);

  c.max_queue_bytes = n + n / 2; /* room for one message */
  s = new_sender(&c);
  CHECK_EQ_INT(send_msg(s, &m[0], "B-0"), 0);
  CHECK_EQ_INT(send_msg(s, &m[1], "B-1"), RR_ELIMIT);
  CHECK(WAIT_UNTIL(m[0].done, 10000));
  CHECK_EQ_INT(send_msg(s, &m[1], "B-1"), 0); /* room again once called back */
  CHECK(WAIT_UNTIL(m[1].done, 10000));
  CHECK_EQ_INT(m[1].status, 0);
  close_sender(s);

  rr_mllp_sender_config_t bad = c;
  bad.host = NULL;
  rr_mllp_sender_t *none = NULL;
  CHECK_EQ_INT(rr_mllp_sender_new(&loop, &bad, &none), RR_EINVAL);
  bad.host = "127.0.0.1";
  bad.port = 70000;
  CHECK_EQ_INT(rr_mllp_sender_new(&loop, &bad, &none), RR_EINVAL);
  bad.port = 2575;
  bad.ack_timeout_ms = 0;
  CHECK_EQ_INT(rr_mllp_sender_new(&loop, &bad, &none), RR_EINVAL);
  CHECK(none == NULL);
  CHECK(strcmp(rr_mllp_sender_strerror(RR_MLLP_EACKTIMEDOUT), "no ACK within the ACK timeout") ==
        0);
  CHECK(strcmp(rr_mllp_sender_strerror(UV_EOF), "end of file") == 0);
}

/* A name that does not resolve: a resolver error, not a hang. */
static void test_unresolvable(void) {
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "no-such-host.invalid";
  c.port = 2575;
  c.connect_timeout_ms = 5000;
  rr_mllp_sender_t *s = new_sender(&c);
  sent_t m;
  one(s, &m, "NONAME-1");
  CHECK(m.status < 0);
  CHECK_EQ_INT(m.written, 0);
  close_sender(s);
}

/* A filter transport in the shape the TLS layer will take: it wraps the
 * TCP transport, passes bytes through and counts them. */
typedef struct filter {
  rr_mllp_transport_t base;
  rr_mllp_transport_t *inner;
} filter_t;

static size_t filter_out, filter_in;
static int filter_created, filter_freed;

static void f_on_connect(void *ud, rr_mllp_transport_t *t, int status) {
  filter_t *f = ud;
  (void)t;
  f->base.ev->on_connect(f->base.ud, &f->base, status);
}
static void f_on_write(void *ud, rr_mllp_transport_t *t, int status) {
  filter_t *f = ud;
  (void)t;
  f->base.ev->on_write(f->base.ud, &f->base, status);
}
static void f_on_read(void *ud, rr_mllp_transport_t *t, const char *data, ssize_t n) {
  filter_t *f = ud;
  (void)t;
  if (n > 0)
    filter_in += (size_t)n;
  f->base.ev->on_read(f->base.ud, &f->base, data, n);
}
static void f_on_close(void *ud, rr_mllp_transport_t *t) {
  filter_t *f = ud;
  (void)t;
  f->base.ev->on_close(f->base.ud, &f->base);
  filter_freed++;
  free(f);
}
static const rr_mllp_transport_events_t filter_inner_ev = {f_on_connect, f_on_write, f_on_read,
                                                           f_on_close};

static int f_connect(rr_mllp_transport_t *t, const struct sockaddr *addr) {
  filter_t *f = (filter_t *)t;
  return f->inner->ops->connect(f->inner, addr);
}
static int f_write(rr_mllp_transport_t *t, rr_buf_t *data) {
  filter_t *f = (filter_t *)t;
  filter_out += data->len;
  return f->inner->ops->write(f->inner, data);
}
static int f_read_start(rr_mllp_transport_t *t) {
  filter_t *f = (filter_t *)t;
  return f->inner->ops->read_start(f->inner);
}
static void f_close(rr_mllp_transport_t *t) {
  filter_t *f = (filter_t *)t;
  f->inner->ops->close(f->inner);
}
static const rr_mllp_transport_ops_t filter_ops = {"filter", f_connect, f_write, f_read_start,
                                                   f_close};

static int filter_new(void *arg, uv_loop_t *l, const rr_mllp_transport_events_t *ev, void *ud,
                      rr_mllp_transport_t **out) {
  const int *fail = arg;
  if (*fail)
    return *fail;
  filter_t *f = calloc(1, sizeof *f);
  if (!f)
    return RR_ENOMEM;
  f->base.ops = &filter_ops;
  f->base.ev = ev;
  f->base.ud = ud;
  int rc = rr_mllp_transport_tcp_new(NULL, l, &filter_inner_ev, f, &f->inner);
  if (rc) {
    free(f);
    return rc;
  }
  filter_created++;
  *out = &f->base;
  return 0;
}

/* The transport seam: every byte goes through the configured transport; a
 * transport that cannot be created fails that message, from the loop. */
static void test_transport_seam(void) {
  int fail = 0;
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = peer->port;
  c.keep_alive = 0;
  c.transport_new = filter_new;
  c.transport_arg = &fail;
  rr_mllp_sender_t *s = new_sender(&c);
  sent_t m[3];
  size_t want_out = 0;
  for (int i = 0; i < 3; i++) {
    char id[32], buf[1024];
    snprintf(id, sizeof id, "SEAM-%d", i);
    want_out += make_msg(buf, sizeof buf, id) + 3;
    CHECK_EQ_INT(send_msg(s, &m[i], id), 0);
  }
  CHECK(WAIT_UNTIL(m[2].done, 10000));
  for (int i = 0; i < 3; i++)
    CHECK_EQ_INT(m[i].status, 0);
  CHECK_EQ_INT(filter_out, want_out);
  CHECK(filter_in > 0);
  CHECK_EQ_INT(filter_created, 3);

  fail = RR_ENOMEM;
  sent_t f;
  CHECK_EQ_INT(send_msg(s, &f, "SEAM-FAIL"), 0);
  CHECK_EQ_INT(f.done, 0); /* not from inside send */
  CHECK(WAIT_UNTIL(f.done, 5000));
  CHECK_EQ_INT(f.status, RR_ENOMEM);
  CHECK_EQ_INT(f.written, 0);
  fail = 0;
  follow_up(s, "SEAM");
  close_sender(s);
  CHECK_EQ_INT(filter_created, 4);
  CHECK_EQ_INT(filter_freed, 4);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s NODE PEER_SCRIPT\n", argv[0]);
    return 2;
  }
  node_path = argv[1];
  peer_script = argv[2];
  signal(SIGPIPE, SIG_IGN);
  const char *v = getenv("RR_TEST_VERBOSE");
  rr_log_set_level(v && v[0] == '1' ? RR_LOG_DEBUG : RR_LOG_ERROR);
  uv_loop_init(&loop);
  uv_timer_init(&loop, &deadline_timer);
  peer = peer_start(0);

  RUN(test_keepalive_200);
  RUN(test_connect_per_message);
  RUN(test_bad_answers);
  RUN(test_close_cancels);
  RUN(test_limits);
  RUN(test_transport_seam);
  RUN(test_connection_refused);
  RUN(test_connect_timeout);
  RUN(test_unresolvable);
  RUN(test_peer_restart);

  CHECK_EQ_INT(sync_callbacks, 0);
  peer_free(peer);
  uv_close((uv_handle_t *)&deadline_timer, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  int rc = uv_loop_close(&loop);
  CHECK_EQ_INT(rc, 0);
  return TEST_SUMMARY();
}

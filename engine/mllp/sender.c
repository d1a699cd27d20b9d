/* MLLP sender: libuv glue around the pure framer/deframer (mllp.h) and the
 * HL7 codec (ACK check), over a pluggable transport (plain TCP here).
 *
 * One state machine per sender, driven from the loop only:
 *
 *   IDLE --pump--> [BACKOFF --timer-->] CONNECTING --on_connect--> AWAIT_ACK
 *     ^                                     |                          |
 *     +---- complete(): the head's callback, from a loop callback -----+
 *
 * Every path that ends a message goes through complete(), which pops the
 * head, updates the counters and the back-off, calls the user back and
 * schedules pump() on the kick timer, so that the next message starts from
 * the loop, never from inside a user callback or an rr_mllp_* call. */
#include "mllp/sender.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "hl7/hl7.h"

#define MAX_CONTROL_ID 199 /* MSH-10 is an ST of at most 199 characters (v2.7) */

typedef struct job {
  struct job *next;
  rr_buf_t frame; /* framed payload; handed to the transport by the write */
  size_t len;     /* payload bytes, for the queue limit */
  rr_mllp_send_cb cb;
  void *ud;
  uint64_t queued_ns;  /* uv_hrtime() at send */
  uint64_t written_ns; /* at the write; 0 before */
  int written;
  size_t control_id_len;
  char control_id[MAX_CONTROL_ID + 1];
} job_t;

typedef enum phase {
  PH_IDLE,       /* nothing in flight (a head may wait for the kick) */
  PH_BACKOFF,    /* the head waits for the reconnect delay */
  PH_CONNECTING, /* the head waits for a connection */
  PH_AWAIT_ACK   /* the head is written and waits for its reply */
} phase_t;

/* Heap-allocated so that a resolve can be abandoned (timeout, close)
 * without the sender waiting for the resolver thread. */
typedef struct resolve_req {
  uv_getaddrinfo_t req;
  rr_mllp_sender_t *s; /* NULL once abandoned */
} resolve_req_t;

struct rr_mllp_sender {
  uv_loop_t *loop;
  rr_mllp_sender_config_t cfg;
  char name[64];
  char *host;       /* owned copy of cfg.host */
  uv_timer_t timer; /* the phase's deadline: back-off, connect or ACK */
  uv_timer_t kick;  /* runs pump() from the loop */
  int handles;      /* of timer and kick, not yet closed */
  rr_mllp_transport_events_t ev;
  job_t *head, *tail;
  unsigned nqueued;
  size_t queued_bytes;
  phase_t phase;
  rr_mllp_transport_t *conn; /* the current connection, connecting or open */
  int conn_open;
  uint64_t conn_seq;   /* connection number, for logs */
  unsigned transports; /* created and not yet reported closed */
  resolve_req_t *resolving;
  struct addrinfo *addrs; /* resolver answer, while connecting */
  struct addrinfo *next_addr;
  struct sockaddr_storage literal;
  int host_is_literal;
  int literal_tried;
  int last_connect_error;
  rr_mllp_deframer_t df; /* reset for every connection */
  rr_hl7_msg_t *msg;     /* parses replies (and MSH-10 in send) */
  uint64_t rng;
  uint64_t next_connect_at; /* uv_now() ms; the back-off */
  rr_mllp_sender_stats_t st;
  int closing;
  int handles_closing;
  rr_mllp_sender_closed_cb closed_cb;
  void *closed_ud;
};

static void pump(rr_mllp_sender_t *s);
static void connect_next(rr_mllp_sender_t *s);
static void on_timer(uv_timer_t *t);

/* ---- plain TCP transport ------------------------------------------------- */

typedef struct tcp_transport {
  rr_mllp_transport_t base;
  uv_tcp_t tcp;
  uv_connect_t creq;
  int closing;
} tcp_transport_t;

typedef struct tcp_write {
  uv_write_t req;
  tcp_transport_t *t;
  char *data;
} tcp_write_t;

static void tcp_on_connect(uv_connect_t *req, int status) {
  tcp_transport_t *t = req->data;
  if (t->closing)
    return;
  if (status == 0) {
    uv_tcp_nodelay(&t->tcp, 1);
    /* Kept-alive connections sit idle between messages: let the kernel
     * notice a peer that vanished without a FIN. */
    uv_tcp_keepalive(&t->tcp, 1, 60);
  }
  t->base.ev->on_connect(t->base.ud, &t->base, status);
}

static int tcp_connect(rr_mllp_transport_t *bt, const struct sockaddr *addr) {
  tcp_transport_t *t = (tcp_transport_t *)bt;
  t->creq.data = t;
  return uv_tcp_connect(&t->creq, &t->tcp, addr, tcp_on_connect);
}

/* libuv runs write callbacks (UV_ECANCELED on close) before the close
 * callback, so t is alive here. */
static void tcp_on_write(uv_write_t *req, int status) {
  tcp_write_t *w = (tcp_write_t *)req;
  tcp_transport_t *t = w->t;
  free(w->data);
  free(w);
  if (!t->closing)
    t->base.ev->on_write(t->base.ud, &t->base, status);
}

static int tcp_write(rr_mllp_transport_t *bt, rr_buf_t *data) {
  tcp_transport_t *t = (tcp_transport_t *)bt;
  size_t len = 0;
  char *p = rr_buf_steal(data, &len);
  tcp_write_t *w = NULL;
  int rc = 0;
  if (t->closing) {
    rc = UV_ECANCELED;
    goto out;
  }
  if (!p || len == 0 || len > UINT32_MAX) {
    rc = RR_EINVAL;
    goto out;
  }
  w = calloc(1, sizeof *w);
  if (!w) {
    rc = RR_ENOMEM;
    goto out;
  }
  w->t = t;
  w->data = p;
  uv_buf_t b = uv_buf_init(p, (unsigned)len);
  rc = uv_write(&w->req, (uv_stream_t *)&t->tcp, &b, 1, tcp_on_write);
  if (rc == 0) {
    p = NULL; /* the write request owns it now */
    w = NULL;
  }
out:
  free(p);
  free(w);
  return rc;
}

static void tcp_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  /* One read buffer per loop thread: the deframer copies what it keeps. */
  static _Thread_local char chunk[65536];
  buf->base = chunk;
  buf->len = sizeof chunk;
}

static void tcp_on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  tcp_transport_t *t = st->data;
  if (n == 0 || t->closing)
    return;
  if (n < 0)
    uv_read_stop(st);
  t->base.ev->on_read(t->base.ud, &t->base, buf->base, n);
}

static int tcp_read_start(rr_mllp_transport_t *bt) {
  tcp_transport_t *t = (tcp_transport_t *)bt;
  return uv_read_start((uv_stream_t *)&t->tcp, tcp_alloc, tcp_on_read);
}

static void tcp_on_closed(uv_handle_t *h) {
  tcp_transport_t *t = h->data;
  t->base.ev->on_close(t->base.ud, &t->base);
  free(t);
}

static void tcp_close(rr_mllp_transport_t *bt) {
  tcp_transport_t *t = (tcp_transport_t *)bt;
  if (t->closing)
    return;
  t->closing = 1;
  uv_close((uv_handle_t *)&t->tcp, tcp_on_closed);
}

static const rr_mllp_transport_ops_t tcp_ops = {"tcp", tcp_connect, tcp_write, tcp_read_start,
                                                tcp_close};

int rr_mllp_transport_tcp_new(void *arg, uv_loop_t *loop, const rr_mllp_transport_events_t *ev,
                              void *ud, rr_mllp_transport_t **out) {
  (void)arg;
  tcp_transport_t *t = calloc(1, sizeof *t);
  if (!t)
    return RR_ENOMEM;
  int rc = uv_tcp_init(loop, &t->tcp);
  if (rc) {
    free(t);
    return rc;
  }
  t->tcp.data = t;
  t->base.ops = &tcp_ops;
  t->base.ev = ev;
  t->base.ud = ud;
  *out = &t->base;
  return 0;
}

/* ---- helpers ------------------------------------------------------------- */

const char *rr_mllp_sender_strerror(int code) {
  switch (code) {
  case RR_MLLP_ECONNTIMEDOUT: return "connect timed out";
  case RR_MLLP_EACKTIMEDOUT: return "no ACK within the ACK timeout";
  case RR_MLLP_ECONNLOST: return "connection lost before the ACK";
  case RR_MLLP_EACKMISMATCH: return "ACK for another message (MSA-2 mismatch)";
  case RR_MLLP_EBADACK: return "malformed ACK";
  default: break;
  }
  /* uv_strerror leaks for codes it does not know: only ask it about its own
   * (end of file, resolver errors); errno values go to rr_strerror. */
  if (code == UV_EOF || (code <= UV_EAI_ADDRFAMILY && code >= UV_EAI_PROTOCOL))
    return uv_strerror(code);
  return rr_strerror(code);
}

static const char *code_name(int code) {
  switch (code) {
  case RR_MLLP_ECONNTIMEDOUT: return "connect_timeout";
  case RR_MLLP_EACKTIMEDOUT: return "ack_timeout";
  case RR_MLLP_ECONNLOST: return "connection_lost";
  case RR_MLLP_EACKMISMATCH: return "ack_mismatch";
  case RR_MLLP_EBADACK: return "bad_ack";
  case RR_ELIMIT: return "reply_too_large";
  case RR_ENOMEM: return "out_of_memory";
  case UV_EOF: return "EOF";
  default: break;
  }
  if (code < 0 && code > -4096)
    return uv_err_name(code); /* every libuv code is in its table */
  return "error";
}

/* xorshift64*: the jitter needs spread, not secrecy. */
static uint64_t next_random(rr_mllp_sender_t *s) {
  uint64_t x = s->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  s->rng = x;
  return x * 0x2545F4914F6CDD1DULL;
}

/* A failure: the next connect waits a delay drawn from
 * [0, min(cap, base * 2^(n-1))], n = consecutive failures (full jitter). */
static void note_failure(rr_mllp_sender_t *s) {
  uint64_t cap = s->cfg.backoff_cap_ms, ceiling = s->cfg.backoff_base_ms;
  unsigned n = ++s->st.consecutive_failures;
  for (unsigned i = 1; i < n && ceiling < cap; i++)
    ceiling = ceiling > cap / 2 ? cap : ceiling * 2;
  if (ceiling > cap)
    ceiling = cap;
  uint64_t delay = ceiling ? next_random(s) % (ceiling + 1) : 0;
  s->st.backoff_ms = delay;
  s->next_connect_at = uv_now(s->loop) + delay;
}

static void on_kick(uv_timer_t *t) {
  pump(t->data);
}

static void kick(rr_mllp_sender_t *s) {
  if (!s->handles_closing)
    uv_timer_start(&s->kick, on_kick, 0, 0);
}

static void free_addrs(rr_mllp_sender_t *s) {
  if (s->addrs)
    uv_freeaddrinfo(s->addrs);
  s->addrs = s->next_addr = NULL;
}

/* Closes the current connection. Its transport reports no more events but
 * on_close, so nothing it does can reach the next message. */
static void conn_drop(rr_mllp_sender_t *s, const char *reason) {
  rr_mllp_transport_t *t = s->conn;
  if (!t)
    return;
  s->conn = NULL;
  if (s->conn_open)
    rr_log(RR_LOG_INFO, "mllp", "event=disconnect destination=%s conn=%llu reason=%s", s->name,
           (unsigned long long)s->conn_seq, reason);
  s->conn_open = 0;
  t->ops->close(t);
}

/* Ends the head message: counters, back-off, the user's callback, and the
 * next message from the loop. The caller has dropped the connection if the
 * outcome requires it. ack/ack_len: the reply, borrowed for the call. */
static void complete(rr_mllp_sender_t *s, int status, int cause, const char *ack, size_t ack_len,
                     const char *code) {
  job_t *j = s->head;
  s->head = j->next;
  if (!s->head)
    s->tail = NULL;
  s->nqueued--;
  s->queued_bytes -= j->len;
  s->phase = PH_IDLE;
  uv_timer_stop(&s->timer);
  uint64_t now_ns = uv_hrtime();
  rr_mllp_send_result_t r;
  memset(&r, 0, sizeof r);
  r.status = status;
  r.cause = cause;
  if (code && code[0])
    memcpy(r.ack_code, code, 3);
  r.ack = ack;
  r.ack_len = ack ? ack_len : 0;
  r.control_id = j->control_id;
  r.written = j->written;
  r.elapsed_ms = (now_ns - j->queued_ns) / 1000000u;
  r.ack_ms = ack && j->written_ns ? (now_ns - j->written_ns) / 1000000u : 0;
  if (status == 0) {
    s->st.acks++;
    if (strcmp(r.ack_code, "AA") != 0 && strcmp(r.ack_code, "CA") != 0)
      s->st.acks_negative++;
    s->st.consecutive_failures = 0;
    s->st.backoff_ms = 0;
    s->next_connect_at = 0;
  } else if (status == UV_ECANCELED) {
    s->st.canceled++;
  } else {
    s->st.errors++;
    if (status != RR_ENOMEM)
      note_failure(s);
    rr_log(RR_LOG_WARN, "mllp",
           "event=send_failed destination=%s control_id=%s error=%s cause=%s written=%d "
           "elapsed_ms=%llu backoff_ms=%llu",
           s->name, j->control_id, code_name(status), cause ? code_name(cause) : "-", j->written,
           (unsigned long long)r.elapsed_ms, (unsigned long long)s->st.backoff_ms);
  }
  j->cb(j->ud, &r);
  rr_buf_close(&j->frame);
  free(j);
  kick(s);
}

/* ---- connecting ---------------------------------------------------------- */

static void connect_failed(rr_mllp_sender_t *s, int status, int cause) {
  free_addrs(s);
  s->st.connect_failures++;
  rr_log(RR_LOG_WARN, "mllp", "event=connect_failed destination=%s host=%s port=%d error=%s",
         s->name, s->host, s->cfg.port, code_name(status));
  complete(s, status, cause, NULL, 0, NULL);
}

/* Gives up on the connect in progress (timeout, close). */
static void connect_abandon(rr_mllp_sender_t *s, const char *reason) {
  if (s->resolving) {
    s->resolving->s = NULL;
    uv_cancel((uv_req_t *)&s->resolving->req);
    s->resolving = NULL;
  }
  conn_drop(s, reason);
  free_addrs(s);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  resolve_req_t *r = (resolve_req_t *)req;
  rr_mllp_sender_t *s = r->s;
  free(r);
  if (!s) {
    if (res)
      uv_freeaddrinfo(res);
    return;
  }
  s->resolving = NULL;
  if (status < 0) {
    connect_failed(s, status, status);
    return;
  }
  s->addrs = s->next_addr = res;
  connect_next(s);
}

static void write_head(rr_mllp_sender_t *s) {
  job_t *j = s->head;
  s->phase = PH_AWAIT_ACK;
  j->written = 1;
  j->written_ns = uv_hrtime();
  s->st.sends++;
  /* The ACK timeout covers the write too: a peer that stops reading must
   * not hold the message forever. */
  uv_timer_start(&s->timer, on_timer, s->cfg.ack_timeout_ms, 0);
  int rc = s->conn->ops->write(s->conn, &j->frame);
  if (rc) {
    conn_drop(s, code_name(rc));
    complete(s, RR_MLLP_ECONNLOST, rc, NULL, 0, NULL);
  }
}

static void on_connect(void *ud, rr_mllp_transport_t *t, int status) {
  rr_mllp_sender_t *s = ud;
  if (t != s->conn)
    return;
  if (status < 0) {
    s->last_connect_error = status;
    conn_drop(s, "connect_failed");
    connect_next(s);
    return;
  }
  free_addrs(s);
  s->conn_open = 1;
  s->st.connects++;
  /* Not inside a feed here: connects are reported from the loop. */
  rr_mllp_deframer_close(&s->df);
  rr_mllp_deframer_init(&s->df, &s->cfg.framing);
  rr_log(RR_LOG_INFO, "mllp", "event=connect destination=%s conn=%llu host=%s port=%d transport=%s",
         s->name, (unsigned long long)s->conn_seq, s->host, s->cfg.port, t->ops->name);
  int rc = t->ops->read_start(t);
  if (rc) {
    conn_drop(s, code_name(rc));
    connect_failed(s, rc, rc);
    return;
  }
  write_head(s);
}

/* Tries the next address (of the literal or of the resolver's answer),
 * until a connect starts or none is left. */
static void connect_next(rr_mllp_sender_t *s) {
  for (;;) {
    const struct sockaddr *addr = NULL;
    if (s->host_is_literal) {
      if (!s->literal_tried) {
        s->literal_tried = 1;
        addr = (const struct sockaddr *)&s->literal;
      }
    } else {
      while (!addr && s->next_addr) {
        struct addrinfo *ai = s->next_addr;
        s->next_addr = ai->ai_next;
        if (ai->ai_family == AF_INET || ai->ai_family == AF_INET6)
          addr = ai->ai_addr;
      }
    }
    if (!addr) {
      int rc = s->last_connect_error ? s->last_connect_error : UV_EAI_NONAME;
      connect_failed(s, rc, rc);
      return;
    }
    rr_mllp_transport_t *t = NULL;
    s->st.connect_attempts++;
    int rc = s->cfg.transport_new(s->cfg.transport_arg, s->loop, &s->ev, s, &t);
    if (rc) {
      connect_failed(s, rc, rc);
      return;
    }
    s->transports++;
    s->conn = t;
    s->conn_open = 0;
    s->conn_seq++;
    rc = t->ops->connect(t, addr);
    if (rc == 0)
      return;
    s->last_connect_error = rc;
    conn_drop(s, "connect_failed");
  }
}

static void connect_start(rr_mllp_sender_t *s) {
  s->phase = PH_CONNECTING;
  s->last_connect_error = 0;
  s->literal_tried = 0;
  uv_timer_start(&s->timer, on_timer, s->cfg.connect_timeout_ms, 0);
  if (s->host_is_literal) {
    connect_next(s);
    return;
  }
  resolve_req_t *r = calloc(1, sizeof *r);
  if (!r) {
    connect_failed(s, RR_ENOMEM, 0);
    return;
  }
  r->s = s;
  char port[8];
  snprintf(port, sizeof port, "%d", s->cfg.port);
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  int rc = uv_getaddrinfo(s->loop, &r->req, on_resolved, s->host, port, &hints);
  if (rc) {
    free(r);
    connect_failed(s, rc, rc);
    return;
  }
  s->resolving = r;
}

/* ---- replies ------------------------------------------------------------- */

static int is_ack_code(const char *p) {
  static const char *const codes[] = {"AA", "AE", "AR", "CA", "CE", "CR"};
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
    if (memcmp(p, codes[i], 2) == 0)
      return 1;
  return 0;
}

/* Checks a reply against the head message. code gets MSA-1 when valid. */
static int check_ack(rr_mllp_sender_t *s, const char *data, size_t len, char code[3],
                     const char **why) {
  const job_t *j = s->head;
  if (s->cfg.mllp_release == 2) {
    /* A commit block names no message: it answers the one in flight. */
    if (len == 1 && (data[0] == 0x06 || data[0] == 0x15)) {
      memcpy(code, data[0] == 0x06 ? "CA" : "CR", 3);
      return 0;
    }
    *why = "not_a_commit_block";
    return RR_MLLP_EBADACK;
  }
  rr_hl7_options_t o;
  rr_hl7_options_default(&o);
  o.borrow = true; /* the reply lives in the deframer for the whole check */
  rr_hl7_slice_t msa1, msa2;
  if (rr_hl7_parse(s->msg, data, len, &o, NULL) != 0) {
    *why = "reply_not_hl7";
    return RR_MLLP_EBADACK;
  }
  if (rr_hl7_get_raw_s(s->msg, "MSA-1", &msa1) != 0) {
    *why = "no_msa";
    return RR_MLLP_EBADACK;
  }
  if (msa1.len != 2 || !is_ack_code(msa1.p)) {
    *why = "bad_msa1";
    return RR_MLLP_EBADACK;
  }
  memcpy(code, msa1.p, 2);
  code[2] = '\0';
  if (rr_hl7_get_raw_s(s->msg, "MSA-2", &msa2) != 0 || msa2.len != j->control_id_len ||
      memcmp(msa2.p, j->control_id, msa2.len) != 0) {
    *why = "msa2_mismatch";
    return RR_MLLP_EACKMISMATCH;
  }
  return 0;
}

static int on_frame_event(void *ud, rr_mllp_event_t ev, const char *data, size_t len,
                          uint64_t offset) {
  rr_mllp_sender_t *s = ud;
  if (ev == RR_MLLP_JUNK) {
    rr_log(RR_LOG_WARN, "mllp",
           "event=junk destination=%s conn=%llu offset=%llu bytes=%zu detail=\"bytes outside a "
           "frame discarded\"",
           s->name, (unsigned long long)s->conn_seq, (unsigned long long)offset, len);
    return 0;
  }
  if (ev != RR_MLLP_FRAME)
    return 0; /* RR_MLLP_OVERSIZE: feed returns RR_ELIMIT, handled in on_read */
  if (s->phase != PH_AWAIT_ACK) {
    /* Nothing awaits a reply: a second ACK, or an ACK for something else.
     * Taking it for the next message's would be wrong; drop the connection. */
    s->st.unsolicited++;
    s->st.errors++;
    rr_log(RR_LOG_WARN, "mllp", "event=unsolicited_frame destination=%s conn=%llu bytes=%zu",
           s->name, (unsigned long long)s->conn_seq, len);
    conn_drop(s, "unsolicited_frame");
    return 1;
  }
  char code[3] = "";
  const char *why = NULL;
  int status = check_ack(s, data, len, code, &why);
  if (status) {
    rr_log(RR_LOG_WARN, "mllp",
           "event=bad_reply destination=%s conn=%llu control_id=%s reason=%s bytes=%zu", s->name,
           (unsigned long long)s->conn_seq, s->head->control_id, why, len);
    conn_drop(s, why);
  } else if (!s->cfg.keep_alive) {
    conn_drop(s, "done");
  }
  complete(s, status, 0, data, len, code);
  return s->conn ? 0 : 1; /* stop feeding a dropped connection */
}

static void on_write(void *ud, rr_mllp_transport_t *t, int status) {
  rr_mllp_sender_t *s = ud;
  if (t != s->conn || status >= 0)
    return;
  conn_drop(s, code_name(status));
  if (s->phase == PH_AWAIT_ACK)
    complete(s, RR_MLLP_ECONNLOST, status, NULL, 0, NULL);
}

static void on_read(void *ud, rr_mllp_transport_t *t, const char *data, ssize_t n) {
  rr_mllp_sender_t *s = ud;
  if (t != s->conn)
    return;
  if (n < 0) {
    /* A peer closing an idle keep-alive connection is normal. */
    conn_drop(s, code_name((int)n));
    if (s->phase == PH_AWAIT_ACK)
      complete(s, RR_MLLP_ECONNLOST, (int)n, NULL, 0, NULL);
    return;
  }
  int rc = rr_mllp_deframer_feed(&s->df, data, (size_t)n, on_frame_event, s);
  if (rc >= 0 || s->conn != t)
    return;
  /* RR_ELIMIT (a reply over max_frame) or RR_ENOMEM: the stream is lost. */
  rr_log(RR_LOG_WARN, "mllp", "event=reply_error destination=%s conn=%llu error=%s limit=%zu",
         s->name, (unsigned long long)s->conn_seq, code_name(rc), s->cfg.framing.max_frame);
  conn_drop(s, code_name(rc));
  if (s->phase == PH_AWAIT_ACK)
    complete(s, rc, 0, NULL, 0, NULL);
  else
    s->st.errors++;
}

/* ---- timers, pump, close ------------------------------------------------- */

static void on_timer(uv_timer_t *t) {
  rr_mllp_sender_t *s = t->data;
  switch (s->phase) {
  case PH_BACKOFF: connect_start(s); break;
  case PH_CONNECTING:
    connect_abandon(s, "connect_timeout");
    connect_failed(s, RR_MLLP_ECONNTIMEDOUT, 0);
    break;
  case PH_AWAIT_ACK:
    /* Closing is what makes a late ACK harmless: it can no longer arrive. */
    conn_drop(s, "ack_timeout");
    complete(s, RR_MLLP_EACKTIMEDOUT, 0, NULL, 0, NULL);
    break;
  case PH_IDLE: break;
  }
}

static void free_sender(rr_mllp_sender_t *s) {
  free_addrs(s);
  rr_mllp_deframer_close(&s->df);
  rr_hl7_msg_free(s->msg);
  free(s->host);
  free(s);
}

/* The safe point: nothing of s is left in the loop. */
static void maybe_free(rr_mllp_sender_t *s) {
  if (!s->handles_closing || s->handles > 0 || s->transports > 0)
    return;
  rr_mllp_sender_closed_cb cb = s->closed_cb;
  void *ud = s->closed_ud;
  rr_log(RR_LOG_INFO, "mllp", "event=sender_closed destination=%s", s->name);
  free_sender(s);
  if (cb)
    cb(ud);
}

static void on_transport_close(void *ud, rr_mllp_transport_t *t) {
  rr_mllp_sender_t *s = ud;
  (void)t;
  s->transports--;
  maybe_free(s);
}

static void on_handle_closed(uv_handle_t *h) {
  rr_mllp_sender_t *s = h->data;
  s->handles--;
  maybe_free(s);
}

/* Runs from the kick timer only, so never inside a user callback or an
 * rr_mllp_* call. */
static void pump(rr_mllp_sender_t *s) {
  if (s->closing) {
    /* Cancel in order: the one in flight (it is the head), then the queue. */
    while (s->head)
      complete(s, UV_ECANCELED, 0, NULL, 0, NULL);
    if (!s->handles_closing) {
      s->handles_closing = 1;
      uv_close((uv_handle_t *)&s->timer, on_handle_closed);
      uv_close((uv_handle_t *)&s->kick, on_handle_closed);
    }
    return;
  }
  if (s->phase != PH_IDLE || !s->head)
    return;
  if (s->conn && s->conn_open) {
    write_head(s);
    return;
  }
  uint64_t now = uv_now(s->loop);
  if (s->next_connect_at > now) {
    s->phase = PH_BACKOFF;
    uv_timer_start(&s->timer, on_timer, s->next_connect_at - now, 0);
    return;
  }
  connect_start(s);
}

void rr_mllp_sender_close(rr_mllp_sender_t *s, rr_mllp_sender_closed_cb closed_cb, void *ud) {
  if (!s || s->closing)
    return;
  s->closing = 1;
  s->closed_cb = closed_cb;
  s->closed_ud = ud;
  uv_timer_stop(&s->timer);
  connect_abandon(s, "sender_closed");
  kick(s);
}

/* ---- public -------------------------------------------------------------- */

void rr_mllp_sender_config_default(rr_mllp_sender_config_t *c) {
  memset(c, 0, sizeof *c);
  c->name = "mllp";
  c->connect_timeout_ms = 5000;
  c->ack_timeout_ms = 10000;
  c->keep_alive = 1;
  c->mllp_release = 1;
  c->backoff_base_ms = 250;
  c->backoff_cap_ms = 30000;
  c->max_queue = 1000;
  c->max_queue_bytes = (size_t)64 << 20;
  rr_mllp_options_default(&c->framing);
  c->framing.max_frame = (size_t)1 << 20;
}

int rr_mllp_sender_new(uv_loop_t *loop, const rr_mllp_sender_config_t *cfg,
                       rr_mllp_sender_t **out) {
  rr_mllp_sender_t *s = NULL;
  int rc = 0;
  if (!loop || !cfg || !out || !cfg->host || !cfg->host[0] || cfg->port <= 0 || cfg->port > 65535 ||
      cfg->framing.max_frame == 0 || cfg->connect_timeout_ms == 0 || cfg->ack_timeout_ms == 0) {
    rc = RR_EINVAL;
    goto out;
  }
  s = calloc(1, sizeof *s);
  if (!s) {
    rc = RR_ENOMEM;
    goto out;
  }
  s->loop = loop;
  s->cfg = *cfg;
  snprintf(s->name, sizeof s->name, "%s", cfg->name ? cfg->name : "mllp");
  s->cfg.name = s->name;
  if (!s->cfg.transport_new)
    s->cfg.transport_new = rr_mllp_transport_tcp_new;
  s->host = strdup(cfg->host);
  s->msg = rr_hl7_msg_new();
  if (!s->host || !s->msg) {
    rc = RR_ENOMEM;
    goto out;
  }
  s->cfg.host = s->host;
  if (uv_ip4_addr(s->host, cfg->port, (struct sockaddr_in *)&s->literal) == 0 ||
      uv_ip6_addr(s->host, cfg->port, (struct sockaddr_in6 *)&s->literal) == 0)
    s->host_is_literal = 1;
  rr_mllp_deframer_init(&s->df, &s->cfg.framing);
  s->ev.on_connect = on_connect;
  s->ev.on_write = on_write;
  s->ev.on_read = on_read;
  s->ev.on_close = on_transport_close;
  s->rng = uv_hrtime() ^ (uint64_t)(uintptr_t)s;
  if (s->rng == 0)
    s->rng = 0x9E3779B97F4A7C15ULL;
  /* Timer init cannot fail on a live loop; from here on s is freed only
   * through its close callbacks. */
  uv_timer_init(loop, &s->timer);
  uv_timer_init(loop, &s->kick);
  s->timer.data = s;
  s->kick.data = s;
  s->handles = 2;
  *out = s;
  s = NULL;
out:
  if (s)
    free_sender(s);
  return rc;
}

/* Reads MSH-10 of payload into j. */
static int control_id_from_payload(rr_mllp_sender_t *s, const char *payload, size_t len, job_t *j) {
  rr_hl7_options_t o;
  rr_hl7_options_default(&o);
  o.borrow = true;
  rr_hl7_slice_t id;
  if (rr_hl7_parse(s->msg, payload, len, &o, NULL) != 0 ||
      rr_hl7_get_raw_s(s->msg, "MSH-10", &id) != 0 || id.len == 0)
    return RR_EPARSE;
  if (id.len > MAX_CONTROL_ID)
    return RR_EINVAL;
  memcpy(j->control_id, id.p, id.len);
  j->control_id[id.len] = '\0';
  j->control_id_len = id.len;
  return 0;
}

int rr_mllp_sender_send(rr_mllp_sender_t *s, const char *payload, size_t len,
                        const char *control_id, rr_mllp_send_cb cb, void *ud) {
  job_t *j = NULL;
  int rc = 0;
  if (!s || !payload || len == 0 || !cb) {
    rc = RR_EINVAL;
    goto out;
  }
  if (s->closing) {
    rc = UV_ECANCELED;
    goto out;
  }
  /* A start or end byte inside the payload would break the framing. */
  if (memchr(payload, s->cfg.framing.start, len) || memchr(payload, s->cfg.framing.end1, len)) {
    rc = RR_EINVAL;
    goto out;
  }
  /* One in flight plus max_queue waiting. */
  if (s->nqueued > s->cfg.max_queue || len > s->cfg.max_queue_bytes - s->queued_bytes) {
    rc = RR_ELIMIT;
    goto out;
  }
  j = calloc(1, sizeof *j);
  if (!j) {
    rc = RR_ENOMEM;
    goto out;
  }
  if (control_id) {
    size_t n = strlen(control_id);
    if (n == 0 || n > MAX_CONTROL_ID) {
      rc = RR_EINVAL;
      goto out;
    }
    memcpy(j->control_id, control_id, n + 1);
    j->control_id_len = n;
  } else if ((rc = control_id_from_payload(s, payload, len, j)) != 0) {
    goto out;
  }
  rr_buf_init(&j->frame, len + 3);
  rc = rr_mllp_frame(&s->cfg.framing, payload, len, &j->frame);
  if (rc)
    goto out;
  j->len = len;
  j->cb = cb;
  j->ud = ud;
  j->queued_ns = uv_hrtime();
  if (s->tail)
    s->tail->next = j;
  else
    s->head = j;
  s->tail = j;
  s->nqueued++;
  s->queued_bytes += len;
  j = NULL;
  kick(s);
out:
  if (j) {
    rr_buf_close(&j->frame);
    free(j);
  }
  return rc;
}

void rr_mllp_sender_stats(const rr_mllp_sender_t *s, rr_mllp_sender_stats_t *out) {
  *out = s->st;
  out->queued = s->nqueued;
  out->queued_bytes = s->queued_bytes;
}

/* MLLP listener: libuv glue around the pure deframer. */
#include "mllp/listener.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/log.h"

struct rr_mllp_conn {
  uv_tcp_t tcp;
  rr_mllp_listener_t *l; /* NULL once the listener is gone */
  rr_mllp_conn_t *prev, *next;
  rr_mllp_deframer_t df;
  uint64_t id;
  uint64_t last_byte_ms;     /* last read */
  uint64_t frame_started_ms; /* when the current frame's first byte came */
  unsigned refs;             /* the open handle counts as one */
  unsigned inflight;         /* frames whose reply is not yet written */
  int closing;
  int draining;        /* shutting down: no more reads */
  int draining_writes; /* uv_shutdown issued: no more writes */
  int reading;
  char peer[64];
  char addr[48];      /* peer address without port */
  rr_tls_conn_t *tls; /* NULL on plain TCP */
  uint64_t accepted_ms;
};

struct rr_mllp_listener {
  uv_loop_t *loop;
  uv_tcp_t server;
  uv_timer_t sweep; /* timeouts; after stop, the drain deadline */
  rr_mllp_listener_config_t cfg;
  char name[64];
  rr_mllp_frame_cb cb;
  void *ud;
  rr_mllp_conn_t *conns;
  unsigned nconns;
  uint64_t next_id;
  int open_handles;
  int quiet; /* no longer accepting or reading */
  int stopping;
  int port;
};

typedef struct write_req {
  uv_write_t req;
  rr_mllp_conn_t *c;
  int completes; /* carries a reply: one in-flight frame is done when written */
  rr_buf_t buf;
} write_req_t;

static void conn_shutdown(rr_mllp_conn_t *c);

void rr_mllp_listener_config_default(rr_mllp_listener_config_t *c) {
  memset(c, 0, sizeof *c);
  c->name = "mllp";
  c->host = "127.0.0.1";
  c->port = 2575;
  c->max_connections = 1024;
  c->max_per_peer = 256;
  c->max_inflight = 64;
  c->idle_timeout_ms = 600000;
  c->frame_timeout_ms = 30000;
  c->drain_timeout_ms = 5000;
  c->handshake_timeout_ms = 10000;
  rr_mllp_options_default(&c->framing);
}

static void on_handle_closed(uv_handle_t *h);

static void maybe_free_listener(rr_mllp_listener_t *l) {
  if (!l->stopping)
    return;
  /* Every connection gone before the drain deadline: stop waiting for it. */
  if (l->nconns == 0 && !uv_is_closing((uv_handle_t *)&l->sweep))
    uv_close((uv_handle_t *)&l->sweep, on_handle_closed);
  if (l->open_handles == 0 && l->nconns == 0)
    free(l);
}

static void conn_unlink(rr_mllp_conn_t *c) {
  rr_mllp_listener_t *l = c->l;
  if (!l)
    return;
  if (c->prev)
    c->prev->next = c->next;
  else
    l->conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  c->prev = c->next = NULL;
  l->nconns--;
  c->l = NULL;
  maybe_free_listener(l);
}

void rr_mllp_conn_hold(rr_mllp_conn_t *c) {
  c->refs++;
}

void rr_mllp_conn_release(rr_mllp_conn_t *c) {
  if (--c->refs == 0) {
    rr_mllp_deframer_close(&c->df);
    rr_tls_conn_free(c->tls);
    free(c);
  }
}

static void on_conn_closed(uv_handle_t *h) {
  rr_mllp_conn_t *c = h->data;
  conn_unlink(c);
  rr_mllp_conn_release(c);
}

static void conn_close(rr_mllp_conn_t *c, const char *reason) {
  if (c->closing)
    return;
  c->closing = 1;
  rr_log(RR_LOG_INFO, "mllp", "event=close channel=%s conn=%llu peer=%s reason=%s",
         c->l ? c->l->name : "-", (unsigned long long)c->id, c->peer, reason);
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

void rr_mllp_conn_close(rr_mllp_conn_t *c) {
  conn_close(c, "requested");
}

const char *rr_mllp_conn_peer(const rr_mllp_conn_t *c) {
  return c->peer;
}
uint64_t rr_mllp_conn_id(const rr_mllp_conn_t *c) {
  return c->id;
}
const char *rr_mllp_conn_channel(const rr_mllp_conn_t *c) {
  return c->l ? c->l->name : "-";
}
const char *rr_mllp_conn_identity(const rr_mllp_conn_t *c) {
  return c->tls ? rr_tls_peer_identity(c->tls) : "";
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  /* One read buffer per loop thread is enough: the deframer copies. */
  static _Thread_local char chunk[65536];
  buf->base = chunk;
  buf->len = sizeof chunk;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);

static void set_reading(rr_mllp_conn_t *c) {
  unsigned max = c->l ? c->l->cfg.max_inflight : 1;
  int want = !c->closing && !c->draining && c->inflight < max;
  if (want && !c->reading) {
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
      c->reading = 1;
  } else if (!want && c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  }
}

static int on_event(void *ud, rr_mllp_event_t ev, const char *data, size_t len, uint64_t offset) {
  rr_mllp_conn_t *c = ud;
  rr_mllp_listener_t *l = c->l;
  switch (ev) {
  case RR_MLLP_JUNK:
    rr_log(RR_LOG_WARN, "mllp",
           "event=junk channel=%s conn=%llu peer=%s offset=%llu bytes=%zu detail=\"bytes outside a "
           "frame discarded\"",
           l->name, (unsigned long long)c->id, c->peer, (unsigned long long)offset, len);
    return 0;
  case RR_MLLP_OVERSIZE:
    rr_log(RR_LOG_WARN, "mllp",
           "event=oversize channel=%s conn=%llu peer=%s offset=%llu bytes=%zu limit=%zu", l->name,
           (unsigned long long)c->id, c->peer, (unsigned long long)offset, len,
           l->cfg.framing.max_frame);
    return 0;
  case RR_MLLP_FRAME:
    c->inflight++;
    c->frame_started_ms = 0;
    l->cb(l->ud, c, data, len, offset);
    return c->closing ? 1 : 0;
  }
  return 0;
}

/* Plaintext from the peer: into the deframer. */
static void feed_plain(rr_mllp_conn_t *c, const char *data, size_t n, uint64_t now) {
  int was_in = rr_mllp_deframer_in_frame(&c->df);
  int rc = rr_mllp_deframer_feed(&c->df, data, n, on_event, c);
  if (rc == RR_ELIMIT)
    conn_close(c, "frame_too_large");
  else if (rc < 0)
    conn_close(c, rr_strerror(rc));
  if (!c->closing && rr_mllp_deframer_in_frame(&c->df) && (!was_in || c->frame_started_ms == 0))
    c->frame_started_ms = now;
}

static int send_bytes(rr_mllp_conn_t *c, const char *data, size_t len, int completes);

/* Writes whatever TLS has to send (handshake records, data, alerts). A
 * reply (completes) with nothing to send still completes its frame. */
static int flush_tls(rr_mllp_conn_t *c, int completes) {
  rr_buf_t out;
  rr_buf_init(&out, (size_t)1 << 30);
  const char *p;
  size_t n;
  int rc = 0;
  for (rr_tls_pending_out(c->tls, &p, &n); n && rc == 0; rr_tls_pending_out(c->tls, &p, &n)) {
    rc = rr_buf_append(&out, p, n);
    rr_tls_consume_out(c->tls, n);
  }
  if (rc == 0 && out.len)
    rc = send_bytes(c, out.data, out.len, completes);
  else if (completes)
    rr_mllp_conn_done(c);
  rr_buf_close(&out);
  return rc;
}

static void tls_refused(rr_mllp_conn_t *c, int rc) {
  rr_mllp_listener_t *l = c->l;
  if (rc == RR_ETLSCLOSED) {
    flush_tls(c, 0);
    conn_shutdown(c);
    return;
  }
  rr_tls_failure_t f = rr_tls_failure(c->tls);
  rr_log(RR_LOG_WARN, "tls",
         "event=%s channel=%s conn=%llu peer=%s tls_fail=%s claimed_identity=\"%s\" "
         "reason=\"%s\"",
         rr_tls_handshake_done(c->tls) ? "tls_error" : "tls_refused", l ? l->name : "-",
         (unsigned long long)c->id, c->peer, rr_tls_failure_name(f), rr_tls_peer_identity(c->tls),
         rr_tls_reason(c->tls));
  flush_tls(c, 0); /* the alert that tells the peer why */
  conn_shutdown(c);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  rr_mllp_conn_t *c = s->data;
  if (n == 0)
    return;
  if (n < 0) {
    conn_close(c, n == UV_EOF ? "eof" : uv_err_name((int)n));
    return;
  }
  uint64_t now = uv_now(s->loop);
  c->last_byte_ms = now;
  rr_mllp_conn_hold(c); /* the frame callback may close c */
  if (!c->tls) {
    feed_plain(c, buf->base, (size_t)n, now);
  } else {
    int was_up = rr_tls_handshake_done(c->tls);
    int rc = rr_tls_feed(c->tls, buf->base, (size_t)n);
    /* Plaintext comes out only after the handshake, with the peer's
     * certificate verified and on the allow-list. */
    static _Thread_local char plain[65536];
    size_t got = 0;
    while (rc == 0 && !c->closing && !c->draining) {
      rc = rr_tls_read(c->tls, plain, sizeof plain, &got);
      if (rc == 0 && got)
        feed_plain(c, plain, got, now);
    }
    if (!was_up && rr_tls_handshake_done(c->tls) && c->l)
      rr_log(RR_LOG_INFO, "tls",
             "event=tls_established channel=%s conn=%llu peer=%s identity=\"%s\" version=%s "
             "cipher=%s",
             c->l->name, (unsigned long long)c->id, c->peer, rr_tls_peer_identity(c->tls),
             rr_tls_version(c->tls), rr_tls_cipher(c->tls));
    if (rc == RR_ETLS || rc == RR_ETLSCLOSED)
      tls_refused(c, rc);
    else if (rc != RR_EAGAIN && rc != 0)
      conn_close(c, rr_strerror(rc));
    else if (!c->closing)
      flush_tls(c, 0);
  }
  if (!c->closing)
    set_reading(c);
  rr_mllp_conn_release(c);
}

static void on_write(uv_write_t *req, int status) {
  write_req_t *w = (write_req_t *)req;
  if (status < 0 && status != UV_ECANCELED)
    conn_close(w->c, uv_err_name(status));
  /* The frame counts as in flight until its reply has left: a peer that
   * does not read its ACKs stops being read from, instead of growing our
   * write queue without bound. */
  if (w->completes)
    rr_mllp_conn_done(w->c);
  rr_buf_close(&w->buf);
  rr_mllp_conn_release(w->c);
  free(w);
}

void rr_mllp_conn_done(rr_mllp_conn_t *c) {
  if (c->inflight)
    c->inflight--;
  if (!c->closing)
    set_reading(c);
}

static int send_bytes(rr_mllp_conn_t *c, const char *data, size_t len, int completes) {
  int rc;
  /* Nothing queued before it: write now, without a request (an ACK nearly
   * always fits the socket buffer); only what does not fit is queued. */
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) == 0) {
    uv_buf_t now = uv_buf_init((char *)data, (unsigned)len);
    rc = uv_try_write((uv_stream_t *)&c->tcp, &now, 1);
    if (rc == (int)len) {
      if (completes)
        rr_mllp_conn_done(c);
      return 0;
    }
    if (rc > 0) {
      data += rc;
      len -= (size_t)rc;
    } else if (rc != UV_EAGAIN && rc != UV_ENOSYS) {
      conn_close(c, uv_err_name(rc));
      if (completes)
        rr_mllp_conn_done(c);
      return rc;
    }
  }
  write_req_t *w = calloc(1, sizeof *w);
  rc = RR_ENOMEM;
  if (!w)
    goto fail;
  rr_buf_init(&w->buf, len + 1);
  if ((rc = rr_buf_append(&w->buf, data, len))) {
    free(w);
    goto fail;
  }
  w->c = c;
  w->completes = completes;
  rr_mllp_conn_hold(c);
  uv_buf_t b = uv_buf_init(w->buf.data, (unsigned)w->buf.len);
  rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
  if (rc == 0)
    return 0;
  rr_buf_close(&w->buf);
  free(w);
  rr_mllp_conn_release(c);
  conn_close(c, uv_err_name(rc));
fail:
  if (completes)
    rr_mllp_conn_done(c);
  return rc;
}

static int send_frame(rr_mllp_conn_t *c, const char *payload, size_t len, int completes) {
  if (c->closing || c->draining_writes) {
    if (completes)
      rr_mllp_conn_done(c);
    return UV_ECANCELED;
  }
  rr_buf_t f;
  rr_buf_init(&f, len + 16);
  int rc = rr_mllp_frame(c->l ? &c->l->cfg.framing : NULL, payload, len, &f);
  if (rc) {
    if (completes)
      rr_mllp_conn_done(c);
  } else if (!c->tls) {
    rc = send_bytes(c, f.data, f.len, completes);
  } else if ((rc = rr_tls_write(c->tls, f.data, f.len)) != 0) {
    if (completes)
      rr_mllp_conn_done(c);
    conn_close(c, rr_strerror(rc));
  } else {
    rc = flush_tls(c, completes);
  }
  rr_buf_close(&f);
  return rc;
}

int rr_mllp_conn_reply(rr_mllp_conn_t *c, const char *payload, size_t len) {
  return send_frame(c, payload, len, 1);
}

int rr_mllp_conn_send(rr_mllp_conn_t *c, const char *payload, size_t len) {
  return send_frame(c, payload, len, 0);
}

static unsigned peer_count(rr_mllp_listener_t *l, const char *addr) {
  unsigned n = 0;
  for (rr_mllp_conn_t *c = l->conns; c; c = c->next)
    n += strcmp(c->addr, addr) == 0;
  return n;
}

static void on_connection(uv_stream_t *server, int status) {
  rr_mllp_listener_t *l = server->data;
  if (status < 0) {
    rr_log(RR_LOG_WARN, "mllp", "event=accept_failed channel=%s error=%s", l->name,
           uv_err_name(status));
    return;
  }
  rr_mllp_conn_t *c = calloc(1, sizeof *c);
  if (!c)
    return;
  if (uv_tcp_init(l->loop, &c->tcp) != 0) {
    free(c);
    return;
  }
  c->tcp.data = c;
  c->refs = 1;
  c->id = ++l->next_id;
  c->l = l;
  c->next = l->conns;
  if (l->conns)
    l->conns->prev = c;
  l->conns = c;
  l->nconns++;
  rr_mllp_deframer_init(&c->df, &l->cfg.framing);
  c->last_byte_ms = uv_now(l->loop);
  snprintf(c->peer, sizeof c->peer, "?");
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    conn_close(c, "accept_failed");
    return;
  }
  struct sockaddr_storage ss;
  int sl = sizeof ss;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
    int port = 0;
    if (ss.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&ss, c->addr, sizeof c->addr);
      port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
      snprintf(c->peer, sizeof c->peer, "[%s]:%d", c->addr, port);
    } else {
      uv_ip4_name((struct sockaddr_in *)&ss, c->addr, sizeof c->addr);
      port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
      snprintf(c->peer, sizeof c->peer, "%s:%d", c->addr, port);
    }
  }
  if (l->nconns > l->cfg.max_connections) {
    conn_close(c, "too_many_connections");
    return;
  }
  if (peer_count(l, c->addr) > l->cfg.max_per_peer) {
    conn_close(c, "too_many_connections_from_peer");
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  c->accepted_ms = uv_now(l->loop);
  if (l->cfg.tls && rr_tls_conn_new(l->cfg.tls, &c->tls) != 0) {
    conn_close(c, "tls_setup_failed");
    return;
  }
  rr_log(RR_LOG_INFO, "mllp", "event=accept channel=%s conn=%llu peer=%s tls=%s", l->name,
         (unsigned long long)c->id, c->peer, c->tls ? "yes" : "no");
  set_reading(c);
}

static void on_sweep(uv_timer_t *t) {
  rr_mllp_listener_t *l = t->data;
  uint64_t now = uv_now(l->loop);
  for (rr_mllp_conn_t *c = l->conns, *next; c; c = next) {
    next = c->next;
    if (c->closing)
      continue;
    if (c->tls && !rr_tls_handshake_done(c->tls) && l->cfg.handshake_timeout_ms &&
        now - c->accepted_ms > l->cfg.handshake_timeout_ms) {
      rr_log(RR_LOG_WARN, "tls", "event=tls_refused channel=%s conn=%llu peer=%s tls_fail=timeout",
             l->name, (unsigned long long)c->id, c->peer);
      conn_close(c, "tls_handshake_timeout");
    } else if (l->cfg.frame_timeout_ms && c->frame_started_ms &&
               now - c->frame_started_ms > l->cfg.frame_timeout_ms) {
      rr_log(RR_LOG_WARN, "mllp",
             "event=frame_timeout channel=%s conn=%llu peer=%s offset=%llu pending_bytes=%zu",
             l->name, (unsigned long long)c->id, c->peer, (unsigned long long)c->df.frame_start,
             rr_mllp_deframer_pending(&c->df));
      conn_close(c, "frame_timeout");
    } else if (l->cfg.idle_timeout_ms && c->inflight == 0 &&
               now - c->last_byte_ms > l->cfg.idle_timeout_ms) {
      conn_close(c, "idle_timeout");
    }
  }
}

static void on_handle_closed(uv_handle_t *h) {
  rr_mllp_listener_t *l = h->data;
  l->open_handles--;
  maybe_free_listener(l);
}

int rr_mllp_listener_start(uv_loop_t *loop, const rr_mllp_listener_config_t *cfg,
                           rr_mllp_frame_cb cb, void *ud, rr_mllp_listener_t **out) {
  rr_mllp_listener_t *l = calloc(1, sizeof *l);
  if (!l)
    return RR_ENOMEM;
  l->loop = loop;
  l->cfg = *cfg;
  snprintf(l->name, sizeof l->name, "%s", cfg->name ? cfg->name : "mllp");
  l->cfg.name = l->name;
  l->cfg.host = NULL;
  l->cb = cb;
  l->ud = ud;
  struct sockaddr_storage ss;
  int rc = uv_ip4_addr(cfg->host, cfg->port, (struct sockaddr_in *)&ss);
  if (rc)
    rc = uv_ip6_addr(cfg->host, cfg->port, (struct sockaddr_in6 *)&ss);
  if (rc) {
    free(l);
    return rc;
  }
  uv_tcp_init(loop, &l->server);
  l->server.data = l;
  l->open_handles++;
  uv_timer_init(loop, &l->sweep);
  l->sweep.data = l;
  l->open_handles++;
  rc = uv_tcp_bind(&l->server, (struct sockaddr *)&ss, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&l->server, 511, on_connection);
  if (rc) {
    l->stopping = 1;
    uv_close((uv_handle_t *)&l->server, on_handle_closed);
    uv_close((uv_handle_t *)&l->sweep, on_handle_closed);
    return rc;
  }
  struct sockaddr_storage bound;
  int bl = sizeof bound;
  uv_tcp_getsockname(&l->server, (struct sockaddr *)&bound, &bl);
  l->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                              : ((struct sockaddr_in *)&bound)->sin_port);
  uv_timer_start(&l->sweep, on_sweep, 250, 250);
  uv_unref((uv_handle_t *)&l->sweep);
  rr_log(RR_LOG_INFO, "mllp", "event=listen channel=%s address=%s port=%d", l->name, cfg->host,
         l->port);
  *out = l;
  return 0;
}

int rr_mllp_listener_port(const rr_mllp_listener_t *l) {
  return l->port;
}

unsigned rr_mllp_listener_connections(const rr_mllp_listener_t *l) {
  return l->nconns;
}

typedef struct shutdown_req {
  uv_shutdown_t req;
  rr_mllp_conn_t *c;
} shutdown_req_t;

static void on_shutdown(uv_shutdown_t *req, int status) {
  shutdown_req_t *s = (shutdown_req_t *)req;
  (void)status;
  conn_close(s->c, "shutdown");
  rr_mllp_conn_release(s->c);
  free(s);
}

/* Closes after the writes already queued (the last ACKs) have gone out. */
static void conn_shutdown(rr_mllp_conn_t *c) {
  if (c->closing)
    return;
  c->draining = 1;
  if (c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  }
  shutdown_req_t *s = calloc(1, sizeof *s);
  if (s) {
    s->c = c;
    rr_mllp_conn_hold(c);
    if (uv_shutdown(&s->req, (uv_stream_t *)&c->tcp, on_shutdown) == 0) {
      c->draining_writes = 1;
      return;
    }
    rr_mllp_conn_release(c);
    free(s);
  }
  conn_close(c, "shutdown");
}

/* The drain deadline passed: whoever still has replies queued (a peer that
 * does not read) is cut off, so shutdown always ends. */
static void on_drain_deadline(uv_timer_t *t) {
  rr_mllp_listener_t *l = t->data;
  for (rr_mllp_conn_t *c = l->conns, *next; c; c = next) {
    next = c->next;
    conn_close(c, "shutdown_deadline");
  }
  uv_close((uv_handle_t *)&l->sweep, on_handle_closed);
}

void rr_mllp_listener_quiesce(rr_mllp_listener_t *l) {
  if (!l || l->quiet)
    return;
  l->quiet = 1;
  uv_close((uv_handle_t *)&l->server, on_handle_closed);
  for (rr_mllp_conn_t *c = l->conns; c; c = c->next) {
    c->draining = 1;
    set_reading(c);
  }
}

void rr_mllp_listener_stop(rr_mllp_listener_t *l) {
  if (!l || l->stopping)
    return;
  rr_mllp_listener_quiesce(l);
  l->stopping = 1;
  for (rr_mllp_conn_t *c = l->conns; c; c = c->next)
    conn_shutdown(c);
  if (l->nconns) {
    uv_timer_stop(&l->sweep);
    uv_timer_start(&l->sweep, on_drain_deadline, l->cfg.drain_timeout_ms, 0);
    uv_ref((uv_handle_t *)&l->sweep);
  } else {
    uv_close((uv_handle_t *)&l->sweep, on_handle_closed);
  }
}

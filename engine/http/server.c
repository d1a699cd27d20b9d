/* HTTP server: libuv and TLS glue around the connection state machine of
 * server_conn.c (listen, accept, capacity, read, write, timeouts, lingering
 * close, stop, reload). */
#include "http/server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "http/server_int.h"

#define SWEEP_MS 200
#define LINGER_MS 2000

typedef struct write_req {
  uv_write_t req;
  hs_conn_t *c;
  rr_buf_t buf;
} write_req_t;

typedef struct shutdown_req {
  uv_shutdown_t req;
  hs_conn_t *c;
} shutdown_req_t;

static void conn_close(hs_conn_t *c, const char *reason);
static void set_reading(hs_conn_t *c);

/* ---- server lifetime ------------------------------------------------ */

static void on_handle_closed(uv_handle_t *h) {
  rr_http_server_t *s = h->data;
  if (--s->open_handles == 0 && s->nconns == 0)
    hs_server_free(s);
}

static void maybe_free_server(rr_http_server_t *s) {
  if (!s->stopping || s->nconns)
    return;
  if (!uv_is_closing((uv_handle_t *)&s->sweep))
    uv_close((uv_handle_t *)&s->sweep, on_handle_closed);
  if (!uv_is_closing((uv_handle_t *)&s->kicker))
    uv_close((uv_handle_t *)&s->kicker, on_handle_closed);
}

/* ---- connection close ----------------------------------------------- */

static void on_conn_closed(uv_handle_t *h) {
  hs_conn_t *c = h->data;
  rr_http_server_t *s = c->s;
  hs_conn_closed(c);
  if (s)
    maybe_free_server(s);
  hs_conn_release(c);
}

static void conn_close(hs_conn_t *c, const char *reason) {
  if (c->closing)
    return;
  c->closing = 1;
  c->gone = 1;
  rr_log(RR_LOG_DEBUG, "http", "event=close server=%s conn=%llu peer=%s reason=%s", c->name,
         (unsigned long long)c->id, c->peer, reason);
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  shutdown_req_t *sr = (shutdown_req_t *)req;
  hs_conn_t *c = sr->c;
  if (status < 0 || !c->s) {
    conn_close(c, "shutdown");
  } else if (!c->closing) {
    /* Our FIN is out: read (and drop) what the peer still sends until it
     * closes, so the last reply is not destroyed by a reset. */
    c->lingering = 1;
    c->linger_until = uv_now(c->tcp.loop) + LINGER_MS;
    set_reading(c);
  }
  hs_conn_release(c);
  free(sr);
}

/* After the queued writes, send FIN (and close_notify first under TLS). */
static void conn_shutdown(hs_conn_t *c) {
  if (c->closing || c->shut)
    return;
  c->shut = 1;
  shutdown_req_t *sr = calloc(1, sizeof *sr);
  if (sr) {
    sr->c = c;
    hs_conn_hold(c);
    if (uv_shutdown(&sr->req, (uv_stream_t *)&c->tcp, on_shutdown) == 0)
      return;
    hs_conn_release(c);
    free(sr);
  }
  conn_close(c, "shutdown");
}

/* ---- writing -------------------------------------------------------- */

static void on_write(uv_write_t *req, int status) {
  write_req_t *w = (write_req_t *)req;
  hs_conn_t *c = w->c;
  if (status < 0 && status != UV_ECANCELED)
    conn_close(c, uv_err_name(status));
  rr_buf_close(&w->buf);
  free(w);
  if (!c->closing)
    hs_conn_written(c);
  hs_conn_release(c);
}

static int send_bytes(hs_conn_t *c, const char *data, size_t len) {
  int rc;
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) == 0) {
    uv_buf_t now = uv_buf_init((char *)data, (unsigned)len);
    rc = uv_try_write((uv_stream_t *)&c->tcp, &now, 1);
    if (rc == (int)len)
      return 0;
    if (rc > 0) {
      data += rc;
      len -= (size_t)rc;
    } else if (rc != UV_EAGAIN && rc != UV_ENOSYS) {
      conn_close(c, uv_err_name(rc));
      return rc;
    }
  }
  write_req_t *w = calloc(1, sizeof *w);
  if (!w) {
    conn_close(c, "out_of_memory");
    return RR_ENOMEM;
  }
  rr_buf_init(&w->buf, len + 1);
  if ((rc = rr_buf_append(&w->buf, data, len)) != 0) {
    free(w);
    conn_close(c, "out_of_memory");
    return rc;
  }
  w->c = c;
  hs_conn_hold(c);
  uv_buf_t b = uv_buf_init(w->buf.data, (unsigned)w->buf.len);
  rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
  if (rc == 0)
    return 0;
  rr_buf_close(&w->buf);
  free(w);
  hs_conn_release(c);
  conn_close(c, uv_err_name(rc));
  return rc;
}

/* Writes whatever TLS has to send (handshake records, data, alerts). */
static int flush_tls(hs_conn_t *c) {
  rr_buf_t out;
  rr_buf_init(&out, (size_t)1 << 30);
  const char *p;
  size_t n;
  int rc = 0;
  for (rr_tls_pending_out(c->tls, &p, &n); n && rc == 0; rr_tls_pending_out(c->tls, &p, &n)) {
    rc = rr_buf_append(&out, p, n);
    rr_tls_consume_out(c->tls, n);
  }
  if (rc == 0 && out.len && !c->closing)
    rc = send_bytes(c, out.data, out.len);
  rr_buf_close(&out);
  return rc;
}

static int io_send(hs_conn_t *c, const char *data, size_t len) {
  if (c->closing || c->lingering)
    return UV_ECANCELED;
  if (!c->tls)
    return send_bytes(c, data, len);
  int rc = rr_tls_write(c->tls, data, len);
  if (rc) {
    conn_close(c, rr_strerror(rc));
    return rc;
  }
  return flush_tls(c);
}

static size_t io_queued(hs_conn_t *c) {
  return c->closing ? 0 : uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
}

static void io_finish(hs_conn_t *c) {
  if (c->closing)
    return;
  if (c->tls) {
    rr_tls_shutdown(c->tls);
    flush_tls(c);
  }
  if (!c->closing)
    conn_shutdown(c);
}

static void io_update(hs_conn_t *c) {
  if (!c->closing)
    set_reading(c);
}

static const hs_io_t socket_io = {io_send, io_queued, io_finish, io_update};

/* ---- reading -------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  static _Thread_local char chunk[65536];
  buf->base = chunk;
  buf->len = sizeof chunk;
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf);

static void set_reading(hs_conn_t *c) {
  int want = !c->closing && (c->lingering || hs_conn_wants_input(c));
  if (want && !c->reading) {
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
      c->reading = 1;
  } else if (!want && c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  }
}

static void tls_failed(hs_conn_t *c, int rc) {
  if (rc == RR_ETLSCLOSED) {
    conn_close(c, "close_notify");
    return;
  }
  rr_tls_failure_t f = rr_tls_failure(c->tls);
  int up = rr_tls_handshake_done(c->tls);
  if (!up && c->s)
    c->s->st.tls_refused++;
  rr_log(RR_LOG_WARN, "tls",
         "event=%s server=%s conn=%llu peer=%s tls_fail=%s claimed_identity=\"%s\" reason=\"%s\"",
         up ? "tls_error" : "tls_refused", c->name, (unsigned long long)c->id, c->peer,
         rr_tls_failure_name(f), rr_tls_peer_identity(c->tls), rr_tls_reason(c->tls));
  flush_tls(c); /* the alert that tells the peer why */
  c->finishing = 1;
  if (!c->closing)
    conn_shutdown(c);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
  hs_conn_t *c = st->data;
  if (n == 0)
    return;
  if (n < 0) {
    /* EOF: the client is gone (HTTP clients do not half-close and wait);
     * a reply still pending becomes a no-op. */
    conn_close(c, n == UV_EOF ? "eof" : uv_err_name((int)n));
    return;
  }
  if (c->lingering || c->finishing)
    return; /* the last reply is out or queued: drop the rest */
  hs_conn_hold(c);
  if (!c->tls) {
    if (hs_conn_input(c, buf->base, (size_t)n) != 0)
      conn_close(c, "input_overflow");
  } else {
    int was_up = rr_tls_handshake_done(c->tls);
    int rc = rr_tls_feed(c->tls, buf->base, (size_t)n);
    static _Thread_local char plain[65536];
    size_t got = 0;
    /* Plaintext comes out only after the handshake, with the client's
     * certificate verified and on the allow-list. All of it is drained
     * into the connection, so none waits inside OpenSSL unseen. */
    while (rc == 0 && !c->closing && !c->finishing && !c->gone) {
      rc = rr_tls_read(c->tls, plain, sizeof plain, &got);
      if (rc == 0 && got && hs_conn_input(c, plain, got) != 0) {
        conn_close(c, "input_overflow");
        break;
      }
    }
    if (!was_up && rr_tls_handshake_done(c->tls))
      rr_log(RR_LOG_INFO, "tls",
             "event=tls_established server=%s conn=%llu peer=%s identity=\"%s\" version=%s "
             "cipher=%s",
             c->name, (unsigned long long)c->id, c->peer, rr_tls_peer_identity(c->tls),
             rr_tls_version(c->tls), rr_tls_cipher(c->tls));
    if (c->closing) {
      /* closed while reading */
    } else if (rc == RR_ETLS || rc == RR_ETLSCLOSED) {
      tls_failed(c, rc);
    } else if (rc != RR_EAGAIN && rc != 0) {
      conn_close(c, rr_strerror(rc));
    } else {
      flush_tls(c);
    }
  }
  if (!c->closing)
    set_reading(c);
  hs_conn_release(c);
}

/* ---- accepting ------------------------------------------------------ */

static unsigned peer_count(rr_http_server_t *s, const hs_conn_t *self) {
  unsigned n = 0;
  for (hs_conn_t *c = s->conns; c; c = c->next)
    n += c != self && !c->over_capacity && strcmp(c->addr, self->addr) == 0;
  return n;
}

static void on_connection(uv_stream_t *server, int status) {
  rr_http_server_t *s = server->data;
  if (status < 0) {
    rr_log(RR_LOG_WARN, "http", "event=accept_failed server=%s error=%s", s->name,
           uv_err_name(status));
    return;
  }
  hs_conn_t *c = hs_conn_new(s, &socket_io, NULL);
  if (!c)
    return;
  if (uv_tcp_init(s->loop, &c->tcp) != 0) {
    hs_conn_closed(c);
    hs_conn_release(c);
    return;
  }
  c->tcp.data = c;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    conn_close(c, "accept_failed");
    return;
  }
  struct sockaddr_storage ss;
  int sl = sizeof ss;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
    if (ss.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&ss, c->addr, sizeof c->addr);
      snprintf(c->peer, sizeof c->peer, "[%s]:%d", c->addr,
               ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
    } else {
      uv_ip4_name((struct sockaddr_in *)&ss, c->addr, sizeof c->addr);
      snprintf(c->peer, sizeof c->peer, "%s:%d", c->addr,
               ntohs(((struct sockaddr_in *)&ss)->sin_port));
    }
  }
  s->st.accepted++;
  unsigned normal = s->nconns - s->noverflow - 1;
  int over = normal >= s->cfg.max_connections || peer_count(s, c) >= s->cfg.max_per_peer;
  if (over) {
    s->st.refused++;
    /* A few over-capacity connections are answered 503; beyond those,
     * a connection is closed at once. */
    unsigned overflow_cap = s->cfg.max_connections / 16 + 16;
    rr_log(RR_LOG_WARN, "http", "event=over_capacity server=%s conn=%llu peer=%s connections=%u",
           s->name, (unsigned long long)c->id, c->peer, s->nconns);
    if (s->noverflow >= overflow_cap) {
      conn_close(c, "over_capacity");
      return;
    }
    c->over_capacity = 1;
    s->noverflow++;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  if (s->tls && rr_tls_conn_new(s->tls, &c->tls) != 0) {
    conn_close(c, "tls_setup_failed");
    return;
  }
  rr_log(RR_LOG_DEBUG, "http", "event=accept server=%s conn=%llu peer=%s tls=%s", s->name,
         (unsigned long long)c->id, c->peer, c->tls ? "yes" : "no");
  set_reading(c);
}

/* ---- timers --------------------------------------------------------- */

static void on_sweep(uv_timer_t *t) {
  rr_http_server_t *s = t->data;
  uint64_t now = uv_now(s->loop);
  for (hs_conn_t *c = s->conns, *next; c; c = next) {
    next = c->next;
    if (c->closing)
      continue;
    if (c->lingering) {
      if (now > c->linger_until || (s->stopping && now > s->drain_until))
        conn_close(c, "linger_done");
      continue;
    }
    if (s->stopping && now > s->drain_until) {
      conn_close(c, "shutdown_deadline");
      continue;
    }
    if (c->tls && !rr_tls_handshake_done(c->tls)) {
      if (s->cfg.handshake_timeout_ms && now - c->accepted_ms > s->cfg.handshake_timeout_ms) {
        s->st.tls_refused++;
        rr_log(RR_LOG_WARN, "tls", "event=tls_refused server=%s conn=%llu peer=%s tls_fail=timeout",
               s->name, (unsigned long long)c->id, c->peer);
        conn_close(c, "tls_handshake_timeout");
      }
      continue;
    }
    if (hs_conn_tick(c, now))
      conn_close(c, "idle_timeout");
    else if (s->stopping && hs_conn_idle(c) && !c->finishing)
      conn_close(c, "shutdown");
  }
}

static void on_kicker(uv_idle_t *h) {
  rr_http_server_t *s = h->data;
  uv_idle_stop(h);
  hs_server_kick(s);
}

static void schedule_kick(rr_http_server_t *s) {
  if (!uv_is_closing((uv_handle_t *)&s->kicker))
    uv_idle_start(&s->kicker, on_kicker);
}

/* ---- start, reload, stop -------------------------------------------- */

static int keep_string(rr_http_server_t *s, const char *in, const char **out) {
  *out = NULL;
  if (!in)
    return 0;
  size_t n = strlen(in);
  char *p = malloc(n + 1);
  char **v = realloc(s->tls_strings, (s->ntls_strings + 1) * sizeof *v);
  if (v)
    s->tls_strings = v;
  if (!p || !v) {
    free(p);
    return RR_ENOMEM;
  }
  memcpy(p, in, n + 1);
  s->tls_strings[s->ntls_strings++] = p;
  *out = p;
  return 0;
}

/* A deep copy of the TLS settings, for reloads. */
static int copy_tls_config(rr_http_server_t *s, const rr_tls_config_t *in) {
  rr_tls_config_t *t = &s->tls_cfg;
  *t = *in;
  t->allow = NULL;
  int rc = keep_string(s, in->cert_file, &t->cert_file);
  if (!rc)
    rc = keep_string(s, in->key_file, &t->key_file);
  if (!rc)
    rc = keep_string(s, in->ca_file, &t->ca_file);
  if (!rc)
    rc = keep_string(s, in->crl_file, &t->crl_file);
  if (!rc)
    rc = keep_string(s, in->server_name, &t->server_name);
  if (!rc && in->nallow) {
    const char **allow = calloc(in->nallow, sizeof *allow);
    if (!allow)
      return RR_ENOMEM;
    t->allow = allow;
    for (size_t i = 0; i < in->nallow && !rc; i++)
      rc = keep_string(s, in->allow[i], &allow[i]);
  }
  return rc;
}

int rr_http_server_start(uv_loop_t *loop, const rr_http_server_config_t *cfg,
                         rr_http_server_t **out, rr_buf_t *err) {
  rr_http_server_t *s = NULL;
  int rc = hs_server_new(loop, cfg, &s, err);
  if (rc)
    return rc;
  const char *host = cfg->host ? cfg->host : "127.0.0.1";
  struct sockaddr_storage ss;
  if (uv_ip4_addr(host, cfg->port, (struct sockaddr_in *)&ss) != 0 &&
      uv_ip6_addr(host, cfg->port, (struct sockaddr_in6 *)&ss) != 0) {
    if (err)
      rr_buf_printf(err, "http server %s: host \"%s\" is not an IP address", s->name, host);
    hs_server_free(s);
    return RR_EINVAL;
  }
  if (cfg->token_file) {
    if (!(s->token_file = strdup(cfg->token_file))) {
      hs_server_free(s);
      return RR_ENOMEM;
    }
    if ((rc = hs_tokens_load(cfg->token_file, &s->tokens, err)) != 0) {
      hs_server_free(s);
      return rc;
    }
  }
  if (cfg->tls) {
    if (cfg->tls->role != RR_TLS_SERVER) {
      if (err)
        rr_buf_printf(err, "http server %s: the TLS role must be server", s->name);
      hs_server_free(s);
      return RR_EINVAL;
    }
    if ((rc = copy_tls_config(s, cfg->tls)) != 0 ||
        (rc = rr_tls_ctx_new(&s->tls_cfg, &s->tls, err)) != 0) {
      hs_server_free(s);
      return rc;
    }
  }
  s->on_kick = schedule_kick;
  uv_tcp_init(loop, &s->listener);
  s->listener.data = s;
  uv_timer_init(loop, &s->sweep);
  s->sweep.data = s;
  uv_idle_init(loop, &s->kicker);
  s->kicker.data = s;
  s->open_handles = 3;
  rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&ss, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&s->listener, 511, on_connection);
  if (rc) {
    if (err)
      rr_buf_printf(err, "http server %s: cannot listen on %s:%d: %s", s->name, host, cfg->port,
                    uv_strerror(rc));
    s->stopping = 1;
    uv_close((uv_handle_t *)&s->listener, on_handle_closed);
    maybe_free_server(s);
    return rc;
  }
  struct sockaddr_storage bound;
  int bl = sizeof bound;
  uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &bl);
  s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                              : ((struct sockaddr_in *)&bound)->sin_port);
  uv_timer_start(&s->sweep, on_sweep, SWEEP_MS, SWEEP_MS);
  uv_unref((uv_handle_t *)&s->sweep);
  rr_log(RR_LOG_INFO, "http", "event=listen server=%s address=%s port=%d tls=%s tokens=%zu",
         s->name, host, s->port, s->tls ? "yes" : "no", s->tokens.n);
  *out = s;
  return 0;
}

int rr_http_server_port(const rr_http_server_t *s) {
  return s->port;
}

int rr_http_server_reload(rr_http_server_t *s, rr_buf_t *err) {
  hs_tokens_t fresh = {0};
  int rc = 0;
  if (s->token_file && (rc = hs_tokens_load(s->token_file, &fresh, err)) != 0)
    goto fail;
  if (s->tls && (rc = rr_tls_ctx_reload(s->tls, &s->tls_cfg, err)) != 0)
    goto fail;
  if (s->token_file) {
    hs_tokens_free(&s->tokens);
    s->tokens = fresh;
  }
  rr_log(RR_LOG_INFO, "http", "event=reloaded server=%s tls=%s tokens=%zu", s->name,
         s->tls ? "yes" : "no", s->tokens.n);
  return 0;
fail:
  hs_tokens_free(&fresh);
  rr_log(RR_LOG_ERROR, "http", "event=reload_failed server=%s error=\"%s\"", s->name,
         err && err->data ? err->data : rr_strerror(rc));
  return rc;
}

void rr_http_server_stop(rr_http_server_t *s) {
  if (!s || s->stopping)
    return;
  s->stopping = 1;
  uv_close((uv_handle_t *)&s->listener, on_handle_closed);
  s->drain_until = uv_now(s->loop) + s->cfg.drain_timeout_ms;
  for (hs_conn_t *c = s->conns; c; c = c->next)
    if (!c->closing && !c->lingering && hs_conn_idle(c) && !c->finishing)
      conn_close(c, "shutdown");
  uv_ref((uv_handle_t *)&s->sweep);
  maybe_free_server(s);
}

void rr_http_server_stats(const rr_http_server_t *s, rr_http_server_stats_t *out) {
  *out = s->st;
  out->connections = s->nconns;
}

/* TLS transport for the MLLP sender: the memory-BIO TLS layer (engine/tls)
 * over the plain TCP transport. Connected means handshake done: the sender's
 * connect timeout covers it. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/log.h"
#include "mllp/sender.h"
#include "tls/tls.h"

typedef struct tls_tr {
  rr_mllp_transport_t base;   /* the sender's view */
  rr_mllp_transport_t *inner; /* TCP */
  rr_tls_ctx_t *ctx;          /* borrowed (transport_arg) */
  rr_tls_conn_t *conn;
  bool connected; /* on_connect(0) reported */
  bool reading;   /* the sender asked for plaintext */
  bool failed;
  /* One flag per inner write, in order: does it carry a sender write? */
  unsigned char *tags;
  size_t tag_head, tag_len, tag_cap;
} tls_tr_t;

static int push_tag(tls_tr_t *t, unsigned char v) {
  if (t->tag_len == t->tag_cap) {
    size_t nc = t->tag_cap ? t->tag_cap * 2 : 16;
    unsigned char *n = malloc(nc);
    if (!n)
      return RR_ENOMEM;
    for (size_t i = 0; i < t->tag_len; i++)
      n[i] = t->tags[(t->tag_head + i) % t->tag_cap];
    free(t->tags);
    t->tags = n;
    t->tag_head = 0;
    t->tag_cap = nc;
  }
  t->tags[(t->tag_head + t->tag_len++) % t->tag_cap] = v;
  return 0;
}

/* Sends what TLS has to send. carries: this flush completes a sender write
 * (reported through on_write once the inner write is done). */
static int flush(tls_tr_t *t, bool carries) {
  rr_buf_t out;
  rr_buf_init(&out, (size_t)1 << 30);
  const char *p;
  size_t n;
  int rc = 0;
  for (rr_tls_pending_out(t->conn, &p, &n); n && rc == 0; rr_tls_pending_out(t->conn, &p, &n)) {
    rc = rr_buf_append(&out, p, n);
    rr_tls_consume_out(t->conn, n);
  }
  if (rc == 0 && out.len) {
    rc = push_tag(t, carries);
    if (rc == 0)
      rc = t->inner->ops->write(t->inner, &out);
  } else if (rc == 0 && carries) {
    rc = RR_EIO; /* a write that produced nothing to send */
  }
  rr_buf_close(&out);
  return rc;
}

static void fail(tls_tr_t *t, int rc) {
  if (t->failed)
    return;
  t->failed = true;
  if (rc == RR_ETLS)
    rr_log(RR_LOG_WARN, "tls", "event=tls_refused role=client tls_fail=%s reason=\"%s\"",
           rr_tls_failure_name(rr_tls_failure(t->conn)), rr_tls_reason(t->conn));
  flush(t, false); /* the alert, if any */
  if (!t->connected)
    t->base.ev->on_connect(t->base.ud, &t->base, rc);
  else
    t->base.ev->on_read(t->base.ud, &t->base, NULL, rc);
}

static void in_connect(void *ud, rr_mllp_transport_t *in, int status) {
  tls_tr_t *t = ud;
  (void)in;
  if (status) {
    t->base.ev->on_connect(t->base.ud, &t->base, status);
    return;
  }
  int rc = rr_tls_conn_new(t->ctx, &t->conn);
  if (rc == 0)
    rc = t->inner->ops->read_start(t->inner);
  if (rc == 0) {
    rc = rr_tls_handshake(t->conn);
    if (rc == RR_EAGAIN)
      rc = 0;
  }
  if (rc == 0)
    rc = flush(t, false);
  if (rc)
    fail(t, rc);
}

static void in_write(void *ud, rr_mllp_transport_t *in, int status) {
  tls_tr_t *t = ud;
  (void)in;
  if (!t->tag_len)
    return;
  unsigned char carries = t->tags[t->tag_head];
  t->tag_head = (t->tag_head + 1) % t->tag_cap;
  t->tag_len--;
  if (carries)
    t->base.ev->on_write(t->base.ud, &t->base, status);
}

static void in_read(void *ud, rr_mllp_transport_t *in, const char *data, ssize_t n) {
  tls_tr_t *t = ud;
  (void)in;
  if (t->failed)
    return;
  if (n < 0) {
    if (!t->connected)
      t->base.ev->on_connect(t->base.ud, &t->base, (int)n);
    else
      t->base.ev->on_read(t->base.ud, &t->base, NULL, n);
    t->failed = true;
    return;
  }
  int rc = rr_tls_feed(t->conn, data, (size_t)n);
  if (rc == 0 && !rr_tls_handshake_done(t->conn)) {
    rc = rr_tls_handshake(t->conn);
    if (rc == RR_EAGAIN)
      rc = 0;
  }
  if (rc == 0)
    rc = flush(t, false);
  if (rc) {
    fail(t, rc);
    return;
  }
  if (!t->connected && rr_tls_handshake_done(t->conn)) {
    t->connected = true;
    rr_log(RR_LOG_DEBUG, "tls", "event=tls_established role=client version=%s cipher=%s",
           rr_tls_version(t->conn), rr_tls_cipher(t->conn));
    t->base.ev->on_connect(t->base.ud, &t->base, 0);
  }
  /* Plaintext for the sender, once it reads (the callback may close us). */
  static _Thread_local char plain[65536];
  while (t->connected && t->reading && !t->failed) {
    size_t got = 0;
    rc = rr_tls_read(t->conn, plain, sizeof plain, &got);
    if (rc == RR_EAGAIN)
      break;
    if (rc == RR_ETLSCLOSED) {
      t->failed = true;
      t->base.ev->on_read(t->base.ud, &t->base, NULL, UV_EOF);
      return;
    }
    if (rc) {
      fail(t, rc);
      return;
    }
    if (got)
      t->base.ev->on_read(t->base.ud, &t->base, plain, (ssize_t)got);
  }
  flush(t, false);
}

static void in_close(void *ud, rr_mllp_transport_t *in) {
  tls_tr_t *t = ud;
  (void)in;
  t->base.ev->on_close(t->base.ud, &t->base);
  rr_tls_conn_free(t->conn);
  free(t->tags);
  free(t);
}

static const rr_mllp_transport_events_t inner_ev = {in_connect, in_write, in_read, in_close};

static int tls_connect(rr_mllp_transport_t *bt, const struct sockaddr *addr) {
  tls_tr_t *t = (tls_tr_t *)bt;
  return t->inner->ops->connect(t->inner, addr);
}

static int tls_write(rr_mllp_transport_t *bt, rr_buf_t *data) {
  tls_tr_t *t = (tls_tr_t *)bt;
  int rc = t->failed || !t->connected ? UV_ENOTCONN : rr_tls_write(t->conn, data->data, data->len);
  rr_buf_close(data);
  rr_buf_init(data, data->limit);
  if (rc == 0)
    rc = flush(t, true);
  return rc;
}

static int tls_read_start(rr_mllp_transport_t *bt) {
  tls_tr_t *t = (tls_tr_t *)bt;
  t->reading = true; /* plaintext is delivered from the next inner read on */
  return 0;
}

static void tls_close(rr_mllp_transport_t *bt) {
  tls_tr_t *t = (tls_tr_t *)bt;
  if (t->conn && t->connected && !t->failed && rr_tls_shutdown(t->conn) == 0)
    flush(t, false); /* close_notify, best effort */
  t->inner->ops->close(t->inner);
}

static const rr_mllp_transport_ops_t tls_ops = {"tls", tls_connect, tls_write, tls_read_start,
                                                tls_close};

int rr_mllp_transport_tls_new(void *arg, uv_loop_t *loop, const rr_mllp_transport_events_t *ev,
                              void *ud, rr_mllp_transport_t **out) {
  if (!arg)
    return RR_EINVAL;
  tls_tr_t *t = calloc(1, sizeof *t);
  if (!t)
    return RR_ENOMEM;
  t->base.ops = &tls_ops;
  t->base.ev = ev;
  t->base.ud = ud;
  t->ctx = arg;
  int rc = rr_mllp_transport_tcp_new(NULL, loop, &inner_ev, t, &t->inner);
  if (rc) {
    free(t);
    return rc;
  }
  *out = &t->base;
  return 0;
}

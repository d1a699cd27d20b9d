/* MLLP listener on a libuv loop: accepts TCP connections, deframes, hands
 * each frame to a callback, and writes replies framed, in order.
 *
 * Threading: everything runs on the loop thread that started the listener.
 * Callbacks are never called synchronously from rr_mllp_* calls. */
#ifndef RR_MLLP_LISTENER_H
#define RR_MLLP_LISTENER_H

#include <stdint.h>
#include <uv.h>

#include "mllp/mllp.h"
#include "tls/tls.h"

typedef struct rr_mllp_listener rr_mllp_listener_t;
typedef struct rr_mllp_conn rr_mllp_conn_t;

typedef struct rr_mllp_listener_config {
  const char *name;          /* channel name, for logs; copied */
  const char *host;          /* bind address, e.g. "127.0.0.1" or "::" */
  int port;                  /* 0 = any free port (see rr_mllp_listener_port) */
  unsigned max_connections;  /* default 1024 */
  unsigned max_per_peer;     /* connections from one address; default 256 */
  unsigned max_inflight;     /* frames awaiting a reply before reading pauses; default 64 */
  uint64_t idle_timeout_ms;  /* close after this long without a byte; 0 = never; default 600000 */
  uint64_t frame_timeout_ms; /* a started frame must end within this; default 30000 */
  uint64_t drain_timeout_ms; /* on stop, replies still unwritten after this are dropped
                                and their connections cut; default 5000 */
  rr_mllp_options_t framing;
  rr_tls_ctx_t *tls;             /* borrowed, outlives the listener; NULL = plain TCP.
                                    Reloading it changes new connections only. */
  uint64_t handshake_timeout_ms; /* TLS handshake must finish within; default 10000 */
} rr_mllp_listener_config_t;

/* A complete frame from c; data is borrowed for the call. The connection
 * stays valid for the call; hold it to reply later. */
typedef void (*rr_mllp_frame_cb)(void *ud, rr_mllp_conn_t *c, const char *data, size_t len,
                                 uint64_t offset);

/* rr_mllp_listener_config_default: the defaults above, port 2575, host 127.0.0.1. */
void rr_mllp_listener_config_default(rr_mllp_listener_config_t *c);
/* rr_mllp_listener_start: binds and listens. libuv codes (UV_EADDRINUSE ...)
 * and RR_ENOMEM pass through. */
int rr_mllp_listener_start(uv_loop_t *loop, const rr_mllp_listener_config_t *cfg,
                           rr_mllp_frame_cb cb, void *ud, rr_mllp_listener_t **out);
/* rr_mllp_listener_port: the bound port. */
int rr_mllp_listener_port(const rr_mllp_listener_t *l);
/* rr_mllp_listener_quiesce: stops accepting connections and reading from
 * the open ones; replies can still be written. First step of a shutdown. */
void rr_mllp_listener_quiesce(rr_mllp_listener_t *l);
/* rr_mllp_listener_stop: stops accepting, closes every connection, frees the
 * listener once libuv has closed its handles. NULL is a no-op. */
void rr_mllp_listener_stop(rr_mllp_listener_t *l);
/* rr_mllp_listener_connections: open connections. */
unsigned rr_mllp_listener_connections(const rr_mllp_listener_t *l);

/* rr_mllp_conn_hold / release: keep c's memory valid across asynchronous
 * work (e.g. a commit) even if the peer disconnects meanwhile. */
void rr_mllp_conn_hold(rr_mllp_conn_t *c);
void rr_mllp_conn_release(rr_mllp_conn_t *c);
/* rr_mllp_conn_reply: frames payload (copied) and writes it. Also completes
 * one in-flight frame, so reading resumes if it was paused. UV_ECANCELED
 * when the connection is already closed. */
int rr_mllp_conn_reply(rr_mllp_conn_t *c, const char *payload, size_t len);
/* rr_mllp_conn_send: frames and writes payload (copied) as an extra answer
 * that completes no frame (e.g. an enhanced-mode application ACK after the
 * commit ACK). UV_ECANCELED when the connection is closed. */
int rr_mllp_conn_send(rr_mllp_conn_t *c, const char *payload, size_t len);
/* rr_mllp_conn_done: completes one in-flight frame without a reply. */
void rr_mllp_conn_done(rr_mllp_conn_t *c);
/* rr_mllp_conn_close: closes after pending writes. */
void rr_mllp_conn_close(rr_mllp_conn_t *c);
/* "ip:port" of the peer (borrowed, valid while c is held). */
const char *rr_mllp_conn_peer(const rr_mllp_conn_t *c);
uint64_t rr_mllp_conn_id(const rr_mllp_conn_t *c);
const char *rr_mllp_conn_channel(const rr_mllp_conn_t *c);
/* Verified identity of the TLS peer (certificate CN or SAN), "" without TLS
 * or client certificate. Borrowed. */
const char *rr_mllp_conn_identity(const rr_mllp_conn_t *c);

#endif

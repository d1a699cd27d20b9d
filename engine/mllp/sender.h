/* MLLP sender (client) on a libuv loop: the transport under the engine's
 * MLLP destinations. It sends one message at a time on one connection,
 * waits for its ACK, checks it, and reports the outcome through a callback.
 *
 * Model
 *   rr_mllp_sender_send queues a message (copied) and returns at once. The
 *   sender works through its queue in order, one message in flight: connect
 *   if needed (name resolution and connect within connect_timeout_ms), write
 *   the frame, wait for one reply frame within ack_timeout_ms (counted from
 *   the write), check it, call back. Each message is written at most once:
 *   the sender never resends on its own (a message written to a connection
 *   that then fails may have reached the peer; only the caller, which owns
 *   the durable queue, can decide to resend). A destination simply calls
 *   send again after a failure: the sender paces the reconnects.
 *
 * ACK check
 *   The reply must parse as HL7 (lenient), have an MSA segment whose MSA-1
 *   is AA, AE, AR, CA, CE or CR, and whose raw MSA-2 equals the control id
 *   sent, byte for byte. AE/AR/CE/CR are ACKs (status 0): what they mean for
 *   the message is the caller's decision. A reply that fails the check, a
 *   reply over framing.max_frame, a frame arriving when no message awaits
 *   an ACK (e.g. a second ACK), the ACK timeout, and a lost connection all
 *   close the connection; the next message reconnects. An ACK that would
 *   arrive after the timeout therefore can never be taken for the next
 *   message's: its connection is gone.
 *
 * Reconnect back-off
 *   After a failure (connect error or timeout, or any error above that
 *   closes the connection; not an AE/AR) the next connect waits a delay
 *   drawn uniformly from [0, min(cap, base * 2^(n-1))] ms, n = consecutive
 *   failures ("full jitter"). The first connect, and every connect after a
 *   matching ACK, is immediate. Queued messages wait for that delay; they
 *   are not failed by it.
 *
 * Connections
 *   keep_alive = 1: one connection reused for every message until an error
 *   or the peer closes it (a peer closing an idle connection is normal and
 *   is not an error). keep_alive = 0: a new connection per message, closed
 *   once its ACK has come.
 *
 * Threading and callbacks
 *   A sender is used from the thread running its loop, only. Result
 *   callbacks always run from the loop, never synchronously inside
 *   rr_mllp_sender_send or rr_mllp_sender_close; a callback may call
 *   rr_mllp_sender_send and rr_mllp_sender_close.
 *
 * Transport seam
 *   All socket I/O goes through rr_mllp_transport_t (bottom of this file):
 *   connect, write, read-start, close. The built-in one is plain TCP; a TLS
 *   transport (engine/tls) plugs in through cfg.transport_new, wrapping
 *   rr_mllp_transport_tcp_new, without changes to the protocol logic.
 */
#ifndef RR_MLLP_SENDER_H
#define RR_MLLP_SENDER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/buf.h"
#include "core/error.h"
#include "mllp/mllp.h"

/* Sender outcome codes. They live in their own range, below the core codes
 * (RR_EBASE - 100 ...), so that core/error.h can grow without a clash. */
#define RR_MLLP_EBASE (RR_EBASE - 100)
/* No connection within connect_timeout_ms. */
#define RR_MLLP_ECONNTIMEDOUT (RR_MLLP_EBASE - 1)
/* No reply within ack_timeout_ms. */
#define RR_MLLP_EACKTIMEDOUT (RR_MLLP_EBASE - 2)
/* Connection closed, reset or write failed before the ACK; cause says how. */
#define RR_MLLP_ECONNLOST (RR_MLLP_EBASE - 3)
/* MSA-2 is not the control id sent. */
#define RR_MLLP_EACKMISMATCH (RR_MLLP_EBASE - 4)
/* The reply is not HL7, has no MSA, or MSA-1 is not an acknowledgement code. */
#define RR_MLLP_EBADACK (RR_MLLP_EBASE - 5)

typedef struct rr_mllp_sender rr_mllp_sender_t;

/* ---- transport seam ------------------------------------------------------ */

typedef struct rr_mllp_transport rr_mllp_transport_t;

/* What a transport reports to its owner (ud). t is the reporting transport.
 * Never called synchronously from an op; nothing but on_close is called
 * after close(). */
typedef struct rr_mllp_transport_events {
  /* Connected (for TLS: handshake done) or failed (status < 0, any code). */
  void (*on_connect)(void *ud, rr_mllp_transport_t *t, int status);
  /* One write() finished; status < 0 when it failed. */
  void (*on_write)(void *ud, rr_mllp_transport_t *t, int status);
  /* n > 0 bytes of plaintext (borrowed for the call), or n < 0: end of
   * stream (UV_EOF) or an error; no more reads follow a negative n. */
  void (*on_read)(void *ud, rr_mllp_transport_t *t, const char *data, ssize_t n);
  /* After close(), the last event: t's resources are gone and t must not
   * be used; the owner may free ev and ud inside this call. */
  void (*on_close)(void *ud, rr_mllp_transport_t *t);
} rr_mllp_transport_events_t;

typedef struct rr_mllp_transport_ops {
  const char *name; /* "tcp", "tls": for logs */
  /* connect: starts connecting to addr (copied). Result via on_connect.
   * A negative return means nothing started (close() is still needed). */
  int (*connect)(rr_mllp_transport_t *t, const struct sockaddr *addr);
  /* write: takes data's contents (the buffer is left empty, also on error)
   * and writes them after earlier writes. Only after on_connect(0). */
  int (*write)(rr_mllp_transport_t *t, rr_buf_t *data);
  /* read_start: deliver received bytes through on_read from now on. */
  int (*read_start)(rr_mllp_transport_t *t);
  /* close: idempotent; cancels everything; on_close follows from the loop. */
  void (*close)(rr_mllp_transport_t *t);
} rr_mllp_transport_ops_t;

/* The head of every transport object; implementations embed it first. */
struct rr_mllp_transport {
  const rr_mllp_transport_ops_t *ops;
  const rr_mllp_transport_events_t *ev;
  void *ud; /* the owner's, passed back with every event */
};

/* Creates an unconnected transport reporting to ev/ud (both borrowed, must
 * outlive it). arg is cfg.transport_arg. The transport owns its memory and
 * frees it after on_close. Returns 0, RR_ENOMEM or a libuv code. */
typedef int (*rr_mllp_transport_new_fn)(void *arg, uv_loop_t *loop,
                                        const rr_mllp_transport_events_t *ev, void *ud,
                                        rr_mllp_transport_t **out);

/* rr_mllp_transport_tcp_new: the plain TCP transport (arg unused; TCP_NODELAY
 * and TCP keep-alive probes after 60 s idle). The building block a TLS
 * transport wraps. Loop thread; never calls back synchronously. */
int rr_mllp_transport_tcp_new(void *arg, uv_loop_t *loop, const rr_mllp_transport_events_t *ev,
                              void *ud, rr_mllp_transport_t **out);

/* rr_mllp_transport_tls_new: TLS (engine/tls) over the TCP transport; arg is
 * the rr_tls_ctx_t of the destination (client role; borrowed, outlives the
 * sender), whose server_name the server's certificate is checked against.
 * on_connect(0) comes once the handshake is done; a refusal is
 * on_connect(RR_ETLS), logged with its reason. Loop thread. */
int rr_mllp_transport_tls_new(void *arg, uv_loop_t *loop, const rr_mllp_transport_events_t *ev,
                              void *ud, rr_mllp_transport_t **out);

/* ---- sender -------------------------------------------------------------- */

typedef struct rr_mllp_sender_config {
  const char *name;            /* destination name, for logs; copied; default "mllp" */
  const char *host;            /* IP literal or host name; copied; required */
  int port;                    /* 1..65535; required */
  uint64_t connect_timeout_ms; /* resolve + connect (+ handshake); default 5000 */
  uint64_t ack_timeout_ms;     /* from the write to the reply; default 10000 */
  int keep_alive;              /* 1: reuse one connection (default); 0: one per message */
  uint64_t backoff_base_ms;    /* default 250 */
  uint64_t backoff_cap_ms;     /* default 30000 */
  unsigned max_queue;          /* messages waiting behind the one in flight; default 1000 */
  size_t max_queue_bytes;      /* payload bytes held, in flight included; default 64 MiB */
  rr_mllp_options_t framing;   /* framing bytes; max_frame limits a reply; default
                                  0x0B/0x1C/0x0D and 1 MiB */
  rr_mllp_transport_new_fn transport_new; /* NULL = rr_mllp_transport_tcp_new */
  void *transport_arg;                    /* borrowed; must outlive the sender */
  int mllp_release;                       /* 1 (default): the reply is an HL7 ACK; 2: an MLLP
                                             release 2 commit block, 0x06 (reported as "CA")
                                             or 0x15 (reported as "CR") */
} rr_mllp_sender_config_t;

typedef struct rr_mllp_send_result {
  int status;       /* 0: a matching ACK came (any code); else RR_MLLP_E*, a
                       libuv connect error (UV_ECONNREFUSED, UV_EAI_NONAME ...),
                       RR_ELIMIT (reply over framing.max_frame), UV_ECANCELED
                       (sender closed) or RR_ENOMEM */
  int cause;        /* underlying libuv code of RR_MLLP_ECONNLOST (UV_EOF,
                       UV_ECONNRESET, UV_EPIPE ...) and of connect errors; else 0 */
  char ack_code[3]; /* MSA-1 ("AA" ...) when a reply with a valid MSA-1 came
                       (also with RR_MLLP_EACKMISMATCH); else "" */
  const char *ack;  /* the raw reply payload, borrowed for the callback; NULL
                       when no reply frame came */
  size_t ack_len;
  const char *control_id; /* the control id sent; borrowed for the callback */
  int written;            /* 1 when the message was handed to a connection: unless
                             status is 0, the peer may or may not have it */
  uint64_t elapsed_ms;    /* from rr_mllp_sender_send to this callback */
  uint64_t ack_ms;        /* from the write to the reply; 0 when none came */
} rr_mllp_send_result_t;

/* The outcome of one send. r and everything it points to are borrowed for
 * the call. */
typedef void (*rr_mllp_send_cb)(void *ud, const rr_mllp_send_result_t *r);
/* The sender is gone (all its handles and memory). */
typedef void (*rr_mllp_sender_closed_cb)(void *ud);

typedef struct rr_mllp_sender_stats {
  uint64_t connect_attempts;     /* connects started (one per address tried) */
  uint64_t connects;             /* connections established */
  uint64_t connect_failures;     /* connect errors and timeouts */
  uint64_t sends;                /* messages written */
  uint64_t acks;                 /* matching ACKs, any code */
  uint64_t acks_negative;        /* of which AE, AR, CE or CR */
  uint64_t errors;               /* sends failed after acceptance (cancels excluded),
                                    plus unsolicited frames */
  uint64_t unsolicited;          /* frames that came with no message awaiting an ACK */
  uint64_t canceled;             /* sends ended by rr_mllp_sender_close */
  unsigned queued;               /* accepted, not yet called back (in flight included) */
  size_t queued_bytes;           /* their payload bytes */
  unsigned consecutive_failures; /* since the last matching ACK */
  uint64_t backoff_ms;           /* delay drawn after the last failure (0 if none since
                                    the last ACK); the next connect waits for it */
} rr_mllp_sender_stats_t;

/* rr_mllp_sender_config_default: the defaults above; host NULL, port 0. */
void rr_mllp_sender_config_default(rr_mllp_sender_config_t *c);

/* rr_mllp_sender_new: a sender on loop, idle until the first send (nothing
 * connects before). cfg is copied (transport_arg stays borrowed). *out is
 * owned by the caller and ended with rr_mllp_sender_close. RR_EINVAL for a
 * missing host, a bad port, a zero timeout or max_frame; RR_ENOMEM. Loop
 * thread. */
int rr_mllp_sender_new(uv_loop_t *loop, const rr_mllp_sender_config_t *cfg, rr_mllp_sender_t **out);

/* rr_mllp_sender_send: queues payload (one ER7 message, copied and framed)
 * for sending after the messages already queued. control_id is the raw
 * MSH-10 of payload (copied; what MSA-2 must equal); NULL = read MSH-10 from
 * payload. On 0, cb (required) will be called exactly once, from the loop,
 * never from inside this call. On error cb is never called: RR_ELIMIT
 * (max_queue or max_queue_bytes reached), RR_EINVAL (empty payload or
 * control id, control id over 199 bytes, no cb, a framing start or end1
 * byte inside payload), RR_EPARSE (control_id NULL and no MSH-10 found),
 * UV_ECANCELED (the sender is closing), RR_ENOMEM. Loop thread. */
int rr_mllp_sender_send(rr_mllp_sender_t *s, const char *payload, size_t len,
                        const char *control_id, rr_mllp_send_cb cb, void *ud);

/* rr_mllp_sender_close: closes the connection at once and ends the sender.
 * Every send not yet called back (in flight first, then the queue in order)
 * gets its callback with UV_ECANCELED (written = 1 for one already written:
 * its outcome is unknown), from the loop, after this call returns. Then
 * closed_cb (may be NULL) is called once s and all its handles are freed.
 * Until then s stays valid (rr_mllp_sender_send returns UV_ECANCELED, stats
 * work); after it s must not be used. A second call is a no-op; NULL is a
 * no-op. Loop thread. */
void rr_mllp_sender_close(rr_mllp_sender_t *s, rr_mllp_sender_closed_cb closed_cb, void *ud);

/* rr_mllp_sender_stats: a snapshot of the counters. Loop thread. */
void rr_mllp_sender_stats(const rr_mllp_sender_t *s, rr_mllp_sender_stats_t *out);

/* rr_mllp_sender_strerror: static text for the RR_MLLP_E* codes, libuv
 * codes and every code rr_strerror knows. Never NULL. Any thread. */
const char *rr_mllp_sender_strerror(int code);

#endif

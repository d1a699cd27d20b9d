/* Outbound HTTP(S) client on a libuv loop: the transport under the engine's
 * HTTP destinations (store-and-forward POST of JSON or HL7, later DICOMweb
 * and AI endpoints).
 *
 * Model
 *   One rr_http_client_t per loop. It drives libcurl's multi-socket API
 *   from the loop: one uv_poll_t per socket curl opens and one uv_timer_t
 *   for curl's timeouts. No threads of its own (libcurl may resolve host
 *   names on its resolver thread, which reports back through a socket the
 *   loop watches), no polling loops. rr_http_client_submit copies the
 *   request description and returns at once; the outcome comes through the
 *   request's callback, from the loop.
 *
 * Concurrency and order
 *   At most cfg.max_concurrent transfers run at once; later ones wait in a
 *   FIFO (at most cfg.max_queue) and start in submit order as slots free.
 *   Connections are kept in the client's connection cache (at most
 *   max_concurrent idle ones) and reused by later requests to the same
 *   host, port and TLS settings; TLS sessions are shared across transfers.
 *
 * TLS
 *   https URLs always verify the server: its chain against ca_file (or the
 *   system store when ca_file is NULL) and its name against the URL's host.
 *   There is no option to turn verification off. TLS 1.2 is the minimum.
 *   cert_file/key_file (PEM) are presented when the server asks for a
 *   client certificate. Redirects are never followed and proxy environment
 *   variables are ignored: a request goes to the host its URL names.
 *
 * Outcome
 *   status 0: a complete HTTP response came, whatever its status code
 *   (4xx and 5xx are responses, not errors). Otherwise a negative code:
 *     UV_ETIMEDOUT       connect_timeout_ms or timeout_ms passed
 *     UV_ECONNREFUSED    nothing listens (or another connect errno as a libuv code)
 *     UV_EAI_NONAME      the host name does not resolve
 *     RR_ETLS            TLS failure: server certificate or name not trusted,
 *                        handshake refused, our certificate refused, a CA or
 *                        certificate file that cannot be read. Under TLS 1.3
 *                        a server refuses a client certificate after the
 *                        client's side of the handshake: when the server
 *                        closes before its alert is read, that refusal comes
 *                        as RR_HTTP_ECONNLOST
 *     RR_ELIMIT          the response body or headers went over their limit;
 *                        the transfer was aborted and its connection closed
 *     RR_HTTP_ECONNLOST  the connection closed or reset before a complete
 *                        response (also: the server closed without answering)
 *     RR_HTTP_EPROTOCOL  the response is not valid HTTP
 *     RR_HTTP_ETRANSPORT any other libcurl failure (curl_code says which)
 *     UV_ECANCELED       rr_http_client_cancel or rr_http_client_close
 *     a callback's code  a sink, source or head callback returned non-zero
 *     RR_ENOMEM
 *   A request may have reached the server for every code but a connect
 *   error, RR_ETLS during the handshake and UV_ECANCELED before the start.
 *   Callers typically retry UV_ETIMEDOUT, connect errors, connection loss
 *   and 5xx, and dead-letter 4xx.
 *
 * Privacy
 *   The client logs at RR_LOG_DEBUG only, and only method, host, HTTP
 *   status, error name and time: never paths, query strings, headers or
 *   bodies. The client's own copies of a bearer token are wiped when the
 *   transfer ends (libcurl's request buffer is not).
 *
 * Threading and callbacks
 *   A client and its transfers are used from the thread running the loop,
 *   only. Completion callbacks run from the loop, never inside
 *   rr_http_client_submit, _cancel or _close; a completion callback may
 *   call submit, cancel and close. A sink, source, rewind or head callback
 *   runs inside libcurl and must not call any rr_http_client_* function.
 */
#ifndef RR_HTTP_CLIENT_H
#define RR_HTTP_CLIENT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/buf.h"
#include "core/error.h"

/* HTTP client codes, in their own range below the core and MLLP ones. */
#define RR_HTTP_EBASE (RR_EBASE - 200)
/* Connection closed or reset before a complete response. */
#define RR_HTTP_ECONNLOST (RR_HTTP_EBASE - 1)
/* The response is not valid HTTP (status line, headers, chunking). */
#define RR_HTTP_EPROTOCOL (RR_HTTP_EBASE - 2)
/* Any other libcurl failure; rr_http_response_t.curl_code says which. */
#define RR_HTTP_ETRANSPORT (RR_HTTP_EBASE - 3)

typedef struct rr_http_client rr_http_client_t;
/* One submitted request, from submit to its callback. */
typedef struct rr_http_transfer rr_http_transfer_t;

typedef enum rr_http_method {
  RR_HTTP_GET = 0,
  RR_HTTP_POST,
  RR_HTTP_PUT,
  RR_HTTP_DELETE
} rr_http_method_t;

typedef struct rr_http_client_config {
  const char *name;        /* for logs; copied; default "http" */
  unsigned max_concurrent; /* transfers running at once; default 8 */
  unsigned max_queue;      /* transfers waiting behind them; default 10000 */
} rr_http_client_config_t;

/* Consumes the response body instead of the client buffering it. data is
 * borrowed for the call; called from the loop inside libcurl, in order,
 * for the body of the final response (any HTTP status). Returns 0 to go
 * on, or a negative code that aborts the transfer and becomes its status.
 * Must not call rr_http_client_* functions. */
typedef int (*rr_http_sink_fn)(void *ud, const char *data, size_t len);

/* Produces the request body instead of a buffer (streaming uploads): writes
 * at most cap bytes into buf (borrowed for the call) and sets *len; *len 0
 * ends the body. Returns 0, or a negative code that aborts the transfer
 * and becomes its status. Called from the loop inside libcurl, in order;
 * must not call rr_http_client_* functions. */
typedef int (*rr_http_source_fn)(void *ud, char *buf, size_t cap, size_t *len);

/* Starts the body over from its first byte: libcurl asks for it when it
 * has to send the request again (a reused connection that turned out to
 * be closed). Returns 0, or non-zero when it cannot (the transfer then
 * fails with RR_HTTP_ECONNLOST). Same context as the source. */
typedef int (*rr_http_rewind_fn)(void *ud);

struct rr_http_response;
/* The final response's status line and headers are complete (before any
 * of its body reaches the sink). r holds status 0, http_status, headers
 * and content_type (rr_http_response_header works on it); its body fields
 * are empty; r is borrowed for the call. Returns 0 to go on, or a negative
 * code that aborts the transfer and becomes its status. Same context as a
 * sink. */
typedef int (*rr_http_head_fn)(void *ud, const struct rr_http_response *r);

/* rr_http_request_t.source_len for a body of unknown length: it is sent
 * with chunked transfer encoding (HTTP/1.1). */
#define RR_HTTP_LENGTH_UNKNOWN UINT64_MAX

typedef struct rr_http_request {
  rr_http_method_t method;    /* default RR_HTTP_GET */
  const char *url;            /* http:// or https://; copied; required */
  const char *const *headers; /* nheaders extra "Name: value" lines, without CR or
                                 LF; copied; may be NULL when nheaders is 0 */
  size_t nheaders;
  const void *body; /* request body; NULL with body_len 0 for none; not with GET */
  size_t body_len;
  int body_borrowed;           /* 0 (default): body is copied at submit; 1: body is
                                  borrowed and must stay valid and unchanged until the
                                  completion callback has returned */
  const char *content_type;    /* copied; NULL with a body = "application/octet-stream" */
  const char *bearer_token;    /* sent as "Authorization: Bearer <token>"; copied,
                                  wiped when the transfer ends; NULL = none; see
                                  rr_http_client_read_token */
  const char *ca_file;         /* PEM CA bundle the server must chain to; copied;
                                  NULL = the system store */
  const char *cert_file;       /* PEM client certificate (chain); copied; NULL = none */
  const char *key_file;        /* PEM key of cert_file; copied; NULL = in cert_file */
  uint64_t connect_timeout_ms; /* resolve + connect + TLS handshake; default 10000 */
  uint64_t timeout_ms;         /* whole transfer, from its start (time waiting in the
                                  client's FIFO not included); default 60000 */
  size_t max_response_bytes;   /* body limit, also with a sink; default 16 MiB */
  size_t max_header_bytes;     /* response header block limit; default 64 KiB */
  rr_http_sink_fn sink;        /* NULL (default): the body is buffered */
  void *sink_ud;
  rr_http_source_fn source;        /* NULL (default): the request body is body/body_len.
                                      Otherwise the body comes from source (body must be
                                      NULL and body_len 0; not with GET) */
  void *source_ud;                 /* passed to source and source_rewind */
  uint64_t source_len;             /* with source: the body's exact length (sent as
                                      Content-Length; a source that ends early fails the
                                      transfer), or RR_HTTP_LENGTH_UNKNOWN */
  rr_http_rewind_fn source_rewind; /* NULL: the body cannot be sent twice */
  rr_http_head_fn head;            /* NULL (default): none */
  void *head_ud;
} rr_http_request_t;

typedef struct rr_http_response {
  int status;               /* 0 or a negative code (see Outcome above) */
  long http_status;         /* the final response's status code when status is 0; else 0 */
  const char *message;      /* human text for status < 0 (no patient data, may name the
                               host); "" when status is 0; never NULL */
  int curl_code;            /* libcurl's CURLcode, for diagnostics; 0 when none */
  const char *content_type; /* Content-Type of the response; NULL when none */
  const char *headers;      /* raw header block of the final response ("Name:
                               value\r\n" lines after the status line); never NULL */
  size_t headers_len;
  const char *body; /* buffered body, NUL-terminated (may hold NUL bytes); ""
                       with a sink or when none came; never NULL */
  size_t body_len;
  uint64_t body_bytes; /* body bytes received (also those given to a sink) */
  uint64_t elapsed_ms; /* from rr_http_client_submit to this callback */
} rr_http_response_t;

/* The outcome of one transfer, exactly once. r and everything it points to
 * are borrowed for the call; t is freed after the callback returns. */
typedef void (*rr_http_done_cb)(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r);
/* The client is gone: every handle closed, every byte freed. */
typedef void (*rr_http_client_closed_cb)(void *ud);

typedef struct rr_http_client_stats {
  uint64_t submitted;   /* transfers accepted by submit */
  uint64_t responses;   /* callbacks with status 0 (any HTTP status) */
  uint64_t failures;    /* callbacks with another status, cancels excluded */
  uint64_t canceled;    /* callbacks with UV_ECANCELED */
  unsigned running;     /* transfers running now */
  unsigned waiting;     /* transfers waiting in the FIFO */
  unsigned max_running; /* the most transfers ever running at once */
  unsigned sockets;     /* sockets curl has the loop watch now */
} rr_http_client_stats_t;

/* rr_http_client_config_default: the defaults above. */
void rr_http_client_config_default(rr_http_client_config_t *c);

/* rr_http_client_new: a client on loop (borrowed; must outlive the client).
 * cfg is copied; NULL = defaults. *out is owned by the caller and ended
 * with rr_http_client_close. RR_EINVAL (max_concurrent 0), RR_ENOMEM,
 * RR_HTTP_ETRANSPORT (libcurl could not be initialised). Loop thread. */
int rr_http_client_new(uv_loop_t *loop, const rr_http_client_config_t *cfg, rr_http_client_t **out);

/* rr_http_client_request_default: a GET with the defaults above, url NULL. */
void rr_http_client_request_default(rr_http_request_t *r);

/* rr_http_client_submit: starts req (or queues it behind max_concurrent
 * running transfers). req and the strings it points to are copied, except
 * a body with body_borrowed. On 0, cb (required) will be called exactly
 * once, from the loop, never from inside this call; *out (may be NULL) is
 * the transfer, borrowed, valid until its callback returns. On error cb is
 * never called and *out is untouched: RR_EINVAL (no cb, no url, a scheme
 * other than http/https, an unparsable URL, a header or token with CR/LF or
 * a header without ':', a body or source with GET, both a body and a
 * source, a zero timeout or limit),
 * RR_ELIMIT (max_queue transfers waiting), UV_ECANCELED (the client is
 * closing), RR_ENOMEM. Loop thread. */
int rr_http_client_submit(rr_http_client_t *c, const rr_http_request_t *req, rr_http_done_cb cb,
                          void *ud, rr_http_transfer_t **out);

/* rr_http_client_cancel: ends t (waiting or running; a running one's
 * connection is closed). Its callback then comes with UV_ECANCELED, from
 * the loop, after this call returns, exactly once, even when the transfer
 * had finished and its callback was not yet called. t must be a transfer
 * whose callback has not returned yet; inside t's own callback this is a
 * no-op. A second call is a no-op. Loop thread; never from a sink. */
void rr_http_client_cancel(rr_http_transfer_t *t);

/* rr_http_client_close: cancels every transfer (running first, then the
 * waiting ones in order; each callback with UV_ECANCELED, from the loop,
 * after this call returns), closes every connection and handle, and then
 * calls closed_cb (may be NULL) once c is freed. Until then c stays valid
 * (submit returns UV_ECANCELED, stats work); after it c must not be used.
 * A second call is a no-op; NULL is a no-op. Loop thread. */
void rr_http_client_close(rr_http_client_t *c, rr_http_client_closed_cb closed_cb, void *ud);

/* rr_http_client_stats: a snapshot of the counters. Loop thread. */
void rr_http_client_stats(const rr_http_client_t *c, rr_http_client_stats_t *out);

/* rr_http_response_header: the value of the first header called name (ASCII
 * case-insensitive) in r's header block, without surrounding blanks.
 * *value (borrowed from r, not NUL-terminated) and *len are set on 0;
 * RR_ENOTFOUND when there is no such header. Pure; any thread. */
int rr_http_response_header(const rr_http_response_t *r, const char *name, const char **value,
                            size_t *len);

/* rr_http_client_read_token: reads a secret (a bearer token) from the file
 * at path: one line of at most 16 KiB, trailing CR/LF, spaces and tabs
 * trimmed. *out is owned by the caller (NUL-terminated) and released with
 * rr_http_client_token_free. Errors, with a sentence naming path in err
 * (may be NULL; appended): the open/read errno as a negative code (e.g.
 * -ENOENT for a missing file), RR_EINVAL (empty, or a CR, LF or NUL inside
 * the token), RR_ELIMIT (over 16 KiB), RR_ENOMEM. Blocking file I/O: call
 * at configuration time. Any thread. */
int rr_http_client_read_token(const char *path, char **out, rr_buf_t *err);

/* rr_http_client_token_free: wipes and frees a token from
 * rr_http_client_read_token. NULL is a no-op. */
void rr_http_client_token_free(char *token);

/* rr_http_client_strerror: static text for the RR_HTTP_E* codes, libuv
 * codes and every code rr_strerror knows. Never NULL. Any thread. */
const char *rr_http_client_strerror(int code);

#endif

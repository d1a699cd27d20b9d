/* Inbound HTTP/1.1 server on a libuv loop: the engine's REST API (study
 * complete signals, notification acknowledgements, operator actions), its
 * health and metrics endpoints, and the dashboard's static files.
 *
 * Model
 *   Node's HTTP/1.x parser (Debian's libhttp-parser) over the engine's own
 *   TLS layer (tls/tls.h), on the caller's loop: one TLS policy (cipher
 *   list, mutual TLS, CRL, allow-list, refusal logging, reload) for MLLP and
 *   HTTP. HTTP/1.1 only: keep-alive, pipelined requests answered in order
 *   (one request of a connection is with its handler at a time; the next is
 *   parsed once it has been answered), HTTP/1.0 requests answered and then
 *   closed. Chunked request bodies are decoded; "Expect: 100-continue" is
 *   answered with 100 once the request passed routing, authentication and
 *   the limits. The server is configured once: routes, static directories
 *   and limits are fixed at rr_http_server_start; certificates and the token
 *   file can be read again with rr_http_server_reload.
 *
 * Requests and replies
 *   A route is a method and a path pattern whose segments are literals or
 *   named parameters ("/api/studies/{uid}/complete"). Its handler gets an
 *   rr_http_req_t once the whole request (body included) has arrived and
 *   passed the checks below. The request stays valid until the handler
 *   answers it with one rr_http_reply* call, from the handler itself or
 *   later from the loop (e.g. after a database commit); every request must
 *   be answered exactly once, and is freed by that call. When the client
 *   has gone away meanwhile, the reply is a no-op that returns UV_ECANCELED
 *   (rr_http_req_gone says so beforehand); the request is freed all the same.
 *   A client that closes its side of the connection (EOF, TLS close_notify)
 *   is taken as gone: what it had sent but not yet had answered is dropped.
 *   GET routes also answer HEAD (the body is dropped, Content-Length kept).
 *
 * Checks, in order, each answered by the server itself
 *   400 bad_request       not HTTP/1.x, bad framing, a "." or ".." path segment,
 *                         a NUL byte or bad percent escape in the path
 *   414 uri_too_long      request target over max_url_bytes
 *   431 headers_too_large header block over max_header_bytes or max_headers
 *   503 over_capacity     the connection came in over max_connections or
 *                         max_per_peer (answered, then closed)
 *   404 not_found         no route or static directory for the path
 *   405 method_not_allowed the path has routes, none for this method (Allow)
 *   401 unauthorized      the route needs a role and no token or an unknown
 *                         one came (WWW-Authenticate: Bearer); a token sent
 *                         to a public route is checked as well
 *   403 forbidden         the token's role is below the route's
 *   417 expectation_failed an Expect other than 100-continue
 *   411 length_required   the route declares a content type and the request
 *                         has no Content-Length nor chunked body
 *   415 unsupported_media_type the route declares a content type the
 *                         request's Content-Type does not name
 *   413 payload_too_large the body is over the route's max_body
 *   408 request_timeout   header_timeout_ms / body_timeout_ms passed
 *   500 internal_error    memory or a static file that cannot be read
 *   Every one is {"error": "<code>", "message": "<sentence>"} with
 *   Content-Type application/json. 400, 408, 413, 414, 431, 503 and an
 *   error answered before the request's body was read close the connection
 *   after the reply; the others keep it open.
 *
 * Authentication
 *   Bearer tokens ("Authorization: Bearer <token>") from the token file:
 *   one token per line, "role name sha256hex", where role is viewer,
 *   operator or admin (each includes the ones before it), name is the
 *   principal ([A-Za-z0-9._@-], 1..64) written to the access log and handed
 *   to the handler for audit, and sha256hex the 64 hex digits of SHA-256 of
 *   the token (e.g. `printf %s "$TOKEN" | sha256sum`). Blank lines and lines
 *   starting with '#' are skipped. The token itself is never stored; a
 *   presented token is hashed and compared against every entry in constant
 *   time.
 *
 * Limits and timeouts (rr_http_server_config_t)
 *   Connections total and per remote address; request target, header block
 *   and header count; body size (per route); header read time from the
 *   first byte of a request (slow clients), body time without progress,
 *   idle time between requests on a keep-alive connection, TLS handshake
 *   time. Reading stops while a request is with its handler and more than
 *   a header block's worth of pipelined bytes wait, and while more than
 *   max_write_queue bytes of replies wait for the socket.
 *
 * Static files
 *   A directory served under a URL prefix: GET and HEAD, Content-Type from
 *   the extension, ETag and Last-Modified, 304 for If-None-Match /
 *   If-Modified-Since, index.html for a directory, no listings. Path
 *   segments that are empty, start with '.', or hold '/', '\' or NUL are
 *   refused; the last component is opened with O_NOFOLLOW. Files (at most
 *   max_static_bytes) are read in libuv's thread pool.
 *
 * Privacy
 *   One access log line per request at RR_LOG_INFO: method, the route's
 *   pattern (never the raw path: paths carry accession numbers and UIDs),
 *   status, bytes, ms, principal, peer. The raw target is logged only at
 *   RR_LOG_DEBUG. Bodies and tokens are never logged.
 *
 * Threading and callbacks
 *   A server and its requests are used from the loop thread only. Handlers
 *   run from the loop, never inside rr_http_server_* calls; a handler may
 *   call rr_http_reply* on its request at once or later, and
 *   rr_http_server_stop.
 */
#ifndef RR_HTTP_SERVER_H
#define RR_HTTP_SERVER_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/buf.h"
#include "core/error.h"
#include "tls/tls.h"

typedef struct rr_http_server rr_http_server_t;
/* One request, from its handler's call to the reply. */
typedef struct rr_http_req rr_http_req_t;

/* Roles, each including the ones below it. RR_HTTP_PUBLIC: no token needed. */
typedef enum rr_http_role {
  RR_HTTP_PUBLIC = 0,
  RR_HTTP_VIEWER,
  RR_HTTP_OPERATOR,
  RR_HTTP_ADMIN
} rr_http_role_t;

/* Called once per request that passed every check. req is borrowed until
 * it is answered with rr_http_reply*. */
typedef void (*rr_http_handler_fn)(void *ud, rr_http_req_t *req);

typedef struct rr_http_route {
  const char *method;         /* "GET", "POST", ... (GET also answers HEAD); copied */
  const char *pattern;        /* "/api/notifications/{id}/ack": literal segments
                                 and {name} parameters, each a whole segment;
                                 copied */
  rr_http_role_t min_role;    /* RR_HTTP_PUBLIC: no token needed */
  const char *content_type;   /* NULL: any body; else the media type the body must
                                 have ("application/json"; parameters such as
                                 charset ignored); copied */
  size_t max_body;            /* 0: the server's max_body */
  rr_http_handler_fn handler; /* required */
  void *ud;
  int own_auth; /* 1 (with RR_HTTP_PUBLIC): the handler checks the Authorization
                   header itself (e.g. a one-job token); the token file is not
                   consulted and the principal is "-" */
} rr_http_route_t;

typedef struct rr_http_static_dir {
  const char *prefix;      /* URL prefix, "/dashboard" (no trailing '/'); copied */
  const char *dir;         /* directory served; copied */
  rr_http_role_t min_role; /* RR_HTTP_PUBLIC: no token needed */
} rr_http_static_dir_t;

typedef struct rr_http_server_config {
  const char *name;              /* for logs; copied; default "http" */
  const char *host;              /* IP literal to bind; default "127.0.0.1" */
  int port;                      /* 0 = any free port (rr_http_server_port) */
  const rr_tls_config_t *tls;    /* NULL = plain TCP; copied (role must be server);
                                  the files are read again by rr_http_server_reload */
  const char *token_file;        /* NULL = no tokens: only public routes answer 2xx */
  const rr_http_route_t *routes; /* copied */
  size_t nroutes;
  const rr_http_static_dir_t *statics; /* copied */
  size_t nstatics;
  unsigned max_connections;      /* default 1024 */
  unsigned max_per_peer;         /* connections from one address; default 256 */
  size_t max_url_bytes;          /* request target; default 8 KiB */
  size_t max_header_bytes;       /* request line and headers; default 16 KiB */
  unsigned max_headers;          /* header fields; default 100 */
  size_t max_body;               /* default 1 MiB */
  size_t max_static_bytes;       /* largest static file served; default 16 MiB */
  size_t max_write_queue;        /* reply bytes waiting before reading pauses; 1 MiB */
  uint64_t header_timeout_ms;    /* first byte to end of headers; default 10000 */
  uint64_t body_timeout_ms;      /* without a body byte; default 30000 */
  uint64_t idle_timeout_ms;      /* between requests; default 60000; 0 = never */
  uint64_t handshake_timeout_ms; /* TLS; default 10000 */
  uint64_t drain_timeout_ms;     /* on stop, connections still busy after this are
                                    cut; default 5000 */
} rr_http_server_config_t;

/* The authenticated caller of a request. */
typedef struct rr_http_principal {
  const char *name;    /* token name; "-" on a public route without a token */
  rr_http_role_t role; /* RR_HTTP_PUBLIC without a token */
} rr_http_principal_t;

typedef struct rr_http_server_stats {
  uint64_t accepted;    /* connections accepted */
  uint64_t refused;     /* connections refused over capacity (503 or closed) */
  uint64_t tls_refused; /* TLS handshakes refused or timed out */
  unsigned connections; /* open now */
  uint64_t requests;    /* requests answered (by handlers or the server) */
  uint64_t status[6];   /* replies per class: status[2] counts 2xx ... [5] 5xx;
                           [0] counts replies that could not be sent */
  uint64_t bytes_in;    /* plaintext request bytes */
  uint64_t bytes_out;   /* plaintext reply bytes */
  uint64_t timeouts;    /* 408s and idle closes */
} rr_http_server_stats_t;

/* rr_http_server_config_default: the defaults above, no routes. */
void rr_http_server_config_default(rr_http_server_config_t *c);

/* rr_http_server_start: validates cfg, reads the token file and the TLS
 * files, binds host:port and listens on loop (borrowed; outlives the
 * server). *out is owned by the caller and ended with rr_http_server_stop.
 * Errors, with a sentence appended to err (may be NULL): RR_EINVAL (a bad
 * route, pattern, role, host, token file line or TLS setting), -errno for a
 * file that cannot be read, libuv codes (UV_EADDRINUSE ...), RR_ENOMEM.
 * Blocking file reads: call at configuration time. Loop thread. */
int rr_http_server_start(uv_loop_t *loop, const rr_http_server_config_t *cfg,
                         rr_http_server_t **out, rr_buf_t *err);

/* rr_http_server_port: the bound port. */
int rr_http_server_port(const rr_http_server_t *s);

/* rr_http_server_reload: reads the TLS files (for connections made from now
 * on) and the token file (for requests from now on) again. Either failing
 * leaves both as they were and appends the reason to err (may be NULL);
 * errors as for rr_http_server_start. Blocking file reads (small files).
 * Loop thread. */
int rr_http_server_reload(rr_http_server_t *s, rr_buf_t *err);

/* rr_http_server_stop: stops accepting; idle connections close now, busy
 * ones after their current reply (Connection: close) or when
 * drain_timeout_ms passes; the server frees itself once every handle is
 * closed. Requests still with their handlers stay valid; their replies
 * then return UV_ECANCELED. NULL is a no-op. Loop thread. */
void rr_http_server_stop(rr_http_server_t *s);

/* rr_http_server_stats: a snapshot of the counters. Loop thread. */
void rr_http_server_stats(const rr_http_server_t *s, rr_http_server_stats_t *out);

/* Request accessors. Every string returned is borrowed from req: valid
 * until it is answered, NUL-terminated. Loop thread. */

/* rr_http_req_method: "GET", "POST", ... ("HEAD" for a HEAD on a GET route). */
const char *rr_http_req_method(const rr_http_req_t *req);
/* rr_http_req_route: the matched route's pattern, or the prefix followed by "/" and "*" for a
 * static directory. */
const char *rr_http_req_route(const rr_http_req_t *req);
/* rr_http_req_path: the percent-decoded path (may identify a patient). */
const char *rr_http_req_path(const rr_http_req_t *req);
/* rr_http_req_param: the percent-decoded value of the pattern's {name};
 * NULL when the pattern has no such parameter. */
const char *rr_http_req_param(const rr_http_req_t *req, const char *name);
/* rr_http_req_query: the first value of key in the query string ('+' and
 * %XX decoded; "" for "?key" alone); NULL when absent. */
const char *rr_http_req_query(const rr_http_req_t *req, const char *key);
/* rr_http_req_query_count / _at: every query pair in order (index < count). */
size_t rr_http_req_query_count(const rr_http_req_t *req);
void rr_http_req_query_at(const rr_http_req_t *req, size_t i, const char **key, const char **value);
/* rr_http_req_header: the value of the first header called name (ASCII
 * case-insensitive), blanks trimmed; NULL when absent. */
const char *rr_http_req_header(const rr_http_req_t *req, const char *name);
/* rr_http_req_body: the decoded body (chunked or not); "" with *len 0 when
 * none. len may be NULL. */
const char *rr_http_req_body(const rr_http_req_t *req, size_t *len);
/* rr_http_req_principal: who sent it (for audit). Borrowed. */
const rr_http_principal_t *rr_http_req_principal(const rr_http_req_t *req);
/* rr_http_req_peer: "ip:port" of the client. */
const char *rr_http_req_peer(const rr_http_req_t *req);
/* rr_http_req_tls_identity: the verified client certificate's identity;
 * "" without TLS or client certificate. */
const char *rr_http_req_tls_identity(const rr_http_req_t *req);
/* rr_http_req_gone: 1 when the connection has closed (the reply will be a
 * no-op), else 0. */
int rr_http_req_gone(const rr_http_req_t *req);

/* rr_http_reply_ex: answers req and frees it. headers: nheaders extra
 * "Name: value" lines (no CR/LF; not Content-Length, Transfer-Encoding or
 * Connection), copied; content_type NULL = none (with a body:
 * application/octet-stream); body (len bytes) copied. 0 when the reply was
 * queued for the socket; UV_ECANCELED when the client has gone; RR_EINVAL
 * (status outside 200..599, a bad header line: a 500 is sent instead);
 * RR_ENOMEM (the connection is closed). req must not be used afterwards,
 * whatever the result. Loop thread; never calls back synchronously. */
int rr_http_reply_ex(rr_http_req_t *req, int status, const char *const *headers, size_t nheaders,
                     const char *content_type, const void *body, size_t len);
/* rr_http_reply: rr_http_reply_ex without extra headers. */
int rr_http_reply(rr_http_req_t *req, int status, const char *content_type, const void *body,
                  size_t len);
/* rr_http_reply_json: answers with json (steals the reference; NULL sends
 * a 500) serialized compactly as application/json. As rr_http_reply. */
int rr_http_reply_json(rr_http_req_t *req, int status, json_t *json);
/* rr_http_reply_error: answers {"error": code, "message": message} as
 * application/json (both copied; no patient data in them: they are the
 * same for every caller). As rr_http_reply. */
int rr_http_reply_error(rr_http_req_t *req, int status, const char *code, const char *message);

/* rr_http_role_name / rr_http_role_parse: "public", "viewer", "operator",
 * "admin"; parse returns -1 for anything else. Any thread. */
const char *rr_http_role_name(rr_http_role_t role);
int rr_http_role_parse(const char *name);

#endif

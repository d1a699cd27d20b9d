/* HTTP server internals, shared by its files and its tests only.
 *
 *   server_conn.c    request state machine: http-parser callbacks, checks,
 *                    dispatch, reply serialization; no sockets (an hs_io_t
 *                    carries the bytes), so it is unit-tested and fuzzed alone
 *   server_route.c   route patterns, path and query decoding (pure)
 *   server_auth.c    token file and constant-time lookup (pure)
 *   server_static.c  static files, read in libuv's thread pool
 *   server.c         libuv and TLS glue: listen, accept, read, write, timers
 */
#ifndef RR_HTTP_SERVER_INT_H
#define RR_HTTP_SERVER_INT_H

#include <http_parser.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "http/server.h"

typedef struct hs_conn hs_conn_t;

/* A route, compiled: its pattern split into segments; a segment that is a
 * parameter is stored without its braces and flagged in is_param. */
typedef struct hs_route {
  char *method;
  char *pattern;
  char **segs;
  unsigned char *is_param;
  size_t nsegs;
  rr_http_role_t min_role;
  char *content_type;
  size_t max_body;
  rr_http_handler_fn handler;
  void *ud;
  int own_auth;
} hs_route_t;

typedef struct hs_static {
  char *prefix; /* without trailing '/' */
  size_t prefix_len;
  char *dir;
  char *route_name; /* prefix + "/" + "*", for the access log */
  rr_http_role_t min_role;
} hs_static_t;

typedef struct hs_token {
  unsigned char hash[32];
  rr_http_role_t role;
  char name[65];
} hs_token_t;

typedef struct hs_tokens {
  hs_token_t *v;
  size_t n;
} hs_tokens_t;

/* How a connection's bytes leave and when it closes; the socket glue in
 * server.c, a memory sink in tests and the fuzz target. */
typedef struct hs_io {
  /* Queue len bytes (copied) for the peer. 0, or a negative code after
   * which the connection is being closed. */
  int (*send)(hs_conn_t *c, const char *data, size_t len);
  /* Bytes queued and not yet written. */
  size_t (*queued)(hs_conn_t *c);
  /* The last reply is queued: close after it is written. */
  void (*finish)(hs_conn_t *c);
  /* hs_conn_wants_input may have changed. */
  void (*update)(hs_conn_t *c);
} hs_io_t;

struct rr_http_server {
  uv_loop_t *loop; /* NULL for a detached server (tests, fuzzing) */
  uv_tcp_t listener;
  uv_timer_t sweep;
  char name[64];
  rr_http_server_config_t cfg; /* limits; pointers inside are not used */
  hs_route_t *routes;
  size_t nroutes;
  hs_static_t *statics;
  size_t nstatics;
  hs_tokens_t tokens;
  char *token_file;
  /* TLS: the context and a deep copy of its configuration for reloads. */
  rr_tls_ctx_t *tls;
  rr_tls_config_t tls_cfg;
  char **tls_strings;
  size_t ntls_strings;
  hs_conn_t *conns;
  unsigned nconns;
  unsigned noverflow; /* connections over capacity, waiting for their 503 */
  uint64_t next_id;
  int port;
  int open_handles;
  int stopping;
  uint64_t drain_until;                 /* after stop, busy connections are cut then */
  hs_conn_t *kick_head;                 /* connections to process from the loop */
  void (*on_kick)(rr_http_server_t *s); /* glue: schedule hs_server_kick */
  uv_idle_t kicker;                     /* glue: runs hs_server_kick */
  uint64_t now_ms;                      /* detached servers: the clock hs_now returns */
  const char *fixed_date;               /* detached servers: the Date header value */
  rr_http_server_stats_t st;
};

struct rr_http_req {
  hs_conn_t *c; /* holds a reference */
  char method[16];
  int is_head;
  unsigned short http_major, http_minor;
  int keep_alive;
  int has_body; /* chunked, or Content-Length > 0 */
  int headers_done;
  rr_buf_t url;
  rr_buf_t hdrs; /* "name\0value\0" pairs */
  int hdr_state; /* 0 none, 1 in a name, 2 in a value */
  size_t nheaders;
  const char **hnames, **hvalues;
  char *path;    /* decoded */
  rr_buf_t segs; /* decoded segments, each NUL-terminated */
  size_t nsegs;
  rr_buf_t params; /* "name\0value\0" pairs of the matched route */
  size_t nparams;
  rr_buf_t query; /* "key\0value\0" pairs */
  size_t nquery;
  const char **qkeys, **qvalues;
  rr_buf_t body;
  char *route_name;
  const hs_route_t *route;   /* while the server lives */
  const hs_static_t *statik; /* while the server lives */
  rr_http_principal_t principal;
  char principal_name[65];
  int err_status; /* a check failed: answer this at the end of the request */
  const char *err_code, *err_msg;
  const char *allow; /* Allow header value for a 405 */
  char allow_buf[96];
  int close_after;
  uint64_t start_ms;
};

struct hs_conn {
  uv_tcp_t tcp;        /* socket glue only */
  rr_http_server_t *s; /* NULL once unlinked */
  hs_conn_t *prev, *next;
  const hs_io_t *io;
  void *io_ud;
  unsigned refs; /* the open connection is one; each request another */
  uint64_t id;
  char name[64]; /* server name, kept for logs after the server is gone */
  char peer[64];
  char addr[48];
  rr_tls_conn_t *tls;
  http_parser parser;
  rr_buf_t in;
  size_t in_off;
  rr_http_req_t *req;    /* being parsed */
  rr_http_req_t *active; /* with its handler (or being answered) */
  size_t head_bytes;
  int pause;     /* why the parser paused: 1 headers complete, 2 message complete */
  int cb_status; /* a parser callback failed: the status to answer */
  const char *cb_code, *cb_msg;
  hs_conn_t *kick_next;
  int kicked;
  uint64_t nreq; /* requests begun */
  int over_capacity;
  int processing;
  int wait_write;
  int finishing; /* the last reply is queued */
  int eof;       /* the peer will send nothing more */
  int gone;      /* closed: replies are no-ops */
  /* socket glue */
  int closing;
  int reading;
  int shut;      /* uv_shutdown issued */
  int lingering; /* FIN sent: reading and dropping until the peer closes */
  uint64_t linger_until;
  uint64_t accepted_ms;
  uint64_t head_started_ms;
  uint64_t last_body_ms;
  uint64_t last_activity_ms;
};

/* ---- server_route.c ---- */
/* Compiles r into out (strings copied). RR_EINVAL with a sentence in err. */
int hs_route_compile(const rr_http_route_t *r, hs_route_t *out, rr_buf_t *err);
void hs_route_free(hs_route_t *r);
/* Decodes %XX (and '+' as a space when plus) of in[0..n) onto out.
 * RR_EPARSE for a bad escape or a decoded NUL; RR_ELIMIT, RR_ENOMEM. */
int hs_pct_decode(const char *in, size_t n, int plus, rr_buf_t *out);
/* Splits req->url into the decoded path, its segments and the query pairs.
 * RR_EPARSE (not origin or absolute form, bad escapes, "." or ".."
 * segments), RR_ENOMEM. */
int hs_target_parse(rr_http_req_t *req);
/* 1 when the segments of req match r; fills req->params then. */
int hs_route_match(const hs_route_t *r, rr_http_req_t *req);

/* ---- server_auth.c ---- */
/* Parses a token file's text; where names the file in messages. RR_EINVAL
 * with "where:line: ..." in err, RR_ENOMEM. out is replaced on success. */
int hs_tokens_parse(const char *text, size_t len, const char *where, hs_tokens_t *out,
                    rr_buf_t *err);
/* Reads and parses path (at most 1 MiB). -errno, RR_ELIMIT, as parse. */
int hs_tokens_load(const char *path, hs_tokens_t *out, rr_buf_t *err);
void hs_tokens_free(hs_tokens_t *t);
/* The entry whose hash is SHA-256(token); NULL when none. Every entry is
 * compared, in constant time. */
const hs_token_t *hs_tokens_find(const hs_tokens_t *t, const char *token, size_t len);

/* ---- server_conn.c ---- */
/* Builds a server without binding: routes, statics, tokens, limits (the
 * TLS and token file settings are ignored). For rr_http_server_start and
 * for tests; loop may be NULL (then static directories answer 404). */
int hs_server_new(uv_loop_t *loop, const rr_http_server_config_t *cfg, rr_http_server_t **out,
                  rr_buf_t *err);
/* Frees what hs_server_new made (no handles). */
void hs_server_free(rr_http_server_t *s);
/* Milliseconds on the server's clock. */
uint64_t hs_now(const rr_http_server_t *s);
/* A new connection of s (linked into s->conns) with one reference. */
hs_conn_t *hs_conn_new(rr_http_server_t *s, const hs_io_t *io, void *io_ud);
void hs_conn_hold(hs_conn_t *c);
/* Drops a reference; the last one frees c. */
void hs_conn_release(hs_conn_t *c);
/* Plaintext from the peer: buffered and processed. RR_ELIMIT when more is
 * buffered than the connection may hold (the caller closes). */
int hs_conn_input(hs_conn_t *c, const char *data, size_t len);
/* Parses and answers what is buffered, as far as it can. */
void hs_conn_process(hs_conn_t *c);
/* The peer sent its last byte (EOF or close_notify). */
void hs_conn_eof(hs_conn_t *c);
/* Whether reading from the peer should go on. */
int hs_conn_wants_input(const hs_conn_t *c);
/* Applies the header, body and idle timeouts. 1 when c is idle past
 * idle_timeout_ms and should be closed without a reply. */
int hs_conn_tick(hs_conn_t *c, uint64_t now);
/* Nothing in progress: no partial request, no reply pending, no bytes. */
int hs_conn_idle(const hs_conn_t *c);
/* The connection is closed: unlink it from its server, free the request
 * being parsed, make later replies no-ops. Does not drop the reference. */
void hs_conn_closed(hs_conn_t *c);
/* Processes the connections whose reply came outside hs_conn_process
 * (the glue calls it from the loop; tests call it directly). */
void hs_server_kick(rr_http_server_t *s);
/* Called by the glue when queued bytes were written. */
void hs_conn_written(hs_conn_t *c);
/* Sends the server's own JSON error for req and frees it. */
int hs_reply_error(rr_http_req_t *req, int status, const char *code, const char *msg,
                   const char *extra);

/* ---- server_static.c ---- */
/* Answers a GET/HEAD under st from the directory (always replies). */
void hs_static_serve(rr_http_req_t *req, const hs_static_t *st);
/* The relative file path for req under st: validated, decoded segments
 * joined with '/'; "" for the directory itself. RR_EPARSE (a segment that
 * is empty, starts with '.', or holds '/', '\' or NUL), RR_ENOMEM. */
int hs_static_relpath(const rr_http_req_t *req, const hs_static_t *st, rr_buf_t *out);
/* Content-Type for a file name. Static string. */
const char *hs_static_type(const char *name);

#endif

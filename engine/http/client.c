/* HTTP client: libuv glue around libcurl's multi-socket API.
 *
 * curl tells the client which sockets to watch (on_curl_socket: one
 * uv_poll_t per socket) and when to wake it (on_curl_timer: one uv_timer_t);
 * the loop tells curl what happened (curl_multi_socket_action). Transfers
 * move through three lists:
 *
 *   submit --> waiting --pump--> running --curl done / cancel--> done --drain--> callback, free
 *      \__________________(slot free, nobody waiting)__^
 *
 * Every path that ends a transfer puts it on the done list; drain() calls
 * the user back and runs only from loop callbacks (poll, curl timer, kick),
 * never inside an rr_http_client_* call or a curl callback, so a user
 * callback may submit, cancel and close freely. */
#include "http/client.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "core/log.h"

#define MAX_TOKEN_BYTES 16384

typedef enum tstate { T_WAITING, T_RUNNING, T_DONE, T_CALLING } tstate_t;

typedef struct tlist {
  rr_http_transfer_t *head, *tail;
  unsigned n;
} tlist_t;

struct rr_http_transfer {
  rr_http_transfer_t *prev, *next; /* in exactly one of the client's lists */
  rr_http_client_t *c;
  tstate_t state;
  CURL *easy;
  struct curl_slist *hdrs; /* owned; may hold the bearer token: wiped at free */
  char *body_copy;         /* owned copy of the request body, or NULL */
  char *host;              /* for logs */
  rr_http_method_t method;
  rr_http_done_cb cb;
  void *ud;
  rr_http_sink_fn sink;
  void *sink_ud;
  rr_http_source_fn source;
  void *source_ud;
  rr_http_rewind_fn source_rewind;
  rr_http_head_fn head;
  void *head_ud;
  int head_called; /* head ran for the latest response */
  size_t max_body;
  rr_buf_t body; /* buffered response body (limit max_body) */
  rr_buf_t hdr;  /* header block of the latest response (limit max_header_bytes) */
  uint64_t body_bytes;
  int cb_rc;  /* why a write/header/read callback aborted the transfer */
  int status; /* the outcome, once on the done list */
  long http_status;
  CURLcode curl_code;
  uint64_t submitted_ns;
  char errbuf[CURL_ERROR_SIZE];
  char message[CURL_ERROR_SIZE + 64];
};

typedef struct sock {
  uv_poll_t poll; /* first: the handle is the sock */
  curl_socket_t fd;
  rr_http_client_t *c;
  struct sock *prev, *next;
} sock_t;

struct rr_http_client {
  uv_loop_t *loop;
  CURLM *multi;
  CURLSH *share;
  uv_timer_t timer; /* curl's timeout */
  uv_timer_t kick;  /* runs drain/pump/shutdown from the loop */
  rr_http_client_config_t cfg;
  char name[64];
  tlist_t waiting, running, done;
  sock_t *socks;
  unsigned handles; /* uv handles not yet closed (timers, polls) */
  int closing, handles_closing;
  rr_http_client_closed_cb closed_cb;
  void *closed_ud;
  rr_http_client_stats_t st;
};

static const char *const method_names[] = {"GET", "POST", "PUT", "DELETE"};

/* ---- lists --------------------------------------------------------------- */

static void list_push(tlist_t *l, rr_http_transfer_t *t) {
  t->next = NULL;
  t->prev = l->tail;
  if (l->tail)
    l->tail->next = t;
  else
    l->head = t;
  l->tail = t;
  l->n++;
}

static void list_remove(tlist_t *l, rr_http_transfer_t *t) {
  if (t->prev)
    t->prev->next = t->next;
  else
    l->head = t->next;
  if (t->next)
    t->next->prev = t->prev;
  else
    l->tail = t->prev;
  t->prev = t->next = NULL;
  l->n--;
}

static tlist_t *list_of(rr_http_transfer_t *t) {
  switch (t->state) {
  case T_WAITING: return &t->c->waiting;
  case T_RUNNING: return &t->c->running;
  case T_DONE: return &t->c->done;
  case T_CALLING: break;
  }
  return NULL;
}

/* ---- errors -------------------------------------------------------------- */

static const char *code_name(int code) {
  switch (code) {
  case 0: return "ok";
  case RR_HTTP_ECONNLOST: return "connection_lost";
  case RR_HTTP_EPROTOCOL: return "protocol_error";
  case RR_HTTP_ETRANSPORT: return "transport_error";
  case RR_ETLS: return "tls";
  case RR_ELIMIT: return "limit";
  case RR_ENOMEM: return "out_of_memory";
  default: break;
  }
  if (code < 0 && code > -4096)
    return uv_err_name(code);
  return "error";
}

const char *rr_http_client_strerror(int code) {
  switch (code) {
  case RR_HTTP_ECONNLOST: return "connection lost before a complete response";
  case RR_HTTP_EPROTOCOL: return "malformed HTTP response";
  case RR_HTTP_ETRANSPORT: return "HTTP transfer failed";
  default: break;
  }
  if (code < 0 && code > -4096)
    return uv_strerror(code);
  return rr_strerror(code);
}

/* curl's result as a client code (see the header's Outcome). */
static int map_result(rr_http_transfer_t *t, CURLcode res) {
  switch (res) {
  case CURLE_OK: return 0;
  case CURLE_OPERATION_TIMEDOUT: return UV_ETIMEDOUT;
  case CURLE_COULDNT_CONNECT: {
    long e = 0;
    curl_easy_getinfo(t->easy, CURLINFO_OS_ERRNO, &e);
    return e > 0 && e < 4096 ? -(int)e : UV_ECONNREFUSED;
  }
  case CURLE_COULDNT_RESOLVE_HOST: return UV_EAI_NONAME;
  case CURLE_FILESIZE_EXCEEDED: return RR_ELIMIT;
  case CURLE_WRITE_ERROR:
  case CURLE_READ_ERROR:
  case CURLE_ABORTED_BY_CALLBACK: return t->cb_rc ? t->cb_rc : RR_HTTP_ETRANSPORT;
  case CURLE_SEND_FAIL_REWIND: return RR_HTTP_ECONNLOST;
  case CURLE_OUT_OF_MEMORY: return RR_ENOMEM;
  case CURLE_RECV_ERROR:
  case CURLE_SEND_ERROR:
    /* Under TLS 1.3 a server refuses our certificate after our side of the
     * handshake is done: the alert then surfaces as a read error, which
     * OpenSSL describes as "... alert <reason>". */
    if (strstr(t->errbuf, " alert "))
      return RR_ETLS;
    return RR_HTTP_ECONNLOST;
  case CURLE_GOT_NOTHING:
  case CURLE_PARTIAL_FILE: return RR_HTTP_ECONNLOST;
  case CURLE_WEIRD_SERVER_REPLY:
  case CURLE_BAD_CONTENT_ENCODING:
  case CURLE_HTTP2:
  case CURLE_HTTP2_STREAM: return RR_HTTP_EPROTOCOL;
  case CURLE_SSL_CONNECT_ERROR:
  case CURLE_PEER_FAILED_VERIFICATION:
  case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CIPHER:
  case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_CRL_BADFILE:
  case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
  case CURLE_SSL_INVALIDCERTSTATUS:
  case CURLE_SSL_SHUTDOWN_FAILED:
  case CURLE_SSL_ENGINE_NOTFOUND:
  case CURLE_SSL_ENGINE_SETFAILED:
  case CURLE_SSL_ENGINE_INITFAILED:
  case CURLE_SSL_CLIENTCERT:
  case CURLE_USE_SSL_FAILED: return RR_ETLS;
  default: return RR_HTTP_ETRANSPORT;
  }
}

/* Records the outcome in t->status and t->message. */
static void set_outcome(rr_http_transfer_t *t, int status, CURLcode res) {
  t->status = status;
  t->curl_code = res;
  t->http_status = 0;
  if (status == 0) {
    curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &t->http_status);
    t->message[0] = '\0';
  } else if (status == UV_ECANCELED) {
    snprintf(t->message, sizeof t->message, "canceled");
  } else if (res == CURLE_WRITE_ERROR && t->cb_rc == RR_ELIMIT) {
    snprintf(t->message, sizeof t->message, "response over its limit (body %zu bytes, headers %zu)",
             t->max_body, t->hdr.limit);
  } else if (res == CURLE_WRITE_ERROR && t->cb_rc) {
    snprintf(t->message, sizeof t->message, "response aborted: %s",
             rr_http_client_strerror(t->cb_rc));
  } else if ((res == CURLE_READ_ERROR || res == CURLE_ABORTED_BY_CALLBACK) && t->cb_rc) {
    snprintf(t->message, sizeof t->message, "request body aborted: %s",
             rr_http_client_strerror(t->cb_rc));
  } else if (t->errbuf[0]) {
    snprintf(t->message, sizeof t->message, "%s", t->errbuf);
  } else {
    snprintf(t->message, sizeof t->message, "%s",
             res ? curl_easy_strerror(res) : rr_http_client_strerror(status));
  }
}

/* ---- transfers ----------------------------------------------------------- */

static void transfer_free(rr_http_transfer_t *t) {
  if (!t)
    return;
  if (t->easy)
    curl_easy_cleanup(t->easy);
  for (struct curl_slist *h = t->hdrs; h; h = h->next)
    explicit_bzero(h->data, strlen(h->data));
  curl_slist_free_all(t->hdrs);
  free(t->body_copy);
  free(t->host);
  rr_buf_close(&t->body);
  rr_buf_close(&t->hdr);
  free(t);
}

static void on_kick(uv_timer_t *h);

static void kick(rr_http_client_t *c) {
  if (!c->handles_closing)
    uv_timer_start(&c->kick, on_kick, 0, 0);
}

/* Ends t with status, wherever it is. A running transfer leaves the multi
 * handle (curl closes its connection when the response was incomplete). */
static void finish(rr_http_transfer_t *t, int status, CURLcode res) {
  rr_http_client_t *c = t->c;
  tlist_t *l = list_of(t);
  if (!l)
    return;
  list_remove(l, t);
  if (t->state == T_RUNNING)
    curl_multi_remove_handle(c->multi, t->easy);
  set_outcome(t, status, res);
  t->state = T_DONE;
  list_push(&c->done, t);
}

/* Calls back every finished transfer, in order. Loop callbacks only. */
static void drain(rr_http_client_t *c) {
  rr_http_transfer_t *t;
  while ((t = c->done.head) != NULL) {
    list_remove(&c->done, t);
    t->state = T_CALLING;
    rr_http_response_t r;
    memset(&r, 0, sizeof r);
    r.status = t->status;
    r.http_status = t->status == 0 ? t->http_status : 0;
    r.message = t->message;
    r.curl_code = (int)t->curl_code;
    r.headers = t->hdr.data ? t->hdr.data : "";
    r.headers_len = t->hdr.len;
    if (t->status == 0) {
      char *ct = NULL;
      if (curl_easy_getinfo(t->easy, CURLINFO_CONTENT_TYPE, &ct) == CURLE_OK)
        r.content_type = ct;
      r.body = t->body.data ? t->body.data : "";
      r.body_len = t->body.len;
    } else {
      r.body = "";
    }
    r.body_bytes = t->body_bytes;
    r.elapsed_ms = (uv_hrtime() - t->submitted_ns) / 1000000u;
    if (t->status == 0)
      c->st.responses++;
    else if (t->status == UV_ECANCELED)
      c->st.canceled++;
    else
      c->st.failures++;
    rr_log(RR_LOG_DEBUG, "http",
           "event=http_done client=%s method=%s host=%s http_status=%ld status=%s elapsed_ms=%llu",
           c->name, method_names[t->method], t->host, r.http_status, code_name(t->status),
           (unsigned long long)r.elapsed_ms);
    t->cb(t->ud, t, &r);
    transfer_free(t);
  }
}

static void start(rr_http_transfer_t *t) {
  rr_http_client_t *c = t->c;
  CURLMcode mc = curl_multi_add_handle(c->multi, t->easy);
  if (mc != CURLM_OK) {
    t->state = T_DONE;
    set_outcome(t, mc == CURLM_OUT_OF_MEMORY ? RR_ENOMEM : RR_HTTP_ETRANSPORT, CURLE_OK);
    snprintf(t->message, sizeof t->message, "%s", curl_multi_strerror(mc));
    list_push(&c->done, t);
    kick(c);
    return;
  }
  t->state = T_RUNNING;
  list_push(&c->running, t);
  if (c->running.n > c->st.max_running)
    c->st.max_running = c->running.n;
}

/* Starts waiting transfers while slots are free. */
static void pump(rr_http_client_t *c) {
  while (!c->closing && c->waiting.head && c->running.n < c->cfg.max_concurrent) {
    rr_http_transfer_t *t = c->waiting.head;
    list_remove(&c->waiting, t);
    start(t);
  }
}

/* After curl ran: collect finished transfers, call back, start waiting ones. */
static void after_curl(rr_http_client_t *c) {
  CURLMsg *m;
  int left;
  while (c->multi && (m = curl_multi_info_read(c->multi, &left)) != NULL) {
    if (m->msg != CURLMSG_DONE)
      continue;
    char *p = NULL;
    CURLcode res = m->data.result;
    curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &p);
    rr_http_transfer_t *t = (rr_http_transfer_t *)(void *)p;
    finish(t, map_result(t, res), res);
  }
  drain(c);
  pump(c);
}

/* ---- curl callbacks (no rr_http_client_* or curl_multi_* calls inside) --- */

static size_t on_body(char *data, size_t size, size_t n, void *ud) {
  rr_http_transfer_t *t = ud;
  size_t len = size * n;
  if (len > t->max_body - t->body_bytes) {
    t->cb_rc = RR_ELIMIT;
    return 0;
  }
  t->body_bytes += len;
  if (t->sink) {
    int rc = t->sink(t->sink_ud, data, len);
    if (rc) {
      t->cb_rc = rc < 0 ? rc : RR_EINVAL;
      return 0;
    }
    return len;
  }
  int rc = rr_buf_append(&t->body, data, len);
  if (rc) {
    t->cb_rc = rc;
    return 0;
  }
  return len;
}

/* The header block of a final (non-1xx) response is complete: tells head. */
static int call_head(rr_http_transfer_t *t) {
  long code = 0;
  curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &code);
  if (code >= 100 && code < 200)
    return 0;
  t->head_called = 1;
  rr_http_response_t r;
  memset(&r, 0, sizeof r);
  r.http_status = code;
  r.message = "";
  r.headers = t->hdr.data ? t->hdr.data : "";
  r.headers_len = t->hdr.len;
  r.body = "";
  char *ct = NULL;
  if (curl_easy_getinfo(t->easy, CURLINFO_CONTENT_TYPE, &ct) == CURLE_OK)
    r.content_type = ct;
  r.elapsed_ms = (uv_hrtime() - t->submitted_ns) / 1000000u;
  int rc = t->head(t->head_ud, &r);
  return rc < 0 ? rc : rc ? RR_EINVAL : 0;
}

static size_t on_header(char *data, size_t size, size_t n, void *ud) {
  rr_http_transfer_t *t = ud;
  size_t len = size * n;
  if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {
    /* A status line starts a new response (after a 1xx): only the final
     * response's headers are kept. */
    rr_buf_reset(&t->hdr);
    t->body_bytes = 0;
    t->head_called = 0;
    return len;
  }
  if ((len == 2 && data[0] == '\r') || (len == 1 && data[0] == '\n')) {
    if (t->head && !t->head_called) {
      int rc = call_head(t);
      if (rc) {
        t->cb_rc = rc;
        return 0;
      }
    }
    return len;
  }
  int rc = rr_buf_append(&t->hdr, data, len);
  if (rc) {
    t->cb_rc = rc;
    return 0;
  }
  return len;
}

static size_t on_read(char *buf, size_t size, size_t n, void *ud) {
  rr_http_transfer_t *t = ud;
  size_t cap = size * n, len = 0;
  int rc = t->source(t->source_ud, buf, cap, &len);
  if (rc == 0 && len > cap)
    rc = RR_EINVAL;
  if (rc) {
    t->cb_rc = rc < 0 ? rc : RR_EINVAL;
    return CURL_READFUNC_ABORT;
  }
  return len;
}

static int on_seek(void *ud, curl_off_t offset, int origin) {
  rr_http_transfer_t *t = ud;
  if (offset != 0 || origin != SEEK_SET || !t->source_rewind)
    return CURL_SEEKFUNC_CANTSEEK;
  return t->source_rewind(t->source_ud) == 0 ? CURL_SEEKFUNC_OK : CURL_SEEKFUNC_CANTSEEK;
}

/* The safe point: once closing, the last handle's close callback frees c. */
static void handle_gone(rr_http_client_t *c) {
  c->handles--;
  if (!c->handles_closing || c->handles > 0)
    return;
  rr_http_client_closed_cb cb = c->closed_cb;
  void *ud = c->closed_ud;
  free(c);
  curl_global_cleanup();
  if (cb)
    cb(ud);
}

static void on_sock_closed(uv_handle_t *h) {
  sock_t *s = (sock_t *)h;
  rr_http_client_t *c = s->c;
  free(s);
  c->st.sockets--;
  handle_gone(c);
}

static void sock_close(rr_http_client_t *c, sock_t *s) {
  if (s->prev)
    s->prev->next = s->next;
  else
    c->socks = s->next;
  if (s->next)
    s->next->prev = s->prev;
  s->prev = s->next = NULL;
  /* Stopping removes the fd from the backend at once, so curl may close it
   * and a new socket may get the same number before the close callback. */
  uv_poll_stop(&s->poll);
  uv_close((uv_handle_t *)&s->poll, on_sock_closed);
}

static void on_poll(uv_poll_t *p, int status, int events) {
  sock_t *s = (sock_t *)p;
  rr_http_client_t *c = s->c;
  int flags = 0;
  /* On a socket error libuv stops the handle and reports no events. curl
   * still reads and writes when ERR comes with IN/OUT, and so reports the
   * socket's own error (reset, TLS alert) instead of a bare poll failure. */
  if (status < 0)
    flags = CURL_CSELECT_ERR | CURL_CSELECT_IN | CURL_CSELECT_OUT;
  if (events & UV_READABLE)
    flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE)
    flags |= CURL_CSELECT_OUT;
  int running;
  if (c->multi)
    curl_multi_socket_action(c->multi, s->fd, flags, &running);
  after_curl(c);
}

static int on_curl_socket(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp) {
  rr_http_client_t *c = userp;
  sock_t *s = socketp;
  (void)e;
  if (what == CURL_POLL_REMOVE) {
    if (s) {
      if (!c->handles_closing) /* not while curl_multi_cleanup runs */
        curl_multi_assign(c->multi, fd, NULL);
      sock_close(c, s);
    }
    return 0;
  }
  if (c->handles_closing)
    return 0;
  if (!s) {
    s = calloc(1, sizeof *s);
    if (!s)
      return -1;
    if (uv_poll_init_socket(c->loop, &s->poll, fd) != 0) {
      free(s);
      return -1;
    }
    s->fd = fd;
    s->c = c;
    s->next = c->socks;
    if (c->socks)
      c->socks->prev = s;
    c->socks = s;
    c->handles++;
    c->st.sockets++;
    curl_multi_assign(c->multi, fd, s);
  }
  int ev = 0;
  if (what & CURL_POLL_IN)
    ev |= UV_READABLE;
  if (what & CURL_POLL_OUT)
    ev |= UV_WRITABLE;
  return uv_poll_start(&s->poll, ev, on_poll) == 0 ? 0 : -1;
}

static void on_timeout(uv_timer_t *h) {
  rr_http_client_t *c = h->data;
  int running;
  if (c->multi)
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  after_curl(c);
}

static int on_curl_timer(CURLM *m, long timeout_ms, void *userp) {
  rr_http_client_t *c = userp;
  (void)m;
  if (c->handles_closing)
    return 0;
  if (timeout_ms < 0)
    uv_timer_stop(&c->timer);
  else
    uv_timer_start(&c->timer, on_timeout, (uint64_t)timeout_ms, 0); /* 0: next iteration */
  return 0;
}

/* ---- close --------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h) {
  handle_gone(h->data);
}

/* From the kick timer once closing: last callbacks, then curl and the
 * handles go; c is freed by the last close callback. */
static void shutdown_client(rr_http_client_t *c) {
  drain(c);
  if (c->handles_closing)
    return;
  c->handles_closing = 1;
  rr_log(RR_LOG_DEBUG, "http", "event=client_closed client=%s", c->name);
  /* Every easy handle is gone (drain freed them); cleaning up the multi
   * handle closes the cached connections and reports their sockets. */
  curl_multi_cleanup(c->multi);
  c->multi = NULL;
  curl_share_cleanup(c->share);
  c->share = NULL;
  while (c->socks)
    sock_close(c, c->socks);
  uv_timer_stop(&c->timer);
  uv_timer_stop(&c->kick);
  uv_close((uv_handle_t *)&c->timer, on_handle_closed);
  uv_close((uv_handle_t *)&c->kick, on_handle_closed);
}

static void on_kick(uv_timer_t *h) {
  rr_http_client_t *c = h->data;
  if (c->closing) {
    shutdown_client(c);
    return;
  }
  drain(c);
  pump(c);
}

void rr_http_client_close(rr_http_client_t *c, rr_http_client_closed_cb closed_cb, void *ud) {
  if (!c || c->closing)
    return;
  c->closing = 1;
  c->closed_cb = closed_cb;
  c->closed_ud = ud;
  for (rr_http_transfer_t *t = c->done.head; t; t = t->next)
    set_outcome(t, UV_ECANCELED, CURLE_OK);
  while (c->running.head)
    finish(c->running.head, UV_ECANCELED, CURLE_OK);
  while (c->waiting.head)
    finish(c->waiting.head, UV_ECANCELED, CURLE_OK);
  kick(c);
}

void rr_http_client_cancel(rr_http_transfer_t *t) {
  if (!t)
    return;
  switch (t->state) {
  case T_WAITING:
  case T_RUNNING: finish(t, UV_ECANCELED, CURLE_OK); break;
  case T_DONE:
    if (t->status != UV_ECANCELED)
      set_outcome(t, UV_ECANCELED, CURLE_OK);
    break;
  case T_CALLING: return;
  }
  kick(t->c);
}

/* ---- public -------------------------------------------------------------- */

void rr_http_client_config_default(rr_http_client_config_t *c) {
  memset(c, 0, sizeof *c);
  c->name = "http";
  c->max_concurrent = 8;
  c->max_queue = 10000;
}

void rr_http_client_request_default(rr_http_request_t *r) {
  memset(r, 0, sizeof *r);
  r->method = RR_HTTP_GET;
  r->connect_timeout_ms = 10000;
  r->timeout_ms = 60000;
  r->max_response_bytes = (size_t)16 << 20;
  r->max_header_bytes = (size_t)64 << 10;
}

int rr_http_client_new(uv_loop_t *loop, const rr_http_client_config_t *cfg,
                       rr_http_client_t **out) {
  rr_http_client_config_t def;
  rr_http_client_t *c = NULL;
  int rc = 0;
  if (!cfg) {
    rr_http_client_config_default(&def);
    cfg = &def;
  }
  if (!loop || !out || cfg->max_concurrent == 0)
    return RR_EINVAL;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
    return RR_HTTP_ETRANSPORT;
  c = calloc(1, sizeof *c);
  if (!c) {
    rc = RR_ENOMEM;
    goto out;
  }
  c->loop = loop;
  c->cfg = *cfg;
  snprintf(c->name, sizeof c->name, "%s", cfg->name ? cfg->name : "http");
  c->cfg.name = c->name;
  c->multi = curl_multi_init();
  c->share = curl_share_init();
  if (!c->multi || !c->share) {
    rc = RR_ENOMEM;
    goto out;
  }
  curl_share_setopt(c->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
  curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
  curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
  curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
  curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
  curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS, (long)cfg->max_concurrent);
  /* Timer init cannot fail on a live loop; from here on c is freed only
   * through its close callbacks. */
  uv_timer_init(loop, &c->timer);
  uv_timer_init(loop, &c->kick);
  c->timer.data = c;
  c->kick.data = c;
  c->handles = 2;
  *out = c;
  c = NULL;
out:
  if (c) {
    if (c->multi)
      curl_multi_cleanup(c->multi);
    if (c->share)
      curl_share_cleanup(c->share);
    free(c);
  }
  if (rc)
    curl_global_cleanup();
  return rc;
}

static int has_crlf(const char *s) {
  return strpbrk(s, "\r\n") != NULL;
}

/* Appends "prefix value" to the header list. */
static int add_header(struct curl_slist **list, const char *prefix, const char *value) {
  size_t n = strlen(prefix) + strlen(value) + 1;
  char *line = malloc(n);
  if (!line)
    return RR_ENOMEM;
  snprintf(line, n, "%s%s", prefix, value);
  struct curl_slist *l = curl_slist_append(*list, line);
  explicit_bzero(line, n);
  free(line);
  if (!l)
    return RR_ENOMEM;
  *list = l;
  return 0;
}

/* Checks req's URL: parsable, http or https; *host gets the host name. */
static int check_url(const char *url, char **host) {
  CURLU *u = curl_url();
  char *scheme = NULL, *h = NULL;
  int rc = 0;
  if (!u)
    return RR_ENOMEM;
  if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_HOST, &h, 0) != CURLUE_OK ||
      (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0)) {
    rc = RR_EINVAL;
    goto out;
  }
  *host = strdup(h);
  if (!*host)
    rc = RR_ENOMEM;
out:
  curl_free(scheme);
  curl_free(h);
  curl_url_cleanup(u);
  return rc;
}

static int check_request(const rr_http_request_t *req) {
  if (!req->url || req->method > RR_HTTP_DELETE || req->connect_timeout_ms == 0 ||
      req->timeout_ms == 0 || req->max_response_bytes == 0 || req->max_header_bytes == 0 ||
      (req->body_len && !req->body) || (req->method == RR_HTTP_GET && req->body_len) ||
      (req->source && (req->method == RR_HTTP_GET || req->body || req->body_len)) ||
      (req->nheaders && !req->headers) ||
      (req->bearer_token && (!req->bearer_token[0] || has_crlf(req->bearer_token))) ||
      (req->content_type && has_crlf(req->content_type)))
    return RR_EINVAL;
  for (size_t i = 0; i < req->nheaders; i++) {
    const char *h = req->headers[i];
    if (!h || has_crlf(h) || !strchr(h, ':') || h[0] == ':')
      return RR_EINVAL;
  }
  return 0;
}

static long ms_long(uint64_t ms) {
  return ms > (uint64_t)LONG_MAX ? LONG_MAX : (long)ms;
}

/* Builds t's easy handle and header list from req. */
static int build_easy(rr_http_transfer_t *t, const rr_http_request_t *req, CURLSH *share) {
  CURL *e = curl_easy_init();
  int rc;
  if (!e)
    return RR_ENOMEM;
  t->easy = e;
  /* An empty Expect: stops curl waiting for 100-continue before a body. */
  if ((rc = add_header(&t->hdrs, "Expect:", "")) != 0)
    return rc;
  int has_body =
      req->method == RR_HTTP_POST || req->method == RR_HTTP_PUT || req->body_len || req->source;
  if (req->content_type || has_body) {
    rc = add_header(&t->hdrs, "Content-Type: ",
                    req->content_type ? req->content_type : "application/octet-stream");
    if (rc)
      return rc;
  }
  if (req->bearer_token &&
      (rc = add_header(&t->hdrs, "Authorization: Bearer ", req->bearer_token)) != 0)
    return rc;
  if (req->source && req->source_len == RR_HTTP_LENGTH_UNKNOWN &&
      (rc = add_header(&t->hdrs, "Transfer-Encoding: chunked", "")) != 0)
    return rc;
  for (size_t i = 0; i < req->nheaders; i++)
    if ((rc = add_header(&t->hdrs, "", req->headers[i])) != 0)
      return rc;
  const char *body = req->body_len ? req->body : "";
  if (req->body_len && !req->body_borrowed) {
    t->body_copy = malloc(req->body_len);
    if (!t->body_copy)
      return RR_ENOMEM;
    memcpy(t->body_copy, req->body, req->body_len);
    body = t->body_copy;
  }
  CURLcode r = CURLE_OK;
#define SET(opt, val)                                                                              \
  do {                                                                                             \
    if (r == CURLE_OK)                                                                             \
      r = curl_easy_setopt(e, opt, val);                                                           \
  } while (0)
  SET(CURLOPT_PRIVATE, (void *)t);
  SET(CURLOPT_URL, req->url);
  SET(CURLOPT_NOSIGNAL, 1L);
  SET(CURLOPT_ERRORBUFFER, t->errbuf);
  SET(CURLOPT_WRITEFUNCTION, on_body);
  SET(CURLOPT_WRITEDATA, (void *)t);
  SET(CURLOPT_HEADERFUNCTION, on_header);
  SET(CURLOPT_HEADERDATA, (void *)t);
  SET(CURLOPT_SHARE, share);
  SET(CURLOPT_HTTPHEADER, t->hdrs);
  SET(CURLOPT_USERAGENT, "radrelay");
  SET(CURLOPT_FOLLOWLOCATION, 0L);
  SET(CURLOPT_PROXY, "");
  SET(CURLOPT_TCP_KEEPALIVE, 1L);
  SET(CURLOPT_CONNECTTIMEOUT_MS, ms_long(req->connect_timeout_ms));
  SET(CURLOPT_TIMEOUT_MS, ms_long(req->timeout_ms));
  if ((uint64_t)req->max_response_bytes < (uint64_t)INT64_MAX)
    SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)req->max_response_bytes);
  SET(CURLOPT_SSL_VERIFYPEER, 1L);
  SET(CURLOPT_SSL_VERIFYHOST, 2L);
  SET(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
  if (req->ca_file)
    SET(CURLOPT_CAINFO, req->ca_file);
  if (req->cert_file) {
    SET(CURLOPT_SSLCERT, req->cert_file);
    SET(CURLOPT_SSLCERTTYPE, "PEM");
    SET(CURLOPT_SSLKEY, req->key_file ? req->key_file : req->cert_file);
    SET(CURLOPT_SSLKEYTYPE, "PEM");
  }
  if (req->source) {
    /* POST semantics with the body from the read callback; the method
     * name is set below for PUT and DELETE. */
    curl_off_t size =
        req->source_len == RR_HTTP_LENGTH_UNKNOWN || req->source_len > (uint64_t)INT64_MAX
            ? (curl_off_t)-1
            : (curl_off_t)req->source_len;
    SET(CURLOPT_POST, 1L);
    SET(CURLOPT_READFUNCTION, on_read);
    SET(CURLOPT_READDATA, (void *)t);
    SET(CURLOPT_SEEKFUNCTION, on_seek);
    SET(CURLOPT_SEEKDATA, (void *)t);
    SET(CURLOPT_POSTFIELDSIZE_LARGE, size);
    if (req->method == RR_HTTP_PUT)
      SET(CURLOPT_CUSTOMREQUEST, "PUT");
    else if (req->method == RR_HTTP_DELETE)
      SET(CURLOPT_CUSTOMREQUEST, "DELETE");
  } else {
    switch (req->method) {
    case RR_HTTP_GET: SET(CURLOPT_HTTPGET, 1L); break;
    case RR_HTTP_POST:
    case RR_HTTP_PUT:
      SET(CURLOPT_POST, 1L);
      SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
      SET(CURLOPT_POSTFIELDS, body);
      if (req->method == RR_HTTP_PUT)
        SET(CURLOPT_CUSTOMREQUEST, "PUT");
      break;
    case RR_HTTP_DELETE:
      SET(CURLOPT_CUSTOMREQUEST, "DELETE");
      if (req->body_len) {
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
        SET(CURLOPT_POSTFIELDS, body);
      }
      break;
    }
  }
#undef SET
  if (r == CURLE_OUT_OF_MEMORY)
    return RR_ENOMEM;
  return r == CURLE_OK ? 0 : RR_EINVAL;
}

int rr_http_client_submit(rr_http_client_t *c, const rr_http_request_t *req, rr_http_done_cb cb,
                          void *ud, rr_http_transfer_t **out) {
  rr_http_transfer_t *t = NULL;
  int rc = 0;
  if (!c || !req || !cb) {
    rc = RR_EINVAL;
    goto out;
  }
  if (c->closing) {
    rc = UV_ECANCELED;
    goto out;
  }
  if ((rc = check_request(req)) != 0)
    goto out;
  int must_wait = c->waiting.head || c->running.n >= c->cfg.max_concurrent;
  if (must_wait && c->waiting.n >= c->cfg.max_queue) {
    rc = RR_ELIMIT;
    goto out;
  }
  t = calloc(1, sizeof *t);
  if (!t) {
    rc = RR_ENOMEM;
    goto out;
  }
  t->c = c;
  t->method = req->method;
  t->cb = cb;
  t->ud = ud;
  t->sink = req->sink;
  t->sink_ud = req->sink_ud;
  t->source = req->source;
  t->source_ud = req->source_ud;
  t->source_rewind = req->source_rewind;
  t->head = req->head;
  t->head_ud = req->head_ud;
  t->max_body = req->max_response_bytes;
  rr_buf_init(&t->body, req->max_response_bytes);
  rr_buf_init(&t->hdr, req->max_header_bytes);
  if ((rc = check_url(req->url, &t->host)) != 0 || (rc = build_easy(t, req, c->share)) != 0)
    goto out;
  t->submitted_ns = uv_hrtime();
  c->st.submitted++;
  if (out)
    *out = t;
  if (must_wait) {
    t->state = T_WAITING;
    list_push(&c->waiting, t);
  } else {
    start(t);
  }
  t = NULL;
out:
  transfer_free(t);
  return rc;
}

void rr_http_client_stats(const rr_http_client_t *c, rr_http_client_stats_t *out) {
  *out = c->st;
  out->running = c->running.n;
  out->waiting = c->waiting.n;
}

/* ---- response headers ---------------------------------------------------- */

static int is_blank(char ch) {
  return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

int rr_http_response_header(const rr_http_response_t *r, const char *name, const char **value,
                            size_t *len) {
  size_t nlen = strlen(name);
  const char *p = r->headers, *end = r->headers + r->headers_len;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    const char *next = eol ? eol + 1 : end;
    if ((size_t)(next - p) > nlen && p[nlen] == ':' && strncasecmp(p, name, nlen) == 0) {
      const char *v = p + nlen + 1, *ve = next;
      while (v < ve && is_blank(*v))
        v++;
      while (ve > v && is_blank(ve[-1]))
        ve--;
      *value = v;
      *len = (size_t)(ve - v);
      return 0;
    }
    p = next;
  }
  return RR_ENOTFOUND;
}

/* ---- secrets from files -------------------------------------------------- */

int rr_http_client_read_token(const char *path, char **out, rr_buf_t *err) {
  char *buf = NULL;
  size_t len = 0;
  int rc = 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    rc = -errno;
    if (err)
      rr_buf_printf(err, "cannot open token file %s: %s", path, rr_strerror(rc));
    goto out;
  }
  buf = malloc(MAX_TOKEN_BYTES + 2);
  if (!buf) {
    rc = RR_ENOMEM;
    goto out;
  }
  for (;;) {
    ssize_t n = read(fd, buf + len, MAX_TOKEN_BYTES + 1 - len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      rc = -errno;
      if (err)
        rr_buf_printf(err, "cannot read token file %s: %s", path, rr_strerror(rc));
      goto out;
    }
    if (n == 0)
      break;
    len += (size_t)n;
    if (len > MAX_TOKEN_BYTES) {
      rc = RR_ELIMIT;
      if (err)
        rr_buf_printf(err, "token file %s is over %d bytes", path, MAX_TOKEN_BYTES);
      goto out;
    }
  }
  while (len > 0 && is_blank(buf[len - 1]))
    len--;
  buf[len] = '\0';
  if (len == 0) {
    rc = RR_EINVAL;
    if (err)
      rr_buf_printf(err, "token file %s is empty", path);
    goto out;
  }
  if (strlen(buf) != len || has_crlf(buf)) {
    rc = RR_EINVAL;
    if (err)
      rr_buf_printf(err, "token file %s holds more than one line (or a NUL byte)", path);
    goto out;
  }
  *out = buf;
  buf = NULL;
out:
  if (buf) {
    explicit_bzero(buf, MAX_TOKEN_BYTES + 2);
    free(buf);
  }
  if (fd >= 0)
    close(fd);
  return rc;
}

void rr_http_client_token_free(char *token) {
  if (!token)
    return;
  explicit_bzero(token, MAX_TOKEN_BYTES + 2);
  free(token);
}

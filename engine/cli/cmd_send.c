/* radrelay send HOST:PORT FILE...: a plain MLLP client for analysts and
 * scripts. Sends each message, waits for its ACK (checking that MSA-2 names
 * the message's MSH-10) and prints one line per message. Blocking sockets:
 * this is a command-line tool, not engine code. */
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/error.h"
#include "hl7/hl7.h"
#include "mllp/mllp.h"
#include "tls/tls.h"

typedef struct send_ctx {
  int fd;
  rr_tls_conn_t *tls; /* NULL: plain TCP */
  long timeout_ms;
  int verbose;
  int quiet;
  rr_hl7_msg_t *m;
  rr_hl7_msg_t *ack;
  rr_mllp_deframer_t df;
  rr_buf_t reply; /* the last frame received */
  int got;
  size_t sent, positive, negative, failed;
} send_ctx_t;

static int on_ack_frame(void *ud, rr_mllp_event_t ev, const char *data, size_t len, uint64_t off) {
  send_ctx_t *s = ud;
  (void)off;
  if (ev != RR_MLLP_FRAME)
    return 0;
  rr_buf_reset(&s->reply);
  rr_buf_append(&s->reply, data, len);
  s->got = 1;
  return 1; /* one ACK per message */
}

static int connect_to(const char *target, long timeout_ms) {
  char host[256];
  snprintf(host, sizeof host, "%s", target);
  char *colon = strrchr(host, ':');
  if (!colon) {
    fprintf(stderr, "radrelay send: target must be HOST:PORT\n");
    return -1;
  }
  *colon = '\0';
  const char *port = colon + 1;
  char *h = host;
  if (h[0] == '[') { /* [::1]:2575 */
    h++;
    char *rb = strchr(h, ']');
    if (rb)
      *rb = '\0';
  }
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_socktype = SOCK_STREAM;
  int gr = getaddrinfo(h, port, &hints, &res);
  if (gr) {
    fprintf(stderr, "radrelay send: %s: %s\n", target, gai_strerror(gr));
    return -1;
  }
  int fd = -1;
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0)
      continue;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
      break;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) {
    fprintf(stderr, "radrelay send: cannot connect to %s\n", target);
    return -1;
  }
  struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

static int write_all(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0)
      return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* ---- transport: plain or TLS over the blocking socket --------------------- */

static int pump_out(send_ctx_t *s) {
  const char *p;
  size_t n;
  for (rr_tls_pending_out(s->tls, &p, &n); n; rr_tls_pending_out(s->tls, &p, &n)) {
    if (write_all(s->fd, p, n))
      return -1;
    rr_tls_consume_out(s->tls, n);
  }
  return 0;
}

static void tls_failed(send_ctx_t *s, int rc) {
  if (rc == RR_ETLS)
    fprintf(stderr, "radrelay send: TLS refused: %s\n", rr_tls_reason(s->tls));
  else
    fprintf(stderr, "radrelay send: TLS: %s\n", rr_strerror(rc));
}

/* Reads plaintext (or bytes, without TLS). 0 on EOF/error. */
static ssize_t xrecv(send_ctx_t *s, char *buf, size_t cap) {
  if (!s->tls)
    return recv(s->fd, buf, cap, 0);
  for (;;) {
    size_t got = 0;
    int rc = rr_tls_read(s->tls, buf, cap, &got);
    pump_out(s);
    if (rc == 0 && got)
      return (ssize_t)got;
    if (rc != 0 && rc != RR_EAGAIN) {
      if (rc != RR_ETLSCLOSED)
        tls_failed(s, rc);
      return 0;
    }
    char raw[65536];
    ssize_t n = recv(s->fd, raw, sizeof raw, 0);
    if (n <= 0)
      return n;
    if ((rc = rr_tls_feed(s->tls, raw, (size_t)n)) != 0) {
      tls_failed(s, rc);
      return 0;
    }
  }
}

static int xsend(send_ctx_t *s, const char *p, size_t n) {
  if (!s->tls)
    return write_all(s->fd, p, n);
  int rc = rr_tls_write(s->tls, p, n);
  if (rc) {
    tls_failed(s, rc);
    return -1;
  }
  return pump_out(s);
}

static int tls_connect(send_ctx_t *s) {
  int rc = rr_tls_handshake(s->tls);
  while (!rr_tls_handshake_done(s->tls)) {
    if (pump_out(s))
      return -1;
    if (rc != 0 && rc != RR_EAGAIN) {
      tls_failed(s, rc);
      return -1;
    }
    char raw[65536];
    ssize_t n = recv(s->fd, raw, sizeof raw, 0);
    if (n <= 0) {
      fprintf(stderr, "radrelay send: connection closed during the TLS handshake\n");
      return -1;
    }
    rc = rr_tls_feed(s->tls, raw, (size_t)n);
    if (rc == 0)
      rc = rr_tls_handshake(s->tls);
  }
  return pump_out(s);
}

static int send_one(void *ud, rr_hl7_item_kind_t kind, const char *data, size_t len, size_t off) {
  send_ctx_t *s = ud;
  (void)off;
  if (kind != RR_HL7_ITEM_MESSAGE)
    return 0;
  /* Normalize segment terminators to CR; a message that does not parse is
   * still sent (the receiver's NAK is the point of sending it). */
  rr_buf_t body, frame;
  rr_buf_init(&body, (size_t)1 << 30);
  rr_buf_init(&frame, (size_t)1 << 30);
  char ctl[128] = "";
  if (rr_hl7_parse(s->m, data, len, NULL, NULL) == 0) {
    rr_hl7_serialize(s->m, &body);
  } else {
    for (size_t i = 0; i < len; i++)
      rr_buf_putc(&body, data[i] == '\n' ? '\r' : data[i]);
  }
  rr_hl7_slice_t v;
  if (rr_hl7_get_raw_s(s->m, "MSH-10", &v) == 0)
    snprintf(ctl, sizeof ctl, "%.*s", (int)v.len, v.p);
  rr_mllp_frame(NULL, body.data, body.len, &frame);
  int rc = xsend(s, frame.data, frame.len);
  s->sent++;
  s->got = 0;
  char buf[65536];
  while (rc == 0 && !s->got) {
    ssize_t n = xrecv(s, buf, sizeof buf);
    if (n <= 0) {
      rc = -1;
      break;
    }
    rr_mllp_deframer_feed(&s->df, buf, (size_t)n, on_ack_frame, s);
  }
  rr_buf_close(&body);
  rr_buf_close(&frame);
  if (rc) {
    printf("%s\tNO-ACK\t(connection closed or no answer in %ld ms)\n", ctl, s->timeout_ms);
    s->failed++;
    return 1;
  }
  rr_hl7_parse(s->ack, s->reply.data, s->reply.len, NULL, NULL);
  rr_hl7_slice_t code = {"", 0}, ref = {"", 0}, text = {"", 0};
  rr_hl7_get_raw_s(s->ack, "MSA-1", &code);
  rr_hl7_get_raw_s(s->ack, "MSA-2", &ref);
  rr_hl7_get_raw_s(s->ack, "ERR-8", &text);
  if (!text.len)
    rr_hl7_get_raw_s(s->ack, "MSA-3", &text);
  if (ref.len != strlen(ctl) || memcmp(ref.p, ctl, ref.len) != 0) {
    printf("%s\tMISMATCH\tACK names control id '%.*s'\n", ctl, (int)ref.len, ref.p);
    s->failed++;
    return 1;
  }
  int ok = code.len == 2 && (memcmp(code.p, "AA", 2) == 0 || memcmp(code.p, "CA", 2) == 0);
  ok ? s->positive++ : s->negative++;
  rr_buf_t t;
  rr_buf_init(&t, 1 << 16);
  if (text.len && rr_hl7_decode(s->ack, text.p, text.len, &t) != 0)
    rr_buf_append(&t, text.p, text.len);
  if (!s->quiet)
    printf("%s\t%.*s%s%s\n", ctl, (int)code.len, code.p, t.len ? "\t" : "", t.len ? t.data : "");
  rr_buf_close(&t);
  if (s->verbose) {
    for (size_t i = 0; i < s->reply.len; i++)
      putchar(s->reply.data[i] == '\r' ? '\n' : s->reply.data[i]);
  }
  return 0;
}

int rr_cmd_send(int argc, char **argv) {
  send_ctx_t s = {0};
  s.timeout_ms = 10000;
  int i = 0;
  int use_tls = 0;
  rr_tls_config_t tc = {0};
  tc.role = RR_TLS_CLIENT;
  for (; i < argc && argv[i][0] == '-'; i++) {
    if (strcmp(argv[i], "--tls") == 0)
      use_tls = 1;
    else if (strcmp(argv[i], "--ca") == 0 && i + 1 < argc)
      tc.ca_file = argv[++i], use_tls = 1;
    else if (strcmp(argv[i], "--cert") == 0 && i + 1 < argc)
      tc.cert_file = argv[++i], use_tls = 1;
    else if (strcmp(argv[i], "--key") == 0 && i + 1 < argc)
      tc.key_file = argv[++i], use_tls = 1;
    else if (strcmp(argv[i], "--server-name") == 0 && i + 1 < argc)
      tc.server_name = argv[++i], use_tls = 1;
    else if (strcmp(argv[i], "-v") == 0)
      s.verbose = 1;
    else if (strcmp(argv[i], "-q") == 0)
      s.quiet = 1;
    else if (strcmp(argv[i], "--timeout-ms") == 0 && i + 1 < argc)
      s.timeout_ms = strtol(argv[++i], NULL, 10);
    else {
      fprintf(stderr, "radrelay send: unknown option %s\n", argv[i]);
      return 2;
    }
  }
  if (argc - i < 2) {
    fprintf(stderr, "usage: radrelay send [-v] [-q] [--timeout-ms N] [--tls] [--ca FILE]\n"
                    "         [--cert FILE --key FILE] [--server-name NAME] HOST:PORT FILE...\n");
    return 2;
  }
  s.fd = connect_to(argv[i], s.timeout_ms);
  if (s.fd < 0)
    return 1;
  rr_tls_ctx_t *ctx = NULL;
  if (use_tls) {
    /* The server's name is checked against its certificate: by default the
     * host part of HOST:PORT. */
    char host[256];
    snprintf(host, sizeof host, "%s", argv[i]);
    char *colon = strrchr(host, ':');
    if (colon)
      *colon = '\0';
    char *h = host[0] == '[' ? host + 1 : host;
    char *rb = strchr(h, ']');
    if (rb)
      *rb = '\0';
    if (!tc.server_name)
      tc.server_name = h;
    rr_buf_t err;
    rr_buf_init(&err, 1 << 16);
    int rc = rr_tls_ctx_new(&tc, &ctx, &err);
    if (rc == 0)
      rc = rr_tls_conn_new(ctx, &s.tls);
    if (rc)
      fprintf(stderr, "radrelay send: %s\n", err.data ? err.data : rr_strerror(rc));
    rr_buf_close(&err);
    if (rc || tls_connect(&s) != 0) {
      rr_tls_conn_free(s.tls);
      rr_tls_ctx_free(ctx);
      close(s.fd);
      return 1;
    }
  }
  s.m = rr_hl7_msg_new();
  s.ack = rr_hl7_msg_new();
  rr_mllp_deframer_init(&s.df, NULL);
  rr_buf_init(&s.reply, (size_t)1 << 26);
  int status = 0;
  for (int f = i + 1; f < argc && !status; f++) {
    char *data;
    size_t len;
    int rc = rr_read_file(argv[f], &data, &len);
    if (rc) {
      fprintf(stderr, "radrelay send: %s: %s\n", argv[f], rr_strerror(rc));
      status = 1;
      break;
    }
    rr_hl7_reader_t r;
    rr_hl7_reader_init(&r, len + 1);
    rc = rr_hl7_reader_feed(&r, data, len, send_one, &s);
    if (rc == 0)
      rc = rr_hl7_reader_finish(&r, send_one, &s);
    rr_hl7_reader_close(&r);
    free(data);
    if (rc)
      status = 1;
  }
  if (s.tls) {
    rr_tls_shutdown(s.tls);
    pump_out(&s);
  }
  rr_tls_conn_free(s.tls);
  rr_tls_ctx_free(ctx);
  close(s.fd);
  fprintf(stderr, "sent %zu, positive %zu, negative %zu, failed %zu\n", s.sent, s.positive,
          s.negative, s.failed);
  rr_buf_close(&s.reply);
  rr_mllp_deframer_close(&s.df);
  rr_hl7_msg_free(s.m);
  rr_hl7_msg_free(s.ack);
  return status || s.negative || s.failed ? 1 : 0;
}

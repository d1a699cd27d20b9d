/* Unit tests of the TLS layer (engine/tls/tls.c): a server and a client
 * rr_tls_conn_t pump bytes to each other in memory, no sockets. Certificates
 * come from scripts/gen-certs (argv[1]) run into a temporary folder. */
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "core/buf.h"
#include "core/error.h"
#include "rr_test.h"
#include "tls/tls.h"

extern char **environ;

static char certdir[512];
static uint32_t seed = 20261127u;

static size_t rnd(size_t max) { /* 1..max */
  seed = seed * 1103515245u + 12345u;
  return 1 + (size_t)((seed >> 8) % max);
}

/* P("client.pem"): path in certdir; a ring of buffers so a config can hold several. */
static const char *P(const char *name) {
  static char ring[32][PATH_MAX];
  static unsigned next;
  char *b = ring[next++ % 32];
  snprintf(b, PATH_MAX, "%s/%s", certdir, name);
  return b;
}

static rr_tls_config_t server_cfg(void) {
  rr_tls_config_t c;
  memset(&c, 0, sizeof c);
  c.role = RR_TLS_SERVER;
  c.cert_file = P("server.pem");
  c.key_file = P("server.key");
  c.ca_file = P("ca.pem");
  c.require_client_cert = 1;
  return c;
}

/* who: "client", "intruder", ... or NULL for no client certificate. */
static rr_tls_config_t client_cfg(const char *who) {
  rr_tls_config_t c;
  memset(&c, 0, sizeof c);
  c.role = RR_TLS_CLIENT;
  c.ca_file = P("ca.pem");
  c.server_name = "localhost";
  if (who) {
    char name[64];
    snprintf(name, sizeof name, "%s.pem", who);
    c.cert_file = P(name);
    snprintf(name, sizeof name, "%s.key", who);
    c.key_file = P(name);
  }
  return c;
}

static rr_tls_ctx_t *ctx_or_die(const rr_tls_config_t *cfg) {
  rr_tls_ctx_t *ctx = NULL;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  int rc = rr_tls_ctx_new(cfg, &ctx, &err);
  if (rc) {
    fprintf(stderr, "rr_tls_ctx_new: %d %s", rc, err.data ? err.data : "\n");
    exit(1);
  }
  rr_buf_close(&err);
  return ctx;
}

/* One end of a connection and what it has received. */
typedef struct end {
  rr_tls_conn_t *conn;
  rr_buf_t got;
  int rc; /* last non-data result of rr_tls_read */
} end_t;

static void end_init(end_t *e, rr_tls_ctx_t *ctx) {
  memset(e, 0, sizeof *e);
  rr_buf_init(&e->got, 8u << 20);
  CHECK_EQ_INT(rr_tls_conn_new(ctx, &e->conn), 0);
}

static void end_close(end_t *e) {
  rr_tls_conn_free(e->conn);
  rr_buf_close(&e->got);
}

/* Reads all the plaintext e can produce (driving its handshake). */
static void drain(end_t *e) {
  char buf[7001];
  for (;;) {
    size_t n = 0;
    int rc = rr_tls_read(e->conn, buf, sizeof buf, &n);
    if (rc == 0) {
      CHECK(n > 0);
      CHECK_EQ_INT(rr_buf_append(&e->got, buf, n), 0);
      continue;
    }
    e->rc = rc;
    return;
  }
}

/* Moves a's pending ciphertext to b in chunks (random up to max_chunk; 0 =
 * all at once), letting b read after each chunk. Returns bytes moved. */
static size_t transfer(end_t *a, end_t *b, size_t max_chunk) {
  size_t moved = 0;
  for (;;) {
    const char *p;
    size_t len;
    rr_tls_pending_out(a->conn, &p, &len);
    if (len == 0)
      return moved;
    size_t k = max_chunk ? rnd(max_chunk) : len;
    if (k > len)
      k = len;
    CHECK_EQ_INT(rr_tls_feed(b->conn, p, k), 0);
    rr_tls_consume_out(a->conn, k);
    moved += k;
    drain(b);
  }
}

/* Runs both ends until neither has anything to send. */
static void pump(end_t *s, end_t *c, size_t max_chunk) {
  drain(c);
  drain(s);
  for (int i = 0; i < 1000; i++) {
    size_t m = transfer(c, s, max_chunk) + transfer(s, c, max_chunk);
    if (m == 0)
      return;
  }
  CHECK(!"pump did not settle");
}

/* A full connection attempt: both ends created and pumped to rest. */
static void connect_pair(rr_tls_ctx_t *sctx, rr_tls_ctx_t *cctx, end_t *s, end_t *c) {
  end_init(s, sctx);
  end_init(c, cctx);
  pump(s, c, 0);
}

static void say(end_t *from, const char *text) {
  CHECK_EQ_INT(rr_tls_write(from->conn, text, strlen(text)), 0);
}

/* ---- handshakes and data ---------------------------------------------- */

static void check_exchange(end_t *s, end_t *c) {
  rr_buf_reset(&s->got);
  rr_buf_reset(&c->got);
  say(c, "\x0bMSH|^~\\&|RIS|||||20260101||ORM^O01|1|P|2.5\r\x1c\r");
  pump(s, c, 0);
  CHECK_MEM_STR(s->got.data, s->got.len, "\x0bMSH|^~\\&|RIS|||||20260101||ORM^O01|1|P|2.5\r\x1c\r");
  say(s, "\x0bMSH|ack\rMSA|AA|1\r\x1c\r");
  pump(s, c, 0);
  CHECK_MEM_STR(c->got.data, c->got.len, "\x0bMSH|ack\rMSA|AA|1\r\x1c\r");
}

static void test_tls13_mutual(void) {
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("client");
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg), *cctx = ctx_or_die(&ccfg);
  end_t s, c;
  connect_pair(sctx, cctx, &s, &c);
  CHECK(rr_tls_handshake_done(s.conn) && rr_tls_handshake_done(c.conn));
  CHECK_EQ_INT(s.rc, RR_EAGAIN);
  CHECK_EQ_INT(c.rc, RR_EAGAIN);
  CHECK(strcmp(rr_tls_version(s.conn), "TLSv1.3") == 0);
  CHECK(strcmp(rr_tls_version(c.conn), "TLSv1.3") == 0);
  CHECK(strcmp(rr_tls_peer_identity(s.conn), "ris.test") == 0);
  CHECK(strcmp(rr_tls_peer_identity(c.conn), "localhost") == 0);
  CHECK_EQ_INT(rr_tls_failure(s.conn), RR_TLS_FAIL_NONE);
  CHECK(strcmp(rr_tls_reason(s.conn), "") == 0);
  check_exchange(&s, &c);
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(sctx);
  rr_tls_ctx_free(cctx);
}

static void test_tls12_mutual(void) {
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("client");
  ccfg.max_version = RR_TLS_V1_2;
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg), *cctx = ctx_or_die(&ccfg);
  end_t s, c;
  connect_pair(sctx, cctx, &s, &c);
  CHECK(rr_tls_handshake_done(s.conn) && rr_tls_handshake_done(c.conn));
  CHECK(strcmp(rr_tls_version(s.conn), "TLSv1.2") == 0);
  /* ECDSA certs: an ECDHE-ECDSA AEAD suite. */
  const char *cipher = rr_tls_cipher(s.conn);
  CHECK(strncmp(cipher, "ECDHE-ECDSA-", 12) == 0 &&
        (strstr(cipher, "GCM") || strstr(cipher, "CHACHA20")));
  CHECK(strcmp(rr_tls_peer_identity(s.conn), "ris.test") == 0);
  check_exchange(&s, &c);
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(cctx);

  /* A server that insists on 1.3 refuses a 1.2-only client, and both say why. */
  rr_tls_ctx_free(sctx);
  scfg.min_version = RR_TLS_V1_3;
  sctx = ctx_or_die(&scfg);
  cctx = ctx_or_die(&ccfg);
  connect_pair(sctx, cctx, &s, &c);
  CHECK_EQ_INT(s.rc, RR_ETLS);
  CHECK_EQ_INT(rr_tls_failure(s.conn), RR_TLS_FAIL_PROTOCOL_VERSION);
  CHECK_EQ_INT(c.rc, RR_ETLS);
  CHECK_EQ_INT(rr_tls_failure(c.conn), RR_TLS_FAIL_PROTOCOL_VERSION);
  CHECK(strstr(rr_tls_reason(c.conn), "refused by peer") != NULL);
  CHECK(strstr(rr_tls_reason(s.conn), "this end allows TLSv1.3 to TLSv1.3") != NULL);
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(sctx);
  rr_tls_ctx_free(cctx);
}

/* 1 MB each way, written in random-sized writes and delivered in random
 * chunks, over TLS 1.3 and 1.2. */
static void test_megabyte_random_chunks(void) {
  const size_t size = 1u << 20;
  unsigned char *payload = malloc(size);
  CHECK(payload != NULL);
  if (!payload)
    return;
  for (size_t i = 0; i < size; i++)
    payload[i] = (unsigned char)(rnd(256) - 1);
  for (int v = 0; v < 2; v++) {
    rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("client");
    ccfg.max_version = v ? RR_TLS_V1_2 : RR_TLS_V1_3;
    rr_tls_ctx_t *sctx = ctx_or_die(&scfg), *cctx = ctx_or_die(&ccfg);
    end_t s, c;
    connect_pair(sctx, cctx, &s, &c);
    CHECK(rr_tls_handshake_done(c.conn) && rr_tls_handshake_done(s.conn));
    end_t *ends[2][2] = {{&c, &s}, {&s, &c}};
    for (int dir = 0; dir < 2; dir++) {
      end_t *from = ends[dir][0], *to = ends[dir][1];
      for (size_t off = 0; off < size;) {
        size_t k = rnd(50000);
        if (k > size - off)
          k = size - off;
        CHECK_EQ_INT(rr_tls_write(from->conn, payload + off, k), 0);
        off += k;
        if (rnd(4) == 1) /* sometimes let output pile up over several writes */
          transfer(from, to, 20000);
      }
      transfer(from, to, 20000);
      CHECK_EQ_INT(to->got.len, size);
      CHECK(to->got.len == size && memcmp(to->got.data, payload, size) == 0);
      CHECK_EQ_INT(to->rc, RR_EAGAIN);
    }
    end_close(&s);
    end_close(&c);
    rr_tls_ctx_free(sctx);
    rr_tls_ctx_free(cctx);
  }
  free(payload);
}

/* ---- refusals ---------------------------------------------------------- */

/* Connects `who` to a server built from scfg (client built from ccfg) and
 * checks the server refused it for `want`; returns nothing, frees all. The
 * client also tries to send HL7 as soon as it thinks it may: not one byte
 * must reach the server's caller. */
static void expect_server_refusal(const rr_tls_config_t *scfg, const rr_tls_config_t *ccfg,
                                  rr_tls_failure_t want, const char *reason_part,
                                  rr_tls_failure_t want_client) {
  rr_tls_ctx_t *sctx = ctx_or_die(scfg), *cctx = ctx_or_die(ccfg);
  end_t s, c;
  end_init(&s, sctx);
  end_init(&c, cctx);
  drain(&c);           /* ClientHello */
  transfer(&c, &s, 0); /* server: ServerHello .. Finished (1.3) */
  transfer(&s, &c, 0); /* a TLS 1.3 client is now "done" */
  if (rr_tls_handshake_done(c.conn))
    say(&c, "\x0bMSH|^~\\&|INTRUDER\r\x1c\r");
  /* TLS 1.3: the client finishes first, so HL7 really is on its way. */
  CHECK(rr_tls_handshake_done(c.conn) == (ccfg->max_version != RR_TLS_V1_2));
  pump(&s, &c, 0);
  CHECK_EQ_INT(s.rc, RR_ETLS);
  CHECK(!rr_tls_handshake_done(s.conn));
  CHECK_EQ_INT(s.got.len, 0);
  CHECK_EQ_INT(rr_tls_failure(s.conn), want);
  if (reason_part && !strstr(rr_tls_reason(s.conn), reason_part)) {
    CHECK(!"reason text");
    fprintf(stderr, "  reason '%s' lacks '%s'\n", rr_tls_reason(s.conn), reason_part);
  }
  printf("     server: %s\n", rr_tls_reason(s.conn));
  CHECK_EQ_INT(c.rc, RR_ETLS);
  if (want_client != RR_TLS_FAIL_NONE) {
    CHECK_EQ_INT(rr_tls_failure(c.conn), want_client);
    printf("     client: %s\n", rr_tls_reason(c.conn));
  }
  /* Failed for good: nothing more goes in or out. */
  size_t n;
  char b[16];
  CHECK_EQ_INT(rr_tls_read(s.conn, b, sizeof b, &n), RR_ETLS);
  CHECK_EQ_INT(rr_tls_write(s.conn, "x", 1), RR_ETLS);
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(sctx);
  rr_tls_ctx_free(cctx);
}

static void test_refuse_no_client_cert(void) {
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg(NULL);
  expect_server_refusal(&scfg, &ccfg, RR_TLS_FAIL_NO_CERT, "no certificate", RR_TLS_FAIL_NO_CERT);
  ccfg.max_version = RR_TLS_V1_2; /* 1.2 has no certificate_required alert */
  expect_server_refusal(&scfg, &ccfg, RR_TLS_FAIL_NO_CERT, "no certificate", RR_TLS_FAIL_HANDSHAKE);
}

static void test_refuse_other_ca(void) {
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("other-client");
  expect_server_refusal(&scfg, &ccfg, RR_TLS_FAIL_UNKNOWN_CA, "CN=ris.test",
                        RR_TLS_FAIL_UNKNOWN_CA);
}

static void test_refuse_expired(void) {
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("expired");
  expect_server_refusal(&scfg, &ccfg, RR_TLS_FAIL_EXPIRED, "notAfter Jan  2 00:00:00 2020",
                        RR_TLS_FAIL_EXPIRED);
}

static void test_refuse_revoked(void) {
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("revoked");
  /* Without the CRL the certificate is fine: the CRL is what refuses it. */
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg), *cctx = ctx_or_die(&ccfg);
  end_t s, c;
  connect_pair(sctx, cctx, &s, &c);
  CHECK(rr_tls_handshake_done(s.conn));
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(sctx);
  rr_tls_ctx_free(cctx);

  scfg.crl_file = P("crl.pem");
  expect_server_refusal(&scfg, &ccfg, RR_TLS_FAIL_REVOKED, "CN=revoked.test", RR_TLS_FAIL_REVOKED);
  /* ... and the good client still passes CRL_CHECK_ALL. */
  ccfg = client_cfg("client");
  sctx = ctx_or_die(&scfg);
  cctx = ctx_or_die(&ccfg);
  connect_pair(sctx, cctx, &s, &c);
  CHECK(rr_tls_handshake_done(s.conn));
  CHECK_EQ_INT(s.rc, RR_EAGAIN);
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(sctx);
  rr_tls_ctx_free(cctx);
}

static void test_refuse_not_on_allow_list(void) {
  static const char *const allow[] = {"pacs.test", "ris.test"};
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("intruder");
  scfg.allow = allow;
  scfg.nallow = 2;
  expect_server_refusal(&scfg, &ccfg, RR_TLS_FAIL_NOT_ALLOWED, "'intruder.test'", RR_TLS_FAIL_NONE);

  ccfg = client_cfg("client");
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg), *cctx = ctx_or_die(&ccfg);
  end_t s, c;
  connect_pair(sctx, cctx, &s, &c);
  CHECK(rr_tls_handshake_done(s.conn));
  CHECK(strcmp(rr_tls_peer_identity(s.conn), "ris.test") == 0);
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(cctx);

  /* Client side pinning: DNS SANs match case-insensitively, others refused. */
  static const char *const upper[] = {"LOCALHOST"}, *const other[] = {"pacs.test"};
  ccfg.allow = upper;
  ccfg.nallow = 1;
  cctx = ctx_or_die(&ccfg);
  connect_pair(sctx, cctx, &s, &c);
  CHECK(rr_tls_handshake_done(c.conn) && rr_tls_handshake_done(s.conn));
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(cctx);
  ccfg.allow = other;
  cctx = ctx_or_die(&ccfg);
  connect_pair(sctx, cctx, &s, &c);
  CHECK_EQ_INT(c.rc, RR_ETLS);
  CHECK_EQ_INT(rr_tls_failure(c.conn), RR_TLS_FAIL_NOT_ALLOWED);
  CHECK(strstr(rr_tls_reason(c.conn), "'localhost' is not on the allow-list") != NULL);
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(cctx);
  rr_tls_ctx_free(sctx);
}

static void client_against(const char *server_name, rr_tls_failure_t want) {
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("client");
  ccfg.server_name = server_name;
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg), *cctx = ctx_or_die(&ccfg);
  end_t s, c;
  connect_pair(sctx, cctx, &s, &c);
  CHECK_EQ_INT(rr_tls_failure(c.conn), want);
  if (want == RR_TLS_FAIL_NONE) {
    CHECK(rr_tls_handshake_done(c.conn));
    check_exchange(&s, &c);
  } else {
    CHECK_EQ_INT(c.rc, RR_ETLS);
    CHECK_EQ_INT(s.rc, RR_ETLS); /* the server learns from the alert */
    CHECK(strstr(rr_tls_reason(s.conn), "refused by peer") != NULL);
    printf("     client (%s): %s\n", server_name, rr_tls_reason(c.conn));
  }
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(sctx);
  rr_tls_ctx_free(cctx);
}

static void test_client_hostname_check(void) {
  client_against("localhost", RR_TLS_FAIL_NONE);
  client_against("127.0.0.1", RR_TLS_FAIL_NONE); /* IP SAN, no SNI */
  client_against("wrong.example", RR_TLS_FAIL_HOSTNAME);
  client_against("127.0.0.2", RR_TLS_FAIL_HOSTNAME);
  client_against("local", RR_TLS_FAIL_HOSTNAME);
}

/* A raw OpenSSL client (not rr_tls, which cannot be configured this weakly)
 * offering only `max_version` and `ciphers`; returns the server's failure. */
static rr_tls_failure_t raw_client_against_server(int max_version, const char *ciphers) {
  rr_tls_config_t scfg = server_cfg();
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg);
  SSL_CTX *raw = SSL_CTX_new(TLS_client_method());
  CHECK(raw != NULL);
  SSL_CTX_set_security_level(raw, 0);
  SSL_CTX_set_min_proto_version(raw, TLS1_VERSION);
  SSL_CTX_set_max_proto_version(raw, max_version);
  CHECK_EQ_INT(SSL_CTX_set_cipher_list(raw, ciphers), 1);
  SSL *ssl = SSL_new(raw);
  BIO *in = BIO_new(BIO_s_mem()), *out = BIO_new(BIO_s_mem());
  BIO_set_mem_eof_return(in, -1);
  SSL_set_bio(ssl, in, out);
  SSL_set_connect_state(ssl);
  end_t s;
  end_init(&s, sctx);
  for (int i = 0; i < 10 && s.rc != RR_ETLS; i++) {
    CHECK(SSL_do_handshake(ssl) != 1);
    char *p;
    long n = BIO_get_mem_data(out, &p);
    if (n <= 0)
      break;
    CHECK_EQ_INT(rr_tls_feed(s.conn, p, (size_t)n), 0);
    (void)BIO_reset(out);
    drain(&s);
    const char *q;
    size_t len;
    rr_tls_pending_out(s.conn, &q, &len);
    BIO_write(in, q, (int)len);
    rr_tls_consume_out(s.conn, len);
  }
  CHECK(SSL_do_handshake(ssl) != 1); /* the raw client reads the alert */
  ERR_clear_error();
  CHECK_EQ_INT(s.rc, RR_ETLS);
  CHECK_EQ_INT(s.got.len, 0);
  rr_tls_failure_t f = rr_tls_failure(s.conn);
  printf("     server: %s\n", rr_tls_reason(s.conn));
  end_close(&s);
  SSL_free(ssl);
  SSL_CTX_free(raw);
  rr_tls_ctx_free(sctx);
  return f;
}

static void test_refuse_tls11(void) {
  CHECK_EQ_INT(raw_client_against_server(TLS1_1_VERSION, "DEFAULT:@SECLEVEL=0"),
               RR_TLS_FAIL_PROTOCOL_VERSION);
}

static void test_refuse_weak_ciphers(void) {
  /* TLS 1.2 without forward secrecy, and with CBC: both outside the policy. */
  CHECK_EQ_INT(raw_client_against_server(TLS1_2_VERSION, "AES128-GCM-SHA256"),
               RR_TLS_FAIL_HANDSHAKE);
  CHECK_EQ_INT(raw_client_against_server(TLS1_2_VERSION, "ECDHE-ECDSA-AES128-SHA256"),
               RR_TLS_FAIL_HANDSHAKE);
}

static void test_refuse_plain_mllp(void) {
  rr_tls_config_t scfg = server_cfg();
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg);
  end_t s;
  end_init(&s, sctx);
  static const char hl7[] = "\x0bMSH|^~\\&|RIS|||||20260101||ORM^O01|1|P|2.5\r\x1c\r";
  CHECK_EQ_INT(rr_tls_feed(s.conn, hl7, sizeof hl7 - 1), 0);
  drain(&s);
  CHECK_EQ_INT(s.rc, RR_ETLS);
  CHECK_EQ_INT(s.got.len, 0);
  CHECK_EQ_INT(rr_tls_failure(s.conn), RR_TLS_FAIL_HANDSHAKE);
  CHECK(strstr(rr_tls_reason(s.conn), "not speaking TLS") != NULL);
  printf("     server: %s\n", rr_tls_reason(s.conn));
  end_close(&s);
  rr_tls_ctx_free(sctx);
}

/* ---- lifecycle --------------------------------------------------------- */

static void test_reload_keeps_existing_connections(void) {
  static const char *const only_ris[] = {"ris.test"};
  rr_tls_config_t scfg = server_cfg();
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg);
  rr_tls_config_t icfg = client_cfg("intruder"), gcfg = client_cfg("client");
  rr_tls_ctx_t *ictx = ctx_or_die(&icfg), *gctx = ctx_or_die(&gcfg);
  rr_buf_t err;
  rr_buf_init(&err, 4096);

  end_t s1, c1; /* before the reload: intruder is welcome, old cert */
  connect_pair(sctx, ictx, &s1, &c1);
  CHECK(rr_tls_handshake_done(s1.conn));
  CHECK(strcmp(rr_tls_peer_identity(c1.conn), "localhost") == 0);

  /* SIGHUP: renewed server certificate, and intruder dropped. */
  rr_tls_config_t next = server_cfg();
  next.cert_file = P("server2.pem");
  next.key_file = P("server2.key");
  next.allow = only_ris;
  next.nallow = 1;
  CHECK_EQ_INT(rr_tls_ctx_reload(sctx, &next, &err), 0);

  check_exchange(&s1, &c1); /* the old connection keeps its SSL_CTX */

  end_t s2, c2;
  connect_pair(sctx, ictx, &s2, &c2);
  CHECK_EQ_INT(s2.rc, RR_ETLS);
  CHECK_EQ_INT(rr_tls_failure(s2.conn), RR_TLS_FAIL_NOT_ALLOWED);
  end_close(&s2);
  end_close(&c2);

  connect_pair(sctx, gctx, &s2, &c2);
  CHECK(rr_tls_handshake_done(s2.conn));
  CHECK(strcmp(rr_tls_peer_identity(c2.conn), "radrelay-2") == 0);
  end_close(&s2);
  end_close(&c2);

  /* A failed reload leaves the running config in place. */
  rr_tls_config_t broken = next;
  broken.cert_file = P("server.pem"); /* key is server2.key: mismatch */
  rr_buf_reset(&err);
  CHECK_EQ_INT(rr_tls_ctx_reload(sctx, &broken, &err), RR_EINVAL);
  CHECK(err.data && strstr(err.data, "does not match") != NULL);
  connect_pair(sctx, gctx, &s2, &c2);
  CHECK(rr_tls_handshake_done(s2.conn));
  CHECK(strcmp(rr_tls_peer_identity(c2.conn), "radrelay-2") == 0);
  end_close(&s2);
  end_close(&c2);

  /* The ctx may go before its connections. */
  rr_tls_ctx_free(sctx);
  check_exchange(&s1, &c1);
  end_close(&s1);
  end_close(&c1);
  rr_tls_ctx_free(ictx);
  rr_tls_ctx_free(gctx);
  rr_buf_close(&err);
}

static void test_shutdown_and_write_rules(void) {
  rr_tls_config_t scfg = server_cfg(), ccfg = client_cfg("client");
  rr_tls_ctx_t *sctx = ctx_or_die(&scfg), *cctx = ctx_or_die(&ccfg);
  end_t s, c;
  end_init(&s, sctx);
  end_init(&c, cctx);
  CHECK_EQ_INT(rr_tls_write(c.conn, "early", 5), RR_EAGAIN); /* before the handshake */
  const char *p;
  size_t len;
  rr_tls_pending_out(c.conn, &p, &len);
  CHECK_EQ_INT(len, 0);
  CHECK_EQ_INT(rr_tls_handshake(c.conn), RR_EAGAIN); /* ClientHello queued */
  rr_tls_pending_out(c.conn, &p, &len);
  CHECK(len > 0);
  pump(&s, &c, 0);
  CHECK_EQ_INT(rr_tls_handshake(s.conn), 0);
  CHECK_EQ_INT(rr_tls_handshake(c.conn), 0);

  /* The caller must read: unprocessed input is capped. */
  static char junk[100000];
  CHECK_EQ_INT(rr_tls_feed(s.conn, junk, sizeof junk), 0);
  CHECK_EQ_INT(rr_tls_feed(s.conn, junk, sizeof junk), 0);
  CHECK_EQ_INT(rr_tls_feed(s.conn, junk, sizeof junk), RR_ELIMIT);
  end_close(&s);
  end_init(&s, sctx);
  end_close(&c);
  end_init(&c, cctx);
  pump(&s, &c, 0);

  say(&c, "last words");
  CHECK_EQ_INT(rr_tls_shutdown(c.conn), 0);
  CHECK_EQ_INT(rr_tls_write(c.conn, "more", 4), RR_ETLS);
  pump(&s, &c, 0);
  CHECK_MEM_STR(s.got.data, s.got.len, "last words");
  CHECK_EQ_INT(s.rc, RR_ETLSCLOSED);
  CHECK_EQ_INT(rr_tls_failure(s.conn), RR_TLS_FAIL_NONE);
  CHECK_EQ_INT(rr_tls_shutdown(s.conn), 0);
  end_close(&s);
  end_close(&c);
  rr_tls_ctx_free(sctx);
  rr_tls_ctx_free(cctx);
}

/* ---- configuration errors --------------------------------------------- */

static int copy_file(const char *from, const char *to, mode_t mode) {
  FILE *in = fopen(from, "rb"), *out = NULL;
  int rc = -1;
  char buf[4096];
  size_t n;
  if (!in)
    goto out;
  unlink(to);
  out = fopen(to, "wb");
  if (!out)
    goto out;
  while ((n = fread(buf, 1, sizeof buf, in)) > 0)
    if (fwrite(buf, 1, n, out) != n)
      goto out;
  rc = chmod(to, mode);
out:
  if (in)
    fclose(in);
  if (out && fclose(out) != 0)
    rc = -1;
  return rc;
}

/* Builds cfg, expects code `want` and an error line containing `part`. */
static void expect_config_error(const rr_tls_config_t *cfg, int want, const char *part) {
  rr_tls_ctx_t *ctx = (rr_tls_ctx_t *)&ctx; /* must be reset to NULL */
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  CHECK_EQ_INT(rr_tls_ctx_new(cfg, &ctx, &err), want);
  CHECK(ctx == NULL);
  CHECK(err.data && strstr(err.data, part) != NULL);
  printf("     %s", err.data ? err.data : "(no message)\n");
  rr_buf_close(&err);
}

static void test_config_errors(void) {
  rr_tls_config_t cfg = server_cfg();
  const char *loose = P("loose.key");
  CHECK_EQ_INT(copy_file(P("server.key"), loose, 0644), 0);
  cfg.key_file = loose;
  expect_config_error(&cfg, RR_EINVAL, "accessible by group or others (mode 0644)");
  expect_config_error(&cfg, RR_EINVAL, loose);
  CHECK_EQ_INT(chmod(loose, 0600), 0);
  rr_tls_ctx_t *ctx = NULL;
  CHECK_EQ_INT(rr_tls_ctx_new(&cfg, &ctx, NULL), 0); /* same file, tightened: fine */
  rr_tls_ctx_free(ctx);

  cfg = server_cfg();
  cfg.cert_file = P("missing.pem");
  expect_config_error(&cfg, -ENOENT, "missing.pem: cannot open: No such file");
  cfg = server_cfg();
  cfg.key_file = P("client.key");
  expect_config_error(&cfg, RR_EINVAL, "does not match");
  cfg = server_cfg();
  cfg.ca_file = P("server.key");
  expect_config_error(&cfg, RR_EINVAL, "ca_file");
  cfg = server_cfg();
  cfg.crl_file = P("ca.pem");
  expect_config_error(&cfg, RR_EINVAL, "no CRL found");
  cfg = server_cfg();
  cfg.require_client_cert = 0;
  static const char *const allow[] = {"ris.test"};
  cfg.allow = allow;
  cfg.nallow = 1;
  expect_config_error(&cfg, RR_EINVAL, "needs require_client_cert");
  cfg = client_cfg("client");
  cfg.server_name = NULL;
  expect_config_error(&cfg, RR_EINVAL, "needs server_name");
  cfg = client_cfg("client");
  cfg.min_version = RR_TLS_V1_3;
  cfg.max_version = RR_TLS_V1_2;
  expect_config_error(&cfg, RR_EINVAL, "min_version above max_version");

  /* Reload must not change the role. */
  cfg = server_cfg();
  ctx = ctx_or_die(&cfg);
  rr_tls_config_t ccfg = client_cfg("client");
  CHECK_EQ_INT(rr_tls_ctx_reload(ctx, &ccfg, NULL), RR_EINVAL);
  rr_tls_ctx_free(ctx);
  rr_tls_ctx_free(NULL);
  rr_tls_conn_free(NULL);
}

/* ---- main -------------------------------------------------------------- */

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(path);
}

static int run_gen_certs(const char *script, const char *dir) {
  pid_t pid;
  char *args[] = {(char *)script, (char *)dir, NULL};
  int rc = posix_spawn(&pid, script, NULL, NULL, args, environ);
  if (rc != 0) {
    fprintf(stderr, "cannot run %s: %s\n", script, strerror(rc));
    return -1;
  }
  int status;
  if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "%s %s failed\n", script, dir);
    return -1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: test_tls path/to/scripts/gen-certs\n");
    return 2;
  }
  const char *tmp = getenv("TMPDIR");
  snprintf(certdir, sizeof certdir, "%s/rr-tls-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
  if (!mkdtemp(certdir)) {
    perror("mkdtemp");
    return 1;
  }
  if (run_gen_certs(argv[1], certdir) != 0) {
    nftw(certdir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    return 1;
  }
  printf("seed %u, certs in %s\n", seed, certdir);

  RUN(test_tls13_mutual);
  RUN(test_tls12_mutual);
  RUN(test_megabyte_random_chunks);
  RUN(test_refuse_no_client_cert);
  RUN(test_refuse_other_ca);
  RUN(test_refuse_expired);
  RUN(test_refuse_revoked);
  RUN(test_refuse_not_on_allow_list);
  RUN(test_client_hostname_check);
  RUN(test_refuse_tls11);
  RUN(test_refuse_weak_ciphers);
  RUN(test_refuse_plain_mllp);
  RUN(test_reload_keeps_existing_connections);
  RUN(test_shutdown_and_write_rules);
  RUN(test_config_errors);

  nftw(certdir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
  return TEST_SUMMARY();
}

/* TLS layer: OpenSSL over memory BIOs. See tls.h for the contract. */
#include "tls/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* BCP 195 / IHE ATNA: forward secrecy and AEAD only. TLS 1.3 suites are
 * all AEAD with (EC)DHE, so OpenSSL's default list is kept. */
#define TLS12_CIPHERS                                                                              \
  "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"                                     \
  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                                     \
  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
#define TLS13_SUITES "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
#define GROUPS "X25519:P-256:P-384"
#define MAX_UNREAD (256u * 1024u) /* fed but not yet processed ciphertext */
#define VERIFY_DEPTH 8

/* One generation of settings: what a reload replaces. Connections hold a
 * reference, so a reload never pulls the SSL_CTX (or the allow-list the
 * verify callback reads) from under a live connection. */
typedef struct gen {
  unsigned refs;
  rr_tls_role_t role;
  SSL_CTX *sctx;
  char *server_name; /* client; NULL on a server */
  int server_name_is_ip;
  char **allow;
  size_t nallow;
} gen_t;

struct rr_tls_ctx {
  gen_t *gen;
};

struct rr_tls_conn {
  gen_t *gen;
  SSL *ssl;
  BIO *rbio, *wbio; /* owned by ssl */
  int done;         /* handshake complete */
  int failed;       /* RR_ETLS returned; only pending_out remains useful */
  int shut;         /* close_notify queued, or the peer's received */
  rr_tls_failure_t failure;
  char *identity; /* NULL until the peer's leaf certificate is seen */
  char reason[384];
};

/* ---- generations ------------------------------------------------------- */

static void gen_unref(gen_t *g) {
  if (!g || --g->refs > 0)
    return;
  SSL_CTX_free(g->sctx);
  free(g->server_name);
  for (size_t i = 0; i < g->nallow; i++)
    free(g->allow[i]);
  free(g->allow);
  free(g);
}

/* Appends "what: OpenSSL's reason" to err and clears OpenSSL's error queue.
 * The last queued error is the most specific one for file loading. */
static void report(rr_buf_t *err, const char *what) {
  unsigned long e, last = 0;
  while ((e = ERR_get_error()) != 0)
    last = e;
  if (!err)
    return;
  if (last) {
    char ossl[256];
    ERR_error_string_n(last, ossl, sizeof ossl);
    const char *r = ERR_reason_error_string(last);
    rr_buf_printf(err, "tls: %s: %s\n", what, r ? r : ossl);
  } else {
    rr_buf_printf(err, "tls: %s\n", what);
  }
}

static int refuse_password(char *buf, int size, int rwflag, void *u) {
  (void)buf, (void)size, (void)rwflag, (void)u;
  return 0; /* never prompt on a terminal; encrypted keys are a config error */
}

/* Opens key_file, refusing it when group or others have any access (checked
 * on the open descriptor, so the file checked is the file read). */
static int load_key(SSL_CTX *sctx, const char *path, const char *cert_path, rr_buf_t *err) {
  int rc = 0;
  EVP_PKEY *pkey = NULL;
  char what[4200];
  FILE *f = fopen(path, "re");
  if (!f) {
    rc = -errno;
    snprintf(what, sizeof what, "key_file %s: cannot open: %s", path, strerror(errno));
    report(err, what);
    goto out;
  }
  struct stat st;
  if (fstat(fileno(f), &st) != 0) {
    rc = -errno;
    snprintf(what, sizeof what, "key_file %s: cannot stat: %s", path, strerror(errno));
    report(err, what);
    goto out;
  }
  if (!S_ISREG(st.st_mode)) {
    rc = RR_EINVAL;
    snprintf(what, sizeof what, "key_file %s: not a regular file", path);
    report(err, what);
    goto out;
  }
  if (st.st_mode & (S_IRWXG | S_IRWXO)) {
    rc = RR_EINVAL;
    snprintf(what, sizeof what,
             "key_file %s: private key is accessible by group or others (mode %04o); "
             "chmod 600 it",
             path, (unsigned)(st.st_mode & 07777));
    report(err, what);
    goto out;
  }
  pkey = PEM_read_PrivateKey(f, NULL, refuse_password, NULL);
  if (!pkey) {
    rc = RR_EINVAL;
    snprintf(what, sizeof what, "key_file %s: no usable private key (PEM, unencrypted expected)",
             path);
    report(err, what);
    goto out;
  }
  if (SSL_CTX_use_PrivateKey(sctx, pkey) != 1) {
    rc = RR_EINVAL;
    if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH)
      snprintf(what, sizeof what, "key_file %s does not match cert_file %s", path, cert_path);
    else
      snprintf(what, sizeof what, "key_file %s: key refused", path);
    report(err, what);
    goto out;
  }
out:
  EVP_PKEY_free(pkey);
  if (f)
    fclose(f);
  return rc;
}

/* Checks that path can be opened, so a missing file is reported as such and
 * not as OpenSSL's "system lib". */
static int check_readable(const char *setting, const char *path, rr_buf_t *err) {
  FILE *f = fopen(path, "re");
  if (f) {
    fclose(f);
    return 0;
  }
  int rc = -errno;
  char what[4200];
  snprintf(what, sizeof what, "%s %s: cannot open: %s", setting, path, strerror(errno));
  ERR_clear_error();
  report(err, what);
  return rc;
}

static int load_crls(SSL_CTX *sctx, const char *path, rr_buf_t *err) {
  int rc = check_readable("crl_file", path, err);
  if (rc)
    return rc;
  char what[4200];
  BIO *b = BIO_new_file(path, "r");
  if (!b) {
    snprintf(what, sizeof what, "crl_file %s: cannot open", path);
    report(err, what);
    return RR_EIO;
  }
  X509_STORE *store = SSL_CTX_get_cert_store(sctx);
  int count = 0;
  X509_CRL *crl;
  while ((crl = PEM_read_bio_X509_CRL(b, NULL, refuse_password, NULL)) != NULL) {
    int ok = X509_STORE_add_crl(store, crl);
    X509_CRL_free(crl);
    if (ok != 1) {
      snprintf(what, sizeof what, "crl_file %s: CRL %d refused", path, count + 1);
      report(err, what);
      rc = RR_EINVAL;
      goto out;
    }
    count++;
  }
  /* The loop ends on "no start line" at the end of the file: expected. */
  unsigned long e = ERR_peek_last_error();
  if (count > 0 && ERR_GET_REASON(e) == PEM_R_NO_START_LINE)
    ERR_clear_error();
  if (count == 0 || ERR_peek_error() != 0) {
    snprintf(what, sizeof what, "crl_file %s: %s", path,
             count == 0 ? "no CRL found (PEM expected)" : "malformed CRL");
    report(err, what);
    rc = RR_EINVAL;
    goto out;
  }
  X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
out:
  BIO_free(b);
  return rc;
}

static int verify_cb(int ok, X509_STORE_CTX *xs);

static int version_of(rr_tls_version_t v, int dflt) {
  switch (v) {
  case RR_TLS_V1_2: return TLS1_2_VERSION;
  case RR_TLS_V1_3: return TLS1_3_VERSION;
  default: return dflt;
  }
}

static int is_ip_literal(const char *s) {
  unsigned char a[16];
  return inet_pton(AF_INET, s, a) == 1 || inet_pton(AF_INET6, s, a) == 1;
}

static int check_config(const rr_tls_config_t *cfg, rr_buf_t *err) {
  const char *problem = NULL;
  if (cfg->role != RR_TLS_SERVER && cfg->role != RR_TLS_CLIENT)
    problem = "role must be server or client";
  else if (cfg->role == RR_TLS_SERVER && (!cfg->cert_file || !cfg->key_file))
    problem = "a server needs cert_file and key_file";
  else if (!cfg->cert_file != !cfg->key_file)
    problem = "cert_file and key_file go together";
  else if (cfg->role == RR_TLS_SERVER && cfg->require_client_cert && !cfg->ca_file)
    problem = "require_client_cert needs ca_file";
  else if (cfg->role == RR_TLS_SERVER && cfg->nallow > 0 && !cfg->require_client_cert)
    problem = "an allow-list needs require_client_cert";
  else if (cfg->nallow > 0 && !cfg->allow)
    problem = "nallow > 0 but allow is NULL";
  else if (cfg->role == RR_TLS_CLIENT && (!cfg->server_name || !cfg->server_name[0]))
    problem = "a client needs server_name (host name or IP checked against the certificate)";
  else if ((unsigned)cfg->min_version > RR_TLS_V1_3 || (unsigned)cfg->max_version > RR_TLS_V1_3)
    problem = "unknown TLS version";
  else if (version_of(cfg->min_version, TLS1_2_VERSION) >
           version_of(cfg->max_version, TLS1_3_VERSION))
    problem = "min_version above max_version";
  for (size_t i = 0; !problem && i < cfg->nallow; i++)
    if (!cfg->allow[i] || !cfg->allow[i][0])
      problem = "empty entry in the allow-list";
  if (!problem)
    return 0;
  report(err, problem);
  return RR_EINVAL;
}

static int gen_new(const rr_tls_config_t *cfg, gen_t **out, rr_buf_t *err) {
  int rc = 0;
  char what[4200];
  gen_t *g = NULL;
  *out = NULL;
  ERR_clear_error();
  if ((rc = check_config(cfg, err)) != 0)
    goto out;
  g = calloc(1, sizeof *g);
  if (!g) {
    rc = RR_ENOMEM;
    goto out;
  }
  g->refs = 1;
  g->role = cfg->role;
  if (cfg->nallow > 0) {
    g->allow = calloc(cfg->nallow, sizeof *g->allow);
    if (!g->allow) {
      rc = RR_ENOMEM;
      goto out;
    }
    for (; g->nallow < cfg->nallow; g->nallow++) {
      if (!(g->allow[g->nallow] = strdup(cfg->allow[g->nallow]))) {
        rc = RR_ENOMEM;
        goto out;
      }
    }
  }
  if (cfg->role == RR_TLS_CLIENT) {
    if (!(g->server_name = strdup(cfg->server_name))) {
      rc = RR_ENOMEM;
      goto out;
    }
    g->server_name_is_ip = is_ip_literal(cfg->server_name);
  }

  g->sctx = SSL_CTX_new(cfg->role == RR_TLS_SERVER ? TLS_server_method() : TLS_client_method());
  if (!g->sctx) {
    report(err, "cannot create SSL_CTX");
    rc = RR_ENOMEM;
    goto out;
  }
  SSL_CTX *s = g->sctx;
  SSL_CTX_set_default_passwd_cb(s, refuse_password);
  SSL_CTX_set_security_level(s, 2);
  SSL_CTX_set_options(s, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET |
                             SSL_OP_CIPHER_SERVER_PREFERENCE);
  SSL_CTX_set_session_cache_mode(s, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(s, 0);
  SSL_CTX_set_max_early_data(s, 0);
  SSL_CTX_set_mode(s, SSL_MODE_RELEASE_BUFFERS); /* idle connections hold no record buffers */
  if (SSL_CTX_set_min_proto_version(s, version_of(cfg->min_version, TLS1_2_VERSION)) != 1 ||
      SSL_CTX_set_max_proto_version(s, version_of(cfg->max_version, TLS1_3_VERSION)) != 1 ||
      SSL_CTX_set_cipher_list(s, TLS12_CIPHERS) != 1 ||
      SSL_CTX_set_ciphersuites(s, TLS13_SUITES) != 1 || SSL_CTX_set1_groups_list(s, GROUPS) != 1) {
    report(err, "cannot apply the TLS policy");
    rc = RR_EINVAL;
    goto out;
  }

  if (cfg->cert_file) {
    if ((rc = check_readable("cert_file", cfg->cert_file, err)) != 0)
      goto out;
    if (SSL_CTX_use_certificate_chain_file(s, cfg->cert_file) != 1) {
      snprintf(what, sizeof what, "cert_file %s: cannot load certificate chain", cfg->cert_file);
      report(err, what);
      rc = RR_EINVAL;
      goto out;
    }
    if ((rc = load_key(s, cfg->key_file, cfg->cert_file, err)) != 0)
      goto out;
    if (SSL_CTX_check_private_key(s) != 1) {
      snprintf(what, sizeof what, "key_file %s does not match cert_file %s", cfg->key_file,
               cfg->cert_file);
      report(err, what);
      rc = RR_EINVAL;
      goto out;
    }
  }

  if (cfg->ca_file) {
    if ((rc = check_readable("ca_file", cfg->ca_file, err)) != 0)
      goto out;
    if (SSL_CTX_load_verify_file(s, cfg->ca_file) != 1) {
      snprintf(what, sizeof what, "ca_file %s: cannot load CA certificates", cfg->ca_file);
      report(err, what);
      rc = RR_EINVAL;
      goto out;
    }
    if (cfg->role == RR_TLS_SERVER) {
      /* Tell clients which CAs we accept, so one holding several certs picks right. */
      STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(cfg->ca_file);
      if (!names) {
        snprintf(what, sizeof what, "ca_file %s: no CA certificate names", cfg->ca_file);
        report(err, what);
        rc = RR_EINVAL;
        goto out;
      }
      SSL_CTX_set_client_CA_list(s, names);
    }
  } else if (cfg->role == RR_TLS_CLIENT && SSL_CTX_set_default_verify_paths(s) != 1) {
    report(err, "cannot load the system trust store");
    rc = RR_EINVAL;
    goto out;
  }
  if (cfg->crl_file && (rc = load_crls(s, cfg->crl_file, err)) != 0)
    goto out;

  int mode = SSL_VERIFY_NONE;
  if (cfg->role == RR_TLS_CLIENT)
    mode = SSL_VERIFY_PEER;
  else if (cfg->require_client_cert)
    mode = SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
  else if (cfg->ca_file)
    mode = SSL_VERIFY_PEER;
  SSL_CTX_set_verify(s, mode, verify_cb);
  SSL_CTX_set_verify_depth(s, VERIFY_DEPTH);
  if (cfg->role == RR_TLS_CLIENT) {
    X509_VERIFY_PARAM *p = SSL_CTX_get0_param(s);
    X509_VERIFY_PARAM_set_hostflags(p, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    int ok = g->server_name_is_ip ? X509_VERIFY_PARAM_set1_ip_asc(p, g->server_name)
                                  : X509_VERIFY_PARAM_set1_host(p, g->server_name, 0);
    if (ok != 1) {
      snprintf(what, sizeof what, "server_name %s: not usable for verification", g->server_name);
      report(err, what);
      rc = RR_EINVAL;
      goto out;
    }
  }
  *out = g;
  g = NULL;
out:
  gen_unref(g);
  ERR_clear_error();
  return rc;
}

/* ---- contexts ---------------------------------------------------------- */

int rr_tls_ctx_new(const rr_tls_config_t *cfg, rr_tls_ctx_t **out, rr_buf_t *err) {
  int rc;
  gen_t *g = NULL;
  *out = NULL;
  rr_tls_ctx_t *ctx = calloc(1, sizeof *ctx);
  if (!ctx)
    return RR_ENOMEM;
  if ((rc = gen_new(cfg, &g, err)) != 0) {
    free(ctx);
    return rc;
  }
  ctx->gen = g;
  *out = ctx;
  return 0;
}

int rr_tls_ctx_reload(rr_tls_ctx_t *ctx, const rr_tls_config_t *cfg, rr_buf_t *err) {
  gen_t *g = NULL;
  if (cfg->role != ctx->gen->role) {
    report(err, "reload cannot change the role");
    return RR_EINVAL;
  }
  int rc = gen_new(cfg, &g, err);
  if (rc)
    return rc;
  gen_unref(ctx->gen);
  ctx->gen = g;
  return 0;
}

void rr_tls_ctx_free(rr_tls_ctx_t *ctx) {
  if (!ctx)
    return;
  gen_unref(ctx->gen);
  free(ctx);
}

/* ---- connections ------------------------------------------------------- */

int rr_tls_conn_new(rr_tls_ctx_t *ctx, rr_tls_conn_t **out) {
  int rc = RR_ENOMEM;
  BIO *rbio = NULL, *wbio = NULL;
  *out = NULL;
  ERR_clear_error();
  rr_tls_conn_t *c = calloc(1, sizeof *c);
  if (!c)
    goto out;
  c->gen = ctx->gen;
  c->gen->refs++;
  if (!(c->ssl = SSL_new(c->gen->sctx)))
    goto out;
  rbio = BIO_new(BIO_s_mem());
  wbio = BIO_new(BIO_s_mem());
  if (!rbio || !wbio)
    goto out;
  BIO_set_mem_eof_return(rbio, -1); /* empty means "want more", not EOF */
  BIO_set_mem_eof_return(wbio, -1);
  SSL_set_bio(c->ssl, rbio, wbio); /* the SSL owns them from here */
  c->rbio = rbio;
  c->wbio = wbio;
  rbio = wbio = NULL;
  SSL_set_app_data(c->ssl, c);
  if (c->gen->role == RR_TLS_SERVER) {
    SSL_set_accept_state(c->ssl);
  } else {
    /* RFC 6066: SNI carries host names only, never IP literals. */
    if (!c->gen->server_name_is_ip && SSL_set_tlsext_host_name(c->ssl, c->gen->server_name) != 1)
      goto out;
    SSL_set_connect_state(c->ssl);
  }
  *out = c;
  c = NULL;
  rc = 0;
out:
  BIO_free(rbio);
  BIO_free(wbio);
  rr_tls_conn_free(c);
  ERR_clear_error();
  return rc;
}

void rr_tls_conn_free(rr_tls_conn_t *c) {
  if (!c)
    return;
  SSL_free(c->ssl);
  gen_unref(c->gen);
  free(c->identity);
  free(c);
}

/* ---- failure reasons --------------------------------------------------- */

static void fail(rr_tls_conn_t *c, rr_tls_failure_t f, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Records the first failure only: the first one is the cause. */
static void fail(rr_tls_conn_t *c, rr_tls_failure_t f, const char *fmt, ...) {
  if (c->failure != RR_TLS_FAIL_NONE)
    return;
  c->failure = f;
  int k = snprintf(c->reason, sizeof c->reason, "%s: ", rr_tls_failure_name(f));
  if (k < 0 || (size_t)k >= sizeof c->reason)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->reason + k, sizeof c->reason - (size_t)k, fmt, ap);
  va_end(ap);
}

static rr_tls_failure_t classify_verify_error(long e) {
  switch (e) {
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
  case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
  case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
  case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
  case X509_V_ERR_CERT_UNTRUSTED:
  case X509_V_ERR_CERT_CHAIN_TOO_LONG: return RR_TLS_FAIL_UNKNOWN_CA;
  case X509_V_ERR_CERT_HAS_EXPIRED:
  case X509_V_ERR_CERT_NOT_YET_VALID: return RR_TLS_FAIL_EXPIRED;
  case X509_V_ERR_CERT_REVOKED: return RR_TLS_FAIL_REVOKED;
  case X509_V_ERR_HOSTNAME_MISMATCH:
  case X509_V_ERR_IP_ADDRESS_MISMATCH: return RR_TLS_FAIL_HOSTNAME;
  case X509_V_ERR_APPLICATION_VERIFICATION: return RR_TLS_FAIL_NOT_ALLOWED;
  default: return RR_TLS_FAIL_CERT_INVALID;
  }
}

/* Copies an ASN1 string as UTF-8; NULL when it holds a NUL (a spoofing
 * trick: "good.test\0.evil") or on allocation failure. */
static char *asn1_utf8(const ASN1_STRING *s) {
  unsigned char *u = NULL;
  int n = ASN1_STRING_to_UTF8(&u, s);
  if (n < 0)
    return NULL;
  char *r = NULL;
  if (memchr(u, '\0', (size_t)n) == NULL)
    r = strdup((const char *)u);
  OPENSSL_free(u);
  return r;
}

static char *first_san(GENERAL_NAMES *sans, int type) {
  for (int k = 0; k < sk_GENERAL_NAME_num(sans); k++) {
    const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, k);
    if (gn->type == type)
      return asn1_utf8(gn->d.ia5);
  }
  return NULL;
}

/* The cert's identity for logs: CN, else first DNS SAN, else first URI SAN. */
static char *cert_identity(X509 *cert) {
  X509_NAME *name = X509_get_subject_name(cert);
  int i = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (i >= 0)
    return asn1_utf8(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i)));
  GENERAL_NAMES *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
  char *r = first_san(sans, GEN_DNS);
  if (!r)
    r = first_san(sans, GEN_URI);
  GENERAL_NAMES_free(sans);
  return r;
}

/* Exact match of an allow-list entry against every CN, DNS SAN (ASCII
 * case-insensitive) and URI SAN. No wildcard logic: entries are literal. */
static int cert_allowed(const gen_t *g, X509 *cert) {
  int ok = 0;
  X509_NAME *name = X509_get_subject_name(cert);
  for (int i = -1; !ok && (i = X509_NAME_get_index_by_NID(name, NID_commonName, i)) >= 0;) {
    char *cn = asn1_utf8(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i)));
    for (size_t a = 0; cn && !ok && a < g->nallow; a++)
      ok = strcmp(cn, g->allow[a]) == 0;
    free(cn);
  }
  GENERAL_NAMES *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
  for (int k = 0; !ok && k < sk_GENERAL_NAME_num(sans); k++) {
    const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, k);
    if (gn->type != GEN_DNS && gn->type != GEN_URI)
      continue;
    char *v = asn1_utf8(gn->d.ia5);
    for (size_t a = 0; v && !ok && a < g->nallow; a++)
      ok = gn->type == GEN_DNS ? strcasecmp(v, g->allow[a]) == 0 : strcmp(v, g->allow[a]) == 0;
    free(v);
  }
  GENERAL_NAMES_free(sans);
  return ok;
}

static void subject_text(X509 *cert, char *out, size_t cap) {
  out[0] = '\0';
  BIO *b = BIO_new(BIO_s_mem());
  if (!b)
    return;
  X509_NAME_print_ex(b, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  int n = BIO_read(b, out, (int)(cap - 1));
  out[n > 0 ? n : 0] = '\0';
  BIO_free(b);
}

static void time_text(const ASN1_TIME *t, char *out, size_t cap) {
  out[0] = '\0';
  BIO *b = BIO_new(BIO_s_mem());
  if (!b)
    return;
  ASN1_TIME_print(b, t);
  int n = BIO_read(b, out, (int)(cap - 1));
  out[n > 0 ? n : 0] = '\0';
  BIO_free(b);
}

/* Runs for each certificate of the peer's chain, inside the handshake, so a
 * refused peer gets its alert before a single application byte is read. */
static int verify_cb(int ok, X509_STORE_CTX *xs) {
  SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
  rr_tls_conn_t *c = ssl ? SSL_get_app_data(ssl) : NULL;
  if (!c)
    return ok;
  int depth = X509_STORE_CTX_get_error_depth(xs);
  X509 *cert = X509_STORE_CTX_get_current_cert(xs);
  if (depth == 0 && cert && !c->identity)
    c->identity = cert_identity(cert);
  if (ok && depth == 0 && cert && c->gen->nallow > 0 && !cert_allowed(c->gen, cert)) {
    X509_STORE_CTX_set_error(xs, X509_V_ERR_APPLICATION_VERIFICATION);
    fail(c, RR_TLS_FAIL_NOT_ALLOWED, "certificate identity '%s' is not on the allow-list",
         c->identity ? c->identity : "?");
    return 0;
  }
  if (ok)
    return 1;
  long e = X509_STORE_CTX_get_error(xs);
  char subj[200] = "", when[64] = "", extra[100] = "";
  if (cert) {
    subject_text(cert, subj, sizeof subj);
    if (e == X509_V_ERR_CERT_HAS_EXPIRED) {
      time_text(X509_get0_notAfter(cert), when, sizeof when);
      snprintf(extra, sizeof extra, ", notAfter %s", when);
    } else if (e == X509_V_ERR_CERT_NOT_YET_VALID) {
      time_text(X509_get0_notBefore(cert), when, sizeof when);
      snprintf(extra, sizeof extra, ", notBefore %s", when);
    }
  }
  fail(c, classify_verify_error(e), "%s (depth %d, subject %s%s)", X509_verify_cert_error_string(e),
       depth, subj[0] ? subj : "?", extra);
  return 0;
}

/* Maps the peer's fatal alert (reason = SSL_AD_REASON_OFFSET + alert). */
static rr_tls_failure_t classify_alert(int alert) {
  switch (alert) {
  case SSL_AD_CERTIFICATE_REQUIRED: return RR_TLS_FAIL_NO_CERT;
  case SSL_AD_UNKNOWN_CA: return RR_TLS_FAIL_UNKNOWN_CA;
  case SSL_AD_CERTIFICATE_EXPIRED: return RR_TLS_FAIL_EXPIRED;
  case SSL_AD_CERTIFICATE_REVOKED: return RR_TLS_FAIL_REVOKED;
  case SSL_AD_ACCESS_DENIED: return RR_TLS_FAIL_NOT_ALLOWED;
  case SSL_AD_PROTOCOL_VERSION: return RR_TLS_FAIL_PROTOCOL_VERSION;
  case SSL_AD_BAD_CERTIFICATE:
  case SSL_AD_UNSUPPORTED_CERTIFICATE:
  case SSL_AD_CERTIFICATE_UNKNOWN: return RR_TLS_FAIL_CERT_INVALID;
  default: return RR_TLS_FAIL_HANDSHAKE;
  }
}

static const char *alert_name(int alert) {
  switch (alert) {
  case SSL_AD_CERTIFICATE_REQUIRED: return "certificate required"; /* unnamed in OpenSSL 3.0 */
  case SSL_AD_MISSING_EXTENSION: return "missing extension";
  default: return SSL_alert_desc_string_long(alert);
  }
}

static const char *version_name(long v) {
  switch (v) {
  case TLS1_2_VERSION: return "TLSv1.2";
  case TLS1_3_VERSION: return "TLSv1.3";
  default: return "?";
  }
}

/* Classifies OpenSSL's queued errors after a failed call, then clears them. */
static void fail_from_queue(rr_tls_conn_t *c, int ssl_err) {
  unsigned long e, first = 0, pick = 0;
  while ((e = ERR_get_error()) != 0) {
    if (!first)
      first = e;
    if (!pick && ERR_GET_LIB(e) == ERR_LIB_SSL)
      pick = e;
  }
  if (!pick)
    pick = first;
  int r = pick ? ERR_GET_REASON(pick) : 0;
  const char *text = pick ? ERR_reason_error_string(pick) : NULL;
  if (!text)
    text = ssl_err == SSL_ERROR_SYSCALL ? "unexpected end of data" : "unknown error";

  if (r == SSL_R_CERTIFICATE_VERIFY_FAILED && c->failure == RR_TLS_FAIL_NONE) {
    long v = SSL_get_verify_result(c->ssl);
    fail(c, classify_verify_error(v), "%s", X509_verify_cert_error_string(v));
  }
  if (r >= SSL_AD_REASON_OFFSET && r < SSL_AD_REASON_OFFSET + 256) {
    int alert = r - SSL_AD_REASON_OFFSET;
    fail(c, classify_alert(alert), "refused by peer: alert %s (%d)", alert_name(alert), alert);
    return;
  }
  switch (r) {
  case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
    fail(c, RR_TLS_FAIL_NO_CERT, "peer sent no certificate, and one is required");
    return;
  case SSL_R_UNSUPPORTED_PROTOCOL:
  case SSL_R_UNSUPPORTED_SSL_VERSION:
  case SSL_R_VERSION_TOO_LOW:
  case SSL_R_VERSION_TOO_HIGH:
  case SSL_R_WRONG_SSL_VERSION:
  case SSL_R_NO_PROTOCOLS_AVAILABLE:
    fail(c, RR_TLS_FAIL_PROTOCOL_VERSION, "%s (this end allows %s to %s)", text,
         version_name(SSL_get_min_proto_version(c->ssl)),
         version_name(SSL_get_max_proto_version(c->ssl)));
    return;
  case SSL_R_WRONG_VERSION_NUMBER:
  case SSL_R_HTTP_REQUEST:
  case SSL_R_HTTPS_PROXY_REQUEST:
  case SSL_R_PACKET_LENGTH_TOO_LONG:
    if (!c->done) {
      fail(c, RR_TLS_FAIL_HANDSHAKE,
           "peer is not speaking TLS (%s); plain MLLP or HTTP sent to a TLS port?", text);
      return;
    }
    break;
  default: break;
  }
  fail(c, RR_TLS_FAIL_HANDSHAKE, "%s", text);
}

/* Turns the result of an SSL_* call into our code. */
static int ssl_result(rr_tls_conn_t *c, int ret) {
  int e = SSL_get_error(c->ssl, ret);
  switch (e) {
  case SSL_ERROR_WANT_READ:
  case SSL_ERROR_WANT_WRITE: /* a memory BIO never refuses a write; treat alike */
    ERR_clear_error();
    return RR_EAGAIN;
  case SSL_ERROR_ZERO_RETURN:
    ERR_clear_error();
    c->shut = 1;
    return RR_ETLSCLOSED;
  default:
    fail_from_queue(c, e);
    c->failed = 1;
    return RR_ETLS;
  }
}

/* ---- data path --------------------------------------------------------- */

int rr_tls_feed(rr_tls_conn_t *c, const void *data, size_t len) {
  if (len == 0)
    return 0;
  if (len > MAX_UNREAD || BIO_ctrl_pending(c->rbio) > MAX_UNREAD - len)
    return RR_ELIMIT;
  ERR_clear_error();
  int n = BIO_write(c->rbio, data, (int)len);
  ERR_clear_error();
  return n == (int)len ? 0 : RR_ENOMEM;
}

int rr_tls_handshake(rr_tls_conn_t *c) {
  if (c->failed)
    return RR_ETLS;
  if (c->done)
    return 0;
  ERR_clear_error();
  int ret = SSL_do_handshake(c->ssl);
  if (ret == 1) {
    c->done = 1;
    /* A peer without a certificate, when none was required, has no identity. */
    if (!c->identity) {
      X509 *peer = SSL_get0_peer_certificate(c->ssl);
      if (peer)
        c->identity = cert_identity(peer);
    }
    return 0;
  }
  return ssl_result(c, ret);
}

int rr_tls_handshake_done(const rr_tls_conn_t *c) {
  return c->done;
}

int rr_tls_read(rr_tls_conn_t *c, void *buf, size_t cap, size_t *n) {
  *n = 0;
  if (cap == 0)
    return RR_EINVAL;
  int rc = rr_tls_handshake(c);
  if (rc)
    return rc;
  ERR_clear_error();
  if (SSL_read_ex(c->ssl, buf, cap, n) == 1)
    return 0;
  return ssl_result(c, 0);
}

int rr_tls_write(rr_tls_conn_t *c, const void *data, size_t len) {
  if (c->failed || c->shut)
    return RR_ETLS;
  if (!c->done)
    return RR_EAGAIN;
  const char *p = data;
  while (len > 0) {
    size_t wrote = 0;
    ERR_clear_error();
    if (SSL_write_ex(c->ssl, p, len, &wrote) != 1) {
      int rc = ssl_result(c, 0);
      /* Only allocation failure can stop a write into a memory BIO. */
      return rc == RR_EAGAIN ? RR_ENOMEM : rc;
    }
    p += wrote;
    len -= wrote;
  }
  return 0;
}

void rr_tls_pending_out(rr_tls_conn_t *c, const char **p, size_t *len) {
  char *d = NULL;
  long n = BIO_get_mem_data(c->wbio, &d);
  *p = n > 0 ? d : NULL;
  *len = n > 0 ? (size_t)n : 0;
}

void rr_tls_consume_out(rr_tls_conn_t *c, size_t n) {
  /* Not BIO_reset: it clears the BIO's whole allocation, however little is
   * pending. Reading moves only n bytes. */
  char sink[4096];
  while (n > 0) {
    int k = BIO_read(c->wbio, sink, (int)(n < sizeof sink ? n : sizeof sink));
    if (k <= 0)
      break;
    n -= (size_t)k;
  }
}

int rr_tls_shutdown(rr_tls_conn_t *c) {
  if (c->shut || c->failed || !c->done) {
    c->shut = 1;
    return 0;
  }
  c->shut = 1;
  ERR_clear_error();
  (void)SSL_shutdown(c->ssl); /* 0: close_notify queued; the peer's is not awaited */
  ERR_clear_error();
  return 0;
}

/* ---- introspection ----------------------------------------------------- */

const char *rr_tls_peer_identity(const rr_tls_conn_t *c) {
  return c->identity ? c->identity : "";
}

rr_tls_failure_t rr_tls_failure(const rr_tls_conn_t *c) {
  return c->failure;
}

const char *rr_tls_reason(const rr_tls_conn_t *c) {
  return c->reason;
}

const char *rr_tls_failure_name(rr_tls_failure_t f) {
  switch (f) {
  case RR_TLS_FAIL_NONE: return "none";
  case RR_TLS_FAIL_NO_CERT: return "no_cert";
  case RR_TLS_FAIL_UNKNOWN_CA: return "unknown_ca";
  case RR_TLS_FAIL_EXPIRED: return "expired";
  case RR_TLS_FAIL_REVOKED: return "revoked";
  case RR_TLS_FAIL_NOT_ALLOWED: return "not_allowed";
  case RR_TLS_FAIL_HOSTNAME: return "hostname";
  case RR_TLS_FAIL_CERT_INVALID: return "cert_invalid";
  case RR_TLS_FAIL_PROTOCOL_VERSION: return "protocol_version";
  case RR_TLS_FAIL_HANDSHAKE: return "handshake";
  }
  return "unknown";
}

const char *rr_tls_version(const rr_tls_conn_t *c) {
  return c->done ? SSL_get_version(c->ssl) : "";
}

const char *rr_tls_cipher(const rr_tls_conn_t *c) {
  const char *s = c->done ? SSL_get_cipher_name(c->ssl) : NULL;
  return s ? s : "";
}

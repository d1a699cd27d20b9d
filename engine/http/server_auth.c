/* HTTP server: the bearer token file and constant-time token lookup. Pure
 * except for hs_tokens_load's file read. */
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "http/server_int.h"

#define TOKEN_FILE_MAX ((size_t)1 << 20)

void hs_tokens_free(hs_tokens_t *t) {
  if (!t)
    return;
  free(t->v);
  t->v = NULL;
  t->n = 0;
}

static int hexval(char ch) {
  if (ch >= '0' && ch <= '9')
    return ch - '0';
  if (ch >= 'a' && ch <= 'f')
    return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F')
    return ch - 'A' + 10;
  return -1;
}

static int name_char(char ch) {
  return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
         ch == '.' || ch == '_' || ch == '@' || ch == '-';
}

/* The next blank-separated word of line[*i..n). */
static size_t word(const char *line, size_t n, size_t *i, const char **w) {
  while (*i < n && (line[*i] == ' ' || line[*i] == '\t'))
    (*i)++;
  *w = line + *i;
  size_t start = *i;
  while (*i < n && line[*i] != ' ' && line[*i] != '\t')
    (*i)++;
  return *i - start;
}

static int line_error(rr_buf_t *err, const char *where, size_t lineno, const char *why) {
  if (err)
    rr_buf_printf(err, "%s:%zu: %s", where, lineno, why);
  return RR_EINVAL;
}

int hs_tokens_parse(const char *text, size_t len, const char *where, hs_tokens_t *out,
                    rr_buf_t *err) {
  hs_tokens_t t = {0};
  size_t cap = 0, lineno = 0, pos = 0;
  int rc = 0;
  while (pos < len && rc == 0) {
    const char *line = text + pos;
    const char *nl = memchr(line, '\n', len - pos);
    size_t n = nl ? (size_t)(nl - line) : len - pos;
    pos += n + (nl ? 1 : 0);
    lineno++;
    if (n && line[n - 1] == '\r')
      n--;
    size_t i = 0;
    const char *w[4];
    size_t wl[4];
    for (int k = 0; k < 4; k++)
      wl[k] = word(line, n, &i, &w[k]);
    if (wl[0] == 0 || w[0][0] == '#')
      continue;
    if (memchr(line, '\0', n)) {
      rc = line_error(err, where, lineno, "NUL byte");
      break;
    }
    if (wl[1] == 0 || wl[2] == 0 || wl[3] != 0) {
      rc = line_error(err, where, lineno, "expected \"role name sha256hex\"");
      break;
    }
    char role_s[16];
    if (wl[0] >= sizeof role_s) {
      rc = line_error(err, where, lineno, "unknown role (viewer, operator or admin)");
      break;
    }
    memcpy(role_s, w[0], wl[0]);
    role_s[wl[0]] = '\0';
    int role = rr_http_role_parse(role_s);
    if (role <= RR_HTTP_PUBLIC) {
      rc = line_error(err, where, lineno, "unknown role (viewer, operator or admin)");
      break;
    }
    int name_ok = wl[1] <= 64;
    for (size_t k = 0; name_ok && k < wl[1]; k++)
      name_ok = name_char(w[1][k]);
    if (!name_ok) {
      rc = line_error(err, where, lineno, "name must be 1..64 of [A-Za-z0-9._@-]");
      break;
    }
    hs_token_t tok;
    memset(&tok, 0, sizeof tok);
    int hash_ok = wl[2] == 64;
    for (size_t k = 0; hash_ok && k < 32; k++) {
      int hi = hexval(w[2][2 * k]), lo = hexval(w[2][2 * k + 1]);
      hash_ok = hi >= 0 && lo >= 0;
      tok.hash[k] = (unsigned char)(hi * 16 + lo);
    }
    if (!hash_ok) {
      rc = line_error(err, where, lineno,
                      "the third field must be the 64 hex digits of the token's SHA-256");
      break;
    }
    tok.role = (rr_http_role_t)role;
    memcpy(tok.name, w[1], wl[1]);
    for (size_t k = 0; k < t.n && rc == 0; k++) {
      if (memcmp(t.v[k].hash, tok.hash, sizeof tok.hash) == 0)
        rc = line_error(err, where, lineno, "the same token hash is listed twice");
      else if (strcmp(t.v[k].name, tok.name) == 0)
        rc = line_error(err, where, lineno, "the same name is listed twice");
    }
    if (rc)
      break;
    if (t.n == cap) {
      size_t ncap = cap ? cap * 2 : 8;
      hs_token_t *nv = realloc(t.v, ncap * sizeof *nv);
      if (!nv) {
        rc = RR_ENOMEM;
        break;
      }
      t.v = nv;
      cap = ncap;
    }
    t.v[t.n++] = tok;
  }
  if (rc) {
    hs_tokens_free(&t);
    return rc;
  }
  hs_tokens_free(out);
  *out = t;
  return 0;
}

int hs_tokens_load(const char *path, hs_tokens_t *out, rr_buf_t *err) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    if (err)
      rr_buf_printf(err, "token file %s: %s", path, strerror(e));
    return -e;
  }
  rr_buf_t b;
  rr_buf_init(&b, TOKEN_FILE_MAX);
  int rc = 0;
  char chunk[4096];
  for (;;) {
    ssize_t n = read(fd, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      rc = -errno;
      if (err)
        rr_buf_printf(err, "token file %s: %s", path, strerror(errno));
      break;
    }
    if (n == 0)
      break;
    if ((rc = rr_buf_append(&b, chunk, (size_t)n)) != 0) {
      if (err)
        rr_buf_printf(err, "token file %s: %s", path,
                      rc == RR_ELIMIT ? "larger than 1 MiB" : rr_strerror(rc));
      break;
    }
  }
  close(fd);
  if (rc == 0)
    rc = hs_tokens_parse(b.data ? b.data : "", b.len, path, out, err);
  OPENSSL_cleanse(chunk, sizeof chunk);
  rr_buf_close(&b);
  return rc;
}

const hs_token_t *hs_tokens_find(const hs_tokens_t *t, const char *token, size_t len) {
  unsigned char md[32];
  unsigned int mdlen = 0;
  if (!EVP_Digest(token, len, md, &mdlen, EVP_sha256(), NULL) || mdlen != sizeof md)
    return NULL;
  const hs_token_t *found = NULL;
  for (size_t i = 0; i < t->n; i++) {
    /* Every entry is compared, whatever matched before. */
    int eq = CRYPTO_memcmp(md, t->v[i].hash, sizeof md) == 0;
    if (eq)
      found = &t->v[i];
  }
  OPENSSL_cleanse(md, sizeof md);
  return found;
}

const char *rr_http_role_name(rr_http_role_t role) {
  switch (role) {
  case RR_HTTP_PUBLIC: return "public";
  case RR_HTTP_VIEWER: return "viewer";
  case RR_HTTP_OPERATOR: return "operator";
  case RR_HTTP_ADMIN: return "admin";
  }
  return "unknown";
}

int rr_http_role_parse(const char *name) {
  static const char *const names[] = {"public", "viewer", "operator", "admin"};
  for (int i = 0; i < 4; i++)
    if (name && strcmp(name, names[i]) == 0)
      return i;
  return -1;
}

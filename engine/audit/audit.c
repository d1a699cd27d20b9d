/* The audit trail: canonical data, the record hash, append, verify, export. */
#include "audit/audit.h"

#include <inttypes.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/buf.h"
#include "core/error.h"

#define HASH_TAG "radrelay-audit-v1"
#define ZERO_HASH "0000000000000000000000000000000000000000000000000000000000000000"
/* JSON text longer than this is refused before it is parsed. */
#define TEXT_MAX (4 * RR_AUDIT_DATA_MAX)
/* How far past the newest seq verify looks for where a moved record was
 * appended (records deleted and the rest renumbered). */
#define ORIGIN_SLACK 65536

struct rr_audit_chain_int {
  sqlite3 *db;          /* borrowed */
  sqlite3_stmt *insert; /* owned */
  EVP_MD *md;           /* owned */
  EVP_MD_CTX *ctx;      /* owned */
  rr_buf_t data;        /* canonical data of the record being appended */
};

static const char schema[] = "CREATE TABLE IF NOT EXISTS audit("
                             " seq INTEGER PRIMARY KEY," /* 1, 2, 3, ... set by rr_audit_append */
                             " at_ms INTEGER NOT NULL,"
                             " actor TEXT NOT NULL,"
                             " kind TEXT NOT NULL,"
                             " subject TEXT NOT NULL,"
                             " data TEXT NOT NULL," /* canonical JSON */
                             " prev TEXT NOT NULL,"
                             " hash TEXT NOT NULL);"
                             "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit"
                             " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;"
                             "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit"
                             " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;";

/* The row goes in only when the head it follows is the table's newest. */
static const char insert_sql[] =
    "INSERT INTO audit(seq, at_ms, actor, kind, subject, data, prev, hash)"
    " SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8"
    " WHERE coalesce((SELECT max(seq) FROM audit), 0) = ?1 - 1"
    " AND coalesce((SELECT hash FROM audit WHERE seq = ?1 - 1), '" ZERO_HASH "') = ?7";

/* ---- canonical JSON --------------------------------------------------- */

static bool utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i];
    size_t k;
    uint32_t cp, min;
    if (c < 0x80) {
      i++;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      k = 1, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      k = 2, cp = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      k = 3, cp = c & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (n - i <= k)
      return false;
    for (size_t j = 1; j <= k; j++) {
      if ((s[i + j] & 0xc0) != 0x80)
        return false;
      cp = (cp << 6) | (s[i + j] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += k + 1;
  }
  return true;
}

/* A JSON string: '"', '\\' and control characters escaped, the rest as is. */
static int put_string(rr_buf_t *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  int rc = rr_buf_putc(b, '"');
  size_t run = 0; /* start of the bytes not yet copied */
  for (size_t i = 0; rc == 0 && i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c != '"' && c != '\\')
      continue;
    char esc[6] = {'\\', 0, 0, 0, 0, 0};
    size_t len = 2;
    switch (c) {
    case '"': esc[1] = '"'; break;
    case '\\': esc[1] = '\\'; break;
    case '\b': esc[1] = 'b'; break;
    case '\f': esc[1] = 'f'; break;
    case '\n': esc[1] = 'n'; break;
    case '\r': esc[1] = 'r'; break;
    case '\t': esc[1] = 't'; break;
    default:
      memcpy(esc + 1, "u00", 3);
      esc[4] = hex[c >> 4];
      esc[5] = hex[c & 15];
      len = 6;
    }
    if ((rc = rr_buf_append(b, s + run, i - run)) == 0)
      rc = rr_buf_append(b, esc, len);
    run = i + 1;
  }
  if (rc == 0)
    rc = rr_buf_append(b, s + run, n - run);
  return rc ? rc : rr_buf_putc(b, '"');
}

/* The shortest decimal that reads back as v, laid out as Python's repr:
 * positional for exponents -4..15 (with ".0" when integral), else
 * d[.ddd]e+XX. */
static int put_real(rr_buf_t *b, double v) {
  /* Fewest significant digits (1..17) that read back as v: more digits
   * never stop reading back, so a binary search finds it. */
  char text[40];
  int lo = 1, hi = 17;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    snprintf(text, sizeof text, "%.*e", mid - 1, v);
    if (strtod(text, NULL) == v)
      hi = mid;
    else
      lo = mid + 1;
  }
  snprintf(text, sizeof text, "%.*e", lo - 1, v);
  /* text: [-]d[.ddd]e(+|-)XX */
  const char *p = text;
  char digits[24];
  size_t nd = 0;
  bool neg = *p == '-';
  p += neg;
  for (; *p != 'e'; p++)
    if (*p >= '0' && *p <= '9')
      digits[nd++] = *p;
  long exp10 = strtol(p + 1, NULL, 10);
  while (nd > 1 && digits[nd - 1] == '0')
    nd--;
  char out[64];
  size_t o = 0;
  if (neg)
    out[o++] = '-';
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 < 0) {
      out[o++] = '0';
      out[o++] = '.';
      for (long z = -1; z > exp10; z--)
        out[o++] = '0';
      memcpy(out + o, digits, nd);
      o += nd;
    } else {
      size_t ipart = (size_t)exp10 + 1;
      for (size_t i = 0; i < ipart; i++)
        out[o++] = i < nd ? digits[i] : '0';
      out[o++] = '.';
      if (nd > ipart) {
        memcpy(out + o, digits + ipart, nd - ipart);
        o += nd - ipart;
      } else {
        out[o++] = '0';
      }
    }
  } else {
    out[o++] = digits[0];
    if (nd > 1) {
      out[o++] = '.';
      memcpy(out + o, digits + 1, nd - 1);
      o += nd - 1;
    }
    int w = snprintf(out + o, sizeof out - o, "e%c%02ld", exp10 < 0 ? '-' : '+',
                     exp10 < 0 ? -exp10 : exp10);
    o += (size_t)w;
  }
  return rr_buf_append(b, out, o);
}

static int cmp_keys(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int put_value(rr_buf_t *b, json_t *v) {
  int rc = 0;
  switch (json_typeof(v)) {
  case JSON_OBJECT: {
    size_t n = json_object_size(v), i = 0;
    const char **keys = n ? malloc(n * sizeof *keys) : NULL;
    if (n && !keys)
      return RR_ENOMEM;
    for (void *it = json_object_iter(v); it && i < n; it = json_object_iter_next(v, it))
      keys[i++] = json_object_iter_key(it);
    if (n > 1)
      qsort(keys, n, sizeof *keys, cmp_keys);
    rc = rr_buf_putc(b, '{');
    for (i = 0; rc == 0 && i < n; i++) {
      if (i)
        rc = rr_buf_putc(b, ',');
      if (rc == 0)
        rc = put_string(b, keys[i], strlen(keys[i]));
      if (rc == 0)
        rc = rr_buf_putc(b, ':');
      if (rc == 0)
        rc = put_value(b, json_object_get(v, keys[i]));
    }
    free(keys);
    return rc ? rc : rr_buf_putc(b, '}');
  }
  case JSON_ARRAY:
    rc = rr_buf_putc(b, '[');
    for (size_t i = 0; rc == 0 && i < json_array_size(v); i++) {
      if (i)
        rc = rr_buf_putc(b, ',');
      if (rc == 0)
        rc = put_value(b, json_array_get(v, i));
    }
    return rc ? rc : rr_buf_putc(b, ']');
  case JSON_STRING: return put_string(b, json_string_value(v), json_string_length(v));
  case JSON_INTEGER: return rr_buf_printf(b, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
  case JSON_REAL: return put_real(b, json_real_value(v));
  case JSON_TRUE: return rr_buf_puts(b, "true");
  case JSON_FALSE: return rr_buf_puts(b, "false");
  case JSON_NULL: return rr_buf_puts(b, "null");
  }
  return RR_EINVAL;
}

/* Parses text and writes its canonical form to b (reset first). */
static int canonicalize(const char *text, size_t len, rr_buf_t *b) {
  if (len > TEXT_MAX)
    return RR_ELIMIT;
  json_error_t err;
  json_t *v = json_loadb(text, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &err);
  if (!v)
    return RR_EINVAL;
  rr_buf_reset(b);
  int rc = put_value(b, v);
  json_decref(v);
  return rc;
}

int rr_audit_canonical(const char *json, size_t len, char **out, size_t *out_len) {
  rr_buf_t b;
  rr_buf_init(&b, RR_AUDIT_DATA_MAX);
  int rc = canonicalize(json, len ? len : strlen(json), &b);
  if (rc == 0 && !b.data)
    rc = rr_buf_reserve(&b, 1);
  if (rc == 0) {
    *out = rr_buf_steal(&b, out_len);
  }
  rr_buf_close(&b);
  return rc;
}

/* ---- the record hash --------------------------------------------------- */

typedef struct fields {
  int64_t seq, at_ms;
  const void *actor, *kind, *subject, *data;
  size_t actor_len, kind_len, subject_len, data_len;
  const char *prev; /* hex */
} fields_t;

static void be64(unsigned char out[8], uint64_t v) {
  for (int i = 7; i >= 0; i--, v >>= 8)
    out[i] = (unsigned char)(v & 0xff);
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1;
}

/* 64 lower-case hex digits to 32 bytes; false when it is not that. */
static bool unhex(const char *hex, unsigned char out[32]) {
  if (!hex || strnlen(hex, RR_AUDIT_HASH_HEX + 1) != RR_AUDIT_HASH_HEX)
    return false;
  for (size_t i = 0; i < 32; i++) {
    int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0)
      return false;
    out[i] = (unsigned char)(hi << 4 | lo);
  }
  return true;
}

static int update_str(EVP_MD_CTX *ctx, const void *p, size_t n) {
  unsigned char len[8];
  be64(len, n);
  return EVP_DigestUpdate(ctx, len, 8) && (n == 0 || EVP_DigestUpdate(ctx, p, n));
}

/* RR_EINVAL when prev is not a hex hash, RR_EIO when OpenSSL fails. */
static int hash_fields(EVP_MD_CTX *ctx, const EVP_MD *md, const fields_t *f,
                       char out[RR_AUDIT_HASH_HEX + 1]) {
  unsigned char prev[32], ints[16], digest[EVP_MAX_MD_SIZE];
  unsigned int dlen = 0;
  if (!unhex(f->prev, prev))
    return RR_EINVAL;
  be64(ints, (uint64_t)f->seq);
  be64(ints + 8, (uint64_t)f->at_ms);
  if (!EVP_DigestInit_ex(ctx, md, NULL) || !update_str(ctx, HASH_TAG, strlen(HASH_TAG)) ||
      !EVP_DigestUpdate(ctx, ints, sizeof ints) || !update_str(ctx, f->actor, f->actor_len) ||
      !update_str(ctx, f->kind, f->kind_len) || !update_str(ctx, f->subject, f->subject_len) ||
      !update_str(ctx, f->data, f->data_len) || !EVP_DigestUpdate(ctx, prev, sizeof prev) ||
      !EVP_DigestFinal_ex(ctx, digest, &dlen) || dlen != 32)
    return RR_EIO;
  static const char hex[] = "0123456789abcdef";
  for (size_t i = 0; i < 32; i++) {
    out[2 * i] = hex[digest[i] >> 4];
    out[2 * i + 1] = hex[digest[i] & 15];
  }
  out[RR_AUDIT_HASH_HEX] = '\0';
  return 0;
}

/* ---- schema, head, append --------------------------------------------- */

int rr_audit_schema(sqlite3 *db) {
  return sqlite3_exec(db, schema, NULL, NULL, NULL) == SQLITE_OK ? 0 : RR_EIO;
}

static bool table_exists(sqlite3 *db, int *rc) {
  sqlite3_stmt *st;
  *rc = 0;
  if (sqlite3_prepare_v2(db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit'",
                         -1, &st, NULL) != SQLITE_OK) {
    *rc = RR_EIO;
    return false;
  }
  int step = sqlite3_step(st);
  sqlite3_finalize(st);
  if (step != SQLITE_ROW && step != SQLITE_DONE)
    *rc = RR_EIO;
  return step == SQLITE_ROW;
}

static void head_empty(rr_audit_head_t *h) {
  h->seq = 0;
  memcpy(h->hash, ZERO_HASH, sizeof h->hash);
}

int rr_audit_head(sqlite3 *db, rr_audit_head_t *out) {
  head_empty(out);
  int rc;
  if (!table_exists(db, &rc))
    return rc;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", -1, &st,
                         NULL) != SQLITE_OK)
    return RR_EIO;
  int step = sqlite3_step(st);
  if (step == SQLITE_ROW) {
    const char *hash = (const char *)sqlite3_column_text(st, 1);
    out->seq = sqlite3_column_int64(st, 0);
    snprintf(out->hash, sizeof out->hash, "%s", hash ? hash : "");
  } else if (step != SQLITE_DONE) {
    rc = RR_EIO;
  }
  sqlite3_finalize(st);
  return rc;
}

void rr_audit_chain_close(rr_audit_chain_t *chain) {
  struct rr_audit_chain_int *in = chain->in;
  if (in) {
    sqlite3_finalize(in->insert);
    EVP_MD_CTX_free(in->ctx);
    EVP_MD_free(in->md);
    rr_buf_close(&in->data);
    free(in);
  }
  chain->in = NULL;
  head_empty(&chain->head);
}

int rr_audit_chain_load(sqlite3 *db, rr_audit_chain_t *chain) {
  chain->in = NULL;
  head_empty(&chain->head);
  struct rr_audit_chain_int *in = calloc(1, sizeof *in);
  if (!in)
    return RR_ENOMEM;
  chain->in = in;
  in->db = db;
  rr_buf_init(&in->data, RR_AUDIT_DATA_MAX);
  int rc = RR_ENOMEM;
  in->md = EVP_MD_fetch(NULL, "SHA256", NULL);
  in->ctx = EVP_MD_CTX_new();
  if (!in->md || !in->ctx)
    goto out;
  rc = RR_EIO;
  if (sqlite3_prepare_v3(db, insert_sql, -1, SQLITE_PREPARE_PERSISTENT, &in->insert, NULL) !=
      SQLITE_OK)
    goto out;
  rc = rr_audit_head(db, &chain->head);
out:
  if (rc != 0)
    rr_audit_chain_close(chain);
  return rc;
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool text_ok(const char *s, bool required) {
  if (!s)
    return !required;
  size_t n = strlen(s);
  return (n > 0 || !required) && utf8_valid((const unsigned char *)s, n);
}

int rr_audit_append(sqlite3 *db, rr_audit_chain_t *chain, rr_audit_head_t *tip,
                    const rr_audit_record_t *rec) {
  struct rr_audit_chain_int *in = chain->in;
  if (!in || in->db != db || !rec || !text_ok(rec->actor, true) || !text_ok(rec->kind, true) ||
      !text_ok(rec->subject, false) || tip->seq < 0)
    return RR_EINVAL;
  if (strlen(rec->actor) > RR_AUDIT_FIELD_MAX || strlen(rec->kind) > RR_AUDIT_FIELD_MAX ||
      (rec->subject && strlen(rec->subject) > RR_AUDIT_FIELD_MAX))
    return RR_ELIMIT;
  int rc;
  if (rec->data) {
    rc = canonicalize(rec->data, rec->data_len ? rec->data_len : strlen(rec->data), &in->data);
  } else {
    rr_buf_reset(&in->data);
    rc = rr_buf_puts(&in->data, "null");
  }
  if (rc != 0)
    return rc;
  fields_t f = {.seq = tip->seq + 1,
                .at_ms = rec->at_ms ? rec->at_ms : now_ms(),
                .actor = rec->actor,
                .actor_len = strlen(rec->actor),
                .kind = rec->kind,
                .kind_len = strlen(rec->kind),
                .subject = rec->subject ? rec->subject : "",
                .subject_len = rec->subject ? strlen(rec->subject) : 0,
                .data = in->data.data,
                .data_len = in->data.len,
                .prev = tip->hash};
  char hash[RR_AUDIT_HASH_HEX + 1];
  if ((rc = hash_fields(in->ctx, in->md, &f, hash)) != 0)
    return rc;
  sqlite3_stmt *st = in->insert;
  sqlite3_bind_int64(st, 1, f.seq);
  sqlite3_bind_int64(st, 2, f.at_ms);
  sqlite3_bind_text(st, 3, f.actor, (int)f.actor_len, SQLITE_STATIC);
  sqlite3_bind_text(st, 4, f.kind, (int)f.kind_len, SQLITE_STATIC);
  sqlite3_bind_text(st, 5, f.subject, (int)f.subject_len, SQLITE_STATIC);
  sqlite3_bind_text(st, 6, f.data, (int)f.data_len, SQLITE_STATIC);
  sqlite3_bind_text(st, 7, f.prev, RR_AUDIT_HASH_HEX, SQLITE_STATIC);
  sqlite3_bind_text(st, 8, hash, RR_AUDIT_HASH_HEX, SQLITE_STATIC);
  int step = sqlite3_step(st);
  rc = step != SQLITE_DONE ? RR_EIO : sqlite3_changes(db) == 1 ? 0 : RR_EINVAL;
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  if (rc == 0) {
    tip->seq = f.seq;
    memcpy(tip->hash, hash, sizeof tip->hash);
  }
  return rc;
}

void rr_audit_chain_commit(rr_audit_chain_t *chain, const rr_audit_head_t *tip) {
  chain->head = *tip;
}

/* ---- verify ------------------------------------------------------------- */

const char *rr_audit_fault_name(rr_audit_fault_t fault) {
  switch (fault) {
  case RR_AUDIT_INTACT: return "intact";
  case RR_AUDIT_EDITED: return "edited";
  case RR_AUDIT_INSERTED: return "inserted";
  case RR_AUDIT_DELETED: return "deleted";
  case RR_AUDIT_REORDERED: return "reordered";
  }
  return "unknown";
}

/* The fields of the current row of a SELECT of seq, at_ms, actor, kind,
 * subject, data, prev (, hash); valid until the statement steps again. */
static void row_fields(sqlite3_stmt *st, fields_t *f) {
  f->seq = sqlite3_column_int64(st, 0);
  f->at_ms = sqlite3_column_int64(st, 1);
  f->actor = sqlite3_column_blob(st, 2);
  f->actor_len = (size_t)sqlite3_column_bytes(st, 2);
  f->kind = sqlite3_column_blob(st, 3);
  f->kind_len = (size_t)sqlite3_column_bytes(st, 3);
  f->subject = sqlite3_column_blob(st, 4);
  f->subject_len = (size_t)sqlite3_column_bytes(st, 4);
  f->data = sqlite3_column_blob(st, 5);
  f->data_len = (size_t)sqlite3_column_bytes(st, 5);
  f->prev = (const char *)sqlite3_column_text(st, 6);
}

typedef struct verifier {
  sqlite3 *db;
  EVP_MD *md;
  EVP_MD_CTX *ctx;
  int64_t max_seq;
} verifier_t;

/* Whether the fields hash to hash, as they are or with another seq. */
static bool hashes_to(verifier_t *v, const fields_t *f, const char *hash) {
  char got[RR_AUDIT_HASH_HEX + 1];
  return hash && hash_fields(v->ctx, v->md, f, got) == 0 && strcmp(got, hash) == 0;
}

/* The seq a record (its stored fields and hash) was appended as, when it
 * was not its present one: tries the seqs nearest first. 0 = none. */
static int64_t origin_seq(verifier_t *v, const fields_t *row, const char *hash) {
  fields_t f = *row;
  int64_t limit = v->max_seq + ORIGIN_SLACK;
  for (int64_t d = 1; row->seq - d >= 1 || row->seq + d <= limit; d++) {
    if ((f.seq = row->seq - d) >= 1 && hashes_to(v, &f, hash))
      return f.seq;
    if ((f.seq = row->seq + d) <= limit && hashes_to(v, &f, hash))
      return f.seq;
  }
  return 0;
}

/* The seq of the row whose hash is hash (0 = none; -1 = error). */
static int64_t owner_seq(verifier_t *v, const char *hash) {
  sqlite3_stmt *st;
  if (!hash ||
      sqlite3_prepare_v2(v->db, "SELECT seq FROM audit WHERE hash = ? ORDER BY seq LIMIT 1", -1,
                         &st, NULL) != SQLITE_OK)
    return hash ? -1 : 0;
  sqlite3_bind_text(st, 1, hash, -1, SQLITE_STATIC);
  int step = sqlite3_step(st);
  int64_t seq = step == SQLITE_ROW ? sqlite3_column_int64(st, 0) : step == SQLITE_DONE ? 0 : -1;
  sqlite3_finalize(st);
  return seq;
}

static void fault(rr_audit_report_t *r, rr_audit_fault_t kind, int64_t seq, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void fault(rr_audit_report_t *r, rr_audit_fault_t kind, int64_t seq, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  r->fault = kind;
  r->seq = seq;
  vsnprintf(r->detail, sizeof r->detail, fmt, ap);
  va_end(ap);
}

/* Why the row at f->seq (the seq expected there) breaks the chain:
 * hash_ok tells whether its fields match its own hash, prev_hash is the
 * hash of the row before it (zeros for the first). */
static int classify(verifier_t *v, const fields_t *f, const char *hash, bool hash_ok,
                    const char *prev_hash, rr_audit_report_t *r) {
  if (!hash_ok) {
    int64_t was = origin_seq(v, f, hash);
    if (was == 0) {
      fault(r, RR_AUDIT_EDITED, f->seq, "its fields do not match its hash");
      return 0;
    }
    if (was < f->seq) {
      fault(r, RR_AUDIT_INSERTED, was,
            "%" PRId64 " record(s) inserted before the record appended as %" PRId64
            ", now at %" PRId64,
            f->seq - was, was, f->seq);
      return 0;
    }
    int64_t pred = strcmp(f->prev, ZERO_HASH) == 0 ? 0 : owner_seq(v, f->prev);
    if (pred < 0)
      return RR_EIO;
    if (pred > 0 || strcmp(f->prev, ZERO_HASH) == 0)
      fault(r, RR_AUDIT_REORDERED, f->seq,
            "the record appended as %" PRId64 " is at %" PRId64 " (records swapped or moved)", was,
            f->seq);
    else
      fault(r, RR_AUDIT_DELETED, f->seq,
            "%" PRId64 " record(s) deleted and the rest renumbered: the record appended as %" PRId64
            " is at %" PRId64,
            was - f->seq, was, f->seq);
    return 0;
  }
  /* Intact at its place, but it does not follow the row before it. */
  if (f->seq == 1) {
    fault(r, RR_AUDIT_DELETED, 1,
          "the first record does not start the chain: records before it "
          "were deleted and the rest renumbered");
    return 0;
  }
  int64_t pred = owner_seq(v, f->prev);
  if (pred < 0)
    return RR_EIO;
  if (pred > 0)
    fault(r, RR_AUDIT_REORDERED, f->seq,
          "it follows record %" PRId64 " in the chain, not record %" PRId64, pred, f->seq - 1);
  else
    fault(r, RR_AUDIT_EDITED, f->seq - 1,
          "rewritten with a new hash: record %" PRId64 " does not follow it (prev %.12s..., "
          "its hash %.12s...)",
          f->seq, f->prev, prev_hash);
  return 0;
}

static int verify_rows(verifier_t *v, rr_audit_report_t *r) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(v->db, "SELECT coalesce(max(seq), 0) FROM audit", -1, &st, NULL) !=
      SQLITE_OK)
    return RR_EIO;
  int step = sqlite3_step(st);
  v->max_seq = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  if (step != SQLITE_ROW ||
      sqlite3_prepare_v2(v->db,
                         "SELECT seq, at_ms, actor, kind, subject, data, prev, hash"
                         " FROM audit ORDER BY seq",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  rr_audit_head_t last;
  head_empty(&last);
  int rc = 0;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    fields_t f;
    row_fields(st, &f);
    const char *hash = (const char *)sqlite3_column_text(st, 7);
    int64_t want = last.seq + 1;
    if (f.seq != want) {
      if (f.seq == want + 1)
        fault(r, RR_AUDIT_DELETED, want, "missing: the next record is %" PRId64, f.seq);
      else
        fault(r, RR_AUDIT_DELETED, want, "missing, and every record up to %" PRId64, f.seq - 1);
      break;
    }
    r->records++;
    bool hash_ok = hashes_to(v, &f, hash);
    if (hash_ok && f.prev && strcmp(f.prev, last.hash) == 0) {
      last.seq = f.seq;
      memcpy(last.hash, hash, sizeof last.hash);
      continue;
    }
    if (!f.prev)
      f.prev = "";
    rc = classify(v, &f, hash, hash_ok, last.hash, r);
    break;
  }
  if (rc == 0 && step != SQLITE_ROW && step != SQLITE_DONE)
    rc = RR_EIO;
  sqlite3_finalize(st);
  if (rc == 0 && r->fault == RR_AUDIT_INTACT)
    r->head = last;
  return rc;
}

int rr_audit_verify(sqlite3 *db, rr_audit_report_t *report) {
  memset(report, 0, sizeof *report);
  head_empty(&report->head);
  verifier_t v = {.db = db, .md = EVP_MD_fetch(NULL, "SHA256", NULL), .ctx = EVP_MD_CTX_new()};
  int rc = RR_ENOMEM;
  if (!v.md || !v.ctx)
    goto out;
  rc = RR_EIO;
  /* One snapshot for every statement below. */
  if (sqlite3_exec(db, "SAVEPOINT rr_audit_verify", NULL, NULL, NULL) != SQLITE_OK)
    goto out;
  if (table_exists(db, &rc))
    rc = verify_rows(&v, report);
  sqlite3_exec(db, "RELEASE rr_audit_verify", NULL, NULL, NULL);
out:
  EVP_MD_CTX_free(v.ctx);
  EVP_MD_free(v.md);
  return rc;
}

/* ---- export ------------------------------------------------------------- */

static int put_field(rr_buf_t *b, const char *name, sqlite3_stmt *st, int col) {
  int rc = rr_buf_printf(b, ",\"%s\":", name);
  return rc ? rc
            : put_string(b, (const char *)sqlite3_column_blob(st, col),
                         (size_t)sqlite3_column_bytes(st, col));
}

/* One record as a JSON line. data goes in as stored when it is JSON (it is
 * canonical as appended), else as a string, so the line stays JSON. */
static int export_line(rr_buf_t *b, sqlite3_stmt *st) {
  rr_buf_reset(b);
  int rc = rr_buf_printf(b, "{\"seq\":%lld,\"at_ms\":%lld", sqlite3_column_int64(st, 0),
                         sqlite3_column_int64(st, 1));
  if (rc == 0)
    rc = put_field(b, "actor", st, 2);
  if (rc == 0)
    rc = put_field(b, "kind", st, 3);
  if (rc == 0)
    rc = put_field(b, "subject", st, 4);
  if (rc == 0) {
    const char *data = (const char *)sqlite3_column_blob(st, 5);
    size_t len = (size_t)sqlite3_column_bytes(st, 5);
    json_error_t err;
    json_t *probe = json_loadb(data, len, JSON_DECODE_ANY, &err);
    if (probe) {
      json_decref(probe);
      if ((rc = rr_buf_puts(b, ",\"data\":")) == 0)
        rc = rr_buf_append(b, data, len);
    } else {
      rc = put_field(b, "data", st, 5);
    }
  }
  if (rc == 0)
    rc = put_field(b, "prev", st, 6);
  if (rc == 0)
    rc = put_field(b, "hash", st, 7);
  return rc ? rc : rr_buf_puts(b, "}\n");
}

int64_t rr_audit_export(sqlite3 *db, int64_t since_ms, int64_t until_ms, FILE *out) {
  int rc;
  if (!table_exists(db, &rc))
    return rc;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "SELECT seq, at_ms, actor, kind, subject, data, prev, hash FROM audit"
                         " WHERE at_ms >= ?1 AND at_ms < ?2 ORDER BY seq",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_int64(st, 1, since_ms);
  sqlite3_bind_int64(st, 2, until_ms);
  rr_buf_t line;
  rr_buf_init(&line, 2 * TEXT_MAX);
  int64_t n = 0;
  int step;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    if ((rc = export_line(&line, st)) != 0)
      break;
    if (fwrite(line.data, 1, line.len, out) != line.len) {
      rc = RR_EIO;
      break;
    }
    n++;
  }
  if (rc == 0 && step != SQLITE_DONE)
    rc = RR_EIO;
  if (rc == 0 && fflush(out) != 0)
    rc = RR_EIO;
  sqlite3_finalize(st);
  rr_buf_close(&line);
  return rc ? rc : n;
}

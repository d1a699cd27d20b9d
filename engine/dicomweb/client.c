/* DICOMweb client: QIDO-RS, metadata, WADO-RS and STOW-RS over
 * rr_http_client.
 *
 * Every operation is one HTTP transfer and one rr_dicomweb_op_t that owns
 * what the transfer's callbacks need (the Authorization header, the WADO-RS
 * parser and open files, the STOW-RS file list and framing). The HTTP
 * client's completion callback (on_http_done) turns the response into an
 * outcome, calls the user back and frees the op: an op never outlives its
 * transfer and never refers back to its rr_dicomweb_client_t.
 *
 * The pure parts (DICOM JSON, the Part 10 meta header, URL encoding) come
 * first and touch no loop, socket or file. */
#include "dicomweb/client.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/log.h"
#include "dicomweb/multipart.h"

#define LOG_MODULE "dicomweb"
#define MAX_UID 64
#define WADO_HEAD_CAP 16384 /* bytes of a part kept to read its meta header */
#define MAX_SQ_DEPTH 16
#define MSG_CAP 320

/* ---- errors and retry policy ------------------------------------------------ */

const char *rr_dicomweb_strerror(int code) {
  switch (code) {
  case RR_DICOMWEB_EHTTP: return "the PACS answered with an HTTP error status";
  case RR_DICOMWEB_EREJECTED: return "the PACS did not store every instance";
  default: return rr_http_client_strerror(code);
  }
}

static const char *status_name(int code) {
  switch (code) {
  case 0: return "ok";
  case RR_DICOMWEB_EHTTP: return "http_error";
  case RR_DICOMWEB_EREJECTED: return "rejected";
  case RR_HTTP_ECONNLOST: return "connection_lost";
  case RR_HTTP_EPROTOCOL: return "protocol_error";
  case RR_HTTP_ETRANSPORT: return "transport_error";
  case RR_ETLS: return "tls";
  case RR_ELIMIT: return "limit";
  case RR_EPARSE: return "parse_error";
  case RR_ENOMEM: return "out_of_memory";
  default: break;
  }
  if (code < 0 && code > -4096)
    return uv_err_name(code);
  return "error";
}

/* Whether a code without an HTTP answer may go away by itself. */
static int code_retryable(int code) {
  switch (code) {
  case UV_ETIMEDOUT:
  case UV_ECONNREFUSED:
  case UV_ECONNRESET:
  case UV_ECONNABORTED:
  case UV_EHOSTUNREACH:
  case UV_ENETUNREACH:
  case UV_ENETDOWN:
  case UV_EADDRNOTAVAIL:
  case UV_EAI_AGAIN:
  case UV_EAI_NONAME:
  case RR_HTTP_ECONNLOST:
  case RR_ENOMEM:
  case -ENOSPC:
  case -EDQUOT:
  case -EIO:
  case -EMFILE:
  case -ENFILE: return 1;
  default: return 0;
  }
}

static int http_retryable(long http) {
  return (http >= 500 && http != 501 && http != 505) || http == 408 || http == 429;
}

static const char *reason_phrase(long http) {
  switch (http) {
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 406: return "Not Acceptable";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 413: return "Payload Too Large";
  case 415: return "Unsupported Media Type";
  case 429: return "Too Many Requests";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return "";
  }
}

/* PS3.18 Table 10.5.3-? / PS3.4 C-STORE status meanings of FailureReason. */
static const char *failure_text(unsigned reason) {
  if ((reason & 0xFF00u) == 0xA700u)
    return "refused: out of resources";
  if ((reason & 0xFF00u) == 0xA900u)
    return "error: data set does not match SOP class";
  if (reason == 0xC122u)
    return "referenced transfer syntax not supported";
  if ((reason & 0xF000u) == 0xC000u)
    return "error: cannot understand";
  switch (reason) {
  case 0x0110u: return "processing failure";
  case 0x0122u: return "referenced SOP class not supported";
  case 0x0124u: return "not authorized";
  case 0x0212u: return "mistyped argument";
  default: return "unknown reason";
  }
}

/* ---- small pure helpers ----------------------------------------------------- */

static int valid_uid(const char *s) {
  size_t n = 0;
  if (!s)
    return 0;
  for (; s[n]; n++)
    if (!(s[n] == '.' || (s[n] >= '0' && s[n] <= '9')))
      return 0;
  return n >= 1 && n <= MAX_UID;
}

/* Appends s to a query: percent-encodes what RFC 3986 does not allow in a
 * query or what would split it ('&', '=', '+', ';', '#', '%'). The QIDO-RS
 * wildcards '*' and '?' and the list separator ',' stay literal: servers
 * match on the raw value (Orthanc 1.10 does not decode "%2A"). */
static int append_encoded(rr_buf_t *b, const char *s) {
  static const char hex[] = "0123456789ABCDEF";
  int rc = 0;
  for (const unsigned char *p = (const unsigned char *)s; *p && !rc; p++) {
    if (isalnum(*p) || (*p < 0x80 && strchr("-._~*?,:@/!$'()", *p))) {
      rc = rr_buf_putc(b, (char)*p);
    } else {
      char e[3] = {'%', hex[*p >> 4], hex[*p & 15]};
      rc = rr_buf_append(b, e, 3);
    }
  }
  return rc;
}

static char *base64(const unsigned char *in, size_t n) {
  static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char *out = malloc((n + 2) / 3 * 4 + 1), *o = out;
  if (!out)
    return NULL;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16;
    if (i + 1 < n)
      v |= (uint32_t)in[i + 1] << 8;
    if (i + 2 < n)
      v |= in[i + 2];
    *o++ = tab[(v >> 18) & 63];
    *o++ = tab[(v >> 12) & 63];
    *o++ = i + 1 < n ? tab[(v >> 6) & 63] : '=';
    *o++ = i + 2 < n ? tab[v & 63] : '=';
  }
  *o = '\0';
  return out;
}

static void wipe_free(char *s) {
  if (!s)
    return;
  explicit_bzero(s, strlen(s));
  free(s);
}

/* ---- DICOM JSON (PS3.18 F.2) -------------------------------------------------- */

typedef struct result_impl {
  rr_dicomweb_result_t pub;
  char **joined; /* multi-valued strings joined with '\\', one per match */
} result_impl_t;

static int is_tag_key(const char *k) {
  size_t n = 0;
  for (; k[n]; n++)
    if (!isxdigit((unsigned char)k[n]))
      return 0;
  return n == 8;
}

static int vr_is(const char *vr, const char *const *list) {
  for (; *list; list++)
    if (strcmp(vr, *list) == 0)
      return 1;
  return 0;
}

static const char *const numeric_vrs[] = {"IS", "DS", "US", "UL", "SS", "SL",
                                          "FL", "FD", "SV", "UV", "AT", NULL};

static int check_dataset(json_t *ds, size_t index, int depth, rr_buf_t *err);

/* One attribute's value object. */
static int check_attribute(const char *key, json_t *attr, size_t index, int depth, rr_buf_t *err) {
  const char *why = NULL;
  json_t *vr = json_object_get(attr, "vr");
  json_t *value = json_object_get(attr, "Value");
  if (!json_is_object(attr))
    why = "is not an object";
  else if (!json_is_string(vr) || json_string_length(vr) != 2 ||
           !isupper((unsigned char)json_string_value(vr)[0]) ||
           !isupper((unsigned char)json_string_value(vr)[1]))
    why = "has no valid \"vr\"";
  else if (value && !json_is_array(value))
    why = "has a \"Value\" that is not an array";
  else if (json_object_get(attr, "BulkDataURI") &&
           !json_is_string(json_object_get(attr, "BulkDataURI")))
    why = "has a \"BulkDataURI\" that is not a string";
  else if (json_object_get(attr, "InlineBinary") &&
           !json_is_string(json_object_get(attr, "InlineBinary")))
    why = "has an \"InlineBinary\" that is not a string";
  if (!why && value) {
    const char *v = json_string_value(vr);
    size_t i;
    json_t *item;
    json_array_foreach(value, i, item) {
      if (json_is_null(item))
        continue;
      if (strcmp(v, "SQ") == 0) {
        if (!json_is_object(item)) {
          why = "has a sequence item that is not an object";
          break;
        }
        if (depth >= MAX_SQ_DEPTH) {
          why = "nests sequences too deeply";
          break;
        }
        int rc = check_dataset(item, index, depth + 1, err);
        if (rc)
          return rc;
      } else if (strcmp(v, "PN") == 0) {
        if (json_is_string(item))
          continue;
        if (!json_is_object(item)) {
          why = "has a person name that is neither an object nor a string";
          break;
        }
        const char *g;
        json_t *gv;
        json_object_foreach(item, g, gv) {
          if (!json_is_string(gv)) {
            why = "has a person name group that is not a string";
            break;
          }
        }
        if (why)
          break;
      } else if (vr_is(v, numeric_vrs)) {
        if (!json_is_number(item) && !json_is_string(item)) {
          why = "has a numeric value that is neither a number nor a string";
          break;
        }
      } else if (!json_is_string(item) && !json_is_number(item)) {
        why = "has a value that is not a string";
        break;
      }
    }
  }
  if (why) {
    if (err)
      rr_buf_printf(err, "DICOM JSON: dataset %zu: attribute %.8s %s", index, key, why);
    return RR_EPARSE;
  }
  return 0;
}

static int check_dataset(json_t *ds, size_t index, int depth, rr_buf_t *err) {
  const char *key;
  json_t *attr;
  if (!json_is_object(ds)) {
    if (err)
      rr_buf_printf(err, "DICOM JSON: dataset %zu is not an object", index);
    return RR_EPARSE;
  }
  json_object_foreach(ds, key, attr) {
    if (!is_tag_key(key)) {
      if (err)
        rr_buf_printf(err, "DICOM JSON: dataset %zu has a key that is not a tag", index);
      return RR_EPARSE;
    }
    int rc = check_attribute(key, attr, index, depth, err);
    if (rc)
      return rc;
  }
  return 0;
}

/* The attribute object of tag in ds, or NULL. Keys are upper-case hex per
 * F.2.1.1, but lower case is accepted. */
static json_t *attribute(const json_t *ds, uint32_t tag) {
  char key[9];
  snprintf(key, sizeof key, "%08" PRIX32, tag);
  json_t *a = json_object_get(ds, key);
  if (!a) {
    snprintf(key, sizeof key, "%08" PRIx32, tag);
    a = json_object_get(ds, key);
  }
  return json_is_object(a) ? a : NULL;
}

static json_t *value_item(const json_t *ds, uint32_t tag, size_t i) {
  json_t *a = attribute(ds, tag);
  json_t *v = a ? json_object_get(a, "Value") : NULL;
  return json_is_array(v) ? json_array_get(v, i) : NULL;
}

const char *rr_dicomweb_json_string(const json_t *ds, uint32_t tag, size_t i) {
  json_t *item = value_item(ds, tag, i);
  if (json_is_object(item))
    item = json_object_get(item, "Alphabetic");
  return json_is_string(item) ? json_string_value(item) : NULL;
}

int rr_dicomweb_json_number(const json_t *ds, uint32_t tag, size_t i, double *out) {
  json_t *item = value_item(ds, tag, i);
  if (json_is_number(item)) {
    *out = json_number_value(item);
    return 0;
  }
  if (json_is_string(item)) {
    const char *s = json_string_value(item);
    char *end = NULL;
    errno = 0;
    double d = strtod(s, &end);
    while (end && *end == ' ')
      end++;
    if (end != s && end && *end == '\0' && errno == 0) {
      *out = d;
      return 0;
    }
  }
  return RR_ENOTFOUND;
}

static long number_or(const json_t *ds, uint32_t tag) {
  double d;
  if (rr_dicomweb_json_number(ds, tag, 0, &d) != 0 || d < (double)LONG_MIN || d > (double)LONG_MAX)
    return -1;
  return (long)d;
}

/* Value(s) of a multi-valued string attribute: the first one as is, or all
 * joined with '\\' into *owned. */
static int joined_string(const json_t *ds, uint32_t tag, const char **out, char **owned) {
  json_t *a = attribute(ds, tag);
  json_t *v = a ? json_object_get(a, "Value") : NULL;
  *out = NULL;
  if (!json_is_array(v) || json_array_size(v) == 0)
    return 0;
  if (json_array_size(v) == 1) {
    *out = rr_dicomweb_json_string(ds, tag, 0);
    return 0;
  }
  rr_buf_t b;
  rr_buf_init(&b, SIZE_MAX);
  int rc = 0;
  for (size_t i = 0; i < json_array_size(v) && !rc; i++) {
    const char *s = rr_dicomweb_json_string(ds, tag, i);
    if (i > 0)
      rc = rr_buf_putc(&b, '\\');
    if (!rc && s)
      rc = rr_buf_puts(&b, s);
  }
  if (rc) {
    rr_buf_close(&b);
    return rc;
  }
  if (!b.data && (rc = rr_buf_puts(&b, "")) != 0)
    return rc;
  *owned = rr_buf_steal(&b, NULL);
  *out = *owned;
  return 0;
}

void rr_dicomweb_result_free(rr_dicomweb_result_t *r) {
  if (!r)
    return;
  result_impl_t *ri = (result_impl_t *)r;
  if (ri->joined)
    for (size_t i = 0; i < r->n; i++)
      free(ri->joined[i]);
  free(ri->joined);
  free(r->matches);
  json_decref(r->json);
  free(ri);
}

/* Fills the result's matches from its (checked) JSON array. */
static int fill_matches(result_impl_t *ri) {
  rr_dicomweb_result_t *r = &ri->pub;
  size_t n = json_array_size(r->json);
  if (n == 0)
    return 0;
  r->matches = calloc(n, sizeof *r->matches);
  ri->joined = calloc(n, sizeof *ri->joined);
  if (!r->matches || !ri->joined)
    return RR_ENOMEM;
  for (size_t i = 0; i < n; i++) {
    json_t *ds = json_array_get(r->json, i);
    rr_dicomweb_match_t *m = &r->matches[i];
    r->n = i + 1;
    m->json = ds;
    m->study_uid = rr_dicomweb_json_string(ds, 0x0020000Du, 0);
    m->series_uid = rr_dicomweb_json_string(ds, 0x0020000Eu, 0);
    m->sop_instance_uid = rr_dicomweb_json_string(ds, 0x00080018u, 0);
    m->sop_class_uid = rr_dicomweb_json_string(ds, 0x00080016u, 0);
    m->patient_id = rr_dicomweb_json_string(ds, 0x00100020u, 0);
    m->patient_name = rr_dicomweb_json_string(ds, 0x00100010u, 0);
    m->accession_number = rr_dicomweb_json_string(ds, 0x00080050u, 0);
    m->modality = rr_dicomweb_json_string(ds, 0x00080060u, 0);
    int rc = joined_string(ds, 0x00080061u, &m->modalities, &ri->joined[i]);
    if (rc)
      return rc;
    m->study_date = rr_dicomweb_json_string(ds, 0x00080020u, 0);
    m->study_time = rr_dicomweb_json_string(ds, 0x00080030u, 0);
    m->study_description = rr_dicomweb_json_string(ds, 0x00081030u, 0);
    m->series_description = rr_dicomweb_json_string(ds, 0x0008103Eu, 0);
    m->body_part = rr_dicomweb_json_string(ds, 0x00180015u, 0);
    m->series_number = number_or(ds, 0x00200011u);
    m->instance_number = number_or(ds, 0x00200013u);
    m->study_series = number_or(ds, 0x00201206u);
    m->study_instances = number_or(ds, 0x00201208u);
    m->series_instances = number_or(ds, 0x00201209u);
  }
  return 0;
}

/* Parses JSON text, naming the byte offset of a syntax error (jansson's
 * own text may quote the input, so it is left out). */
static json_t *load_json(const char *text, size_t len, rr_buf_t *err, const char *what) {
  json_error_t je;
  json_t *j = json_loadb(text, len, 0, &je);
  if (!j && err)
    rr_buf_printf(err, "malformed JSON in the %s at byte %d (line %d, column %d)", what,
                  je.position, je.line, je.column);
  return j;
}

int rr_dicomweb_parse_datasets(const char *json, size_t len, size_t max_matches,
                               rr_dicomweb_result_t **out, rr_buf_t *err) {
  int rc = 0;
  result_impl_t *ri = calloc(1, sizeof *ri);
  if (!ri)
    return RR_ENOMEM;
  ri->pub.json = load_json(json, len, err, "DICOM JSON answer");
  if (!ri->pub.json) {
    rc = RR_EPARSE;
    goto out;
  }
  if (!json_is_array(ri->pub.json)) {
    if (err)
      rr_buf_printf(err, "DICOM JSON: the answer is not an array");
    rc = RR_EPARSE;
    goto out;
  }
  if (max_matches && json_array_size(ri->pub.json) > max_matches) {
    if (err)
      rr_buf_printf(err, "DICOM JSON: %zu datasets, over the limit of %zu",
                    json_array_size(ri->pub.json), max_matches);
    rc = RR_ELIMIT;
    goto out;
  }
  size_t i;
  json_t *ds;
  json_array_foreach(ri->pub.json, i, ds) {
    if ((rc = check_dataset(ds, i, 0, err)) != 0)
      goto out;
  }
  if ((rc = fill_matches(ri)) != 0)
    goto out;
  *out = &ri->pub;
  ri = NULL;
out:
  if (ri)
    rr_dicomweb_result_free(&ri->pub);
  return rc;
}

/* ---- DICOM Part 10 meta header ----------------------------------------------- */

static uint32_t le16(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static uint32_t le32(const unsigned char *p) {
  return le16(p) | le16(p + 2) << 16;
}

int rr_dicomweb_part10_sop_uid(const void *data, size_t len, char *out, size_t cap) {
  static const char *const long_vrs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                         "SV", "UC", "UN", "UR", "UT", "UV", NULL};
  const unsigned char *d = data;
  if (len < 132)
    return RR_EAGAIN;
  if (memcmp(d + 128, "DICM", 4) != 0)
    return RR_EPARSE;
  uint64_t p = 132;
  for (;;) {
    if (p + 8 > len)
      return RR_EAGAIN;
    uint32_t group = le16(d + p), elem = le16(d + p + 2);
    if (group != 0x0002)
      return RR_EPARSE;
    char vr[3] = {(char)d[p + 4], (char)d[p + 5], '\0'};
    uint64_t vlen, vstart;
    if (vr_is(vr, long_vrs)) {
      if (p + 12 > len)
        return RR_EAGAIN;
      vlen = le32(d + p + 8);
      vstart = p + 12;
    } else {
      vlen = le16(d + p + 6);
      vstart = p + 8;
    }
    if (vlen == 0xFFFFFFFFu)
      return RR_EPARSE; /* undefined length has no place in the meta group */
    if (elem == 0x0003) {
      if (vstart + vlen > len)
        return RR_EAGAIN;
      size_t n = (size_t)vlen;
      const char *v = (const char *)d + vstart;
      while (n > 0 && (v[n - 1] == '\0' || v[n - 1] == ' '))
        n--;
      if (n == 0 || n > MAX_UID)
        return RR_EPARSE;
      for (size_t i = 0; i < n; i++)
        if (!(v[i] == '.' || (v[i] >= '0' && v[i] <= '9')))
          return RR_EPARSE;
      if (n + 1 > cap)
        return RR_ELIMIT;
      memcpy(out, v, n);
      out[n] = '\0';
      return 0;
    }
    if (elem > 0x0003)
      return RR_EPARSE; /* elements come in order: (0002,0003) is not there */
    p = vstart + vlen;
  }
}

/* ---- the client ------------------------------------------------------------ */

struct rr_dicomweb_client {
  rr_http_client_t *http;
  rr_dicomweb_config_t cfg; /* strings below are owned copies */
  char *name, *base_url, *ca_file, *cert_file, *key_file;
  char *auth_header; /* "Authorization: Basic ..." or NULL; wiped at free */
  char *token;       /* bearer token or NULL; wiped at free */
};

void rr_dicomweb_config_default(rr_dicomweb_config_t *c) {
  memset(c, 0, sizeof *c);
  c->name = "dicomweb";
  c->connect_timeout_ms = 10000;
  c->timeout_ms = 60000;
  c->bulk_timeout_ms = 1800000;
  c->max_json_bytes = (size_t)64 << 20;
  c->max_matches = 100000;
  c->max_retrieve_bytes = (uint64_t)64 << 30;
  c->max_instance_bytes = (uint64_t)4 << 30;
  c->max_store_files = 10000;
}

void rr_dicomweb_client_free(rr_dicomweb_client_t *c) {
  if (!c)
    return;
  free(c->name);
  free(c->base_url);
  free(c->ca_file);
  free(c->cert_file);
  free(c->key_file);
  wipe_free(c->auth_header);
  if (c->token)
    rr_http_client_token_free(c->token);
  free(c);
}

static int dup_opt(const char *s, char **out) {
  *out = NULL;
  if (!s)
    return 0;
  *out = strdup(s);
  return *out ? 0 : RR_ENOMEM;
}

static int make_basic_header(rr_dicomweb_client_t *c, const char *user, const char *pwfile,
                             rr_buf_t *err) {
  char *password = NULL, *pair = NULL, *b64 = NULL;
  int rc = rr_http_client_read_token(pwfile, &password, err);
  if (rc)
    return rc;
  size_t n = strlen(user) + 1 + strlen(password);
  rc = RR_ENOMEM;
  pair = malloc(n + 1);
  if (!pair)
    goto out;
  snprintf(pair, n + 1, "%s:%s", user, password);
  b64 = base64((const unsigned char *)pair, n);
  if (!b64)
    goto out;
  size_t hn = strlen("Authorization: Basic ") + strlen(b64) + 1;
  c->auth_header = malloc(hn);
  if (!c->auth_header)
    goto out;
  snprintf(c->auth_header, hn, "Authorization: Basic %s", b64);
  rc = 0;
out:
  rr_http_client_token_free(password);
  wipe_free(pair);
  wipe_free(b64);
  return rc;
}

int rr_dicomweb_client_new(rr_http_client_t *http, const rr_dicomweb_config_t *cfg,
                           rr_dicomweb_client_t **out, rr_buf_t *err) {
  int rc = RR_EINVAL;
  rr_dicomweb_client_t *c = NULL;
  const char *why = NULL;
  if (!http || !cfg || !out)
    return RR_EINVAL;
  const char *u = cfg->base_url;
  if (!u || (strncasecmp(u, "http://", 7) != 0 && strncasecmp(u, "https://", 8) != 0))
    why = "base_url must be an http:// or https:// URL";
  else if (strpbrk(u, "?#") || strpbrk(u, " \r\n\t"))
    why = "base_url must not hold a query, a fragment or blanks";
  else if (cfg->auth == RR_DICOMWEB_AUTH_BASIC &&
           (!cfg->user || !cfg->user[0] || strchr(cfg->user, ':') || !cfg->password_file))
    why = "basic authentication needs a user (without ':') and a password_file";
  else if (cfg->auth == RR_DICOMWEB_AUTH_BEARER && !cfg->token_file)
    why = "bearer authentication needs a token_file";
  else if (cfg->auth > RR_DICOMWEB_AUTH_BEARER)
    why = "unknown authentication kind";
  else if (!cfg->connect_timeout_ms || !cfg->timeout_ms || !cfg->bulk_timeout_ms ||
           !cfg->max_json_bytes || !cfg->max_matches || !cfg->max_retrieve_bytes ||
           !cfg->max_instance_bytes || !cfg->max_store_files)
    why = "timeouts and limits must not be 0";
  if (why) {
    if (err)
      rr_buf_printf(err, "DICOMweb %s: %s", cfg->name ? cfg->name : "dicomweb", why);
    goto out;
  }
  c = calloc(1, sizeof *c);
  if (!c) {
    rc = RR_ENOMEM;
    goto out;
  }
  c->http = http;
  c->cfg = *cfg;
  if ((rc = dup_opt(cfg->name ? cfg->name : "dicomweb", &c->name)) != 0 ||
      (rc = dup_opt(u, &c->base_url)) != 0 || (rc = dup_opt(cfg->ca_file, &c->ca_file)) != 0 ||
      (rc = dup_opt(cfg->cert_file, &c->cert_file)) != 0 ||
      (rc = dup_opt(cfg->key_file, &c->key_file)) != 0)
    goto out;
  size_t bl = strlen(c->base_url);
  while (bl > 0 && c->base_url[bl - 1] == '/')
    c->base_url[--bl] = '\0';
  if (cfg->auth == RR_DICOMWEB_AUTH_BASIC &&
      (rc = make_basic_header(c, cfg->user, cfg->password_file, err)) != 0)
    goto out;
  if (cfg->auth == RR_DICOMWEB_AUTH_BEARER &&
      (rc = rr_http_client_read_token(cfg->token_file, &c->token, err)) != 0)
    goto out;
  c->cfg.name = c->name;
  c->cfg.base_url = c->base_url;
  c->cfg.ca_file = c->ca_file;
  c->cfg.cert_file = c->cert_file;
  c->cfg.key_file = c->key_file;
  c->cfg.user = c->cfg.password_file = c->cfg.token_file = NULL;
  *out = c;
  c = NULL;
  rc = 0;
out:
  rr_dicomweb_client_free(c);
  return rc;
}

/* ---- operations: common ------------------------------------------------------ */

typedef enum op_kind { OP_SEARCH, OP_METADATA, OP_RETRIEVE, OP_STORE } op_kind_t;

static const char *const kind_names[] = {"qido", "metadata", "wado", "stow"};

struct rr_dicomweb_op {
  op_kind_t kind;
  char name[64];
  rr_http_transfer_t *xfer; /* NULL once its callback runs */
  rr_dicomweb_done_cb cb;
  void *ud;
  char *auth_header; /* owned copy; wiped */
  char *token;       /* owned copy; wiped */
  size_t max_json, max_matches;
  char msg[MSG_CAP]; /* set by our transfer callbacks when they stop it */
  /* WADO-RS */
  char *dir;
  int dirfd;
  int no_fsync;
  rr_dicomweb_file_cb file_cb;
  rr_multipart_parser_t *mp;
  long head_status; /* status of the response head; 0 before it */
  int no_body;      /* 2xx without a multipart body (204) */
  int fd;           /* the current part's temporary file, or -1 */
  char *tmp_path;   /* its path (owned) */
  unsigned char head[WADO_HEAD_CAP];
  size_t head_len;
  uint64_t part_bytes, max_instance, max_retrieve;
  size_t files;
  uint64_t bytes;
  /* STOW-RS */
  char **paths;
  uint64_t *sizes;
  size_t npaths;
  char boundary[RR_MULTIPART_BOUNDARY_RFC + 1];
  rr_multipart_builder_t b;
  rr_buf_t frame; /* framing not yet sent */
  size_t frame_off;
  size_t cur; /* index of the file being sent (or next to open) */
  int cur_fd; /* -1 between files */
  uint64_t cur_left;
  int body_closed;
};

static void set_msg(rr_dicomweb_op_t *op, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void set_msg(rr_dicomweb_op_t *op, const char *fmt, ...) {
  if (op->msg[0])
    return; /* the first reason stays */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(op->msg, sizeof op->msg, fmt, ap);
  va_end(ap);
}

static void op_free(rr_dicomweb_op_t *op) {
  if (!op)
    return;
  wipe_free(op->auth_header);
  if (op->token)
    rr_http_client_token_free(op->token);
  rr_multipart_parser_free(op->mp);
  if (op->fd >= 0) {
    close(op->fd);
    if (op->tmp_path)
      unlink(op->tmp_path);
  }
  free(op->tmp_path);
  if (op->dirfd >= 0)
    close(op->dirfd);
  free(op->dir);
  if (op->paths)
    for (size_t i = 0; i < op->npaths; i++)
      free(op->paths[i]);
  free(op->paths);
  free(op->sizes);
  if (op->cur_fd >= 0)
    close(op->cur_fd);
  rr_buf_close(&op->frame);
  free(op);
}

static rr_dicomweb_op_t *op_new(const rr_dicomweb_client_t *c, op_kind_t kind,
                                rr_dicomweb_done_cb cb, void *ud) {
  rr_dicomweb_op_t *op = calloc(1, sizeof *op);
  if (!op)
    return NULL;
  op->kind = kind;
  op->cb = cb;
  op->ud = ud;
  op->fd = op->cur_fd = op->dirfd = -1;
  op->max_json = c->cfg.max_json_bytes;
  op->max_matches = c->cfg.max_matches;
  op->max_instance = c->cfg.max_instance_bytes;
  op->max_retrieve = c->cfg.max_retrieve_bytes;
  op->no_fsync = c->cfg.no_fsync;
  snprintf(op->name, sizeof op->name, "%s", c->name);
  rr_buf_init(&op->frame, (size_t)64 << 10);
  if ((c->auth_header && !(op->auth_header = strdup(c->auth_header))) ||
      (c->token && !(op->token = strdup(c->token)))) {
    op_free(op);
    return NULL;
  }
  return op;
}

/* A request with the client's TLS settings, timeouts and credentials. */
static void base_request(const rr_dicomweb_client_t *c, const rr_dicomweb_op_t *op,
                         rr_http_request_t *r, const char **hdrs, size_t *nh, const char *accept,
                         int bulk) {
  rr_http_client_request_default(r);
  r->ca_file = c->ca_file;
  r->cert_file = c->cert_file;
  r->key_file = c->key_file;
  r->connect_timeout_ms = c->cfg.connect_timeout_ms;
  r->timeout_ms = bulk ? c->cfg.bulk_timeout_ms : c->cfg.timeout_ms;
  r->max_response_bytes = c->cfg.max_json_bytes;
  r->bearer_token = op->token;
  *nh = 0;
  hdrs[(*nh)++] = accept;
  if (op->auth_header)
    hdrs[(*nh)++] = op->auth_header;
  r->headers = hdrs;
  r->nheaders = *nh;
}

static void on_http_done(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r);

static int submit(rr_dicomweb_client_t *c, rr_dicomweb_op_t *op, const rr_http_request_t *req,
                  rr_dicomweb_op_t **out) {
  int rc = rr_http_client_submit(c->http, req, on_http_done, op, &op->xfer);
  if (rc)
    return rc;
  rr_log(RR_LOG_DEBUG, LOG_MODULE, "event=%s_start pacs=%s", kind_names[op->kind], op->name);
  if (out)
    *out = op;
  return 0;
}

void rr_dicomweb_cancel(rr_dicomweb_op_t *op) {
  if (op && op->xfer)
    rr_http_client_cancel(op->xfer);
}

/* {base}/studies[/{study}[/series[/{series}[/instances[/{sop}]]]]] into b. */
static int build_path(rr_buf_t *b, const char *base, const char *study, const char *series,
                      const char *sop) {
  int rc = rr_buf_printf(b, "%s/studies", base);
  if (!rc && study)
    rc = rr_buf_printf(b, "/%s", study);
  if (!rc && series)
    rc = rr_buf_printf(b, "/series/%s", series);
  if (!rc && sop)
    rc = rr_buf_printf(b, "/instances/%s", sop);
  return rc;
}

/* ---- QIDO-RS and metadata ------------------------------------------------------ */

static int append_param(rr_buf_t *u, int *first, const char *name, const char *value) {
  int rc = rr_buf_putc(u, *first ? '?' : '&');
  *first = 0;
  if (!rc)
    rc = append_encoded(u, name);
  if (!rc)
    rc = rr_buf_putc(u, '=');
  if (!rc)
    rc = append_encoded(u, value);
  return rc;
}

static int start_json_get(rr_dicomweb_client_t *c, op_kind_t kind, const char *url,
                          rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **out) {
  rr_dicomweb_op_t *op = op_new(c, kind, cb, ud);
  if (!op)
    return RR_ENOMEM;
  rr_http_request_t req;
  const char *hdrs[2];
  size_t nh;
  base_request(c, op, &req, hdrs, &nh, "Accept: application/dicom+json", 0);
  req.url = url;
  int rc = submit(c, op, &req, out);
  if (rc)
    op_free(op);
  return rc;
}

int rr_dicomweb_search(rr_dicomweb_client_t *c, const rr_dicomweb_query_t *q,
                       rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **op) {
  if (!c || !q || !cb || q->level > RR_DICOMWEB_INSTANCES || (q->nparams && !q->params) ||
      (q->nincludefields && !q->includefields) || (q->study_uid && !valid_uid(q->study_uid)) ||
      (q->series_uid && (!q->study_uid || !valid_uid(q->series_uid))) ||
      (q->series_uid && q->level != RR_DICOMWEB_INSTANCES) ||
      (q->study_uid && q->level == RR_DICOMWEB_STUDIES))
    return RR_EINVAL;
  for (size_t i = 0; i < q->nparams; i++)
    if (!q->params[i].name || !q->params[i].name[0] || !q->params[i].value)
      return RR_EINVAL;
  for (size_t i = 0; i < q->nincludefields; i++)
    if (!q->includefields[i] || !q->includefields[i][0])
      return RR_EINVAL;
  rr_buf_t u;
  rr_buf_init(&u, (size_t)64 << 10);
  int rc, first = 1;
  if (q->level == RR_DICOMWEB_STUDIES || !q->study_uid)
    rc = rr_buf_printf(&u, "%s/%s", c->base_url,
                       q->level == RR_DICOMWEB_STUDIES  ? "studies"
                       : q->level == RR_DICOMWEB_SERIES ? "series"
                                                        : "instances");
  else if ((rc = build_path(&u, c->base_url, q->study_uid, q->series_uid, NULL)) == 0)
    rc = rr_buf_puts(&u, q->level == RR_DICOMWEB_SERIES ? "/series" : "/instances");
  for (size_t i = 0; i < q->nparams && !rc; i++)
    rc = append_param(&u, &first, q->params[i].name, q->params[i].value);
  for (size_t i = 0; i < q->nincludefields && !rc; i++)
    rc = append_param(&u, &first, "includefield", q->includefields[i]);
  char num[32];
  if (!rc && q->limit) {
    snprintf(num, sizeof num, "%zu", q->limit);
    rc = append_param(&u, &first, "limit", num);
  }
  if (!rc && q->offset) {
    snprintf(num, sizeof num, "%zu", q->offset);
    rc = append_param(&u, &first, "offset", num);
  }
  if (rc)
    rc = rc == RR_ENOMEM ? RR_ENOMEM : RR_ELIMIT;
  else
    rc = start_json_get(c, OP_SEARCH, u.data, cb, ud, op);
  rr_buf_close(&u);
  return rc;
}

int rr_dicomweb_metadata(rr_dicomweb_client_t *c, const char *study_uid, const char *series_uid,
                         rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **op) {
  if (!c || !cb || !valid_uid(study_uid) || (series_uid && !valid_uid(series_uid)))
    return RR_EINVAL;
  rr_buf_t u;
  rr_buf_init(&u, (size_t)4 << 10);
  int rc = build_path(&u, c->base_url, study_uid, series_uid, NULL);
  if (!rc)
    rc = rr_buf_puts(&u, "/metadata");
  if (!rc)
    rc = start_json_get(c, OP_METADATA, u.data, cb, ud, op);
  rr_buf_close(&u);
  return rc;
}

/* ---- WADO-RS: multipart parts straight to files ------------------------------ */

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0)
      return -errno;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int wado_part_begin(void *ud, const rr_multipart_part_t *part) {
  rr_dicomweb_op_t *op = ud;
  (void)part;
  size_t n = strlen(op->dir) + 32;
  free(op->tmp_path);
  op->tmp_path = malloc(n);
  if (!op->tmp_path)
    return RR_ENOMEM;
  snprintf(op->tmp_path, n, "%s/.rr-wado-XXXXXX", op->dir);
  op->fd = mkostemp(op->tmp_path, O_CLOEXEC);
  if (op->fd < 0) {
    int rc = -errno;
    set_msg(op, "cannot create a file for instance %zu: %s", part->index, rr_strerror(rc));
    return rc;
  }
  op->head_len = 0;
  op->part_bytes = 0;
  return 0;
}

static int wado_part_data(void *ud, const rr_multipart_part_t *part, const char *data, size_t len) {
  rr_dicomweb_op_t *op = ud;
  if (len > op->max_instance - op->part_bytes) {
    set_msg(op, "instance %zu is over the limit of %" PRIu64 " bytes", part->index,
            op->max_instance);
    return RR_ELIMIT;
  }
  if (op->head_len < WADO_HEAD_CAP) {
    size_t k = len < WADO_HEAD_CAP - op->head_len ? len : WADO_HEAD_CAP - op->head_len;
    memcpy(op->head + op->head_len, data, k);
    op->head_len += k;
  }
  int rc = write_all(op->fd, data, len);
  if (rc) {
    set_msg(op, "cannot write instance %zu: %s", part->index, rr_strerror(rc));
    return rc;
  }
  op->part_bytes += len;
  op->bytes += len;
  return 0;
}

static int wado_part_end(void *ud, const rr_multipart_part_t *part) {
  rr_dicomweb_op_t *op = ud;
  char uid[MAX_UID + 1], name[MAX_UID + 16];
  int rc = 0;
  if (!op->no_fsync && fsync(op->fd) != 0)
    rc = -errno;
  if (close(op->fd) != 0 && !rc)
    rc = -errno;
  op->fd = -1;
  if (rc) {
    unlink(op->tmp_path);
    set_msg(op, "cannot sync instance %zu: %s", part->index, rr_strerror(rc));
    return rc;
  }
  if (rr_dicomweb_part10_sop_uid(op->head, op->head_len, uid, sizeof uid) == 0)
    snprintf(name, sizeof name, "%s.dcm", uid);
  else {
    uid[0] = '\0';
    snprintf(name, sizeof name, "%zu.dcm", part->index + 1);
  }
  if (renameat(AT_FDCWD, op->tmp_path, op->dirfd, name) != 0 ||
      (!op->no_fsync && fsync(op->dirfd) != 0)) {
    rc = -errno;
    unlink(op->tmp_path);
    set_msg(op, "cannot rename instance %zu into place: %s", part->index, rr_strerror(rc));
    return rc;
  }
  op->files++;
  if (!op->file_cb)
    return 0;
  size_t n = strlen(op->dir) + strlen(name) + 2;
  char *path = malloc(n);
  if (!path)
    return RR_ENOMEM;
  snprintf(path, n, "%s/%s", op->dir, name);
  rr_dicomweb_file_t f = {part->index, path, uid, part->length};
  rc = op->file_cb(op->ud, &f);
  free(path);
  if (rc) {
    set_msg(op, "stopped by the file callback after instance %zu", part->index);
    return rc < 0 ? rc : RR_EINVAL;
  }
  return 0;
}

static int wado_head(void *ud, const rr_http_response_t *r) {
  rr_dicomweb_op_t *op = ud;
  op->head_status = r->http_status;
  if (r->http_status < 200 || r->http_status > 299)
    return 0; /* an error body: discarded by the sink */
  if (r->http_status == 204 || !r->content_type) {
    op->no_body = 1;
    return 0;
  }
  static const rr_multipart_callbacks_t cbs = {wado_part_begin, wado_part_data, wado_part_end,
                                               NULL};
  rr_multipart_options_t o;
  rr_multipart_options_default(&o);
  o.max_parts = SIZE_MAX;
  rr_multipart_error_t e;
  memset(&e, 0, sizeof e);
  int rc =
      rr_multipart_parser_new(r->content_type, strlen(r->content_type), &o, &cbs, op, &op->mp, &e);
  if (rc) {
    set_msg(op, "the WADO-RS response is not multipart/related (%s at byte %" PRIu64 ")",
            e.reason ? e.reason : rr_strerror(rc), e.offset);
    return rc == RR_ENOMEM ? rc : RR_EPARSE;
  }
  return 0;
}

static int wado_sink(void *ud, const char *data, size_t len) {
  rr_dicomweb_op_t *op = ud;
  if (!op->mp) {
    if (op->no_body && len) {
      set_msg(op, "the WADO-RS response has a body but no multipart Content-Type");
      return RR_EPARSE;
    }
    return 0;
  }
  int rc = rr_multipart_parser_feed(op->mp, data, len);
  if (rc && !op->msg[0]) {
    const rr_multipart_error_t *e = rr_multipart_parser_error(op->mp);
    set_msg(op, "malformed multipart WADO-RS response at byte %" PRIu64 ": %s", e->offset,
            e->reason ? e->reason : rr_strerror(rc));
  }
  return rc;
}

int rr_dicomweb_retrieve(rr_dicomweb_client_t *c, const char *study_uid, const char *series_uid,
                         const char *sop_uid, const char *dir, rr_dicomweb_file_cb file_cb,
                         rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **out) {
  if (!c || !cb || !dir || !dir[0] || !valid_uid(study_uid) ||
      (series_uid && !valid_uid(series_uid)) || (sop_uid && (!series_uid || !valid_uid(sop_uid))))
    return RR_EINVAL;
  rr_dicomweb_op_t *op = op_new(c, OP_RETRIEVE, cb, ud);
  rr_buf_t u;
  int rc;
  rr_buf_init(&u, (size_t)4 << 10);
  if (!op) {
    rc = RR_ENOMEM;
    goto out;
  }
  op->file_cb = file_cb;
  op->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (op->dirfd < 0) {
    rc = -errno;
    goto out;
  }
  if (!(op->dir = strdup(dir))) {
    rc = RR_ENOMEM;
    goto out;
  }
  if ((rc = build_path(&u, c->base_url, study_uid, series_uid, sop_uid)) != 0)
    goto out;
  rr_http_request_t req;
  const char *hdrs[2];
  size_t nh;
  base_request(c, op, &req, hdrs, &nh,
               "Accept: multipart/related; type=\"application/dicom\"; transfer-syntax=*", 1);
  req.url = u.data;
  req.max_response_bytes = (size_t)c->cfg.max_retrieve_bytes;
  req.sink = wado_sink;
  req.sink_ud = op;
  req.head = wado_head;
  req.head_ud = op;
  if ((rc = submit(c, op, &req, out)) != 0)
    goto out;
  op = NULL;
out:
  op_free(op);
  rr_buf_close(&u);
  return rc;
}

/* ---- STOW-RS: the request body as a stream ------------------------------------ */

static int stow_begin_part(rr_multipart_builder_t *b, uint64_t size, rr_buf_t *out) {
  char len[32];
  snprintf(len, sizeof len, "%" PRIu64, size);
  rr_multipart_header_t h[2] = {{"Content-Type", "application/dicom"}, {"Content-Length", len}};
  return rr_multipart_builder_begin_part(b, h, 2, out);
}

/* Back to the body's first byte (also the initial state). */
static int stow_rewind(void *ud) {
  rr_dicomweb_op_t *op = ud;
  if (op->cur_fd >= 0)
    close(op->cur_fd);
  op->cur_fd = -1;
  op->cur = 0;
  op->cur_left = 0;
  op->body_closed = 0;
  op->frame_off = 0;
  rr_buf_reset(&op->frame);
  return rr_multipart_builder_init(&op->b, op->boundary, NULL, 0);
}

static int stow_source(void *ud, char *buf, size_t cap, size_t *len) {
  rr_dicomweb_op_t *op = ud;
  int rc;
  *len = 0;
  for (;;) {
    if (op->frame_off < op->frame.len) {
      size_t n = op->frame.len - op->frame_off;
      n = n < cap ? n : cap;
      memcpy(buf, op->frame.data + op->frame_off, n);
      op->frame_off += n;
      *len = n;
      return 0;
    }
    rr_buf_reset(&op->frame);
    op->frame_off = 0;
    if (op->cur_fd >= 0) {
      if (op->cur_left > 0) {
        size_t want = op->cur_left < cap ? (size_t)op->cur_left : cap;
        ssize_t n = read(op->cur_fd, buf, want);
        if (n < 0 && errno == EINTR)
          continue;
        if (n <= 0) {
          rc = n < 0 ? -errno : RR_EIO;
          set_msg(op, "cannot read file %zu of the STOW-RS request: %s", op->cur,
                  n < 0 ? rr_strerror(rc) : "it became shorter");
          return rc;
        }
        op->cur_left -= (uint64_t)n;
        *len = (size_t)n;
        return 0;
      }
      struct stat st;
      if (fstat(op->cur_fd, &st) != 0 || (uint64_t)st.st_size != op->sizes[op->cur]) {
        set_msg(op, "file %zu of the STOW-RS request changed while it was sent", op->cur);
        return RR_EIO;
      }
      close(op->cur_fd);
      op->cur_fd = -1;
      op->cur++;
      if ((rc = rr_multipart_builder_end_part(&op->b, &op->frame)) != 0)
        return rc;
      continue;
    }
    if (op->cur < op->npaths) {
      op->cur_fd = open(op->paths[op->cur], O_RDONLY | O_CLOEXEC);
      struct stat st;
      if (op->cur_fd < 0 || fstat(op->cur_fd, &st) != 0) {
        rc = -errno;
        set_msg(op, "cannot open file %zu of the STOW-RS request: %s", op->cur, rr_strerror(rc));
        return rc;
      }
      if ((uint64_t)st.st_size != op->sizes[op->cur]) {
        set_msg(op, "file %zu of the STOW-RS request changed while it was sent", op->cur);
        return RR_EIO;
      }
      op->cur_left = op->sizes[op->cur];
      if ((rc = stow_begin_part(&op->b, op->cur_left, &op->frame)) != 0)
        return rc;
      continue;
    }
    if (!op->body_closed) {
      op->body_closed = 1;
      if ((rc = rr_multipart_builder_close(&op->b, &op->frame)) != 0)
        return rc;
      continue;
    }
    return 0; /* the end */
  }
}

/* The body's length: the framing, computed with a builder on the same
 * boundary, plus the files. */
static int stow_length(rr_dicomweb_op_t *op, uint64_t *total) {
  rr_multipart_builder_t b;
  rr_buf_t scratch;
  int rc = rr_multipart_builder_init(&b, op->boundary, NULL, 0);
  rr_buf_init(&scratch, (size_t)64 << 10);
  *total = 0;
  for (size_t i = 0; i < op->npaths && !rc; i++) {
    rr_buf_reset(&scratch);
    rc = stow_begin_part(&b, op->sizes[i], &scratch);
    if (!rc)
      rc = rr_multipart_builder_end_part(&b, &scratch);
    *total += scratch.len + op->sizes[i];
  }
  rr_buf_reset(&scratch);
  if (!rc)
    rc = rr_multipart_builder_close(&b, &scratch);
  *total += scratch.len;
  rr_buf_close(&scratch);
  return rc;
}

int rr_dicomweb_store(rr_dicomweb_client_t *c, const char *const *paths, size_t n,
                      rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **out) {
  if (!c || !cb || !paths || n == 0 || n > c->cfg.max_store_files)
    return RR_EINVAL;
  for (size_t i = 0; i < n; i++)
    if (!paths[i] || !paths[i][0])
      return RR_EINVAL;
  rr_dicomweb_op_t *op = op_new(c, OP_STORE, cb, ud);
  rr_buf_t u, ct;
  int rc;
  rr_buf_init(&u, (size_t)4 << 10);
  rr_buf_init(&ct, 512);
  if (!op || !(op->paths = calloc(n, sizeof *op->paths)) ||
      !(op->sizes = calloc(n, sizeof *op->sizes))) {
    rc = RR_ENOMEM;
    goto out;
  }
  for (size_t i = 0; i < n; i++) {
    struct stat st;
    if (stat(paths[i], &st) != 0) {
      rc = -errno;
      goto out;
    }
    if (!S_ISREG(st.st_mode)) {
      rc = RR_EINVAL;
      goto out;
    }
    if (!(op->paths[i] = strdup(paths[i]))) {
      rc = RR_ENOMEM;
      goto out;
    }
    op->npaths = i + 1;
    op->sizes[i] = (uint64_t)st.st_size;
  }
  if ((rc = rr_multipart_builder_init(&op->b, NULL, NULL, 0)) != 0)
    goto out;
  snprintf(op->boundary, sizeof op->boundary, "%s", op->b.boundary);
  uint64_t total;
  if ((rc = stow_length(op, &total)) != 0 || (rc = stow_rewind(op)) != 0 ||
      (rc = rr_multipart_builder_content_type(&op->b, "application/dicom", &ct)) != 0 ||
      (rc = build_path(&u, c->base_url, NULL, NULL, NULL)) != 0)
    goto out;
  rr_http_request_t req;
  const char *hdrs[2];
  size_t nh;
  base_request(c, op, &req, hdrs, &nh, "Accept: application/dicom+json", 1);
  req.method = RR_HTTP_POST;
  req.url = u.data;
  req.content_type = ct.data;
  req.source = stow_source;
  req.source_ud = op;
  req.source_len = total;
  req.source_rewind = stow_rewind;
  if ((rc = submit(c, op, &req, out)) != 0)
    goto out;
  op = NULL;
out:
  op_free(op);
  rr_buf_close(&u);
  rr_buf_close(&ct);
  return rc;
}

/* ---- outcomes ------------------------------------------------------------------ */

static void http_error(rr_dicomweb_op_t *op, long http, rr_dicomweb_outcome_t *o) {
  o->status = RR_DICOMWEB_EHTTP;
  o->retryable = http_retryable(http);
  const char *rp = reason_phrase(http);
  snprintf(op->msg, sizeof op->msg, "HTTP %ld%s%s from the PACS", http, rp[0] ? " " : "", rp);
}

static void json_outcome(rr_dicomweb_op_t *op, const rr_http_response_t *r,
                         rr_dicomweb_outcome_t *o, rr_dicomweb_result_t **res) {
  rr_buf_t err;
  rr_buf_init(&err, MSG_CAP);
  if (r->http_status == 204 || r->body_len == 0) {
    /* No match: an empty result over an empty array. */
    o->status = rr_dicomweb_parse_datasets("[]", 2, 0, res, NULL);
  } else {
    o->status = rr_dicomweb_parse_datasets(r->body, r->body_len, op->max_matches, res, &err);
    if (o->status)
      snprintf(op->msg, sizeof op->msg, "%s", err.data ? err.data : rr_strerror(o->status));
  }
  o->retryable = o->status == RR_ENOMEM;
  rr_buf_close(&err);
}

static void wado_outcome(rr_dicomweb_op_t *op, rr_dicomweb_outcome_t *o) {
  o->files = op->files;
  o->bytes = op->bytes;
  if (op->no_body || !op->mp)
    return;
  int rc = rr_multipart_parser_finish(op->mp);
  if (rc) {
    /* Without a Content-Length the end of the stream is the server's
     * close: a body cut short is a lost connection. */
    o->status = RR_HTTP_ECONNLOST;
    o->retryable = 1;
    snprintf(op->msg, sizeof op->msg,
             "the WADO-RS response ended before its close delimiter (after %zu instances)",
             op->files);
  }
}

static size_t seq_items(const json_t *resp, uint32_t tag, json_t **first) {
  json_t *a = attribute(resp, tag);
  json_t *v = a ? json_object_get(a, "Value") : NULL;
  *first = json_array_get(v, 0);
  return json_is_array(v) ? json_array_size(v) : 0;
}

static void stow_outcome(rr_dicomweb_op_t *op, const rr_http_response_t *r,
                         rr_dicomweb_outcome_t *o, json_t **json) {
  long http = r->http_status;
  int ok = http >= 200 && http <= 299;
  rr_buf_t err;
  rr_buf_init(&err, MSG_CAP);
  o->sent = op->npaths;
  if (r->body_len)
    *json = load_json(r->body, r->body_len, &err, "STOW-RS response");
  if (*json && !json_is_object(*json)) {
    json_decref(*json);
    *json = NULL;
  }
  o->json = *json;
  if (*json) {
    json_t *item;
    o->stored = seq_items(*json, 0x00081199u, &item);
    for (size_t i = 0; i < o->stored; i++)
      if (attribute(json_array_get(json_object_get(attribute(*json, 0x00081199u), "Value"), i),
                    0x00081196u))
        o->warnings++;
    o->failed = seq_items(*json, 0x00081198u, &item);
    double reason;
    if (o->failed && json_is_object(item) &&
        rr_dicomweb_json_number(item, 0x00081197u, 0, &reason) == 0 && reason >= 0 &&
        reason <= 65535)
      o->failure_reason = (unsigned)reason;
  }
  if (ok && !*json && r->body_len) {
    o->status = RR_EPARSE;
    snprintf(op->msg, sizeof op->msg, "%s", err.data ? err.data : "malformed STOW-RS response");
  } else if (ok && !*json) {
    o->stored = o->sent; /* a success without a body: nothing to contradict it */
  } else if (o->failed) {
    o->status = RR_DICOMWEB_EREJECTED;
    o->retryable = (o->failure_reason & 0xFF00u) == 0xA700u || http_retryable(http);
    snprintf(op->msg, sizeof op->msg,
             "HTTP %ld: %zu of %zu instances failed (FailureReason 0x%04X: %s)", http, o->failed,
             o->sent, o->failure_reason, failure_text(o->failure_reason));
  } else if (ok && o->stored < o->sent) {
    o->status = RR_DICOMWEB_EREJECTED;
    snprintf(op->msg, sizeof op->msg, "HTTP %ld: the PACS acknowledged %zu of %zu instances", http,
             o->stored, o->sent);
  } else if (!ok && *json && (http == 400 || http == 409)) {
    o->status = RR_DICOMWEB_EREJECTED;
    snprintf(op->msg, sizeof op->msg,
             "HTTP %ld %s: the PACS stored %zu of %zu instances and gave no failure reason", http,
             reason_phrase(http), o->stored, o->sent);
  } else if (!ok) {
    http_error(op, http, o);
  }
  rr_buf_close(&err);
}

static void on_http_done(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r) {
  rr_dicomweb_op_t *op = ud;
  rr_dicomweb_outcome_t o;
  rr_dicomweb_result_t *res = NULL, empty;
  json_t *json = NULL;
  (void)t;
  op->xfer = NULL;
  memset(&o, 0, sizeof o);
  memset(&empty, 0, sizeof empty);
  o.http_status = r->http_status;
  o.elapsed_ms = r->elapsed_ms;
  if (r->status != 0) {
    o.status = r->status;
    o.retryable = code_retryable(r->status);
    o.http_status = op->head_status; /* a WADO-RS response stopped midway */
    if (!op->msg[0])
      snprintf(op->msg, sizeof op->msg, "%s", r->message);
    o.files = op->files;
    o.bytes = op->bytes;
    o.sent = op->npaths;
  } else if (op->kind == OP_STORE) {
    stow_outcome(op, r, &o, &json);
  } else if (r->http_status < 200 || r->http_status > 299) {
    http_error(op, r->http_status, &o);
  } else if (op->kind == OP_RETRIEVE) {
    wado_outcome(op, &o);
  } else {
    json_outcome(op, r, &o, &res);
  }
  if (o.status == 0)
    op->msg[0] = '\0';
  else if (!op->msg[0])
    snprintf(op->msg, sizeof op->msg, "%s", rr_dicomweb_strerror(o.status));
  o.message = op->msg;
  o.result = res ? res : &empty;
  rr_log(RR_LOG_DEBUG, LOG_MODULE,
         "event=%s_done pacs=%s http_status=%ld status=%s retryable=%d matches=%zu files=%zu "
         "stored=%zu failed=%zu elapsed_ms=%" PRIu64,
         kind_names[op->kind], op->name, o.http_status, status_name(o.status), o.retryable,
         o.result->n, o.files, o.stored, o.failed, o.elapsed_ms);
  op->cb(op->ud, op, &o);
  rr_dicomweb_result_free(res);
  json_decref(json);
  op_free(op);
}

/* Configuration loading with precise error messages. */
#include "cli/config.h"

#include "ai/ai.h"
#include "notify/notify.h"

#include <dirent.h>
#include <jansson.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/schemas.h"
#include "core/error.h"
#include "core/json_schema.h"
#include "core/log.h"

typedef struct ctx {
  const char *file;
  rr_buf_t *err;
  int bad;
} ctx_t;

static void problem(ctx_t *c, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void problem(ctx_t *c, const char *path, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  rr_buf_printf(c->err, "%s: %s: %s\n", c->file, path, msg);
  c->bad++;
}

/* ${VAR} / ${VAR:-default} substitution. Unset without default is an error. */
static int substitute(ctx_t *c, const char *path, const char *in, char *out, size_t cap) {
  size_t w = 0;
  for (const char *p = in; *p;) {
    if (p[0] == '$' && p[1] == '{') {
      const char *end = strchr(p, '}');
      if (!end) {
        problem(c, path, "unterminated ${ in \"%s\"", in);
        return -1;
      }
      char name[128];
      size_t n = (size_t)(end - p - 2);
      if (n >= sizeof name)
        n = sizeof name - 1;
      memcpy(name, p + 2, n);
      name[n] = '\0';
      const char *def = NULL;
      char *colon = strstr(name, ":-");
      if (colon) {
        *colon = '\0';
        def = colon + 2;
      }
      const char *v = getenv(name);
      if (!v || (!*v && def))
        v = def;
      if (!v) {
        problem(c, path, "environment variable %s is not set", name);
        return -1;
      }
      size_t vl = strlen(v);
      if (w + vl >= cap) {
        problem(c, path, "value too long after substitution");
        return -1;
      }
      memcpy(out + w, v, vl);
      w += vl;
      p = end + 1;
    } else {
      if (w + 1 >= cap) {
        problem(c, path, "value too long");
        return -1;
      }
      out[w++] = *p++;
    }
  }
  out[w] = '\0';
  return 0;
}

/* Substitutes ${VAR} in every string value of the tree, in place. */
static void substitute_tree(ctx_t *c, json_t *node, const char *path) {
  char p[512];
  if (json_is_object(node)) {
    const char *k;
    json_t *v;
    json_object_foreach(node, k, v) {
      snprintf(p, sizeof p, "%s.%s", path, k);
      substitute_tree(c, v, p);
    }
  } else if (json_is_array(node)) {
    size_t i;
    json_t *v;
    json_array_foreach(node, i, v) {
      snprintf(p, sizeof p, "%s[%zu]", path, i);
      substitute_tree(c, v, p);
    }
  } else if (json_is_string(node) && strstr(json_string_value(node), "${")) {
    char out[4096];
    if (substitute(c, path, json_string_value(node), out, sizeof out) == 0)
      json_string_set(node, out);
  }
}

/* Loads a JSON file, substitutes ${VAR}, validates it against the embedded
 * schema text. NULL (with problems in err) when anything is wrong. */
static json_t *load_valid(const char *file, const char *schema_text, rr_buf_t *err) {
  ctx_t c = {file, err, 0};
  json_error_t je;
  json_t *root = json_load_file(file, JSON_REJECT_DUPLICATES, &je);
  if (!root) {
    rr_buf_printf(err, "%s: line %d column %d: %s\n", file, je.line, je.column, je.text);
    return NULL;
  }
  substitute_tree(&c, root, "$");
  json_t *sj = json_loads(schema_text, 0, &je);
  rr_json_schema_t *schema = NULL;
  if (!sj || rr_json_schema_new(sj, &schema, err) != 0) {
    rr_buf_printf(err, "%s: the built-in schema does not load\n", file);
    c.bad++;
  } else if (rr_json_schema_validate(schema, root, file, err) != 0) {
    c.bad++;
  }
  rr_json_schema_free(schema);
  json_decref(sj);
  if (c.bad) {
    json_decref(root);
    return NULL;
  }
  return root;
}

static int get_string(ctx_t *c, json_t *obj, const char *key, const char *path, char *out,
                      size_t cap, const char *def) {
  json_t *v = json_object_get(obj, key);
  char p[256];
  snprintf(p, sizeof p, "%s.%s", path, key);
  if (!v) {
    if (!def) {
      problem(c, p, "required");
      return -1;
    }
    snprintf(out, cap, "%s", def);
    return 0;
  }
  if (!json_is_string(v)) {
    problem(c, p, "must be a string");
    return -1;
  }
  if ((size_t)snprintf(out, cap, "%s", json_string_value(v)) >= cap) {
    problem(c, p, "too long (at most %zu characters)", cap - 1);
    return -1;
  }
  return 0;
}

/* Integers may be given as numbers or as strings (for ${VAR}). */
static int get_uint(ctx_t *c, json_t *obj, const char *key, const char *path, uint64_t min,
                    uint64_t max, uint64_t *out) {
  json_t *v = json_object_get(obj, key);
  char p[256];
  snprintf(p, sizeof p, "%s.%s", path, key);
  if (!v)
    return 0; /* keep the default */
  unsigned long long n;
  if (json_is_integer(v) && json_integer_value(v) >= 0) {
    n = (unsigned long long)json_integer_value(v);
  } else if (json_is_string(v)) {
    char buf[64], *end;
    snprintf(buf, sizeof buf, "%s", json_string_value(v));
    n = strtoull(buf, &end, 10);
    if (!*buf || *end) {
      problem(c, p, "\"%s\" is not a whole number", buf);
      return -1;
    }
  } else {
    problem(c, p, "must be a whole number");
    return -1;
  }
  if (n < min || n > max) {
    problem(c, p, "%llu is out of range %llu..%llu", n, (unsigned long long)min,
            (unsigned long long)max);
    return -1;
  }
  *out = n;
  return 0;
}

static void unknown_keys(ctx_t *c, json_t *obj, const char *path, const char *const *known) {
  const char *k;
  json_t *v;
  json_object_foreach(obj, k, v) {
    int ok = 0;
    for (const char *const *q = known; *q; q++)
      ok |= strcmp(*q, k) == 0;
    if (!ok) {
      char p[256];
      snprintf(p, sizeof p, "%s.%s", path, k);
      problem(c, p, "unknown key");
    }
  }
}

static int join_path(const char *dir, const char *p, char *out, size_t cap);

static bool good_name(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > 63)
    return false;
  for (; *s; s++)
    if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') ||
          *s == '_' || *s == '-'))
      return false;
  return true;
}

/* $.destinations: one rr_destination_config_t per entry. */
static char **string_list(json_t *arr) {
  if (!json_is_array(arr))
    return NULL;
  size_t n = json_array_size(arr);
  char **v = calloc(n + 1, sizeof *v);
  for (size_t i = 0; v && i < n; i++)
    v[i] = strdup(
        json_string_value(json_array_get(arr, i)) ? json_string_value(json_array_get(arr, i)) : "");
  return v;
}

static void load_destinations(ctx_t *c, json_t *obj, const char *base, rr_channel_config_t *ch) {
  if (!obj)
    return;
  if (!json_is_object(obj)) {
    problem(c, "$.destinations", "must be an object");
    return;
  }
  ch->destinations = calloc(json_object_size(obj) + 1, sizeof *ch->destinations);
  if (!ch->destinations) {
    problem(c, "$.destinations", "out of memory");
    return;
  }
  const char *name;
  json_t *d;
  json_object_foreach(obj, name, d) {
    char path[160];
    snprintf(path, sizeof path, "$.destinations.%s", name);
    if (!good_name(name)) {
      problem(c, path, "a destination name is 1 to 63 letters, digits, '_' or '-'");
      continue;
    }
    if (!json_is_object(d)) {
      problem(c, path, "must be an object");
      continue;
    }
    rr_destination_config_t *x = &ch->destinations[ch->ndestinations];
    rr_destination_config_default(x);
    snprintf(x->short_name, sizeof x->short_name, "%s", name);
    snprintf(x->name, sizeof x->name, "%s.%s", ch->name, name);
    char type[16] = "";
    get_string(c, d, "type", path, type, sizeof type, NULL);
    x->kind = strcmp(type, "http") == 0      ? RR_DEST_HTTP
              : strcmp(type, "channel") == 0 ? RR_DEST_CHANNEL
              : strcmp(type, "dicom") == 0   ? RR_DEST_DICOM
              : strcmp(type, "stow") == 0    ? RR_DEST_STOW
              : strcmp(type, "ai") == 0      ? RR_DEST_AI
                                             : RR_DEST_MLLP;
    get_string(c, d, "role", path, x->role, sizeof x->role, "result");
    if (strcmp(x->role, "result") != 0 && strcmp(x->role, "worklist") != 0 &&
        strcmp(x->role, "notification") != 0)
      problem(c, path, "role: \"%s\" is not one of result, worklist, notification", x->role);
    if (strcmp(x->role, "notification") == 0) {
      rr_notify_policy_t np;
      rr_notify_policy_default(&np);
      json_t *esc = json_object_get(d, "escalation");
      char epath[300];
      snprintf(epath, sizeof epath, "%s.escalation", path);
      x->notify_chain = string_list(json_object_get(esc, "chain"));
      json_t *cats = json_object_get(esc, "categories");
      for (int k = 1; k <= RR_NOTIFY_CATEGORIES; k++) {
        char cname[4], cpath[340];
        snprintf(cname, sizeof cname, "%d", k);
        snprintf(cpath, sizeof cpath, "%s.categories.%d", epath, k);
        json_t *cat = json_object_get(cats, cname);
        uint64_t rep = (uint64_t)(np.repeat_ms[k] / 1000), nxt = (uint64_t)(np.next_ms[k] / 1000);
        get_uint(c, cat, "repeat_s", cpath, 0, 7 * 86400, &rep);
        get_uint(c, cat, "next_s", cpath, 0, 30 * 86400, &nxt);
        x->notify_repeat_ms[k] = (int64_t)rep * 1000;
        x->notify_next_ms[k] = (int64_t)nxt * 1000;
      }
    }
    uint64_t v;
    if (x->kind == RR_DEST_MLLP) {
      get_string(c, d, "host", path, x->host, sizeof x->host, NULL);
      v = 0;
      if (get_uint(c, d, "port", path, 1, 65535, &v) == 0 && v == 0)
        problem(c, path, "port: required for an mllp destination");
      x->port = (int)v;
      json_t *ka = json_object_get(d, "keep_alive");
      x->keep_alive = ka ? json_is_true(ka) : 1;
      get_uint(c, d, "ack_timeout_ms", path, 1, UINT32_MAX, &x->ack_timeout_ms);
      v = 1;
      if (get_uint(c, d, "mllp_release", path, 1, 2, &v) == 0)
        x->mllp_release = (int)v;
      const char *ae = json_string_value(json_object_get(d, "ae"));
      x->ae_is_permanent = ae && strcmp(ae, "dead") == 0;
    } else if (x->kind == RR_DEST_HTTP) {
      get_string(c, d, "url", path, x->url, sizeof x->url, NULL);
      const char *m = json_string_value(json_object_get(d, "method"));
      x->method = m && strcmp(m, "PUT") == 0 ? 2 /* RR_HTTP_PUT */ : 1 /* RR_HTTP_POST */;
      get_string(c, d, "content_type", path, x->content_type, sizeof x->content_type, "");
      char rel[1024] = "";
      get_string(c, d, "bearer_token_file", path, rel, sizeof rel, "");
      if (rel[0] && join_path(base, rel, x->token_file, sizeof x->token_file))
        problem(c, path, "bearer_token_file: path too long");
      get_uint(c, d, "timeout_ms", path, 1, UINT32_MAX, &x->timeout_ms);
    } else if (x->kind == RR_DEST_CHANNEL) {
      get_string(c, d, "channel", path, x->channel, sizeof x->channel, NULL);
    } else if (x->kind == RR_DEST_DICOM) {
      get_string(c, d, "host", path, x->host, sizeof x->host, NULL);
      v = 0;
      if (get_uint(c, d, "port", path, 1, 65535, &v) == 0 && v == 0)
        problem(c, path, "port: required for a dicom destination");
      x->port = (int)v;
      get_string(c, d, "called_ae", path, x->called_ae, sizeof x->called_ae, NULL);
      get_string(c, d, "calling_ae", path, x->calling_ae, sizeof x->calling_ae, "RADRELAY");
      v = 60;
      if (get_uint(c, d, "dimse_timeout_s", path, 1, 3600, &v) == 0)
        x->dimse_timeout_s = (unsigned)v;
    } else if (x->kind == RR_DEST_AI) {
      get_string(c, d, "url", path, x->url, sizeof x->url, NULL);
      char rel[1024] = "";
      get_string(c, d, "bearer_token_file", path, rel, sizeof rel, "");
      if (rel[0] && join_path(base, rel, x->token_file, sizeof x->token_file))
        problem(c, path, "bearer_token_file: path too long");
      get_uint(c, d, "timeout_ms", path, 1, UINT32_MAX, &x->timeout_ms);
      char mode[16];
      get_string(c, d, "mode", path, mode, sizeof mode, "silent");
      int m = rr_ai_mode_parse(mode);
      if (m < 0)
        problem(c, path, "mode: \"%s\" is not one of silent, assistant, active", mode);
      x->ai_mode = m < 0 ? RR_AI_SILENT : m;
      json_t *takes = json_object_get(d, "takes");
      x->ai_modalities = string_list(json_object_get(takes, "modalities"));
      x->ai_body_parts = string_list(json_object_get(takes, "body_parts"));
      x->ai_procedures = string_list(json_object_get(takes, "procedures"));
      get_string(c, d, "images_root", path, x->ai_images_root, sizeof x->ai_images_root, "");
      char result[16];
      get_string(c, d, "result", path, result, sizeof result, "sync");
      if (strcmp(result, "sync") != 0 && strcmp(result, "callback") != 0)
        problem(c, path, "result: \"%s\" is not one of sync, callback", result);
      x->ai_callback = strcmp(result, "callback") == 0;
      uint64_t poll_s = 5;
      get_uint(c, d, "poll_s", path, 1, 3600, &poll_s);
      x->ai_poll_ms = poll_s * 1000;
      x->ai_deidentify = json_is_true(json_object_get(d, "deidentify"));
      rel[0] = '\0';
      get_string(c, d, "deid_secret_file", path, rel, sizeof rel, "");
      if (rel[0] && join_path(base, rel, x->ai_deid_secret, sizeof x->ai_deid_secret))
        problem(c, path, "deid_secret_file: path too long");
    } else if (x->kind == RR_DEST_STOW) {
      get_string(c, d, "url", path, x->url, sizeof x->url, NULL);
      get_string(c, d, "user", path, x->user, sizeof x->user, "");
      char rel[1024] = "";
      get_string(c, d, "password_file", path, rel, sizeof rel, "");
      if (rel[0] && join_path(base, rel, x->password_file, sizeof x->password_file))
        problem(c, path, "password_file: path too long");
      rel[0] = '\0';
      get_string(c, d, "bearer_token_file", path, rel, sizeof rel, "");
      if (rel[0] && join_path(base, rel, x->token_file, sizeof x->token_file))
        problem(c, path, "bearer_token_file: path too long");
      if (x->user[0] && !x->password_file[0])
        problem(c, path, "a user needs a password_file");
    }
    get_uint(c, d, "connect_timeout_ms", path, 1, UINT32_MAX, &x->connect_timeout_ms);
    json_t *tls = json_object_get(d, "tls");
    if (json_is_object(tls)) {
      char tpath[200];
      snprintf(tpath, sizeof tpath, "%s.tls", path);
      x->tls = true;
      struct {
        const char *key;
        char *out;
      } files[] = {{"ca", x->tls_ca}, {"cert", x->tls_cert}, {"key", x->tls_key}};
      for (size_t i = 0; i < 3; i++) {
        char rel[1024] = "";
        get_string(c, tls, files[i].key, tpath, rel, sizeof rel, "");
        if (rel[0] && join_path(base, rel, files[i].out, sizeof x->tls_ca))
          problem(c, tpath, "path of %s too long", files[i].key);
      }
      get_string(c, tls, "server_name", tpath, x->tls_server_name, sizeof x->tls_server_name, "");
    }
    const char *key = json_string_value(json_object_get(d, "key"));
    x->key_none = key && strcmp(key, "none") == 0;
    v = x->sched.concurrency;
    if (get_uint(c, d, "concurrency", path, 1, 1024, &v) == 0)
      x->sched.concurrency = (uint32_t)v;
    v = x->window;
    if (get_uint(c, d, "window", path, 16, 10000000, &v) == 0)
      x->window = (size_t)v;
    v = x->sched.max_attempts;
    if (get_uint(c, d, "max_attempts", path, 0, UINT32_MAX, &v) == 0)
      x->sched.max_attempts = (uint32_t)v;
    v = 86400;
    if (get_uint(c, d, "max_age_s", path, 0, (uint64_t)1 << 40, &v) == 0)
      x->sched.max_age_ms = (int64_t)v * 1000;
    v = (uint64_t)x->sched.backoff_base_ms;
    if (get_uint(c, d, "backoff_base_ms", path, 1, UINT32_MAX, &v) == 0)
      x->sched.backoff_base_ms = (int64_t)v;
    v = (uint64_t)x->sched.backoff_max_ms;
    if (get_uint(c, d, "backoff_max_ms", path, 1, UINT32_MAX, &v) == 0)
      x->sched.backoff_max_ms = (int64_t)v;
    v = x->sched.breaker_failures;
    if (get_uint(c, d, "breaker_failures", path, 0, UINT32_MAX, &v) == 0)
      x->sched.breaker_failures = (uint32_t)v;
    v = (uint64_t)x->sched.breaker_open_ms;
    if (get_uint(c, d, "breaker_open_ms", path, 1, UINT32_MAX, &v) == 0)
      x->sched.breaker_open_ms = (int64_t)v;
    json_t *dbk = json_object_get(d, "dead_blocks_key");
    if (dbk)
      x->sched.dead_blocks_key = json_is_true(dbk);
    ch->ndestinations++;
  }
}

/* NULL-terminated copies of a JSON array of strings (NULL when absent). */

static void load_dicom_source(ctx_t *c, json_t *src, const char *base, rr_channel_config_t *ch) {
  ch->dicom = true;
  get_string(c, src, "ae_title", "$.source", ch->dicom_ae, sizeof ch->dicom_ae, NULL);
  ch->dicom_calling_aes = string_list(json_object_get(src, "calling_aes"));
  ch->dicom_peers = string_list(json_object_get(src, "peers"));
  uint64_t v = 8;
  if (get_uint(c, src, "max_associations", "$.source", 1, 1000, &v) == 0)
    ch->dicom_max_associations = (unsigned)v;
  char rel[1024] = "";
  get_string(c, src, "spool", "$.source", rel, sizeof rel, NULL);
  if (rel[0] && join_path(base, rel, ch->dicom_spool, sizeof ch->dicom_spool))
    problem(c, "$.source.spool", "path too long");
  v = 1024;
  if (get_uint(c, src, "min_free_mb", "$.source", 0, (uint64_t)1 << 30, &v) == 0)
    ch->dicom_min_free_bytes = v * 1024 * 1024;
}

/* What DICOM and DICOMweb sources share: stable-study detection, matching. */
static void load_study_source(ctx_t *c, json_t *src, rr_channel_config_t *ch) {
  ch->dicom = true;
  uint64_t v = 10;
  if (get_uint(c, src, "stable_after_s", "$.source", 1, 86400, &v) == 0)
    ch->dicom_stable_after_ms = v * 1000;
  v = 24;
  if (get_uint(c, src, "match_window_hours", "$.source", 0, 8760, &v) == 0)
    ch->dicom_match_window_ms = v * 3600 * 1000;
  const char *late = json_string_value(json_object_get(src, "late_series"));
  ch->dicom_reopen = late && strcmp(late, "reopen") == 0;
}

static void load_dicomweb_source(ctx_t *c, json_t *src, const char *base, rr_channel_config_t *ch) {
  ch->dicomweb = true;
  get_string(c, src, "url", "$.source", ch->dw_url, sizeof ch->dw_url, NULL);
  if (ch->dw_url[0] && strncmp(ch->dw_url, "http://", 7) != 0 &&
      strncmp(ch->dw_url, "https://", 8) != 0)
    problem(c, "$.source.url", "must be an http:// or https:// URL");
  get_string(c, src, "user", "$.source", ch->dw_user, sizeof ch->dw_user, "");
  struct {
    const char *key;
    char *out;
  } files[] = {{"password_file", ch->dw_password_file},
               {"bearer_token_file", ch->dw_token_file},
               {"ca_file", ch->dw_ca},
               {"cert_file", ch->dw_cert},
               {"key_file", ch->dw_key}};
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    char rel[1024] = "", p[64];
    snprintf(p, sizeof p, "$.source.%s", files[i].key);
    get_string(c, src, files[i].key, "$.source", rel, sizeof rel, "");
    if (rel[0] && join_path(base, rel, files[i].out, sizeof ch->dw_ca))
      problem(c, p, "path too long");
  }
  if (ch->dw_user[0] && !ch->dw_password_file[0])
    problem(c, "$.source.password_file", "a user needs a password_file");
  if (ch->dw_user[0] && ch->dw_token_file[0])
    problem(c, "$.source.bearer_token_file", "either user + password_file or a bearer token");
  uint64_t v = 30;
  if (get_uint(c, src, "poll_interval_s", "$.source", 1, 86400, &v) == 0)
    ch->dw_poll_ms = v * 1000;
  v = 24;
  if (get_uint(c, src, "lookback_hours", "$.source", 1, 24 * 366, &v) == 0)
    ch->dw_lookback_ms = v * 3600 * 1000;
  ch->dw_modalities = string_list(json_object_get(src, "modalities"));
}

static int load_channel(const char *file, const char *base, rr_channel_config_t *ch,
                        rr_buf_t *err) {
  ctx_t c = {file, err, 0};
  memset(ch, 0, sizeof *ch);
  json_t *root = load_valid(file, rr_schema_channel, err);
  if (!root)
    return RR_EINVAL;
  if (!json_is_object(root)) {
    problem(&c, "$", "must be an object");
    json_decref(root);
    return RR_EINVAL;
  }
  static const char *const top[] = {"name",         "description", "source",          "accept",
                                    "hl7",          "script",      "on_script_error", "script_lib",
                                    "destinations", NULL};
  unknown_keys(&c, root, "$", top);
  get_string(&c, root, "name", "$", ch->name, sizeof ch->name, NULL);
  rr_mllp_listener_config_default(&ch->listen);
  rr_hl7_options_default(&ch->hl7);
  json_t *src = json_object_get(root, "source");
  if (!json_is_object(src)) {
    problem(&c, "$.source", src ? "must be an object" : "required");
  } else {
    static const char *const keys[] = {"type",
                                       "host",
                                       "port",
                                       "max_connections",
                                       "max_per_peer",
                                       "max_inflight",
                                       "idle_timeout_ms",
                                       "frame_timeout_ms",
                                       "drain_timeout_ms",
                                       "max_frame_bytes",
                                       "mllp_release",
                                       "tls",
                                       "handshake_timeout_ms",
                                       "ae_title",
                                       "calling_aes",
                                       "peers",
                                       "max_associations",
                                       "spool",
                                       "min_free_mb",
                                       "stable_after_s",
                                       "late_series",
                                       "match_window_hours",
                                       "url",
                                       "user",
                                       "password_file",
                                       "bearer_token_file",
                                       "ca_file",
                                       "cert_file",
                                       "key_file",
                                       "poll_interval_s",
                                       "lookback_hours",
                                       "modalities",
                                       NULL};
    unknown_keys(&c, src, "$.source", keys);
    char type[32];
    if (get_string(&c, src, "type", "$.source", type, sizeof type, NULL) == 0 &&
        strcmp(type, "mllp") != 0 && strcmp(type, "dicom") != 0 && strcmp(type, "dicomweb") != 0)
      problem(&c, "$.source.type", "\"%s\" is not a source type (mllp, dicom, dicomweb)", type);
    if (strcmp(type, "dicom") == 0 || strcmp(type, "dicomweb") == 0)
      load_study_source(&c, src, ch);
    if (strcmp(type, "dicom") == 0)
      load_dicom_source(&c, src, base, ch);
    if (strcmp(type, "dicomweb") == 0)
      load_dicomweb_source(&c, src, base, ch);
    get_string(&c, src, "host", "$.source", ch->host, sizeof ch->host, "127.0.0.1");
    uint64_t v = 2575;
    if (get_uint(&c, src, "port", "$.source", 0, 65535, &v) == 0)
      ch->listen.port = (int)v;
    v = ch->listen.max_connections;
    if (get_uint(&c, src, "max_connections", "$.source", 1, 100000, &v) == 0)
      ch->listen.max_connections = (unsigned)v;
    v = ch->listen.max_per_peer;
    if (get_uint(&c, src, "max_per_peer", "$.source", 1, 100000, &v) == 0)
      ch->listen.max_per_peer = (unsigned)v;
    v = ch->listen.max_inflight;
    if (get_uint(&c, src, "max_inflight", "$.source", 1, 100000, &v) == 0)
      ch->listen.max_inflight = (unsigned)v;
    get_uint(&c, src, "idle_timeout_ms", "$.source", 0, UINT32_MAX, &ch->listen.idle_timeout_ms);
    get_uint(&c, src, "frame_timeout_ms", "$.source", 0, UINT32_MAX, &ch->listen.frame_timeout_ms);
    get_uint(&c, src, "drain_timeout_ms", "$.source", 0, UINT32_MAX, &ch->listen.drain_timeout_ms);
    get_uint(&c, src, "handshake_timeout_ms", "$.source", 0, UINT32_MAX,
             &ch->listen.handshake_timeout_ms);
    json_t *tls = json_object_get(src, "tls");
    if (json_is_object(tls)) {
      ch->tls = true;
      char rel[1024];
      struct {
        const char *key;
        char *out;
      } files[] = {
          {"cert", ch->tls_cert}, {"key", ch->tls_key}, {"ca", ch->tls_ca}, {"crl", ch->tls_crl}};
      for (size_t i = 0; i < 4; i++) {
        rel[0] = '\0';
        get_string(&c, tls, files[i].key, "$.source.tls", rel, sizeof rel, "");
        if (rel[0] && join_path(base, rel, files[i].out, sizeof ch->tls_cert))
          problem(&c, "$.source.tls", "path of %s too long", files[i].key);
      }
      json_t *req = json_object_get(tls, "require_client_cert");
      ch->tls_cfg.require_client_cert = req ? json_is_true(req) : ch->tls_ca[0] != '\0';
      json_t *allow = json_object_get(tls, "allow");
      size_t na = json_array_size(allow);
      ch->tls_allow = calloc(na + 1, sizeof *ch->tls_allow);
      for (size_t i = 0; ch->tls_allow && i < na; i++)
        ch->tls_allow[i] = strdup(json_string_value(json_array_get(allow, i)));
      ch->tls_cfg.nallow = ch->tls_allow ? na : 0;
      const char *minv = json_string_value(json_object_get(tls, "min_version"));
      const char *maxv = json_string_value(json_object_get(tls, "max_version"));
      ch->tls_cfg.min_version = minv && strcmp(minv, "1.3") == 0 ? RR_TLS_V1_3 : RR_TLS_V1_2;
      ch->tls_cfg.max_version = maxv && strcmp(maxv, "1.2") == 0 ? RR_TLS_V1_2 : RR_TLS_V1_3;
    }
    v = 1;
    if (get_uint(&c, src, "mllp_release", "$.source", 1, 2, &v) == 0)
      ch->mllp_release = (int)v;
    v = ch->listen.framing.max_frame;
    if (get_uint(&c, src, "max_frame_bytes", "$.source", 64, (uint64_t)1 << 30, &v) == 0)
      ch->listen.framing.max_frame = (size_t)v;
  }
  char rel[1024] = "";
  get_string(&c, root, "script", "$", rel, sizeof rel, "");
  if (rel[0]) {
    /* Beside the channel file; shared modules in the lib folder there. */
    char chdir_[PATH_MAX + 256];
    snprintf(chdir_, sizeof chdir_, "%s", file);
    char *slash = strrchr(chdir_, '/');
    if (slash)
      *slash = '\0';
    else
      snprintf(chdir_, sizeof chdir_, ".");
    char lib[1024] = "";
    get_string(&c, root, "script_lib", "$", lib, sizeof lib, "lib");
    if (join_path(chdir_, rel, ch->script, sizeof ch->script) ||
        join_path(chdir_, lib, ch->script_lib, sizeof ch->script_lib))
      problem(&c, "$.script", "path too long");
  }
  char onerr[16] = "";
  get_string(&c, root, "on_script_error", "$", onerr, sizeof onerr, "AE");
  ch->on_script_error = strcmp(onerr, "AR") == 0       ? RR_HL7_REJECT
                        : strcmp(onerr, "accept") == 0 ? RR_HL7_ACCEPT
                                                       : RR_HL7_ERROR;
  json_t *acc = json_object_get(root, "accept");
  if (acc && !json_is_array(acc)) {
    problem(&c, "$.accept", "must be an array of message types such as \"ADT^A01\"");
  } else if (acc) {
    size_t n = json_array_size(acc);
    ch->accept = calloc(n + 1, sizeof *ch->accept);
    for (size_t i = 0; ch->accept && i < n; i++) {
      json_t *t = json_array_get(acc, i);
      if (!json_is_string(t)) {
        char p[64];
        snprintf(p, sizeof p, "$.accept[%zu]", i);
        problem(&c, p, "must be a string");
        continue;
      }
      ch->accept[i] = strdup(json_string_value(t));
    }
  }
  json_t *h = json_object_get(root, "hl7");
  if (h && !json_is_object(h)) {
    problem(&c, "$.hl7", "must be an object");
  } else if (h) {
    static const char *const keys[] = {"strict", "max_message_bytes", "max_segments",
                                       "max_field_bytes", NULL};
    unknown_keys(&c, h, "$.hl7", keys);
    json_t *st = json_object_get(h, "strict");
    if (st && !json_is_boolean(st))
      problem(&c, "$.hl7.strict", "must be true or false");
    else if (st)
      ch->hl7.mode = json_is_true(st) ? RR_HL7_STRICT : RR_HL7_LENIENT;
    uint64_t v = ch->hl7.max_message_size;
    if (get_uint(&c, h, "max_message_bytes", "$.hl7", 64, (uint64_t)1 << 30, &v) == 0)
      ch->hl7.max_message_size = (size_t)v;
    v = ch->hl7.max_segments;
    if (get_uint(&c, h, "max_segments", "$.hl7", 1, 10000000, &v) == 0)
      ch->hl7.max_segments = (size_t)v;
    v = ch->hl7.max_field_length;
    if (get_uint(&c, h, "max_field_bytes", "$.hl7", 1, (uint64_t)1 << 30, &v) == 0)
      ch->hl7.max_field_length = (size_t)v;
  }
  load_destinations(&c, json_object_get(root, "destinations"), base, ch);
  json_decref(root);
  return c.bad ? RR_EINVAL : 0;
}

/* p when absolute, else dir/p. Non-zero when it does not fit. */
static int join_path(const char *dir, const char *p, char *out, size_t cap) {
  int n = p[0] == '/' ? snprintf(out, cap, "%s", p) : snprintf(out, cap, "%s/%s", dir, p);
  return n < 0 || (size_t)n >= cap;
}

static void free_channel_lists(rr_channel_config_t *ch);

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

int rr_config_load(const char *path, rr_config_t *cfg, rr_buf_t *err) {
  memset(cfg, 0, sizeof *cfg);
  ctx_t c = {path, err, 0};
  json_t *root = load_valid(path, rr_schema_engine, err);
  if (!root)
    return RR_EINVAL;
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", path);
  char *base = dirname(dir);
  char chdir_[PATH_MAX] = "", store[PATH_MAX] = "", sync[16] = "", level[16] = "";
  static const char *const top[] = {"store", "channels", "log", "http", "alerts", NULL};
  if (!json_is_object(root)) {
    problem(&c, "$", "must be an object");
    goto out;
  }
  unknown_keys(&c, root, "$", top);
  json_t *st = json_object_get(root, "store");
  if (!json_is_object(st)) {
    problem(&c, "$.store", st ? "must be an object" : "required");
  } else {
    static const char *const keys[] = {"path",           "synchronous", "group_commit_wait_us",
                                       "retention_days", "keep_sent",   NULL};
    unknown_keys(&c, st, "$.store", keys);
    get_string(&c, st, "path", "$.store", store, sizeof store, NULL);
    uint64_t gw = 0;
    if (get_uint(&c, st, "group_commit_wait_us", "$.store", 0, 100000, &gw) == 0)
      cfg->group_commit_wait_us = (unsigned)gw;
    uint64_t rd = 0;
    if (get_uint(&c, st, "retention_days", "$.store", 0, 36500, &rd) == 0)
      cfg->retention_days = (unsigned)rd;
    json_t *ks = json_object_get(st, "keep_sent");
    cfg->keep_sent_off = ks && json_is_false(ks);
    if (get_string(&c, st, "synchronous", "$.store", sync, sizeof sync, "full") == 0) {
      if (strcmp(sync, "full") == 0)
        cfg->sync = RR_JOURNAL_SYNC_FULL;
      else if (strcmp(sync, "normal") == 0)
        cfg->sync = RR_JOURNAL_SYNC_NORMAL;
      else if (strcmp(sync, "off") == 0)
        cfg->sync = RR_JOURNAL_SYNC_OFF;
      else
        problem(&c, "$.store.synchronous", "\"%s\" is not one of full, normal, off", sync);
    }
  }
  json_t *http = json_object_get(root, "http");
  if (http && !json_is_object(http)) {
    problem(&c, "$.http", "must be an object");
  } else if (http) {
    static const char *const keys[] = {"host",       "port",      "token_file", "tls",
                                       "public_url", "dashboard", NULL};
    unknown_keys(&c, http, "$.http", keys);
    cfg->http = true;
    get_string(&c, http, "host", "$.http", cfg->http_host, sizeof cfg->http_host, "127.0.0.1");
    uint64_t v = 8480;
    if (get_uint(&c, http, "port", "$.http", 0, 65535, &v) == 0)
      cfg->http_port = (int)v;
    get_string(&c, http, "public_url", "$.http", cfg->http_public_url, sizeof cfg->http_public_url,
               "");
    char rel[1024] = "";
    get_string(&c, http, "token_file", "$.http", rel, sizeof rel, "");
    if (rel[0] && join_path(base, rel, cfg->http_token_file, sizeof cfg->http_token_file))
      problem(&c, "$.http.token_file", "path too long");
    rel[0] = '\0';
    if (json_is_false(json_object_get(http, "dashboard")))
      cfg->http_dashboard_off = true;
    else if (get_string(&c, http, "dashboard", "$.http", rel, sizeof rel, "") == 0 && rel[0] &&
             join_path(base, rel, cfg->http_dashboard, sizeof cfg->http_dashboard))
      problem(&c, "$.http.dashboard", "path too long");
    json_t *tls = json_object_get(http, "tls");
    if (tls && !json_is_object(tls)) {
      problem(&c, "$.http.tls", "must be an object");
    } else if (tls) {
      static const char *const tkeys[] = {"cert", "key", "ca", "crl", "require_client_cert", NULL};
      unknown_keys(&c, tls, "$.http.tls", tkeys);
      cfg->http_tls = true;
      struct {
        const char *key;
        char *out;
      } files[] = {{"cert", cfg->http_cert},
                   {"key", cfg->http_key},
                   {"ca", cfg->http_ca},
                   {"crl", cfg->http_crl}};
      for (size_t i = 0; i < 4; i++) {
        rel[0] = '\0';
        get_string(&c, tls, files[i].key, "$.http.tls", rel, sizeof rel, i < 2 ? NULL : "");
        if (rel[0] && join_path(base, rel, files[i].out, sizeof cfg->http_cert))
          problem(&c, "$.http.tls", "path of %s too long", files[i].key);
      }
      json_t *req = json_object_get(tls, "require_client_cert");
      cfg->http_require_client_cert = req ? json_is_true(req) : cfg->http_ca[0] != '\0';
    }
  }
  json_t *al = json_object_get(root, "alerts");
  if (al && !json_is_object(al)) {
    problem(&c, "$.alerts", "must be an object");
  } else if (al) {
    static const char *const keys[] = {
        "url",          "bearer_token_file", "check_s",      "queue_depth",
        "oldest_age_s", "error_rate",        "min_messages", NULL};
    unknown_keys(&c, al, "$.alerts", keys);
    cfg->alerts = true;
    get_string(&c, al, "url", "$.alerts", cfg->alerts_url, sizeof cfg->alerts_url, NULL);
    char rel[1024] = "";
    get_string(&c, al, "bearer_token_file", "$.alerts", rel, sizeof rel, "");
    if (rel[0] && join_path(base, rel, cfg->alerts_token_file, sizeof cfg->alerts_token_file))
      problem(&c, "$.alerts.bearer_token_file", "path too long");
    uint64_t v = 30;
    get_uint(&c, al, "check_s", "$.alerts", 1, 86400, &v);
    cfg->alerts_check_ms = v * 1000;
    v = 10000;
    get_uint(&c, al, "queue_depth", "$.alerts", 0, UINT32_MAX, &v);
    cfg->alerts_queue_depth = (int64_t)v;
    v = 900;
    get_uint(&c, al, "oldest_age_s", "$.alerts", 0, 30 * 86400, &v);
    cfg->alerts_oldest_age_ms = (int64_t)v * 1000;
    v = 20;
    get_uint(&c, al, "min_messages", "$.alerts", 1, 1000000, &v);
    cfg->alerts_min_messages = v;
    json_t *er = json_object_get(al, "error_rate");
    cfg->alerts_error_rate = 0.1;
    if (er && (!json_is_number(er) || json_number_value(er) < 0 || json_number_value(er) > 1))
      problem(&c, "$.alerts.error_rate", "must be a number from 0 to 1");
    else if (er)
      cfg->alerts_error_rate = json_number_value(er);
  }
  get_string(&c, root, "channels", "$", chdir_, sizeof chdir_, "channels");
  cfg->log_level = RR_LOG_INFO;
  json_t *lg = json_object_get(root, "log");
  if (lg && !json_is_object(lg)) {
    problem(&c, "$.log", "must be an object");
  } else if (lg) {
    static const char *const keys[] = {"level", NULL};
    unknown_keys(&c, lg, "$.log", keys);
    if (get_string(&c, lg, "level", "$.log", level, sizeof level, "info") == 0) {
      cfg->log_level = rr_log_parse_level(level);
      if (cfg->log_level < 0)
        problem(&c, "$.log.level", "\"%s\" is not one of debug, info, warn, error", level);
    }
  }
  if (c.bad)
    goto out;
  /* Relative paths are relative to the configuration file. */
  char chpath[PATH_MAX];
  if (join_path(base, store, cfg->store_path, sizeof cfg->store_path)) {
    problem(&c, "$.store.path", "path too long");
    goto out;
  }
  if (join_path(base, chdir_, chpath, sizeof chpath)) {
    problem(&c, "$.channels", "path too long");
    goto out;
  }
  snprintf(cfg->config_path, sizeof cfg->config_path, "%s", path);
  snprintf(cfg->channels_dir, sizeof cfg->channels_dir, "%s", chpath);
  DIR *d = opendir(chpath);
  if (!d) {
    problem(&c, "$.channels", "cannot open folder %s", chpath);
    goto out;
  }
  char *names[256];
  size_t n = 0;
  struct dirent *e;
  char self[PATH_MAX];
  if (!realpath(path, self))
    self[0] = '\0';
  while ((e = readdir(d)) && n < 256) {
    size_t l = strlen(e->d_name);
    if (l <= 5 || strcmp(e->d_name + l - 5, ".json") != 0 || e->d_name[0] == '.')
      continue;
    char f[PATH_MAX + 256], real[PATH_MAX];
    snprintf(f, sizeof f, "%s/%s", chpath, e->d_name);
    if (realpath(f, real) && strcmp(real, self) == 0)
      continue; /* the engine file may sit beside its channels */
    names[n++] = strdup(e->d_name);
  }
  closedir(d);
  qsort(names, n, sizeof *names, cmp_str);
  cfg->channels = calloc(n ? n : 1, sizeof *cfg->channels);
  for (size_t i = 0; i < n; i++) {
    char f[PATH_MAX + 256];
    snprintf(f, sizeof f, "%s/%s", chpath, names[i]);
    if (cfg->channels && load_channel(f, base, &cfg->channels[cfg->nchannels], err) == 0) {
      cfg->nchannels++;
    } else {
      c.bad++;
      if (cfg->channels) /* a half-loaded channel keeps nothing */
        free_channel_lists(&cfg->channels[cfg->nchannels]);
    }
    free(names[i]);
  }
  if (n == 0)
    problem(&c, "$.channels", "no channel files (*.json) in %s", chpath);
  for (size_t i = 0; i < cfg->nchannels; i++)
    for (size_t k = 0; k < i; k++)
      if (strcmp(cfg->channels[i].name, cfg->channels[k].name) == 0)
        problem(&c, "$.channels", "two channels are named \"%s\"", cfg->channels[i].name);
  /* De-identifying AI endpoints: copies in the channel's spool, the secret
   * beside the store unless named, images served by the engine's API. */
  for (size_t i = 0; i < cfg->nchannels; i++)
    for (size_t k = 0; k < cfg->channels[i].ndestinations; k++) {
      rr_destination_config_t *x = &cfg->channels[i].destinations[k];
      if (x->kind != RR_DEST_AI || !x->ai_deidentify)
        continue;
      const char *spool = cfg->channels[i].dicom_spool;
      if (spool[0])
        snprintf(x->ai_deid_dir, sizeof x->ai_deid_dir, "%.1000s/deid", spool);
      if (!x->ai_deid_secret[0]) {
        const char *slash = strrchr(cfg->store_path, '/');
        int len = slash ? (int)(slash - cfg->store_path) : 1;
        snprintf(x->ai_deid_secret, sizeof x->ai_deid_secret, "%.*s/deid.secret", len,
                 slash ? cfg->store_path : ".");
        x->ai_deid_secret_create = true;
      }
      if (!cfg->http_public_url[0]) {
        char p[200];
        snprintf(p, sizeof p, "$.destinations.%s.deidentify", x->short_name);
        ctx_t cc = {cfg->channels[i].name, err, 0};
        problem(&cc, p,
                "needs http.public_url in the engine file: the endpoint fetches the "
                "de-identified images from radrelay");
        c.bad++;
      }
    }
  /* A channel destination names a channel of this configuration. */
  for (size_t i = 0; i < cfg->nchannels; i++)
    for (size_t k = 0; k < cfg->channels[i].ndestinations; k++) {
      const rr_destination_config_t *x = &cfg->channels[i].destinations[k];
      bool found = x->kind != RR_DEST_CHANNEL;
      for (size_t m = 0; m < cfg->nchannels && !found; m++)
        found = strcmp(cfg->channels[m].name, x->channel) == 0;
      if (!found) {
        char p[200];
        snprintf(p, sizeof p, "$.destinations.%s.channel", x->short_name);
        ctx_t cc = {cfg->channels[i].name, err, 0};
        problem(&cc, p, "no channel named \"%s\" in this configuration", x->channel);
        c.bad++;
      }
    }
out:
  json_decref(root);
  return c.bad ? RR_EINVAL : 0;
}

static void free_channel_lists(rr_channel_config_t *ch) {
  for (char **a = ch->accept; a && *a; a++)
    free(*a);
  free(ch->accept);
  ch->accept = NULL;
  for (char **a = ch->tls_allow; a && *a; a++)
    free(*a);
  free(ch->tls_allow);
  ch->tls_allow = NULL;
  for (size_t i = 0; ch->destinations && i < ch->ndestinations; i++)
    rr_destination_config_free_lists(&ch->destinations[i]);
  free(ch->destinations);
  ch->destinations = NULL;
  ch->ndestinations = 0;
  for (char **a = ch->dicom_calling_aes; a && *a; a++)
    free(*a);
  free(ch->dicom_calling_aes);
  ch->dicom_calling_aes = NULL;
  for (char **a = ch->dicom_peers; a && *a; a++)
    free(*a);
  free(ch->dicom_peers);
  ch->dicom_peers = NULL;
  for (char **a = ch->dw_modalities; a && *a; a++)
    free(*a);
  free(ch->dw_modalities);
  ch->dw_modalities = NULL;
}

void rr_config_free(rr_config_t *cfg) {
  for (size_t i = 0; i < cfg->nchannels; i++)
    free_channel_lists(&cfg->channels[i]);
  free(cfg->channels);
  cfg->channels = NULL;
  cfg->nchannels = 0;
}

/* JSON Schema subset validator (see json_schema.h). */
#include "core/json_schema.h"

#include <math.h>
#include <regex.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/array.h"
#include "core/error.h"

/* Compiled regular expressions, keyed by the pattern string's address in
 * the (reference-held) schema. */
typedef struct pattern {
  const char *src;
  regex_t re;
} pattern_t;

struct rr_json_schema {
  json_t *root;
  pattern_t *pats;
  size_t npats, cap;
};

static const char *const known[] = {"type",     "properties", "required",    "additionalProperties",
                                    "items",    "enum",       "const",       "pattern",
                                    "minimum",  "maximum",    "minLength",   "maxLength",
                                    "minItems", "maxItems",   "oneOf",       "anyOf",
                                    "allOf",    "$ref",       "$defs",       "$schema",
                                    "$id",      "title",      "description", "default",
                                    "examples", "$comment",   NULL};

static int compile(rr_json_schema_t *s, json_t *node, const char *where, rr_buf_t *err) {
  if (json_is_boolean(node))
    return 0;
  if (!json_is_object(node)) {
    rr_buf_printf(err, "schema %s: not an object\n", where);
    return RR_EINVAL;
  }
  const char *k;
  json_t *v;
  int rc = 0;
  json_object_foreach(node, k, v) {
    bool ok = false;
    for (const char *const *q = known; *q && !ok; q++)
      ok = strcmp(*q, k) == 0;
    if (!ok) {
      rr_buf_printf(err, "schema %s: keyword \"%s\" is not supported\n", where, k);
      rc = RR_EINVAL;
      continue;
    }
    char sub[512];
    if (strcmp(k, "properties") == 0 || strcmp(k, "$defs") == 0) {
      const char *pk;
      json_t *pv;
      json_object_foreach(v, pk, pv) {
        snprintf(sub, sizeof sub, "%s/%s/%s", where, k, pk);
        rc = compile(s, pv, sub, err) ? RR_EINVAL : rc;
      }
    } else if (strcmp(k, "items") == 0 || strcmp(k, "additionalProperties") == 0) {
      snprintf(sub, sizeof sub, "%s/%s", where, k);
      rc = compile(s, v, sub, err) ? RR_EINVAL : rc;
    } else if (strcmp(k, "oneOf") == 0 || strcmp(k, "anyOf") == 0 || strcmp(k, "allOf") == 0) {
      size_t i;
      json_t *e;
      json_array_foreach(v, i, e) {
        snprintf(sub, sizeof sub, "%s/%s/%zu", where, k, i);
        rc = compile(s, e, sub, err) ? RR_EINVAL : rc;
      }
    } else if (strcmp(k, "pattern") == 0) {
      if (!json_is_string(v)) {
        rr_buf_printf(err, "schema %s: pattern must be a string\n", where);
        rc = RR_EINVAL;
        continue;
      }
      if (rr_array_grow((void **)&s->pats, &s->cap, s->npats + 1, sizeof *s->pats, 8))
        return RR_ENOMEM;
      pattern_t *p = &s->pats[s->npats];
      p->src = json_string_value(v);
      if (regcomp(&p->re, p->src, REG_EXTENDED | REG_NOSUB) != 0) {
        rr_buf_printf(err, "schema %s: pattern \"%s\" does not compile\n", where, p->src);
        rc = RR_EINVAL;
        continue;
      }
      s->npats++;
    } else if (strcmp(k, "$ref") == 0) {
      const char *ref = json_string_value(v);
      if (!ref || strncmp(ref, "#/$defs/", 8) != 0 ||
          !json_object_get(json_object_get(s->root, "$defs"), ref + 8)) {
        rr_buf_printf(err, "schema %s: $ref \"%s\" does not name an entry of $defs\n", where,
                      ref ? ref : "?");
        rc = RR_EINVAL;
      }
    }
  }
  return rc;
}

void rr_json_schema_free(rr_json_schema_t *s) {
  if (!s)
    return;
  for (size_t i = 0; i < s->npats; i++)
    regfree(&s->pats[i].re);
  free(s->pats);
  json_decref(s->root);
  free(s);
}

int rr_json_schema_new(json_t *schema, rr_json_schema_t **out, rr_buf_t *err) {
  rr_json_schema_t *s = calloc(1, sizeof *s);
  if (!s)
    return RR_ENOMEM;
  s->root = json_incref(schema);
  int rc = compile(s, schema, "#", err);
  if (rc) {
    rr_json_schema_free(s);
    return rc;
  }
  *out = s;
  return 0;
}

/* ---- validation --------------------------------------------------------- */

typedef struct vctx {
  const rr_json_schema_t *s;
  const char *prefix;
  rr_buf_t *err; /* NULL while probing a oneOf/anyOf branch */
  int problems;
} vctx_t;

static void problem(vctx_t *c, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void problem(vctx_t *c, const char *path, const char *fmt, ...) {
  c->problems++;
  if (!c->err)
    return;
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (c->prefix)
    rr_buf_printf(c->err, "%s: %s: %s\n", c->prefix, path, msg);
  else
    rr_buf_printf(c->err, "%s: %s\n", path, msg);
}

static const char *type_name(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "object";
  case JSON_ARRAY: return "array";
  case JSON_STRING: return "string";
  case JSON_INTEGER: return "integer";
  case JSON_REAL: return "number";
  case JSON_TRUE:
  case JSON_FALSE: return "boolean";
  default: return "null";
  }
}

static bool is_type(const json_t *v, const char *t) {
  if (strcmp(t, "number") == 0)
    return json_is_number(v);
  if (strcmp(t, "integer") == 0)
    return json_is_integer(v) ||
           (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v));
  return strcmp(type_name(v), t) == 0;
}

static const regex_t *find_pattern(const rr_json_schema_t *s, const char *src) {
  for (size_t i = 0; i < s->npats; i++)
    if (s->pats[i].src == src)
      return &s->pats[i].re;
  return NULL;
}

static void validate(vctx_t *c, const json_t *sch, const json_t *v, const char *path);

static int probe(vctx_t *c, const json_t *sch, const json_t *v, const char *path) {
  vctx_t sub = {c->s, c->prefix, NULL, 0};
  validate(&sub, sch, v, path);
  return sub.problems;
}

static void describe_type(const json_t *t, char *out, size_t cap) {
  if (json_is_string(t)) {
    snprintf(out, cap, "%s", json_string_value(t));
    return;
  }
  size_t i, n = 0;
  json_t *e;
  out[0] = '\0';
  json_array_foreach(t, i, e) {
    n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, "%s%s", i ? " or " : "",
                          json_string_value(e) ? json_string_value(e) : "?");
  }
}

static void validate(vctx_t *c, const json_t *sch, const json_t *v, const char *path) {
  if (json_is_true(sch))
    return;
  if (json_is_false(sch)) {
    problem(c, path, "not allowed here");
    return;
  }
  const json_t *ref = json_object_get(sch, "$ref");
  if (ref) {
    const json_t *target =
        json_object_get(json_object_get(c->s->root, "$defs"), json_string_value(ref) + 8);
    validate(c, target, v, path);
  }
  const json_t *t = json_object_get(sch, "type");
  if (t) {
    bool ok = false;
    if (json_is_string(t)) {
      ok = is_type(v, json_string_value(t));
    } else {
      size_t i;
      json_t *e;
      json_array_foreach(t, i, e) ok |= is_type(v, json_string_value(e));
    }
    if (!ok) {
      char want[128];
      describe_type(t, want, sizeof want);
      problem(c, path, "must be %s %s, not %s", strchr("aeiou", want[0]) ? "an" : "a", want,
              type_name(v));
      return; /* the other keywords would only repeat it */
    }
  }
  const json_t *cst = json_object_get(sch, "const");
  if (cst && !json_equal((json_t *)cst, (json_t *)v)) {
    char *d = json_dumps(cst, JSON_ENCODE_ANY);
    problem(c, path, "must be %s", d ? d : "the constant");
    free(d);
  }
  const json_t *en = json_object_get(sch, "enum");
  if (en) {
    bool ok = false;
    size_t i;
    json_t *e;
    json_array_foreach(en, i, e) ok |= json_equal(e, (json_t *)v);
    if (!ok) {
      char *d = json_dumps(en, JSON_ENCODE_ANY | JSON_COMPACT);
      problem(c, path, "must be one of %s", d ? d : "the listed values");
      free(d);
    }
  }
  if (json_is_string(v)) {
    size_t len = json_string_length(v);
    const json_t *mn = json_object_get(sch, "minLength"), *mx = json_object_get(sch, "maxLength");
    if (mn && (json_int_t)len < json_integer_value(mn))
      problem(c, path, "must be at least %lld characters", (long long)json_integer_value(mn));
    if (mx && (json_int_t)len > json_integer_value(mx))
      problem(c, path, "must be at most %lld characters", (long long)json_integer_value(mx));
    const json_t *pat = json_object_get(sch, "pattern");
    if (pat) {
      const regex_t *re = find_pattern(c->s, json_string_value(pat));
      if (re && regexec(re, json_string_value(v), 0, NULL, 0) != 0)
        problem(c, path, "\"%s\" does not match %s", json_string_value(v), json_string_value(pat));
    }
  }
  if (json_is_number(v)) {
    double d = json_number_value(v);
    const json_t *mn = json_object_get(sch, "minimum"), *mx = json_object_get(sch, "maximum");
    if (mn && d < json_number_value(mn))
      problem(c, path, "must be at least %g", json_number_value(mn));
    if (mx && d > json_number_value(mx))
      problem(c, path, "must be at most %g", json_number_value(mx));
  }
  if (json_is_object(v)) {
    const json_t *props = json_object_get(sch, "properties");
    const json_t *addl = json_object_get(sch, "additionalProperties");
    const json_t *req = json_object_get(sch, "required");
    size_t i;
    json_t *e;
    json_array_foreach(req, i, e) {
      if (!json_object_get(v, json_string_value(e))) {
        char p[512];
        snprintf(p, sizeof p, "%s.%s", path, json_string_value(e));
        problem(c, p, "required");
      }
    }
    const char *k;
    json_t *pv;
    json_object_foreach((json_t *)v, k, pv) {
      char p[512];
      snprintf(p, sizeof p, "%s.%s", path, k);
      const json_t *ps = props ? json_object_get(props, k) : NULL;
      if (ps)
        validate(c, ps, pv, p);
      else if (json_is_false(addl))
        problem(c, p, "unknown key");
      else if (addl)
        validate(c, addl, pv, p);
    }
  }
  if (json_is_array(v)) {
    size_t n = json_array_size(v);
    const json_t *mn = json_object_get(sch, "minItems"), *mx = json_object_get(sch, "maxItems");
    if (mn && (json_int_t)n < json_integer_value(mn))
      problem(c, path, "must have at least %lld items", (long long)json_integer_value(mn));
    if (mx && (json_int_t)n > json_integer_value(mx))
      problem(c, path, "must have at most %lld items", (long long)json_integer_value(mx));
    const json_t *items = json_object_get(sch, "items");
    if (items) {
      size_t i;
      json_t *e;
      json_array_foreach(v, i, e) {
        char p[512];
        snprintf(p, sizeof p, "%s[%zu]", path, i);
        validate(c, items, e, p);
      }
    }
  }
  const json_t *all = json_object_get(sch, "allOf");
  if (all) {
    size_t i;
    json_t *e;
    json_array_foreach(all, i, e) validate(c, e, v, path);
  }
  const json_t *one = json_object_get(sch, "oneOf"), *any = json_object_get(sch, "anyOf");
  if (one || any) {
    const json_t *list = one ? one : any;
    size_t i, matches = 0;
    json_t *e;
    json_array_foreach(list, i, e) matches += probe(c, e, v, path) == 0;
    if (matches == 0) {
      /* Say what each alternative wanted. */
      problem(c, path, "matches none of the allowed forms:");
      if (c->err) {
        json_array_foreach(list, i, e) {
          rr_buf_t sub;
          rr_buf_init(&sub, 4096);
          vctx_t sc = {c->s, NULL, &sub, 0};
          validate(&sc, e, v, path);
          rr_buf_printf(c->err, "    - %s", sub.data ? sub.data : "\n");
          rr_buf_close(&sub);
        }
      }
    } else if (one && matches > 1) {
      problem(c, path, "matches more than one of the allowed forms");
    }
  }
}

int rr_json_schema_validate(const rr_json_schema_t *s, const json_t *doc, const char *prefix,
                            rr_buf_t *err) {
  vctx_t c = {s, prefix, err, 0};
  validate(&c, s->root, doc, "$");
  return c.problems;
}

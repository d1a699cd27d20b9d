/* radrelay script test: run a channel's script against sample messages with
 * no network and no store, and show what it decided. With --cases DIR every
 * NAME.hl7 there is checked against NAME.json (the --json output without
 * timings), so channel scripts can be tested in CI; --update writes them.
 * The store, the order store and the AI findings are in memory: the AI
 * findings of a sample come from NAME.ai.json beside it. */
#include <dirent.h>
#include <jansson.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/error.h"
#include "core/log.h"
#include "hl7/hl7.h"
#include "script/script.h"

static const char *verdict_name(rr_script_verdict_t v) {
  switch (v) {
  case RR_SCRIPT_PASS: return "pass";
  case RR_SCRIPT_FILTERED: return "filtered";
  case RR_SCRIPT_REJECTED: return "rejected";
  default: return "error";
  }
}

static const char *level_name(int l) {
  static const char *const n[] = {"debug", "info", "warn", "error"};
  return l >= 0 && l < 4 ? n[l] : "info";
}

static json_t *g_orders, *g_kept, *g_verdicts;

/* The decision as JSON (owned); timings only when with_time. */
static json_t *result_json(const rr_script_result_t *r, bool with_time) {
  json_t *o = json_object();
  json_object_set_new(o, "verdict", json_string(verdict_name(r->verdict)));
  if (r->reason[0])
    json_object_set_new(o, "reason", json_string(r->reason));
  json_t *routes = json_array();
  for (size_t i = 0; i < r->nroutes; i++) {
    const rr_script_route_t *rt = &r->routes[i];
    json_t *x = json_object();
    json_object_set_new(x, "destination", json_string(rt->destination));
    json_object_set_new(x, "type", json_string(rt->is_hl7 ? "hl7" : "json"));
    if (rt->key)
      json_object_set_new(x, "key", json_string(rt->key));
    if (rt->lane >= 0)
      json_object_set_new(x, "priority",
                          json_string(rt->lane == 2   ? "critical"
                                      : rt->lane == 1 ? "stat"
                                                      : "routine"));
    if (rt->is_hl7) {
      /* one string per segment: readable in files and diffs */
      json_t *segs = json_array();
      const char *p = rt->payload, *end = rt->payload + rt->len;
      while (p < end) {
        const char *cr = memchr(p, '\r', (size_t)(end - p));
        const char *e = cr ? cr : end;
        json_array_append_new(segs, json_stringn(p, (size_t)(e - p)));
        p = cr ? cr + 1 : end;
      }
      json_object_set_new(x, "segments", segs);
    } else {
      json_error_t je;
      json_t *v = json_loadb(rt->payload, rt->len, JSON_DECODE_ANY, &je);
      json_object_set_new(x, "body", v ? v : json_stringn(rt->payload, rt->len));
    }
    json_array_append_new(routes, x);
  }
  json_object_set_new(o, "routes", routes);
  json_t *logs = json_array();
  for (size_t i = 0; i < r->nlogs; i++) {
    json_t *x = json_object();
    json_object_set_new(x, "level", json_string(level_name(r->logs[i].level)));
    json_object_set_new(x, "text", json_string(r->logs[i].text));
    json_array_append_new(logs, x);
  }
  json_object_set_new(o, "logs", logs);
  if (g_kept && json_array_size(g_kept))
    json_object_set_new(o, "orders", json_deep_copy(g_kept));
  if (g_verdicts && json_array_size(g_verdicts))
    json_object_set_new(o, "verdicts", json_deep_copy(g_verdicts));
  if (with_time) {
    json_object_set_new(o, "elapsed_us", json_real((double)r->elapsed_ns / 1000.0));
    json_object_set_new(o, "instructions", json_integer((json_int_t)r->instructions));
  }
  return o;
}

static void print_text(const char *name, const rr_script_result_t *r) {
  printf("%s: %s%s%s\n", name, verdict_name(r->verdict), r->reason[0] ? ": " : "", r->reason);
  for (size_t i = 0; i < r->nroutes; i++) {
    const rr_script_route_t *rt = &r->routes[i];
    printf("  route -> %s (%s, %zu bytes%s%s%s%s)\n", rt->destination, rt->is_hl7 ? "hl7" : "json",
           rt->len, rt->key ? ", key " : "", rt->key ? rt->key : "",
           rt->lane >= 0 ? ", priority " : "",
           rt->lane == 2   ? "critical"
           : rt->lane == 1 ? "stat"
           : rt->lane == 0 ? "routine"
                           : "");
    const char *p = rt->payload, *end = rt->payload + rt->len;
    while (p < end) {
      const char *cr = rt->is_hl7 ? memchr(p, '\r', (size_t)(end - p)) : NULL;
      const char *e = cr ? cr : end;
      printf("    %.*s\n", (int)(e - p), p);
      p = cr ? cr + 1 : end;
    }
  }
  for (size_t i = 0; i < r->nlogs; i++)
    printf("  log %s: %s\n", level_name(r->logs[i].level), r->logs[i].text);
  size_t k;
  json_t *v;
  json_array_foreach(g_verdicts, k, v) {
    printf("  ai verdict %s/%s: %s (%s)%s%s\n", json_string_value(json_object_get(v, "job_id")),
           json_string_value(json_object_get(v, "finding_id")),
           json_string_value(json_object_get(v, "verdict")),
           json_string_value(json_object_get(v, "outcome")), json_object_get(v, "note") ? ": " : "",
           json_object_get(v, "note") ? json_string_value(json_object_get(v, "note")) : "");
  }
  printf("  time %.1f us\n", (double)r->elapsed_ns / 1000.0);
}

/* Finds the script of a channel: CHANNEL is a .lua file, or a channel name
 * looked up in the channels folder (a JSON file with "name" and "script"). */
static int resolve(const char *channel, const char *chdir_, char *script, size_t cap, char *name,
                   size_t ncap, char *lib, size_t lcap) {
  snprintf(lib, lcap, "%s/lib", chdir_);
  size_t n = strlen(channel);
  if (n > 4 && strcmp(channel + n - 4, ".lua") == 0) {
    snprintf(script, cap, "%s", channel);
    snprintf(name, ncap, "%s", channel);
    return 0;
  }
  DIR *d = opendir(chdir_);
  if (!d) {
    fprintf(stderr, "radrelay script: cannot open channels folder %s\n", chdir_);
    return 1;
  }
  struct dirent *e;
  int found = 1;
  while (found && (e = readdir(d))) {
    size_t l = strlen(e->d_name);
    if (l <= 5 || strcmp(e->d_name + l - 5, ".json") != 0)
      continue;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", chdir_, e->d_name);
    json_t *j = json_load_file(path, 0, NULL);
    const char *nm = json_string_value(json_object_get(j, "name"));
    const char *sc = json_string_value(json_object_get(j, "script"));
    const char *sl = json_string_value(json_object_get(j, "script_lib"));
    if (nm && strcmp(nm, channel) == 0 && sl)
      snprintf(lib, lcap, "%s%s%s", sl[0] == '/' ? "" : chdir_, sl[0] == '/' ? "" : "/", sl);
    if (nm && strcmp(nm, channel) == 0) {
      if (!sc) {
        fprintf(stderr, "radrelay script: channel %s (%s) has no script\n", channel, path);
      } else {
        snprintf(script, cap, "%s%s%s", sc[0] == '/' ? "" : chdir_, sc[0] == '/' ? "" : "/", sc);
        snprintf(name, ncap, "%s", channel);
        found = 0;
      }
      json_decref(j);
      break;
    }
    json_decref(j);
  }
  closedir(d);
  if (found)
    fprintf(stderr, "radrelay script: no channel named %s in %s\n", channel, chdir_);
  return found;
}

/* script test has no store: store.get/set work on this in-memory map, which
 * lives for one command (cases run in name order, so an ADT case can enrich
 * a later order case). */
static json_t *g_kv;

static int mem_get(void *ud, const char *key, rr_buf_t *out) {
  (void)ud;
  const char *v = json_string_value(json_object_get(g_kv, key));
  return v ? rr_buf_append(out, v, json_string_length(json_object_get(g_kv, key))) : RR_ENOTFOUND;
}

static int mem_set(void *ud, const char *key, const char *value, size_t len) {
  (void)ud;
  if (!value)
    return json_object_del(g_kv, key), 0;
  return json_object_set_new(g_kv, key, json_stringn(value, len)) ? RR_ENOMEM : 0;
}

/* ... and orders.keep/get on this one (accession or placer -> record); the
 * orders one sample kept are shown with its result. */
static int mem_order_keep(void *ud, const char *text, size_t len, rr_buf_t *err) {
  (void)ud;
  json_t *o = json_loadb(text, len, 0, NULL);
  const char *acc = json_string_value(json_object_get(o, "accession"));
  const char *plc = json_string_value(json_object_get(o, "placer_order"));
  const char *key = acc && *acc ? acc : plc && *plc ? plc : NULL;
  if (!json_is_object(o) || !key) {
    json_decref(o);
    rr_buf_printf(err, "an order needs an accession or a placer_order");
    return RR_EINVAL;
  }
  json_array_append(g_kept, o);
  json_object_set_new(g_orders, key, o);
  return 0;
}

static int mem_order_get(void *ud, const char *accession, rr_buf_t *out) {
  (void)ud;
  json_t *o = json_object_get(g_orders, accession);
  if (!o)
    return RR_ENOTFOUND;
  char *t = json_dumps(o, JSON_COMPACT);
  int rc = t ? rr_buf_append(out, t, strlen(t)) : RR_ENOMEM;
  free(t);
  return rc;
}

/* ... and ai.findings/ai.verdict on the findings of NAME.ai.json beside
 * the sample NAME.hl7 (a JSON array of findings as ai.findings returns
 * them; none without the file). The verdicts a sample records are applied
 * to them and shown with its result under "verdicts". */
static json_t *g_ai;

static bool field_is(json_t *o, const char *key, const char *want) {
  const char *v = json_string_value(json_object_get(o, key));
  return want && v && strcmp(v, want) == 0;
}

static int mem_findings(void *ud, const char *accession, const char *study_uid, rr_buf_t *out) {
  (void)ud;
  json_t *list = json_array(), *f;
  size_t i;
  json_array_foreach(g_ai, i, f) {
    if (field_is(f, "study_uid", study_uid) || field_is(f, "accession", accession))
      json_array_append(list, f);
  }
  char *t = json_dumps(list, JSON_COMPACT);
  json_decref(list);
  int rc = t ? rr_buf_puts(out, t) : RR_ENOMEM;
  free(t);
  return rc;
}

static bool same_text(json_t *o, const char *key, const char *v) {
  const char *cur = json_string_value(json_object_get(o, key));
  return strcmp(cur ? cur : "", v ? v : "") == 0;
}

static void set_or_del(json_t *o, const char *key, const char *v) {
  if (v)
    json_object_set_new(o, key, json_string(v));
  else
    json_object_del(o, key);
}

static int mem_verdict(void *ud, const rr_script_ai_verdict_t *v, const char **outcome,
                       rr_buf_t *err) {
  (void)ud;
  json_t *f, *hit = NULL;
  bool job = false;
  size_t i;
  json_array_foreach(g_ai, i, f) {
    job |= field_is(f, "job_id", v->job_id);
    if (field_is(f, "job_id", v->job_id) && field_is(f, "finding_id", v->finding_id))
      hit = f;
  }
  if (!hit) {
    if (job)
      rr_buf_printf(err, "AI job %s has no finding \"%s\"", v->job_id, v->finding_id);
    else
      rr_buf_printf(err, "no AI job \"%s\" with findings", v->job_id);
    return RR_ENOTFOUND;
  }
  const char *cur = json_string_value(json_object_get(hit, "verdict"));
  json_t *rec = json_pack("{s:s, s:s, s:s}", "job_id", v->job_id, "finding_id", v->finding_id,
                          "verdict", v->verdict);
  set_or_del(rec, "by", v->by);
  set_or_del(rec, "note", v->note);
  set_or_del(rec, "report", v->report);
  if (cur && strcmp(cur, v->verdict) == 0 && same_text(hit, "verdict_by", v->by) &&
      same_text(hit, "verdict_report", v->report)) {
    *outcome = "unchanged";
  } else {
    *outcome = cur ? "replaced" : "recorded";
    if (cur)
      json_object_set_new(rec, "replaces", json_string(cur));
    json_object_set_new(hit, "verdict", json_string(v->verdict));
    json_object_set_new(hit, "verdict_ms", json_integer((json_int_t)1767225600 * 1000));
    set_or_del(hit, "verdict_by", v->by);
    set_or_del(hit, "verdict_note", v->note);
    set_or_del(hit, "verdict_report", v->report);
  }
  json_object_set_new(rec, "outcome", json_string(*outcome));
  json_array_append_new(g_verdicts, rec);
  return 0;
}

/* Loads the AI findings of sample path (NAME.ai.json beside it) into g_ai. */
static int load_ai(const char *path) {
  json_array_clear(g_ai);
  char side[PATH_MAX];
  const char *dot = strrchr(path, '.'), *slash = strrchr(path, '/');
  int n = dot && (!slash || dot > slash) ? (int)(dot - path) : (int)strlen(path);
  snprintf(side, sizeof side, "%.*s.ai.json", n, path);
  FILE *f = fopen(side, "r");
  if (!f)
    return 0;
  fclose(f);
  json_error_t je;
  json_t *doc = json_load_file(side, 0, &je);
  bool ok = json_is_array(doc);
  size_t i;
  json_t *x;
  json_array_foreach(doc, i, x) {
    ok &= json_is_string(json_object_get(x, "job_id")) &&
          json_is_string(json_object_get(x, "finding_id"));
  }
  if (!ok) {
    fprintf(stderr, "radrelay script: %s: %s\n", side,
            doc ? "not a list of findings (each with job_id and finding_id)" : je.text);
    json_decref(doc);
    return RR_EPARSE;
  }
  json_array_extend(g_ai, doc);
  json_decref(doc);
  return 0;
}

static int cmp_name(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static int run_file(rr_script_t *s, const char *path, rr_script_result_t *r) {
  char *data;
  size_t len;
  int rc = rr_read_file(path, &data, &len);
  if (rc) {
    fprintf(stderr, "radrelay script: %s: %s\n", path, rr_strerror(rc));
    return rc;
  }
  json_array_clear(g_kept);
  json_array_clear(g_verdicts);
  if ((rc = load_ai(path)) != 0) {
    free(data);
    return rc;
  }
  size_t lead = 0;
  while (lead < len && (data[lead] == ' ' || data[lead] == '\n' || data[lead] == '\t'))
    lead++;
  if (lead < len && data[lead] == '{') {
    /* JSON: an AI result (job, result, study) for on_result, else a study
     * context for on_study */
    json_t *doc = json_loadb(data, len, 0, NULL);
    bool is_result = json_object_get(doc, "job") && json_object_get(doc, "result");
    json_decref(doc);
    rr_script_input_t in = {data, len, "script-test", path};
    rc = rr_script_run_json(s, is_result ? "on_result" : "on_study", &in, r);
    free(data);
    return rc;
  }
  /* LF or CRLF samples are read as CR-terminated segments, as on the wire. */
  for (size_t i = 0; i < len; i++)
    if (data[i] == '\n')
      data[i] = '\r';
  rr_script_input_t in = {data, len, "script-test", path};
  rc = rr_script_run(s, &in, r);
  free(data);
  return rc;
}

static int run_cases(rr_script_t *s, const char *dir, bool update) {
  DIR *d = opendir(dir);
  if (!d) {
    fprintf(stderr, "radrelay script: cannot open %s\n", dir);
    return 1;
  }
  char *names[1024];
  size_t n = 0;
  struct dirent *e;
  while ((e = readdir(d)) && n < 1024) {
    size_t l = strlen(e->d_name);
    if ((l > 4 && strcmp(e->d_name + l - 4, ".hl7") == 0) ||
        (l > 6 && strcmp(e->d_name + l - 6, ".study") == 0))
      names[n++] = strdup(e->d_name);
  }
  closedir(d);
  qsort(names, n, sizeof *names, cmp_name);
  int failed = 0, passed = 0;
  for (size_t i = 0; i < n; i++) {
    char in[PATH_MAX], want[PATH_MAX];
    snprintf(in, sizeof in, "%s/%s", dir, names[i]);
    const char *dot = strrchr(names[i], '.');
    snprintf(want, sizeof want, "%s/%.*s.json", dir, (int)(dot - names[i]), names[i]);
    rr_script_result_t r;
    if (run_file(s, in, &r) != 0) {
      failed++;
      continue;
    }
    json_t *got = result_json(&r, false);
    if (update) {
      json_dump_file(got, want, JSON_INDENT(2) | JSON_SORT_KEYS);
      printf("wrote %s\n", want);
      passed++;
    } else {
      json_error_t je;
      json_t *exp = json_load_file(want, 0, &je);
      if (!exp) {
        printf("FAIL %s: no expected output %s (%s)\n", names[i], want, je.text);
        failed++;
      } else if (!json_equal(exp, got)) {
        char *g = json_dumps(got, JSON_INDENT(2) | JSON_SORT_KEYS);
        printf("FAIL %s: differs from %s; got:\n%s\n", names[i], want, g ? g : "?");
        free(g);
        failed++;
      } else {
        printf("ok   %s\n", names[i]);
        passed++;
      }
      json_decref(exp);
    }
    json_decref(got);
    rr_script_result_close(&r);
  }
  for (size_t i = 0; i < n; i++)
    free(names[i]);
  printf("%d passed, %d failed\n", passed, failed);
  return failed || n == 0 ? 1 : 0;
}

int rr_cmd_script(int argc, char **argv) {
  if (argc < 1 || strcmp(argv[0], "test") != 0) {
    fprintf(stderr,
            "usage: radrelay script test [--channels DIR] [--json] CHANNEL SAMPLE.hl7...\n"
            "       radrelay script test [--channels DIR] CHANNEL --cases DIR [--update]\n");
    return 2;
  }
  const char *chdir_ = "channels", *cases = NULL, *channel = NULL;
  bool as_json = false, update = false;
  char **samples = calloc((size_t)argc, sizeof *samples);
  int nsamples = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--channels") == 0 && i + 1 < argc)
      chdir_ = argv[++i];
    else if (strcmp(argv[i], "--cases") == 0 && i + 1 < argc)
      cases = argv[++i];
    else if (strcmp(argv[i], "--json") == 0)
      as_json = true;
    else if (strcmp(argv[i], "--update") == 0)
      update = true;
    else if (!channel)
      channel = argv[i];
    else
      samples[nsamples++] = argv[i];
  }
  int status = 2;
  char script[PATH_MAX], name[256], lib[PATH_MAX];
  rr_script_t *s = NULL;
  if (!channel || (!cases && nsamples == 0)) {
    fprintf(stderr, "radrelay script test: a channel and samples (or --cases DIR) are needed\n");
    goto out;
  }
  status = 1;
  if (resolve(channel, chdir_, script, sizeof script, name, sizeof name, lib, sizeof lib))
    goto out;
  rr_script_config_t cfg;
  rr_script_config_default(&cfg);
  cfg.channel = name;
  cfg.path = script;
  cfg.lib_dir = lib;
  g_kv = json_object();
  g_orders = json_object();
  g_kept = json_array();
  g_ai = json_array();
  g_verdicts = json_array();
  cfg.kv = (rr_script_kv_t){NULL, mem_get, mem_set};
  cfg.orders = (rr_script_orders_t){NULL, mem_order_keep, mem_order_get};
  cfg.ai = (rr_script_ai_t){NULL, mem_findings, mem_verdict};
  cfg.fixed_now = 1767225600; /* 2026-01-01T00:00:00Z: cases give the same output every run */
  rr_buf_t err;
  rr_buf_init(&err, 1 << 16);
  int rc = rr_script_load(&cfg, &s, &err);
  if (rc) {
    fprintf(stderr, "radrelay script: %s\n", err.data ? err.data : rr_strerror(rc));
    rr_buf_close(&err);
    goto out;
  }
  rr_buf_close(&err);
  if (cases) {
    status = run_cases(s, cases, update);
    goto out;
  }
  status = 0;
  for (int i = 0; i < nsamples; i++) {
    rr_script_result_t r;
    if (run_file(s, samples[i], &r) != 0) {
      status = 1;
      continue;
    }
    if (as_json) {
      json_t *o = result_json(&r, true);
      json_object_set_new(o, "sample", json_string(samples[i]));
      char *t = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS);
      printf("%s\n", t ? t : "{}");
      free(t);
      json_decref(o);
    } else {
      print_text(samples[i], &r);
    }
    if (r.verdict == RR_SCRIPT_ERROR)
      status = 1;
    rr_script_result_close(&r);
  }
out:
  rr_script_free(s);
  json_decref(g_kv);
  json_decref(g_orders);
  json_decref(g_kept);
  json_decref(g_ai);
  json_decref(g_verdicts);
  g_kv = g_orders = g_kept = g_ai = g_verdicts = NULL;
  free(samples);
  return status;
}

/* Unit tests of the script host (engine/script).
 * argv[1] = tests/data/scripts, argv[2] = tests/data/hl7. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"
#include "core/log.h"
#include "rr_test.h"
#include "script/script.h"

static const char *g_scripts;
static const char *g_hl7;
static char *g_adt;
static size_t g_adt_len;

static char *slurp(const char *dir, const char *name, size_t *len) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path);
    exit(2);
  }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *d = malloc((size_t)n + 1);
  size_t got = fread(d, 1, (size_t)n, f);
  fclose(f);
  d[got] = '\0';
  *len = got;
  return d;
}

static rr_script_ai_t g_ai_host; /* the AI store scripts get (none by default) */

typedef struct opts {
  size_t max_memory;
  uint64_t max_instructions;
  bool lib;
} opts_t;

/* Loads scripts/<name>; NULL on failure (err printed). */
static rr_script_t *load_with(const char *name, const opts_t *o, int *rc_out, rr_buf_t *err_out) {
  char path[1024], lib[1024], data[1024];
  snprintf(path, sizeof path, "%s/%s", g_scripts, name);
  snprintf(lib, sizeof lib, "%s/lib", g_scripts);
  snprintf(data, sizeof data, "%s/data", g_scripts);
  rr_script_config_t c;
  rr_script_config_default(&c);
  c.channel = "adt-in";
  c.path = path;
  c.data_dir = data;
  if (!o || o->lib)
    c.lib_dir = lib;
  if (o && o->max_memory)
    c.max_memory = o->max_memory;
  if (o && o->max_instructions)
    c.max_instructions = o->max_instructions;
  c.ai = g_ai_host;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  rr_script_t *s = NULL;
  int rc = rr_script_load(&c, &s, &err);
  if (rc_out)
    *rc_out = rc;
  if (err_out)
    rr_buf_append(err_out, err.data ? err.data : "", err.len);
  else if (rc)
    fprintf(stderr, "load %s: %s (%s)\n", name, rr_strerror(rc), err.data ? err.data : "");
  rr_buf_close(&err);
  return s;
}

static rr_script_t *load(const char *name) {
  return load_with(name, NULL, NULL, NULL);
}

static int run(rr_script_t *s, const char *id, rr_script_result_t *r) {
  rr_script_input_t in = {g_adt, g_adt_len, "10.0.0.7:4123", id};
  return rr_script_run(s, &in, r);
}

static bool contains(const char *hay, const char *needle) {
  return hay && strstr(hay, needle) != NULL;
}

static bool ends_with(const char *s, const char *suffix) {
  size_t a = strlen(s), b = strlen(suffix);
  return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* ---- API ---------------------------------------------------------------- */

static void test_api(void) {
  rr_script_t *s = load("api.lua");
  CHECK(s != NULL);
  if (!s)
    return;
  rr_script_result_t r;
  CHECK_EQ_INT(run(s, "M-1", &r), 0);
  if (r.verdict != RR_SCRIPT_PASS)
    fprintf(stderr, "api.lua: %s\n", r.reason);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK_EQ_INT(r.nroutes, 1);
  if (r.nroutes == 1) {
    const char *p = r.routes[0].payload;
    CHECK(!r.routes[0].is_hl7);
    CHECK(strcmp(r.routes[0].destination, "report") == 0);
    static const char *const want[] = {
        "\"started\":true",
        "\"channel\":\"adt-in\"",
        "\"peer\":\"10.0.0.7:4123\"",
        "\"message_id\":\"M-1\"",
        "\"type\":\"ADT^A01\"",
        "\"family\":\"ZZTEST\"",
        "\"given\":\"ALPHA\"",
        "\"mrn\":\"MRN00012345\"",
        "\"ssn\":\"999000111\"",
        "\"reps\":2",
        "\"reps_empty\":0",
        "\"reps_missing_seg\":0",
        "\"empty\":\"\"",
        "\"missing_is_nil\":true",
        "\"missing_index_is_nil\":true",
        "\"raw_pid3\":\"MRN00012345^^^RADRELAY_TEST_HOSP&1.3.6.1.4.1.99999.1&ISO^MR\"",
        "\"not_a_path\":true",
        "\"pid_count\":1",
        "\"nseg\":9",
        "\"names\":\"MSH,EVN,PID,PD1,NK1,PV1,PV2,AL1,DG1\"",
        "\"after_set\":\"O'BRIEN|^&\"",
        "\"after_set_raw\":\"O'BRIEN\\\\F\\\\\\\\S\\\\\\\\T\\\\\"",
        "\"zpi\":\"ZPI|42|^^1.5\"",
        "\"zpi_after_delete\":\"ZPI|42\"",
        "\"pv2_gone\":true",
        "\"second\":\"inserted\"",
        "\"zin_removed\":true",
        "\"last\":\"ZAD\"",
        "\"m2_obx5\":\"hello&world\"",
        "\"m2_type\":\"ORU^R01\"",
        "\"bad_is_nil\":true",
        "\"bad_err\":\"string\"",
        "\"new_text\":\"MSH|^~\\\\&|||||||ACK|||2.5.1\\rMSA|AA\\r\"",
        "\"new_tostring\":true",
        "\"clone_independent\":true",
        "\"ts\":1710487800",
        "\"ts_utc\":1710487800",
        "\"ts_day\":1710460800",
        "\"ts_frac\":1710487800.5",
        "\"ts_bad\":true",
        "\"fmt\":\"20240315073000\"",
        "\"fmt_off\":\"20240315083000+0100\"",
        "\"now_len\":19",
        "\"json_null\":true",
        "\"json_s\":\"x\xc3\xa9\"",
        "\"json_roundtrip\":\"{\\\"a\\\":[1,2,{\\\"b\\\":null}],\\\"e\\\":[],\\\"f\\\":1.5,"
        "\\\"s\\\":\\\"x\xc3\xa9\\\",\\\"t\\\":true}\"",
        "\"json_bad\":\"line 1 column",
        "\"json_empty_obj\":\"{}\"",
        "\"json_empty_arr\":\"[]\"",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
      if (!contains(p, want[i])) {
        fprintf(stderr, "api.lua report lacks %s\n  in %s\n", want[i], p ? p : "(null)");
        CHECK(contains(p, want[i]));
      }
    }
    CHECK(!contains(p, "parse_err"));
  }
  CHECK_EQ_INT(r.nlogs, 1);
  if (r.nlogs == 1) {
    CHECK_EQ_INT(r.logs[0].level, RR_LOG_INFO);
    CHECK(strcmp(r.logs[0].text, "done\t1\ttrue") == 0);
  }
  CHECK(r.instructions > 0 || r.elapsed_ns > 0);
  rr_script_result_close(&r);
  /* the input message object is reused: a second run sees the new input */
  CHECK_EQ_INT(run(s, "M-2", &r), 0);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK(r.nroutes == 1 && contains(r.routes[0].payload, "\"family\":\"ZZTEST\""));
  rr_script_result_close(&r);
  rr_script_free(s);
}

static void test_verdicts(void) {
  rr_script_t *s = load("verdict.lua");
  CHECK(s != NULL);
  if (!s)
    return;
  rr_script_result_t r;

  run(s, "filter", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_FILTERED);
  CHECK(strcmp(r.reason, "test message") == 0);
  CHECK_EQ_INT(r.nroutes, 0); /* the earlier route is dropped */
  rr_script_result_close(&r);

  run(s, "reject", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_REJECTED);
  CHECK(strcmp(r.reason, "unsupported: ADT^A01") == 0);
  rr_script_result_close(&r);

  run(s, "route_after_filter", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
  CHECK(contains(r.reason, "verdict.lua:12: ctx:route after ctx:filter"));
  CHECK_EQ_INT(r.nroutes, 0);
  rr_script_result_close(&r);

  run(s, "log", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK_EQ_INT(r.nroutes, 0);
  CHECK_EQ_INT(r.nlogs, 5);
  if (r.nlogs == 5) {
    CHECK(r.logs[0].level == RR_LOG_DEBUG && strcmp(r.logs[0].text, "d\t1") == 0);
    CHECK(r.logs[1].level == RR_LOG_INFO && strcmp(r.logs[1].text, "i\tnil\t2.5") == 0);
    CHECK(r.logs[2].level == RR_LOG_WARN && strcmp(r.logs[2].text, "w") == 0);
    CHECK(r.logs[3].level == RR_LOG_ERROR && strcmp(r.logs[3].text, "e") == 0);
    CHECK(r.logs[4].level == RR_LOG_INFO && strcmp(r.logs[4].text, "p\tq") == 0);
  }
  rr_script_result_close(&r);

  run(s, "badlevel", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
  if (!contains(r.reason, "verdict.lua:21: bad argument #1 to 'log' (level must be"))
    fprintf(stderr, "badlevel: %s\n", r.reason);
  CHECK(contains(r.reason, "verdict.lua:21: bad argument #1 to 'log' (level must be"));
  rr_script_result_close(&r);

  /* routes are snapshots: later edits do not change what was routed */
  run(s, "snapshot", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK_EQ_INT(r.nroutes, 4);
  if (r.nroutes == 4) {
    CHECK(strcmp(r.routes[0].destination, "a") == 0 && r.routes[0].is_hl7);
    CHECK(contains(r.routes[0].payload, "|FIRST^ALPHA"));
    CHECK(contains(r.routes[1].payload, "|SECOND^ALPHA"));
    CHECK(r.routes[0].len == strlen(r.routes[0].payload));
    CHECK(r.routes[0].payload[r.routes[0].len - 1] == '\r');
    CHECK(strcmp(r.routes[2].payload, "plain text") == 0 && !r.routes[2].is_hl7);
    CHECK(strcmp(r.routes[3].payload, "{\"id\":\"RRT-ADT-0001\",\"list\":[1,2]}") == 0);
    CHECK(!r.routes[3].is_hl7);
  }
  rr_script_result_close(&r);

  run(s, "error_object", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
  CHECK(contains(r.reason, "verdict.lua:31: (error object is a table value)"));
  rr_script_result_close(&r);

  run(s, "error_level0", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
  CHECK(contains(r.reason, "verdict.lua:33: no position"));
  rr_script_result_close(&r);

  run(s, "other", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK_EQ_INT(r.nroutes, 1);
  CHECK(r.nroutes == 1 && r.routes[0].len == g_adt_len);
  rr_script_result_close(&r);

  /* an unparseable input */
  rr_script_input_t in = {"garbage", 7, NULL, NULL};
  CHECK_EQ_INT(rr_script_run(s, &in, &r), 0);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
  CHECK(contains(r.reason, "message does not parse"));
  rr_script_result_close(&r);
  rr_script_free(s);
}

static void test_errors(void) {
  rr_script_result_t r;
  rr_script_t *s = load("error_pos.lua");
  CHECK(s != NULL);
  if (s) {
    run(s, "x", &r);
    CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
    CHECK(ends_with(r.reason, "error_pos.lua:9: boom"));
    rr_script_result_close(&r);
    run(s, "nil_index", &r);
    CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
    CHECK(contains(r.reason, "error_pos.lua:2: attempt to index a nil value"));
    rr_script_result_close(&r);
    rr_script_free(s);
  }

  static const struct {
    const char *file, *want;
  } bad[] = {
      {"syntax_error.lua", "syntax_error.lua:3: unexpected symbol near 'end'"},
      {"runtime_error_top.lua", "runtime_error_top.lua:2: attempt to index a nil value"},
      {"start_error.lua", "start_error.lua:2: cannot start"},
      {"does_not_exist.lua", "does_not_exist.lua: No such file or directory"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    rr_buf_t err;
    rr_buf_init(&err, 4096);
    int rc = 0;
    s = load_with(bad[i].file, NULL, &rc, &err);
    CHECK(s == NULL);
    CHECK(rc == (i == 3 ? -ENOENT : RR_EINVAL));
    if (!contains(err.data, bad[i].want))
      fprintf(stderr, "%s: got '%s'\n", bad[i].file, err.data ? err.data : "");
    CHECK(contains(err.data, bad[i].want));
    rr_buf_close(&err);
    rr_script_free(s);
  }

  s = load("no_on_message.lua");
  CHECK(s != NULL);
  if (s) {
    run(s, "x", &r);
    CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
    CHECK(contains(r.reason, "on_message is not defined"));
    rr_script_result_close(&r);
    rr_script_free(s);
  }
}

/* ---- ai.findings / ai.verdict: a fake AI store ---------------------------- */

static char g_ai_calls[1024];

static int fake_findings(void *ud, const char *accession, const char *study_uid, rr_buf_t *out) {
  (void)ud;
  size_t n = strlen(g_ai_calls);
  snprintf(g_ai_calls + n, sizeof g_ai_calls - n, "findings(%s,%s) ", accession ? accession : "nil",
           study_uid ? study_uid : "nil");
  if (accession && strcmp(accession, "ACC1") == 0)
    return rr_buf_puts(out, "[{\"job_id\":\"AJ-1\",\"finding_id\":\"F1\","
                            "\"code\":{\"code\":\"1386000\"},\"critical\":true}]");
  return rr_buf_puts(out, "[]");
}

static int fake_verdict(void *ud, const rr_script_ai_verdict_t *v, const char **outcome,
                        rr_buf_t *err) {
  (void)ud;
  if (strcmp(v->finding_id, "F1") != 0) {
    rr_buf_printf(err, "AI job %s has no finding \"%s\"", v->job_id, v->finding_id);
    return RR_ENOTFOUND;
  }
  size_t n = strlen(g_ai_calls);
  snprintf(g_ai_calls + n, sizeof g_ai_calls - n, "verdict(%s,%s,%s,%s,%s,%s) ", v->job_id,
           v->finding_id, v->verdict, v->by ? v->by : "nil", v->note ? v->note : "nil",
           v->report ? v->report : "nil");
  *outcome = v->by ? "recorded" : "replaced";
  return 0;
}

static void test_ai(void) {
  rr_script_result_t r;
  /* a channel without an AI store */
  rr_script_t *s = load("ai.lua");
  CHECK(s != NULL);
  if (s) {
    run(s, "findings", &r);
    CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
    CHECK(contains(r.reason, "ai.findings: this channel has no AI store"));
    rr_script_result_close(&r);
    rr_script_free(s);
  }
  g_ai_host = (rr_script_ai_t){NULL, fake_findings, fake_verdict};
  s = load("ai.lua");
  g_ai_host = (rr_script_ai_t){0};
  CHECK(s != NULL);
  if (!s)
    return;
  g_ai_calls[0] = '\0';
  run(s, "findings", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK_EQ_INT(r.nlogs, 2);
  if (r.nlogs == 2) {
    CHECK(strcmp(r.logs[0].text, "1\tAJ-1\t1386000\ttrue") == 0);
    CHECK(strcmp(r.logs[1].text, "0\t0") == 0);
  }
  /* "" and json.null are absent */
  CHECK(strcmp(g_ai_calls, "findings(ACC1,nil) findings(ACC404,nil) findings(nil,2.25.9) ") == 0);
  rr_script_result_close(&r);
  g_ai_calls[0] = '\0';
  run(s, "verdict", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK(strcmp(g_ai_calls, "verdict(AJ-1,F1,confirmed,RAD1,impression,RRT-ADT-0001) "
                           "verdict(AJ-1,F1,overridden,nil,nil,nil) ") == 0 ||
        (fprintf(stderr, "calls: %s\n", g_ai_calls), false));
  CHECK(r.nlogs == 2 && strcmp(r.logs[0].text, "recorded") == 0 &&
        strcmp(r.logs[1].text, "replaced") == 0);
  rr_script_result_close(&r);
  static const struct {
    const char *id, *want;
  } bad[] = {
      {"unknown", "ai.verdict: AI job AJ-1 has no finding \"F9\""},
      {"bad_verdict", "ai.verdict: the verdict is \"confirmed\" or \"overridden\", not \"maybe\""},
      {"bad_option", "ai.verdict: options are by, note and report (got radiologist)"},
      {"no_query", "ai.findings: give an accession or a study_uid"},
      {"no_ids", "ai.verdict: a job id and a finding id are needed"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    run(s, bad[i].id, &r);
    CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
    if (!contains(r.reason, bad[i].want))
      fprintf(stderr, "%s: got '%s'\n", bad[i].id, r.reason);
    CHECK(contains(r.reason, bad[i].want) && contains(r.reason, "ai.lua:"));
    rr_script_result_close(&r);
  }
  rr_script_free(s);
}

static void test_lookup_require(void) {
  rr_script_t *s = load("lookup.lua");
  CHECK(s != NULL);
  if (!s)
    return;
  rr_script_result_t r;
  run(s, "csv", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK(r.nroutes == 1 &&
        strcmp(r.routes[0].payload,
               "{\"cached\":true,\"missing\":\"\",\"modality\":\"CR\","
               "\"name\":\"Chest X-ray, 2 views\",\"quoted\":\"CT \\\"head\\\"\"}") == 0);
  if (r.nroutes == 1)
    printf("  csv lookup: %s\n", r.routes[0].payload);
  else
    fprintf(stderr, "csv: %s\n", r.reason);
  rr_script_result_close(&r);
  run(s, "json", &r);
  CHECK(r.nroutes == 1 && strcmp(r.routes[0].payload, "{\"ae\":\"PACS2\",\"n\":2}") == 0);
  rr_script_result_close(&r);
  static const char *const refused[] = {"slash", "dotdot", "abs", "ext"};
  for (size_t i = 0; i < 4; i++) {
    run(s, refused[i], &r);
    CHECK_EQ_INT(r.verdict, RR_SCRIPT_ERROR);
    CHECK(contains(r.reason, "lookup.load: "));
    rr_script_result_close(&r);
  }
  rr_script_free(s);

  s = load("require_ok.lua");
  CHECK(s != NULL);
  if (s) {
    run(s, "x", &r);
    CHECK(r.nroutes == 1 && strcmp(r.routes[0].payload, "ZZTEST!true") == 0);
    rr_script_result_close(&r);
    rr_script_free(s);
  }
  /* without lib_dir, require finds nothing */
  opts_t o = {0, 0, false};
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  int rc;
  s = load_with("require_ok.lua", &o, &rc, &err);
  CHECK(s == NULL && rc == RR_EINVAL && contains(err.data, "no lib_dir"));
  rr_buf_close(&err);
}

/* ---- isolation ---------------------------------------------------------- */

static void test_isolation(void) {
  rr_script_t *a = load("globals.lua"), *b = load("globals.lua");
  CHECK(a && b);
  if (!a || !b) {
    rr_script_free(a);
    rr_script_free(b);
    return;
  }
  rr_script_result_t r;
  for (int i = 0; i < 3; i++) {
    run(a, "x", &r);
    rr_script_result_close(&r);
  }
  run(a, "tamper", &r); /* counter = 4, then _G gets a hostile metatable */
  CHECK(r.nroutes == 1 && strcmp(r.routes[0].payload, "4") == 0);
  rr_script_result_close(&r);
  run(b, "x", &r); /* b has its own globals */
  CHECK(r.nroutes == 1 && strcmp(r.routes[0].payload, "1") == 0);
  rr_script_result_close(&r);
  /* the hostile _G metatable does not stop the engine from calling a */
  run(a, "x", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK(r.nroutes == 1 && strcmp(r.routes[0].payload, "5") == 0);
  rr_script_result_close(&r);
  rr_script_free(a);
  rr_script_free(b);
}

/* ---- sandbox escapes ---------------------------------------------------- */

enum { E_ERROR, E_PASS, E_ANY };

static void test_escapes(void) {
  static const struct {
    const char *name;
    int expect;
    const char *reason; /* substring of the reason, or of the route payload for E_PASS */
  } cases[] = {
      {"dump", E_ERROR, "attempt to call a nil value (field 'dump')"},
      {"dump_method", E_ERROR, "attempt to call a nil value (field 'dump')"},
      {"load_bytecode", E_ERROR, "binary chunk"},
      {"load_env", E_PASS, "ok"},
      {"io", E_ERROR, "global 'io'"},
      {"os_execute", E_ERROR, "field 'execute'"},
      {"os_exit", E_ERROR, "field 'exit'"},
      {"os_getenv", E_ERROR, "field 'getenv'"},
      {"debug", E_ERROR, "global 'debug'"},
      {"loadlib", E_ERROR, "global 'package'"},
      {"require_c", E_ERROR, "not found in lib_dir"},
      {"require_path", E_ERROR, "bad module name"},
      {"require_dots", E_ERROR, "bad module name"},
      {"dofile", E_ERROR, "global 'dofile'"},
      {"loadfile", E_ERROR, "global 'loadfile'"},
      {"setmetatable_G", E_PASS, "tampered"},
      {"string_mt", E_ERROR, "attempt to index a boolean value"},
      {"string_lib", E_PASS, "broke string"},
      {"string_rep", E_ERROR, "resulting string too large"},
      {"string_rep_1g", E_ERROR, "not enough memory"},
      {"string_rep_sep", E_ERROR, "not enough memory"},
      {"infinite_loop", E_ERROR, "escape_infinite_loop.lua:4: instruction budget exceeded"},
      {"pcall_loop", E_ERROR, "instruction budget exceeded"},
      {"coroutine_loop", E_ERROR, "instruction budget exceeded"},
      {"recursion", E_ERROR, ""}, /* stack overflow or memory, whichever comes first */
      {"c_recursion", E_ERROR, "stack overflow"},
      {"gsub_recursion", E_ERROR, "stack overflow"},
      {"coroutine_flood", E_ERROR, "not enough memory"},
      {"unpack", E_ERROR, "too many results to unpack"},
      {"collectgarbage", E_ERROR, "invalid option 'stop'"},
      {"memory_table", E_ERROR, "not enough memory"},
      {"memory_pcall", E_PASS, "caught: not enough memory"},
      {"finalizer", E_ERROR, "__gc metamethods are not allowed"},
      {"finalizer_late", E_ANY, ""},
      {"hl7_parse_flood", E_ERROR, "not enough memory"},
      {"set_flood", E_ERROR, "not enough memory"},
      {"route_flood", E_ERROR, "too many routes"},
      {"json_cycle", E_ERROR, "nesting deeper than"},
      {"msg_metatable", E_ERROR, "bad argument #1 to 'setmetatable'"},
      {"ctx_metatable", E_ERROR, "attempt to index a userdata value"},
      {"registry_via_load", E_PASS, "nothing reachable"},
  };
  const size_t cap = (size_t)32 << 20;
  opts_t o = {cap, 5000000, true};
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    char file[128];
    snprintf(file, sizeof file, "escape_%s.lua", cases[i].name);
    rr_script_t *s = load_with(file, &o, NULL, NULL);
    CHECK(s != NULL);
    if (!s)
      continue;
    rr_script_result_t r;
    run(s, "normal", &r);
    CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
    rr_script_result_close(&r);
    rr_script_collect(s);
    size_t base = rr_script_memory(s);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK_EQ_INT(run(s, "escape", &r), 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    bool ok;
    if (cases[i].expect == E_ERROR)
      ok = r.verdict == RR_SCRIPT_ERROR && contains(r.reason, cases[i].reason) && r.nroutes == 0;
    else if (cases[i].expect == E_PASS)
      ok = r.verdict == RR_SCRIPT_PASS && r.nroutes >= 1 &&
           contains(r.routes[0].payload, cases[i].reason);
    else
      ok = r.verdict == RR_SCRIPT_PASS || r.verdict == RR_SCRIPT_ERROR;
    printf("  escape_%-18s %-6s %7.1f ms  %s\n", cases[i].name,
           r.verdict == RR_SCRIPT_ERROR ? "error" : "pass", ms, r.reason);
    if (!ok)
      fprintf(stderr, "escape_%s: unexpected verdict %d reason '%s'\n", cases[i].name,
              (int)r.verdict, r.reason);
    CHECK(ok);
    CHECK(rr_script_memory(s) <= cap);
    rr_script_result_close(&r);

    /* the same state still works, and its memory is back near where it was */
    run(s, "normal", &r);
    if (r.verdict != RR_SCRIPT_PASS)
      fprintf(stderr, "escape_%s: state unusable after: %s\n", cases[i].name, r.reason);
    CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
    CHECK(r.nroutes == 1 && r.routes[0].len == g_adt_len);
    rr_script_result_close(&r);
    rr_script_collect(s);
    size_t after = rr_script_memory(s);
    if (after > base + ((size_t)2 << 20))
      fprintf(stderr, "escape_%s: memory %zu -> %zu\n", cases[i].name, base, after);
    CHECK(after <= base + ((size_t)2 << 20));
    rr_script_free(s);

    /* and a fresh state of the same script starts clean */
    s = load_with(file, &o, NULL, NULL);
    CHECK(s != NULL);
    if (s) {
      run(s, "normal", &r);
      CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
      rr_script_result_close(&r);
      rr_script_free(s);
    }
  }
}

/* The memory cap holds for a tiny cap, and loading under a too-small cap
 * fails cleanly. */
static void test_small_cap(void) {
  opts_t o = {(size_t)16 << 10, 0, true};
  int rc = 0;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  rr_script_t *s = load_with("mapping.lua", &o, &rc, &err);
  CHECK(s == NULL);
  CHECK(rc == RR_EINVAL || rc == RR_ENOMEM);
  CHECK(contains(err.data, "not enough memory"));
  rr_buf_close(&err);
  rr_script_free(s);
}

/* ---- performance -------------------------------------------------------- */

static void test_perf(void) {
  rr_script_t *s = load("mapping.lua");
  CHECK(s != NULL);
  if (!s)
    return;
  rr_script_result_t r;
  run(s, "1", &r);
  CHECK_EQ_INT(r.verdict, RR_SCRIPT_PASS);
  CHECK(r.nroutes == 1 && contains(r.routes[0].payload, "|H MRN00012345"
                                                        "") == false);
  CHECK(r.nroutes == 1 && contains(r.routes[0].payload, "|HMRN00012345^^^"));
  CHECK(r.nroutes == 1 && contains(r.routes[0].payload, "MSH|^~\\&|RADRELAY|HOSP1|PACS|RAD|"));
  CHECK(r.nroutes == 1 && !contains(r.routes[0].payload, "PV2|"));
  rr_script_result_close(&r);
  const char *n = getenv("RR_SCRIPT_BENCH_N");
  long iters = n ? strtol(n, NULL, 10) : 20000;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long i = 0; i < iters; i++) {
    run(s, "x", &r);
    rr_script_result_close(&r);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double us = ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / 1e3 /
              (double)iters;
  printf("  mapping.lua on adt_a01.hl7 (%zu bytes): %.2f us/message over %ld messages, "
         "state %zu KiB\n",
         g_adt_len, us, iters, rr_script_memory(s) >> 10);
  rr_script_free(s);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: test_script SCRIPTS_DIR HL7_DIR\n");
    return 2;
  }
  g_scripts = argv[1];
  g_hl7 = argv[2];
  g_adt = slurp(g_hl7, "adt_a01.hl7", &g_adt_len);
  RUN(test_api);
  RUN(test_verdicts);
  RUN(test_errors);
  RUN(test_ai);
  RUN(test_lookup_require);
  RUN(test_isolation);
  RUN(test_escapes);
  RUN(test_small_cap);
  RUN(test_perf);
  free(g_adt);
  return TEST_SUMMARY();
}

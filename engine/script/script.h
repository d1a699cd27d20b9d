/* radrelay channel scripts: Lua 5.4, one sandboxed state per channel.
 *
 * A script defines on_message(msg, ctx) and may define on_start() and
 * on_stop(). rr_script_run calls on_message for one inbound message and
 * collects what the script decided: routes, a filter or reject verdict, log
 * lines. It has no side effects outside the state: nothing is sent or
 * stored here, so the same call serves the engine and `radrelay script
 * test`.
 *
 * Sandbox: no io, no os beyond os.time/os.date/os.clock/os.difftime, no
 * debug, no string.dump, no loading of bytecode (load/loadfile/dofile
 * refuse binary chunks or are absent), require only from lib_dir. A memory
 * cap per state (custom allocator) and an instruction budget per message
 * (count hook): exceeding either ends the call with RR_SCRIPT_ERROR, the
 * state stays usable for the next message. Lua is entered only through
 * lua_pcall; no Lua error crosses an engine frame.
 *
 * Threading: a script object is used by one thread at a time (the channel's
 * loop thread). */
#ifndef RR_SCRIPT_H
#define RR_SCRIPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"

typedef struct rr_script rr_script_t;

/* A key-value store for enrichment (store.get/set/delete in scripts).
 * get appends the value to out and returns 0, RR_ENOTFOUND when the key is
 * absent; set with value NULL removes the key. Called on the script's
 * thread during a call. */
typedef struct rr_script_kv {
  void *ud;
  int (*get)(void *ud, const char *key, rr_buf_t *out);
  int (*set)(void *ud, const char *key, const char *value, size_t len);
} rr_script_kv_t;

/* The engine's order store (orders.keep/get in scripts). keep takes a JSON
 * object (an order record) and returns 0, or a negative code with a
 * sentence in err (appended) saying what is wrong with the record; get
 * appends the record of an accession number as JSON, RR_ENOTFOUND when
 * there is none. Called on the script's thread during a call. */
typedef struct rr_script_orders {
  void *ud;
  int (*keep)(void *ud, const char *json, size_t len, rr_buf_t *err);
  int (*get)(void *ud, const char *accession, rr_buf_t *out);
} rr_script_orders_t;

/* A verdict a script records (ai.verdict); strings borrowed for the call,
 * NULL when not given. */
typedef struct rr_script_ai_verdict {
  const char *job_id, *finding_id;
  const char *verdict; /* "confirmed" or "overridden" (checked) */
  const char *by, *note, *report;
} rr_script_ai_verdict_t;

/* The AI findings of studies and the radiologist's verdicts on them
 * (ai.findings/ai.verdict in scripts). findings appends a JSON array of
 * the findings of the study with this accession number and/or Study
 * Instance UID (at least one not NULL); verdict records one with the
 * message being handled and sets *outcome (static: "recorded", "replaced",
 * "unchanged"), or returns a negative code with a sentence in err
 * (appended; RR_ENOTFOUND for a job or finding that does not exist).
 * Called on the script's thread during a call. */
typedef struct rr_script_ai {
  void *ud;
  int (*findings)(void *ud, const char *accession, const char *study_uid, rr_buf_t *out);
  int (*verdict)(void *ud, const rr_script_ai_verdict_t *v, const char **outcome, rr_buf_t *err);
} rr_script_ai_t;

typedef struct rr_script_config {
  const char *channel;       /* channel name (ctx.channel, log lines); copied */
  const char *path;          /* the script file; copied */
  const char *lib_dir;       /* folder of shared modules for require; NULL = none */
  const char *data_dir;      /* folder lookup tables are read from; NULL = the script's */
  size_t max_memory;         /* bytes per state; default 64 MiB */
  uint64_t max_instructions; /* per call; default 20,000,000 */
  rr_script_kv_t kv;         /* copied; get == NULL: scripts have no store */
  rr_script_orders_t orders; /* copied; keep == NULL: scripts have no order store */
  rr_script_ai_t ai;         /* copied; findings == NULL: scripts have no AI store */
  int64_t fixed_now;         /* hl7.now() returns this Unix second (UTC) instead of the
                                clock: `radrelay script test` cases; 0 = the clock */
} rr_script_config_t;

typedef enum rr_script_verdict {
  RR_SCRIPT_PASS = 0, /* went through (zero or more routes) */
  RR_SCRIPT_FILTERED, /* ctx:filter(reason): accepted, nothing routed */
  RR_SCRIPT_REJECTED, /* ctx:reject(reason): answer AR/CR with reason in ERR */
  RR_SCRIPT_ERROR     /* the script failed: reason = "file:line: message" */
} rr_script_verdict_t;

typedef struct rr_script_route {
  char *destination; /* owned */
  char *payload;     /* owned: ER7 text (CR terminators) or JSON text */
  size_t len;
  bool is_hl7; /* false: a table routed as JSON */
  char *key;   /* owned: the per-key order key the script chose; NULL = the channel's default */
  int lane;    /* 0 routine, 1 stat, 2 critical; -1 = the channel's default */
} rr_script_route_t;

typedef struct rr_script_log {
  int level;  /* rr_log_level_t */
  char *text; /* owned */
} rr_script_log_t;

typedef struct rr_script_result {
  rr_script_verdict_t verdict;
  char reason[512];
  rr_script_route_t *routes; /* owned array */
  size_t nroutes;
  rr_script_log_t *logs; /* owned array */
  size_t nlogs;
  uint64_t instructions; /* approximate, in hook steps */
  uint64_t elapsed_ns;
} rr_script_result_t;

typedef struct rr_script_input {
  const char *data; /* the inbound message (ER7), borrowed */
  size_t len;
  const char *peer;       /* ctx.peer; may be NULL */
  const char *message_id; /* ctx.message_id (journal id or control id); may be NULL */
} rr_script_input_t;

/* rr_script_config_default: the defaults above, other fields NULL. */
void rr_script_config_default(rr_script_config_t *c);
/* rr_script_load: new state, sandbox, compiles and runs the file's top level,
 * then on_start. On failure returns RR_EINVAL (compile/run error, details
 * "file:line: message" appended to err), RR_ENOMEM or -errno. */
int rr_script_load(const rr_script_config_t *cfg, rr_script_t **out, rr_buf_t *err);
/* rr_script_free: calls on_stop (errors ignored), closes the state.
 * NULL is a no-op. */
void rr_script_free(rr_script_t *s);
/* rr_script_run: on_message(msg, ctx) for one message; fills *out (close it
 * with rr_script_result_close). Returns 0 whatever the script did (see
 * out->verdict), RR_ENOMEM when the result could not be built. */
int rr_script_run(rr_script_t *s, const rr_script_input_t *in, rr_script_result_t *out);
void rr_script_result_close(rr_script_result_t *r);
/* rr_script_run_study: on_study(study, ctx) for a study that became
 * stable: in->data is the study context (a JSON object, decoded into a
 * table); the rest as rr_script_run. A script without on_study passes with
 * no routes (see rr_script_defines). */
int rr_script_run_study(rr_script_t *s, const rr_script_input_t *in, rr_script_result_t *out);
/* rr_script_run_json: the same for global function fn (e.g. "on_result")
 * with in->data decoded as its first argument. */
int rr_script_run_json(rr_script_t *s, const char *fn, const rr_script_input_t *in,
                       rr_script_result_t *out);
/* rr_script_defines: whether the script defines global function name. */
bool rr_script_defines(rr_script_t *s, const char *name);
/* Bytes the state uses now (Lua memory plus the C memory of its messages). */
size_t rr_script_memory(const rr_script_t *s);
/* rr_script_collect: a full garbage collection of the state (finalizers run
 * under the instruction budget; their errors are ignored). For idle time
 * and tests; never needed for correctness. */
void rr_script_collect(rr_script_t *s);

#endif

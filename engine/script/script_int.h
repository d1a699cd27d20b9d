/* Private declarations of the script host. Only engine/script/ includes this. */
#ifndef RR_SCRIPT_INT_H
#define RR_SCRIPT_INT_H

#include <lauxlib.h>
#include <lua.h>

#include "core/buf.h"
#include "hl7/hl7.h"
#include "script/script.h"

/* Registry keys (addresses of these are unique light userdata keys). */
extern const char rr_script_key_msg_mt;  /* metatable of message userdata */
extern const char rr_script_key_loaded;  /* require cache */
extern const char rr_script_key_lookups; /* lookup.load cache */

/* A message userdata. The message is allocated with malloc (outside the Lua
 * allocator); what it holds is charged to the state's external bytes so the
 * memory cap covers it. */
typedef struct script_msg {
  rr_hl7_msg_t *m; /* owned; freed by __gc */
  size_t charge;   /* bytes charged to rr_script.external for this message */
} script_msg_t;

struct rr_script {
  lua_State *L;
  /* memory accounting (custom allocator) */
  size_t used;     /* bytes Lua holds */
  size_t external; /* bytes charged for C objects the state owns (messages) */
  size_t limit;
  /* instruction budget */
  uint64_t steps;     /* hook steps in this call */
  uint64_t max_steps; /* budget in hook steps */
  bool killed;        /* over budget: pcall/resume may not swallow the error */
  bool oom;           /* a C allocation for the result failed */
  /* configuration (owned copies) */
  char *channel, *path, *lib_dir, *data_dir;
  /* per-call state */
  rr_script_result_t *cur; /* the result being filled, NULL between calls */
  const rr_script_input_t *in;
  size_t route_bytes;
  size_t log_bytes;
  size_t routes_cap, logs_cap;
  script_msg_t *in_msg;      /* the input message userdata (reused) */
  int in_msg_ref;            /* registry ref keeping it alive */
  int ctx_ref;               /* the ctx userdata (reused) */
  rr_buf_t tmp;              /* scratch for decoded values */
  rr_script_kv_t kv;         /* enrichment store; kv.get NULL = none */
  rr_script_orders_t orders; /* order store; orders.keep NULL = none */
  rr_script_ai_t ai;         /* AI findings and verdicts; ai.findings NULL = none */
  int64_t fixed_now;         /* hl7.now() at this Unix second, UTC; 0 = the clock */
};

/* The script object of a state (stored in the state's extra space). */
static inline rr_script_t *script_of(lua_State *L) {
  return *(rr_script_t **)lua_getextraspace(L);
}

/* script_hl7.c: msg userdata, hl7 table. */
void script_open_hl7(lua_State *L);
/* Creates a new, empty message userdata on the stack (raises on error). */
script_msg_t *script_msg_push(lua_State *L);
script_msg_t *script_msg_check(lua_State *L, int idx);
script_msg_t *script_msg_test(lua_State *L, int idx);
/* Charges n more bytes of C memory to the state and to *acct (full GC
 * first when over the cap); raises "not enough memory" when it does not
 * fit. script_uncharge gives *acct back. */
void script_charge(lua_State *L, size_t *acct, size_t n);
void script_uncharge(lua_State *L, size_t *acct);

/* script_json.c: json table; Lua value <-> JSON text. */
void script_open_json(lua_State *L);
/* Encodes the value at idx to JSON text; returns a malloc'd string (the
 * caller frees; no Lua call may come between) or raises. */
char *script_json_encode(lua_State *L, int idx, size_t *len);
/* Decodes JSON text and pushes the value; raises on invalid JSON. */
void script_json_push_decoded(lua_State *L, const char *text, size_t len, const char *what);

/* script_lookup.c: lookup table, require. */
void script_open_lookup(lua_State *L);
int script_require(lua_State *L);

/* script_ai.c: ai table (ai.findings, ai.verdict). */
void script_open_ai(lua_State *L);

#endif

/* The ai table of channel scripts: the AI findings of a study
 * (ai.findings) and the radiologist's verdict on one (ai.verdict), through
 * the host's rr_script_ai_t. */
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "script/script_int.h"

#define AI_TEXT_MAX 256
#define AI_NOTE_MAX 4096

static rr_script_t *ai_script(lua_State *L, const char *fn) {
  rr_script_t *s = script_of(L);
  if (!s->ai.findings || !s->ai.verdict)
    luaL_error(L, "ai.%s: this channel has no AI store", fn);
  if (!s->cur)
    luaL_error(L, "ai.%s: only available while a message is handled", fn);
  return s;
}

/* The optional text at idx: a string (or number) of 1..max bytes without
 * NUL; nil, json.null and "" are absent (NULL). Raises otherwise. */
static const char *opt_text(lua_State *L, int idx, const char *fn, const char *what, size_t max) {
  int t = lua_type(L, idx);
  if (t == LUA_TNONE || t == LUA_TNIL || t == LUA_TLIGHTUSERDATA)
    return NULL;
  if (t != LUA_TSTRING && t != LUA_TNUMBER)
    luaL_error(L, "ai.%s: %s must be a string", fn, what);
  size_t len;
  const char *v = lua_tolstring(L, idx, &len);
  if (len > max || strlen(v) != len)
    luaL_error(L, "ai.%s: %s is at most %d bytes of text", fn, what, (int)max);
  return len ? v : NULL;
}

/* ai.findings{accession = ..., study_uid = ...} (or ai.findings(accession)):
 * the AI findings of the study, oldest result first: a list of tables. */
static int ai_findings(lua_State *L) {
  rr_script_t *s = ai_script(L, "findings");
  const char *acc = NULL, *uid = NULL;
  if (lua_type(L, 1) == LUA_TTABLE) {
    lua_settop(L, 1);
    lua_getfield(L, 1, "accession"); /* 2 */
    lua_getfield(L, 1, "study_uid"); /* 3 */
    acc = opt_text(L, 2, "findings", "accession", AI_TEXT_MAX);
    uid = opt_text(L, 3, "findings", "study_uid", AI_TEXT_MAX);
  } else {
    acc = opt_text(L, 1, "findings", "the accession number", AI_TEXT_MAX);
  }
  if (!acc && !uid)
    return luaL_error(L, "ai.findings: give an accession or a study_uid");
  rr_buf_reset(&s->tmp);
  int rc = s->ai.findings(s->ai.ud, acc, uid, &s->tmp);
  if (rc)
    return luaL_error(L, "ai.findings: %s", rr_strerror(rc));
  script_json_push_decoded(L, s->tmp.data ? s->tmp.data : "[]", s->tmp.data ? s->tmp.len : 2,
                           "ai.findings");
  return 1;
}

/* ai.verdict(job_id, finding_id, "confirmed" | "overridden",
 *            {by = ..., note = ..., report = ...}):
 * records the radiologist's verdict with the message being handled;
 * returns "recorded", "replaced" or "unchanged". */
static int ai_verdict(lua_State *L) {
  rr_script_t *s = ai_script(L, "verdict");
  rr_script_ai_verdict_t v = {0};
  v.job_id = opt_text(L, 1, "verdict", "the job id", AI_TEXT_MAX);
  v.finding_id = opt_text(L, 2, "verdict", "the finding id", AI_TEXT_MAX);
  if (!v.job_id || !v.finding_id)
    return luaL_error(L, "ai.verdict: a job id and a finding id are needed");
  v.verdict = luaL_checkstring(L, 3);
  if (strcmp(v.verdict, "confirmed") != 0 && strcmp(v.verdict, "overridden") != 0)
    return luaL_error(L, "ai.verdict: the verdict is \"confirmed\" or \"overridden\", not \"%s\"",
                      v.verdict);
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    lua_settop(L, 4);
    /* every key known: a misspelt option is an error, not a silent loss */
    lua_pushnil(L);
    while (lua_next(L, 4)) {
      lua_pop(L, 1);
      const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
      if (!k || (strcmp(k, "by") != 0 && strcmp(k, "note") != 0 && strcmp(k, "report") != 0))
        return luaL_error(L, "ai.verdict: options are by, note and report (got %s)",
                          k ? k : luaL_typename(L, -1));
    }
    lua_getfield(L, 4, "by");     /* 5 */
    lua_getfield(L, 4, "note");   /* 6 */
    lua_getfield(L, 4, "report"); /* 7 */
    v.by = opt_text(L, 5, "verdict", "by", AI_TEXT_MAX);
    v.note = opt_text(L, 6, "verdict", "note", AI_NOTE_MAX);
    v.report = opt_text(L, 7, "verdict", "report", AI_TEXT_MAX);
  }
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  const char *outcome = NULL;
  int rc = s->ai.verdict(s->ai.ud, &v, &outcome, &err);
  if (rc) {
    lua_pushfstring(L, "ai.verdict: %s", err.len ? err.data : rr_strerror(rc));
    rr_buf_close(&err);
    return lua_error(L);
  }
  rr_buf_close(&err);
  lua_pushstring(L, outcome ? outcome : "recorded");
  return 1;
}

void script_open_ai(lua_State *L) {
  static const luaL_Reg fns[] = {{"findings", ai_findings}, {"verdict", ai_verdict}, {NULL, NULL}};
  luaL_newlib(L, fns);
  lua_setglobal(L, "ai");
}

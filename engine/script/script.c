/* Script host: state lifecycle, sandbox, memory cap, instruction budget,
 * ctx and the per-message call. The message, JSON and lookup bindings live
 * in script_hl7.c, script_json.c and script_lookup.c.
 *
 * Every entry into Lua goes through lua_pcall of a C function ("protected
 * body"), so even the pushes that prepare a call (which may raise a memory
 * error) never run unprotected. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lualib.h>

#include "core/error.h"
#include "core/log.h"
#include "script/script_int.h"

#define HOOK_EVERY 1000 /* instructions per count hook */
#define MAX_ROUTES 10000
#define MAX_LOGS 1000
#define MAX_LOG_BYTES (1u << 20)

const char rr_script_key_msg_mt = 0;
const char rr_script_key_loaded = 0;
const char rr_script_key_lookups = 0;
static const char key_ctx_mt = 0;

/* ---- memory cap and instruction budget ---------------------------------- */

/* lua_Alloc counting bytes; refuses growth past the cap (Lua then runs an
 * emergency collection and, failing that, raises "not enough memory"). */
static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  rr_script_t *s = ud;
  if (!ptr)
    osize = 0; /* osize is then a type tag */
  if (nsize == 0) {
    free(ptr);
    s->used -= osize;
    return NULL;
  }
  if (nsize > osize) {
    size_t grow = nsize - osize;
    size_t have = s->used + s->external;
    if (have > s->limit || grow > s->limit - have)
      return NULL;
  }
  void *p = realloc(ptr, nsize);
  if (!p)
    return NULL;
  s->used = s->used - osize + nsize;
  return p;
}

static void budget_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  rr_script_t *s = script_of(L);
  if (++s->steps <= s->max_steps && !s->killed)
    return;
  s->killed = true;
  lua_Debug d;
  if (lua_getstack(L, 0, &d) && lua_getinfo(L, "Sl", &d) && d.currentline > 0)
    lua_pushfstring(L, "%s:%d: instruction budget exceeded", d.short_src, d.currentline);
  else
    lua_pushliteral(L, "instruction budget exceeded");
  lua_error(L);
}

/* Starts a call's budget: counter and hook count reset. */
static void budget_start(rr_script_t *s) {
  s->steps = 0;
  s->killed = false;
  lua_sethook(s->L, budget_hook, LUA_MASKCOUNT, HOOK_EVERY);
}

/* ---- sandboxed base functions ------------------------------------------- */

/* pcall/xpcall/coroutine.resume that cannot swallow a budget kill. */
static int finish_pcall(lua_State *L, int status, lua_KContext extra) {
  if (status != LUA_OK && status != LUA_YIELD) {
    if (script_of(L)->killed)
      return lua_error(L);
    lua_pushboolean(L, 0);
    lua_pushvalue(L, -2);
    return 2;
  }
  return lua_gettop(L) - (int)extra;
}

static int sb_pcall(lua_State *L) {
  luaL_checkany(L, 1);
  lua_pushboolean(L, 1);
  lua_insert(L, 1);
  int status = lua_pcallk(L, lua_gettop(L) - 2, LUA_MULTRET, 0, 0, finish_pcall);
  return finish_pcall(L, status, 0);
}

static int sb_xpcall(lua_State *L) {
  int n = lua_gettop(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_pushboolean(L, 1);
  lua_pushvalue(L, 1);
  lua_rotate(L, 3, 2);
  int status = lua_pcallk(L, n - 2, LUA_MULTRET, 2, 2, finish_pcall);
  return finish_pcall(L, status, 2);
}

static int sb_resume(lua_State *L) {
  /* upvalue 1: the original coroutine.resume */
  int n = lua_gettop(L);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, n, LUA_MULTRET);
  if (script_of(L)->killed && lua_gettop(L) >= 2 && !lua_toboolean(L, 1))
    return lua_error(L);
  return lua_gettop(L);
}

/* load: text chunks only ("t" forced), the env argument kept as given. */
static int sb_load(lua_State *L) {
  int n = lua_gettop(L);
  if (lua_type(L, 1) == LUA_TSTRING) {
    size_t len;
    const char *p = lua_tolstring(L, 1, &len);
    if (len > 0 && p[0] == LUA_SIGNATURE[0]) {
      luaL_pushfail(L);
      lua_pushliteral(L, "attempt to load a binary chunk (not allowed)");
      return 2;
    }
  }
  lua_pushvalue(L, lua_upvalueindex(1)); /* the original load */
  lua_pushvalue(L, 1);
  if (n >= 2)
    lua_pushvalue(L, 2);
  else
    lua_pushnil(L);
  lua_pushliteral(L, "t");
  if (n >= 4) {
    lua_pushvalue(L, 4);
    lua_call(L, 4, LUA_MULTRET);
  } else {
    lua_call(L, 3, LUA_MULTRET);
  }
  return lua_gettop(L) - n;
}

/* setmetatable refusing __gc: Lua runs finalizers with hooks off, so a
 * script finalizer could loop beyond the instruction budget. */
static int sb_setmetatable(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_type(L, 2) == LUA_TTABLE && lua_getfield(L, 2, "__gc") != LUA_TNIL)
    return luaL_error(L, "__gc metamethods are not allowed");
  lua_settop(L, 2);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, 2, 1);
  return 1;
}

static int sb_collectgarbage(lua_State *L) {
  static const char *const opts[] = {"collect", "count", "step", NULL};
  int o = luaL_checkoption(L, 1, "collect", opts);
  switch (o) {
  case 0:
    lua_gc(L, LUA_GCCOLLECT);
    lua_pushinteger(L, 0);
    return 1;
  case 1: {
    int k = lua_gc(L, LUA_GCCOUNT), b = lua_gc(L, LUA_GCCOUNTB);
    lua_pushnumber(L, (lua_Number)k + ((lua_Number)b / 1024));
    return 1;
  }
  default: {
    int step = (int)luaL_optinteger(L, 2, 0);
    lua_pushboolean(L, lua_gc(L, LUA_GCSTEP, step));
    return 1;
  }
  }
}

static void add_log(lua_State *L, int level, const char *text, size_t len);

/* Concatenates arguments from..top with tostring, tab-separated. */
static void concat_args(lua_State *L, int from, luaL_Buffer *b) {
  int n = lua_gettop(L);
  luaL_buffinit(L, b);
  for (int i = from; i <= n; i++) {
    if (i > from)
      luaL_addchar(b, '\t');
    luaL_tolstring(L, i, NULL);
    luaL_addvalue(b);
  }
  luaL_pushresult(b);
}

/* print: an info log line of the current call (dropped outside calls). */
static int sb_print(lua_State *L) {
  luaL_Buffer b;
  concat_args(L, 1, &b);
  size_t len;
  const char *t = lua_tolstring(L, -1, &len);
  add_log(L, RR_LOG_INFO, t, len);
  return 0;
}

static void set_nil(lua_State *L, int t, const char *k) {
  t = lua_absindex(L, t);
  lua_pushnil(L);
  lua_setfield(L, t, k);
}

/* Opens the allowed libraries and removes what the sandbox forbids. */
static void open_sandbox(lua_State *L) {
  static const luaL_Reg libs[] = {
      {LUA_GNAME, luaopen_base},       {LUA_COLIBNAME, luaopen_coroutine},
      {LUA_TABLIBNAME, luaopen_table}, {LUA_STRLIBNAME, luaopen_string},
      {LUA_MATHLIBNAME, luaopen_math}, {LUA_UTF8LIBNAME, luaopen_utf8},
      {LUA_OSLIBNAME, luaopen_os},     {NULL, NULL}};
  for (const luaL_Reg *l = libs; l->func; l++) {
    luaL_requiref(L, l->name, l->func, 1);
    lua_pop(L, 1);
  }
  lua_pushglobaltable(L);
  int g = lua_gettop(L);
  set_nil(L, g, "dofile");
  set_nil(L, g, "loadfile");
  set_nil(L, g, "warn");
  lua_getfield(L, g, "load");
  lua_pushcclosure(L, sb_load, 1);
  lua_setfield(L, g, "load");
  lua_getfield(L, g, "setmetatable");
  lua_pushcclosure(L, sb_setmetatable, 1);
  lua_setfield(L, g, "setmetatable");
  lua_pushcfunction(L, sb_pcall);
  lua_setfield(L, g, "pcall");
  lua_pushcfunction(L, sb_xpcall);
  lua_setfield(L, g, "xpcall");
  lua_pushcfunction(L, sb_collectgarbage);
  lua_setfield(L, g, "collectgarbage");
  lua_pushcfunction(L, sb_print);
  lua_setfield(L, g, "print");
  lua_pushcfunction(L, script_require);
  lua_setfield(L, g, "require");

  /* os: only the clock functions */
  lua_getfield(L, g, "os");
  int os = lua_gettop(L);
  lua_createtable(L, 0, 4);
  static const char *const keep[] = {"time", "date", "clock", "difftime"};
  for (size_t i = 0; i < sizeof keep / sizeof *keep; i++) {
    lua_getfield(L, os, keep[i]);
    lua_setfield(L, -2, keep[i]);
  }
  lua_setfield(L, g, "os");
  lua_pop(L, 1);

  /* string: no dump; the metatable is locked (getmetatable("") is false) */
  lua_getfield(L, g, "string");
  set_nil(L, -1, "dump");
  lua_pop(L, 1);
  lua_pushliteral(L, "");
  if (lua_getmetatable(L, -1)) {
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  /* coroutine.resume cannot swallow a budget kill */
  lua_getfield(L, g, "coroutine");
  lua_getfield(L, -1, "resume");
  lua_pushcclosure(L, sb_resume, 1);
  lua_setfield(L, -2, "resume");
  lua_pop(L, 1);

  /* package, io and debug are never opened; make sure of it */
  set_nil(L, g, "package");
  set_nil(L, g, "io");
  set_nil(L, g, "debug");
  lua_pop(L, 1);
}

/* ---- results ------------------------------------------------------------ */

static void set_reason(rr_script_result_t *r, const char *text, size_t len) {
  if (len >= sizeof r->reason)
    len = sizeof r->reason - 1;
  memcpy(r->reason, text, len);
  r->reason[len] = '\0';
}

static void drop_routes(rr_script_result_t *r) {
  for (size_t i = 0; i < r->nroutes; i++) {
    free(r->routes[i].destination);
    free(r->routes[i].payload);
    free(r->routes[i].key);
  }
  r->nroutes = 0;
}

void rr_script_result_close(rr_script_result_t *r) {
  if (!r)
    return;
  drop_routes(r);
  free(r->routes);
  for (size_t i = 0; i < r->nlogs; i++)
    free(r->logs[i].text);
  free(r->logs);
  memset(r, 0, sizeof *r);
}

static void add_log(lua_State *L, int level, const char *text, size_t len) {
  rr_script_t *s = script_of(L);
  rr_script_result_t *r = s->cur;
  if (!r || r->nlogs >= MAX_LOGS || s->log_bytes >= MAX_LOG_BYTES)
    return; /* outside a call, or over the per-call log limits: dropped */
  if (len > MAX_LOG_BYTES - s->log_bytes)
    len = MAX_LOG_BYTES - s->log_bytes;
  if (r->nlogs == s->logs_cap) {
    size_t cap = s->logs_cap ? s->logs_cap * 2 : 8;
    rr_script_log_t *nl = realloc(r->logs, cap * sizeof *nl);
    if (!nl)
      goto oom;
    r->logs = nl;
    s->logs_cap = cap;
  }
  char *t = malloc(len + 1);
  if (!t)
    goto oom;
  memcpy(t, text, len);
  t[len] = '\0';
  r->logs[r->nlogs++] = (rr_script_log_t){level, t};
  s->log_bytes += len;
  return;
oom:
  s->oom = true;
  luaL_error(L, "not enough memory");
}

/* ---- ctx ---------------------------------------------------------------- */

/* The current call, or an error when ctx is used outside on_message. */
static rr_script_result_t *ctx_call(lua_State *L) {
  rr_script_t *s = script_of(L);
  if (!s->cur)
    luaL_error(L, "ctx used outside on_message");
  return s->cur;
}

static int ctx_route(lua_State *L) {
  rr_script_t *s = script_of(L);
  rr_script_result_t *r = ctx_call(L);
  size_t dlen;
  const char *dest = luaL_checklstring(L, 2, &dlen);
  luaL_checkany(L, 3);
  if (r->verdict != RR_SCRIPT_PASS)
    return luaL_error(L, "ctx:route after ctx:%s",
                      r->verdict == RR_SCRIPT_FILTERED ? "filter" : "reject");
  if (r->nroutes >= MAX_ROUTES)
    return luaL_error(L, "too many routes (limit %d)", MAX_ROUTES);
  if (dlen == 0 || memchr(dest, '\0', dlen))
    return luaL_error(L, "ctx:route: bad destination name");
  /* Everything that may raise happens before the C allocations. */
  const char *key = NULL;
  size_t klen = 0;
  int lane = -1;
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    if (lua_getfield(L, 4, "key") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
        return luaL_error(L, "ctx:route: key must be a string");
      key = lua_tolstring(L, -1, &klen); /* stays on the stack until return */
      if (klen > 256 || memchr(key, '\0', klen))
        return luaL_error(L, "ctx:route: key longer than 256 bytes or with a NUL");
    }
    if (lua_getfield(L, 4, "priority") != LUA_TNIL) {
      const char *pr = lua_tostring(L, -1);
      if (pr && strcmp(pr, "routine") == 0)
        lane = 0;
      else if (pr && strcmp(pr, "stat") == 0)
        lane = 1;
      else if (pr && strcmp(pr, "critical") == 0)
        lane = 2;
      else
        return luaL_error(L, "ctx:route: priority must be \"routine\", \"stat\" or \"critical\"");
    }
  }
  char *payload = NULL;
  size_t plen = 0;
  bool is_hl7 = true;
  script_msg_t *sm = script_msg_test(L, 3);
  const char *str = NULL;
  if (sm) {
    rr_buf_reset(&s->tmp);
    int rc = rr_hl7_serialize(sm->m, &s->tmp);
    if (rc)
      return luaL_error(L, "ctx:route: %s", rr_strerror(rc));
    str = s->tmp.data ? s->tmp.data : "";
    plen = s->tmp.len;
  } else if (lua_type(L, 3) == LUA_TSTRING) {
    str = lua_tolstring(L, 3, &plen);
    is_hl7 = plen >= 3 && memcmp(str, "MSH", 3) == 0;
  } else if (lua_type(L, 3) == LUA_TTABLE) {
    payload = script_json_encode(L, 3, &plen); /* malloc'd; nothing raises below */
    is_hl7 = false;
  } else {
    return luaL_typeerror(L, 3, "message, table or string");
  }
  if (plen > s->limit - (s->route_bytes < s->limit ? s->route_bytes : s->limit)) {
    free(payload);
    return luaL_error(L, "routed bytes exceed the memory limit");
  }
  if (!payload) {
    payload = malloc(plen + 1);
    if (payload) {
      memcpy(payload, str, plen);
      payload[plen] = '\0';
    }
  }
  char *d = malloc(dlen + 1);
  if (d)
    memcpy(d, dest, dlen + 1);
  char *k = key ? malloc(klen + 1) : NULL;
  if (k)
    memcpy(k, key, klen + 1);
  if (payload && d && r->nroutes == s->routes_cap) {
    size_t cap = s->routes_cap ? s->routes_cap * 2 : 4;
    rr_script_route_t *nr = realloc(r->routes, cap * sizeof *nr);
    if (nr) {
      r->routes = nr;
      s->routes_cap = cap;
    }
  }
  if (!payload || !d || (key && !k) || r->nroutes == s->routes_cap) {
    free(payload);
    free(d);
    free(k);
    s->oom = true;
    return luaL_error(L, "not enough memory");
  }
  r->routes[r->nroutes++] = (rr_script_route_t){d, payload, plen, is_hl7, k, lane};
  s->route_bytes += plen;
  return 0;
}

static int ctx_verdict(lua_State *L, rr_script_verdict_t v) {
  rr_script_result_t *r = ctx_call(L);
  size_t len = 0;
  const char *reason = luaL_optlstring(L, 2, "", &len);
  if (r->verdict != RR_SCRIPT_PASS)
    return luaL_error(L, "verdict already given (ctx:%s)",
                      r->verdict == RR_SCRIPT_FILTERED ? "filter" : "reject");
  r->verdict = v;
  set_reason(r, reason, len);
  drop_routes(r); /* nothing is routed once the message is filtered or rejected */
  return 0;
}

static int ctx_filter(lua_State *L) {
  return ctx_verdict(L, RR_SCRIPT_FILTERED);
}

static int ctx_reject(lua_State *L) {
  return ctx_verdict(L, RR_SCRIPT_REJECTED);
}

static int ctx_log(lua_State *L) {
  ctx_call(L);
  const char *lv = luaL_checkstring(L, 2);
  int level = rr_log_parse_level(lv);
  if (level < 0)
    return luaL_argerror(L, 2, "level must be debug, info, warn or error");
  luaL_Buffer b;
  concat_args(L, 3, &b);
  size_t len;
  const char *t = lua_tolstring(L, -1, &len);
  add_log(L, level, t, len);
  return 0;
}

static int ctx_index(lua_State *L) {
  rr_script_t *s = script_of(L);
  const char *k = lua_tostring(L, 2);
  if (k && s->cur) {
    const char *v = NULL;
    bool known = true;
    if (strcmp(k, "channel") == 0)
      v = s->channel;
    else if (strcmp(k, "peer") == 0)
      v = s->in->peer;
    else if (strcmp(k, "message_id") == 0)
      v = s->in->message_id;
    else
      known = false;
    if (known) {
      if (v)
        lua_pushstring(L, v);
      else
        lua_pushnil(L);
      return 1;
    }
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1)); /* methods */
  return 1;
}

static int ctx_tostring(lua_State *L) {
  lua_pushfstring(L, "ctx(%s)", script_of(L)->channel);
  return 1;
}

static void open_ctx(lua_State *L, rr_script_t *s) {
  static const luaL_Reg methods[] = {{"route", ctx_route},
                                     {"filter", ctx_filter},
                                     {"reject", ctx_reject},
                                     {"log", ctx_log},
                                     {NULL, NULL}};
  lua_newuserdatauv(L, 1, 0);
  lua_createtable(L, 0, 4);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &key_ctx_mt);
  luaL_newlib(L, methods);
  lua_pushcclosure(L, ctx_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, ctx_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_setmetatable(L, -2);
  s->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* ---- errors ------------------------------------------------------------- */

/* true when msg starts with "something:123:" */
static bool has_position(const char *m) {
  const char *c = strchr(m, ':');
  if (!c || c == m)
    return false;
  for (const char *p = m; p < c; p++)
    if (*p == '\n')
      return false;
  const char *d = c + 1;
  if (*d < '0' || *d > '9')
    return false;
  while (*d >= '0' && *d <= '9')
    d++;
  return *d == ':';
}

/* Message handler: makes the error a string and puts the position of the
 * innermost Lua frame in front when the message has none. */
static int msg_handler(lua_State *L) {
  const char *m = lua_tostring(L, 1);
  if (!m) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      m = lua_tostring(L, -1);
    else
      m = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  if (has_position(m))
    return 1;
  lua_Debug d;
  for (int lv = 1; lua_getstack(L, lv, &d); lv++) {
    if (lua_getinfo(L, "Sl", &d) && d.currentline > 0) {
      lua_pushfstring(L, "%s:%d: %s", d.short_src, d.currentline, m);
      return 1;
    }
  }
  return 1;
}

/* After a failed pcall: the error text, with the file when Lua gave none
 * (memory errors skip the message handler). */
static void error_text(rr_script_t *s, int status, rr_buf_t *out) {
  const char *m = lua_tostring(s->L, -1);
  if (!m)
    m = "(error object is not a string)";
  if (status == LUA_ERRMEM || !has_position(m)) {
    const char *base = strrchr(s->path, '/');
    rr_buf_printf(out, "%s: ", base ? base + 1 : s->path);
  }
  rr_buf_puts(out, m);
}

/* Full collection after a memory error, protected (finalizers may run). */
static int gc_body(lua_State *L) {
  lua_gc(L, LUA_GCCOLLECT);
  lua_gc(L, LUA_GCCOLLECT); /* a second cycle shrinks stacks and call lists further */
  return 0;
}

static void recover(rr_script_t *s, bool always) {
  /* After a memory error (or with the state over half its cap) collect now,
   * so the next message starts with its memory back. */
  if (always || s->used + s->external > s->limit / 2) {
    lua_pushcfunction(s->L, gc_body);
    if (lua_pcall(s->L, 0, 0, 0) != LUA_OK)
      lua_pop(s->L, 1);
  }
}

/* ---- calling into the script -------------------------------------------- */

/* Protected body: calls global function `name` (if defined) with the given
 * extra arguments already on the stack below. Arguments: name (light
 * userdata string), nargs (integer), then the arguments. */
static int call_body(lua_State *L) {
  const char *name = lua_touserdata(L, 1);
  int nargs = (int)lua_tointeger(L, 2);
  bool required = lua_toboolean(L, 3);
  lua_pushcfunction(L, msg_handler);
  int h = lua_gettop(L);
  lua_pushglobaltable(L);
  lua_pushstring(L, name);
  lua_rawget(L, -2); /* no metamethods: a tampered _G cannot interfere */
  lua_remove(L, -2);
  if (lua_type(L, -1) != LUA_TFUNCTION) {
    if (!required)
      return 0;
    const char *base = strrchr(script_of(L)->path, '/');
    return luaL_error(L, "%s: %s is not defined", base ? base + 1 : script_of(L)->path, name);
  }
  for (int i = 0; i < nargs; i++)
    lua_pushvalue(L, 4 + i);
  int st = lua_pcall(L, nargs, 0, h);
  if (st != LUA_OK)
    return lua_error(L); /* rethrow the handled message to the outer pcall */
  return 0;
}

/* Calls a global function; 0 or a Lua status with the error text in err. */
static int call_global(rr_script_t *s, const char *name, bool required, int argref1, int argref2,
                       rr_buf_t *err) {
  lua_State *L = s->L;
  int nargs = 0;
  lua_pushcfunction(L, call_body);
  lua_pushlightuserdata(L, (void *)(uintptr_t)name);
  if (argref1 != LUA_NOREF)
    nargs++;
  if (argref2 != LUA_NOREF)
    nargs++;
  lua_pushinteger(L, nargs);
  lua_pushboolean(L, required);
  if (argref1 != LUA_NOREF)
    lua_rawgeti(L, LUA_REGISTRYINDEX, argref1);
  if (argref2 != LUA_NOREF)
    lua_rawgeti(L, LUA_REGISTRYINDEX, argref2);
  int st = lua_pcall(L, 3 + nargs, 0, 0);
  if (st != LUA_OK) {
    if (err)
      error_text(s, st, err);
    lua_pop(L, 1);
    recover(s, st == LUA_ERRMEM || st == LUA_ERRERR);
  }
  return st;
}

/* ---- lifecycle ---------------------------------------------------------- */

void rr_script_config_default(rr_script_config_t *c) {
  memset(c, 0, sizeof *c);
  c->max_memory = (size_t)64 << 20;
  c->max_instructions = 20000000;
}

static char *dup_or_null(const char *p, bool *fail) {
  if (!p)
    return NULL;
  char *d = strdup(p);
  if (!d)
    *fail = true;
  return d;
}

/* Reads a whole file (up to max bytes) into a malloc'd buffer. */
static int read_file(const char *path, size_t max, char **out, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return -errno;
  rr_buf_t b;
  rr_buf_init(&b, max);
  char chunk[16384];
  size_t n;
  int rc = 0;
  while (rc == 0 && (n = fread(chunk, 1, sizeof chunk, f)) > 0)
    rc = rr_buf_append(&b, chunk, n);
  if (rc == 0 && ferror(f))
    rc = RR_EIO;
  fclose(f);
  if (rc) {
    rr_buf_close(&b);
    return rc;
  }
  *out = rr_buf_steal(&b, len);
  if (!*out) {
    *out = strdup("");
    if (!*out)
      return RR_ENOMEM;
  }
  return 0;
}

typedef struct load_args {
  rr_script_t *s;
  const char *code;
  size_t len;
} load_args_t;

/* Protected body of the setup: sandbox, bindings, compile, top level. */
/* ---- store: the engine's key-value store, for enrichment ----------------- */

#define KV_MAX_KEY 256
#define KV_MAX_VALUE ((size_t)1 << 20)

static rr_script_t *kv_script(lua_State *L, const char **key) {
  rr_script_t *s = script_of(L);
  if (!s->kv.get)
    luaL_error(L, "store: this channel has no store");
  if (!s->cur)
    luaL_error(L, "store: only available while a message is handled");
  size_t klen;
  *key = luaL_checklstring(L, 1, &klen);
  if (klen == 0 || klen > KV_MAX_KEY || strlen(*key) != klen)
    luaL_error(L, "store: keys are 1 to %d bytes of text", KV_MAX_KEY);
  return s;
}

static int store_get(lua_State *L) {
  const char *key;
  rr_script_t *s = kv_script(L, &key);
  rr_buf_reset(&s->tmp);
  int rc = s->kv.get(s->kv.ud, key, &s->tmp);
  if (rc == RR_ENOTFOUND) {
    lua_pushnil(L);
    return 1;
  }
  if (rc)
    return luaL_error(L, "store: %s", rr_strerror(rc));
  lua_pushlstring(L, s->tmp.data ? s->tmp.data : "", s->tmp.len);
  return 1;
}

static int store_set(lua_State *L) {
  const char *key;
  rr_script_t *s = kv_script(L, &key);
  int rc;
  if (lua_isnoneornil(L, 2)) {
    rc = s->kv.set(s->kv.ud, key, NULL, 0);
  } else {
    if (lua_type(L, 2) != LUA_TSTRING && lua_type(L, 2) != LUA_TNUMBER)
      return luaL_error(L, "store: values are strings or numbers (json.encode a table)");
    size_t len;
    const char *v = lua_tolstring(L, 2, &len);
    if (len > KV_MAX_VALUE)
      return luaL_error(L, "store: values are at most %d bytes", (int)KV_MAX_VALUE);
    rc = s->kv.set(s->kv.ud, key, v, len);
  }
  if (rc)
    return luaL_error(L, "store: %s", rr_strerror(rc));
  return 0;
}

static int store_delete(lua_State *L) {
  lua_settop(L, 1);
  return store_set(L);
}

/* ---- orders: the engine's order store ------------------------------------- */

static rr_script_t *orders_script(lua_State *L) {
  rr_script_t *s = script_of(L);
  if (!s->orders.keep)
    luaL_error(L, "orders: this channel has no order store");
  if (!s->cur)
    luaL_error(L, "orders: only available while a message is handled");
  return s;
}

/* orders.keep(record): keeps an order record (a table) with the message. */
static int orders_keep(lua_State *L) {
  rr_script_t *s = orders_script(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t len;
  char *text = script_json_encode(L, 1, &len); /* malloc'd; nothing raises until freed */
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  int rc = s->orders.keep(s->orders.ud, text, len, &err);
  free(text);
  if (rc) {
    lua_pushfstring(L, "orders.keep: %s", err.len ? err.data : rr_strerror(rc));
    rr_buf_close(&err);
    return lua_error(L);
  }
  rr_buf_close(&err);
  return 0;
}

/* orders.get(accession): the order record kept for accession, or nil. */
static int orders_get(lua_State *L) {
  rr_script_t *s = orders_script(L);
  size_t len;
  const char *acc = luaL_checklstring(L, 1, &len);
  if (len == 0 || len > 256 || strlen(acc) != len)
    return luaL_error(L, "orders.get: an accession number is 1 to 256 bytes of text");
  rr_buf_reset(&s->tmp);
  int rc = s->orders.get(s->orders.ud, acc, &s->tmp);
  if (rc == RR_ENOTFOUND) {
    lua_pushnil(L);
    return 1;
  }
  if (rc)
    return luaL_error(L, "orders.get: %s", rr_strerror(rc));
  script_json_push_decoded(L, s->tmp.data ? s->tmp.data : "", s->tmp.len, "orders.get");
  return 1;
}

static void open_orders(lua_State *L) {
  static const luaL_Reg fns[] = {{"keep", orders_keep}, {"get", orders_get}, {NULL, NULL}};
  luaL_newlib(L, fns);
  lua_setglobal(L, "orders");
}

static void open_store(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"get", store_get}, {"set", store_set}, {"delete", store_delete}, {NULL, NULL}};
  luaL_newlib(L, fns);
  lua_setglobal(L, "store");
}

static int setup_body(lua_State *L) {
  load_args_t *a = lua_touserdata(L, 1);
  rr_script_t *s = a->s;
  open_sandbox(L);
  script_open_hl7(L);
  script_open_json(L);
  script_open_lookup(L);
  open_store(L);
  open_orders(L);
  script_open_ai(L);
  open_ctx(L, s);
  s->in_msg = script_msg_push(L);
  s->in_msg_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  lua_pushcfunction(L, msg_handler);
  int h = lua_gettop(L);
  const char *code = a->code;
  size_t len = a->len;
  if (len && code[0] == '#') { /* shebang line: skipped, line numbers kept */
    while (len && code[0] != '\n') {
      code++;
      len--;
    }
  }
  const char *base = strrchr(s->path, '/');
  lua_pushfstring(L, "@%s", base ? base + 1 : s->path);
  int st = luaL_loadbufferx(L, code, len, lua_tostring(L, -1), "t");
  if (st != LUA_OK)
    return lua_error(L);
  st = lua_pcall(L, 0, 0, h);
  if (st != LUA_OK)
    return lua_error(L);
  return 0;
}

int rr_script_load(const rr_script_config_t *cfg, rr_script_t **out, rr_buf_t *err) {
  *out = NULL;
  if (!cfg || !cfg->path)
    return RR_EINVAL;
  rr_script_t *s = calloc(1, sizeof *s);
  if (!s)
    return RR_ENOMEM;
  char *code = NULL;
  size_t len = 0;
  int rc = 0;
  bool fail = false;
  s->limit = cfg->max_memory ? cfg->max_memory : (size_t)64 << 20;
  uint64_t maxi = cfg->max_instructions ? cfg->max_instructions : 20000000;
  s->max_steps = (maxi + HOOK_EVERY - 1) / HOOK_EVERY;
  s->kv = cfg->kv;
  s->orders = cfg->orders;
  s->ai = cfg->ai;
  s->fixed_now = cfg->fixed_now;
  s->in_msg_ref = s->ctx_ref = LUA_NOREF;
  s->channel = strdup(cfg->channel ? cfg->channel : "");
  s->path = strdup(cfg->path);
  s->lib_dir = dup_or_null(cfg->lib_dir, &fail);
  s->data_dir = dup_or_null(cfg->data_dir, &fail);
  if (!s->data_dir && !fail && s->path) {
    const char *slash = strrchr(s->path, '/');
    s->data_dir =
        slash ? strndup(s->path, (size_t)(slash - s->path) + (slash == s->path)) : strdup(".");
    fail = !s->data_dir;
  }
  if (fail || !s->channel || !s->path) {
    rc = RR_ENOMEM;
    goto out;
  }
  rr_buf_init(&s->tmp, (size_t)1 << 30);

  if ((rc = read_file(s->path, s->limit, &code, &len))) {
    if (err)
      rr_buf_printf(err, "%s: %s", s->path,
                    rc == RR_ELIMIT ? "script larger than the memory limit" : rr_strerror(rc));
    goto out;
  }
  s->L = lua_newstate(sb_alloc, s);
  if (!s->L) {
    rc = RR_ENOMEM;
    goto out;
  }
  *(rr_script_t **)lua_getextraspace(s->L) = s;
  budget_start(s);
  load_args_t a = {s, code, len};
  lua_pushcfunction(s->L, setup_body);
  lua_pushlightuserdata(s->L, &a);
  int st = lua_pcall(s->L, 1, 0, 0);
  if (st == LUA_OK) {
    budget_start(s);
    st = call_global(s, "on_start", false, LUA_NOREF, LUA_NOREF, err);
  } else {
    if (err)
      error_text(s, st, err);
    lua_pop(s->L, 1);
  }
  if (st != LUA_OK) {
    rc = st == LUA_ERRMEM ? RR_ENOMEM : RR_EINVAL;
    goto out;
  }
out:
  free(code);
  if (rc) {
    if (s->L) {
      lua_close(s->L); /* no on_stop: the script never started */
      s->L = NULL;
    }
    rr_script_free(s);
    return rc;
  }
  *out = s;
  return 0;
}

void rr_script_free(rr_script_t *s) {
  if (!s)
    return;
  if (s->L) {
    budget_start(s);
    call_global(s, "on_stop", false, LUA_NOREF, LUA_NOREF, NULL);
    budget_start(s); /* finalizers get a budget of their own */
    lua_close(s->L);
  }
  rr_buf_close(&s->tmp);
  free(s->channel);
  free(s->path);
  free(s->lib_dir);
  free(s->data_dir);
  free(s);
}

void rr_script_collect(rr_script_t *s) {
  if (s && s->L) {
    budget_start(s);
    recover(s, true);
  }
}

size_t rr_script_memory(const rr_script_t *s) {
  return s ? s->used + s->external : 0;
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int rr_script_run(rr_script_t *s, const rr_script_input_t *in, rr_script_result_t *out) {
  uint64_t t0 = now_ns();
  memset(out, 0, sizeof *out);
  out->verdict = RR_SCRIPT_PASS;
  s->cur = out;
  s->in = in;
  s->route_bytes = s->log_bytes = 0;
  s->routes_cap = s->logs_cap = 0;
  s->oom = false;

  /* The input message: parsed (copied) into the reused message object. */
  rr_hl7_options_t opt;
  rr_hl7_options_default(&opt);
  opt.mode = RR_HL7_LENIENT;
  rr_hl7_error_t perr;
  s->external -= s->in_msg->charge;
  s->in_msg->charge = 0;
  int rc = rr_hl7_parse(s->in_msg->m, in->data, in->len, &opt, &perr);
  if (rc) {
    out->verdict = RR_SCRIPT_ERROR;
    snprintf(out->reason, sizeof out->reason, "message does not parse: %s", perr.text);
    goto done;
  }

  budget_start(s);
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  int st = call_global(s, "on_message", true, s->in_msg_ref, s->ctx_ref, &err);
  if (st != LUA_OK) {
    drop_routes(out);
    out->verdict = RR_SCRIPT_ERROR;
    set_reason(out, err.data ? err.data : "error", err.data ? err.len : 5);
  }
  rr_buf_close(&err);

done:
  out->instructions = s->steps * HOOK_EVERY;
  s->cur = NULL;
  s->in = NULL;
  out->elapsed_ns = now_ns() - t0;
  if (s->oom) {
    drop_routes(out);
    out->verdict = RR_SCRIPT_ERROR;
    snprintf(out->reason, sizeof out->reason, "not enough memory for the result");
    return RR_ENOMEM;
  }
  return 0;
}

/* Protected: decodes the study context (light userdata input) into a table. */
static int decode_body(lua_State *L) {
  const rr_script_input_t *in = lua_touserdata(L, 1);
  script_json_push_decoded(L, in->data, in->len, "study context");
  return 1;
}

bool rr_script_defines(rr_script_t *s, const char *name) {
  lua_pushglobaltable(s->L);
  lua_pushstring(s->L, name);
  lua_rawget(s->L, -2);
  bool yes = lua_type(s->L, -1) == LUA_TFUNCTION;
  lua_pop(s->L, 2);
  return yes;
}

int rr_script_run_study(rr_script_t *s, const rr_script_input_t *in, rr_script_result_t *out) {
  return rr_script_run_json(s, "on_study", in, out);
}

int rr_script_run_json(rr_script_t *s, const char *fn, const rr_script_input_t *in,
                       rr_script_result_t *out) {
  uint64_t t0 = now_ns();
  memset(out, 0, sizeof *out);
  out->verdict = RR_SCRIPT_PASS;
  s->cur = out;
  s->in = in;
  s->route_bytes = s->log_bytes = 0;
  s->routes_cap = s->logs_cap = 0;
  s->oom = false;
  budget_start(s);
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  lua_pushcfunction(s->L, decode_body);
  lua_pushlightuserdata(s->L, (void *)(uintptr_t)in);
  int st = lua_pcall(s->L, 1, 1, 0);
  if (st == LUA_OK) {
    int ref = luaL_ref(s->L, LUA_REGISTRYINDEX);
    st = call_global(s, fn, false, ref, s->ctx_ref, &err);
    luaL_unref(s->L, LUA_REGISTRYINDEX, ref);
  } else {
    error_text(s, st, &err);
    lua_pop(s->L, 1);
  }
  if (st != LUA_OK) {
    drop_routes(out);
    out->verdict = RR_SCRIPT_ERROR;
    set_reason(out, err.data ? err.data : "error", err.data ? err.len : 5);
  }
  rr_buf_close(&err);
  out->instructions = s->steps * HOOK_EVERY;
  s->cur = NULL;
  s->in = NULL;
  out->elapsed_ns = now_ns() - t0;
  if (s->oom) {
    drop_routes(out);
    out->verdict = RR_SCRIPT_ERROR;
    snprintf(out->reason, sizeof out->reason, "not enough memory for the result");
    return RR_ENOMEM;
  }
  return 0;
}

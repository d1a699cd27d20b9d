/* json.encode / json.decode over jansson.
 *
 * jansson allocates with malloc, outside the Lua allocator. Every jansson
 * object in flight hangs off a "box" userdata whose __gc frees it, so a Lua
 * error in the middle of a conversion leaks nothing, and its estimated size
 * is charged to the state's memory cap while it lives. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "script/script_int.h"

#define BOX_MT "radrelay.json.box"
#define ARRAY_MT "radrelay.json.array"
#define MAX_DEPTH 200

static const char null_sentinel = 0;

typedef struct jbox {
  json_t *j;  /* owned */
  char *text; /* owned (json_dumps) */
  size_t charge;
} jbox_t;

static int box_gc(lua_State *L) {
  jbox_t *b = lua_touserdata(L, 1);
  json_decref(b->j);
  b->j = NULL;
  free(b->text);
  b->text = NULL;
  script_uncharge(L, &b->charge);
  return 0;
}

static jbox_t *box_push(lua_State *L) {
  jbox_t *b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  luaL_setmetatable(L, BOX_MT);
  return b;
}

static void box_release(lua_State *L, jbox_t *b) {
  json_decref(b->j);
  b->j = NULL;
  free(b->text);
  b->text = NULL;
  script_uncharge(L, &b->charge);
}

/* ---- Lua -> JSON -------------------------------------------------------- */

static bool is_array_mt(lua_State *L, int idx) {
  if (!lua_getmetatable(L, idx))
    return false;
  luaL_getmetatable(L, ARRAY_MT);
  bool r = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return r;
}

/* A table is an array when its keys are exactly 1..n (n > 0), or when it
 * carries the json.array marker. */
static bool is_array(lua_State *L, int idx) {
  if (is_array_mt(L, idx))
    return true;
  lua_Unsigned n = lua_rawlen(L, idx);
  if (n == 0)
    return false;
  lua_Unsigned count = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (!lua_isinteger(L, -1)) {
      lua_pop(L, 1);
      return false;
    }
    lua_Integer k = lua_tointeger(L, -1);
    if (k < 1 || (lua_Unsigned)k > n) {
      lua_pop(L, 1);
      return false;
    }
    count++;
  }
  return count == n;
}

/* A new JSON value for the Lua value at idx; tables come back empty (the
 * caller attaches them, then fills them). Raises on unsupported values. */
static json_t *make(lua_State *L, int idx, jbox_t *b) {
  json_t *j = NULL;
  script_charge(L, &b->charge, 64);
  switch (lua_type(L, idx)) {
  case LUA_TNIL: j = json_null(); break;
  case LUA_TBOOLEAN: j = json_boolean(lua_toboolean(L, idx)); break;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      j = json_integer((json_int_t)lua_tointeger(L, idx));
    } else {
      double d = (double)lua_tonumber(L, idx);
      if (!isfinite(d))
        luaL_error(L, "json.encode: cannot encode %s", isnan(d) ? "NaN" : "infinity");
      j = json_real(d);
    }
    break;
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    script_charge(L, &b->charge, len);
    j = json_stringn(s, len);
    if (!j)
      luaL_error(L, "json.encode: string is not valid UTF-8");
    break;
  }
  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, idx) == &null_sentinel) {
      j = json_null();
      break;
    }
    luaL_error(L, "json.encode: cannot encode a userdata");
    break;
  case LUA_TTABLE: j = is_array(L, idx) ? json_array() : json_object(); break;
  default: luaL_error(L, "json.encode: cannot encode a %s", luaL_typename(L, idx));
  }
  if (!j)
    luaL_error(L, "not enough memory");
  return j;
}

/* Fills container c (borrowed, already owned by the box's tree) from the
 * table at idx. */
static void fill(lua_State *L, int idx, json_t *c, jbox_t *b, int depth) {
  if (depth > MAX_DEPTH)
    luaL_error(L, "json.encode: nesting deeper than %d (a cycle?)", MAX_DEPTH);
  luaL_checkstack(L, 4, "json.encode");
  if (json_is_array(c)) {
    lua_Unsigned n = lua_rawlen(L, idx);
    for (lua_Unsigned i = 1; i <= n; i++) {
      lua_rawgeti(L, idx, (lua_Integer)i);
      json_t *v = make(L, lua_gettop(L), b);
      if (json_array_append_new(c, v))
        luaL_error(L, "not enough memory");
      if (lua_istable(L, -1))
        fill(L, lua_gettop(L), v, b, depth + 1);
      lua_pop(L, 1);
    }
    return;
  }
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int kt = lua_type(L, -2);
    const char *k;
    size_t klen;
    char num[32];
    if (kt == LUA_TSTRING) {
      k = lua_tolstring(L, -2, &klen);
    } else if (kt == LUA_TNUMBER && lua_isinteger(L, -2)) {
      klen = (size_t)snprintf(num, sizeof num, LUA_INTEGER_FMT, lua_tointeger(L, -2));
      k = num;
    } else {
      luaL_error(L, "json.encode: object keys must be strings or integers, not %s",
                 luaL_typename(L, -2));
      return;
    }
    json_t *v = make(L, lua_gettop(L), b);
    if (json_object_setn_new(c, k, klen, v))
      luaL_error(L, "json.encode: bad object key");
    if (lua_istable(L, -1))
      fill(L, lua_gettop(L), v, b, depth + 1);
    lua_pop(L, 1);
  }
}

/* Encodes idx into box b (b->text). */
static void encode_into(lua_State *L, int idx, jbox_t *b) {
  b->j = make(L, idx, b);
  if (lua_istable(L, idx))
    fill(L, idx, b->j, b, 1);
  b->text =
      json_dumps(b->j, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY | JSON_REAL_PRECISION(15));
  if (!b->text)
    luaL_error(L, "not enough memory");
  json_decref(b->j);
  b->j = NULL;
}

char *script_json_encode(lua_State *L, int idx, size_t *len) {
  idx = lua_absindex(L, idx);
  jbox_t *b = box_push(L);
  encode_into(L, idx, b);
  char *t = b->text;
  b->text = NULL;
  box_release(L, b);
  lua_pop(L, 1);
  *len = strlen(t);
  return t;
}

static int j_encode(lua_State *L) {
  luaL_checkany(L, 1);
  jbox_t *b = box_push(L);
  encode_into(L, 1, b);
  lua_pushstring(L, b->text);
  box_release(L, b);
  return 1;
}

/* ---- JSON -> Lua -------------------------------------------------------- */

static void push_json(lua_State *L, json_t *j, int depth) {
  luaL_checkstack(L, 3, "json.decode: nesting too deep");
  switch (json_typeof(j)) {
  case JSON_OBJECT: {
    lua_createtable(L, 0, (int)json_object_size(j));
    const char *k;
    json_t *v;
    json_object_foreach(j, k, v) {
      lua_pushstring(L, k);
      push_json(L, v, depth + 1);
      lua_rawset(L, -3);
    }
    break;
  }
  case JSON_ARRAY: {
    size_t n = json_array_size(j);
    lua_createtable(L, n < 1u << 24 ? (int)n : 0, 0);
    for (size_t i = 0; i < n; i++) {
      push_json(L, json_array_get(j, i), depth + 1);
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    luaL_setmetatable(L, ARRAY_MT);
    break;
  }
  case JSON_STRING: lua_pushlstring(L, json_string_value(j), json_string_length(j)); break;
  case JSON_INTEGER: lua_pushinteger(L, (lua_Integer)json_integer_value(j)); break;
  case JSON_REAL: lua_pushnumber(L, (lua_Number)json_real_value(j)); break;
  case JSON_TRUE: lua_pushboolean(L, 1); break;
  case JSON_FALSE: lua_pushboolean(L, 0); break;
  default: lua_pushlightuserdata(L, (void *)(uintptr_t)&null_sentinel); break;
  }
}

/* Decodes into a box below the result; returns false (with the error text
 * pushed) on invalid JSON. */
static bool decode(lua_State *L, const char *text, size_t len) {
  jbox_t *b = box_push(L);
  script_charge(L, &b->charge, 4 * len + 1024);
  json_error_t e;
  b->j = json_loadb(text, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
  if (!b->j) {
    lua_pushfstring(L, "line %d column %d: %s", e.line, e.column, e.text);
    lua_remove(L, -2);
    return false;
  }
  push_json(L, b->j, 0);
  box_release(L, b);
  lua_remove(L, -2);
  return true;
}

void script_json_push_decoded(lua_State *L, const char *text, size_t len, const char *what) {
  if (!decode(L, text, len))
    luaL_error(L, "%s: invalid JSON: %s", what, lua_tostring(L, -1));
}

static int j_decode(lua_State *L) {
  size_t len;
  const char *t = luaL_checklstring(L, 1, &len);
  if (decode(L, t, len))
    return 1;
  luaL_pushfail(L);
  lua_insert(L, -2);
  return 2;
}

/* json.array(t): marks t (default: a new table) to encode as an array. */
static int j_array(lua_State *L) {
  if (lua_isnoneornil(L, 1))
    lua_newtable(L);
  else
    luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  luaL_setmetatable(L, ARRAY_MT);
  return 1;
}

void script_open_json(lua_State *L) {
  static const luaL_Reg funcs[] = {
      {"encode", j_encode}, {"decode", j_decode}, {"array", j_array}, {NULL, NULL}};
  luaL_newmetatable(L, BOX_MT);
  lua_pushcfunction(L, box_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
  luaL_newmetatable(L, ARRAY_MT);
  lua_pushliteral(L, "json.array");
  lua_setfield(L, -2, "__name");
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  lua_pushlightuserdata(L, (void *)(uintptr_t)&null_sentinel);
  lua_setfield(L, -2, "null");
  lua_setglobal(L, "json");
}

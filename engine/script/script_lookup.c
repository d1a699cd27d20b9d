/* lookup.load (CSV and JSON tables from data_dir) and the sandboxed require
 * (Lua text modules from lib_dir). Files are read into Lua-owned memory so
 * the memory cap covers them and an error leaks nothing. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "core/error.h"
#include "script/script_int.h"

static const char loading_sentinel = 0;

/* Reads the whole file into a new userdata pushed on the stack. */
static const char *push_file(lua_State *L, const char *path, size_t *len) {
  rr_script_t *s = script_of(L);
  struct stat st;
  if (stat(path, &st) != 0)
    luaL_error(L, "cannot read '%s': %s", strrchr(path, '/') ? strrchr(path, '/') + 1 : path,
               strerror(errno));
  if (!S_ISREG(st.st_mode))
    luaL_error(L, "cannot read '%s': not a file", path);
  if ((uint64_t)st.st_size > s->limit)
    luaL_error(L, "not enough memory (file larger than the memory limit)");
  size_t size = (size_t)st.st_size;
  char *buf = lua_newuserdatauv(L, size + 1, 0);
  /* No Lua call between fopen and fclose. */
  FILE *f = fopen(path, "rb");
  if (!f)
    luaL_error(L, "cannot read '%s': %s", path, strerror(errno));
  size_t got = fread(buf, 1, size, f);
  fclose(f);
  buf[got] = '\0';
  *len = got;
  return buf;
}

/* The registry table at key, created on first use, pushed. */
static void push_cache(lua_State *L, const void *key) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, key);
  }
}

/* ---- require ------------------------------------------------------------ */

int script_require(lua_State *L) {
  rr_script_t *s = script_of(L);
  size_t nlen;
  const char *name = luaL_checklstring(L, 1, &nlen);
  bool ok = nlen > 0 && nlen < 200 && name[0] != '.' && name[nlen - 1] != '.';
  for (size_t i = 0; ok && i < nlen; i++) {
    char c = name[i];
    ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
         (c == '.' && name[i + 1] != '.');
  }
  if (!ok)
    return luaL_error(L, "require: bad module name '%s' (letters, digits, _ and . only)", name);
  lua_settop(L, 1);
  push_cache(L, &rr_script_key_loaded); /* 2 */
  lua_pushvalue(L, 1);
  if (lua_rawget(L, 2) != LUA_TNIL) {
    if (lua_touserdata(L, -1) == &loading_sentinel)
      return luaL_error(L, "require: loop or previous error loading module '%s'", name);
    return 1;
  }
  lua_pop(L, 1);
  if (!s->lib_dir)
    return luaL_error(L, "require: module '%s' not found (no lib_dir configured)", name);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (size_t i = 0; i < nlen; i++)
    luaL_addchar(&b, name[i] == '.' ? '/' : name[i]);
  luaL_addstring(&b, ".lua");
  luaL_pushresult(&b); /* 3: relative path */
  const char *rel = lua_tostring(L, 3);
  lua_pushfstring(L, "%s/%s", s->lib_dir, rel); /* 4 */
  struct stat st;
  if (stat(lua_tostring(L, 4), &st) != 0)
    return luaL_error(L, "require: module '%s' not found in lib_dir", name);
  size_t len;
  const char *code = push_file(L, lua_tostring(L, 4), &len); /* 5 */
  if (len && code[0] == '#') {
    while (len && code[0] != '\n') {
      code++;
      len--;
    }
  }
  lua_pushfstring(L, "@%s", rel); /* 6 */
  if (luaL_loadbufferx(L, code, len, lua_tostring(L, 6), "t") != LUA_OK)
    return lua_error(L);
  lua_pushvalue(L, 1);
  lua_pushlightuserdata(L, (void *)(uintptr_t)&loading_sentinel);
  lua_rawset(L, 2);
  lua_pushvalue(L, 1);
  int st2 = lua_pcall(L, 1, 1, 0);
  if (st2 != LUA_OK) {
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    lua_rawset(L, 2);
    return lua_error(L);
  }
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushboolean(L, 1);
  }
  lua_pushvalue(L, 1);
  lua_pushvalue(L, -2);
  lua_rawset(L, 2);
  return 1;
}

/* ---- CSV ---------------------------------------------------------------- */

/* Pushes the field at *pp; returns true when another field of the same
 * record follows. */
static bool csv_field(lua_State *L, const char **pp, const char *end, unsigned *line) {
  const char *p = *pp;
  if (p < end && *p == '"') {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    p++;
    for (;;) {
      const char *q = memchr(p, '"', (size_t)(end - p));
      if (!q)
        luaL_error(L, "lookup.load: unterminated quoted field (line %d)", (int)*line);
      for (const char *c = p; c < q; c++)
        *line += *c == '\n';
      luaL_addlstring(&b, p, (size_t)(q - p));
      p = q + 1;
      if (p < end && *p == '"') {
        luaL_addchar(&b, '"');
        p++;
        continue;
      }
      break;
    }
    luaL_pushresult(&b);
    while (p < end && *p != ',' && *p != '\r' && *p != '\n')
      p++; /* junk after the closing quote is ignored */
  } else {
    const char *a = p;
    while (p < end && *p != ',' && *p != '\r' && *p != '\n')
      p++;
    lua_pushlstring(L, a, (size_t)(p - a));
  }
  if (p < end && *p == ',') {
    *pp = p + 1;
    return true;
  }
  if (p < end && *p == '\r')
    p++;
  if (p < end && *p == '\n')
    p++;
  (*line)++;
  *pp = p;
  return false;
}

/* Pushes a table keyed by the first column; each row a table by header. */
static void parse_csv(lua_State *L, const char *p, size_t len) {
  const char *end = p + len;
  unsigned line = 1;
  if (len >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0)
    p += 3;
  lua_newtable(L); /* result */
  int res = lua_gettop(L);
  lua_newtable(L); /* header names */
  int hdr = res + 1;
  lua_Integer nh = 0;
  bool header = true;
  while (p < end) {
    if (*p == '\r' || *p == '\n') { /* blank line */
      if (*p == '\r' && p + 1 < end && p[1] == '\n')
        p++;
      p++;
      line++;
      continue;
    }
    if (header) {
      bool more;
      do {
        more = csv_field(L, &p, end, &line);
        lua_rawseti(L, hdr, ++nh);
      } while (more);
      header = false;
      continue;
    }
    lua_createtable(L, 0, (int)nh); /* row */
    int row = lua_gettop(L);
    lua_Integer i = 0;
    bool more;
    do {
      more = csv_field(L, &p, end, &line);
      if (++i <= nh) {
        if (i == 1) {
          lua_pushvalue(L, -1);
          lua_insert(L, row); /* the key, below the row */
          row++;
        }
        lua_rawgeti(L, hdr, i);
        lua_insert(L, -2);
        lua_rawset(L, row);
      } else {
        lua_pop(L, 1); /* extra column */
      }
    } while (more);
    for (i++; i <= nh; i++) { /* missing columns are "" */
      lua_rawgeti(L, hdr, i);
      lua_pushliteral(L, "");
      lua_rawset(L, row);
    }
    lua_rawset(L, res); /* result[key] = row */
  }
  lua_pop(L, 1); /* header */
}

/* lookup.load(name): the CSV or JSON file name in data_dir, loaded once. */
static int l_load(lua_State *L) {
  rr_script_t *s = script_of(L);
  size_t nlen;
  const char *name = luaL_checklstring(L, 1, &nlen);
  if (nlen == 0 || memchr(name, '/', nlen) || memchr(name, '\\', nlen) ||
      memchr(name, '\0', nlen) || strstr(name, "..") || name[0] == '.')
    return luaL_error(L, "lookup.load: bad name '%s' (a file name in data_dir)", name);
  bool csv = nlen > 4 && strcmp(name + nlen - 4, ".csv") == 0;
  bool json = nlen > 5 && strcmp(name + nlen - 5, ".json") == 0;
  if (!csv && !json)
    return luaL_error(L, "lookup.load: '%s' is neither .csv nor .json", name);
  lua_settop(L, 1);
  push_cache(L, &rr_script_key_lookups); /* 2 */
  lua_pushvalue(L, 1);
  if (lua_rawget(L, 2) != LUA_TNIL)
    return 1;
  lua_pop(L, 1);
  lua_pushfstring(L, "%s/%s", s->data_dir, name); /* 3 */
  size_t len;
  const char *text = push_file(L, lua_tostring(L, 3), &len); /* 4 */
  if (csv)
    parse_csv(L, text, len);
  else
    script_json_push_decoded(L, text, len, name);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, -2);
  lua_rawset(L, 2);
  return 1;
}

void script_open_lookup(lua_State *L) {
  static const luaL_Reg funcs[] = {{"load", l_load}, {NULL, NULL}};
  luaL_newlib(L, funcs);
  lua_setglobal(L, "lookup");
}

/* Lua bindings of the HL7 codec: the msg userdata and the hl7 table. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"
#include "script/script_int.h"

#define MSG_MT "radrelay.hl7.msg"

/* ---- memory accounting for C-side message memory ------------------------ */

void script_charge(lua_State *L, size_t *acct, size_t n) {
  rr_script_t *s = script_of(L);
  size_t have = s->used + s->external;
  if (have > s->limit || n > s->limit - have) {
    lua_gc(L, LUA_GCCOLLECT); /* unreachable messages give their charge back */
    have = s->used + s->external;
    if (have > s->limit || n > s->limit - have)
      luaL_error(L, "not enough memory");
  }
  s->external += n;
  *acct += n;
}

void script_uncharge(lua_State *L, size_t *acct) {
  script_of(L)->external -= *acct;
  *acct = 0;
}

/* ---- userdata ----------------------------------------------------------- */

static int msg_gc(lua_State *L) {
  script_msg_t *sm = lua_touserdata(L, 1);
  if (sm && sm->m) {
    script_uncharge(L, &sm->charge);
    rr_hl7_msg_free(sm->m);
    sm->m = NULL;
  }
  return 0;
}

script_msg_t *script_msg_push(lua_State *L) {
  script_msg_t *sm = lua_newuserdatauv(L, sizeof *sm, 0);
  sm->m = NULL;
  sm->charge = 0;
  luaL_setmetatable(L, MSG_MT);
  sm->m = rr_hl7_msg_new();
  if (!sm->m)
    luaL_error(L, "not enough memory");
  return sm;
}

script_msg_t *script_msg_check(lua_State *L, int idx) {
  script_msg_t *sm = luaL_checkudata(L, idx, MSG_MT);
  if (!sm->m)
    luaL_argerror(L, idx, "message is gone");
  return sm;
}

script_msg_t *script_msg_test(lua_State *L, int idx) {
  script_msg_t *sm = luaL_testudata(L, idx, MSG_MT);
  return sm && sm->m ? sm : NULL;
}

static void check_path(lua_State *L, int idx, rr_hl7_path_t *p) {
  size_t len;
  const char *s = luaL_checklstring(L, idx, &len);
  if (rr_hl7_path_parse(s, len, p))
    luaL_error(L, "invalid HL7 path '%s'", s);
}

static int fail(lua_State *L, const char *what, int rc) {
  if (rc == RR_ENOMEM)
    return luaL_error(L, "not enough memory");
  return luaL_error(L, "%s: %s", what, rr_strerror(rc));
}

/* Pushes the decoded value at p: a string, or nil when the segment is absent. */
static int push_get(lua_State *L, script_msg_t *sm, const rr_hl7_path_t *p) {
  rr_script_t *s = script_of(L);
  rr_buf_reset(&s->tmp);
  int rc = rr_hl7_get(sm->m, p, &s->tmp);
  if (rc == RR_ENOTFOUND) {
    lua_pushnil(L);
    return 1;
  }
  if (rc)
    return fail(L, "get", rc);
  lua_pushlstring(L, s->tmp.data ? s->tmp.data : "", s->tmp.len);
  return 1;
}

/* Encoded length of the field p is in (0 when absent), for charging edits. */
static size_t field_len(const script_msg_t *sm, const rr_hl7_path_t *p) {
  rr_hl7_path_t f = *p;
  f.rep = f.comp = f.sub = 0;
  rr_hl7_slice_t v;
  if (f.field == 0 || rr_hl7_get_raw(sm->m, &f, &v))
    return 0;
  return v.len;
}

static int do_delete(lua_State *L, script_msg_t *sm, const rr_hl7_path_t *p) {
  script_charge(L, &sm->charge, field_len(sm, p) + 64);
  int rc = rr_hl7_delete(sm->m, p);
  if (rc)
    return fail(L, "delete", rc);
  return 0;
}

/* Stores the value at vidx (string, number; nil deletes). */
static int do_set(lua_State *L, script_msg_t *sm, const rr_hl7_path_t *p, int vidx, bool raw) {
  int t = lua_type(L, vidx);
  if (t == LUA_TNIL)
    return do_delete(L, sm, p);
  if (t != LUA_TSTRING && t != LUA_TNUMBER)
    return luaL_typeerror(L, vidx, "string or number");
  if (p->field == 0 && !raw)
    return luaL_error(L, "set: the path needs a field (use set_raw for a whole segment)");
  size_t len;
  const char *v = lua_tolstring(L, vidx, &len);
  script_charge(L, &sm->charge, 2 * len + field_len(sm, p) + 64);
  int rc = raw ? rr_hl7_set_raw(sm->m, p, v, len) : rr_hl7_set(sm->m, p, v, len);
  if (rc)
    return fail(L, raw ? "set_raw" : "set", rc);
  return 0;
}

static int m_get(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_hl7_path_t p;
  check_path(L, 2, &p);
  return push_get(L, sm, &p);
}

static int m_raw(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_hl7_path_t p;
  check_path(L, 2, &p);
  rr_hl7_slice_t v;
  int rc = rr_hl7_get_raw(sm->m, &p, &v);
  if (rc == RR_ENOTFOUND) {
    lua_pushnil(L);
    return 1;
  }
  if (rc)
    return fail(L, "raw", rc);
  lua_pushlstring(L, v.p, v.len);
  return 1;
}

static int m_set(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_hl7_path_t p;
  check_path(L, 2, &p);
  luaL_checkany(L, 3);
  do_set(L, sm, &p, 3, false);
  return 0;
}

static int m_set_raw(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_hl7_path_t p;
  check_path(L, 2, &p);
  luaL_checkany(L, 3);
  do_set(L, sm, &p, 3, true);
  return 0;
}

static int m_delete(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_hl7_path_t p;
  check_path(L, 2, &p);
  do_delete(L, sm, &p);
  return 0;
}

static int seg_iter(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  lua_Integer i = luaL_checkinteger(L, 2);
  const char *name = i >= 0 && (size_t)i < rr_hl7_segment_count(sm->m)
                         ? rr_hl7_segment_name(sm->m, (size_t)i)
                         : NULL;
  if (!name)
    return 0;
  lua_pushinteger(L, i + 1);
  lua_pushlstring(L, name, 3);
  return 2;
}

static int m_segments(lua_State *L) {
  script_msg_check(L, 1);
  lua_pushcfunction(L, seg_iter);
  lua_pushvalue(L, 1);
  lua_pushinteger(L, 0);
  return 3;
}

static int m_count(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  size_t len;
  const char *id = luaL_checklstring(L, 2, &len);
  lua_Integer n = 0;
  if (len == 3) {
    size_t count = rr_hl7_segment_count(sm->m);
    for (size_t i = 0; i < count; i++)
      n += memcmp(rr_hl7_segment_name(sm->m, i), id, 3) == 0;
  }
  lua_pushinteger(L, n);
  return 1;
}

static int insert_at(lua_State *L, script_msg_t *sm, size_t at, int tidx) {
  size_t len;
  const char *t = luaL_checklstring(L, tidx, &len);
  while (len && (t[len - 1] == '\r' || t[len - 1] == '\n'))
    len--;
  script_charge(L, &sm->charge, 2 * len + 128);
  int rc = rr_hl7_segment_insert(sm->m, at, t, len);
  if (rc == RR_EPARSE || rc == RR_EINVAL)
    return luaL_error(L, "not a segment that can be inserted: '%s'", t);
  if (rc)
    return fail(L, "insert_segment", rc);
  return 0;
}

static int m_add_segment(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  insert_at(L, sm, rr_hl7_segment_count(sm->m), 2);
  return 0;
}

static int m_insert_segment(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  lua_Integer i = luaL_checkinteger(L, 2);
  size_t n = rr_hl7_segment_count(sm->m);
  luaL_argcheck(L, i >= 2 && (size_t)i <= n + 1, 2, "index out of range (2..count+1)");
  insert_at(L, sm, (size_t)i - 1, 3);
  return 0;
}

static int m_remove_segment(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  lua_Integer i = luaL_checkinteger(L, 2);
  size_t n = rr_hl7_segment_count(sm->m);
  luaL_argcheck(L, i >= 2 && (size_t)i <= n, 2, "index out of range (2..count)");
  int rc = rr_hl7_segment_delete(sm->m, (size_t)i - 1);
  if (rc)
    return fail(L, "remove_segment", rc);
  return 0;
}

static int m_repetitions(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_hl7_path_t p;
  check_path(L, 2, &p);
  p.rep = p.comp = p.sub = 0;
  lua_Integer n = 0;
  rr_hl7_slice_t v;
  if (p.field && rr_hl7_get_raw(sm->m, &p, &v) == 0 && v.len) {
    bool header = memcmp(p.segment, "MSH", 3) == 0 || memcmp(p.segment, "BHS", 3) == 0 ||
                  memcmp(p.segment, "FHS", 3) == 0;
    n = 1;
    if (!(header && p.field <= 2)) {
      char rep = rr_hl7_delims(sm->m)->repetition;
      for (size_t k = 0; k < v.len; k++)
        n += v.p[k] == rep;
    }
  }
  lua_pushinteger(L, n);
  return 1;
}

static int m_encode(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_script_t *s = script_of(L);
  rr_buf_reset(&s->tmp);
  int rc = rr_hl7_serialize(sm->m, &s->tmp);
  if (rc)
    return fail(L, "encode", rc);
  lua_pushlstring(L, s->tmp.data ? s->tmp.data : "", s->tmp.len);
  return 1;
}

static int m_type(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_script_t *s = script_of(L);
  rr_buf_reset(&s->tmp);
  rr_hl7_path_t p = {"MSH", 1, 9, 0, 1, 0};
  int rc = rr_hl7_get(sm->m, &p, &s->tmp);
  size_t first = s->tmp.len;
  p.comp = 2;
  if (rc == 0 && (rc = rr_buf_putc(&s->tmp, '^')) == 0)
    rc = rr_hl7_get(sm->m, &p, &s->tmp);
  if (rc == RR_ENOTFOUND) {
    lua_pushnil(L);
    return 1;
  }
  if (rc)
    return fail(L, "type", rc);
  size_t len = s->tmp.len == first + 1 ? first : s->tmp.len; /* no event: "ACK" */
  lua_pushlstring(L, s->tmp.data, len);
  return 1;
}

/* Parses text into a new message userdata; pushes it, or nil and the error. */
static int push_parsed(lua_State *L, const char *text, size_t len) {
  script_msg_t *sm = script_msg_push(L);
  script_charge(L, &sm->charge, 2 * len + 1024);
  rr_hl7_options_t opt;
  rr_hl7_options_default(&opt);
  opt.mode = RR_HL7_LENIENT;
  rr_hl7_error_t e;
  int rc = rr_hl7_parse(sm->m, text, len, &opt, &e);
  if (rc == RR_ENOMEM)
    return luaL_error(L, "not enough memory");
  if (rc) {
    luaL_pushfail(L);
    lua_pushstring(L, e.text[0] ? e.text : rr_strerror(rc));
    return 2;
  }
  return 1;
}

static int m_clone(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_script_t *s = script_of(L);
  rr_buf_reset(&s->tmp);
  int rc = rr_hl7_serialize(sm->m, &s->tmp);
  if (rc)
    return fail(L, "clone", rc);
  lua_pushlstring(L, s->tmp.data ? s->tmp.data : "", s->tmp.len); /* tmp is reused below */
  size_t len;
  const char *t = lua_tolstring(L, -1, &len);
  return push_parsed(L, t, len);
}

static int msg_index(lua_State *L) {
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) /* methods first */
    return 1;
  size_t len;
  const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &len) : NULL;
  rr_hl7_path_t p;
  if (!k || rr_hl7_path_parse(k, len, &p))
    return 1; /* nil */
  return push_get(L, script_msg_check(L, 1), &p);
}

static int msg_newindex(lua_State *L) {
  script_msg_t *sm = script_msg_check(L, 1);
  rr_hl7_path_t p;
  check_path(L, 2, &p);
  do_set(L, sm, &p, 3, false);
  return 0;
}

/* ---- hl7 table: time ---------------------------------------------------- */

/* Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  int64_t era = (y >= 0 ? y : y - 399) / 400;
  unsigned yoe = (unsigned)(y - era * 400);
  unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d) {
  z += 719468;
  int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  unsigned doe = (unsigned)(z - era * 146097);
  unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  unsigned mp = (5 * doy + 2) / 153;
  *d = doy - (153 * mp + 2) / 5 + 1;
  *m = mp < 10 ? mp + 3 : mp - 9;
  *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

static bool digits(const char *s, size_t n, unsigned *out) {
  unsigned v = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return false;
    v = v * 10 + (unsigned)(s[i] - '0');
  }
  *out = v;
  return true;
}

/* hl7.timestamp(s): YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ] -> unix seconds
 * (UTC when no offset is given), or nil. */
static int h_timestamp(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  unsigned part[6] = {0, 1, 1, 0, 0, 0};
  static const unsigned maxv[6] = {9999, 12, 31, 23, 59, 60};
  size_t i = 0;
  int np = 0;
  double frac = 0;
  bool has_frac = false;
  int off_min = 0;
  for (; np < 6; np++) {
    size_t w = np == 0 ? 4 : 2;
    if (len - i < w || s[i] < '0' || s[i] > '9')
      break;
    if (!digits(s + i, w, &part[np]) || part[np] > maxv[np])
      goto bad;
    i += w;
  }
  if (np == 0 || (np == 1 && i != 4))
    goto bad;
  if (part[1] < 1 || part[2] < 1)
    goto bad;
  if (i < len && s[i] == '.') {
    if (np != 6)
      goto bad;
    double scale = 0.1;
    size_t j = ++i;
    while (i < len && s[i] >= '0' && s[i] <= '9') {
      frac += (s[i] - '0') * scale;
      scale /= 10;
      i++;
    }
    if (i == j)
      goto bad;
    has_frac = true;
  }
  if (i < len && (s[i] == '+' || s[i] == '-')) {
    unsigned hh, mm;
    if (len - i != 5 || !digits(s + i + 1, 2, &hh) || !digits(s + i + 3, 2, &mm) || hh > 23 ||
        mm > 59)
      goto bad;
    off_min = (int)(hh * 60 + mm) * (s[i] == '-' ? -1 : 1);
    i += 5;
  }
  if (i != len)
    goto bad;
  static const unsigned mdays[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  unsigned y = part[0];
  bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  if (part[2] > mdays[part[1] - 1] || (part[1] == 2 && part[2] == 29 && !leap))
    goto bad;
  int64_t t = days_from_civil(y, part[1], part[2]) * 86400 + part[3] * 3600 + part[4] * 60 +
              part[5] - (int64_t)off_min * 60;
  if (has_frac)
    lua_pushnumber(L, (lua_Number)t + frac);
  else
    lua_pushinteger(L, (lua_Integer)t);
  return 1;
bad:
  luaL_pushfail(L);
  return 1;
}

static void format_ts(int64_t t, int off_min, bool with_off, char out[32]) {
  t += (int64_t)off_min * 60;
  int64_t days = t >= 0 ? t / 86400 : -((-t + 86399) / 86400);
  int64_t sec = t - days * 86400;
  int64_t y;
  unsigned m, d;
  civil_from_days(days, &y, &m, &d);
  int n = snprintf(out, 32, "%04d%02u%02u%02d%02d%02d", (int)y, m, d, (int)(sec / 3600),
                   (int)(sec / 60 % 60), (int)(sec % 60));
  if (with_off) {
    int a = off_min < 0 ? -off_min : off_min;
    snprintf(out + n, (size_t)(32 - n), "%c%02d%02d", off_min < 0 ? '-' : '+', a / 60, a % 60);
  }
}

/* hl7.format_time(t [, offset_minutes]) -> "YYYYMMDDHHMMSS" (UTC), or at the
 * offset with "+ZZZZ" appended when one is given. */
static int h_format_time(lua_State *L) {
  lua_Number tn = luaL_checknumber(L, 1);
  bool with_off = !lua_isnoneornil(L, 2);
  lua_Integer off = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, off > -24 * 60 && off < 24 * 60, 2, "offset out of range");
  luaL_argcheck(L, tn >= -62135596800.0 && tn < 253402300800.0, 1, "time out of range");
  char out[32];
  format_ts((int64_t)tn - (tn < 0 && (lua_Number)(int64_t)tn != tn), (int)off, with_off, out);
  lua_pushstring(L, out);
  return 1;
}

/* hl7.now(): local time with its UTC offset, "YYYYMMDDHHMMSS+ZZZZ". */
static int h_now(lua_State *L) {
  rr_script_t *s = script_of(L);
  time_t now = s->fixed_now ? (time_t)s->fixed_now : time(NULL);
  struct tm tm;
  int off = 0;
  if (!s->fixed_now && localtime_r(&now, &tm))
    off = (int)(tm.tm_gmtoff / 60);
  char out[32];
  format_ts((int64_t)now, off, true, out);
  lua_pushstring(L, out);
  return 1;
}

static int h_parse(lua_State *L) {
  size_t len;
  const char *t = luaL_checklstring(L, 1, &len);
  return push_parsed(L, t, len);
}

static int h_new(lua_State *L) {
  const char *version = luaL_optstring(L, 1, NULL);
  script_msg_t *sm = script_msg_push(L);
  script_charge(L, &sm->charge, 1024);
  int rc = rr_hl7_msg_create(sm->m, NULL, version);
  if (rc)
    return fail(L, "hl7.new", rc);
  return 1;
}

void script_open_hl7(lua_State *L) {
  static const luaL_Reg methods[] = {{"get", m_get},
                                     {"raw", m_raw},
                                     {"set", m_set},
                                     {"set_raw", m_set_raw},
                                     {"delete", m_delete},
                                     {"segments", m_segments},
                                     {"count", m_count},
                                     {"add_segment", m_add_segment},
                                     {"insert_segment", m_insert_segment},
                                     {"remove_segment", m_remove_segment},
                                     {"repetitions", m_repetitions},
                                     {"encode", m_encode},
                                     {"type", m_type},
                                     {"clone", m_clone},
                                     {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"parse", h_parse},
                                   {"new", h_new},
                                   {"now", h_now},
                                   {"timestamp", h_timestamp},
                                   {"format_time", h_format_time},
                                   {NULL, NULL}};
  luaL_newmetatable(L, MSG_MT);
  luaL_newlib(L, methods);
  lua_pushcclosure(L, msg_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, msg_newindex);
  lua_setfield(L, -2, "__newindex");
  lua_pushcfunction(L, m_encode);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, msg_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  lua_setglobal(L, "hl7");
}

/* Acknowledgements: original (AA/AE/AR) and enhanced (CA/CE/CR) mode,
 * with ERR segments in the layout of the message's HL7 version. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"
#include "hl7/hl7_int.h"

const char *rr_hl7_error_text(int hl7_code) {
  switch (hl7_code) {
  case 0: return "Message accepted";
  case RR_HL7_E_SEGMENT_SEQUENCE: return "Segment sequence error";
  case RR_HL7_E_REQUIRED_FIELD: return "Required field missing";
  case RR_HL7_E_DATA_TYPE: return "Data type error";
  case RR_HL7_E_TABLE_VALUE: return "Table value not found";
  case RR_HL7_E_VALUE_TOO_LONG: return "Value too long";
  case RR_HL7_E_UNSUPPORTED_MESSAGE_TYPE: return "Unsupported message type";
  case RR_HL7_E_UNSUPPORTED_EVENT: return "Unsupported event code";
  case RR_HL7_E_UNSUPPORTED_PROCESSING_ID: return "Unsupported processing id";
  case RR_HL7_E_UNSUPPORTED_VERSION: return "Unsupported version id";
  case RR_HL7_E_UNKNOWN_KEY: return "Unknown key identifier";
  case RR_HL7_E_DUPLICATE_KEY: return "Duplicate key identifier";
  case RR_HL7_E_RECORD_LOCKED: return "Application record locked";
  case RR_HL7_E_INTERNAL: return "Application internal error";
  default: return "";
  }
}

const char *rr_hl7_ack_code_name(rr_hl7_ack_code_t code) {
  static const char *const names[] = {"AA", "AE", "AR", "CA", "CE", "CR"};
  return (unsigned)code < 6 ? names[code] : "AE";
}

static rr_hl7_slice_t msh_field(const rr_hl7_msg_t *m, unsigned f) {
  rr_hl7_slice_t s = {"", 0};
  if (m && m->nsegs && memcmp(m->segs[0].name, "MSH", 3) == 0)
    rr_hl7_field_raw(m, 0, f, &s);
  return s;
}

static rr_hl7_ack_condition_t condition(rr_hl7_slice_t s) {
  if (s.len != 2)
    return RR_HL7_ACK_UNSET;
  if (memcmp(s.p, "AL", 2) == 0)
    return RR_HL7_ACK_AL;
  if (memcmp(s.p, "NE", 2) == 0)
    return RR_HL7_ACK_NE;
  if (memcmp(s.p, "ER", 2) == 0)
    return RR_HL7_ACK_ER;
  if (memcmp(s.p, "SU", 2) == 0)
    return RR_HL7_ACK_SU;
  return RR_HL7_ACK_UNSET;
}

rr_hl7_ack_mode_t rr_hl7_ack_mode(const rr_hl7_msg_t *m) {
  rr_hl7_ack_mode_t md = {false, RR_HL7_ACK_UNSET, RR_HL7_ACK_UNSET};
  rr_hl7_slice_t a = msh_field(m, 15), b = msh_field(m, 16);
  md.accept = condition(a);
  md.app = condition(b);
  md.enhanced = a.len > 0 || b.len > 0;
  return md;
}

rr_hl7_ack_code_t rr_hl7_ack_code_for(const rr_hl7_msg_t *m, rr_hl7_ack_kind_t kind) {
  bool enh = rr_hl7_ack_mode(m).enhanced;
  switch (kind) {
  case RR_HL7_ACCEPT: return enh ? RR_HL7_CA : RR_HL7_AA;
  case RR_HL7_ERROR: return enh ? RR_HL7_CE : RR_HL7_AE;
  default: return enh ? RR_HL7_CR : RR_HL7_AR;
  }
}

static bool cond_wants(rr_hl7_ack_condition_t c, bool success) {
  switch (c) {
  case RR_HL7_ACK_NE: return false;
  case RR_HL7_ACK_ER: return !success;
  case RR_HL7_ACK_SU: return success;
  default: return true; /* AL or unset */
  }
}

bool rr_hl7_ack_wanted(const rr_hl7_msg_t *m, rr_hl7_ack_code_t code) {
  rr_hl7_ack_mode_t md = rr_hl7_ack_mode(m);
  if (!md.enhanced)
    return true;
  bool ok = code == RR_HL7_AA || code == RR_HL7_CA;
  if (code >= RR_HL7_CA)
    return cond_wants(md.accept, ok);
  /* Application level: in enhanced mode an unset MSH-16 means "never". */
  return md.app == RR_HL7_ACK_UNSET ? false : cond_wants(md.app, ok);
}

/* Version as a number: "2.5.1" -> 251, "2.3" -> 230. 0 when unknown. */
static int version_num(rr_hl7_slice_t v, char comp) {
  int major = 0, minor = 0, patch = 0, *cur = &major;
  for (size_t i = 0; i < v.len && v.p[i] != comp; i++) {
    char c = v.p[i];
    if (c >= '0' && c <= '9') {
      *cur = *cur * 10 + (c - '0');
      if (*cur > 99)
        return 0;
    } else if (c == '.') {
      cur = cur == &major ? &minor : &patch;
    } else {
      break;
    }
  }
  return major * 100 + minor * 10 + patch;
}

static int put_field(rr_buf_t *out, char fs, rr_hl7_slice_t v) {
  int rc = rr_buf_putc(out, fs);
  return rc ? rc : rr_buf_append(out, v.p, v.len);
}

/* Appends text, escaped for delimiters d. */
static int put_text(rr_buf_t *out, const rr_hl7_delims_t *d, const char *s) {
  int rc = 0;
  for (; *s && rc == 0; s++) {
    char c = *s, e = 0;
    if (c == d->field)
      e = 'F';
    else if (c == d->component)
      e = 'S';
    else if (c == d->subcomponent)
      e = 'T';
    else if (c == d->repetition)
      e = 'R';
    else if (c == d->escape)
      e = 'E';
    else if (d->truncation && c == d->truncation)
      e = 'P';
    else if (c == '\r' || c == '\n')
      c = ' ';
    if (!e) {
      rc = rr_buf_putc(out, c);
    } else {
      char t[3] = {d->escape, e, d->escape};
      rc = rr_buf_append(out, t, 3);
    }
  }
  return rc;
}

static int put_err(rr_buf_t *out, const rr_hl7_delims_t *d, int ver, const rr_hl7_error_t *e) {
  const char fs = d->field, cs = d->component, ss = d->subcomponent;
  int code = e->hl7_code ? e->hl7_code : RR_HL7_E_INTERNAL;
  rr_buf_t t;
  int rc;
  rr_buf_init(&t, 1024);
  if (ver && ver < 250) {
    /* ERR-1 ELD: segment ^ sequence ^ field ^ code&text&HL70357 */
    rc = rr_buf_printf(&t, "ERR%c", fs);
    if (rc == 0 && e->segment_id[0])
      rc = put_text(&t, d, e->segment_id);
    if (rc == 0)
      rc = rr_buf_printf(&t, "%c", cs);
    if (rc == 0 && e->occurrence)
      rc = rr_buf_printf(&t, "%u", e->occurrence);
    if (rc == 0)
      rc = rr_buf_printf(&t, "%c", cs);
    if (rc == 0 && e->field)
      rc = rr_buf_printf(&t, "%u", e->field);
    if (rc == 0)
      rc = rr_buf_printf(&t, "%c%d%c", cs, code, ss);
    if (rc == 0)
      rc = put_text(&t, d, rr_hl7_error_text(code));
    if (rc == 0)
      rc = rr_buf_printf(&t, "%cHL70357", ss);
  } else {
    /* ERR-2 ERL, ERR-3 CWE, ERR-4 severity, ERR-8 user message */
    rc = rr_buf_printf(&t, "ERR%c%c", fs, fs);
    if (rc == 0 && e->segment_id[0]) {
      rc = put_text(&t, d, e->segment_id);
      if (rc == 0)
        rc = rr_buf_printf(&t, "%c%u", cs, e->occurrence ? e->occurrence : 1);
      if (rc == 0 && e->field) {
        rc = rr_buf_printf(&t, "%c%u", cs, e->field);
        if (rc == 0 && (e->repetition || e->component))
          rc = rr_buf_printf(&t, "%c%u", cs, e->repetition ? e->repetition : 1);
        if (rc == 0 && e->component)
          rc = rr_buf_printf(&t, "%c%u", cs, e->component);
        if (rc == 0 && e->component && e->subcomponent)
          rc = rr_buf_printf(&t, "%c%u", cs, e->subcomponent);
      }
    }
    if (rc == 0)
      rc = rr_buf_printf(&t, "%c%d%c", fs, code, cs);
    if (rc == 0)
      rc = put_text(&t, d, rr_hl7_error_text(code));
    if (rc == 0)
      rc = rr_buf_printf(&t, "%cHL70357%cE%c%c%c%c", cs, fs, fs, fs, fs, fs);
    if (rc == 0)
      rc = put_text(&t, d, e->text);
  }
  if (rc == 0)
    rc = rr_buf_append(out, t.data, t.len);
  if (rc == 0)
    rc = rr_buf_putc(out, '\r');
  rr_buf_close(&t);
  return rc;
}

int rr_hl7_ack_build(const rr_hl7_msg_t *orig, rr_hl7_ack_code_t code,
                     const rr_hl7_ack_options_t *o, rr_buf_t *out) {
  static const rr_hl7_delims_t std = {'|', '^', '~', '\\', '&', 0};
  bool have_msh = orig && orig->nsegs && memcmp(orig->segs[0].name, "MSH", 3) == 0;
  const rr_hl7_delims_t *d = have_msh ? &orig->d : &std;
  const char fs = d->field;
  rr_hl7_slice_t ver = msh_field(have_msh ? orig : NULL, 12);
  int v = version_num(ver, d->component);
  size_t start = out->len;

  int rc = rr_buf_printf(out, "MSH%c%c%c%c%c", fs, d->component, d->repetition, d->escape,
                         d->subcomponent);
  if (rc == 0 && d->truncation)
    rc = rr_buf_putc(out, d->truncation);
  static const unsigned swap[4] = {5, 6, 3, 4};
  for (int i = 0; rc == 0 && i < 4; i++)
    rc = put_field(out, fs, msh_field(have_msh ? orig : NULL, swap[i]));
  if (rc == 0)
    rc = rr_buf_putc(out, fs);
  if (rc == 0 && o->timestamp)
    rc = rr_buf_puts(out, o->timestamp);
  /* MSH-8 security empty; MSH-9 ACK^<trigger>[^ACK] */
  if (rc == 0)
    rc = rr_buf_printf(out, "%c%cACK", fs, fs);
  rr_hl7_slice_t type = msh_field(have_msh ? orig : NULL, 9), trig = {"", 0};
  rr_hl7_piece(type.p, type.len, d->component, 2, &trig);
  if (rc == 0 && trig.len) {
    rc = rr_buf_putc(out, d->component);
    if (rc == 0)
      rc = rr_buf_append(out, trig.p, trig.len);
    if (rc == 0 && (v == 0 || v >= 231))
      rc = rr_buf_printf(out, "%cACK", d->component);
  }
  if (rc == 0)
    rc = rr_buf_putc(out, fs);
  if (rc == 0 && o->control_id)
    rc = put_text(out, d, o->control_id);
  rr_hl7_slice_t pid = msh_field(have_msh ? orig : NULL, 11);
  if (rc == 0)
    rc = put_field(out, fs, pid.len ? pid : (rr_hl7_slice_t){"P", 1});
  if (rc == 0)
    rc = put_field(out, fs, ver.len ? ver : (rr_hl7_slice_t){"2.5.1", 5});
  /* An acknowledgement is never itself acknowledged: in enhanced mode it
   * says so in MSH-15/16. MSH-18 is echoed so the sender decodes it alike. */
  bool enh = rr_hl7_ack_mode(have_msh ? orig : NULL).enhanced;
  rr_hl7_slice_t cs = msh_field(have_msh ? orig : NULL, 18);
  rr_hl7_slice_t none = {"", 0}, ne = {"NE", enh ? 2 : 0};
  const rr_hl7_slice_t tail[6] = {none, none, ne, ne, none, cs};
  size_t ntail = cs.len ? 6 : enh ? 4 : 0;
  for (size_t i = 0; rc == 0 && i < ntail; i++)
    rc = put_field(out, fs, tail[i]);
  if (rc == 0)
    rc = rr_buf_printf(out, "\rMSA%c%s%c", fs, rr_hl7_ack_code_name(code), fs);
  rr_hl7_slice_t ctl = msh_field(have_msh ? orig : NULL, 10);
  if (rc == 0)
    rc = rr_buf_append(out, ctl.p, ctl.len);
  if (rc == 0 && o->text && *o->text && (v == 0 || v < 250)) {
    rc = rr_buf_putc(out, fs);
    if (rc == 0)
      rc = put_text(out, d, o->text);
  }
  if (rc == 0)
    rc = rr_buf_putc(out, '\r');
  for (size_t i = 0; rc == 0 && i < o->nerrors; i++)
    rc = put_err(out, d, v, &o->errors[i]);
  if (rc)
    out->len = start;
  return rc;
}

void rr_hl7_ts_format(int64_t unix_s, int ms, int utc_offset_min, char out[32]) {
  time_t t = (time_t)(unix_s + (int64_t)utc_offset_min * 60);
  struct tm tm;
  gmtime_r(&t, &tm);
  unsigned off = (unsigned)(utc_offset_min < 0 ? -utc_offset_min : utc_offset_min) % 6000;
  unsigned msu = (unsigned)(ms < 0 ? 0 : ms) % 1000;
  unsigned year = (unsigned)(tm.tm_year + 1900) % 10000;
  snprintf(out, 32, "%04u%02u%02u%02u%02u%02u.%03u%c%02u%02u", year, (unsigned)tm.tm_mon % 12 + 1,
           (unsigned)tm.tm_mday % 32, (unsigned)tm.tm_hour % 24, (unsigned)tm.tm_min % 60,
           (unsigned)tm.tm_sec % 61, msu, utc_offset_min < 0 ? '-' : '+', off / 60, off % 60);
}

/* Inbound MLLP channel: parse, classify, journal, then acknowledge. */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/time.h>

#include "audit/config_audit.h"
#include "channel/channel_int.h"
#include "core/array.h"
#include "core/error.h"
#include "core/log.h"
#include "dicom/scp.h"

/* A reply waiting for the commit. */
typedef struct pending_ack {
  rr_mllp_conn_t *conn;         /* NULL for a message another channel routed here */
  rr_dispatch_inject_done done; /* ... then told once it is kept (or not) */
  void *done_ud;
  bool refused;  /* answered AE/AR: a routed message the channel did not take */
  char ctl[128]; /* MSH-10, for logs */
  rr_channel_t *ch;
  size_t len;     /* the ACK: data[0..len) */
  size_t nak_len; /* the NAK for a failed commit: data[len..len+nak_len) */
  bool send_ack;  /* MSH-15 (enhanced mode) asks for this answer */
  bool send_nak;
  size_t app_len; /* enhanced-mode application ACK after the commit ACK:
                     data[len+nak_len..+app_len), 0 when none */
  uint64_t t0;    /* uv_hrtime when the message was taken: ACK latency */
  char data[];
} pending_ack_t;

int64_t rr_wall_ms(void) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

bool rr_channel_accepts(char *const *accept, const char *type, const char *event) {
  if (!accept)
    return true;
  for (; *accept; accept++) {
    const char *a = *accept;
    size_t tl = strlen(type);
    if (strncmp(a, type, tl) != 0)
      continue;
    if (a[tl] == '\0' || strcmp(a + tl, "^*") == 0)
      return true;
    if (a[tl] == '^' && strcmp(a + tl + 1, event) == 0)
      return true;
  }
  return false;
}

/* Copies the decoded value at path into out (empty when absent). */
static void value(const rr_hl7_msg_t *m, const char *path, char *out, size_t cap) {
  rr_buf_t b;
  rr_buf_init(&b, cap - 1);
  out[0] = '\0';
  if (rr_hl7_get_s(m, path, &b) == 0 && b.len)
    snprintf(out, cap, "%s", b.data);
  rr_buf_close(&b);
}

/* MRN: the PID-3 repetition typed MR, else the first one. */
static void find_mrn(const rr_hl7_msg_t *m, char *out, size_t cap) {
  char path[32], type[16];
  for (unsigned r = 1; r <= 10; r++) {
    snprintf(path, sizeof path, "PID-3[%u].5", r);
    value(m, path, type, sizeof type);
    if (strcmp(type, "MR") == 0) {
      snprintf(path, sizeof path, "PID-3[%u].1", r);
      value(m, path, out, cap);
      return;
    }
  }
  value(m, "PID-3[1].1", out, cap);
}

static void find_study_uid(const rr_hl7_msg_t *m, char *out, size_t cap) {
  value(m, "ZDS-1.1", out, cap);
  if (!*out)
    value(m, "IPC-3.1", out, cap);
  for (unsigned k = 1; !*out && k < 200; k++) {
    char path[32], code[32];
    snprintf(path, sizeof path, "OBX[%u]-3.1", k);
    rr_hl7_slice_t s;
    if (rr_hl7_get_raw_s(m, path, &s) != 0)
      break;
    value(m, path, code, sizeof code);
    if (strcmp(code, "113014") == 0) {
      snprintf(path, sizeof path, "OBX[%u]-5", k);
      value(m, path, out, cap);
    }
  }
}

static void send_ack(void *ud, int status, int64_t id) {
  pending_ack_t *p = ud;
  rr_channel_t *ch = p->ch;
  (void)id;
  if (!p->conn) { /* routed here by another channel */
    if (status)
      rr_log(RR_LOG_ERROR, "channel",
             "event=not_stored channel=%s source=channel control_id=%s error=\"%s\"", ch->cfg.name,
             p->ctl, rr_strerror(status));
    if (status == 0 && p->refused)
      p->done(p->done_ud, RR_EINVAL, "refused by the channel (see its journal)");
    else
      p->done(p->done_ud, status, status ? "not kept by the channel's journal" : NULL);
    free(p);
    return;
  }
  if (status == 0) {
    rr_histo_observe(&ch->ack_latency, (double)(uv_hrtime() - p->t0) / 1e9);
    if (p->send_ack)
      rr_mllp_conn_reply(p->conn, p->data, p->len);
    else
      rr_mllp_conn_done(p->conn);
    if (p->app_len)
      rr_mllp_conn_send(p->conn, p->data + p->len + p->nak_len, p->app_len);
  } else {
    /* Not kept: answer "rejected, resend later" (AR/CR with ERR 207). */
    if (p->send_nak)
      rr_mllp_conn_reply(p->conn, p->data + p->len, p->nak_len);
    else
      rr_mllp_conn_done(p->conn);
    rr_log(RR_LOG_ERROR, "channel",
           "event=not_stored channel=%s conn=%llu control_id=%s error=\"%s\" detail=\"answered "
           "resend later; the cause is in event=commit_failed\"",
           ch->cfg.name, (unsigned long long)rr_mllp_conn_id(p->conn), p->ctl, rr_strerror(status));
  }
  rr_mllp_conn_release(p->conn);
  free(p);
}

/* The priority lane a message asks for by itself: STAT orders (ORC-7.6,
 * OBR-27.6 or TQ1-9 "S") go before routine ones. */
static int default_lane(const rr_hl7_msg_t *m) {
  static const char *const paths[] = {"ORC-7.6", "OBR-27.6", "TQ1-9.1"};
  for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
    char v[8];
    value(m, paths[i], v, sizeof v);
    if (strcmp(v, "S") == 0)
      return 1;
  }
  return 0;
}

/* The script's routes as journal routes (pointing into sr), each to a
 * destination the channel declares. RR_EINVAL (reason in sr) for a name it
 * does not declare, RR_ENOMEM. */
int rr_channel_build_routes(const rr_channel_t *ch, const rr_hl7_msg_t *m, int lane0,
                            const char *mrn, rr_script_result_t *sr, rr_journal_route_t **out,
                            size_t *nout) {
  rr_journal_route_t *v = calloc(sr->nroutes, sizeof *v);
  if (!v)
    return RR_ENOMEM;
  int lane = -1;
  for (size_t i = 0; i < sr->nroutes; i++) {
    const rr_script_route_t *rt = &sr->routes[i];
    const rr_destination_config_t *d = NULL;
    for (size_t k = 0; k < ch->cfg.ndestinations && !d; k++)
      if (strcmp(ch->cfg.destinations[k].short_name, rt->destination) == 0)
        d = &ch->cfg.destinations[k];
    if (!d) {
      snprintf(sr->reason, sizeof sr->reason, "ctx:route: channel %s has no destination \"%.64s\"",
               ch->cfg.name, rt->destination);
      free(v);
      return RR_EINVAL;
    }
    if (rt->lane < 0 && lane < 0)
      lane = m ? default_lane(m) : lane0;
    v[i] = (rr_journal_route_t){.destination = d->name,
                                .key = rt->key       ? rt->key
                                       : d->key_none ? ""
                                                     : mrn,
                                .lane = rt->lane >= 0 ? rt->lane : lane,
                                .content_type = rt->is_hl7 ? "hl7" : "json",
                                .payload = rt->payload,
                                .len = rt->len};
  }
  *out = v;
  *nout = sr->nroutes;
  return 0;
}

/* One inbound message, from a connection (c) or routed here by another
 * channel (c NULL: done is told once it is kept). Returns 0, or for a
 * routed message a negative code when nothing was queued (done not
 * called). */
static int process(rr_channel_t *ch, rr_mllp_conn_t *c, const char *data, size_t len,
                   uint64_t offset, rr_dispatch_inject_done done, void *done_ud) {
  rr_engine_t *e = ch->engine;
  const unsigned long long cid = c ? (unsigned long long)rr_mllp_conn_id(c) : 0;
  const char *peer = c ? rr_mllp_conn_peer(c) : "channel";
  rr_hl7_msg_t *m = ch->msg;
  rr_hl7_error_t err;
  ch->received++;
  /* The frame outlives this call, and so does nothing of the message. */
  rr_hl7_options_t opt = ch->cfg.hl7;
  opt.borrow = true;
  int prc = rr_hl7_parse(m, data, len, &opt, &err);

  char type[32], event[32], ctl[128], app[128], fac[128], mrn[128], acc[128], uid[128];
  value(m, "MSH-9.1", type, sizeof type);
  value(m, "MSH-9.2", event, sizeof event);
  value(m, "MSH-10", ctl, sizeof ctl);
  value(m, "MSH-3.1", app, sizeof app);
  value(m, "MSH-4.1", fac, sizeof fac);
  mrn[0] = acc[0] = uid[0] = '\0';
  if (prc == 0) {
    find_mrn(m, mrn, sizeof mrn);
    value(m, "OBR-18.1", acc, sizeof acc);
    if (!*acc)
      value(m, "IPC-1.1", acc, sizeof acc);
    if (!*acc)
      value(m, "ORC-3.1", acc, sizeof acc);
    find_study_uid(m, uid, sizeof uid);
  }

  const char *status = "accepted";
  rr_hl7_ack_kind_t kind = RR_HL7_ACCEPT;
  char etext[600] = "";
  rr_hl7_error_t ack_err = {0};
  size_t nerr = 0;
  rr_journal_dup_t dup = {0};
  rr_journal_route_t *routes = NULL; /* point into sr */
  size_t nroutes = 0;
  rr_script_result_t sr;
  memset(&sr, 0, sizeof sr);
  if (*ctl && rr_journal_find(e->journal, ch->cfg.name, *app ? app : NULL, *fac ? fac : NULL, ctl,
                              data, len, &dup) != 0)
    dup.found = false; /* the lookup failed: treat as new, the journal keeps both */
  if (dup.found && dup.same_content) {
    /* A resend: the stored answer again, byte for byte, in order behind
     * what this connection sent before; not processed a second time. */
    ch->duplicates++;
    rr_log(RR_LOG_INFO, "channel",
           "event=duplicate channel=%s conn=%llu control_id=%s first_id=%lld", ch->cfg.name, cid,
           ctl, (long long)dup.id);
    pending_ack_t *p = malloc(sizeof *p + dup.ack_len);
    if (!p) {
      free(dup.ack);
      if (c)
        rr_mllp_conn_close(c);
      return RR_ENOMEM;
    }
    p->conn = c;
    p->done = done;
    p->done_ud = done_ud;
    p->refused = false;
    snprintf(p->ctl, sizeof p->ctl, "%s", ctl);
    p->ch = ch;
    p->len = dup.ack_len;
    p->nak_len = 0;
    p->app_len = 0;
    p->send_ack = dup.ack != NULL;
    p->send_nak = false;
    if (dup.ack_len)
      memcpy(p->data, dup.ack, dup.ack_len);
    free(dup.ack);
    if (c)
      rr_mllp_conn_hold(c);
    if (rr_journal_add_barrier(e->journal, send_ack, p) != 0) {
      free(p);
      if (!c)
        return RR_ENOMEM;
      rr_mllp_conn_release(c);
      rr_mllp_conn_close(c);
    }
    return 0;
  }
  free(dup.ack);
  if (prc) {
    status = "error";
    kind = RR_HL7_ERROR;
    ack_err = err;
    ack_err.offset += 0;
    nerr = 1;
    snprintf(etext, sizeof etext, "%s", err.text);
    rr_log(RR_LOG_WARN, "channel",
           "event=parse_error channel=%s conn=%llu peer=%s control_id=%s offset=%llu hl7_code=%d "
           "detail=\"%s\"",
           ch->cfg.name, cid, peer, ctl, (unsigned long long)(offset + 1 + err.offset),
           err.hl7_code, err.text);
  } else if (dup.found) {
    /* Same sender and control id, different content: refused, kept. */
    status = "rejected";
    kind = RR_HL7_REJECT;
    ack_err.hl7_code = RR_HL7_E_DUPLICATE_KEY;
    memcpy(ack_err.segment_id, "MSH", 4);
    ack_err.occurrence = 1;
    ack_err.field = 10;
    snprintf(ack_err.text, sizeof ack_err.text,
             "control id already used by message %lld with different content", (long long)dup.id);
    snprintf(etext, sizeof etext, "%s", ack_err.text);
    nerr = 1;
    rr_log(RR_LOG_WARN, "channel",
           "event=duplicate_conflict channel=%s conn=%llu control_id=%s first_id=%lld",
           ch->cfg.name, cid, ctl, (long long)dup.id);
  } else if (!rr_channel_accepts(ch->cfg.accept, type, event)) {
    status = "rejected";
    kind = RR_HL7_REJECT;
    ack_err.hl7_code = RR_HL7_E_UNSUPPORTED_MESSAGE_TYPE;
    memcpy(ack_err.segment_id, "MSH", 4);
    ack_err.occurrence = 1;
    ack_err.field = 9;
    snprintf(ack_err.text, sizeof ack_err.text, "channel %s does not take %s^%s", ch->cfg.name,
             type, event);
    snprintf(etext, sizeof etext, "%s", ack_err.text);
    nerr = 1;
    rr_log(RR_LOG_WARN, "channel", "event=rejected channel=%s conn=%llu control_id=%s type=%s^%s",
           ch->cfg.name, cid, ctl, type, event);
  } else if (ch->script) {
    /* The channel's script decides: route, filter, reject, or fail. */
    rr_script_input_t in = {data, len, peer, ctl};
    if (rr_script_run(ch->script, &in, &sr) != 0) {
      sr.verdict = RR_SCRIPT_ERROR;
      snprintf(sr.reason, sizeof sr.reason, "out of memory building the script's result");
    }
    for (size_t i = 0; i < sr.nlogs; i++)
      rr_log((rr_log_level_t)sr.logs[i].level, "script", "channel=%s control_id=%s msg=\"%s\"",
             ch->cfg.name, ctl, sr.logs[i].text);
    if (sr.verdict == RR_SCRIPT_PASS && sr.nroutes &&
        rr_channel_build_routes(ch, m, 0, mrn, &sr, &routes, &nroutes) != 0) {
      sr.verdict = RR_SCRIPT_ERROR;
      if (!sr.reason[0])
        snprintf(sr.reason, sizeof sr.reason, "out of memory queuing the routes");
      free(routes);
      routes = NULL;
      nroutes = 0;
    }
    switch (sr.verdict) {
    case RR_SCRIPT_PASS:
      for (size_t i = 0; i < sr.nroutes; i++)
        rr_log(RR_LOG_DEBUG, "channel", "event=routed channel=%s control_id=%s destination=%s",
               ch->cfg.name, ctl, sr.routes[i].destination);
      break;
    case RR_SCRIPT_FILTERED:
      status = "filtered";
      ch->filtered++;
      snprintf(etext, sizeof etext, "%s", sr.reason);
      break;
    case RR_SCRIPT_REJECTED:
      status = "rejected";
      kind = RR_HL7_REJECT;
      ack_err.hl7_code = RR_HL7_E_INTERNAL;
      snprintf(ack_err.text, sizeof ack_err.text, "%.150s", sr.reason);
      snprintf(etext, sizeof etext, "%s", sr.reason);
      nerr = 1;
      rr_log(RR_LOG_WARN, "channel", "event=script_rejected channel=%s conn=%llu control_id=%s",
             ch->cfg.name, cid, ctl);
      break;
    default:
      /* Kept with the script's file:line and message, for review. */
      status = "error";
      ch->script_errors++;
      kind = (rr_hl7_ack_kind_t)ch->cfg.on_script_error;
      snprintf(etext, sizeof etext, "script: %s", sr.reason);
      if (kind != RR_HL7_ACCEPT) {
        ack_err.hl7_code = RR_HL7_E_INTERNAL;
        snprintf(ack_err.text, sizeof ack_err.text, "%.150s", etext);
        nerr = 1;
      }
      rr_log(RR_LOG_ERROR, "channel", "event=script_error channel=%s control_id=%s error=\"%s\"",
             ch->cfg.name, ctl, sr.reason);
      break;
    }
  }
  rr_hl7_ack_code_t code = rr_hl7_ack_code_for(m, kind);
  const bool r2 = ch->cfg.mllp_release == 2;

  char ack_id[48], ts[32];
  int64_t now = rr_wall_ms();
  /* Unique across restarts (start time in ms) and within a run (a 32-bit
   * sequence, about five days at 10,000 messages/s before it wraps):
   * R + 11 + 8 hex digits = 20 characters, the ST length of MSH-10. */
  snprintf(ack_id, sizeof ack_id, "R%011llX%08llX",
           (unsigned long long)e->start_ms & 0xFFFFFFFFFFFull,
           (unsigned long long)(++e->ack_seq & 0xFFFFFFFFull));
  rr_hl7_ts_format(now / 1000, (int)(now % 1000), 0, ts);
  rr_buf_t ack;
  rr_buf_init(&ack, 1 << 20);
  rr_hl7_ack_options_t ao = {ack_id, ts, nerr ? etext : NULL, nerr ? &ack_err : NULL, nerr};
  /* MLLP release 2: the answer is a commit block, 0x06 once the message is
   * stored (whatever its status), 0x15 when it could not be. */
  int rc = r2 ? rr_buf_putc(&ack, 0x06) : rr_hl7_ack_build(m, code, &ao, &ack);
  size_t ack_len = ack.len;
  rr_hl7_error_t store_err = {0};
  store_err.hl7_code = RR_HL7_E_INTERNAL;
  snprintf(store_err.text, sizeof store_err.text, "message store unavailable, resend later");
  rr_hl7_ack_options_t no = {ack_id, ts, store_err.text, &store_err, 1};
  rr_hl7_ack_code_t nak_code = rr_hl7_ack_mode(m).enhanced ? RR_HL7_CR : RR_HL7_AR;
  if (rc == 0)
    rc = r2 ? rr_buf_putc(&ack, 0x15) : rr_hl7_ack_build(m, nak_code, &no, &ack);
  size_t nak_end = ack.len;
  /* Enhanced mode with MSH-16 AL/SU: the application acknowledgement
   * follows the commit ACK once the message is kept. (Processing is storing
   * it for now; channel scripts will come before it.) */
  if (rc == 0 && !r2 && kind == RR_HL7_ACCEPT && rr_hl7_ack_mode(m).enhanced &&
      rr_hl7_ack_wanted(m, RR_HL7_AA)) {
    char app_id[48];
    snprintf(app_id, sizeof app_id, "R%011llX%08llX",
             (unsigned long long)e->start_ms & 0xFFFFFFFFFFFull,
             (unsigned long long)(++e->ack_seq & 0xFFFFFFFFull));
    rr_hl7_ack_options_t apo = {app_id, ts, NULL, NULL, 0};
    rc = rr_hl7_ack_build(m, RR_HL7_AA, &apo, &ack);
  }
  pending_ack_t *p = rc ? NULL : malloc(sizeof *p + ack.len);
  if (!p) {
    rr_buf_close(&ack);
    free(routes);
    rr_script_result_close(&sr);
    if (c)
      rr_mllp_conn_close(c);
    return RR_ENOMEM;
  }
  p->conn = c;
  p->done = done;
  p->done_ud = done_ud;
  p->ch = ch;
  p->send_ack = r2 || rr_hl7_ack_wanted(m, code);
  p->send_nak = r2 || rr_hl7_ack_wanted(m, nak_code);
  p->refused = kind != RR_HL7_ACCEPT;
  snprintf(p->ctl, sizeof p->ctl, "%s", ctl);
  p->len = ack_len;
  p->nak_len = nak_end - ack_len;
  p->app_len = ack.len - nak_end;
  p->t0 = uv_hrtime();
  memcpy(p->data, ack.data, ack.len);
  rr_buf_close(&ack);

  char fulltype[72];
  snprintf(fulltype, sizeof fulltype, "%s%s%s", type, *event ? "^" : "", event);
  rr_journal_entry_t je = {.channel = ch->cfg.name,
                           .peer = peer,
                           .received_ms = now,
                           .sending_app = *app ? app : NULL,
                           .sending_facility = *fac ? fac : NULL,
                           .message_type = *type ? fulltype : NULL,
                           .control_id = *ctl ? ctl : NULL,
                           .mrn = *mrn ? mrn : NULL,
                           .accession = *acc ? acc : NULL,
                           .study_uid = *uid ? uid : NULL,
                           .status = status,
                           .error = *etext ? etext : NULL,
                           .raw = data,
                           .raw_len = len,
                           .ack = p->send_ack ? p->data : NULL,
                           .ack_len = p->send_ack ? p->len : 0,
                           .source = c ? ((uint64_t)(uintptr_t)ch << 20) ^ cid : 0,
                           .routes = routes,
                           .nroutes = nroutes};
  if (c)
    rr_mllp_conn_hold(c);
  int arc = rr_journal_add(e->journal, &je, send_ack, p);
  free(routes);
  rr_script_result_close(&sr);
  if (arc != 0) {
    free(p);
    if (!c)
      return arc;
    rr_mllp_conn_release(c);
    rr_mllp_conn_close(c);
    return 0;
  }
  if (kind == RR_HL7_ACCEPT)
    ch->accepted++;
  else if (kind == RR_HL7_ERROR)
    ch->errored++;
  else
    ch->rejected++;
  rr_log(RR_LOG_DEBUG, "channel", "event=received channel=%s conn=%llu control_id=%s type=%s",
         ch->cfg.name, cid, ctl, fulltype);
  return 0;
}

static void on_frame(void *ud, rr_mllp_conn_t *c, const char *data, size_t len, uint64_t offset) {
  process(ud, c, data, len, offset, NULL, NULL);
}

int rr_engine_inject(void *ud, const char *channel, const char *payload, size_t len,
                     rr_dispatch_inject_done done, void *done_ud) {
  rr_engine_t *e = ud;
  rr_channel_t *ch = e->channels;
  while (ch && strcmp(ch->cfg.name, channel) != 0)
    ch = ch->next;
  if (!ch)
    return RR_ENOTFOUND;
  if (e->stopping)
    return UV_ECANCELED;
  return process(ch, NULL, payload, len, 0, done, done_ud);
}

int rr_engine_replay(void *ud, int64_t message_id, const char *destination) {
  rr_engine_t *e = ud;
  char chname[64] = "", ctl[128] = "", mrn[128] = "";
  rr_buf_t raw;
  rr_buf_init(&raw, (size_t)1 << 30);
  rr_script_result_t sr;
  memset(&sr, 0, sizeof sr);
  rr_journal_route_t *routes = NULL;
  size_t n = 0, keep = 0;
  int rc = rr_journal_message(e->journal, message_id, chname, sizeof chname, &raw);
  rr_channel_t *ch = NULL;
  for (ch = e->channels; rc == 0 && ch && strcmp(ch->cfg.name, chname) != 0; ch = ch->next)
    ;
  if (rc == 0 && !ch)
    rc = RR_ENOTFOUND;
  if (rc)
    goto out;
  if (ch->cfg.dicom && raw.len && raw.data[0] == '{') { /* a study event: on_study again */
    json_t *ctx = json_loadb(raw.data, raw.len, 0, NULL);
    char etext[600];
    if (ctx)
      rr_channel_study_script(ch, raw.data, raw.len, ctx,
                              json_string_value(json_object_get(ctx, "study_uid")), &sr, &routes,
                              &n, etext, sizeof etext);
    json_decref(ctx);
    goto pick;
  }
  rr_hl7_options_t opt = ch->cfg.hl7;
  opt.borrow = true;
  rr_hl7_error_t err;
  if (!ch->script || rr_hl7_parse(ch->msg, raw.data, raw.len, &opt, &err) != 0)
    goto out; /* nothing a script could route */
  value(ch->msg, "MSH-10", ctl, sizeof ctl);
  find_mrn(ch->msg, mrn, sizeof mrn);
  rr_script_input_t in = {raw.data, raw.len, "replay", ctl};
  if ((rc = rr_script_run(ch->script, &in, &sr)) != 0)
    goto out;
  if (sr.verdict != RR_SCRIPT_PASS || sr.nroutes == 0)
    goto out;
  if ((rc = rr_channel_build_routes(ch, ch->msg, 0, mrn, &sr, &routes, &n)) != 0)
    goto out;
pick:
  for (size_t i = 0; i < n; i++)
    if (strcmp(routes[i].destination, destination) == 0)
      routes[keep++] = routes[i];
  if (keep &&
      (rc = rr_journal_queue_routes(e->journal, message_id, rr_wall_ms(), routes, keep)) == 0)
    rr_journal_kick(e->journal);
out:
  rr_log(rc ? RR_LOG_WARN : RR_LOG_INFO, "channel",
         "event=replay channel=%s message_id=%lld destination=%s queued=%zu verdict=%s%s%s", chname,
         (long long)message_id, destination, rc ? 0 : keep,
         rc                                 ? "-"
         : sr.verdict == RR_SCRIPT_PASS     ? "pass"
         : sr.verdict == RR_SCRIPT_FILTERED ? "filtered"
         : sr.verdict == RR_SCRIPT_REJECTED ? "rejected"
                                            : "error",
         rc ? " error=" : "", rc ? rr_strerror(rc) : "");
  free(routes);
  rr_script_result_close(&sr);
  rr_buf_close(&raw);
  return rc ? rc : (int)keep;
}

/* Group commit: everything the loop read in this iteration, in one
 * transaction, then the ACKs (Redis's before-sleep write barrier). */
static void on_check(uv_check_t *h) {
  rr_engine_t *e = h->data;
  if (rr_journal_pending(e->journal))
    rr_journal_kick(e->journal);
}

int rr_engine_new(uv_loop_t *loop, rr_journal_t *journal, rr_engine_t **out) {
  rr_engine_t *e = calloc(1, sizeof *e);
  if (!e)
    return RR_ENOMEM;
  e->loop = loop;
  e->journal = journal;
  e->start_ms = rr_wall_ms();
  uv_check_init(loop, &e->commit);
  e->commit.data = e;
  uv_check_start(&e->commit, on_check);
  uv_unref((uv_handle_t *)&e->commit);
  *out = e;
  return 0;
}

static void fix_tls_pointers(rr_channel_config_t *c);

/* The scripts' store: the journal's key-value table; writes commit with the
 * batch of the message being handled. */
static int kv_get(void *ud, const char *key, rr_buf_t *out) {
  rr_engine_t *e = ud;
  return rr_journal_kv_get(e->journal, key, out);
}

static int kv_set(void *ud, const char *key, const char *value, size_t len) {
  rr_engine_t *e = ud;
  return rr_journal_kv_set(e->journal, key, value, len, rr_wall_ms());
}

/* The scripts' order store (orders.keep/get): table orders; a kept order
 * commits with the batch of the message being handled. */
static int order_keep(void *ud, const char *text, size_t len, rr_buf_t *err) {
  rr_channel_t *ch = ud;
  json_error_t jerr;
  json_t *o = json_loadb(text, len, 0, &jerr);
  if (!json_is_object(o)) {
    json_decref(o);
    rr_buf_printf(err, "an order record is a table of fields");
    return RR_EINVAL;
  }
  static const char *const keys[] = {"accession",  "placer_order", "filler_order", "mrn",
                                     "study_uid",  "modality",     "priority",     "order_control",
                                     "ordered_at", "scheduled_at"};
  const char *v[10];
  int rc = 0;
  for (int i = 0; i < 10; i++) {
    json_t *f = json_object_get(o, keys[i]);
    v[i] = json_string_value(f);
    if (f && !json_is_null(f) && !v[i] && rc == 0) {
      rr_buf_printf(err, "field %s must be a string", keys[i]);
      rc = RR_EINVAL;
    }
    if (v[i] && strlen(v[i]) > 256 && rc == 0) {
      rr_buf_printf(err, "field %s is longer than 256 bytes", keys[i]);
      rc = RR_EINVAL;
    }
    if (v[i] && !*v[i])
      v[i] = NULL;
  }
  if (rc == 0 && !v[0] && !v[1]) {
    rr_buf_printf(err, "an order needs an accession or a placer_order");
    rc = RR_EINVAL;
  }
  if (rc == 0) {
    rr_journal_order_t jo = {.channel = ch->cfg.name,
                             .accession = v[0],
                             .placer = v[1],
                             .filler = v[2],
                             .mrn = v[3],
                             .study_uid = v[4],
                             .modality = v[5],
                             .priority = v[6],
                             .order_control = v[7],
                             .ordered_at = v[9] ? v[9] : v[8], /* the exam's time */
                             .record = text,
                             .record_len = len,
                             .received_ms = rr_wall_ms()};
    rc = rr_journal_keep_order(ch->engine->journal, &jo);
    if (rc == RR_ENOMEM)
      rr_buf_printf(err, "out of memory");
  }
  json_decref(o);
  return rc;
}

static int order_get(void *ud, const char *accession, rr_buf_t *out) {
  rr_channel_t *ch = ud;
  return rr_journal_order_get(ch->engine->journal, accession, out);
}

/* Compiles the channel's script; on success it replaces the running one. */
static int load_script(rr_channel_t *ch) {
  rr_script_config_t sc;
  rr_script_config_default(&sc);
  sc.kv = (rr_script_kv_t){ch->engine, kv_get, kv_set};
  sc.orders = (rr_script_orders_t){ch, order_keep, order_get};
  sc.ai = rr_channel_script_ai(ch);
  sc.channel = ch->cfg.name;
  sc.path = ch->cfg.script;
  sc.lib_dir = ch->cfg.script_lib[0] ? ch->cfg.script_lib : NULL;
  rr_buf_t err;
  rr_buf_init(&err, 1 << 16);
  rr_script_t *s = NULL;
  int rc = rr_script_load(&sc, &s, &err);
  if (rc) {
    rr_log(RR_LOG_ERROR, "script", "event=script_load_failed channel=%s path=%s error=\"%s\"",
           ch->cfg.name, ch->cfg.script, err.data ? err.data : rr_strerror(rc));
  } else {
    if (ch->script) {
      rr_log(RR_LOG_INFO, "script", "event=script_reloaded channel=%s path=%s", ch->cfg.name,
             ch->cfg.script);
      char real[PATH_MAX];
      if (realpath(ch->cfg.script, real) &&
          rr_config_audit_file(ch->engine->journal, real, "script reloaded") == 1)
        rr_journal_kick(ch->engine->journal);
    }
    rr_script_free(ch->script);
    ch->script = s;
  }
  rr_buf_close(&err);
  return rc;
}

static rr_channel_t *channel_named(rr_engine_t *e, const char *name) {
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next)
    if (strcmp(ch->cfg.name, name) == 0)
      return ch;
  return NULL;
}

int rr_engine_channel_stop(rr_engine_t *e, const char *name) {
  rr_channel_t *ch = channel_named(e, name);
  if (!ch)
    return RR_ENOTFOUND;
  if (ch->cfg.dicom)
    return RR_EINVAL;
  if (!ch->listener)
    return -EALREADY;
  rr_mllp_listener_stop(ch->listener); /* connections finish what they sent */
  ch->listener = NULL;
  rr_log(RR_LOG_WARN, "channel", "event=channel_stopped channel=%s", ch->cfg.name);
  return 0;
}

int rr_engine_channel_start(rr_engine_t *e, const char *name) {
  rr_channel_t *ch = channel_named(e, name);
  if (!ch)
    return RR_ENOTFOUND;
  if (ch->cfg.dicom)
    return RR_EINVAL;
  if (ch->listener)
    return -EALREADY;
  if (e->stopping)
    return UV_ECANCELED;
  int rc = rr_mllp_listener_start(e->loop, &ch->cfg.listen, on_frame, ch, &ch->listener);
  if (rc) {
    ch->listener = NULL;
    rr_log(RR_LOG_ERROR, "channel", "event=channel_start_failed channel=%s error=%s", ch->cfg.name,
           uv_err_name(rc));
    return rc;
  }
  rr_log(RR_LOG_INFO, "channel", "event=channel_started channel=%s port=%d", ch->cfg.name,
         rr_mllp_listener_port(ch->listener));
  return 0;
}

int rr_engine_channel_reload(rr_engine_t *e, const char *name) {
  rr_channel_t *ch = channel_named(e, name);
  if (!ch)
    return RR_ENOTFOUND;
  int rc = ch->cfg.script[0] ? load_script(ch) : 0;
  if (rc == 0 && ch->tls) {
    rr_buf_t err;
    rr_buf_init(&err, 4096);
    rc = rr_tls_ctx_reload(ch->tls, &ch->cfg.tls_cfg, &err);
    if (rc)
      rr_log(RR_LOG_ERROR, "tls", "event=tls_reload_failed channel=%s error=\"%s\"", ch->cfg.name,
             err.data ? err.data : rr_strerror(rc));
    rr_buf_close(&err);
  }
  return rc;
}

int rr_engine_reload_scripts(rr_engine_t *e) {
  int failed = 0;
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next)
    if (ch->cfg.script[0])
      failed += load_script(ch) != 0;
  return failed;
}

static void on_settled(uv_timer_t *t) {
  rr_channel_t *ch = t->data;
  load_script(ch);
}

/* The script file changed: reload once the editor has finished writing. */
static void on_script_changed(uv_fs_event_t *h, const char *file, int events, int status) {
  rr_channel_t *ch = h->data;
  (void)file;
  (void)events;
  if (status == 0 && !ch->engine->stopping)
    uv_timer_start(&ch->settle, on_settled, 200, 0);
}

static void watch_script(rr_engine_t *e, rr_channel_t *ch) {
  uv_timer_init(e->loop, &ch->settle);
  ch->settle.data = ch;
  uv_unref((uv_handle_t *)&ch->settle);
  uv_fs_event_init(e->loop, &ch->watch);
  ch->watch.data = ch;
  /* The folder, not the file: editors replace files by renaming. */
  char dir[1024];
  snprintf(dir, sizeof dir, "%s", ch->cfg.script);
  char *slash = strrchr(dir, '/');
  if (slash)
    *slash = '\0';
  else
    snprintf(dir, sizeof dir, ".");
  if (uv_fs_event_start(&ch->watch, on_script_changed, dir, 0) == 0)
    uv_unref((uv_handle_t *)&ch->watch);
  ch->watching = true;
}

int rr_engine_add_channel(rr_engine_t *e, const rr_channel_config_t *cfg, rr_channel_t **out) {
  rr_channel_t *ch = calloc(1, sizeof *ch);
  if (!ch)
    return RR_ENOMEM;
  ch->engine = e;
  ch->cfg = *cfg;
  ch->cfg.listen.name = ch->cfg.name;
  ch->cfg.listen.host = ch->cfg.host;
  ch->msg = rr_hl7_msg_new();
  if (!ch->msg) {
    free(ch);
    return RR_ENOMEM;
  }
  int rc = 0;
  if (ch->cfg.tls && !ch->cfg.dicom) { /* DICOM TLS is the SCP's own (studies.c) */
    fix_tls_pointers(&ch->cfg);
    rr_buf_t err;
    rr_buf_init(&err, 1 << 16);
    rc = rr_tls_ctx_new(&ch->cfg.tls_cfg, &ch->tls, &err);
    if (rc)
      rr_log(RR_LOG_ERROR, "tls", "event=tls_config_failed channel=%s error=\"%s\"", ch->cfg.name,
             err.data ? err.data : rr_strerror(rc));
    rr_buf_close(&err);
    ch->cfg.listen.tls = ch->tls;
  }
  if (rc == 0 && ch->cfg.script[0])
    rc = load_script(ch) ? RR_EINVAL : 0;
  if (rc == 0 && ch->cfg.dicomweb)
    rc = rr_channel_start_dicomweb(e, ch);
  else if (rc == 0 && ch->cfg.dicom)
    rc = rr_channel_start_dicom(e, ch);
  else if (rc == 0)
    rc = rr_mllp_listener_start(e->loop, &ch->cfg.listen, on_frame, ch, &ch->listener);
  if (rc) {
    rr_script_free(ch->script);
    rr_tls_ctx_free(ch->tls);
    rr_hl7_msg_free(ch->msg);
    free(ch);
    return rc;
  }
  if (ch->cfg.script[0])
    watch_script(e, ch);
  ch->next = e->channels;
  e->channels = ch;
  if (out)
    *out = ch;
  return 0;
}

int rr_channel_port(const rr_channel_t *ch) {
  if (ch->cfg.dicom)
    return ch->scp ? rr_dicom_scp_port(ch->scp) : 0;
  return ch->listener ? rr_mllp_listener_port(ch->listener) : 0;
}

void rr_engine_channel_stats(const rr_engine_t *e,
                             void (*cb)(void *ud, const rr_channel_stats_t *s), void *ud) {
  for (const rr_channel_t *ch = e->channels; ch; ch = ch->next) {
    rr_channel_stats_t s = {.name = ch->cfg.name,
                            .kind = ch->cfg.dicomweb ? "dicomweb"
                                    : ch->cfg.dicom  ? "dicom"
                                                     : "mllp",
                            .port = ch->cfg.dicomweb ? 0 : rr_channel_port(ch),
                            .running = ch->cfg.dicom ? !ch->engine->stopping : ch->listener != NULL,
                            .received = ch->received,
                            .accepted = ch->accepted,
                            .errored = ch->errored,
                            .rejected = ch->rejected,
                            .duplicates = ch->duplicates,
                            .filtered = ch->filtered,
                            .script_errors = ch->script_errors,
                            .studies_routed = ch->studies_routed,
                            .studies_matched = ch->studies_matched,
                            .ack_latency = &ch->ack_latency};
    cb(ud, &s);
  }
}

bool rr_engine_ready(const rr_engine_t *e, char *why, size_t cap) {
  rr_journal_stats_t js;
  rr_journal_stats(e->journal, &js);
  if (e->stopping)
    snprintf(why, cap, "stopping");
  else if (js.last_failed)
    snprintf(why, cap, "the store's last commit failed");
  else
    return true;
  return false;
}

/* The copied configuration's string pointers must point into the copy. */
static void fix_tls_pointers(rr_channel_config_t *c) {
  c->tls_cfg.role = RR_TLS_SERVER;
  c->tls_cfg.cert_file = c->tls_cert[0] ? c->tls_cert : NULL;
  c->tls_cfg.key_file = c->tls_key[0] ? c->tls_key : NULL;
  c->tls_cfg.ca_file = c->tls_ca[0] ? c->tls_ca : NULL;
  c->tls_cfg.crl_file = c->tls_crl[0] ? c->tls_crl : NULL;
  c->tls_cfg.allow = (const char *const *)c->tls_allow;
}

int rr_engine_reload_tls(rr_engine_t *e) {
  int failed = 0;
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next) {
    if (!ch->tls)
      continue;
    rr_buf_t err;
    rr_buf_init(&err, 1 << 16);
    int rc = rr_tls_ctx_reload(ch->tls, &ch->cfg.tls_cfg, &err);
    if (rc) {
      failed++;
      rr_log(RR_LOG_ERROR, "tls", "event=tls_reload_failed channel=%s error=\"%s\"", ch->cfg.name,
             err.data ? err.data : rr_strerror(rc));
    } else {
      rr_log(RR_LOG_INFO, "tls", "event=tls_reloaded channel=%s", ch->cfg.name);
    }
    rr_buf_close(&err);
  }
  return failed;
}

static void on_check_closed(uv_handle_t *h) {
  (void)h;
}

/* Second step of a shutdown: every message read has been committed and its
 * answer queued; now close the connections (after those writes). */
static void on_journal_idle(void *ud) {
  rr_engine_t *e = ud;
  rr_journal_stats_t js;
  rr_journal_stats(e->journal, &js);
  rr_log(RR_LOG_INFO, "journal",
         "event=stats commits=%llu messages=%llu mean_batch=%.1f max_batch=%llu "
         "mean_commit_us=%llu failed_commits=%llu checkpoints=%llu mean_checkpoint_us=%llu "
         "syncs=%llu mean_sync_us=%llu dedupe_merges=%llu mean_dedupe_merge_us=%llu",
         (unsigned long long)js.commits, (unsigned long long)js.entries,
         js.commits ? (double)js.entries / (double)js.commits : 0.0,
         (unsigned long long)js.max_batch,
         (unsigned long long)(js.commits ? js.commit_us_total / js.commits : 0),
         (unsigned long long)js.failed_commits, (unsigned long long)js.checkpoints,
         (unsigned long long)(js.checkpoints ? js.checkpoint_us_total / js.checkpoints : 0),
         (unsigned long long)js.syncs,
         (unsigned long long)(js.syncs ? js.sync_us_total / js.syncs : 0),
         (unsigned long long)js.dedupe_merges,
         (unsigned long long)(js.dedupe_merges ? js.dedupe_merge_us_total / js.dedupe_merges : 0));
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next) {
    rr_log(RR_LOG_INFO, "channel",
           "event=stop channel=%s received=%llu accepted=%llu errored=%llu rejected=%llu "
           "duplicates=%llu filtered=%llu script_errors=%llu",
           ch->cfg.name, (unsigned long long)ch->received, (unsigned long long)ch->accepted,
           (unsigned long long)ch->errored, (unsigned long long)ch->rejected,
           (unsigned long long)ch->duplicates, (unsigned long long)ch->filtered,
           (unsigned long long)ch->script_errors);
    rr_mllp_listener_stop(ch->listener);
    ch->listener = NULL;
    if (ch->watching) {
      uv_close((uv_handle_t *)&ch->watch, NULL);
      uv_close((uv_handle_t *)&ch->settle, NULL);
      ch->watching = false;
    }
  }
  uv_close((uv_handle_t *)&e->commit, on_check_closed);
}

void rr_engine_stop(rr_engine_t *e) {
  if (e->stopping)
    return;
  e->stopping = 1;
  /* First: no new connections, no more reads. Then finish the commits in
   * flight, so every message read gets its answer. */
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next) {
    rr_mllp_listener_quiesce(ch->listener);
    rr_channel_stop_dicom(ch);
  }
  if (e->http) { /* cancels what DICOMweb sources have running */
    rr_http_client_close(e->http, NULL, NULL);
    e->http = NULL;
  }
  rr_engine_notify_stop(e);
  rr_journal_set_idle_cb(e->journal, on_journal_idle, e);
  rr_journal_kick(e->journal);
}

void rr_engine_free(rr_engine_t *e) {
  if (!e)
    return;
  for (rr_channel_t *ch = e->channels, *n; ch; ch = n) {
    n = ch->next;
    rr_hl7_msg_free(ch->msg);
    rr_script_free(ch->script);
    rr_tls_ctx_free(ch->tls);
    for (char **a = ch->cfg.accept; a && *a; a++)
      free(*a);
    free(ch->cfg.accept);
    for (size_t i = 0; i < ch->cfg.tls_cfg.nallow; i++)
      free(ch->cfg.tls_allow[i]);
    free(ch->cfg.tls_allow);
    for (size_t i = 0; ch->cfg.destinations && i < ch->cfg.ndestinations; i++)
      rr_destination_config_free_lists(&ch->cfg.destinations[i]);
    free(ch->cfg.destinations);
    for (char **a = ch->cfg.dicom_calling_aes; a && *a; a++)
      free(*a);
    free(ch->cfg.dicom_calling_aes);
    for (char **a = ch->cfg.dicom_peers; a && *a; a++)
      free(*a);
    free(ch->cfg.dicom_peers);
    for (char **a = ch->cfg.dw_modalities; a && *a; a++)
      free(*a);
    free(ch->cfg.dw_modalities);
    json_decref(ch->dw_todo);
    json_decref(ch->dw_seen);
    for (size_t i = 0; i < ch->nrouting; i++)
      free(ch->routing[i]);
    free(ch->routing);
    free(ch);
  }
  rr_engine_notify_free(e);
  rr_engine_ai_poll_free(e);
  rr_engine_ai_results_free(e);
  free(e);
}

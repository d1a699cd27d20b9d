/* DICOMweb sources: studies learned from a PACS or VNA that pushes nothing.
 *
 * Every poll_interval a QIDO-RS search asks for the studies dated from
 * now - lookback to today (with their NumberOfStudyRelatedInstances); a
 * study not seen before, or whose count changed, has its instances listed
 * (QIDO-RS, instance level) and recorded in table instances like those a
 * DICOM listener stores, with the instance's WADO-RS URL as its path. From
 * there a study is the same as any other: arriving, stable after the quiet
 * period, matched to its order, handed to the script's on_study (whose
 * context carries retrieve_url). One request runs at a time per source;
 * a failed one is logged and tried again at the next poll.
 *
 * A PACS can also say "this study changed" (rr_engine_dicomweb_notify,
 * from the HTTP API): its instances are listed at once, and with complete
 * the study is stable as soon as they are recorded. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "channel/channel_int.h"
#include "core/error.h"
#include "core/log.h"

#define SEARCH_LIMIT 500 /* studies per QIDO-RS page */
#define SEEN_MAX 200000  /* remembered study counts before the memory is reset */

static void next_step(rr_channel_t *ch);

/* YYYYMMDD of a local time ms milliseconds ago. */
static void local_date(int64_t ago_ms, char out[16]) {
  time_t t = (time_t)((rr_wall_ms() - ago_ms) / 1000);
  struct tm tm;
  localtime_r(&t, &tm);
  strftime(out, 16, "%Y%m%d", &tm);
}

static bool wanted_modality(const rr_channel_t *ch, const char *modalities) {
  if (!ch->cfg.dw_modalities)
    return true;
  if (!modalities)
    return false;
  for (char **m = ch->cfg.dw_modalities; *m; m++) {
    size_t n = strlen(*m);
    for (const char *p = modalities; (p = strstr(p, *m)) != NULL; p += n)
      if ((p == modalities || p[-1] == '\\') && (p[n] == '\0' || p[n] == '\\'))
        return true;
  }
  return false;
}

static void todo_add(rr_channel_t *ch, const char *uid, long count, bool complete) {
  for (size_t i = 0; i < json_array_size(ch->dw_todo); i++) {
    json_t *t = json_array_get(ch->dw_todo, i);
    if (strcmp(json_string_value(json_object_get(t, "uid")), uid) == 0) {
      if (complete)
        json_object_set_new(t, "complete", json_true());
      return;
    }
  }
  json_array_append_new(ch->dw_todo, json_pack("{s:s, s:I, s:b}", "uid", uid, "count",
                                               (json_int_t)count, "complete", complete));
}

static void on_instances(void *ud, rr_dicomweb_op_t *op, const rr_dicomweb_outcome_t *o) {
  rr_channel_t *ch = ud;
  rr_engine_t *e = ch->engine;
  (void)op;
  ch->dw_op = NULL;
  json_t *t = json_array_get(ch->dw_todo, 0);
  if (!t || e->stopping)
    return;
  json_incref(t);
  json_array_remove(ch->dw_todo, 0);
  const char *uid = json_string_value(json_object_get(t, "uid"));
  if (o->status) {
    ch->dw_failures++;
    rr_log(RR_LOG_WARN, "dicomweb",
           "event=instances_failed channel=%s http_status=%ld retryable=%d error=\"%s\"",
           ch->cfg.name, o->http_status, o->retryable, o->message);
    json_decref(t);
    next_step(ch);
    return;
  }
  ch->dw_fetches++;
  size_t added = 0;
  int64_t now = rr_wall_ms();
  const char *base = ch->cfg.dw_url;
  size_t bl = strlen(base);
  while (bl && base[bl - 1] == '/')
    bl--;
  for (size_t i = 0; i < o->result->n; i++) {
    const rr_dicomweb_match_t *m = &o->result->matches[i];
    if (!m->sop_instance_uid || !m->series_uid)
      continue;
    char path[1024], series_no[24] = "", inst_no[24] = "";
    snprintf(path, sizeof path, "%.*s/studies/%s/series/%s/instances/%s", (int)bl, base, uid,
             m->series_uid, m->sop_instance_uid);
    if (m->series_number >= 0)
      snprintf(series_no, sizeof series_no, "%ld", m->series_number);
    if (m->instance_number >= 0)
      snprintf(inst_no, sizeof inst_no, "%ld", m->instance_number);
    rr_journal_instance_t ji = {.channel = ch->cfg.name,
                                .calling_ae = NULL,
                                .peer = "dicomweb",
                                .path = path,
                                .sop_class_uid = m->sop_class_uid ? m->sop_class_uid : "",
                                .sop_instance_uid = m->sop_instance_uid,
                                .study_uid = uid,
                                .series_uid = m->series_uid,
                                .patient_id = m->patient_id,
                                .accession = m->accession_number,
                                .modality = m->modality,
                                .body_part = m->body_part,
                                .description = m->study_description,
                                .study_date = m->study_date,
                                .study_time = m->study_time,
                                .series_number = series_no,
                                .instance_number = inst_no,
                                .size = 0,
                                .received_ms = now,
                                .reopen = ch->cfg.dicom_reopen};
    if (rr_journal_add_instance(e->journal, &ji, NULL, NULL) == 0)
      added++;
  }
  ch->received += added;
  ch->accepted += added;
  if (json_object_size(ch->dw_seen) > SEEN_MAX)
    json_object_clear(ch->dw_seen);
  json_object_set_new(ch->dw_seen, uid, json_integer((json_int_t)o->result->n));
  rr_log(RR_LOG_INFO, "dicomweb", "event=instances channel=%s instances=%zu ms=%llu", ch->cfg.name,
         added, (unsigned long long)o->elapsed_ms);
  rr_log(RR_LOG_DEBUG, "dicomweb", "event=instances channel=%s study_uid=%s", ch->cfg.name, uid);
  if (added)
    rr_journal_kick(e->journal);
  if (json_is_true(json_object_get(t, "complete")) && added)
    rr_engine_study_complete(e, uid); /* queued behind the instances: same order of commits */
  json_decref(t);
  next_step(ch);
}

static void on_search(void *ud, rr_dicomweb_op_t *op, const rr_dicomweb_outcome_t *o) {
  rr_channel_t *ch = ud;
  (void)op;
  ch->dw_op = NULL;
  if (ch->engine->stopping)
    return;
  if (o->status) {
    ch->dw_failures++;
    ch->dw_offset = 0;
    rr_log(RR_LOG_WARN, "dicomweb",
           "event=search_failed channel=%s http_status=%ld retryable=%d error=\"%s\"", ch->cfg.name,
           o->http_status, o->retryable, o->message);
    next_step(ch);
    return;
  }
  ch->dw_searches++;
  size_t changed = 0;
  for (size_t i = 0; i < o->result->n; i++) {
    const rr_dicomweb_match_t *m = &o->result->matches[i];
    if (!m->study_uid || !wanted_modality(ch, m->modalities ? m->modalities : m->modality))
      continue;
    json_t *seen = json_object_get(ch->dw_seen, m->study_uid);
    int64_t known = seen ? (int64_t)json_integer_value(seen)
                         : rr_journal_study_instances(ch->engine->journal, m->study_uid);
    if (!seen && known > 0)
      json_object_set_new(ch->dw_seen, m->study_uid, json_integer((json_int_t)known));
    if (known == 0 || (m->study_instances >= 0 && m->study_instances != known)) {
      todo_add(ch, m->study_uid, m->study_instances, false);
      changed++;
    }
  }
  /* At info when something is new, and for the first search of a run. */
  rr_log(changed || ch->dw_searches == 1 ? RR_LOG_INFO : RR_LOG_DEBUG, "dicomweb",
         "event=searched channel=%s studies=%zu new_or_changed=%zu ms=%llu", ch->cfg.name,
         o->result->n, changed, (unsigned long long)o->elapsed_ms);
  ch->dw_offset = o->result->n == SEARCH_LIMIT ? ch->dw_offset + o->result->n : 0;
  next_step(ch);
}

static void start_search(rr_channel_t *ch) {
  char from[16], to[16], range[40];
  local_date((int64_t)ch->cfg.dw_lookback_ms, from);
  local_date(0, to);
  snprintf(range, sizeof range, "%s-%s", from, to);
  rr_dicomweb_param_t params[] = {{"StudyDate", range}};
  static const char *const fields[] = {"NumberOfStudyRelatedInstances", "ModalitiesInStudy"};
  rr_dicomweb_query_t q = {.level = RR_DICOMWEB_STUDIES,
                           .params = params,
                           .nparams = 1,
                           .includefields = fields,
                           .nincludefields = 2,
                           .limit = SEARCH_LIMIT,
                           .offset = ch->dw_offset};
  int rc = rr_dicomweb_search(ch->dw, &q, on_search, ch, &ch->dw_op);
  if (rc) {
    ch->dw_op = NULL;
    ch->dw_failures++;
    rr_log(RR_LOG_WARN, "dicomweb", "event=search_failed channel=%s error=%s", ch->cfg.name,
           rr_strerror(rc));
  }
}

/* After a search or a fetch: the next page, the next study's instances, or
 * nothing until the next poll. */
static void next_step(rr_channel_t *ch) {
  if (ch->dw_op || ch->engine->stopping)
    return;
  if (ch->dw_offset) {
    start_search(ch);
    return;
  }
  while (json_array_size(ch->dw_todo)) {
    json_t *t = json_array_get(ch->dw_todo, 0);
    static const char *const fields[] = {"SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                                         "Modality",          "SeriesNumber",   "InstanceNumber",
                                         "BodyPartExamined",  "PatientID",      "AccessionNumber",
                                         "StudyDate",         "StudyTime",      "StudyDescription"};
    rr_dicomweb_query_t q = {.level = RR_DICOMWEB_INSTANCES,
                             .study_uid = json_string_value(json_object_get(t, "uid")),
                             .includefields = fields,
                             .nincludefields = sizeof fields / sizeof fields[0]};
    int rc = rr_dicomweb_search(ch->dw, &q, on_instances, ch, &ch->dw_op);
    if (rc == 0)
      return;
    ch->dw_op = NULL;
    ch->dw_failures++;
    rr_log(RR_LOG_WARN, "dicomweb", "event=instances_failed channel=%s error=%s", ch->cfg.name,
           rr_strerror(rc));
    json_array_remove(ch->dw_todo, 0);
  }
}

static void on_poll(uv_timer_t *t) {
  rr_channel_t *ch = t->data;
  if (!ch->dw_op && !ch->engine->stopping)
    start_search(ch);
}

int rr_engine_dicomweb_notify(rr_engine_t *e, const char *channel, const char *study_uid,
                              bool complete) {
  rr_channel_t *ch = e->channels;
  while (ch && strcmp(ch->cfg.name, channel) != 0)
    ch = ch->next;
  if (!ch || !ch->cfg.dicomweb)
    return RR_ENOTFOUND;
  if (e->stopping)
    return UV_ECANCELED;
  size_t n = strlen(study_uid);
  if (n == 0 || n > 64 || strspn(study_uid, "0123456789.") != n)
    return RR_EINVAL;
  todo_add(ch, study_uid, -1, complete);
  rr_log(RR_LOG_INFO, "dicomweb", "event=notified channel=%s complete=%s", ch->cfg.name,
         complete ? "yes" : "no");
  next_step(ch);
  return 0;
}

int rr_channel_start_dicomweb(rr_engine_t *e, rr_channel_t *ch) {
  const rr_channel_config_t *c = &ch->cfg;
  int rc = 0;
  if (!e->http) {
    rr_http_client_config_t hc;
    rr_http_client_config_default(&hc);
    hc.name = "dicomweb";
    hc.max_concurrent = 4;
    if ((rc = rr_http_client_new(e->loop, &hc, &e->http)) != 0)
      return rc;
  }
  rr_dicomweb_config_t dc;
  rr_dicomweb_config_default(&dc);
  dc.name = c->name;
  dc.base_url = c->dw_url;
  dc.auth = c->dw_user[0]         ? RR_DICOMWEB_AUTH_BASIC
            : c->dw_token_file[0] ? RR_DICOMWEB_AUTH_BEARER
                                  : RR_DICOMWEB_AUTH_NONE;
  dc.user = c->dw_user[0] ? c->dw_user : NULL;
  dc.password_file = c->dw_password_file[0] ? c->dw_password_file : NULL;
  dc.token_file = c->dw_token_file[0] ? c->dw_token_file : NULL;
  dc.ca_file = c->dw_ca[0] ? c->dw_ca : NULL;
  dc.cert_file = c->dw_cert[0] ? c->dw_cert : NULL;
  dc.key_file = c->dw_key[0] ? c->dw_key : NULL;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  rc = rr_dicomweb_client_new(e->http, &dc, &ch->dw, &err);
  if (rc) {
    rr_log(RR_LOG_ERROR, "dicomweb", "event=source_failed channel=%s error=\"%s\"", c->name,
           err.data ? err.data : rr_strerror(rc));
    rr_buf_close(&err);
    return rc;
  }
  rr_buf_close(&err);
  ch->dw_todo = json_array();
  ch->dw_seen = json_object();
  uv_timer_init(e->loop, &ch->poll);
  ch->poll.data = ch;
  ch->poll_open = true;
  uv_timer_start(&ch->poll, on_poll, 0, c->dw_poll_ms ? c->dw_poll_ms : 30000);
  rr_channel_stable_timer(e, ch);
  return 0;
}

void rr_channel_stop_dicomweb(rr_channel_t *ch) {
  if (ch->dw_op) {
    rr_dicomweb_cancel(ch->dw_op); /* its callback comes later, with UV_ECANCELED */
  }
  if (ch->poll_open) {
    uv_close((uv_handle_t *)&ch->poll, NULL);
    ch->poll_open = false;
  }
  rr_dicomweb_client_free(ch->dw);
  ch->dw = NULL;
}

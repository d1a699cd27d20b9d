/* DICOM sources of the engine: instances into the store, stable-study
 * detection, order matching and the channel script's on_study. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "channel/channel_int.h"
#include "core/array.h"
#include "core/error.h"
#include "core/log.h"
#include "dicom/scp.h"

/* ---- DICOM sources ------------------------------------------------------------ */

typedef struct instance_kept {
  rr_channel_t *ch;
  uint64_t token;
} instance_kept_t;

/* The commit that records an instance: now the C-STORE is answered. */
static void on_instance_kept(void *ud, int status, int64_t id) {
  instance_kept_t *k = ud;
  (void)id;
  if (status)
    rr_log(RR_LOG_ERROR, "dicom", "event=instance_not_recorded channel=%s error=%s",
           k->ch->cfg.name, rr_strerror(status));
  if (k->ch->scp) /* NULL once stopping: the SCP answered the waiting C-STOREs itself */
    rr_dicom_scp_confirm(k->ch->scp, k->token, status);
  free(k);
}

/* A stored instance: into the store (instances, studies), with the batch;
 * its C-STORE is answered after that commit. */
static void on_instance(void *ud, const rr_dicom_instance_t *in) {
  rr_channel_t *ch = ud;
  rr_engine_t *e = ch->engine;
  ch->received++;
  rr_journal_instance_t ji = {.channel = ch->cfg.name,
                              .calling_ae = in->calling_ae,
                              .peer = in->peer,
                              .path = in->path,
                              .sop_class_uid = in->sop_class_uid,
                              .sop_instance_uid = in->sop_instance_uid,
                              .study_uid = in->study_instance_uid,
                              .series_uid = in->series_instance_uid,
                              .patient_id = in->patient_id,
                              .accession = in->accession_number,
                              .modality = in->modality,
                              .body_part = in->body_part_examined,
                              .description = in->study_description,
                              .study_date = in->study_date,
                              .study_time = in->study_time,
                              .series_number = in->series_number,
                              .instance_number = in->instance_number,
                              .size = in->size,
                              .received_ms = rr_wall_ms(),
                              .reopen = ch->cfg.dicom_reopen};
  instance_kept_t *k = malloc(sizeof *k);
  if (k)
    *k = (instance_kept_t){ch, in->token};
  if (!k || rr_journal_add_instance(e->journal, &ji, on_instance_kept, k) != 0) {
    free(k);
    ch->errored++;
    rr_log(RR_LOG_ERROR, "dicom", "event=instance_not_recorded channel=%s assoc=%llu error=%s",
           ch->cfg.name, (unsigned long long)in->assoc_id, rr_strerror(RR_ENOMEM));
    rr_dicom_scp_confirm(ch->scp, in->token, RR_ENOMEM);
    return;
  }
  ch->accepted++;
  rr_journal_kick(e->journal);
  rr_log(RR_LOG_DEBUG, "dicom",
         "event=instance channel=%s assoc=%llu study_uid=%s sop_instance_uid=%s modality=%s "
         "bytes=%llu",
         ch->cfg.name, (unsigned long long)in->assoc_id, in->study_instance_uid,
         in->sop_instance_uid, in->modality, (unsigned long long)in->size);
}

static void on_association(void *ud, const rr_dicom_assoc_event_t *ev) {
  rr_channel_t *ch = ud;
  if (ev->kind == RR_DICOM_ASSOC_REFUSED)
    rr_log(RR_LOG_WARN, "dicom",
           "event=association_refused channel=%s assoc=%llu peer=%s calling=%s called=%s "
           "reason=\"%s\"",
           ch->cfg.name, (unsigned long long)ev->assoc_id, ev->peer, ev->calling_ae, ev->called_ae,
           ev->reason ? ev->reason : "");
  else
    rr_log(RR_LOG_INFO, "dicom",
           "event=association_%s channel=%s assoc=%llu peer=%s calling=%s%s%s",
           ev->kind == RR_DICOM_ASSOC_ACCEPTED ? "accepted" : "ended", ch->cfg.name,
           (unsigned long long)ev->assoc_id, ev->peer, ev->calling_ae,
           ev->kind == RR_DICOM_ASSOC_ENDED ? " how=" : "",
           ev->kind == RR_DICOM_ASSOC_ENDED && ev->reason ? ev->reason : "");
}

/* ---- studies: stable, matched to their order, handed to the script --------
 * A stable study's context (rr_journal_study_context: header fields,
 * series, the matched order) goes to the channel script's on_study; what
 * it routes is journaled as one entry of type STUDY (raw = the context)
 * that also marks the study routed, in one transaction. Until that commit
 * the study stays "stable, not routed" in the store, so a crash in between
 * routes it after the restart, once. */

typedef struct study_kept {
  rr_channel_t *ch;
  char uid[];
} study_kept_t;

static bool routing_has(const rr_channel_t *ch, const char *uid) {
  for (size_t i = 0; i < ch->nrouting; i++)
    if (strcmp(ch->routing[i], uid) == 0)
      return true;
  return false;
}

static void routing_remove(rr_channel_t *ch, const char *uid) {
  for (size_t i = 0; i < ch->nrouting; i++)
    if (strcmp(ch->routing[i], uid) == 0) {
      free(ch->routing[i]);
      ch->routing[i] = ch->routing[--ch->nrouting];
      return;
    }
}

static void on_study_kept(void *ud, int status, int64_t id) {
  study_kept_t *k = ud;
  routing_remove(k->ch, k->uid);
  if (status)
    rr_log(RR_LOG_ERROR, "dicom", "event=study_not_routed channel=%s error=\"%s\"", k->ch->cfg.name,
           rr_strerror(status));
  else
    rr_log(RR_LOG_DEBUG, "dicom", "event=study_kept channel=%s study_uid=%s message_id=%lld",
           k->ch->cfg.name, k->uid, (long long)id);
  free(k);
}

/* The lane a study's order asks for: STAT (S) before routine. */
static int study_lane(json_t *ctx) {
  const char *p = json_string_value(json_object_get(json_object_get(ctx, "order"), "priority"));
  return p && (strcmp(p, "S") == 0 || strcasecmp(p, "STAT") == 0) ? 1 : 0;
}

static const char *json_str(json_t *o, const char *key) {
  const char *v = json_string_value(json_object_get(o, key));
  return v && *v ? v : NULL;
}

/* Runs the channel's on_study on a study context: routes (pointing into
 * sr) in *routes; the journal status and error text. */
const char *rr_channel_study_script(rr_channel_t *ch, const char *ctxtext, size_t len, json_t *ctx,
                                    const char *uid, rr_script_result_t *sr,
                                    rr_journal_route_t **routes, size_t *nroutes, char *etext,
                                    size_t ecap) {
  memset(sr, 0, sizeof *sr);
  *routes = NULL;
  *nroutes = 0;
  etext[0] = '\0';
  if (!ch->script)
    return "accepted";
  rr_script_input_t in = {ctxtext, len, "dicom", uid};
  if (rr_script_run_study(ch->script, &in, sr) != 0) {
    sr->verdict = RR_SCRIPT_ERROR;
    snprintf(sr->reason, sizeof sr->reason, "out of memory building the script's result");
  }
  for (size_t i = 0; i < sr->nlogs; i++)
    rr_log((rr_log_level_t)sr->logs[i].level, "script", "channel=%s event=study msg=\"%s\"",
           ch->cfg.name, sr->logs[i].text);
  if (sr->verdict == RR_SCRIPT_PASS && sr->nroutes &&
      rr_channel_build_routes(ch, NULL, study_lane(ctx), json_str(ctx, "patient_id"), sr, routes,
                              nroutes) != 0) {
    sr->verdict = RR_SCRIPT_ERROR;
    if (!sr->reason[0])
      snprintf(sr->reason, sizeof sr->reason, "out of memory queuing the routes");
    free(*routes);
    *routes = NULL;
    *nroutes = 0;
  }
  switch (sr->verdict) {
  case RR_SCRIPT_PASS: return "accepted";
  case RR_SCRIPT_FILTERED: snprintf(etext, ecap, "%s", sr->reason); return "filtered";
  case RR_SCRIPT_REJECTED: snprintf(etext, ecap, "%s", sr->reason); return "rejected";
  default:
    ch->script_errors++;
    snprintf(etext, ecap, "script: %s", sr->reason);
    rr_log(RR_LOG_ERROR, "channel", "event=script_error channel=%s source=study error=\"%s\"",
           ch->cfg.name, sr->reason);
    return "error";
  }
}

/* A DICOMweb source's study context says where the images are: the
 * WADO-RS URL of the study; text is rewritten with it. */
static int add_retrieve_url(rr_channel_t *ch, const char *uid, json_t *ctx, rr_buf_t *text) {
  const char *base = ch->cfg.dw_url;
  size_t bl = strlen(base);
  while (bl && base[bl - 1] == '/')
    bl--;
  char *url = malloc(bl + strlen(uid) + 16);
  if (!url)
    return RR_ENOMEM;
  snprintf(url, bl + strlen(uid) + 16, "%.*s/studies/%s", (int)bl, base, uid);
  json_object_set_new(ctx, "retrieve_url", json_string(url));
  free(url);
  char *t = json_dumps(ctx, JSON_COMPACT);
  rr_buf_reset(text);
  int rc = t ? rr_buf_append(text, t, strlen(t)) : RR_ENOMEM;
  free(t);
  return rc;
}

static void route_study(void *ud, const char *uid) {
  rr_channel_t *ch = ud;
  rr_engine_t *e = ch->engine;
  if (e->stopping || routing_has(ch, uid))
    return;
  rr_buf_t text;
  rr_buf_init(&text, (size_t)64 << 20);
  int64_t order_id = 0;
  const char *method = "none";
  int rc = rr_journal_study_context(e->journal, uid, (int64_t)ch->cfg.dicom_match_window_ms, &text,
                                    &order_id, &method);
  json_t *ctx = rc == 0 ? json_loadb(text.data, text.len, 0, NULL) : NULL;
  if (ctx && json_integer_value(json_object_get(ctx, "stable_ms")) == 0) {
    /* made stable in the batch that journals this event (route_quiet) */
    json_object_set_new(ctx, "stable_ms", json_integer(rr_wall_ms()));
    char *t = json_dumps(ctx, JSON_COMPACT);
    rr_buf_reset(&text);
    if (!t || rr_buf_append(&text, t, strlen(t)) != 0) {
      json_decref(ctx);
      ctx = NULL;
    }
    free(t);
  }
  if (ctx && ch->cfg.dicomweb && (rc = add_retrieve_url(ch, uid, ctx, &text)) != 0) {
    json_decref(ctx);
    ctx = NULL;
  }
  if (!ctx) {
    rr_log(RR_LOG_ERROR, "dicom", "event=study_context_failed channel=%s error=%s", ch->cfg.name,
           rr_strerror(rc ? rc : RR_EIO));
    rr_buf_close(&text);
    return;
  }
  rr_script_result_t sr;
  rr_journal_route_t *routes;
  size_t nroutes;
  char etext[600];
  const char *status = rr_channel_study_script(ch, text.data, text.len, ctx, uid, &sr, &routes,
                                               &nroutes, etext, sizeof etext);
  study_kept_t *k = malloc(sizeof *k + strlen(uid) + 1);
  char *dup = strdup(uid);
  if (!k || !dup ||
      rr_array_grow((void **)&ch->routing, &ch->routing_cap, ch->nrouting + 1, sizeof(char *), 8) !=
          0) {
    free(k);
    free(dup);
    rc = RR_ENOMEM;
    goto out;
  }
  k->ch = ch;
  memcpy(k->uid, uid, strlen(uid) + 1); /* k was sized for it */
  rr_journal_entry_t je = {.channel = ch->cfg.name,
                           .peer = json_str(ctx, "calling_ae"),
                           .received_ms = rr_wall_ms(),
                           .message_type = "STUDY",
                           .mrn = json_str(ctx, "patient_id"),
                           .accession = json_str(ctx, "accession"),
                           .study_uid = uid,
                           .status = status,
                           .error = *etext ? etext : NULL,
                           .raw = text.data,
                           .raw_len = text.len,
                           .routes = routes,
                           .nroutes = nroutes,
                           .routed_study = uid,
                           .order_id = order_id,
                           .match_method = method};
  if ((rc = rr_journal_add(e->journal, &je, on_study_kept, k)) != 0) {
    free(k);
    free(dup);
    goto out;
  }
  ch->routing[ch->nrouting++] = dup;
  ch->studies_routed++;
  ch->studies_matched += order_id > 0;
  rr_journal_kick(e->journal);
  rr_log(RR_LOG_INFO, "dicom",
         "event=study_routed channel=%s match=%s instances=%lld routes=%zu status=%s", ch->cfg.name,
         method, (long long)json_integer_value(json_object_get(ctx, "instances")), nroutes, status);
  rr_log(RR_LOG_DEBUG, "dicom", "event=study_routed channel=%s study_uid=%s order_id=%lld",
         ch->cfg.name, uid, (long long)order_id);
out:
  if (rc)
    rr_log(RR_LOG_ERROR, "dicom", "event=study_not_routed channel=%s error=%s", ch->cfg.name,
           rr_strerror(rc));
  free(routes);
  rr_script_result_close(&sr);
  json_decref(ctx);
  rr_buf_close(&text);
}

/* Studies about to be marked stable (the mark is queued): their study
 * events join the same batch, so a study is stable and routed in one
 * commit. Whatever this misses (an instance committed meanwhile, a store
 * error) is routed after the mark's commit by route_pending. */
static void route_quiet_one(void *ud, const char *uid, const char *channel) {
  rr_engine_t *e = ud;
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next)
    if (ch->cfg.dicom && strcmp(ch->cfg.name, channel) == 0)
      route_study(ch, uid);
}

/* Every stable study of the channel not routed yet (after a restart, a
 * "complete" call, or a failed commit). */
static void route_pending(rr_channel_t *ch) {
  if (rr_journal_unrouted(ch->engine->journal, ch->cfg.name, route_study, ch) < 0)
    rr_log(RR_LOG_ERROR, "dicom", "event=unrouted_query_failed channel=%s", ch->cfg.name);
}

/* Studies that went quiet: stable. The state is in the store, so a study
 * interrupted by a restart becomes stable once, after it. */
static void on_stable(void *ud, int status, const char *const *uids, size_t n) {
  rr_channel_t *ch = ud;
  ch->stable_busy = false;
  if (status) {
    rr_log(RR_LOG_ERROR, "dicom", "event=stable_check_failed channel=%s error=%s", ch->cfg.name,
           rr_strerror(status));
    return;
  }
  for (size_t i = 0; i < n; i++)
    rr_log(RR_LOG_DEBUG, "dicom", "event=study_stable channel=%s study_uid=%s", ch->cfg.name,
           uids[i]);
  if (n)
    rr_log(RR_LOG_INFO, "dicom", "event=studies_stable channel=%s studies=%zu", ch->cfg.name, n);
  route_pending(ch);
}

typedef struct completing {
  rr_engine_t *e;
  rr_engine_completed_cb cb;
  void *ud;
} completing_t;

static void on_completed(void *ud, int status, const char *const *uids, size_t n) {
  completing_t *c = ud;
  rr_engine_t *e = c->e;
  if (status)
    rr_log(RR_LOG_ERROR, "dicom", "event=study_complete_failed error=%s", rr_strerror(status));
  else
    rr_log(RR_LOG_INFO, "dicom", "event=study_completed changed=%s", n ? "yes" : "no");
  for (size_t i = 0; i < n; i++)
    rr_log(RR_LOG_DEBUG, "dicom", "event=study_stable study_uid=%s source=complete", uids[i]);
  for (rr_channel_t *ch = e->channels; status == 0 && n && ch; ch = ch->next)
    if (ch->cfg.dicom)
      route_pending(ch);
  if (c->cb)
    c->cb(c->ud, status, n > 0);
  free(c);
}

int rr_engine_complete_study(rr_engine_t *e, const char *study_uid, rr_engine_completed_cb cb,
                             void *ud) {
  completing_t *c = malloc(sizeof *c);
  if (!c)
    return RR_ENOMEM;
  *c = (completing_t){e, cb, ud};
  /* The study event (routed, with its AI requests queued) goes first in the
   * batch, so that its deliveries start before the caller is answered; the
   * stable mark after it in the same transaction keeps the time asked. */
  int64_t now = rr_wall_ms();
  if (!e->stopping)
    rr_journal_quiet(e->journal, NULL, 0, study_uid, route_quiet_one, e);
  int rc = rr_journal_mark_study_stable(e->journal, study_uid, now, on_completed, c);
  if (rc) {
    free(c);
    return rc;
  }
  rr_journal_kick(e->journal);
  return 0;
}

int rr_engine_study_complete(void *ud, const char *study_uid) {
  return rr_engine_complete_study(ud, study_uid, NULL, NULL);
}

static void on_stable_timer(uv_timer_t *t) {
  rr_channel_t *ch = t->data;
  rr_engine_t *e = ch->engine;
  if (ch->stable_busy || e->stopping)
    return;
  int64_t cutoff = rr_wall_ms() - (int64_t)ch->cfg.dicom_stable_after_ms;
  if (rr_journal_mark_stable(e->journal, ch->cfg.name, cutoff, on_stable, ch) == 0) {
    ch->stable_busy = true;
    rr_journal_quiet(e->journal, ch->cfg.name, cutoff, NULL, route_quiet_one, e);
    rr_journal_kick(e->journal);
  }
}

static int mkdirs(const char *path) {
  char d[1024];
  snprintf(d, sizeof d, "%s", path);
  for (char *p = d + 1;; p++) {
    bool end = *p == '\0';
    if (*p == '/' || end) {
      *p = '\0';
      if (mkdir(d, 0750) != 0 && errno != EEXIST)
        return -errno;
      if (end)
        return 0;
      *p = '/';
    }
  }
}

int rr_channel_start_dicom(rr_engine_t *e, rr_channel_t *ch) {
  const rr_channel_config_t *c = &ch->cfg;
  static const char *const loopback[] = {"127.0.0.1", "::1"};
  size_t ncalling = 0, npeers = 0;
  while (c->dicom_calling_aes && c->dicom_calling_aes[ncalling])
    ncalling++;
  while (c->dicom_peers && c->dicom_peers[npeers])
    npeers++;
  int rc = mkdirs(c->dicom_spool);
  if (rc) {
    rr_log(RR_LOG_ERROR, "dicom", "event=spool_failed channel=%s path=%s error=%s", c->name,
           c->dicom_spool, rr_strerror(rc));
    return rc;
  }
  rr_dicom_scp_config_t sc = {.name = c->name,
                              .host = c->host,
                              .port = c->listen.port,
                              .ae_title = c->dicom_ae,
                              .allowed_calling_aes = (const char *const *)c->dicom_calling_aes,
                              .n_allowed_calling_aes = ncalling,
                              .allowed_peers =
                                  c->dicom_peers ? (const char *const *)c->dicom_peers : loopback,
                              .n_allowed_peers = c->dicom_peers ? npeers : 2,
                              .max_associations = c->dicom_max_associations,
                              .spool_dir = c->dicom_spool,
                              .min_free_bytes = c->dicom_min_free_bytes,
                              .confirm = 1}; /* C-STORE success once recorded */
  /* DICOM TLS: the source's "tls" (cert, key, ca, require_client_cert). */
  rr_dicom_tls_config_t tls = {.cert_file = c->tls_cert,
                               .key_file = c->tls_key,
                               .ca_file = c->tls_ca[0] ? c->tls_ca : NULL,
                               .require_peer_cert = c->tls_cfg.require_client_cert};
  if (c->tls)
    sc.tls = &tls;
  rr_dicom_scp_callbacks_t cb = {.on_instance = on_instance, .on_association = on_association};
  rc = rr_dicom_scp_start(e->loop, &sc, &cb, ch, &ch->scp);
  if (rc)
    return rc;
  rr_channel_stable_timer(e, ch);
  return 0;
}

void rr_channel_stable_timer(rr_engine_t *e, rr_channel_t *ch) {
  const rr_channel_config_t *c = &ch->cfg;
  /* Checked a few times per quiet period, at most once a second. */
  uint64_t every = c->dicom_stable_after_ms / 4;
  if (every > 1000)
    every = 1000;
  if (every < 50)
    every = 50;
  uv_timer_init(e->loop, &ch->stable);
  ch->stable.data = ch;
  ch->stable_open = true;
  uv_timer_start(&ch->stable, on_stable_timer, every, every);
}

void rr_channel_stop_dicom(rr_channel_t *ch) {
  if (ch->cfg.dicomweb)
    rr_channel_stop_dicomweb(ch);
  if (ch->scp) { /* associations get a few seconds to finish */
    rr_dicom_scp_stop(ch->scp, 5000, NULL, NULL);
    ch->scp = NULL;
  }
  if (ch->stable_open) {
    uv_close((uv_handle_t *)&ch->stable, NULL);
    ch->stable_open = false;
  }
}

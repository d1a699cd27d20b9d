/* AI results: recorded with their findings, handed to the routing channel
 * script's on_result, and what it routes journaled, in one batch.
 *
 * A result comes in the answer to the request (dispatch, sync endpoints)
 * or by callback (POST /api/ai/jobs/{id}/result with the job's token). The
 * rollout mode of the endpoint decides what of the script's routes go out:
 * silent none, assistant those to "result" destinations, active all. */
#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ai/ai.h"
#include "ai/deid.h"
#include "channel/channel_int.h"
#include "core/error.h"
#include "core/log.h"
#include "dicom/sr.h"

static rr_channel_t *find_channel(rr_engine_t *e, const char *dest_name) {
  const char *dot = strchr(dest_name, '.');
  size_t n = dot ? (size_t)(dot - dest_name) : strlen(dest_name);
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next)
    if (strlen(ch->cfg.name) == n && strncmp(ch->cfg.name, dest_name, n) == 0)
      return ch;
  return NULL;
}

static const rr_destination_config_t *find_dest(const rr_channel_t *ch, const char *name) {
  for (size_t i = 0; i < ch->cfg.ndestinations; i++)
    if (strcmp(ch->cfg.destinations[i].name, name) == 0 ||
        strcmp(ch->cfg.destinations[i].short_name, name) == 0)
      return &ch->cfg.destinations[i];
  return NULL;
}

/* Whether a route to d may go out for a result of an endpoint in mode. */
static bool mode_allows(rr_ai_mode_t mode, const rr_destination_config_t *d) {
  if (mode == RR_AI_ACTIVE)
    return true;
  if (mode == RR_AI_SILENT)
    return false;
  return strcmp(d->role, "worklist") != 0 && strcmp(d->role, "notification") != 0;
}

/* A result being taken: the script runs and everything is journaled in one
 * batch (the result, its audit records, the AI_RESULT entry with its
 * routes), so nothing of it is kept without the rest. Its SR (path and SOP
 * Instance UID chosen first, so the script can route it) is written off the
 * loop thread meanwhile: the ORU and the pages do not wait for the DICOM
 * writer and its fsyncs; only the SR's own delivery does (rr_engine_sr_gate).
 * The taking stays listed in e->taking until the SR is written. */
typedef struct taking {
  struct taking *next;
  rr_engine_t *e;
  rr_channel_t *ch;
  const rr_destination_config_t *dest; /* the channel's: lives as long as the engine */
  char job_id[RR_AI_JOB_ID_MAX];
  char study_uid[65];
  char via[16];
  int64_t now;
  rr_ai_result_t *r; /* own copy */
  json_t *study;     /* the study as routing saw it, or NULL */
  rr_ai_sr_prep_t *prep;
  char sr_path[1200], sr_uid[65];
  rr_ai_result_t *sr_r; /* the SR writer's own copies (worker thread) */
  json_t *sr_study;
  bool again; /* the SR of a kept result, written again after a restart */
  int sr_rc;
  rr_buf_t sr_err;
  rr_journal_done_cb cb;
  void *ud;
  uv_work_t work;
} taking_t;

/* An SR file that could not be written: its delivery is dead, not retried. */
typedef struct sr_failed {
  struct sr_failed *next;
  char path[1200];
} sr_failed_t;
#define SR_FAILED_KEPT 64

static void taking_free(taking_t *t) {
  rr_ai_result_free(t->r);
  json_decref(t->study);
  rr_ai_result_free(t->sr_r);
  json_decref(t->sr_study);
  rr_ai_sr_prep_free(t->prep);
  rr_buf_close(&t->sr_err);
  free(t);
}

/* An own copy of a result (the caller's goes when its call returns). */
static int copy_result(const rr_ai_result_t *r, rr_ai_result_t **out) {
  char *copy = json_dumps(r->json, JSON_COMPACT);
  int rc = copy ? rr_ai_parse_result(copy, strlen(copy), out, NULL) : RR_ENOMEM;
  free(copy);
  return rc;
}

static bool taking_has(rr_engine_t *e, const char *job_id) {
  for (taking_t *t = e->taking; t; t = t->next)
    if (strcmp(t->job_id, job_id) == 0)
      return true;
  return false;
}

static void taking_unlink(taking_t *t) {
  for (taking_t **pp = &t->e->taking; *pp; pp = &(*pp)->next)
    if (*pp == t) {
      *pp = t->next;
      return;
    }
}

/* The result, its audit records, the script and the AI_RESULT entry. */
static int take_journal(taking_t *t) {
  rr_engine_t *e = t->e;
  rr_channel_t *ch = t->ch;
  const rr_destination_config_t *dest = t->dest;
  const rr_ai_result_t *r = t->r;
  const char *job_id = t->job_id, *study_uid = t->study_uid, *via = t->via;
  const char *sr_path = t->sr_path, *sr_uid = t->sr_uid;
  rr_journal_done_cb cb = t->cb;
  void *ud = t->ud;
  int64_t now = t->now;
  rr_ai_mode_t mode = (rr_ai_mode_t)dest->ai_mode;
  int rc = rr_ai_store_result(e->journal, r, now, NULL, NULL);
  if (rc)
    return rc;
  /* The audit trail: the result, each finding. */
  rr_journal_audit_json(e->journal, dest->name, "result", job_id,
                        json_pack("{s:s, s:s, s:s?, s:s?, s:s, s:i, s:b, s:s}", "study_uid",
                                  study_uid, "status", r->status, "model", r->model_name, "version",
                                  r->model_version, "via", via, "findings", (int)r->nfindings,
                                  "critical", r->critical, "mode", rr_ai_mode_name(mode)));
  for (size_t i = 0; i < r->nfindings; i++)
    rr_journal_audit_json(
        e->journal, dest->name, "finding", job_id,
        json_pack("{s:s, s:O}", "study_uid", study_uid, "finding", r->findings[i].json));
  json_t *study = t->study ? json_incref(t->study) : NULL;
  json_t *in = json_pack("{s:{s:s, s:s, s:s, s:s}, s:O, s:o, s:s*, s:s*}", "job", "id", job_id,
                         "endpoint", dest->short_name, "mode", rr_ai_mode_name(mode), "via", via,
                         "result", r->json, "study", study ? json_incref(study) : json_null(), "sr",
                         sr_path[0] ? sr_path : NULL, "sr_uid", sr_uid[0] ? sr_uid : NULL);
  json_decref(study);
  char *intext = in ? json_dumps(in, JSON_COMPACT) : NULL;
  json_decref(in);
  if (!intext)
    return RR_ENOMEM;

  rr_script_result_t sr;
  memset(&sr, 0, sizeof sr);
  rr_journal_route_t *routes = NULL;
  char **owned = NULL; /* pages of new notifications, replacing routes' payloads */
  size_t nroutes = 0, held = 0, nowned = 0;
  const char *status = "accepted";
  char etext[600] = "";
  if (ch->script && rr_script_defines(ch->script, "on_result")) {
    rr_script_input_t si = {intext, strlen(intext), via, job_id};
    if (rr_script_run_json(ch->script, "on_result", &si, &sr) != 0) {
      sr.verdict = RR_SCRIPT_ERROR;
      snprintf(sr.reason, sizeof sr.reason, "out of memory building the script's result");
    }
    for (size_t i = 0; i < sr.nlogs; i++)
      rr_log((rr_log_level_t)sr.logs[i].level, "script", "channel=%s event=ai_result msg=\"%s\"",
             ch->cfg.name, sr.logs[i].text);
    if (sr.verdict == RR_SCRIPT_PASS && sr.nroutes) {
      int lane = r->critical ? 2 : 0;
      if (rr_channel_build_routes(ch, NULL, lane, NULL, &sr, &routes, &nroutes) != 0) {
        sr.verdict = RR_SCRIPT_ERROR;
        free(routes);
        routes = NULL;
        nroutes = 0;
      }
      /* The rollout mode: routes it does not allow are held back (kept in
       * the journal entry's raw document, not sent). */
      size_t keep = 0;
      for (size_t i = 0; i < nroutes; i++) {
        const rr_destination_config_t *d = find_dest(ch, routes[i].destination);
        bool allowed = d && mode_allows(mode, d);
        rr_journal_audit_json(e->journal, "engine", allowed ? "publish" : "held", job_id,
                              json_pack("{s:s, s:s, s:s}", "destination", routes[i].destination,
                                        "role", d ? d->role : "?", "mode", rr_ai_mode_name(mode)));
        if (!allowed) {
          held++;
          continue;
        }
        /* A critical-result notification: tracked until acknowledged;
         * the same finding is paged once. */
        if (strcmp(d->role, "notification") == 0) {
          char **v = owned ? owned : calloc(nroutes, sizeof *v);
          char *page = NULL;
          int nrc = v ? rr_channel_notify_route(ch, d, job_id, &routes[i], &page) : RR_ENOMEM;
          owned = v;
          if (page)
            owned[nowned++] = page;
          if (nrc == 1)
            continue;
          if (nrc < 0)
            rr_log(RR_LOG_ERROR, "notify",
                   "event=notification_not_tracked channel=%s job=%s error=%s", ch->cfg.name,
                   job_id, rr_strerror(nrc));
        }
        routes[keep++] = routes[i];
      }
      nroutes = keep;
    }
    if (sr.verdict == RR_SCRIPT_FILTERED) {
      status = "filtered";
      snprintf(etext, sizeof etext, "%s", sr.reason);
    } else if (sr.verdict == RR_SCRIPT_REJECTED) {
      status = "rejected";
      snprintf(etext, sizeof etext, "%s", sr.reason);
    } else if (sr.verdict == RR_SCRIPT_ERROR) {
      status = "error";
      ch->script_errors++;
      snprintf(etext, sizeof etext, "script: %s", sr.reason);
      rr_log(RR_LOG_ERROR, "channel", "event=script_error channel=%s source=ai_result error=\"%s\"",
             ch->cfg.name, sr.reason);
    }
  }
  rr_journal_entry_t je = {.channel = ch->cfg.name,
                           .peer = via,
                           .received_ms = now,
                           .message_type = "AI_RESULT",
                           .control_id = NULL,
                           .study_uid = study_uid,
                           .status = status,
                           .error = *etext ? etext : NULL,
                           .raw = intext,
                           .raw_len = strlen(intext),
                           .routes = routes,
                           .nroutes = nroutes};
  rc = rr_journal_add(e->journal, &je, cb, ud);
  if (rc == 0)
    rr_journal_kick(e->journal);
  rr_log(RR_LOG_INFO, "ai",
         "event=result channel=%s endpoint=%s job=%s via=%s status=%s findings=%zu critical=%s "
         "mode=%s routes=%zu held=%zu",
         ch->cfg.name, dest->short_name, job_id, via, r->status, r->nfindings,
         r->critical ? "yes" : "no", rr_ai_mode_name(mode), nroutes, held);
  free(routes);
  for (size_t i = 0; i < nowned; i++)
    free(owned[i]);
  free(owned);
  rr_script_result_close(&sr);
  free(intext);
  return rc;
}

static void on_sr_work(uv_work_t *w) {
  taking_t *t = w->data;
  t->sr_rc = rr_ai_sr_build(t->prep, t->sr_r, t->sr_study, t->sr_path, t->sr_uid, &t->sr_err);
}

static void sr_remember_failed(rr_engine_t *e, const char *path) {
  sr_failed_t *f = calloc(1, sizeof *f);
  if (!f)
    return;
  snprintf(f->path, sizeof f->path, "%s", path);
  f->next = e->sr_failed;
  e->sr_failed = f;
  size_t n = 0;
  for (sr_failed_t **pp = &e->sr_failed; *pp; n++) {
    if (n == SR_FAILED_KEPT) { /* the oldest go */
      sr_failed_t *old = *pp;
      *pp = old->next;
      free(old);
      continue;
    }
    pp = &(*pp)->next;
  }
}

static void on_sr_done(uv_work_t *w, int status) {
  taking_t *t = w->data;
  rr_engine_t *e = t->e;
  taking_unlink(t);
  if (status || t->sr_rc) {
    rr_log(RR_LOG_WARN, "ai", "event=sr_not_written channel=%s job=%s error=\"%s\"",
           t->ch->cfg.name, t->job_id,
           t->sr_err.len ? t->sr_err.data : rr_strerror(status ? status : t->sr_rc));
    sr_remember_failed(e, t->sr_path);
  } else if (t->again) {
    rr_log(RR_LOG_INFO, "ai", "event=sr_written_again channel=%s job=%s", t->ch->cfg.name,
           t->job_id);
  }
  taking_free(t);
  if (e->files_ready)
    e->files_ready(e->files_ready_ud);
}

/* Starts writing t's SR in the thread pool (its path and UID chosen here
 * unless set) and lists t in e->taking; 0, or an error (t not listed). */
static int start_sr(taking_t *t) {
  rr_engine_t *e = t->e;
  char dir[1100];
  snprintf(dir, sizeof dir, "%s/results", t->ch->cfg.dicom_spool);
  if (!t->sr_path[0])
    snprintf(t->sr_path, sizeof t->sr_path, "%s/%s.dcm", dir, t->job_id);
  int rc = mkdir(dir, 0750) == 0 || errno == EEXIST ? 0 : -errno;
  if (rc == 0 && !t->sr_uid[0])
    rc = rr_dicom_sr_new_uid(t->sr_uid);
  if (rc == 0)
    rc = rr_ai_sr_prepare(e->journal, t->study_uid, &t->prep);
  if (rc == 0)
    rc = copy_result(t->r, &t->sr_r);
  if (rc == 0 && !(t->sr_study = json_deep_copy(t->study)))
    rc = RR_ENOMEM;
  if (rc == 0) {
    t->work.data = t;
    rc = uv_queue_work(e->loop, &t->work, on_sr_work, on_sr_done);
  }
  if (rc)
    return rc;
  t->next = e->taking;
  e->taking = t;
  return 0;
}

int rr_engine_take_ai_result(rr_engine_t *e, const rr_destination_config_t *dest,
                             const char *job_id, const char *study_uid, const rr_ai_result_t *r,
                             const char *via, rr_journal_done_cb cb, void *ud) {
  rr_channel_t *ch = find_channel(e, dest->name);
  if (!ch)
    return RR_ENOTFOUND;
  if (taking_has(e, job_id))
    return -EEXIST; /* the same job's result is being taken */
  taking_t *t = calloc(1, sizeof *t);
  if (!t)
    return RR_ENOMEM;
  t->e = e;
  t->ch = ch;
  t->dest = dest;
  t->cb = cb;
  t->ud = ud;
  t->now = rr_wall_ms();
  rr_buf_init(&t->sr_err, 1024);
  snprintf(t->job_id, sizeof t->job_id, "%s", job_id);
  snprintf(t->study_uid, sizeof t->study_uid, "%s", study_uid);
  snprintf(t->via, sizeof t->via, "%s", via);
  int rc = copy_result(r, &t->r);
  if (rc) {
    taking_free(t);
    return rc;
  }
  /* What the script gets: the job, the result, and the study as routing saw it. */
  rr_buf_t text;
  rr_buf_init(&text, (size_t)64 << 20);
  int64_t order_id;
  const char *method;
  if (rr_journal_study_context(e->journal, study_uid, (int64_t)ch->cfg.dicom_match_window_ms, &text,
                               &order_id, &method) == 0)
    t->study = json_loadb(text.data, text.len, 0, NULL);
  rr_buf_close(&text);
  /* The SR of the result, for the script to route to the PACS (r.sr). */
  bool listed = false;
  if (t->study && ch->cfg.dicom && !ch->cfg.dicomweb && t->r->nfindings &&
      strcmp(t->r->status, "completed") == 0) {
    rc = start_sr(t);
    listed = rc == 0;
    if (rc) {
      rr_log(RR_LOG_WARN, "ai", "event=sr_not_written channel=%s job=%s error=\"%s\"", ch->cfg.name,
             job_id, rr_strerror(rc));
      t->sr_path[0] = t->sr_uid[0] = '\0';
    }
  }
  rc = take_journal(t);
  if (rc && listed)
    rr_log(RR_LOG_WARN, "ai", "event=sr_unused channel=%s job=%s", ch->cfg.name, job_id);
  if (!listed)
    taking_free(t);
  return rc;
}

/* ---- SR files and their deliveries ------------------------------------------ */

/* The DICOM channel whose results folder holds path ("<spool>/results/
 * <job>.dcm"), with the job's id; NULL when it is no result's SR. */
static rr_channel_t *results_channel(rr_engine_t *e, const char *path, char *job, size_t cap) {
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next) {
    if (!ch->cfg.dicom || ch->cfg.dicomweb)
      continue;
    size_t n = strlen(ch->cfg.dicom_spool);
    if (strncmp(path, ch->cfg.dicom_spool, n) != 0 || strncmp(path + n, "/results/", 9) != 0)
      continue;
    const char *name = path + n + 9;
    size_t len = strlen(name);
    if (strchr(name, '/') || len <= 4 || len - 4 >= cap || strcmp(name + len - 4, ".dcm") != 0)
      continue;
    memcpy(job, name, len - 4);
    job[len - 4] = '\0';
    return ch;
  }
  return NULL;
}

/* The kept AI_RESULT entry of job that routed the SR at path: its result,
 * the study as routing saw it and the SR's UID. */
static int kept_result(rr_engine_t *e, const char *job, const char *path, taking_t *t) {
  sqlite3 *db = rr_journal_reader(e->journal);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "SELECT m.raw FROM ai_jobs a JOIN messages m ON m.study_uid = a.study_uid"
                         " WHERE a.job_id = ?1 AND m.message_type = 'AI_RESULT'"
                         " ORDER BY m.id DESC",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_text(st, 1, job, -1, SQLITE_TRANSIENT);
  int rc = RR_ENOTFOUND, s;
  while (rc == RR_ENOTFOUND && (s = sqlite3_step(st)) == SQLITE_ROW) {
    json_t *o =
        json_loadb(sqlite3_column_blob(st, 0), (size_t)sqlite3_column_bytes(st, 0), 0, NULL);
    const char *id = json_string_value(json_object_get(json_object_get(o, "job"), "id"));
    const char *sr = json_string_value(json_object_get(o, "sr"));
    const char *uid = json_string_value(json_object_get(o, "sr_uid"));
    json_t *study = json_object_get(o, "study");
    const char *study_uid = json_string_value(json_object_get(study, "study_uid"));
    char *res = json_dumps(json_object_get(o, "result"), JSON_COMPACT);
    if (id && sr && uid && study_uid && res && strcmp(id, job) == 0 && strcmp(sr, path) == 0) {
      rc = rr_ai_parse_result(res, strlen(res), &t->r, NULL);
      if (rc == 0) {
        t->study = json_incref(study);
        snprintf(t->sr_uid, sizeof t->sr_uid, "%s", uid);
        snprintf(t->study_uid, sizeof t->study_uid, "%s", study_uid);
      }
    }
    free(res);
    json_decref(o);
  }
  sqlite3_finalize(st);
  return rc;
}

int rr_engine_sr_gate(void *ud, const char *path) {
  rr_engine_t *e = ud;
  for (taking_t *t = e->taking; t; t = t->next)
    if (strcmp(t->sr_path, path) == 0)
      return RR_EAGAIN;
  for (sr_failed_t *f = e->sr_failed; f; f = f->next)
    if (strcmp(f->path, path) == 0)
      return RR_ENOTFOUND;
  char job[RR_AI_JOB_ID_MAX];
  rr_channel_t *ch = results_channel(e, path, job, sizeof job);
  if (!ch || access(path, F_OK) == 0 || errno != ENOENT)
    return 0; /* not an SR of ours, or there: the sender reads it */
  /* Kept in the store, not on disk: the process ended between the two. */
  taking_t *t = calloc(1, sizeof *t);
  if (!t)
    return RR_ENOMEM;
  t->e = e;
  t->ch = ch;
  t->again = true;
  rr_buf_init(&t->sr_err, 1024);
  snprintf(t->job_id, sizeof t->job_id, "%s", job);
  snprintf(t->sr_path, sizeof t->sr_path, "%s", path);
  int rc = kept_result(e, job, path, t);
  if (rc == 0)
    rc = start_sr(t);
  if (rc) {
    rr_log(RR_LOG_ERROR, "ai", "event=sr_not_written channel=%s job=%s error=\"%s\"", ch->cfg.name,
           job, rc == RR_ENOTFOUND ? "missing, and no kept result names it" : rr_strerror(rc));
    taking_free(t);
    sr_remember_failed(e, path);
    return RR_ENOTFOUND;
  }
  rr_log(RR_LOG_WARN, "ai", "event=sr_missing channel=%s job=%s action=write_again", ch->cfg.name,
         job);
  return RR_EAGAIN;
}

void rr_engine_set_files_ready(rr_engine_t *e, void (*cb)(void *ud), void *ud) {
  e->files_ready = cb;
  e->files_ready_ud = ud;
}

void rr_engine_ai_results_free(rr_engine_t *e) {
  for (sr_failed_t *f = e->sr_failed, *n; f; f = n) {
    n = f->next;
    free(f);
  }
  e->sr_failed = NULL;
}

void rr_engine_ai_result(void *ud, const rr_destination_config_t *dest, const char *job_id,
                         const char *study_uid, const struct rr_ai_result *r) {
  rr_engine_t *e = ud;
  int rc = rr_engine_take_ai_result(e, dest, job_id, study_uid, r, "answer", NULL, NULL);
  if (rc)
    rr_log(RR_LOG_ERROR, "ai", "event=result_not_kept destination=%s job=%s error=%s", dest->name,
           job_id, rr_strerror(rc));
}

int rr_engine_ai_callback(rr_engine_t *e, const char *job_id, const char *token, const char *body,
                          size_t len, rr_journal_done_cb cb, void *ud, rr_buf_t *err) {
  rr_ai_job_info_t info;
  int rc = rr_ai_job_get(e->journal, job_id, &info);
  if (rc) {
    rr_buf_printf(err, "no such job");
    return rc;
  }
  char hash[65];
  rr_ai_token_hash(token ? token : "", hash);
  unsigned char diff = info.token_hash[0] ? 0 : 1; /* a job without a token takes no callback */
  for (size_t i = 0; i < 64; i++)
    diff |= (unsigned char)(hash[i] ^ info.token_hash[i]);
  if (diff) {
    rr_buf_printf(err, "not this job's token");
    return -EPERM;
  }
  if (strcmp(info.state, "running") != 0 && strcmp(info.state, "sending") != 0) {
    rr_buf_printf(err, "the job is %s", info.state);
    return -EEXIST;
  }
  rr_ai_result_t *r;
  if ((rc = rr_ai_parse_result(body, len, &r, err)) != 0)
    return rc;
  if ((rc = rr_ai_validate("result", r->json, err)) != 0) {
    rr_ai_result_free(r);
    return rc;
  }
  if (strcmp(r->job_id, job_id) != 0) {
    rr_ai_result_free(r);
    rr_buf_printf(err, "$.job_id: not this job");
    return RR_EPARSE;
  }
  rr_channel_t *ch = find_channel(e, info.destination);
  const rr_destination_config_t *dest = ch ? find_dest(ch, info.destination) : NULL;
  if (!dest) {
    rr_ai_result_free(r);
    rr_buf_printf(err, "the job's endpoint is no longer configured");
    return RR_ENOTFOUND;
  }
  if (dest->ai_deidentify && (rc = rr_ai_deid_reidentify(e->journal, job_id, r, err)) != 0) {
    rr_ai_result_free(r);
    return rc;
  }
  rc = rr_engine_take_ai_result(e, dest, job_id, info.study_uid, r, "callback", cb, ud);
  rr_ai_result_free(r);
  return rc;
}

/* Jobs past their deadline without a result: expired. */
static void expire_one(void *ud, const char *job_id, const char *destination) {
  rr_engine_t *e = ud;
  rr_journal_audit_json(
      e->journal, "engine", "expired", job_id,
      json_pack("{s:s, s:s}", "endpoint", destination, "reason", "no result before the deadline"));
  if (rr_ai_job_state(e->journal, job_id, "expired", "no result before the deadline",
                      rr_wall_ms()) == 0)
    rr_log(RR_LOG_WARN, "ai", "event=job_expired destination=%s job=%s reason=deadline",
           destination, job_id);
}

int rr_engine_ai_expire(rr_engine_t *e) {
  int n = rr_ai_jobs_overdue(e->journal, rr_wall_ms(), expire_one, e);
  if (n > 0)
    rr_journal_kick(e->journal);
  return n;
}

/* AI results by polling: an endpoint that accepted a job with a
 * status_url (202, radrelay.ai-accepted/1) serves the job there: 202 with
 * the accepted document while it runs, 200 with the result once done.
 * radrelay GETs it every poll_s seconds (the endpoint's setting, default
 * 5) until the result comes or the job's deadline passes (then the job
 * expires like any other). A 404 or 410 means the endpoint lost the job:
 * failed. Other answers and transport errors are tried again at the next
 * poll. Jobs to poll are read from the store (ai_jobs, state running,
 * with a status_url), so polling resumes after a restart. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ai/ai.h"
#include "channel/channel_int.h"
#include "core/error.h"
#include "core/log.h"

typedef struct poll {
  struct poll *next;
  rr_engine_t *e;
  char job_id[RR_AI_JOB_ID_MAX];
  char destination[160];
  char study_uid[65];
  char url[1024];
  int64_t next_ms;
  bool seen;                /* still running in the store at the last look */
  rr_http_transfer_t *xfer; /* while a GET runs */
} poll_t;

static const rr_destination_config_t *find_dest(rr_engine_t *e, const char *name) {
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next)
    for (size_t i = 0; i < ch->cfg.ndestinations; i++)
      if (strcmp(ch->cfg.destinations[i].name, name) == 0)
        return &ch->cfg.destinations[i];
  return NULL;
}

static uint64_t poll_ms(const rr_destination_config_t *d) {
  return d && d->ai_poll_ms ? d->ai_poll_ms : 5000;
}

static void drop(rr_engine_t *e, poll_t *p) {
  for (poll_t **pp = &e->polls; *pp; pp = &(*pp)->next)
    if (*pp == p) {
      *pp = p->next;
      break;
    }
  free(p);
}

static void on_polled(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r) {
  (void)t;
  poll_t *p = ud;
  rr_engine_t *e = p->e;
  p->xfer = NULL;
  if (r->status == UV_ECANCELED || e->stopping) {
    drop(e, p);
    return;
  }
  const rr_destination_config_t *d = find_dest(e, p->destination);
  int64_t now = rr_wall_ms();
  p->next_ms = now + (int64_t)poll_ms(d);
  if (r->status != 0) {
    rr_log(RR_LOG_WARN, "ai", "event=poll_failed destination=%s job=%s error=\"%s\"",
           p->destination, p->job_id, r->message);
    return;
  }
  if (r->http_status == 202)
    return; /* still running */
  if (r->http_status == 404 || r->http_status == 410) {
    char reason[120];
    snprintf(reason, sizeof reason, "the endpoint no longer knows the job (HTTP %ld)",
             r->http_status);
    rr_journal_audit_json(e->journal, "engine", "failed", p->job_id,
                          json_pack("{s:s, s:s}", "endpoint", p->destination, "reason", reason));
    rr_ai_job_state(e->journal, p->job_id, "failed", reason, now);
    rr_journal_kick(e->journal);
    rr_log(RR_LOG_WARN, "ai", "event=job_failed destination=%s job=%s reason=\"%s\"",
           p->destination, p->job_id, reason);
    drop(e, p);
    return;
  }
  if (r->http_status != 200) {
    rr_log(RR_LOG_WARN, "ai", "event=poll_failed destination=%s job=%s error=\"HTTP %ld\"",
           p->destination, p->job_id, r->http_status);
    return;
  }
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  rr_ai_result_t *res = NULL;
  int rc = rr_ai_parse_result(r->body, r->body_len, &res, &err);
  if (rc == 0)
    rc = rr_ai_validate("result", res->json, &err);
  if (rc == 0 && strcmp(res->job_id, p->job_id) != 0) {
    rr_buf_printf(&err, "$.job_id: not this job");
    rc = RR_EPARSE;
  }
  rr_ai_job_info_t info;
  if (rc == 0 && rr_ai_job_get(e->journal, p->job_id, &info) == 0 &&
      strcmp(info.state, "running") != 0) {
    rc = 0; /* taken meanwhile (a callback, an expiry): nothing to do */
  } else if (rc == 0 && d) {
    rc = rr_engine_take_ai_result(e, d, p->job_id, p->study_uid, res, "poll", NULL, NULL);
    if (rc == -EEXIST) /* taken already, its SR being written */
      rc = 0;
    if (rc)
      rr_log(RR_LOG_ERROR, "ai", "event=result_not_kept destination=%s job=%s error=%s",
             p->destination, p->job_id, rr_strerror(rc));
  }
  if (rc == RR_EPARSE) {
    /* The endpoint broke the contract: the job fails, with why. */
    char reason[300];
    snprintf(reason, sizeof reason, "result does not follow the contract: %s",
             err.data ? err.data : "?");
    rr_ai_job_state(e->journal, p->job_id, "failed", reason, now);
    rr_journal_audit_json(e->journal, "engine", "failed", p->job_id,
                          json_pack("{s:s, s:s}", "endpoint", p->destination, "reason", reason));
    rr_journal_kick(e->journal);
    rr_log(RR_LOG_WARN, "ai", "event=job_failed destination=%s job=%s reason=\"%s\"",
           p->destination, p->job_id, reason);
  }
  rr_ai_result_free(res);
  rr_buf_close(&err);
  drop(e, p);
}

static int start_poll(rr_engine_t *e, poll_t *p, const rr_destination_config_t *d) {
  if (!e->http) {
    rr_http_client_config_t hc;
    rr_http_client_config_default(&hc);
    hc.name = "ai-poll";
    hc.max_concurrent = 4;
    int rc = rr_http_client_new(e->loop, &hc, &e->http);
    if (rc)
      return rc;
  }
  const char *token = NULL;
  if (d->token_file[0]) { /* read once per endpoint, kept for the engine's life */
    poll_token_t *k = e->poll_tokens;
    while (k && strcmp(k->destination, d->name) != 0)
      k = k->next;
    if (!k) {
      if (!(k = calloc(1, sizeof *k)))
        return RR_ENOMEM;
      rr_buf_t err;
      rr_buf_init(&err, 512);
      int rc = rr_http_client_read_token(d->token_file, &k->token, &err);
      if (rc)
        rr_log(RR_LOG_ERROR, "ai", "event=token_unreadable destination=%s error=\"%s\"", d->name,
               err.data ? err.data : rr_strerror(rc));
      rr_buf_close(&err);
      if (rc) {
        free(k);
        return rc;
      }
      snprintf(k->destination, sizeof k->destination, "%s", d->name);
      k->next = e->poll_tokens;
      e->poll_tokens = k;
    }
    token = k->token;
  }
  rr_http_request_t req;
  rr_http_client_request_default(&req);
  static const char *const accept[] = {"Accept: application/json"};
  req.method = RR_HTTP_GET;
  req.url = p->url;
  req.headers = accept;
  req.nheaders = 1;
  req.bearer_token = token;
  req.ca_file = d->tls_ca[0] ? d->tls_ca : NULL;
  req.cert_file = d->tls_cert[0] ? d->tls_cert : NULL;
  req.key_file = d->tls_key[0] ? d->tls_key : NULL;
  req.connect_timeout_ms = d->connect_timeout_ms;
  req.timeout_ms = d->timeout_ms;
  int rc = rr_http_client_submit(e->http, &req, on_polled, p, &p->xfer);
  return rc;
}

static void on_running(void *ud, const char *job_id, const char *destination, const char *study_uid,
                       const char *status_url, int64_t sent_ms) {
  rr_engine_t *e = ud;
  for (poll_t *p = e->polls; p; p = p->next)
    if (strcmp(p->job_id, job_id) == 0) {
      p->seen = true;
      return;
    }
  const rr_destination_config_t *d = find_dest(e, destination);
  poll_t *p = calloc(1, sizeof *p);
  if (!p || !d || strlen(status_url) >= sizeof p->url) {
    if (p && d)
      rr_log(RR_LOG_WARN, "ai",
             "event=poll_skipped destination=%s job=%s reason=\"status_url too "
             "long\"",
             destination, job_id);
    free(p);
    return;
  }
  p->e = e;
  p->seen = true;
  snprintf(p->job_id, sizeof p->job_id, "%s", job_id);
  snprintf(p->destination, sizeof p->destination, "%s", destination);
  snprintf(p->study_uid, sizeof p->study_uid, "%s", study_uid);
  snprintf(p->url, sizeof p->url, "%s", status_url);
  p->next_ms = sent_ms + (int64_t)poll_ms(d);
  p->next = e->polls;
  e->polls = p;
}

int rr_engine_ai_poll(rr_engine_t *e) {
  if (e->stopping)
    return 0;
  for (poll_t *p = e->polls; p; p = p->next)
    p->seen = false;
  int rc = rr_ai_jobs_polled(e->journal, on_running, e);
  if (rc < 0)
    return rc;
  int64_t now = rr_wall_ms();
  int started = 0;
  for (poll_t *p = e->polls, *n; p; p = n) {
    n = p->next;
    if (p->xfer)
      continue;
    if (!p->seen) { /* it has its result, or expired */
      drop(e, p);
      continue;
    }
    if (p->next_ms > now)
      continue;
    const rr_destination_config_t *d = find_dest(e, p->destination);
    int src = d ? start_poll(e, p, d) : RR_ENOTFOUND;
    if (src) {
      rr_log(RR_LOG_WARN, "ai", "event=poll_failed destination=%s job=%s error=%s", p->destination,
             p->job_id, rr_strerror(src));
      p->next_ms = now + (int64_t)poll_ms(d);
    } else {
      started++;
    }
  }
  return started;
}

void rr_engine_ai_poll_free(rr_engine_t *e) {
  for (poll_t *p = e->polls, *n; p; p = n) {
    n = p->next;
    free(p);
  }
  e->polls = NULL;
  for (poll_token_t *k = e->poll_tokens, *n; k; k = n) {
    n = k->next;
    rr_http_client_token_free(k->token);
    free(k);
  }
  e->poll_tokens = NULL;
}

/* Critical-result notifications on the engine: born from what an AI
 * result's script routes to a "notification" destination, paged again and
 * escalated by a timer until acknowledged (notify/notify.h).
 *
 * Every page is a journal entry (message type NOTIFICATION) with one route
 * to the gateway's queue; the notification's row and its audit record
 * commit in the same transaction. Open notifications, and those of the
 * last days (for de-duplication), are held in memory; the table is the
 * truth after a restart. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "channel/channel_int.h"
#include "core/error.h"
#include "core/log.h"
#include "notify/notify.h"

#define KEEP_MS ((int64_t)30 * 86400 * 1000) /* de-duplication memory */

static rr_channel_t *channel_named(rr_engine_t *e, const char *name) {
  for (rr_channel_t *ch = e->channels; ch; ch = ch->next)
    if (strcmp(ch->cfg.name, name) == 0)
      return ch;
  return NULL;
}

static const rr_destination_config_t *dest_named(const rr_channel_t *ch, const char *name) {
  for (size_t i = 0; ch && i < ch->cfg.ndestinations; i++)
    if (strcmp(ch->cfg.destinations[i].name, name) == 0)
      return &ch->cfg.destinations[i];
  return NULL;
}

static void policy_of(const rr_destination_config_t *d, rr_notify_policy_t *p) {
  rr_notify_policy_default(p);
  if (!d)
    return;
  memcpy(p->repeat_ms, d->notify_repeat_ms, sizeof p->repeat_ms);
  memcpy(p->next_ms, d->notify_next_ms, sizeof p->next_ms);
  p->chain = (const char *const *)d->notify_chain;
}

static rr_notification_t *find_id(rr_engine_t *e, const char *id) {
  for (size_t i = 0; i < e->nnotes; i++)
    if (strcmp(e->notes[i]->id, id) == 0)
      return e->notes[i];
  return NULL;
}

static rr_notification_t *find_key(rr_engine_t *e, const char *key) {
  for (size_t i = 0; i < e->nnotes; i++)
    if (strcmp(e->notes[i]->key, key) == 0)
      return e->notes[i];
  return NULL;
}

static int remember(rr_engine_t *e, rr_notification_t *n) {
  if (e->nnotes == e->notes_cap) {
    size_t cap = e->notes_cap ? e->notes_cap * 2 : 16;
    rr_notification_t **v = realloc(e->notes, cap * sizeof *v);
    if (!v)
      return RR_ENOMEM;
    e->notes = v;
    e->notes_cap = cap;
  }
  e->notes[e->nnotes++] = n;
  return 0;
}

/* Forgets what is settled and older than the de-duplication memory. */
static void forget_old(rr_engine_t *e, int64_t now) {
  size_t k = 0;
  for (size_t i = 0; i < e->nnotes; i++) {
    rr_notification_t *n = e->notes[i];
    if (n->state != RR_NOTIFY_OPEN && n->created_ms < now - KEEP_MS)
      rr_notify_free(n);
    else
      e->notes[k++] = n;
  }
  e->nnotes = k;
}

static void audit(rr_engine_t *e, const char *actor, const char *kind, const rr_notification_t *n,
                  const rr_notify_policy_t *p) {
  rr_journal_audit_json(e->journal, actor, kind, n->id,
                        json_pack("{s:s, s:s, s:s, s:i, s:i, s:i, s:i, s:s}", "destination",
                                  n->destination, "study_uid", n->study_uid, "recipient",
                                  rr_notify_recipient(p, n->level), "acr_category", n->category,
                                  "escalation_level", n->level, "attempt", (int)n->attempt, "pages",
                                  (int)n->sends, "state", rr_notify_state_name(n->state)));
}

/* A page of n: a journal entry with one route to its destination. */
static int page(rr_engine_t *e, rr_notification_t *n, const rr_notify_policy_t *p) {
  char *payload = rr_notify_payload(n, p, e->public_url);
  if (!payload)
    return RR_ENOMEM;
  rr_journal_route_t r = {.destination = n->destination,
                          .key = NULL,
                          .lane = 2,
                          .content_type = "json",
                          .payload = payload,
                          .len = strlen(payload)};
  rr_journal_entry_t je = {.channel = n->channel,
                           .peer = "engine",
                           .received_ms = rr_wall_ms(),
                           .message_type = "NOTIFICATION",
                           .study_uid = n->study_uid,
                           .status = "accepted",
                           .raw = payload,
                           .raw_len = strlen(payload),
                           .routes = &r,
                           .nroutes = 1};
  int rc = rr_journal_add(e->journal, &je, NULL, NULL);
  free(payload);
  return rc;
}

static void arm(rr_engine_t *e);

static void on_timer(uv_timer_t *t) {
  rr_engine_t *e = t->data;
  if (e->stopping)
    return;
  int64_t now = rr_wall_ms();
  bool wrote = false;
  for (size_t i = 0; i < e->nnotes; i++) {
    rr_notification_t *n = e->notes[i];
    if (n->state != RR_NOTIFY_OPEN || n->next_ms == 0 || n->next_ms > now)
      continue;
    rr_channel_t *ch = channel_named(e, n->channel);
    const rr_destination_config_t *d = dest_named(ch, n->destination);
    if (!d) {
      rr_log(RR_LOG_ERROR, "notify",
             "event=notification_stuck id=%s destination=%s reason=\"the destination is no longer "
             "configured\"",
             n->id, n->destination);
      n->next_ms = 0;
      continue;
    }
    rr_notify_policy_t p;
    policy_of(d, &p);
    rr_notify_action_t a = rr_notify_step(n, &p, now);
    if (a == RR_NOTIFY_NOTHING)
      continue;
    int rc = 0;
    if (a == RR_NOTIFY_EXHAUSTED) {
      rr_log(RR_LOG_ERROR, "notify",
             "event=notification_unacknowledged id=%s destination=%s category=%d pages=%u", n->id,
             n->destination, n->category, n->sends);
      audit(e, "engine", "notification_unacknowledged", n, &p);
    } else {
      rr_log(RR_LOG_WARN, "notify",
             "event=%s id=%s destination=%s recipient=%s level=%d attempt=%u category=%d",
             a == RR_NOTIFY_ESCALATE ? "notification_escalated" : "notification_repeated", n->id,
             n->destination, rr_notify_recipient(&p, n->level), n->level, n->attempt, n->category);
      audit(e, "engine", a == RR_NOTIFY_ESCALATE ? "notification_escalated" : "notification_repeat",
            n, &p);
      rc = page(e, n, &p);
    }
    if (rc == 0)
      rc = rr_notify_save(e->journal, n);
    if (rc)
      rr_log(RR_LOG_ERROR, "notify", "event=notification_not_kept id=%s error=%s", n->id,
             rr_strerror(rc));
    wrote = true;
  }
  if (wrote)
    rr_journal_kick(e->journal);
  forget_old(e, now);
  arm(e);
}

/* The timer, for the earliest step due. */
static void arm(rr_engine_t *e) {
  if (!e->notify_open || e->stopping)
    return;
  int64_t next = 0;
  for (size_t i = 0; i < e->nnotes; i++) {
    const rr_notification_t *n = e->notes[i];
    if (n->state == RR_NOTIFY_OPEN && n->next_ms && (next == 0 || n->next_ms < next))
      next = n->next_ms;
  }
  if (next == 0) {
    uv_timer_stop(&e->notify_timer);
    return;
  }
  int64_t wait = next - rr_wall_ms();
  uv_timer_start(&e->notify_timer, on_timer, wait > 0 ? (uint64_t)wait : 0, 0);
}

static void loaded(void *ud, rr_notification_t *n) {
  rr_engine_t *e = ud;
  if (remember(e, n) != 0)
    rr_notify_free(n);
}

int rr_engine_notify_start(rr_engine_t *e, const char *public_url) {
  snprintf(e->public_url, sizeof e->public_url, "%s", public_url ? public_url : "");
  int n = rr_notify_load(e->journal, rr_wall_ms() - KEEP_MS, loaded, e);
  if (n < 0)
    return n;
  uv_timer_init(e->loop, &e->notify_timer);
  e->notify_timer.data = e;
  uv_unref((uv_handle_t *)&e->notify_timer);
  e->notify_open = true;
  size_t open = 0;
  for (size_t i = 0; i < e->nnotes; i++)
    open += e->notes[i]->state == RR_NOTIFY_OPEN;
  if (open)
    rr_log(RR_LOG_INFO, "notify", "event=notifications_loaded open=%zu", open);
  arm(e);
  return 0;
}

void rr_engine_notify_stop(rr_engine_t *e) {
  if (!e->notify_open)
    return;
  e->notify_open = false;
  uv_close((uv_handle_t *)&e->notify_timer, NULL);
}

void rr_engine_notify_free(rr_engine_t *e) {
  for (size_t i = 0; i < e->nnotes; i++)
    rr_notify_free(e->notes[i]);
  free(e->notes);
  e->notes = NULL;
  e->nnotes = e->notes_cap = 0;
}

int rr_channel_notify_route(rr_channel_t *ch, const rr_destination_config_t *d, const char *job_id,
                            rr_journal_route_t *route, char **owned) {
  rr_engine_t *e = ch->engine;
  *owned = NULL;
  if (strcmp(route->content_type, "json") != 0)
    return 0;
  json_t *doc = json_loadb(route->payload, route->len, 0, NULL);
  rr_notification_t *n = calloc(1, sizeof *n);
  if (!n) {
    json_decref(doc);
    return RR_ENOMEM;
  }
  if (!json_is_object(doc) || !rr_notify_key(d->name, doc, n->key, sizeof n->key, n->id)) {
    rr_log(RR_LOG_WARN, "notify",
           "event=notification_untracked channel=%s destination=%s job=%s reason=\"the document "
           "names no study_uid: sent once, without acknowledgement or escalation\"",
           ch->cfg.name, d->name, job_id);
    json_decref(doc);
    free(n);
    return 0;
  }
  int64_t now = rr_wall_ms();
  rr_notify_policy_t p;
  policy_of(d, &p);
  rr_notification_t *prev = find_key(e, n->key);
  if (prev) {
    /* The same finding again (another result, a re-read study): no page. */
    rr_log(RR_LOG_INFO, "notify",
           "event=notification_duplicate id=%s destination=%s job=%s state=%s", prev->id, d->name,
           job_id, rr_notify_state_name(prev->state));
    rr_journal_audit_json(e->journal, "engine", "notification_duplicate", prev->id,
                          json_pack("{s:s, s:s, s:s}", "destination", d->name, "job_id", job_id,
                                    "state", rr_notify_state_name(prev->state)));
    json_decref(doc);
    free(n);
    return 1;
  }
  json_t *cat = json_object_get(doc, "acr_category");
  n->category = json_is_integer(cat) && json_integer_value(cat) >= 1 &&
                        json_integer_value(cat) <= RR_NOTIFY_CATEGORIES
                    ? (int)json_integer_value(cat)
                    : 1;
  snprintf(n->destination, sizeof n->destination, "%s", d->name);
  snprintf(n->channel, sizeof n->channel, "%s", ch->cfg.name);
  snprintf(n->job_id, sizeof n->job_id, "%s", job_id);
  snprintf(n->study_uid, sizeof n->study_uid, "%s",
           json_string_value(json_object_get(doc, "study_uid")));
  n->state = RR_NOTIFY_OPEN;
  n->attempt = n->sends = 1;
  n->created_ms = n->level_ms = n->last_ms = now;
  n->next_ms = rr_notify_due(n, &p);
  n->payload = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
  json_decref(doc);
  char *text = n->payload ? rr_notify_payload(n, &p, e->public_url) : NULL;
  int rc = text ? remember(e, n) : RR_ENOMEM;
  if (rc) {
    free(text);
    rr_notify_free(n);
    return rc;
  }
  if ((rc = rr_notify_save(e->journal, n)) != 0) {
    free(text);
    return rc;
  }
  audit(e, "engine", "notification", n, &p);
  rr_log(RR_LOG_INFO, "notify", "event=notification id=%s destination=%s recipient=%s category=%d",
         n->id, d->name, rr_notify_recipient(&p, 0), n->category);
  route->payload = text;
  route->len = strlen(text);
  *owned = text;
  arm(e);
  return 0;
}

/* ---- acknowledgement ------------------------------------------------------------ */

int rr_engine_notification_ack(rr_engine_t *e, const char *id, const char *by, const char *via,
                               const char *note, rr_journal_done_cb cb, void *ud, rr_buf_t *err) {
  rr_notification_t *n = find_id(e, id);
  if (!n) {
    json_t *o = NULL;
    int rc = rr_notify_json(e->journal, id, &o);
    json_decref(o);
    if (rc == 0) { /* settled long ago: not held in memory */
      rr_buf_printf(err, "the notification is no longer open");
      return -EEXIST;
    }
    rr_buf_printf(err, "no such notification");
    return rc == RR_ENOTFOUND ? RR_ENOTFOUND : rc;
  }
  if (n->state == RR_NOTIFY_ACKED) {
    rr_buf_printf(err, "already acknowledged by %s", n->acked_by);
    return -EEXIST;
  }
  rr_channel_t *ch = channel_named(e, n->channel);
  rr_notify_policy_t p;
  policy_of(dest_named(ch, n->destination), &p);
  n->state = RR_NOTIFY_ACKED;
  n->acked_ms = rr_wall_ms();
  n->next_ms = 0;
  snprintf(n->acked_by, sizeof n->acked_by, "%s", by && *by ? by : via);
  snprintf(n->ack_via, sizeof n->ack_via, "%s", via);
  snprintf(n->note, sizeof n->note, "%s", note ? note : "");
  int rc = rr_notify_save(e->journal, n);
  if (rc)
    return rc;
  rr_journal_audit_json(e->journal, n->acked_by, "notification_ack", n->id,
                        json_pack("{s:s, s:s, s:s, s:i, s:i, s:I, s:s?}", "via", via, "destination",
                                  n->destination, "recipient", rr_notify_recipient(&p, n->level),
                                  "escalation_level", n->level, "pages", (int)n->sends, "after_ms",
                                  (json_int_t)(n->acked_ms - n->created_ms), "note",
                                  n->note[0] ? n->note : NULL));
  if ((rc = rr_journal_add_barrier(e->journal, cb, ud)) != 0)
    return rc;
  rr_journal_kick(e->journal);
  rr_log(RR_LOG_INFO, "notify",
         "event=notification_acked id=%s principal=%s after_ms=%lld pages=%u", n->id, via,
         (long long)(n->acked_ms - n->created_ms), n->sends);
  arm(e);
  return 0;
}

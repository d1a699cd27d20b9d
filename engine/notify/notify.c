/* Critical-result notifications: the escalation policy and the table. */
#include "notify/notify.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ai/ai.h"
#include "core/error.h"

void rr_notify_policy_default(rr_notify_policy_t *p) {
  memset(p, 0, sizeof *p);
  p->repeat_ms[1] = 5 * 60 * 1000;
  p->next_ms[1] = 10 * 60 * 1000;
  p->repeat_ms[2] = 60 * 60 * 1000;
  p->next_ms[2] = 2 * 60 * 60 * 1000;
  p->repeat_ms[3] = 0;
  p->next_ms[3] = 24 * 60 * 60 * 1000;
}

size_t rr_notify_chain_len(const rr_notify_policy_t *p) {
  size_t n = 0;
  while (p->chain && p->chain[n])
    n++;
  return n ? n : 1;
}

const char *rr_notify_recipient(const rr_notify_policy_t *p, int level) {
  size_t n = p->chain ? rr_notify_chain_len(p) : 0;
  if (!p->chain || !p->chain[0])
    return "on-call";
  size_t i = level < 0 ? 0 : (size_t)level;
  return p->chain[i < n ? i : n - 1];
}

const char *rr_notify_state_name(rr_notify_state_t s) {
  return s == RR_NOTIFY_ACKED ? "acked" : s == RR_NOTIFY_UNACKNOWLEDGED ? "unacknowledged" : "open";
}

static rr_notify_state_t state_parse(const char *s) {
  return s && strcmp(s, "acked") == 0            ? RR_NOTIFY_ACKED
         : s && strcmp(s, "unacknowledged") == 0 ? RR_NOTIFY_UNACKNOWLEDGED
                                                 : RR_NOTIFY_OPEN;
}

bool rr_notify_key(const char *destination, json_t *doc, char *key, size_t cap, char id[24]) {
  const char *uid = json_string_value(json_object_get(doc, "study_uid"));
  if (!uid || !*uid)
    return false;
  json_t *code = json_object_get(doc, "code");
  const char *sys = json_string_value(json_object_get(code, "system"));
  const char *val = json_string_value(json_object_get(code, "code"));
  const char *finding = json_string_value(json_object_get(doc, "finding"));
  if (sys && val)
    snprintf(key, cap, "%s|%s|%s^%s", destination, uid, sys, val);
  else
    snprintf(key, cap, "%s|%s|%s", destination, uid, finding ? finding : "");
  char hash[65];
  rr_ai_token_hash(key, hash);
  snprintf(id, 24, "N-%.16s", hash);
  return true;
}

static int category_of(const rr_notification_t *n) {
  return n->category >= 1 && n->category <= RR_NOTIFY_CATEGORIES ? n->category : 1;
}

int64_t rr_notify_due(const rr_notification_t *n, const rr_notify_policy_t *p) {
  if (n->state != RR_NOTIFY_OPEN)
    return 0;
  int c = category_of(n);
  int64_t due = 0;
  if (p->repeat_ms[c] > 0)
    due = n->last_ms + p->repeat_ms[c];
  if (p->next_ms[c] > 0 && (due == 0 || n->level_ms + p->next_ms[c] < due))
    due = n->level_ms + p->next_ms[c];
  return due;
}

rr_notify_action_t rr_notify_step(rr_notification_t *n, const rr_notify_policy_t *p, int64_t now) {
  if (n->state != RR_NOTIFY_OPEN)
    return RR_NOTIFY_NOTHING;
  int c = category_of(n);
  rr_notify_action_t a = RR_NOTIFY_NOTHING;
  if (p->next_ms[c] > 0 && now >= n->level_ms + p->next_ms[c]) {
    if ((size_t)n->level + 1 >= rr_notify_chain_len(p)) {
      n->state = RR_NOTIFY_UNACKNOWLEDGED;
      n->next_ms = 0;
      return RR_NOTIFY_EXHAUSTED;
    }
    n->level++;
    n->attempt = 1;
    n->level_ms = now;
    a = RR_NOTIFY_ESCALATE;
  } else if (p->repeat_ms[c] > 0 && now >= n->last_ms + p->repeat_ms[c]) {
    n->attempt++;
    a = RR_NOTIFY_REPEAT;
  }
  if (a != RR_NOTIFY_NOTHING) {
    n->sends++;
    n->last_ms = now;
  }
  n->next_ms = rr_notify_due(n, p);
  return a;
}

char *rr_notify_payload(const rr_notification_t *n, const rr_notify_policy_t *p,
                        const char *public_url) {
  json_t *doc = n->payload ? json_loads(n->payload, 0, NULL) : NULL;
  if (!json_is_object(doc)) {
    json_decref(doc);
    doc = json_object();
  }
  json_object_set_new(doc, "notification_id", json_string(n->id));
  json_object_set_new(doc, "recipient", json_string(rr_notify_recipient(p, n->level)));
  json_object_set_new(doc, "escalation_level", json_integer(n->level));
  json_object_set_new(doc, "attempt", json_integer(n->attempt));
  json_object_set_new(doc, "acr_category", json_integer(category_of(n)));
  if (public_url && *public_url) {
    char url[1400];
    size_t len = strlen(public_url);
    snprintf(url, sizeof url, "%.*s/api/notifications/%s/ack",
             (int)(len && public_url[len - 1] == '/' ? len - 1 : len), public_url, n->id);
    json_object_set_new(doc, "ack_url", json_string(url));
    if (!json_object_get(doc, "link") && n->study_uid[0]) {
      snprintf(url, sizeof url, "%.*s/api/studies/%s",
               (int)(len && public_url[len - 1] == '/' ? len - 1 : len), public_url, n->study_uid);
      json_object_set_new(doc, "link", json_string(url));
    }
  }
  char *text = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
  json_decref(doc);
  return text;
}

/* ---- the table ---------------------------------------------------------------- */

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS notifications("
    " id TEXT PRIMARY KEY, key TEXT NOT NULL UNIQUE,"
    " destination TEXT NOT NULL, channel TEXT NOT NULL, job_id TEXT, study_uid TEXT NOT NULL,"
    " category INTEGER NOT NULL, level INTEGER NOT NULL, attempt INTEGER NOT NULL,"
    " sends INTEGER NOT NULL,"
    " state TEXT NOT NULL," /* open, acked, unacknowledged */
    " created_ms INTEGER NOT NULL, level_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL,"
    " next_ms INTEGER NOT NULL, acked_ms INTEGER, acked_by TEXT, ack_via TEXT, note TEXT,"
    " payload TEXT NOT NULL) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS notifications_state ON notifications(state, created_ms);";

int rr_notify_schema(rr_journal_t *j, char **errmsg) {
  return rr_journal_schema(j, schema, errmsg);
}

void rr_notify_free(rr_notification_t *n) {
  if (!n)
    return;
  free(n->payload);
  free(n);
}

static void free_copy(void *data) {
  rr_notify_free(data);
}

static int bind_opt(sqlite3_stmt *st, int i, const char *s) {
  return s && *s ? sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

static int write_row(sqlite3 *db, void *data) {
  const rr_notification_t *n = data;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(
          db,
          "INSERT OR REPLACE INTO notifications(id, key, destination, channel, job_id,"
          " study_uid, category, level, attempt, sends, state, created_ms, level_ms,"
          " last_ms, next_ms, acked_ms, acked_by, ack_via, note, payload)"
          " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,"
          "?19,?20)",
          -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_opt(st, 1, n->id);
  bind_opt(st, 2, n->key);
  bind_opt(st, 3, n->destination);
  bind_opt(st, 4, n->channel);
  bind_opt(st, 5, n->job_id);
  bind_opt(st, 6, n->study_uid);
  sqlite3_bind_int(st, 7, n->category);
  sqlite3_bind_int(st, 8, n->level);
  sqlite3_bind_int64(st, 9, n->attempt);
  sqlite3_bind_int64(st, 10, n->sends);
  bind_opt(st, 11, rr_notify_state_name(n->state));
  sqlite3_bind_int64(st, 12, n->created_ms);
  sqlite3_bind_int64(st, 13, n->level_ms);
  sqlite3_bind_int64(st, 14, n->last_ms);
  sqlite3_bind_int64(st, 15, n->next_ms);
  if (n->acked_ms)
    sqlite3_bind_int64(st, 16, n->acked_ms);
  else
    sqlite3_bind_null(st, 16);
  bind_opt(st, 17, n->acked_by);
  bind_opt(st, 18, n->ack_via);
  bind_opt(st, 19, n->note);
  sqlite3_bind_text(st, 20, n->payload ? n->payload : "{}", -1, SQLITE_TRANSIENT);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

int rr_notify_save(rr_journal_t *j, const rr_notification_t *n) {
  rr_notification_t *c = malloc(sizeof *c);
  if (!c)
    return RR_ENOMEM;
  *c = *n;
  c->payload = n->payload ? strdup(n->payload) : NULL;
  if (n->payload && !c->payload) {
    free(c);
    return RR_ENOMEM;
  }
  return rr_journal_custom(j, write_row, c, free_copy, NULL, NULL);
}

static const char columns[] = "id, key, destination, channel, job_id, study_uid, category, level,"
                              " attempt, sends, state, created_ms, level_ms, last_ms, next_ms,"
                              " acked_ms, acked_by, ack_via, note, payload";

static void col(sqlite3_stmt *st, int i, char *out, size_t cap) {
  const unsigned char *t = sqlite3_column_text(st, i);
  snprintf(out, cap, "%s", t ? (const char *)t : "");
}

static rr_notification_t *from_row(sqlite3_stmt *st) {
  rr_notification_t *n = calloc(1, sizeof *n);
  if (!n)
    return NULL;
  col(st, 0, n->id, sizeof n->id);
  col(st, 1, n->key, sizeof n->key);
  col(st, 2, n->destination, sizeof n->destination);
  col(st, 3, n->channel, sizeof n->channel);
  col(st, 4, n->job_id, sizeof n->job_id);
  col(st, 5, n->study_uid, sizeof n->study_uid);
  n->category = sqlite3_column_int(st, 6);
  n->level = sqlite3_column_int(st, 7);
  n->attempt = (unsigned)sqlite3_column_int64(st, 8);
  n->sends = (unsigned)sqlite3_column_int64(st, 9);
  n->state = state_parse((const char *)sqlite3_column_text(st, 10));
  n->created_ms = sqlite3_column_int64(st, 11);
  n->level_ms = sqlite3_column_int64(st, 12);
  n->last_ms = sqlite3_column_int64(st, 13);
  n->next_ms = sqlite3_column_int64(st, 14);
  n->acked_ms = sqlite3_column_int64(st, 15);
  col(st, 16, n->acked_by, sizeof n->acked_by);
  col(st, 17, n->ack_via, sizeof n->ack_via);
  col(st, 18, n->note, sizeof n->note);
  const unsigned char *p = sqlite3_column_text(st, 19);
  n->payload = strdup(p ? (const char *)p : "{}");
  if (!n->payload) {
    free(n);
    return NULL;
  }
  return n;
}

int rr_notify_load(rr_journal_t *j, int64_t since_ms, void (*cb)(void *ud, rr_notification_t *n),
                   void *ud) {
  char sql[600];
  snprintf(sql, sizeof sql,
           "SELECT %s FROM notifications WHERE state = 'open' OR created_ms >= ?1"
           " ORDER BY created_ms, id",
           columns);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j), sql, -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_int64(st, 1, since_ms);
  int count = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    rr_notification_t *n = from_row(st);
    if (!n) {
      sqlite3_finalize(st);
      return RR_ENOMEM;
    }
    cb(ud, n);
    count++;
  }
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? count : RR_EIO;
}

static json_t *to_json(const rr_notification_t *n) {
  json_t *payload = json_loads(n->payload ? n->payload : "{}", 0, NULL);
  json_t *o = json_pack("{s:s, s:s, s:s, s:s?, s:s, s:i, s:i, s:i, s:i, s:s, s:I, s:I, s:I}", "id",
                        n->id, "destination", n->destination, "channel", n->channel, "job_id",
                        n->job_id[0] ? n->job_id : NULL, "study_uid", n->study_uid, "acr_category",
                        n->category, "escalation_level", n->level, "attempt", (int)n->attempt,
                        "pages", (int)n->sends, "state", rr_notify_state_name(n->state),
                        "created_ms", (json_int_t)n->created_ms, "last_page_ms",
                        (json_int_t)n->last_ms, "next_ms", (json_int_t)n->next_ms);
  if (!o) {
    json_decref(payload);
    return NULL;
  }
  json_object_set_new(o, "finding", json_incref(json_object_get(payload, "finding")));
  json_object_set_new(o, "code", json_incref(json_object_get(payload, "code")));
  json_object_set_new(o, "accession", json_incref(json_object_get(payload, "accession")));
  json_decref(payload);
  if (n->state == RR_NOTIFY_ACKED)
    json_object_set_new(o, "ack",
                        json_pack("{s:s, s:s, s:I, s:s?}", "by", n->acked_by, "via", n->ack_via,
                                  "at_ms", (json_int_t)n->acked_ms, "note",
                                  n->note[0] ? n->note : NULL));
  return o;
}

int rr_notify_json(rr_journal_t *j, const char *id, json_t **out) {
  char sql[400];
  snprintf(sql, sizeof sql, "SELECT %s FROM notifications WHERE id = ?1", columns);
  sqlite3 *db = rr_journal_reader(j);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
  int rc = sqlite3_step(st);
  rr_notification_t *n = rc == SQLITE_ROW ? from_row(st) : NULL;
  sqlite3_finalize(st);
  if (rc == SQLITE_DONE)
    return RR_ENOTFOUND;
  if (!n)
    return rc == SQLITE_ROW ? RR_ENOMEM : RR_EIO;
  json_t *o = to_json(n);
  rr_notify_free(n);
  if (!o)
    return RR_ENOMEM;
  /* Its history: the audit trail's records about it. */
  json_t *events = json_array();
  if (sqlite3_prepare_v2(db,
                         "SELECT seq, at_ms, actor, kind, data FROM audit WHERE subject = ?1"
                         " ORDER BY seq",
                         -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
    while (sqlite3_step(st) == SQLITE_ROW) {
      json_t *data = json_loads((const char *)sqlite3_column_text(st, 4), 0, NULL);
      json_array_append_new(events, json_pack("{s:I, s:I, s:s, s:s, s:o}", "seq",
                                              (json_int_t)sqlite3_column_int64(st, 0), "at_ms",
                                              (json_int_t)sqlite3_column_int64(st, 1), "actor",
                                              (const char *)sqlite3_column_text(st, 2), "event",
                                              (const char *)sqlite3_column_text(st, 3), "data",
                                              data ? data : json_null()));
    }
    sqlite3_finalize(st);
  }
  json_object_set_new(o, "events", events);
  *out = o;
  return 0;
}

int rr_notify_list_json(rr_journal_t *j, const char *state, size_t limit, json_t **out) {
  char sql[600];
  snprintf(sql, sizeof sql,
           "SELECT %s FROM notifications WHERE ?1 IS NULL OR state = ?1"
           " ORDER BY created_ms DESC, id LIMIT ?2",
           columns);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j), sql, -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_opt(st, 1, state);
  sqlite3_bind_int64(st, 2, (sqlite3_int64)limit);
  json_t *rows = json_array();
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    rr_notification_t *n = from_row(st);
    json_t *o = n ? to_json(n) : NULL;
    rr_notify_free(n);
    if (o)
      json_array_append_new(rows, o);
  }
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) {
    json_decref(rows);
    return RR_EIO;
  }
  *out = rows;
  return 0;
}

/* Critical-result notifications: their lifecycle and their table.
 *
 * A notification is born when an AI result's script routes a critical
 * finding to a destination whose role is "notification" (a pager or
 * secure-chat gateway). From then on it is open until someone
 * acknowledges it (POST /api/notifications/{id}/ack). While open, the
 * escalation policy of its destination, per ACR actionable-finding
 * category, decides what happens next:
 *
 *   repeat_ms  the same person is paged again this long after the last
 *              page (0: never);
 *   next_ms    this long after paging a person the first time, the next
 *              person in the chain is paged (0: never); after the last
 *              person of the chain, the notification is "unacknowledged"
 *              (an error for operations; no more pages).
 *
 * Defaults (category 1: minutes; 2: hours; 3: days, per the ACR
 * actionable findings guidance): 1 repeat 5 min, next 10 min; 2 repeat
 * 1 h, next 2 h; 3 no repeat, next after 24 h.
 *
 * The same finding (destination, Study Instance UID, finding code) is
 * paged once: a notification id is derived from it, and a second result
 * with the finding finds the first notification instead of paging again.
 *
 * The table `notifications` holds every notification and its state; rows
 * are written through the journal (rr_journal_custom), in the transaction
 * that queues the page they describe, so the state survives a restart and
 * never says a page went out that was not queued.
 *
 * Pure (rr_notify_step, rr_notify_due) or loop thread (the rest). */
#ifndef RR_NOTIFY_H
#define RR_NOTIFY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store/journal.h"

#define RR_NOTIFY_CATEGORIES 3

typedef struct rr_notify_policy {
  int64_t repeat_ms[RR_NOTIFY_CATEGORIES + 1]; /* by ACR category 1..3; [0] unused */
  int64_t next_ms[RR_NOTIFY_CATEGORIES + 1];
  const char *const *chain; /* NULL-terminated recipients; NULL or empty: "on-call" */
} rr_notify_policy_t;

void rr_notify_policy_default(rr_notify_policy_t *p);
/* rr_notify_recipient: the chain's person at level (the last one past
 * the end). */
const char *rr_notify_recipient(const rr_notify_policy_t *p, int level);
size_t rr_notify_chain_len(const rr_notify_policy_t *p);

typedef enum rr_notify_state {
  RR_NOTIFY_OPEN = 0,
  RR_NOTIFY_ACKED,
  RR_NOTIFY_UNACKNOWLEDGED /* the chain ran out: nobody acknowledged */
} rr_notify_state_t;

const char *rr_notify_state_name(rr_notify_state_t s);

typedef struct rr_notification {
  char id[24];           /* "N-" and 16 hex digits of the key's SHA-256 */
  char key[600];         /* destination | study UID | finding code */
  char destination[160]; /* "<channel>.<destination>" */
  char channel[64];      /* whose journal entries carry its pages */
  char job_id[64];       /* the AI job whose result raised it */
  char study_uid[65];
  int category;     /* ACR 1..3 */
  int level;        /* index in the chain of the person paged now */
  unsigned attempt; /* pages to that person so far */
  unsigned sends;   /* pages in all */
  rr_notify_state_t state;
  int64_t created_ms;
  int64_t level_ms; /* when the person at level was first paged */
  int64_t last_ms;  /* the last page */
  int64_t next_ms;  /* when something is due (0: nothing) */
  int64_t acked_ms;
  char acked_by[128]; /* the person who acknowledged */
  char ack_via[128];  /* the API principal that told us */
  char note[512];
  char *payload; /* the script's document (JSON text), malloc'd */
} rr_notification_t;

/* rr_notify_key: the de-duplication key of a notification document of
 * destination (study_uid and code.system/code.code, else finding) into
 * key, and its id. Returns false when the document names no study. */
bool rr_notify_key(const char *destination, json_t *doc, char *key, size_t cap, char id[24]);

typedef enum rr_notify_action {
  RR_NOTIFY_NOTHING = 0,
  RR_NOTIFY_REPEAT,   /* page the same person again */
  RR_NOTIFY_ESCALATE, /* page the next person */
  RR_NOTIFY_EXHAUSTED /* no one left: state unacknowledged */
} rr_notify_action_t;

/* rr_notify_due: when the next step of an open notification is due under
 * p (0: never). */
int64_t rr_notify_due(const rr_notification_t *n, const rr_notify_policy_t *p);
/* rr_notify_step: what is due at now, applied to n (level, attempt,
 * sends, last_ms, next_ms, state). One step per call: after a long pause
 * the clock restarts from now rather than firing every missed repeat. */
rr_notify_action_t rr_notify_step(rr_notification_t *n, const rr_notify_policy_t *p, int64_t now);

/* rr_notify_payload: the document sent to the gateway: the script's, with
 * notification_id, recipient, attempt, escalation level, category and,
 * when public_url is given, ack_url and (unless the script gave one) a
 * link to the study (GET /api/studies/{uid}). malloc'd JSON text or NULL. */
char *rr_notify_payload(const rr_notification_t *n, const rr_notify_policy_t *p,
                        const char *public_url);

/* rr_notify_schema: table notifications (at start). */
int rr_notify_schema(rr_journal_t *j, char **errmsg);
/* rr_notify_save: queues the row of n (inserted or replaced) for the next
 * batch (copied). RR_ENOMEM. */
int rr_notify_save(rr_journal_t *j, const rr_notification_t *n);
/* rr_notify_load: committed rows that are open or were created since
 * since_ms, oldest first; cb owns each (free with rr_notify_free).
 * Returns the count or RR_EIO. */
int rr_notify_load(rr_journal_t *j, int64_t since_ms, void (*cb)(void *ud, rr_notification_t *n),
                   void *ud);
/* rr_notify_json: the row of id as the API shows it, with the audit
 * events whose subject it is (oldest first). RR_ENOTFOUND, RR_EIO. */
int rr_notify_json(rr_journal_t *j, const char *id, json_t **out);
/* rr_notify_list_json: rows (newest first, at most limit), of one state
 * (NULL: all). RR_EIO. */
int rr_notify_list_json(rr_journal_t *j, const char *state, size_t limit, json_t **out);
void rr_notify_free(rr_notification_t *n);

#endif

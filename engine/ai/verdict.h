/* The radiologist's verdict on AI findings: whether the final (or
 * corrected) report confirmed or overrode each finding an AI endpoint
 * returned for a study.
 *
 * Model
 *   A finding is a row of table ai_findings (ai/ai.h: one per finding of a
 *   stored result, keyed by job id and finding id). Its verdict columns
 *   hold the current verdict: verdict ("confirmed" or "overridden"),
 *   verdict_ms, verdict_by (the signing radiologist), verdict_report (the
 *   report's control id) and verdict_note (why, in the script's words).
 *   A later verdict on the same finding (an addendum, a corrected report)
 *   replaces it; the audit trail keeps every one, each record of kind
 *   "verdict" naming the verdict it replaced.
 *
 * Transactions
 *   rr_ai_verdict_record queues the row's update and its audit record
 *   through the journal, so both commit in the batch of the message being
 *   handled (the report that carried the verdict): kept or lost together.
 *   Reads see committed rows plus the verdicts still queued or being
 *   committed, so two reports of one batch see each other.
 *
 * Threading: the loop thread (the journal's). Nothing here logs. */
#ifndef RR_AI_VERDICT_H
#define RR_AI_VERDICT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "store/journal.h"

#define RR_AI_VERDICT_TEXT_MAX 256  /* bytes of an id, a name or a control id */
#define RR_AI_VERDICT_NOTE_MAX 4096 /* bytes of a note */
#define RR_AI_FINDINGS_MAX 1000     /* findings one query returns at most */

/* rr_ai_verdict_schema: adds the verdict columns ai_findings lacks
 * (verdict_report, verdict_note) to a store made before them. Needs the
 * tables of rr_ai_schema, which calls it. Only while the journal is idle
 * (at start). RR_EIO with a malloc'd message in *errmsg (may be NULL). */
int rr_ai_verdict_schema(rr_journal_t *j, char **errmsg);

/* rr_ai_findings_json: the findings of a study, as a new JSON array in
 * *out: those of the study with Study Instance UID study_uid, and of every
 * study with this accession number (its own, or that of the order it was
 * matched to, or an order naming its UID). Either may be NULL or "";
 * both: findings of either. Each element: job_id, endpoint, channel,
 * mode, model {name, version}, finding_id, study_uid, accession (when
 * known), code {system, code, meaning}, label, confidence, critical,
 * acr_category, and when there is one the current verdict (verdict,
 * verdict_by, verdict_report, verdict_note, verdict_ms); absent values are
 * left out. Oldest result first, at most RR_AI_FINDINGS_MAX. RR_EINVAL
 * (neither given), RR_EIO, RR_ENOMEM. */
int rr_ai_findings_json(rr_journal_t *j, const char *accession, const char *study_uid,
                        json_t **out);

/* A verdict to record. Every pointer is borrowed for the call. */
typedef struct rr_ai_verdict {
  const char *job_id, *finding_id;
  const char *verdict; /* "confirmed" or "overridden" */
  const char *by;      /* the signing radiologist: the audit record's actor; NULL or "" =
                          the channel */
  const char *note;    /* NULL = none */
  const char *report;  /* the report's control id (MSH-10); NULL = none */
  const char *channel; /* the channel whose script records it */
  int64_t at_ms;
} rr_ai_verdict_t;

typedef enum rr_ai_verdict_outcome {
  RR_AI_VERDICT_RECORDED = 0, /* the finding's first verdict */
  RR_AI_VERDICT_REPLACED,     /* an earlier, different verdict was replaced */
  RR_AI_VERDICT_UNCHANGED     /* the same verdict by the same radiologist from the same
                                 report (a replay): nothing recorded, nothing audited */
} rr_ai_verdict_outcome_t;

/* rr_ai_verdict_record: records v for its finding, with the next batch,
 * and queues its audit record (kind "verdict", actor v->by, subject the
 * job id; data: finding_id, study_uid, code, model, endpoint, verdict, by,
 * note, report, channel, and "replaces" with the verdict it replaces).
 * *outcome says which. RR_EINVAL (a verdict other than the two, a field
 * over its limit), RR_ENOTFOUND (no such job, or the job has no such
 * finding), each with a sentence in err (appended; may be NULL); RR_EIO,
 * RR_ENOMEM. */
int rr_ai_verdict_record(rr_journal_t *j, const rr_ai_verdict_t *v,
                         rr_ai_verdict_outcome_t *outcome, rr_buf_t *err);

/* rr_ai_verdict_outcome_name: "recorded", "replaced", "unchanged". */
const char *rr_ai_verdict_outcome_name(rr_ai_verdict_outcome_t o);

#endif

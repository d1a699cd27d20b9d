/* AI jobs: what radrelay sends an AI endpoint about a study, what comes
 * back, and their rows in the store (schemas/ai-request.schema.json,
 * schemas/ai-result.schema.json).
 *
 * Model
 *   A channel script routes a stable study's context to a destination of
 *   type "ai"; the queue row is the job (job id "AJ-<queue row id>", so a
 *   retry is the same job). rr_ai_build_request turns the context into the
 *   request document; rr_ai_job_sent records the job (table ai_jobs) when it
 *   has been accepted by the endpoint; rr_ai_parse_result checks a result
 *   document and rr_ai_store_result records it with its findings (table
 *   ai_findings), in the store's next transaction.
 *
 * Privacy
 *   The request carries no patient name, birth date, MRN or patient ID; the
 *   study's UIDs, accession number, modality and order context only (for
 *   a de-identifying endpoint, pseudonyms of them: ai/deid.h).
 *   Nothing here logs.
 *
 * Threading
 *   Pure functions: any thread. Store functions: the loop thread (writes
 *   go through rr_journal_custom and run on its worker). */
#ifndef RR_AI_AI_H
#define RR_AI_AI_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "core/error.h"
#include "store/journal.h"

#define RR_AI_JOB_ID_MAX 32
#define RR_AI_TOKEN_HEX 64 /* a callback token: 32 random bytes in hex */

typedef enum rr_ai_mode {
  RR_AI_SILENT = 0, /* run and record only */
  RR_AI_ASSISTANT,  /* results to the PACS and RIS; no worklist change, no page */
  RR_AI_ACTIVE      /* also reprioritize and notify */
} rr_ai_mode_t;

/* What the endpoint takes; empty lists take anything. */
typedef struct rr_ai_takes {
  char **modalities; /* NULL-terminated; a study matches when one of its modalities is here */
  char **body_parts; /* ... its body part (case-insensitive) */
  char **procedures; /* ... its order's procedure code */
} rr_ai_takes_t;

typedef struct rr_ai_request_opts {
  const char *job_id;
  const char *endpoint; /* the destination's name in the channel */
  int64_t created_ms, deadline_ms;
  const char *callback_url; /* NULL: no callback */
  const char *token;        /* the callback token (with callback_url) */
  const char *images_root;  /* DICOMweb root the images are fetched from, for studies
                               without a retrieve_url (DICOM sources); NULL = none */
  const char *images_token; /* bearer token for images_root (images.auth); NULL = none */
} rr_ai_request_opts_t;

/* rr_ai_takes_match: whether the study context (a JSON object) is one the
 * endpoint takes; *why (static) names the first test it fails. Pure. */
bool rr_ai_takes_match(const rr_ai_takes_t *t, json_t *study, const char **why);

/* rr_ai_build_request: the request document for the study context ctx
 * (the JSON of rr_journal_study_context, as the script routed it), as
 * compact JSON appended to out. RR_EINVAL (ctx without study_uid), RR_ENOMEM.
 * Pure. */
int rr_ai_build_request(json_t *ctx, const rr_ai_request_opts_t *o, rr_buf_t *out);

/* rr_ai_token: a new callback token (RR_AI_TOKEN_HEX hex digits, NUL) and
 * its SHA-256 in hex (what the store keeps). RR_EIO when the system has no
 * randomness. */
int rr_ai_token(char token[RR_AI_TOKEN_HEX + 1], char hash[65]);
/* rr_ai_token_hash: SHA-256 in hex of token. */
void rr_ai_token_hash(const char *token, char hash[65]);

/* A result, parsed and checked. Strings are borrowed from json. */
typedef struct rr_ai_finding {
  const char *id, *label;
  const char *code_system, *code, *meaning;
  double confidence; /* -1 when absent */
  bool critical;
  int acr_category; /* 0 when absent */
  json_t *json;     /* the finding object */
} rr_ai_finding_t;

typedef struct rr_ai_result {
  json_t *json; /* the document (owned) */
  const char *job_id, *status, *error;
  const char *model_name, *model_version;
  size_t nfindings;
  rr_ai_finding_t *findings;
  bool critical;    /* any finding critical */
  int acr_category; /* the lowest (most urgent) category among findings; 0 = none */
} rr_ai_result_t;

/* rr_ai_parse_result: parses and checks a result document against the
 * contract (schema, job_id, status, model, findings with codes, confidence
 * 0..1, categories 1..3, locations). On 0, *out is new
 * (rr_ai_result_free). RR_EPARSE with a sentence in err (may be NULL;
 * appended; names the JSON path, never a value), RR_ENOMEM. Pure. */
int rr_ai_parse_result(const char *text, size_t len, rr_ai_result_t **out, rr_buf_t *err);
void rr_ai_result_free(rr_ai_result_t *r);

/* rr_ai_validate: checks a document against the published schema of its
 * kind ("result", "request" or "accepted": schemas/ai-*.schema.json, as
 * compiled into the binary). 0, or RR_EPARSE with one line per problem in
 * err (may be NULL; appended), RR_ENOMEM. Loop thread (the compiled
 * schemas are kept). */
int rr_ai_validate(const char *kind, json_t *doc, rr_buf_t *err);

/* ---- the store -------------------------------------------------------------- */

/* rr_ai_schema: tables ai_jobs and ai_findings (at start). */
int rr_ai_schema(rr_journal_t *j, char **errmsg);

typedef struct rr_ai_job {
  const char *job_id;
  int64_t queue_id;
  const char *destination; /* the queue's name, "<channel>.<endpoint>" */
  const char *channel;
  const char *study_uid;
  rr_ai_mode_t mode;
  const char *state;      /* "running" (accepted, result to come) or "completed"... */
  const char *token_hash; /* NULL: no callback */
  const char *status_url; /* NULL: no polling */
  int64_t sent_ms, deadline_ms;
  const char *request; /* JSON text */
} rr_ai_job_t;

/* rr_ai_job_sent: records (or updates) the job as sent, with the next
 * batch. Copies everything. RR_ENOMEM. */
int rr_ai_job_sent(rr_journal_t *j, const rr_ai_job_t *job);

/* What the store knows of a job (rr_ai_job_get). */
typedef struct rr_ai_job_info {
  char job_id[RR_AI_JOB_ID_MAX];
  char destination[160], channel[64], study_uid[65], state[16], token_hash[65];
  char status_url[1024];
  rr_ai_mode_t mode;
  int64_t sent_ms, deadline_ms, result_ms;
} rr_ai_job_info_t;

/* rr_ai_job_get: RR_ENOTFOUND, RR_EIO. Reads committed rows. */
int rr_ai_job_get(rr_journal_t *j, const char *job_id, rr_ai_job_info_t *out);

/* rr_ai_store_result: the job's result (state from its status) and one row
 * per finding, with the next batch; cb after the commit. Copies what it
 * needs from r. RR_ENOMEM. */
int rr_ai_store_result(rr_journal_t *j, const rr_ai_result_t *r, int64_t at_ms,
                       rr_journal_done_cb cb, void *ud);

/* rr_ai_job_state: sets a job's state ("expired", "failed") with a reason,
 * with the next batch, unless it already has a result. RR_ENOMEM. */
int rr_ai_job_state(rr_journal_t *j, const char *job_id, const char *state, const char *reason,
                    int64_t at_ms);

/* rr_ai_jobs_polled: running jobs whose endpoint gave a status_url; cb
 * per job (strings borrowed). Returns how many, or RR_EIO. */
int rr_ai_jobs_polled(rr_journal_t *j,
                      void (*cb)(void *ud, const char *job_id, const char *destination,
                                 const char *study_uid, const char *status_url, int64_t sent_ms),
                      void *ud);

/* rr_ai_jobs_overdue: jobs still sent/running whose deadline is before
 * now_ms; cb per job id (borrowed). Returns how many, or RR_EIO. */
int rr_ai_jobs_overdue(rr_journal_t *j, int64_t now_ms,
                       void (*cb)(void *ud, const char *job_id, const char *destination), void *ud);

/* rr_ai_write_sr: the TID 1500 SR (dicom/sr.h) of a completed result with
 * findings, for a study whose instances came as files (a DICOM source):
 * the model is the device, each finding with its point (2D on a received
 * instance, or 3D), confidence and measurements, every instance as
 * evidence, the order's procedure as the procedure reported. Written
 * durably to out_path. Its SOP Instance UID is sop_uid when that is set
 * (the same document written again), else a new one, written there.
 * RR_EINVAL (no
 * findings), RR_ENOTFOUND (no instance file), the writer's errors (a
 * sentence in err, may be NULL). Blocking (fsync). Loop thread. */
/* The same in two steps, so that the writing (DCMTK reading an instance,
 * building the document, fsyncs) runs off the loop thread:
 * rr_ai_sr_prepare reads the study's instances from the store (loop
 * thread); rr_ai_sr_build writes the SR (any thread; r and study are only
 * read). */
typedef struct rr_ai_sr_prep rr_ai_sr_prep_t;
int rr_ai_sr_prepare(rr_journal_t *j, const char *study_uid, rr_ai_sr_prep_t **out);
int rr_ai_sr_build(const rr_ai_sr_prep_t *p, const rr_ai_result_t *r, json_t *study,
                   const char *out_path, char sop_uid[65], rr_buf_t *err);
void rr_ai_sr_prep_free(rr_ai_sr_prep_t *p);
int rr_ai_write_sr(rr_journal_t *j, const rr_ai_result_t *r, json_t *study, const char *out_path,
                   char sop_uid[65], rr_buf_t *err);

/* rr_ai_mode_name / rr_ai_mode_parse: "silent", "assistant", "active". */
const char *rr_ai_mode_name(rr_ai_mode_t m);
int rr_ai_mode_parse(const char *s);

#endif

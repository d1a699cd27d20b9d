/* De-identified AI jobs: what an AI endpoint configured with "deidentify"
 * gets instead of the study (dicom/deid.h does the instances).
 *
 * Model
 *   Before the request of such a job is sent, every instance of the study
 *   (the spool files of a DICOM source) is de-identified on libuv's thread
 *   pool into "<root>/<job id>/<pseudonymous SOP Instance UID>.dcm", where
 *   root is "<the channel's spool>/deid". The job's pseudonyms (study,
 *   series, instances and every other UID replaced, the accession) are
 *   kept in the store with the folder (tables ai_deid_jobs and
 *   ai_deid_map), in one transaction; once that has committed the
 *   dispatcher gets the study context with the pseudonyms in place of the
 *   real identifiers (rr_ai_deid_context) and builds the request from it.
 *   The endpoint fetches the copies from radrelay's own DICOMweb routes
 *   for the job (admin/api_dicomweb.c) with the job's token; results that
 *   come back name pseudonyms, which rr_ai_deid_reidentify maps back to the
 *   real UIDs before the result is stored and published. Folders of jobs
 *   that have ended (completed, failed, rejected, expired) are removed by
 *   rr_ai_deid_sweep; the map stays (it is the re-identification record).
 *
 *   A study without instance files on this machine (a DICOMweb source's)
 *   is refused: the job fails with that reason (RR_EINVAL).
 *
 * Secret
 *   The HMAC key of the pseudonyms is the first line of a file (at least
 *   16 bytes): the destination's "deid_secret_file", or "deid.secret"
 *   beside the store, made with 32 random bytes (hex, mode 0600) the first
 *   time. Never logged, never in the store.
 *
 * Threading: loop thread, except the de-identification itself (thread
 *   pool). Nothing here logs patient data; UIDs are logged at debug only. */
#ifndef RR_AI_DEID_H
#define RR_AI_DEID_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/buf.h"
#include "store/journal.h"

struct rr_ai_result;

/* rr_ai_deid_schema: tables ai_deid_jobs and ai_deid_map (at start). */
int rr_ai_deid_schema(rr_journal_t *j, char **errmsg);

/* rr_ai_deid_secret_load: reads the secret (first line, blanks trimmed) of
 * path; when it does not exist and create is true, makes it (32 random
 * bytes in hex, mode 0600, O_EXCL). *secret is malloc'd (*len bytes, NUL
 * after them). Errors with a sentence in err: -errno, RR_EINVAL (shorter
 * than 16 bytes), RR_EIO (no randomness). Blocking; at start. */
int rr_ai_deid_secret_load(const char *path, bool create, char **secret, size_t *len,
                           rr_buf_t *err);

/* One de-identifying destination. */
typedef struct rr_ai_deid rr_ai_deid_t;

/* rr_ai_deid_new: for destination name (copied), de-identified copies
 * under root (copied; "" when the channel has no spool: every job is
 * refused), secret read from secret_file (created when create). loop and
 * j borrowed. Errors as rr_ai_deid_secret_load. */
int rr_ai_deid_new(uv_loop_t *loop, rr_journal_t *j, const char *name, const char *root,
                   const char *secret_file, bool create, rr_ai_deid_t **out, rr_buf_t *err);
/* rr_ai_deid_free: after every job it started has called back. NULL ok. */
void rr_ai_deid_free(rr_ai_deid_t *d);

/* Called once per rr_ai_deid_start, from the loop, never inside it.
 * status 0: ctx (new reference, the caller's) is the context to build the
 * request from. Else detail is a sentence (no patient data) and
 * permanent says whether a retry could change it (refused: no instance
 * files, every instance refused). */
typedef void (*rr_ai_deid_ready_fn)(void *ud, int status, bool permanent, const char *detail,
                                    json_t *ctx);

/* rr_ai_deid_start: prepares job_id (at most 31 bytes) for the study
 * context ctx (borrowed; copied): reads its instance paths, de-identifies
 * them in the thread pool, records the map and calls cb after the commit.
 * RR_ENOMEM (cb not called). Loop thread. */
int rr_ai_deid_start(rr_ai_deid_t *d, const char *job_id, json_t *ctx, rr_ai_deid_ready_fn cb,
                     void *ud);

/* rr_ai_deid_reidentify: replaces the pseudonyms a result of job_id names
 * (each finding's location series_uid, instance_uid and
 * frame_of_reference_uid, a top-level study_uid) by the real UIDs, in
 * r->json (the strings of r stay valid). RR_EPARSE with a sentence in err
 * (appended; names the JSON path) when one is not a pseudonym of the job;
 * RR_EIO. Reads committed rows; loop thread. */
int rr_ai_deid_reidentify(rr_journal_t *j, const char *job_id, struct rr_ai_result *r,
                          rr_buf_t *err);

/* What the DICOMweb routes serve of a job: its folder and pseudonymous
 * study UID. RR_ENOTFOUND (no such job, or its folder was removed),
 * RR_EIO. */
int rr_ai_deid_job_files(rr_journal_t *j, const char *job_id, char *dir, size_t dir_cap,
                         char study_uid[65]);
/* rr_ai_deid_instances: the pseudonymous SOP Instance UIDs of job_id's
 * served instances, of one series (pseudonym) or all (series NULL), by
 * series then instance; cb per UID. Returns how many, or RR_EIO. */
int rr_ai_deid_instances(rr_journal_t *j, const char *job_id, const char *series,
                         void (*cb)(void *ud, const char *sop_uid), void *ud);

/* rr_ai_deid_sweep: removes the folders of de-identified copies whose job
 * has ended (state other than sending and running), at most max per call,
 * and records that. Returns how many were removed, or RR_EIO. Blocking
 * (unlinks). Loop thread. */
int rr_ai_deid_sweep(rr_journal_t *j, int max);

#endif

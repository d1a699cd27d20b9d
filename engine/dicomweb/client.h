/* DICOMweb client (DICOM PS3.18) on a libuv loop: QIDO-RS searches,
 * WADO-RS retrieval to disk, metadata, STOW-RS from files. One
 * rr_dicomweb_client_t per PACS (base URL, authentication, TLS, limits),
 * over a shared rr_http_client_t.
 *
 * Model
 *   rr_dicomweb_client_new reads the configuration (and the password or
 *   token file) once. Each operation (rr_dicomweb_search, _metadata,
 *   _retrieve, _store) builds its URL, submits one HTTP request and
 *   returns at once; its outcome comes exactly once through its done
 *   callback, from the loop, never from inside the starting call. An
 *   operation copies what it needs from the client when it starts: the
 *   client may be freed while operations run (they go on); the HTTP client
 *   must outlive them (rr_http_client_close cancels them: UV_ECANCELED).
 *
 * Services and media types
 *   QIDO-RS  GET {base}/studies, /studies/{study}/series,
 *            /studies/{study}/instances, /studies/{study}/series/{series}/
 *            instances, with the query's parameters (names and values
 *            percent-encoded where RFC 3986 wants it, and '&', '=', '+',
 *            ';' too; the wildcards '*' and '?' and ',' go literally, as
 *            servers match on them undecoded); includefield, limit, offset;
 *            Accept: application/dicom+json. 200 with a JSON array, or 204
 *            (no match).
 *   Metadata GET {base}/studies/{study}[/series/{series}]/metadata;
 *            Accept: application/dicom+json.
 *   WADO-RS  GET {base}/studies/{study}[/series/{series}[/instances/{sop}]];
 *            Accept: multipart/related; type="application/dicom";
 *            transfer-syntax=* (the instances as stored, no transcoding).
 *   STOW-RS  POST {base}/studies; Content-Type: multipart/related;
 *            type="application/dicom"; boundary=...; one part per file
 *            (Content-Type: application/dicom, Content-Length);
 *            Accept: application/dicom+json.
 *   UIDs in paths must be 1..64 characters of digits and dots (RR_EINVAL
 *   otherwise), so nothing from outside can change the path.
 *
 * Streaming and memory
 *   WADO-RS responses go through rr_multipart_parser straight to disk:
 *   each part is written to a temporary file in the target directory
 *   (".rr-wado-XXXXXX"), fsync'ed, renamed to "<SOP Instance UID>.dcm"
 *   (the UID read from the part's File Meta Information, (0002,0003),
 *   which PS3.10 makes equal to (0008,0018)) or "<n>.dcm" (n from 1) when
 *   the part has no readable meta header, and the directory is fsync'ed;
 *   then file_cb reports it. A file of that name is replaced. Memory per
 *   retrieve is the parser plus a few KiB, whatever the study's size.
 *   STOW-RS bodies are produced while they are sent (rr_http_request_t
 *   .source): framing from the multipart builder, each file read in pieces
 *   straight into libcurl's buffer, one file open at a time; the length is
 *   computed up front from the files' sizes (Content-Length).
 *
 * Outcome (rr_dicomweb_outcome_t)
 *   status 0 on success. Otherwise a negative code:
 *     rr_http_client codes  no complete response (timeouts, connection
 *                           refused or lost, TLS, limits, cancel)
 *     RR_DICOMWEB_EHTTP     the PACS answered with a non-success HTTP status
 *                           (http_status says which; the error body is not
 *                           quoted: it may echo identifiers)
 *     RR_DICOMWEB_EREJECTED STOW-RS: the PACS failed, or did not
 *                           acknowledge, one or more instances (failed,
 *                           failure_reason; also with HTTP 400/409/202)
 *     RR_EPARSE             a malformed body: JSON (message names the byte
 *                           offset), DICOM JSON structure (names the match
 *                           and tag), multipart framing (names the offset),
 *                           or a WADO-RS response that is not multipart
 *     RR_ELIMIT             a configured limit (JSON bytes, matches, retrieve
 *                           bytes, instance bytes)
 *     file errors           -errno from creating, writing, syncing, renaming
 *                           (WADO) or opening, reading (STOW); a file that
 *                           changed size while it was sent is RR_EIO
 *   retryable says whether the same operation may succeed later unchanged:
 *   timeouts, connect errors, connection loss, HTTP 5xx (except 501 and
 *   505), 408 and 429, STOW failure reasons A7xx (out of resources), and
 *   ENOSPC/EIO/EDQUOT on our disk. TLS failures, 4xx, malformed responses,
 *   limits and rejected instances are permanent: the durable queue
 *   dead-letters them.
 *
 * Privacy
 *   Logs at RR_LOG_DEBUG only, and only the PACS name, the operation, HTTP
 *   status, counts, error names and time: never URLs, query strings, UIDs,
 *   patient IDs or bodies. Outcome messages hold none of those either
 *   (parse errors name byte offsets and DICOM tags, not values). The
 *   Authorization header (basic or bearer) lives in the client and in each
 *   running operation and is wiped when they end.
 *
 * Threading and callbacks
 *   A client and its operations are used from the loop's thread only.
 *   Done callbacks run from the loop and may start, cancel and free
 *   anything. file_cb runs inside the transfer (like an rr_http sink): it
 *   must not call rr_dicomweb_* or rr_http_client_* functions. WADO-RS
 *   writes and fsyncs run on the loop thread, inside the transfer.
 */
#ifndef RR_DICOMWEB_CLIENT_H
#define RR_DICOMWEB_CLIENT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "core/error.h"
#include "http/client.h"

/* DICOMweb client codes, in their own range. */
#define RR_DICOMWEB_EBASE (RR_EBASE - 300)
/* The PACS answered with a non-success HTTP status. */
#define RR_DICOMWEB_EHTTP (RR_DICOMWEB_EBASE - 1)
/* STOW-RS: the PACS failed (or did not acknowledge) one or more instances. */
#define RR_DICOMWEB_EREJECTED (RR_DICOMWEB_EBASE - 2)

typedef struct rr_dicomweb_client rr_dicomweb_client_t;
/* One running operation, from its start to the return of its callback. */
typedef struct rr_dicomweb_op rr_dicomweb_op_t;

typedef enum rr_dicomweb_auth {
  RR_DICOMWEB_AUTH_NONE = 0,
  RR_DICOMWEB_AUTH_BASIC, /* user + the password in password_file */
  RR_DICOMWEB_AUTH_BEARER /* the token in token_file */
} rr_dicomweb_auth_t;

typedef struct rr_dicomweb_config {
  const char *name;     /* for logs; copied; default "dicomweb" */
  const char *base_url; /* http(s)://host[:port]/path of the DICOMweb root, e.g.
                           http://127.0.0.1:8042/dicom-web; copied; required; a
                           trailing '/' is dropped; no query or fragment */
  rr_dicomweb_auth_t auth;
  const char *user;            /* basic: user name (no ':'); copied */
  const char *password_file;   /* basic: file holding the password (one line, as
                                  rr_http_client_read_token reads it); read at new */
  const char *token_file;      /* bearer: file holding the token; read at new */
  const char *ca_file;         /* PEM CA bundle for https; copied; NULL = system store */
  const char *cert_file;       /* PEM client certificate; copied; NULL = none */
  const char *key_file;        /* PEM key of cert_file; copied; NULL = in cert_file */
  uint64_t connect_timeout_ms; /* default 10000 */
  uint64_t timeout_ms;         /* QIDO-RS and metadata requests; default 60000 */
  uint64_t bulk_timeout_ms;    /* WADO-RS and STOW-RS transfers; default 1800000 */
  size_t max_json_bytes;       /* QIDO/metadata/STOW response bodies; default 64 MiB */
  size_t max_matches;          /* datasets in one QIDO/metadata answer; default 100000 */
  uint64_t max_retrieve_bytes; /* one WADO-RS response; default 64 GiB */
  uint64_t max_instance_bytes; /* one WADO-RS part; default 4 GiB */
  size_t max_store_files;      /* files in one STOW-RS request; default 10000 */
  int no_fsync;                /* 1: WADO-RS files are not fsync'ed (scratch
                                  directories, tests); default 0 */
} rr_dicomweb_config_t;

/* ---- results -------------------------------------------------------------- */

/* The common attributes of one dataset of a QIDO-RS or metadata answer.
 * Strings are borrowed from the result (NUL-terminated; NULL when the
 * attribute is absent or has no value); multi-valued ones are joined with
 * '\\' as in DICOM. Numbers are -1 when absent. */
typedef struct rr_dicomweb_match {
  const char *study_uid;          /* (0020,000D) */
  const char *series_uid;         /* (0020,000E) */
  const char *sop_instance_uid;   /* (0008,0018) */
  const char *sop_class_uid;      /* (0008,0016) */
  const char *patient_id;         /* (0010,0020) */
  const char *patient_name;       /* (0010,0010), the Alphabetic group */
  const char *accession_number;   /* (0008,0050) */
  const char *modality;           /* (0008,0060) */
  const char *modalities;         /* (0008,0061) ModalitiesInStudy */
  const char *study_date;         /* (0008,0020) */
  const char *study_time;         /* (0008,0030) */
  const char *study_description;  /* (0008,1030) */
  const char *series_description; /* (0008,103E) */
  const char *body_part;          /* (0018,0015) */
  long series_number;             /* (0020,0011) */
  long instance_number;           /* (0020,0013) */
  long study_series;              /* (0020,1206) NumberOfStudyRelatedSeries */
  long study_instances;           /* (0020,1208) NumberOfStudyRelatedInstances */
  long series_instances;          /* (0020,1209) NumberOfSeriesRelatedInstances */
  json_t *json;                   /* the dataset (a DICOM JSON object), borrowed */
} rr_dicomweb_match_t;

typedef struct rr_dicomweb_result {
  size_t n;
  rr_dicomweb_match_t *matches; /* n entries, borrowed */
  json_t *json;                 /* the whole answer (an array), borrowed; json_incref
                                   to keep it */
} rr_dicomweb_result_t;

/* What an operation came to. Borrowed for the done callback. */
typedef struct rr_dicomweb_outcome {
  int status;          /* 0 or a negative code (see Outcome above) */
  int retryable;       /* 1 when the same operation may succeed later */
  long http_status;    /* the response's status code; 0 when none came */
  const char *message; /* human text for status < 0 (no patient data); "" on success */
  uint64_t elapsed_ms; /* from the start to this callback */
  /* QIDO-RS and metadata: the answer (n 0 on failure or 204). */
  const rr_dicomweb_result_t *result;
  /* WADO-RS: files stored (and reported by file_cb) and their bytes. */
  size_t files;
  uint64_t bytes;
  /* STOW-RS: files sent, instances acknowledged (ReferencedSOPSequence),
   * failed (FailedSOPSequence), acknowledged with a WarningReason, and the
   * first FailureReason (0008,1197) (0 when none). json is the response
   * body when it was JSON (borrowed; NULL otherwise). */
  size_t sent, stored, failed, warnings;
  unsigned failure_reason;
  json_t *json;
} rr_dicomweb_outcome_t;

/* One stored WADO-RS instance. Borrowed for the call. */
typedef struct rr_dicomweb_file {
  size_t index;                 /* 0 for the response's first part */
  const char *path;             /* the file's final path */
  const char *sop_instance_uid; /* from the meta header; "" when unreadable */
  uint64_t size;                /* bytes */
} rr_dicomweb_file_t;

/* The outcome of op, exactly once, from the loop. op is freed after the
 * callback returns. */
typedef void (*rr_dicomweb_done_cb)(void *ud, rr_dicomweb_op_t *op, const rr_dicomweb_outcome_t *o);
/* A WADO-RS instance is durable under its final name. Return 0 to go on, a
 * negative code to stop the retrieve (it becomes the status). Runs inside
 * the transfer: no rr_dicomweb_* / rr_http_client_* calls. */
typedef int (*rr_dicomweb_file_cb)(void *ud, const rr_dicomweb_file_t *f);

/* ---- requests ------------------------------------------------------------- */

typedef enum rr_dicomweb_level {
  RR_DICOMWEB_STUDIES = 0,
  RR_DICOMWEB_SERIES,
  RR_DICOMWEB_INSTANCES
} rr_dicomweb_level_t;

/* A query parameter: an attribute keyword or tag ("StudyDate", "00080050")
 * and its value ("20261127-20261128", "CT", "*ACC*"). Borrowed. */
typedef struct rr_dicomweb_param {
  const char *name;
  const char *value;
} rr_dicomweb_param_t;

typedef struct rr_dicomweb_query {
  rr_dicomweb_level_t level;
  const char *study_uid;             /* series/instances of this study; NULL = any study */
  const char *series_uid;            /* instances of this series (needs study_uid) */
  const rr_dicomweb_param_t *params; /* nparams matching keys; borrowed */
  size_t nparams;
  const char *const *includefields; /* nincludefields keywords/tags or "all" */
  size_t nincludefields;
  size_t limit;  /* 0 = the PACS's default */
  size_t offset; /* 0 = from the first match */
} rr_dicomweb_query_t;

/* ---- lifecycle ------------------------------------------------------------ */

/* rr_dicomweb_config_default: the defaults above, base_url NULL. */
void rr_dicomweb_config_default(rr_dicomweb_config_t *c);

/* rr_dicomweb_client_new: a client for one PACS over http (borrowed; must
 * outlive every operation). cfg is copied; the password or token file is
 * read now (blocking: configuration time). *out is owned by the caller
 * (rr_dicomweb_client_free). Errors, with a sentence in err (may be NULL;
 * appended; names files, never secrets): RR_EINVAL (no base URL or not
 * http(s), a query in it, basic without user or password_file, a user with
 * ':', bearer without token_file, a zero timeout or limit), the errors of
 * rr_http_client_read_token, RR_ENOMEM. Loop thread. */
int rr_dicomweb_client_new(rr_http_client_t *http, const rr_dicomweb_config_t *cfg,
                           rr_dicomweb_client_t **out, rr_buf_t *err);

/* rr_dicomweb_client_free: wipes the credentials and frees c. Running
 * operations go on (they hold their own copies). NULL is a no-op. */
void rr_dicomweb_client_free(rr_dicomweb_client_t *c);

/* rr_dicomweb_cancel: ends op; its callback comes with UV_ECANCELED (not
 * retryable), from the loop, after this returns; a WADO-RS temporary file
 * is removed, files already reported stay. A no-op inside op's own done
 * callback. Never from a file_cb. Loop thread. */
void rr_dicomweb_cancel(rr_dicomweb_op_t *op);

/* ---- operations ------------------------------------------------------------
 * Common to all: cb is required; ud is passed to it. On 0 the callback will
 * come exactly once; *op (may be NULL) is the operation, borrowed until its
 * callback returns. On error nothing was sent and cb is never called:
 * RR_EINVAL (bad arguments, a malformed UID), RR_ELIMIT (a QIDO-RS URL
 * over 64 KiB), the errors of
 * rr_http_client_submit, RR_ENOMEM; STOW-RS also file errors (see
 * rr_dicomweb_store). Loop thread. */

/* rr_dicomweb_search: QIDO-RS. q is borrowed for the call. The outcome's
 * result holds the matches. */
int rr_dicomweb_search(rr_dicomweb_client_t *c, const rr_dicomweb_query_t *q,
                       rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **op);

/* rr_dicomweb_metadata: the metadata of a study (series_uid NULL) or a
 * series, as DICOM JSON: the outcome's result has one match per instance. */
int rr_dicomweb_metadata(rr_dicomweb_client_t *c, const char *study_uid, const char *series_uid,
                         rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **op);

/* rr_dicomweb_retrieve: WADO-RS of a study, a series (series_uid) or an
 * instance (series_uid and sop_uid) into dir (an existing directory,
 * copied; opened now: RR_EINVAL or -errno when it cannot be). file_cb (may
 * be NULL) reports each stored instance. A response with no part is a
 * success with files 0. */
int rr_dicomweb_retrieve(rr_dicomweb_client_t *c, const char *study_uid, const char *series_uid,
                         const char *sop_uid, const char *dir, rr_dicomweb_file_cb file_cb,
                         rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **op);

/* rr_dicomweb_store: STOW-RS of the files paths[0..n) (copied; n >= 1,
 * at most max_store_files) to {base}/studies. Each file is stat'ed now
 * (blocking: -errno for a missing or unreadable one, RR_EINVAL for one that
 * is not a regular file) and read while the request is sent. Success means
 * every file was acknowledged and none failed; the outcome's counts say
 * what the PACS answered. */
int rr_dicomweb_store(rr_dicomweb_client_t *c, const char *const *paths, size_t n,
                      rr_dicomweb_done_cb cb, void *ud, rr_dicomweb_op_t **op);

/* ---- pure helpers (any thread, no I/O) --------------------------------------- */

/* rr_dicomweb_parse_datasets: parses a QIDO-RS / metadata body (a JSON
 * array of DICOM JSON objects, PS3.18 F.2) of len bytes into *out (new;
 * rr_dicomweb_result_free). At most max_matches datasets (0 = no limit).
 * Checks the structure the accessors rely on: every element an object,
 * every key 8 hex digits, every attribute an object with a "vr" string,
 * "Value" (when present) an array, PN values objects (or strings), other
 * string values strings or numbers, IS/DS/US/UL/... numbers or numeric
 * strings. Errors, with a sentence in err (may be NULL; appended; no
 * values): RR_EPARSE (JSON syntax: the byte offset; structure: the element
 * index and tag), RR_ELIMIT, RR_ENOMEM. */
int rr_dicomweb_parse_datasets(const char *json, size_t len, size_t max_matches,
                               rr_dicomweb_result_t **out, rr_buf_t *err);

/* rr_dicomweb_result_free: NULL is a no-op. */
void rr_dicomweb_result_free(rr_dicomweb_result_t *r);

/* rr_dicomweb_json_string: value number i of attribute tag (e.g.
 * 0x0020000D) of a DICOM JSON dataset as a string: borrowed from ds; PN
 * values give their Alphabetic group. NULL when absent, empty, out of
 * range, or not a string. */
const char *rr_dicomweb_json_string(const json_t *ds, uint32_t tag, size_t i);

/* rr_dicomweb_json_number: value number i of attribute tag as a number
 * (JSON numbers, or numeric strings as IS/DS may be sent). 0 and *out set,
 * or RR_ENOTFOUND (absent, empty, not a number). */
int rr_dicomweb_json_number(const json_t *ds, uint32_t tag, size_t i, double *out);

/* rr_dicomweb_part10_sop_uid: reads the Media Storage SOP Instance UID
 * (0002,0003) from the first len bytes of a DICOM Part 10 file (128-byte
 * preamble, "DICM", explicit VR little endian meta group). Copies it
 * (NUL-terminated, trailing NUL/space padding removed) into out (cap
 * bytes). 0, RR_EAGAIN (len too short to tell: give more bytes),
 * RR_EPARSE (not Part 10, or no such element in the meta group, or a value
 * that is not a UID: only digits and dots, 1..64 characters), RR_ELIMIT
 * (cap too small). */
int rr_dicomweb_part10_sop_uid(const void *data, size_t len, char *out, size_t cap);

/* rr_dicomweb_strerror: static text for the RR_DICOMWEB_E* codes and every
 * code rr_http_client_strerror knows. Never NULL. */
const char *rr_dicomweb_strerror(int code);

#endif

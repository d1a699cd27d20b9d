/* DICOM C-STORE SCU (storage user): send files to a remote SCP in one
 * association, behind a plain C API.
 *
 * Model
 *   rr_dicom_scu_store is the blocking core: it reads each file's meta
 *   header, proposes one presentation context per (SOP class, transfer
 *   syntax) pair of the files (at most RR_DICOM_SCU_MAX_CONTEXTS) with the
 *   file's transfer syntax first and, for uncompressed files, explicit and
 *   implicit VR little endian as fallbacks; opens one association (TCP, or
 *   DICOM TLS when cfg.tls, see scp.h), sends the files in order with
 *   C-STORE and releases the association. A file goes in its own transfer
 *   syntax when the peer accepted it, otherwise (uncompressed files only)
 *   in an accepted uncompressed one. TCP_NODELAY is set on the socket as
 *   soon as it exists (Debian's DCMTK leaves Nagle on, which costs a
 *   delayed ACK per C-STORE). rr_dicom_scu_send runs the same on its own
 *   thread and reports on a libuv loop.
 *
 * Results (one per file, in order)
 *   STORED   C-STORE-RSP status 0x0000
 *   WARNING  0xB000, 0xB006, 0xB007: stored, with a warning
 *   FAILED   any other status, no response within dimse_timeout, the
 *            association refused, aborted (by either side) or lost, no
 *            accepted presentation context, an unreadable file, or
 *            cancelled; reason says which, status is the DIMSE status or
 *            -1 when there was no response.
 *   A file is never reported STORED without a success response to it.
 *
 * Timeouts and limits
 *   TCP connect: RR_DICOM_SCU_CONNECT_TIMEOUT_S, process-wide (DCMTK 3.6.7
 *   keeps it in a global, dcmConnectionTimeout; it is set once). ACSE
 *   (association request/response and release) and DIMSE (each C-STORE-RSP)
 *   timeouts per config. Files are read whole into memory one at a time, up
 *   to cfg.max_file_bytes.
 *
 * Threading
 *   rr_dicom_scu_store blocks: call it from a worker thread. rr_dicom_scu_send
 *   and rr_dicom_scu_cancel are for the loop thread; the callback comes from
 *   the loop, never synchronously inside rr_dicom_scu_send.
 *
 * Logging
 *   AE titles, host, port, counts, statuses and reasons at info/warn; SOP
 *   instance UIDs only at debug; never patient data.
 */
#ifndef RR_DICOM_SCU_H
#define RR_DICOM_SCU_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "dicom/scp.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Association-level outcomes (rr_dicom_scu_report_t.rc). */
#define RR_DICOM_ECONNECT (RR_DICOM_EBASE - 10)  /* TCP connect or TLS handshake failed */
#define RR_DICOM_EREJECTED (RR_DICOM_EBASE - 11) /* A-ASSOCIATE-RJ */
#define RR_DICOM_EABORTED                                                                          \
  (RR_DICOM_EBASE - 12)                           /* aborted, timed out or lost after              \
                                                     the association was established */
#define RR_DICOM_ECANCELLED (RR_DICOM_EBASE - 13) /* rr_dicom_scu_cancel */

#define RR_DICOM_SCU_CONNECT_TIMEOUT_S 15
#define RR_DICOM_SCU_MAX_CONTEXTS 128

typedef struct rr_dicom_scu_config {
  const char *name;                 /* for logs; default "dicom-scu" */
  const char *calling_ae;           /* ours, 1..16 characters; required */
  const char *called_ae;            /* the peer's, 1..16 characters; required */
  const char *host;                 /* IPv4 address or host name; required */
  int port;                         /* 1..65535 */
  unsigned acse_timeout_s;          /* default 30 */
  unsigned dimse_timeout_s;         /* per C-STORE-RSP; default 60 */
  unsigned max_pdu;                 /* our maximum P-DATA PDU, 4096..131072; default 65536 */
  uint64_t max_file_bytes;          /* larger files fail unread; default 2 GiB */
  const rr_dicom_tls_config_t *tls; /* NULL: plain TCP */
} rr_dicom_scu_config_t;

typedef enum rr_dicom_scu_outcome {
  RR_DICOM_SCU_FAILED = 0,
  RR_DICOM_SCU_STORED,
  RR_DICOM_SCU_WARNING
} rr_dicom_scu_outcome_t;

typedef struct rr_dicom_scu_file_result {
  rr_dicom_scu_outcome_t outcome;
  int status;         /* DIMSE status of the C-STORE-RSP; -1: no response */
  const char *reason; /* static text, never NULL */
} rr_dicom_scu_file_result_t;

typedef struct rr_dicom_scu_report {
  int rc;             /* 0: association established and released; else
                         RR_DICOM_E*, RR_EINVAL ... (every file then FAILED
                         unless its response came before) */
  const char *reason; /* static text, never NULL ("released", "association
                         rejected", "aborted by peer" ...) */
  int reject_result, reject_source, reject_reason; /* A-ASSOCIATE-RJ, else 0 */
  unsigned stored;                                 /* STORED + WARNING */
  unsigned warnings;                               /* WARNING */
  unsigned failed;                                 /* FAILED */
  const rr_dicom_scu_file_result_t *files;         /* n_files results, in path order */
  size_t n_files;
} rr_dicom_scu_report_t;

/* rr_dicom_scu_store: sends paths[0..n) in one association. results
 * (caller-owned, n entries) gets one result per file; report (may be NULL)
 * the association outcome (report->files = results). Returns report->rc:
 * 0 when the association was established and released (look at each
 * result), RR_EINVAL (cfg, n == 0), RR_DICOM_ETLS, RR_DICOM_ECONNECT,
 * RR_DICOM_EREJECTED, RR_DICOM_EABORTED, RR_ENOMEM, RR_DICOM_EDCMTK,
 * RR_DICOM_EINTERNAL. Blocking; any thread but the loop's. */
int rr_dicom_scu_store(const rr_dicom_scu_config_t *cfg, const char *const *paths, size_t n,
                       rr_dicom_scu_file_result_t *results, rr_dicom_scu_report_t *report);

typedef struct rr_dicom_scu_req rr_dicom_scu_send_t;

/* The result of rr_dicom_scu_send, on the loop thread. report and its
 * files are borrowed for the call; the request is freed after it returns. */
typedef void (*rr_dicom_scu_cb)(void *ud, const rr_dicom_scu_report_t *report);

/* rr_dicom_scu_send: rr_dicom_scu_store on a new thread (cfg and paths are
 * copied), then cb(ud, report) exactly once on loop. *req (may be NULL) is
 * the request for rr_dicom_scu_cancel, valid until cb returns.
 * Errors (cb is then never called): RR_EINVAL, RR_ENOMEM, a libuv code,
 * RR_DICOM_EINTERNAL. Loop thread; never calls back synchronously. */
int rr_dicom_scu_send(uv_loop_t *loop, const rr_dicom_scu_config_t *cfg, const char *const *paths,
                      size_t n, rr_dicom_scu_cb cb, void *ud, rr_dicom_scu_send_t **req);

/* rr_dicom_scu_cancel: stops the transfer soon (the socket is shut down,
 * files not confirmed fail with "cancelled"); cb still comes, with
 * rc RR_DICOM_ECANCELLED unless everything finished first. Loop thread;
 * only before cb; NULL is a no-op. */
void rr_dicom_scu_cancel(rr_dicom_scu_send_t *req);

/* rr_dicom_scu_strerror: static text for the codes above and every code
 * rr_dicom_scp_strerror knows. Any thread. */
const char *rr_dicom_scu_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif

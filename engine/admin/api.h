/* The engine's REST API on its HTTP server (http/server.h): what PACS
 * hooks, scripts and operators call.
 *
 *   GET  /health                          public   {"status": "ok"}
 *   POST /api/studies/{uid}/complete      operator the study is complete now
 *                                                  (stable without waiting for
 *                                                  its quiet period); 200 after
 *                                                  the commit: {"study_uid",
 *                                                  "changed"}
 *   POST /api/sources/{channel}/notify    operator a DICOMweb source's PACS
 *                                                  says a study changed:
 *                                                  {"study_uid": ...,
 *                                                  "complete": bool}; 202
 *   GET  /api/studies/{uid}               viewer   the study as routing sees it
 *                                                  (header fields, series, the
 *                                                  matched order) and its state
 *   GET  /api/orders/{accession}          viewer   the order record kept
 *   POST /api/ai/jobs/{id}/result         job      an AI result (callback)
 *   GET  /api/ai/jobs/{id}                viewer   the job and its result
 *   GET  /api/ai/summary                  viewer   per AI endpoint and model:
 *                                                  jobs, critical rate,
 *                                                  agreement, turnaround
 *                                                  (admin/ai_summary.c)
 *   GET  /api/worklist                    viewer   studies, AI-critical first
 *   GET  /api/notifications               viewer   critical-result notifications
 *   GET  /api/notifications/{id}          viewer   one, with its history
 *   POST /api/notifications/{id}/ack      operator acknowledged (by, note);
 *                                                  200 after the commit, 409
 *                                                  when acknowledged before
 *   GET  /api/ai/jobs/{id}/dicomweb/...   job      WADO-RS of a de-identified
 *                                                  job's instances
 *                                                  (admin/api_dicomweb.h)
 *   GET  /, /ui                           public   302 to /ui/
 *   GET  /ui/...                          public   the dashboard's files
 *
 * Errors are the server's JSON errors ({"error", "message"}): 400 for a
 * malformed UID or body, 404 for an unknown study, order or channel, 503
 * while the engine stops. Every operator action is logged at info with the
 * principal's name (never the UID or accession above debug).
 * Threading: the loop thread. */
#ifndef RR_ADMIN_API_H
#define RR_ADMIN_API_H

#include <uv.h>

#include "channel/channel.h"
#include "core/buf.h"
#include "http/server.h"
#include "store/journal.h"
#include "tls/tls.h"

typedef struct rr_admin rr_admin_t;

typedef struct rr_admin_config {
  const char *host;           /* IP literal; default 127.0.0.1 */
  int port;                   /* 0 = any free port */
  const char *token_file;     /* "role name sha256hex" lines (http/server.h) */
  const rr_tls_config_t *tls; /* NULL = plain HTTP */
  rr_dispatch_t *dispatch;    /* for queue figures (/metrics); may be NULL */
  const char *dashboard;      /* folder served under /ui/; NULL or "": none */
} rr_admin_config_t;

/* rr_admin_dashboard_find: the dashboard's folder into out (cap bytes):
 * configured when given, else the first holding index.html of
 * <the binary's folder>/../share/radrelay/www (installed) and the source
 * tree's engine/admin/www (compiled in: runs from the build tree).
 * RR_ENOTFOUND when that folder has no index.html (or none is found),
 * RR_ELIMIT when out is too small. Blocking stat calls; any thread. */
int rr_admin_dashboard_find(const char *configured, char *out, size_t cap);

/* rr_admin_start: the HTTP server with the routes above, for engine e and
 * its journal j (both borrowed; they outlive the API). Errors as
 * rr_http_server_start, with a sentence in err. */
int rr_admin_start(uv_loop_t *loop, rr_engine_t *e, rr_journal_t *j, const rr_admin_config_t *cfg,
                   rr_admin_t **out, rr_buf_t *err);
/* rr_admin_port: the bound port. */
int rr_admin_port(const rr_admin_t *a);
/* rr_admin_reload: token file and certificates again (SIGHUP). */
int rr_admin_reload(rr_admin_t *a, rr_buf_t *err);
/* rr_admin_stop: stops the server (requests waiting for a commit are
 * answered when it comes, or dropped with their connection) and frees a.
 * NULL is a no-op. */
void rr_admin_stop(rr_admin_t *a);

#endif

/* WADO-RS of a de-identified AI job's instances (ai/deid.h), on the
 * engine's REST API: what an AI endpoint configured with "deidentify"
 * fetches instead of the PACS.
 *
 *   GET /api/ai/jobs/{id}/dicomweb/studies/{study}
 *   GET /api/ai/jobs/{id}/dicomweb/studies/{study}/series/{series}
 *   GET /api/ai/jobs/{id}/dicomweb/studies/{study}/series/{series}/instances/{instance}
 *
 * Each answers multipart/related; type="application/dicom" with one part
 * (Content-Type application/dicom, Content-Length) per de-identified
 * instance, in the transfer syntax it was received in. The UIDs in the
 * path are the job's pseudonyms. Authorization: Bearer <the job's token>
 * (images.auth of its request), checked in constant time against the
 * hash the store keeps; 401 without it or with another token (also for a
 * job that does not exist), 404 when the job has ended (its copies are
 * removed) or the path names no UID of it, 406 when Accept names neither
 * multipart/related nor a wildcard. The files are read on libuv's thread
 * pool; an answer is at most 1 GiB (a larger study is fetched by series).
 *
 * Threading: the loop thread (handlers), the thread pool (reads). */
#ifndef RR_ADMIN_API_DICOMWEB_H
#define RR_ADMIN_API_DICOMWEB_H

#include <uv.h>

#include "http/server.h"
#include "store/journal.h"

typedef struct rr_api_dicomweb {
  uv_loop_t *loop;       /* borrowed */
  rr_journal_t *journal; /* borrowed */
} rr_api_dicomweb_t;

void rr_api_dicomweb_get(void *ud, rr_http_req_t *req);

/* The routes, for the API's route table; ud is an rr_api_dicomweb_t that
 * lives as long as the server. */
#define RR_API_DICOMWEB_ROUTES(ud)                                                                 \
  {"GET",                                                                                          \
   "/api/ai/jobs/{id}/dicomweb/studies/{study}",                                                   \
   RR_HTTP_PUBLIC,                                                                                 \
   NULL,                                                                                           \
   0,                                                                                              \
   rr_api_dicomweb_get,                                                                            \
   (ud),                                                                                           \
   1},                                                                                             \
      {"GET",                                                                                      \
       "/api/ai/jobs/{id}/dicomweb/studies/{study}/series/{series}",                               \
       RR_HTTP_PUBLIC,                                                                             \
       NULL,                                                                                       \
       0,                                                                                          \
       rr_api_dicomweb_get,                                                                        \
       (ud),                                                                                       \
       1},                                                                                         \
  {                                                                                                \
    "GET", "/api/ai/jobs/{id}/dicomweb/studies/{study}/series/{series}/instances/{instance}",      \
        RR_HTTP_PUBLIC, NULL, 0, rr_api_dicomweb_get, (ud), 1                                      \
  }

#endif

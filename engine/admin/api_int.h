/* The REST API, inside: what its route files share. Loop thread. */
#ifndef RR_ADMIN_API_INT_H
#define RR_ADMIN_API_INT_H

#include "admin/api.h"
#include "admin/api_dicomweb.h"

struct rr_admin {
  rr_http_server_t *server;
  rr_engine_t *engine;
  rr_journal_t *journal;
  rr_dispatch_t *dispatch; /* NULL: no queue figures */
  int64_t start_ms;
  rr_api_dicomweb_t dicomweb; /* de-identified AI jobs' images */
  bool dashboard;             /* the dashboard's files are served under /ui/ */
  uv_loop_t *loop;
};

int64_t rr_admin_now_ms(void);
/* A result column as JSON (null, integer, real, string; null for text that
 * is not UTF-8), and columns 0..n-1 set into o under names (messages.c). */
struct sqlite3_stmt;
json_t *rr_admin_column(struct sqlite3_stmt *st, int i);
void rr_admin_columns(json_t *o, struct sqlite3_stmt *st, const char *const *names, int n);
/* admin/ops.c: channels, queues, replays, the audit trail: copies its
 * routes into out (at most cap); returns how many it has. */
size_t rr_admin_ops_routes(rr_admin_t *a, rr_http_route_t *out, size_t cap);
/* admin/messages.c: GET /api/messages (search), /api/messages/{id},
 * /api/timeline. */
void rr_admin_messages(void *ud, rr_http_req_t *req);
void rr_admin_message(void *ud, rr_http_req_t *req);
void rr_admin_timeline(void *ud, rr_http_req_t *req);
/* GET /metrics (admin/metrics.c): Prometheus text format 0.0.4. */
void rr_admin_metrics(void *ud, rr_http_req_t *req);
/* GET /ready: 200 {"status": "ready"} or 503 with why. */
void rr_admin_ready(void *ud, rr_http_req_t *req);
/* GET /api/ai/summary (admin/ai_summary.c): per AI endpoint and model. */
void rr_admin_ai_summary(void *ud, rr_http_req_t *req);
/* GET / and /ui (admin/dashboard.c): 302 to /ui/; 404 without a dashboard. */
void rr_admin_dashboard_redirect(void *ud, rr_http_req_t *req);

#endif

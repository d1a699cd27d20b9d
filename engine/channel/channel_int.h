/* The engine's channels, inside: what inbound.c (MLLP sources, scripts,
 * the journal) and studies.c (DICOM sources, stable studies, order
 * matching) share. Loop thread only. */
#ifndef RR_CHANNEL_INT_H
#define RR_CHANNEL_INT_H

#include <jansson.h>
#include <stdint.h>

#include "channel/channel.h"
#include "core/histogram.h"
#include "dicom/scp.h"
#include "dicomweb/client.h"

struct rr_channel {
  rr_engine_t *engine;
  rr_channel_t *next;
  rr_channel_config_t cfg;
  rr_mllp_listener_t *listener;
  rr_tls_ctx_t *tls;   /* NULL for plain TCP */
  rr_script_t *script; /* NULL without a script */
  uv_fs_event_t watch; /* the script file: edits reload it */
  bool watching;
  uv_timer_t settle; /* editors write in steps: reload once they stop */
  uint64_t filtered, script_errors;
  rr_hl7_msg_t *msg; /* reused for every message */
  uint64_t received, accepted, errored, rejected, duplicates;
  rr_histo_t ack_latency; /* message taken -> its ACK written, after the commit */
  rr_dicom_scp_t *scp;    /* a DICOM source; NULL for MLLP */
  uv_timer_t stable;      /* DICOM: looks for studies that went quiet */
  bool stable_open, stable_busy;
  char **routing; /* DICOM: studies whose study event is being journaled */
  size_t nrouting, routing_cap;
  uint64_t studies_routed, studies_matched;
  /* a DICOMweb source (dicomweb_source.c) */
  rr_dicomweb_client_t *dw;
  uv_timer_t poll;
  bool poll_open;
  rr_dicomweb_op_t *dw_op; /* the search or instance fetch running; NULL = idle */
  json_t *dw_todo;         /* studies whose instances are to be fetched: array of objects */
  json_t *dw_seen;         /* Study Instance UID -> instances recorded at the last fetch */
  size_t dw_offset;        /* paging through one search */
  uint64_t dw_searches, dw_fetches, dw_failures;
};

struct rr_engine {
  uv_loop_t *loop;
  rr_http_client_t *http; /* for DICOMweb sources; NULL until one starts */
  uv_check_t commit;
  rr_journal_t *journal;
  rr_channel_t *channels;
  uint64_t ack_seq;
  int64_t start_ms;
  int stopping;
  /* critical-result notifications (notifications.c) */
  struct rr_notification **notes; /* open ones and the last days' */
  size_t nnotes, notes_cap;
  uv_timer_t notify_timer;
  bool notify_open;
  char public_url[1024]; /* for ack_url; "" = none */
  /* AI jobs whose results are polled (ai_poll.c) */
  struct poll *polls;
  struct taking *taking;       /* AI results whose SR is being written (ai_results.c) */
  struct sr_failed *sr_failed; /* SR files that could not be written (the last few) */
  void (*files_ready)(void *ud);
  void *files_ready_ud;
  struct poll_token *poll_tokens;
};

/* An AI endpoint's bearer token, read once for polling. */
typedef struct poll_token {
  struct poll_token *next;
  char destination[160];
  char *token;
} poll_token_t;

/* rr_wall_ms: the wall clock, milliseconds since the epoch. */
int64_t rr_wall_ms(void);

/* rr_channel_build_routes: the script's routes as journal routes (pointing
 * into sr), each to a destination the channel declares; the lane a route
 * does not choose comes from m (STAT orders) or, without m, is lane0; the
 * key a route does not choose is key (the MRN). RR_EINVAL (reason in sr)
 * for a name the channel does not declare, RR_ENOMEM. */
int rr_channel_build_routes(const rr_channel_t *ch, const rr_hl7_msg_t *m, int lane0,
                            const char *key, rr_script_result_t *sr, rr_journal_route_t **out,
                            size_t *nout);

/* rr_channel_study_script: runs the channel's on_study on a study context
 * (ctxtext, also parsed as ctx): routes (pointing into sr) in *routes, the
 * journal status ("accepted", "filtered", "rejected", "error") returned and
 * the error text in etext. */
const char *rr_channel_study_script(rr_channel_t *ch, const char *ctxtext, size_t len, json_t *ctx,
                                    const char *uid, rr_script_result_t *sr,
                                    rr_journal_route_t **routes, size_t *nroutes, char *etext,
                                    size_t ecap);

/* rr_channel_script_ai: the AI store of ch's script (ai.findings,
 * ai.verdict): findings from the store; a verdict commits with the batch
 * of the message being handled, with its audit record
 * (channel/ai_verdicts.c). */
rr_script_ai_t rr_channel_script_ai(rr_channel_t *ch);

/* rr_channel_start_dicom: the DICOM listener and stable-study timer of a
 * DICOM source channel. */
int rr_channel_start_dicom(rr_engine_t *e, rr_channel_t *ch);
/* rr_channel_stop_dicom: stops them (shutdown); safe to call twice. */
void rr_channel_stop_dicom(rr_channel_t *ch);

/* rr_engine_take_ai_result: a checked result of job_id (of endpoint dest)
 * into the store and through the channel's on_result; cb after the commit
 * of the AI_RESULT entry. via: "answer" or "callback". */
int rr_engine_take_ai_result(rr_engine_t *e, const rr_destination_config_t *dest,
                             const char *job_id, const char *study_uid,
                             const struct rr_ai_result *r, const char *via, rr_journal_done_cb cb,
                             void *ud);

/* rr_channel_notify_route: a route an AI result's script made to a
 * notification destination d: a new notification (its row and audit
 * record queued; route->payload replaced by the page, *owned to free
 * after the journal has copied it) and 0, or 1 when the same finding was
 * notified before (the route is to be dropped), or a negative code. A
 * route whose document names no study is left as it is (0). */
int rr_channel_notify_route(rr_channel_t *ch, const rr_destination_config_t *d, const char *job_id,
                            rr_journal_route_t *route, char **owned);
void rr_engine_notify_stop(rr_engine_t *e);
void rr_engine_ai_poll_free(rr_engine_t *e);
/* rr_engine_ai_results_free: what ai_results.c keeps (at shutdown). */
void rr_engine_ai_results_free(rr_engine_t *e);
void rr_engine_notify_free(rr_engine_t *e);

/* rr_channel_start_dicomweb: the QIDO-RS poller of a DICOMweb source. */
int rr_channel_start_dicomweb(rr_engine_t *e, rr_channel_t *ch);
/* rr_channel_stop_dicomweb: stops it (cancels a running request). */
void rr_channel_stop_dicomweb(rr_channel_t *ch);
/* rr_channel_stable_timer: starts the channel's stable-study timer. */
void rr_channel_stable_timer(rr_engine_t *e, rr_channel_t *ch);

#endif

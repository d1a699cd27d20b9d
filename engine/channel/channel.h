/* Inbound channels: an MLLP source whose messages are journaled and
 * acknowledged after the commit that keeps them.
 *
 * The engine (rr_engine_t) hands the journal what arrived in one loop
 * iteration from a uv_check handle, i.e. right after the loop has read what
 * the sockets had; the journal commits it on a worker thread (group commit,
 * pipelined with the next batch) and each ACK is written after its commit.
 * Threading: loop thread only. */
#ifndef RR_CHANNEL_H
#define RR_CHANNEL_H

#include <stdbool.h>
#include <uv.h>

#include "core/histogram.h"
#include "hl7/hl7.h"
#include "mllp/listener.h"
#include "queue/dispatch.h"
#include "script/script.h"
#include "store/journal.h"

typedef struct rr_channel_config {
  char name[64];
  rr_mllp_listener_config_t listen; /* host points into host[] */
  char host[64];
  char **accept; /* "ADT^A01", "ORM^*", ... NULL-terminated; NULL = everything */
  rr_hl7_options_t hl7;
  int mllp_release; /* 1: answer with HL7 ACKs; 2: with MLLP commit blocks
                       (0x06 once stored, 0x15 when not) */
  bool tls;         /* the source speaks TLS, with tls_cfg (strings below) */
  rr_tls_config_t tls_cfg;
  char tls_cert[1024], tls_key[1024], tls_ca[1024], tls_crl[1024];
  char **tls_allow;         /* owned, tls_cfg.nallow entries */
  char script[1024];        /* the channel's Lua script; "" = none */
  char script_lib[1024];    /* folder of shared modules for require */
  int on_script_error;      /* answer when the script fails: RR_HL7_ERROR (AE, default),
                               RR_HL7_REJECT (AR) or RR_HL7_ACCEPT (kept for review) */
  bool dicom;               /* the source is a DICOM listener (the fields below) */
  char dicom_ae[17];        /* our AE title */
  char **dicom_calling_aes; /* owned, NULL-terminated; NULL = none allowed */
  char **dicom_peers;       /* owned, NULL-terminated; NULL = loopback only */
  unsigned dicom_max_associations;
  char dicom_spool[1024];
  uint64_t dicom_min_free_bytes;
  uint64_t dicom_stable_after_ms; /* quiet period that makes a study stable */
  bool dicom_reopen;              /* late instances make a stable study arriving again */
  uint64_t dicom_match_window_ms; /* order time within this of the study time (the
                                     patient + modality match); 0 = that match is off */
  bool dicomweb;                  /* the studies come from a DICOMweb server polled with
                                     QIDO-RS (the dw_ fields; dicom is set too) */
  char dw_url[1024];              /* DICOMweb root, e.g. http://pacs:8042/dicom-web */
  char dw_user[128];              /* basic authentication: user, password in a file */
  char dw_password_file[1024];
  char dw_token_file[1024]; /* or a bearer token in a file */
  char dw_ca[1024], dw_cert[1024], dw_key[1024];
  uint64_t dw_poll_ms;                   /* QIDO-RS search every ...; default 30 s */
  uint64_t dw_lookback_ms;               /* studies dated from now - this to today */
  char **dw_modalities;                  /* owned, NULL-terminated; NULL = any modality */
  rr_destination_config_t *destinations; /* owned, ndestinations entries */
  size_t ndestinations;
} rr_channel_config_t;

typedef struct rr_engine rr_engine_t;
typedef struct rr_channel rr_channel_t;

/* rr_engine_new: an engine on loop with the journal (borrowed; must outlive
 * the engine). */
int rr_engine_new(uv_loop_t *loop, rr_journal_t *journal, rr_engine_t **out);
/* rr_engine_add_channel: starts the channel's listener. cfg is copied. */
int rr_engine_add_channel(rr_engine_t *e, const rr_channel_config_t *cfg, rr_channel_t **out);
/* rr_engine_stop: stops accepting and reading, lets the commits in flight
 * finish (sending those ACKs), then closes every connection. Asynchronous:
 * the loop ends by itself when all is closed. */
void rr_engine_stop(rr_engine_t *e);
/* rr_engine_free: after the loop has ended. NULL is a no-op. */
void rr_engine_free(rr_engine_t *e);
int rr_channel_port(const rr_channel_t *ch);
/* rr_engine_reload_scripts: compiles every channel's script again; a
 * script that does not compile leaves the running one in place (the error
 * is logged). Returns the number of channels whose script failed. */
int rr_engine_reload_scripts(rr_engine_t *e);
/* rr_engine_reload_tls: re-reads every channel's certificates, keys, CA and
 * CRL files; new connections use them, open ones keep theirs. A channel
 * whose files do not load keeps its old ones; the error is logged. Returns
 * the number of channels that failed. */
int rr_engine_reload_tls(rr_engine_t *e);

/* rr_engine_replay (an rr_dispatch_replay_fn, ud: the engine): runs the
 * journaled message's channel script again and queues what it routes to
 * destination (a queue name), as new deliveries of that message. Returns
 * how many were queued (0: the script routes nothing there now), or
 * RR_ENOTFOUND / a negative code. */
int rr_engine_replay(void *ud, int64_t message_id, const char *destination);

/* rr_engine_inject (an rr_dispatch_inject_fn, ud: the engine): a message
 * another channel routed to channel, handled as if it had arrived there
 * (its own duplicate check, accept list, script, journal); done once it is
 * kept. The caller keeps payload until this returns. RR_ENOTFOUND for an
 * unknown channel. */
int rr_engine_inject(void *ud, const char *channel, const char *payload, size_t len,
                     rr_dispatch_inject_done done, void *done_ud);

/* rr_engine_study_complete (ud: the engine): the study is complete now,
 * whatever its quiet period (a PACS or an operator says so); stable in the
 * store with the next batch (logged as event=study_completed). */
int rr_engine_study_complete(void *ud, const char *study_uid);
/* rr_engine_complete_study: the same, then cb(ud, status, changed) once
 * the store has it (changed: the study was arriving and is stable now). */
typedef void (*rr_engine_completed_cb)(void *ud, int status, bool changed);
int rr_engine_complete_study(rr_engine_t *e, const char *study_uid, rr_engine_completed_cb cb,
                             void *ud);

/* rr_engine_dicomweb_notify: the PACS behind DICOMweb source channel says
 * study_uid changed: its instances are listed now (after the request
 * running, if any) and, with complete, the study is stable once they are
 * recorded. RR_ENOTFOUND (no such DICOMweb channel), RR_EINVAL (not a UID),
 * UV_ECANCELED (stopping). */
int rr_engine_dicomweb_notify(rr_engine_t *e, const char *channel, const char *study_uid,
                              bool complete);

/* ---- AI results (channel/ai_results.c) ----
 * rr_engine_ai_result (an rr_dispatch_ai_result_fn, ud: the engine): a
 * result that came in an endpoint's answer. rr_engine_ai_callback: one
 * POSTed to /api/ai/jobs/{id}/result with the job's token: -EPERM (not the
 * job's token), -EEXIST (the job has its result, or expired), RR_EPARSE
 * (not a result of this job; err says what), RR_ENOTFOUND; cb after the
 * commit that keeps it. rr_engine_ai_expire: jobs past their deadline
 * without a result are expired; returns how many. */
struct rr_ai_result;
void rr_engine_ai_result(void *ud, const rr_destination_config_t *dest, const char *job_id,
                         const char *study_uid, const struct rr_ai_result *r);
int rr_engine_ai_callback(rr_engine_t *e, const char *job_id, const char *token, const char *body,
                          size_t len, rr_journal_done_cb cb, void *ud, rr_buf_t *err);
int rr_engine_ai_expire(rr_engine_t *e);
/* rr_engine_sr_gate (an rr_dispatch_file_gate_fn, ud: the engine): a
 * result's SR is written while its result, ORU and pages go out; a
 * delivery of the SR file waits (RR_EAGAIN) until it is on disk. One a
 * restart found missing (the process ended after the commit that kept its
 * result, before the file was) is written again from the kept result,
 * with the same SOP Instance UID. RR_ENOTFOUND: it cannot be written.
 * rr_engine_set_files_ready: cb when a file held back that way is ready
 * (the dispatcher's rr_dispatch_kick). */
int rr_engine_sr_gate(void *ud, const char *path);
void rr_engine_set_files_ready(rr_engine_t *e, void (*cb)(void *ud), void *ud);
/* rr_engine_ai_poll (channel/ai_poll.c): GETs the status_url of running
 * jobs whose endpoint gave one, each at most every poll_s; a result found
 * there is taken like a callback's (via "poll"). Returns how many GETs
 * started, or RR_EIO. */
int rr_engine_ai_poll(rr_engine_t *e);

/* ---- critical-result notifications (channel/notifications.c) ----
 * rr_engine_notify_start: loads the open notifications (and the last
 * days', for de-duplication) and starts their escalation timer;
 * public_url (may be NULL) makes each page carry its ack_url.
 * rr_engine_notification_ack: someone (by; via: the API principal)
 * acknowledged notification id: no more pages; cb after the commit.
 * RR_ENOTFOUND, -EEXIST (acknowledged before: err says by whom). */
int rr_engine_notify_start(rr_engine_t *e, const char *public_url);
int rr_engine_notification_ack(rr_engine_t *e, const char *id, const char *by, const char *via,
                               const char *note, rr_journal_done_cb cb, void *ud, rr_buf_t *err);

/* ---- counters, for /metrics and the admin API ---- */
typedef struct rr_channel_stats {
  const char *name; /* borrowed for the call */
  const char *kind; /* "mllp", "dicom", "dicomweb" */
  int port;         /* the listener's (0: none) */
  bool running;     /* taking messages (false: stopped by an operator) */
  uint64_t received, accepted, errored, rejected, duplicates, filtered, script_errors;
  uint64_t studies_routed, studies_matched;
  const rr_histo_t *ack_latency; /* MLLP: message taken -> ACK written */
} rr_channel_stats_t;
/* rr_engine_channel_stats: cb once per channel, in the order added. */
void rr_engine_channel_stats(const rr_engine_t *e,
                             void (*cb)(void *ud, const rr_channel_stats_t *s), void *ud);
/* Operators' controls (the admin API). rr_engine_channel_stop: an MLLP
 * channel stops listening (its open connections finish what they sent);
 * rr_engine_channel_start: listens again; rr_engine_channel_reload: its
 * script and TLS files read again. RR_ENOTFOUND, RR_EINVAL (a DICOM
 * channel: not stopped this way), -EALREADY, libuv codes. */
int rr_engine_channel_stop(rr_engine_t *e, const char *name);
int rr_engine_channel_start(rr_engine_t *e, const char *name);
int rr_engine_channel_reload(rr_engine_t *e, const char *name);
/* rr_engine_ready: whether the engine takes messages now (not stopping,
 * the store's last commit did not fail); why says what is wrong. */
bool rr_engine_ready(const rr_engine_t *e, char *why, size_t cap);

/* rr_channel_accepts: whether type ("ADT^A01") matches the accept list;
 * an entry "ADT^*" or "ADT" matches every ADT event. Pure. */
bool rr_channel_accepts(char *const *accept, const char *type, const char *event);

#endif

/* DICOM C-ECHO / C-STORE SCP (storage provider) behind a plain C API.
 *
 * Model
 *   rr_dicom_scp_start binds a TCP listener (IPv4 or IPv6 literal, port 0 =
 *   ephemeral: rr_dicom_scp_port reports the bound port) and starts an
 *   acceptor thread. Every accepted TCP connection gets its own worker thread
 *   that runs the whole association with DCMTK's blocking ASC_/DIMSE_ calls;
 *   nothing of DCMTK ever runs on the loop thread. TCP_NODELAY is set on every
 *   accepted socket (Debian's DCMTK leaves Nagle on, which costs one delayed
 *   ACK per C-STORE response).
 *
 * Refusals (A-ASSOCIATE-RJ, PS3.8 9.3.4; checked in this order)
 *   peer address not in allowed_peers     permanent, service user, no reason (1)
 *   application context not DICOM's        permanent, service user, 2
 *   called AE title is not ae_title        permanent, service user, 7
 *   calling AE not in allowed_calling_aes  permanent, service user, 3
 *   max_associations already running       transient, service provider
 *                                          (presentation), local limit exceeded (2)
 *   spool free space below min_free_bytes  transient, service provider
 *                                          (presentation), temporary congestion (1)
 *   Empty allow-lists refuse everyone; an entry "*" allows anyone. Refused
 *   connections are served by at most RR_DICOM_SCP_REJECT_SLOTS extra threads;
 *   beyond that a connection is closed without a PDU (still reported).
 *
 * Storage
 *   Every storage SOP class DCMTK knows (dcmAllStorageSOPClassUIDs) is
 *   accepted unless cfg.sop_classes narrows it, plus Verification. Transfer
 *   syntaxes: explicit and implicit VR little endian, explicit big endian,
 *   deflated, JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000, RLE,
 *   MPEG-2/4 and HEVC: a dataset is written exactly as received (file meta
 *   header + the received bytes; no transcoding, never the whole dataset in
 *   memory) to "<spool>/.rr-<uid>.<n>.part", fsync'ed, its header read up to
 *   Pixel Data, renamed to "<spool>/<SOP Instance UID>.dcm" (an existing file
 *   of that name is replaced) and the directory fsync'ed, all before the
 *   C-STORE-RSP is sent: a success status means the file is durable. A
 *   transfer that fails or is aborted leaves no file and no event; leftover
 *   ".rr-*.part" files of a crashed process are removed by rr_dicom_scp_start.
 *   C-STORE statuses: 0x0000 stored; 0xA700 out of resources (free space
 *   below min_free_bytes before the transfer, write/fsync/rename failure,
 *   event queue full); 0xC000 cannot understand (SOP Instance UID not a
 *   valid UID, or the file cannot be parsed).
 *
 * TLS (cfg.tls)
 *   DICOM TLS with the Non-downgrading BCP 195 profile (PS3.15 B.9) over
 *   DCMTK's dcmtls and OpenSSL: TLS 1.2 or 1.3 only, AEAD cipher suites with
 *   forward secrecy only (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305, the
 *   TLS 1.3 suites), RSA or ECDSA certificates. The handshake runs in the
 *   connection's worker thread before the A-ASSOCIATE-RQ is read, within
 *   acse_timeout; a failed handshake (no or untrusted client certificate
 *   when one is required, no common protocol or cipher) closes the
 *   connection and is reported as REFUSED "TLS handshake failed".
 *
 * Threading and callbacks
 *   start, port, stats and stop are called from the loop thread. Events are
 *   queued by the workers and delivered on the loop thread through a
 *   uv_async_t, never synchronously inside an API call. A callback may call
 *   rr_dicom_scp_stop. Events keep coming after stop until stopped_cb.
 *
 * Logging
 *   AE titles, addresses, counts, sizes and statuses at info/warn; patient
 *   IDs and UIDs at debug only.
 */
#ifndef RR_DICOM_SCP_H
#define RR_DICOM_SCP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* DICOM layer codes: their own range below the core codes. */
#define RR_DICOM_EBASE (RR_EBASE - 200)
/* DCMTK reported an error (network set-up, data dictionary missing ...). */
#define RR_DICOM_EDCMTK (RR_DICOM_EBASE - 1)
/* An unexpected C++ exception was caught at the C boundary. */
#define RR_DICOM_EINTERNAL (RR_DICOM_EBASE - 2)

/* TLS set-up failed: a certificate, key or CA file unreadable or not matching. */
#define RR_DICOM_ETLS (RR_DICOM_EBASE - 3)

/* Refused connections served with an A-ASSOCIATE-RJ beyond max_associations. */
#define RR_DICOM_SCP_REJECT_SLOTS 4

typedef struct rr_dicom_scp rr_dicom_scp_t;

/* DICOM TLS settings (see "TLS" above), for the SCP and the SCU (scu.h).
 * Files are PEM; keys unencrypted. Paths are copied. */
typedef struct rr_dicom_tls_config {
  const char *cert_file; /* our certificate (chain); SCP: required; SCU: optional,
                            presented when the peer asks for one */
  const char *key_file;  /* its private key; required with cert_file */
  const char *ca_file;   /* CAs trusted for the peer's certificate; SCU: required;
                            SCP: required when require_peer_cert */
  int require_peer_cert; /* SCP: refuse clients without a certificate from ca_file;
                            (the SCU always verifies the server) */
} rr_dicom_tls_config_t;

typedef struct rr_dicom_scp_config {
  const char *name;                       /* for logs; copied; default "dicom" */
  const char *host;                       /* IP literal to bind; copied; default "0.0.0.0" */
  int port;                               /* 0..65535; 0 = ephemeral */
  const char *ae_title;                   /* our AE title, 1..16 characters; copied; required */
  const char *const *allowed_calling_aes; /* copied; "*" = any; empty = none */
  size_t n_allowed_calling_aes;
  const char *const *allowed_peers; /* IP literals or CIDR ("10.1.0.0/16",
                                       "::1"); copied; "*" = any; empty = none */
  size_t n_allowed_peers;
  unsigned max_associations;      /* concurrent; default 8 */
  const char *const *sop_classes; /* storage SOP class UIDs accepted; copied;
                                     NULL/0 = all storage SOP classes */
  size_t n_sop_classes;
  const char *spool_dir;            /* existing, writable directory; copied; required */
  uint64_t min_free_bytes;          /* free-space watermark on spool_dir's file system;
                                       0 = default 1 GiB */
  unsigned acse_timeout_s;          /* association negotiation; default 30 */
  unsigned dimse_timeout_s;         /* within a message (dataset PDUs); default 60 */
  unsigned idle_timeout_s;          /* waiting for the next command; default 120 */
  unsigned max_pdu;                 /* our maximum P-DATA PDU length, 4096..131072;
                                       default 65536 */
  unsigned max_pending_events;      /* events queued for the loop; default 10000 */
  const rr_dicom_tls_config_t *tls; /* NULL: plain TCP; copied */
  int confirm;                      /* 1: a C-STORE is answered only once the loop has confirmed the
                                       instance (rr_dicom_scp_confirm, e.g. after the commit that
                                       records it): success then means durable and recorded; no
                                       confirmation within dimse_timeout_s, a failed one, or a stop
                                       is answered 0xA700. 0 (default): answered once the file is
                                       durable */
} rr_dicom_scp_config_t;

/* One stored instance. Every pointer is borrowed for the callback; strings
 * are never NULL ("" when the attribute is absent), with DICOM padding
 * removed. */
typedef struct rr_dicom_instance {
  uint64_t assoc_id; /* the association it came on (see rr_dicom_assoc_event_t) */
  const char *path;  /* final file in the spool directory */
  uint64_t size;     /* file size in bytes */
  const char *calling_ae, *called_ae, *peer;
  const char *transfer_syntax_uid;
  const char *sop_class_uid, *sop_instance_uid;
  const char *study_instance_uid, *series_instance_uid;
  const char *patient_id, *accession_number;
  const char *modality, *body_part_examined, *study_description;
  const char *study_date, *study_time;
  const char *series_number, *instance_number; /* IS, as text */
  uint64_t token; /* with cfg.confirm: what rr_dicom_scp_confirm takes; else 0 */
} rr_dicom_instance_t;

typedef enum rr_dicom_assoc_kind {
  RR_DICOM_ASSOC_ACCEPTED = 1, /* A-ASSOCIATE-AC sent */
  RR_DICOM_ASSOC_REFUSED,      /* A-ASSOCIATE-RJ sent, or the connection closed
                                  before or instead of one */
  RR_DICOM_ASSOC_ENDED         /* an accepted association is over */
} rr_dicom_assoc_kind_t;

typedef struct rr_dicom_assoc_event {
  rr_dicom_assoc_kind_t kind;
  uint64_t assoc_id;                  /* 1, 2, ... per SCP, one per TCP connection */
  const char *peer;                   /* IP address; borrowed for the callback */
  const char *calling_ae, *called_ae; /* "" when no A-ASSOCIATE-RQ was read */
  /* REFUSED with an A-ASSOCIATE-RJ: its PS3.8 result (1 permanent, 2
   * transient), source (1..3) and reason; 0 when no RJ was sent. */
  int reject_result, reject_source, reject_reason;
  const char *reason;         /* static text: why refused / how it ended
                                 ("released", "aborted by peer", "idle timeout",
                                 "stopped", "network error" ...) */
  unsigned instances;         /* ENDED: instances stored */
  uint64_t bytes;             /* ENDED: bytes stored */
  unsigned accepted_contexts; /* ACCEPTED: presentation contexts accepted */
} rr_dicom_assoc_event_t;

typedef struct rr_dicom_scp_callbacks {
  /* A stored instance (required). */
  void (*on_instance)(void *ud, const rr_dicom_instance_t *inst);
  /* Association accepted / refused / ended (may be NULL). */
  void (*on_association)(void *ud, const rr_dicom_assoc_event_t *ev);
} rr_dicom_scp_callbacks_t;

typedef struct rr_dicom_scp_counters {
  uint64_t accepted, refused, ended;
  uint64_t instances, bytes;
  uint64_t store_failures; /* C-STOREs answered with a failure status */
  uint64_t dropped_events; /* association events lost to a full queue */
  unsigned active;         /* associations holding a slot right now */
} rr_dicom_scp_stats_t;

/* rr_dicom_scp_start: validates cfg (strings and lists are copied), removes
 * leftover ".rr-*.part" files from the spool, binds and listens, starts the
 * acceptor thread and an async handle on loop. cb (copied) and ud
 * (borrowed) are used until stopped_cb. On success *out is the new SCP,
 * owned by the caller until rr_dicom_scp_stop hands it back.
 * Errors: RR_EINVAL (config), RR_DICOM_ETLS (cfg.tls files), negative errno from socket/bind/listen
 * (UV_EADDRINUSE ...), RR_ENOMEM, RR_DICOM_EDCMTK, RR_DICOM_EINTERNAL;
 * nothing is left running then. Loop thread; never calls back
 * synchronously. */
int rr_dicom_scp_start(uv_loop_t *loop, const rr_dicom_scp_config_t *cfg,
                       const rr_dicom_scp_callbacks_t *cb, void *ud, rr_dicom_scp_t **out);

/* rr_dicom_scp_port: the bound TCP port. Any thread. */
int rr_dicom_scp_port(const rr_dicom_scp_t *scp);

/* rr_dicom_scp_stats: a snapshot of the counters. Any thread. */
void rr_dicom_scp_stats(const rr_dicom_scp_t *scp, rr_dicom_scp_stats_t *out);

typedef void (*rr_dicom_scp_stopped_cb)(void *ud);

/* rr_dicom_scp_stop: stops accepting at once; running associations may
 * finish (peer release) for up to deadline_ms, then their sockets are shut
 * down (an unfinished transfer leaves no file). Threads are joined off the
 * loop; events already queued are delivered, then the async handle is
 * closed, stopped_cb(ud) (may be NULL) is called from the loop and scp is
 * freed: it must not be used after stopped_cb. A second call and NULL are
 * no-ops. Loop thread (also from inside a callback). */
void rr_dicom_scp_stop(rr_dicom_scp_t *scp, uint64_t deadline_ms,
                       rr_dicom_scp_stopped_cb stopped_cb, void *ud);

/* rr_dicom_scp_strerror: static text for RR_DICOM_E* and every code
 * rr_strerror knows. Never NULL. Any thread. */
const char *rr_dicom_scp_strerror(int code);

/* rr_dicom_scp_confirm: with cfg.confirm, the answer for the instance of
 * token: status 0 = recorded (C-STORE success), else 0xA700. A token whose
 * C-STORE was already answered (timeout, stop) is ignored. Loop thread (any
 * thread is safe); until stopped_cb. */
void rr_dicom_scp_confirm(rr_dicom_scp_t *scp, uint64_t token, int status);

#ifdef __cplusplus
}
#endif

#endif

/* TLS as a layer between a socket and a protocol (after Redis connection.h
 * and curl's connection filters): OpenSSL over two memory BIOs. This module
 * never touches sockets or libuv; the caller moves bytes.
 *
 *   socket bytes in  -> rr_tls_feed      -> rr_tls_read  -> plaintext (MLLP deframer)
 *   plaintext reply  -> rr_tls_write     -> rr_tls_pending_out / rr_tls_consume_out -> socket
 *
 * Driving it from a libuv stream (listener or sender):
 *   - client: after connect, rr_tls_handshake() (sends the ClientHello) and flush.
 *   - read callback: rr_tls_feed(); then rr_tls_read() until it returns
 *     RR_EAGAIN, handing each plaintext chunk to the protocol; then flush.
 *     rr_tls_read drives the handshake itself, so the server needs no
 *     separate step. To learn when the handshake completes (e.g. to report
 *     "connected"), compare rr_tls_handshake_done() before and after.
 *   - flush = while rr_tls_pending_out() gives len > 0: copy the bytes into a
 *     write request, rr_tls_consume_out(len). Flush after EVERY call that
 *     returns (handshake, read, write, shutdown, and failures: the alert that
 *     tells the peer why it was refused is in pending_out).
 *   - RR_ETLS: log rr_tls_failure_name()/rr_tls_reason(), flush, close.
 *     RR_ETLSCLOSED: the peer said close_notify; flush, close.
 *   - closing ourselves: rr_tls_shutdown(), flush, close the socket (no need
 *     to wait for the peer's close_notify).
 *   - the caller enforces a handshake deadline (a peer that never finishes
 *     the handshake costs a connection slot, nothing else).
 *
 * Security policy (fixed, not configurable): TLS 1.2..1.3; TLS 1.2 suites
 * ECDHE with AES-GCM or ChaCha20-Poly1305 only (BCP 195, IHE ATNA); TLS 1.3
 * default suites; groups X25519, P-256, P-384; security level 2; no
 * compression; no renegotiation; no 0-RTT. Session resumption (tickets and
 * the session cache) is OFF on both sides: a resumed session skips
 * certificate verification, so a client revoked or dropped from the
 * allow-list by a reload could resume a session made before it; MLLP
 * connections are long-lived, so resumption saves nothing worth that; and
 * TLS 1.2 tickets under a never-rotated key weaken forward secrecy.
 *
 * Threading: a ctx and all its conns are used from one thread (the loop
 * thread). Nothing here calls back into the caller.
 */
#ifndef RR_TLS_TLS_H
#define RR_TLS_TLS_H

#include <stddef.h>

#include "core/buf.h"
#include "core/error.h"

/* TLS codes; they belong in core/error.h (and rr_strerror) once the lead
 * moves them there, which is why they are guarded. */

typedef struct rr_tls_ctx rr_tls_ctx_t;
typedef struct rr_tls_conn rr_tls_conn_t;

typedef enum rr_tls_role { RR_TLS_SERVER = 0, RR_TLS_CLIENT } rr_tls_role_t;

typedef enum rr_tls_version {
  RR_TLS_VDEFAULT = 0, /* min: TLS 1.2; max: TLS 1.3 */
  RR_TLS_V1_2,
  RR_TLS_V1_3
} rr_tls_version_t;

/* Zero-initialise, then set what applies. Every string is borrowed for the
 * call to rr_tls_ctx_new / rr_tls_ctx_reload (what is needed is copied). */
typedef struct rr_tls_config {
  rr_tls_role_t role;
  const char *cert_file;    /* PEM, leaf first then intermediates. Server: required.
                               Client: optional (with key_file: mutual TLS). */
  const char *key_file;     /* PEM, unencrypted; refused if group or others have any
                               access to it (mode must be 0600 or 0400). */
  const char *ca_file;      /* PEM trust anchors for the peer's certificate. Server:
                               required with require_client_cert, and when set without
                               it a client certificate is asked for, and verified if
                               sent. Client: NULL = the system trust store. */
  const char *crl_file;     /* optional PEM CRL(s). Turns on CRL_CHECK|CRL_CHECK_ALL:
                               every CA in the peer's chain then needs a current CRL,
                               or the peer is refused ("cert_invalid"). */
  int require_client_cert;  /* server: refuse clients without a valid certificate */
  const char *const *allow; /* peer identities allowed (exact subject CN, DNS SAN
                               (ASCII case-insensitive) or URI SAN); checked during
                               verification. nallow == 0: any certificate ca_file
                               vouches for. Server: needs require_client_cert. */
  size_t nallow;
  const char *server_name;      /* client: required. Host name (sent as SNI, checked
                                   against the DNS SANs) or IP literal (checked against
                                   the IP SANs, no SNI). */
  rr_tls_version_t min_version; /* default TLS 1.2 */
  rr_tls_version_t max_version; /* default TLS 1.3 */
} rr_tls_config_t;

/* Why a handshake (or session) failed; rr_tls_failure_name gives a stable
 * token for logs and audit records, rr_tls_reason the human detail. */
typedef enum rr_tls_failure {
  RR_TLS_FAIL_NONE = 0,
  RR_TLS_FAIL_NO_CERT,          /* "no_cert": peer sent no certificate */
  RR_TLS_FAIL_UNKNOWN_CA,       /* "unknown_ca": chain does not lead to ca_file */
  RR_TLS_FAIL_EXPIRED,          /* "expired": expired or not yet valid */
  RR_TLS_FAIL_REVOKED,          /* "revoked": listed in the CRL */
  RR_TLS_FAIL_NOT_ALLOWED,      /* "not_allowed": valid, but not on the allow-list */
  RR_TLS_FAIL_HOSTNAME,         /* "hostname": server cert does not match server_name */
  RR_TLS_FAIL_CERT_INVALID,     /* "cert_invalid": any other certificate problem
                                   (purpose, signature, CRL missing or stale ...) */
  RR_TLS_FAIL_PROTOCOL_VERSION, /* "protocol_version": no common TLS version */
  RR_TLS_FAIL_HANDSHAKE,        /* "handshake": anything else (no shared cipher,
                                   not TLS at all, peer's alert, bad record ...) */
} rr_tls_failure_t;

/* rr_tls_ctx_new: builds an SSL_CTX from cfg. On failure returns a negative
 * code (-errno for a file that cannot be opened, RR_EINVAL for a bad config
 * or file content, RR_ENOMEM) and appends one line to err (may be NULL)
 * naming the setting, the file and OpenSSL's reason. *out is owned by the
 * caller; free it with rr_tls_ctx_free. */
int rr_tls_ctx_new(const rr_tls_config_t *cfg, rr_tls_ctx_t **out, rr_buf_t *err);
/* rr_tls_ctx_reload: builds a new SSL_CTX from cfg (role may not change) and
 * uses it for connections made from now on; existing connections keep the
 * one they started with until they are freed. On failure the old one stays
 * in use and the error is reported as for rr_tls_ctx_new. */
int rr_tls_ctx_reload(rr_tls_ctx_t *ctx, const rr_tls_config_t *cfg, rr_buf_t *err);
/* rr_tls_ctx_free: drops the ctx; connections still open keep working (they
 * hold their own reference). NULL is a no-op. */
void rr_tls_ctx_free(rr_tls_ctx_t *ctx);

/* rr_tls_conn_new: a connection in ctx's role, on ctx's current SSL_CTX.
 * Nothing is sent until rr_tls_handshake or rr_tls_read. RR_ENOMEM. *out is
 * owned by the caller; it does not need ctx to stay alive. */
int rr_tls_conn_new(rr_tls_ctx_t *ctx, rr_tls_conn_t **out);
/* rr_tls_conn_free: frees c (sends nothing; see rr_tls_shutdown). NULL is a no-op. */
void rr_tls_conn_free(rr_tls_conn_t *c);

/* rr_tls_feed: appends ciphertext read from the socket (copied). Processed
 * by the next rr_tls_read / rr_tls_handshake. RR_ELIMIT if more than 256 KiB
 * would sit unprocessed (the caller is not reading), RR_ENOMEM. */
int rr_tls_feed(rr_tls_conn_t *c, const void *data, size_t len);
/* rr_tls_handshake: advances the handshake. 0 when complete, RR_EAGAIN when
 * it needs more input (flush pending_out first), RR_ETLS when refused or
 * failed (see rr_tls_failure). Idempotent once complete. */
int rr_tls_handshake(rr_tls_conn_t *c);
/* rr_tls_handshake_done: 1 once the handshake completed. A server conn is
 * done only after the client's certificate passed every check. A TLS 1.3
 * client is done before the server has judged the client's certificate: a
 * refusal then arrives as RR_ETLS from a later rr_tls_read. */
int rr_tls_handshake_done(const rr_tls_conn_t *c);
/* rr_tls_read: up to cap (> 0) bytes of plaintext into buf; *n is set.
 * Drives the handshake first. 0 with *n > 0; RR_EAGAIN: feed more (and
 * flush); RR_ETLSCLOSED: the peer sent close_notify; RR_ETLS: failure. No
 * plaintext is ever returned before the peer's certificate passed every
 * check, allow-list included. */
int rr_tls_read(rr_tls_conn_t *c, void *buf, size_t cap, size_t *n);
/* rr_tls_write: encrypts all of data (copied) into pending_out. RR_EAGAIN
 * before the handshake is done (nothing taken), RR_ETLS after a failure or
 * shutdown, RR_ENOMEM. */
int rr_tls_write(rr_tls_conn_t *c, const void *data, size_t len);
/* rr_tls_pending_out: ciphertext waiting for the socket (handshake records,
 * application records, alerts). *p is borrowed and valid until the next
 * rr_tls_* call on c; *len is 0 when there is nothing to send. */
void rr_tls_pending_out(rr_tls_conn_t *c, const char **p, size_t *len);
/* rr_tls_consume_out: drops the first n bytes of pending_out (once copied). */
void rr_tls_consume_out(rr_tls_conn_t *c, size_t n);
/* rr_tls_shutdown: queues close_notify (if the handshake completed and no
 * failure happened); later writes fail with RR_ETLS. Always 0. */
int rr_tls_shutdown(rr_tls_conn_t *c);

/* rr_tls_peer_identity: who the peer's certificate names, for logs and
 * audit: its subject CN, else its first DNS SAN, else its first URI SAN;
 * recorded during verification, so also set for a refused peer -- but then
 * it is only what the certificate CLAIMS (log it as claimed_identity=).
 * Verified only once rr_tls_handshake_done() on a server, or a client
 * without failure. "" when the peer sent no certificate. Borrowed, valid
 * while c lives. */
const char *rr_tls_peer_identity(const rr_tls_conn_t *c);
/* rr_tls_failure / rr_tls_reason: why c failed (RR_TLS_FAIL_NONE / "" when
 * it has not), e.g. "expired: certificate has expired (depth 0,
 * subject CN=expired.test, notAfter Jan 2 00:00:00 2020 GMT)". A refusal by
 * the peer reads "refused by peer: ..." and maps the peer's alert onto the
 * same categories. Borrowed, valid while c lives. */
rr_tls_failure_t rr_tls_failure(const rr_tls_conn_t *c);
const char *rr_tls_reason(const rr_tls_conn_t *c);
/* rr_tls_failure_name: the token in the enum comments ("none" for NONE). Static. */
const char *rr_tls_failure_name(rr_tls_failure_t f);
/* rr_tls_version / rr_tls_cipher: negotiated protocol ("TLSv1.3") and
 * suite, for the connect log line; "" before the handshake. Static strings. */
const char *rr_tls_version(const rr_tls_conn_t *c);
const char *rr_tls_cipher(const rr_tls_conn_t *c);

#endif

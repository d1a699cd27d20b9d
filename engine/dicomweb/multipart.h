/* multipart/related codec for DICOMweb (RFC 2046 §5.1, RFC 2387, DICOM PS3.18 §8.6).
 *
 * Pure: no I/O. The parser takes a WADO-RS response body in chunks of any
 * size (one byte at a time works) and reports parts through callbacks,
 * synchronously, from inside rr_multipart_parser_feed. Part data is never
 * held: each data callback gets a borrowed slice of the input (or of a small
 * internal hold-back buffer for bytes that looked like the start of a
 * delimiter), so a 1 GB part costs no more memory than a 1 KB one. The
 * builder writes the framing of a STOW-RS request around parts that the
 * caller streams itself.
 *
 * Framing accepted (RFC 2046 grammar, with the leniencies listed):
 *   preamble, then "--" boundary [padding] CRLF at the start of a line;
 *   per part: header lines, an empty line, data, then CRLF "--" boundary;
 *   after the last part "--" boundary "--", then an epilogue that is ignored.
 * - Transport padding (spaces and tabs, at most RR_MULTIPART_MAX_PADDING
 *   bytes) may follow a boundary.
 * - A line that starts with CRLF "--" boundary but goes on with anything
 *   other than "--", padding or the line end is data, not a delimiter.
 * - Data may start with "--" boundary directly (an empty part whose header
 *   block's empty line doubled as the delimiter's CRLF).
 * - Header lines may be folded (a line starting with a space or tab
 *   continues the previous value); control characters other than tab are
 *   refused; names are RFC 2045 tokens.
 * - A multipart body with no part ("--B--" right away) is accepted.
 * - Bare LF instead of CRLF is refused unless options.allow_bare_lf is set:
 *   then LF alone ends header lines and starts a delimiter, and a CR just
 *   before that LF belongs to the delimiter, not to the data.
 * - Content-Length in a part is optional; when present it must be digits,
 *   and (unless options.ignore_content_length) must equal the part's size.
 */
#ifndef RR_DICOMWEB_MULTIPART_H
#define RR_DICOMWEB_MULTIPART_H

#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"

#define RR_MULTIPART_BOUNDARY_RFC 70  /* RFC 2046 maximum; the default limit */
#define RR_MULTIPART_BOUNDARY_CAP 200 /* highest max_boundary that can be set */
#define RR_MULTIPART_MAX_PADDING 256  /* transport padding bytes after a boundary */
#define RR_MULTIPART_TYPE_MAX 255     /* bytes of the Content-Type `type` parameter */

/* Where and why parsing stopped. reason is a static string (NULL while code
 * is 0). offset is the stream offset of the offending byte, or for
 * Content-Type errors the offset in the header value. */
typedef struct rr_multipart_error {
  int code;
  uint64_t offset;
  const char *reason;
} rr_multipart_error_t;

/* ---- Content-Type --------------------------------------------------------- */

typedef struct rr_multipart_content_type {
  char boundary[RR_MULTIPART_BOUNDARY_CAP + 1]; /* unquoted, NUL-terminated */
  size_t boundary_len;
  char type[RR_MULTIPART_TYPE_MAX + 1]; /* the `type` parameter, "" when absent */
  int related;                          /* 1 when the subtype is "related" */
} rr_multipart_content_type_t;

/* rr_multipart_content_type_parse: parses a Content-Type header value of any
 * multipart/<subtype>: parameters in any order, names case-insensitive,
 * values tokens or quoted strings (backslash escapes), whitespace around
 * ';' and '='. Unknown parameters are skipped. An unquoted value may hold
 * '/', '=', ':', '?' and other tspecials except ';' and '"' (RFC 2045 wants
 * them quoted; servers do not always). The boundary must be 1..max_boundary
 * bytes of printable ASCII or space, not ending in a space (RFC 2046 allows
 * fewer characters; anything else is harmless to this parser).
 * max_boundary 0 means RR_MULTIPART_BOUNDARY_RFC; above the cap is RR_EINVAL.
 * Errors: RR_EPARSE ("not a multipart media type", "no boundary parameter",
 * ...), RR_ELIMIT (boundary or type too long); err (may be NULL) gets the
 * offset in value. Pure, thread-safe, no allocation. */
int rr_multipart_content_type_parse(const char *value, size_t len, size_t max_boundary,
                                    rr_multipart_content_type_t *out, rr_multipart_error_t *err);

/* ---- parser --------------------------------------------------------------- */

typedef struct rr_multipart_options {
  size_t max_header_block;   /* bytes of one part's header lines incl. line ends; 16 KiB */
  size_t max_headers;        /* header fields per part; 64 */
  size_t max_parts;          /* parts per body; 100000 */
  size_t max_boundary;       /* boundary length; 70 (at most RR_MULTIPART_BOUNDARY_CAP) */
  int allow_bare_lf;         /* accept LF line ends (see above); 0 */
  int ignore_content_length; /* do not check a part's Content-Length; 0 */
} rr_multipart_options_t;

/* A header field of a part (parser) or for a part (builder). Both strings
 * are NUL-terminated; from the parser they hold no control characters
 * except tab, the name as sent, the value with surrounding whitespace
 * removed and folded lines joined by one space. */
typedef struct rr_multipart_header {
  const char *name;
  const char *value;
} rr_multipart_header_t;

/* The part being parsed. Every pointer in it is borrowed: valid from
 * part_begin until part_end returns (or until an error). */
typedef struct rr_multipart_part {
  size_t index;                         /* 0 for the first part */
  uint64_t offset;                      /* stream offset of the header block */
  uint64_t data_offset;                 /* stream offset of the first data byte */
  uint64_t length;                      /* data bytes so far; the total in part_end */
  const char *content_type;             /* NULL when absent */
  const char *content_location;         /* NULL when absent */
  int has_content_length;               /* a Content-Length header was present */
  uint64_t content_length;              /* its value */
  const rr_multipart_header_t *headers; /* nheaders fields, in order */
  size_t nheaders;
} rr_multipart_part_t;

/* Callbacks, each optional (NULL). They run synchronously inside feed (or
 * finish), on the caller's thread. A non-zero return stops the parser for
 * good: feed returns that value, the error reason is "stopped by callback"
 * and no event follows. A callback must not free the parser.
 * - part_begin: the header block is complete.
 * - part_data: len > 0 bytes of the part's data (borrowed for the call).
 *   Chunking of data events is arbitrary; their concatenation is the data.
 * - part_end: the part's data is complete; part->length is final.
 * - end: the close delimiter was read; parts = number of parts. */
typedef struct rr_multipart_callbacks {
  int (*part_begin)(void *ud, const rr_multipart_part_t *part);
  int (*part_data)(void *ud, const rr_multipart_part_t *part, const char *data, size_t len);
  int (*part_end)(void *ud, const rr_multipart_part_t *part);
  int (*end)(void *ud, size_t parts);
} rr_multipart_callbacks_t;

typedef struct rr_multipart_parser rr_multipart_parser_t;

/* rr_multipart_options_default: the defaults listed above. */
void rr_multipart_options_default(rr_multipart_options_t *o);

/* rr_multipart_parser_new: a parser for a body of the given Content-Type
 * header value (not NUL-terminated; len bytes). opt may be NULL (defaults);
 * a zero limit means its default. cb is copied; ud is passed to every
 * callback. On success *out is new (free with rr_multipart_parser_free).
 * Errors: those of rr_multipart_content_type_parse (err, may be NULL, gets
 * the details), RR_EINVAL (bad options), RR_ENOMEM. Never calls back. */
int rr_multipart_parser_new(const char *content_type, size_t len, const rr_multipart_options_t *opt,
                            const rr_multipart_callbacks_t *cb, void *ud,
                            rr_multipart_parser_t **out, rr_multipart_error_t *err);
/* rr_multipart_parser_free: NULL is a no-op. Not from inside a callback. */
void rr_multipart_parser_free(rr_multipart_parser_t *p);

/* rr_multipart_parser_feed: consumes len bytes (data is borrowed for the
 * call only), calling back for every event they complete. Bytes after the
 * close delimiter are the epilogue and are ignored. Returns 0, RR_EPARSE or
 * RR_ELIMIT (details in rr_multipart_parser_error), RR_ENOMEM, or a
 * callback's non-zero value. After an error every later call returns the
 * same code without calling back. */
int rr_multipart_parser_feed(rr_multipart_parser_t *p, const char *data, size_t len);
/* rr_multipart_parser_finish: the stream has ended. 0 when the close
 * delimiter was seen; otherwise RR_EPARSE ("stream ended before the first
 * boundary", "stream ended inside part headers", "stream ended inside a
 * part") at the stream's length, or the earlier error. Never calls back. */
int rr_multipart_parser_finish(rr_multipart_parser_t *p);
/* rr_multipart_parser_error: borrowed; code 0 while all is well. */
const rr_multipart_error_t *rr_multipart_parser_error(const rr_multipart_parser_t *p);
/* rr_multipart_parser_content_type: the parsed Content-Type (borrowed). */
const rr_multipart_content_type_t *rr_multipart_parser_content_type(const rr_multipart_parser_t *p);
/* rr_multipart_parser_parts: parts begun so far. */
size_t rr_multipart_parser_parts(const rr_multipart_parser_t *p);

/* rr_multipart_part_header: the value of the first header called name
 * (case-insensitive), borrowed like the part; NULL when absent. */
const char *rr_multipart_part_header(const rr_multipart_part_t *part, const char *name);

/* ---- builder (STOW-RS request bodies) -------------------------------------- */

/* The builder only writes framing into a caller's rr_buf_t; the caller sends
 * that, then each part's data itself (from a file, in pieces), so a body of
 * any size is produced as a stream. Embedded by value; no allocation. */
typedef struct rr_multipart_builder {
  char boundary[RR_MULTIPART_BOUNDARY_RFC + 1];
  size_t boundary_len;
  size_t parts;
  int in_part;
  int closed;
} rr_multipart_builder_t;

/* rr_multipart_builder_init: boundary (NUL-terminated, borrowed) is used when
 * not NULL and must be a valid RFC 2046 boundary (1..70 characters from
 * DIGIT ALPHA ' ( ) + _ , - . / : = ? and space, not ending in a space).
 * Otherwise the boundary is "radrelay-" followed by the hex of up to 30 bytes
 * of random (at least 16 are needed); when random is NULL, 24 bytes come from
 * getentropy(). A collision of such a boundary with part data is not
 * checked for: 128 or more random bits make it negligible. Errors:
 * RR_EINVAL (bad boundary, fewer than 16 random bytes), RR_EIO (no entropy). */
int rr_multipart_builder_init(rr_multipart_builder_t *b, const char *boundary, const void *random,
                              size_t nrandom);
/* rr_multipart_builder_content_type: appends the Content-Type header value,
 * `multipart/related; type="<type>"; boundary="<boundary>"` (no type
 * parameter when type is NULL). RR_EINVAL when type holds '"', '\\' or a
 * control character; rr_buf errors. */
int rr_multipart_builder_content_type(const rr_multipart_builder_t *b, const char *type,
                                      rr_buf_t *out);
/* rr_multipart_builder_begin_part: appends the delimiter line and the part's
 * header block (headers[0..n), borrowed; names must be tokens, values free
 * of control characters other than tab). The caller then sends the data.
 * RR_EINVAL when a part is already open, after close, or on a bad header;
 * rr_buf errors (out is then unchanged). */
int rr_multipart_builder_begin_part(rr_multipart_builder_t *b, const rr_multipart_header_t *headers,
                                    size_t n, rr_buf_t *out);
/* rr_multipart_builder_end_part: the caller has sent all the part's data;
 * appends the CRLF that starts the next delimiter. RR_EINVAL when no part is
 * open; rr_buf errors. */
int rr_multipart_builder_end_part(rr_multipart_builder_t *b, rr_buf_t *out);
/* rr_multipart_builder_close: appends the close delimiter; the body is then
 * complete. RR_EINVAL while a part is open or when already closed. */
int rr_multipart_builder_close(rr_multipart_builder_t *b, rr_buf_t *out);

#endif

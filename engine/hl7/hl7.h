/* radrelay HL7 v2 codec: ER7 parse, path access and editing, serialize,
 * acknowledgements, batches.
 *
 * Pure: no I/O, no clock, no globals. Every function may be called from any
 * thread as long as one message object is used by one thread at a time.
 *
 * Model
 *   A message (rr_hl7_msg_t) keeps its own copy of the input. Parsing splits
 *   it into segments and fields once; repetitions, components and
 *   subcomponents are found on demand inside a field. Values are read raw
 *   (a borrowed slice of the encoded text) or decoded (escape sequences
 *   resolved, converted from the MSH-18 character set to UTF-8). Writes
 *   encode the value, mark only the touched segment dirty, and serializing
 *   copies every untouched segment byte for byte.
 *
 * Paths
 *   SEG[occ]-FIELD[rep].COMP.SUB, every index 1-based, every part after the
 *   segment optional: "PID", "OBX[3]", "PID-3", "PID-3[2]", "PID-3[2].1",
 *   "PID-3[2].4.2", "OBX[3]-5", "MSH-9.2". A component without a repetition
 *   means repetition 1. MSH-1 is the field separator, MSH-2 the encoding
 *   characters, as the standard numbers them (likewise FHS and BHS).
 *
 * Ownership
 *   Slices (rr_hl7_slice_t) returned by the getters are borrowed: valid until
 *   the next edit or parse of the same message, or its free.
 */
#ifndef RR_HL7_H
#define RR_HL7_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"

typedef struct rr_hl7_msg rr_hl7_msg_t;

typedef struct rr_hl7_slice {
  const char *p; /* borrowed; not NUL-terminated */
  size_t len;
} rr_hl7_slice_t;

typedef struct rr_hl7_delims {
  char field;        /* MSH-1, usually '|' */
  char component;    /* '^' */
  char repetition;   /* '~' */
  char escape;       /* '\\' */
  char subcomponent; /* '&' */
  char truncation;   /* v2.7 fifth encoding character ('#'), 0 when absent */
} rr_hl7_delims_t;

typedef enum rr_hl7_mode {
  RR_HL7_LENIENT = 0, /* LF/CRLF terminators, blank lines, lax MSH */
  RR_HL7_STRICT = 1   /* CR only, well-formed IDs, MSH-9/10/11/12 present */
} rr_hl7_mode_t;

typedef struct rr_hl7_options {
  size_t max_message_size; /* bytes; default 64 MiB */
  size_t max_segments;     /* default 100,000 */
  size_t max_field_length; /* bytes of one encoded field; default 64 MiB */
  rr_hl7_mode_t mode;      /* default lenient */
  bool borrow;             /* parse in place: the input must stay valid and
                              unchanged while the message is used (no copy) */
} rr_hl7_options_t;

/* HL7 table 0357, message error condition codes. */
enum {
  RR_HL7_E_SEGMENT_SEQUENCE = 100,
  RR_HL7_E_REQUIRED_FIELD = 101,
  RR_HL7_E_DATA_TYPE = 102,
  RR_HL7_E_TABLE_VALUE = 103,
  RR_HL7_E_VALUE_TOO_LONG = 104,
  RR_HL7_E_UNSUPPORTED_MESSAGE_TYPE = 200,
  RR_HL7_E_UNSUPPORTED_EVENT = 201,
  RR_HL7_E_UNSUPPORTED_PROCESSING_ID = 202,
  RR_HL7_E_UNSUPPORTED_VERSION = 203,
  RR_HL7_E_UNKNOWN_KEY = 204,
  RR_HL7_E_DUPLICATE_KEY = 205,
  RR_HL7_E_RECORD_LOCKED = 206,
  RR_HL7_E_INTERNAL = 207
};

/* Where and why something failed. Fields that do not apply are 0 / "". */
typedef struct rr_hl7_error {
  int code;            /* RR_E* */
  int hl7_code;        /* table 0357 */
  size_t offset;       /* byte offset into the input */
  unsigned segment;    /* 1-based position of the segment in the message */
  unsigned occurrence; /* 1-based occurrence of that segment ID */
  char segment_id[4];
  unsigned field; /* field number (MSH numbering) */
  unsigned repetition;
  unsigned component;
  unsigned subcomponent;
  char text[160]; /* human-readable; never contains patient data */
} rr_hl7_error_t;

typedef struct rr_hl7_path {
  char segment[4]; /* segment ID, NUL-terminated */
  unsigned occ;    /* segment occurrence, >= 1 */
  unsigned field;  /* 0 = whole segment */
  unsigned rep;    /* 0 = not given */
  unsigned comp;   /* 0 = not given */
  unsigned sub;    /* 0 = not given */
} rr_hl7_path_t;

/* ---- options, errors ---------------------------------------------------- */

/* rr_hl7_options_default: fills *o with the defaults listed above. */
void rr_hl7_options_default(rr_hl7_options_t *o);
/* rr_hl7_error_text: static description of a table 0357 code ("" if unknown). */
const char *rr_hl7_error_text(int hl7_code);

/* ---- message lifecycle -------------------------------------------------- */

/* rr_hl7_msg_new: an empty message; NULL on allocation failure.
 * rr_hl7_msg_free(NULL) is a no-op. One message object may be parsed into
 * many times; its memory is reused. */
rr_hl7_msg_t *rr_hl7_msg_new(void);
void rr_hl7_msg_free(rr_hl7_msg_t *m);

/* rr_hl7_parse: parses one ER7 message (starting with MSH) from data/len,
 * which is copied unless opt->borrow. opt may be NULL (defaults). On failure returns RR_EPARSE,
 * RR_ELIMIT, RR_ECHARSET or RR_ENOMEM and fills *err (err may be NULL); the
 * segments parsed before the error stay readable, so an ACK can still echo
 * the header of a broken message. */
int rr_hl7_parse(rr_hl7_msg_t *m, const char *data, size_t len, const rr_hl7_options_t *opt,
                 rr_hl7_error_t *err);

/* rr_hl7_msg_create: starts a message from scratch: one MSH segment holding
 * the delimiters (NULL = |^~\&) and, when given, MSH-12 = version. */
int rr_hl7_msg_create(rr_hl7_msg_t *m, const rr_hl7_delims_t *d, const char *version);

/* Delimiters in use (borrowed). */
const rr_hl7_delims_t *rr_hl7_delims(const rr_hl7_msg_t *m);
/* Canonical name of the message character set from MSH-18 ("ASCII",
 * "8859/1", "UNICODE UTF-8", ...), "" when undeclared. Borrowed. */
const char *rr_hl7_charset(const rr_hl7_msg_t *m);

/* ---- paths -------------------------------------------------------------- */

/* rr_hl7_path_parse: parses "PID-3[2].4.2" etc. RR_EPATH when malformed. */
int rr_hl7_path_parse(const char *s, size_t len, rr_hl7_path_t *p);
/* rr_hl7_path_format: writes the canonical text of p into out (NUL-terminated,
 * truncated to cap). Returns the length it needed. */
size_t rr_hl7_path_format(const rr_hl7_path_t *p, char *out, size_t cap);

/* ---- reading ------------------------------------------------------------ */

/* rr_hl7_get_raw: the encoded text at path (borrowed). RR_ENOTFOUND when the
 * segment occurrence does not exist; a missing field, repetition, component
 * or subcomponent of an existing segment is an empty slice and returns 0.
 * A path without a field returns the whole segment. */
int rr_hl7_get_raw(const rr_hl7_msg_t *m, const rr_hl7_path_t *p, rr_hl7_slice_t *out);
/* rr_hl7_get: like rr_hl7_get_raw, but appends the decoded UTF-8 value to
 * out (escape sequences resolved, character set converted). Meant for leaf
 * values; on a composite the real delimiters stay as they are. */
int rr_hl7_get(const rr_hl7_msg_t *m, const rr_hl7_path_t *p, rr_buf_t *out);
/* String-path conveniences; RR_EPATH when the path does not parse. */
int rr_hl7_get_raw_s(const rr_hl7_msg_t *m, const char *path, rr_hl7_slice_t *out);
int rr_hl7_get_s(const rr_hl7_msg_t *m, const char *path, rr_buf_t *out);
/* rr_hl7_is_null: true when the raw value at path is the HL7 null "". */
bool rr_hl7_is_null(const rr_hl7_msg_t *m, const rr_hl7_path_t *p);

/* rr_hl7_decode: decodes an encoded value of this message (escapes,
 * character set) and appends UTF-8 to out. */
int rr_hl7_decode(const rr_hl7_msg_t *m, const char *raw, size_t len, rr_buf_t *out);
/* rr_hl7_to_utf8: converts encoded text from the message character set to
 * UTF-8 without resolving escape sequences; appends to out. */
int rr_hl7_to_utf8(const rr_hl7_msg_t *m, const char *raw, size_t len, rr_buf_t *out);
/* rr_hl7_encode: encodes a UTF-8 leaf value for this message (delimiters
 * escaped, converted to the message character set) and appends it to out. */
int rr_hl7_encode(const rr_hl7_msg_t *m, const char *utf8, size_t len, rr_buf_t *out);

/* ---- writing ------------------------------------------------------------ */

/* rr_hl7_set: stores a UTF-8 value at path, encoding it. Missing segments,
 * fields, repetitions and components are created (a new segment occurrence
 * is inserted after the last segment with the same ID, or appended).
 * MSH-1 and MSH-2 cannot be set (RR_EINVAL). */
int rr_hl7_set(rr_hl7_msg_t *m, const rr_hl7_path_t *p, const char *utf8, size_t len);
/* rr_hl7_set_raw: stores already-encoded text (it may carry delimiters of
 * the levels below the path, e.g. a whole composite field). */
int rr_hl7_set_raw(rr_hl7_msg_t *m, const rr_hl7_path_t *p, const char *raw, size_t len);
int rr_hl7_set_s(rr_hl7_msg_t *m, const char *path, const char *utf8);
/* rr_hl7_delete: removes the value at path (trailing empty pieces are
 * trimmed); a path without a field deletes the segment. Deleting something
 * that does not exist is not an error. */
int rr_hl7_delete(rr_hl7_msg_t *m, const rr_hl7_path_t *p);

/* ---- segments ----------------------------------------------------------- */

size_t rr_hl7_segment_count(const rr_hl7_msg_t *m);
/* rr_hl7_segment_name: 3-character ID of segment i (0-based), borrowed;
 * NULL when out of range. */
const char *rr_hl7_segment_name(const rr_hl7_msg_t *m, size_t i);
/* rr_hl7_segment_fields: number of the last field present in segment i
 * (MSH numbering), 0 when out of range. */
unsigned rr_hl7_segment_fields(const rr_hl7_msg_t *m, size_t i);
/* rr_hl7_segment_index: 0-based position of the occ-th segment with this
 * ID, or SIZE_MAX. */
size_t rr_hl7_segment_index(const rr_hl7_msg_t *m, const char *id, unsigned occ);
/* rr_hl7_field_raw: encoded field f of segment i (borrowed). */
int rr_hl7_field_raw(const rr_hl7_msg_t *m, size_t i, unsigned f, rr_hl7_slice_t *out);
/* rr_hl7_segment_insert: inserts an encoded segment ("ZDS|1.2.3", this
 * message's delimiters, no terminator) before position i (i == count
 * appends). RR_EPARSE when the text is not a segment. */
int rr_hl7_segment_insert(rr_hl7_msg_t *m, size_t i, const char *raw, size_t len);
int rr_hl7_segment_delete(rr_hl7_msg_t *m, size_t i);

/* rr_hl7_piece: piece idx (1-based) of encoded text s split at sep. Returns
 * false, with an empty slice at the end of s, when there are fewer pieces. */
bool rr_hl7_piece(const char *s, size_t len, char sep, unsigned idx, rr_hl7_slice_t *out);

/* ---- serialize ---------------------------------------------------------- */

/* rr_hl7_serialize: appends the message in ER7, every segment terminated by
 * CR. Unmodified segments are copied byte for byte. */
int rr_hl7_serialize(const rr_hl7_msg_t *m, rr_buf_t *out);

/* ---- acknowledgements --------------------------------------------------- */

typedef enum rr_hl7_ack_code {
  RR_HL7_AA,
  RR_HL7_AE,
  RR_HL7_AR, /* original mode / application level */
  RR_HL7_CA,
  RR_HL7_CE,
  RR_HL7_CR /* enhanced mode, accept level */
} rr_hl7_ack_code_t;

typedef enum rr_hl7_ack_kind {
  RR_HL7_ACCEPT, /* stored / processed */
  RR_HL7_ERROR,  /* message in error (does not parse, fails validation) */
  RR_HL7_REJECT  /* refused (unsupported type, version, processing id) */
} rr_hl7_ack_kind_t;

/* Acknowledgement conditions of MSH-15 / MSH-16 (table 0155). */
typedef enum rr_hl7_ack_condition {
  RR_HL7_ACK_UNSET = 0,
  RR_HL7_ACK_AL,
  RR_HL7_ACK_NE,
  RR_HL7_ACK_ER,
  RR_HL7_ACK_SU
} rr_hl7_ack_condition_t;

typedef struct rr_hl7_ack_mode {
  bool enhanced;                 /* MSH-15 or MSH-16 is valued */
  rr_hl7_ack_condition_t accept; /* MSH-15 */
  rr_hl7_ack_condition_t app;    /* MSH-16 */
} rr_hl7_ack_mode_t;

/* rr_hl7_ack_mode: reads MSH-15/MSH-16 of m (m may be partially parsed). */
rr_hl7_ack_mode_t rr_hl7_ack_mode(const rr_hl7_msg_t *m);
/* rr_hl7_ack_code_for: the acknowledgement code for the first answer to m:
 * AA/AE/AR in original mode, CA/CE/CR in enhanced mode. */
rr_hl7_ack_code_t rr_hl7_ack_code_for(const rr_hl7_msg_t *m, rr_hl7_ack_kind_t kind);
/* rr_hl7_ack_wanted: whether an answer of this code is asked for by the
 * message's MSH-15 (C* codes) or MSH-16 (A* codes in enhanced mode). In
 * original mode always true. */
bool rr_hl7_ack_wanted(const rr_hl7_msg_t *m, rr_hl7_ack_code_t code);
const char *rr_hl7_ack_code_name(rr_hl7_ack_code_t code);

typedef struct rr_hl7_ack_options {
  const char *control_id;       /* MSH-10 of the acknowledgement; required */
  const char *timestamp;        /* MSH-7, e.g. from rr_hl7_ts_format; may be NULL */
  const char *text;             /* optional diagnostic (MSA-3 before v2.5, ERR-8 from v2.5) */
  const rr_hl7_error_t *errors; /* ERR segments, may be NULL */
  size_t nerrors;
} rr_hl7_ack_options_t;

/* rr_hl7_ack_build: appends an ACK for orig to out. orig may be NULL or
 * partially parsed (its header is echoed as far as it is known). The ACK
 * uses orig's delimiters, swaps sender and receiver (MSH-3/4 <-> MSH-5/6),
 * echoes MSH-11, MSH-12 and the trigger event, MSA-2 = orig's MSH-10, and
 * one ERR segment per error, in the layout of orig's HL7 version. */
int rr_hl7_ack_build(const rr_hl7_msg_t *orig, rr_hl7_ack_code_t code,
                     const rr_hl7_ack_options_t *o, rr_buf_t *out);

/* rr_hl7_ts_format: HL7 DTM "YYYYMMDDHHMMSS.sss+ZZZZ" of a UTC time in
 * seconds + milliseconds, expressed at utc_offset_min. out needs 32 bytes. */
void rr_hl7_ts_format(int64_t unix_s, int ms, int utc_offset_min, char out[32]);

/* ---- batches ------------------------------------------------------------ */

typedef struct rr_hl7_batch {
  rr_hl7_slice_t fhs, bhs, bts, fts; /* envelope segments (borrowed), may be empty */
  rr_hl7_slice_t *msgs;              /* owned array of borrowed slices */
  size_t nmsgs;
  long declared_msgs;    /* BTS-1, -1 when absent */
  long declared_batches; /* FTS-1, -1 when absent */
} rr_hl7_batch_t;

/* rr_hl7_batch_split: splits an FHS/BHS...BTS/FTS file (or a plain run of
 * messages) into messages. Slices point into data. A count in BTS-1/FTS-1
 * that disagrees is RR_EPARSE in strict mode. Free with rr_hl7_batch_close. */
int rr_hl7_batch_split(const char *data, size_t len, rr_hl7_mode_t mode, rr_hl7_batch_t *out,
                       rr_hl7_error_t *err);
void rr_hl7_batch_close(rr_hl7_batch_t *b);

typedef struct rr_hl7_batch_header {
  const rr_hl7_delims_t *delims; /* NULL = |^~\& */
  const char *sending_app, *sending_facility;
  const char *receiving_app, *receiving_facility;
  const char *timestamp;
  const char *control_id; /* FHS-11 / BHS-11 */
  bool file;              /* wrap in FHS/FTS as well as BHS/BTS */
} rr_hl7_batch_header_t;

/* rr_hl7_batch_build: appends a batch of the n encoded messages (each with
 * CR terminators) to out, with BTS-1 = n (and FTS-1 = 1). Header values are
 * encoded text (caller escapes). */
int rr_hl7_batch_build(const rr_hl7_batch_header_t *h, const rr_hl7_slice_t *msgs, size_t n,
                       rr_buf_t *out);

/* ---- streaming reader --------------------------------------------------- */

/* rr_hl7_reader: splits a byte stream (a file of messages, a batch) into
 * items as it arrives, in chunks of any size. An item is a message (from an
 * MSH line to the next MSH/FHS/BHS/BTS/FTS line) or one envelope segment. */
typedef enum rr_hl7_item_kind {
  RR_HL7_ITEM_MESSAGE,
  RR_HL7_ITEM_FHS,
  RR_HL7_ITEM_BHS,
  RR_HL7_ITEM_BTS,
  RR_HL7_ITEM_FTS,
  RR_HL7_ITEM_OTHER /* text before the first MSH */
} rr_hl7_item_kind_t;

/* Called once per item; data is borrowed for the call. Return non-zero to
 * stop (the value is passed back from feed/finish). */
typedef int (*rr_hl7_item_cb)(void *ud, rr_hl7_item_kind_t kind, const char *data, size_t len,
                              size_t offset);

typedef struct rr_hl7_reader {
  rr_buf_t buf;  /* pending bytes */
  size_t scan;   /* next offset in buf to examine */
  size_t offset; /* stream offset of buf[0] */
  size_t item_start;
} rr_hl7_reader_t;

/* rr_hl7_reader_init: max_item is the largest item accepted (RR_ELIMIT). */
void rr_hl7_reader_init(rr_hl7_reader_t *r, size_t max_item);
void rr_hl7_reader_close(rr_hl7_reader_t *r);
/* rr_hl7_reader_feed: consumes len bytes, calling cb for every completed
 * item, synchronously. */
int rr_hl7_reader_feed(rr_hl7_reader_t *r, const char *data, size_t len, rr_hl7_item_cb cb,
                       void *ud);
/* rr_hl7_reader_finish: end of stream: emits the last item. */
int rr_hl7_reader_finish(rr_hl7_reader_t *r, rr_hl7_item_cb cb, void *ud);

#endif

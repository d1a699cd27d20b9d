/* Private declarations of the HL7 codec. Only engine/hl7/ includes this. */
#ifndef RR_HL7_INT_H
#define RR_HL7_INT_H

#include <iconv.h>

#include "core/buf.h"
#include "hl7/hl7.h"

/* Zero bytes kept after every text the codec owns (message copy, edits),
 * so such text is always NUL-terminated for C string functions. */
#define HL7_PAD 32

typedef struct fld {
  const char *p; /* into the message copy, or into the edit arena */
  size_t len;
} fld_t;

typedef struct seg {
  char name[4];
  uint32_t nfields; /* entries in fields[], fields[0] is the segment ID */
  uint32_t cap;     /* 0 while fields[] lives in the parse table */
  fld_t *fields;
  const char *raw; /* original encoded text, trusted only while !dirty */
  size_t raw_len;
  size_t offset; /* byte offset of the segment in the input */
  size_t first;  /* index of fields[0] in m->ftab while parsing */
  bool dirty;
} seg_t;

/* Character sets we convert from (values of MSH-18 and of \C..\ escapes). */
typedef enum hl7_cs {
  CS_DEFAULT = 0, /* undeclared: UTF-8 when valid, else ISO 8859-1 */
  CS_ASCII,
  CS_UTF8,
  CS_LATIN1,
  CS_ICONV /* any other: converted with iconv(3) */
} hl7_cs_t;

typedef struct arena_chunk {
  struct arena_chunk *next;
  size_t used, cap;
  max_align_t data[];
} arena_chunk_t;

struct rr_hl7_msg {
  rr_buf_t text; /* copy of the input (unless borrowed), HL7_PAD zero bytes after */
  seg_t *segs;
  size_t nsegs, segcap;
  fld_t *ftab; /* parse table all clean segments point into */
  size_t nf, fcap;
  arena_chunk_t *arena; /* edits; reset on every parse */
  rr_hl7_delims_t d;
  rr_hl7_options_t opt;
  hl7_cs_t cs;
  char cs_name[32];  /* canonical MSH-18 name */
  char cs_iconv[32]; /* iconv name when cs == CS_ICONV */
  iconv_t to_utf8;   /* cached for cs_iconv, (iconv_t)-1 when none */
  iconv_t from_utf8;
  char iconv_for[32]; /* which name the cached handles are for */
};

/* hl7_access.c */
void *hl7_arena_alloc(rr_hl7_msg_t *m, size_t n);
void hl7_arena_reset(rr_hl7_msg_t *m);
bool hl7_is_header(const char *name); /* MSH, FHS, BHS */
/* Encoded text of segment i; builds and caches it when the segment was edited. */
int hl7_segment_text(const rr_hl7_msg_t *m, size_t i, rr_hl7_slice_t *out);

/* hl7_escape.c */
void hl7_charset_setup(rr_hl7_msg_t *m, const char *raw, size_t len);
bool hl7_charset_known(const rr_hl7_msg_t *m);
void hl7_msg_close_iconv(rr_hl7_msg_t *m);

/* hl7_index.c: appends the segments and fields of the ER7 text [base,
 * base+len) to m->segs / m->ftab (segments record their first field's index
 * in ->first; the caller points ->fields into ftab once it stops growing).
 * off0 is base's offset in the input, for error offsets. */
int hl7_index(rr_hl7_msg_t *m, const char *base, size_t len, size_t off0, rr_hl7_error_t *err);
void hl7_index_init(void);
/* hl7_parse.c */
void hl7_fix_fields(rr_hl7_msg_t *m);
bool hl7_segment_id_ok(const char *p, size_t len, bool strict);
void hl7_set_error(rr_hl7_error_t *err, int code, int hl7_code, size_t offset, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

#endif

/* MLLP framing (HL7 v2 Minimal Lower Layer Protocol, release 1).
 *
 * A frame is <start> payload <end1><end2>, by default 0x0B ... 0x1C 0x0D.
 * The deframer is pure: it takes bytes in chunks of any size and reports
 * frames and protocol events through a callback, synchronously. */
#ifndef RR_MLLP_H
#define RR_MLLP_H

#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"

typedef struct rr_mllp_options {
  uint8_t start;    /* 0x0B */
  uint8_t end1;     /* 0x1C */
  uint8_t end2;     /* 0x0D */
  size_t max_frame; /* payload bytes; default 16 MiB */
} rr_mllp_options_t;

typedef enum rr_mllp_event {
  RR_MLLP_FRAME,   /* data/len = the payload (borrowed for the call) */
  RR_MLLP_JUNK,    /* len bytes outside any frame were discarded */
  RR_MLLP_OVERSIZE /* a frame passed max_frame: the stream cannot continue */
} rr_mllp_event_t;

/* offset: stream offset of the frame's start byte (or of the first junk
 * byte). Return non-zero to stop; feed returns that value. */
typedef int (*rr_mllp_cb)(void *ud, rr_mllp_event_t ev, const char *data, size_t len,
                          uint64_t offset);

typedef struct rr_mllp_deframer {
  rr_mllp_options_t opt;
  rr_buf_t frame;       /* payload so far */
  int in_frame;         /* after a start byte */
  int saw_end1;         /* the last payload byte was end1 */
  uint64_t offset;      /* stream offset of the next byte */
  uint64_t frame_start; /* stream offset of the current start byte */
  size_t junk;          /* junk bytes pending report */
  uint64_t junk_start;
  int failed; /* after RR_MLLP_OVERSIZE every feed fails */
} rr_mllp_deframer_t;

/* rr_mllp_options_default: 0x0B/0x1C/0x0D, 16 MiB. */
void rr_mllp_options_default(rr_mllp_options_t *o);
/* rr_mllp_deframer_init: opt may be NULL. No allocation until data comes. */
void rr_mllp_deframer_init(rr_mllp_deframer_t *d, const rr_mllp_options_t *opt);
void rr_mllp_deframer_close(rr_mllp_deframer_t *d);
/* rr_mllp_deframer_feed: consumes len bytes. RR_ELIMIT once a frame has
 * grown past max_frame (after reporting RR_MLLP_OVERSIZE), RR_ENOMEM. */
int rr_mllp_deframer_feed(rr_mllp_deframer_t *d, const char *data, size_t len, rr_mllp_cb cb,
                          void *ud);
/* rr_mllp_deframer_pending: payload bytes of an unfinished frame (0 when
 * between frames); a listener uses it for its in-frame read timeout. */
size_t rr_mllp_deframer_pending(const rr_mllp_deframer_t *d);
int rr_mllp_deframer_in_frame(const rr_mllp_deframer_t *d);

/* rr_mllp_frame: appends start + payload + end1 end2 to out. */
int rr_mllp_frame(const rr_mllp_options_t *opt, const char *payload, size_t len, rr_buf_t *out);

#endif

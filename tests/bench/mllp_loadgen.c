/* rr-loadgen: MLLP load generator on libuv.
 *
 *   rr-loadgen --host 127.0.0.1 --port N [--connections C]
 *              [--seconds S | --messages M] [--rate R] [--window W]
 *              [--message FILE] [--timeout MS] [--id-prefix P] [--interval MS]
 *              [--json]
 *
 * Opens C connections, then on each one sends an HL7 v2 message (FILE, or a
 * built-in ~1 KB ADT^A01 for the fake patient ZZTEST^LOADGEN), each with its
 * own MSH-10 (<prefix>-<conn>-<seq>; the prefix defaults to "LG" plus a tag
 * unique to this run, so a store that recognises duplicates never sees one),
 * and reads the acknowledgement. At most W messages wait for their ACK on a
 * connection (default 1: stop-and-wait, as MLLP senders do). An ACK answers
 * the oldest unanswered message of its connection: MSA-2 must be that
 * message's MSH-10 and MSA-1 AA or CA, otherwise it counts as an error.
 *
 * Closed loop (no --rate): the next message goes out as soon as the window
 * allows; that measures the highest throughput. Open loop (--rate R): R
 * messages per second in total, connection i sending its k-th message at
 * t0 + (k*C + i)/R. A message that cannot go out on time (window full) goes
 * when the window opens, and its latency counts from the scheduled time, so
 * a stall shows in the percentiles instead of hiding (no coordinated
 * omission). Scheduled times are kept with a timerfd (microsecond
 * resolution; Linux only, like the engine).
 *
 * The run ends after S seconds (default 10; the last ACKs are waited for) or
 * after M messages. A connection whose oldest message waits more than
 * --timeout ms (default 30000) for its ACK is closed and its unanswered
 * messages count as timeouts.
 *
 * Prints messages acknowledged, errors, seconds, msgs/s and ACK latency
 * p50/p90/p99/max in ms (log-linear histogram, < 1% bucket error; max is
 * exact), or with --json one JSON object on stdout; --interval MS adds a line
 * per interval on stderr (ACKs and latency of that interval, to spot stalls). Exit status 0 when
 * every message sent got a positive, matching ACK; 1 on any error (negative or mismatched ACK,
 * unparsable ACK, timeout, connection failure); 2 on a usage error. The first few errors are
 * described on stderr.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "core/buf.h"
#include "core/error.h"
#include "hl7/hl7.h"
#include "mllp/mllp.h"

#define MAX_TEMPLATE (64u << 20) /* bytes of a --message file */
#define MAX_ACK (1u << 20)       /* bytes of one ACK frame */
#define MAX_CONNECTIONS 10000u
#define MAX_WINDOW 100000u
#define MAX_ID 48 /* bytes of a generated MSH-10 */
#define ERRORS_SHOWN 5

/* ---- options -------------------------------------------------------------- */

typedef struct options {
  const char *host;
  int port;
  unsigned connections;
  double seconds;    /* 0 when --messages */
  uint64_t messages; /* 0 when --seconds */
  double rate;       /* msgs/s in total; 0 = closed loop */
  unsigned window;
  const char *message_file; /* NULL = built-in ADT^A01 */
  uint64_t timeout_ms;
  uint64_t interval_ms; /* 0 = no progress lines */
  char id_prefix[24];
  bool json;
} options_t;

/* ---- latency histogram ---------------------------------------------------- */

/* Log-linear buckets in nanoseconds (HdrHistogram's layout): values below
 * 2^SUB_BITS are exact, above that each power of two is cut into 2^SUB_BITS
 * buckets, so a bucket is at most 1/128 of its value wide. */
#define SUB_BITS 7
#define SUB_COUNT (1u << SUB_BITS)
#define HIST_BUCKETS (SUB_COUNT + (64 - SUB_BITS) * SUB_COUNT)

typedef struct histogram {
  uint64_t counts[HIST_BUCKETS];
  uint64_t n, max, sum;
} histogram_t;

static unsigned hist_index(uint64_t v) {
  if (v < SUB_COUNT)
    return (unsigned)v;
  unsigned e = 63u - (unsigned)__builtin_clzll(v); /* >= SUB_BITS */
  unsigned sub = (unsigned)(v >> (e - SUB_BITS)) - SUB_COUNT;
  return SUB_COUNT + (e - SUB_BITS) * SUB_COUNT + sub;
}

/* Middle of bucket i. */
static uint64_t hist_value(unsigned i) {
  if (i < SUB_COUNT)
    return i;
  unsigned e = (i - SUB_COUNT) / SUB_COUNT + SUB_BITS;
  uint64_t sub = (i - SUB_COUNT) % SUB_COUNT;
  uint64_t lo = (SUB_COUNT + sub) << (e - SUB_BITS);
  return lo + ((uint64_t)1 << (e - SUB_BITS)) / 2;
}

static void hist_record(histogram_t *h, uint64_t v) {
  h->counts[hist_index(v)]++;
  h->n++;
  h->sum += v;
  if (v > h->max)
    h->max = v;
}

/* The value below which pct percent of the samples lie (0 when empty). */
static uint64_t hist_percentile(const histogram_t *h, double pct) {
  if (h->n == 0)
    return 0;
  uint64_t want = (uint64_t)((double)h->n * pct / 100.0 + 0.999999);
  if (want == 0)
    want = 1;
  uint64_t seen = 0;
  for (unsigned i = 0; i < HIST_BUCKETS; i++) {
    seen += h->counts[i];
    if (seen >= want) {
      uint64_t v = hist_value(i);
      return v > h->max ? h->max : v;
    }
  }
  return h->max;
}

/* ---- run state ------------------------------------------------------------ */

typedef struct sent_msg {
  char id[MAX_ID];
  uint64_t sched_ns; /* latency counts from here */
  uint64_t sent_ns;  /* the ACK timeout counts from here */
} sent_msg_t;

typedef struct run run_t;

typedef struct conn {
  uv_tcp_t tcp;
  uv_connect_t connect_req;
  run_t *run;
  unsigned index;
  rr_mllp_deframer_t df;
  sent_msg_t *ring; /* window slots, oldest at head */
  unsigned head, count;
  uint64_t seq; /* messages sent on this connection */
  int open;     /* handle initialised and not yet closed */
  int connected;
  int closing;
} conn_t;

typedef enum phase { CONNECTING, RUNNING, DRAINING, FINISHED } phase_t;

typedef struct counters {
  uint64_t sent, acked;
  uint64_t negative;    /* MSA-1 neither AA nor CA */
  uint64_t mismatched;  /* MSA-2 is not the oldest unanswered MSH-10, or no message waits */
  uint64_t unparsable;  /* the ACK does not parse, or has no MSA */
  uint64_t timeouts;    /* unanswered after --timeout, or at the end of the drain */
  uint64_t conn_errors; /* connect, read or write failures, peer closed early, junk */
  uint64_t lost;        /* sent, then the connection failed before the ACK */
} counters_t;

struct run {
  uv_loop_t *loop;
  options_t opt;
  char *tmpl; /* the message, CR-terminated segments */
  size_t tmpl_len;
  size_t id_start, id_end; /* MSH-10 in tmpl */
  conn_t *conns;
  unsigned nconnected;
  uv_timer_t deadline; /* end of --seconds (closed loop) */
  uv_timer_t watchdog; /* connect and ACK timeouts */
  uv_timer_t progress; /* --interval lines */
  uv_poll_t tick;      /* timerfd of the open-loop schedule */
  int tfd;
  uint64_t armed_ns; /* timerfd expiry set, 0 = disarmed */
  int handles_open;  /* timers and poll not yet closed */
  phase_t phase;
  uint64_t start_ns, t0, t_end, t_finish;
  uint64_t issued; /* messages counted against --messages (closed loop) */
  counters_t c;
  int errors_shown;
  int fatal; /* the run could not start */
  histogram_t lat;
  histogram_t ilat; /* this --interval */
  uint64_t iacked, ierrors;
  rr_hl7_msg_t *ack;
  rr_hl7_path_t msa1, msa2;
  rr_buf_t out; /* the frame being sent */
};

static uint64_t total_errors(const counters_t *c) {
  return c->negative + c->mismatched + c->unparsable + c->timeouts + c->conn_errors + c->lost;
}

/* Describes one of the first errors on stderr (control characters escaped). */
static void show_error(run_t *r, const conn_t *c, const char *what, const char *data, size_t len) {
  if (r->errors_shown >= ERRORS_SHOWN) {
    if (r->errors_shown++ == ERRORS_SHOWN)
      fprintf(stderr, "rr-loadgen: further errors are only counted\n");
    return;
  }
  r->errors_shown++;
  fprintf(stderr, "rr-loadgen: conn %u: %s", c ? c->index : 0, what);
  if (data) {
    fputs(" ack=\"", stderr);
    size_t n = len > 400 ? 400 : len;
    for (size_t i = 0; i < n; i++) {
      unsigned char ch = (unsigned char)data[i];
      if (ch == '\r')
        fputs("\\r", stderr);
      else if (ch < 0x20 || ch >= 0x7f || ch == '"' || ch == '\\')
        fprintf(stderr, "\\x%02x", ch);
      else
        fputc(ch, stderr);
    }
    fputs(len > n ? "...\"" : "\"", stderr);
  }
  fputc('\n', stderr);
}

/* ---- the message ---------------------------------------------------------- */

/* A ~1 KB ADT^A01 (v2.5.1, original acknowledgement mode) for a patient who
 * does not exist. MSH-10 is replaced in every message. */
static const char builtin_message[] =
    "MSH|^~\\&|RR_LOADGEN|RR_LOADGEN_FAC|RADRELAY|RR_BENCH|20240315083000+0000||ADT^A01^ADT_A01|"
    "LG-TEMPLATE|P|2.5.1\r"
    "EVN|A01|20240315082955+0000|||TECH001^ZZTECH^BETA^^^^^^RR_LOADGEN_FAC|20240315082900+0000\r"
    "PID|1||MRN00099999^^^RR_LOADGEN_FAC&1.3.6.1.4.1.99999.1&ISO^MR~999009999^^^SSA&2.16.840.1."
    "113883.4.1&ISO^SS||ZZTEST^LOADGEN^QUINCY^JR^MR^^L||19700101|M|||100 TEST STREET^APT 1^"
    "TESTVILLE^TS^99999^XX^H||^PRN^PH^^^555^5550100|^WPN^PH^^^555^5550101|ENG^English^ISO639|"
    "S^Single^HL70002||ACC0099999^^^RR_LOADGEN_FAC^AN||||||N||||||N\r"
    "PD1|||RR_LOADGEN_CLINIC^^TC001|PCP001^ZZDOC^GAMMA^^^DR\r"
    "NK1|1|ZZTEST^BETA^^^MRS|SPO^Spouse^HL70063|100 TEST STREET^APT 1^TESTVILLE^TS^99999^XX^H|"
    "^PRN^PH^^^555^5550102||C^Emergency Contact^HL70131\r"
    "PV1|1|I|RAD^XR01^1^RR_LOADGEN_FAC|E|||ATT001^ZZATTEND^EPSILON^^^DR|REF001^ZZREFER^DELTA^^^DR||"
    "RAD||||7||||IP|VN00099999^^^RR_LOADGEN_FAC^VN|||||||||||||||||||||||||20240315080000+0000\r"
    "PV2|||CPE^CHEST PAIN EVALUATION^L\r"
    "AL1|1|DA|ICM01^IODINATED CONTRAST MEDIA^L|SV|HIVES\r"
    "DG1|1||R07.9^Chest pain, unspecified^I10||20240315080000+0000|A\r";

/* Turns LF and CRLF segment ends into CR, drops MLLP framing bytes around
 * the message and makes sure it ends with one CR. Returns the new length. */
static size_t normalize(char *d, size_t n) {
  size_t w = 0;
  size_t i = 0;
  if (n && d[0] == 0x0b)
    i = 1;
  for (; i < n; i++) {
    if (d[i] == '\r' && i + 1 < n && d[i + 1] == '\n')
      continue;
    d[w++] = d[i] == '\n' ? '\r' : d[i];
  }
  while (w && (d[w - 1] == '\r' || d[w - 1] == 0x1c || d[w - 1] == ' '))
    w--;
  d[w++] = '\r';
  return w;
}

/* Loads the template and finds its MSH-10. 0 or -1 (message printed). */
static int load_template(run_t *r) {
  size_t n;
  if (!r->opt.message_file) {
    n = sizeof builtin_message - 1;
    r->tmpl = malloc(n + 1);
    if (!r->tmpl)
      return -1;
    memcpy(r->tmpl, builtin_message, n);
  } else {
    FILE *f = fopen(r->opt.message_file, "rb");
    if (!f) {
      fprintf(stderr, "rr-loadgen: %s: %s\n", r->opt.message_file, strerror(errno));
      return -1;
    }
    r->tmpl = malloc(MAX_TEMPLATE + 1);
    n = r->tmpl ? fread(r->tmpl, 1, MAX_TEMPLATE + 1, f) : 0;
    int bad = ferror(f);
    fclose(f);
    if (!r->tmpl || bad || n > MAX_TEMPLATE || n == 0) {
      fprintf(stderr, "rr-loadgen: %s: %s\n", r->opt.message_file,
              !r->tmpl ? "out of memory"
              : bad    ? "read error"
              : n      ? "larger than 64 MiB"
                       : "empty");
      return -1;
    }
  }
  n = normalize(r->tmpl, n);
  r->tmpl_len = n;
  if (n < 8 || memcmp(r->tmpl, "MSH", 3) != 0) {
    fprintf(stderr, "rr-loadgen: the message must start with MSH\n");
    return -1;
  }
  if (memchr(r->tmpl, 0x0b, n) || memchr(r->tmpl, 0x1c, n)) {
    fprintf(stderr, "rr-loadgen: the message holds MLLP framing bytes (0x0b/0x1c)\n");
    return -1;
  }
  /* MSH-1 is the separator at offset 3 itself; MSH-10 follows the 9th. */
  char sep = r->tmpl[3];
  size_t seen = 0, i = 3;
  for (; i < n && r->tmpl[i] != '\r'; i++) {
    if (r->tmpl[i] == sep && ++seen == 9)
      break;
  }
  if (seen != 9) {
    fprintf(stderr, "rr-loadgen: the message's MSH segment has no MSH-10 field\n");
    return -1;
  }
  r->id_start = i + 1;
  r->id_end = r->id_start;
  while (r->id_end < n && r->tmpl[r->id_end] != sep && r->tmpl[r->id_end] != '\r')
    r->id_end++;
  return 0;
}

/* ---- sending -------------------------------------------------------------- */

typedef struct write_req {
  uv_write_t req;
  conn_t *c;
  char data[];
} write_req_t;

static void conn_close(conn_t *c);
static void maybe_finish(run_t *r);

static void on_write(uv_write_t *req, int status) {
  write_req_t *w = (write_req_t *)req;
  conn_t *c = w->c;
  free(w);
  if (status < 0 && status != UV_ECANCELED && !c->closing) {
    c->run->c.conn_errors++;
    char what[96];
    snprintf(what, sizeof what, "write failed: %s", uv_strerror(status));
    show_error(c->run, c, what, NULL, 0);
    c->run->c.lost += c->count;
    c->count = 0;
    conn_close(c);
    maybe_finish(c->run);
  }
}

/* Sends the next message on c, scheduled for sched_ns (0: now). 0 or a
 * negative code; the caller closes the connection on failure. */
static int send_message(conn_t *c, uint64_t sched_ns) {
  run_t *r = c->run;
  sent_msg_t *m = &c->ring[(c->head + c->count) % r->opt.window];
  int idl = snprintf(m->id, sizeof m->id, "%s-%u-%" PRIu64, r->opt.id_prefix, c->index, c->seq);
  size_t id_len = idl < 0 ? 0 : (size_t)idl;
  rr_buf_t *b = &r->out;
  rr_buf_reset(b);
  int rc = rr_buf_putc(b, 0x0b);
  if (!rc)
    rc = rr_buf_append(b, r->tmpl, r->id_start);
  if (!rc)
    rc = rr_buf_append(b, m->id, id_len);
  if (!rc)
    rc = rr_buf_append(b, r->tmpl + r->id_end, r->tmpl_len - r->id_end);
  if (!rc)
    rc = rr_buf_append(b, "\x1c\r", 2);
  if (rc)
    return rc;
  m->sent_ns = uv_hrtime();
  m->sched_ns = sched_ns ? sched_ns : m->sent_ns;
  uv_buf_t ub = uv_buf_init(b->data, (unsigned)b->len);
  int n = uv_try_write((uv_stream_t *)&c->tcp, &ub, 1);
  if (n == UV_EAGAIN || n == UV_ENOSYS)
    n = 0;
  if (n < 0)
    return n;
  if ((size_t)n < b->len) {
    size_t rest = b->len - (size_t)n;
    write_req_t *w = malloc(sizeof *w + rest);
    if (!w)
      return UV_ENOMEM;
    w->c = c;
    memcpy(w->data, b->data + n, rest);
    uv_buf_t wb = uv_buf_init(w->data, (unsigned)rest);
    rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &wb, 1, on_write);
    if (rc) {
      free(w);
      return rc;
    }
  }
  c->count++;
  c->seq++;
  r->c.sent++;
  return 0;
}

/* Scheduled time of c's next message (open loop). */
static uint64_t next_due(const run_t *r, const conn_t *c) {
  double k = (double)c->seq * r->opt.connections + c->index;
  return r->t0 + (uint64_t)(k * 1e9 / r->opt.rate);
}

/* Whether c will never send again. */
static bool exhausted(const run_t *r, const conn_t *c) {
  if (c->closing || !c->connected)
    return true;
  if (r->opt.rate > 0) {
    uint64_t k = c->seq * r->opt.connections + c->index;
    if (r->opt.messages && k >= r->opt.messages)
      return true;
    return r->opt.seconds > 0 && next_due(r, c) >= r->t_end;
  }
  return r->phase != RUNNING || (r->opt.messages && r->issued >= r->opt.messages);
}

/* Sends on c whatever is due and fits in the window. */
static void pump(conn_t *c) {
  run_t *r = c->run;
  if (r->phase == CONNECTING || r->phase == FINISHED)
    return;
  uint64_t now = r->opt.rate > 0 ? uv_hrtime() : 0;
  while (c->count < r->opt.window && !exhausted(r, c)) {
    uint64_t sched = 0;
    if (r->opt.rate > 0) {
      sched = next_due(r, c);
      if (sched > now)
        break;
    } else {
      r->issued++;
    }
    int rc = send_message(c, sched);
    if (rc) {
      r->c.conn_errors++;
      char what[96];
      snprintf(what, sizeof what, "send failed: %s", rr_strerror(rc));
      show_error(r, c, what, NULL, 0);
      r->c.lost += c->count;
      c->count = 0;
      conn_close(c);
      return;
    }
  }
}

/* Open loop: sets the timerfd to the earliest scheduled time of a
 * connection that is waiting only for its time to come. */
static void arm_schedule(run_t *r) {
  if (r->opt.rate <= 0 || r->phase == FINISHED)
    return;
  uint64_t best = 0;
  for (unsigned i = 0; i < r->opt.connections; i++) {
    conn_t *c = &r->conns[i];
    if (c->count >= r->opt.window || exhausted(r, c))
      continue;
    uint64_t d = next_due(r, c);
    if (best == 0 || d < best)
      best = d;
  }
  if (best == r->armed_ns)
    return;
  struct itimerspec its = {0};
  if (best) {
    its.it_value.tv_sec = (time_t)(best / 1000000000u);
    its.it_value.tv_nsec = (long)(best % 1000000000u);
  }
  timerfd_settime(r->tfd, TFD_TIMER_ABSTIME, &its, NULL);
  r->armed_ns = best;
}

static void on_tick(uv_poll_t *p, int status, int events) {
  run_t *r = p->data;
  (void)status;
  (void)events;
  uint64_t expirations;
  ssize_t n = read(r->tfd, &expirations, sizeof expirations);
  (void)n;
  r->armed_ns = 0; /* a one-shot timer that fired is disarmed */
  for (unsigned i = 0; i < r->opt.connections; i++)
    pump(&r->conns[i]);
  arm_schedule(r);
  maybe_finish(r);
}

/* ---- receiving ------------------------------------------------------------ */

static int slice_is(rr_hl7_slice_t s, const char *v) {
  size_t n = strlen(v);
  return s.len == n && memcmp(s.p, v, n) == 0;
}

/* One ACK frame on c: it answers the oldest unanswered message. */
static void on_ack(conn_t *c, const char *data, size_t len, uint64_t now) {
  run_t *r = c->run;
  if (c->count == 0) {
    r->c.mismatched++;
    show_error(r, c, "ACK while no message waits for one", data, len);
    return;
  }
  sent_msg_t *m = &c->ring[c->head];
  c->head = (c->head + 1) % r->opt.window;
  c->count--;
  rr_hl7_options_t opt;
  rr_hl7_options_default(&opt);
  opt.borrow = true;
  rr_hl7_slice_t code = {0}, id = {0};
  char what[160];
  if (rr_hl7_parse(r->ack, data, len, &opt, NULL) != 0 ||
      rr_hl7_get_raw(r->ack, &r->msa1, &code) != 0 || rr_hl7_get_raw(r->ack, &r->msa2, &id) != 0) {
    r->c.unparsable++;
    snprintf(what, sizeof what, "sent %s: the ACK does not parse or has no MSA", m->id);
    show_error(r, c, what, data, len);
    return;
  }
  if (!slice_is(id, m->id)) {
    r->c.mismatched++;
    snprintf(what, sizeof what, "sent %s: MSA-2 is %.*s", m->id, (int)(id.len > 60 ? 60 : id.len),
             id.p);
    show_error(r, c, what, data, len);
    return;
  }
  if (!slice_is(code, "AA") && !slice_is(code, "CA")) {
    r->c.negative++;
    snprintf(what, sizeof what, "sent %s: MSA-1 is %.*s", m->id, (int)(code.len > 8 ? 8 : code.len),
             code.p);
    show_error(r, c, what, data, len);
    return;
  }
  r->c.acked++;
  uint64_t lat = now > m->sched_ns ? now - m->sched_ns : 0;
  hist_record(&r->lat, lat);
  if (r->opt.interval_ms)
    hist_record(&r->ilat, lat);
}

typedef struct frame_ctx {
  conn_t *c;
  uint64_t now;
} frame_ctx_t;

static int on_frame(void *ud, rr_mllp_event_t ev, const char *data, size_t len, uint64_t off) {
  frame_ctx_t *f = ud;
  run_t *r = f->c->run;
  (void)off;
  if (ev == RR_MLLP_FRAME) {
    on_ack(f->c, data, len, f->now);
  } else if (ev == RR_MLLP_JUNK) {
    r->c.conn_errors++;
    show_error(r, f->c, "bytes outside an MLLP frame", NULL, 0);
  }
  return 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  static char chunk[65536]; /* one loop thread; the deframer copies */
  *buf = uv_buf_init(chunk, sizeof chunk);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  conn_t *c = s->data;
  run_t *r = c->run;
  if (n == 0)
    return;
  if (n < 0) {
    /* The peer closing while we still expect something is an error. */
    if (c->count || !exhausted(r, c)) {
      r->c.conn_errors++;
      r->c.lost += c->count;
      char what[128];
      snprintf(what, sizeof what, "connection %s with %u message(s) unanswered",
               n == UV_EOF ? "closed by the peer" : uv_strerror((int)n), c->count);
      show_error(r, c, what, NULL, 0);
      c->count = 0;
    }
    conn_close(c);
    maybe_finish(r);
    return;
  }
  frame_ctx_t f = {c, uv_hrtime()};
  int rc = rr_mllp_deframer_feed(&c->df, buf->base, (size_t)n, on_frame, &f);
  if (rc) {
    r->c.conn_errors++;
    r->c.lost += c->count;
    c->count = 0;
    show_error(r, c, rc == RR_ELIMIT ? "ACK frame larger than 1 MiB" : rr_strerror(rc), NULL, 0);
    conn_close(c);
  }
  if (!c->closing)
    pump(c);
  arm_schedule(r);
  maybe_finish(r);
}

/* ---- lifecycle ------------------------------------------------------------ */

static void on_conn_closed(uv_handle_t *h) {
  conn_t *c = h->data;
  c->open = 0;
}

static void conn_close(conn_t *c) {
  if (c->closing || !c->open)
    return;
  c->closing = 1;
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void on_run_handle_closed(uv_handle_t *h) {
  run_t *r = h->data;
  r->handles_open--;
}

/* Ends the run: everything still unanswered is a timeout. */
static void finish(run_t *r) {
  if (r->phase == FINISHED)
    return;
  r->phase = FINISHED;
  r->t_finish = uv_hrtime();
  for (unsigned i = 0; i < r->opt.connections; i++) {
    conn_t *c = &r->conns[i];
    r->c.timeouts += c->count;
    c->count = 0;
    conn_close(c);
  }
  uv_close((uv_handle_t *)&r->deadline, on_run_handle_closed);
  uv_close((uv_handle_t *)&r->progress, on_run_handle_closed);
  uv_close((uv_handle_t *)&r->watchdog, on_run_handle_closed);
  uv_close((uv_handle_t *)&r->tick, on_run_handle_closed);
}

/* Finishes once no connection has anything left to send or to wait for. */
static void maybe_finish(run_t *r) {
  if (r->phase != RUNNING && r->phase != DRAINING)
    return;
  for (unsigned i = 0; i < r->opt.connections; i++) {
    conn_t *c = &r->conns[i];
    if (!c->closing && (c->count || !exhausted(r, c)))
      return;
  }
  finish(r);
}

static void on_deadline(uv_timer_t *t) {
  run_t *r = t->data;
  if (r->phase == RUNNING)
    r->phase = DRAINING;
  maybe_finish(r);
}

static double ms(uint64_t ns) {
  return (double)ns / 1e6;
}

static void on_progress(uv_timer_t *t) {
  run_t *r = t->data;
  uint64_t now = uv_hrtime();
  const histogram_t *h = &r->ilat;
  uint64_t errors = total_errors(&r->c);
  fprintf(stderr,
          "rr-loadgen: t=%.2f s  acked %" PRIu64 " (%.0f/s)  errors %" PRIu64
          "  latency ms p50 %.3f p99 %.3f max %.3f\n",
          (double)(now - r->t0) / 1e9, r->c.acked - r->iacked,
          (double)(r->c.acked - r->iacked) * 1000.0 / (double)r->opt.interval_ms,
          errors - r->ierrors, ms(hist_percentile(h, 50)), ms(hist_percentile(h, 99)), ms(h->max));
  r->iacked = r->c.acked;
  r->ierrors = errors;
  memset(&r->ilat, 0, sizeof r->ilat);
}

static void start(run_t *r) {
  r->phase = RUNNING;
  r->t0 = uv_hrtime();
  if (r->opt.seconds > 0) {
    r->t_end = r->t0 + (uint64_t)(r->opt.seconds * 1e9);
    if (r->opt.rate <= 0)
      uv_timer_start(&r->deadline, on_deadline, (uint64_t)(r->opt.seconds * 1000.0 + 0.5), 0);
  }
  if (r->opt.interval_ms)
    uv_timer_start(&r->progress, on_progress, r->opt.interval_ms, r->opt.interval_ms);
  for (unsigned i = 0; i < r->opt.connections; i++)
    pump(&r->conns[i]);
  arm_schedule(r);
  maybe_finish(r);
}

static void on_watchdog(uv_timer_t *t) {
  run_t *r = t->data;
  uint64_t now = uv_hrtime();
  uint64_t limit = r->opt.timeout_ms * 1000000u;
  if (r->phase == CONNECTING) {
    if (now - r->start_ns > limit) {
      fprintf(stderr, "rr-loadgen: %u of %u connections established after %" PRIu64 " ms\n",
              r->nconnected, r->opt.connections, r->opt.timeout_ms);
      r->fatal = 1;
      r->phase = RUNNING; /* so that finish() closes everything */
      finish(r);
    }
    return;
  }
  for (unsigned i = 0; i < r->opt.connections; i++) {
    conn_t *c = &r->conns[i];
    if (c->closing || c->count == 0)
      continue;
    const sent_msg_t *m = &c->ring[c->head];
    if (now - m->sent_ns > limit) {
      char what[160];
      snprintf(what, sizeof what, "no ACK for %s after %" PRIu64 " ms (%u message(s) unanswered)",
               m->id, r->opt.timeout_ms, c->count);
      show_error(r, c, what, NULL, 0);
      r->c.timeouts += c->count;
      c->count = 0;
      conn_close(c);
    }
  }
  arm_schedule(r);
  maybe_finish(r);
}

static void on_connect(uv_connect_t *req, int status) {
  conn_t *c = req->data;
  run_t *r = c->run;
  if (r->phase != CONNECTING)
    return;
  if (status < 0) {
    fprintf(stderr, "rr-loadgen: connection %u to %s:%d failed: %s\n", c->index, r->opt.host,
            r->opt.port, uv_strerror(status));
    r->c.conn_errors++;
    r->fatal = 1;
    r->phase = RUNNING;
    finish(r);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc) {
    fprintf(stderr, "rr-loadgen: connection %u: %s\n", c->index, uv_strerror(rc));
    r->c.conn_errors++;
    r->fatal = 1;
    r->phase = RUNNING;
    finish(r);
    return;
  }
  c->connected = 1;
  if (++r->nconnected == r->opt.connections)
    start(r);
}

/* ---- command line and report ---------------------------------------------- */

static void usage(FILE *f) {
  fputs("usage: rr-loadgen --host HOST --port N [--connections C] [--seconds S | --messages M]\n"
        "                  [--rate R] [--window W] [--message FILE] [--timeout MS]\n"
        "                  [--id-prefix P] [--interval MS] [--json]\n"
        "  --connections C  connections, each sending its own stream (default 1)\n"
        "  --seconds S      send for S seconds, then wait for the last ACKs (default 10)\n"
        "  --messages M     send M messages in total instead\n"
        "  --rate R         open loop: R msgs/s in total on a fixed schedule; latency counts\n"
        "                   from the scheduled time (default: closed loop, as fast as ACKs come)\n"
        "  --window W       messages awaiting their ACK per connection (default 1)\n"
        "  --message FILE   HL7 v2 message to send; its MSH-10 is replaced in every copy\n"
        "                   (default: a built-in ~1 KB ADT^A01 for the fake patient ZZTEST)\n"
        "  --timeout MS     longest wait for a connection or an ACK (default 30000)\n"
        "  --id-prefix P    MSH-10 is P-<conn>-<seq> (default LG<run tag>)\n"
        "  --interval MS    print ACKs and latency of every MS ms on stderr\n"
        "  --json           print one JSON object instead of text\n"
        "Exit status: 0 all ACKs positive and matching, 1 any error, 2 usage.\n",
        f);
}

static int parse_u64(const char *s, uint64_t lo, uint64_t hi, uint64_t *out) {
  if (!s || !*s || *s == '-')
    return -1;
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || *end || v < lo || v > hi)
    return -1;
  *out = v;
  return 0;
}

static int parse_double(const char *s, double lo, double hi, double *out) {
  if (!s || !*s)
    return -1;
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || *end || !(v >= lo && v <= hi))
    return -1;
  *out = v;
  return 0;
}

/* 0, or 2 after printing why. */
static int parse_args(int argc, char **argv, options_t *o) {
  memset(o, 0, sizeof *o);
  o->host = "127.0.0.1";
  o->connections = 1;
  o->window = 1;
  o->timeout_ms = 30000;
  bool have_seconds = false, have_port = false;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    uint64_t u;
    int bad = 0;
    if (strcmp(a, "--json") == 0) {
      o->json = true;
      continue;
    }
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      exit(0);
    }
    if (!v) {
      fprintf(stderr, "rr-loadgen: %s needs a value (or is unknown)\n", a);
      return 2;
    }
    i++;
    if (strcmp(a, "--host") == 0) {
      o->host = v;
    } else if (strcmp(a, "--port") == 0) {
      bad = parse_u64(v, 1, 65535, &u);
      o->port = (int)u;
      have_port = !bad;
    } else if (strcmp(a, "--connections") == 0) {
      bad = parse_u64(v, 1, MAX_CONNECTIONS, &u);
      o->connections = (unsigned)u;
    } else if (strcmp(a, "--seconds") == 0) {
      bad = parse_double(v, 0.001, 1e6, &o->seconds);
      have_seconds = true;
    } else if (strcmp(a, "--messages") == 0) {
      bad = parse_u64(v, 1, UINT64_MAX / 2, &o->messages);
    } else if (strcmp(a, "--rate") == 0) {
      bad = parse_double(v, 0.001, 1e9, &o->rate);
    } else if (strcmp(a, "--window") == 0) {
      bad = parse_u64(v, 1, MAX_WINDOW, &u);
      o->window = (unsigned)u;
    } else if (strcmp(a, "--message") == 0) {
      o->message_file = v;
    } else if (strcmp(a, "--timeout") == 0) {
      bad = parse_u64(v, 1, 86400000, &o->timeout_ms);
    } else if (strcmp(a, "--interval") == 0) {
      bad = parse_u64(v, 1, 86400000, &o->interval_ms);
    } else if (strcmp(a, "--id-prefix") == 0) {
      bad = strlen(v) == 0 || strlen(v) >= sizeof o->id_prefix ||
            strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") !=
                strlen(v);
      if (!bad)
        snprintf(o->id_prefix, sizeof o->id_prefix, "%s", v);
    } else {
      fprintf(stderr, "rr-loadgen: unknown option %s\n", a);
      usage(stderr);
      return 2;
    }
    if (bad) {
      fprintf(stderr, "rr-loadgen: bad value for %s: '%s'\n", a, v);
      return 2;
    }
  }
  if (!have_port) {
    fprintf(stderr, "rr-loadgen: --port is required\n");
    usage(stderr);
    return 2;
  }
  if (have_seconds && o->messages) {
    fprintf(stderr, "rr-loadgen: give --seconds or --messages, not both\n");
    return 2;
  }
  if (!have_seconds && !o->messages)
    o->seconds = 10;
  if (!o->id_prefix[0]) {
    /* Unique per run, so repeated runs against one store never reuse an id. */
    struct timeval tv;
    gettimeofday(&tv, NULL);
    uint64_t tag = ((uint64_t)tv.tv_sec * 1000u + (uint64_t)tv.tv_usec / 1000u) * 1000u +
                   (uint64_t)getpid() % 1000u;
    snprintf(o->id_prefix, sizeof o->id_prefix, "LG%" PRIX64, tag);
  }
  return 0;
}

static void report(const run_t *r) {
  const counters_t *c = &r->c;
  uint64_t errors = total_errors(c);
  double secs = r->t0 && r->t_finish > r->t0 ? (double)(r->t_finish - r->t0) / 1e9 : 0;
  double rate = secs > 0 ? (double)c->acked / secs : 0;
  const histogram_t *h = &r->lat;
  double mean = h->n ? (double)h->sum / (double)h->n : 0;
  if (r->opt.json) {
    printf("{\"host\":\"%s\",\"port\":%d,\"connections\":%u,\"window\":%u,", r->opt.host,
           r->opt.port, r->opt.connections, r->opt.window);
    if (r->opt.rate > 0)
      printf("\"mode\":\"open\",\"target_rate\":%.3f,", r->opt.rate);
    else
      printf("\"mode\":\"closed\",\"target_rate\":null,");
    printf("\"message_bytes\":%zu,\"sent\":%" PRIu64 ",\"acked\":%" PRIu64 ",\"errors\":%" PRIu64
           ",\"negative\":%" PRIu64 ",\"mismatched\":%" PRIu64 ",\"unparsable\":%" PRIu64
           ",\"timeouts\":%" PRIu64 ",\"connection_errors\":%" PRIu64 ",\"lost\":%" PRIu64 ",",
           r->out.len > 3 ? r->out.len - 3 : r->tmpl_len, c->sent, c->acked, errors, c->negative,
           c->mismatched, c->unparsable, c->timeouts, c->conn_errors, c->lost);
    printf("\"seconds\":%.3f,\"msgs_per_s\":%.1f,\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,"
           "\"p99\":%.3f,\"max\":%.3f,\"mean\":%.3f},\"id_prefix\":\"%s\"}\n",
           secs, rate, ms(hist_percentile(h, 50)), ms(hist_percentile(h, 90)),
           ms(hist_percentile(h, 99)), ms(h->max), mean / 1e6, r->opt.id_prefix);
    return;
  }
  printf("rr-loadgen %s:%d  connections %u  window %u  ", r->opt.host, r->opt.port,
         r->opt.connections, r->opt.window);
  if (r->opt.rate > 0)
    printf("open loop at %.0f msgs/s\n", r->opt.rate);
  else
    printf("closed loop\n");
  printf("acknowledged %" PRIu64 "  errors %" PRIu64 "  seconds %.3f  msgs/s %.1f\n", c->acked,
         errors, secs, rate);
  if (errors)
    printf("errors: negative %" PRIu64 ", mismatched %" PRIu64 ", unparsable %" PRIu64
           ", timeouts %" PRIu64 ", connection %" PRIu64 ", lost %" PRIu64 "\n",
           c->negative, c->mismatched, c->unparsable, c->timeouts, c->conn_errors, c->lost);
  printf("ack latency ms  p50 %.3f  p90 %.3f  p99 %.3f  max %.3f%s\n", ms(hist_percentile(h, 50)),
         ms(hist_percentile(h, 90)), ms(hist_percentile(h, 99)), ms(h->max),
         r->opt.rate > 0 ? "  (from the scheduled send time)" : "");
}

/* Resolves host:port (synchronously; before the loop runs). */
static int resolve(uv_loop_t *loop, const options_t *o, struct sockaddr_storage *ss) {
  uv_getaddrinfo_t req;
  struct addrinfo hints = {0};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  char port[8];
  snprintf(port, sizeof port, "%d", o->port);
  int rc = uv_getaddrinfo(loop, &req, NULL, o->host, port, &hints);
  if (rc)
    return rc;
  memcpy(ss, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
  uv_freeaddrinfo(req.addrinfo);
  return 0;
}

int main(int argc, char **argv) {
  static run_t run; /* large (the histogram): not on the stack */
  run_t *r = &run;
  int status = 1;
  int rc = parse_args(argc, argv, &r->opt);
  if (rc)
    return rc;
  signal(SIGPIPE, SIG_IGN);
  uv_loop_t loop;
  uv_loop_init(&loop);
  r->loop = &loop;
  r->tfd = -1;
  rr_buf_init(&r->out, MAX_TEMPLATE + 256);
  r->ack = rr_hl7_msg_new();
  r->conns = calloc(r->opt.connections, sizeof *r->conns);
  if (!r->ack || !r->conns) {
    fprintf(stderr, "rr-loadgen: out of memory\n");
    goto out;
  }
  rr_hl7_path_parse("MSA-1", 5, &r->msa1);
  rr_hl7_path_parse("MSA-2", 5, &r->msa2);
  if (load_template(r) != 0)
    goto out;
  struct sockaddr_storage addr;
  if ((rc = resolve(&loop, &r->opt, &addr)) != 0) {
    fprintf(stderr, "rr-loadgen: %s: %s\n", r->opt.host, uv_strerror(rc));
    goto out;
  }
  r->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (r->tfd < 0) {
    fprintf(stderr, "rr-loadgen: timerfd_create: %s\n", strerror(errno));
    goto out;
  }
  uv_timer_init(&loop, &r->deadline);
  uv_timer_init(&loop, &r->watchdog);
  uv_timer_init(&loop, &r->progress);
  uv_poll_init(&loop, &r->tick, r->tfd);
  r->deadline.data = r->watchdog.data = r->progress.data = r->tick.data = r;
  r->handles_open = 4;
  uv_poll_start(&r->tick, UV_READABLE, on_tick);
  uv_timer_start(&r->watchdog, on_watchdog, 100, 100);

  rr_mllp_options_t fo;
  rr_mllp_options_default(&fo);
  fo.max_frame = MAX_ACK;
  r->phase = CONNECTING;
  r->start_ns = uv_hrtime();
  for (unsigned i = 0; i < r->opt.connections && r->phase == CONNECTING; i++) {
    conn_t *c = &r->conns[i];
    c->run = r;
    c->index = i;
    rr_mllp_deframer_init(&c->df, &fo);
    c->ring = calloc(r->opt.window, sizeof *c->ring);
    if (!c->ring || uv_tcp_init(&loop, &c->tcp) != 0) {
      fprintf(stderr, "rr-loadgen: out of memory\n");
      r->fatal = 1;
      r->phase = RUNNING;
      finish(r);
      break;
    }
    c->open = 1;
    c->tcp.data = c;
    c->connect_req.data = c;
    rc = uv_tcp_connect(&c->connect_req, &c->tcp, (struct sockaddr *)&addr, on_connect);
    if (rc) {
      fprintf(stderr, "rr-loadgen: connect: %s\n", uv_strerror(rc));
      r->fatal = 1;
      r->phase = RUNNING;
      finish(r);
    }
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  if (!r->fatal) {
    report(r);
    status = total_errors(&r->c) == 0 && r->c.acked > 0 ? 0 : 1;
  }
out:
  if (r->conns) {
    for (unsigned i = 0; i < r->opt.connections; i++) {
      rr_mllp_deframer_close(&r->conns[i].df);
      free(r->conns[i].ring);
    }
  }
  free(r->conns);
  free(r->tmpl);
  rr_hl7_msg_free(r->ack);
  rr_buf_close(&r->out);
  if (r->tfd >= 0)
    close(r->tfd);
  uv_loop_close(&loop);
  return status;
}

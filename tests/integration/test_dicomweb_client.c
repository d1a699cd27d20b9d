/* Tests of the DICOMweb client (engine/dicomweb/client.c): first its pure
 * parts on crafted input (DICOM JSON, Part 10 meta headers), then the
 * client against a PACS we did not write: a private Orthanc with its
 * DICOMweb plugin (tests/integration/peers/orthanc.py, run as a command),
 * fed with synthetic CT studies from scripts/make-study.
 *
 *   test_dicomweb_client PYTHON ORTHANC_PY DICOMWEB_PEER_PY MAKE_STUDY
 *
 * Between the two, a scripted server (peers/dicomweb_peer.py) gives the
 * answers Orthanc does not: STOW-RS 409/202, malformed and truncated
 * bodies, 5xx.
 * Exits 77 (skipped) when Orthanc, its DICOMweb plugin or pydicom are
 * missing, after the crafted-input checks have passed. Everything runs on
 * one libuv loop: the clients, the Orthanc process (uv_spawn; its stdout
 * gives the JSON line with its ports; closing its stdin stops it) and the
 * waits, which are conditions with deadlines, never sleeps.
 * $RR_TEST_VERBOSE=1 shows the client's debug log. $RR_DICOMWEB_BIG_SLICES
 * sets the size of the large study (default 200 slices of 512 x 512, about
 * 100 MB). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "core/log.h"
#include "dicomweb/client.h"
#include "rr_test.h"

#define SKIP 77

static uv_loop_t loop;
static char dir[256];
static const char *python, *orthanc_py, *make_study;

/* ---- waiting ------------------------------------------------------------ */

static uv_timer_t deadline_timer;
static void on_deadline(uv_timer_t *t) {
  (void)t;
}

static uint64_t now_ms(void) {
  return uv_hrtime() / 1000000u;
}

/* Completion callbacks call uv_stop: one that runs from a timer at the
 * start of an iteration would otherwise leave that iteration blocking in
 * its I/O poll until the deadline. */
#define WAIT_UNTIL(cond, ms)                                                                       \
  ({                                                                                               \
    uint64_t dl_ = now_ms() + (ms);                                                                \
    uv_timer_start(&deadline_timer, on_deadline, (ms), 0);                                         \
    while (!(cond) && now_ms() < dl_)                                                              \
      uv_run(&loop, UV_RUN_ONCE);                                                                  \
    uv_timer_stop(&deadline_timer);                                                                \
    int ok_ = (cond) ? 1 : 0;                                                                      \
    if (!ok_)                                                                                      \
      fprintf(stderr, "%s:%d: timed out after %d ms waiting for %s\n", __FILE__, __LINE__,         \
              (int)(ms), #cond);                                                                   \
    ok_;                                                                                           \
  })

/* ---- crafted input: DICOM JSON -------------------------------------------- */

static int parse(const char *json, rr_dicomweb_result_t **r, char *msg, size_t cap) {
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  *r = NULL;
  int rc = rr_dicomweb_parse_datasets(json, strlen(json), 100, r, &err);
  snprintf(msg, cap, "%s", err.data ? err.data : "");
  rr_buf_close(&err);
  return rc;
}

static void test_json_good(void) {
  const char *json =
      "[{\"0020000D\":{\"vr\":\"UI\",\"Value\":[\"1.2.3\"]},"
      "\"00100010\":{\"vr\":\"PN\",\"Value\":[{\"Alphabetic\":\"ZZTEST^ONE\","
      "\"Ideographic\":\"X\"}]},"
      "\"00100020\":{\"vr\":\"LO\",\"Value\":[\"RRTEST-PAT-9\"]},"
      "\"00080050\":{\"vr\":\"SH\"},"                           /* no Value: empty */
      "\"00080061\":{\"vr\":\"CS\",\"Value\":[\"CT\",\"SR\"]}," /* multi-valued */
      "\"00080020\":{\"vr\":\"DA\",\"Value\":[\"20261127\"]},"
      "\"00201206\":{\"vr\":\"IS\",\"Value\":[2]},"       /* IS as a number */
      "\"00201208\":{\"vr\":\"IS\",\"Value\":[\"17 \"]}," /* IS as a string */
      "\"00081030\":{\"vr\":\"LO\",\"Value\":[null]},"
      "\"7FE00010\":{\"vr\":\"OW\",\"BulkDataURI\":\"http://x/bulk\"},"
      "\"00081199\":{\"vr\":\"SQ\",\"Value\":[{\"00081155\":{\"vr\":\"UI\",\"Value\":[\"1.2\"]}}]}"
      "},{}]";
  rr_dicomweb_result_t *r;
  char msg[512];
  CHECK_EQ_INT(parse(json, &r, msg, sizeof msg), 0);
  if (!r)
    return;
  CHECK_EQ_INT(r->n, 2);
  const rr_dicomweb_match_t *m = &r->matches[0];
  CHECK(m->study_uid && strcmp(m->study_uid, "1.2.3") == 0);
  CHECK(m->patient_name && strcmp(m->patient_name, "ZZTEST^ONE") == 0);
  CHECK(m->patient_id && strcmp(m->patient_id, "RRTEST-PAT-9") == 0);
  CHECK(m->accession_number == NULL);
  CHECK(m->modalities && strcmp(m->modalities, "CT\\SR") == 0);
  CHECK(m->study_date && strcmp(m->study_date, "20261127") == 0);
  CHECK(m->study_description == NULL);
  CHECK_EQ_INT(m->study_series, 2);
  CHECK_EQ_INT(m->study_instances, 17);
  CHECK_EQ_INT(m->series_instances, -1);
  CHECK(m->json == json_array_get(r->json, 0));
  CHECK(r->matches[1].study_uid == NULL && r->matches[1].study_series == -1);
  rr_dicomweb_result_free(r);

  CHECK_EQ_INT(parse("[]", &r, msg, sizeof msg), 0);
  CHECK(r && r->n == 0);
  rr_dicomweb_result_free(r);
}

static void test_json_bad(void) {
  static const struct {
    const char *json;
    int rc;
    const char *want; /* in the message */
  } cases[] = {
      {"[{\"0020000D\":{\"vr\":\"UI\",\"Value\":[\"1.2\"]}", RR_EPARSE, "at byte 40"},
      {"[{\"0020000D\" \"x\"}]", RR_EPARSE, "at byte 16"},
      {"", RR_EPARSE, "at byte 0"},
      {"{}", RR_EPARSE, "not an array"},
      {"[1]", RR_EPARSE, "dataset 0 is not an object"},
      {"[{},{\"PatientID\":{\"vr\":\"LO\"}}]", RR_EPARSE, "dataset 1 has a key that is not a tag"},
      {"[{\"00100020\":\"RRTEST\"}]", RR_EPARSE, "00100020 is not an object"},
      {"[{\"00100020\":{\"Value\":[\"A\"]}}]", RR_EPARSE, "00100020 has no valid \"vr\""},
      {"[{\"00100020\":{\"vr\":\"LO\",\"Value\":\"A\"}}]", RR_EPARSE, "not an array"},
      {"[{\"00100010\":{\"vr\":\"PN\",\"Value\":[7]}}]", RR_EPARSE, "00100010 has a person name"},
      {"[{\"00100010\":{\"vr\":\"PN\",\"Value\":[{\"Alphabetic\":1}]}}]", RR_EPARSE,
       "person name group"},
      {"[{\"00201208\":{\"vr\":\"IS\",\"Value\":[[1]]}}]", RR_EPARSE, "numeric value"},
      {"[{\"00081199\":{\"vr\":\"SQ\",\"Value\":[{\"00081155\":{\"vr\":\"UI\",\"Value\":[{}]}}]}}]",
       RR_EPARSE, "00081155 has a value that is not a string"},
      {"[{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},"
       "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},"
       "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},"
       "{},{},{},{},{},{},{},{},{},{},{}]",
       RR_ELIMIT, "over the limit of 100"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    rr_dicomweb_result_t *r;
    char msg[512];
    int rc = parse(cases[i].json, &r, msg, sizeof msg);
    CHECK_EQ_INT(rc, cases[i].rc);
    CHECK(r == NULL);
    if (!strstr(msg, cases[i].want)) {
      CHECK(!"message");
      fprintf(stderr, "  case %zu: message \"%s\" lacks \"%s\"\n", i, msg, cases[i].want);
    }
    CHECK(!strstr(msg, "RRTEST")); /* no values in messages */
  }
}

static void test_json_accessors(void) {
  json_t *ds = json_loads("{\"00100010\":{\"vr\":\"PN\",\"Value\":[\"ZZTEST^PLAIN\",{}]},"
                          "\"00200013\":{\"vr\":\"IS\",\"Value\":[\"12\",\"x\"]},"
                          "\"0020000d\":{\"vr\":\"UI\",\"Value\":[\"9.8\"]}}",
                          0, NULL);
  CHECK(ds != NULL);
  if (!ds)
    return;
  double d = 0;
  CHECK(strcmp(rr_dicomweb_json_string(ds, 0x00100010u, 0), "ZZTEST^PLAIN") == 0);
  CHECK(rr_dicomweb_json_string(ds, 0x00100010u, 1) == NULL); /* PN with no Alphabetic */
  CHECK(rr_dicomweb_json_string(ds, 0x00100010u, 2) == NULL);
  CHECK(strcmp(rr_dicomweb_json_string(ds, 0x0020000Du, 0), "9.8") == 0); /* lower-case key */
  CHECK_EQ_INT(rr_dicomweb_json_number(ds, 0x00200013u, 0, &d), 0);
  CHECK(d == 12.0);
  CHECK_EQ_INT(rr_dicomweb_json_number(ds, 0x00200013u, 1, &d), RR_ENOTFOUND);
  CHECK_EQ_INT(rr_dicomweb_json_number(ds, 0x00200011u, 0, &d), RR_ENOTFOUND);
  json_decref(ds);
}

/* ---- crafted input: Part 10 meta header ------------------------------------- */

static size_t put_elem(unsigned char *p, unsigned elem, const char *vr, const char *v, size_t n) {
  size_t k = 0;
  p[k++] = 0x02;
  p[k++] = 0x00;
  p[k++] = (unsigned char)(elem & 0xff);
  p[k++] = (unsigned char)(elem >> 8);
  p[k++] = (unsigned char)vr[0];
  p[k++] = (unsigned char)vr[1];
  if (strcmp(vr, "OB") == 0) {
    p[k++] = 0;
    p[k++] = 0;
    p[k++] = (unsigned char)(n & 0xff);
    p[k++] = (unsigned char)(n >> 8);
    p[k++] = 0;
    p[k++] = 0;
  } else {
    p[k++] = (unsigned char)(n & 0xff);
    p[k++] = (unsigned char)(n >> 8);
  }
  memcpy(p + k, v, n);
  return k + n;
}

static void test_part10(void) {
  unsigned char f[512];
  char uid[65];
  memset(f, 0, sizeof f);
  memcpy(f + 128, "DICM", 4);
  size_t n = 132;
  n += put_elem(f + n, 0x0000, "UL", "\x30\0\0\0", 4);
  n += put_elem(f + n, 0x0001, "OB", "\0\1", 2);
  n += put_elem(f + n, 0x0002, "UI", "1.2.840.10008.5.1.4.1.1.2\0", 26);
  size_t at3 = n;
  n += put_elem(f + n, 0x0003, "UI", "2.25.1234\0", 10);
  n += put_elem(f + n, 0x0010, "UI", "1.2.840.10008.1.2.1\0", 20);
  CHECK_EQ_INT(rr_dicomweb_part10_sop_uid(f, n, uid, sizeof uid), 0);
  CHECK(strcmp(uid, "2.25.1234") == 0);
  /* Every shorter prefix asks for more bytes, never misreads. */
  int all_again = 1;
  for (size_t k = 0; k < at3 + 18; k++)
    if (rr_dicomweb_part10_sop_uid(f, k, uid, sizeof uid) != RR_EAGAIN)
      all_again = 0;
  CHECK(all_again);
  CHECK_EQ_INT(rr_dicomweb_part10_sop_uid(f, n, uid, 5), RR_ELIMIT);
  /* A UID with a '/' would escape the directory. */
  unsigned char g[512];
  memcpy(g, f, sizeof g);
  g[at3 + 8 + 4] = '/';
  CHECK_EQ_INT(rr_dicomweb_part10_sop_uid(g, n, uid, sizeof uid), RR_EPARSE);
  memcpy(g, f, sizeof g);
  memcpy(g + 128, "DICX", 4);
  CHECK_EQ_INT(rr_dicomweb_part10_sop_uid(g, n, uid, sizeof uid), RR_EPARSE);
  /* No (0002,0003): the meta group ends, or a later element comes first. */
  memcpy(g, f, sizeof g);
  g[at3 + 2] = 0x12;
  CHECK_EQ_INT(rr_dicomweb_part10_sop_uid(g, n, uid, sizeof uid), RR_EPARSE);
  memcpy(g, f, sizeof g);
  g[at3] = 0x08;
  CHECK_EQ_INT(rr_dicomweb_part10_sop_uid(g, n, uid, sizeof uid), RR_EPARSE);
}

/* ---- the Orthanc process ------------------------------------------------------ */

typedef struct proc {
  uv_process_t proc;
  uv_pipe_t in, out;
  int open_handles;
  int exited;
  int64_t exit_status;
  char line[4096];
  size_t line_len;
  int have_line;
} proc_t;

static proc_t pacs;
static json_t *pacs_info;

static void proc_handle_closed(uv_handle_t *h) {
  proc_t *p = h->data;
  p->open_handles--;
}

static void proc_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
  static char buf[4096];
  (void)h;
  (void)sz;
  b->base = buf;
  b->len = sizeof buf;
}

static void proc_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  proc_t *p = st->data;
  if (n < 0) {
    if (!uv_is_closing((uv_handle_t *)st))
      uv_close((uv_handle_t *)st, proc_handle_closed);
    return;
  }
  for (ssize_t i = 0; i < n && !p->have_line; i++) {
    if (b->base[i] == '\n') {
      p->line[p->line_len] = '\0';
      p->have_line = 1;
    } else if (p->line_len + 1 < sizeof p->line) {
      p->line[p->line_len++] = b->base[i];
    }
  }
}

static void proc_exit(uv_process_t *proc, int64_t status, int sig) {
  proc_t *p = proc->data;
  (void)sig;
  uv_stop(&loop);
  p->exited = 1;
  p->exit_status = status;
  uv_close((uv_handle_t *)proc, proc_handle_closed);
}

/* Starts args[0] with pipes on stdin and stdout; waits for its first
 * stdout line (p->line). */
static int proc_start(proc_t *p, char **args, uint64_t wait_ms) {
  uv_stdio_container_t io[3];
  uv_pipe_init(&loop, &p->in, 0);
  uv_pipe_init(&loop, &p->out, 0);
  p->in.data = p->out.data = p->proc.data = p;
  p->open_handles = 2;
  io[0].flags = UV_CREATE_PIPE | UV_READABLE_PIPE;
  io[0].data.stream = (uv_stream_t *)&p->in;
  io[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  io[1].data.stream = (uv_stream_t *)&p->out;
  io[2].flags = UV_INHERIT_FD;
  io[2].data.fd = 2;
  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.file = python;
  o.args = args;
  o.exit_cb = proc_exit;
  o.stdio = io;
  o.stdio_count = 3;
  int rc = uv_spawn(&loop, &p->proc, &o);
  if (rc) {
    fprintf(stderr, "cannot start %s: %s\n", args[1], uv_strerror(rc));
    uv_close((uv_handle_t *)&p->in, NULL);
    uv_close((uv_handle_t *)&p->out, NULL);
    return -1;
  }
  p->open_handles++;
  uv_read_start((uv_stream_t *)&p->out, proc_alloc, proc_read);
  if (!WAIT_UNTIL(p->have_line || p->exited, wait_ms) || !p->have_line)
    return -1;
  return 0;
}

/* Closes its stdin (it then stops) and waits. */
static void proc_stop(proc_t *p) {
  if (!uv_is_closing((uv_handle_t *)&p->in))
    uv_close((uv_handle_t *)&p->in, proc_handle_closed);
  if (!WAIT_UNTIL(p->exited, 30000)) {
    uv_process_kill(&p->proc, SIGKILL);
    WAIT_UNTIL(p->exited, 10000);
  }
  WAIT_UNTIL(p->open_handles == 0, 10000);
}

static int pacs_start(void) {
  char pdir[300];
  snprintf(pdir, sizeof pdir, "%s/pacs", dir);
  char *args[] = {(char *)python, (char *)orthanc_py, "--dir", pdir, NULL};
  if (proc_start(&pacs, args, 90000) != 0)
    return -1;
  pacs_info = json_loads(pacs.line, 0, NULL);
  return pacs_info ? 0 : -1;
}

static void pacs_stop(void) {
  proc_stop(&pacs);
}

static const char *info(const char *key) {
  return json_string_value(json_object_get(pacs_info, key));
}

/* ---- studies -------------------------------------------------------------------- */

typedef struct study {
  json_t *j; /* make-study's output */
  const char *uid, *series_uid, *out;
  size_t n;
  char **paths;
  uint64_t total_bytes;
} study_t;

static int make(study_t *s, const char *name, const char *args) {
  char cmd[2048];
  memset(s, 0, sizeof *s);
  snprintf(cmd, sizeof cmd, "%s %s --out %s/%s %s", python, make_study, dir, name, args);
  FILE *f = popen(cmd, "r");
  if (!f)
    return -1;
  /* All of its output first: closing the pipe early would kill it. */
  rr_buf_t outb;
  rr_buf_init(&outb, (size_t)1 << 20);
  char chunk[4096];
  size_t got;
  while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
    rr_buf_append(&outb, chunk, got);
  int st = pclose(f);
  s->j = outb.data ? json_loadb(outb.data, outb.len, 0, NULL) : NULL;
  rr_buf_close(&outb);
  if (!s->j || st != 0)
    return -1;
  s->uid = json_string_value(json_object_get(s->j, "study_instance_uid"));
  s->series_uid = json_string_value(json_object_get(s->j, "series_instance_uid"));
  s->out = json_string_value(json_object_get(s->j, "out"));
  json_t *files = json_object_get(s->j, "files");
  s->n = json_array_size(files);
  s->paths = calloc(s->n, sizeof *s->paths);
  for (size_t i = 0; i < s->n; i++) {
    size_t len = strlen(s->out) + strlen(json_string_value(json_array_get(files, i))) + 2;
    s->paths[i] = malloc(len);
    snprintf(s->paths[i], len, "%s/%s", s->out, json_string_value(json_array_get(files, i)));
    struct stat st2;
    if (stat(s->paths[i], &st2) == 0)
      s->total_bytes += (uint64_t)st2.st_size;
  }
  return s->uid && s->n ? 0 : -1;
}

static void study_free(study_t *s) {
  for (size_t i = 0; i < s->n; i++)
    free(s->paths[i]);
  free(s->paths);
  json_decref(s->j);
}

static const char *sop_uid(const study_t *s, size_t i) {
  return json_string_value(json_array_get(json_object_get(s->j, "sop_instance_uids"), i));
}

/* 1 when the files at a and b hold the same bytes (read in pieces). */
static int same_file(const char *a, const char *b) {
  FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
  int same = fa && fb;
  static char ba[65536], bb[65536];
  while (same) {
    size_t na = fread(ba, 1, sizeof ba, fa), nb = fread(bb, 1, sizeof bb, fb);
    if (na != nb || memcmp(ba, bb, na) != 0)
      same = 0;
    if (na == 0)
      break;
  }
  if (fa)
    fclose(fa);
  if (fb)
    fclose(fb);
  return same;
}

/* ---- clients and outcomes ------------------------------------------------------- */

static rr_http_client_t *http;
static int write_file(const char *path, const char *text);

typedef struct got {
  int calls;
  int status, retryable;
  long http;
  char message[512];
  size_t n;
  long study_instances, study_series; /* of the first match */
  char study_uid[80], series_uid[80], patient_id[80], accession[40], modalities[64], study_date[16],
      patient_name[80];
  char uids[512][80]; /* SOP Instance UIDs of the matches, or of stored files */
  size_t nuids;
  size_t files, sent, stored, failed, warnings;
  uint64_t bytes;
  unsigned reason;
  int files_missing_at_cb; /* file_cb got a path that did not exist */
  int stop_after;          /* file_cb: stop after this many (0 = never) */
  int file_calls;
  int bulk_uris; /* metadata datasets with a PixelData BulkDataURI */
} got_t;

static void copy(char *dst, size_t cap, const char *s) {
  snprintf(dst, cap, "%s", s ? s : "");
}

static void on_done(void *ud, rr_dicomweb_op_t *op, const rr_dicomweb_outcome_t *o) {
  got_t *g = ud;
  (void)op;
  uv_stop(&loop);
  g->calls++;
  g->status = o->status;
  g->retryable = o->retryable;
  g->http = o->http_status;
  copy(g->message, sizeof g->message, o->message);
  g->n = o->result->n;
  if (o->result->n) {
    const rr_dicomweb_match_t *m = &o->result->matches[0];
    g->study_instances = m->study_instances;
    g->study_series = m->study_series;
    copy(g->study_uid, sizeof g->study_uid, m->study_uid);
    copy(g->series_uid, sizeof g->series_uid, m->series_uid);
    copy(g->patient_id, sizeof g->patient_id, m->patient_id);
    copy(g->accession, sizeof g->accession, m->accession_number);
    copy(g->modalities, sizeof g->modalities, m->modalities);
    copy(g->study_date, sizeof g->study_date, m->study_date);
    copy(g->patient_name, sizeof g->patient_name, m->patient_name);
  }
  for (size_t i = 0; i < o->result->n && g->nuids < 512; i++) {
    const rr_dicomweb_match_t *m = &o->result->matches[i];
    if (m->sop_instance_uid)
      copy(g->uids[g->nuids++], sizeof g->uids[0], m->sop_instance_uid);
    json_t *px = json_object_get(m->json, "7FE00010");
    if (json_is_string(json_object_get(px, "BulkDataURI")))
      g->bulk_uris++;
  }
  g->files = o->files;
  g->bytes = o->bytes;
  g->sent = o->sent;
  g->stored = o->stored;
  g->failed = o->failed;
  g->warnings = o->warnings;
  g->reason = o->failure_reason;
  if (getenv("RR_TEST_VERBOSE"))
    fprintf(stderr, "  done status=%d (%s) retryable=%d http=%ld message=\"%s\" ms=%llu\n",
            o->status, rr_dicomweb_strerror(o->status), o->retryable, o->http_status, o->message,
            (unsigned long long)o->elapsed_ms);
}

static int on_file(void *ud, const rr_dicomweb_file_t *f) {
  got_t *g = ud;
  struct stat st;
  g->file_calls++;
  if (stat(f->path, &st) != 0 || (uint64_t)st.st_size != f->size)
    g->files_missing_at_cb++;
  if (g->nuids < 512)
    copy(g->uids[g->nuids++], sizeof g->uids[0], f->sop_instance_uid);
  if (g->stop_after && g->file_calls >= g->stop_after)
    return -ECANCELED;
  return 0;
}

static char pwfile[300], badpwfile[300];

static rr_dicomweb_client_t *new_client(const char *password_file) {
  rr_dicomweb_config_t cfg;
  rr_dicomweb_config_default(&cfg);
  cfg.name = "orthanc";
  cfg.base_url = info("dicomweb_url");
  cfg.auth = RR_DICOMWEB_AUTH_BASIC;
  cfg.user = info("user");
  cfg.password_file = password_file;
  cfg.connect_timeout_ms = 5000;
  cfg.timeout_ms = 30000;
  cfg.bulk_timeout_ms = 300000;
  rr_dicomweb_client_t *c = NULL;
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  int rc = rr_dicomweb_client_new(http, &cfg, &c, &err);
  CHECK_EQ_INT(rc, 0);
  if (rc)
    fprintf(stderr, "client: %s\n", err.data ? err.data : "");
  rr_buf_close(&err);
  return c;
}

static rr_dicomweb_client_t *pacs_client;

#define WAIT_DONE(g, ms) CHECK(WAIT_UNTIL((g)->calls > 0, ms))

static void store(const char *const *paths, size_t n, got_t *g) {
  memset(g, 0, sizeof *g);
  CHECK_EQ_INT(rr_dicomweb_store(pacs_client, paths, n, on_done, g, NULL), 0);
  CHECK_EQ_INT(g->calls, 0);
  WAIT_DONE(g, 300000);
}

static void search(const rr_dicomweb_query_t *q, got_t *g) {
  memset(g, 0, sizeof *g);
  CHECK_EQ_INT(rr_dicomweb_search(pacs_client, q, on_done, g, NULL), 0);
  WAIT_DONE(g, 30000);
}

/* The Orthanc REST API (not DICOMweb): the number of instances Orthanc
 * holds for a Study Instance UID; -1 when it does not know the study. */
typedef struct rest {
  int calls;
  long http;
  json_t *j;
} rest_t;

static void on_rest(void *ud, rr_http_transfer_t *t, const rr_http_response_t *r) {
  rest_t *x = ud;
  (void)t;
  uv_stop(&loop);
  x->calls++;
  x->http = r->http_status;
  x->j = r->status == 0 ? json_loadb(r->body, r->body_len, 0, NULL) : NULL;
}

static json_t *rest(rr_http_method_t m, const char *path, const char *body) {
  char url[512], auth[256];
  snprintf(url, sizeof url, "%s%s", info("http_url"), path);
  rr_http_request_t r;
  rr_http_client_request_default(&r);
  r.method = m;
  r.url = url;
  if (body) {
    r.body = body;
    r.body_len = strlen(body);
  }
  /* Orthanc's fixed test credentials (orthanc.py), base64 of user:password. */
  snprintf(auth, sizeof auth, "Authorization: Basic %s", "cnJ0ZXN0OnJydGVzdC1wYXNzd29yZA==");
  const char *h[] = {auth};
  r.headers = h;
  r.nheaders = 1;
  rest_t x = {0, 0, NULL};
  CHECK_EQ_INT(rr_http_client_submit(http, &r, on_rest, &x, NULL), 0);
  CHECK(WAIT_UNTIL(x.calls > 0, 30000));
  return x.j;
}

static long orthanc_instances(const char *study_uid) {
  json_t *look = rest(RR_HTTP_POST, "/tools/lookup", study_uid);
  const char *id = NULL;
  size_t i;
  json_t *e;
  json_array_foreach(look, i, e) {
    const char *type = json_string_value(json_object_get(e, "Type"));
    if (type && strcmp(type, "Study") == 0)
      id = json_string_value(json_object_get(e, "ID"));
  }
  long n = -1;
  if (id) {
    char path[256];
    snprintf(path, sizeof path, "/studies/%s/instances", id);
    json_t *inst = rest(RR_HTTP_GET, path, NULL);
    if (json_is_array(inst))
      n = (long)json_array_size(inst);
    json_decref(inst);
  }
  json_decref(look);
  return n;
}

/* ---- tests against Orthanc -------------------------------------------------------- */

static study_t small, big;

static void test_stow(void) {
  got_t g;
  CHECK_EQ_INT(orthanc_instances(small.uid), -1);
  store((const char *const *)small.paths, small.n, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.http, 200);
  CHECK_EQ_INT(g.sent, small.n);
  CHECK_EQ_INT(g.stored, small.n);
  CHECK_EQ_INT(g.failed, 0);
  CHECK_MEM_STR(g.message, strlen(g.message), "");
  CHECK_EQ_INT(orthanc_instances(small.uid), (long)small.n);
}

static void test_qido(void) {
  got_t g;
  rr_dicomweb_param_t p[2];
  rr_dicomweb_query_t q;
  memset(&q, 0, sizeof q);
  q.params = p;

  /* By date range: the small study (20261127), not the big one (20261201). */
  p[0] = (rr_dicomweb_param_t){"StudyDate", "20261127-20261128"};
  q.nparams = 1;
  const char *inc[] = {"StudyDescription", "00080061"};
  q.includefields = inc;
  q.nincludefields = 2;
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.http, 200);
  CHECK_EQ_INT(g.n, 1);
  CHECK(strcmp(g.study_uid, small.uid) == 0);
  CHECK(strcmp(g.patient_id, "RRTEST-PAT-0101") == 0);
  CHECK(strcmp(g.accession, "RRTEST-ACC-0101") == 0);
  CHECK(strcmp(g.modalities, "CT") == 0);
  CHECK(strcmp(g.study_date, "20261127") == 0);
  CHECK(strcmp(g.patient_name, "ZZTEST^HEAD") == 0);
  CHECK_EQ_INT(g.study_instances, (long)small.n);
  CHECK_EQ_INT(g.study_series, 1);
  q.nincludefields = 0;

  /* By accession number and modality together. */
  p[0] = (rr_dicomweb_param_t){"AccessionNumber", "RRTEST-ACC-0101"};
  p[1] = (rr_dicomweb_param_t){"ModalitiesInStudy", "CT"};
  q.nparams = 2;
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 1);
  CHECK(strcmp(g.study_uid, small.uid) == 0);

  /* A wildcard value (percent-encoded) and a PatientID. */
  p[0] = (rr_dicomweb_param_t){"PatientID", "RRTEST-PAT-01*"};
  q.nparams = 1;
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 1);

  /* Nothing matches: an empty success. */
  p[0] = (rr_dicomweb_param_t){"AccessionNumber", "RRTEST-NO-SUCH"};
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 0);
  p[0] = (rr_dicomweb_param_t){"StudyDate", "20200101-20200102"};
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 0);
  p[0] = (rr_dicomweb_param_t){"ModalitiesInStudy", "MR"};
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 0);

  /* Series, then instances of the study, with limit and offset. */
  memset(&q, 0, sizeof q);
  q.level = RR_DICOMWEB_SERIES;
  q.study_uid = small.uid;
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 1);
  CHECK(strcmp(g.series_uid, small.series_uid) == 0);
  q.level = RR_DICOMWEB_INSTANCES;
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, small.n);
  CHECK_EQ_INT(g.nuids, small.n);
  for (size_t i = 0; i < small.n; i++) {
    int found = 0;
    for (size_t k = 0; k < g.nuids; k++)
      found |= strcmp(g.uids[k], sop_uid(&small, i)) == 0;
    CHECK(found);
  }
  q.limit = 1;
  q.offset = 1;
  search(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 1);

  /* Malformed UIDs never reach the PACS. */
  q.study_uid = "1.2/../3";
  CHECK_EQ_INT(rr_dicomweb_search(pacs_client, &q, on_done, &g, NULL), RR_EINVAL);
}

static void test_metadata(void) {
  got_t g;
  memset(&g, 0, sizeof g);
  CHECK_EQ_INT(rr_dicomweb_metadata(pacs_client, small.uid, NULL, on_done, &g, NULL), 0);
  WAIT_DONE(&g, 30000);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, small.n);
  CHECK_EQ_INT(g.nuids, small.n);
  CHECK(strcmp(g.study_uid, small.uid) == 0);
  CHECK(strcmp(g.patient_id, "RRTEST-PAT-0101") == 0);
  CHECK_EQ_INT(g.bulk_uris, (int)small.n);
  memset(&g, 0, sizeof g);
  CHECK_EQ_INT(rr_dicomweb_metadata(pacs_client, small.uid, small.series_uid, on_done, &g, NULL),
               0);
  WAIT_DONE(&g, 30000);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, small.n);
}

/* Every stored file is named by its UID and equals the original. */
static void check_retrieved(const study_t *s, const char *out, const got_t *g) {
  CHECK_EQ_INT(g->files, s->n);
  CHECK_EQ_INT(g->file_calls, (int)s->n);
  CHECK_EQ_INT(g->files_missing_at_cb, 0);
  CHECK_EQ_INT(g->bytes, s->total_bytes);
  size_t same = 0;
  for (size_t i = 0; i < s->n; i++) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s.dcm", out, sop_uid(s, i));
    /* make-study lists files and their UIDs in the same order. */
    if (same_file(path, s->paths[i]))
      same++;
    else
      fprintf(stderr, "  instance %zu: %s differs from the original\n", i, path);
  }
  CHECK_EQ_INT(same, s->n);
  /* No temporary file is left behind. */
  DIR *d = opendir(out);
  int temps = 0, entries = 0;
  struct dirent *e;
  while (d && (e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.' && strncmp(e->d_name, ".rr-wado-", 9) == 0)
      temps++;
    else if (e->d_name[0] != '.')
      entries++;
  }
  if (d)
    closedir(d);
  CHECK_EQ_INT(temps, 0);
  CHECK_EQ_INT(entries, (int)s->n);
}

static void test_wado(void) {
  char out[300];
  snprintf(out, sizeof out, "%s/wado-small", dir);
  CHECK_EQ_INT(mkdir(out, 0700), 0);
  got_t g;
  memset(&g, 0, sizeof g);
  CHECK_EQ_INT(
      rr_dicomweb_retrieve(pacs_client, small.uid, NULL, NULL, out, on_file, on_done, &g, NULL), 0);
  WAIT_DONE(&g, 60000);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.http, 200);
  check_retrieved(&small, out, &g);

  /* One instance, by series and SOP Instance UID. */
  snprintf(out, sizeof out, "%s/wado-one", dir);
  CHECK_EQ_INT(mkdir(out, 0700), 0);
  memset(&g, 0, sizeof g);
  CHECK_EQ_INT(rr_dicomweb_retrieve(pacs_client, small.uid, small.series_uid, sop_uid(&small, 1),
                                    out, on_file, on_done, &g, NULL),
               0);
  WAIT_DONE(&g, 60000);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.files, 1);
  CHECK(g.nuids == 1 && strcmp(g.uids[0], sop_uid(&small, 1)) == 0);

  /* The file callback stops the retrieve: its code, no temporary file. */
  snprintf(out, sizeof out, "%s/wado-stop", dir);
  CHECK_EQ_INT(mkdir(out, 0700), 0);
  memset(&g, 0, sizeof g);
  g.stop_after = 1;
  CHECK_EQ_INT(
      rr_dicomweb_retrieve(pacs_client, small.uid, NULL, NULL, out, on_file, on_done, &g, NULL), 0);
  WAIT_DONE(&g, 60000);
  CHECK_EQ_INT(g.status, -ECANCELED);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK_EQ_INT(g.files, 1);
  CHECK(strstr(g.message, "file callback") != NULL);
  DIR *d = opendir(out);
  int n = 0;
  struct dirent *e;
  while (d && (e = readdir(d)) != NULL)
    n += e->d_name[0] != '.' || strncmp(e->d_name, ".rr-wado-", 9) == 0;
  if (d)
    closedir(d);
  CHECK_EQ_INT(n, 1);

  /* A study the PACS does not have: 404, permanent. */
  memset(&g, 0, sizeof g);
  CHECK_EQ_INT(
      rr_dicomweb_retrieve(pacs_client, "2.25.1", NULL, NULL, out, NULL, on_done, &g, NULL), 0);
  WAIT_DONE(&g, 30000);
  CHECK_EQ_INT(g.status, RR_DICOMWEB_EHTTP);
  CHECK_EQ_INT(g.http, 404);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK_EQ_INT(g.files, 0);
}

static long max_rss_kib(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

/* A study far larger than the memory the client may use, both ways: the
 * peak RSS of this process grows by much less than the study. */
static void test_big_study(void) {
  long before = max_rss_kib();
  got_t g;
  store((const char *const *)big.paths, big.n, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.stored, big.n);
  CHECK_EQ_INT(orthanc_instances(big.uid), (long)big.n);
  char out[300];
  snprintf(out, sizeof out, "%s/wado-big", dir);
  CHECK_EQ_INT(mkdir(out, 0700), 0);
  memset(&g, 0, sizeof g);
  CHECK_EQ_INT(
      rr_dicomweb_retrieve(pacs_client, big.uid, NULL, NULL, out, on_file, on_done, &g, NULL), 0);
  WAIT_DONE(&g, 300000);
  CHECK_EQ_INT(g.status, 0);
  long after = max_rss_kib();
  check_retrieved(&big, out, &g);
  long grew = after - before;

  printf("big study: %zu instances, %llu bytes; peak RSS %ld KiB -> %ld KiB (+%ld KiB)\n", big.n,
         (unsigned long long)big.total_bytes, before, after, grew);
  CHECK((uint64_t)grew * 1024u < big.total_bytes / 4);
}

static void test_stow_not_dicom(void) {
  char path[300];
  snprintf(path, sizeof path, "%s/not-dicom.dcm", dir);
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  if (!f)
    return;
  fputs("this is a text file, not a DICOM Part 10 file\n", f);
  fclose(f);
  const char *paths[] = {path};
  got_t g;
  store(paths, 1, &g);
  CHECK(g.status == RR_DICOMWEB_EREJECTED || g.status == RR_DICOMWEB_EHTTP);
  CHECK(g.http >= 400 && g.http < 500);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK_EQ_INT(g.stored, 0);
  CHECK(strstr(g.message, "0 of 1") != NULL || g.failed == 1);
  CHECK(g.message[0] != '\0');

  /* A missing file fails at the start, before anything is sent. */
  snprintf(path, sizeof path, "%s/no-such-file.dcm", dir);
  memset(&g, 0, sizeof g);
  CHECK_EQ_INT(rr_dicomweb_store(pacs_client, paths, 1, on_done, &g, NULL), -ENOENT);
  CHECK_EQ_INT(g.calls, 0);
}

static void test_wrong_password(void) {
  rr_dicomweb_client_t *c = new_client(badpwfile);
  rr_dicomweb_query_t q;
  memset(&q, 0, sizeof q);
  got_t g;
  memset(&g, 0, sizeof g);
  CHECK_EQ_INT(rr_dicomweb_search(c, &q, on_done, &g, NULL), 0);
  rr_dicomweb_client_free(c); /* the running operation goes on */
  WAIT_DONE(&g, 30000);
  CHECK_EQ_INT(g.status, RR_DICOMWEB_EHTTP);
  CHECK_EQ_INT(g.http, 401);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK(strstr(g.message, "401") != NULL);
}

/* A streamed request body of unknown length (chunked) through the HTTP
 * client, to Orthanc's STOW-RS. */
typedef struct chunked {
  FILE *f;
  const char *boundary;
  int phase;
} chunked_t;

static int chunked_source(void *ud, char *buf, size_t cap, size_t *len) {
  chunked_t *c = ud;
  *len = 0;
  if (c->phase == 0) {
    *len =
        (size_t)snprintf(buf, cap, "--%s\r\nContent-Type: application/dicom\r\n\r\n", c->boundary);
    c->phase = 1;
  } else if (c->phase == 1) {
    *len = fread(buf, 1, cap < 1000 ? cap : 1000, c->f);
    if (*len == 0) {
      *len = (size_t)snprintf(buf, cap, "\r\n--%s--\r\n", c->boundary);
      c->phase = 2;
    }
  }
  return 0;
}

static void test_chunked_body(void) {
  study_t s;
  CHECK_EQ_INT(make(&s, "chunked",
                    "--slices 1 --size 64 --seed 7 --date 20261129 "
                    "--accession RRTEST-ACC-0303 --patient-id RRTEST-PAT-0303"),
               0);
  if (!s.n)
    return;
  chunked_t c = {fopen(s.paths[0], "rb"), "rrtest-chunked", 0};
  char url[512];
  snprintf(url, sizeof url, "%s/studies", info("dicomweb_url"));
  rr_http_request_t r;
  rr_http_client_request_default(&r);
  r.method = RR_HTTP_POST;
  r.url = url;
  r.content_type = "multipart/related; type=\"application/dicom\"; boundary=rrtest-chunked";
  r.source = chunked_source;
  r.source_ud = &c;
  r.source_len = RR_HTTP_LENGTH_UNKNOWN;
  const char *h[] = {"Authorization: Basic cnJ0ZXN0OnJydGVzdC1wYXNzd29yZA=="};
  r.headers = h;
  r.nheaders = 1;
  rest_t x = {0, 0, NULL};
  CHECK_EQ_INT(rr_http_client_submit(http, &r, on_rest, &x, NULL), 0);
  CHECK(WAIT_UNTIL(x.calls > 0, 30000));
  CHECK_EQ_INT(x.http, 200);
  CHECK_EQ_INT(c.phase, 2);
  json_decref(x.j);
  if (c.f)
    fclose(c.f);
  CHECK_EQ_INT(orthanc_instances(s.uid), 1);
  study_free(&s);
}

/* ---- a scripted DICOMweb peer: answers Orthanc does not give ------------------ */

static proc_t peer;
static int peer_port;

static rr_dicomweb_client_t *peer_client(const char *kind) {
  char base[256];
  snprintf(base, sizeof base, "http://127.0.0.1:%d/%s", peer_port, kind);
  rr_dicomweb_config_t cfg;
  rr_dicomweb_config_default(&cfg);
  cfg.name = "peer";
  cfg.base_url = base;
  cfg.timeout_ms = cfg.bulk_timeout_ms = 20000;
  rr_dicomweb_client_t *c = NULL;
  CHECK_EQ_INT(rr_dicomweb_client_new(http, &cfg, &c, NULL), 0);
  return c;
}

static void peer_store(const char *kind, const char *path, got_t *g) {
  rr_dicomweb_client_t *c = peer_client(kind);
  memset(g, 0, sizeof *g);
  const char *paths[] = {path};
  if (c)
    CHECK_EQ_INT(rr_dicomweb_store(c, paths, 1, on_done, g, NULL), 0);
  rr_dicomweb_client_free(c);
  WAIT_DONE(g, 30000);
}

static void peer_search(const char *kind, got_t *g) {
  rr_dicomweb_client_t *c = peer_client(kind);
  rr_dicomweb_query_t q;
  memset(&q, 0, sizeof q);
  memset(g, 0, sizeof *g);
  if (c)
    CHECK_EQ_INT(rr_dicomweb_search(c, &q, on_done, g, NULL), 0);
  rr_dicomweb_client_free(c);
  WAIT_DONE(g, 30000);
}

/* Entries of folder out whose names start with prefix ("" = all but . and ..). */
static int count_entries(const char *out, const char *prefix) {
  int n = 0;
  DIR *d = opendir(out);
  struct dirent *e;
  while (d && (e = readdir(d)) != NULL)
    n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0 &&
         strncmp(e->d_name, prefix, strlen(prefix)) == 0;
  if (d)
    closedir(d);
  return n;
}

/* Retrieves into a new directory dir/<kind>; *entries gets the number of
 * files left there (temporary ones included). */
static void peer_retrieve(const char *kind, got_t *g, int *entries) {
  char out[300];
  snprintf(out, sizeof out, "%s/%s", dir, kind);
  CHECK_EQ_INT(mkdir(out, 0700), 0);
  rr_dicomweb_client_t *c = peer_client(kind);
  memset(g, 0, sizeof *g);
  if (c)
    CHECK_EQ_INT(rr_dicomweb_retrieve(c, "1.2.3", NULL, NULL, out, on_file, on_done, g, NULL), 0);
  rr_dicomweb_client_free(c);
  WAIT_DONE(g, 30000);
  *entries = 0;
  DIR *d = opendir(out);
  struct dirent *e;
  while (d && (e = readdir(d)) != NULL)
    *entries += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
  if (d)
    closedir(d);
}

static void test_peer_stow(void) {
  char path[300];
  snprintf(path, sizeof path, "%s/peer-file.dcm", dir);
  CHECK_EQ_INT(write_file(path, "not really DICOM, the peer does not look\n"), 0);
  got_t g;
  peer_store("stow-409-a700", path, &g);
  CHECK_EQ_INT(g.status, RR_DICOMWEB_EREJECTED);
  CHECK_EQ_INT(g.http, 409);
  CHECK_EQ_INT(g.retryable, 1); /* out of resources */
  CHECK_EQ_INT(g.failed, 1);
  CHECK_EQ_INT(g.reason, 0xA700);
  CHECK(strstr(g.message, "0xA700") != NULL);

  peer_store("stow-202-warn", path, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.http, 202);
  CHECK_EQ_INT(g.stored, 1);
  CHECK_EQ_INT(g.warnings, 1);

  peer_store("stow-202-fail", path, &g);
  CHECK_EQ_INT(g.status, RR_DICOMWEB_EREJECTED);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK_EQ_INT(g.stored, 1);
  CHECK_EQ_INT(g.failed, 1);
  CHECK_EQ_INT(g.reason, 0xC000);
  CHECK(strstr(g.message, "cannot understand") != NULL);

  peer_store("stow-200-short", path, &g);
  CHECK_EQ_INT(g.status, RR_DICOMWEB_EREJECTED);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK(strstr(g.message, "acknowledged 0 of 1") != NULL);

  peer_store("stow-200-badjson", path, &g);
  CHECK_EQ_INT(g.status, RR_EPARSE);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK(strstr(g.message, "at byte 14") != NULL);
}

static void test_peer_qido(void) {
  got_t g;
  peer_search("qido-badjson", &g);
  CHECK_EQ_INT(g.status, RR_EPARSE);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK(strstr(g.message, "at byte 41") != NULL);
  peer_search("qido-503", &g);
  CHECK_EQ_INT(g.status, RR_DICOMWEB_EHTTP);
  CHECK_EQ_INT(g.http, 503);
  CHECK_EQ_INT(g.retryable, 1);
  peer_search("qido-204", &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.http, 204);
  CHECK_EQ_INT(g.n, 0);
}

static void test_peer_wado(void) {
  got_t g;
  int entries;
  /* Cut inside the second part: the first is stored (no meta header:
   * sequential name), the second's temporary file is gone, retryable. */
  peer_retrieve("wado-truncated", &g, &entries);
  CHECK_EQ_INT(g.status, RR_HTTP_ECONNLOST);
  CHECK_EQ_INT(g.retryable, 1);
  CHECK_EQ_INT(g.files, 1);
  CHECK(g.nuids == 1 && g.uids[0][0] == '\0');
  CHECK_EQ_INT(entries, 1);
  char path[400];
  snprintf(path, sizeof path, "%s/wado-truncated/1.dcm", dir);
  struct stat st;
  CHECK(stat(path, &st) == 0 && st.st_size == 1000);

  /* Canceled while the second instance arrives (the peer stalls there):
   * UV_ECANCELED, permanent, the first file stays, the second's temporary
   * file is removed. */
  char out[300];
  snprintf(out, sizeof out, "%s/wado-stall", dir);
  CHECK_EQ_INT(mkdir(out, 0700), 0);
  rr_dicomweb_client_t *c = peer_client("wado-stall");
  rr_dicomweb_op_t *op = NULL;
  memset(&g, 0, sizeof g);
  if (c)
    CHECK_EQ_INT(rr_dicomweb_retrieve(c, "1.2.3", NULL, NULL, out, on_file, on_done, &g, &op), 0);
  rr_dicomweb_client_free(c);
  CHECK(WAIT_UNTIL(count_entries(out, ".rr-wado-") == 1 || g.calls > 0, 30000));
  CHECK_EQ_INT(g.file_calls, 1);
  CHECK_EQ_INT(g.calls, 0);
  if (g.calls == 0)
    rr_dicomweb_cancel(op);
  CHECK_EQ_INT(g.calls, 0);
  WAIT_DONE(&g, 30000);
  CHECK_EQ_INT(g.status, UV_ECANCELED);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK_EQ_INT(g.files, 1);
  CHECK_EQ_INT(count_entries(out, ".rr-wado-"), 0);
  CHECK_EQ_INT(count_entries(out, ""), 1);

  peer_retrieve("wado-badheader", &g, &entries);
  CHECK_EQ_INT(g.status, RR_EPARSE);
  CHECK_EQ_INT(g.retryable, 0);
  CHECK_EQ_INT(g.http, 200);
  CHECK(strstr(g.message, "malformed multipart") != NULL);
  CHECK_EQ_INT(g.files, 0);
  CHECK_EQ_INT(entries, 0);

  peer_retrieve("wado-json", &g, &entries);
  CHECK_EQ_INT(g.status, RR_EPARSE);
  CHECK(strstr(g.message, "not multipart") != NULL);
  CHECK_EQ_INT(entries, 0);
}

/* Run last: Orthanc is gone, connections are refused: retryable. */
static void test_pacs_down(void) {
  pacs_stop();
  CHECK(pacs.exited);
  rr_dicomweb_query_t q;
  memset(&q, 0, sizeof q);
  got_t g;
  search(&q, &g);
  CHECK_EQ_INT(g.status, UV_ECONNREFUSED);
  CHECK_EQ_INT(g.retryable, 1);
  CHECK_EQ_INT(g.http, 0);
  const char *paths[] = {small.paths[0]};
  store(paths, 1, &g);
  CHECK_EQ_INT(g.status, UV_ECONNREFUSED);
  CHECK_EQ_INT(g.retryable, 1);
}

/* ---- main -------------------------------------------------------------------------- */

static int prerequisites(void) {
  char cmd[1024];
  snprintf(cmd, sizeof cmd,
           "%s -c 'import sys; sys.path.insert(0, sys.argv[1]); import orthanc; "
           "why = orthanc.missing(); print(why) if why else None; sys.exit(1 if why else 0)' "
           "\"$(dirname %s)\" >&2",
           python, orthanc_py);
  if (system(cmd) != 0)
    return -1;
  snprintf(cmd, sizeof cmd, "%s -c 'import pydicom' 2>/dev/null", python);
  if (system(cmd) != 0) {
    fprintf(stderr, "pydicom is missing (python3-pydicom)\n");
    return -1;
  }
  return 0;
}

static int write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f)
    return -1;
  fputs(text, f);
  return fclose(f);
}

static void remove_dir(void) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "cannot remove %s\n", dir);
}

static void on_http_closed(void *ud) {
  uv_stop(&loop);
  (*(int *)ud)++;
}

/* Closes the HTTP client and the loop, removes the folder. */
static void teardown(void) {
  if (http) {
    int closed = 0;
    rr_http_client_close(http, on_http_closed, &closed);
    CHECK(WAIT_UNTIL(closed == 1, 10000));
    http = NULL;
  }
  uv_close((uv_handle_t *)&deadline_timer, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  remove_dir();
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s PYTHON ORTHANC_PY DICOMWEB_PEER_PY MAKE_STUDY\n", argv[0]);
    return 2;
  }
  python = argv[1];
  orthanc_py = argv[2];
  make_study = argv[4];
  signal(SIGPIPE, SIG_IGN);
  const char *v = getenv("RR_TEST_VERBOSE");
  rr_log_set_level(v && v[0] == '1' ? RR_LOG_DEBUG : RR_LOG_ERROR);

  RUN(test_json_good);
  RUN(test_json_bad);
  RUN(test_json_accessors);
  RUN(test_part10);

  snprintf(dir, sizeof dir, "/tmp/rr-dicomweb-XXXXXX");
  if (!mkdtemp(dir))
    return 2;
  uv_loop_init(&loop);
  uv_timer_init(&loop, &deadline_timer);
  CHECK_EQ_INT(rr_http_client_new(&loop, NULL, &http), 0);
  char *peer_args[] = {(char *)python, argv[3], NULL};
  if (!http || proc_start(&peer, peer_args, 20000) != 0 ||
      sscanf(peer.line, "ready port=%d", &peer_port) != 1) {
    fprintf(stderr, "the scripted DICOMweb peer did not start\n");
    teardown();
    return 2;
  }
  RUN(test_peer_stow);
  RUN(test_peer_qido);
  RUN(test_peer_wado);
  proc_stop(&peer);
  if (rr_tests_failed) {
    teardown();
    return TEST_SUMMARY();
  }
  if (prerequisites() != 0) {
    printf("skipped: the PACS peer cannot run here\n");
    teardown();
    return SKIP;
  }

  const char *slices = getenv("RR_DICOMWEB_BIG_SLICES");
  char big_args[512];
  snprintf(big_args, sizeof big_args,
           "--slices %s --size 512 --seed 2 --date 20261201 --accession RRTEST-ACC-0202 "
           "--patient-id RRTEST-PAT-0202",
           slices && slices[0] ? slices : "200");
  if (make(&small, "small",
           "--slices 4 --size 128 --seed 1 --date 20261127 --time 101500 "
           "--accession RRTEST-ACC-0101 --patient-id RRTEST-PAT-0101") != 0 ||
      make(&big, "big", big_args) != 0) {
    fprintf(stderr, "make-study failed\n");
    teardown();
    return 2;
  }
  snprintf(pwfile, sizeof pwfile, "%s/password", dir);
  snprintf(badpwfile, sizeof badpwfile, "%s/bad-password", dir);
  if (pacs_start() != 0) {
    fprintf(stderr, "Orthanc did not start\n");
    teardown();
    return 2;
  }
  if (write_file(pwfile, info("password")) != 0 || write_file(badpwfile, "not-it\n") != 0) {
    teardown();
    return 2;
  }
  pacs_client = new_client(pwfile);
  if (!pacs_client) {
    teardown();
    return TEST_SUMMARY();
  }

  RUN(test_stow);
  RUN(test_qido);
  RUN(test_metadata);
  RUN(test_wado);
  RUN(test_big_study);
  RUN(test_stow_not_dicom);
  RUN(test_wrong_password);
  RUN(test_chunked_body);
  RUN(test_pacs_down);

  rr_dicomweb_client_free(pacs_client);
  teardown();
  study_free(&small);
  study_free(&big);
  json_decref(pacs_info);
  return TEST_SUMMARY();
}

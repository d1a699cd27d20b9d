/* An SR for a study goes into Orthanc and comes back by WADO-RS with the
 * same content, both ways in: a synthetic CT study (scripts/make-study) is
 * stored by STOW-RS; SR #1 about it (engine/dicom/sr.h) goes in by C-STORE
 * (engine/dicom/scu.h, calling AE RADRELAY), SR #2 (new UIDs, other
 * device options) by STOW-RS (engine/dicomweb/client.h). Each SR is then
 * found by QIDO-RS, retrieved by WADO-RS and read back: every field of its
 * summary, its references (dcmdump), its Contributing Equipment, DCMTK's
 * verdict (dsrdump) and the bytes of its dataset are compared with the
 * file we wrote.
 *
 *   test_sr_roundtrip PYTHON ORTHANC_PY MAKE_STUDY DSRDUMP DCMDUMP DCMCONV
 *
 * Exits 77 (skipped) when Orthanc, its DICOMweb plugin, pydicom or DCMTK's
 * dsrdump/dcmdump/dcmconv are missing. One libuv loop runs the DICOMweb client and
 * the Orthanc process (tests/integration/peers/orthanc.py as a command:
 * its first stdout line says where it listens; closing its stdin stops
 * it); the blocking C-STORE runs on the loop's thread pool. Waits are
 * conditions with deadlines. Patient data is synthetic (make-study's
 * ZZTEST^HEAD). $RR_TEST_VERBOSE=1 shows the engine's debug log. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "core/log.h"
#include "dicom/scu.h"
#include "dicom/sr.h"
#include "dicomweb/client.h"
#include "rr_test.h"

#define SKIP 77
#define CT_STORAGE "1.2.840.10008.5.1.4.1.1.2"
#define COMPREHENSIVE_3D_SR "1.2.840.10008.5.1.4.1.1.88.34"
#define MAX_SLICES 8
#define MAX_MATCHES 16

#define CHECK_STR(got, want)                                                                       \
  do {                                                                                             \
    const char *g_ = (got), *w_ = (want);                                                          \
    rr_test_checks++;                                                                              \
    if (!g_ || !w_ || strcmp(g_, w_) != 0) {                                                       \
      rr_test_failures++;                                                                          \
      fprintf(stderr, "%s:%d: %s is \"%s\", want \"%s\"\n", __FILE__, __LINE__, #got,              \
              g_ ? g_ : "(null)", w_ ? w_ : "(null)");                                             \
    }                                                                                              \
  } while (0)

/* Coordinates are stored as FL (32-bit floats). */
#define CHECK_FLOAT(got, want) CHECK((float)(got) == (float)(want))

static uv_loop_t loop;
static char dir[256];
static char *python, *orthanc_py, *make_study, *dsrdump, *dcmdump, *dcmconv;

/* ---- waiting ------------------------------------------------------------- */

static uv_timer_t tick;

static void on_tick(uv_timer_t *t) {
  (void)t;
}

/* Runs the loop until *flag is set or ms have passed; returns *flag != 0. */
static int wait_flag(const int *flag, uint64_t ms, const char *what) {
  uint64_t end = uv_hrtime() / 1000000u + ms;
  uv_timer_start(&tick, on_tick, 20, 20);
  while (!*flag && uv_hrtime() / 1000000u < end)
    uv_run(&loop, UV_RUN_ONCE);
  uv_timer_stop(&tick);
  if (!*flag)
    fprintf(stderr, "timed out after %llu ms waiting for %s\n", (unsigned long long)ms, what);
  return *flag != 0;
}

/* ---- child processes ----------------------------------------------------- */

/* Runs argv[0] with stdout to out_path and stderr to err_path (NULL: the
 * same file); returns its exit status, or -1. */
static int run_tool(char *const argv[], const char *out_path, const char *err_path) {
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int efd = err_path ? open(err_path, O_WRONLY | O_CREAT | O_APPEND, 0600) : fd;
    if (fd < 0 || efd < 0)
      _exit(126);
    dup2(fd, 1);
    dup2(efd, 2);
    execv(argv[0], argv);
    _exit(127);
  }
  int st = 0;
  pid_t w;
  do
    w = waitpid(pid, &st, 0);
  while (w < 0 && errno == EINTR);
  if (w != pid)
    return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The whole file at path, NUL-terminated (free it); NULL on failure. */
static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  char *data = NULL;
  size_t n = 0;
  if (fseek(f, 0, SEEK_END) == 0) {
    long size = ftell(f);
    if (size >= 0 && fseek(f, 0, SEEK_SET) == 0) {
      data = malloc((size_t)size + 1);
      if (data) {
        n = fread(data, 1, (size_t)size, f);
        data[n] = '\0';
      }
    }
  }
  fclose(f);
  if (len)
    *len = n;
  return data;
}

/* ---- the Orthanc process ------------------------------------------------- */

typedef struct proc {
  uv_process_t proc;
  uv_pipe_t in, out;
  int open_handles;
  int exited;
  int ended; /* a line came or the process exited */
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
      p->have_line = p->ended = 1;
    } else if (p->line_len + 1 < sizeof p->line) {
      p->line[p->line_len++] = b->base[i];
    }
  }
}

static void proc_exit(uv_process_t *proc, int64_t status, int sig) {
  proc_t *p = proc->data;
  (void)status;
  (void)sig;
  p->exited = p->ended = 1;
  uv_close((uv_handle_t *)proc, proc_handle_closed);
}

static int pacs_start(void) {
  char pdir[300];
  snprintf(pdir, sizeof pdir, "%s/pacs", dir);
  char *args[] = {python, orthanc_py, "--dir", pdir, NULL};
  uv_stdio_container_t io[3];
  proc_t *p = &pacs;
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
    fprintf(stderr, "cannot start %s: %s\n", orthanc_py, uv_strerror(rc));
    uv_close((uv_handle_t *)&p->in, proc_handle_closed);
    uv_close((uv_handle_t *)&p->out, proc_handle_closed);
    return -1;
  }
  p->open_handles++;
  uv_read_start((uv_stream_t *)&p->out, proc_alloc, proc_read);
  if (!wait_flag(&p->ended, 90000, "Orthanc to start") || !p->have_line)
    return -1;
  pacs_info = json_loads(p->line, 0, NULL);
  return pacs_info ? 0 : -1;
}

/* Closes Orthanc's stdin (orthanc.py then stops it) and waits. */
static void pacs_stop(void) {
  if (!pacs.open_handles)
    return;
  if (!uv_is_closing((uv_handle_t *)&pacs.in))
    uv_close((uv_handle_t *)&pacs.in, proc_handle_closed);
  if (!pacs.exited && !wait_flag(&pacs.exited, 30000, "Orthanc to stop")) {
    uv_process_kill(&pacs.proc, SIGKILL);
    wait_flag(&pacs.exited, 10000, "Orthanc to be killed");
  }
  if (!uv_is_closing((uv_handle_t *)&pacs.out))
    uv_close((uv_handle_t *)&pacs.out, proc_handle_closed);
  while (pacs.open_handles > 0 && uv_run(&loop, UV_RUN_ONCE))
    ;
}

static const char *info(const char *key) {
  return json_string_value(json_object_get(pacs_info, key));
}

/* ---- the CT study -------------------------------------------------------- */

static struct study {
  json_t *j; /* make-study's output */
  const char *uid, *series_uid, *frame_uid;
  size_t n;
  char paths[MAX_SLICES][400];
  const char *sops[MAX_SLICES];
  const char *classes[MAX_SLICES];
} ct;

static int make_ct_study(void) {
  char out[300], json_path[300], log[300];
  snprintf(out, sizeof out, "%s/ct", dir);
  snprintf(json_path, sizeof json_path, "%s/make-study.json", dir);
  snprintf(log, sizeof log, "%s/make-study.log", dir);
  char *argv[] = {python, make_study, "--out", out, "--slices", "4", "--size", "64", NULL};
  if (run_tool(argv, json_path, log) != 0)
    return -1;
  ct.j = json_load_file(json_path, 0, NULL);
  if (!ct.j)
    return -1;
  ct.uid = json_string_value(json_object_get(ct.j, "study_instance_uid"));
  ct.series_uid = json_string_value(json_object_get(ct.j, "series_instance_uid"));
  ct.frame_uid = json_string_value(json_object_get(ct.j, "frame_of_reference_uid"));
  json_t *files = json_object_get(ct.j, "files"),
         *sops = json_object_get(ct.j, "sop_instance_uids");
  ct.n = json_array_size(files);
  if (!ct.uid || !ct.series_uid || !ct.frame_uid || ct.n != 4 || json_array_size(sops) != ct.n)
    return -1;
  for (size_t i = 0; i < ct.n; i++) {
    snprintf(ct.paths[i], sizeof ct.paths[i], "%s/%s", out,
             json_string_value(json_array_get(files, i)));
    ct.sops[i] = json_string_value(json_array_get(sops, i));
    ct.classes[i] = CT_STORAGE;
  }
  return 0;
}

/* ---- the SRs ------------------------------------------------------------- */

typedef struct sr {
  const char *name; /* "sr1", "sr2" */
  char path[300];
  rr_dicom_sr_input_t in;
  rr_dicom_sr_result_t res;
  rr_dicom_sr_series_ref_t series;
  rr_dicom_sr_finding_t findings[2];
  rr_dicom_sr_measurement_t length, volume;
  rr_dicom_sr_evaluation_t severity;
  rr_dicom_code_t purpose;
  double point2d[2], point3d[3];
  char tracking_uids[2][65]; /* as written: given, or read from the written file */
} sr_t;

static sr_t sr1, sr2;

/* Fills s with a report on the CT study: a 2D point on its third slice with
 * a length, a confidence and a severity, and a 3D point in its frame of
 * reference with a volume. variant 2 changes the optional parts. */
static void sr_input(sr_t *s, const char *name, int variant) {
  memset(s, 0, sizeof *s);
  s->name = name;
  snprintf(s->path, sizeof s->path, "%s/%s.dcm", dir, name);
  s->series = (rr_dicom_sr_series_ref_t){ct.series_uid, ct.classes, ct.sops, ct.n};

  s->point2d[0] = 31.5;
  s->point2d[1] = 22.25;
  s->length = (rr_dicom_sr_measurement_t){
      {"SCT", "410668003", "Length"}, 12.5, "mm", variant == 1 ? "millimeter" : NULL};
  s->severity =
      (rr_dicom_sr_evaluation_t){{"SCT", "246112005", "Severity"}, {"SCT", "24484000", "Severe"}};
  rr_dicom_sr_finding_t *f = &s->findings[0];
  f->finding = (rr_dicom_code_t){"SCT", "50960005", "Hemorrhage"};
  f->tracking_id = variant == 1 ? "bleed-1" : "bleed-1-rev2";
  f->tracking_uid = variant == 1 ? "2.25.202611270000000000000000000000000001" : NULL;
  f->confidence = variant == 1 ? 0.87 : 0.5;
  f->region.shape = RR_DICOM_SR_POINT;
  f->region.coords = s->point2d;
  f->region.n_points = 1;
  f->region.sop_class_uid = CT_STORAGE;
  f->region.sop_instance_uid = ct.sops[2];
  f->measurements = &s->length;
  f->n_measurements = 1;
  f->evaluations = &s->severity;
  f->n_evaluations = 1;

  s->point3d[0] = 35.0;
  s->point3d[1] = 15.0;
  s->point3d[2] = -2.5;
  s->volume = (rr_dicom_sr_measurement_t){
      {"SCT", "118565006", "Volume"}, 4188.79, "mm3", "cubic millimeter"};
  f = &s->findings[1];
  f->finding = (rr_dicom_code_t){"SCT", "27925004", "Nodule"};
  f->tracking_id = "point-3d-1";
  f->tracking_uid = variant == 1 ? "2.25.202611270000000000000000000000000002" : NULL;
  f->confidence = -1; /* none */
  f->region.shape = RR_DICOM_SR_POINT;
  f->region.is_3d = 1;
  f->region.coords = s->point3d;
  f->region.n_points = 1;
  f->region.frame_of_reference_uid = ct.frame_uid;
  f->measurements = &s->volume;
  f->n_measurements = 1;

  rr_dicom_sr_input_t *in = &s->in;
  in->source_path = ct.paths[0];
  in->series = &s->series;
  in->n_series = 1;
  in->device.name = "ZZ Bleed Detector";
  in->device.version = variant == 1 ? "1.4.2" : "2.0.0-rc1";
  in->device.manufacturer = "ZZ Synthetic AI";
  in->device.model_name = variant == 1 ? NULL : "ZZ-BD-2";
  in->device.device_uid = "2.25.202611270000000000000000000000000099";
  if (variant == 2) {
    s->purpose = (rr_dicom_code_t){"DCM", "109102", "Processing Equipment"};
    in->device.purpose_of_reference = &s->purpose;
    in->series_description = "AI Results second opinion";
    in->series_number = 901;
    in->instance_number = 3;
  }
  in->procedure = (rr_dicom_code_t){"LN", "24725-4", "CT Head"};
  in->findings = s->findings;
  in->n_findings = 2;
  in->out_path = s->path;
}

/* Every element tag (e.g. "0008,1155") of the file at path, with its
 * sequence path, as dcmdump prints it (free it); NULL on failure. */
static char *dump_paths(const char *path, const char *tag, const char *name) {
  char out[400];
  snprintf(out, sizeof out, "%s/%s.dcmdump.txt", dir, name);
  char *argv[] = {dcmdump, "+p", "+P", (char *)tag, (char *)path, NULL};
  if (run_tool(argv, out, NULL) != 0)
    return NULL;
  return slurp(out, NULL);
}

/* dsrdump of path (header, tree, instance UIDs, long values); NULL when it
 * fails. *clean is 1 when it printed no warning or error. */
static char *dsr_dump(const char *path, const char *name, int *clean) {
  char out[400];
  snprintf(out, sizeof out, "%s/%s.dsrdump.txt", dir, name);
  char *argv[] = {dsrdump, "+Pl", "+Pu", "+Psu", (char *)path, NULL};
  int rc = run_tool(argv, out, NULL);
  char *text = slurp(out, NULL);
  if (rc != 0) {
    fprintf(stderr, "dsrdump %s exited %d:\n%s\n", path, rc, text ? text : "");
    free(text);
    return NULL;
  }
  *clean = text && !strstr(text, "Warning") && !strstr(text, "Error") &&
           strncmp(text, "W: ", 3) != 0 && strncmp(text, "E: ", 3) != 0 && !strstr(text, "\nW: ") &&
           !strstr(text, "\nE: ");
  return text;
}

/* Writes s and reads the written file back once: what the writer chose
 * (tracking UIDs given as NULL) is then what every copy must hold. */
static int sr_write(sr_t *s) {
  rr_dicom_sr_error_t err;
  int rc = rr_dicom_sr_write(&s->in, &s->res, &err);
  CHECK_EQ_INT(rc, 0);
  if (rc) {
    fprintf(stderr, "%s: %s\n", s->name, err.text);
    return -1;
  }
  rr_dicom_sr_summary_t *sum = NULL;
  rc = rr_dicom_sr_read_summary(s->path, &sum, &err);
  CHECK_EQ_INT(rc, 0);
  if (rc || sum->n_findings != 2) {
    fprintf(stderr, "%s written: %s\n", s->name, err.text);
    rr_dicom_sr_summary_free(sum);
    return -1;
  }
  for (int i = 0; i < 2; i++) {
    const char *given = s->findings[i].tracking_uid;
    snprintf(s->tracking_uids[i], sizeof s->tracking_uids[i], "%s",
             given ? given : sum->findings[i].tracking_uid);
  }
  rr_dicom_sr_summary_free(sum);
  return 0;
}

static void check_code(const rr_dicom_code_t *got, const rr_dicom_code_t *want) {
  CHECK_STR(got->scheme, want->scheme);
  CHECK_STR(got->value, want->value);
  CHECK_STR(got->meaning, want->meaning);
}

static void check_measurement(const rr_dicom_sr_measurement_t *got,
                              const rr_dicom_sr_measurement_t *want) {
  check_code(&got->name, &want->name);
  CHECK(got->value == want->value);
  CHECK_STR(got->unit, want->unit);
  CHECK_STR(got->unit_meaning, want->unit_meaning ? want->unit_meaning : want->unit);
}

/* Every field rr_dicom_sr_read_summary gives back equals what s wrote. */
static void check_summary(const rr_dicom_sr_summary_t *sum, const sr_t *s) {
  const rr_dicom_sr_input_t *in = &s->in;
  CHECK_STR(sum->sop_class_uid, COMPREHENSIVE_3D_SR);
  CHECK_STR(sum->sop_instance_uid, s->res.sop_instance_uid);
  CHECK_STR(sum->study_instance_uid, ct.uid);
  CHECK_STR(sum->series_instance_uid, s->res.series_instance_uid);
  CHECK_STR(sum->template_id, "1500");
  check_code(&sum->title, &(rr_dicom_code_t){"DCM", "126000", "Imaging Measurement Report"});
  check_code(&sum->procedure, &in->procedure);

  /* observer context (Device Observer UID, Manufacturer, Model Name) and
   * Contributing Equipment (name, version, purpose) */
  CHECK_STR(sum->device.name, in->device.name);
  CHECK_STR(sum->device.version, in->device.version);
  CHECK_STR(sum->device.manufacturer, in->device.manufacturer);
  CHECK_STR(sum->device.model_name,
            in->device.model_name ? in->device.model_name : in->device.name);
  CHECK_STR(sum->device.device_uid, in->device.device_uid);
  CHECK(sum->device.purpose_of_reference != NULL);
  if (sum->device.purpose_of_reference)
    check_code(sum->device.purpose_of_reference,
               in->device.purpose_of_reference
                   ? in->device.purpose_of_reference
                   : &(rr_dicom_code_t){"DCM", "109103", "Modifying Equipment"});

  CHECK_EQ_INT(sum->n_evidence_instances, ct.n);
  CHECK_EQ_INT(sum->n_library_images, ct.n);
  CHECK_EQ_INT(sum->n_findings, in->n_findings);
  for (size_t i = 0; i < sum->n_findings && i < in->n_findings; i++) {
    const rr_dicom_sr_finding_t *got = &sum->findings[i], *want = &in->findings[i];
    check_code(&got->finding, &want->finding);
    CHECK_STR(got->tracking_id, want->tracking_id);
    CHECK_STR(got->tracking_uid, s->tracking_uids[i]);
    CHECK(got->confidence == want->confidence);
    const rr_dicom_sr_region_t *gr = &got->region, *wr = &want->region;
    CHECK_EQ_INT(gr->shape, wr->shape);
    CHECK_EQ_INT(gr->is_3d, wr->is_3d);
    CHECK_EQ_INT(gr->n_points, wr->n_points);
    size_t dims = wr->is_3d ? 3 : 2;
    if (gr->n_points == wr->n_points && gr->coords)
      for (size_t k = 0; k < wr->n_points * dims; k++)
        CHECK_FLOAT(gr->coords[k], wr->coords[k]);
    CHECK_EQ_INT(gr->frame, wr->frame);
    if (wr->is_3d) {
      CHECK_STR(gr->frame_of_reference_uid, wr->frame_of_reference_uid);
      CHECK_STR(gr->sop_instance_uid, "");
    } else {
      CHECK_STR(gr->sop_class_uid, wr->sop_class_uid);
      CHECK_STR(gr->sop_instance_uid, wr->sop_instance_uid);
      CHECK_STR(gr->frame_of_reference_uid, "");
    }
    CHECK_EQ_INT(got->n_measurements, want->n_measurements);
    for (size_t m = 0; m < got->n_measurements && m < want->n_measurements; m++)
      check_measurement(&got->measurements[m], &want->measurements[m]);
    CHECK_EQ_INT(got->n_evaluations, want->n_evaluations);
    for (size_t e = 0; e < got->n_evaluations && e < want->n_evaluations; e++) {
      check_code(&got->evaluations[e].name, &want->evaluations[e].name);
      check_code(&got->evaluations[e].value, &want->evaluations[e].value);
    }
  }
}

/* The references and the Contributing Equipment, as dcmdump reads them:
 * every CT instance in the evidence (0040,A375) and as a library IMAGE
 * (0040,A730), the first finding's image once more, all in the CT series;
 * one equipment item (0018,A001) with the device's manufacturer, name,
 * version and Device UID. */
static void check_dump(const char *path, const sr_t *s, const char *name) {
  char *refs = dump_paths(path, "0008,1155", name);
  CHECK(refs != NULL);
  for (size_t i = 0; refs && i < ct.n; i++) {
    char want[200];
    snprintf(want, sizeof want, "(0040,a375).(0008,1115).(0008,1199).(0008,1155) UI [%s]",
             ct.sops[i]);
    CHECK(strstr(refs, want) != NULL);
    snprintf(want, sizeof want, "(0008,1199).(0008,1155) UI [%s]", ct.sops[i]);
    size_t times = 0;
    for (const char *p = strstr(refs, want); p; p = strstr(p + 1, want))
      times++;
    /* evidence, Image Library, and the 2D region's SELECTED FROM image */
    CHECK_EQ_INT(times, strcmp(ct.sops[i], s->findings[0].region.sop_instance_uid) == 0 ? 3 : 2);
  }
  free(refs);
  char *series = dump_paths(path, "0020,000e", name);
  char want[200];
  snprintf(want, sizeof want, "(0040,a375).(0008,1115).(0020,000e) UI [%s]", ct.series_uid);
  CHECK(series && strstr(series, want) != NULL);
  free(series);

  char *eq = dump_paths(path, "0018,a001", name);
  CHECK(eq != NULL);
  if (!eq)
    return;
  const rr_dicom_sr_device_t *d = &s->in.device;
  static const char *const items[][2] = {
      {"0008,0070", "LO"}, {"0008,1090", "LO"}, {"0018,1020", "LO"}, {"0018,1002", "UI"}};
  const char *values[] = {d->manufacturer, d->name, d->version, d->device_uid};
  for (size_t i = 0; i < 4; i++) {
    snprintf(want, sizeof want, "(%s) %s [%s]", items[i][0], items[i][1], values[i]);
    CHECK(strstr(eq, want) != NULL);
    if (!strstr(eq, want))
      fprintf(stderr, "%s: no \"%s\" in its Contributing Equipment:\n%s\n", name, want, eq);
  }
  size_t uids = 0;
  for (const char *p = strstr(eq, "(0018,1002) UI"); p; p = strstr(p + 1, "(0018,1002) UI"))
    uids++;
  CHECK_EQ_INT(uids, 1);
  free(eq);
}

/* ---- byte comparison ----------------------------------------------------- */

/* Offset of the dataset after a Part 10 meta header ((0002,0000) UL group
 * length first, as PS3.10 requires); 0 when data is not such a file. */
static size_t dataset_offset(const unsigned char *data, size_t len) {
  static const unsigned char group_length[8] = {0x02, 0x00, 0x00, 0x00, 'U', 'L', 0x04, 0x00};
  if (len < 144 || memcmp(data + 128, "DICM", 4) != 0 || memcmp(data + 132, group_length, 8) != 0)
    return 0;
  uint32_t n = (uint32_t)data[140] | (uint32_t)data[141] << 8 | (uint32_t)data[142] << 16 |
               (uint32_t)data[143] << 24;
  return 144u + n <= len ? 144u + n : 0;
}

/* 1 when the datasets (after the meta headers) of two files are the same
 * bytes; says where they first differ otherwise. */
static int same_dataset(const char *a, const char *b) {
  size_t na = 0, nb = 0;
  unsigned char *da = (unsigned char *)slurp(a, &na), *db = (unsigned char *)slurp(b, &nb);
  size_t oa = da ? dataset_offset(da, na) : 0, ob = db ? dataset_offset(db, nb) : 0;
  int same = oa && ob && na - oa == nb - ob && memcmp(da + oa, db + ob, na - oa) == 0;
  if (!same && oa && ob) {
    size_t k = 0;
    while (oa + k < na && ob + k < nb && da[oa + k] == db[ob + k])
      k++;
    fprintf(stderr, "datasets of %s (%zu bytes) and %s (%zu bytes) differ at dataset byte %zu\n", a,
            na - oa, b, nb - ob, k);
  }
  free(da);
  free(db);
  return same;
}

/* ---- DICOMweb ------------------------------------------------------------ */

static rr_http_client_t *http;
static rr_dicomweb_client_t *web;

typedef struct got {
  int calls;
  int status;
  long http;
  char message[512];
  size_t n, sent, stored, failed, files;
  struct {
    char study[65], series[65], sop[65], sop_class[65], modality[17];
    long series_number, instance_number;
  } m[MAX_MATCHES];
  int file_calls;
  char file_path[400], file_sop[65];
} got_t;

static void copy(char *dst, size_t cap, const char *s) {
  snprintf(dst, cap, "%s", s ? s : "");
}

static void on_done(void *ud, rr_dicomweb_op_t *op, const rr_dicomweb_outcome_t *o) {
  got_t *g = ud;
  (void)op;
  g->calls++;
  g->status = o->status;
  g->http = o->http_status;
  copy(g->message, sizeof g->message, o->message);
  g->n = o->result ? o->result->n : 0;
  for (size_t i = 0; i < g->n && i < MAX_MATCHES; i++) {
    const rr_dicomweb_match_t *m = &o->result->matches[i];
    copy(g->m[i].study, sizeof g->m[i].study, m->study_uid);
    copy(g->m[i].series, sizeof g->m[i].series, m->series_uid);
    copy(g->m[i].sop, sizeof g->m[i].sop, m->sop_instance_uid);
    copy(g->m[i].sop_class, sizeof g->m[i].sop_class, m->sop_class_uid);
    copy(g->m[i].modality, sizeof g->m[i].modality, m->modality);
    g->m[i].series_number = m->series_number;
    g->m[i].instance_number = m->instance_number;
  }
  g->sent = o->sent;
  g->stored = o->stored;
  g->failed = o->failed;
  g->files = o->files;
  if (o->status)
    fprintf(stderr, "DICOMweb: status %d (%s), HTTP %ld: %s\n", o->status,
            rr_dicomweb_strerror(o->status), o->http_status, o->message);
}

static int on_file(void *ud, const rr_dicomweb_file_t *f) {
  got_t *g = ud;
  g->file_calls++;
  copy(g->file_path, sizeof g->file_path, f->path);
  copy(g->file_sop, sizeof g->file_sop, f->sop_instance_uid);
  return 0;
}

static void stow(const char *const *paths, size_t n, got_t *g) {
  memset(g, 0, sizeof *g);
  int rc = rr_dicomweb_store(web, paths, n, on_done, g, NULL);
  CHECK_EQ_INT(rc, 0);
  if (rc == 0)
    CHECK(wait_flag(&g->calls, 120000, "STOW-RS"));
}

static void qido(const rr_dicomweb_query_t *q, got_t *g) {
  memset(g, 0, sizeof *g);
  int rc = rr_dicomweb_search(web, q, on_done, g, NULL);
  CHECK_EQ_INT(rc, 0);
  if (rc == 0)
    CHECK(wait_flag(&g->calls, 30000, "QIDO-RS"));
}

/* ---- C-STORE on the thread pool ------------------------------------------ */

typedef struct cstore {
  uv_work_t work;
  rr_dicom_scu_config_t cfg;
  const char *path;
  rr_dicom_scu_file_result_t result;
  rr_dicom_scu_report_t report;
  int rc;
  int done;
} cstore_t;

static void cstore_work(uv_work_t *w) {
  cstore_t *c = w->data;
  c->rc = rr_dicom_scu_store(&c->cfg, &c->path, 1, &c->result, &c->report);
}

static void cstore_after(uv_work_t *w, int status) {
  cstore_t *c = w->data;
  if (status)
    c->rc = status;
  c->done = 1;
}

/* ---- the round trips ----------------------------------------------------- */

static void test_store_ct_study(void) {
  got_t g;
  const char *paths[MAX_SLICES];
  for (size_t i = 0; i < ct.n; i++)
    paths[i] = ct.paths[i];
  stow(paths, ct.n, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.http, 200);
  CHECK_EQ_INT(g.sent, ct.n);
  CHECK_EQ_INT(g.stored, ct.n);
  CHECK_EQ_INT(g.failed, 0);
}

static void test_write_srs(void) {
  sr_input(&sr1, "sr1", 1);
  sr_input(&sr2, "sr2", 2);
  CHECK_EQ_INT(sr_write(&sr1), 0);
  CHECK_EQ_INT(sr_write(&sr2), 0);
  CHECK(strcmp(sr1.res.sop_instance_uid, sr2.res.sop_instance_uid) != 0);
  CHECK(strcmp(sr1.res.series_instance_uid, sr2.res.series_instance_uid) != 0);
  CHECK(strcmp(sr2.tracking_uids[0], sr2.tracking_uids[1]) != 0);
  /* what was written is what the rest of the test expects back */
  rr_dicom_sr_summary_t *sum = NULL;
  rr_dicom_sr_error_t err;
  const sr_t *both[] = {&sr1, &sr2};
  for (int i = 0; i < 2; i++) {
    CHECK_EQ_INT(rr_dicom_sr_read_summary(both[i]->path, &sum, &err), 0);
    if (sum)
      check_summary(sum, both[i]);
    rr_dicom_sr_summary_free(sum);
    sum = NULL;
  }
}

static void test_cstore_sr1(void) {
  cstore_t c;
  memset(&c, 0, sizeof c);
  c.work.data = &c;
  c.cfg.name = "sr-roundtrip";
  c.cfg.calling_ae = info("engine_aet");
  c.cfg.called_ae = info("aet");
  c.cfg.host = info("host");
  c.cfg.port = (int)json_integer_value(json_object_get(pacs_info, "dicom_port"));
  c.cfg.acse_timeout_s = 10;
  c.cfg.dimse_timeout_s = 30;
  c.path = sr1.path;
  CHECK_EQ_INT(uv_queue_work(&loop, &c.work, cstore_work, cstore_after), 0);
  CHECK(wait_flag(&c.done, 90000, "C-STORE"));
  CHECK_EQ_INT(c.rc, 0);
  if (c.rc)
    fprintf(stderr, "C-STORE: %s (%s)\n", rr_dicom_scu_strerror(c.rc), c.report.reason);
  CHECK_EQ_INT(c.report.stored, 1);
  CHECK_EQ_INT(c.report.failed, 0);
  CHECK_EQ_INT(c.result.outcome, RR_DICOM_SCU_STORED);
  CHECK_EQ_INT(c.result.status, 0);
}

static void test_stow_sr2(void) {
  got_t g;
  const char *paths[] = {sr2.path};
  stow(paths, 1, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.http, 200);
  CHECK_EQ_INT(g.stored, 1);
  CHECK_EQ_INT(g.failed, 0);
}

/* QIDO-RS finds s in the study by its SOP Instance UID and by Modality SR. */
static void find_sr(const sr_t *s) {
  static const char *const include[] = {"Modality", "SeriesInstanceUID", "SeriesNumber",
                                        "InstanceNumber"};
  rr_dicomweb_param_t p[2] = {{"SOPInstanceUID", s->res.sop_instance_uid}, {"Modality", "SR"}};
  rr_dicomweb_query_t q;
  memset(&q, 0, sizeof q);
  q.level = RR_DICOMWEB_INSTANCES;
  q.study_uid = ct.uid;
  q.params = p;
  q.nparams = 2;
  q.includefields = include;
  q.nincludefields = 4;
  got_t g;
  qido(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 1);
  if (g.n == 1) {
    CHECK_STR(g.m[0].sop, s->res.sop_instance_uid);
    CHECK_STR(g.m[0].sop_class, COMPREHENSIVE_3D_SR);
    CHECK_STR(g.m[0].series, s->res.series_instance_uid);
    CHECK_STR(g.m[0].study, ct.uid);
    CHECK_STR(g.m[0].modality, "SR");
    CHECK_EQ_INT(g.m[0].series_number, s->in.series_number > 0 ? s->in.series_number : 900);
    CHECK_EQ_INT(g.m[0].instance_number, s->in.instance_number > 0 ? s->in.instance_number : 1);
  }
  /* the same UID with the CT modality matches nothing */
  p[1].value = "CT";
  qido(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, 0);
}

static void test_qido(void) {
  find_sr(&sr1);
  find_sr(&sr2);
  /* the study holds the CT slices and exactly the two SRs */
  rr_dicomweb_param_t p = {"Modality", "SR"};
  rr_dicomweb_query_t q;
  memset(&q, 0, sizeof q);
  q.level = RR_DICOMWEB_INSTANCES;
  q.study_uid = ct.uid;
  got_t g;
  qido(&q, &g);
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.n, ct.n + 2);
  q.params = &p;
  q.nparams = 1;
  qido(&q, &g);
  CHECK_EQ_INT(g.n, 2);
  int seen = 0;
  for (size_t i = 0; i < g.n && i < MAX_MATCHES; i++)
    seen |= (strcmp(g.m[i].sop, sr1.res.sop_instance_uid) == 0 ? 1 : 0) |
            (strcmp(g.m[i].sop, sr2.res.sop_instance_uid) == 0 ? 2 : 0);
  CHECK_EQ_INT(seen, 3);
}

/* path re-encoded by dcmconv with explicit lengths for every sequence and
 * item (what DCMTK-based receivers such as Orthanc's C-STORE SCP write)
 * into out; 0 on success. */
static int explicit_lengths(const char *path, const char *out) {
  char log[420];
  snprintf(log, sizeof log, "%s.dcmconv.log", out);
  char *argv[] = {dcmconv, "+e", (char *)path, (char *)out, NULL};
  return run_tool(argv, log, NULL);
}

/* WADO-RS of s into its own directory, then every comparison. as_received:
 * the PACS got s's file as bytes (STOW-RS) rather than as a DIMSE dataset
 * (C-STORE). */
static void retrieve_and_compare(const sr_t *s, int as_received) {
  char out[300];
  snprintf(out, sizeof out, "%s/wado-%s", dir, s->name);
  CHECK_EQ_INT(mkdir(out, 0700), 0);
  got_t g;
  memset(&g, 0, sizeof g);
  int rc = rr_dicomweb_retrieve(web, ct.uid, s->res.series_instance_uid, s->res.sop_instance_uid,
                                out, on_file, on_done, &g, NULL);
  CHECK_EQ_INT(rc, 0);
  if (rc || !wait_flag(&g.calls, 60000, "WADO-RS")) {
    CHECK(!"retrieved");
    return;
  }
  CHECK_EQ_INT(g.status, 0);
  CHECK_EQ_INT(g.http, 200);
  CHECK_EQ_INT(g.files, 1);
  CHECK_EQ_INT(g.file_calls, 1);
  CHECK_STR(g.file_sop, s->res.sop_instance_uid);
  char want_path[400];
  snprintf(want_path, sizeof want_path, "%s/%s.dcm", out, s->res.sop_instance_uid);
  CHECK_STR(g.file_path, want_path);
  if (g.file_calls != 1)
    return;

  /* meta header: our transfer syntax (its SOP Instance UID is file_sop) */
  char *dump = dump_paths(g.file_path, "0002,0010", s->name);
  CHECK(dump && strstr(dump, "(0002,0010) UI =LittleEndianExplicit") != NULL);
  free(dump);

  rr_dicom_sr_summary_t *sum = NULL;
  rr_dicom_sr_error_t err;
  rc = rr_dicom_sr_read_summary(g.file_path, &sum, &err);
  CHECK_EQ_INT(rc, 0);
  if (rc)
    fprintf(stderr, "%s retrieved: %s\n", s->name, err.text);
  if (sum)
    check_summary(sum, s);
  rr_dicom_sr_summary_free(sum);
  check_dump(g.file_path, s, s->name);

  /* DCMTK accepts the retrieved document without a word, and prints it
   * exactly as the written one */
  int clean_written = 0, clean_got = 0;
  char written_name[64];
  snprintf(written_name, sizeof written_name, "%s-written", s->name);
  char *a = dsr_dump(s->path, written_name, &clean_written);
  char *b = dsr_dump(g.file_path, s->name, &clean_got);
  CHECK(a && b);
  CHECK(clean_written);
  CHECK(clean_got);
  CHECK(a && b && strcmp(a, b) == 0);
  if (b && !clean_got)
    fprintf(stderr, "dsrdump of the retrieved %s:\n%s\n", s->name, b);
  free(a);
  free(b);

  if (as_received) {
    /* STOW-RS: Orthanc stores the part as it came; only the meta header
     * may differ from ours */
    CHECK(same_dataset(s->path, g.file_path));
  } else {
    /* C-STORE: Orthanc re-serializes the dataset it received with explicit
     * sequence and item lengths (ours are undefined), changing nothing
     * else: the datasets are the same bytes once ours is re-encoded so */
    char explicit_path[400];
    snprintf(explicit_path, sizeof explicit_path, "%s/%s-explicit.dcm", dir, s->name);
    CHECK_EQ_INT(explicit_lengths(s->path, explicit_path), 0);
    CHECK(same_dataset(explicit_path, g.file_path));
  }
}

static void test_wado_sr1(void) {
  retrieve_and_compare(&sr1, 0);
}

static void test_wado_sr2(void) {
  retrieve_and_compare(&sr2, 1);
}

/* ---- main ---------------------------------------------------------------- */

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
  if (access(dsrdump, X_OK) != 0 || access(dcmdump, X_OK) != 0 || access(dcmconv, X_OK) != 0) {
    fprintf(stderr, "DCMTK's dsrdump, dcmdump or dcmconv is missing (dcmtk)\n");
    return -1;
  }
  return 0;
}

static void remove_dir(void) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "cannot remove %s\n", dir);
}

static void on_http_closed(void *ud) {
  (*(int *)ud)++;
}

static int new_web_client(void) {
  char pwfile[300];
  snprintf(pwfile, sizeof pwfile, "%s/password", dir);
  FILE *f = fopen(pwfile, "w");
  if (!f || fprintf(f, "%s\n", info("password") ? info("password") : "") < 0 || fclose(f) != 0)
    return -1;
  rr_dicomweb_config_t cfg;
  rr_dicomweb_config_default(&cfg);
  cfg.name = "orthanc";
  cfg.base_url = info("dicomweb_url");
  cfg.auth = RR_DICOMWEB_AUTH_BASIC;
  cfg.user = info("user");
  cfg.password_file = pwfile;
  cfg.connect_timeout_ms = 5000;
  cfg.timeout_ms = 30000;
  cfg.bulk_timeout_ms = 120000;
  cfg.no_fsync = 1;
  rr_buf_t err;
  rr_buf_init(&err, 1024);
  int rc = rr_http_client_new(&loop, NULL, &http);
  if (rc == 0)
    rc = rr_dicomweb_client_new(http, &cfg, &web, &err);
  if (rc)
    fprintf(stderr, "DICOMweb client: %s %s\n", rr_dicomweb_strerror(rc), err.data ? err.data : "");
  rr_buf_close(&err);
  return rc;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s PYTHON ORTHANC_PY MAKE_STUDY DSRDUMP DCMDUMP DCMCONV\n", argv[0]);
    return 2;
  }
  python = argv[1];
  orthanc_py = argv[2];
  make_study = argv[3];
  dsrdump = argv[4];
  dcmdump = argv[5];
  dcmconv = argv[6];
  signal(SIGPIPE, SIG_IGN);
  const char *v = getenv("RR_TEST_VERBOSE");
  rr_log_set_level(v && v[0] == '1' ? RR_LOG_DEBUG : RR_LOG_ERROR);
  if (prerequisites() != 0) {
    printf("skipped: the PACS peer or DCMTK's tools cannot run here\n");
    return SKIP;
  }
  snprintf(dir, sizeof dir, "/tmp/rr-sr-roundtrip-XXXXXX");
  if (!mkdtemp(dir))
    return 2;
  if (make_ct_study() != 0) {
    fprintf(stderr, "make-study failed (see %s)\n", dir);
    return 2;
  }
  uv_loop_init(&loop);
  uv_timer_init(&loop, &tick);
  int rc = 2;
  if (pacs_start() != 0) {
    fprintf(stderr, "Orthanc did not start (see %s/pacs)\n", dir);
  } else if (new_web_client() == 0) {
    RUN(test_store_ct_study);
    RUN(test_write_srs);
    if (rr_tests_failed == 0) {
      RUN(test_cstore_sr1);
      RUN(test_stow_sr2);
      RUN(test_qido);
      RUN(test_wado_sr1);
      RUN(test_wado_sr2);
    }
    rc = TEST_SUMMARY();
  }
  rr_dicomweb_client_free(web);
  if (http) {
    int closed = 0;
    rr_http_client_close(http, on_http_closed, &closed);
    wait_flag(&closed, 10000, "the HTTP client to close");
  }
  pacs_stop();
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0 && rc == 0) {
    fprintf(stderr, "handles left open on the loop\n");
    rc = 1;
  }
  json_decref(pacs_info);
  json_decref(ct.j);
  if (rc == 0)
    remove_dir();
  else
    printf("files kept in %s\n", dir);
  return rc;
}

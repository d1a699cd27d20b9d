/* The SR writer/reader (engine/dicom/sr.h): a TID 1500 report of two
 * findings on a synthetic CT made with dump2dcm (patient ZZTEST^SR), read
 * back through rr_dicom_sr_read_summary, dumped by DCMTK's dsrdump (no
 * warnings) and dcmdump (copied study attributes, Contributing Equipment).
 *
 *   test_dicom_sr <dump2dcm> <dsrdump> <dcmdump>
 */
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dicom/sr.h"
#include "rr_test.h"

#define CT_STORAGE "1.2.840.10008.5.1.4.1.1.2"
#define COMPREHENSIVE_3D_SR "1.2.840.10008.5.1.4.1.1.88.34"
#define DEVICE_UID "2.25.271828182845904523536028747135266249"
#define FOR_UID "2.25.314159265358979323846264338327950288"

static const char *g_dump2dcm, *g_dsrdump, *g_dcmdump;
static char g_work[256];
static char g_study[80], g_series[80], g_inst[2][80], g_ct[2][300];

/* Runs argv with stdout and stderr into out (truncated); exit status or -1. */
static int run(char *const argv[], const char *out) {
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
      _exit(127);
    dup2(fd, 1);
    dup2(fd, 2);
    close(fd);
    execv(argv[0], argv);
    _exit(127);
  }
  int st = 0;
  if (waitpid(pid, &st, 0) != pid)
    return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static char *slurp(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  if (buf)
    buf[n] = 0;
  fclose(f);
  return buf;
}

static int make_ct(const char *path, int instance) {
  char dump[320], raw[320], log[320];
  snprintf(dump, sizeof(dump), "%s.dump", path);
  snprintf(raw, sizeof(raw), "%s.raw", path);
  snprintf(log, sizeof(log), "%s/dump2dcm.log", g_work);
  FILE *f = fopen(raw, "wb");
  if (!f)
    return -1;
  for (int i = 0; i < 16 * 16; i++) {
    unsigned short v = (unsigned short)(i * 3 + instance);
    fwrite(&v, 2, 1, f);
  }
  fclose(f);
  f = fopen(dump, "w");
  if (!f)
    return -1;
  fprintf(f,
          "(0008,0016) UI [" CT_STORAGE "]\n"
          "(0008,0018) UI [%s]\n"
          "(0008,0020) DA [20240102]\n"
          "(0008,0030) TM [101500]\n"
          "(0008,0050) SH [ZZACC0042]\n"
          "(0008,0060) CS [CT]\n"
          "(0008,0090) PN [ZZREFERRER^DOC]\n"
          "(0008,1030) LO [ZZTEST HEAD CT]\n"
          "(0010,0010) PN [ZZTEST^SR]\n"
          "(0010,0020) LO [ZZ000042]\n"
          "(0010,0030) DA [19700101]\n"
          "(0010,0040) CS [O]\n"
          "(0020,000d) UI [%s]\n"
          "(0020,000e) UI [%s]\n"
          "(0020,0010) SH [ZZSTUDY7]\n"
          "(0020,0011) IS [1]\n"
          "(0020,0013) IS [%d]\n"
          "(0020,0032) DS [-120\\-120\\%d]\n"
          "(0020,0037) DS [1\\0\\0\\0\\1\\0]\n"
          "(0020,0052) UI [" FOR_UID "]\n"
          "(0028,0002) US 1\n"
          "(0028,0004) CS [MONOCHROME2]\n"
          "(0028,0010) US 16\n"
          "(0028,0011) US 16\n"
          "(0028,0030) DS [15\\15]\n"
          "(0028,0100) US 16\n"
          "(0028,0101) US 16\n"
          "(0028,0102) US 15\n"
          "(0028,0103) US 0\n"
          "(7fe0,0010) OW =%s\n",
          g_inst[instance - 1], g_study, g_series, instance, instance * 5, raw);
  fclose(f);
  char *argv[] = {(char *)g_dump2dcm, "+te", dump, (char *)path, NULL};
  int rc = run(argv, log);
  unlink(raw);
  unlink(dump);
  return rc;
}

/* ---- the report ---------------------------------------------------------- */

static const double g_point2d[] = {7.5, 9.25};
static const double g_point3d[] = {-31.5, 12.0, 7.5};
static const rr_dicom_sr_measurement_t g_m1[] = {
    {{"SCT", "410668003", "Length"}, 12.5, "mm", "millimeter"},
    {{"SCT", "118565006", "Volume"}, 1530.25, "mm3", "cubic millimeter"},
};
static const rr_dicom_sr_measurement_t g_m2[] = {
    {{"DCM", "112031", "Attenuation Coefficient"}, 64, "[hnsf'U]", "Hounsfield unit"},
};
static const rr_dicom_sr_evaluation_t g_e1[] = {
    {{"RADLEX", "RID50259", "Category"}, {"RADLEX", "RID50296", "Category 4"}},
};
static const char *g_classes[2] = {CT_STORAGE, CT_STORAGE};
static const char *g_instances[2];
static rr_dicom_sr_series_ref_t g_refs[1];
static rr_dicom_sr_finding_t g_findings[2];

static rr_dicom_sr_input_t base_input(const char *out) {
  g_instances[0] = g_inst[0];
  g_instances[1] = g_inst[1];
  g_refs[0].series_instance_uid = g_series;
  g_refs[0].sop_class_uids = g_classes;
  g_refs[0].sop_instance_uids = g_instances;
  g_refs[0].n_instances = 2;

  memset(g_findings, 0, sizeof(g_findings));
  rr_dicom_sr_finding_t *f = &g_findings[0];
  f->finding = (rr_dicom_code_t){"SCT", "50960005", "Hemorrhage"};
  f->tracking_id = "bleed-1";
  f->confidence = 0.87;
  f->region.shape = RR_DICOM_SR_POINT;
  f->region.coords = g_point2d;
  f->region.n_points = 1;
  f->region.sop_class_uid = CT_STORAGE;
  f->region.sop_instance_uid = g_inst[1];
  f->measurements = g_m1;
  f->n_measurements = 2;
  f->evaluations = g_e1;
  f->n_evaluations = 1;
  f = &g_findings[1];
  f->finding = (rr_dicom_code_t){"SCT", "27925004", "Nodule"};
  f->tracking_id = "nodule-1";
  f->tracking_uid = "2.25.1234567890123456789";
  f->confidence = 0.42;
  f->region.shape = RR_DICOM_SR_POINT;
  f->region.is_3d = 1;
  f->region.coords = g_point3d;
  f->region.n_points = 1;
  f->region.frame_of_reference_uid = FOR_UID;
  f->measurements = g_m2;
  f->n_measurements = 1;

  rr_dicom_sr_input_t in;
  memset(&in, 0, sizeof(in));
  in.source_path = g_ct[0];
  in.series = g_refs;
  in.n_series = 1;
  in.device.name = "ZZ Bleed Detector";
  in.device.version = "2.1.0";
  in.device.manufacturer = "ZZ AI Vendor";
  in.device.model_name = "ZZBD";
  in.device.device_uid = DEVICE_UID;
  in.procedure = (rr_dicom_code_t){"LN", "24725-4", "CT Head"};
  in.findings = g_findings;
  in.n_findings = 2;
  in.out_path = out;
  return in;
}

static int streq(const char *a, const char *b) {
  return a && b && strcmp(a, b) == 0;
}

static int same_code(rr_dicom_code_t a, rr_dicom_code_t b) {
  return streq(a.scheme, b.scheme) && streq(a.value, b.value) && streq(a.meaning, b.meaning);
}

static int count_entries(const char *dir) {
  DIR *d = opendir(dir);
  if (!d)
    return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)))
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
      n++;
  closedir(d);
  return n;
}

/* ---- cases ----------------------------------------------------------------- */

static char g_sr[512];
static rr_dicom_sr_result_t g_res;

static void test_write_and_read_back(void) {
  char dir[400];
  snprintf(dir, sizeof(dir), "%s/out", g_work);
  mkdir(dir, 0700);
  snprintf(g_sr, sizeof(g_sr), "%s/report.dcm", dir);
  rr_dicom_sr_input_t in = base_input(g_sr);
  rr_dicom_sr_error_t err;
  int rc = rr_dicom_sr_write(&in, &g_res, &err);
  CHECK_EQ_INT(rc, 0);
  if (rc)
    fprintf(stderr, "write: %s (%s)\n", rr_dicom_scp_strerror(rc), err.text);
  CHECK(strncmp(g_res.sop_instance_uid, "2.25.", 5) == 0);
  CHECK(strncmp(g_res.series_instance_uid, "2.25.", 5) == 0);
  CHECK(strcmp(g_res.sop_instance_uid, g_res.series_instance_uid) != 0);
  CHECK_EQ_INT(count_entries(dir), 1); /* no temporary file left */

  rr_dicom_sr_summary_t *s = NULL;
  rc = rr_dicom_sr_read_summary(g_sr, &s, &err);
  CHECK_EQ_INT(rc, 0);
  if (rc) {
    fprintf(stderr, "read: %s\n", err.text);
    return;
  }
  CHECK(streq(s->sop_class_uid, COMPREHENSIVE_3D_SR));
  CHECK(streq(s->sop_instance_uid, g_res.sop_instance_uid));
  CHECK(streq(s->series_instance_uid, g_res.series_instance_uid));
  CHECK(streq(s->study_instance_uid, g_study));
  CHECK(streq(s->template_id, "1500"));
  CHECK(same_code(s->title, (rr_dicom_code_t){"DCM", "126000", "Imaging Measurement Report"}));
  CHECK(same_code(s->procedure, in.procedure));
  CHECK(streq(s->device.name, "ZZ Bleed Detector"));
  CHECK(streq(s->device.version, "2.1.0"));
  CHECK(streq(s->device.manufacturer, "ZZ AI Vendor"));
  CHECK(streq(s->device.model_name, "ZZBD"));
  CHECK(streq(s->device.device_uid, DEVICE_UID));
  CHECK(s->device.purpose_of_reference &&
        same_code(*s->device.purpose_of_reference,
                  (rr_dicom_code_t){"DCM", "109103", "Modifying Equipment"}));
  CHECK_EQ_INT(s->n_evidence_instances, 2);
  CHECK_EQ_INT(s->n_library_images, 2);
  CHECK_EQ_INT(s->n_findings, 2);
  if (s->n_findings == 2) {
    const rr_dicom_sr_finding_t *a = &s->findings[0], *b = &s->findings[1];
    CHECK(same_code(a->finding, g_findings[0].finding));
    CHECK(streq(a->tracking_id, "bleed-1"));
    CHECK(strncmp(a->tracking_uid, "2.25.", 5) == 0);
    CHECK(fabs(a->confidence - 0.87) < 1e-9);
    CHECK_EQ_INT(a->region.shape, RR_DICOM_SR_POINT);
    CHECK_EQ_INT(a->region.is_3d, 0);
    CHECK_EQ_INT(a->region.n_points, 1);
    CHECK(a->region.n_points == 1 && a->region.coords[0] == 7.5 && a->region.coords[1] == 9.25);
    CHECK(streq(a->region.sop_class_uid, CT_STORAGE));
    CHECK(streq(a->region.sop_instance_uid, g_inst[1]));
    CHECK_EQ_INT(a->n_measurements, 2);
    for (size_t i = 0; i < a->n_measurements && i < 2; i++) {
      CHECK(same_code(a->measurements[i].name, g_m1[i].name));
      CHECK(fabs(a->measurements[i].value - g_m1[i].value) < 1e-9);
      CHECK(streq(a->measurements[i].unit, g_m1[i].unit));
      CHECK(streq(a->measurements[i].unit_meaning, g_m1[i].unit_meaning));
    }
    CHECK_EQ_INT(a->n_evaluations, 1);
    if (a->n_evaluations == 1) {
      CHECK(same_code(a->evaluations[0].name, g_e1[0].name));
      CHECK(same_code(a->evaluations[0].value, g_e1[0].value));
    }
    CHECK(same_code(b->finding, g_findings[1].finding));
    CHECK(streq(b->tracking_id, "nodule-1"));
    CHECK(streq(b->tracking_uid, "2.25.1234567890123456789"));
    CHECK(fabs(b->confidence - 0.42) < 1e-9);
    CHECK_EQ_INT(b->region.shape, RR_DICOM_SR_POINT);
    CHECK_EQ_INT(b->region.is_3d, 1);
    CHECK(b->region.n_points == 1 && b->region.coords[0] == -31.5 && b->region.coords[1] == 12.0 &&
          b->region.coords[2] == 7.5);
    CHECK(streq(b->region.frame_of_reference_uid, FOR_UID));
    CHECK_EQ_INT(b->n_measurements, 1);
    if (b->n_measurements == 1) {
      CHECK(same_code(b->measurements[0].name, g_m2[0].name));
      CHECK(b->measurements[0].value == 64);
      CHECK(streq(b->measurements[0].unit, "[hnsf'U]"));
    }
    CHECK_EQ_INT(b->n_evaluations, 0);
  }
  rr_dicom_sr_summary_free(s);
}

/* Lines of out that look like DCMTK log warnings or errors. */
static int bad_lines(const char *text) {
  int n = 0;
  const char *p = text;
  while (p && *p) {
    const char *e = strchr(p, '\n');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    if ((len >= 2 && (p[0] == 'W' || p[0] == 'E' || p[0] == 'F') && p[1] == ':') ||
        memmem(p, len, "Warning", 7) || memmem(p, len, "Error", 5)) {
      fprintf(stderr, "dsrdump: %.*s\n", (int)len, p);
      n++;
    }
    p = e ? e + 1 : NULL;
  }
  return n;
}

static void test_dsrdump(void) {
  char out[512];
  snprintf(out, sizeof(out), "%s/dsrdump.txt", g_work);
  char *argv[] = {(char *)g_dsrdump, "-v", "+Pc", "+Pt", "+Pu", "+Pl", (char *)g_sr, NULL};
  CHECK_EQ_INT(run(argv, out), 0);
  char *text = slurp(out);
  CHECK(text != NULL);
  if (!text)
    return;
  CHECK_EQ_INT(bad_lines(text), 0);
  CHECK(strstr(text, "Comprehensive 3D SR") != NULL);
  CHECK(strstr(text, "ZZ Bleed Detector") != NULL);
  CHECK(strstr(text, DEVICE_UID) != NULL);
  CHECK(strstr(text, "50960005") != NULL);
  CHECK(strstr(text, "27925004") != NULL);
  CHECK(strstr(text, "410668003") != NULL);
  CHECK(strstr(text, "# TID 1500 (DCMR)") != NULL);
  CHECK(strstr(text, "SCOORD3D") != NULL);
  CHECK(strstr(text, "ZZTEST^SR") != NULL);
  free(text);
}

static void test_dcmdump_attributes(void) {
  char out[512];
  snprintf(out, sizeof(out), "%s/dcmdump.txt", g_work);
  char *argv[] = {(char *)g_dcmdump, "-q", (char *)g_sr, NULL};
  CHECK_EQ_INT(run(argv, out), 0);
  char *text = slurp(out);
  CHECK(text != NULL);
  if (!text)
    return;
  CHECK(strstr(text, "[ZZTEST^SR]") != NULL);
  CHECK(strstr(text, "[ZZ000042]") != NULL);
  CHECK(strstr(text, "[19700101]") != NULL);
  CHECK(strstr(text, "(0010,0040) CS [O]") != NULL);
  CHECK(strstr(text, "[ZZACC0042]") != NULL);
  CHECK(strstr(text, "[ZZREFERRER^DOC]") != NULL);
  CHECK(strstr(text, "(0020,0010) SH [ZZSTUDY7]") != NULL);
  CHECK(strstr(text, "(0008,0020) DA [20240102]") != NULL);
  CHECK(strstr(text, "(0008,0030) TM [101500]") != NULL);
  CHECK(strstr(text, "(0008,0060) CS [SR]") != NULL);
  CHECK(strstr(text, "(0008,103e) LO [AI Results]") != NULL);
  CHECK(strstr(text, "(0018,a001) SQ") != NULL);
  CHECK(strstr(text, "(0018,1002) UI [" DEVICE_UID "]") != NULL);
  CHECK(strstr(text, "(0018,1020) LO [2.1.0]") != NULL);
  CHECK(strstr(text, "(0040,a375) SQ") != NULL); /* evidence */
  free(text);
}

static void test_caller_series_and_utf8(void) {
  char path[512];
  snprintf(path, sizeof(path), "%s/report2.dcm", g_work);
  rr_dicom_sr_input_t in = base_input(path);
  in.series_instance_uid = "2.25.99887766554433221100";
  in.series_description = "ZZ AI Ergebnisse";
  in.series_number = 77;
  g_findings[0].tracking_id = "Blutung \xc3\xa4"; /* a-umlaut in UTF-8 */
  rr_dicom_sr_result_t res;
  rr_dicom_sr_error_t err;
  int rc = rr_dicom_sr_write(&in, &res, &err);
  CHECK_EQ_INT(rc, 0);
  if (rc)
    fprintf(stderr, "write: %s\n", err.text);
  CHECK(streq(res.series_instance_uid, "2.25.99887766554433221100"));
  rr_dicom_sr_summary_t *s = NULL;
  CHECK_EQ_INT(rr_dicom_sr_read_summary(path, &s, &err), 0);
  if (s) {
    CHECK(streq(s->series_instance_uid, "2.25.99887766554433221100"));
    CHECK(s->n_findings == 2 && streq(s->findings[0].tracking_id, "Blutung \xc3\xa4"));
    rr_dicom_sr_summary_free(s);
  }
  char out[512];
  snprintf(out, sizeof(out), "%s/dcmdump2.txt", g_work);
  char *argv[] = {(char *)g_dcmdump, "-q", path, NULL};
  CHECK_EQ_INT(run(argv, out), 0);
  char *text = slurp(out);
  CHECK(text && strstr(text, "(0008,0005) CS [ISO_IR 192]"));
  CHECK(text && strstr(text, "(0020,0011) IS [77]"));
  free(text);
}

/* The same document written again (an SR whose file was lost): the SOP
 * Instance UID is the caller's, from rr_dicom_sr_new_uid. */
static void test_caller_sop_uid(void) {
  char uid[65], path[512];
  CHECK_EQ_INT(rr_dicom_sr_new_uid(uid), 0);
  CHECK(strncmp(uid, "2.25.", 5) == 0 && strlen(uid) > 30 && strlen(uid) <= 64);
  char other[65];
  CHECK_EQ_INT(rr_dicom_sr_new_uid(other), 0);
  CHECK(strcmp(uid, other) != 0);
  snprintf(path, sizeof(path), "%s/again.dcm", g_work);
  rr_dicom_sr_input_t in = base_input(path);
  in.sop_instance_uid = uid;
  rr_dicom_sr_result_t res;
  rr_dicom_sr_error_t err;
  CHECK_EQ_INT(rr_dicom_sr_write(&in, &res, &err), 0);
  CHECK(streq(res.sop_instance_uid, uid));
  rr_dicom_sr_summary_t *s = NULL;
  CHECK_EQ_INT(rr_dicom_sr_read_summary(path, &s, &err), 0);
  if (s) {
    CHECK(streq(s->sop_instance_uid, uid));
    rr_dicom_sr_summary_free(s);
  }
  in.sop_instance_uid = "2.25.x";
  CHECK_EQ_INT(rr_dicom_sr_write(&in, NULL, &err), RR_EINVAL);
  CHECK(strstr(err.text, "SOP instance UID") != NULL);
}

static void test_invalid_input(void) {
  char dir[400], path[512];
  snprintf(dir, sizeof(dir), "%s/bad", g_work);
  mkdir(dir, 0700);
  snprintf(path, sizeof(path), "%s/x.dcm", dir);
  rr_dicom_sr_error_t err;

  rr_dicom_sr_input_t in = base_input(path);
  in.device.device_uid = "not-a-uid";
  CHECK_EQ_INT(rr_dicom_sr_write(&in, NULL, &err), RR_EINVAL);
  CHECK(strstr(err.text, "device UID") != NULL);

  in = base_input(path);
  g_findings[0].region.sop_instance_uid = "2.25.424242";
  CHECK_EQ_INT(rr_dicom_sr_write(&in, NULL, &err), RR_EINVAL);
  CHECK(strstr(err.text, "not among the referenced") != NULL);

  in = base_input(path);
  g_findings[1].confidence = 1.5;
  CHECK_EQ_INT(rr_dicom_sr_write(&in, NULL, &err), RR_EINVAL);

  in = base_input(path);
  g_findings[0].region.shape = RR_DICOM_SR_ELLIPSE; /* one point only */
  CHECK_EQ_INT(rr_dicom_sr_write(&in, NULL, &err), RR_EINVAL);

  in = base_input(path);
  in.procedure.meaning = NULL;
  CHECK_EQ_INT(rr_dicom_sr_write(&in, NULL, &err), RR_EINVAL);

  in = base_input(path);
  char missing[512];
  snprintf(missing, sizeof(missing), "%s/none.dcm", g_work);
  in.source_path = missing;
  CHECK_EQ_INT(rr_dicom_sr_write(&in, NULL, &err), RR_ENOTFOUND);

  in = base_input(path);
  char nodir[512];
  snprintf(nodir, sizeof(nodir), "%s/nodir/x.dcm", g_work);
  in.out_path = nodir;
  int rc = rr_dicom_sr_write(&in, NULL, &err);
  CHECK(rc != 0);
  CHECK(err.text[0] != 0);

  CHECK_EQ_INT(count_entries(dir), 0); /* nothing written for any of them */

  rr_dicom_sr_summary_t *s = (rr_dicom_sr_summary_t *)1;
  CHECK_EQ_INT(rr_dicom_sr_read_summary(g_ct[0], &s, &err), RR_EPARSE);
  CHECK(s == NULL);
  CHECK_EQ_INT(rr_dicom_sr_read_summary(missing, &s, &err), RR_ENOTFOUND);
  rr_dicom_sr_summary_free(NULL);
}

static void rm_tree(const char *dir) {
  DIR *d = opendir(dir);
  if (!d)
    return;
  struct dirent *e;
  char p[600];
  while ((e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
      continue;
    snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
    struct stat st;
    if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode))
      rm_tree(p);
    else
      unlink(p);
  }
  closedir(d);
  rmdir(dir);
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: test_dicom_sr <dump2dcm> <dsrdump> <dcmdump>\n");
    return 2;
  }
  g_dump2dcm = argv[1];
  g_dsrdump = argv[2];
  g_dcmdump = argv[3];
  snprintf(g_work, sizeof(g_work), "/tmp/rr-dicom-sr-XXXXXX");
  if (!mkdtemp(g_work))
    return 2;
  unsigned tag = (unsigned)getpid() * 1000u + (unsigned)(time(NULL) % 1000);
  snprintf(g_study, sizeof(g_study), "2.25.%u1", tag);
  snprintf(g_series, sizeof(g_series), "2.25.%u2", tag);
  for (int i = 0; i < 2; i++) {
    snprintf(g_inst[i], sizeof(g_inst[i]), "2.25.%u3%d", tag, i + 1);
    snprintf(g_ct[i], sizeof(g_ct[i]), "%s/ct%d.dcm", g_work, i + 1);
    if (make_ct(g_ct[i], i + 1) != 0) {
      fprintf(stderr, "dump2dcm failed (see %s)\n", g_work);
      return 2;
    }
  }

  RUN(test_write_and_read_back);
  RUN(test_dsrdump);
  RUN(test_dcmdump_attributes);
  RUN(test_caller_series_and_utf8);
  RUN(test_caller_sop_uid);
  RUN(test_invalid_input);

  int rc = TEST_SUMMARY();
  if (rc == 0)
    rm_tree(g_work);
  else
    printf("files kept in %s\n", g_work);
  return rc;
}

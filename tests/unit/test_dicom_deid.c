/* The de-identifier (engine/dicom/deid.h) on a synthetic CT study with
 * planted identifying data (tests/unit/deid_fixture.py make): every
 * instance de-identified, the burned-in and Secondary Capture ones
 * refused, the result checked attribute by attribute with pydicom
 * (deid_fixture.py check: Basic Profile attributes gone or replaced,
 * private and overlay elements gone, UIDs the HMAC pseudonyms and
 * consistent across the study, pixel data byte-identical) and read by
 * DCMTK's dcmdump; the same secret gives the same bytes again, another
 * secret other pseudonyms.
 *
 *   test_dicom_deid <make-study> <deid_fixture.py> <dcmdump> <python3>
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/error.h"
#include "dicom/deid.h"
#include "rr_test.h"

#define SECRET "rr-test-deid-secret-0123456789abcdef"

static const char *g_make_study, *g_fixture, *g_dcmdump, *g_python;
static char g_work[256], g_in[300], g_out[300], g_out2[300];
static char g_study[80];

/* Runs argv with stdout and stderr into out; exit status or -1. */
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

static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
  if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  if (buf) {
    buf[n] = '\0';
    if (len)
      *len = (size_t)n;
  }
  return buf;
}

typedef struct uid_seen {
  char orig[80][65], pseudo[80][65];
  size_t n;
} uid_seen_t;

static void on_uid(void *ud, const char *orig, const char *pseudo) {
  uid_seen_t *s = ud;
  for (size_t i = 0; i < s->n; i++)
    if (strcmp(s->orig[i], orig) == 0)
      return;
  if (s->n < 80) {
    snprintf(s->orig[s->n], 65, "%s", orig);
    snprintf(s->pseudo[s->n], 65, "%s", pseudo);
    s->n++;
  }
}

/* De-identifies every file of g_in into dir; counts what was written and
 * refused. */
static void deid_all(const char *dir, const char *secret, uid_seen_t *seen, int *written,
                     int *refused) {
  DIR *d = opendir(g_in);
  CHECK(d != NULL);
  if (!d)
    return;
  mkdir(dir, 0700);
  *written = *refused = 0;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    if (de->d_name[0] == '.')
      continue;
    char in[600], out[600];
    snprintf(in, sizeof in, "%s/%s", g_in, de->d_name);
    snprintf(out, sizeof out, "%s/%s", dir, de->d_name);
    rr_dicom_deid_info_t info;
    int rc = rr_dicom_deid_file(in, out, secret, strlen(secret), on_uid, seen, &info);
    if (rc == 0) {
      (*written)++;
      CHECK(strcmp(info.modality, "CT") == 0);
      CHECK(strncmp(info.pseudo_study_uid, "2.25.", 5) == 0);
      CHECK(strcmp(info.pseudo_study_uid, info.study_uid) != 0);
      CHECK(info.removed > 40);
      char want[RR_DICOM_DEID_UID_MAX];
      CHECK_EQ_INT(rr_dicom_deid_uid(secret, strlen(secret), info.sop_uid, want), 0);
      CHECK(strcmp(want, info.pseudo_sop_uid) == 0);
    } else {
      (*refused)++;
      CHECK_EQ_INT(rc, RR_DICOM_EREFUSED);
      CHECK(access(out, F_OK) != 0); /* nothing written */
      if (strcmp(de->d_name, "burned.dcm") == 0)
        CHECK(strstr(info.why, "Burned In Annotation") != NULL);
      else
        CHECK(strcmp(de->d_name, "sc.dcm") == 0 && strstr(info.why, "SOP class") != NULL);
    }
  }
  closedir(d);
}

static void test_pseudonyms(void) {
  char a[RR_DICOM_DEID_UID_MAX], b[RR_DICOM_DEID_UID_MAX], c[RR_DICOM_DEID_UID_MAX];
  CHECK_EQ_INT(rr_dicom_deid_uid("k", 1, "1.2.3", a), 0);
  CHECK_EQ_INT(rr_dicom_deid_uid("k", 1, "1.2.3\0", b), 0);
  CHECK(strcmp(a, b) == 0);
  CHECK_EQ_INT(rr_dicom_deid_uid("k", 1, "1.2.3 ", b), 0); /* padding is not the UID */
  CHECK(strcmp(a, b) == 0);
  CHECK_EQ_INT(rr_dicom_deid_uid("l", 1, "1.2.3", c), 0);
  CHECK(strcmp(a, c) != 0);
  CHECK(strncmp(a, "2.25.", 5) == 0 && strlen(a) <= 44 && a[5] != '0');
  CHECK(strspn(a + 5, "0123456789") == strlen(a + 5));
  CHECK_EQ_INT(rr_dicom_deid_uid("k", 1, "", a), RR_EINVAL);
  CHECK_EQ_INT(rr_dicom_deid_uid(NULL, 0, "1.2", a), RR_EINVAL);
  char t[17];
  CHECK_EQ_INT(rr_dicom_deid_text("k", 1, "accession", "ACC1", t, sizeof t), 0);
  CHECK(strlen(t) == 16 && strncmp(t, "RR", 2) == 0);
  char u[17];
  CHECK_EQ_INT(rr_dicom_deid_text("k", 1, "patient_id", "ACC1", u, sizeof u), 0);
  CHECK(strcmp(t, u) != 0); /* kinds are kept apart */
  CHECK_EQ_INT(rr_dicom_deid_text("k", 1, "accession", "", u, sizeof u), 0);
  CHECK(u[0] == '\0');
  char small[8];
  CHECK_EQ_INT(rr_dicom_deid_text("k", 1, "accession", "A", small, sizeof small), RR_EINVAL);
}

static void test_study(void) {
  uid_seen_t *seen = calloc(1, sizeof *seen);
  int written = 0, refused = 0;
  deid_all(g_out, SECRET, seen, &written, &refused);
  CHECK_EQ_INT(written, 4);
  CHECK_EQ_INT(refused, 2);
  /* the map: the study once, under its pseudonym */
  bool found = false;
  for (size_t i = 0; i < seen->n; i++)
    if (strcmp(seen->orig[i], g_study) == 0) {
      char want[RR_DICOM_DEID_UID_MAX];
      rr_dicom_deid_uid(SECRET, strlen(SECRET), g_study, want);
      found = strcmp(want, seen->pseudo[i]) == 0;
    }
  CHECK(found);
  CHECK(seen->n >= 4 + 1 + 1 + 1); /* instances, study, series, frame of reference */
  /* pydicom's reading, attribute by attribute */
  char log[400];
  snprintf(log, sizeof log, "%s/check.log", g_work);
  char *argv[] = {(char *)g_python, (char *)g_fixture, "check", SECRET, g_in, g_out, NULL};
  int rc = run(argv, log);
  char *text = slurp(log, NULL);
  if (rc != 0)
    fprintf(stderr, "%s", text ? text : "(no output)\n");
  CHECK_EQ_INT(rc, 0);
  CHECK(text && strstr(text, "checked 4 de-identified instances: 0 problem(s)"));
  free(text);
  /* DCMTK's reading */
  for (int i = 1; i <= 4; i++) {
    char f[400], out[400];
    snprintf(f, sizeof f, "%s/CT%06d.dcm", g_out, i);
    snprintf(out, sizeof out, "%s/dump.txt", g_work);
    char *dv[] = {(char *)g_dcmdump, "-q", "-M", f, NULL};
    CHECK_EQ_INT(run(dv, out), 0);
    char *dump = slurp(out, NULL);
    CHECK(dump && strstr(dump, "(0012,0062) CS [YES]") && strstr(dump, "113100") &&
          !strstr(dump, "RRPHI") && !strstr(dump, "ZZTEST") && !strstr(dump, g_study) &&
          strstr(dump, "(7fe0,0010)"));
    free(dump);
  }
  /* the same secret: the same bytes; another secret: other pseudonyms */
  memset(seen, 0, sizeof *seen);
  deid_all(g_out2, SECRET, seen, &written, &refused);
  for (int i = 1; i <= 4; i++) {
    char f1[400], f2[400];
    snprintf(f1, sizeof f1, "%s/CT%06d.dcm", g_out, i);
    snprintf(f2, sizeof f2, "%s/CT%06d.dcm", g_out2, i);
    size_t n1 = 0, n2 = 0;
    char *a = slurp(f1, &n1), *b = slurp(f2, &n2);
    CHECK(a && b && n1 == n2 && memcmp(a, b, n1) == 0);
    free(a);
    free(b);
  }
  char other[300];
  snprintf(other, sizeof other, "%s/other", g_work);
  memset(seen, 0, sizeof *seen);
  deid_all(other, "another-secret", seen, &written, &refused);
  char f1[400];
  snprintf(f1, sizeof f1, "%s/CT000001.dcm", other);
  rr_dicom_deid_info_t info;
  char tmp[400];
  snprintf(tmp, sizeof tmp, "%s/again.dcm", g_work);
  char in1[400];
  snprintf(in1, sizeof in1, "%s/CT000001.dcm", g_in);
  CHECK_EQ_INT(rr_dicom_deid_file(in1, tmp, "another-secret", 14, NULL, NULL, &info), 0);
  char mine[RR_DICOM_DEID_UID_MAX];
  rr_dicom_deid_uid(SECRET, strlen(SECRET), info.study_uid, mine);
  CHECK(strcmp(mine, info.pseudo_study_uid) != 0);
  free(seen);
}

static void test_errors(void) {
  char bad[400], out[400];
  snprintf(bad, sizeof bad, "%s/not-dicom.dcm", g_work);
  snprintf(out, sizeof out, "%s/not-dicom.out", g_work);
  FILE *f = fopen(bad, "w");
  if (f) {
    fputs("MSH|^~\\&|this is not DICOM\r", f);
    fclose(f);
  }
  rr_dicom_deid_info_t info;
  int rc = rr_dicom_deid_file(bad, out, SECRET, strlen(SECRET), NULL, NULL, &info);
  CHECK_EQ_INT(rc, RR_EPARSE);
  CHECK(info.why[0] != '\0');
  CHECK(access(out, F_OK) != 0);
  snprintf(bad, sizeof bad, "%s/missing.dcm", g_work);
  CHECK_EQ_INT(rr_dicom_deid_file(bad, out, SECRET, strlen(SECRET), NULL, NULL, &info), RR_EPARSE);
  char in1[400];
  snprintf(in1, sizeof in1, "%s/CT000001.dcm", g_in);
  CHECK_EQ_INT(rr_dicom_deid_file(in1, out, "", 0, NULL, NULL, &info), RR_EINVAL);
  snprintf(out, sizeof out, "%s/no-such-dir/x.dcm", g_work);
  rc = rr_dicom_deid_file(in1, out, SECRET, strlen(SECRET), NULL, NULL, &info);
  CHECK(rc != 0 && rc != RR_DICOM_EREFUSED);
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: test_dicom_deid <make-study> <deid_fixture.py> <dcmdump> <python3>\n");
    return 2;
  }
  g_make_study = argv[1];
  g_fixture = argv[2];
  g_dcmdump = argv[3];
  g_python = argv[4];
  snprintf(g_work, sizeof g_work, "/tmp/rr-test-deid-XXXXXX");
  if (!mkdtemp(g_work))
    return 1;
  snprintf(g_in, sizeof g_in, "%s/in", g_work);
  snprintf(g_out, sizeof g_out, "%s/out", g_work);
  snprintf(g_out2, sizeof g_out2, "%s/out2", g_work);
  char log[400];
  snprintf(log, sizeof log, "%s/make.json", g_work);
  char *mk[] = {(char *)g_python, (char *)g_fixture, "make", (char *)g_make_study, g_in, NULL};
  int rc = run(mk, log);
  char *text = slurp(log, NULL);
  const char *p = text ? strstr(text, "\"study_uid\": \"") : NULL;
  if (rc != 0 || !p) {
    fprintf(stderr, "fixture failed (%d): %s\n", rc, text ? text : "");
    free(text);
    return 1;
  }
  p += strlen("\"study_uid\": \"");
  snprintf(g_study, sizeof g_study, "%.*s", (int)strcspn(p, "\""), p);
  free(text);
  RUN(test_pseudonyms);
  RUN(test_study);
  RUN(test_errors);
  char *rm[] = {"/bin/rm", "-rf", g_work, NULL};
  if (rr_tests_failed == 0)
    run(rm, "/dev/null");
  return TEST_SUMMARY();
}

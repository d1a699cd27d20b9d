/* The C-STORE SCU (engine/dicom/scu.h) against our own SCP (scp.h: refused
 * calling AE, full-disk watermark, a failure status, DICOM TLS), DCMTK's
 * storescp (abort during a C-STORE, no response in time, cancellation) and
 * Orthanc (tests/integration/peers/orthanc.py: a synthetic CT study and an
 * SR, found again through its REST API).
 *
 *   test_dicom_scu local <dump2dcm> <storescp> <gen-certs>
 *   test_dicom_scu orthanc <dump2dcm> <python3> <orthanc.py>   (77: no Orthanc)
 *
 * Test images are synthetic CTs made with dump2dcm (patient ZZTEST^SCU).
 */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "dicom/scp.h"
#include "dicom/scu.h"
#include "dicom/sr.h"
#include "rr_test.h"

#define AE_SCP "RRSCP"
#define AE_ENGINE "RADRELAY"
#define CT_STORAGE "1.2.840.10008.5.1.4.1.1.2"
#define NFILES 20

static const char *g_dump2dcm;
static char g_work[256], g_data[320], g_spool[320], g_certs[320];
static char g_study[64];
static char g_files[NFILES + 2][400]; /* NFILES CTs, the SR, a bad-UID CT */
static char g_uids[NFILES + 2][100];
static uv_loop_t *g_loop;

/* ---- helpers -------------------------------------------------------------- */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void on_tick(uv_timer_t *t) {
  (void)t;
}

/* Runs the loop until *flag or timeout_s; returns *flag. */
static int run_until(const int *flag, double timeout_s) {
  uv_timer_t tick;
  uv_timer_init(g_loop, &tick);
  uv_timer_start(&tick, on_tick, 10, 10);
  double end = now_s() + timeout_s;
  while (!*flag && now_s() < end)
    uv_run(g_loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(g_loop, UV_RUN_NOWAIT);
  return *flag;
}

/* Runs the loop until *counter >= want or timeout_s; returns whether it got there. */
static int wait_count(const int *counter, int want, double timeout_s) {
  uv_timer_t tick;
  uv_timer_init(g_loop, &tick);
  uv_timer_start(&tick, on_tick, 10, 10);
  double end = now_s() + timeout_s;
  while (*counter < want && now_s() < end)
    uv_run(g_loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(g_loop, UV_RUN_NOWAIT);
  return *counter >= want;
}

static int run_tool(char *const argv[], const char *log) {
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    execv(argv[0], argv);
    _exit(127);
  }
  int st;
  if (waitpid(pid, &st, 0) != pid)
    return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int make_ct(const char *path, const char *sop_uid, int instance) {
  char dump[450], raw[450], log[400];
  snprintf(dump, sizeof(dump), "%s.dump", path);
  snprintf(raw, sizeof(raw), "%s.raw", path);
  snprintf(log, sizeof(log), "%s/dump2dcm.log", g_work);
  FILE *f = fopen(raw, "wb");
  if (!f)
    return -1;
  for (int i = 0; i < 32 * 32; i++) {
    uint16_t v = (uint16_t)(i * 5 + instance);
    fwrite(&v, 2, 1, f);
  }
  fclose(f);
  f = fopen(dump, "w");
  if (!f)
    return -1;
  fprintf(f,
          "(0008,0016) UI [" CT_STORAGE "]\n"
          "(0008,0018) UI [%s]\n"
          "(0008,0020) DA [20240103]\n"
          "(0008,0030) TM [091500]\n"
          "(0008,0050) SH [ZZACCSCU1]\n"
          "(0008,0060) CS [CT]\n"
          "(0010,0010) PN [ZZTEST^SCU]\n"
          "(0010,0020) LO [ZZ000077]\n"
          "(0020,000d) UI [%s]\n"
          "(0020,000e) UI [%s.1]\n"
          "(0020,0011) IS [1]\n"
          "(0020,0013) IS [%d]\n"
          "(0028,0002) US 1\n"
          "(0028,0004) CS [MONOCHROME2]\n"
          "(0028,0010) US 32\n"
          "(0028,0011) US 32\n"
          "(0028,0100) US 16\n"
          "(0028,0101) US 16\n"
          "(0028,0102) US 15\n"
          "(0028,0103) US 0\n"
          "(7fe0,0010) OW =%s\n",
          sop_uid, g_study, g_study, instance, raw);
  fclose(f);
  char *argv[] = {(char *)g_dump2dcm, "+te", dump, (char *)path, NULL};
  int rc = run_tool(argv, log);
  unlink(raw);
  unlink(dump);
  return rc;
}

static int make_data(void) {
  snprintf(g_data, sizeof(g_data), "%s/data", g_work);
  mkdir(g_data, 0700);
  unsigned tag = (unsigned)getpid() * 1000u + (unsigned)(time(NULL) % 1000);
  snprintf(g_study, sizeof(g_study), "2.25.%u7", tag);
  for (int i = 0; i < NFILES; i++) {
    snprintf(g_uids[i], sizeof(g_uids[i]), "%s.1.%d", g_study, i + 1);
    snprintf(g_files[i], sizeof(g_files[i]), "%s/ct%02d.dcm", g_data, i + 1);
    if (make_ct(g_files[i], g_uids[i], i + 1) != 0)
      return -1;
  }
  /* an SR about the study */
  const char *classes[NFILES], *insts[NFILES];
  for (int i = 0; i < NFILES; i++) {
    classes[i] = CT_STORAGE;
    insts[i] = g_uids[i];
  }
  char series[80];
  snprintf(series, sizeof(series), "%s.1", g_study);
  rr_dicom_sr_series_ref_t ref = {series, classes, insts, NFILES};
  double pt[2] = {10, 12};
  rr_dicom_sr_finding_t fd;
  memset(&fd, 0, sizeof(fd));
  fd.finding = (rr_dicom_code_t){"SCT", "50960005", "Hemorrhage"};
  fd.tracking_id = "bleed-1";
  fd.confidence = 0.9;
  fd.region.shape = RR_DICOM_SR_POINT;
  fd.region.coords = pt;
  fd.region.n_points = 1;
  fd.region.sop_class_uid = CT_STORAGE;
  fd.region.sop_instance_uid = g_uids[3];
  rr_dicom_sr_input_t in;
  memset(&in, 0, sizeof(in));
  in.source_path = g_files[0];
  in.series = &ref;
  in.n_series = 1;
  in.device = (rr_dicom_sr_device_t){
      "ZZ Detector", "1.0", "ZZ Vendor", NULL, "2.25.11223344556677889900", NULL};
  in.procedure = (rr_dicom_code_t){"LN", "24725-4", "CT Head"};
  in.findings = &fd;
  in.n_findings = 1;
  snprintf(g_files[NFILES], sizeof(g_files[NFILES]), "%s/sr.dcm", g_data);
  in.out_path = g_files[NFILES];
  rr_dicom_sr_result_t res;
  rr_dicom_sr_error_t err;
  if (rr_dicom_sr_write(&in, &res, &err) != 0) {
    fprintf(stderr, "SR: %s\n", err.text);
    return -1;
  }
  snprintf(g_uids[NFILES], sizeof(g_uids[NFILES]), "%s", res.sop_instance_uid);
  /* a CT whose SOP Instance UID our SCP refuses (0xC000) */
  snprintf(g_uids[NFILES + 1], sizeof(g_uids[NFILES + 1]), "1.2.ZZ.BAD");
  snprintf(g_files[NFILES + 1], sizeof(g_files[NFILES + 1]), "%s/bad.dcm", g_data);
  return make_ct(g_files[NFILES + 1], g_uids[NFILES + 1], 99);
}

/* ---- SCU via the async wrapper ------------------------------------------- */

typedef struct outcome {
  int done;
  int rc;
  char reason[128];
  int rj[3];
  unsigned stored, warnings, failed;
  rr_dicom_scu_file_result_t files[NFILES + 2];
  char file_reasons[NFILES + 2][96];
  size_t n;
  double elapsed;
  double t0;
} outcome_t;

static void on_sent(void *ud, const rr_dicom_scu_report_t *r) {
  outcome_t *o = ud;
  o->done = 1;
  o->rc = r->rc;
  snprintf(o->reason, sizeof(o->reason), "%s", r->reason);
  o->rj[0] = r->reject_result;
  o->rj[1] = r->reject_source;
  o->rj[2] = r->reject_reason;
  o->stored = r->stored;
  o->warnings = r->warnings;
  o->failed = r->failed;
  o->n = r->n_files;
  for (size_t i = 0; i < r->n_files && i < NFILES + 2; i++) {
    o->files[i] = r->files[i];
    snprintf(o->file_reasons[i], sizeof(o->file_reasons[i]), "%s", r->files[i].reason);
  }
  o->elapsed = now_s() - o->t0;
}

static rr_dicom_scu_config_t scu_config(int port, const char *called) {
  rr_dicom_scu_config_t c;
  memset(&c, 0, sizeof(c));
  c.name = "test-scu";
  c.calling_ae = AE_ENGINE;
  c.called_ae = called;
  c.host = "127.0.0.1";
  c.port = port;
  c.acse_timeout_s = 10;
  c.dimse_timeout_s = 10;
  return c;
}

/* Sends paths with rr_dicom_scu_send and waits for the callback. */
static void send_files(const rr_dicom_scu_config_t *cfg, const char *const *paths, size_t n,
                       outcome_t *o, int cancel_at_once) {
  memset(o, 0, sizeof(*o));
  o->t0 = now_s();
  rr_dicom_scu_send_t *req = NULL;
  int rc = rr_dicom_scu_send(g_loop, cfg, paths, n, on_sent, o, &req);
  CHECK_EQ_INT(rc, 0);
  if (rc != 0)
    return;
  CHECK(!o->done); /* never synchronously */
  if (cancel_at_once)
    rr_dicom_scu_cancel(req);
  CHECK(run_until(&o->done, 60));
  CHECK_EQ_INT(o->n, n);
}

/* ---- our SCP ---------------------------------------------------------------- */

static int g_ninst, g_refused, g_stopped;
static char g_last_refusal[96];
static char g_inst_uids[64][80];

static void on_instance(void *ud, const rr_dicom_instance_t *in) {
  (void)ud;
  if (g_ninst < 64)
    snprintf(g_inst_uids[g_ninst], sizeof(g_inst_uids[0]), "%s", in->sop_instance_uid);
  g_ninst++;
}

static void on_association(void *ud, const rr_dicom_assoc_event_t *ev) {
  (void)ud;
  if (ev->kind == RR_DICOM_ASSOC_REFUSED) {
    g_refused++;
    snprintf(g_last_refusal, sizeof(g_last_refusal), "%s", ev->reason);
  }
}

static void on_stopped(void *ud) {
  (void)ud;
  g_stopped = 1;
}

static const char *g_any[] = {"*"};
static const char *g_other_ae[] = {"ZZOTHER"};
static const char *g_localhost[] = {"127.0.0.0/8"};

static rr_dicom_scp_config_t scp_config(void) {
  rr_dicom_scp_config_t c;
  memset(&c, 0, sizeof(c));
  c.name = "test-scp";
  c.host = "127.0.0.1";
  c.ae_title = AE_SCP;
  c.allowed_calling_aes = g_any;
  c.n_allowed_calling_aes = 1;
  c.allowed_peers = g_localhost;
  c.n_allowed_peers = 1;
  c.spool_dir = g_spool;
  c.min_free_bytes = 1024 * 1024;
  c.acse_timeout_s = 10;
  c.dimse_timeout_s = 10;
  return c;
}

static rr_dicom_scp_t *start_scp(const rr_dicom_scp_config_t *cfg) {
  static const rr_dicom_scp_callbacks_t cbs = {on_instance, on_association};
  rr_dicom_scp_t *scp = NULL;
  int rc = rr_dicom_scp_start(g_loop, cfg, &cbs, NULL, &scp);
  CHECK_EQ_INT(rc, 0);
  if (rc)
    fprintf(stderr, "scp start: %s\n", rr_dicom_scp_strerror(rc));
  g_ninst = g_refused = 0;
  g_last_refusal[0] = 0;
  return scp;
}

static void stop_scp(rr_dicom_scp_t *scp) {
  if (!scp)
    return;
  g_stopped = 0;
  rr_dicom_scp_stop(scp, 2000, on_stopped, NULL);
  CHECK(run_until(&g_stopped, 20));
}

static int has_instance(const char *uid) {
  for (int i = 0; i < g_ninst && i < 64; i++)
    if (strcmp(g_inst_uids[i], uid) == 0)
      return 1;
  return 0;
}

static const char *g_paths[NFILES + 2];

static void test_store_to_own_scp(void) {
  rr_dicom_scp_config_t sc = scp_config();
  rr_dicom_scp_t *scp = start_scp(&sc);
  if (!scp)
    return;
  rr_dicom_scu_config_t cfg = scu_config(rr_dicom_scp_port(scp), AE_SCP);
  outcome_t o;
  send_files(&cfg, g_paths, NFILES + 1, &o, 0);
  CHECK_EQ_INT(o.rc, 0);
  CHECK_EQ_INT(o.stored, NFILES + 1);
  CHECK_EQ_INT(o.failed, 0);
  for (int i = 0; i < NFILES + 1; i++) {
    CHECK_EQ_INT(o.files[i].outcome, RR_DICOM_SCU_STORED);
    CHECK_EQ_INT(o.files[i].status, 0);
  }
  /* TCP_NODELAY: twenty small C-STOREs take well under one delayed ACK
   * (40 ms) each. */
  printf("# %d instances + SR to our SCP in %.3f s\n", NFILES, o.elapsed);
  CHECK(o.elapsed < 0.8);
  CHECK(wait_count(&g_ninst, NFILES + 1, 10));
  CHECK_EQ_INT(g_ninst, NFILES + 1);
  CHECK(has_instance(g_uids[0]) && has_instance(g_uids[NFILES]));

  /* the blocking core, from this thread (the SCP runs on its own threads) */
  rr_dicom_scu_file_result_t res[2];
  rr_dicom_scu_report_t rep;
  const char *two[2] = {g_files[1], g_files[NFILES]};
  CHECK_EQ_INT(rr_dicom_scu_store(&cfg, two, 2, res, &rep), 0);
  CHECK_EQ_INT(rep.stored, 2);
  CHECK(res[0].outcome == RR_DICOM_SCU_STORED && res[1].outcome == RR_DICOM_SCU_STORED);
  stop_scp(scp);
}

static void test_failure_status(void) {
  rr_dicom_scp_config_t sc = scp_config();
  rr_dicom_scp_t *scp = start_scp(&sc);
  if (!scp)
    return;
  rr_dicom_scu_config_t cfg = scu_config(rr_dicom_scp_port(scp), AE_SCP);
  const char *paths[3] = {g_files[0], g_files[NFILES + 1], g_files[2]};
  outcome_t o;
  send_files(&cfg, paths, 3, &o, 0);
  CHECK_EQ_INT(o.rc, 0);
  CHECK_EQ_INT(o.files[0].outcome, RR_DICOM_SCU_STORED);
  CHECK_EQ_INT(o.files[1].outcome, RR_DICOM_SCU_FAILED);
  CHECK_EQ_INT(o.files[1].status, 0xC000);
  CHECK(strstr(o.file_reasons[1], "cannot understand") != NULL);
  CHECK_EQ_INT(o.files[2].outcome, RR_DICOM_SCU_STORED); /* the association goes on */
  CHECK_EQ_INT(o.stored, 2);
  CHECK_EQ_INT(o.failed, 1);

  /* a file that is not DICOM fails unsent; the others still go */
  char junk[400];
  snprintf(junk, sizeof(junk), "%s/junk.dcm", g_data);
  FILE *f = fopen(junk, "w");
  if (f) {
    fputs("not dicom", f);
    fclose(f);
  }
  const char *p2[2] = {junk, g_files[3]};
  send_files(&cfg, p2, 2, &o, 0);
  CHECK_EQ_INT(o.files[0].outcome, RR_DICOM_SCU_FAILED);
  CHECK_EQ_INT(o.files[0].status, -1);
  CHECK_EQ_INT(o.files[1].outcome, RR_DICOM_SCU_STORED);
  stop_scp(scp);
}

static void test_refused_calling_ae(void) {
  rr_dicom_scp_config_t sc = scp_config();
  sc.allowed_calling_aes = g_other_ae;
  rr_dicom_scp_t *scp = start_scp(&sc);
  if (!scp)
    return;
  rr_dicom_scu_config_t cfg = scu_config(rr_dicom_scp_port(scp), AE_SCP);
  outcome_t o;
  send_files(&cfg, g_paths, 3, &o, 0);
  CHECK_EQ_INT(o.rc, RR_DICOM_EREJECTED);
  CHECK(strcmp(o.reason, "association rejected") == 0);
  CHECK_EQ_INT(o.rj[0], 1); /* permanent */
  CHECK_EQ_INT(o.rj[1], 1); /* service user */
  CHECK_EQ_INT(o.rj[2], 3); /* calling AE title not recognized */
  CHECK_EQ_INT(o.stored, 0);
  CHECK_EQ_INT(o.failed, 3);
  for (int i = 0; i < 3; i++) {
    CHECK_EQ_INT(o.files[i].outcome, RR_DICOM_SCU_FAILED);
    CHECK(strcmp(o.file_reasons[i], "association rejected") == 0);
  }
  stop_scp(scp);
  CHECK_EQ_INT(g_ninst, 0);
}

static void test_watermark(void) {
  rr_dicom_scp_config_t sc = scp_config();
  sc.min_free_bytes = UINT64_MAX / 2;
  rr_dicom_scp_t *scp = start_scp(&sc);
  if (!scp)
    return;
  rr_dicom_scu_config_t cfg = scu_config(rr_dicom_scp_port(scp), AE_SCP);
  outcome_t o;
  send_files(&cfg, g_paths, 2, &o, 0);
  CHECK_EQ_INT(o.rc, RR_DICOM_EREJECTED);
  CHECK_EQ_INT(o.rj[0], 2); /* transient */
  CHECK_EQ_INT(o.rj[1], 3); /* service provider (presentation) */
  CHECK_EQ_INT(o.rj[2], 1); /* temporary congestion */
  CHECK_EQ_INT(o.stored, 0);
  CHECK_EQ_INT(o.failed, 2);
  stop_scp(scp);
}

static void test_connection_refused(void) {
  /* a port nothing listens on: bound, then closed */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof(a);
  bind(fd, (struct sockaddr *)&a, sizeof(a));
  getsockname(fd, (struct sockaddr *)&a, &sl);
  close(fd);
  rr_dicom_scu_config_t cfg = scu_config(ntohs(a.sin_port), AE_SCP);
  outcome_t o;
  send_files(&cfg, g_paths, 1, &o, 0);
  CHECK_EQ_INT(o.rc, RR_DICOM_ECONNECT);
  CHECK_EQ_INT(o.files[0].outcome, RR_DICOM_SCU_FAILED);

  rr_dicom_scu_config_t bad = cfg;
  bad.called_ae = "THIS-AE-IS-TOO-LONG";
  rr_dicom_scu_send_t *req = NULL;
  CHECK_EQ_INT(rr_dicom_scu_send(g_loop, &bad, g_paths, 1, on_sent, &o, &req), RR_EINVAL);
  CHECK(req == NULL);
}

/* ---- DCMTK storescp as a misbehaving peer -------------------------------- */

static const char *g_storescp;
static pid_t g_storescp_pid;

static int listening(int port) {
  FILE *f = fopen("/proc/net/tcp", "r");
  if (!f)
    return 0;
  char line[512];
  int found = 0;
  while (!found && fgets(line, sizeof(line), f)) {
    unsigned lport = 0, state = 0;
    if (sscanf(line, " %*d: %*x:%x %*x:%*x %x", &lport, &state) == 2)
      found = (int)lport == port && state == 0x0A;
  }
  fclose(f);
  return found;
}

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof(a);
  bind(fd, (struct sockaddr *)&a, sizeof(a));
  getsockname(fd, (struct sockaddr *)&a, &sl);
  close(fd);
  return ntohs(a.sin_port);
}

/* Starts storescp with extra options; returns its port or -1. */
static int start_storescp(const char *opt1, const char *opt2) {
  int port = free_port();
  char ps[16], out[400], log[400];
  snprintf(ps, sizeof(ps), "%d", port);
  snprintf(out, sizeof(out), "%s/storescp-out", g_work);
  snprintf(log, sizeof(log), "%s/storescp.log", g_work);
  mkdir(out, 0700);
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    char *argv[9];
    int k = 0;
    argv[k++] = (char *)g_storescp;
    argv[k++] = "-aet";
    argv[k++] = "STORESCP";
    argv[k++] = "-od";
    argv[k++] = out;
    argv[k++] = (char *)opt1;
    if (opt2)
      argv[k++] = (char *)opt2;
    argv[k++] = ps;
    argv[k] = NULL;
    execv(argv[0], argv);
    _exit(127);
  }
  g_storescp_pid = pid;
  double end = now_s() + 10;
  while (!listening(port) && now_s() < end) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL); /* polling interval of a condition with a deadline */
  }
  return listening(port) ? port : -1;
}

static void stop_storescp(void) {
  if (g_storescp_pid > 0) {
    kill(g_storescp_pid, SIGTERM);
    waitpid(g_storescp_pid, NULL, 0);
    g_storescp_pid = 0;
  }
}

static void test_abort_during_store(void) {
  int port = start_storescp("--abort-during", NULL);
  CHECK(port > 0);
  if (port <= 0)
    return;
  rr_dicom_scu_config_t cfg = scu_config(port, "STORESCP");
  outcome_t o;
  send_files(&cfg, g_paths, 3, &o, 0);
  CHECK_EQ_INT(o.rc, RR_DICOM_EABORTED);
  CHECK_EQ_INT(o.stored, 0);
  CHECK_EQ_INT(o.failed, 3);
  CHECK_EQ_INT(o.files[0].outcome, RR_DICOM_SCU_FAILED);
  CHECK_EQ_INT(o.files[0].status, -1);
  printf("# abort: %s / %s / %s\n", o.reason, o.file_reasons[0], o.file_reasons[1]);
  CHECK_EQ_INT(o.files[1].outcome, RR_DICOM_SCU_FAILED);
  stop_storescp();
}

static void test_no_response_in_time(void) {
  int port = start_storescp("--sleep-during", "4");
  CHECK(port > 0);
  if (port <= 0)
    return;
  rr_dicom_scu_config_t cfg = scu_config(port, "STORESCP");
  cfg.dimse_timeout_s = 1;
  outcome_t o;
  send_files(&cfg, g_paths, 2, &o, 0);
  CHECK_EQ_INT(o.rc, RR_DICOM_EABORTED);
  CHECK_EQ_INT(o.files[0].outcome, RR_DICOM_SCU_FAILED);
  CHECK(strstr(o.file_reasons[0], "DIMSE timeout") != NULL);
  CHECK_EQ_INT(o.files[1].outcome, RR_DICOM_SCU_FAILED);
  CHECK(o.elapsed < 4);
  stop_storescp();
}

static void test_cancel(void) {
  int port = start_storescp("--sleep-during", "10");
  CHECK(port > 0);
  if (port <= 0)
    return;
  rr_dicom_scu_config_t cfg = scu_config(port, "STORESCP");
  cfg.dimse_timeout_s = 30;
  outcome_t o;
  send_files(&cfg, g_paths, 3, &o, 1);
  CHECK_EQ_INT(o.rc, RR_DICOM_ECANCELLED);
  CHECK_EQ_INT(o.stored, 0);
  CHECK_EQ_INT(o.failed, 3);
  CHECK(o.elapsed < 5);
  stop_storescp();
}

/* ---- DICOM TLS to our SCP --------------------------------------------------- */

static void cert(char *out, size_t n, const char *name) {
  snprintf(out, n, "%s/%s", g_certs, name);
}

static void test_tls(void) {
  char server_pem[400], server_key[400], ca[400], client_pem[400], client_key[400], other[400];
  cert(server_pem, sizeof(server_pem), "server.pem");
  cert(server_key, sizeof(server_key), "server.key");
  cert(ca, sizeof(ca), "ca.pem");
  cert(client_pem, sizeof(client_pem), "client.pem");
  cert(client_key, sizeof(client_key), "client.key");
  cert(other, sizeof(other), "other-ca.pem");
  rr_dicom_tls_config_t stls = {server_pem, server_key, ca, 1};
  rr_dicom_scp_config_t sc = scp_config();
  sc.tls = &stls;
  rr_dicom_scp_t *scp = start_scp(&sc);
  if (!scp)
    return;
  int port = rr_dicom_scp_port(scp);

  rr_dicom_tls_config_t ctls = {client_pem, client_key, ca, 0};
  rr_dicom_scu_config_t cfg = scu_config(port, AE_SCP);
  cfg.tls = &ctls;
  outcome_t o;
  send_files(&cfg, g_paths, 3, &o, 0);
  CHECK_EQ_INT(o.rc, 0);
  CHECK_EQ_INT(o.stored, 3);
  if (o.rc)
    fprintf(stderr, "tls: %s\n", o.reason);

  /* no client certificate: the SCP refuses the handshake */
  rr_dicom_tls_config_t nocert = {NULL, NULL, ca, 0};
  cfg.tls = &nocert;
  int refused_before = g_refused;
  send_files(&cfg, g_paths, 2, &o, 0);
  CHECK(o.rc == RR_DICOM_ECONNECT || o.rc == RR_DICOM_EABORTED);
  CHECK_EQ_INT(o.stored, 0);
  CHECK_EQ_INT(o.failed, 2);
  printf("# TLS without a client certificate: %s\n", o.reason);
  CHECK(wait_count(&g_refused, refused_before + 1, 10));
  CHECK(strcmp(g_last_refusal, "TLS handshake failed") == 0);

  /* a server certificate from a CA we do not trust */
  rr_dicom_tls_config_t wrongca = {client_pem, client_key, other, 0};
  cfg.tls = &wrongca;
  send_files(&cfg, g_paths, 1, &o, 0);
  CHECK_EQ_INT(o.rc, RR_DICOM_ECONNECT);
  CHECK(strcmp(o.reason, "TLS handshake failed") == 0);
  CHECK_EQ_INT(o.stored, 0);

  /* plain DICOM to the TLS port */
  cfg.tls = NULL;
  send_files(&cfg, g_paths, 1, &o, 0);
  CHECK(o.rc != 0);
  CHECK_EQ_INT(o.stored, 0);

  /* a TLS SCP without its key does not start */
  rr_dicom_tls_config_t nokey = {server_pem, NULL, ca, 1};
  sc.tls = &nokey;
  rr_dicom_scp_t *bad = NULL;
  static const rr_dicom_scp_callbacks_t cbs = {on_instance, on_association};
  CHECK_EQ_INT(rr_dicom_scp_start(g_loop, &sc, &cbs, NULL, &bad), RR_DICOM_ETLS);
  stop_scp(scp);
}

/* ---- Orthanc ------------------------------------------------------------------ */

static char g_orthanc_url[128], g_userpwd[128];

typedef struct buf {
  char *p;
  size_t n;
} buf_t;

static size_t on_body(char *d, size_t s, size_t n, void *ud) {
  buf_t *b = ud;
  char *p = realloc(b->p, b->n + s * n + 1);
  if (!p)
    return 0;
  memcpy(p + b->n, d, s * n);
  b->n += s * n;
  p[b->n] = 0;
  b->p = p;
  return s * n;
}

/* One REST call; returns the parsed JSON body (NULL on failure). */
static json_t *rest(const char *method, const char *path, const char *body) {
  CURL *c = curl_easy_init();
  if (!c)
    return NULL;
  char url[512];
  snprintf(url, sizeof(url), "%s%s", g_orthanc_url, path);
  buf_t b = {NULL, 0};
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_USERPWD, g_userpwd);
  curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
  if (body)
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
  long code = 0;
  json_t *j = NULL;
  if (curl_easy_perform(c) == CURLE_OK &&
      curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code) == CURLE_OK && code == 200 && b.p)
    j = json_loads(b.p, 0, NULL);
  free(b.p);
  curl_easy_cleanup(c);
  return j;
}

static int orthanc_has(const char *sop_uid, const char *want_class) {
  json_t *found = rest("POST", "/tools/lookup", sop_uid);
  int ok = 0;
  if (json_is_array(found) && json_array_size(found) == 1) {
    const char *id = json_string_value(json_object_get(json_array_get(found, 0), "ID"));
    char path[200];
    snprintf(path, sizeof(path), "/instances/%s/simplified-tags", id ? id : "");
    json_t *tags = rest("GET", path, NULL);
    const char *cls = json_string_value(json_object_get(tags, "SOPClassUID"));
    ok = cls && strcmp(cls, want_class) == 0;
    json_decref(tags);
  }
  json_decref(found);
  return ok;
}

static int orthanc_main(const char *python, const char *script) {
  int in[2], out[2];
  if (pipe(in) != 0 || pipe(out) != 0)
    return 2;
  char log[400];
  snprintf(log, sizeof(log), "%s/orthanc-cli.log", g_work);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0)
      dup2(fd, 2);
    close(in[1]);
    close(out[0]);
    execl(python, python, script, (char *)NULL);
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  FILE *f = fdopen(out[0], "r");
  char line[4096] = "";
  int got = f && fgets(line, sizeof(line), f) != NULL;
  json_t *j = got ? json_loads(line, 0, NULL) : NULL;
  if (!j) {
    close(in[1]);
    int st = 0;
    waitpid(pid, &st, 0);
    if (f)
      fclose(f);
    FILE *lf = fopen(log, "r");
    int missing = 0;
    char l[1024];
    while (lf && fgets(l, sizeof(l), lf))
      if (strstr(l, "not found")) {
        missing = 1;
        fputs(l, stdout);
      }
    if (lf)
      fclose(lf);
    if (missing) {
      printf("SKIP: Orthanc is not installed\n");
      return 77;
    }
    fprintf(stderr, "orthanc.py did not start (see %s)\n", log);
    return 1;
  }
  int dicom_port = (int)json_integer_value(json_object_get(j, "dicom_port"));
  const char *aet = json_string_value(json_object_get(j, "aet"));
  snprintf(g_orthanc_url, sizeof(g_orthanc_url), "%s",
           json_string_value(json_object_get(j, "http_url")));
  snprintf(g_userpwd, sizeof(g_userpwd), "%s:%s", json_string_value(json_object_get(j, "user")),
           json_string_value(json_object_get(j, "password")));
  curl_global_init(CURL_GLOBAL_DEFAULT);

  rr_dicom_scu_config_t cfg = scu_config(dicom_port, aet);
  outcome_t o;
  send_files(&cfg, g_paths, NFILES + 1, &o, 0);
  CHECK_EQ_INT(o.rc, 0);
  CHECK_EQ_INT(o.stored, NFILES + 1);
  for (int i = 0; i < NFILES + 1; i++)
    CHECK_EQ_INT(o.files[i].status, 0);
  printf("# %d instances + SR to Orthanc in %.3f s\n", NFILES, o.elapsed);
  CHECK(orthanc_has(g_uids[0], CT_STORAGE));
  CHECK(orthanc_has(g_uids[NFILES - 1], CT_STORAGE));
  CHECK(orthanc_has(g_uids[NFILES], "1.2.840.10008.5.1.4.1.1.88.34"));
  json_t *all = rest("GET", "/instances", NULL);
  CHECK(json_is_array(all) && json_array_size(all) == NFILES + 1);
  json_decref(all);

  /* Orthanc knows RADRELAY only: another calling AE is refused */
  cfg.calling_ae = "ZZUNKNOWN";
  send_files(&cfg, g_paths, 1, &o, 0);
  CHECK_EQ_INT(o.rc, RR_DICOM_EREJECTED);
  CHECK_EQ_INT(o.files[0].outcome, RR_DICOM_SCU_FAILED);

  json_decref(j);
  close(in[1]); /* orthanc.py stops Orthanc when stdin closes */
  waitpid(pid, NULL, 0);
  fclose(f);
  curl_global_cleanup();
  return 0;
}

static void rm_tree(const char *dir) {
  DIR *d = opendir(dir);
  if (!d)
    return;
  struct dirent *e;
  char p[700];
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
  if (argc != 5 || (strcmp(argv[1], "local") && strcmp(argv[1], "orthanc"))) {
    fprintf(stderr, "usage: test_dicom_scu local <dump2dcm> <storescp> <gen-certs>\n"
                    "       test_dicom_scu orthanc <dump2dcm> <python3> <orthanc.py>\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  g_dump2dcm = argv[2];
  snprintf(g_work, sizeof(g_work), "/tmp/rr-dicom-scu-XXXXXX");
  if (!mkdtemp(g_work))
    return 2;
  snprintf(g_spool, sizeof(g_spool), "%s/spool", g_work);
  mkdir(g_spool, 0700);
  g_loop = uv_default_loop();
  if (make_data() != 0) {
    fprintf(stderr, "test data failed (see %s)\n", g_work);
    return 2;
  }
  for (int i = 0; i < NFILES + 2; i++)
    g_paths[i] = g_files[i];

  int rc;
  if (strcmp(argv[1], "orthanc") == 0) {
    rc = orthanc_main(argv[3], argv[4]);
    if (rc == 0)
      rc = TEST_SUMMARY();
  } else {
    g_storescp = argv[3];
    snprintf(g_certs, sizeof(g_certs), "%s/certs", g_work);
    char *gen[] = {argv[4], g_certs, NULL};
    char log[400];
    snprintf(log, sizeof(log), "%s/gen-certs.log", g_work);
    if (run_tool(gen, log) != 0) {
      fprintf(stderr, "gen-certs failed (see %s)\n", log);
      return 2;
    }
    RUN(test_store_to_own_scp);
    RUN(test_failure_status);
    RUN(test_refused_calling_ae);
    RUN(test_watermark);
    RUN(test_connection_refused);
    RUN(test_abort_during_store);
    RUN(test_no_response_in_time);
    RUN(test_cancel);
    RUN(test_tls);
    rc = TEST_SUMMARY();
  }
  uv_run(g_loop, UV_RUN_NOWAIT);
  if (rc == 0 || rc == 77)
    rm_tree(g_work);
  else
    printf("files kept in %s\n", g_work);
  uv_loop_close(g_loop);
  return rc;
}

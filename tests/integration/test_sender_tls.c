/* The MLLP sender over TLS (engine/mllp/sender_tls.c) against the real
 * radrelay binary's mutual-TLS listener, with certificates from
 * scripts/gen-certs: messages go through and are acknowledged; a server
 * whose certificate does not name the host, an untrusted server and a
 * client certificate off the allow-list are refused with RR_ETLS.
 *
 * Also MLLP release 2 against a plain channel answering with commit blocks.
 *
 *   test_sender_tls RADRELAY GEN_CERTS
 */
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mllp/sender.h"
#include "rr_test.h"
#include "tls/tls.h"

extern char **environ;

static uv_loop_t loop;
static char dir[256];

typedef struct result {
  int done, status;
  char ack[3];
} result_t;

static void on_sent(void *ud, const rr_mllp_send_result_t *r) {
  result_t *x = ud;
  x->done = 1;
  x->status = r->status;
  memcpy(x->ack, r->ack_code, 3);
}

static void on_closed(void *ud) {
  *(int *)ud = 1;
}

static void tick_cb(uv_timer_t *t) {
  (void)t;
}

/* Runs the loop until *flag or the deadline (a condition, not a sleep). */
static int run_until(const int *flag, double seconds) {
  uint64_t end = uv_hrtime() + (uint64_t)(seconds * 1e9);
  uv_timer_t tick; /* wakes the loop so the deadline is seen */
  uv_timer_init(&loop, &tick);
  uv_timer_start(&tick, tick_cb, 50, 50);
  while (!*flag && uv_hrtime() < end)
    uv_run(&loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(&loop, UV_RUN_NOWAIT);
  return *flag;
}

static pid_t start_engine(const char *radrelay, int *port, int *r2_port) {
  char cfg[512], log[512];
  snprintf(cfg, sizeof cfg, "%s/radrelay.json", dir);
  snprintf(log, sizeof log, "%s/engine.log", dir);
  FILE *f = fopen(cfg, "w");
  fprintf(f, "{\"store\":{\"path\":\"db.sqlite\"},\"channels\":\"ch\"}\n");
  fclose(f);
  char chdir_[512];
  snprintf(chdir_, sizeof chdir_, "%s/ch", dir);
  mkdir(chdir_, 0700);
  snprintf(chdir_, sizeof chdir_, "%s/ch/orders.json", dir);
  f = fopen(chdir_, "w");
  fprintf(f,
          "{\"name\":\"orders\",\"source\":{\"type\":\"mllp\",\"port\":0,\"tls\":{"
          "\"cert\":\"%s/pki/server.pem\",\"key\":\"%s/pki/server.key\","
          "\"ca\":\"%s/pki/ca.pem\",\"allow\":[\"ris.test\"]}}}\n",
          dir, dir, dir);
  fclose(f);
  snprintf(chdir_, sizeof chdir_, "%s/ch/r2.json", dir);
  f = fopen(chdir_, "w");
  fprintf(f, "{\"name\":\"r2\",\"source\":{\"type\":\"mllp\",\"port\":0,\"mllp_release\":2}}\n");
  fclose(f);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 2, log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  char *argv[] = {(char *)radrelay, "run", "-c", cfg, NULL};
  pid_t pid;
  if (posix_spawn(&pid, radrelay, &fa, NULL, argv, environ) != 0)
    return -1;
  posix_spawn_file_actions_destroy(&fa);
  /* Wait for "event=ready ... port=N" with a deadline. */
  uint64_t end = uv_hrtime() + 15000000000ull;
  *port = *r2_port = 0;
  while ((!*port || !*r2_port) && uv_hrtime() < end) {
    FILE *l = fopen(log, "r");
    char line[1024];
    while (l && fgets(line, sizeof line, l)) {
      char *p = strstr(line, "event=ready channel=orders port=");
      if (p)
        *port = atoi(p + strlen("event=ready channel=orders port="));
      p = strstr(line, "event=ready channel=r2 port=");
      if (p)
        *r2_port = atoi(p + strlen("event=ready channel=r2 port="));
    }
    if (l)
      fclose(l);
    if (!*port || !*r2_port)
      usleep(20000); /* polling the log file for a condition, with a deadline */
  }
  return pid;
}

static rr_tls_ctx_t *client_ctx(const char *cert, const char *ca, const char *name) {
  char c[512], k[512], a[512];
  snprintf(c, sizeof c, "%s/pki/%s.pem", dir, cert);
  snprintf(k, sizeof k, "%s/pki/%s.key", dir, cert);
  snprintf(a, sizeof a, "%s/pki/%s", dir, ca);
  rr_tls_config_t t = {0};
  t.role = RR_TLS_CLIENT;
  t.cert_file = c;
  t.key_file = k;
  t.ca_file = a;
  t.server_name = name;
  rr_tls_ctx_t *ctx = NULL;
  rr_buf_t err;
  rr_buf_init(&err, 4096);
  if (rr_tls_ctx_new(&t, &ctx, &err) != 0)
    fprintf(stderr, "client ctx: %s\n", err.data);
  rr_buf_close(&err);
  return ctx;
}

static int send_n(int port, rr_tls_ctx_t *ctx, int n, const char *prefix, result_t *last) {
  rr_mllp_sender_config_t c;
  rr_mllp_sender_config_default(&c);
  c.host = "127.0.0.1";
  c.port = port;
  if (ctx) {
    c.transport_new = rr_mllp_transport_tls_new;
    c.transport_arg = ctx;
  } else {
    c.mllp_release = 2; /* the plain channel of this test answers with commit blocks */
  }
  c.connect_timeout_ms = 3000;
  rr_mllp_sender_t *s;
  if (rr_mllp_sender_new(&loop, &c, &s) != 0)
    return -1;
  int ok = 0;
  for (int i = 0; i < n; i++) {
    char msg[512], ctl[64];
    snprintf(ctl, sizeof ctl, "%s-%04d", prefix, i);
    snprintf(
        msg, sizeof msg,
        "MSH|^~\\&|RR_TEST|FAC|RADRELAY|RCV|20260101||ADT^A01|%s|P|2.5.1\rPID|1||MRN%04d^^^FAC^MR"
        "||ZZTEST^TLS\r",
        ctl, i);
    memset(last, 0, sizeof *last);
    rr_mllp_sender_send(s, msg, strlen(msg), ctl, on_sent, last);
    if (!run_until(&last->done, 10))
      break;
    ok += last->status == 0 && strcmp(last->ack, ctx ? "AA" : "CA") == 0;
  }
  int closed = 0;
  rr_mllp_sender_close(s, on_closed, &closed);
  run_until(&closed, 5);
  return ok;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: test_sender_tls RADRELAY GEN_CERTS\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  snprintf(dir, sizeof dir, "/tmp/rr-sender-tls-XXXXXX");
  if (!mkdtemp(dir))
    return 1;
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "%s %s/pki", argv[2], dir);
  CHECK_EQ_INT(system(cmd), 0);
  uv_loop_init(&loop);
  int port = 0, r2_port = 0;
  pid_t pid = start_engine(argv[1], &port, &r2_port);
  CHECK(pid > 0 && port > 0 && r2_port > 0);
  if (pid > 0 && port > 0) {
    result_t r;
    rr_tls_ctx_t *good = client_ctx("client", "ca.pem", "localhost");
    CHECK_EQ_INT(send_n(port, good, 20, "TLSOK", &r), 20);
    rr_tls_ctx_t *wrong_name = client_ctx("client", "ca.pem", "wrong.test");
    CHECK_EQ_INT(send_n(port, wrong_name, 1, "NAME", &r), 0);
    CHECK_EQ_INT(r.status, RR_ETLS);
    rr_tls_ctx_t *untrusted = client_ctx("client", "other-ca.pem", "localhost");
    CHECK_EQ_INT(send_n(port, untrusted, 1, "CA", &r), 0);
    CHECK_EQ_INT(r.status, RR_ETLS);
    rr_tls_ctx_t *intruder = client_ctx("intruder", "ca.pem", "localhost");
    CHECK_EQ_INT(send_n(port, intruder, 1, "ALLOW", &r), 0);
    CHECK(r.status != 0);
    CHECK_EQ_INT(send_n(r2_port, NULL, 10, "R2", &r), 10);
    rr_tls_ctx_free(good);
    rr_tls_ctx_free(wrong_name);
    rr_tls_ctx_free(untrusted);
    rr_tls_ctx_free(intruder);
  }
  if (pid > 0) {
    kill(pid, SIGTERM);
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  }
  uv_run(&loop, UV_RUN_NOWAIT);
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  if (rr_test_failures) {
    snprintf(cmd, sizeof cmd, "cat %s/engine.log >&2", dir);
    if (system(cmd) != 0)
      fprintf(stderr, "no engine log\n");
  }
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", dir);
  rr_tests_passed += rr_test_failures == 0;
  rr_tests_failed += rr_test_failures != 0;
  return TEST_SUMMARY();
}

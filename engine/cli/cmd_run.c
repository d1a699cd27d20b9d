/* radrelay run / check: load the configuration, open the store, serve. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "admin/alerts.h"
#include "admin/api.h"
#include "ai/ai.h"
#include "ai/deid.h"
#include "audit/config_audit.h"
#include "cli/cli.h"
#include "cli/config.h"
#include "core/error.h"
#include "core/log.h"
#include "notify/notify.h"

typedef struct run_state {
  rr_engine_t *engine;
  rr_dispatch_t *dispatch;
  uv_timer_t ai_expiry; /* AI jobs past their deadline */
  rr_admin_t *api;      /* NULL without an "http" section */
  rr_alerts_t *alerts;  /* NULL without an "alerts" section */
  uv_signal_t sigint, sigterm, sighup, sigusr2;
  uv_timer_t prune; /* retention: removes old messages in slices */
  rr_journal_t *journal;
  unsigned retention_days;
  uint64_t pruned;
  int stopping;
  const rr_config_t *cfg;
} run_state_t;

/* The files the configuration is made of, against the hashes the store
 * saw last: changes go to the audit trail (audit/config_audit.h). */
static void audit_config(rr_journal_t *j, const rr_config_t *cfg, const char *why) {
  char real[PATH_MAX];
  int changed = 0, rc;
#define AUDIT_ONE(p)                                                                               \
  if ((p)[0] && realpath((p), real) && (rc = rr_config_audit_file(j, real, why)) > 0)              \
  changed += rc
  AUDIT_ONE(cfg->config_path);
  AUDIT_ONE(cfg->http_token_file);
#undef AUDIT_ONE
  if (realpath(cfg->channels_dir, real) && (rc = rr_config_audit_dir(j, real, why)) > 0)
    changed += rc;
  for (size_t i = 0; i < cfg->nchannels; i++) {
    const rr_channel_config_t *ch = &cfg->channels[i];
    /* scripts live in the channels folder (seen above) or elsewhere */
    if (ch->script[0] && realpath(ch->script, real) &&
        (rc = rr_config_audit_file(j, real, why)) > 0)
      changed += rc;
    bool seen = false;
    for (size_t k = 0; k < i; k++)
      seen |= strcmp(cfg->channels[k].script_lib, ch->script_lib) == 0;
    if (!seen && ch->script_lib[0] && realpath(ch->script_lib, real) &&
        (rc = rr_config_audit_dir(j, real, why)) > 0)
      changed += rc;
  }
  if (changed) {
    rr_log(RR_LOG_INFO, "config", "event=config_audited changed=%d why=%s", changed, why);
    rr_journal_kick(j);
  }
}

/* SIGHUP: certificates and keys are read again, for new connections. */
static void on_sighup(uv_signal_t *h, int signum) {
  run_state_t *s = h->data;
  (void)signum;
  rr_log(RR_LOG_INFO, "engine", "event=reload signal=HUP");
  audit_config(s->journal, s->cfg, "reload");
  rr_engine_reload_tls(s->engine);
  rr_engine_reload_scripts(s->engine);
  if (s->api) {
    rr_buf_t err;
    rr_buf_init(&err, 4096);
    if (rr_admin_reload(s->api, &err) != 0)
      rr_log(RR_LOG_ERROR, "api", "event=reload_failed error=\"%s\"", err.data ? err.data : "");
    rr_buf_close(&err);
  }
}

#define PRUNE_SLICE 5000            /* messages per transaction */
#define PRUNE_EVERY_MS (600 * 1000) /* between rounds */

static void on_prune_timer(uv_timer_t *t);

static void on_pruned(void *ud, int status, int64_t removed) {
  run_state_t *s = ud;
  if (s->stopping)
    return;
  if (status) {
    rr_log(RR_LOG_ERROR, "journal", "event=prune_failed error=\"%s\"", rr_strerror(status));
    uv_timer_start(&s->prune, on_prune_timer, PRUNE_EVERY_MS, 0);
    return;
  }
  s->pruned += (uint64_t)removed;
  if (removed >= PRUNE_SLICE) { /* more to do: the next slice after a breath */
    uv_timer_start(&s->prune, on_prune_timer, 50, 0);
    return;
  }
  if (s->pruned)
    rr_log(RR_LOG_INFO, "journal", "event=pruned messages=%llu retention_days=%u",
           (unsigned long long)s->pruned, s->retention_days);
  s->pruned = 0;
  uv_timer_start(&s->prune, on_prune_timer, PRUNE_EVERY_MS, 0);
}

static void on_prune_timer(uv_timer_t *t) {
  run_state_t *s = t->data;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  int64_t now = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
  int64_t cutoff = now - (int64_t)s->retention_days * 86400000;
  if (rr_journal_prune(s->journal, cutoff, PRUNE_SLICE, on_pruned, s) == 0)
    rr_journal_kick(s->journal);
  else
    uv_timer_start(&s->prune, on_prune_timer, PRUNE_EVERY_MS, 0);
}

/* SIGUSR2: `radrelay queue` / `radrelay replay` left requests in the store. */
static void on_sigusr2(uv_signal_t *h, int signum) {
  run_state_t *s = h->data;
  (void)signum;
  if (!s->stopping)
    rr_dispatch_apply_ops(s->dispatch);
}

static void on_signal(uv_signal_t *h, int signum) {
  run_state_t *s = h->data;
  if (s->stopping)
    return;
  s->stopping = 1;
  rr_log(RR_LOG_INFO, "engine", "event=shutdown signal=%s", signum == SIGINT ? "INT" : "TERM");
  rr_admin_stop(s->api);
  s->api = NULL;
  rr_alerts_stop(s->alerts);
  s->alerts = NULL;
  rr_engine_stop(s->engine);
  if (s->dispatch)
    rr_dispatch_stop(s->dispatch, NULL, NULL);
  uv_close((uv_handle_t *)&s->sigint, NULL);
  uv_close((uv_handle_t *)&s->sigterm, NULL);
  uv_close((uv_handle_t *)&s->sighup, NULL);
  uv_close((uv_handle_t *)&s->sigusr2, NULL);
  if (s->retention_days)
    uv_close((uv_handle_t *)&s->prune, NULL);
  uv_close((uv_handle_t *)&s->ai_expiry, NULL);
}

static void on_ai_expiry(uv_timer_t *t) {
  run_state_t *s = t->data;
  if (!s->stopping) {
    rr_engine_ai_expire(s->engine);
    rr_engine_ai_poll(s->engine);
    rr_ai_deid_sweep(s->journal, 16);
  }
}

/* mkdir -p of the folder holding path. */
static int make_parent(const char *path) {
  char d[4096];
  snprintf(d, sizeof d, "%s", path);
  char *slash = strrchr(d, '/');
  if (!slash || slash == d)
    return 0;
  *slash = '\0';
  for (char *p = d + 1; *p; p++) {
    if (*p == '/') {
      *p = '\0';
      if (mkdir(d, 0750) != 0 && errno != EEXIST)
        return -errno;
      *p = '/';
    }
  }
  if (mkdir(d, 0750) != 0 && errno != EEXIST)
    return -errno;
  return 0;
}

static const char *config_arg(int argc, char **argv, const char **level) {
  const char *path = NULL;
  for (int i = 0; i < argc; i++) {
    if ((strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) && i + 1 < argc)
      path = argv[++i];
    else if (strcmp(argv[i], "--log-level") == 0 && i + 1 < argc && level)
      *level = argv[++i];
  }
  return path;
}

static int load(int argc, char **argv, rr_config_t *cfg, const char **level) {
  const char *path = config_arg(argc, argv, level);
  if (!path) {
    fprintf(stderr, "radrelay: -c CONFIG is required\n");
    return 2;
  }
  rr_buf_t err;
  rr_buf_init(&err, 1 << 20);
  int rc = rr_config_load(path, cfg, &err);
  if (rc) {
    fputs(err.data ? err.data : "configuration invalid\n", stderr);
    rr_buf_close(&err);
    rr_config_free(cfg);
    return 1;
  }
  rr_buf_close(&err);
  return 0;
}

int rr_cmd_check(int argc, char **argv) {
  rr_config_t cfg;
  int st = load(argc, argv, &cfg, NULL);
  if (st)
    return st;
  /* Certificates and keys load as they would at start. */
  int bad = 0;
  for (size_t i = 0; i < cfg.nchannels; i++) {
    rr_channel_config_t *ch = &cfg.channels[i];
    if (!ch->tls)
      continue;
    rr_tls_config_t t = ch->tls_cfg;
    t.role = RR_TLS_SERVER;
    t.cert_file = ch->tls_cert[0] ? ch->tls_cert : NULL;
    t.key_file = ch->tls_key[0] ? ch->tls_key : NULL;
    t.ca_file = ch->tls_ca[0] ? ch->tls_ca : NULL;
    t.crl_file = ch->tls_crl[0] ? ch->tls_crl : NULL;
    t.allow = (const char *const *)ch->tls_allow;
    rr_tls_ctx_t *ctx = NULL;
    rr_buf_t err;
    rr_buf_init(&err, 1 << 16);
    if (rr_tls_ctx_new(&t, &ctx, &err) != 0) {
      fprintf(stderr, "channel %s: $.source.tls: %s\n", ch->name, err.data ? err.data : "invalid");
      bad++;
    }
    rr_tls_ctx_free(ctx);
    rr_buf_close(&err);
  }
  if (!bad) {
    printf("configuration ok: store %s, %zu channel(s)\n", cfg.store_path, cfg.nchannels);
    for (size_t i = 0; i < cfg.nchannels; i++)
      printf("  channel %s: %s%s %s:%d\n", cfg.channels[i].name,
             cfg.channels[i].dicomweb ? "dicomweb"
             : cfg.channels[i].dicom  ? "dicom"
                                      : "mllp",
             cfg.channels[i].tls ? "+tls" : "", cfg.channels[i].host, cfg.channels[i].listen.port);
  }
  rr_config_free(&cfg);
  return bad ? 1 : 0;
}

/* The running engine's pid sits beside its store, so `radrelay reload -c`
 * finds it from the same configuration. */
/* An SR file the dispatcher waited for is written. */
static void files_ready(void *ud) {
  rr_dispatch_kick(ud);
}

static void pid_path(const rr_config_t *cfg, char *out, size_t cap) {
  snprintf(out, cap, "%s.pid", cfg->store_path);
}

int rr_cmd_reload(int argc, char **argv) {
  rr_config_t cfg;
  int st = load(argc, argv, &cfg, NULL);
  if (st)
    return st;
  char path[4200];
  pid_path(&cfg, path, sizeof path);
  rr_config_free(&cfg);
  FILE *f = fopen(path, "r");
  long pid = 0;
  if (!f || fscanf(f, "%ld", &pid) != 1 || pid <= 1) {
    fprintf(stderr, "radrelay reload: no running engine found (%s)\n", path);
    if (f)
      fclose(f);
    return 1;
  }
  fclose(f);
  if (kill((pid_t)pid, SIGHUP) != 0) {
    fprintf(stderr, "radrelay reload: pid %ld: %s\n", pid, strerror(errno));
    return 1;
  }
  printf("reload requested (pid %ld): scripts and TLS files are read again\n", pid);
  return 0;
}

int rr_cmd_run(int argc, char **argv) {
  rr_config_t cfg;
  const char *level = NULL;
  int st = load(argc, argv, &cfg, &level);
  if (st)
    return st;
  rr_log_set_level((rr_log_level_t)cfg.log_level);
  if (level) {
    int l = rr_log_parse_level(level);
    if (l < 0) {
      fprintf(stderr, "radrelay: unknown log level '%s'\n", level);
      rr_config_free(&cfg);
      return 2;
    }
    rr_log_set_level((rr_log_level_t)l);
  }
  signal(SIGPIPE, SIG_IGN);
  /* A SIGTERM or SIGINT while starting (a supervisor that stops the engine
   * as soon as it says ready) waits until its handler is installed, and
   * then stops the engine cleanly. Threads started meanwhile keep them
   * blocked: the loop thread takes them. */
  sigset_t stop_signals, old_mask;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, &old_mask);
  /* Every connection is a descriptor: take what the hard limit allows. */
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  int status = 1;
  rr_journal_t *journal = NULL;
  uv_loop_t loop;
  uv_loop_init(&loop);
  run_state_t s = {0};
  char *emsg = NULL;
  int rc = make_parent(cfg.store_path);
  if (rc == 0)
    rc = rr_journal_open(&loop, cfg.store_path, cfg.sync, &journal, &emsg);
  if (rc) {
    rr_log(RR_LOG_ERROR, "engine", "event=store_open_failed path=%s error=\"%s\"", cfg.store_path,
           emsg ? emsg : rr_strerror(rc));
    free(emsg);
    goto out;
  }
  rr_journal_set_gather(journal, cfg.group_commit_wait_us);
  rr_journal_set_keep_sent(journal, !cfg.keep_sent_off);
  if ((rc = rr_ai_schema(journal, &emsg)) != 0 || (rc = rr_notify_schema(journal, &emsg)) != 0 ||
      (rc = rr_ai_deid_schema(journal, &emsg)) != 0 ||
      (rc = rr_config_audit_schema(journal, &emsg)) != 0 ||
      (rc = rr_alerts_schema(journal, &emsg)) != 0) {
    rr_log(RR_LOG_ERROR, "engine", "event=store_open_failed path=%s error=\"%s\"", cfg.store_path,
           emsg ? emsg : rr_strerror(rc));
    free(emsg);
    goto out;
  }
  rr_log(RR_LOG_INFO, "engine", "event=store_open path=%s synchronous=%s", cfg.store_path,
         cfg.sync == RR_JOURNAL_SYNC_FULL     ? "full"
         : cfg.sync == RR_JOURNAL_SYNC_NORMAL ? "normal"
                                              : "off");
  audit_config(journal, &cfg, "start");
  s.cfg = &cfg;
  s.journal = journal;
  if ((rc = rr_engine_new(&loop, journal, &s.engine)) ||
      (rc = rr_dispatch_new(&loop, journal, &s.dispatch)))
    goto out;
  rr_dispatch_set_replay(s.dispatch, rr_engine_replay, s.engine);
  rr_dispatch_set_inject(s.dispatch, rr_engine_inject, s.engine);
  rr_dispatch_set_study_complete(s.dispatch, rr_engine_study_complete, s.engine);
  rr_dispatch_set_file_gate(s.dispatch, rr_engine_sr_gate, s.engine);
  rr_engine_set_files_ready(s.engine, files_ready, s.dispatch);
  rr_dispatch_set_ai(s.dispatch, cfg.http_public_url[0] ? cfg.http_public_url : NULL,
                     rr_engine_ai_result, s.engine);
  /* The alerts' destination: an HTTP POST of each raise and clear. */
  rr_destination_config_t alerts_dest;
  rr_destination_config_default(&alerts_dest);
  if (cfg.alerts) {
    alerts_dest.kind = RR_DEST_HTTP;
    snprintf(alerts_dest.name, sizeof alerts_dest.name, "%s", RR_ALERTS_DESTINATION);
    snprintf(alerts_dest.short_name, sizeof alerts_dest.short_name, "alerts");
    snprintf(alerts_dest.role, sizeof alerts_dest.role, "result");
    snprintf(alerts_dest.url, sizeof alerts_dest.url, "%s", cfg.alerts_url);
    snprintf(alerts_dest.token_file, sizeof alerts_dest.token_file, "%s", cfg.alerts_token_file);
    alerts_dest.key_none = true;
    rr_buf_t err;
    rr_buf_init(&err, 1 << 16);
    rc = rr_dispatch_add(s.dispatch, &alerts_dest, &err);
    if (rc)
      rr_log(RR_LOG_ERROR, "engine", "event=destination_failed destination=%s error=\"%s\"",
             alerts_dest.name, err.data ? err.data : rr_strerror(rc));
    rr_buf_close(&err);
    if (rc) {
      rr_engine_stop(s.engine);
      rr_dispatch_stop(s.dispatch, NULL, NULL);
      uv_run(&loop, UV_RUN_DEFAULT);
      goto out;
    }
  }
  /* Destinations first: their queues may hold what earlier runs accepted. */
  for (size_t i = 0; i < cfg.nchannels; i++)
    for (size_t k = 0; k < cfg.channels[i].ndestinations; k++) {
      rr_buf_t err;
      rr_buf_init(&err, 1 << 16);
      rc = rr_dispatch_add(s.dispatch, &cfg.channels[i].destinations[k], &err);
      if (rc)
        rr_log(RR_LOG_ERROR, "engine", "event=destination_failed destination=%s error=\"%s\"",
               cfg.channels[i].destinations[k].name, err.data ? err.data : rr_strerror(rc));
      rr_buf_close(&err);
      if (rc) {
        rr_engine_stop(s.engine);
        rr_dispatch_stop(s.dispatch, NULL, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
        goto out;
      }
    }
  for (size_t i = 0; i < cfg.nchannels; i++) {
    rr_channel_t *ch;
    rc = rr_engine_add_channel(s.engine, &cfg.channels[i], &ch);
    if (rc) {
      rr_log(RR_LOG_ERROR, "engine", "event=listen_failed channel=%s host=%s port=%d error=%s",
             cfg.channels[i].name, cfg.channels[i].host, cfg.channels[i].listen.port,
             uv_err_name(rc));
      rr_engine_stop(s.engine);
      rr_dispatch_stop(s.dispatch, NULL, NULL);
      uv_run(&loop, UV_RUN_DEFAULT);
      goto out;
    }
    cfg.channels[i].accept = NULL; /* handed to the channel */
    cfg.channels[i].tls_allow = NULL;
    cfg.channels[i].destinations = NULL;
    cfg.channels[i].ndestinations = 0;
    cfg.channels[i].dicom_calling_aes = NULL;
    cfg.channels[i].dicom_peers = NULL;
    cfg.channels[i].dw_modalities = NULL;
    rr_log(RR_LOG_INFO, "engine", "event=ready channel=%s port=%d", cfg.channels[i].name,
           rr_channel_port(ch));
  }
  if ((rc = rr_engine_notify_start(s.engine, cfg.http_public_url)) != 0) {
    rr_log(RR_LOG_ERROR, "engine", "event=store_open_failed path=%s error=\"notifications: %s\"",
           cfg.store_path, rr_strerror(rc));
    rr_engine_stop(s.engine);
    rr_dispatch_stop(s.dispatch, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    goto out;
  }
  if (cfg.alerts) {
    rr_alerts_config_t ac = {.check_ms = cfg.alerts_check_ms,
                             .queue_depth = cfg.alerts_queue_depth,
                             .oldest_age_ms = cfg.alerts_oldest_age_ms,
                             .error_rate = cfg.alerts_error_rate,
                             .min_messages = cfg.alerts_min_messages};
    if ((rc = rr_alerts_start(&loop, s.engine, journal, &ac, &s.alerts)) != 0)
      rr_log(RR_LOG_ERROR, "alerts", "event=alerts_not_started error=%s", rr_strerror(rc));
  }
  if (cfg.http) {
    rr_tls_config_t tc = {.role = RR_TLS_SERVER,
                          .cert_file = cfg.http_cert,
                          .key_file = cfg.http_key,
                          .ca_file = cfg.http_ca[0] ? cfg.http_ca : NULL,
                          .crl_file = cfg.http_crl[0] ? cfg.http_crl : NULL,
                          .require_client_cert = cfg.http_require_client_cert,
                          .min_version = RR_TLS_V1_2,
                          .max_version = RR_TLS_V1_3};
    char dashboard[4096] = "";
    if (!cfg.http_dashboard_off &&
        rr_admin_dashboard_find(cfg.http_dashboard, dashboard, sizeof dashboard) != 0)
      rr_log(cfg.http_dashboard[0] ? RR_LOG_ERROR : RR_LOG_WARN, "api",
             "event=dashboard_missing dir=\"%s\" error=\"no index.html there\"",
             cfg.http_dashboard[0] ? cfg.http_dashboard : "(default)");
    rr_admin_config_t ac = {.host = cfg.http_host,
                            .port = cfg.http_port,
                            .token_file = cfg.http_token_file,
                            .tls = cfg.http_tls ? &tc : NULL,
                            .dispatch = s.dispatch,
                            .dashboard = dashboard};
    rr_buf_t err;
    rr_buf_init(&err, 4096);
    rc = rr_admin_start(&loop, s.engine, journal, &ac, &s.api, &err);
    if (rc) {
      rr_log(RR_LOG_ERROR, "api", "event=listen_failed host=%s port=%d error=\"%s\"", cfg.http_host,
             cfg.http_port, err.data ? err.data : rr_strerror(rc));
      rr_buf_close(&err);
      rr_engine_stop(s.engine);
      rr_dispatch_stop(s.dispatch, NULL, NULL);
      uv_run(&loop, UV_RUN_DEFAULT);
      goto out;
    }
    rr_buf_close(&err);
    rr_log(RR_LOG_INFO, "engine", "event=api_ready host=%s port=%d tls=%s dashboard=%s",
           cfg.http_host, rr_admin_port(s.api), cfg.http_tls ? "yes" : "no",
           dashboard[0] ? "/ui/" : "none");
    if (dashboard[0])
      rr_log(RR_LOG_INFO, "api", "event=dashboard dir=\"%s\"", dashboard);
  }
  uv_timer_init(&loop, &s.ai_expiry);
  s.ai_expiry.data = &s;
  uv_timer_start(&s.ai_expiry, on_ai_expiry, 1000, 1000);
  uv_unref((uv_handle_t *)&s.ai_expiry);
  uv_signal_init(&loop, &s.sigint);
  uv_signal_init(&loop, &s.sigterm);
  uv_signal_init(&loop, &s.sighup);
  s.sigint.data = s.sigterm.data = s.sighup.data = &s;
  uv_signal_start(&s.sigint, on_signal, SIGINT);
  uv_signal_start(&s.sigterm, on_signal, SIGTERM);
  uv_signal_start(&s.sighup, on_sighup, SIGHUP);
  uv_unref((uv_handle_t *)&s.sighup);
  uv_signal_init(&loop, &s.sigusr2);
  s.sigusr2.data = &s;
  uv_signal_start(&s.sigusr2, on_sigusr2, SIGUSR2);
  uv_unref((uv_handle_t *)&s.sigusr2);
  pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
  rr_dispatch_apply_ops(s.dispatch); /* left while no engine ran */
  s.journal = journal;
  s.retention_days = cfg.retention_days;
  if (s.retention_days) {
    uv_timer_init(&loop, &s.prune);
    s.prune.data = &s;
    uv_timer_start(&s.prune, on_prune_timer, 1000, 0);
    uv_unref((uv_handle_t *)&s.prune);
  }
  char pidfile[4200];
  pid_path(&cfg, pidfile, sizeof pidfile);
  FILE *pf = fopen(pidfile, "w");
  if (pf) {
    fprintf(pf, "%ld\n", (long)getpid());
    fclose(pf);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  unlink(pidfile);
  rr_log(RR_LOG_INFO, "engine", "event=stopped");
  status = 0;
out:
  pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
  rr_engine_free(s.engine);
  rr_journal_close(journal); /* idle by now; anything left reports to the dispatcher */
  rr_dispatch_free(s.dispatch);
  uv_loop_close(&loop);
  rr_config_free(&cfg);
  return status;
}

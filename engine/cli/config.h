/* Engine configuration: the engine file and one file per channel, JSON.
 * Errors name the file, the JSON path and what is wrong. */
#ifndef RR_CLI_CONFIG_H
#define RR_CLI_CONFIG_H

#include "channel/channel.h"
#include "store/journal.h"

typedef struct rr_config {
  char store_path[4096];
  rr_journal_sync_t sync;
  unsigned group_commit_wait_us;
  bool keep_sent_off;      /* store.keep_sent: false */
  unsigned retention_days; /* 0 = keep everything */
  int log_level;
  /* the REST API (admin/api.h); http false = none */
  bool http;
  char http_host[64];
  int http_port;
  char http_token_file[1024];
  char http_public_url[1024]; /* how AI endpoints reach the API (callbacks); "" = none */
  bool http_tls;
  char http_cert[1024], http_key[1024], http_ca[1024], http_crl[1024];
  bool http_require_client_cert;
  char http_dashboard[1024]; /* the dashboard's folder; "" = the default one */
  bool http_dashboard_off;   /* "dashboard": false */
  char config_path[4096];    /* the engine file, as given */
  char channels_dir[4096];   /* its channels folder */
  /* operational alerts (admin/alerts.h); alerts false = none */
  bool alerts;
  char alerts_url[1024], alerts_token_file[1024];
  uint64_t alerts_check_ms, alerts_min_messages;
  int64_t alerts_queue_depth, alerts_oldest_age_ms;
  double alerts_error_rate;
  rr_channel_config_t *channels; /* owned, nchannels entries */
  size_t nchannels;
} rr_config_t;

/* rr_config_load: reads path and every *.json in its channels folder. On
 * failure returns a negative code and writes one line per problem into err
 * ("file: $.json.path: what is wrong"). ${VAR} and ${VAR:-default} are
 * substituted in string values. */
int rr_config_load(const char *path, rr_config_t *cfg, rr_buf_t *err);
/* rr_config_free: frees what rr_config_load allocated, except the accept
 * lists handed to channels (set to NULL once handed over). */
void rr_config_free(rr_config_t *cfg);

#endif

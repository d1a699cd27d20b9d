/* Operational alerts: thresholds on queue depth, the age of a queue's
 * oldest delivery and a channel's error rate. Each condition raises one
 * alert when it starts and one when it clears, never one per check: its
 * state is kept in table alerts (so a restart does not raise it again),
 * it clears only once the value is below 80% of its threshold (no
 * flapping around the line), and each raise or clear is a journal entry
 * (channel "engine", type ALERT) with one route to the alerts destination
 * (an HTTP POST of JSON, queued and retried like any delivery) and an
 * audit record (kind alert_raised / alert_cleared).
 *
 * The document: {"alert": "queue_depth" | "queue_oldest_age" |
 * "error_rate", "subject": destination or channel name, "state": "raised"
 * | "cleared", "value", "threshold", "at": RFC 3339, "since": when it was
 * raised}. Loop thread. */
#ifndef RR_ADMIN_ALERTS_H
#define RR_ADMIN_ALERTS_H

#include <stdint.h>
#include <uv.h>

#include "channel/channel.h"
#include "store/journal.h"

#define RR_ALERTS_DESTINATION "engine.alerts"

typedef struct rr_alerts_config {
  uint64_t check_ms;     /* how often; default 30 s */
  int64_t queue_depth;   /* pending deliveries of one destination; 0 = off */
  int64_t oldest_age_ms; /* age of a destination's oldest delivery; 0 = off */
  double error_rate;     /* errored+rejected / received of a channel over a check; 0 = off */
  uint64_t min_messages; /* messages a check needs before its rate counts; default 20 */
} rr_alerts_config_t;

typedef struct rr_alerts rr_alerts_t;

/* rr_alerts_schema: table alerts (at start). */
int rr_alerts_schema(rr_journal_t *j, char **errmsg);
/* rr_alerts_start: loads the raised alerts and checks every check_ms.
 * RR_ENOMEM, RR_EIO. */
int rr_alerts_start(uv_loop_t *loop, rr_engine_t *e, rr_journal_t *j, const rr_alerts_config_t *cfg,
                    rr_alerts_t **out);
/* rr_alerts_check: one check now (also for tests); returns how many
 * alerts were raised or cleared. */
int rr_alerts_check(rr_alerts_t *a);
/* rr_alerts_stop: closes the timer; frees a once it is closed. NULL: no-op. */
void rr_alerts_stop(rr_alerts_t *a);

#endif

/* Structured logging: one line per event, key=value pairs.
 *
 *   rr_log(RR_LOG_INFO, "mllp", "event=accept channel=%s peer=%s", ch, peer);
 *
 * Lines go to stderr (or the sink set with rr_log_set_sink) as
 *   ts=2026-11-27T21:00:00.123Z level=info module=mllp event=accept ...
 * Patient data is only ever logged at RR_LOG_DEBUG. Thread-safe: each line
 * is written with a single write(2). */
#ifndef RR_CORE_LOG_H
#define RR_CORE_LOG_H

typedef enum rr_log_level {
  RR_LOG_DEBUG = 0,
  RR_LOG_INFO,
  RR_LOG_WARN,
  RR_LOG_ERROR
} rr_log_level_t;

/* rr_log_set_level: lines below level are dropped. Call before threads start. */
void rr_log_set_level(rr_log_level_t level);
rr_log_level_t rr_log_get_level(void);
/* rr_log_set_fd: where lines go (default 2). */
void rr_log_set_fd(int fd);
/* rr_log_parse_level: "debug"/"info"/"warn"/"error"; -1 when unknown. */
int rr_log_parse_level(const char *s);

void rr_log(rr_log_level_t level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif

#include "core/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* Process-wide logging configuration: set once by main() before the loop
 * and worker threads start, read-only afterwards. */
static rr_log_level_t g_level = RR_LOG_INFO;
static int g_fd = 2;

void rr_log_set_level(rr_log_level_t level) {
  g_level = level;
}
rr_log_level_t rr_log_get_level(void) {
  return g_level;
}
void rr_log_set_fd(int fd) {
  g_fd = fd;
}

int rr_log_parse_level(const char *s) {
  static const char *const names[] = {"debug", "info", "warn", "error"};
  for (int i = 0; i < 4; i++)
    if (strcmp(s, names[i]) == 0)
      return i;
  return -1;
}

void rr_log(rr_log_level_t level, const char *module, const char *fmt, ...) {
  static const char *const names[] = {"debug", "info", "warn", "error"};
  if (level < g_level)
    return;
  char line[2048];
  struct timeval tv;
  gettimeofday(&tv, NULL);
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  int n = snprintf(line, sizeof line, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03dZ level=%s module=%s ",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                   (int)(tv.tv_usec / 1000), names[level], module);
  va_list ap;
  va_start(ap, fmt);
  int k = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
  va_end(ap);
  size_t len = (size_t)n + (k < 0 ? 0 : (size_t)k);
  if (len > sizeof line - 2)
    len = sizeof line - 2;
  line[len++] = '\n';
  ssize_t w = write(g_fd, line, len);
  (void)w;
}

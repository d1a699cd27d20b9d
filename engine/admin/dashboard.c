/* The web dashboard: where its files are (engine/admin/www in the source
 * tree, share/radrelay/www when installed), and GET / and /ui, which send
 * the browser to /ui/ where the HTTP server serves them. */
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <uv.h>

#include "admin/api_int.h"
#include "core/error.h"

#ifndef RR_DASHBOARD_SOURCE_DIR
#define RR_DASHBOARD_SOURCE_DIR ""
#endif

/* 1 when dir is a folder holding index.html. */
static int has_index(const char *dir) {
  char path[PATH_MAX];
  struct stat st;
  if ((size_t)snprintf(path, sizeof path, "%s/index.html", dir) >= sizeof path)
    return 0;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int found(const char *dir, char *out, size_t cap) {
  if (!has_index(dir))
    return RR_ENOTFOUND;
  if ((size_t)snprintf(out, cap, "%s", dir) >= cap)
    return RR_ELIMIT;
  return 0;
}

int rr_admin_dashboard_find(const char *configured, char *out, size_t cap) {
  if (configured && *configured)
    return found(configured, out, cap);
  char exe[PATH_MAX];
  size_t n = sizeof exe;
  if (uv_exepath(exe, &n) == 0) {
    char *slash = strrchr(exe, '/');
    if (slash) {
      *slash = '\0';
      char dir[PATH_MAX + 32];
      snprintf(dir, sizeof dir, "%s/../share/radrelay/www", exe);
      if (found(dir, out, cap) == 0)
        return 0;
    }
  }
  if (RR_DASHBOARD_SOURCE_DIR[0] && found(RR_DASHBOARD_SOURCE_DIR, out, cap) == 0)
    return 0;
  return RR_ENOTFOUND;
}

void rr_admin_dashboard_redirect(void *ud, rr_http_req_t *req) {
  const rr_admin_t *a = ud;
  if (!a->dashboard) {
    rr_http_reply_error(req, 404, "not_found", "No resource matches the request path.");
    return;
  }
  static const char *const h[] = {"Location: /ui/"};
  static const char body[] = "/ui/\n";
  rr_http_reply_ex(req, 302, h, 1, "text/plain; charset=utf-8", body, sizeof body - 1);
}

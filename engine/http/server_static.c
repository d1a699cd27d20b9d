/* HTTP server: static files under a URL prefix, opened and read in libuv's
 * thread pool (never on the loop). Files are opened beneath the served
 * directory (openat2 RESOLVE_BENEATH where the kernel has it, else
 * O_NOFOLLOW on the last component after segment checks). */
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "http/server_int.h"

typedef struct static_work {
  uv_work_t work;
  rr_http_req_t *req;
  char *dir;
  char *rel;
  char inm[256]; /* If-None-Match, "" when absent */
  char ims[64];  /* If-Modified-Since */
  size_t max;
  /* results */
  int status; /* 200, 304, 404, 500 */
  const char *code, *msg;
  const char *type;
  char etag[64];
  char last_modified[40];
  rr_buf_t body;
} static_work_t;

const char *hs_static_type(const char *name) {
  static const char *const map[][2] = {
      {"html", "text/html; charset=utf-8"},
      {"htm", "text/html; charset=utf-8"},
      {"css", "text/css; charset=utf-8"},
      {"js", "text/javascript; charset=utf-8"},
      {"mjs", "text/javascript; charset=utf-8"},
      {"json", "application/json"},
      {"map", "application/json"},
      {"txt", "text/plain; charset=utf-8"},
      {"svg", "image/svg+xml"},
      {"png", "image/png"},
      {"jpg", "image/jpeg"},
      {"jpeg", "image/jpeg"},
      {"gif", "image/gif"},
      {"webp", "image/webp"},
      {"ico", "image/x-icon"},
      {"woff", "font/woff"},
      {"woff2", "font/woff2"},
      {"wasm", "application/wasm"},
      {"pdf", "application/pdf"},
  };
  const char *slash = strrchr(name, '/');
  const char *base = slash ? slash + 1 : name;
  const char *dot = strrchr(base, '.');
  if (dot && dot != base) {
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
      if (strcasecmp(dot + 1, map[i][0]) == 0)
        return map[i][1];
  }
  return "application/octet-stream";
}

int hs_static_relpath(const rr_http_req_t *req, const hs_static_t *st, rr_buf_t *out) {
  size_t skip = 0;
  for (const char *p = st->prefix; *p; p++)
    skip += *p == '/';
  const char *seg = req->segs.data ? req->segs.data : "";
  for (size_t i = 0; i < req->nsegs; i++, seg += strlen(seg) + 1) {
    if (i < skip)
      continue;
    size_t n = strlen(seg);
    if (n == 0) {
      if (i + 1 == req->nsegs)
        break; /* "/prefix/": the directory */
      return RR_EPARSE;
    }
    if (seg[0] == '.' || strchr(seg, '/') || strchr(seg, '\\'))
      return RR_EPARSE;
    int rc = (out->len ? rr_buf_putc(out, '/') : 0);
    if (!rc)
      rc = rr_buf_append(out, seg, n);
    if (rc)
      return rc;
  }
  if (!out->data)
    return rr_buf_append(out, "", 0);
  return 0;
}

static int open_beneath(int dirfd, const char *rel) {
  struct open_how how;
  memset(&how, 0, sizeof how);
  how.flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  long fd = syscall(SYS_openat2, dirfd, rel, &how, sizeof how);
  if (fd >= 0 || (errno != ENOSYS && errno != EPERM))
    return (int)fd;
  return openat(dirfd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
}

static int etag_listed(const char *inm, const char *etag) {
  if (strcmp(inm, "*") == 0)
    return 1;
  /* weak comparison (RFC 9110 13.1.2): W/"x" matches "x" */
  return strstr(inm, etag) != NULL;
}

static void work_fail(static_work_t *w, int status) {
  w->status = status;
  if (status == 404) {
    w->code = "not_found";
    w->msg = "No resource matches the request path.";
  } else {
    w->code = "internal_error";
    w->msg = "The file could not be read.";
  }
}

static void on_work(uv_work_t *wr) {
  static_work_t *w = wr->data;
  int dirfd = open(w->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dirfd < 0) {
    work_fail(w, 500);
    return;
  }
  const char *rel = w->rel[0] ? w->rel : "index.html";
  int fd = open_beneath(dirfd, rel);
  struct stat st;
  if (fd >= 0 && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    int sub = open_beneath(fd, "index.html");
    close(fd);
    fd = sub;
    w->type = hs_static_type("index.html");
  } else {
    w->type = hs_static_type(rel);
  }
  close(dirfd);
  if (fd < 0) {
    work_fail(w, errno == ENOENT || errno == ENOTDIR || errno == ELOOP || errno == EXDEV ||
                         errno == EACCES
                     ? 404
                     : 500);
    return;
  }
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    work_fail(w, 404);
    return;
  }
  if ((uint64_t)st.st_size > w->max) {
    close(fd);
    work_fail(w, 500);
    w->code = "file_too_large";
    w->msg = "The file is larger than the server serves.";
    return;
  }
  snprintf(w->etag, sizeof w->etag, "\"%llx-%llx\"", (unsigned long long)st.st_size,
           (unsigned long long)st.st_mtim.tv_sec * 1000000000ull +
               (unsigned long long)st.st_mtim.tv_nsec);
  struct tm tm;
  gmtime_r(&st.st_mtim.tv_sec, &tm);
  strftime(w->last_modified, sizeof w->last_modified, "%a, %d %b %Y %H:%M:%S GMT", &tm);
  int not_modified = 0;
  if (w->inm[0]) {
    not_modified = etag_listed(w->inm, w->etag);
  } else if (w->ims[0]) {
    struct tm ims;
    memset(&ims, 0, sizeof ims);
    const char *end = strptime(w->ims, "%a, %d %b %Y %H:%M:%S GMT", &ims);
    if (end && *end == '\0')
      not_modified = st.st_mtim.tv_sec <= timegm(&ims);
  }
  if (not_modified) {
    close(fd);
    w->status = 304;
    return;
  }
  rr_buf_init(&w->body, (size_t)st.st_size);
  if (rr_buf_reserve(&w->body, (size_t)st.st_size) != 0) {
    close(fd);
    work_fail(w, 500);
    return;
  }
  size_t got = 0;
  while (got < (size_t)st.st_size) {
    ssize_t n = pread(fd, w->body.data + got, (size_t)st.st_size - got, (off_t)got);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    got += (size_t)n;
  }
  close(fd);
  w->body.len = got; /* a file shrinking meanwhile is served as read */
  w->body.data[got] = '\0';
  w->status = 200;
}

static void work_free(static_work_t *w) {
  rr_buf_close(&w->body);
  free(w->dir);
  free(w->rel);
  free(w);
}

static void on_work_done(uv_work_t *wr, int status) {
  static_work_t *w = wr->data;
  rr_http_req_t *req = w->req;
  if (status == UV_ECANCELED)
    work_fail(w, 500);
  if (w->status == 200 || w->status == 304) {
    char etag[80], lm[64];
    snprintf(etag, sizeof etag, "ETag: %s", w->etag);
    snprintf(lm, sizeof lm, "Last-Modified: %s", w->last_modified);
    const char *h[] = {etag, lm, "Cache-Control: no-cache", "X-Content-Type-Options: nosniff"};
    rr_http_reply_ex(req, w->status, h, 4, w->type, w->body.data ? w->body.data : "", w->body.len);
  } else {
    hs_reply_error(req, w->status, w->code, w->msg, NULL);
  }
  work_free(w);
}

static char *dup_str(const char *s) {
  size_t n = strlen(s);
  char *p = malloc(n + 1);
  if (p)
    memcpy(p, s, n + 1);
  return p;
}

void hs_static_serve(rr_http_req_t *req, const hs_static_t *st) {
  rr_http_server_t *s = req->c->s;
  rr_buf_t rel;
  rr_buf_init(&rel, 4096);
  int rc = hs_static_relpath(req, st, &rel);
  if (rc == RR_EPARSE || rc == RR_ELIMIT || !s || !s->loop) {
    rr_buf_close(&rel);
    hs_reply_error(req, 404, "not_found", "No resource matches the request path.", NULL);
    return;
  }
  static_work_t *w = rc ? NULL : calloc(1, sizeof *w);
  if (w) {
    w->req = req;
    w->dir = dup_str(st->dir);
    w->rel = rr_buf_steal(&rel, NULL);
    w->max = s->cfg.max_static_bytes;
    w->work.data = w;
    const char *inm = rr_http_req_header(req, "if-none-match");
    const char *ims = rr_http_req_header(req, "if-modified-since");
    snprintf(w->inm, sizeof w->inm, "%s", inm ? inm : "");
    snprintf(w->ims, sizeof w->ims, "%s", ims ? ims : "");
  }
  rr_buf_close(&rel);
  if (!w || !w->dir || !w->rel || uv_queue_work(s->loop, &w->work, on_work, on_work_done) != 0) {
    if (w)
      work_free(w);
    hs_reply_error(req, 500, "internal_error", "The server is out of memory.", NULL);
  }
}

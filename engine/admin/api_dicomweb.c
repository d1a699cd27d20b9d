/* WADO-RS of de-identified AI jobs (admin/api_dicomweb.h). */
#include "admin/api_dicomweb.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ai/ai.h"
#include "ai/deid.h"
#include "core/error.h"
#include "core/log.h"
#include "dicomweb/multipart.h"

#define ANSWER_MAX ((size_t)1 << 30)

typedef struct serving {
  uv_work_t work;
  rr_http_req_t *req;
  char job_id[RR_AI_JOB_ID_MAX];
  char dir[1200];
  char **sops;
  size_t nsops, cap;
  bool failed;
  rr_buf_t body;
  char content_type[160];
  int status; /* HTTP status of a failure, 0 when the body is the answer */
  char message[200];
} serving_t;

static void serving_free(serving_t *s) {
  for (size_t i = 0; i < s->nsops; i++)
    free(s->sops[i]);
  free(s->sops);
  rr_buf_close(&s->body);
  free(s);
}

static void add_sop(void *ud, const char *sop) {
  serving_t *s = ud;
  if (s->nsops == s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 64;
    char **v = realloc(s->sops, cap * sizeof *v);
    if (!v) {
      s->failed = true;
      return;
    }
    s->sops = v;
    s->cap = cap;
  }
  if (!(s->sops[s->nsops] = strdup(sop)))
    s->failed = true;
  else
    s->nsops++;
}

/* Appends the file's bytes. */
static int append_file(rr_buf_t *b, const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0)
    return -errno;
  struct stat st;
  int rc = fstat(fd, &st) == 0 ? 0 : -errno;
  if (rc == 0)
    rc = rr_buf_reserve(b, (size_t)st.st_size);
  size_t want = rc == 0 ? (size_t)st.st_size : 0, got = 0;
  while (rc == 0 && got < want) {
    ssize_t n = read(fd, b->data + b->len + got, want - got);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      rc = n < 0 ? -errno : RR_EIO;
    else
      got += (size_t)n;
  }
  close(fd);
  if (rc == 0) {
    b->len += got;
    b->data[b->len] = '\0';
  }
  return rc;
}

/* Thread pool: the multipart body from the files. */
static void build(uv_work_t *w) {
  serving_t *s = w->data;
  rr_multipart_builder_t mb;
  int rc = rr_multipart_builder_init(&mb, NULL, NULL, 0);
  rr_buf_t ct;
  rr_buf_init(&ct, sizeof s->content_type);
  if (rc == 0)
    rc = rr_multipart_builder_content_type(&mb, "application/dicom", &ct);
  if (rc == 0)
    snprintf(s->content_type, sizeof s->content_type, "%s", ct.data);
  rr_buf_close(&ct);
  for (size_t i = 0; rc == 0 && i < s->nsops; i++) {
    char path[1400], len[32];
    snprintf(path, sizeof path, "%s/%s.dcm", s->dir, s->sops[i]);
    struct stat st;
    if (stat(path, &st) != 0) {
      rc = -errno;
      break;
    }
    snprintf(len, sizeof len, "%lld", (long long)st.st_size);
    rr_multipart_header_t h[] = {{"Content-Type", "application/dicom"}, {"Content-Length", len}};
    if ((rc = rr_multipart_builder_begin_part(&mb, h, 2, &s->body)) == 0 &&
        (rc = append_file(&s->body, path)) == 0)
      rc = rr_multipart_builder_end_part(&mb, &s->body);
  }
  if (rc == 0)
    rc = rr_multipart_builder_close(&mb, &s->body);
  if (rc == RR_ELIMIT) {
    s->status = 413;
    snprintf(s->message, sizeof s->message,
             "the answer would pass %zu bytes: fetch the study by series", ANSWER_MAX);
  } else if (rc) {
    s->status = rc == -ENOENT ? 404 : 500;
    snprintf(s->message, sizeof s->message, "the de-identified copies could not be read: %s",
             rr_strerror(rc));
  }
}

static void built(uv_work_t *w, int status) {
  serving_t *s = w->data;
  if (status == UV_ECANCELED && !s->status) {
    s->status = 503;
    snprintf(s->message, sizeof s->message, "the engine is stopping");
  }
  if (s->status) {
    rr_log(RR_LOG_WARN, "api", "event=deid_not_served job=%s status=%d error=\"%s\"", s->job_id,
           s->status, s->message);
    rr_http_reply_error(s->req, s->status, s->status == 404 ? "not_found" : "unavailable",
                        s->message);
  } else {
    rr_log(RR_LOG_INFO, "api", "event=deid_served job=%s instances=%zu bytes=%zu", s->job_id,
           s->nsops, s->body.len);
    rr_http_reply(s->req, 200, s->content_type, s->body.data, s->body.len);
  }
  serving_free(s);
}

/* Whether Accept (absent = anything) takes multipart/related. */
static bool accepts_multipart(const char *accept) {
  if (!accept || !*accept)
    return true;
  return strcasestr(accept, "multipart/related") || strstr(accept, "*/*") ||
         strcasestr(accept, "multipart/*");
}

/* The job's token in constant time against the stored hash. */
static bool token_ok(const rr_ai_job_info_t *info, const char *token) {
  char hash[65];
  rr_ai_token_hash(token, hash);
  unsigned char diff = info->token_hash[0] ? 0 : 1;
  for (size_t i = 0; i < 64; i++)
    diff |= (unsigned char)(hash[i] ^ info->token_hash[i]);
  return diff == 0;
}

void rr_api_dicomweb_get(void *ud, rr_http_req_t *req) {
  rr_api_dicomweb_t *dw = ud;
  const char *id = rr_http_req_param(req, "id");
  const char *study = rr_http_req_param(req, "study");
  const char *series = rr_http_req_param(req, "series");
  const char *instance = rr_http_req_param(req, "instance");
  const char *auth = rr_http_req_header(req, "authorization");
  const char *token = auth && strncasecmp(auth, "bearer ", 7) == 0 ? auth + 7 : NULL;
  rr_ai_job_info_t info;
  if (!token || !id || strlen(id) >= RR_AI_JOB_ID_MAX ||
      rr_ai_job_get(dw->journal, id, &info) != 0 || !token_ok(&info, token)) {
    rr_http_reply_error(req, 401, "unauthorized", "the job's bearer token is required");
    return;
  }
  char dir[1200], pseudo_study[65];
  if ((strcmp(info.state, "sending") != 0 && strcmp(info.state, "running") != 0) ||
      rr_ai_deid_job_files(dw->journal, id, dir, sizeof dir, pseudo_study) != 0) {
    rr_http_reply_error(req, 404, "not_found", "the job has no de-identified images (ended?)");
    return;
  }
  if (!study || strcmp(study, pseudo_study) != 0) {
    rr_http_reply_error(req, 404, "not_found", "not the job's study");
    return;
  }
  if (!accepts_multipart(rr_http_req_header(req, "accept"))) {
    rr_http_reply_error(req, 406, "not_acceptable",
                        "answers are multipart/related; type=\"application/dicom\"");
    return;
  }
  serving_t *s = calloc(1, sizeof *s);
  if (!s) {
    rr_http_reply_error(req, 500, "internal_error", "out of memory");
    return;
  }
  s->req = req;
  s->work.data = s;
  snprintf(s->job_id, sizeof s->job_id, "%s", id);
  snprintf(s->dir, sizeof s->dir, "%s", dir);
  rr_buf_init(&s->body, ANSWER_MAX);
  int n = rr_ai_deid_instances(dw->journal, id, series, add_sop, s);
  if (instance) { /* one instance of the series */
    bool found = false;
    for (size_t i = 0; i < s->nsops && !found; i++)
      found = strcmp(s->sops[i], instance) == 0;
    for (size_t i = 0; i < s->nsops; i++)
      free(s->sops[i]);
    s->nsops = 0;
    if (found)
      add_sop(s, instance);
    n = found ? 1 : 0;
  }
  if (n < 0 || s->failed) {
    serving_free(s);
    rr_http_reply_error(req, 500, "internal_error", "the store could not be read");
    return;
  }
  if (n == 0) {
    serving_free(s);
    rr_http_reply_error(req, 404, "not_found", "no instance of the job there");
    return;
  }
  int rc = uv_queue_work(dw->loop, &s->work, build, built);
  if (rc) {
    serving_free(s);
    rr_http_reply_error(req, 503, "unavailable", rr_strerror(rc));
  }
}

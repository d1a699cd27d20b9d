/* De-identified AI jobs: copies, pseudonym maps, re-identification. */
#include "ai/deid.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/rand.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ai/ai.h"
#include "core/error.h"
#include "core/log.h"
#include "dicom/deid.h"

#define SECRET_MIN 16

struct rr_ai_deid {
  uv_loop_t *loop;
  rr_journal_t *journal;
  char name[160];
  char root[1024];
  char *secret;
  size_t secret_len;
};

static int64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- the store ------------------------------------------------------------- */

static const char deid_schema[] =
    "CREATE TABLE IF NOT EXISTS ai_deid_jobs("
    " job_id TEXT PRIMARY KEY, destination TEXT NOT NULL, dir TEXT NOT NULL,"
    " study_uid TEXT NOT NULL," /* the pseudonym */
    " instances INTEGER NOT NULL, refused INTEGER NOT NULL,"
    " created_ms INTEGER NOT NULL, removed_ms INTEGER) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS ai_deid_map("
    " job_id TEXT NOT NULL, pseudonym TEXT NOT NULL, original TEXT NOT NULL,"
    " kind TEXT NOT NULL,"       /* study, series, instance, uid, accession */
    " series TEXT, seq INTEGER," /* instances: their series' pseudonym, their order */
    " PRIMARY KEY(job_id, pseudonym)) WITHOUT ROWID;";

int rr_ai_deid_schema(rr_journal_t *j, char **errmsg) {
  return rr_journal_schema(j, deid_schema, errmsg);
}

/* ---- the secret ---------------------------------------------------------------- */

static int make_secret(const char *path, rr_buf_t *err) {
  unsigned char b[32];
  if (RAND_bytes(b, sizeof b) != 1) {
    rr_buf_printf(err, "%s: the system has no randomness for a new secret", path);
    return RR_EIO;
  }
  char text[66];
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < sizeof b; i++) {
    text[2 * i] = digits[b[i] >> 4];
    text[2 * i + 1] = digits[b[i] & 15];
  }
  text[64] = '\n';
  text[65] = '\0';
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    return errno == EEXIST ? 0 : -errno; /* made meanwhile: read that one */
  int rc = write(fd, text, 65) == 65 && fsync(fd) == 0 ? 0 : -errno;
  close(fd);
  if (rc) {
    unlink(path);
    rr_buf_printf(err, "%s: cannot write a new secret: %s", path, strerror(-rc));
  } else {
    rr_log(RR_LOG_INFO, "ai", "event=deid_secret_created path=%s", path);
  }
  return rc;
}

int rr_ai_deid_secret_load(const char *path, bool create, char **secret, size_t *len,
                           rr_buf_t *err) {
  *secret = NULL;
  *len = 0;
  FILE *f = fopen(path, "re");
  if (!f && errno == ENOENT && create) {
    int rc = make_secret(path, err);
    if (rc)
      return rc;
    f = fopen(path, "re");
  }
  if (!f) {
    int rc = -errno;
    rr_buf_printf(err, "de-identification secret %s: %s", path, strerror(errno));
    return rc;
  }
  struct stat st;
  if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077))
    rr_log(RR_LOG_WARN, "ai", "event=deid_secret_readable path=%s mode=%03o", path,
           (unsigned)(st.st_mode & 0777));
  char line[1024];
  if (!fgets(line, sizeof line, f))
    line[0] = '\0';
  fclose(f);
  size_t n = strcspn(line, "\r\n");
  while (n && (line[n - 1] == ' ' || line[n - 1] == '\t'))
    n--;
  size_t b = strspn(line, " \t");
  if (b > n)
    b = n;
  if (n - b < SECRET_MIN) {
    rr_buf_printf(err, "de-identification secret %s: the first line must hold at least %d bytes",
                  path, SECRET_MIN);
    return RR_EINVAL;
  }
  *secret = malloc(n - b + 1);
  if (!*secret)
    return RR_ENOMEM;
  memcpy(*secret, line + b, n - b);
  (*secret)[n - b] = '\0';
  *len = n - b;
  memset(line, 0, sizeof line);
  return 0;
}

int rr_ai_deid_new(uv_loop_t *loop, rr_journal_t *j, const char *name, const char *root,
                   const char *secret_file, bool create, rr_ai_deid_t **out, rr_buf_t *err) {
  *out = NULL;
  rr_ai_deid_t *d = calloc(1, sizeof *d);
  if (!d)
    return RR_ENOMEM;
  d->loop = loop;
  d->journal = j;
  snprintf(d->name, sizeof d->name, "%s", name);
  snprintf(d->root, sizeof d->root, "%s", root ? root : "");
  int rc = rr_ai_deid_secret_load(secret_file, create, &d->secret, &d->secret_len, err);
  if (rc) {
    free(d);
    return rc;
  }
  *out = d;
  return 0;
}

void rr_ai_deid_free(rr_ai_deid_t *d) {
  if (!d)
    return;
  if (d->secret) {
    memset(d->secret, 0, d->secret_len);
    free(d->secret);
  }
  free(d);
}

/* ---- preparing a job ------------------------------------------------------------ */

typedef struct inst {
  char sop[65], series[65], orig_series[65];
} inst_t;

typedef struct pair {
  char orig[65], pseudo[65];
} pair_t;

typedef struct prep {
  uv_work_t work;
  rr_ai_deid_t *d;
  char job_id[RR_AI_JOB_ID_MAX];
  char study[65], pseudo_study[65], accession[17];
  const char *orig_accession; /* borrowed from ctx */
  json_t *ctx;
  char dir[1200];
  char **paths;
  size_t npaths, paths_cap;
  bool paths_failed, remote;
  inst_t *insts;
  size_t ninsts;
  pair_t *pairs;
  size_t npairs, pairs_cap;
  bool pairs_failed;
  unsigned refused;
  char refusal[200];
  int status;
  bool permanent;
  char detail[300];
  rr_ai_deid_ready_fn cb;
  void *ud;
} prep_t;

static void prep_free(prep_t *p) {
  for (size_t i = 0; i < p->npaths; i++)
    free(p->paths[i]);
  free(p->paths);
  free(p->insts);
  free(p->pairs);
  json_decref(p->ctx);
  free(p);
}

static void add_path(void *ud, const char *path) {
  prep_t *p = ud;
  if (strstr(path, "://")) { /* recorded by a DICOMweb source: a URL */
    p->remote = true;
    return;
  }
  if (p->npaths == p->paths_cap) {
    size_t cap = p->paths_cap ? p->paths_cap * 2 : 64;
    char **v = realloc(p->paths, cap * sizeof *v);
    if (!v) {
      p->paths_failed = true;
      return;
    }
    p->paths = v;
    p->paths_cap = cap;
  }
  if (!(p->paths[p->npaths] = strdup(path)))
    p->paths_failed = true;
  else
    p->npaths++;
}

static void on_uid(void *ud, const char *orig, const char *pseudo) {
  prep_t *p = ud;
  if (p->npairs == p->pairs_cap) {
    size_t cap = p->pairs_cap ? p->pairs_cap * 2 : 256;
    pair_t *v = realloc(p->pairs, cap * sizeof *v);
    if (!v) {
      p->pairs_failed = true;
      return;
    }
    p->pairs = v;
    p->pairs_cap = cap;
  }
  snprintf(p->pairs[p->npairs].orig, 65, "%s", orig);
  snprintf(p->pairs[p->npairs].pseudo, 65, "%s", pseudo);
  p->npairs++;
}

static int cmp_pair(const void *a, const void *b) {
  return strcmp(((const pair_t *)a)->orig, ((const pair_t *)b)->orig);
}

/* Removes the files of a job's folder, then the folder. */
static void remove_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d)
    return;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.')
      continue;
    char f[1500];
    snprintf(f, sizeof f, "%s/%s", dir, e->d_name);
    unlink(f);
  }
  closedir(d);
  rmdir(dir);
}

__attribute__((format(printf, 4, 5))) static void fail_prep(prep_t *p, int status, bool permanent,
                                                            const char *fmt, ...) {
  p->status = status;
  p->permanent = permanent;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(p->detail, sizeof p->detail, fmt, ap);
  va_end(ap);
}

/* Thread pool: every instance to the job's folder. */
static void prep_work(uv_work_t *w) {
  prep_t *p = w->data;
  remove_dir(p->dir); /* an earlier attempt's copies */
  if ((mkdir(p->d->root, 0750) != 0 && errno != EEXIST) ||
      (mkdir(p->dir, 0750) != 0 && errno != EEXIST)) {
    fail_prep(p, -errno, false, "cannot make the folder of de-identified copies: %s",
              strerror(errno));
    return;
  }
  p->insts = calloc(p->npaths ? p->npaths : 1, sizeof *p->insts);
  if (!p->insts) {
    fail_prep(p, RR_ENOMEM, false, "%s", "out of memory");
    return;
  }
  for (size_t i = 0; i < p->npaths; i++) {
    char part[1300], final[1300];
    snprintf(part, sizeof part, "%s/%zu.part", p->dir, i);
    rr_dicom_deid_info_t info;
    int rc =
        rr_dicom_deid_file(p->paths[i], part, p->d->secret, p->d->secret_len, on_uid, p, &info);
    if (rc == RR_DICOM_EREFUSED || rc == RR_EPARSE ||
        (rc == 0 && strcmp(info.study_uid, p->study))) {
      unlink(part);
      if (!p->refused++)
        snprintf(p->refusal, sizeof p->refusal, "%s",
                 rc == 0 ? "an instance of another study" : info.why);
      continue;
    }
    if (rc) {
      fail_prep(p, rc, false, "de-identification failed: %s", info.why);
      return;
    }
    snprintf(final, sizeof final, "%s/%s.dcm", p->dir, info.pseudo_sop_uid);
    if (rename(part, final) != 0) {
      fail_prep(p, -errno, false, "cannot keep a de-identified copy: %s", strerror(errno));
      return;
    }
    inst_t *in = &p->insts[p->ninsts++];
    snprintf(in->sop, sizeof in->sop, "%s", info.pseudo_sop_uid);
    snprintf(in->series, sizeof in->series, "%s", info.pseudo_series_uid);
    snprintf(in->orig_series, sizeof in->orig_series, "%s", info.series_uid);
    snprintf(p->pseudo_study, sizeof p->pseudo_study, "%s", info.pseudo_study_uid);
  }
  if (p->pairs_failed) {
    fail_prep(p, RR_ENOMEM, false, "%s", "out of memory");
    return;
  }
  if (p->ninsts == 0) {
    fail_prep(p, RR_EINVAL, true, "every instance was refused by the de-identifier (%s)",
              p->refusal[0] ? p->refusal : "no instance");
    remove_dir(p->dir);
    return;
  }
  /* the map: each original once */
  qsort(p->pairs, p->npairs, sizeof *p->pairs, cmp_pair);
  size_t k = 0;
  for (size_t i = 0; i < p->npairs; i++)
    if (k == 0 || strcmp(p->pairs[k - 1].orig, p->pairs[i].orig) != 0)
      p->pairs[k++] = p->pairs[i];
  p->npairs = k;
}

static const char *find_pseudo(const prep_t *p, const char *orig) {
  pair_t key;
  snprintf(key.orig, sizeof key.orig, "%s", orig ? orig : "");
  const pair_t *hit = bsearch(&key, p->pairs, p->npairs, sizeof *p->pairs, cmp_pair);
  return hit ? hit->pseudo : NULL;
}

static int bind_text(sqlite3_stmt *st, int i, const char *s) {
  return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

static int map_row(sqlite3 *db, const prep_t *p, const char *pseudo, const char *orig,
                   const char *kind, const char *series, int64_t seq) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db,
                         "INSERT OR IGNORE INTO ai_deid_map(job_id, pseudonym, original, kind,"
                         " series, seq) VALUES(?1,?2,?3,?4,?5,?6)",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, p->job_id);
  bind_text(st, 2, pseudo);
  bind_text(st, 3, orig);
  bind_text(st, 4, kind);
  bind_text(st, 5, series);
  if (seq >= 0)
    sqlite3_bind_int64(st, 6, seq);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

/* Journal worker: the job's folder and map, in the batch's transaction. */
static int map_write(sqlite3 *db, void *data) {
  const prep_t *p = data;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, "DELETE FROM ai_deid_map WHERE job_id = ?", -1, &st, NULL) !=
      SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, p->job_id);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE)
    return RR_EIO;
  if (sqlite3_prepare_v2(db,
                         "INSERT OR REPLACE INTO ai_deid_jobs(job_id, destination, dir, study_uid,"
                         " instances, refused, created_ms) VALUES(?1,?2,?3,?4,?5,?6,?7)",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, p->job_id);
  bind_text(st, 2, p->d->name);
  bind_text(st, 3, p->dir);
  bind_text(st, 4, p->pseudo_study);
  sqlite3_bind_int64(st, 5, (int64_t)p->ninsts);
  sqlite3_bind_int64(st, 6, (int64_t)p->refused);
  sqlite3_bind_int64(st, 7, wall_ms());
  rc = sqlite3_step(st);
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE)
    return RR_EIO;
  if ((rc = map_row(db, p, p->pseudo_study, p->study, "study", NULL, -1)) != 0)
    return rc;
  for (size_t i = 0; i < p->ninsts; i++) {
    const inst_t *in = &p->insts[i];
    if ((rc = map_row(db, p, in->series, in->orig_series, "series", NULL, -1)) != 0)
      return rc;
  }
  for (size_t i = 0; i < p->npairs; i++) {
    const pair_t *x = &p->pairs[i];
    const char *kind = "uid", *series = NULL;
    int64_t seq = -1;
    for (size_t k = 0; k < p->ninsts; k++)
      if (strcmp(p->insts[k].sop, x->pseudo) == 0) {
        kind = "instance";
        series = p->insts[k].series;
        seq = (int64_t)k;
        break;
      }
    if ((rc = map_row(db, p, x->pseudo, x->orig, kind, series, seq)) != 0)
      return rc;
  }
  if (p->accession[0])
    return map_row(db, p, p->accession, p->orig_accession, "accession", NULL, -1);
  return 0;
}

/* The context with pseudonyms in place of the study's identifiers, and
 * without what the profile removes from the instances. */
static json_t *pseudo_context(const prep_t *p) {
  json_t *c = json_deep_copy(p->ctx);
  if (!c)
    return NULL;
  json_object_set_new(c, "study_uid", json_string(p->pseudo_study));
  json_object_set_new(c, "accession", p->accession[0] ? json_string(p->accession) : json_null());
  json_object_set_new(c, "description", json_null());
  json_object_set_new(c, "study_date", json_null());
  json_object_set_new(c, "study_time", json_null());
  json_object_del(c, "retrieve_url");
  json_t *order = json_object_get(c, "order");
  if (json_is_object(order))
    json_object_set_new(order, "reason", json_null());
  json_t *series = json_array();
  json_t *src = json_object_get(p->ctx, "series");
  size_t total = 0;
  for (size_t i = 0; i < json_array_size(src); i++) {
    json_t *s = json_array_get(src, i);
    const char *uid = json_string_value(json_object_get(s, "series_uid"));
    size_t n = 0;
    for (size_t k = 0; uid && k < p->ninsts; k++)
      n += strcmp(p->insts[k].orig_series, uid) == 0;
    const char *pseudo = uid ? find_pseudo(p, uid) : NULL;
    if (!n || !pseudo)
      continue; /* nothing of it is served */
    json_t *d = json_deep_copy(s);
    json_object_set_new(d, "series_uid", json_string(pseudo));
    json_object_set_new(d, "instances", json_integer((json_int_t)n));
    json_array_append_new(series, d);
    total += n;
  }
  json_object_set_new(c, "series", series);
  json_object_set_new(c, "instances", json_integer((json_int_t)total));
  return c;
}

static void on_map_committed(void *ud, int status, int64_t id) {
  (void)id;
  prep_t *p = ud;
  if (status) {
    p->cb(p->ud, status, false, "the pseudonym map could not be recorded", NULL);
  } else {
    json_t *c = pseudo_context(p);
    rr_log(RR_LOG_INFO, "ai", "event=deidentified destination=%s job=%s instances=%zu refused=%u",
           p->d->name, p->job_id, p->ninsts, p->refused);
    if (p->refused)
      rr_log(RR_LOG_WARN, "ai",
             "event=deid_instances_refused destination=%s job=%s refused=%u reason=\"%s\"",
             p->d->name, p->job_id, p->refused, p->refusal);
    if (c)
      p->cb(p->ud, 0, false, NULL, c);
    else
      p->cb(p->ud, RR_ENOMEM, false, "out of memory", NULL);
  }
  prep_free(p);
}

static void prep_after(uv_work_t *w, int status) {
  prep_t *p = w->data;
  if (status == UV_ECANCELED)
    fail_prep(p, UV_ECANCELED, false, "%s", "canceled");
  if (p->status) {
    p->cb(p->ud, p->status, p->permanent, p->detail, NULL);
    prep_free(p);
    return;
  }
  /* prep stays with the journal until the commit's callback */
  int rc = rr_journal_custom(p->d->journal, map_write, p, NULL, on_map_committed, p);
  if (rc) {
    p->cb(p->ud, rc, false, "the pseudonym map could not be recorded", NULL);
    prep_free(p);
    return;
  }
  rr_journal_kick(p->d->journal);
}

/* Reports a refusal from the loop, never inside rr_ai_deid_start. */
static void refuse_later(uv_work_t *w) {
  (void)w;
}

int rr_ai_deid_start(rr_ai_deid_t *d, const char *job_id, json_t *ctx, rr_ai_deid_ready_fn cb,
                     void *ud) {
  prep_t *p = calloc(1, sizeof *p);
  if (!p)
    return RR_ENOMEM;
  p->d = d;
  p->cb = cb;
  p->ud = ud;
  p->work.data = p;
  snprintf(p->job_id, sizeof p->job_id, "%s", job_id);
  p->ctx = json_deep_copy(ctx);
  const char *uid = json_string_value(json_object_get(ctx, "study_uid"));
  if (!p->ctx || !uid) {
    prep_free(p);
    return RR_ENOMEM;
  }
  snprintf(p->study, sizeof p->study, "%s", uid);
  snprintf(p->dir, sizeof p->dir, "%s/%s", d->root, p->job_id);
  p->orig_accession = json_string_value(json_object_get(p->ctx, "accession"));
  if (p->orig_accession && *p->orig_accession &&
      rr_dicom_deid_text(d->secret, d->secret_len, "accession", p->orig_accession, p->accession,
                         sizeof p->accession) != 0)
    p->accession[0] = '\0';
  int n = rr_journal_study_paths(d->journal, uid, add_path, p);
  uv_work_cb work = prep_work;
  if (!d->root[0] || p->remote) {
    fail_prep(p, RR_EINVAL, true, "%s",
              "the study has no instance files on this machine (it came from a DICOMweb "
              "source): de-identifying endpoints take studies received by DICOM C-STORE only");
    work = refuse_later;
  } else if (n < 0 || p->paths_failed) {
    fail_prep(p, n < 0 ? n : RR_ENOMEM, false, "%s", "the study's instances could not be read");
    work = refuse_later;
  } else if (p->npaths == 0) {
    fail_prep(p, RR_ENOTFOUND, true, "%s", "the study has no instance on this machine");
    work = refuse_later;
  }
  int rc = uv_queue_work(d->loop, &p->work, work, prep_after);
  if (rc) {
    prep_free(p);
    return rc;
  }
  return 0;
}

/* ---- results back ---------------------------------------------------------------- */

/* The original of pseudo in job's map when its kind is one of kinds. */
static int original_of(rr_journal_t *j, const char *job_id, const char *pseudo,
                       const char *const *kinds, char out[65]) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(
          rr_journal_reader(j),
          "SELECT original, kind FROM ai_deid_map WHERE job_id = ? AND pseudonym = ?", -1, &st,
          NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, job_id);
  bind_text(st, 2, pseudo);
  int rc = sqlite3_step(st), result = RR_ENOTFOUND;
  if (rc == SQLITE_ROW) {
    const char *kind = (const char *)sqlite3_column_text(st, 1);
    for (size_t i = 0; kinds[i]; i++)
      if (kind && strcmp(kind, kinds[i]) == 0) {
        snprintf(out, 65, "%s", (const char *)sqlite3_column_text(st, 0));
        result = 0;
      }
  } else if (rc != SQLITE_DONE) {
    result = RR_EIO;
  }
  sqlite3_finalize(st);
  return result;
}

/* Replaces obj.key (a pseudonym of one of kinds) by its original. */
static int map_back(rr_journal_t *j, const char *job_id, json_t *obj, const char *key,
                    const char *const *kinds, const char *path, rr_buf_t *err) {
  const char *v = json_string_value(json_object_get(obj, key));
  if (!v)
    return 0;
  char orig[65];
  int rc = original_of(j, job_id, v, kinds, orig);
  if (rc == RR_ENOTFOUND) {
    if (err)
      rr_buf_printf(err, "%s.%s: not a UID radrelay sent for this job", path, key);
    return RR_EPARSE;
  }
  if (rc)
    return rc;
  json_object_set_new(obj, key, json_string(orig));
  return 0;
}

int rr_ai_deid_reidentify(rr_journal_t *j, const char *job_id, struct rr_ai_result *r,
                          rr_buf_t *err) {
  static const char *const study[] = {"study", NULL}, *const series[] = {"series", NULL},
                           *const instance[] = {"instance", NULL}, *const any[] = {"uid", NULL};
  int rc = map_back(j, job_id, r->json, "study_uid", study, "$", err);
  json_t *findings = json_object_get(r->json, "findings");
  for (size_t i = 0; rc == 0 && i < json_array_size(findings); i++) {
    json_t *loc = json_object_get(json_array_get(findings, i), "location");
    if (!json_is_object(loc))
      continue;
    char path[64];
    snprintf(path, sizeof path, "$.findings[%zu].location", i);
    rc = map_back(j, job_id, loc, "series_uid", series, path, err);
    if (rc == 0)
      rc = map_back(j, job_id, loc, "instance_uid", instance, path, err);
    if (rc == 0)
      rc = map_back(j, job_id, loc, "frame_of_reference_uid", any, path, err);
  }
  return rc;
}

/* ---- serving ----------------------------------------------------------------------- */

int rr_ai_deid_job_files(rr_journal_t *j, const char *job_id, char *dir, size_t dir_cap,
                         char study_uid[65]) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT dir, study_uid FROM ai_deid_jobs WHERE job_id = ?"
                         " AND removed_ms IS NULL",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, job_id);
  int rc = sqlite3_step(st), result = RR_ENOTFOUND;
  if (rc == SQLITE_ROW) {
    snprintf(dir, dir_cap, "%s", (const char *)sqlite3_column_text(st, 0));
    snprintf(study_uid, 65, "%s", (const char *)sqlite3_column_text(st, 1));
    result = 0;
  } else if (rc != SQLITE_DONE) {
    result = RR_EIO;
  }
  sqlite3_finalize(st);
  return result;
}

int rr_ai_deid_instances(rr_journal_t *j, const char *job_id, const char *series,
                         void (*cb)(void *ud, const char *sop_uid), void *ud) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT pseudonym FROM ai_deid_map WHERE job_id = ?1 AND kind = 'instance'"
                         " AND (?2 IS NULL OR series = ?2) ORDER BY seq",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, job_id);
  bind_text(st, 2, series);
  int n = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    cb(ud, (const char *)sqlite3_column_text(st, 0));
    n++;
  }
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? n : RR_EIO;
}

/* ---- cleaning up --------------------------------------------------------------------- */

typedef struct removed {
  char job_id[RR_AI_JOB_ID_MAX];
  int64_t at_ms;
} removed_t;

static int removed_write(sqlite3 *db, void *data) {
  const removed_t *r = data;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, "UPDATE ai_deid_jobs SET removed_ms = ?2 WHERE job_id = ?1", -1, &st,
                         NULL) != SQLITE_OK)
    return RR_EIO;
  bind_text(st, 1, r->job_id);
  sqlite3_bind_int64(st, 2, r->at_ms);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

int rr_ai_deid_sweep(rr_journal_t *j, int max) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j),
                         "SELECT d.job_id, d.dir, j.state FROM ai_deid_jobs d JOIN ai_jobs j"
                         " USING (job_id) WHERE d.removed_ms IS NULL"
                         " AND j.state NOT IN ('sending', 'running') LIMIT ?",
                         -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_int(st, 1, max);
  int n = 0, rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *job = (const char *)sqlite3_column_text(st, 0);
    remove_dir((const char *)sqlite3_column_text(st, 1));
    removed_t *r = calloc(1, sizeof *r);
    if (!r)
      break;
    snprintf(r->job_id, sizeof r->job_id, "%s", job);
    r->at_ms = wall_ms();
    if (rr_journal_custom(j, removed_write, r, free, NULL, NULL) != 0)
      break;
    rr_log(RR_LOG_INFO, "ai", "event=deid_copies_removed job=%s state=%s", job,
           (const char *)sqlite3_column_text(st, 2));
    n++;
  }
  sqlite3_finalize(st);
  if (n)
    rr_journal_kick(j);
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? n : RR_EIO;
}

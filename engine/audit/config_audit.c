/* Configuration changes in the audit trail: file hashes against the ones
 * the store saw last. */
#include "audit/config_audit.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <pwd.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/error.h"
#include "core/log.h"

#define MAX_FILE ((size_t)64 << 20)

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* SHA-256 of the file's bytes, in hex. */
static int hash_file(const char *path, char hex[65], struct stat *st) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return errno == ENOENT ? RR_ENOTFOUND : -errno;
  if (fstat(fileno(f), st) != 0 || !S_ISREG(st->st_mode) || (size_t)st->st_size > MAX_FILE) {
    fclose(f);
    return RR_EINVAL;
  }
  EVP_MD_CTX *md = EVP_MD_CTX_new();
  if (!md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
    EVP_MD_CTX_free(md);
    fclose(f);
    return RR_ENOMEM;
  }
  unsigned char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0)
    EVP_DigestUpdate(md, buf, n);
  int bad = ferror(f);
  fclose(f);
  unsigned char out[32];
  unsigned int len = 0;
  EVP_DigestFinal_ex(md, out, &len);
  EVP_MD_CTX_free(md);
  if (bad)
    return RR_EIO;
  for (unsigned i = 0; i < 32; i++)
    snprintf(hex + 2 * i, 3, "%02x", out[i]);
  return 0;
}

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS config_files(path TEXT PRIMARY KEY, sha256 TEXT NOT NULL,"
    " seen_ms INTEGER NOT NULL) WITHOUT ROWID;";

int rr_config_audit_schema(rr_journal_t *j, char **errmsg) {
  return rr_journal_schema(j, schema, errmsg);
}

typedef struct seen {
  char *path;
  char sha[65]; /* "" = the file is gone */
  int64_t at_ms;
} seen_t;

static void seen_free(void *data) {
  seen_t *s = data;
  free(s->path);
  free(s);
}

static int seen_write(sqlite3 *db, void *data) {
  const seen_t *s = data;
  sqlite3_stmt *st;
  const char *sql = s->sha[0] ? "INSERT OR REPLACE INTO config_files(path, sha256, seen_ms)"
                                " VALUES(?1, ?2, ?3)"
                              : "DELETE FROM config_files WHERE path = ?1";
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
    return RR_EIO;
  sqlite3_bind_text(st, 1, s->path, -1, SQLITE_STATIC);
  if (s->sha[0]) {
    sqlite3_bind_text(st, 2, s->sha, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, s->at_ms);
  }
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : RR_EIO;
}

/* What this process recorded (queued or committed): the table is read
 * through the loop's reader, which sees committed rows only. */
typedef struct recorded {
  struct recorded *next;
  char sha[65];
  char path[];
} recorded_t;
static recorded_t *g_recorded;

static void remember(const char *path, const char *sha) {
  for (recorded_t *r = g_recorded; r; r = r->next)
    if (strcmp(r->path, path) == 0) {
      snprintf(r->sha, sizeof r->sha, "%s", sha);
      return;
    }
  size_t n = strlen(path) + 1;
  recorded_t *r = malloc(sizeof *r + n);
  if (!r)
    return;
  memcpy(r->path, path, n);
  snprintf(r->sha, sizeof r->sha, "%s", sha);
  r->next = g_recorded;
  g_recorded = r;
}

/* The hash the store saw last, into out ("" when the file went); false
 * when none. */
static bool last_seen(rr_journal_t *j, const char *path, char out[65]) {
  for (const recorded_t *r = g_recorded; r; r = r->next)
    if (strcmp(r->path, path) == 0) {
      snprintf(out, 65, "%s", r->sha);
      return r->sha[0] != '\0';
    }
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(rr_journal_reader(j), "SELECT sha256 FROM config_files WHERE path = ?1",
                         -1, &st, NULL) != SQLITE_OK)
    return false;
  sqlite3_bind_text(st, 1, path, -1, SQLITE_STATIC);
  bool found = sqlite3_step(st) == SQLITE_ROW;
  if (found)
    snprintf(out, 65, "%s", (const char *)sqlite3_column_text(st, 0));
  sqlite3_finalize(st);
  return found;
}

static void owner_name(uid_t uid, char *out, size_t cap) {
  struct passwd pw, *res = NULL;
  char buf[1024];
  if (getpwuid_r(uid, &pw, buf, sizeof buf, &res) == 0 && res)
    snprintf(out, cap, "%s", res->pw_name);
  else
    snprintf(out, cap, "uid:%u", (unsigned)uid);
}

int rr_config_audit_file(rr_journal_t *j, const char *path, const char *why) {
  struct stat st;
  memset(&st, 0, sizeof st);
  char hex[65] = "";
  int rc = hash_file(path, hex, &st);
  if (rc && rc != RR_ENOTFOUND)
    return rc;
  char prev[65];
  bool known = last_seen(j, path, prev);
  const char *before = known ? prev : NULL;
  if (rc == RR_ENOTFOUND && !known)
    return RR_ENOTFOUND;
  if (rc == 0 && before && strcmp(before, hex) == 0)
    return 0;
  char actor[128];
  if (rc == 0)
    owner_name(st.st_uid, actor, sizeof actor);
  else
    snprintf(actor, sizeof actor, "unknown");
  json_t *data = json_pack("{s:s, s:s?, s:s?, s:s}", "file", path, "sha256", rc == 0 ? hex : NULL,
                           "previous", before, "why", why);
  if (data && rc == 0) {
    json_object_set_new(data, "bytes", json_integer((json_int_t)st.st_size));
    json_object_set_new(
        data, "modified_ms",
        json_integer((json_int_t)st.st_mtim.tv_sec * 1000 + st.st_mtim.tv_nsec / 1000000));
    json_object_set_new(data, "actor_is", json_string("file owner"));
  }
  int arc = rr_journal_audit_json(j, actor, "config_change", path, data);
  seen_t *s = calloc(1, sizeof *s);
  int krc = s && (s->path = strdup(path)) ? 0 : RR_ENOMEM;
  if (krc == 0) {
    snprintf(s->sha, sizeof s->sha, "%s", rc == 0 ? hex : "");
    s->at_ms = now_ms();
    remember(path, s->sha);
    krc = rr_journal_custom(j, seen_write, s, seen_free, NULL, NULL);
  } else {
    free(s);
  }
  rr_log(RR_LOG_INFO, "config", "event=config_change file=%s change=%s why=%s", path,
         rc       ? "removed"
         : before ? "changed"
                  : "new",
         why);
  return arc ? arc : krc ? krc : 1;
}

static bool wanted(const char *name) {
  size_t n = strlen(name);
  static const char *const ext[] = {".json", ".lua", ".csv", ".txt"};
  if (name[0] == '.')
    return false;
  for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++) {
    size_t e = strlen(ext[i]);
    if (n > e && strcmp(name + n - e, ext[i]) == 0)
      return true;
  }
  return false;
}

int rr_config_audit_dir(rr_journal_t *j, const char *dir, const char *why) {
  DIR *d = opendir(dir);
  if (!d)
    return -errno;
  int changed = 0;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    if (!wanted(de->d_name))
      continue;
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, de->d_name) >= sizeof path)
      continue;
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
      continue;
    if (rr_config_audit_file(j, path, why) == 1)
      changed++;
  }
  closedir(d);
  return changed;
}

/* Configuration changes in the audit trail: file hashes against the ones
 * the store saw last. */
#include "audit/config_audit.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <pwd.h>
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

static void owner_name(uid_t uid, char *out, size_t cap) {
  struct passwd pw, *res = NULL;
  char buf[1024];
  if (getpwuid_r(uid, &pw, buf, sizeof buf, &res) == 0 && res)
    snprintf(out, cap, "%s", res->pw_name);
  else
    snprintf(out, cap, "uid:%u", (unsigned)uid);
}

int rr_config_audit_file(rr_journal_t *j, const char *path, const char *why) {
  char key[4200];
  if ((size_t)snprintf(key, sizeof key, "rr.config:%s", path) >= sizeof key)
    return RR_EINVAL;
  struct stat st;
  memset(&st, 0, sizeof st);
  char hex[65] = "";
  int rc = hash_file(path, hex, &st);
  if (rc && rc != RR_ENOTFOUND)
    return rc;
  rr_buf_t prev;
  rr_buf_init(&prev, 256);
  int known = rr_journal_kv_get(j, key, &prev) == 0;
  const char *before = known && prev.len ? prev.data : NULL;
  if (rc == RR_ENOTFOUND && !known) {
    rr_buf_close(&prev);
    return RR_ENOTFOUND;
  }
  if (rc == 0 && before && strcmp(before, hex) == 0) {
    rr_buf_close(&prev);
    return 0;
  }
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
  int krc = rc == 0 ? rr_journal_kv_set(j, key, hex, strlen(hex), now_ms())
                    : rr_journal_kv_set(j, key, NULL, 0, now_ms());
  rr_log(RR_LOG_INFO, "config", "event=config_change file=%s change=%s why=%s", path,
         rc       ? "removed"
         : before ? "changed"
                  : "new",
         why);
  rr_buf_close(&prev);
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

/* A SQLite VFS shim that coalesces write-ahead-log writes.
 *
 * SQLite appends a commit to the WAL as two pwrite calls per page (frame
 * header, then page). The shim keeps a connection's contiguous WAL writes
 * in memory and hands them to the file in one write when SQLite next needs
 * them on disk or visible to another connection:
 *   - xSync (a commit with synchronous=FULL; checkpoints),
 *   - xShmBarrier on the database file, which SQLite calls before it
 *     publishes a new WAL index header (the moment other connections may
 *     read the new frames; the WAL file is found through
 *     sqlite3_database_file_object),
 *   - any read, size query, truncation, lock change or close of the WAL,
 *   - a write that is not contiguous with what is held, or the buffer
 *     reaching its limit.
 * Nothing is reordered relative to a sync, so the crash guarantees are
 * SQLite's own: a commit is durable once xSync returned, and frames written
 * before a crash without a sync are what SQLite's recovery already expects
 * may be missing. A write that fails late is reported by the next xSync
 * (or read, truncation, size query), so a commit whose frames did not reach
 * the file fails. That is why the shim is for connections with
 * synchronous=FULL, where every commit ends in xSync before its frames are
 * published; the journal uses it only then.
 *
 * A commit's sync can be deferred (rr_wal_vfs_defer_sync): the held bytes
 * are still written, and a failed write still fails the commit, but the
 * fdatasync is left to the caller, who does it on a descriptor of its own
 * outside SQLite's write lock, so the next commit's work overlaps this
 * one's wait for the disk.
 *
 * Every other file (database, shared memory, temporary files) passes
 * straight through to the default VFS. A file handle is used by one
 * connection, on one thread at a time, as SQLite does with
 * SQLITE_OPEN_NOMUTEX, so the buffer needs no lock. */
#include "store/wal_vfs.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WAL_BUFFER_LIMIT (4u << 20) /* flushed once this much is held */
/* Largest single write handed down: the unix VFS takes writes below 128 KiB
 * in one system call (it was made for page-sized writes). */
#define WAL_WRITE_MAX ((size_t)0x1f000)

typedef struct shim_file shim_file_t;
struct shim_file {
  sqlite3_file base; /* pMethods: shim_methods, or NULL when xOpen failed */
  sqlite3_file *real;
  bool is_wal;
  shim_file_t *wal; /* on a database file: its open WAL, or NULL */
  shim_file_t *db;  /* on a WAL file: its database file */
  unsigned char *buf;
  size_t len, cap;
  sqlite3_int64 off; /* file offset of buf[0] */
  int err;           /* a failed late write, reported by the next call that can */
  int sync_fd;       /* on a WAL file: its own descriptor (rr_wal_vfs_wal_fd), or -1 */
  bool defer_sync;   /* on a database file: its WAL's syncs are left to the caller */
};

static sqlite3_vfs shim_vfs;
static sqlite3_vfs *real_vfs;
static sqlite3_io_methods shim_methods;

static size_t real_offset(void) {
  return (sizeof(shim_file_t) + 15) & ~(size_t)15;
}

/* Writes what is held. A failure drops the held bytes (SQLite rewrites
 * frames of a commit that failed) and is kept in err until reported. */
static int flush(shim_file_t *f) {
  if (!f)
    return SQLITE_OK;
  for (size_t done = 0; done < f->len;) {
    size_t n = f->len - done < WAL_WRITE_MAX ? f->len - done : WAL_WRITE_MAX;
    int rc =
        f->real->pMethods->xWrite(f->real, f->buf + done, (int)n, f->off + (sqlite3_int64)done);
    if (rc != SQLITE_OK) {
      if (f->err == SQLITE_OK)
        f->err = rc;
      break;
    }
    done += n;
  }
  f->len = 0;
  int rc = f->err;
  f->err = SQLITE_OK;
  return rc;
}

static int x_close(sqlite3_file *p) {
  shim_file_t *f = (shim_file_t *)p;
  int rc = flush(f);
  if (f->is_wal && f->db)
    f->db->wal = NULL;
  if (!f->is_wal && f->wal)
    f->wal->db = NULL;
  int rc2 = f->real->pMethods ? f->real->pMethods->xClose(f->real) : SQLITE_OK;
  if (f->sync_fd >= 0)
    close(f->sync_fd);
  f->sync_fd = -1;
  free(f->buf);
  f->buf = NULL;
  return rc != SQLITE_OK ? rc : rc2;
}

static int x_read(sqlite3_file *p, void *out, int n, sqlite3_int64 off) {
  shim_file_t *f = (shim_file_t *)p;
  int rc = flush(f);
  return rc != SQLITE_OK ? rc : f->real->pMethods->xRead(f->real, out, n, off);
}

static int x_write(sqlite3_file *p, const void *data, int n, sqlite3_int64 off) {
  shim_file_t *f = (shim_file_t *)p;
  if (!f->is_wal)
    return f->real->pMethods->xWrite(f->real, data, n, off);
  if (f->len && off != f->off + (sqlite3_int64)f->len) {
    int rc = flush(f);
    if (rc != SQLITE_OK)
      return rc;
  }
  size_t need = f->len + (size_t)n;
  if (need > f->cap) {
    if (need > WAL_BUFFER_LIMIT) { /* too much to hold: write through */
      int rc = flush(f);
      return rc != SQLITE_OK ? rc : f->real->pMethods->xWrite(f->real, data, n, off);
    }
    size_t cap = f->cap ? f->cap : 65536;
    while (cap < need)
      cap *= 2;
    unsigned char *b = realloc(f->buf, cap);
    if (!b) {
      int rc = flush(f);
      return rc != SQLITE_OK ? rc : f->real->pMethods->xWrite(f->real, data, n, off);
    }
    f->buf = b;
    f->cap = cap;
  }
  if (f->len == 0)
    f->off = off;
  memcpy(f->buf + f->len, data, (size_t)n);
  f->len += (size_t)n;
  return SQLITE_OK;
}

static int x_truncate(sqlite3_file *p, sqlite3_int64 size) {
  shim_file_t *f = (shim_file_t *)p;
  int rc = flush(f);
  return rc != SQLITE_OK ? rc : f->real->pMethods->xTruncate(f->real, size);
}

static int x_sync(sqlite3_file *p, int flags) {
  shim_file_t *f = (shim_file_t *)p;
  int rc = flush(f);
  if (rc == SQLITE_OK && f->is_wal && f->db && f->db->defer_sync)
    return SQLITE_OK; /* written; the caller waits for the disk */
  return rc != SQLITE_OK ? rc : f->real->pMethods->xSync(f->real, flags);
}

static int x_file_size(sqlite3_file *p, sqlite3_int64 *size) {
  shim_file_t *f = (shim_file_t *)p;
  int rc = flush(f);
  return rc != SQLITE_OK ? rc : f->real->pMethods->xFileSize(f->real, size);
}

static int x_lock(sqlite3_file *p, int level) {
  shim_file_t *f = (shim_file_t *)p;
  return f->real->pMethods->xLock(f->real, level);
}

static int x_unlock(sqlite3_file *p, int level) {
  shim_file_t *f = (shim_file_t *)p;
  int rc = flush(f->is_wal ? f : f->wal);
  int rc2 = f->real->pMethods->xUnlock(f->real, level);
  return rc != SQLITE_OK ? rc : rc2;
}

static int x_check_reserved(sqlite3_file *p, int *out) {
  shim_file_t *f = (shim_file_t *)p;
  return f->real->pMethods->xCheckReservedLock(f->real, out);
}

static int x_file_control(sqlite3_file *p, int op, void *arg) {
  shim_file_t *f = (shim_file_t *)p;
  if (op == SQLITE_FCNTL_VFSNAME) {
    int rc = f->real->pMethods->xFileControl(f->real, op, arg);
    if (rc == SQLITE_OK && arg) {
      char *inner = *(char **)arg;
      *(char **)arg = sqlite3_mprintf("%s/%z", shim_vfs.zName, inner);
    }
    return rc;
  }
  int rc = flush(f->is_wal ? f : NULL);
  return rc != SQLITE_OK ? rc : f->real->pMethods->xFileControl(f->real, op, arg);
}

static int x_sector_size(sqlite3_file *p) {
  shim_file_t *f = (shim_file_t *)p;
  return f->real->pMethods->xSectorSize(f->real);
}

static int x_device_characteristics(sqlite3_file *p) {
  shim_file_t *f = (shim_file_t *)p;
  return f->real->pMethods->xDeviceCharacteristics(f->real);
}

static int x_shm_map(sqlite3_file *p, int pg, int pgsz, int extend, void volatile **out) {
  shim_file_t *f = (shim_file_t *)p;
  return f->real->pMethods->xShmMap(f->real, pg, pgsz, extend, out);
}

static int x_shm_lock(sqlite3_file *p, int offset, int n, int flags) {
  shim_file_t *f = (shim_file_t *)p;
  if (flags & SQLITE_SHM_UNLOCK) {
    int rc = flush(f->wal);
    if (rc != SQLITE_OK)
      return rc;
  }
  return f->real->pMethods->xShmLock(f->real, offset, n, flags);
}

static void x_shm_barrier(sqlite3_file *p) {
  shim_file_t *f = (shim_file_t *)p;
  /* A new WAL index header is about to be published: the frames it names
   * must be in the file first. With synchronous=FULL the commit's xSync has
   * already written them; a failure here cannot be returned, so it stays
   * in err for the next call on the WAL. */
  if (f->wal && f->wal->len) {
    int err = f->wal->err;
    f->wal->err = SQLITE_OK;
    int rc = flush(f->wal);
    f->wal->err = err != SQLITE_OK ? err : rc;
  }
  f->real->pMethods->xShmBarrier(f->real);
}

static int x_shm_unmap(sqlite3_file *p, int del) {
  shim_file_t *f = (shim_file_t *)p;
  return f->real->pMethods->xShmUnmap(f->real, del);
}

static int x_fetch(sqlite3_file *p, sqlite3_int64 off, int n, void **out) {
  shim_file_t *f = (shim_file_t *)p;
  int rc = flush(f->is_wal ? f : NULL);
  return rc != SQLITE_OK ? rc : f->real->pMethods->xFetch(f->real, off, n, out);
}

static int x_unfetch(sqlite3_file *p, sqlite3_int64 off, void *ptr) {
  shim_file_t *f = (shim_file_t *)p;
  return f->real->pMethods->xUnfetch(f->real, off, ptr);
}

static int x_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *p, int flags,
                  int *out_flags) {
  (void)vfs;
  shim_file_t *f = (shim_file_t *)p;
  memset(f, 0, sizeof *f);
  f->sync_fd = -1;
  f->real = (sqlite3_file *)((char *)p + real_offset());
  int rc = real_vfs->xOpen(real_vfs, name, f->real, flags, out_flags);
  if (rc != SQLITE_OK) {
    if (f->real->pMethods)
      f->real->pMethods->xClose(f->real);
    f->base.pMethods = NULL;
    return rc;
  }
  f->is_wal = (flags & SQLITE_OPEN_WAL) != 0;
  if (f->is_wal && name)
    f->sync_fd = open(name, O_RDONLY | O_CLOEXEC); /* the file SQLite just opened */
  if (f->is_wal && name) {
    sqlite3_file *db = sqlite3_database_file_object(name);
    if (db && db->pMethods == &shim_methods) {
      f->db = (shim_file_t *)db;
      f->db->wal = f;
    }
  }
  f->base.pMethods = &shim_methods;
  return SQLITE_OK;
}

static int v_delete(sqlite3_vfs *v, const char *name, int sync_dir) {
  (void)v;
  return real_vfs->xDelete(real_vfs, name, sync_dir);
}
static int v_access(sqlite3_vfs *v, const char *name, int flags, int *out) {
  (void)v;
  return real_vfs->xAccess(real_vfs, name, flags, out);
}
static int v_full_pathname(sqlite3_vfs *v, const char *name, int n, char *out) {
  (void)v;
  return real_vfs->xFullPathname(real_vfs, name, n, out);
}
static void *v_dlopen(sqlite3_vfs *v, const char *name) {
  (void)v;
  return real_vfs->xDlOpen(real_vfs, name);
}
static void v_dlerror(sqlite3_vfs *v, int n, char *out) {
  (void)v;
  real_vfs->xDlError(real_vfs, n, out);
}
static void (*v_dlsym(sqlite3_vfs *v, void *h, const char *sym))(void) {
  (void)v;
  return real_vfs->xDlSym(real_vfs, h, sym);
}
static void v_dlclose(sqlite3_vfs *v, void *h) {
  (void)v;
  real_vfs->xDlClose(real_vfs, h);
}
static int v_randomness(sqlite3_vfs *v, int n, char *out) {
  (void)v;
  return real_vfs->xRandomness(real_vfs, n, out);
}
static int v_sleep(sqlite3_vfs *v, int us) {
  (void)v;
  return real_vfs->xSleep(real_vfs, us);
}
static int v_current_time(sqlite3_vfs *v, double *out) {
  (void)v;
  return real_vfs->xCurrentTime(real_vfs, out);
}
static int v_last_error(sqlite3_vfs *v, int n, char *out) {
  (void)v;
  return real_vfs->xGetLastError(real_vfs, n, out);
}
static int v_current_time64(sqlite3_vfs *v, sqlite3_int64 *out) {
  (void)v;
  return real_vfs->xCurrentTimeInt64(real_vfs, out);
}

static void setup(void) {
  real_vfs = sqlite3_vfs_find(NULL);
  if (!real_vfs)
    return;
  const sqlite3_io_methods m = {
      .iVersion = 3,
      .xClose = x_close,
      .xRead = x_read,
      .xWrite = x_write,
      .xTruncate = x_truncate,
      .xSync = x_sync,
      .xFileSize = x_file_size,
      .xLock = x_lock,
      .xUnlock = x_unlock,
      .xCheckReservedLock = x_check_reserved,
      .xFileControl = x_file_control,
      .xSectorSize = x_sector_size,
      .xDeviceCharacteristics = x_device_characteristics,
      .xShmMap = x_shm_map,
      .xShmLock = x_shm_lock,
      .xShmBarrier = x_shm_barrier,
      .xShmUnmap = x_shm_unmap,
      .xFetch = x_fetch,
      .xUnfetch = x_unfetch,
  };
  shim_methods = m;
  if (real_vfs->iVersion < 2 || !real_vfs->xCurrentTimeInt64) {
    real_vfs = NULL;
    return;
  }
  const sqlite3_vfs v = {
      .iVersion = 2,
      .szOsFile = (int)(real_offset() + (size_t)real_vfs->szOsFile),
      .mxPathname = real_vfs->mxPathname,
      .zName = RR_WAL_VFS_NAME,
      .xOpen = x_open,
      .xDelete = v_delete,
      .xAccess = v_access,
      .xFullPathname = v_full_pathname,
      .xDlOpen = v_dlopen,
      .xDlError = v_dlerror,
      .xDlSym = v_dlsym,
      .xDlClose = v_dlclose,
      .xRandomness = v_randomness,
      .xSleep = v_sleep,
      .xCurrentTime = v_current_time,
      .xGetLastError = v_last_error,
      .xCurrentTimeInt64 = v_current_time64,
  };
  shim_vfs = v;
  if (sqlite3_vfs_register(&shim_vfs, 0) != SQLITE_OK)
    real_vfs = NULL;
}

int rr_wal_vfs_register(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, setup);
  return real_vfs ? 0 : -1;
}

static shim_file_t *main_file(sqlite3 *db) {
  sqlite3_file *file = NULL;
  if (!db || sqlite3_file_control(db, "main", SQLITE_FCNTL_FILE_POINTER, &file) != SQLITE_OK ||
      !file || file->pMethods != &shim_methods)
    return NULL;
  return (shim_file_t *)file;
}

int rr_wal_vfs_defer_sync(sqlite3 *db, int on) {
  shim_file_t *f = main_file(db);
  if (!f)
    return -1;
  f->defer_sync = on != 0;
  return 0;
}

int rr_wal_vfs_wal_fd(sqlite3 *db) {
  shim_file_t *f = main_file(db);
  if (!f || !f->wal || f->wal->sync_fd < 0)
    return -1;
  return fcntl(f->wal->sync_fd, F_DUPFD_CLOEXEC, 0);
}

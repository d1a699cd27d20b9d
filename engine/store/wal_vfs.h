/* SQLite VFS shim that coalesces a connection's WAL writes into one write
 * per commit (see wal_vfs.c for when held bytes are written). For
 * connections with synchronous=FULL only. */
#ifndef RR_STORE_WAL_VFS_H
#define RR_STORE_WAL_VFS_H

#include <sqlite3.h>

#define RR_WAL_VFS_NAME "rr-wal-coalesce"

/* rr_wal_vfs_register: registers the shim (not as the default) once per
 * process; thread-safe. 0, or -1 when SQLite's default VFS cannot be
 * wrapped (then open connections without it). */
int rr_wal_vfs_register(void);

/* rr_wal_vfs_defer_sync: on db (a connection opened with the shim), while
 * on, a sync of its WAL writes what is held but does not wait for the disk:
 * SQLite's commit then releases the write lock at once, and the caller
 * makes the commit durable itself with fdatasync on rr_wal_vfs_wal_fd
 * before it tells anyone the commit happened. For commits only: a
 * checkpoint needs the WAL on disk before it copies pages, so the caller
 * turns this off around anything else. 0, or -1 when db does not use the
 * shim. Only from the thread that uses db. */
int rr_wal_vfs_defer_sync(sqlite3 *db, int on);

/* rr_wal_vfs_wal_fd: a new descriptor (the caller closes it) of db's WAL
 * file, opened when the WAL was, for fdatasync from another thread (a
 * sync of any descriptor of a file flushes all of its written data). -1
 * when db does not use the shim or has no WAL open. */
int rr_wal_vfs_wal_fd(sqlite3 *db);

#endif

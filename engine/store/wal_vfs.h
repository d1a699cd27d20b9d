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

#endif

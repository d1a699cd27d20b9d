/* Configuration changes in the audit trail.
 *
 * Every file the running configuration is made of (the engine file, the
 * channel files, scripts and their libraries and lookup tables, the API's
 * token file) is hashed (SHA-256) when the engine starts, on SIGHUP and
 * when a script is reloaded. A file the store has not seen, or whose hash
 * differs from the one it saw last, gives an audit record "config_change"
 * (subject: the file's path; data: its hash, the previous one, its size
 * and modification time, why it was looked at; actor: the file's owner,
 * the best the file system can say about who changed it), and its hash is
 * remembered in table config_files, both with the next batch. Contents never go to the trail: only
 * hashes. Loop thread (blocking reads of small files: configuration time). */
#ifndef RR_CONFIG_AUDIT_H
#define RR_CONFIG_AUDIT_H

#include "store/journal.h"

/* rr_config_audit_schema: table config_files (at start). */
int rr_config_audit_schema(rr_journal_t *j, char **errmsg);
/* rr_config_audit_file: one file. Returns 1 (changed, recorded), 0 (as
 * the store saw it last), or a negative code (unreadable: RR_ENOTFOUND
 * for a missing file, which is recorded as removed if the store knew it). */
int rr_config_audit_file(rr_journal_t *j, const char *path, const char *why);
/* rr_config_audit_dir: every regular file directly in dir whose name ends
 * in .json, .lua, .csv or .txt. Returns how many changed, or a negative
 * code when dir cannot be read. */
int rr_config_audit_dir(rr_journal_t *j, const char *dir, const char *why);

#endif

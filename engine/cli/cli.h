/* Subcommands of the radrelay binary. Each takes the arguments after its
 * name and returns the process exit status. Only main() exits. */
#ifndef RR_CLI_H
#define RR_CLI_H

int rr_cmd_hl7(int argc, char **argv);
int rr_cmd_version(int argc, char **argv);
int rr_cmd_run(int argc, char **argv);
int rr_cmd_check(int argc, char **argv);
int rr_cmd_reload(int argc, char **argv);
int rr_cmd_send(int argc, char **argv);
int rr_cmd_script(int argc, char **argv);
int rr_cmd_queue(int argc, char **argv);
int rr_cmd_replay(int argc, char **argv);
int rr_cmd_study(int argc, char **argv);
int rr_cmd_audit(int argc, char **argv);

/* rr_read_file: reads a whole file into *data (malloc'd, NUL-terminated). */
int rr_read_file(const char *path, char **data, size_t *len);

#endif

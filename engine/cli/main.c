/* radrelay: HL7 v2 / MLLP interface engine for radiology AI. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"

static void usage(FILE *f) {
  fprintf(f, "usage: radrelay COMMAND [ARGS]\n"
             "\n"
             "commands:\n"
             "  run -c CONFIG [--log-level L]   run the engine with a configuration file\n"
             "  check -c CONFIG           validate the configuration (exit status tells)\n"
             "  reload -c CONFIG          make the running engine reload scripts and TLS files\n"
             "  send HOST:PORT FILE...    send every message of the files over MLLP, print ACKs\n"
             "  script test CHANNEL SAMPLE.hl7... [--json]   run a channel's script on samples\n"
             "  script test CHANNEL --cases DIR [--update]  check a channel's script on cases\n"
             "  queue ls -c CONFIG        destinations: pending, dead letters, oldest\n"
             "  queue show DEST [--dead] [--limit N] -c CONFIG   what waits for a destination\n"
             "  queue retry DEST (ID|--dead) -c CONFIG   retry a dead letter, or all of them\n"
             "  queue drop DEST ID -c CONFIG   remove a pending or dead delivery\n"
             "  replay -c CONFIG --to DEST (--id N|--mrn M|--accession A|--since T [--until T])\n"
             "                            queue journaled messages again for a destination\n"
             "  study complete UID -c CONFIG   a DICOM study is complete now (stable)\n"
             "  audit verify -c CONFIG [--anchor SEQ:HASH]   re-check the audit hash chain\n"
             "  audit export -c CONFIG [--since T] [--until T] [--out FILE]\n"
             "                            the audit trail as JSON lines\n"
             "  hl7 dump [--decoded] FILE...   print every value of every message\n"
             "  hl7 get FILE PATH...      print values by path (e.g. PID-3[2].1)\n"
             "  hl7 check [--strict] FILE...   parse and report errors with byte offsets\n"
             "  hl7 ack [--code AA|AE|AR|CA|CE|CR] FILE   print the ACK for each message\n"
             "  version                   versions of radrelay and its libraries\n");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const char *cmd = argv[1];
  if (strcmp(cmd, "hl7") == 0)
    return rr_cmd_hl7(argc - 2, argv + 2);
  if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0)
    return rr_cmd_version(argc - 2, argv + 2);
  if (strcmp(cmd, "run") == 0)
    return rr_cmd_run(argc - 2, argv + 2);
  if (strcmp(cmd, "check") == 0)
    return rr_cmd_check(argc - 2, argv + 2);
  if (strcmp(cmd, "reload") == 0)
    return rr_cmd_reload(argc - 2, argv + 2);
  if (strcmp(cmd, "send") == 0)
    return rr_cmd_send(argc - 2, argv + 2);
  if (strcmp(cmd, "script") == 0)
    return rr_cmd_script(argc - 2, argv + 2);
  if (strcmp(cmd, "queue") == 0)
    return rr_cmd_queue(argc - 2, argv + 2);
  if (strcmp(cmd, "replay") == 0)
    return rr_cmd_replay(argc - 2, argv + 2);
  if (strcmp(cmd, "study") == 0)
    return rr_cmd_study(argc - 2, argv + 2);
  if (strcmp(cmd, "audit") == 0)
    return rr_cmd_audit(argc - 2, argv + 2);
  if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
    usage(stdout);
    return 0;
  }
  fprintf(stderr, "radrelay: unknown command '%s'\n", cmd);
  usage(stderr);
  return 2;
}

/* HL7 codec benchmark: parse + read ten values, and parse + serialize, for a
 * ~1 KB ADT^A01 and a ~2.5 MB ORU^R01 with a base64 ED payload. Prints one
 * JSON line per case, the shape scripts/bench-hl7 collects from every
 * implementation. RR_BENCH_SECONDS sets the time per case (default 2). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hl7/hl7.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *load(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    perror(path);
    exit(1);
  }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *d = malloc((size_t)n + 1);
  if (!d || fread(d, 1, (size_t)n, f) != (size_t)n) {
    perror(path);
    exit(1);
  }
  fclose(f);
  *len = (size_t)n;
  return d;
}

static const char *const adt_paths[10] = {"MSH-9.1",    "MSH-9.2", "MSH-10",  "PID-3[1].1",
                                          "PID-3[2].1", "PID-5.1", "PID-5.2", "PID-7",
                                          "PV1-3.1",    "PV1-19"};
static const char *oru_paths[10] = {"MSH-9.2", "MSH-10",  "PID-3[1].1", "PID-3[2].1", "PID-5.1",
                                    "OBR-3",   "OBR-4.1", "OBR-25",     "OBX[1]-3.1", NULL};

typedef struct bench_case {
  const char *name;
  const char *data;
  size_t len;
  const char *const *paths;
} bench_case_t;

static volatile size_t sink;
/* The engine parses each frame in place (borrow); RR_BENCH_COPY=1 measures
 * the copying parse instead. */
static rr_hl7_options_t g_opt;

/* One iteration of parse_read10; returns the checksum (sum of value lengths). */
static size_t parse_read10(rr_hl7_msg_t *m, const bench_case_t *c) {
  if (rr_hl7_parse(m, c->data, c->len, &g_opt, NULL) != 0) {
    fprintf(stderr, "%s: parse failed\n", c->name);
    exit(1);
  }
  size_t sum = 0;
  for (int i = 0; i < 10; i++) {
    rr_hl7_slice_t v;
    if (rr_hl7_get_raw_s(m, c->paths[i], &v) != 0) {
      fprintf(stderr, "%s: %s not found\n", c->name, c->paths[i]);
      exit(1);
    }
    sum += v.len;
  }
  return sum;
}

static size_t parse_serialize(rr_hl7_msg_t *m, const bench_case_t *c, rr_buf_t *out) {
  if (rr_hl7_parse(m, c->data, c->len, &g_opt, NULL) != 0)
    exit(1);
  rr_buf_reset(out);
  if (rr_hl7_serialize(m, out) != 0)
    exit(1);
  return out->len;
}

static void run(const bench_case_t *c, const char *op, double seconds) {
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  rr_buf_t out;
  rr_buf_init(&out, (size_t)1 << 30);
  bool read10 = strcmp(op, "parse_read10") == 0;
  size_t checksum = read10 ? parse_read10(m, c) : parse_serialize(m, c, &out);
  /* warm up, then count iterations until the time is up, checking the clock
   * every batch so the clock call stays out of the measurement */
  double t0 = now();
  while (now() - t0 < seconds / 10)
    sink += read10 ? parse_read10(m, c) : parse_serialize(m, c, &out);
  uint64_t iters = 0, batch = 1;
  t0 = now();
  double el = 0;
  do {
    for (uint64_t i = 0; i < batch; i++)
      sink += read10 ? parse_read10(m, c) : parse_serialize(m, c, &out);
    iters += batch;
    el = now() - t0;
    if (el < seconds / 50)
      batch *= 2;
  } while (el < seconds);
  printf("{\"impl\":\"radrelay\",\"case\":\"%s\",\"op\":\"%s\",\"msgs_per_s\":%.1f,"
         "\"mb_per_s\":%.2f,\"checksum\":%zu,\"iterations\":%llu,\"seconds\":%.3f}\n",
         c->name, op, (double)iters / el, (double)iters * (double)c->len / el / 1e6, checksum,
         (unsigned long long)iters, el);
  fflush(stdout);
  rr_buf_close(&out);
  rr_hl7_msg_free(m);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: bench_hl7 ADT_FILE ORU_FILE\n");
    return 2;
  }
  const char *sec = getenv("RR_BENCH_SECONDS");
  double seconds = sec ? strtod(sec, NULL) : 2.0;
  if (seconds <= 0)
    seconds = 2.0;
  rr_hl7_options_default(&g_opt);
  const char *copy = getenv("RR_BENCH_COPY");
  g_opt.borrow = !(copy && *copy == '1');
  size_t alen, olen;
  char *adt = load(argv[1], &alen);
  char *oru = load(argv[2], &olen);
  /* The ED value is OBX-5.5 of the OBX whose OBX-2 is ED. */
  static char ed_path[32];
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  if (rr_hl7_parse(m, oru, olen, NULL, NULL) != 0)
    return 1;
  for (unsigned k = 1;; k++) {
    char p[32];
    snprintf(p, sizeof p, "OBX[%u]-2", k);
    rr_hl7_slice_t v;
    if (rr_hl7_get_raw_s(m, p, &v) != 0) {
      fprintf(stderr, "no ED OBX in %s\n", argv[2]);
      return 1;
    }
    if (v.len == 2 && memcmp(v.p, "ED", 2) == 0) {
      snprintf(ed_path, sizeof ed_path, "OBX[%u]-5.5", k);
      break;
    }
  }
  rr_hl7_msg_free(m);
  oru_paths[9] = ed_path;
  bench_case_t cases[2] = {{"adt_a01", adt, alen, adt_paths}, {"oru_big", oru, olen, oru_paths}};
  for (int i = 0; i < 2; i++) {
    run(&cases[i], "parse_read10", seconds);
    run(&cases[i], "parse_serialize", seconds);
  }
  free(adt);
  free(oru);
  return 0;
}

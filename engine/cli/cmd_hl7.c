/* radrelay hl7 ...: the codec from the command line, for analysts and tests. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "core/error.h"
#include "hl7/hl7.h"

int rr_read_file(const char *path, char **data, size_t *len) {
  FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
  if (!f)
    return -errno;
  rr_buf_t b;
  rr_buf_init(&b, (size_t)1 << 31);
  char chunk[65536];
  size_t n;
  int rc = 0;
  while (rc == 0 && (n = fread(chunk, 1, sizeof chunk, f)) > 0)
    rc = rr_buf_append(&b, chunk, n);
  if (rc == 0 && ferror(f))
    rc = RR_EIO;
  if (f != stdin)
    fclose(f);
  if (rc == 0 && !b.data)
    rc = rr_buf_append(&b, "", 0);
  if (rc) {
    rr_buf_close(&b);
    return rc;
  }
  *data = rr_buf_steal(&b, len);
  return 0;
}

typedef int (*msg_fn)(void *ud, rr_hl7_msg_t *m, size_t index, int parse_rc,
                      const rr_hl7_error_t *err);

typedef struct each_ctx {
  rr_hl7_msg_t *m;
  rr_hl7_options_t opt;
  size_t index;
  msg_fn fn;
  void *ud;
} each_ctx_t;

static int each_item(void *ud, rr_hl7_item_kind_t kind, const char *data, size_t len,
                     size_t offset) {
  each_ctx_t *c = ud;
  (void)offset;
  if (kind != RR_HL7_ITEM_MESSAGE)
    return 0;
  rr_hl7_error_t err;
  int rc = rr_hl7_parse(c->m, data, len, &c->opt, &err);
  err.offset += offset;
  return c->fn(c->ud, c->m, ++c->index, rc, &err);
}

/* Calls fn for every message of every file. */
static int for_each_message(char **files, int nfiles, const rr_hl7_options_t *opt, msg_fn fn,
                            void *ud) {
  int status = 0;
  rr_hl7_msg_t *m = rr_hl7_msg_new();
  if (!m)
    return 1;
  for (int i = 0; i < nfiles; i++) {
    char *data = NULL;
    size_t len = 0;
    int rc = rr_read_file(files[i], &data, &len);
    if (rc) {
      fprintf(stderr, "radrelay: %s: %s\n", files[i], rr_strerror(rc));
      status = 1;
      continue;
    }
    each_ctx_t c = {m, *opt, 0, fn, ud};
    rr_hl7_reader_t r;
    rr_hl7_reader_init(&r, len + 1);
    rc = rr_hl7_reader_feed(&r, data, len, each_item, &c);
    if (rc == 0)
      rc = rr_hl7_reader_finish(&r, each_item, &c);
    rr_hl7_reader_close(&r);
    free(data);
    if (rc) {
      if (rc < 0)
        fprintf(stderr, "radrelay: %s: %s\n", files[i], rr_strerror(rc));
      status = 1;
    }
  }
  rr_hl7_msg_free(m);
  return status;
}

static void print_escaped(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (c == '\n')
      fputs("\\n", stdout);
    else if (c == '\t')
      fputs("\\t", stdout);
    else if (c == '\\')
      fputs("\\\\", stdout);
    else
      putchar(c);
  }
}

typedef struct dump_ctx {
  bool decoded;
  rr_buf_t v;
} dump_ctx_t;

static void dump_leaf(dump_ctx_t *d, rr_hl7_msg_t *m, const char *seg, unsigned occ, unsigned f,
                      unsigned r, unsigned c, unsigned s, rr_hl7_slice_t leaf) {
  if (leaf.len == 0)
    return;
  rr_buf_reset(&d->v);
  int rc = d->decoded ? rr_hl7_decode(m, leaf.p, leaf.len, &d->v)
                      : rr_hl7_to_utf8(m, leaf.p, leaf.len, &d->v);
  if (rc) {
    rr_buf_reset(&d->v);
    rr_buf_append(&d->v, leaf.p, leaf.len);
  }
  printf("%s[%u]-%u[%u].%u.%u\t", seg, occ, f, r, c, s);
  if (d->decoded)
    print_escaped(d->v.data ? d->v.data : "", d->v.len);
  else
    fwrite(d->v.data ? d->v.data : "", 1, d->v.len, stdout);
  putchar('\n');
}

static int dump_msg(void *ud, rr_hl7_msg_t *m, size_t index, int prc, const rr_hl7_error_t *err) {
  dump_ctx_t *d = ud;
  printf("=== message %zu\n", index);
  if (prc) {
    printf("!!! error %s at byte %zu: %s\n", rr_strerror(prc), err->offset, err->text);
    return 0;
  }
  const rr_hl7_delims_t *dl = rr_hl7_delims(m);
  size_t nseg = rr_hl7_segment_count(m);
  for (size_t i = 0; i < nseg; i++) {
    const char *name = rr_hl7_segment_name(m, i);
    unsigned occ = 0;
    for (size_t j = 0; j <= i; j++)
      occ += strcmp(rr_hl7_segment_name(m, j), name) == 0;
    unsigned nf = rr_hl7_segment_fields(m, i);
    bool hdr = strcmp(name, "MSH") == 0 || strcmp(name, "FHS") == 0 || strcmp(name, "BHS") == 0;
    unsigned f = 1;
    if (hdr) {
      rr_hl7_slice_t v;
      rr_hl7_field_raw(m, i, 1, &v);
      printf("%s[%u]-1\t%.*s\n", name, occ, (int)v.len, v.p);
      rr_hl7_field_raw(m, i, 2, &v);
      printf("%s[%u]-2\t%.*s\n", name, occ, (int)v.len, v.p);
      f = 3;
    }
    for (; f <= nf; f++) {
      rr_hl7_slice_t fv;
      rr_hl7_field_raw(m, i, f, &fv);
      rr_hl7_slice_t rv, cv, sv;
      for (unsigned r = 1; rr_hl7_piece(fv.p, fv.len, dl->repetition, r, &rv); r++)
        for (unsigned c = 1; rr_hl7_piece(rv.p, rv.len, dl->component, c, &cv); c++)
          for (unsigned s = 1; rr_hl7_piece(cv.p, cv.len, dl->subcomponent, s, &sv); s++)
            dump_leaf(d, m, name, occ, f, r, c, s, sv);
    }
  }
  return 0;
}

static int check_msg(void *ud, rr_hl7_msg_t *m, size_t index, int prc, const rr_hl7_error_t *err) {
  (void)m;
  int *bad = ud;
  if (prc) {
    (*bad)++;
    printf("message %zu: error %d (%s) at byte %zu", index, err->hl7_code,
           rr_hl7_error_text(err->hl7_code), err->offset);
    if (err->segment_id[0])
      printf(" segment %s[%u]", err->segment_id, err->occurrence);
    if (err->field)
      printf(" field %u", err->field);
    printf(": %s\n", err->text);
  } else {
    rr_hl7_slice_t t, id;
    rr_hl7_get_raw_s(m, "MSH-9", &t);
    rr_hl7_get_raw_s(m, "MSH-10", &id);
    printf("message %zu: ok %.*s control id %.*s, %zu segments\n", index, (int)t.len, t.p,
           (int)id.len, id.p, rr_hl7_segment_count(m));
  }
  return 0;
}

typedef struct ack_ctx {
  int code; /* -1: accept code for the message's mode */
} ack_ctx_t;

static int ack_msg(void *ud, rr_hl7_msg_t *m, size_t index, int prc, const rr_hl7_error_t *err) {
  ack_ctx_t *a = ud;
  char ts[32], ctl[32];
  rr_hl7_ts_format((int64_t)time(NULL), 0, 0, ts);
  snprintf(ctl, sizeof ctl, "ACK%zu", index);
  rr_hl7_ack_code_t code = a->code >= 0
                               ? (rr_hl7_ack_code_t)a->code
                               : rr_hl7_ack_code_for(m, prc ? RR_HL7_ERROR : RR_HL7_ACCEPT);
  rr_hl7_ack_options_t o = {ctl, ts, prc ? err->text : NULL, prc ? err : NULL, prc ? 1 : 0};
  rr_buf_t out;
  rr_buf_init(&out, 1 << 20);
  int rc = rr_hl7_ack_build(m, code, &o, &out);
  if (rc == 0) {
    for (size_t i = 0; i < out.len; i++)
      putchar(out.data[i] == '\r' ? '\n' : out.data[i]);
  }
  rr_buf_close(&out);
  return rc;
}

typedef struct get_ctx {
  char **paths;
  int npaths;
  rr_buf_t v;
} get_ctx_t;

static int get_msg(void *ud, rr_hl7_msg_t *m, size_t index, int prc, const rr_hl7_error_t *err) {
  get_ctx_t *g = ud;
  if (prc) {
    printf("message %zu: error at byte %zu: %s\n", index, err->offset, err->text);
    return 0;
  }
  for (int i = 0; i < g->npaths; i++) {
    rr_buf_reset(&g->v);
    int rc = rr_hl7_get_s(m, g->paths[i], &g->v);
    if (rc == RR_EPATH) {
      fprintf(stderr, "radrelay: bad path '%s'\n", g->paths[i]);
      return 1;
    }
    printf("%s\t", g->paths[i]);
    if (rc == 0)
      print_escaped(g->v.data ? g->v.data : "", g->v.len);
    putchar('\n');
  }
  return 0;
}

int rr_cmd_hl7(int argc, char **argv) {
  if (argc < 1) {
    fprintf(stderr, "usage: radrelay hl7 dump|get|check|ack ...\n");
    return 2;
  }
  const char *sub = argv[0];
  rr_hl7_options_t opt;
  rr_hl7_options_default(&opt);
  int i = 1;
  bool decoded = false;
  int code = -1;
  for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
    if (strcmp(argv[i], "--decoded") == 0)
      decoded = true;
    else if (strcmp(argv[i], "--strict") == 0)
      opt.mode = RR_HL7_STRICT;
    else if (strcmp(argv[i], "--code") == 0 && i + 1 < argc) {
      static const char *const names[] = {"AA", "AE", "AR", "CA", "CE", "CR"};
      const char *v = argv[++i];
      for (int k = 0; k < 6; k++)
        if (strcmp(v, names[k]) == 0)
          code = k;
      if (code < 0) {
        fprintf(stderr, "radrelay: unknown ACK code '%s'\n", v);
        return 2;
      }
    } else {
      fprintf(stderr, "radrelay: unknown option '%s'\n", argv[i]);
      return 2;
    }
  }
  if (i >= argc) {
    fprintf(stderr, "radrelay hl7 %s: no input file\n", sub);
    return 2;
  }
  if (strcmp(sub, "dump") == 0) {
    dump_ctx_t d = {decoded, {0}};
    rr_buf_init(&d.v, (size_t)1 << 30);
    int st = for_each_message(argv + i, argc - i, &opt, dump_msg, &d);
    rr_buf_close(&d.v);
    return st;
  }
  if (strcmp(sub, "check") == 0) {
    int bad = 0;
    int st = for_each_message(argv + i, argc - i, &opt, check_msg, &bad);
    return st || bad ? 1 : 0;
  }
  if (strcmp(sub, "ack") == 0) {
    ack_ctx_t a = {code};
    return for_each_message(argv + i, argc - i, &opt, ack_msg, &a);
  }
  if (strcmp(sub, "get") == 0) {
    get_ctx_t g = {argv + i + 1, argc - i - 1, {0}};
    rr_buf_init(&g.v, (size_t)1 << 30);
    int st = for_each_message(argv + i, 1, &opt, get_msg, &g);
    rr_buf_close(&g.v);
    return st;
  }
  fprintf(stderr, "radrelay hl7: unknown subcommand '%s'\n", sub);
  return 2;
}

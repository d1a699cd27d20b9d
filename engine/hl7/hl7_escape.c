/* Escape sequences (HL7 v2 chapter 2.7) and character sets (MSH-18).
 *
 * Decoding resolves escapes on the encoded bytes first, collecting runs of
 * bytes in the character set in force (MSH-18, switched by \C..\ and \M..\),
 * then converts each run to UTF-8. Encoding converts from UTF-8 to the
 * message character set first, then escapes delimiter bytes, so the two are
 * exact inverses for every value the character set can represent. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/error.h"
#include "hl7/hl7_int.h"

typedef struct cs_entry {
  const char *hl7; /* MSH-18 value (table 0211) */
  hl7_cs_t cs;
  const char *iconv; /* iconv name for CS_ICONV */
} cs_entry_t;

static const cs_entry_t charsets[] = {
    {"ASCII", CS_ASCII, NULL},
    {"ISO IR6", CS_ASCII, NULL},
    {"UNICODE UTF-8", CS_UTF8, NULL},
    {"UTF-8", CS_UTF8, NULL},
    {"UNICODE", CS_UTF8, NULL},
    {"8859/1", CS_LATIN1, NULL},
    {"ISO IR100", CS_LATIN1, NULL},
    {"8859/2", CS_ICONV, "ISO-8859-2"},
    {"ISO IR101", CS_ICONV, "ISO-8859-2"},
    {"8859/3", CS_ICONV, "ISO-8859-3"},
    {"ISO IR109", CS_ICONV, "ISO-8859-3"},
    {"8859/4", CS_ICONV, "ISO-8859-4"},
    {"ISO IR110", CS_ICONV, "ISO-8859-4"},
    {"8859/5", CS_ICONV, "ISO-8859-5"},
    {"ISO IR144", CS_ICONV, "ISO-8859-5"},
    {"8859/6", CS_ICONV, "ISO-8859-6"},
    {"ISO IR127", CS_ICONV, "ISO-8859-6"},
    {"8859/7", CS_ICONV, "ISO-8859-7"},
    {"ISO IR126", CS_ICONV, "ISO-8859-7"},
    {"8859/8", CS_ICONV, "ISO-8859-8"},
    {"ISO IR138", CS_ICONV, "ISO-8859-8"},
    {"8859/9", CS_ICONV, "ISO-8859-9"},
    {"ISO IR148", CS_ICONV, "ISO-8859-9"},
    {"8859/15", CS_ICONV, "ISO-8859-15"},
    {"ISO IR14", CS_ICONV, "JIS_X0201"},
    {"ISO IR87", CS_ICONV, "ISO-2022-JP"},
    {"ISO IR159", CS_ICONV, "ISO-2022-JP-2"},
    {"GB 18030-2000", CS_ICONV, "GB18030"},
    {"KS X 1001", CS_ICONV, "EUC-KR"},
    {"CNS 11643-1992", CS_ICONV, "EUC-TW"},
    {"BIG-5", CS_ICONV, "BIG5"},
    {"WINDOWS-1252", CS_ICONV, "CP1252"},
};

void hl7_charset_setup(rr_hl7_msg_t *m, const char *raw, size_t len) {
  m->cs = CS_DEFAULT;
  m->cs_name[0] = '\0';
  m->cs_iconv[0] = '\0';
  while (len && raw[len - 1] == ' ')
    len--;
  while (len && *raw == ' ')
    raw++, len--;
  if (len == 0)
    return;
  size_t n = len < sizeof m->cs_name - 1 ? len : sizeof m->cs_name - 1;
  memcpy(m->cs_name, raw, n);
  m->cs_name[n] = '\0';
  for (size_t i = 0; i < sizeof charsets / sizeof charsets[0]; i++) {
    if (strlen(charsets[i].hl7) == len && strncasecmp(charsets[i].hl7, raw, len) == 0) {
      m->cs = charsets[i].cs;
      snprintf(m->cs_name, sizeof m->cs_name, "%s", charsets[i].hl7);
      if (charsets[i].iconv)
        snprintf(m->cs_iconv, sizeof m->cs_iconv, "%s", charsets[i].iconv);
      return;
    }
  }
  m->cs = CS_ICONV; /* unknown: marked by an empty iconv name */
}

bool hl7_charset_known(const rr_hl7_msg_t *m) {
  return m->cs != CS_ICONV || m->cs_iconv[0] != '\0';
}

void hl7_msg_close_iconv(rr_hl7_msg_t *m) {
  if (m->to_utf8 != (iconv_t)-1)
    iconv_close(m->to_utf8);
  if (m->from_utf8 != (iconv_t)-1)
    iconv_close(m->from_utf8);
  m->to_utf8 = m->from_utf8 = (iconv_t)-1;
  m->iconv_for[0] = '\0';
}

static int open_iconv(rr_hl7_msg_t *m, const char *name) {
  if (strcmp(m->iconv_for, name) == 0 && m->to_utf8 != (iconv_t)-1)
    return 0;
  hl7_msg_close_iconv(m);
  m->to_utf8 = iconv_open("UTF-8", name);
  m->from_utf8 = iconv_open(name, "UTF-8");
  if (m->to_utf8 == (iconv_t)-1 || m->from_utf8 == (iconv_t)-1) {
    hl7_msg_close_iconv(m);
    return RR_ECHARSET;
  }
  snprintf(m->iconv_for, sizeof m->iconv_for, "%s", name);
  return 0;
}

static int run_iconv(iconv_t cd, const char *in, size_t len, rr_buf_t *out) {
  iconv(cd, NULL, NULL, NULL, NULL);
  char *ip = (char *)(uintptr_t)in;
  size_t il = len;
  while (il > 0) {
    int rc = rr_buf_reserve(out, il * 4 + 16);
    if (rc)
      return rc;
    char *op = out->data + out->len;
    size_t ol = out->cap - out->len - 1;
    size_t r = iconv(cd, &ip, &il, &op, &ol);
    out->len = (size_t)(op - out->data);
    out->data[out->len] = '\0';
    if (r == (size_t)-1 && errno != E2BIG)
      return RR_ECHARSET;
  }
  /* flush shift state (ISO-2022) */
  int rc = rr_buf_reserve(out, 16);
  if (rc)
    return rc;
  char *op = out->data + out->len;
  size_t ol = out->cap - out->len - 1;
  iconv(cd, NULL, NULL, &op, &ol);
  out->len = (size_t)(op - out->data);
  out->data[out->len] = '\0';
  return 0;
}

static bool valid_utf8(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t k;
    unsigned cp;
    if ((c & 0xe0) == 0xc0)
      k = 1, cp = c & 0x1f;
    else if ((c & 0xf0) == 0xe0)
      k = 2, cp = c & 0x0f;
    else if ((c & 0xf8) == 0xf0)
      k = 3, cp = c & 0x07;
    else
      return false;
    if (i + k >= n)
      return false;
    for (size_t j = 1; j <= k; j++) {
      if ((s[i + j] & 0xc0) != 0x80)
        return false;
      cp = (cp << 6) | (s[i + j] & 0x3f);
    }
    if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += k + 1;
  }
  return true;
}

static int latin1_to_utf8(const unsigned char *s, size_t n, rr_buf_t *out) {
  int rc = rr_buf_reserve(out, n * 2);
  if (rc)
    return rc;
  char *w = out->data + out->len;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = s[i];
    if (c < 0x80) {
      *w++ = (char)c;
    } else {
      *w++ = (char)(0xc0 | (c >> 6));
      *w++ = (char)(0x80 | (c & 0x3f));
    }
  }
  out->len = (size_t)(w - out->data);
  out->data[out->len] = '\0';
  return 0;
}

/* The character set a run of bytes is in. */
typedef struct run_cs {
  hl7_cs_t cs;
  const char *iconv;  /* for CS_ICONV */
  const char *prefix; /* bytes to put before the run (ISO 2022 designation) */
} run_cs_t;

static int flush_run(rr_hl7_msg_t *m, const run_cs_t *rc_, const char *s, size_t n, rr_buf_t *out) {
  if (n == 0)
    return 0;
  switch (rc_->cs) {
  case CS_ASCII:
  case CS_UTF8: return rr_buf_append(out, s, n);
  case CS_DEFAULT:
    if (valid_utf8((const unsigned char *)s, n))
      return rr_buf_append(out, s, n);
    return latin1_to_utf8((const unsigned char *)s, n, out);
  case CS_LATIN1: return latin1_to_utf8((const unsigned char *)s, n, out);
  case CS_ICONV: break;
  }
  if (!rc_->iconv || !*rc_->iconv) /* undeclared name: pass through */
    return rr_buf_append(out, s, n);
  int rc = open_iconv(m, rc_->iconv);
  if (rc)
    return rc;
  if (!rc_->prefix)
    return run_iconv(m->to_utf8, s, n, out);
  rr_buf_t tmp;
  rr_buf_init(&tmp, n + 64);
  rc = rr_buf_puts(&tmp, rc_->prefix);
  if (rc == 0)
    rc = rr_buf_append(&tmp, s, n);
  if (rc == 0)
    rc = run_iconv(m->to_utf8, tmp.data, tmp.len, out);
  rr_buf_close(&tmp);
  return rc;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1;
}

/* Character set designated by the hex digits of a \C..\ or \M..\ escape. */
static bool designation(const char *hex, size_t n, bool multi, run_cs_t *out) {
  static const struct {
    const char *seq;
    bool multi;
    hl7_cs_t cs;
    const char *iconv;
    const char *prefix;
  } tab[] = {
      {"2842", false, CS_ASCII, NULL, NULL},
      {"284A", false, CS_ASCII, NULL, NULL},
      {"2949", false, CS_ICONV, "JIS_X0201", NULL},
      {"2D41", false, CS_LATIN1, NULL, NULL},
      {"2D42", false, CS_ICONV, "ISO-8859-2", NULL},
      {"2D43", false, CS_ICONV, "ISO-8859-3", NULL},
      {"2D44", false, CS_ICONV, "ISO-8859-4", NULL},
      {"2D4C", false, CS_ICONV, "ISO-8859-5", NULL},
      {"2D47", false, CS_ICONV, "ISO-8859-6", NULL},
      {"2D46", false, CS_ICONV, "ISO-8859-7", NULL},
      {"2D48", false, CS_ICONV, "ISO-8859-8", NULL},
      {"2D4D", false, CS_ICONV, "ISO-8859-9", NULL},
      {"2D62", false, CS_ICONV, "ISO-8859-15", NULL},
      {"2442", true, CS_ICONV, "ISO-2022-JP-2", "\x1b$B"},
      {"242844", true, CS_ICONV, "ISO-2022-JP-2", "\x1b$(D"},
      {"242941", true, CS_ICONV, "EUC-CN", NULL},
      {"242943", true, CS_ICONV, "EUC-KR", NULL},
  };
  for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++) {
    if (tab[i].multi == multi && strlen(tab[i].seq) == n && strncasecmp(tab[i].seq, hex, n) == 0) {
      *out = (run_cs_t){tab[i].cs, tab[i].iconv, tab[i].prefix};
      return true;
    }
  }
  return false;
}

int rr_hl7_to_utf8(const rr_hl7_msg_t *cm, const char *raw, size_t len, rr_buf_t *out) {
  rr_hl7_msg_t *m = (rr_hl7_msg_t *)(uintptr_t)cm;
  run_cs_t base = {m->cs, m->cs_iconv, NULL};
  return flush_run(m, &base, raw, len, out);
}

int rr_hl7_decode(const rr_hl7_msg_t *cm, const char *raw, size_t len, rr_buf_t *out) {
  rr_hl7_msg_t *m = (rr_hl7_msg_t *)(uintptr_t)cm; /* iconv handle cache */
  const char esc = m->d.escape;
  run_cs_t base = {m->cs, m->cs_iconv, NULL};
  if (!memchr(raw, esc, len))
    return flush_run(m, &base, raw, len, out);

  run_cs_t cur = base;
  rr_buf_t run;
  rr_buf_init(&run, len + 16);
  int rc = 0;
  const char *p = raw, *end = raw + len;
  while (p < end && rc == 0) {
    const char *e = memchr(p, esc, (size_t)(end - p));
    if (!e) {
      rc = rr_buf_append(&run, p, (size_t)(end - p));
      break;
    }
    if ((rc = rr_buf_append(&run, p, (size_t)(e - p))))
      break;
    const char *t = memchr(e + 1, esc, (size_t)(end - e - 1));
    if (!t) { /* unterminated: keep literally */
      rc = rr_buf_append(&run, e, (size_t)(end - e));
      break;
    }
    const char *body = e + 1;
    size_t blen = (size_t)(t - body);
    p = t + 1;
    char c = blen ? body[0] : 0;
    if (blen == 1 && c == 'F')
      rc = rr_buf_putc(&run, m->d.field);
    else if (blen == 1 && c == 'S')
      rc = rr_buf_putc(&run, m->d.component);
    else if (blen == 1 && c == 'T')
      rc = rr_buf_putc(&run, m->d.subcomponent);
    else if (blen == 1 && c == 'R')
      rc = rr_buf_putc(&run, m->d.repetition);
    else if (blen == 1 && c == 'E')
      rc = rr_buf_putc(&run, m->d.escape);
    else if (blen == 1 && c == 'P' && m->d.truncation)
      rc = rr_buf_putc(&run, m->d.truncation);
    else if (blen == 1 && (c == 'H' || c == 'N'))
      ; /* highlighting on/off: no meaning in plain text */
    else if (c == 'X' && blen > 1 && (blen - 1) % 2 == 0) {
      bool hex = true;
      for (size_t i = 1; i < blen; i++)
        hex &= hexval(body[i]) >= 0;
      for (size_t i = 1; hex && i < blen && rc == 0; i += 2)
        rc = rr_buf_putc(&run, (char)(hexval(body[i]) * 16 + hexval(body[i + 1])));
      if (!hex) /* not hex after all: literal */
        rc = rr_buf_append(&run, e, blen + 2);
    } else if ((c == 'C' || c == 'M') && blen > 1) {
      run_cs_t next;
      if (designation(body + 1, blen - 1, c == 'M', &next)) {
        rc = flush_run(m, &cur, run.data, run.len, out);
        rr_buf_reset(&run);
        cur = next;
      } else {
        rc = rr_buf_append(&run, e, blen + 2);
      }
    } else if (blen >= 3 && c == '.' && body[1] == 'b' && body[2] == 'r' && blen == 3) {
      rc = rr_buf_putc(&run, '\n');
    } else if (blen >= 3 && c == '.' && body[1] == 's' && body[2] == 'p') {
      unsigned long k = 1;
      if (blen > 3) {
        k = 0;
        for (size_t i = 3; i < blen && body[i] >= '0' && body[i] <= '9' && k < 100; i++)
          k = k * 10 + (unsigned long)(body[i] - '0');
      }
      for (unsigned long i = 0; i < k && rc == 0; i++)
        rc = rr_buf_putc(&run, '\n');
    } else if (c == '.' && blen >= 3) {
      ; /* other formatting commands (.fi .nf .in .ti .sk .ce): layout only */
    } else {
      rc = rr_buf_append(&run, e, blen + 2); /* \Zxx\ and unknown: literal */
    }
  }
  if (rc == 0)
    rc = flush_run(m, &cur, run.data ? run.data : "", run.len, out);
  rr_buf_close(&run);
  return rc;
}

int rr_hl7_encode(const rr_hl7_msg_t *cm, const char *utf8, size_t len, rr_buf_t *out) {
  rr_hl7_msg_t *m = (rr_hl7_msg_t *)(uintptr_t)cm;
  const char *src = utf8;
  size_t n = len;
  rr_buf_t conv;
  rr_buf_init(&conv, (size_t)-1 / 4);
  int rc = 0;
  if (m->cs == CS_LATIN1) {
    /* UTF-8 to ISO 8859-1; code points above U+00FF cannot be written. */
    if ((rc = rr_buf_reserve(&conv, len)))
      goto out;
    const unsigned char *s = (const unsigned char *)utf8;
    for (size_t i = 0; i < len;) {
      if (s[i] < 0x80) {
        conv.data[conv.len++] = (char)s[i++];
      } else if ((s[i] & 0xfe) == 0xc2 && i + 1 < len && (s[i + 1] & 0xc0) == 0x80) {
        conv.data[conv.len++] = (char)(((s[i] & 0x03) << 6) | (s[i + 1] & 0x3f));
        i += 2;
      } else {
        rc = RR_ECHARSET;
        goto out;
      }
    }
    src = conv.data ? conv.data : "";
    n = conv.len;
  } else if (m->cs == CS_ICONV && m->cs_iconv[0]) {
    if ((rc = open_iconv(m, m->cs_iconv)) || (rc = run_iconv(m->from_utf8, utf8, len, &conv)))
      goto out;
    src = conv.data ? conv.data : "";
    n = conv.len;
  }
  if ((rc = rr_buf_reserve(out, n)))
    goto out;
  const rr_hl7_delims_t *d = &m->d;
  for (size_t i = 0; i < n && rc == 0; i++) {
    char c = src[i];
    const char *rep = NULL;
    if (c == d->field)
      rep = "F";
    else if (c == d->component)
      rep = "S";
    else if (c == d->subcomponent)
      rep = "T";
    else if (c == d->repetition)
      rep = "R";
    else if (c == d->escape)
      rep = "E";
    else if (d->truncation && c == d->truncation)
      rep = "P";
    else if (c == '\n')
      rep = ".br";
    else if (c == '\r') {
      if (i + 1 < n && src[i + 1] == '\n') {
        i++;
        rep = ".br";
      } else {
        rep = "X0D";
      }
    }
    if (!rep) {
      rc = rr_buf_putc(out, c);
      continue;
    }
    rc = rr_buf_putc(out, d->escape);
    if (rc == 0)
      rc = rr_buf_puts(out, rep);
    if (rc == 0)
      rc = rr_buf_putc(out, d->escape);
  }
out:
  rr_buf_close(&conv);
  return rc;
}

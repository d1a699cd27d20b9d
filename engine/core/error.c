#include "core/error.h"

#include <string.h>

const char *rr_strerror(int code) {
  switch (code) {
  case RR_OK: return "success";
  case RR_EPARSE: return "malformed input";
  case RR_ELIMIT: return "limit exceeded";
  case RR_ENOTFOUND: return "not found";
  case RR_ECHARSET: return "unsupported character set";
  case RR_EPATH: return "malformed path";
  case RR_EAGAIN: return "more input needed";
  case RR_ETLS: return "TLS failure";
  case RR_ETLSCLOSED: return "TLS session closed by the peer";
  default: break;
  }
  if (code < 0 && code > -4096) {
    /* strerror is not guaranteed thread-safe; the glibc table lookup is. */
    return strerror(-code);
  }
  return "unknown error";
}

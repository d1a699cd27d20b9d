/* radrelay error codes.
 *
 * Every fallible function returns int: 0 on success or a negative code.
 * System and libuv codes pass through unchanged (they are negative errno
 * values on Unix); radrelay's own codes live below RR_EBASE so they never
 * collide with them.
 */
#ifndef RR_CORE_ERROR_H
#define RR_CORE_ERROR_H

#include <errno.h>

#define RR_OK 0
#define RR_ENOMEM (-ENOMEM)
#define RR_EINVAL (-EINVAL)
#define RR_ERANGE (-ERANGE)
#define RR_EIO (-EIO)

#define RR_EBASE (-30000)
#define RR_EPARSE (RR_EBASE - 1)      /* malformed input; details in the error struct */
#define RR_ELIMIT (RR_EBASE - 2)      /* a configured limit was exceeded */
#define RR_ENOTFOUND (RR_EBASE - 3)   /* the addressed item does not exist */
#define RR_ECHARSET (RR_EBASE - 4)    /* unknown or unconvertible character set */
#define RR_EPATH (RR_EBASE - 5)       /* malformed HL7 path expression */
#define RR_EAGAIN (RR_EBASE - 6)      /* need more input */
#define RR_ETLS (RR_EBASE - 40)       /* TLS handshake refused or record error */
#define RR_ETLSCLOSED (RR_EBASE - 41) /* the TLS peer ended the session (close_notify) */

/* rr_strerror: static, human-readable text for any code above (and for
 * system codes via strerror). Never NULL. Thread-safe. */
const char *rr_strerror(int code);

#endif

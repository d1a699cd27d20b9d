/* A JSON Schema (draft 2020-12) validator for the subset radrelay's own
 * schemas use, on jansson values.
 *
 * Supported keywords: type, properties, required, additionalProperties,
 * items, enum, const, pattern (POSIX extended regular expressions),
 * minimum, maximum, minLength, maxLength, minItems, maxItems, oneOf, anyOf,
 * allOf, $ref to "#/$defs/NAME"; annotations ($schema, $id, title,
 * description, default, examples, $comment) are ignored. A schema using any
 * other keyword is refused when compiled, so a schema never silently means
 * less than it says.
 *
 * Pure: no I/O. Thread-safe for distinct objects; a compiled schema may be
 * shared read-only between threads. */
#ifndef RR_CORE_JSON_SCHEMA_H
#define RR_CORE_JSON_SCHEMA_H

#include <jansson.h>

#include "core/buf.h"

typedef struct rr_json_schema rr_json_schema_t;

/* rr_json_schema_new: compiles schema (borrowed: it is copied by reference
 * count). On a bad schema returns RR_EINVAL and appends why to err. */
int rr_json_schema_new(json_t *schema, rr_json_schema_t **out, rr_buf_t *err);
void rr_json_schema_free(rr_json_schema_t *s);

/* rr_json_schema_validate: checks doc; appends one line per problem to err
 * as "<prefix>: $.json.path: what is wrong\n" and returns the number of
 * problems (0 = valid), or RR_ENOMEM. prefix may be NULL. */
int rr_json_schema_validate(const rr_json_schema_t *s, const json_t *doc, const char *prefix,
                            rr_buf_t *err);

#endif

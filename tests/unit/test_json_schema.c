/* Unit tests of the JSON Schema subset validator (engine/core/json_schema.c). */
#include <string.h>

#include "core/error.h"
#include "core/json_schema.h"
#include "rr_test.h"

static int check(const char *schema, const char *doc, rr_buf_t *err) {
  json_error_t je;
  json_t *s = json_loads(schema, 0, &je), *d = json_loads(doc, JSON_DECODE_ANY, &je);
  rr_json_schema_t *c = NULL;
  rr_buf_reset(err);
  int n = rr_json_schema_new(s, &c, err) ? -1 : rr_json_schema_validate(c, d, "f.json", err);
  rr_json_schema_free(c);
  json_decref(s);
  json_decref(d);
  return n;
}

static void test_keywords(void) {
  rr_buf_t e;
  rr_buf_init(&e, 1 << 16);
  const char *obj = "{\"type\":\"object\",\"additionalProperties\":false,\"required\":[\"a\"],"
                    "\"properties\":{\"a\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":9},"
                    "\"b\":{\"type\":\"string\",\"pattern\":\"^x+$\",\"maxLength\":3},"
                    "\"c\":{\"type\":\"array\",\"items\":{\"enum\":[\"p\",\"q\"]},\"minItems\":1},"
                    "\"d\":{\"$ref\":\"#/$defs/n\"}},\"$defs\":{\"n\":{\"const\":7}}}";
  CHECK_EQ_INT(check(obj, "{\"a\":3,\"b\":\"xx\",\"c\":[\"p\"],\"d\":7}", &e), 0);
  CHECK_EQ_INT(check(obj, "{\"b\":\"xy\"}", &e), 2);
  CHECK(strstr(e.data, "f.json: $.a: required") != NULL);
  CHECK(strstr(e.data, "f.json: $.b: \"xy\" does not match ^x+$") != NULL);
  CHECK_EQ_INT(check(obj, "{\"a\":10,\"z\":1,\"c\":[],\"d\":8}", &e), 4);
  CHECK(strstr(e.data, "$.a: must be at most 9") != NULL);
  CHECK(strstr(e.data, "$.z: unknown key") != NULL);
  CHECK(strstr(e.data, "$.c: must have at least 1 items") != NULL);
  CHECK(strstr(e.data, "$.d: must be 7") != NULL);
  CHECK_EQ_INT(check(obj, "{\"a\":\"3\",\"c\":[\"r\"]}", &e), 2);
  CHECK(strstr(e.data, "$.a: must be an integer, not string") != NULL);
  CHECK(strstr(e.data, "$.c[0]: must be one of [\"p\",\"q\"]") != NULL);
  const char *one =
      "{\"oneOf\":[{\"type\":\"integer\"},{\"type\":\"string\",\"pattern\":\"^[0-9]+$\"}]}";
  CHECK_EQ_INT(check(one, "5", &e), 0);
  CHECK_EQ_INT(check(one, "\"5\"", &e), 0);
  CHECK_EQ_INT(check(one, "\"x\"", &e), 1);
  CHECK(strstr(e.data, "matches none of the allowed forms") != NULL);
  /* unsupported keywords and bad references refuse the schema itself */
  CHECK_EQ_INT(check("{\"type\":\"string\",\"format\":\"email\"}", "\"a\"", &e), -1);
  CHECK(strstr(e.data, "\"format\" is not supported") != NULL);
  CHECK_EQ_INT(check("{\"$ref\":\"#/$defs/missing\"}", "1", &e), -1);
  CHECK_EQ_INT(check("{\"pattern\":\"(\"}", "\"a\"", &e), -1);
  rr_buf_close(&e);
}

int main(void) {
  RUN(test_keywords);
  return TEST_SUMMARY();
}

/* Minimal test harness: TEST(name) functions registered in main with RUN().
 * A failed CHECK records the failure and continues; the program exits 1 if
 * anything failed and prints "N passed, M failed". */
#ifndef RR_TEST_H
#define RR_TEST_H

#include <stdio.h>
#include <string.h>

static int rr_test_failures;
static int rr_test_checks;
static int rr_tests_passed, rr_tests_failed;

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    rr_test_checks++;                                                                              \
    if (!(cond)) {                                                                                 \
      rr_test_failures++;                                                                          \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);                     \
    }                                                                                              \
  } while (0)

#define CHECK_EQ_INT(a, b)                                                                         \
  do {                                                                                             \
    long long va_ = (long long)(a), vb_ = (long long)(b);                                          \
    rr_test_checks++;                                                                              \
    if (va_ != vb_) {                                                                              \
      rr_test_failures++;                                                                          \
      fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__, #a, #b, va_,   \
              vb_);                                                                                \
    }                                                                                              \
  } while (0)

/* Compares a (pointer, length) with a C string. */
#define CHECK_MEM_STR(p, n, s)                                                                     \
  do {                                                                                             \
    const char *pa_ = (p), *sb_ = (s);                                                             \
    size_t na_ = (n);                                                                              \
    rr_test_checks++;                                                                              \
    if (na_ != strlen(sb_) || memcmp(pa_, sb_, na_) != 0) {                                        \
      rr_test_failures++;                                                                          \
      fprintf(stderr, "%s:%d: got '%.*s', want '%s'\n", __FILE__, __LINE__, (int)na_, pa_, sb_);   \
    }                                                                                              \
  } while (0)

#define RUN(fn)                                                                                    \
  do {                                                                                             \
    int before_ = rr_test_failures;                                                                \
    fn();                                                                                          \
    if (rr_test_failures == before_) {                                                             \
      rr_tests_passed++;                                                                           \
      printf("ok   %s\n", #fn);                                                                    \
    } else {                                                                                       \
      rr_tests_failed++;                                                                           \
      printf("FAIL %s\n", #fn);                                                                    \
    }                                                                                              \
  } while (0)

#define TEST_SUMMARY()                                                                             \
  (printf("%d checks\n%d passed, %d failed\n", rr_test_checks, rr_tests_passed, rr_tests_failed),  \
   rr_tests_failed ? 1 : 0)

#endif

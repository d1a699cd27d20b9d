/* Latency histograms with fixed buckets (seconds), for /metrics:
 * cumulative counts in the Prometheus sense are computed when exported. */
#ifndef RR_CORE_HISTOGRAM_H
#define RR_CORE_HISTOGRAM_H

#include <stddef.h>
#include <stdint.h>

#define RR_HISTO_BUCKETS 13

/* Upper bounds in seconds; the last bucket is +Inf. */
static const double rr_histo_bounds[RR_HISTO_BUCKETS - 1] = {
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5};

typedef struct rr_histo {
  uint64_t bucket[RR_HISTO_BUCKETS]; /* observations in (bound[i-1], bound[i]] */
  uint64_t count;
  double sum; /* seconds */
} rr_histo_t;

static inline void rr_histo_observe(rr_histo_t *h, double seconds) {
  size_t i = 0;
  while (i < RR_HISTO_BUCKETS - 1 && seconds > rr_histo_bounds[i])
    i++;
  h->bucket[i]++;
  h->count++;
  h->sum += seconds;
}

#endif

/* Growable arrays: one helper instead of a realloc-doubling block in every
 * module.
 *
 *   if (rr_array_grow((void **)&v, &cap, n + 1, sizeof *v, 16)) return RR_ENOMEM;
 *
 * Makes room for at least `need` elements (doubling, starting at `first`).
 * On failure the array is unchanged. Pure; any thread. */
#ifndef RR_CORE_ARRAY_H
#define RR_CORE_ARRAY_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "core/error.h"

static inline int rr_array_grow(void **items, size_t *cap, size_t need, size_t elem, size_t first) {
  if (need <= *cap)
    return 0;
  size_t nc = *cap ? *cap : first;
  while (nc < need) {
    if (nc > SIZE_MAX / 2 / elem)
      return RR_ENOMEM;
    nc *= 2;
  }
  if (nc > SIZE_MAX / elem)
    return RR_ENOMEM;
  void *t = realloc(*items, nc * elem);
  if (!t)
    return RR_ENOMEM;
  *items = t;
  *cap = nc;
  return 0;
}

#endif

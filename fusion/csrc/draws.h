/* The counter-based generator of fusion.api.random, bit for bit: element i of a stream seeded
 * with `seed` draws SplitMix64's output function of seed + (i + 1)·γ (γ = 2⁶⁴/φ, arithmetic
 * modulo 2⁶⁴) and keeps its top 24 bits, u = draw·2⁻²⁴ ∈ [0, 1). A draw depends on (seed, i)
 * alone, so any thread can draw any block and the masks do not depend on how work is split. */
#ifndef FUSION_DRAWS_H
#define FUSION_DRAWS_H

#include "common.h"

#define DRAW_GOLDEN 0x9E3779B97F4A7C15ull

INLINE uint32_t draw24(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * DRAW_GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z >> 40);
}

/* keep[j] = draw24(seed, first + j) < threshold: "u < p" for p = threshold·2⁻²⁴, i.e.
 * threshold = ceil(p·2²⁴) (fusion/api/kernels.py computes it exactly) */
INLINE void draw_below(uint64_t seed, uint64_t first, uint32_t threshold, int m, unsigned char *keep) {
    int j;
    for (j = 0; j < m; j++) keep[j] = draw24(seed, first + (uint64_t)j) < threshold;
}

#endif

/* Exact L1 norms for the rescale of sparsified task vectors, independent of summation order.
 *
 * |x| of a finite float32 is s·2^(e−150) with s its 24-bit significand (the hidden bit set unless
 * subnormal) and e its biased exponent (1 for subnormals). The significands are added as integers
 * per exponent, which no order of addition can change; the 254 totals are then added in float64
 * from the smallest exponent up, as fusion.api.sparsify.abs_sum does. Each entry is counted in
 * the kept or the dropped half of a table, so one table gives both Σ|δ| and Σ|m⊙δ|; inf and NaN
 * land in exponent 255, which is never read. 2⁴⁰ entries per exponent fit in an int64.
 */
#ifndef FUSION_L1_H
#define FUSION_L1_H

#include "common.h"

#define L1_SIZE 512 /* [kept][exponent] */

/* Two interleaved tables (t and t + L1_SIZE), so that equal exponents in a row do not wait on
 * each other's stores. */
INLINE void l1_add(int64_t *t, const float *x, const unsigned char *keep, int m) {
    int j;
    for (j = 0; j < m; j++) {
        uint32_t u = f32_bits(x[j]) & 0x7fffffffu, e = u >> 23;
        int64_t s = (int64_t)((u & 0x7fffffu) | ((uint32_t)(e != 0) << 23));
        t[(size_t)(j & 1) * L1_SIZE + ((uint32_t)(keep[j] != 0) << 8) + e] += s;
    }
}

/* Σ|x| of the kept entries (kept = 1), or of all of them (kept = 0), from the two tables */
INLINE double l1_total(const int64_t *t, int kept_only) {
    double total = 0.0;
    int e;
    for (e = 0; e < 255; e++) {
        int64_t s = t[256 + e] + t[L1_SIZE + 256 + e];
        if (!kept_only) s += t[e] + t[L1_SIZE + e];
        if (s) total += ldexp((double)s, (e ? e : 1) - 150);
    }
    return total;
}

#endif

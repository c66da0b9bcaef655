/* Exact L1 norms for the rescale of sparsified task vectors, independent of summation order.
 *
 * |x| of a finite float32 is s·2^(e−1)·2⁻¹⁴⁹ with s its 24-bit significand (the hidden bit set
 * unless subnormal) and e = max(biased exponent, 1), so Σ|x| is an integer number of 2⁻¹⁴⁹: it is
 * accumulated exactly in a 384-bit integer and rounded once to float64 at the end (round to
 * nearest even), as fusion.api.sparsify.abs_sum does; no order of addition can change it.
 *
 * A block of entries is added fast: those within 31 binary orders of the block's largest are
 * shifted into one 64-bit fixed-point sum (s < 2²⁴, shifted by ≤ 31, 512 of them: < 2⁶⁴), the rest
 * (entries below 2⁻³¹ of the largest, rare in task vectors) one by one. inf and NaN are left out.
 */
#ifndef FUSION_L1_H
#define FUSION_L1_H

#include "common.h"

#define WIDE_LIMBS 6

typedef struct {
    uint64_t w[WIDE_LIMBS]; /* little-endian limbs, in units of 2⁻¹⁴⁹ */
} wide;

/* a += v·2^shift */
INLINE void wide_add(wide *a, uint64_t v, int shift) {
    int limb = shift >> 6, off = shift & 63, k;
    uint64_t lo = v << off, hi = off ? v >> (64 - off) : 0, c;
    a->w[limb] += lo;
    c = a->w[limb] < lo;
    for (k = limb + 1; k < WIDE_LIMBS && (hi || c); k++) {
        uint64_t add = hi + c;
        c = add < hi; /* hi + 1 overflowed */
        a->w[k] += add;
        c |= a->w[k] < add;
        hi = 0;
    }
}

INLINE void wide_merge(wide *a, const wide *b) {
    int k;
    for (k = 0; k < WIDE_LIMBS; k++) wide_add(a, b->w[k], 64 * k);
}

/* The value of a in float64, rounded once to nearest even */
INLINE double wide_value(const wide *a) {
    int top = WIDE_LIMBS - 1, bit;
    uint64_t mant, rest;
    int sticky = 0, k;
    while (top >= 0 && !a->w[top]) top--;
    if (top < 0) return 0.0;
    bit = 63 - __builtin_clzll(a->w[top]) + 64 * top; /* the highest set bit */
    if (bit < 53) return ldexp((double)a->w[0], -149); /* exact */
    /* the 54 bits from `bit` down (53 + a rounding bit), and whether anything below is set */
    {
        int lowbit = bit - 53, limb = lowbit >> 6, off = lowbit & 63;
        unsigned __int128 window = (unsigned __int128)a->w[limb] >> off;
        if (limb + 1 < WIDE_LIMBS) window |= (unsigned __int128)a->w[limb + 1] << (64 - off);
        mant = (uint64_t)window & ((1ull << 54) - 1);
        rest = off ? a->w[limb] & ((1ull << off) - 1) : 0;
        sticky = rest != 0;
        for (k = 0; k < limb && !sticky; k++) sticky = a->w[k] != 0;
        /* round the 54 bits to 53: half to even, the sticky bits breaking ties upwards */
        if ((mant & 1) && (sticky || (mant & 2))) mant += 2;
        mant >>= 1;
        return ldexp((double)mant, lowbit + 1 - 149);
    }
}

/* all += Σ|x|, kept += Σ|x| over the entries keep[] marks, for a block of m ≤ BLOCK entries */
INLINE void l1_block(wide *all, wide *kept, const float *x, const unsigned char *keep, int m) {
    uint32_t e[BLOCK], s[BLOCK], top = 0, w, slow = 0;
    uint64_t sum_all = 0, sum_kept = 0;
    int j;
    for (j = 0; j < m; j++) { /* branch-free, so that it vectorizes; inf and NaN get s = e = 0 */
        uint32_t u = f32_bits(x[j]) & 0x7fffffffu, ex = u >> 23, normal = ex != 0, finite = ex < 255;
        e[j] = finite ? ex | !normal : 0u;
        s[j] = finite ? (u & 0x7fffffu) | (normal << 23) : 0u;
    }
    for (j = 0; j < m; j++) top = e[j] > top ? e[j] : top;
    w = top > 32 ? top - 31 : 1; /* the window's lowest exponent */
    for (j = 0; j < m; j++) {
        uint32_t in = e[j] >= w;
        uint64_t v = in ? (uint64_t)s[j] << (e[j] - w) : 0;
        sum_all += v;
        sum_kept += keep[j] ? v : 0;
        slow += !in & (s[j] != 0);
    }
    wide_add(all, sum_all, (int)w - 1);
    wide_add(kept, sum_kept, (int)w - 1);
    for (j = 0; slow && j < m; j++)
        if (e[j] < w && s[j]) {
            wide_add(all, s[j], (int)e[j] - 1);
            if (keep[j]) wide_add(kept, s[j], (int)e[j] - 1);
            slow--;
        }
}

#endif

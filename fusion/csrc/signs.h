/* Sign election and agreement over a block (TIES' "elect" and "disjoint merge", SCE's "erase").
 *
 * The elected sign is s = +1 where the elected sum is ≥ 0, else −1; an entry x agrees when
 * sign(x) = s, so a zero (or NaN) entry never agrees, as torch.sign(x) == s has it. Inline for
 * the reason given in sums.h.
 */
#ifndef FUSION_SIGNS_H
#define FUSION_SIGNS_H

#include "common.h"

INLINE int agrees_with(float sum, float x) { return sum >= 0.0f ? x > 0.0f : x < 0.0f; }

/* The entries of one model that agree with the sign elected by sum[]: total += w·x (or x, when
 * the weight is already in it: weigh = 0) and divisor += w where x agrees. */
INLINE void add_agreeing(float *total, float *divisor, const float *x, float w, int weigh,
                         const float *sum, int m) {
    int j;
    if (weigh)
        for (j = 0; j < m; j++) {
            int a = agrees_with(sum[j], x[j]);
            total[j] = total[j] + (a ? w * x[j] : 0.0f);
            divisor[j] = divisor[j] + (a ? w : 0.0f);
        }
    else
        for (j = 0; j < m; j++) {
            int a = agrees_with(sum[j], x[j]);
            total[j] = total[j] + (a ? x[j] : 0.0f);
            divisor[j] = divisor[j] + (a ? w : 0.0f);
        }
}

/* Without an election every entry counts: the same sums, every entry agreeing. */
INLINE void add_every(float *total, float *divisor, const float *x, float w, int m) {
    int j;
    for (j = 0; j < m; j++) {
        total[j] = total[j] + x[j];
        divisor[j] = divisor[j] + w;
    }
}

/* total / divisor, where a zero divisor (no model agrees, so total is 0 too) divides by 1: 0,
 * not 0/0. */
INLINE void divide_agreeing(float *total, const float *divisor, int m) {
    int j;
    for (j = 0; j < m; j++) total[j] = total[j] / (divisor[j] == 0.0f ? 1.0f : divisor[j]);
}

#endif

/* Task vectors and sums over a block.
 *
 * The block steps are inline: each composition's HOT pass vectorizes them for its own target,
 * and a call per block and model would cost more than some of the loops themselves.
 */
#ifndef FUSION_SUMS_H
#define FUSION_SUMS_H

#include "common.h"

/* b = θ₀ and d[i] = θᵢ₊₁ − θ₀ for the models (inputs 1..nin-1) of a block. */
INLINE void delta_block(const job_t *job, int64_t pos, int m, float *b, float (*d)[BLOCK]) {
    int i, j;
    load_block(b, job->in[0], job->dt[0], pos, m);
    for (i = 1; i < job->nin; i++) {
        load_block(d[i - 1], job->in[i], job->dt[i], pos, m);
        for (j = 0; j < m; j++) d[i - 1][j] = d[i - 1][j] - b[j];
    }
}

/* Σⱼ d[j]² over the entries that are on: keep[j] when keep is given, else those whose key's high
 * 16 bits are above `above`. In float64, where the square of a float32 is exact, with eight
 * partial sums so that the loop vectorizes (the sums' order is the one freedom the kernels
 * take against the reference). */
INLINE double sum_squares(const float *d, const unsigned char *keep, const uint32_t *key, uint32_t above, int m) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, e = 0.0;
    int j = 0, u;
    for (; j + 8 <= m; j += 8)
        for (u = 0; u < 8; u++) {
            int on = keep ? keep[j + u] : (key[j + u] >> 16) > above;
            double x = on ? (double)d[j + u] : 0.0;
            acc[u] += x * x;
        }
    for (; j < m; j++) {
        int on = keep ? keep[j] : (key[j] >> 16) > above;
        double x = on ? (double)d[j] : 0.0;
        e += x * x;
    }
    for (u = 0; u < 8; u++) e += acc[u];
    return e;
}

#endif

/* The outlier-change merge (compose.h): keep the changes θ₁ − θ₀ whose importance
 * I = |θ₁ − θ₀|·KL(row) reaches Q₂ + 1.5·(Q₃ − Q₁) of the tensor's importances.
 *
 * KL(row) = Σ p·log(p/q), p = softmax(θ₁'s row) + 1e-8, q = softmax(θ₀'s row) + 1e-8, in float64
 * and rounded to float32 (one row per thread at a time); I is a float32 product. The quartiles are
 * the importances of rank ⌊(n−1)/4⌋, ⌊(n−1)/2⌋, ⌊3(n−1)/4⌋ (ascending), found exactly by counting
 * the order keys' high 16 bits, then the low 16 bits inside the buckets that hold them, with the
 * importances recomputed from the inputs in each pass: nothing proportional to the tensor is
 * allocated but the row divergences.
 */
#include "compose.h"

/* ------------------------------------------------------------------------------------------ */
/* exp and log1p in float64, branch-free so that the row loops vectorize (libm's are calls, one
 * element at a time). Both are accurate to a few units in the last place of a double, far below
 * the float32 rounding of the divergence; the torch reference's exp and log1p are accurate to
 * about one, so the two paths round a divergence to the same float32 but in rare cases. */

INLINE double bits_f64(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
INLINE uint64_t f64_bits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* e^x for x ≤ 0 (a softmax numerator): 0 below −700, where e^x ≪ 1e-300 cannot change a sum
 * that holds e^0 = 1, nor p = e^x/S + 1e-8; NaN stays NaN. x = k·ln 2 + r, |r| ≤ ln2/2, e^r by its
 * Taylor series to r¹³ (the rest is below 5e-18). */
INLINE double exp_nonpositive(double x) {
    const double shifter = 0x1.8p52, log2e = 0x1.71547652b82fep0;
    const double ln2_hi = 0x1.62e42fee00000p-1, ln2_lo = 0x1.a39ef35793c76p-33;
    double y = x < -700.0 ? -700.0 : x, t = y * log2e + shifter, k = t - shifter;
    double r = (y - k * ln2_hi) - k * ln2_lo, p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    /* 2^k from k's bits in t's mantissa (k ∈ [−1010, 0]: a normal double) */
    p = p * bits_f64((f64_bits(t) - f64_bits(shifter) + 1023) << 52);
    return x < -700.0 ? 0.0 : p;
}

/* log(1 + z) for z > −1 with 1 + z a normal double (a NaN z gives NaN): log w for w = 1 + z,
 * corrected by the rounding of that sum, log w = e·ln 2 + log m with m ∈ [√½, √2) and
 * log m = 2·atanh(s), s = (m − 1)/(m + 1), by its series to s²³. */
INLINE double log1p_above_minus_one(double z) {
    const double ln2_hi = 0x1.62e42fee00000p-1, ln2_lo = 0x1.a39ef35793c76p-33, sqrt2 = 0x1.6a09e667f3bcdp0;
    double w = 1.0 + z, correction = ((w - 1.0) - z) / w;
    uint64_t u = f64_bits(w);
    double m = bits_f64((u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);
    /* the exponent as a double: its biased bits placed in the mantissa of 2^52 */
    double e = bits_f64(0x4330000000000000ULL | (u >> 52)) - (0x1p52 + 1023.0);
    int big = m > sqrt2;
    m = big ? m * 0.5 : m;
    e = big ? e + 1.0 : e;
    {
        double f = m - 1.0, s = f / (2.0 + f), s2 = s * s, q = 1.0 / 23.0;
        q = q * s2 + 1.0 / 21.0;
        q = q * s2 + 1.0 / 19.0;
        q = q * s2 + 1.0 / 17.0;
        q = q * s2 + 1.0 / 15.0;
        q = q * s2 + 1.0 / 13.0;
        q = q * s2 + 1.0 / 11.0;
        q = q * s2 + 1.0 / 9.0;
        q = q * s2 + 1.0 / 7.0;
        q = q * s2 + 1.0 / 5.0;
        q = q * s2 + 1.0 / 3.0;
        /* log m = f − s·(f − 2·s·s2·q/... ) written as 2s + 2s·s2·q, with 2s = f − s·f */
        return (e * ln2_lo + (2.0 * s * s2 * q + (f - s * f))) + e * ln2_hi - correction;
    }
}

/* ------------------------------------------------------------------------------------------ */

/* The value whose order key (common.h) is k */
static float key_value(uint32_t k) { return (k & 0x80000000u) ? bits_f32(k & 0x7fffffffu) : bits_f32(~k); }

/* Σ x over n doubles: element j into lane j mod 8, the lanes added in order */
INLINE double lane_sum(const double *x, int64_t n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, e = 0.0;
    int64_t j = 0;
    int u;
    for (; j + 8 <= n; j += 8)
        for (u = 0; u < 8; u++) acc[u] += x[j + u];
    for (; j < n; j++) acc[j & 7] += x[j];
    for (u = 0; u < 8; u++) e += acc[u];
    return e;
}

/* fusion.plugins.arcee_fusion.KL_FLOOR */
#define KL_FLOOR 1e-12

HOT static void pass_divergence(void *p, int tid) {
    outlier_job *s = (outlier_job *)p;
    const job_t *job = &s->rows_job;
    int64_t cols = s->cols, r, j, next = job->lo[tid] + RELEASE_EVERY;
    double *e0 = s->scratch[tid], *e1 = e0 + cols;
    float a[BLOCK], b[BLOCK];
    for (r = s->row_lo[tid]; r < s->row_lo[tid + 1]; r++) {
        double m0 = -INFINITY, m1 = -INFINITY, s0, s1, kl;
        int64_t at = r * cols, c;
        int nan = 0;
        for (c = 0; c < cols; c += BLOCK) {
            int m = (int)(cols - c < BLOCK ? cols - c : BLOCK), k;
            load_block(a, job->in[0], job->dt[0], at + c, m);
            load_block(b, job->in[1], job->dt[1], at + c, m);
            for (k = 0; k < m; k++) {
                e0[c + k] = a[k];
                e1[c + k] = b[k];
                m0 = a[k] > m0 ? a[k] : m0;
                m1 = b[k] > m1 ? b[k] : m1;
                nan |= (a[k] != a[k]) | (b[k] != b[k]);
            }
        }
        if (nan) { /* NaN wins the maximum, as in torch, and makes the row NaN */
            s->kl[r] = NAN;
            release_step(job, tid, at + cols, &next);
            continue;
        }
        for (j = 0; j < cols; j++) {
            e0[j] = exp_nonpositive(e0[j] - m0);
            e1[j] = exp_nonpositive(e1[j] - m1);
        }
        s0 = lane_sum(e0, cols);
        s1 = lane_sum(e1, cols);
        s0 = 1.0 / s0;
        s1 = 1.0 / s1;
        for (j = 0; j < cols; j++) {
            double pj = e1[j] * s1 + 1e-8, qj = e0[j] * s0 + 1e-8;
            /* log(p/q) as log1p((p − q)/q), precise where p ≈ q */
            e0[j] = pj * log1p_above_minus_one((pj - qj) / qj);
        }
        kl = lane_sum(e0, cols);
        /* below KL_FLOOR the sum is the rounding of softmaxes equal to ~1e-12: 0, as in the reference */
        s->kl[r] = fabs(kl) < KL_FLOOR ? 0.0f : (float)kl;
        release_step(job, tid, at + cols, &next);
    }
}

/* Importances of a block of positions, a row's stretch at a time (its divergence constant) */
INLINE void importance_block(const outlier_job *s, int64_t pos, int m, float *a, float *b, float *imp) {
    int64_t row = pos / s->cols, left = s->cols - (pos - row * s->cols);
    int j = 0;
    load_block(a, s->job.in[0], s->job.dt[0], pos, m);
    load_block(b, s->job.in[1], s->job.dt[1], pos, m);
    while (j < m) {
        int end = (int)(m - j < left ? m : j + left);
        float kl = s->kl[row++];
        for (; j < end; j++) imp[j] = fabsf(b[j] - a[j]) * kl;
        left = s->cols;
    }
}

/* The quartile search's counts: pass 0 the high 16 bits of every importance's order key, pass 1
 * the low 16 bits of those in the buckets that hold a quartile (at most three), each in its own
 * table: [thread][slot 0: high bits, 1..3: low bits][65536]. */
HOT static void pass_quartile_counts(void *p, int tid) {
    outlier_job *s = (outlier_job *)p;
    const job_t *job = &s->job;
    float a[BLOCK], b[BLOCK], imp[BLOCK];
    uint32_t *table = s->hist + (size_t)tid * 4 * 65536, key;
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY;
    int j, q;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        importance_block(s, pos, m, a, b, imp);
        if (s->pass == 0)
            for (j = 0; j < m; j++) table[order_key(imp[j]) >> 16]++;
        else
            for (j = 0; j < m; j++) {
                key = order_key(imp[j]);
                for (q = 0; q < s->nbuckets; q++)
                    if (key >> 16 == s->bucket[q]) table[(size_t)(q + 1) * 65536 + (key & 0xffffu)]++;
            }
        release_step(job, tid, pos + m, &next);
    }
}

/* The key of rank r (ascending, 0-based) among n: the bucket (pass 0) or the low bits within it
 * (pass 1) whose counts, summed over the threads from the lowest, first pass r; *below receives
 * the count of the keys under it. */
static uint32_t rank_in(const outlier_job *s, int slot, int64_t r, int64_t *below) {
    int64_t seen = *below;
    uint32_t v;
    int t;
    for (v = 0; v < 65535; v++) {
        int64_t c = 0;
        for (t = 0; t < s->job.nth; t++) c += s->hist[((size_t)t * 4 + (size_t)slot) * 65536 + v];
        if (seen + c > r) break;
        seen += c;
    }
    *below = seen;
    return v;
}

/* The importances of ranks ⌊q·(n−1)⌋, q = ¼, ½, ¾, exactly: two counting passes */
static int quartiles(outlier_job *s, float *value) {
    int64_t n = s->job.n, ranks[3] = {(n - 1) / 4, (n - 1) / 2, 3 * (n - 1) / 4}, below[3];
    uint32_t high[3], low;
    int q, slot[3], i;
    s->hist_bytes = sizeof(uint32_t) * 4 * 65536 * (size_t)s->job.nth;
    if (!(s->hist = (uint32_t *)zalloc(s->hist_bytes))) return -1;
    s->pass = 0;
    run_threads(s, &s->job, pass_quartile_counts);
    s->nbuckets = 0;
    for (q = 0; q < 3; q++) {
        below[q] = 0;
        high[q] = rank_in(s, 0, ranks[q], &below[q]);
        for (i = 0; i < s->nbuckets && s->bucket[i] != high[q]; i++) {}
        if (i == s->nbuckets) s->bucket[s->nbuckets++] = high[q];
        slot[q] = i + 1;
    }
    s->pass = 1;
    run_threads(s, &s->job, pass_quartile_counts);
    for (q = 0; q < 3; q++) {
        low = rank_in(s, slot[q], ranks[q], &below[q]);
        value[q] = key_value((high[q] << 16) | low);
    }
    zfree(s->hist, s->hist_bytes);
    return 0;
}

HOT static void pass_keep(void *p, int tid) {
    outlier_job *s = (outlier_job *)p;
    const job_t *job = &s->job;
    float a[BLOCK], b[BLOCK], imp[BLOCK];
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY, bad = 0;
    int j;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        importance_block(s, pos, m, a, b, imp);
        for (j = 0; j < m; j++) imp[j] = a[j] + (b[j] - a[j]) * (imp[j] >= s->threshold ? 1.0f : 0.0f);
        bad += store_block(job->out, job->out_dt, pos, imp, m);
        release_step(job, tid, pos + m, &next);
    }
    s->job.bad[tid] = bad;
}

int64_t outlier_merge_run(outlier_job *s, int threads) {
    job_t *job = &s->job;
    int64_t n = job->n, t, rows = s->rows, bad;
    int nth;
    float value[3];
    if (n == 0) return 0;
    /* row divergences: whole rows per thread */
    s->rows_job = *job;
    nth = useful_threads(threads, rows, n);
    s->rows_job.nth = nth;
    split_even(s->row_lo, rows, nth);
    for (t = 0; t <= nth; t++) s->rows_job.lo[t] = s->row_lo[t] * s->cols;
    s->kl_bytes = sizeof(float) * (size_t)rows;
    s->scratch_bytes = sizeof(double) * 2 * (size_t)s->cols;
    if (!(s->kl = (float *)zalloc(s->kl_bytes))) return -1;
    for (t = 0; t < nth; t++)
        if (!(s->scratch[t] = (double *)zalloc(s->scratch_bytes))) {
            while (t--) zfree(s->scratch[t], s->scratch_bytes);
            zfree(s->kl, s->kl_bytes);
            return -1;
        }
    run_threads(s, &s->rows_job, pass_divergence);
    for (t = 0; t < nth; t++) zfree(s->scratch[t], s->scratch_bytes);
    if (quartiles(s, value) != 0) {
        zfree(s->kl, s->kl_bytes);
        return -1;
    }
    s->threshold = value[1] + 1.5f * (value[2] - value[0]);
    bad = run_stores(s, job, pass_keep);
    zfree(s->kl, s->kl_bytes);
    return bad;
}

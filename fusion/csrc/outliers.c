/* The outlier-change merge (compose.h): keep the changes θ₁ − θ₀ whose importance
 * I = |θ₁ − θ₀|·KL(row) reaches Q₂ + 1.5·(Q₃ − Q₁) of the tensor's importances.
 *
 * KL(row) = Σ p·log(p/q), p = softmax(θ₁'s row) + 1e-8, q = softmax(θ₀'s row) + 1e-8, in float64
 * and rounded to float32 (one row per thread at a time); I is a float32 product. The quartiles are
 * the importances of rank ⌊(n−1)/4⌋, ⌊(n−1)/2⌋, ⌊3(n−1)/4⌋ (ascending), found exactly by radix
 * select (select.h) with the importances recomputed from the inputs in each pass, so nothing
 * proportional to the tensor is allocated but the row divergences.
 */
#include "compose.h"
#include "select.h"

/* The value whose order key (common.h) is k */
static float key_value(uint32_t k) { return (k & 0x80000000u) ? bits_f32(k & 0x7fffffffu) : bits_f32(~k); }

HOT static void pass_divergence(void *p, int tid) {
    outlier_job *s = (outlier_job *)p;
    const job_t *job = &s->rows_job;
    int64_t cols = s->cols, r, j, next = job->lo[tid] + RELEASE_EVERY;
    double *e0 = s->scratch[tid], *e1 = e0 + cols;
    float a[BLOCK], b[BLOCK];
    for (r = s->row_lo[tid]; r < s->row_lo[tid + 1]; r++) {
        double m0 = -INFINITY, m1 = -INFINITY, s0 = 0.0, s1 = 0.0, kl = 0.0;
        int64_t at = r * cols, c;
        for (c = 0; c < cols; c += BLOCK) {
            int m = (int)(cols - c < BLOCK ? cols - c : BLOCK), k;
            load_block(a, job->in[0], job->dt[0], at + c, m);
            load_block(b, job->in[1], job->dt[1], at + c, m);
            for (k = 0; k < m; k++) {
                e0[c + k] = a[k];
                e1[c + k] = b[k];
                /* NaN wins the maximum, as in torch, and makes the row NaN */
                m0 = a[k] > m0 || a[k] != a[k] ? a[k] : m0;
                m1 = b[k] > m1 || b[k] != b[k] ? b[k] : m1;
            }
        }
        for (j = 0; j < cols; j++) {
            e0[j] = exp(e0[j] - m0);
            e1[j] = exp(e1[j] - m1);
            s0 += e0[j];
            s1 += e1[j];
        }
        for (j = 0; j < cols; j++) {
            double pj = e1[j] / s1 + 1e-8, qj = e0[j] / s0 + 1e-8;
            kl += pj * log1p((pj - qj) / qj); /* log(p/q), precise where p ≈ q */
        }
        s->kl[r] = (float)kl;
        release_step(job, tid, at + cols, &next);
    }
}

/* Importances of a block of positions */
INLINE void importance_block(const outlier_job *s, int64_t pos, int m, float *a, float *b, float *imp) {
    int64_t row = pos / s->cols, col = pos - row * s->cols;
    int j;
    load_block(a, s->job.in[0], s->job.dt[0], pos, m);
    load_block(b, s->job.in[1], s->job.dt[1], pos, m);
    for (j = 0; j < m; j++) {
        imp[j] = fabsf(b[j] - a[j]) * s->kl[row];
        if (++col == s->cols) col = 0, row++;
    }
}

HOT static void outlier_keys(void *p, int64_t pos, int m, uint32_t (*key)[BLOCK]) {
    const outlier_job *s = (const outlier_job *)p;
    float a[BLOCK], b[BLOCK], imp[BLOCK];
    int j, q;
    importance_block(s, pos, m, a, b, imp);
    for (j = 0; j < m; j++) key[0][j] = order_key(imp[j]);
    for (q = 1; q < 3; q++) memcpy(key[q], key[0], sizeof(uint32_t) * (size_t)m);
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
    int64_t n = job->n, ranks[3], t, rows = s->rows;
    int q, nth;
    float value[3];
    if (n == 0) return 0;
    /* row divergences: whole rows per thread */
    s->rows_job = *job;
    nth = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (nth > rows) nth = (int)rows;
    if (nth > n / ((int64_t)1 << 16) + 1) nth = (int)(n / ((int64_t)1 << 16) + 1);
    s->rows_job.nth = nth;
    for (t = 0; t <= nth; t++) {
        s->row_lo[t] = rows / nth * t + (rows % nth) * t / nth;
        s->rows_job.lo[t] = s->row_lo[t] * s->cols;
    }
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
    /* the quartiles: the importance of rank r (ascending) is the (n − r)-th largest; k = n (the
     * minimum) is searched for like any other */
    ranks[0] = (n - 1) / 4, ranks[1] = (n - 1) / 2, ranks[2] = 3 * (n - 1) / 4;
    for (q = 0; q < 3; q++) {
        s->sel[q].k = n - ranks[q];
        s->sel[q].mode = SEL_THRESHOLD;
    }
    if (select_thresholds(job, s->sel, 3, outlier_keys, s) != 0) {
        zfree(s->kl, s->kl_bytes);
        return -1;
    }
    for (q = 0; q < 3; q++) value[q] = key_value((s->sel[q].bucket << 16) | s->sel[q].tl);
    s->threshold = value[1] + 1.5f * (value[2] - value[0]);
    run_threads(s, job, pass_keep);
    zfree(s->kl, s->kl_bytes);
    return job_bad(job);
}

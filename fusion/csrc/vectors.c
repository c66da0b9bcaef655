/* Tensors as vectors (compose.h, fusion.api.vectors): the Gram matrix of the inputs per vector,
 * in float64, and one float32 linear combination per vector.
 *
 * A tensor is a row-major matrix rows × cols whose vectors are its rows (the whole tensor is one
 * row of n elements) or its columns. xᵢ is input i, or input i minus the base rounded to float32
 * (as the reference subtracts), widened to float64, where its products are exact.
 *
 * The sums are taken in an order fixed by the data alone, so the thread count changes nothing:
 * a row's sums by one thread, element k of each block of BLOCK into lane k mod 8, the lanes added
 * in order at the end of the row; the whole tensor in chunks of GRAM_CHUNK elements summed alike,
 * the chunks' sums added in chunk order; a column's sums straight down the rows.
 */
#include "compose.h"

#define GRAM_CHUNK ((int64_t)1 << 16)

static int pair_count(int m) { return m * (m + 1) / 2; }

/* x[i] = input i (minus the base) over m elements from pos */
INLINE void vector_block(const job_t *job, int has_base, int64_t pos, int m, float *b, float (*x)[BLOCK]) {
    int i, j, first = has_base ? 1 : 0;
    if (has_base) load_block(b, job->in[0], job->dt[0], pos, m);
    for (i = first; i < job->nin; i++) {
        load_block(x[i - first], job->in[i], job->dt[i], pos, m);
        if (has_base)
            for (j = 0; j < m; j++) x[i - first][j] = x[i - first][j] - b[j];
    }
}

/* acc[pair][lane] += xᵢ·xⱼ over a block, element k into lane k mod 8 */
INLINE void lanes_add(double (*acc)[8], float (*x)[BLOCK], int nv, int m) {
    int i, j, k, u, p = 0;
    for (i = 0; i < nv; i++)
        for (j = i; j < nv; j++, p++) {
            const float *a = x[i], *c = x[j];
            for (k = 0; k + 8 <= m; k += 8)
                for (u = 0; u < 8; u++) acc[p][u] += (double)a[k + u] * (double)c[k + u];
            for (; k < m; k++) acc[p][k & 7] += (double)a[k] * (double)c[k];
        }
}

INLINE void lanes_reduce(double (*acc)[8], int pairs, double *dst) {
    int p, u;
    for (p = 0; p < pairs; p++) {
        double e = 0.0;
        for (u = 0; u < 8; u++) e += acc[p][u];
        dst[p] = e;
        for (u = 0; u < 8; u++) acc[p][u] = 0.0;
    }
}

/* Sums of the elements [lo, hi) of the flat tensor, into dst[pair] */
INLINE void span_sums(gram_job *s, int64_t lo, int64_t hi, double *dst, float *b, float (*x)[BLOCK],
                      double (*acc)[8]) {
    int64_t pos;
    for (pos = lo; pos < hi; pos += BLOCK) {
        int m = (int)(hi - pos < BLOCK ? hi - pos : BLOCK);
        vector_block(&s->job, s->has_base, pos, m, b, x);
        lanes_add(acc, x, s->nv, m);
    }
    lanes_reduce(acc, pair_count(s->nv), dst);
}

HOT static void pass_gram_rows(void *p, int tid) {
    gram_job *s = (gram_job *)p;
    const job_t *job = &s->job;
    float b[BLOCK], x[MAX_INPUTS][BLOCK];
    double acc[MAX_INPUTS * (MAX_INPUTS + 1) / 2][8];
    int64_t next = job->lo[tid] + RELEASE_EVERY, unit;
    int pairs = pair_count(s->nv);
    memset(acc, 0, sizeof(double) * 8 * (size_t)pairs);
    for (unit = s->unit_lo[tid]; unit < s->unit_lo[tid + 1]; unit++) {
        /* a unit is a row, or a chunk of the whole tensor */
        int64_t lo = unit * s->unit_len, hi = lo + s->unit_len < job->n ? lo + s->unit_len : job->n;
        span_sums(s, lo, hi, s->sums + unit * pairs, b, x, acc);
        release_step(job, tid, hi, &next);
    }
}

HOT static void pass_gram_columns(void *p, int tid) {
    gram_job *s = (gram_job *)p;
    const job_t *job = &s->job;
    float b[BLOCK], x[MAX_INPUTS][BLOCK];
    int64_t c0 = s->unit_lo[tid], c1 = s->unit_lo[tid + 1], row, col;
    int i, j, k, q;
    double *acc = s->sums; /* [pair][column]: this thread owns columns c0..c1 */
    for (row = 0; row < s->rows; row++)
        for (col = c0; col < c1; col += BLOCK) {
            int m = (int)(c1 - col < BLOCK ? c1 - col : BLOCK);
            vector_block(job, s->has_base, row * s->cols + col, m, b, x);
            for (i = 0, q = 0; i < s->nv; i++)
                for (j = i; j < s->nv; j++, q++) {
                    double *a = acc + (int64_t)q * s->cols + col;
                    for (k = 0; k < m; k++) a[k] += (double)x[i][k] * (double)x[j][k];
                }
        }
}

int gram_run(gram_job *s, int threads) {
    job_t *job = &s->job;
    int64_t n = s->rows * s->cols, units, v, t;
    int pairs = pair_count(s->nv), i, j, q, nth;
    job->n = n;
    if (s->columns) {
        units = s->cols;
        s->vectors = s->cols;
        job->release = 0; /* every thread reads every row: no page is done with early */
    } else {
        /* rows; a single row (the whole tensor) in fixed chunks */
        s->unit_len = s->rows == 1 ? GRAM_CHUNK : s->cols;
        units = s->rows == 1 ? (n + GRAM_CHUNK - 1) / GRAM_CHUNK : s->rows;
        s->vectors = s->rows;
    }
    nth = useful_threads(threads, units, n);
    job->nth = nth;
    split_even(s->unit_lo, units, nth);
    for (t = 0; t <= nth; t++) {
        int64_t at = s->columns ? 0 : s->unit_lo[t] * s->unit_len;
        job->lo[t] = at < n ? at : n;
    }
    job->lo[nth] = n;
    s->sums_bytes = sizeof(double) * (size_t)pairs * (size_t)(units > 0 ? units : 1);
    if (!(s->sums = (double *)zalloc(s->sums_bytes))) return -1;
    if (units > 0) run_threads(s, job, s->columns ? pass_gram_columns : pass_gram_rows);
    for (v = 0; v < s->vectors; v++) {
        double *g = s->out + v * s->nv * s->nv;
        for (q = 0; q < pairs; q++) g[q] = 0.0;
        for (i = 0, q = 0; i < s->nv; i++)
            for (j = i; j < s->nv; j++, q++) {
                double e;
                if (s->columns) e = s->sums[(int64_t)q * s->cols + v];
                else if (s->rows == 1) {
                    int64_t c;
                    for (e = 0.0, c = 0; c < units; c++) e += s->sums[c * pairs + q];
                } else e = s->sums[v * pairs + q];
                g[i * s->nv + j] = e;
                g[j * s->nv + i] = e;
            }
    }
    zfree(s->sums, s->sums_bytes);
    return 0;
}

HOT static void pass_combination(void *p, int tid) {
    combination_job *s = (combination_job *)p;
    const job_t *job = &s->job;
    float b[BLOCK], t[BLOCK], acc[BLOCK];
    int64_t pos = job->lo[tid], end = job->lo[tid + 1], next = pos + RELEASE_EVERY, bad = 0;
    int has_base = s->has_base, first = has_base ? 1 : 0, i, k;
    while (pos < end) {
        /* a block never crosses a row: within it a row's coefficients are constant */
        int64_t row = pos / s->cols, col = pos - row * s->cols, left = end - pos, in_row = s->cols - col;
        int64_t span = left < in_row ? left : in_row;
        int m = (int)(span < BLOCK ? span : BLOCK);
        if (has_base) load_block(b, job->in[0], job->dt[0], pos, m);
        for (i = first; i < job->nin; i++) {
            const float *c = s->coef + (int64_t)(i - first) * s->vectors; /* model-major */
            load_block(t, job->in[i], job->dt[i], pos, m);
            if (has_base)
                for (k = 0; k < m; k++) t[k] = t[k] - b[k];
            if (s->columns) {
                const float *cc = c + col;
                for (k = 0; k < m; k++) t[k] = t[k] * cc[k];
            } else {
                float cv = c[row];
                for (k = 0; k < m; k++) t[k] = t[k] * cv;
            }
            /* the reference starts from the first product, not from 0 + product (-0.0 stays) */
            if (i == first) memcpy(acc, t, sizeof(float) * (size_t)m);
            else
                for (k = 0; k < m; k++) acc[k] = acc[k] + t[k];
        }
        if (has_base)
            for (k = 0; k < m; k++) acc[k] = b[k] + acc[k];
        bad += store_block(job->out, job->out_dt, pos, acc, m);
        pos += m;
        release_step(job, tid, pos, &next);
    }
    s->job.bad[tid] = bad;
}

int64_t combination_run(combination_job *s) {
    return run_stores(s, &s->job, pass_combination);
}

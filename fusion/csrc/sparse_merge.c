/* The sparse merge (compose.h): sparsify each task vector (sparsify.h), then either elect signs
 * and take the disjoint weighted mean (TIES and the *_ties/della forms), or add the weighted
 * task vectors as the weighted sum does (dare_linear, breadcrumbs, della_linear). Both in exactly
 * the torch reference's order: with the election, weigh (x = w·δ̂), elect by Σ x, sum the agreeing
 * x and their w; without it, a product then fused multiply-adds. */
#include "compose.h"
#include "signs.h"
#include "sums.h"

HOT static void pass_sparse_merge(void *p, int tid) {
    sparse_job *s = (sparse_job *)p;
    const job_t *job = &s->job;
    const sparsifier *sp = &s->sp;
    float b[BLOCK], d[MAX_INPUTS][BLOCK], sum[BLOCK], total[BLOCK], divisor[BLOCK], r[BLOCK];
    unsigned char keep[BLOCK], bad[BLOCK];
    sparsify_cursor cursor;
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY, nonfinite = 0;
    int i, j, nmodels = job->nin - 1;
    sparsify_start(sp, tid, &cursor);
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        delta_block(job, pos, m, b, d);
        memset(bad, 0, (size_t)m);
        for (j = 0; j < m; j++) sum[j] = 0.0f, total[j] = 0.0f, divisor[j] = 0.0f;
        for (i = 0; i < nmodels; i++) {
            float w = s->w[i], f = sp->factor[i], *x = d[i];
            /* a non-finite δ makes the entry NaN, whatever the rule keeps of it */
            for (j = 0; j < m; j++) bad[j] |= (f32_bits(x[j]) & 0x7f800000u) == 0x7f800000u;
            sparsify_block(sp, i, x, pos, m, keep, &cursor);
            if (s->mask[i]) memcpy(s->mask[i] + pos, keep, (size_t)m);
            if (sp->scaled[i])
                for (j = 0; j < m; j++) x[j] = keep[j] ? x[j] * f : 0.0f;
            else
                for (j = 0; j < m; j++) x[j] = keep[j] ? x[j] : 0.0f;
            if (s->elect)
                for (j = 0; j < m; j++) {
                    x[j] = w * x[j];
                    sum[j] = sum[j] + x[j];
                }
        }
        if (s->elect) {
            for (i = 0; i < nmodels; i++) add_agreeing(total, divisor, d[i], s->w[i], 0, sum, m);
            if (s->normalize) divide_agreeing(total, divisor, m);
            for (j = 0; j < m; j++) r[j] = b[j] + s->scale * total[j];
        } else {
            /* the reference starts from the first product, not from 0 + product (-0.0 stays) */
            for (j = 0; j < m; j++) total[j] = d[0][j] * s->w[0];
            for (i = 1; i < nmodels; i++)
                for (j = 0; j < m; j++) total[j] = fmaf(d[i][j], s->w[i], total[j]);
            if (s->normalize)
                for (j = 0; j < m; j++) total[j] = total[j] / s->divisor;
            for (j = 0; j < m; j++) r[j] = fmaf(total[j], s->scale, b[j]);
        }
        for (j = 0; j < m; j++)
            if (bad[j]) r[j] = NAN;
        nonfinite += store_block(job->out, job->out_dt, pos, r, m);
        release_step(job, tid, pos + m, &next);
    }
    s->job.bad[tid] = nonfinite;
}

int64_t sparse_merge_run(sparse_job *s) {
    int64_t bad = -1;
    s->sp.nmodels = s->job.nin - 1;
    if (sparsify_prepare(&s->job, &s->sp) == 0) bad = run_stores(s, &s->job, pass_sparse_merge);
    sparsify_free(&s->sp);
    return bad;
}

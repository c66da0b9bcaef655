/* The sparse merge (compose.h): sparsify each task vector, optionally elect signs, take the
 * (disjoint) weighted mean. With magnitude top-k and signs elected this is TIES, in exactly the
 * reference's order: trim, weigh (x = w·δ̂), elect by Σ x, then sum the agreeing x and their w. */
#include "compose.h"
#include "signs.h"
#include "sums.h"

HOT static void pass_sparse_merge(void *p, int tid) {
    sparse_job *s = (sparse_job *)p;
    const job_t *job = &s->job;
    float b[BLOCK], d[MAX_INPUTS][BLOCK], sum[BLOCK], total[BLOCK], divisor[BLOCK], r[BLOCK];
    unsigned char keep[BLOCK];
    uint64_t cursor[MAX_INPUTS];
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY, bad = 0;
    int i, j, nmodels = job->nin - 1;
    for (i = 0; i < nmodels; i++) cursor[i] = sparsify_cursor(&s->sp, i, tid);
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        delta_block(job, pos, m, b, d);
        for (j = 0; j < m; j++) sum[j] = 0.0f, total[j] = 0.0f, divisor[j] = 0.0f;
        for (i = 0; i < nmodels; i++) {
            float w = s->w[i], *x = d[i];
            sparsify_block(&s->sp, i, x, m, keep, &cursor[i]);
            if (s->mask[i]) memcpy(s->mask[i] + pos, keep, (size_t)m);
            for (j = 0; j < m; j++) x[j] = w * (keep[j] ? x[j] : 0.0f);
            if (s->elect)
                for (j = 0; j < m; j++) sum[j] = sum[j] + x[j];
        }
        for (i = 0; i < nmodels; i++) {
            if (s->elect) add_agreeing(total, divisor, d[i], s->w[i], 0, sum, m);
            else add_every(total, divisor, d[i], s->w[i], m);
        }
        if (s->normalize) divide_agreeing(total, divisor, m);
        for (j = 0; j < m; j++) r[j] = b[j] + s->scale * total[j];
        bad += store_block(job->out, job->out_dt, pos, r, m);
        release_step(job, tid, pos + m, &next);
    }
    s->job.bad[tid] = bad;
}

int64_t sparse_merge_run(sparse_job *s) {
    if (sparsify_prepare(&s->job, &s->sp) != 0) return -1;
    run_threads(s, &s->job, pass_sparse_merge);
    return job_bad(&s->job);
}

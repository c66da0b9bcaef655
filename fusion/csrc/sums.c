/* The weighted sum (compose.h): one pass, each input read once, in blocks. */
#include "compose.h"
#include "sums.h"

HOT static void pass_weighted_sum(void *p, int tid) {
    sum_job *s = (sum_job *)p;
    const job_t *job = &s->job;
    float b[BLOCK], t[BLOCK], acc[BLOCK];
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY, bad = 0;
    int has_base = s->has_base, first = has_base ? 1 : 0, i, j;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        if (has_base) load_block(b, job->in[0], job->dt[0], pos, m);
        for (i = first; i < job->nin; i++) {
            float w = s->w[i];
            load_block(t, job->in[i], job->dt[i], pos, m);
            if (has_base)
                for (j = 0; j < m; j++) t[j] = t[j] - b[j];
            /* the reference starts from the first product, not from 0 + product (-0.0 stays) */
            if (i == first)
                for (j = 0; j < m; j++) acc[j] = t[j] * w;
            else
                for (j = 0; j < m; j++) acc[j] = fmaf(t[j], w, acc[j]);
        }
        if (s->normalize)
            for (j = 0; j < m; j++) acc[j] = acc[j] / s->divisor;
        if (has_base)
            for (j = 0; j < m; j++) acc[j] = fmaf(acc[j], s->scale, b[j]);
        else if (s->scale != 1.0f)
            for (j = 0; j < m; j++) acc[j] = acc[j] * s->scale;
        bad += store_block(job->out, job->out_dt, pos, acc, m);
        release_step(job, tid, pos + m, &next);
    }
    s->job.bad[tid] = bad;
}

int64_t weighted_sum_run(sum_job *s) {
    return run_stores(s, &s->job, pass_weighted_sum);
}

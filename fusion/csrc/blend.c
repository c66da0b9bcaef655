/* The distance blend (compose.h): per element, the weight w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1)
 * and w·θ₁ + (1 − w)·θ₀, in the reference's float32 operations: the quotient as the reciprocal
 * times t, each clamp letting NaN through as torch's does. */
#include "compose.h"

HOT static void pass_distance_blend(void *p, int tid) {
    blend_job *s = (blend_job *)p;
    const job_t *job = &s->job;
    float a[BLOCK], b[BLOCK], r[BLOCK];
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY, bad = 0;
    float t = s->t, least = 1e-6f;
    int j;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        load_block(a, job->in[0], job->dt[0], pos, m);
        load_block(b, job->in[1], job->dt[1], pos, m);
        for (j = 0; j < m; j++) {
            float d = fabsf(a[j] - b[j]), w;
            d = d < least ? least : d;
            w = (1.0f / d) * t;
            w = w < 0.0f ? 0.0f : w;
            w = w > 1.0f ? 1.0f : w;
            r[j] = w * b[j] + (1.0f - w) * a[j];
        }
        bad += store_block(job->out, job->out_dt, pos, r, m);
        release_step(job, tid, pos + m, &next);
    }
    s->job.bad[tid] = bad;
}

int64_t distance_blend_run(blend_job *s) {
    return run_stores(s, &s->job, pass_distance_blend);
}

/* Conversion between the element types (compose.h), through float32 and the stores every
 * kernel uses: so testing it against torch's casts tests the kernels' rounding. */
#include "compose.h"

HOT static void pass_convert(void *p, int tid) {
    const job_t *job = (const job_t *)p;
    float v[BLOCK];
    int64_t pos;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        load_block(v, job->in[0], job->dt[0], pos, m);
        store_block(job->out, job->out_dt, pos, v, m);
    }
}

void convert_run(const void *src, int src_dt, void *dst, int dst_dt, int64_t n, int threads) {
    job_t job;
    memset(&job, 0, sizeof(job));
    job.nin = 1;
    job.in[0] = src;
    job.dt[0] = src_dt;
    job.out = dst;
    job.out_dt = dst_dt;
    job_split(&job, n, threads);
    run_threads(&job, &job, pass_convert);
}

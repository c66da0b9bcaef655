/* Changed entries (compose.h): model i changes an entry where |δᵢ| > ε (νᵢ), c models change it;
 * the mean of the changes over the models that make them, and how many of each model's changes
 * it shares with others or makes alone. In the reference's float32 order: νᵢδᵢ is δᵢ times 1 or
 * 0 (so NaN and infinities stay), each term divided by max(c, 1) (or, where c = 1 and scales are
 * given, multiplied by the model's scale), the terms added in model order, then the base. */
#include "compose.h"
#include "sums.h"

/* ν[i][j] and c[j] of a block */
INLINE void changed_block(float (*d)[BLOCK], int nmodels, float eps, int m, unsigned char (*nu)[BLOCK],
                          int *count) {
    int i, j;
    for (j = 0; j < m; j++) count[j] = 0;
    for (i = 0; i < nmodels; i++)
        for (j = 0; j < m; j++) {
            nu[i][j] = fabsf(d[i][j]) > eps;
            count[j] += nu[i][j];
        }
}

HOT static void pass_changed_mean(void *p, int tid) {
    changes_job *s = (changes_job *)p;
    const job_t *job = &s->job;
    float b[BLOCK], d[MAX_INPUTS][BLOCK], total[BLOCK];
    unsigned char nu[MAX_INPUTS][BLOCK];
    int count[BLOCK], i, j, nmodels = job->nin - 1;
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY, bad = 0;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        delta_block(job, pos, m, b, d);
        changed_block(d, nmodels, s->eps, m, nu, count);
        for (i = 0; i < nmodels; i++) {
            float scale = s->scale[i];
            for (j = 0; j < m; j++) {
                float x = d[i][j] * (nu[i][j] ? 1.0f : 0.0f), term;
                term = s->scaled && count[j] == 1 ? x * scale : x / (float)(count[j] > 1 ? count[j] : 1);
                total[j] = i == 0 ? term : total[j] + term;
            }
        }
        for (j = 0; j < m; j++) total[j] = b[j] + total[j];
        bad += store_block(job->out, job->out_dt, pos, total, m);
        release_step(job, tid, pos + m, &next);
    }
    s->job.bad[tid] = bad;
}

int64_t changed_mean_run(changes_job *s) {
    return run_stores(s, &s->job, pass_changed_mean);
}

HOT static void pass_change_counts(void *p, int tid) {
    changes_job *s = (changes_job *)p;
    const job_t *job = &s->job;
    float b[BLOCK], d[MAX_INPUTS][BLOCK];
    unsigned char nu[MAX_INPUTS][BLOCK];
    int count[BLOCK], i, j, nmodels = job->nin - 1;
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY;
    for (i = 0; i < nmodels; i++) s->shared[tid][i] = s->unique[tid][i] = 0;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        delta_block(job, pos, m, b, d);
        changed_block(d, nmodels, s->eps, m, nu, count);
        for (i = 0; i < nmodels; i++) {
            int64_t shared = 0, unique = 0;
            for (j = 0; j < m; j++) {
                shared += nu[i][j] & (count[j] > 1);
                unique += nu[i][j] & (count[j] == 1);
            }
            s->shared[tid][i] += shared;
            s->unique[tid][i] += unique;
        }
        release_step(job, tid, pos + m, &next);
    }
}

void change_counts_run(changes_job *s, int64_t *shared, int64_t *unique) {
    int t, i, nmodels = s->job.nin - 1;
    run_threads(s, &s->job, pass_change_counts);
    for (i = 0; i < nmodels; i++) {
        shared[i] = unique[i] = 0;
        for (t = 0; t < s->job.nth; t++) shared[i] += s->shared[t][i], unique[i] += s->unique[t][i];
    }
}

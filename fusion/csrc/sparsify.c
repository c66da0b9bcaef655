/* The whole-tensor steps of the sparsifiers (sparsify.h). */
#include "sparsify.h"
#include "sums.h"

/* |δᵢ| of every model, one row per model */
HOT static void magnitude_keys(void *arg, int64_t pos, int m, uint32_t (*key)[BLOCK]) {
    const job_t *job = (const job_t *)arg;
    float b[BLOCK], d[MAX_INPUTS][BLOCK];
    int i, j;
    delta_block(job, pos, m, b, d);
    for (i = 0; i < job->nin - 1; i++)
        for (j = 0; j < m; j++) key[i][j] = abs_key(d[i][j]);
}

int sparsify_prepare(const job_t *job, sparsifier *sp) {
    int i;
    if (sp->mode != SPARSIFY_TOPK) return 0;
    for (i = 0; i < sp->nmodels; i++) sel_set_k(&sp->sel[i], sp->k[i], job->n);
    return select_thresholds(job, sp->sel, sp->nmodels, magnitude_keys, (void *)job);
}

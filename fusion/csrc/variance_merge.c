/* The variance-selected merge (compose.h; SCE): select the positions whose task vectors vary
 * most across models, weight each model by its energy in the selection, erase the entries whose
 * sign disagrees with the elected one.
 *
 * The selection's k depends on how many variances are non-zero, which only the first counting
 * pass learns, so this composition drives the radix select itself (select.h) instead of through
 * select_thresholds. Two savings keep it near the cost of TIES:
 *   - the first pass keeps each variance key's high 16 bits (2 bytes per element, up to
 *     HI16_MAX elements), so later passes recompute the float64 variance only inside the k-th
 *     key's bucket, and compare the rest by those bits alone;
 *   - the low-bit pass sums the energies too: of the keys above the bucket (all selected) and,
 *     per low 16 bits, of those in it, so that the selection's energies need no pass of their
 *     own (for up to 8 models; a separate pass otherwise).
 */
#include "compose.h"
#include "signs.h"
#include "sums.h"

#define HI16_MAX ((int64_t)1 << 28)
#define ELO_MODELS 8

enum { PASS_HI, PASS_LO, PASS_ENERGY, PASS_MERGE };

/* v = (1/N)·Σᵢ (δᵢ − μ)², μ = (1/N)·Σᵢ δᵢ, in float64 with the models in order, rounded to
 * float32: the key of plugins/sce.py's _population_variance, bit for bit. */
INLINE void variance_block(float (*d)[BLOCK], int nmodels, int m, float *v) {
    double s[BLOCK], q[BLOCK];
    int i, j;
    for (j = 0; j < m; j++) s[j] = 0.0, q[j] = 0.0;
    for (i = 0; i < nmodels; i++)
        for (j = 0; j < m; j++) s[j] = s[j] + (double)d[i][j];
    for (j = 0; j < m; j++) s[j] = s[j] / nmodels; /* the mean */
    for (i = 0; i < nmodels; i++)
        for (j = 0; j < m; j++) {
            double c = (double)d[i][j] - s[j];
            q[j] = q[j] + c * c;
        }
    for (j = 0; j < m; j++) v[j] = (float)(q[j] / nmodels);
}

/* The keys of a block after the first pass, from the kept high bits: exact where those equal the
 * k-th key's bucket, elsewhere only ordered right against it (all ones above, 0 below), which is
 * all the later passes compare. */
INLINE void cached_keys(const variance_job *v, int64_t pos, int m, float (*d)[BLOCK], uint32_t *key) {
    const uint16_t *h = v->hi16 + pos;
    uint32_t bucket = v->sel.bucket;
    int i, j, nmodels = v->job.nin - 1;
    for (j = 0; j < m; j++) key[j] = h[j] > bucket ? 0xffffffffu : 0u;
    for (j = 0; j < m; j++)
        if (h[j] == bucket) {
            double s = 0.0, q = 0.0, mean;
            for (i = 0; i < nmodels; i++) s = s + (double)d[i][j];
            mean = s / nmodels;
            for (i = 0; i < nmodels; i++) {
                double c = (double)d[i][j] - mean;
                q = q + c * c;
            }
            key[j] = order_key((float)(q / nmodels));
        }
}

/* The deltas and variance keys of a block */
INLINE void variance_keys(const variance_job *v, int64_t pos, int m, float *b, float (*d)[BLOCK], uint32_t *key) {
    delta_block(&v->job, pos, m, b, d);
    if (v->hi16 && v->pass != PASS_HI) {
        cached_keys(v, pos, m, d, key);
    } else {
        float var[BLOCK];
        int j;
        variance_block(d, v->job.nin - 1, m, var);
        for (j = 0; j < m; j++) key[j] = order_key(var[j]);
    }
}

/* The counting passes: high bits (with the count of non-zero keys, and the kept high bits), or
 * low bits inside the bucket (with the energies, when there is room for them). */
HOT static void pass_count(void *p, int tid) {
    variance_job *v = (variance_job *)p;
    const job_t *job = &v->job;
    float b[BLOCK], d[MAX_INPUTS][BLOCK];
    uint32_t key[BLOCK];
    uint32_t *table = sel_table(&v->sel, v->pass == PASS_LO, tid), bucket = v->sel.bucket;
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY;
    uint64_t nonzero = 0;
    double above_energy[MAX_INPUTS];
    int i, j, nmodels = job->nin - 1;
    for (i = 0; i < nmodels; i++) above_energy[i] = 0.0;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        variance_keys(v, pos, m, b, d, key);
        if (v->pass == PASS_HI) {
            count_high(table, key, m);
            for (j = 0; j < m; j++) nonzero += key[j] != KEY_ZERO;
            if (v->hi16)
                for (j = 0; j < m; j++) v->hi16[pos + j] = (uint16_t)(key[j] >> 16);
        } else {
            count_low(table, bucket, key, m);
            if (v->elo) {
                double *elo = v->elo + (size_t)tid * 65536 * nmodels;
                for (i = 0; i < nmodels; i++) above_energy[i] += sum_squares(d[i], NULL, key, bucket, m);
                for (j = 0; j < m; j++)
                    if ((key[j] >> 16) == bucket) {
                        double *row = elo + (size_t)(key[j] & 0xffffu) * nmodels;
                        for (i = 0; i < nmodels; i++) row[i] += (double)d[i][j] * (double)d[i][j];
                    }
            }
        }
        release_step(job, tid, pos + m, &next);
    }
    v->nonzero[tid] = nonzero;
    if (v->elo)
        for (i = 0; i < nmodels; i++) v->energy[tid][i] = above_energy[i];
}

/* The energies of the selection (PASS_ENERGY), or the merge (PASS_MERGE). */
HOT static void pass_merge(void *p, int tid) {
    variance_job *v = (variance_job *)p;
    const job_t *job = &v->job;
    float b[BLOCK], d[MAX_INPUTS][BLOCK], sum[BLOCK], total[BLOCK], divisor[BLOCK], r[BLOCK];
    uint32_t key[BLOCK];
    unsigned char keep[BLOCK];
    double energy[MAX_INPUTS];
    uint64_t ties = v->sel.tie_start[tid];
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY, bad = 0;
    int i, j, nmodels = job->nin - 1, merge = v->pass == PASS_MERGE;
    for (i = 0; i < nmodels; i++) energy[i] = 0.0;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        if (v->select) {
            variance_keys(v, pos, m, b, d, key);
            sel_block(&v->sel, key, m, keep, &ties);
        } else {
            delta_block(job, pos, m, b, d);
            memset(keep, 1, (size_t)m);
        }
        if (!merge) {
            for (i = 0; i < nmodels; i++) energy[i] += sum_squares(d[i], keep, NULL, 0, m);
        } else {
            if (v->mask) memcpy(v->mask + pos, keep, (size_t)m);
            if (v->select && v->mask_deltas)
                for (i = 0; i < nmodels; i++)
                    for (j = 0; j < m; j++) d[i][j] = keep[j] ? d[i][j] : 0.0f;
            for (j = 0; j < m; j++) sum[j] = 0.0f, total[j] = 0.0f, divisor[j] = 0.0f;
            for (i = 0; i < nmodels; i++)
                for (j = 0; j < m; j++) sum[j] = sum[j] + d[i][j];
            for (i = 0; i < nmodels; i++) add_agreeing(total, divisor, d[i], v->eta[i], 1, sum, m);
            divide_agreeing(total, divisor, m);
            for (j = 0; j < m; j++) r[j] = b[j] + v->scale * total[j];
            bad += store_block(job->out, job->out_dt, pos, r, m);
        }
        release_step(job, tid, pos + m, &next);
    }
    if (merge) v->job.bad[tid] = bad;
    else for (i = 0; i < nmodels; i++) v->energy[tid][i] = energy[i];
}

/* Add to e[] the energies of the first `quota` keys equal to T in thread t's range (the one
 * thread whose range holds the last kept tie). */
HOT static void tie_energy(variance_job *v, int t, uint64_t quota, double *e) {
    const job_t *job = &v->job;
    float b[BLOCK], d[MAX_INPUTS][BLOCK], var[BLOCK];
    int64_t pos;
    int i, j, nmodels = job->nin - 1;
    for (pos = job->lo[t]; quota && pos < job->lo[t + 1]; pos += BLOCK) {
        int m = block_len(job, t, pos);
        delta_block(job, pos, m, b, d);
        variance_block(d, nmodels, m, var);
        for (j = 0; j < m && quota; j++)
            if (order_key(var[j]) == v->sel.T) {
                quota--;
                for (i = 0; i < nmodels; i++) e[i] += (double)d[i][j] * (double)d[i][j];
            }
    }
}

/* The selection's k and threshold; leaves v->elo set when the energies came with it. */
static int find_selection(variance_job *v) {
    selector *sel = &v->sel;
    const job_t *job = &v->job;
    int nmodels = job->nin - 1, t;
    uint64_t nonzero = 0;
    double product;
    int64_t k;
    if (!sel_alloc(sel, job->nth)) return -1;
    /* optional: without them the later passes recompute every variance */
    if (job->n > 0 && job->n <= HI16_MAX) v->hi16 = (uint16_t *)zalloc((size_t)job->n * 2);
    sel->mode = SEL_THRESHOLD; /* count every key first: k depends on how many are non-zero */
    v->pass = PASS_HI;
    run_threads(v, job, pass_count);
    for (t = 0; t < job->nth; t++) nonzero += v->nonzero[t];
    /* k = floor(fraction · count_nonzero(v)), the float64 product of fusion.api.selection.topk_count */
    product = floor(v->fraction * (double)nonzero);
    k = product < 0 ? 0 : (product > (double)nonzero ? (int64_t)nonzero : (int64_t)product);
    sel_set_k(sel, k, job->n);
    if (sel_after_hi(sel, job->nth)) {
        if (nmodels <= ELO_MODELS) v->elo = (double *)zalloc((size_t)job->nth * 65536 * nmodels * 8);
        v->pass = PASS_LO;
        run_threads(v, job, pass_count);
        sel_after_lo(sel, job->nth);
    }
    return 0;
}

/* e[i] = Σ(δᵢ⊙S)² from the per-thread sums of the low-bit pass: the part above the bucket, the
 * low bits above those of T in it, then the kept ties at T (each thread's are all kept, none,
 * or, in one thread, the first few). */
static void energies_from_counts(variance_job *v, double *e) {
    selector *sel = &v->sel;
    double ties[MAX_INPUTS];
    int nm = v->job.nin - 1, t, i;
    uint32_t lo;
    for (i = 0; i < nm; i++) ties[i] = 0.0;
    for (t = 0; t < v->job.nth; t++) {
        uint64_t count = sel->hist_lo[(size_t)t * 65536 + sel->tl];
        uint64_t kept = sel->all_ties ? count : (sel->need > sel->tie_start[t] ? sel->need - sel->tie_start[t] : 0);
        if (kept >= count)
            for (i = 0; i < nm; i++) ties[i] += v->elo[((size_t)t * 65536 + sel->tl) * nm + i];
        else if (kept)
            tie_energy(v, t, kept, ties);
    }
    for (i = 0; i < nm; i++) {
        for (t = 0; t < v->job.nth; t++) e[i] += v->energy[t][i];
        for (t = 0; t < v->job.nth; t++)
            for (lo = sel->tl + 1; lo < 65536; lo++) e[i] += v->elo[((size_t)t * 65536 + lo) * nm + i];
        e[i] += ties[i];
    }
}

int64_t variance_merge_run(variance_job *v) {
    job_t *job = &v->job;
    selector *sel = &v->sel;
    int nm = job->nin - 1, i, t;
    double total = 0.0;
    int64_t bad = -1;
    v->select = v->fraction < 1.0;
    if (v->select) {
        if (find_selection(v) != 0) goto done;
    } else {
        sel->mode = SEL_ALL;
    }
    for (i = 0; i < nm; i++) v->energy_out[i] = 0.0;
    if (sel->mode == SEL_THRESHOLD && v->elo) {
        energies_from_counts(v, v->energy_out);
    } else if (sel->mode != SEL_NONE) { /* nothing selected: no energy */
        v->pass = PASS_ENERGY;
        run_threads(v, job, pass_merge);
        for (t = 0; t < job->nth; t++)
            for (i = 0; i < nm; i++) v->energy_out[i] += v->energy[t][i];
    }
    /* η exactly as the reference's Python arithmetic: a float64 total in model order */
    for (i = 0; i < nm; i++) total = total + v->energy_out[i];
    for (i = 0; i < nm; i++) v->eta[i] = (float)(total == 0.0 ? 1.0 / nm : v->energy_out[i] / total);
    v->pass = PASS_MERGE;
    bad = run_stores(v, job, pass_merge);
done:
    zfree(v->elo, (size_t)job->nth * 65536 * nm * 8);
    v->elo = NULL;
    sel_free(sel);
    if (v->hi16) zfree(v->hi16, (size_t)job->n * 2);
    v->hi16 = NULL;
    return bad;
}

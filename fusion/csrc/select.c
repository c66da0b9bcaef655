/* Radix select (select.h): from k and the count tables to the k-th key, the generic two-pass
 * driver, and the top-k mask of a key buffer. */
#include "select.h"

void sel_set_k(selector *s, int64_t k, int64_t n) {
    s->k = k;
    s->mode = k <= 0 ? SEL_NONE : (k >= n ? SEL_ALL : SEL_THRESHOLD);
}

int sel_alloc(selector *s, int nth) {
    s->nth = nth;
    s->hist_hi = (uint32_t *)zalloc((size_t)nth * 65536 * 4);
    s->hist_lo = (uint32_t *)zalloc((size_t)nth * 65536 * 4);
    return s->hist_hi && s->hist_lo;
}

void sel_free(selector *s) {
    zfree(s->hist_hi, (size_t)s->nth * 65536 * 4);
    zfree(s->hist_lo, (size_t)s->nth * 65536 * 4);
    s->hist_hi = s->hist_lo = NULL;
}

/* The highest bucket b of a [nth][65536] count table where the counts summed from the top,
 * after *above others, reach k: *above becomes the count above b, *count the count at b. */
static int top_bucket(const uint32_t *hist, int nth, int64_t k, int64_t *above, int64_t *count) {
    int64_t seen = *above, c = 0, t;
    int b;
    for (b = 65535; b >= 0; b--) {
        for (c = 0, t = 0; t < nth; t++) c += hist[(size_t)t * 65536 + b];
        if (seen + c >= k) break;
        seen += c;
    }
    *above = seen;
    *count = c;
    return b;
}

int sel_after_hi(selector *s, int nth) {
    int64_t above = 0, c;
    if (s->mode != SEL_THRESHOLD) return 0;
    s->bucket = (uint32_t)top_bucket(s->hist_hi, nth, s->k, &above, &c);
    s->above_hi = above;
    return 1;
}

void sel_after_lo(selector *s, int nth) {
    int64_t above = s->above_hi, c = 0, t;
    int b = top_bucket(s->hist_lo, nth, s->k, &above, &c);
    s->T = (s->bucket << 16) | (uint32_t)b;
    s->tl = (uint32_t)b;
    s->need = (uint64_t)(s->k - above);
    s->all_ties = s->need == (uint64_t)c;
    if (s->all_ties) { /* no counting: keep key ≥ T (T > 0, as k < n) */
        s->T -= 1;
        s->need = 0;
    }
    for (t = 0, c = 0; t < nth; t++) {
        s->tie_start[t] = (uint64_t)c;
        c += s->hist_lo[(size_t)t * 65536 + b];
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The two counting passes, for any keys */

typedef struct {
    const job_t *job;
    selector *sel;
    int nsel, low;
    const int *rows;
    const int *shares; /* the high-bit pass counts a key row once: selector s uses shares[s]'s table */
    keys_fn keys;
    void *arg;
} count_pass;

HOT static void pass_count(void *p, int tid) {
    count_pass *c = (count_pass *)p;
    const job_t *job = c->job;
    uint32_t key[MAX_INPUTS][BLOCK];
    uint32_t *table[2 * MAX_INPUTS], bucket[2 * MAX_INPUTS];
    int row[2 * MAX_INPUTS], nactive = 0, s, a;
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY;
    for (s = 0; s < c->nsel; s++) {
        if (c->sel[s].mode != SEL_THRESHOLD || (!c->low && c->shares[s] != s)) continue;
        table[nactive] = sel_table(&c->sel[s], c->low, tid);
        bucket[nactive] = c->sel[s].bucket;
        row[nactive++] = c->rows ? c->rows[s] : s;
    }
    for (pos = job->lo[tid]; nactive && pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        c->keys(c->arg, pos, m, key);
        for (a = 0; a < nactive; a++) {
            if (c->low) count_low(table[a], bucket[a], key[row[a]], m);
            else count_high(table[a], key[row[a]], m);
        }
        release_step(job, tid, pos + m, &next);
    }
}

int select_thresholds(const job_t *job, selector *sel, int nsel, const int *rows, keys_fn keys, void *arg) {
    int shares[2 * MAX_INPUTS];
    count_pass c = {job, sel, nsel, 0, rows, shares, keys, arg};
    int s, t, need_low = 0, ok = 1;
    for (s = 0; s < nsel; s++) {
        if (sel[s].mode == SEL_THRESHOLD && !sel_alloc(&sel[s], job->nth)) ok = 0;
        shares[s] = s; /* the first selector of the same key row counts its high bits for both */
        for (t = 0; t < s && sel[s].mode == SEL_THRESHOLD; t++)
            if (sel[t].mode == SEL_THRESHOLD && (rows ? rows[t] == rows[s] : 0)) {
                shares[s] = t;
                break;
            }
    }
    if (ok) {
        run_threads(&c, job, pass_count);
        for (s = 0; s < nsel; s++) {
            if (shares[s] != s)
                memcpy(sel[s].hist_hi, sel[shares[s]].hist_hi, (size_t)job->nth * 65536 * 4);
            need_low |= sel_after_hi(&sel[s], job->nth);
        }
        if (need_low) {
            c.low = 1;
            run_threads(&c, job, pass_count);
            for (s = 0; s < nsel; s++)
                if (sel[s].mode == SEL_THRESHOLD) sel_after_lo(&sel[s], job->nth);
        }
    }
    for (s = 0; s < nsel; s++) sel_free(&sel[s]);
    return ok ? 0 : -1;
}

/* ------------------------------------------------------------------------------------------ */
/* The top-k mask of a key buffer */

typedef struct {
    job_t job;
    selector sel;
    unsigned char *mask;
} mask_job;

HOT static void mask_keys(void *p, int64_t pos, int m, uint32_t (*key)[BLOCK]) {
    mask_job *mj = (mask_job *)p;
    float v[BLOCK];
    int j;
    load_block(v, mj->job.in[0], mj->job.dt[0], pos, m);
    for (j = 0; j < m; j++) key[0][j] = order_key(v[j]);
}

HOT static void pass_mask(void *p, int tid) {
    mask_job *mj = (mask_job *)p;
    uint32_t key[1][BLOCK];
    uint64_t ties = mj->sel.tie_start[tid];
    int64_t pos;
    for (pos = mj->job.lo[tid]; pos < mj->job.lo[tid + 1]; pos += BLOCK) {
        int m = block_len(&mj->job, tid, pos);
        mask_keys(mj, pos, m, key);
        sel_block(&mj->sel, key[0], m, mj->mask + pos, &ties);
    }
}

int topk_mask_run(const void *key, int dt, int64_t n, int64_t k, unsigned char *mask, int threads) {
    mask_job *mj = (mask_job *)zalloc(sizeof(mask_job));
    int rc = -1;
    if (!mj) return -1;
    mj->job.nin = 1;
    mj->job.in[0] = key;
    mj->job.dt[0] = dt;
    mj->mask = mask;
    job_split(&mj->job, n, threads);
    sel_set_k(&mj->sel, k, n);
    if (select_thresholds(&mj->job, &mj->sel, 1, NULL, mask_keys, mj) == 0) {
        run_threads(mj, &mj->job, pass_mask);
        rc = 0;
    }
    zfree(mj, sizeof(mask_job));
    return rc;
}

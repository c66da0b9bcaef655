/* What every kernel shares: the element types and their exact conversions, the order-preserving
 * keys of selection, the block size, and the job that threads split into ranges.
 *
 * Exactness rests on three things here. Loads widen bf16/fp16 to float32 exactly; stores round
 * float32 to nearest even as torch's cast does, NaN staying NaN. The build uses
 * -ffp-contract=off, so a multiply and an add fuse only where the torch reference fuses them
 * (Tensor.add_ with alpha), through an explicit fmaf(). And keys compare as integers exactly as
 * the floats compare, so a radix select gives the masks of fusion.api.selection.
 *
 * Nothing in the kernels includes Python.h but module.c: they run with the GIL released.
 */
#ifndef FUSION_COMMON_H
#define FUSION_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(FUSION_PORTABLE)
/* Hot loops are compiled for AVX-512 and AVX2 machines too (wider vectors; fmaf() is one
 * instruction with FMA, a library call without); the loader picks the best the CPU runs.
 * -DFUSION_PORTABLE builds the baseline only. */
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif
/* Block helpers are inlined into each HOT caller, so they are vectorized for its target. */
#define INLINE static inline __attribute__((always_inline))

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
#define MAX_INPUTS 64
#define MAX_THREADS 256
/* Elements per block: a block of every input fits in L1/L2 as float32 while it is combined. */
#define BLOCK 512
/* Elements between two page releases of a thread's range (see release_upto). */
#define RELEASE_EVERY (1 << 18)

/* ------------------------------------------------------------------------------------------ */
/* Conversions */

INLINE float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

INLINE float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f), r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r); /* NaN stays quiet NaN */
}

INLINE float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
    if (e) return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    return bits_f32(sign | f32_bits((float)m * 5.9604644775390625e-8f)); /* m · 2^-24, exact */
}

INLINE uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* ≥ 65520 rounds to infinity */
    if (a >= 0x38800000u) {                                   /* a normal half */
        uint32_t h = (((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13), rest = a & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* a carry into the exponent is right */
        return (uint16_t)(sign | h);
    }
    /* subnormal half: round |f|·2^24 (exact product) to an integer, ties to even, by adding 2^23 */
    float scaled = bits_f32(a) * 16777216.0f;
    volatile float big = scaled + 8388608.0f; /* volatile: keep the rounding step */
    return (uint16_t)(sign | (uint32_t)(big - 8388608.0f));
}

INLINE int dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* m numbers of input p from element off, widened to float32 */
INLINE void load_block(float *dst, const void *p, int dt, int64_t off, int m) {
    int j;
    if (dt == DT_F32) {
        memcpy(dst, (const float *)p + off, (size_t)m * 4);
    } else if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)p + off;
        for (j = 0; j < m; j++) dst[j] = bits_f32((uint32_t)s[j] << 16);
    } else {
        const uint16_t *s = (const uint16_t *)p + off;
        for (j = 0; j < m; j++) dst[j] = f16_to_f32(s[j]);
    }
}

/* Store a block in the output dtype; return how many stored values are not finite (counted
 * after rounding: a float32 that overflows bf16/fp16 counts). */
INLINE int64_t store_block(void *p, int dt, int64_t off, const float *src, int m) {
    int64_t bad = 0;
    int j;
    if (dt == DT_F32) {
        float *d = (float *)p + off;
        for (j = 0; j < m; j++) {
            d[j] = src[j];
            bad += (f32_bits(src[j]) & 0x7f800000u) == 0x7f800000u;
        }
    } else if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)p + off;
        for (j = 0; j < m; j++) {
            uint16_t h = f32_to_bf16(src[j]);
            d[j] = h;
            bad += (h & 0x7f80u) == 0x7f80u;
        }
    } else {
        uint16_t *d = (uint16_t *)p + off;
        for (j = 0; j < m; j++) {
            uint16_t h = f32_to_f16(src[j]);
            d[j] = h;
            bad += (h & 0x7c00u) == 0x7c00u;
        }
    }
    return bad;
}

/* ------------------------------------------------------------------------------------------ */
/* Order keys: a > b as floats ⇔ key(a) > key(b) as integers. -0.0 equals 0.0, and every NaN
 * equals every other NaN and ranks above +inf, as fusion.api.selection.topk_mask has it. */

#define KEY_ZERO 0x80000000u /* the key of ±0.0 */
#define KEY_NAN 0xffc00000u

INLINE uint32_t order_key(float f) {
    uint32_t u = f32_bits(f), mag = u & 0x7fffffffu;
    uint32_t k = (u >> 31) && mag ? ~u : (mag | 0x80000000u);
    return mag > 0x7f800000u ? KEY_NAN : k;
}

/* order_key(fabsf(f)), without the branch on the sign */
INLINE uint32_t abs_key(float f) {
    uint32_t mag = f32_bits(f) & 0x7fffffffu;
    return mag > 0x7f800000u ? KEY_NAN : (mag | 0x80000000u);
}

/* ------------------------------------------------------------------------------------------ */
/* Jobs and threads (threads.c) */

/* One call of a kernel over n positions of nin flat inputs. A composition keeps its own state in
 * a struct whose first member is a job_t, so that the thread code needs to know nothing else. */
typedef struct {
    int64_t n;
    int nth;                     /* threads, set by job_split */
    int nin;                     /* inputs, the base first where there is one */
    const void *in[MAX_INPUTS];
    int dt[MAX_INPUTS];
    void *out;
    int out_dt;
    int release;                 /* the inputs are read-only file maps: drop pages once read */
    int64_t lo[MAX_THREADS + 1]; /* thread t works on [lo[t], lo[t+1]), the same in every pass */
    int64_t bad[MAX_THREADS];    /* non-finite outputs per thread */
} job_t;

/* One pass of a kernel on thread tid's range; arg is the composition's job. */
typedef void (*pass_fn)(void *arg, int tid);

/* Zeroed memory straight from the kernel (mmap): pages cost nothing until touched, and no
 * per-thread table is ever cleared by hand. NULL when out of memory. */
void *zalloc(size_t bytes);
void zfree(void *p, size_t bytes);

/* How many of `threads` threads are worth starting on n elements in `parts` indivisible parts:
 * at least 1, at most one per part and MAX_THREADS, fewer on small tensors. */
int useful_threads(int threads, int64_t parts, int64_t n);
/* lo[0..nth] = the bounds of n items split into nth ranges whose sizes differ by one at most */
void split_even(int64_t *lo, int64_t n, int nth);
/* Split [0, n) into ranges for up to `threads` threads (fewer on small tensors). */
void job_split(job_t *job, int64_t n, int threads);
/* Run fn(arg, t) for every thread t of the job, on pthreads, and wait for them. */
void run_threads(void *arg, const job_t *job, pass_fn fn);
/* run_threads for the pass that stores the output: the non-finite values its threads wrote */
int64_t run_stores(void *arg, const job_t *job, pass_fn fn);
/* Drop this process's whole pages of input `in` over elements [from, upto) (read-only file maps
 * only: the caller checks job->release). */
void release_span(const job_t *job, int in, int64_t from, int64_t upto);
/* Drop thread tid's pages of every input below `upto` (when job->release). */
void release_upto(const job_t *job, int tid, int64_t upto);

/* The length of the block at pos in thread tid's range */
INLINE int block_len(const job_t *job, int tid, int64_t pos) {
    int64_t left = job->lo[tid + 1] - pos;
    return (int)(left < BLOCK ? left : BLOCK);
}

/* Called after each block: releases pages every RELEASE_EVERY elements. */
INLINE void release_step(const job_t *job, int tid, int64_t done, int64_t *next) {
    if (done >= *next) {
        release_upto(job, tid, done);
        *next = done + RELEASE_EVERY;
    }
}

#endif

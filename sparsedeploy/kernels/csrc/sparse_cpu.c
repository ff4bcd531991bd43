/* sparsedeploy sparse-cpu kernels: y[B, N] = x[B, K] @ W.T for W stored in the "bitmask16-v2" format.
 *
 * Format (see docs/sparse_cpu.md): rows in blocks of 4 (NB = ceil(N / 4) blocks, rows past N empty),
 * G = ceil(K / 16) column groups. mask[(b * G + g) * 4 + i] (uint16, little-endian) has bit j set <=> element
 * W[4 b + i, 16 g + j] is stored. `values` holds the stored elements block by block, within a block group by
 * group, within a group row 0..3, each row's elements in column order (then 16 padding floats so vector
 * loads may read past the last element); block_ptr[b] = index in `values` of block b's first element
 * (block_ptr[NB] = nnz). A block is two sequential streams: its masks (8 bytes a group) and its values.
 *
 * Paths: batch 1 is a GEMV that expands each 16-weight group to a vector (a 256-entry permute table + vpermps;
 * on AVX-512 one masked vpermps per 16), the 4 rows of a block together. Batch 2-8 below 75 % sparsity expands
 * each group once and FMAs it into every batch row (K-blocked). Otherwise batch >= 2 uses the weight-broadcast
 * form: each row's stored elements are decoded into column offsets (and their values gathered into a
 * contiguous run), then each weight is broadcast and multiplied into the activations of the whole batch
 * (x transposed to [K, Bp]), so zero weights cost nothing.
 * A portable plain-C path compiles anywhere. ISA is picked at run time (__builtin_cpu_supports on x86).
 * Threads: a persistent pool; blocks are split into contiguous chunks of equal work (stored elements +
 * groups), a few per thread, claimed dynamically (robust when the OS runs other work on the same cores).
 * Also here: the two small elementwise steps a LLaMA-style decoder has between its linears (residual add +
 * RMSNorm, SiLU(gate) * up), which onnx/fused_segment.py hands over instead of an ONNX Runtime call.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* -DSDK_PORTABLE_ONLY builds only the plain-C path (what a non-x86 CPU gets; used by a test on x86). */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(SDK_PORTABLE_ONLY)
#define SDK_X86 1
#include <immintrin.h>
#else
#define SDK_X86 0
#endif

#define SDK_EXPORT __attribute__((visibility("default")))

enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };
enum { ERR_ISA = -2, ERR_ARGS = -1, ERR_NOMEM = -3 };
#define SDK_MAX_THREADS 64
#define SDK_CHUNKS_PER_THREAD 4
#define SDK_MAX_CHUNKS (SDK_MAX_THREADS * SDK_CHUNKS_PER_THREAD)
#define SDK_ROWS 4 /* rows per block of the format */
#define SDK_EXPAND_MAX_B 8
/* x transposed is walked in K blocks of about SDK_XBLOCK_BYTES at density >= 0.3, larger in proportion below that
 * (up to 4x): 48 KB (mostly L1) measured 1.10-1.25x faster than 192 KB (L2) at batch 64 and 128, 50 and 70 %,
 * one thread, cold 1B-like shapes (24 and 96 KB in between), but at 90 % a row has too few stored elements in
 * such a block and 192 KB was faster */
#define SDK_XBLOCK_BYTES (48 * 1024)
#define SDK_XBLOCK_DENSITY 0.3
#define SDK_BLOCK_TILE 8               /* blocks (32 rows) whose outputs stay in L1 while the K blocks go by */
#define SDK_ROW_TILE (SDK_BLOCK_TILE * SDK_ROWS)
#define SDK_EXPAND_XBLOCK_BYTES (16 * 1024) /* expand form: the K block of all batch rows of x (stays in L1) */

static inline int64_t expand_block_groups(int64_t b) {
    const int64_t kb = SDK_EXPAND_XBLOCK_BYTES / (b * 16 * (int64_t)sizeof(float));
    return kb < 1 ? 1 : kb;
}
static double expand_max_sparsity = 0.75; /* small batches use the expand form up to this sparsity */

typedef struct {
    const float *x;           /* batch 1: padded x [G*16]; batch >= 2: x transposed [K, bp] */
    const uint16_t *mask;     /* [NB, G, 4] */
    const float *values;      /* [nnz + 16] */
    const int64_t *block_ptr; /* [NB + 1] */
    float *y;                 /* [B, N] */
    int64_t n, nb, k, g, b, bp;
    int64_t xs;               /* expand forms: row stride of the padded x copy */
    int isa;
    int expand_batch;         /* 2 <= b <= SDK_EXPAND_MAX_B: expand each weight group once, FMA it into every batch row */
    atomic_int *failed;       /* set when a worker could not allocate its scratch */
    int nchunks;
    int64_t bounds[SDK_MAX_CHUNKS + 1]; /* chunk c is blocks [bounds[c], bounds[c + 1]) */
} job_t;

/* The 4 rows' masks of group g of block blk, row i in bits 16 i .. 16 i + 15. */
static inline uint64_t group_masks(const job_t *j, int64_t blk, int64_t g) {
    uint64_t mm;
    memcpy(&mm, j->mask + (blk * j->g + g) * SDK_ROWS, sizeof mm);
    return mm;
}
static inline unsigned row_mask(uint64_t mm, int i) { return (unsigned)(mm >> (16 * i)) & 0xffffu; }
/* Stored elements of the rows before row i in a group (where row i's elements start). */
static inline int64_t before_row(uint64_t mm, int i) { return __builtin_popcountll(mm & ((1ull << (16 * i)) - 1)); }
/* Cold weights: the hardware prefetchers alone left the expand kernels waiting on memory (measured, one thread,
 * 1B-like shapes at 70 %: batch 1 1.06-1.39x faster with this, 2048 x 5632, whose x no longer stays in L1, gains
 * most; batch 8 1.07-1.18x; neutral at 50 and 90 %).
 * The values are fetched non-temporally (used once), the masks normally. */
#define SDK_PREFETCH_VALUES_BYTES 2048
#define SDK_PREFETCH_MASK_BYTES 512
static inline void prefetch_ahead(const float *v, const uint16_t *m) {
    __builtin_prefetch((const char *)v + SDK_PREFETCH_VALUES_BYTES, 0, 0);
    __builtin_prefetch((const char *)m + SDK_PREFETCH_MASK_BYTES, 0, 3);
}
static inline int rows_in_block(const job_t *j, int64_t blk) {
    const int64_t left = j->n - blk * SDK_ROWS;
    return left < SDK_ROWS ? (int)left : SDK_ROWS;
}

/* ------------------------------------------------------------------------------------------------ portable */

static void gemv_portable(const job_t *j, int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; blk++) {
        const float *v = j->values + j->block_ptr[blk];
        float acc[SDK_ROWS] = {0};
        for (int64_t g = 0; g < j->g; g++) {
            const uint64_t mm = group_masks(j, blk, g);
            const float *xg = j->x + g * 16;
            prefetch_ahead(v, j->mask + (blk * j->g + g) * SDK_ROWS);
            for (int i = 0; i < SDK_ROWS; i++) {
                unsigned bits = row_mask(mm, i);
                while (bits) {
                    acc[i] += *v++ * xg[__builtin_ctz(bits)];
                    bits &= bits - 1;
                }
            }
        }
        for (int i = 0; i < rows_in_block(j, blk); i++) j->y[blk * SDK_ROWS + i] = acc[i];
    }
}

/* Small batch, expand form: x padded [b, G*16]; each stored element is read once and used for every batch row. */
static void gemvb_portable(const job_t *j, int64_t b0, int64_t b1) {
    const int64_t S = j->xs;
    for (int64_t blk = b0; blk < b1; blk++) {
        const float *v = j->values + j->block_ptr[blk];
        float acc[SDK_ROWS][SDK_EXPAND_MAX_B] = {{0}};
        for (int64_t g = 0; g < j->g; g++) {
            const uint64_t mm = group_masks(j, blk, g);
            for (int i = 0; i < SDK_ROWS; i++) {
                unsigned bits = row_mask(mm, i);
                while (bits) {
                    const int64_t col = g * 16 + __builtin_ctz(bits);
                    const float w = *v++;
                    for (int64_t b = 0; b < j->b; b++) acc[i][b] += w * j->x[b * S + col];
                    bits &= bits - 1;
                }
            }
        }
        for (int i = 0; i < rows_in_block(j, blk); i++)
            for (int64_t b = 0; b < j->b; b++) j->y[b * j->n + blk * SDK_ROWS + i] = acc[i][b];
    }
}

/* Decode row i of block blk in groups [g0, g1) (v: the block's values at group g0): the x offsets col * bp of
 * its stored elements into off, their values into val (contiguous). Returns the count. */
static int64_t decode_row_portable(const job_t *j, int64_t blk, int i, int64_t g0, int64_t g1, const float *v,
                                   int32_t *off, float *val) {
    int64_t c = 0;
    for (int64_t g = g0; g < g1; g++) {
        const uint64_t mm = group_masks(j, blk, g);
        const float *vr = v + before_row(mm, i);
        unsigned bits = row_mask(mm, i);
        while (bits) {
            off[c] = (int32_t)((g * 16 + __builtin_ctz(bits)) * j->bp);
            val[c++] = *vr++;
            bits &= bits - 1;
        }
        v += __builtin_popcountll(mm);
    }
    return c;
}

/* One row's contribution from c decoded elements (values v, x offsets off) to its batch vector yt [bp]
 * (set on the first K block, accumulated on later ones). */
static void gemm_row_portable(const job_t *j, const float *v, const int32_t *off, int64_t c, float *yt, int add) {
    if (!add) memset(yt, 0, (size_t)j->bp * sizeof(float));
    for (int64_t i = 0; i < c; i++) {
        const float w = v[i];
        const float *xp = j->x + off[i];
        for (int64_t b = 0; b < j->b; b++) yt[b] += w * xp[b];
    }
}

#if SDK_X86
/* ------------------------------------------------------------------------------------------------ AVX2 */

/* perm[m][i]: for lane i of an 8-weight group with mask byte m, the index into the packed values of that
 * lane's element, with the sign bit set when the lane is stored (blendv keeps it) and clear when it is zero.
 * comp[m][i]: the position of the i-th set bit of m (for decoding columns). */
static int32_t perm_table[256][8] __attribute__((aligned(32)));
static int32_t comp_table[256][8] __attribute__((aligned(32)));
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void init_tables(void) {
    for (int m = 0; m < 256; m++) {
        int c = 0;
        for (int i = 0; i < 8; i++) {
            if (m >> i & 1) {
                perm_table[m][i] = (int32_t)(0x80000000u | (uint32_t)c);
                comp_table[m][c] = i;
                c++;
            } else {
                perm_table[m][i] = 0;
            }
        }
        for (; c < 8; c++) comp_table[m][c] = 0;
    }
}

__attribute__((target("avx2,fma,popcnt"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,popcnt"))) static inline __m256 expand8(const float **v, unsigned byte) {
    __m256i idx = _mm256_load_si256((const __m256i *)perm_table[byte]);
    __m256 w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(*v), idx);
    *v += __builtin_popcount(byte);
    return _mm256_blendv_ps(_mm256_setzero_ps(), w, _mm256_castsi256_ps(idx));
}

/* Batch 1: the 4 rows of a block together (4 accumulator chains share each x vector); the block's values are one
 * sequential stream. GROUP(acc, BB, v, mg, xg, S) does one row's group (advancing v) for BB = 1. */
#define DEF_GEMV(NAME, TARGET, VEC, PFX, HSUM, GROUP)                                                        \
    __attribute__((target(TARGET))) static void NAME(const job_t *j, int64_t b0, int64_t b1) {               \
        const int64_t G = j->g;                                                                              \
        for (int64_t blk = b0; blk < b1; blk++) {                                                            \
            const float *v = j->values + j->block_ptr[blk];                                                  \
            VEC a0[1] = {PFX##_setzero_ps()}, a1[1] = {a0[0]}, a2[1] = {a0[0]}, a3[1] = {a0[0]};             \
            for (int64_t g = 0; g < G; g++) {                                                                \
                const uint64_t mm = group_masks(j, blk, g);                                                  \
                const unsigned k0 = (unsigned)mm & 0xffffu, k1 = (unsigned)(mm >> 16) & 0xffffu;             \
                const unsigned k2 = (unsigned)(mm >> 32) & 0xffffu, k3 = (unsigned)(mm >> 48);               \
                const float *xg = j->x + g * 16;                                                             \
                prefetch_ahead(v, j->mask + (blk * G + g) * SDK_ROWS);                                      \
                const float *p0 = v, *p1 = v + __builtin_popcount(k0);                                       \
                const float *p2 = p1 + __builtin_popcount(k1), *p3 = p2 + __builtin_popcount(k2);            \
                GROUP(a0, 1, p0, k0, xg, 0);                                                                 \
                GROUP(a1, 1, p1, k1, xg, 0);                                                                 \
                GROUP(a2, 1, p2, k2, xg, 0);                                                                 \
                GROUP(a3, 1, p3, k3, xg, 0);                                                                 \
                v = p3;                                                                                      \
            }                                                                                                \
            float out[SDK_ROWS] = {HSUM(a0[0]), HSUM(a1[0]), HSUM(a2[0]), HSUM(a3[0])};                       \
            for (int i = 0; i < rows_in_block(j, blk); i++) j->y[blk * SDK_ROWS + i] = out[i];               \
        }                                                                                                    \
    }

/* Small batch, expand form, K-blocked so the block of x rows stays in L1: per tile of blocks, per K block, each
 * row's 16-weight groups are expanded once and FMA'd into all BB batch rows; partial sums add into y.
 * GROUP(acc, BB, v, mg, xg, S) does one group (mask mg, x at xg for batch row 0, batch rows S floats apart). */
#define DEF_GEMVB(NAME, TARGET, VEC, PFX, HSUM, GROUP, BB)                                                   \
    __attribute__((target(TARGET))) static void NAME##_##BB(const job_t *j, int64_t b0, int64_t b1) {         \
        const int64_t G = j->g, S = j->xs, kb = expand_block_groups(BB);                                     \
        int64_t cur[SDK_BLOCK_TILE];                                                                         \
        for (int64_t t0 = b0; t0 < b1; t0 += SDK_BLOCK_TILE) {                                               \
            const int64_t t1 = t0 + SDK_BLOCK_TILE < b1 ? t0 + SDK_BLOCK_TILE : b1;                          \
            for (int64_t blk = t0; blk < t1; blk++) cur[blk - t0] = j->block_ptr[blk];                       \
            for (int64_t g0 = 0; g0 < G; g0 += kb) {                                                         \
                const int64_t g1 = g0 + kb < G ? g0 + kb : G;                                                \
                for (int64_t blk = t0; blk < t1; blk++) {                                                    \
                    const float *vb = j->values + cur[blk - t0];                                             \
                    const int rows = rows_in_block(j, blk);                                                  \
                    for (int i = 0; i < rows; i++) {                                                         \
                        const float *v = vb;                                                                 \
                        VEC acc[BB];                                                                         \
                        for (int b = 0; b < BB; b++) acc[b] = PFX##_setzero_ps();                            \
                        for (int64_t g = g0; g < g1; g++) {                                                  \
                            const uint64_t mm = group_masks(j, blk, g);                                      \
                            const float *p = v + before_row(mm, i);                                          \
                            prefetch_ahead(v, j->mask + (blk * G + g) * SDK_ROWS);                          \
                            GROUP(acc, BB, p, row_mask(mm, i), j->x + g * 16, S);                            \
                            v += __builtin_popcountll(mm);                                                   \
                        }                                                                                    \
                        if (i == 0) cur[blk - t0] += v - vb;                                                 \
                        const int64_t r = blk * SDK_ROWS + i;                                                \
                        for (int b = 0; b < BB; b++)                                                         \
                            j->y[b * j->n + r] = (g0 ? j->y[b * j->n + r] : 0.0f) + HSUM(acc[b]);            \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }
#define GROUP_AVX2(acc, BB, v, mg, xg, S)                                                                    \
    do {                                                                                                     \
        const __m256 wl = expand8(&v, (mg) & 0xff), wh = expand8(&v, (mg) >> 8);                             \
        for (int b = 0; b < BB; b++) {                                                                       \
            acc[b] = _mm256_fmadd_ps(wl, _mm256_loadu_ps((xg) + b * (S)), acc[b]);                            \
            acc[b] = _mm256_fmadd_ps(wh, _mm256_loadu_ps((xg) + b * (S) + 8), acc[b]);                        \
        }                                                                                                    \
    } while (0)
#define DEF_GEMVB_AVX2(BB) DEF_GEMVB(gemvb_avx2, "avx2,fma,popcnt", __m256, _mm256, hsum256, GROUP_AVX2, BB)
DEF_GEMV(gemv_avx2, "avx2,fma,popcnt", __m256, _mm256, hsum256, GROUP_AVX2)
DEF_GEMVB_AVX2(2)
DEF_GEMVB_AVX2(3)
DEF_GEMVB_AVX2(4)
DEF_GEMVB_AVX2(5)
DEF_GEMVB_AVX2(6)
DEF_GEMVB_AVX2(7)
DEF_GEMVB_AVX2(8)

__attribute__((target("avx2,fma,popcnt"))) static int64_t decode_row_avx2(const job_t *j, int64_t blk, int i,
                                                                           int64_t g0, int64_t g1, const float *v,
                                                                           int32_t *off, float *val) {
    const __m256i stride = _mm256_set1_epi32((int32_t)j->bp);
    int64_t c = 0;
    for (int64_t g = g0; g < g1; g++) {
        const uint64_t mm = group_masks(j, blk, g);
        const float *vr = v + before_row(mm, i);
        const unsigned k = row_mask(mm, i);
        _mm256_storeu_ps(val + c, _mm256_loadu_ps(vr)); /* 16 floats; only popcount(k) of them are kept */
        _mm256_storeu_ps(val + c + 8, _mm256_loadu_ps(vr + 8));
        for (int h = 0; h < 2; h++) {
            unsigned byte = (k >> (8 * h)) & 0xff;
            __m256i col = _mm256_add_epi32(_mm256_load_si256((const __m256i *)comp_table[byte]),
                                           _mm256_set1_epi32((int32_t)(g * 16 + h * 8)));
            _mm256_storeu_si256((__m256i *)(off + c), _mm256_mullo_epi32(col, stride));
            c += __builtin_popcount(byte);
        }
        v += __builtin_popcountll(mm);
    }
    return c;
}
/* One row's decoded elements into T vectors of W batch lanes (PFX: _mm256 for W = 8, _mm512 for W = 16), with U
 * independent partial sums (to hide FMA latency when T is small); accumulates onto `out` when `add`. */
#define GEMM_BODY(VEC, PFX, W, T, U)                                                                         \
    do {                                                                                                     \
        VEC acc[U][T];                                                                                       \
        for (int u = 0; u < U; u++)                                                                          \
            for (int t = 0; t < T; t++) acc[u][t] = PFX##_setzero_ps();                                      \
        if (add)                                                                                             \
            for (int t = 0; t < T; t++) acc[0][t] = PFX##_loadu_ps(out + W * t);                             \
        int64_t i = 0;                                                                                       \
        for (; i + U <= c; i += U)                                                                           \
            for (int u = 0; u < U; u++) {                                                                    \
                const VEC w = PFX##_set1_ps(v[i + u]);                                                       \
                const float *xp = xb + off[i + u];                                                           \
                for (int t = 0; t < T; t++) acc[u][t] = PFX##_fmadd_ps(w, PFX##_loadu_ps(xp + W * t), acc[u][t]); \
            }                                                                                                \
        for (; i < c; i++) {                                                                                 \
            const VEC w = PFX##_set1_ps(v[i]);                                                               \
            const float *xp = xb + off[i];                                                                   \
            for (int t = 0; t < T; t++) acc[0][t] = PFX##_fmadd_ps(w, PFX##_loadu_ps(xp + W * t), acc[0][t]); \
        }                                                                                                    \
        for (int u = 1; u < U; u++)                                                                          \
            for (int t = 0; t < T; t++) acc[0][t] = PFX##_add_ps(acc[0][t], acc[u][t]);                      \
        for (int t = 0; t < T; t++) PFX##_storeu_ps(out + W * t, acc[0][t]);                                 \
    } while (0)
#define GEMM_AVX2_BODY(T, U) GEMM_BODY(__m256, _mm256, 8, T, U)
#define GEMM_AVX512_BODY(T, U) GEMM_BODY(__m512, _mm512, 16, T, U)

__attribute__((target("avx2,fma,popcnt"))) static void gemm_row_avx2(const job_t *j, const float *v,
                                                                       const int32_t *off, int64_t c, float *yt,
                                                                       int add) {
    {
        for (int64_t b0 = 0; b0 < j->b; b0 += 64) {
            float *out = yt + b0;
            const int64_t nb = j->b - b0 < 64 ? j->b - b0 : 64;
            const float *xb = j->x + b0;
            switch ((nb + 7) / 8) {
            case 1: GEMM_AVX2_BODY(1, 4); break;
            case 2: GEMM_AVX2_BODY(2, 2); break;
            case 3: GEMM_AVX2_BODY(3, 2); break;
            case 4: GEMM_AVX2_BODY(4, 1); break;
            case 5: GEMM_AVX2_BODY(5, 1); break;
            case 6: GEMM_AVX2_BODY(6, 1); break;
            case 7: GEMM_AVX2_BODY(7, 1); break;
            default: GEMM_AVX2_BODY(8, 1); break;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ AVX-512 */

/* Expand 16 packed values by the 16-bit mask k with one vpermps: the index vector is built from the two
 * mask bytes' permute-table rows (the high byte's indices shifted by popcount(low byte)); masked lanes are
 * zeroed by the permute's own write-mask. (vexpandps would do this in one instruction but runs ~5 cycles per
 * vector on AMD Zen 4; this form is faster there and about as fast on Intel.) */
__attribute__((target("avx512f,avx2,popcnt"))) static inline __m512 expand16(const float **v, unsigned k) {
    const unsigned lo = k & 0xff, hi = k >> 8;
    const int plo = __builtin_popcount(lo);
    const __m256i ilo = _mm256_load_si256((const __m256i *)perm_table[lo]);
    const __m256i ihi = _mm256_add_epi32(_mm256_load_si256((const __m256i *)perm_table[hi]), _mm256_set1_epi32(plo));
    const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(ilo), ihi, 1);
    const __m512 w = _mm512_maskz_permutexvar_ps((__mmask16)k, idx, _mm512_loadu_ps(*v));
    *v += plo + __builtin_popcount(hi);
    return w;
}


#define GROUP_AVX512(acc, BB, v, mg, xg, S)                                                                  \
    do {                                                                                                     \
        const __m512 w = expand16(&v, (mg));                                                                 \
        for (int b = 0; b < BB; b++) acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps((xg) + b * (S)), acc[b]);    \
    } while (0)
#define DEF_GEMVB_AVX512(BB)                                                                                 \
    DEF_GEMVB(gemvb_avx512, "avx512f,avx2,fma,popcnt", __m512, _mm512, _mm512_reduce_add_ps, GROUP_AVX512, BB)
DEF_GEMVB_AVX512(2)
DEF_GEMVB_AVX512(3)
DEF_GEMVB_AVX512(4)
DEF_GEMVB_AVX512(5)
DEF_GEMVB_AVX512(6)
DEF_GEMVB_AVX512(7)
DEF_GEMVB_AVX512(8)

__attribute__((target("avx512f,popcnt"))) static int64_t decode_row_avx512(const job_t *j, int64_t blk, int i,
                                                                            int64_t g0, int64_t g1, const float *v,
                                                                            int32_t *off, float *val) {
    const __m512i step = _mm512_set1_epi32((int32_t)(16 * j->bp));
    __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32((int32_t)j->bp));
    col = _mm512_add_epi32(col, _mm512_set1_epi32((int32_t)(16 * g0 * j->bp)));
    int64_t c = 0;
    for (int64_t g = g0; g < g1; g++) {
        const uint64_t mm = group_masks(j, blk, g);
        const float *vr = v + before_row(mm, i);
        const __mmask16 k = (__mmask16)row_mask(mm, i);
        _mm512_storeu_ps(val + c, _mm512_loadu_ps(vr)); /* 16 floats; only popcount(k) of them are kept */
        _mm512_storeu_si512((void *)(off + c), _mm512_maskz_compress_epi32(k, col));
        c += __builtin_popcount(k);
        col = _mm512_add_epi32(col, step);
        v += __builtin_popcountll(mm);
    }
    return c;
}

__attribute__((target("avx512f,avx2,fma,popcnt"))) static void gemm_row_avx512(const job_t *j, const float *v,
                                                                               const int32_t *off, int64_t c,
                                                                               float *yt, int add) {
    {
        for (int64_t b0 = 0; b0 < j->b; b0 += 128) {
            float *out = yt + b0;
            const int64_t nb = j->b - b0 < 128 ? j->b - b0 : 128;
            const float *xb = j->x + b0;
            if (nb <= 8) { /* one 8-lane vector holds the batch: the AVX2 body wastes no lanes */
                GEMM_AVX2_BODY(1, 4);
            } else {
                switch ((nb + 15) / 16) {
                case 1: GEMM_AVX512_BODY(1, 4); break;
                case 2: GEMM_AVX512_BODY(2, 2); break;
                case 3: GEMM_AVX512_BODY(3, 2); break;
                case 4: GEMM_AVX512_BODY(4, 1); break;
                case 5: GEMM_AVX512_BODY(5, 1); break;
                case 6: GEMM_AVX512_BODY(6, 1); break;
                case 7: GEMM_AVX512_BODY(7, 1); break;
                default: GEMM_AVX512_BODY(8, 1); break;
                }
            }
        }
    }
}
#endif /* SDK_X86 */

/* ------------------------------------------------------------------------------------------------ dispatch */

static int isa_supported(int isa) {
    if (isa == ISA_PORTABLE) return 1;
#if SDK_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    if (isa == ISA_AVX512) return __builtin_cpu_supports("avx512f") && isa_supported(ISA_AVX2);
#endif
    return 0;
}

/* Tuning hook (benchmarks): small batches (2..8) use the expand form when sparsity <= s. */
SDK_EXPORT void sdk_set_expand_max_sparsity(double s) { expand_max_sparsity = s; }

/* Bit i set <=> ISA i (ISA_PORTABLE, ISA_AVX2, ISA_AVX512) runs on this CPU. */
SDK_EXPORT int sdk_supported_isas(void) {
    int bits = 0;
    for (int isa = ISA_PORTABLE; isa <= ISA_AVX512; isa++)
        if (isa_supported(isa)) bits |= 1 << isa;
    return bits;
}

/* Batch >= 2: blocks in tiles; per tile, for each K block (a range of 16-column groups), each row's stored
 * elements in the block are decoded into x offsets and contiguous values and multiplied into the row's batch
 * vector yt (the tile's outputs, transposed); at the end of the tile yt is written to y [B, N]. */
static void gemm_rows(const job_t *j, int64_t b0, int64_t b1, int32_t *off, float *val, float *ytile) {
    const double density = (double)j->block_ptr[j->nb] / ((double)j->n * (double)j->k);
    double scale = density > 0.0 ? SDK_XBLOCK_DENSITY / density : 4.0; /* in [1, 4] */
    if (scale < 1.0) scale = 1.0;
    if (scale > 4.0) scale = 4.0;
    int64_t kb = (int64_t)(SDK_XBLOCK_BYTES * scale) / (16 * j->bp * (int64_t)sizeof(float));
    if (kb < 1) kb = 1;
    int64_t cur[SDK_BLOCK_TILE];
    for (int64_t t0 = b0; t0 < b1; t0 += SDK_BLOCK_TILE) {
        const int64_t t1 = t0 + SDK_BLOCK_TILE < b1 ? t0 + SDK_BLOCK_TILE : b1;
        for (int64_t blk = t0; blk < t1; blk++) cur[blk - t0] = j->block_ptr[blk];
        for (int64_t g0 = 0; g0 < j->g; g0 += kb) {
            const int64_t g1 = g0 + kb < j->g ? g0 + kb : j->g;
            for (int64_t blk = t0; blk < t1; blk++) {
                const float *v = j->values + cur[blk - t0];
                int64_t span = 0; /* the block's elements in this K block: its rows' counts (rows past N have none) */
                for (int i = 0; i < rows_in_block(j, blk); i++) {
                    float *yt = ytile + ((blk - t0) * SDK_ROWS + i) * j->bp;
                    int64_t c;
#if SDK_X86
                    if (j->isa == ISA_AVX512) {
                        c = decode_row_avx512(j, blk, i, g0, g1, v, off, val);
                        gemm_row_avx512(j, val, off, c, yt, g0 > 0);
                    } else if (j->isa == ISA_AVX2) {
                        c = decode_row_avx2(j, blk, i, g0, g1, v, off, val);
                        gemm_row_avx2(j, val, off, c, yt, g0 > 0);
                    } else
#endif
                    {
                        c = decode_row_portable(j, blk, i, g0, g1, v, off, val);
                        gemm_row_portable(j, val, off, c, yt, g0 > 0);
                    }
                    span += c;
                }
                cur[blk - t0] += span;
            }
        }
        const int64_t r0 = t0 * SDK_ROWS, r1 = t1 * SDK_ROWS < j->n ? t1 * SDK_ROWS : j->n;
        for (int64_t b = 0; b < j->b; b++) {
            float *y = j->y + b * j->n;
            for (int64_t r = r0; r < r1; r++) y[r] = ytile[(r - r0) * j->bp + b];
        }
    }
}

typedef void (*rows_fn)(const job_t *, int64_t, int64_t);
#if SDK_X86
static const rows_fn gemvb_avx2_fns[9] = {0, 0, gemvb_avx2_2, gemvb_avx2_3, gemvb_avx2_4, gemvb_avx2_5, gemvb_avx2_6,
                                          gemvb_avx2_7, gemvb_avx2_8};
static const rows_fn gemvb_avx512_fns[9] = {0, 0, gemvb_avx512_2, gemvb_avx512_3, gemvb_avx512_4, gemvb_avx512_5,
                                            gemvb_avx512_6, gemvb_avx512_7, gemvb_avx512_8};
#endif

static __thread int32_t *tl_off;
static __thread float *tl_val;
static __thread int64_t tl_off_cap;
static __thread float *tl_yt;
static __thread int64_t tl_yt_cap;

static void run_part(const job_t *j, int chunk) {
    const int64_t b0 = j->bounds[chunk], b1 = j->bounds[chunk + 1];
    if (b0 >= b1) return;
    if (j->expand_batch) {
#if SDK_X86
        if (j->isa == ISA_AVX512) { gemvb_avx512_fns[j->b](j, b0, b1); return; }
        if (j->isa == ISA_AVX2) { gemvb_avx2_fns[j->b](j, b0, b1); return; }
#endif
        gemvb_portable(j, b0, b1);
        return;
    }
    if (j->b == 1) {
#if SDK_X86
        /* AVX-512 CPUs run the 256-bit GEMV too: the 512-bit expand (one masked vpermps per group) and a
         * zero-masking 256-bit vpermps (AVX-512VL) both measured slower on Zen 4 (docs/sparse_cpu.md) */
        if (j->isa == ISA_AVX512 || j->isa == ISA_AVX2) { gemv_avx2(j, b0, b1); return; }
#endif
        gemv_portable(j, b0, b1);
        return;
    }
    const int64_t need = j->g * 16 + 16;
    if (tl_off_cap < need) {
        free(tl_off);
        free(tl_val);
        tl_off = aligned_alloc(64, (size_t)need * sizeof(int32_t) + 64);
        tl_val = aligned_alloc(64, (size_t)need * sizeof(float) + 64);
        tl_off_cap = tl_off && tl_val ? need : 0;
    }
    if (tl_yt_cap < SDK_ROW_TILE * j->bp) {
        free(tl_yt);
        tl_yt = aligned_alloc(64, (size_t)(SDK_ROW_TILE * j->bp) * sizeof(float));
        tl_yt_cap = tl_yt ? SDK_ROW_TILE * j->bp : 0;
    }
    if (!tl_off_cap || !tl_yt_cap) { atomic_store(j->failed, 1); return; }
    gemm_rows(j, b0, b1, tl_off, tl_val, tl_yt);
}

/* ------------------------------------------------------------------------------------------------ pool */

/* Work is split into chunks (contiguous row ranges of about equal work, a few per thread) that the calling
 * thread and the workers claim one at a time, so a worker the OS has not scheduled yet (other processes on
 * the same cores) delays nothing: the caller claims its chunks too. A claim is a CAS on (generation, next
 * chunk); a worker reads the job only after a successful claim, while the caller still waits for that chunk. */
typedef struct {
    pthread_mutex_t call_lock; /* one matmul at a time uses the pool */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int started;               /* worker threads running */
    int sleepers;
    atomic_uint gen;
    _Atomic uint64_t claim;    /* gen << 32 | chunk count << 16 | next chunk */
    atomic_int done;           /* chunks finished in this generation */
    const job_t *job;
} pool_t;

static pool_t pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0};

static inline void cpu_relax(void) {
#if SDK_X86
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define SPIN_NS 2000000 /* a worker spins this long for the next call before sleeping (2 ms: across the ONNX Runtime segments between a model's kernel calls) */

/* claim word: gen (32 bits) | chunk count (16) | next chunk (16); everything a claimer checks is in one word. */
static void run_chunks(unsigned gen) {
    for (;;) {
        uint64_t c = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((unsigned)(c >> 32) != gen || (c & 0xffffu) >= ((c >> 16) & 0xffffu)) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &c, c + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        run_part(pool.job, (int)(c & 0xffffu)); /* the job stays alive: the caller waits for this chunk */
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    unsigned seen = (unsigned)(uintptr_t)arg;
    for (;;) {
        int64_t t0 = now_ns();
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && now_ns() - t0 > SPIN_NS) {
                pthread_mutex_lock(&pool.lock);
                pool.sleepers++;
                while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                pool.sleepers--;
                pthread_mutex_unlock(&pool.lock);
                break;
            }
        }
        seen = g;
        run_chunks(g);
    }
    return NULL;
}

static int pool_ensure(int nthreads) {
    while (pool.started < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* the worker starts from the current generation, so it cannot miss the next one */
        const unsigned g = atomic_load(&pool.gen);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(uintptr_t)g);
        pthread_attr_destroy(&attr);
        if (rc != 0) return 0;
        pool.started++;
    }
    return 1;
}

static void pool_run(const job_t *j, int nthreads) {
    if (nthreads <= 1 || !pool_ensure(nthreads)) {
        for (int t = 0; t < j->nchunks; t++) run_part(j, t);
        return;
    }
    const unsigned g = atomic_load(&pool.gen) + 1;
    pool.job = j;
    atomic_store(&pool.done, 0);
    atomic_store_explicit(&pool.claim, (uint64_t)g << 32 | (uint64_t)j->nchunks << 16, memory_order_release);
    pthread_mutex_lock(&pool.lock);
    atomic_store_explicit(&pool.gen, g, memory_order_release);
    if (pool.sleepers) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_chunks(g);
    int spins = 0;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < j->nchunks)
        if (++spins % 256 == 0) sched_yield(); else cpu_relax();
}

/* Split blocks [0, nb) into nchunks ranges of about equal work (stored elements plus a per-block cost). */
static void balance(job_t *j, int nchunks) {
    const int64_t per_block = SDK_ROWS * j->g; /* mask decode / loop overhead, in element-equivalents */
    const double total = (double)j->block_ptr[j->nb] + (double)per_block * (double)j->nb;
    int64_t blk = 0;
    j->nchunks = nchunks;
    j->bounds[0] = 0;
    for (int t = 1; t < nchunks; t++) {
        const double target = total * t / nchunks;
        int64_t lo = blk, hi = j->nb; /* first block whose prefix work >= target */
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            if ((double)j->block_ptr[mid] + (double)per_block * mid < target) lo = mid + 1; else hi = mid;
        }
        blk = lo;
        j->bounds[t] = blk;
    }
    j->bounds[nchunks] = j->nb;
}

static float *scratch;
static int64_t scratch_cap;

/* y[b, n] = sum_k x[b, k] * W[n, k] for W in bitmask16-v2 (mask [ceil(n/4), ceil(k/16), 4], values,
 * block_ptr [ceil(n/4) + 1]). isa: 0 auto, 1 portable, 2 AVX2, 3 AVX-512. threads >= 1.
 * Returns 0, or ERR_ARGS / ERR_ISA / ERR_NOMEM. Safe to call from several threads (calls serialize). */
SDK_EXPORT int sdk_matmul(const float *x, int64_t b, int64_t k, const uint16_t *mask, const float *values,
                          const int64_t *block_ptr, int64_t n, float *y, int threads, int isa) {
    if (b < 1 || k < 1 || n < 1 || !x || !mask || !values || !block_ptr || !y || threads < 1) return ERR_ARGS;
    if (threads > SDK_MAX_THREADS) threads = SDK_MAX_THREADS;
    if (isa == ISA_AUTO)
        isa = isa_supported(ISA_AVX512) ? ISA_AVX512 : isa_supported(ISA_AVX2) ? ISA_AVX2 : ISA_PORTABLE;
    if (!isa_supported(isa)) return ERR_ISA;
#if SDK_X86
    pthread_once(&tables_once, init_tables);
#endif
    atomic_int failed = 0;
    job_t j = {.failed = &failed, .mask = mask, .values = values, .block_ptr = block_ptr, .y = y,
               .n = n, .k = k, .b = b, .isa = isa};
    j.g = (k + 15) / 16;
    j.nb = (n + SDK_ROWS - 1) / SDK_ROWS;
    j.expand_batch = b >= 2 && b <= SDK_EXPAND_MAX_B &&
                     1.0 - (double)block_ptr[j.nb] / ((double)n * (double)k) <= expand_max_sparsity;
    j.bp = b == 1 || j.expand_batch ? 1 : (b + 15) / 16 * 16;
    if ((double)j.g * 16 * (double)j.bp >= 2147483647.0) return ERR_ARGS; /* int32 offsets: callers chunk the batch */
    if (threads > j.nb) threads = (int)j.nb;
    if (threads < 1) threads = 1;

    pthread_mutex_lock(&pool.call_lock);
    /* padded x rows: stride G * 16 + 16 floats, so batch rows 4 KB apart do not share L1 sets */
    j.xs = j.g * 16 + (b > 1 ? 16 : 0);
    const int64_t need = b == 1 || j.expand_batch ? j.xs * b : j.g * 16 * j.bp;
    if (scratch_cap < need) {
        free(scratch);
        scratch = aligned_alloc(64, (size_t)need * sizeof(float) + 64);
        scratch_cap = scratch ? need : 0;
        if (!scratch) { pthread_mutex_unlock(&pool.call_lock); return ERR_NOMEM; }
    }
    if (b == 1 || j.expand_batch) { /* rows padded to G * 16 with zeros */
        for (int64_t bb = 0; bb < b; bb++) {
            memcpy(scratch + bb * j.xs, x + bb * k, (size_t)k * sizeof(float));
            memset(scratch + bb * j.xs + k, 0, (size_t)(j.xs - k) * sizeof(float));
        }
    } else { /* transpose to [K, bp] in 16 x 16 tiles; padding lanes zero */
        memset(scratch, 0, (size_t)need * sizeof(float));
        for (int64_t k0 = 0; k0 < k; k0 += 16)
            for (int64_t b0 = 0; b0 < b; b0 += 16)
                for (int64_t kk = k0; kk < k0 + 16 && kk < k; kk++)
                    for (int64_t bb = b0; bb < b0 + 16 && bb < b; bb++) scratch[kk * j.bp + bb] = x[bb * k + kk];
    }
    j.x = scratch;
    int64_t nchunks = threads == 1 ? 1 : (int64_t)threads * SDK_CHUNKS_PER_THREAD;
    if (nchunks > j.nb) nchunks = j.nb;
    balance(&j, (int)nchunks);
    pool_run(&j, threads);
    pthread_mutex_unlock(&pool.call_lock);
    return atomic_load(&failed) ? ERR_NOMEM : 0;
}

/* ------------------------------------------------------------------------------------ between the linears */

/* Residual add + RMSNorm over rows of h, in the order torch.onnx writes LLaMA's RMSNorm:
 * s = a + b; out = w * (s * (1 / sqrt(mean(s * s) + eps))). Writes s and out ([rows, h] each). */
SDK_EXPORT int sdk_add_rmsnorm(const float *a, const float *b, const float *w, int64_t rows, int64_t h, float eps,
                               float *s, float *out) {
    if (rows < 1 || h < 1 || !a || !b || !w || !s || !out) return ERR_ARGS;
    for (int64_t r = 0; r < rows; r++) {
        const float *ar = a + r * h, *br = b + r * h;
        float *sr = s + r * h, *orow = out + r * h;
        float part[8] = {0};
        int64_t i = 0;
        for (; i + 8 <= h; i += 8)
            for (int l = 0; l < 8; l++) {
                const float v = ar[i + l] + br[i + l];
                sr[i + l] = v;
                part[l] += v * v;
            }
        for (; i < h; i++) {
            const float v = ar[i] + br[i];
            sr[i] = v;
            part[0] += v * v;
        }
        const float sum = ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
        const float inv = 1.0f / sqrtf(sum / (float)h + eps);
        for (i = 0; i < h; i++) orow[i] = w[i] * (sr[i] * inv);
    }
    return 0;
}

static inline float silu_mul1(float g, float u) { return g * (1.0f / (1.0f + expf(-g))) * u; }

static void silu_mul_portable(const float *gu, int64_t rows, int64_t h, float *out) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < h; i++) out[r * h + i] = silu_mul1(gu[r * 2 * h + i], gu[r * 2 * h + h + i]);
}

#if SDK_X86
/* exp(x) for float lanes: x = n ln2 + f (ln2 in two parts), e^f by a degree-7 polynomial (the classic single-
 * precision minimax coefficients), times 2^n through the exponent bits; inputs clamped to [-87.3, 88.3], so the
 * result stays a normal float. Relative error ~1e-7 (tested against NumPy's exp). */
__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static void silu_mul_avx2(const float *gu, int64_t rows, int64_t h, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * h, *u = g + h;
        float *o = out + r * h;
        int64_t i = 0;
        for (; i + 8 <= h; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
        }
        for (; i < h; i++) o[i] = silu_mul1(g[i], u[i]);
    }
}
#endif

/* SiLU(gate) * up for gu = [gate | up] rows of 2h: out[r, i] = g * sigmoid(g) * u ([rows, h]).
 * isa as sdk_matmul's (AVX-512 CPUs run the AVX2 code). */
SDK_EXPORT int sdk_silu_mul(const float *gu, int64_t rows, int64_t h, float *out, int isa) {
    if (rows < 1 || h < 1 || !gu || !out) return ERR_ARGS;
    if (isa == ISA_AUTO) isa = isa_supported(ISA_AVX2) ? ISA_AVX2 : ISA_PORTABLE;
    if (!isa_supported(isa)) return ERR_ISA;
#if SDK_X86
    if (isa == ISA_AVX2 || isa == ISA_AVX512) {
        silu_mul_avx2(gu, rows, h, out);
        return 0;
    }
#endif
    silu_mul_portable(gu, rows, h, out);
    return 0;
}

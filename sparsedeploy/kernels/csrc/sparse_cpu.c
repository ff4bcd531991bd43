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
 * on AVX-512 one masked vpermps per 16), the 4 rows of a block together; where 4 of every 8 columns are stored (2:4,
 * 4:8) it gathers x to the values' places instead (sdk_matmul_4of8). Batch 2-4, and 5-8 up to 85 % sparsity
 * (96 % on AVX-512), expand each group once and FMA it into every batch row (K-blocked). Otherwise batch >= 2 uses
 * the weight-broadcast form: each row's stored elements are decoded into column offsets (and their values gathered
 * into a contiguous run), then each weight is broadcast and multiplied into the activations of the whole batch
 * (x transposed to [K, Bp]), so zero weights cost nothing.
 * sdk_rows_matmul multiplies by the row form (CSR with uint16 columns, built from this format by sdk_row_form and
 * held in memory beside it): batch 1-32 where it pays (row_form_pays below), one broadcast + FMA per
 * stored element and vector of batch lanes (batch 1: a scalar multiply-add; batches 2-8: 8 values one load, each
 * broadcast by a vpermps, ROWS8_BODY), no per-group decode.
 * sdk_tiles_matmul multiplies by the tile form (tiles of 32 rows in K blocks of 128 columns, uint8 columns within
 * the block, built by sdk_tile_form and held beside it): prefill, 64 rows of x a call, 16 tiles' rows reusing one
 * 32 KB block of x from L1 while the weight streams by once; batches up to 8 with x in 8 lanes (TILES8_BODY).
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
#include <sys/mman.h>
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
#define SDK_ROWFORM_MAX_B 32 /* the row form's largest batch (x transposed [K, 32] is 256 KB at K = 2048) */
#define SDK_ROWFORM_MAX_K 65536 /* uint16 columns */
/* The tile form (prefill): tiles of SDK_TILE_ROWS rows, each walked in K blocks of SDK_TILE_COLS columns (uint8
 * column within the block); x transposed [K, SDK_TILE_LANES], one 32 KB K block of it (128 columns x 64 lanes) stays
 * in L1 while the tile's rows go by. Measured against other shapes on Emerald Rapids (docs/sparse_cpu.md). */
#define SDK_TILE_ROWS 32
#define SDK_TILE_COLS 128
#define SDK_TILE_LANES 64
#define SDK_TILE_GROUP 16 /* TILES_BODY: tiles walked together K block by K block (x block reused by 512 rows) */
#define SDK_TILE_SMALL_LANES 8 /* batches up to 8: x transposed [K, 8] (decode of a few sequences) */
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
/* Batches 5-8 use the expand form up to this sparsity, batches 2-4 at any sparsity (the broadcast form's 8 lanes
 * would be half padding). Emerald Rapids, cold 5632 x 2048, one thread, expand against broadcast, batch 8:
 *   AVX-512 (expand16: one two-source permute a group): 1.35x at 90 %, 1.20x at 95 %, 0.77x at 98 %;
 *   AVX2 (expand8, forced): 0.87x at 90 %; with the older 512-bit expand 0.97x at 90 %, batch 4 1.58x at 90 %. */
static const double expand_max_sparsity_avx512 = 0.96, expand_max_sparsity_other = 0.85;
static double expand_max_sparsity_override = -1.0; /* >= 0: sdk_set_expand_max_sparsity's value, for every ISA */

typedef struct {
    const float *x;           /* batch 1 and the expand form: x as [G, B, 16], zero-padded (a group's 16 columns of
                                 every batch row together); the broadcast form: x transposed [K, bp] */
    const uint16_t *mask;     /* [NB, G, 4] */
    int four_of_eight;        /* batch 1: every byte of every row mask has 4 bits set (sdk_matmul_4of8) */
    const float *values;      /* [nnz + 16] */
    const int64_t *block_ptr; /* [NB + 1] */
    float *y;                 /* [B, N] */
    int64_t n, nb, k, g, b, bp;
    int isa;
    int expand_batch;         /* 2 <= b <= SDK_EXPAND_MAX_B: expand each weight group once, FMA it into every batch row */
    atomic_int *failed;       /* set when a worker could not allocate its scratch */
    int nchunks;
    int64_t bounds[SDK_MAX_CHUNKS + 1]; /* chunk c is blocks [bounds[c], bounds[c + 1]) */
    const int8_t *q;          /* scaled-int8 job (sdk_int8_matmul): codes, NULL for a bitmask16 job */
    const float *scales;
    const int64_t *row_ptr;   /* row-form job (sdk_rows_matmul): [N + 1]; NULL for a bitmask16 job */
    const uint16_t *cols;     /* row form: the column of each stored element */
    const int64_t *tile_ptr;  /* tile-form job (sdk_tiles_matmul): [tiles + 1]; NULL otherwise */
    const uint8_t *tile_counts; /* tile form: [tiles, K blocks, SDK_TILE_ROWS] each visited row's stored elements */
    const uint8_t *tile_rows; /* tile form: [tiles, K blocks, SDK_TILE_ROWS] the tile row visited i-th (by count) */
    const uint8_t *tile_cols; /* tile form: each stored element's column within its K block */
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
/* Cold weights: the hardware prefetchers alone leave the expand kernels waiting on memory, so each group step
 * prefetches the values ahead, and the masks 512 B ahead. How depends on the CPU (the profile, chosen from the
 * vendor at the first call; sdk_set_cpu_profile overrides), each measured (docs/sparse_cpu.md):
 *   AMD (Zen 4): values 2 KB ahead, non-temporal (prefetchnta): batch 1 1.06-1.39x faster than no prefetch.
 *   Intel (Emerald Rapids): values 4 KB ahead into all levels (prefetcht0): there prefetchnta made batch 1 *slower*
 *   than dense (0.94x at 70 %) and t0 made it 2.1x; no software prefetch at all 1.8x. */
enum { PROFILE_UNSET = -1, PROFILE_AMD = 0, PROFILE_INTEL = 1 };
static int cpu_profile = PROFILE_UNSET;
#define SDK_PREFETCH_MASK_BYTES 512
#define SDK_PREFETCH_VALUE_BYTES 2048 /* the AMD profile's distance for a value stream; Intel's is twice it */
/* A weight stream read once (values, int8 codes), `ahead` bytes ahead as the AMD profile fetches it: non-temporal
 * there, into all levels and twice as far ahead on Intel. */
static inline void prefetch_stream(const void *p, int64_t ahead) {
    if (cpu_profile == PROFILE_INTEL)
        __builtin_prefetch((const char *)p + 2 * ahead, 0, 3);
    else
        __builtin_prefetch((const char *)p + ahead, 0, 0);
}
static inline void prefetch_ahead(const float *v, const uint16_t *m) {
    prefetch_stream(v, SDK_PREFETCH_VALUE_BYTES);
    __builtin_prefetch((const char *)m + SDK_PREFETCH_MASK_BYTES, 0, 3);
}
/* Batch >= 9 (the GEMM): a block's values and masks are walked K block by K block, 8 blocks taking turns, too
 * many streams for the hardware prefetchers; the SIMD decoders fetch 512 B ahead in the block's own streams
 * (Intel Emerald Rapids, 5632 x 2048 batch 128, one thread, against the build without it in one process:
 * 1.11-1.22x at 70 %, 1.03-1.08x at 50 and 90 %; 2048 x 5632 and batch 64 unchanged). */
#define SDK_DECODE_AHEAD 512
static inline void decode_prefetch(const job_t *j, int64_t blk, int64_t g, const float *v) {
    __builtin_prefetch((const char *)v + SDK_DECODE_AHEAD, 0, 3);
    __builtin_prefetch((const char *)(j->mask + (blk * j->g + g) * SDK_ROWS) + SDK_DECODE_AHEAD, 0, 3);
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

/* Small batch, expand form: x [G, b, 16]; each stored element is read once and used for every batch row. */
static void gemvb_portable(const job_t *j, int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; blk++) {
        const float *v = j->values + j->block_ptr[blk];
        float acc[SDK_ROWS][SDK_EXPAND_MAX_B] = {{0}};
        for (int64_t g = 0; g < j->g; g++) {
            const uint64_t mm = group_masks(j, blk, g);
            for (int i = 0; i < SDK_ROWS; i++) {
                unsigned bits = row_mask(mm, i);
                while (bits) {
                    const float *xc = j->x + g * 16 * j->b + __builtin_ctz(bits);
                    const float w = *v++;
                    for (int64_t b = 0; b < j->b; b++) acc[i][b] += w * xc[16 * b];
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

/* Row form (CSR with uint16 columns): row r's stored elements are values[row_ptr[r] .. row_ptr[r + 1]) at columns
 * cols[...]; x transposed [K, bp]. Each element is broadcast once and multiplied into the whole batch vector: one
 * FMA per stored element and vector of batch lanes, no per-group decode (what bounds the bitmask forms at high
 * sparsity and batch 1-32; docs/sparse_cpu.md). Rows [r0, r1). */
static inline void rows_store(const job_t *j, int64_t r, const float *acc) {
    for (int64_t b = 0; b < j->b; b++) j->y[b * j->n + r] = acc[b];
}
/* Rows r0 .. r0 + rows - 1 of y from their sums (row i's batch vector at sums + i * ld), batch row by batch row: each
 * batch row's outputs are consecutive in y, so they go out as one run, where a row at a time writes one float to
 * each batch row of y (N floats apart: another page every store at large N). The row-form loops collect
 * SDK_STORE_ROWS rows for it, the tile form a tile. */
#define SDK_STORE_ROWS 16
/* dst[c * ldd + r] = src[r * lds + c] for r < rows, 0 for rows <= r < rpad; c < cols. The plain loop, and (x86)
 * AVX2's 8 x 8 blocks with the plain loop for the edges: x into the transposed layouts, the sums out to y. */
static void transpose_plain(const float *src, int64_t lds, int64_t rows, int64_t rpad, int64_t cols, float *dst,
                            int64_t ldd, int64_t r0, int64_t c0) {
    for (int64_t c = 0; c < cols; c++)
        for (int64_t r = c < c0 ? r0 : 0; r < rpad; r++) dst[c * ldd + r] = r < rows ? src[r * lds + c] : 0.0f;
}
#if SDK_X86
__attribute__((target("avx2,fma,popcnt"))) static void transpose_avx2(const float *src, int64_t lds, int64_t rows,
                                                                       int64_t rpad, int64_t cols, float *dst,
                                                                       int64_t ldd) {
    const int64_t r8 = rpad / 8 * 8, c8 = cols / 8 * 8;
    for (int64_t r0 = 0; r0 < r8; r0 += 8)
        for (int64_t c0 = 0; c0 < c8; c0 += 8) {
            __m256 a[8], t[8];
            for (int i = 0; i < 8; i++)
                a[i] = r0 + i < rows ? _mm256_loadu_ps(src + (r0 + i) * lds + c0) : _mm256_setzero_ps();
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
                t[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {
                a[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
                a[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
                a[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
                a[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
            }
            for (int i = 0; i < 4; i++) {
                _mm256_storeu_ps(dst + (c0 + i) * ldd + r0, _mm256_permute2f128_ps(a[i], a[i + 4], 0x20));
                _mm256_storeu_ps(dst + (c0 + i + 4) * ldd + r0, _mm256_permute2f128_ps(a[i], a[i + 4], 0x31));
            }
        }
    transpose_plain(src, lds, rows, rpad, cols, dst, ldd, r8, c8);
}
#endif
static void transpose(int isa, const float *src, int64_t lds, int64_t rows, int64_t rpad, int64_t cols, float *dst,
                      int64_t ldd) {
#if SDK_X86
    if (isa == ISA_AVX2 || isa == ISA_AVX512) { transpose_avx2(src, lds, rows, rpad, cols, dst, ldd); return; }
#endif
    transpose_plain(src, lds, rows, rpad, cols, dst, ldd, 0, 0);
}
/* x [b, k] -> [k, bp], padding lanes zero. */
static void transpose_x(int isa, const float *x, int64_t b, int64_t k, int64_t bp, float *dst) {
    transpose(isa, x, k, b, bp, k, dst, bp);
}
static inline void store_rows(const job_t *j, int64_t r0, int rows, const float *sums, int64_t ld) {
    transpose(j->isa, sums, ld, rows, rows, j->b, j->y + r0, j->n);
}
/* Batch 1: x itself (bp = 1), a scalar multiply-add per stored element, 8 independent sums (the x loads are
 * scattered: nothing to vectorize without a gather); the value and column streams are prefetched ahead. */
#define ROWS_GEMV_BODY                                                                                       \
    do {                                                                                                     \
        const float *vals = j->values, *x = j->x;                                                            \
        const uint16_t *cols = j->cols;                                                                      \
        for (int64_t r = r0; r < r1; r++) {                                                                  \
            int64_t e = j->row_ptr[r];                                                                       \
            const int64_t e1 = j->row_ptr[r + 1];                                                            \
            float a[8] = {0};                                                                                \
            for (; e + 8 <= e1; e += 8) {                                                                    \
                prefetch_stream(vals + e, SDK_PREFETCH_VALUE_BYTES);                                         \
                prefetch_stream(cols + e, SDK_PREFETCH_VALUE_BYTES / 2);                                     \
                for (int u = 0; u < 8; u++) a[u] += vals[e + u] * x[cols[e + u]];                            \
            }                                                                                                \
            for (; e < e1; e++) a[0] += vals[e] * x[cols[e]];                                                \
            j->y[r] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));                     \
        }                                                                                                    \
    } while (0)
static void rows_gemv_portable(const job_t *j, int64_t r0, int64_t r1) { ROWS_GEMV_BODY; }

/* Portable: 8 lanes at a time (bp is a multiple of 8), a fixed-width inner loop the compiler vectorizes. */
static void rows_portable(const job_t *j, int64_t r0, int64_t r1) {
    const float *vals = j->values;
    const uint16_t *cols = j->cols;
    for (int64_t r = r0; r < r1; r++) {
        float out[SDK_ROWFORM_MAX_B];
        for (int64_t b0 = 0; b0 < j->bp; b0 += 8) {
            float acc[8] = {0};
            const float *xb = j->x + b0;
            for (int64_t e = j->row_ptr[r]; e < j->row_ptr[r + 1]; e++) {
                const float w = vals[e], *xp = xb + (int64_t)cols[e] * j->bp;
                for (int l = 0; l < 8; l++) acc[l] += w * xp[l];
            }
            memcpy(out + b0, acc, sizeof acc);
        }
        rows_store(j, r, out);
    }
}

/* Tile form (format.TileForm): tile t's stored elements start at tile_ptr[t]; within a tile, K block by K block, row by
 * row in ascending count (tile_rows gives the tile row visited i-th, tile_counts its count in the block), each
 * element's column within its block (uint8) and value. The ascending order makes the rows' loop exits predictable
 * (consecutive rows run the same number of steps): on Zen 4, one thread, against rows in tile order
 * (benchmarks/ab_sparse_cpu_builds.py, cold 1B-like shapes, 50 / 70 %), batch 8 1.04-1.08x (AVX-512) and 1.06-1.11x
 * (AVX2), batch 128 0.99-1.03x and 1.01-1.04x. x transposed [K, L] (L lanes: SDK_TILE_LANES, or
 * SDK_TILE_SMALL_LANES for batches up to 8). TILES_BODY walks
 * SDK_TILE_GROUP tiles together, K block by K block, their rows' partial sums waiting in `ytg` (128 KB at 64 lanes,
 * L2) between K blocks: each tile's weight is a sequential stream, and each 32 KB block of x is loaded into L1 once
 * for the group's 512 rows (once per tile's 32 rows before: 1.10-1.30x slower at batch 128, Zen 3; the row form's
 * columns range over all of x, 256 KB at K = 2048, from L2). A row's accumulators start from zero and its partial
 * sums are added after its elements (not loaded first): 1.004-1.023x at batch 64 / 128, 50 / 70 %, all 12 cases ahead
 * (Zen 3, one thread, benchmarks/ab_sparse_cpu_builds.py). Tiles [t0, t1). */
/* A tile row's c elements in one K block (TILES_BODY's ELEMS): each value broadcast from memory, A accumulator sets. */
#define TILE_ELEMS_BCAST(VEC, PFX, W, A, L)                                                                  \
    do {                                                                                                     \
        int e = 0;                                                                                           \
        for (; e + A <= c; e += A) {                                                                         \
            if ((e & 15) < A) prefetch_stream(v + e, SDK_PREFETCH_VALUE_BYTES / 2);                          \
            for (int a = 0; a < A; a++) {                                                                    \
                const VEC w = PFX##_set1_ps(v[e + a]);                                                       \
                const float *xp = xb + (int64_t)c8[e + a] * (L);                                             \
                for (int t_ = 0; t_ < T; t_++)                                                               \
                    acc[a][t_] = PFX##_fmadd_ps(w, PFX##_load_ps(xp + (W) * t_), acc[a][t_]);                \
            }                                                                                                \
        }                                                                                                    \
        for (; e < c; e++) {                                                                                 \
            const VEC w = PFX##_set1_ps(v[e]);                                                               \
            const float *xp = xb + (int64_t)c8[e] * (L);                                                     \
            for (int t_ = 0; t_ < T; t_++)                                                                   \
                acc[0][t_] = PFX##_fmadd_ps(w, PFX##_load_ps(xp + (W) * t_), acc[0][t_]);                    \
        }                                                                                                    \
    } while (0)
#define TILES_BODY(VEC, PFX, W, A, L, ELEMS)                                                                 \
    do {                                                                                                     \
        enum { T = (L) / (W) };                                                                              \
        const int64_t nkb = (j->k + SDK_TILE_COLS - 1) / SDK_TILE_COLS;                                      \
        for (int64_t g0 = t0; g0 < t1; g0 += SDK_TILE_GROUP) {                                               \
            const int ng = (int)(t1 - g0 < SDK_TILE_GROUP ? t1 - g0 : SDK_TILE_GROUP);                       \
            int64_t off[SDK_TILE_GROUP];                                                                     \
            for (int g = 0; g < ng; g++) off[g] = j->tile_ptr[g0 + g];                                       \
            for (int64_t kb = 0; kb < nkb; kb++) {                                                           \
                const float *xb = j->x + kb * SDK_TILE_COLS * (L);                                           \
                for (int g = 0; g < ng; g++) {                                                               \
                    const uint8_t *cnt = j->tile_counts + ((g0 + g) * nkb + kb) * SDK_TILE_ROWS;             \
                    const uint8_t *rw = j->tile_rows + ((g0 + g) * nkb + kb) * SDK_TILE_ROWS;                \
                    const uint8_t *c8 = j->tile_cols + off[g];                                               \
                    const float *v = j->values + off[g];                                                     \
                    float(*yt)[(L)] = (float(*)[(L)])(ytg + (int64_t)g * SDK_TILE_ROWS * (L));               \
                    for (int i_ = 0; i_ < SDK_TILE_ROWS; i_++) {                                             \
                        const int c = *cnt++, i = *rw++;                                                     \
                        VEC acc[A][T]; /* from zero: the FMA chains need not wait for the L2 partial sums */ \
                        for (int a = 0; a < A; a++)                                                          \
                            for (int t_ = 0; t_ < T; t_++) acc[a][t_] = PFX##_setzero_ps();                  \
                        ELEMS(VEC, PFX, W, A, L);                                                            \
                        v += c;                                                                              \
                        c8 += c;                                                                             \
                        for (int a = 1; a < A; a++)                                                          \
                            for (int t_ = 0; t_ < T; t_++)                                                   \
                                acc[0][t_] = PFX##_add_ps(acc[0][t_], acc[a][t_]);                           \
                        if (kb)                                                                              \
                            for (int t_ = 0; t_ < T; t_++)                                                   \
                                acc[0][t_] = PFX##_add_ps(acc[0][t_], PFX##_load_ps(yt[i] + (W) * t_));      \
                        for (int t_ = 0; t_ < T; t_++) PFX##_store_ps(yt[i] + (W) * t_, acc[0][t_]);         \
                    }                                                                                        \
                    off[g] = v - j->values;                                                                  \
                }                                                                                            \
            }                                                                                                \
            for (int g = 0; g < ng; g++) {                                                                   \
                const int64_t r0 = (g0 + g) * SDK_TILE_ROWS;                                                 \
                store_rows(j, r0, j->n - r0 < SDK_TILE_ROWS ? (int)(j->n - r0) : SDK_TILE_ROWS,              \
                           ytg + (int64_t)g * SDK_TILE_ROWS * (L), (L));                                     \
            }                                                                                                \
        }                                                                                                    \
    } while (0)
/* Portable: 8-lane "vectors" of plain floats, a fixed-width loop the compiler vectorizes. */
typedef struct { float f[8]; } vec8_t;
static inline vec8_t p8_setzero_ps(void) { vec8_t r = {{0}}; return r; }
static inline vec8_t p8_load_ps(const float *p) { vec8_t r; memcpy(r.f, p, sizeof r.f); return r; }
static inline void p8_store_ps(float *p, vec8_t a) { memcpy(p, a.f, sizeof a.f); }
static inline vec8_t p8_set1_ps(float w) { vec8_t r; for (int l = 0; l < 8; l++) r.f[l] = w; return r; }
static inline vec8_t p8_fmadd_ps(vec8_t w, vec8_t x, vec8_t a) {
    for (int l = 0; l < 8; l++) a.f[l] += w.f[l] * x.f[l];
    return a;
}
static inline vec8_t p8_add_ps(vec8_t a, vec8_t b) {
    for (int l = 0; l < 8; l++) a.f[l] += b.f[l];
    return a;
}
static void tiles_portable(const job_t *j, int64_t t0, int64_t t1, float *ytg) {
    if (j->bp == SDK_TILE_SMALL_LANES) TILES_BODY(vec8_t, p8, 8, 4, SDK_TILE_SMALL_LANES, TILE_ELEMS_BCAST);
    else TILES_BODY(vec8_t, p8, 8, 1, SDK_TILE_LANES, TILE_ELEMS_BCAST);
}

#if SDK_X86
/* ------------------------------------------------------------------------------------------------ AVX2 */

/* perm[m][i]: for lane i of an 8-weight group with mask byte m, the index into the packed values of that
 * lane's element, with the sign bit set when the lane is stored (blendv keeps it) and clear when it is zero.
 * comp[m][i]: the position of the i-th set bit of m (for decoding columns). */
static int32_t perm_table[256][8] __attribute__((aligned(32)));
static int32_t comp_table[256][8] __attribute__((aligned(32)));
/* The first 4 set bits' lanes of a byte (quad_hi: + 8, the lanes of a group's second half): the 4-of-8 GEMV. */
static int32_t quad_lo[256][4] __attribute__((aligned(16))), quad_hi[256][4] __attribute__((aligned(16)));
/* expand_table[m]: lanes 0-7, for a 16-weight group whose low mask byte is m, the two-source permute index of each
 * lane (16 + its element's place in the packed values when stored, 0 (a zero register's lane) when not); lanes
 * 8-15 popcount(m), the offset of the high byte's elements. Lanes 0-7 of the high byte's row serve as its indices. */
static int32_t expand_table[256][16] __attribute__((aligned(64)));
/* gather8_table[m][i], i < popcount(m): 0x80 | the lane of m's i-th set bit (sign-extended to int32: the sign bit
 * the blend's "keep this lane", the low 3 bits vpermps's source lane); 0 past the count (the lane blended to zero). */
static int8_t gather8_table[256][8] __attribute__((aligned(64)));
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void init_tables(void) {
    for (int m = 0; m < 256; m++) {
        int c = 0;
        for (int i = 0; i < 8; i++) {
            if (m >> i & 1) {
                perm_table[m][i] = (int32_t)(0x80000000u | (uint32_t)c);
                comp_table[m][c] = i;
                gather8_table[m][c] = (int8_t)(0x80 | i);
                c++;
            } else {
                perm_table[m][i] = 0;
            }
        }
        for (; c < 8; c++) comp_table[m][c] = gather8_table[m][c] = 0;
        for (c = 0; c < 4; c++) quad_lo[m][c] = quad_hi[m][c] = 0;
        c = 0;
        for (int i = 0; i < 8 && c < 4; i++)
            if (m >> i & 1) {
                quad_lo[m][c] = i;
                quad_hi[m][c++] = i + 8;
            }
        c = 0;
        for (int i = 0; i < 8; i++) expand_table[m][i] = m >> i & 1 ? 16 + c++ : 0;
        for (int i = 8; i < 16; i++) expand_table[m][i] = c;
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

/* The expand form walks the K blocks of a tile's blocks in turn, so the data it reads next is not next in memory:
 * where the step after block blk's K block [g0, g1) starts (the tile's next block, its first block at the next K
 * block, or the next tile), for the walk of blk to prefetch at the same offsets (*nv and *nm keep the caller's value
 * where the next step is this same block, a one-block tile, or there is none). Emerald Rapids, cold 5632 x 2048, one
 * thread, against prefetching the block's own stream ahead: batch 8 1.19-1.23x at 70 %, 1.10-1.17x at 50 %,
 * batch 4 1.14-1.17x (AVX-512; not measured on AMD). */
static inline void next_step(const job_t *j, const int64_t *cur, int64_t t0, int64_t t1, int64_t b1, int64_t blk,
                             int64_t g0, int64_t g1, const float **nv, const uint16_t **nm) {
    if (blk + 1 < t1) {
        *nv = j->values + cur[blk + 1 - t0];
        *nm = j->mask + ((blk + 1) * j->g + g0) * SDK_ROWS;
    } else if (g1 < j->g && t1 - t0 > 1) {
        *nv = j->values + cur[0];
        *nm = j->mask + (t0 * j->g + g1) * SDK_ROWS;
    } else if (g1 >= j->g && t1 < b1) {
        *nv = j->values + j->block_ptr[t1];
        *nm = j->mask + t1 * j->g * SDK_ROWS;
    }
}
/* Step dg of a walk, dv values into its K block: the next step's values (64 floats on) and masks at the same place. */
static inline void prefetch_next(const float *nv, const uint16_t *nm, int64_t dv, int64_t dg) {
    __builtin_prefetch(nv + dv + 64, 0, 3);
    __builtin_prefetch(nm + dg * SDK_ROWS, 0, 3);
}

/* Small batch, expand form, K-blocked so the block of x stays in L1: per tile of blocks, per K block, R rows of a
 * block at a time walk the K block's groups; each row's 16-weight group is expanded once and FMA'd into all BB batch
 * rows, and each x vector is loaded once for the R rows (x is [G, BB, 16]: one pointer, constant offsets). R * BB
 * accumulators stay in registers. STEP(acc, R, BB, p, ms, xg) does one group: rows 0..R-1 of the pass have masks
 * ms >> 16 r, their values start at p. (Emerald Rapids, batch 8, cold 1B-like shapes, one thread, against one row
 * per pass with x rows 8 KB apart: 1.1-1.4x at 50-70 %, batch 4 1.5x at 70 %.)
 * Between K blocks a pass's accumulators wait in `part` (the tile's rows, one vector per batch row), and only the
 * last K block reduces them to y: reducing every K block (16 horizontal sums and a y update per pass of 32 groups)
 * took ~12 % of the batch 8 call (Emerald Rapids, warm 512 x 1024, 50 %). EXPAND_PASS is one pass of rows I..I+R-1
 * with I a constant (the first row's offset folds away), the next step's prefetch only on the first pass (PF). */
#define EXPAND_PASS(STEP, R, BB, I, PF)                                                                      \
    do {                                                                                                     \
        v = vb;                                                                                              \
        for (int64_t g = g0; g < g1; g++) {                                                                  \
            const uint64_t mm = group_masks(j, blk, g);                                                      \
            if (PF) prefetch_next(nv, nm, v - vb, g - g0);                                                   \
            const float *p = v + before_row(mm, I);                                                          \
            STEP(acc, R, BB, p, mm >> (16 * (I)), j->x + g * 16 * BB);                                       \
            v += __builtin_popcountll(mm);                                                                   \
        }                                                                                                    \
    } while (0)
#define DEF_GEMVB(NAME, TARGET, VEC, PFX, HSUM, STEP, BB, R)                                                 \
    __attribute__((target(TARGET))) static void NAME##_##BB(const job_t *j, int64_t b0, int64_t b1) {         \
        const int64_t G = j->g, kb = expand_block_groups(BB);                                                \
        int64_t cur[SDK_BLOCK_TILE];                                                                         \
        VEC part[SDK_ROW_TILE][BB];                                                                          \
        for (int64_t t0 = b0; t0 < b1; t0 += SDK_BLOCK_TILE) {                                               \
            const int64_t t1 = t0 + SDK_BLOCK_TILE < b1 ? t0 + SDK_BLOCK_TILE : b1;                          \
            for (int64_t blk = t0; blk < t1; blk++) cur[blk - t0] = j->block_ptr[blk];                       \
            for (int64_t g0 = 0; g0 < G; g0 += kb) {                                                         \
                const int64_t g1 = g0 + kb < G ? g0 + kb : G;                                                \
                for (int64_t blk = t0; blk < t1; blk++) {                                                    \
                    const float *vb = j->values + cur[blk - t0], *v = vb;                                    \
                    const int rows = rows_in_block(j, blk);                                                  \
                    /* the next step's data; a one-block tile goes on in its own stream, Intel's distance */ \
                    const float *nv = vb + 2 * SDK_PREFETCH_VALUE_BYTES / sizeof(float);                     \
                    const uint16_t *nm =                                                                     \
                        j->mask + (blk * G + g0) * SDK_ROWS + SDK_PREFETCH_MASK_BYTES / sizeof(uint16_t);    \
                    next_step(j, cur, t0, t1, b1, blk, g0, g1, &nv, &nm);                                    \
                    for (int i = 0; i < rows; i += R) {                                                      \
                        VEC acc[R][BB];                                                                      \
                        VEC *pr = part[(blk - t0) * SDK_ROWS + i];                                           \
                        for (int r = 0; r < R; r++)                                                          \
                            for (int b = 0; b < BB; b++) acc[r][b] = g0 ? pr[r * BB + b] : PFX##_setzero_ps(); \
                        switch (i) {                                                                         \
                        case 0: EXPAND_PASS(STEP, R, BB, 0, 1); break;                                       \
                        case 1: EXPAND_PASS(STEP, R, BB, 1, 0); break;                                       \
                        case 2: EXPAND_PASS(STEP, R, BB, 2, 0); break;                                       \
                        default: EXPAND_PASS(STEP, R, BB, 3, 0); break;                                      \
                        }                                                                                    \
                        if (g1 < G) {                                                                        \
                            for (int r = 0; r < R; r++)                                                      \
                                for (int b = 0; b < BB; b++) pr[r * BB + b] = acc[r][b];                     \
                            continue;                                                                        \
                        }                                                                                    \
                        for (int r = 0; r < R && i + r < rows; r++)                                          \
                            for (int b = 0; b < BB; b++)                                                     \
                                j->y[b * j->n + blk * SDK_ROWS + i + r] = HSUM(acc[r][b]);                   \
                    }                                                                                        \
                    cur[blk - t0] += v - vb;                                                                 \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }
/* Keeps a loaded vector in a register: GCC otherwise folds the load into each FMA that uses it (R loads of one x
 * vector instead of one; loads are what bound these loops). */
#define IN_REGISTER(vec) __asm__("" : "+v"(vec))
#define GROUP_AVX2(acc, BB, v, mg, xg, S)                                                                    \
    do {                                                                                                     \
        const __m256 wl = expand8(&v, (mg) & 0xff), wh = expand8(&v, (mg) >> 8);                             \
        for (int b = 0; b < BB; b++) {                                                                       \
            acc[b] = _mm256_fmadd_ps(wl, _mm256_loadu_ps((xg) + b * (S)), acc[b]);                            \
            acc[b] = _mm256_fmadd_ps(wh, _mm256_loadu_ps((xg) + b * (S) + 8), acc[b]);                        \
        }                                                                                                    \
    } while (0)
/* The expand form's group step, AVX2 (16 registers: R = 2 up to batch 4, else 1): each row's group is two 8-lane
 * halves, each x vector two loads. */
#define STEP_AVX2(acc, R, BB, p, ms, xg)                                                                     \
    do {                                                                                                     \
        __m256 wl[R], wh[R];                                                                                 \
        for (int r = 0; r < R; r++) {                                                                        \
            const unsigned m = row_mask(ms, r);                                                              \
            wl[r] = expand8(&p, m & 0xff);                                                                   \
            wh[r] = expand8(&p, m >> 8);                                                                     \
        }                                                                                                    \
        for (int b = 0; b < BB; b++) {                                                                       \
            __m256 xl = _mm256_load_ps((xg) + 16 * b), xh = _mm256_load_ps((xg) + 16 * b + 8);               \
            IN_REGISTER(xl);                                                                                 \
            IN_REGISTER(xh);                                                                                 \
            for (int r = 0; r < R; r++)                                                                      \
                acc[r][b] = _mm256_fmadd_ps(wh[r], xh, _mm256_fmadd_ps(wl[r], xl, acc[r][b]));               \
        }                                                                                                    \
    } while (0)
#define DEF_GEMVB_AVX2(BB) \
    DEF_GEMVB(gemvb_avx2, "avx2,fma,popcnt", __m256, _mm256, hsum256, STEP_AVX2, BB, ((BB) <= 4 ? 2 : 1))
DEF_GEMV(gemv_avx2, "avx2,fma,popcnt", __m256, _mm256, hsum256, GROUP_AVX2)

/* Batch 1 where every byte of every row mask has 4 bits set (2:4, 4:8; format.four_of_eight, checked by the caller):
 * each row's group holds exactly 8 values, a block's 32 a group at fixed offsets, so instead of expanding the weights
 * to 16 lanes (a permute, a blend and two FMAs a row's group, the values pointer a popcount chain) x's 16 columns are
 * gathered to the 8 stored positions (the index: two 4-lane table rows) and multiplied by the 8 values as they are:
 * one FMA a row's group. AVX-512VL gathers with one two-source permute, AVX2 with two vpermps and a blend. Zen 4, one
 * thread, cold, 2:4: 1.64-1.74x of ORT dense at 2048 x 5632 and 2048 x 2048 (AVX2 1.64-1.67x) against the expand-load
 * GEMV's 1.39-1.42x, 1.35x (AVX2 1.15x) against 0.94x at 5632 x 2048. A group step reads exactly 128 bytes of values,
 * so one prefetch a step lands on every other line; the AMD profile fetches both (Zen 3, AVX2, cold, 1 thread: 2:4
 * 1.67-1.76x of ORT dense against 1.00-1.18x with one). */
#define QUAD_INDEX(m)                                                                                        \
    _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_load_si128((const __m128i *)quad_lo[(m) & 0xff])),     \
                            _mm_load_si128((const __m128i *)quad_hi[(m) >> 8]), 1)
#define GEMV48_BODY(GATHER)                                                                                  \
    do {                                                                                                     \
        const int64_t G = j->g;                                                                              \
        for (int64_t blk = b0; blk < b1; blk++) {                                                            \
            const float *v = j->values + j->block_ptr[blk];                                                  \
            const uint16_t *mk = j->mask + blk * G * SDK_ROWS;                                               \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                      \
            for (int64_t g = 0; g < G; g++, v += 8 * SDK_ROWS, mk += SDK_ROWS) {                             \
                prefetch_ahead(v, mk);                                                                       \
                if (cpu_profile == PROFILE_AMD) prefetch_stream(v + 16, SDK_PREFETCH_VALUE_BYTES);           \
                const __m256 xlo = _mm256_load_ps(j->x + 16 * g), xhi = _mm256_load_ps(j->x + 16 * g + 8);   \
                uint64_t mm;                                                                                 \
                memcpy(&mm, mk, sizeof mm);                                                                  \
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), GATHER(row_mask(mm, 0)), a0);                       \
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 8), GATHER(row_mask(mm, 1)), a1);                   \
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 16), GATHER(row_mask(mm, 2)), a2);                  \
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 24), GATHER(row_mask(mm, 3)), a3);                  \
            }                                                                                                \
            const float out[SDK_ROWS] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};                \
            for (int i = 0; i < rows_in_block(j, blk); i++) j->y[blk * SDK_ROWS + i] = out[i];               \
        }                                                                                                    \
    } while (0)
__attribute__((target("avx2,fma,popcnt"))) static inline __m256 gather48_avx2(__m256 xlo, __m256 xhi, unsigned m) {
    const __m256i ix = QUAD_INDEX(m);
    return _mm256_blend_ps(_mm256_permutevar8x32_ps(xlo, ix), _mm256_permutevar8x32_ps(xhi, ix), 0xf0);
}
#define GATHER_AVX2(m) gather48_avx2(xlo, xhi, m)
__attribute__((target("avx2,fma,popcnt"))) static void gemv48_avx2(const job_t *j, int64_t b0, int64_t b1) {
    GEMV48_BODY(GATHER_AVX2);
}
/* Batch 1, AVX2, the AMD profile: the compress GEMV's idea (gemv_compress512) in 256 bits. Instead of expanding a
 * row's packed values to each 8 columns of its group (a permute-table load, a permute, a blend and an FMA, and the
 * values pointer advanced twice a row), x's 8 columns are gathered to the byte's stored positions by one vpermps and
 * multiplied by the packed values as they are, loaded unmasked and blended to zero past the byte's count (the next
 * row's values, NaN or inf, weigh nothing). One table row serves both (gather8_table): a table load, a permute, a
 * load, a blend and an FMA per 8 columns; two accumulators a row (low and high byte). The zero the blend keeps is
 * held in a register (IN_REGISTER) so GCC emits vblendvps, not a compare and an and. Zen 3 (family 25 model 1), one
 * thread, a standalone loop A/B in one process, 2048 x 2048: 3.7-5.1 cycles (at the 2.45 GHz reported) a row's
 * 16-column group at 70-80 %, the expand loop 6.3-8.6. A masked load (vmaskmovps) instead of the blend measured the
 * same on random masks but ~4x slower cold where every byte holds exactly 4-6 stored elements (docs/sparse_cpu.md). */
#define GATHER8_FMA(acc, xv, byte)                                                                           \
    do {                                                                                                     \
        const unsigned m_ = (byte);                                                                          \
        const __m256i t_ = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)gather8_table[m_]));       \
        const __m256 w_ = _mm256_blendv_ps(zero, _mm256_loadu_ps(v), _mm256_castsi256_ps(t_));             \
        acc = _mm256_fmadd_ps(w_, _mm256_permutevar8x32_ps(xv, t_), acc);                                   \
        v += __builtin_popcount(m_);                                                                         \
    } while (0)
__attribute__((target("avx2,fma,popcnt"))) static void gemv_gather_avx2(const job_t *j, int64_t b0, int64_t b1) {
    const int64_t G = j->g;
    __m256 zero = _mm256_setzero_ps();
    IN_REGISTER(zero);
    for (int64_t blk = b0; blk < b1; blk++) {
        const float *v = j->values + j->block_ptr[blk];
        const uint16_t *mk = j->mask + blk * G * SDK_ROWS;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, h0 = a0, h1 = a0, h2 = a0, h3 = a0;
        for (int64_t g = 0; g < G; g++, mk += SDK_ROWS) {
            prefetch_ahead(v, mk);
            const uint8_t *mb = (const uint8_t *)mk; /* row i's low byte mb[2 i], high byte mb[2 i + 1] */
            const __m256 xl = _mm256_load_ps(j->x + 16 * g), xh = _mm256_load_ps(j->x + 16 * g + 8);
            GATHER8_FMA(a0, xl, mb[0]);
            GATHER8_FMA(h0, xh, mb[1]);
            GATHER8_FMA(a1, xl, mb[2]);
            GATHER8_FMA(h1, xh, mb[3]);
            GATHER8_FMA(a2, xl, mb[4]);
            GATHER8_FMA(h2, xh, mb[5]);
            GATHER8_FMA(a3, xl, mb[6]);
            GATHER8_FMA(h3, xh, mb[7]);
        }
        const float out[SDK_ROWS] = {hsum256(_mm256_add_ps(a0, h0)), hsum256(_mm256_add_ps(a1, h1)),
                                     hsum256(_mm256_add_ps(a2, h2)), hsum256(_mm256_add_ps(a3, h3))};
        for (int i = 0; i < rows_in_block(j, blk); i++) j->y[blk * SDK_ROWS + i] = out[i];
    }
}
#undef GATHER8_FMA
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
        if (i == 0) decode_prefetch(j, blk, g, v);
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

/* Expand 16 packed values by the 16-bit mask k with one two-source permute (vpermi2ps) between a zero register and
 * the 16 values from *v: its index is the low byte's expand_table row plus, in lanes 8-15, the high byte's row (one
 * masked add; both rows are plain loads). Two vector ALU operations a group besides the FMAs, which share ports 0
 * and 5 with them; the previous form (a vpermps whose index was built with a broadcast and an insert, and a mask
 * register move) took six. Emerald Rapids, same process, cold 5632 x 2048, one thread: batch 8 at 70 % 1.06-1.15x,
 * batch 4 1.20x, batch 2 at 90 % 1.5x faster than that form (not measured on Zen 4). (vexpandps would do it in one
 * instruction but runs ~5 cycles a vector on AMD Zen 4; a masked expand-load measured no faster than the old form
 * here.) */
__attribute__((target("avx512f,avx2,popcnt"))) static inline __m512 expand16(const float **v, unsigned k) {
    const __m512i lo = _mm512_load_si512((const void *)expand_table[k & 0xff]);
    const __m512i hi = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)expand_table[k >> 8]));
    const __m512i idx = _mm512_mask_add_epi32(lo, (__mmask16)0xff00, lo, hi);
    const __m512 w = _mm512_permutex2var_ps(_mm512_setzero_ps(), idx, _mm512_loadu_ps(*v));
    *v += __builtin_popcount(k);
    return w;
}


/* The expand form's group step, AVX-512 (32 registers: R = 4 rows up to batch 4, else 2). */
#define STEP_AVX512(acc, R, BB, p, ms, xg)                                                                   \
    do {                                                                                                     \
        __m512 w[R];                                                                                         \
        for (int r = 0; r < R; r++) w[r] = expand16(&p, row_mask(ms, r));                                    \
        for (int b = 0; b < BB; b++) {                                                                       \
            __m512 xv = _mm512_load_ps((xg) + 16 * b);                                                       \
            IN_REGISTER(xv);                                                                                 \
            for (int r = 0; r < R; r++) acc[r][b] = _mm512_fmadd_ps(w[r], xv, acc[r][b]);                    \
        }                                                                                                    \
    } while (0)
#define DEF_GEMVB_AVX512(BB)                                                                                 \
    DEF_GEMVB(gemvb_avx512, "avx512f,avx2,fma,popcnt", __m512, _mm512, _mm512_reduce_add_ps, STEP_AVX512, BB, \
              ((BB) <= 4 ? 4 : 2))
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
        if (i == 0) decode_prefetch(j, blk, g, v);
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

/* The row and tile forms with 8 lanes (x transposed [K, 8]; batches 2-8), AVX2 and AVX-512: a row's elements 8 at a
 * time, their values one vector load and each broadcast to the 8 lanes by a vpermps from that register (the lane
 * indices stay in registers), each x row one load folded into its FMA. Broadcasting each value from memory instead
 * (ROWS_BODY, TILES_BODY) makes two vector loads an element, and Zen 4 does two a cycle: 1.49 against 0.93 cycles an
 * element in an L1-resident loop. A row's last 1-7 elements run as one more group of 8 with the weights past its
 * count zeroed (TAIL_W): the x rows read for them are the next row's columns (or the forms' trailing zero columns,
 * format.COL_PAD), inside x (the tile form: inside the K block, x zeroed past K to the block's end), and weigh
 * nothing; a scalar tail loop instead cost a second mispredicted loop exit per row (and K block). */
/* One FMA of an 8-lane loop: lane u of w broadcast (ix[u] = u everywhere) times the x row of column ce[u] (32 bytes a
 * row of x transposed [K, 8], xb a char pointer). */
#define LANES8_FMA(w, u, a)                                                                                  \
    _mm256_fmadd_ps(_mm256_permutevar8x32_ps(w, ix[u]), _mm256_load_ps((const float *)(xb + ((size_t)ce[u] << 5))), a)
#define LANES8_GROUP(w)                                                                                      \
    do {                                                                                                     \
        a0 = LANES8_FMA(w, 0, a0);                                                                           \
        a1 = LANES8_FMA(w, 1, a1);                                                                           \
        a2 = LANES8_FMA(w, 2, a2);                                                                           \
        a3 = LANES8_FMA(w, 3, a3);                                                                           \
        a0 = LANES8_FMA(w, 4, a0);                                                                           \
        a1 = LANES8_FMA(w, 5, a1);                                                                           \
        a2 = LANES8_FMA(w, 6, a2);                                                                           \
        a3 = LANES8_FMA(w, 7, a3);                                                                           \
    } while (0)
/* The first `c` (1-7) of the 8 floats at v, the rest zero: AVX2 ANDs with a row of tail_mask. */
static const int32_t tail_mask[8][8] __attribute__((aligned(32))) = {
    {0}, {-1}, {-1, -1}, {-1, -1, -1}, {-1, -1, -1, -1}, {-1, -1, -1, -1, -1}, {-1, -1, -1, -1, -1, -1},
    {-1, -1, -1, -1, -1, -1, -1}};
#define TAIL_W_AVX2(p, c) _mm256_and_ps(_mm256_loadu_ps(p), _mm256_load_ps((const float *)tail_mask[c]))
#define TAIL_W_AVX512(p, c) _mm256_maskz_loadu_ps((__mmask8)((1u << (c)) - 1), p)
/* One group of an 8-lane loop: the 8 values at p (`left` of them the row's, 1-7 in its last group: TAIL_W zeroes the
 * rest); STEP##_SETUP is what the loop declares for it first. AVX-512 (STEP_PERM): one vector load, each value
 * broadcast by vpermps (LANES8_GROUP) with the lane indices ix. AVX2 (STEP_INLANE):
 * the values 4 at a time into both 128-bit halves (vbroadcastf128, a load), each broadcast by an in-lane vpermilps:
 * Zen 3 runs vpermps at about one per 1.45 TSC cycles, and the loop (L1-resident, random columns) at 1.45 cycles an
 * element with it against 0.75-1.0 with vpermilps (docs/sparse_cpu.md). */
#define LANES8_STEP_PERM_SETUP                                                                               \
    __m256i ix[8];                                                                                           \
    for (int u = 0; u < 8; u++) ix[u] = _mm256_set1_epi32(u)
#define LANES8_STEP_PERM(TAIL_W, p, left)                                                                    \
    do {                                                                                                     \
        const __m256 w = (left) >= 8 ? _mm256_loadu_ps(p) : TAIL_W(p, (int)(left));                          \
        LANES8_GROUP(w);                                                                                     \
    } while (0)
#define LANES8_FMA_INLANE(w, s, u, a)                                                                        \
    _mm256_fmadd_ps(_mm256_permute_ps(w, s), _mm256_load_ps((const float *)(xb + ((size_t)ce[u] << 5))), a)
#define LANES8_STEP_INLANE_SETUP (void)0 /* no lane indices */
#define LANES8_STEP_INLANE(TAIL_W, p, left)                                                                  \
    do {                                                                                                     \
        __m256 wl, wh;                                                                                       \
        if ((left) >= 8) {                                                                                   \
            wl = _mm256_broadcast_ps((const __m128 *)(p));                                                   \
            wh = _mm256_broadcast_ps((const __m128 *)(p) + 1);                                               \
        } else {                                                                                             \
            const __m256 w = TAIL_W(p, (int)(left));                                                         \
            wl = _mm256_permute2f128_ps(w, w, 0x00);                                                         \
            wh = _mm256_permute2f128_ps(w, w, 0x11);                                                         \
        }                                                                                                    \
        a0 = LANES8_FMA_INLANE(wl, 0x00, 0, a0);                                                             \
        a1 = LANES8_FMA_INLANE(wl, 0x55, 1, a1);                                                             \
        a2 = LANES8_FMA_INLANE(wl, 0xaa, 2, a2);                                                             \
        a3 = LANES8_FMA_INLANE(wl, 0xff, 3, a3);                                                             \
        a0 = LANES8_FMA_INLANE(wh, 0x00, 4, a0);                                                             \
        a1 = LANES8_FMA_INLANE(wh, 0x55, 5, a1);                                                             \
        a2 = LANES8_FMA_INLANE(wh, 0xaa, 6, a2);                                                             \
        a3 = LANES8_FMA_INLANE(wh, 0xff, 7, a3);                                                             \
    } while (0)
/* A row's last 1-4 elements as half a group (the 8-lane tile loop's tail): 4 FMAs, the lanes past `left` weighing zero
 * (the 4 values at p ANDed with a tail_mask row on AVX2, a masked load on AVX-512; TAIL4_W_AVX2 is also the 64-lane
 * AVX2 loop's tail). Their x rows are read at the 4 columns from ce, as a whole group's are. */
#define TAIL4_W_AVX2(p, c)                                                                                   \
    _mm256_and_ps(_mm256_broadcast_ps((const __m128 *)(p)), _mm256_broadcast_ps((const __m128 *)tail_mask[c]))
/* AVX-512: the first c (1-4) of the 4 floats at p, the rest zero (a masked load). */
#define TAIL4_X_AVX512(p, c) _mm_maskz_loadu_ps((__mmask8)((1u << (c)) - 1), p)
#define TAIL4_W_AVX512(p, c) _mm256_castps128_ps256(TAIL4_X_AVX512(p, c))
#define LANES8_HALF_PERM(TAIL4_W, p, left)                                                                   \
    do {                                                                                                     \
        const __m256 w = TAIL4_W(p, (int)(left));                                                            \
        a0 = LANES8_FMA(w, 0, a0);                                                                           \
        a1 = LANES8_FMA(w, 1, a1);                                                                           \
        a2 = LANES8_FMA(w, 2, a2);                                                                           \
        a3 = LANES8_FMA(w, 3, a3);                                                                           \
    } while (0)
#define LANES8_HALF_INLANE(TAIL4_W, p, left)                                                                 \
    do {                                                                                                     \
        const __m256 wl = TAIL4_W(p, (int)(left));                                                           \
        a0 = LANES8_FMA_INLANE(wl, 0x00, 0, a0);                                                             \
        a1 = LANES8_FMA_INLANE(wl, 0x55, 1, a1);                                                             \
        a2 = LANES8_FMA_INLANE(wl, 0xaa, 2, a2);                                                             \
        a3 = LANES8_FMA_INLANE(wl, 0xff, 3, a3);                                                             \
    } while (0)
/* The row form with 8 lanes (LANES8_GROUP): row by row, outputs collected SDK_STORE_ROWS rows at a time. */
#define ROWS8_BODY(TAIL_W, STEP)                                                                             \
    do {                                                                                                     \
        const char *xb = (const char *)j->x;                                                                 \
        float out[SDK_STORE_ROWS][8] __attribute__((aligned(64)));                                           \
        STEP##_SETUP;                                                                                        \
        int64_t rs = r0; /* the first row of those collected in out */                                       \
        for (int64_t r = r0; r < r1; r++) {                                                                  \
            const int64_t e0 = j->row_ptr[r], c = j->row_ptr[r + 1] - e0;                                    \
            const float *v = j->values + e0;                                                                 \
            const uint16_t *c16 = j->cols + e0;                                                              \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                      \
            for (int64_t e = 0; e < c; e += 8) {                                                             \
                prefetch_stream(v + e, SDK_PREFETCH_VALUE_BYTES);                                            \
                prefetch_stream(c16 + e, SDK_PREFETCH_VALUE_BYTES / 2);                                      \
                const uint16_t *ce = c16 + e;                                                                \
                STEP(TAIL_W, v + e, c - e);                                                                  \
            }                                                                                                \
            _mm256_store_ps(out[r - rs], _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));       \
            if (r + 1 - rs == SDK_STORE_ROWS || r + 1 == r1) {                                               \
                store_rows(j, rs, (int)(r + 1 - rs), out[0], 8);                                             \
                rs = r + 1;                                                                                  \
            }                                                                                                \
        }                                                                                                    \
    } while (0)

/* The row form's SIMD loop: T vectors of W lanes per stored element, A independent accumulator sets (FMA latency),
 * 8 elements an iteration with the value and column streams prefetched ahead (the weights are read once). */
#define ROWS_BODY(VEC, PFX, W, T, A)                                                                         \
    do {                                                                                                     \
        const float *vals = j->values;                                                                       \
        const uint16_t *cols = j->cols;                                                                      \
        const int64_t bp = j->bp;                                                                            \
        float out[SDK_STORE_ROWS][W * T] __attribute__((aligned(64)));                                       \
        int64_t rs = r0; /* the first row of those collected in out */                                       \
        for (int64_t r = r0; r < r1; r++) {                                                                  \
            int64_t e = j->row_ptr[r];                                                                       \
            const int64_t e1 = j->row_ptr[r + 1];                                                            \
            VEC acc[A][T];                                                                                   \
            for (int a = 0; a < A; a++)                                                                      \
                for (int t = 0; t < T; t++) acc[a][t] = PFX##_setzero_ps();                                  \
            for (; e + 8 <= e1; e += 8) {                                                                    \
                prefetch_stream(vals + e, SDK_PREFETCH_VALUE_BYTES);                                         \
                prefetch_stream(cols + e, SDK_PREFETCH_VALUE_BYTES / 2);                                     \
                for (int u = 0; u < 8; u++) {                                                                \
                    const VEC w = PFX##_set1_ps(vals[e + u]);                                                \
                    const float *xp = j->x + (int64_t)cols[e + u] * bp;                                      \
                    for (int t = 0; t < T; t++)                                                              \
                        acc[u % A][t] = PFX##_fmadd_ps(w, PFX##_load_ps(xp + W * t), acc[u % A][t]);         \
                }                                                                                            \
            }                                                                                                \
            for (; e < e1; e++) {                                                                            \
                const VEC w = PFX##_set1_ps(vals[e]);                                                        \
                const float *xp = j->x + (int64_t)cols[e] * bp;                                              \
                for (int t = 0; t < T; t++) acc[0][t] = PFX##_fmadd_ps(w, PFX##_load_ps(xp + W * t), acc[0][t]); \
            }                                                                                                \
            for (int a = 1; a < A; a++)                                                                      \
                for (int t = 0; t < T; t++) acc[0][t] = PFX##_add_ps(acc[0][t], acc[a][t]);                  \
            for (int t = 0; t < T; t++) PFX##_store_ps(out[r - rs] + W * t, acc[0][t]);                      \
            if (r + 1 - rs == SDK_STORE_ROWS || r + 1 == r1) {                                               \
                store_rows(j, rs, (int)(r + 1 - rs), out[0], W * T);                                         \
                rs = r + 1;                                                                                  \
            }                                                                                                \
        }                                                                                                    \
    } while (0)

/* Batch 1 with scalar FMAs (the same loop as rows_gemv_portable, compiled for FMA). */
__attribute__((target("avx2,fma,popcnt"))) static void rows_gemv_fma(const job_t *j, int64_t r0, int64_t r1) {
    ROWS_GEMV_BODY;
}
/* Batch 1, AVX2 on the AMD profile: 8 stored elements a vector FMA against their values, the 8 x values put in place
 * with insertps from the columns read 4 at a time as one 64-bit word (shifts, not loads): 1.4 loads an element
 * against the scalar loop's 3 (column, x, value). Zen 3, one thread, 20000-60000 rows x 2048 at density 0.1-0.2 (a C
 * loop of each alone): 1.04-1.07 against 1.24-1.30 TSC cycles an element (docs/sparse_cpu.md). */
#define X4_AVX2(c) /* x at the 4 columns packed in the uint64 c */                                           \
    _mm_insert_ps(_mm_insert_ps(_mm_insert_ps(_mm_load_ss(x + ((c) & 0xffff)),                               \
                                              _mm_load_ss(x + (((c) >> 16) & 0xffff)), 0x10),                \
                                _mm_load_ss(x + (((c) >> 32) & 0xffff)), 0x20),                              \
                  _mm_load_ss(x + ((c) >> 48)), 0x30)
#define X8_AVX2(p) /* x at the 8 columns p[0..7] */                                                          \
    ({                                                                                                       \
        uint64_t c_lo_, c_hi_;                                                                               \
        memcpy(&c_lo_, (p), 8);                                                                              \
        memcpy(&c_hi_, (p) + 4, 8);                                                                          \
        _mm256_insertf128_ps(_mm256_castps128_ps256(X4_AVX2(c_lo_)), X4_AVX2(c_hi_), 1);                     \
    })
__attribute__((target("avx2,fma,popcnt"))) static void rows_gemv_avx2(const job_t *j, int64_t r0, int64_t r1) {
    const float *vals = j->values, *x = j->x;
    const uint16_t *cols = j->cols;
    for (int64_t r = r0; r < r1; r++) {
        int64_t e = j->row_ptr[r];
        const int64_t e1 = j->row_ptr[r + 1];
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; e + 16 <= e1; e += 16) {
            prefetch_stream(vals + e, SDK_PREFETCH_VALUE_BYTES);
            prefetch_stream(cols + e, SDK_PREFETCH_VALUE_BYTES / 2);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + e), X8_AVX2(cols + e), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + e + 8), X8_AVX2(cols + e + 8), a1);
        }
        if (e + 8 <= e1) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + e), X8_AVX2(cols + e), a0);
            e += 8;
        }
        float t = hsum256(_mm256_add_ps(a0, a1));
        for (; e < e1; e++) t += vals[e] * x[cols[e]];
        j->y[r] = t;
    }
}
/* AVX2: bp = the batch rounded up to 8, T = bp / 8 vectors (16 registers: 4 accumulator sets up to T = 2). */
__attribute__((target("avx2,fma,popcnt"))) static void rows_avx2(const job_t *j, int64_t r0, int64_t r1) {
    switch (j->bp / 8) {
    case 1: ROWS8_BODY(TAIL_W_AVX2, LANES8_STEP_INLANE); break;
    case 2: ROWS_BODY(__m256, _mm256, 8, 2, 4); break;
    case 3: ROWS_BODY(__m256, _mm256, 8, 3, 2); break;
    default: ROWS_BODY(__m256, _mm256, 8, 4, 2); break;
    }
}
/* AVX-512: batches up to 8 in 8 lanes (bp 8: a 512-bit vector would be half padding); else bp = the batch rounded up
 * to 16, T = bp / 16. */
__attribute__((target("avx512f,avx512vl,avx2,fma,popcnt"))) static void rows_avx512(const job_t *j, int64_t r0,
                                                                                      int64_t r1) {
    if (j->bp == 8) ROWS8_BODY(TAIL_W_AVX512, LANES8_STEP_PERM);
    else if (j->bp == 16) ROWS_BODY(__m512, _mm512, 16, 1, 4);
    else ROWS_BODY(__m512, _mm512, 16, 2, 4);
}
/* The tile form with 8 lanes (x transposed [K, 8]): the 8-lane loop above, a tile's rows K block by K block. Values
 * prefetched 2 KB ahead, as the row form's loop does: 1 KB measured ~5 % slower at 70 % and ~3 % at 50 % (AMD EPYC Zen
 * 4, batch 8, cold 1B-like shapes, same process, 2026-12-03; docs/sparse_cpu.md). A row's whole groups run without a
 * tail test; its last 1-4 elements run as half a group (HALF: 4 FMAs), 5-7 as a group with the weights past its count
 * zeroed: rows come in ascending count, so which of the two a row takes changes a few times a K block and the branch
 * is predicted. Against one masked group for every tail (on Zen 4, one thread, cold 1B-like shapes, batch 8, with
 * the huge-page forms, benchmarks/ab_sparse_cpu_builds.py): AVX-512 1.02-1.06x at 50 / 70 / 90 % (15 of 15 ahead in
 * two runs), AVX2 1.01-1.07x at 50 / 80 % and batches 5 / 8 (12 of 12). */
#define TILES8_BODY(TAIL_W, TAIL4_W, STEP, HALF)                                                             \
    do {                                                                                                     \
        const int64_t nkb = (j->k + SDK_TILE_COLS - 1) / SDK_TILE_COLS;                                      \
        float yt[SDK_TILE_ROWS][8] __attribute__((aligned(64)));                                             \
        STEP##_SETUP;                                                                                        \
        for (int64_t t = t0; t < t1; t++) {                                                                  \
            const uint8_t *cnt = j->tile_counts + t * nkb * SDK_TILE_ROWS;                                   \
            const uint8_t *rw = j->tile_rows + t * nkb * SDK_TILE_ROWS;                                      \
            const uint8_t *c8 = j->tile_cols + j->tile_ptr[t];                                               \
            const float *v = j->values + j->tile_ptr[t];                                                     \
            for (int64_t kb = 0; kb < nkb; kb++) {                                                           \
                const char *xb = (const char *)(j->x + kb * SDK_TILE_COLS * 8);                              \
                for (int i_ = 0; i_ < SDK_TILE_ROWS; i_++) {                                                 \
                    const int c = *cnt++, i = *rw++;                                                         \
                    __m256 a0 = kb ? _mm256_load_ps(yt[i]) : _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  \
                    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                               \
                    int e = 0;                                                                               \
                    for (; e + 8 <= c; e += 8) {                                                             \
                        prefetch_stream(v + e, SDK_PREFETCH_VALUE_BYTES);                                    \
                        const uint8_t *ce = c8 + e;                                                          \
                        STEP(TAIL_W, v + e, 8);                                                              \
                    }                                                                                        \
                    if (e < c) {                                                                             \
                        const uint8_t *ce = c8 + e;                                                          \
                        if (c - e > 4) STEP(TAIL_W, v + e, c - e);                                           \
                        else HALF(TAIL4_W, v + e, c - e);                                                    \
                    }                                                                                        \
                    v += c;                                                                                  \
                    c8 += c;                                                                                 \
                    _mm256_store_ps(yt[i], _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));     \
                }                                                                                            \
            }                                                                                                \
            const int64_t r0 = t * SDK_TILE_ROWS;                                                            \
            store_rows(j, r0, j->n - r0 < SDK_TILE_ROWS ? (int)(j->n - r0) : SDK_TILE_ROWS, yt[0], 8);       \
        }                                                                                                    \
    } while (0)
/* A tile row's c elements in one K block, 64 lanes, 4 elements a step (TILES_BODY's ELEMS). AVX2 (A = 1): their values
 * one vbroadcastf128 and each broadcast in-lane (vpermilps), their columns one 32-bit word; the last 1-3 as one more
 * step with the values past c zeroed (the columns read there are the next row's, or format.COL_PAD's zeros: inside
 * the K block), of which only the first 2 elements' FMAs run when 1-2 are left (rows come in ascending count, so the
 * branch is predicted; on Zen 4 with AVX2 forced, one thread, cold 1B-like shapes, batches 64 / 128: 1.00-1.04x at
 * 50-90 %, 20 of 21 ahead, more the sparser). 8.5 loads an element against 10 (a broadcast and a column byte each):
 * Zen 3, an L1-resident C loop at 50 %, 3.59 against 4.07 TSC cycles an element (docs/sparse_cpu.md). Values are
 * prefetched where the function it is expanded in sets `prefetch_values` (tiles_avx2: the Intel profile only;
 * tiles_avx512: always). */
#define TILE_INLANE_FMA(VEC, PFX, W, A, s, u)                                                                \
    do {                                                                                                     \
        const VEC w = PFX##_permute_ps(wq, s);                                                               \
        const float *xp = xb + (size_t)((cw >> (8 * (u))) & 0xff) * SDK_TILE_LANES;                          \
        for (int t_ = 0; t_ < T; t_++)                                                                       \
            acc[(u) % (A)][t_] = PFX##_fmadd_ps(w, PFX##_load_ps(xp + (W) * t_), acc[(u) % (A)][t_]);        \
    } while (0)
/* Up to 4 elements (n: 1-4) from e: their values in each 128-bit lane of wq_, their column bytes one 32-bit word. */
#define TILE_INLANE_STEP(VEC, PFX, W, A, wq_, n)                                                             \
    do {                                                                                                     \
        const VEC wq = (wq_);                                                                                \
        uint32_t cw;                                                                                         \
        memcpy(&cw, c8 + e, 4);                                                                              \
        TILE_INLANE_FMA(VEC, PFX, W, A, 0x00, 0);                                                            \
        TILE_INLANE_FMA(VEC, PFX, W, A, 0x55, 1);                                                            \
        if ((n) > 2) {                                                                                       \
            TILE_INLANE_FMA(VEC, PFX, W, A, 0xaa, 2);                                                        \
            TILE_INLANE_FMA(VEC, PFX, W, A, 0xff, 3);                                                        \
        }                                                                                                    \
    } while (0)
#define TILE_ELEMS_INLANE(VEC, PFX, W, A, LOAD4, TAIL4)                                                      \
    do {                                                                                                     \
        int e = 0;                                                                                           \
        for (; e + 4 <= c; e += 4) {                                                                         \
            if (prefetch_values && (e & 15) == 0) prefetch_stream(v + e, SDK_PREFETCH_VALUE_BYTES / 2);      \
            TILE_INLANE_STEP(VEC, PFX, W, A, LOAD4(v + e), 4);                                               \
        }                                                                                                    \
        if (e < c) TILE_INLANE_STEP(VEC, PFX, W, A, TAIL4(v + e, c - e), c - e);                             \
    } while (0)
#define LOAD4_AVX2(p) _mm256_broadcast_ps((const __m128 *)(p))
#define TILE_ELEMS_INLANE_AVX2(VEC, PFX, W, A, L) TILE_ELEMS_INLANE(VEC, PFX, W, A, LOAD4_AVX2, TAIL4_W_AVX2)
/* AVX-512 (TILE_ELEMS_INLANE_AVX512; A = 2: elements alternate between the two accumulator sets): 4 values one
 * 128-bit load broadcast to the 4 lanes of 128 bits, each broadcast in-lane (vpermilps, a shuffle, where
 * TILE_ELEMS_BCAST's vbroadcastss from memory is a load), the 4 column bytes one 32-bit word: 4.5 loads an element
 * against 6, and Zen 4 does one 512-bit load a cycle. The last 1-3 as one more step, the values past c zeroed by a
 * masked load (the columns read there are inside the K block, as above). On Zen 4 against TILE_ELEMS_BCAST (two
 * builds alternating, benchmarks/ab_sparse_cpu_builds.py, cold shapes, batches 64 / 128): one thread, 1B-like 50-80 %
 * 1.03-1.11x (18 of 18 ahead), smollm2's 1.04-1.08x, 90 % 0.99-1.03x; two threads 1.06-1.09x. The AMD profile only:
 * an Intel core runs vpermilps on the port of one of its two 512-bit FMAs (unmeasured there). */
#define LOAD4_AVX512(p) _mm512_broadcast_f32x4(_mm_loadu_ps(p))
#define TAIL4_LANES_AVX512(p, c) _mm512_broadcast_f32x4(TAIL4_X_AVX512(p, c)) /* in each 128-bit lane */
#define TILE_ELEMS_INLANE_AVX512(VEC, PFX, W, A, L) TILE_ELEMS_INLANE(VEC, PFX, W, A, LOAD4_AVX512, TAIL4_LANES_AVX512)
/* Tile form, 64 lanes: AVX2 8 vectors of 8 lanes an element (8 accumulators: A = 1; 16 registers), AVX-512 4 of 16
 * (A = 2). 8 lanes: TILES8_BODY, the 8-lane loop above (4 accumulators). One function each. */
__attribute__((target("avx2,fma,popcnt"))) static void tiles_avx2(const job_t *j, int64_t t0, int64_t t1,
                                                                   float *ytg) {
    /* TILE_ELEMS_INLANE_AVX2 prefetches the values on the Intel profile only: without it, on Zen 3 (one thread,
     * cold 1B-like shapes, benchmarks/ab_sparse_cpu_builds.py against the build with it): 50 % 1.02-1.07x, 70 %
     * 1.00-1.04x, 90 % 1.00-1.04x at batches 64 / 128 (16 of 18 ahead), 1.01-1.04x on 2 threads (6 of 6). */
    const int prefetch_values = cpu_profile != PROFILE_AMD;
    TILES_BODY(__m256, _mm256, 8, 1, SDK_TILE_LANES, TILE_ELEMS_INLANE_AVX2);
}
__attribute__((target("avx2,fma,popcnt"))) static void tiles8_avx2(const job_t *j, int64_t t0, int64_t t1) {
    TILES8_BODY(TAIL_W_AVX2, TAIL4_W_AVX2, LANES8_STEP_INLANE, LANES8_HALF_INLANE);
}
__attribute__((target("avx512f,avx512vl,avx2,fma,popcnt"))) static void tiles_avx512(const job_t *j, int64_t t0,
                                                                                       int64_t t1, float *ytg) {
    const int prefetch_values = 1;
    if (cpu_profile == PROFILE_AMD) TILES_BODY(__m512, _mm512, 16, 2, SDK_TILE_LANES, TILE_ELEMS_INLANE_AVX512);
    else TILES_BODY(__m512, _mm512, 16, 2, SDK_TILE_LANES, TILE_ELEMS_BCAST);
}
__attribute__((target("avx512f,avx512vl,avx2,fma,popcnt"))) static void tiles8_avx512(const job_t *j, int64_t t0,
                                                                                        int64_t t1) {
    TILES8_BODY(TAIL_W_AVX512, TAIL4_W_AVX512, LANES8_STEP_PERM, LANES8_HALF_PERM);
}
#endif /* SDK_X86 */

#if SDK_X86
/* The 4-of-8 GEMV (GEMV48_BODY) with AVX-512VL's two-source permute. */
#define GATHER_AVX512(m) _mm256_permutex2var_ps(xlo, QUAD_INDEX(m), xhi)
__attribute__((target("avx512f,avx512vl,avx2,fma,popcnt"))) static void gemv48_avx512(const job_t *j, int64_t b0,
                                                                                        int64_t b1) {
    GEMV48_BODY(GATHER_AVX512);
}
/* Batch 1, AVX-512, the Intel profile: one masked expand-load (vexpandps) per row and 16-weight group, 4 rows
 * together. On Emerald Rapids 1.15-1.2x faster than the 256-bit permute GEMV (70 %, cold 1B-like shapes); on Zen 4
 * behind the compress GEMV below at every density (and behind the permute GEMV at 70 %). */
__attribute__((target("avx512f,avx2,fma,popcnt"))) static void gemv_expand512(const job_t *j, int64_t b0, int64_t b1) {
    const int64_t G = j->g;
    for (int64_t blk = b0; blk < b1; blk++) {
        const float *v = j->values + j->block_ptr[blk];
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t g = 0; g < G; g++) {
            const uint64_t mm = group_masks(j, blk, g);
            const __mmask16 k0 = (__mmask16)mm, k1 = (__mmask16)(mm >> 16), k2 = (__mmask16)(mm >> 32),
                            k3 = (__mmask16)(mm >> 48);
            const __m512 xv = _mm512_loadu_ps(j->x + g * 16);
            prefetch_ahead(v, j->mask + (blk * G + g) * SDK_ROWS);
            const float *p1 = v + __builtin_popcount(k0), *p2 = p1 + __builtin_popcount(k1);
            const float *p3 = p2 + __builtin_popcount(k2);
            a0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(k0, v), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(k1, p1), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(k2, p2), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(k3, p3), xv, a3);
            v = p3 + __builtin_popcount(k3);
        }
        const float out[SDK_ROWS] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                     _mm512_reduce_add_ps(a3)};
        for (int i = 0; i < rows_in_block(j, blk); i++) j->y[blk * SDK_ROWS + i] = out[i];
    }
}

/* Batch 1, AVX-512, the AMD profile: instead of expanding each row's packed values to its 16 columns, x's 16 columns
 * are compressed to the row's stored ones (vcompressps, zeroing) and multiplied by the packed values as they are,
 * loaded with a mask of exactly the row's count (the next row's values, NaN or inf, weigh nothing, and the masked
 * load reads no cache line past them: an unmasked 64-byte load, splitting a line nearly every time, measured 1.8x
 * slower). One compress, one masked load and one FMA a row's group, no permute table. Zen 4, one thread, the loop
 * alone (a standalone A/B, same process, several runs): 13.7-15.1 cycles a 4-row group step L2-resident against
 * the permute GEMV's 17.0-18.1 at 70 %, cold 5632 x 2048 17.6-19.3 against 20.5-24.3 (docs/sparse_cpu.md). */
__attribute__((target("avx512f,avx2,fma,popcnt"))) static void gemv_compress512(const job_t *j, int64_t b0,
                                                                                       int64_t b1) {
    const int64_t G = j->g;
    for (int64_t blk = b0; blk < b1; blk++) {
        const float *v = j->values + j->block_ptr[blk];
        const uint16_t *mk = j->mask + blk * G * SDK_ROWS;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t g = 0; g < G; g++, mk += SDK_ROWS) {
            uint64_t mm;
            memcpy(&mm, mk, sizeof mm);
            prefetch_ahead(v, mk);
            const __m512 xv = _mm512_loadu_ps(j->x + g * 16);
            const unsigned k0 = row_mask(mm, 0), k1 = row_mask(mm, 1), k2 = row_mask(mm, 2), k3 = row_mask(mm, 3);
            const unsigned c0 = __builtin_popcount(k0), c1 = __builtin_popcount(k1), c2 = __builtin_popcount(k2),
                           c3 = __builtin_popcount(k3);
            const float *p1 = v + c0, *p2 = p1 + c1, *p3 = p2 + c2;
#define COMPRESS_FMA(a, k, c, p)                                                                             \
    a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps((__mmask16)((1u << (c)) - 1u), p),                          \
                        _mm512_maskz_compress_ps((__mmask16)(k), xv), a)
            COMPRESS_FMA(a0, k0, c0, v);
            COMPRESS_FMA(a1, k1, c1, p1);
            COMPRESS_FMA(a2, k2, c2, p2);
            COMPRESS_FMA(a3, k3, c3, p3);
#undef COMPRESS_FMA
            v = p3 + c3;
        }
        const float out[SDK_ROWS] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                     _mm512_reduce_add_ps(a3)};
        for (int i = 0; i < rows_in_block(j, blk); i++) j->y[blk * SDK_ROWS + i] = out[i];
    }
}
#endif

/* ------------------------------------------------------------------------------------------------ dispatch */

static int isa_supported(int isa) {
    if (isa == ISA_PORTABLE) return 1;
#if SDK_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    if (isa == ISA_AVX512) /* VL: the 8-lane loops and the 4-of-8 GEMV (32 ymm registers, vpermi2ps) */
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && isa_supported(ISA_AVX2);
#endif
    return 0;
}

static pthread_once_t profile_once = PTHREAD_ONCE_INIT;
static void init_profile(void) {
    if (cpu_profile != PROFILE_UNSET) return;
#if SDK_X86
    __builtin_cpu_init();
    cpu_profile = __builtin_cpu_is("intel") ? PROFILE_INTEL : PROFILE_AMD;
#else
    cpu_profile = PROFILE_AMD;
#endif
}

/* The CPU profile in use (0 AMD and others, 1 Intel; see prefetch_ahead); set_cpu_profile forces one (tests and
 * benchmarks run both on one machine; both are correct everywhere, only their speed differs). */
SDK_EXPORT int sdk_cpu_profile(void) {
    pthread_once(&profile_once, init_profile);
    return cpu_profile;
}
SDK_EXPORT int sdk_set_cpu_profile(int profile) {
    if (profile != PROFILE_AMD && profile != PROFILE_INTEL) return ERR_ARGS;
    pthread_once(&profile_once, init_profile);
    cpu_profile = profile;
    return 0;
}

/* Tuning hook (benchmarks): batches 5-8 use the expand form when sparsity <= s, on every ISA; s < 0 restores the
 * per-ISA defaults. */
SDK_EXPORT void sdk_set_expand_max_sparsity(double s) { expand_max_sparsity_override = s; }
static inline double expand_max_sparsity(int isa) {
    if (expand_max_sparsity_override >= 0.0) return expand_max_sparsity_override;
    return isa == ISA_AVX512 ? expand_max_sparsity_avx512 : expand_max_sparsity_other;
}

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
static __thread float *tl_tiles; /* TILES_BODY's partial sums, SDK_TILE_GROUP tiles of up to 64 lanes (128 KB) */

static void int8_part(const job_t *j, int64_t u0, int64_t u1);

static void run_part(const job_t *j, int chunk) {
    const int64_t b0 = j->bounds[chunk], b1 = j->bounds[chunk + 1];
    if (b0 >= b1) return;
    if (j->q) { int8_part(j, b0, b1); return; }
    if (j->tile_ptr) {
#if SDK_X86
        if (j->bp == SDK_TILE_SMALL_LANES && j->isa == ISA_AVX512) { tiles8_avx512(j, b0, b1); return; }
        if (j->bp == SDK_TILE_SMALL_LANES && j->isa == ISA_AVX2) { tiles8_avx2(j, b0, b1); return; }
#endif
        if (!tl_tiles) tl_tiles = aligned_alloc(64, sizeof(float) * SDK_TILE_GROUP * SDK_TILE_ROWS * SDK_TILE_LANES);
        if (!tl_tiles) { atomic_store(j->failed, 1); return; }
#if SDK_X86
        if (j->isa == ISA_AVX512) { tiles_avx512(j, b0, b1, tl_tiles); return; }
        if (j->isa == ISA_AVX2) { tiles_avx2(j, b0, b1, tl_tiles); return; }
#endif
        tiles_portable(j, b0, b1, tl_tiles);
        return;
    }
    if (j->row_ptr) {
#if SDK_X86
        if (j->bp == 1 && j->isa == ISA_AVX2 && cpu_profile == PROFILE_AMD) { rows_gemv_avx2(j, b0, b1); return; }
        if (j->bp == 1 && (j->isa == ISA_AVX512 || j->isa == ISA_AVX2)) { rows_gemv_fma(j, b0, b1); return; }
        if (j->isa == ISA_AVX512) { rows_avx512(j, b0, b1); return; }
        if (j->isa == ISA_AVX512 || j->isa == ISA_AVX2) { rows_avx2(j, b0, b1); return; }
#endif
        if (j->bp == 1) rows_gemv_portable(j, b0, b1); else rows_portable(j, b0, b1);
        return;
    }
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
        if (j->four_of_eight && j->isa == ISA_AVX512) { gemv48_avx512(j, b0, b1); return; }
        if (j->four_of_eight && j->isa == ISA_AVX2) { gemv48_avx2(j, b0, b1); return; }
        /* AVX-512: the expand-load GEMV on the Intel profile (measured there), the compress GEMV on the AMD one */
        if (j->isa == ISA_AVX512 && cpu_profile == PROFILE_INTEL) { gemv_expand512(j, b0, b1); return; }
        if (j->isa == ISA_AVX512) { gemv_compress512(j, b0, b1); return; }
        /* AVX2: the expand GEMV on the Intel profile (measured there), the gather GEMV on the AMD one */
        if (j->isa == ISA_AVX2 && cpu_profile == PROFILE_INTEL) { gemv_avx2(j, b0, b1); return; }
        if (j->isa == ISA_AVX2) { gemv_gather_avx2(j, b0, b1); return; }
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

/* fork (a pre-forking server that loaded the model first): the child inherits none of the workers, and a lock held
 * at the fork by a worker or by a call on another thread would stay held there. So a fork waits for the call in flight
 * (prepare takes both locks; the POSIX pthread_atfork idiom), and the child starts with an empty pool: its first call
 * on several threads starts its own workers (before this, every call of the child ran on its calling thread alone). */
static void pool_fork_prepare(void) {
    pthread_mutex_lock(&pool.call_lock);
    pthread_mutex_lock(&pool.lock);
}
static void pool_fork_parent(void) {
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.call_lock);
}
static void pool_fork_child(void) {
    pool.started = 0;
    pool.sleepers = 0;
    pthread_cond_init(&pool.wake, NULL); /* its waiters were the parent's workers */
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.call_lock);
}
/* Registered when the library loads: every call takes call_lock, one-thread calls too, so a fork needs the handlers
 * before any worker exists (glibc drops them if the library is unloaded). */
__attribute__((constructor)) static void pool_fork_register(void) {
    pthread_atfork(pool_fork_prepare, pool_fork_parent, pool_fork_child);
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

/* How long one cache line takes to go from one core to another and back (ns, the mean over `iters` round trips):
 * the calling thread and a thread it starts bounce an atomic, each spinning for its turn, wherever the OS places
 * them (as it places the pool's worker beside the caller). Across L3 domains (AMD CCDs; a VM whose virtual CPUs the
 * host moves between them) it is several times what it is inside one, and so is everything a 2-thread call moves
 * between its threads (x to the worker, the worker's rows of y back): on a Zen 4 VM, 58-72 ns inside one L3 against
 * 257-438 ns across (a bare C ping-pong; this one 89-103 ns inside), smollm2's 2-thread prefill 40 against 54-56 ms
 * (docs/sparse_cpu.md). -1: the thread could not be started; -2: not `iters` round trips within 100 ms (both
 * threads on one CPU: each turn waits for a time slice). */
#define SDK_BOUNCE_MAX_NS 100000000 /* 100 ms for all the round trips, or -2 */
typedef struct {
    _Atomic int turn;
    _Atomic int abort;
    int iters;
    int64_t deadline; /* now_ns() past which both sides give up */
} bounce_t;
static int bounce_wait(bounce_t *b, int want) {
    int spins = 0;
    while (atomic_load_explicit(&b->turn, memory_order_acquire) != want) {
        if (atomic_load_explicit(&b->abort, memory_order_relaxed)) return 0;
        if (++spins % 1024 == 0 && now_ns() > b->deadline) {
            atomic_store(&b->abort, 1);
            return 0;
        }
    }
    return 1;
}
static void *bounce_back(void *arg) {
    bounce_t *b = arg;
    for (int i = 0; i < b->iters; i++) {
        if (!bounce_wait(b, 1)) break;
        atomic_store_explicit(&b->turn, 0, memory_order_release);
    }
    return NULL;
}
/* Whether the pool's workers are all asleep (none spinning for the next call). */
static int pool_idle(void) {
    pthread_mutex_lock(&pool.lock);
    const int idle = pool.sleepers == pool.started;
    pthread_mutex_unlock(&pool.lock);
    return idle;
}
SDK_EXPORT double sdk_core_round_trip_ns(int iters) {
    if (iters < 1) return -1;
    /* the pool's workers spin SPIN_NS after a call: wait for them to sleep, or they take turns with the two here */
    const struct timespec nap = {0, 100000};
    for (int64_t until = now_ns() + 5 * (int64_t)SPIN_NS; !pool_idle() && now_ns() < until;) nanosleep(&nap, NULL);
    bounce_t b __attribute__((aligned(64))) = {0, 0, iters, now_ns() + SDK_BOUNCE_MAX_NS};
    pthread_t th;
    if (pthread_create(&th, NULL, bounce_back, &b) != 0) return -1;
    const int64_t t0 = now_ns();
    int i = 0;
    for (; i < iters; i++) {
        atomic_store_explicit(&b.turn, 1, memory_order_release);
        if (!bounce_wait(&b, 0)) break;
    }
    const int64_t t1 = now_ns();
    atomic_store(&b.abort, 1);
    pthread_join(th, NULL);
    return i < iters ? -2 : (double)(t1 - t0) / iters;
}

/* Split units [0, units) (blocks of the bitmask form, rows of the row form) into nchunks ranges of about equal work:
 * ptr[u] stored elements before unit u, plus per_unit element-equivalents of fixed cost a unit. */
static void balance(job_t *j, int nchunks, const int64_t *ptr, int64_t units, int64_t per_unit) {
    const double total = (double)ptr[units] + (double)per_unit * (double)units;
    int64_t u = 0;
    j->nchunks = nchunks;
    j->bounds[0] = 0;
    for (int t = 1; t < nchunks; t++) {
        const double target = total * t / nchunks;
        int64_t lo = u, hi = units; /* first unit whose prefix work >= target */
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            if ((double)ptr[mid] + (double)per_unit * mid < target) lo = mid + 1; else hi = mid;
        }
        u = lo;
        j->bounds[t] = u;
    }
    j->bounds[nchunks] = units;
}

/* The end every balanced matmul call shares (the caller holds pool.call_lock): split units [0, units) into a few
 * chunks per thread by `balance`, run them on the pool, release the lock; 0, or ERR_NOMEM when a worker could not
 * allocate its scratch. */
static int run_balanced(job_t *j, int threads, const int64_t *ptr, int64_t units, int64_t per_unit) {
    int64_t nchunks = threads == 1 ? 1 : (int64_t)threads * SDK_CHUNKS_PER_THREAD;
    if (nchunks > units) nchunks = units;
    balance(j, (int)nchunks, ptr, units, per_unit);
    pool_run(j, threads);
    pthread_mutex_unlock(&pool.call_lock);
    return atomic_load(j->failed) ? ERR_NOMEM : 0;
}

static float *scratch;
static int64_t scratch_cap;

/* What every matmul entry point does first: cap threads, resolve ISA_AUTO to the best path this CPU runs (ERR_ISA when
 * the one asked for does not run here), and set up the tables and the CPU profile once. */
static int prepare_call(int *threads, int *isa) {
    if (*threads > SDK_MAX_THREADS) *threads = SDK_MAX_THREADS;
    if (*isa == ISA_AUTO)
        *isa = isa_supported(ISA_AVX512) ? ISA_AVX512 : isa_supported(ISA_AVX2) ? ISA_AVX2 : ISA_PORTABLE;
    if (!isa_supported(*isa)) return ERR_ISA;
#if SDK_X86
    pthread_once(&tables_once, init_tables);
#endif
    pthread_once(&profile_once, init_profile);
    return 0;
}

/* The shared x scratch (the caller holds pool.call_lock) grown to at least `need` floats: 0, or ERR_NOMEM. */
static int reserve_scratch(int64_t need) {
    if (scratch_cap >= need) return 0;
    free(scratch);
    scratch = aligned_alloc(64, (size_t)need * sizeof(float) + 64);
    scratch_cap = scratch ? need : 0;
    return scratch ? 0 : ERR_NOMEM;
}

/* y[b, n] = sum_k x[b, k] * W[n, k] for W in bitmask16-v2 (mask [ceil(n/4), ceil(k/16), 4], values,
 * block_ptr [ceil(n/4) + 1]). isa: 0 auto, 1 portable, 2 AVX2, 3 AVX-512. threads >= 1.
 * Returns 0, or ERR_ARGS / ERR_ISA / ERR_NOMEM. Safe to call from several threads (calls serialize). */
static int bitmask_matmul(const float *x, int64_t b, int64_t k, const uint16_t *mask, const float *values,
                          const int64_t *block_ptr, int64_t n, float *y, int threads, int isa, int four_of_eight) {
    if (b < 1 || k < 1 || n < 1 || !x || !mask || !values || !block_ptr || !y || threads < 1) return ERR_ARGS;
    const int rc = prepare_call(&threads, &isa);
    if (rc) return rc;
    atomic_int failed = 0;
    job_t j = {.failed = &failed, .mask = mask, .values = values, .block_ptr = block_ptr, .y = y,
               .n = n, .k = k, .b = b, .isa = isa, .four_of_eight = four_of_eight};
    j.g = (k + 15) / 16;
    j.nb = (n + SDK_ROWS - 1) / SDK_ROWS;
    j.expand_batch = b >= 2 && b <= SDK_EXPAND_MAX_B &&
                     (b <= 4 || 1.0 - (double)block_ptr[j.nb] / ((double)n * (double)k) <= expand_max_sparsity(isa));
    j.bp = b == 1 || j.expand_batch ? 1 : (b + 15) / 16 * 16;
    if ((double)j.g * 16 * (double)j.bp >= 2147483647.0) return ERR_ARGS; /* int32 offsets: callers chunk the batch */
    if (threads > j.nb) threads = (int)j.nb;
    if (threads < 1) threads = 1;

    pthread_mutex_lock(&pool.call_lock);
    const int64_t need = j.g * 16 * (b == 1 || j.expand_batch ? b : j.bp);
    if (reserve_scratch(need)) { pthread_mutex_unlock(&pool.call_lock); return ERR_NOMEM; }
    if (b == 1) { /* [G, 1, 16] is x itself, zero-padded: one copy (every token of a decode comes here) */
        memcpy(scratch, x, (size_t)k * sizeof(float));
        memset(scratch + k, 0, (size_t)(j.g * 16 - k) * sizeof(float));
    } else if (j.expand_batch) { /* [G, b, 16]: a group's 16 columns of every batch row together, zero-padded */
        for (int64_t g = 0; g < j.g; g++)
            for (int64_t bb = 0; bb < b; bb++) {
                float *dst = scratch + (g * b + bb) * 16;
                const int64_t c0 = g * 16, w = k - c0 < 16 ? k - c0 : 16;
                memcpy(dst, x + bb * k + c0, (size_t)w * sizeof(float));
                if (w < 16) memset(dst + w, 0, (size_t)(16 - w) * sizeof(float));
            }
    } else { /* transposed to [K, bp] */
        transpose_x(isa, x, b, k, j.bp, scratch);
    }
    j.x = scratch;
    return run_balanced(&j, threads, block_ptr, j.nb, SDK_ROWS * j.g); /* per block: its mask walk */
}
SDK_EXPORT int sdk_matmul(const float *x, int64_t b, int64_t k, const uint16_t *mask, const float *values,
                          const int64_t *block_ptr, int64_t n, float *y, int threads, int isa) {
    return bitmask_matmul(x, b, k, mask, values, block_ptr, n, y, threads, isa, 0);
}
/* sdk_matmul for batch 1 and a weight every byte of whose row masks has 4 bits set (the caller checks:
 * format.four_of_eight; other weights would be read wrong), where the 4-of-8 GEMV runs. */
SDK_EXPORT int sdk_matmul_4of8(const float *x, int64_t b, int64_t k, const uint16_t *mask, const float *values,
                               const int64_t *block_ptr, int64_t n, float *y, int threads, int isa) {
    if (b != 1) return ERR_ARGS;
    return bitmask_matmul(x, b, k, mask, values, block_ptr, n, y, threads, isa, 1);
}

/* The row form of a bitmask16-v2 weight (kernels/format.py RowForm): row_ptr [n + 1], cols [nnz], out_values [nnz]
 * (the caller adds the padding: the 8-lane kernel reads up to 7 columns and values past a row's last element).
 * k <= 65536. */
SDK_EXPORT int sdk_row_form(const uint16_t *mask, const float *values, const int64_t *block_ptr, int64_t n, int64_t k,
                            int64_t *row_ptr, uint16_t *cols, float *out_values) {
    if (n < 1 || k < 1 || k > SDK_ROWFORM_MAX_K || !mask || !values || !block_ptr || !row_ptr || !cols || !out_values)
        return ERR_ARGS;
    const job_t j = {.mask = mask, .n = n, .g = (k + 15) / 16, .nb = (n + SDK_ROWS - 1) / SDK_ROWS};
    int64_t c = 0;
    row_ptr[0] = 0;
    for (int64_t blk = 0; blk < j.nb; blk++) {
        for (int i = 0; i < rows_in_block(&j, blk); i++) {
            const float *v = values + block_ptr[blk];
            for (int64_t g = 0; g < j.g; g++) {
                const uint64_t mm = group_masks(&j, blk, g);
                const float *vr = v + before_row(mm, i);
                for (unsigned bits = row_mask(mm, i); bits; bits &= bits - 1) {
                    cols[c] = (uint16_t)(g * 16 + __builtin_ctz(bits));
                    out_values[c++] = *vr++;
                }
                v += __builtin_popcountll(mm);
            }
            row_ptr[blk * SDK_ROWS + i + 1] = c;
        }
    }
    return 0;
}

/* y[b, n] = sum_k x[b, k] * W[n, k] for W in the row form (CSR: row_ptr [n + 1], cols uint16 [nnz] ascending within
 * a row, values [nnz]; kernels/format.py RowForm), b <= 32, k <= 65536. isa and threads as sdk_matmul. */
SDK_EXPORT int sdk_rows_matmul(const float *x, int64_t b, int64_t k, const int64_t *row_ptr, const uint16_t *cols,
                               const float *values, int64_t n, float *y, int threads, int isa) {
    if (b < 1 || b > SDK_ROWFORM_MAX_B || k < 1 || k > SDK_ROWFORM_MAX_K || n < 1 || !x || !row_ptr || !cols ||
        !values || !y || threads < 1)
        return ERR_ARGS;
    const int rc = prepare_call(&threads, &isa);
    if (rc) return rc;
    atomic_int failed = 0;
    job_t j = {.failed = &failed, .values = values, .y = y, .n = n, .k = k, .b = b, .isa = isa, .row_ptr = row_ptr,
               .cols = cols};
    j.bp = b == 1 ? 1 : isa == ISA_AVX512 && b > 8 ? (b + 15) / 16 * 16 : (b + 7) / 8 * 8;
    if (threads > n) threads = (int)n;
    pthread_mutex_lock(&pool.call_lock);
    if (b == 1) { /* the batch-1 loop reads x itself */
        j.x = x;
    } else {
        if (reserve_scratch(k * j.bp)) { pthread_mutex_unlock(&pool.call_lock); return ERR_NOMEM; }
        transpose_x(isa, x, b, k, j.bp, scratch);
        j.x = scratch;
    }
    return run_balanced(&j, threads, row_ptr, n, 16); /* per row: its reduction and b scattered stores */
}

/* The tile form of a bitmask16-v2 weight (format.TileForm): tiles = ceil(n / 32), K blocks = ceil(k / 128);
 * tile_ptr [tiles + 1], counts and rows_visited [tiles * K blocks * 32] (each block's tile rows in ascending count,
 * ties in row order, rows past n holding 0), cols uint8 [nnz], out_values [nnz] (the caller adds the padding: the
 * 8-lane kernel reads up to 7 columns and values past a row's last element). */
SDK_EXPORT int sdk_tile_form(const uint16_t *mask, const float *values, const int64_t *block_ptr, int64_t n, int64_t k,
                             int64_t *tile_ptr, uint8_t *counts, uint8_t *rows_visited, uint8_t *cols,
                             float *out_values) {
    if (n < 1 || k < 1 || !mask || !values || !block_ptr || !tile_ptr || !counts || !rows_visited || !cols ||
        !out_values)
        return ERR_ARGS;
    const job_t j = {.mask = mask, .n = n, .g = (k + 15) / 16, .nb = (n + SDK_ROWS - 1) / SDK_ROWS};
    enum { BLOCKS = SDK_TILE_ROWS / SDK_ROWS, GROUPS = SDK_TILE_COLS / 16 };
    const int64_t tiles = (n + SDK_TILE_ROWS - 1) / SDK_TILE_ROWS, nkb = (k + SDK_TILE_COLS - 1) / SDK_TILE_COLS;
    int64_t c = 0;
    for (int64_t t = 0; t < tiles; t++) {
        tile_ptr[t] = c;
        int64_t cur[BLOCKS]; /* each block's values at the current K block */
        int rows[BLOCKS];    /* each block's rows (0 past N) */
        for (int b = 0; b < BLOCKS; b++) {
            const int64_t blk = t * BLOCKS + b;
            cur[b] = blk < j.nb ? block_ptr[blk] : 0;
            rows[b] = blk < j.nb ? rows_in_block(&j, blk) : 0;
        }
        for (int64_t kb = 0; kb < nkb; kb++) {
            const int64_t g0 = kb * GROUPS, g1 = g0 + GROUPS < j.g ? g0 + GROUPS : j.g;
            int64_t goff[BLOCKS][GROUPS + 1]; /* where each block's groups' values start */
            int cnt[SDK_TILE_ROWS];           /* each tile row's elements in this K block */
            uint8_t order[SDK_TILE_ROWS];     /* the rows by ascending count (stable: insertion) */
            for (int b = 0; b < BLOCKS; b++) {
                goff[b][0] = cur[b];
                for (int i = 0; i < SDK_ROWS; i++) cnt[b * SDK_ROWS + i] = 0;
                for (int64_t g = g0; g < g1 && rows[b]; g++) {
                    const uint64_t mm = group_masks(&j, t * BLOCKS + b, g);
                    goff[b][g - g0 + 1] = goff[b][g - g0] + __builtin_popcountll(mm);
                    for (int i = 0; i < rows[b]; i++) cnt[b * SDK_ROWS + i] += __builtin_popcount(row_mask(mm, i));
                }
            }
            for (int r = 0; r < SDK_TILE_ROWS; r++) {
                int p = r;
                for (; p > 0 && cnt[order[p - 1]] > cnt[r]; p--) order[p] = order[p - 1];
                order[p] = (uint8_t)r;
            }
            for (int v = 0; v < SDK_TILE_ROWS; v++) {
                const int r = order[v], b = r / SDK_ROWS, i = r % SDK_ROWS;
                *rows_visited++ = (uint8_t)r;
                *counts++ = (uint8_t)cnt[r];
                for (int64_t g = g0; g < g1 && i < rows[b]; g++) {
                    const uint64_t mm = group_masks(&j, t * BLOCKS + b, g);
                    const float *vr = values + goff[b][g - g0] + before_row(mm, i);
                    for (unsigned bits = row_mask(mm, i); bits; bits &= bits - 1) {
                        cols[c] = (uint8_t)((g - g0) * 16 + __builtin_ctz(bits));
                        out_values[c++] = *vr++;
                    }
                }
            }
            for (int b = 0; b < BLOCKS; b++)
                if (rows[b]) cur[b] = goff[b][g1 - g0];
        }
    }
    tile_ptr[tiles] = c;
    return 0;
}

/* y[b, n] = sum_k x[b, k] * W[n, k] for W in the tile form (sdk_tile_form's arrays), b <= 64 (b <= 8: 8 lanes, else
 * 64). isa and threads as sdk_matmul. */
SDK_EXPORT int sdk_tiles_matmul(const float *x, int64_t b, int64_t k, const int64_t *tile_ptr, const uint8_t *counts,
                                const uint8_t *rows, const uint8_t *cols, const float *values, int64_t n, float *y,
                                int threads, int isa) {
    if (b < 1 || b > SDK_TILE_LANES || k < 1 || n < 1 || !x || !tile_ptr || !counts || !rows || !cols || !values ||
        !y || threads < 1)
        return ERR_ARGS;
    const int rc = prepare_call(&threads, &isa);
    if (rc) return rc;
    const int64_t tiles = (n + SDK_TILE_ROWS - 1) / SDK_TILE_ROWS, nkb = (k + SDK_TILE_COLS - 1) / SDK_TILE_COLS;
    atomic_int failed = 0;
    const int64_t lanes = b <= SDK_TILE_SMALL_LANES ? SDK_TILE_SMALL_LANES : SDK_TILE_LANES;
    job_t j = {.failed = &failed, .values = values, .y = y, .n = n, .k = k, .b = b, .bp = lanes, .isa = isa,
               .tile_ptr = tile_ptr, .tile_counts = counts, .tile_rows = rows, .tile_cols = cols};
    if (threads > tiles) threads = (int)tiles;
    pthread_mutex_lock(&pool.call_lock);
    const int64_t kpad = nkb * SDK_TILE_COLS; /* the 8-lane loop may read a row's tail from anywhere in its K block */
    if (reserve_scratch(kpad * lanes)) { pthread_mutex_unlock(&pool.call_lock); return ERR_NOMEM; }
    transpose_x(isa, x, b, k, lanes, scratch);
    memset(scratch + k * lanes, 0, (size_t)((kpad - k) * lanes) * sizeof(float));
    j.x = scratch;
    return run_balanced(&j, threads, tile_ptr, tiles, nkb * SDK_TILE_ROWS * 8); /* per tile: its row visits */
}

/* ------------------------------------------------------------------------------- a bound weight (form choice) */

/* The forms a bitmask16-v2 weight is multiplied in (FORM_AUTO: picked per call by pick_form). The row and tile forms
 * are derived from the bitmask form in memory, at the first call that needs them, and kept with the bound weight. */
enum { FORM_AUTO = 0, FORM_BITMASK = 1, FORM_ROWS = 2, FORM_TILES = 3 };
#define SDK_MAX_BATCH_CHUNK 256 /* rows of x a bitmask-form call (bounds the transposed copy; offsets stay int32) */
#define SDK_COL_PAD 8           /* format.COL_PAD: zero columns after the derived forms' last element */
#define SDK_VALUE_PAD 16        /* format.PAD: zero floats after the stored values */
/* Prefill (batch > SDK_ROWFORM_MAX_B) runs in the row form up to this density, in the tile form above it: at 80 %
 * (density 0.2) the tile form measured 1.1-1.15x faster than the row form, at 85 % a tie, at 90 % the row form ahead
 * (Emerald Rapids, one thread, 5632 x 2048, batch 128, AVX-512 and AVX2; docs/sparse_cpu.md). */
#define SDK_PREFILL_ROWS_MAX_DENSITY 0.15
/* AVX2 on the AMD profile, where the tile form's loop takes 4 elements a step (TILE_ELEMS_INLANE_AVX2): Zen 3, one
 * thread, cold 1B-like shapes, batch 128, ratio to ORT dense: at 85 % the tile form 2.61-2.86x against the row form's
 * 2.13-2.47x, at 90 % ahead in 5 of 6 (2.89-3.88x against 2.87-3.65x), at 95 % behind (3.95-4.97x against 5.00-6.48x). */
#define SDK_PREFILL_ROWS_MAX_DENSITY_AVX2_AMD 0.08
/* AVX-512 on the AMD profile, where the tile form's loop also takes 4 elements a step (TILE_ELEMS_INLANE_AVX512):
 * Zen 4, the two forms of one weight alternating in one process, cold 1B-like shapes, batches 64 / 128, time tile /
 * row form: 85 % 0.63-0.67, 90 % 0.68-0.76 (2 threads 0.70-0.76), 93 % 0.76-0.87, 95 % 0.89-1.02 (2 threads
 * 0.86-0.95), 97 % 1.15-1.33; smollm2's shapes at batch 64: 90 % 0.76-0.96, 95 % 0.95-1.08, 97 % 1.06-1.18. */
#define SDK_PREFILL_ROWS_MAX_DENSITY_AVX512_AMD 0.04
/* Batch 1 on AVX2, AMD profile: the row form's insertps loop (rows_gemv_avx2) against the gather GEMV, Zen 3, one
 * thread, cold 1B-like shapes: behind at 70 % (1.45-1.64x of ORT dense against 1.72-2.21x), ahead from 75 % (1.78-2.83x
 * against 1.64-2.31x; 80 %: 2.11-2.42x against 1.65-1.93x). */
#define SDK_ROWS_B1_AVX2_AMD_MAX_DENSITY 0.26
#define SDK_DENSITY_80 0.21 /* "80 %" as a density limit: pruned per row, 80 % keeps round(0.2 K), a hair over 0.2 */
/* The "amd" profile at batches 5-8, density above SDK_SMALL_TILE_MIN_DENSITY: the tile form with 8 lanes, ahead of
 * both the row and the expand form there (Zen 4, one thread, cold 1B-like shapes, batch 8, ratio to ORT dense:
 * 1.78-1.88x at 70 %, 1.18-1.25x at 50 %, 2:4 1.28-1.39x, 80 % 2.25-2.32x against the row form's 1.94-2.16x, 85 %
 * 2.80-2.87x against 2.28-2.87x, 90 % 3.45-3.77x against 3.77-3.96x; batch 6 ahead of the expand form, batch 5 a tie
 * at 70 % and ahead at 50 %, batch 4 behind; docs/sparse_cpu.md). */
/* The "intel" profile on AVX-512 at batch 8: the row form up to this density, past b / 32 (the row form's 8-lane loop
 * came later than that rule). Emerald Rapids, 16-CPU guest, 2026-12-04, cold 1B-like shapes, 70 %, alternating in one
 * process: the row form (its 8-lane loop, the same code on AVX2 and AVX-512 up to batch 8) 1.78-2.63x of ORT dense
 * against the expand form's 1.48-2.23x, 1.12-1.19x ahead on 2048 x 2048 and 2048 x 5632 at 1 and 2 threads; 80 %:
 * the row form on both paths, 2.42-3.74x. Batches 2-7 were not measured again. */
#define SDK_ROWS_B8_AVX512_INTEL_MAX_DENSITY 0.32
#define SDK_SMALL_TILE_MIN_BATCH 5
#define SDK_SMALL_TILE_MIN_DENSITY 0.12

/* Whether `b` rows of x multiply faster in the row form than in the bitmask form on this ISA (resolved) and CPU
 * profile, for a weight with this fraction of stored elements. The bitmask kernels cost per 16-weight group
 * (expanded, or its columns decoded, whatever its count), the row form per stored element. Measured on Emerald
 * Rapids, one thread, 5632 x 2048, both forms alternately in one process (docs/sparse_cpu.md):
 *   batch 1: from density ~0.1 on the AVX-512 expand-load GEMV (the Intel profile; at 90 %, 24 cold copies, the row
 *     form ran 4.0-4.1x of ORT dense, the expand-load GEMV 2.8-3.3x), ~0.2 on the 256-bit GEMV (AVX2) and the
 *     compress GEMV (AVX-512 on the AMD profile; Zen 4, 80 %: the row form 1.92-2.32x, it 1.82-2.07x), ~0.25 on
 *     the gather GEMV (AVX2 on the AMD profile, against the row form's insertps loop: SDK_ROWS_B1_AVX2_AMD_MAX_DENSITY);
 *   batch 2-8 (the expand form): from ~0.06 at batch 2 to ~0.25-0.3 at batch 8 on AVX-512 (density <= b / 32; batch 8
 *     on the Intel profile up to SDK_ROWS_B8_AVX512_INTEL_MAX_DENSITY, measured again with the 8-lane row loop), from
 *     ~0.15 to ~0.45 on AVX2 ((b + 1) / 20), whose expand costs more (the AMD profile asks the 8-lane tile form
 *     first for 5-8: pick_form);
 *   batch 9-32 (where the bitmask form is the broadcast GEMM): at 50-90 % on every path;
 *   batch 33 and up (prefill, in calls of 32 rows each walking the weight): up to SDK_PREFILL_ROWS_MAX_DENSITY
 *     (on the AMD profile SDK_PREFILL_ROWS_MAX_DENSITY_AVX2_AMD on AVX2, SDK_PREFILL_ROWS_MAX_DENSITY_AVX512_AMD on
 *     AVX-512);
 *   the portable path up to batch 32 at every density tried (50-90 %, batch 1 and 8: 3-5x faster than its bit loops).
 */
static int row_form_pays(int64_t b, double density, int isa, int profile) {
    if (b < 1) return 0;
    if (b > SDK_ROWFORM_MAX_B)
        return density <= (profile != PROFILE_AMD || isa == ISA_PORTABLE ? SDK_PREFILL_ROWS_MAX_DENSITY
                           : isa == ISA_AVX2                            ? SDK_PREFILL_ROWS_MAX_DENSITY_AVX2_AMD
                                                                        : SDK_PREFILL_ROWS_MAX_DENSITY_AVX512_AMD);
    if (isa == ISA_PORTABLE || b > SDK_EXPAND_MAX_B) return 1;
    if (b == 1 && isa == ISA_AVX2 && profile == PROFILE_AMD) return density <= SDK_ROWS_B1_AVX2_AMD_MAX_DENSITY;
    if (b == 1) return density <= (isa == ISA_AVX512 && profile == PROFILE_INTEL ? 0.12 : SDK_DENSITY_80);
    if (b == SDK_EXPAND_MAX_B && isa == ISA_AVX512 && profile == PROFILE_INTEL)
        return density <= SDK_ROWS_B8_AVX512_INTEL_MAX_DENSITY;
    return density <= (isa == ISA_AVX512 ? (double)b / 32 : (double)(b + 1) / 20);
}

/* The form `b` rows of x run in, for a weight of K columns with this density (isa resolved, profile 0 AMD / 1 Intel):
 * the 8-lane tile form on the AMD profile at batches 5-8 above SDK_SMALL_TILE_MIN_DENSITY (measured there only), else
 * the row form where it pays (K <= 65536), else the tile form for prefill and the bitmask form below it. */
static int pick_form(int64_t b, double density, int64_t k, int isa, int profile) {
    if (profile == PROFILE_AMD && isa != ISA_PORTABLE && b >= SDK_SMALL_TILE_MIN_BATCH && b <= SDK_TILE_SMALL_LANES &&
        density > SDK_SMALL_TILE_MIN_DENSITY)
        return FORM_TILES;
    if (k <= SDK_ROWFORM_MAX_K && row_form_pays(b, density, isa, profile)) return FORM_ROWS;
    return b > SDK_ROWFORM_MAX_B ? FORM_TILES : FORM_BITMASK;
}
/* pick_form for the Python binding and its tests (ERR_ARGS for an ISA or profile out of range). */
SDK_EXPORT int sdk_pick_form(int64_t b, double density, int64_t k, int isa, int profile) {
    if (isa < ISA_PORTABLE || isa > ISA_AVX512 || (profile != PROFILE_AMD && profile != PROFILE_INTEL)) return ERR_ARGS;
    return pick_form(b, density, k, isa, profile);
}

/* A weight bound once (what a runtime holds per linear: the Python binding's BoundMatmul and the ONNX Runtime op
 * library's SparseLinear kernel): the bitmask form's arrays (not owned: they must outlive it), what is worked out
 * from them once, and the derived forms, each built at the first call that runs in it (under `lock`; published with
 * release stores so calls read them without the lock). */
typedef struct sdk_linear {
    const uint16_t *mask;
    const float *values;
    const int64_t *block_ptr;
    int64_t n, k, nnz;
    double density;
    pthread_mutex_t lock;
    atomic_int four_of_eight; /* -1 not worked out yet, else 0 / 1 */
    atomic_int rows_ready, tiles_ready;
    int64_t *row_ptr;
    uint16_t *row_cols;
    float *row_values;
    int64_t *tile_ptr;
    uint8_t *tile_counts, *tile_rows, *tile_cols;
    float *tile_values;
    int64_t derived_bytes;
} sdk_linear;

/* Binds a bitmask16-v2 weight (as sdk_matmul takes it; block_ptr[ceil(n / 4)] = its stored elements). NULL for bad
 * arguments or no memory. Free with sdk_linear_free. */
SDK_EXPORT sdk_linear *sdk_linear_new(const uint16_t *mask, const float *values, const int64_t *block_ptr, int64_t n,
                                      int64_t k) {
    if (n < 1 || k < 1 || !mask || !values || !block_ptr) return NULL;
    sdk_linear *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    *w = (sdk_linear){.mask = mask, .values = values, .block_ptr = block_ptr, .n = n, .k = k};
    w->nnz = block_ptr[(n + SDK_ROWS - 1) / SDK_ROWS];
    w->density = (double)w->nnz / ((double)n * (double)k);
    atomic_init(&w->four_of_eight, -1);
    atomic_init(&w->rows_ready, 0);
    atomic_init(&w->tiles_ready, 0);
    pthread_mutex_init(&w->lock, NULL);
    return w;
}

/* A derived form's arrays: zeroed, 64-byte aligned, released with zfree64; NULL when out of memory. Those of 2 MB and
 * more are each their own anonymous mapping, starting on a 2 MB boundary and advised for transparent huge pages
 * (Linux, where THP is "madvise" or "always"; elsewhere the advice is refused and the pages stay 4 KB): a matmul
 * streams them once, and with 4 KB pages it takes a TLB miss every 4 KB of values (Zen 4's L2 TLB covers 12 MB of
 * them; a 1B-like MLP weight's tile form at 50 % is 29 MB). Only the array's own pages are advised, so no other
 * allocation inherits the advice, and nothing more is held (a last, partial 2 MB stays in 4 KB pages). Measured in
 * docs/sparse_cpu.md ("Huge pages for the derived forms"). The 64 bytes before the array say how to release it. */
#define SDK_HUGE_PAGE ((size_t)2 << 20)
#define SDK_PAGE ((size_t)4096)
typedef struct {
    void *base;  /* what malloc or mmap returned */
    size_t span; /* the mapping's length; 0: from malloc */
} zalloc_head;
static void *zalloc64(int64_t bytes) {
    const size_t size = ((size_t)bytes + 63) & ~(size_t)63;
    if (size < SDK_HUGE_PAGE) {
        char *base = aligned_alloc(64, size + 64);
        if (!base) return NULL;
        memset(base + 64, 0, size);
        *(zalloc_head *)base = (zalloc_head){base, 0};
        return base + 64;
    }
    const size_t len = (size + SDK_PAGE - 1) & ~(SDK_PAGE - 1), span = len + SDK_HUGE_PAGE + SDK_PAGE;
    char *base = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return NULL;
    /* a page for the head, then the next 2 MB boundary; at least a page unadvised after the array, so its advised
     * range never merges with a neighbouring mapping's (the mapping's pages are zero) */
    char *p = (char *)(((uintptr_t)base + SDK_PAGE + SDK_HUGE_PAGE - 1) & ~(uintptr_t)(SDK_HUGE_PAGE - 1));
#ifdef MADV_HUGEPAGE
    (void)madvise(p, len, MADV_HUGEPAGE);
#endif
    *(zalloc_head *)(p - 64) = (zalloc_head){base, span};
    return p;
}
static void zfree64(void *p) {
    if (!p) return;
    const zalloc_head head = *(const zalloc_head *)((char *)p - 64);
    if (head.span) munmap(head.base, head.span);
    else free(head.base);
}

/* Release a bound weight's row / tile form (or what a failed build of it left); its pointers become NULL. */
static void drop_row_form(sdk_linear *w) {
    zfree64(w->row_ptr), zfree64(w->row_cols), zfree64(w->row_values);
    w->row_ptr = NULL, w->row_cols = NULL, w->row_values = NULL;
}
static void drop_tile_form(sdk_linear *w) {
    zfree64(w->tile_ptr), zfree64(w->tile_counts), zfree64(w->tile_rows), zfree64(w->tile_cols);
    zfree64(w->tile_values);
    w->tile_ptr = NULL, w->tile_counts = NULL, w->tile_rows = NULL, w->tile_cols = NULL, w->tile_values = NULL;
}

SDK_EXPORT void sdk_linear_free(sdk_linear *w) {
    if (!w) return;
    drop_row_form(w);
    drop_tile_form(w);
    pthread_mutex_destroy(&w->lock);
    free(w);
}

/* Builds the row (rows = 1) or tile form of a bound weight once: 0, or ERR_NOMEM / ERR_ARGS (K too wide for rows). */
static int linear_derive(sdk_linear *w, int rows) {
    atomic_int *ready = rows ? &w->rows_ready : &w->tiles_ready;
    if (atomic_load_explicit(ready, memory_order_acquire)) return 0;
    if (rows && w->k > SDK_ROWFORM_MAX_K) return ERR_ARGS;
    pthread_mutex_lock(&w->lock);
    int rc = 0;
    if (!atomic_load_explicit(ready, memory_order_relaxed)) {
        const int64_t nnz = w->nnz;
        if (rows) {
            drop_row_form(w); /* what a failed build left */
            const int64_t bytes = 8 * (w->n + 1) + 2 * (nnz + SDK_COL_PAD) + 4 * (nnz + SDK_VALUE_PAD);
            w->row_ptr = zalloc64(8 * (w->n + 1));
            w->row_cols = zalloc64(2 * (nnz + SDK_COL_PAD));
            w->row_values = zalloc64(4 * (nnz + SDK_VALUE_PAD));
            rc = !w->row_ptr || !w->row_cols || !w->row_values
                     ? ERR_NOMEM
                     : sdk_row_form(w->mask, w->values, w->block_ptr, w->n, w->k, w->row_ptr, w->row_cols,
                                    w->row_values);
            if (!rc) w->derived_bytes += bytes;
        } else {
            const int64_t tiles = (w->n + SDK_TILE_ROWS - 1) / SDK_TILE_ROWS;
            const int64_t counts = tiles * ((w->k + SDK_TILE_COLS - 1) / SDK_TILE_COLS) * SDK_TILE_ROWS;
            const int64_t bytes = 8 * (tiles + 1) + 2 * counts + (nnz + SDK_COL_PAD) + 4 * (nnz + SDK_VALUE_PAD);
            drop_tile_form(w); /* what a failed build left */
            w->tile_ptr = zalloc64(8 * (tiles + 1));
            w->tile_counts = zalloc64(counts);
            w->tile_rows = zalloc64(counts);
            w->tile_cols = zalloc64(nnz + SDK_COL_PAD);
            w->tile_values = zalloc64(4 * (nnz + SDK_VALUE_PAD));
            rc = !w->tile_ptr || !w->tile_counts || !w->tile_rows || !w->tile_cols || !w->tile_values
                     ? ERR_NOMEM
                     : sdk_tile_form(w->mask, w->values, w->block_ptr, w->n, w->k, w->tile_ptr, w->tile_counts,
                                     w->tile_rows, w->tile_cols, w->tile_values);
            if (!rc) w->derived_bytes += bytes;
        }
        if (!rc) atomic_store_explicit(ready, 1, memory_order_release);
    }
    pthread_mutex_unlock(&w->lock);
    return rc;
}

/* Whether every byte of every row mask has 4 bits set (format.four_of_eight), worked out at the first batch-1 call. */
SDK_EXPORT int sdk_linear_four_of_eight(sdk_linear *w) {
    int known = atomic_load_explicit(&w->four_of_eight, memory_order_relaxed);
    if (known >= 0) return known;
    const uint8_t *bytes = (const uint8_t *)w->mask;
    const int64_t count = (w->n + SDK_ROWS - 1) / SDK_ROWS * ((w->k + 15) / 16) * SDK_ROWS * 2;
    known = 1;
    for (int64_t i = 0; i < count && known; i++) known = __builtin_popcount(bytes[i]) == 4;
    atomic_store_explicit(&w->four_of_eight, known, memory_order_relaxed);
    return known;
}

/* Bytes the bound weight holds in derived forms (the row and tile forms built so far). */
SDK_EXPORT int64_t sdk_linear_derived_bytes(sdk_linear *w) {
    pthread_mutex_lock(&w->lock);
    const int64_t bytes = w->derived_bytes;
    pthread_mutex_unlock(&w->lock);
    return bytes;
}

/* The form a call of `b` rows runs in (FORM_BITMASK / FORM_ROWS / FORM_TILES) with this ISA (0 auto) and the CPU
 * profile in use, or ERR_ISA. A prefill's short last call may run in another (sdk_linear_matmul). */
SDK_EXPORT int sdk_linear_form(const sdk_linear *w, int64_t b, int isa) {
    int threads = 1;
    const int rc = prepare_call(&threads, &isa);
    return rc ? rc : pick_form(b, w->density, w->k, isa, cpu_profile);
}

/* y[b, n] = x[b, k] @ W.T for a bound weight, in calls of as many rows as the form takes: form FORM_AUTO picks per
 * call (pick_form; a prefill's short last call in the form its own size picks, the tile form's lanes would idle),
 * another forces it (tests and benchmarks). isa and threads as sdk_matmul. 0, or ERR_ARGS / ERR_ISA / ERR_NOMEM. */
SDK_EXPORT int sdk_linear_matmul(sdk_linear *w, const float *x, int64_t b, float *y, int threads, int isa, int form) {
    if (!w || !x || !y || b < 1 || threads < 1 || form < FORM_AUTO || form > FORM_TILES) return ERR_ARGS;
    int rc = prepare_call(&threads, &isa);
    if (rc) return rc;
    const int chosen = form ? form : pick_form(b, w->density, w->k, isa, cpu_profile);
    const int64_t chunk = chosen == FORM_ROWS    ? SDK_ROWFORM_MAX_B
                          : chosen == FORM_TILES ? SDK_TILE_LANES
                                                 : SDK_MAX_BATCH_CHUNK;
    for (int64_t b0 = 0; b0 < b && !rc; b0 += chunk) {
        const int64_t bb = b - b0 < chunk ? b - b0 : chunk;
        const float *xb = x + b0 * w->k;
        float *yb = y + b0 * w->n;
        const int part = bb == chunk || form || chosen != FORM_TILES ? chosen
                                                                      : pick_form(bb, w->density, w->k, isa, cpu_profile);
        if (part == FORM_ROWS) {
            rc = linear_derive(w, 1);
            if (!rc) rc = sdk_rows_matmul(xb, bb, w->k, w->row_ptr, w->row_cols, w->row_values, w->n, yb, threads, isa);
        } else if (part == FORM_TILES) {
            rc = linear_derive(w, 0);
            if (!rc)
                rc = sdk_tiles_matmul(xb, bb, w->k, w->tile_ptr, w->tile_counts, w->tile_rows, w->tile_cols,
                                      w->tile_values, w->n, yb, threads, isa);
        } else {
            rc = bitmask_matmul(xb, bb, w->k, w->mask, w->values, w->block_ptr, w->n, yb, threads, isa,
                                bb == 1 && sdk_linear_four_of_eight(w));
        }
    }
    return rc;
}

/* ------------------------------------------------------------------------------------ between the linears */

/* The sum of 8 lane partial sums in one fixed order (the plain-C dot products and norms keep 8 lanes). */
static inline float sum8(const float *part) {
    return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
}
/* The ISA of an elementwise or attention call: ISA_AUTO is AVX2 where present (AVX-512 CPUs run the AVX2 code);
 * ERR_ISA for one this CPU does not run. */
static inline int small_call_isa(int isa) {
    if (isa == ISA_AUTO) isa = isa_supported(ISA_AVX2) ? ISA_AVX2 : ISA_PORTABLE;
    return isa_supported(isa) ? isa : ERR_ISA;
}

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
        const float sum = sum8(part);
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
    isa = small_call_isa(isa);
    if (isa == ERR_ISA) return ERR_ISA;
#if SDK_X86
    if (isa == ISA_AVX2 || isa == ISA_AVX512) {
        silu_mul_avx2(gu, rows, h, out);
        return 0;
    }
#endif
    silu_mul_portable(gu, rows, h, out);
    return 0;
}

/* ------------------------------------------------------------------------------------------- scaled int8 */

/* y[b, n] = sum_k x[b, k] * W[n, k] for a dense W stored as scaled-int8 (kernels/scaled_int8.py): W[n, k] =
 * scale(n, k / 32) * code(n, k) exactly (the exporter stores that form only where it gives back every weight bit
 * for bit), so the matmul reads 1.125 bytes a weight instead of 4. Rows in groups of 4 (the last one padded with
 * zero rows), each group's 4 rows interleaved by 32-column block so a group is one sequential stream:
 *   q      int8    [NG, K / 32, 4, 32]    code(n, k) at q[n / 4, k / 32, n % 4, k % 32]
 *   scales float32 [NG, K / 32, 4]        scale(n, b) at scales[n / 4, b, n % 4]
 * Batch 1: a group's 4 rows together, each block's 32-element dot product of the codes with x scaled once.
 * Batch >= 2: 16 rows (AVX-512: 32) are rebuilt exactly (code * scale) into a float buffer transposed to [K, 16]
 * ([K, 32]), then 6 batch rows x those outputs at a time (12 accumulators, one broadcast x element per k and batch
 * row). */
#define SDK_I8_BLOCK 32
#define SDK_I8_UNIT 32 /* rows per unit of work (a multiple of 4) */
#define SDK_I8_AHEAD 1024 /* batch 1 prefetches this many bytes of codes ahead (AMD profile; Intel twice that) */
#ifndef SDK_I8_GEMV_MAX_B
#define SDK_I8_GEMV_MAX_B 8 /* batches up to this run the batch-1 form per row (measured: 2-8 faster than the rebuild + tiles) */
#endif

static inline const int8_t *i8_codes(const job_t *j, int64_t r, int64_t c) {
    return j->q + ((r >> 2) * (j->k / SDK_I8_BLOCK) + c / SDK_I8_BLOCK) * 4 * SDK_I8_BLOCK + (r & 3) * SDK_I8_BLOCK +
           c % SDK_I8_BLOCK;
}
static inline float i8_scale(const job_t *j, int64_t r, int64_t blk) {
    return j->scales[((r >> 2) * (j->k / SDK_I8_BLOCK) + blk) * 4 + (r & 3)];
}

static void int8_portable(const job_t *j, int64_t r0, int64_t r1, float *w) {
    const int64_t k = j->k;
    for (int64_t r = r0; r < r1; r += SDK_I8_UNIT) {
        const int64_t rows = r + SDK_I8_UNIT <= r1 ? SDK_I8_UNIT : r1 - r;
        for (int64_t rr = 0; rr < rows; rr++)
            for (int64_t c = 0; c < k; c++) w[rr * k + c] = i8_scale(j, r + rr, c / SDK_I8_BLOCK) * (float)*i8_codes(j, r + rr, c);
        for (int64_t bb = 0; bb < j->b; bb++) {
            const float *x = j->x + bb * k;
            for (int64_t rr = 0; rr < rows; rr++) {
                float part[8] = {0};
                for (int64_t c = 0; c < k; c += 8)
                    for (int l = 0; l < 8; l++) part[l] += w[rr * k + c + l] * x[c + l];
                j->y[bb * j->n + r + rr] = sum8(part);
            }
        }
    }
}

#if SDK_X86
__attribute__((target("avx2,fma,popcnt"))) static inline __m256 int8_codes8(const int8_t *q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* batch 1: the group of rows r .. r + 3 (one stream of codes); outputs past N are not written. (Named
 * accumulators: with arrays of vectors GCC 12 stores them to the stack on every step.) */
__attribute__((target("avx2,fma,popcnt"))) static void int8_gemv4(const job_t *j, int64_t r, int64_t bb) {
    const int64_t nbk = j->k / SDK_I8_BLOCK;
    const int8_t *q = i8_codes(j, r, 0);
    const float *sc = j->scales + (r >> 2) * nbk * 4;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t blk = 0; blk < nbk; blk++, q += 4 * SDK_I8_BLOCK, sc += 4) {
        prefetch_stream(q, SDK_I8_AHEAD);
        prefetch_stream(q + 64, SDK_I8_AHEAD);
        __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
        for (int v = 0; v < SDK_I8_BLOCK; v += 8) {
            const __m256 xv = _mm256_loadu_ps(j->x + bb * j->k + blk * SDK_I8_BLOCK + v);
            t0 = _mm256_fmadd_ps(int8_codes8(q + v), xv, t0);
            t1 = _mm256_fmadd_ps(int8_codes8(q + SDK_I8_BLOCK + v), xv, t1);
            t2 = _mm256_fmadd_ps(int8_codes8(q + 2 * SDK_I8_BLOCK + v), xv, t2);
            t3 = _mm256_fmadd_ps(int8_codes8(q + 3 * SDK_I8_BLOCK + v), xv, t3);
        }
        a0 = _mm256_fmadd_ps(t0, _mm256_broadcast_ss(sc), a0);
        a1 = _mm256_fmadd_ps(t1, _mm256_broadcast_ss(sc + 1), a1);
        a2 = _mm256_fmadd_ps(t2, _mm256_broadcast_ss(sc + 2), a2);
        a3 = _mm256_fmadd_ps(t3, _mm256_broadcast_ss(sc + 3), a3);
    }
    const float out[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
    for (int i = 0; i < 4 && r + i < j->n; i++) j->y[bb * j->n + r + i] = out[i];
}

/* batch >= 2: 6 batch rows (x rows past the batch read `zeros`) x the W weight rows of the transposed rebuilt
 * buffer wt [K, W] (2 vectors a k): 12 accumulators, each x element broadcast once per k into both vectors.
 * (Named accumulators: with arrays of vectors GCC 12 stores them to the stack on every step.) */
#define DEF_INT8_TILE(NAME, TARGET, VEC, PFX, W)                                                               \
    __attribute__((target(TARGET))) static void NAME(const job_t *j, const float *wt, int64_t r, int64_t rows,  \
                                                     int64_t b0, const float *zeros) {                        \
        const int64_t k = j->k, tb = j->b - b0 < 6 ? j->b - b0 : 6;                                          \
        const float *x0 = j->x + b0 * k;                                                                     \
        const float *x1 = tb > 1 ? x0 + k : zeros, *x2 = tb > 2 ? x0 + 2 * k : zeros;                        \
        const float *x3 = tb > 3 ? x0 + 3 * k : zeros, *x4 = tb > 4 ? x0 + 4 * k : zeros;                    \
        const float *x5 = tb > 5 ? x0 + 5 * k : zeros;                                                       \
        VEC a0 = PFX##_setzero_ps(), c0 = a0, a1 = a0, c1 = a0, a2 = a0, c2 = a0, a3 = a0, c3 = a0, a4 = a0,  \
            c4 = a0, a5 = a0, c5 = a0;                                                                       \
        for (int64_t c = 0; c < k; c++) {                                                                    \
            const VEC va = PFX##_load_ps(wt + c * (W)), vb = PFX##_load_ps(wt + c * (W) + (W) / 2);           \
            VEC xv = PFX##_set1_ps(x0[c]);                                                                   \
            a0 = PFX##_fmadd_ps(xv, va, a0), c0 = PFX##_fmadd_ps(xv, vb, c0);                                \
            xv = PFX##_set1_ps(x1[c]);                                                                       \
            a1 = PFX##_fmadd_ps(xv, va, a1), c1 = PFX##_fmadd_ps(xv, vb, c1);                                \
            xv = PFX##_set1_ps(x2[c]);                                                                       \
            a2 = PFX##_fmadd_ps(xv, va, a2), c2 = PFX##_fmadd_ps(xv, vb, c2);                                \
            xv = PFX##_set1_ps(x3[c]);                                                                       \
            a3 = PFX##_fmadd_ps(xv, va, a3), c3 = PFX##_fmadd_ps(xv, vb, c3);                                \
            xv = PFX##_set1_ps(x4[c]);                                                                       \
            a4 = PFX##_fmadd_ps(xv, va, a4), c4 = PFX##_fmadd_ps(xv, vb, c4);                                \
            xv = PFX##_set1_ps(x5[c]);                                                                       \
            a5 = PFX##_fmadd_ps(xv, va, a5), c5 = PFX##_fmadd_ps(xv, vb, c5);                                \
        }                                                                                                    \
        float out[6][W] __attribute__((aligned(64)));                                                        \
        PFX##_store_ps(out[0], a0), PFX##_store_ps(out[0] + (W) / 2, c0);                                    \
        PFX##_store_ps(out[1], a1), PFX##_store_ps(out[1] + (W) / 2, c1);                                    \
        PFX##_store_ps(out[2], a2), PFX##_store_ps(out[2] + (W) / 2, c2);                                    \
        PFX##_store_ps(out[3], a3), PFX##_store_ps(out[3] + (W) / 2, c3);                                    \
        PFX##_store_ps(out[4], a4), PFX##_store_ps(out[4] + (W) / 2, c4);                                    \
        PFX##_store_ps(out[5], a5), PFX##_store_ps(out[5] + (W) / 2, c5);                                    \
        for (int64_t i = 0; i < tb; i++) memcpy(j->y + (b0 + i) * j->n + r, out[i], (size_t)rows * sizeof(float)); \
    }
DEF_INT8_TILE(int8_tile6, "avx2,fma,popcnt", __m256, _mm256, 16)
DEF_INT8_TILE(int8_tile6_512, "avx512f,avx2,fma,popcnt", __m512, _mm512, 32)

/* rows r0 .. r0 + rows - 1 (rows <= width, 16 or 32) rebuilt exactly (code * scale) as wt [K, width] (rows past
 * `rows` zero):
 * each 8 x 8 tile of weights is transposed in registers */
__attribute__((target("avx2,fma,popcnt"))) static void int8_rebuild_transposed_avx2(const job_t *j, int64_t r0,
                                                                                     int64_t rows, float *wt,
                                                                                     int width) {
    for (int64_t c = 0; c < j->k; c += 8)
        for (int h = 0; h < width / 8; h++) {
            __m256 v[8];
            for (int i = 0; i < 8; i++) {
                const int64_t r = r0 + h * 8 + i;
                v[i] = h * 8 + i < rows ? _mm256_mul_ps(int8_codes8(i8_codes(j, r, c)),
                                                        _mm256_set1_ps(i8_scale(j, r, c / SDK_I8_BLOCK)))
                                        : _mm256_setzero_ps();
            }
            const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
            const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
            const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
            const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *o = wt + c * width + h * 8;
            _mm256_store_ps(o + 0 * width, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_store_ps(o + 1 * width, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_store_ps(o + 2 * width, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_store_ps(o + 3 * width, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_store_ps(o + 4 * width, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_store_ps(o + 5 * width, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_store_ps(o + 6 * width, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_store_ps(o + 7 * width, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
}

/* AVX2 or (wide) AVX-512: the batch-1 form per row up to SDK_I8_GEMV_MAX_B, else rebuild + tiles of 16 (32) rows */
__attribute__((target("avx2,fma,popcnt"))) static void int8_x86(const job_t *j, int64_t r0, int64_t r1, float *w,
                                                                int wide) {
    if (j->b <= SDK_I8_GEMV_MAX_B) { /* a group's codes stay in L1 across the batch rows */
        for (int64_t r = r0; r < r1; r += 4)
            for (int64_t bb = 0; bb < j->b; bb++) int8_gemv4(j, r, bb);
        return;
    }
    const int width = wide ? 32 : 16;
    for (int64_t r = r0; r < r1; r += width) {
        const int64_t rows = r + width <= r1 ? width : r1 - r;
        int8_rebuild_transposed_avx2(j, r, rows, w, width);
        for (int64_t b0 = 0; b0 < j->b; b0 += 6)
            (wide ? int8_tile6_512 : int8_tile6)(j, w, r, rows, b0, w + SDK_I8_UNIT * j->k);
    }
}
#endif

static __thread float *tl_w8;
static __thread int64_t tl_w8_cap;

static void int8_part(const job_t *j, int64_t u0, int64_t u1) {
    const int64_t r0 = u0 * SDK_I8_UNIT, r1 = u1 * SDK_I8_UNIT < j->n ? u1 * SDK_I8_UNIT : j->n;
    const int64_t need = (SDK_I8_UNIT + 1) * j->k; /* batch >= 2: rebuilt weights [K, 16 or 32], then K zeros */
    if (tl_w8_cap < need) {
        free(tl_w8);
        tl_w8 = aligned_alloc(64, (size_t)need * sizeof(float) + 64);
        tl_w8_cap = tl_w8 ? need : 0;
        if (!tl_w8) { atomic_store(j->failed, 1); return; }
    }
    memset(tl_w8 + SDK_I8_UNIT * j->k, 0, (size_t)j->k * sizeof(float));
#if SDK_X86
    if (j->isa == ISA_AVX512 || j->isa == ISA_AVX2) { int8_x86(j, r0, r1, tl_w8, j->isa == ISA_AVX512); return; }
#endif
    int8_portable(j, r0, r1, tl_w8);
}

/* y [b, n] = x [b, k] @ W.T for W in scaled-int8 (q int8 [ceil(n / 4), k / 32, 4, 32], scales float32
 * [ceil(n / 4), k / 32, 4]; k a multiple of 32).
 * isa as sdk_matmul's (AVX-512 runs the AVX2 batch-1 code). Rows are split evenly over the threads. */
SDK_EXPORT int sdk_int8_matmul(const float *x, int64_t b, int64_t k, const int8_t *q, const float *scales, int64_t n,
                               float *y, int threads, int isa) {
    if (b < 1 || k < SDK_I8_BLOCK || k % SDK_I8_BLOCK || n < 1 || !x || !q || !scales || !y || threads < 1)
        return ERR_ARGS;
    const int rc = prepare_call(&threads, &isa);
    if (rc) return rc;
    atomic_int failed = 0;
    job_t j = {.failed = &failed, .x = x, .y = y, .n = n, .k = k, .b = b, .isa = isa, .q = q, .scales = scales};
    const int64_t units = (n + SDK_I8_UNIT - 1) / SDK_I8_UNIT;
    int64_t nchunks = threads == 1 ? 1 : (int64_t)threads * SDK_CHUNKS_PER_THREAD;
    if (nchunks > units) nchunks = units;
    if (threads > units) threads = (int)units;
    j.nchunks = (int)nchunks;
    for (int64_t c = 0; c <= nchunks; c++) j.bounds[c] = units * c / nchunks;
    pthread_mutex_lock(&pool.call_lock);
    pool_run(&j, threads);
    pthread_mutex_unlock(&pool.call_lock);
    return atomic_load(&failed) ? ERR_NOMEM : 0;
}

/* ------------------------------------------------------------------------------------ decoder attention */

/* One LLaMA-style attention step with a KV cache, what torch.onnx writes between the fused q/k/v projection and
 * o_proj (onnx/fused_segment.py checks that form): 121 ONNX Runtime nodes, ~350 us a call inside a decode step.
 *   qkv   [B, S, (hq + 2 hkv) d]: q, k, v of the new tokens, heads in order, d a head's width
 *   cos, sin [Bc, S, d] (Bc = 1 or B: batch stride cs_b floats), rotary: r(x) = x cos + rotate_half(x) sin with
 *         rotate_half(x) = [-x[d/2:], x[:d/2]]
 *   past_k, past_v [B, hkv, p, d] (p = 0: none); present_k, present_v [B, hkv, p + S, d] (out): past, then the new
 *         tokens' r(k) and v
 *   mask  uint8 [Bm, Sm, lm] (batch stride m_b, row stride m_s: 0 broadcasts), 1 = the key may be attended; key j
 *         of query t is mask[b, t, j] for j < p + S
 *   out   [B, S, hq d]: query head i reads kv head i / (hq / hkv); score (r(q) qs) . r(k) ks, softmax over the
 *         allowed keys; a query with none gets zeros (ONNX Runtime's softmax gives NaN there, which the graph zeroes)
 * The graph scales k before the product ((r(q) qs) . (r(k) ks)); scaling the product instead differs by rounding. */
static inline __attribute__((always_inline)) float dot8(const float *a, const float *b, int64_t d) {
    float part[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; l++) part[l] += a[i + l] * b[i + l];
    for (; i < d; i++) part[0] += a[i] * b[i];
    return sum8(part);
}
#if SDK_X86
__attribute__((target("avx2,fma,popcnt"))) static inline float dot_avx2(const float *a, const float *b, int64_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0; /* d a multiple of 16 */
    for (int64_t i = 0; i < d; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    return hsum256(_mm256_add_ps(s0, s1));
}
#endif
static inline __attribute__((always_inline)) void rotary(const float *x, const float *c, const float *s, int64_t d,
                                                          float scale, float *dst) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) dst[i] = (x[i] * c[i] + -x[i + h] * s[i]) * scale;
    for (int64_t i = h; i < d; i++) dst[i] = (x[i] * c[i] + x[i - h] * s[i]) * scale;
}
typedef struct {
    const float *qkv, *cos, *sin, *past_k, *past_v;
    const uint8_t *mask;
    int64_t b, s, hq, hkv, d, p, cs_b, m_b, m_s; /* mask rows are lm >= p + s wide: only the first p + s are read */
    float qs, ks;
    float *out, *present_k, *present_v, *work; /* work: d + ldk (+ d ldk, keys transposed) floats */
} attn_t;
/* present = past, then the new tokens' r(k) and v (batch row b). */
static void fill_cache(const attn_t *a, int64_t b) {
    const int64_t d = a->d, s = a->s, p = a->p, len = p + s, w = (a->hq + 2 * a->hkv) * d;
    for (int64_t h = 0; h < a->hkv; h++) {
        float *pk = a->present_k + (b * a->hkv + h) * len * d, *pv = a->present_v + (b * a->hkv + h) * len * d;
        if (p) {
            memcpy(pk, a->past_k + (b * a->hkv + h) * p * d, (size_t)(p * d) * sizeof(float));
            memcpy(pv, a->past_v + (b * a->hkv + h) * p * d, (size_t)(p * d) * sizeof(float));
        }
        for (int64_t t = 0; t < s; t++) {
            const float *row = a->qkv + (b * s + t) * w, *c = a->cos + b * a->cs_b + t * d;
            rotary(row + (a->hq + h) * d, c, a->sin + (c - a->cos), d, 1.0f, pk + (p + t) * d);
            memcpy(pv + (p + t) * d, row + (a->hq + a->hkv + h) * d, (size_t)d * sizeof(float));
        }
    }
}
/* One query (its rotated, scaled q in qr) against the keys pk / values pv [len, d] its mask row m allows: o [d].
 * kt: the same keys transposed, [d, ldk] with ldk = len rounded up to 8 (zero columns past len), for the forms that
 * read them so (NULL for the others). */
typedef void (*query_fn)(const attn_t *a, const float *qr, const float *pk, const float *kt, const float *pv,
                         const uint8_t *m, float *score, float *o);
static inline int64_t keys_t_stride(int64_t len) { return (len + 7) & ~(int64_t)7; }
static void query_portable(const attn_t *a, const float *qr, const float *pk, const float *kt, const float *pv,
                           const uint8_t *m, float *score, float *o) {
    (void)kt;
    const int64_t d = a->d, len = a->p + a->s;
    float top = -INFINITY;
    for (int64_t j = 0; j < len; j++) {
        if (!m[j]) continue;
        score[j] = dot8(qr, pk + j * d, d) * a->ks;
        if (score[j] > top) top = score[j];
    }
    for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
    if (top == -INFINITY) return; /* no key allowed (or every score -inf): zeros */
    float sum = 0.0f;
    for (int64_t j = 0; j < len; j++) sum += score[j] = m[j] ? expf(score[j] - top) : 0.0f;
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < len; j++) {
        if (!m[j]) continue;
        const float pj = score[j] * inv, *vj = pv + j * d;
        for (int64_t i = 0; i < d; i++) o[i] += pj * vj[i];
    }
}
#if SDK_X86
/* The softmax's numerators in place: score[j] = exp(score[j] - top), 0 for a -inf (masked) one; -> their sum. */
__attribute__((target("avx2,fma,popcnt"))) static inline float exp_scores_avx2(float *score, int64_t len, float top) {
    const __m256 vtop = _mm256_set1_ps(top), ninf = _mm256_set1_ps(-INFINITY);
    __m256 vsum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        const __m256 x = _mm256_loadu_ps(score + j);
        const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), exp256(_mm256_sub_ps(x, vtop)));
        _mm256_storeu_ps(score + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum256(vsum);
    for (; j < len; j++) sum += score[j] = score[j] == -INFINITY ? 0.0f : expf(score[j] - top);
    return sum;
}
/* AVX2 (d a multiple of 32): the softmax's exp in 8 lanes (exp256), the weighted sum of the values 32 lanes at a
 * time in registers. */
__attribute__((target("avx2,fma,popcnt"))) static void query_avx2(const attn_t *a, const float *qr, const float *pk,
                                                                   const float *kt, const float *pv, const uint8_t *m,
                                                                   float *score, float *o) {
    (void)kt;
    const int64_t d = a->d, len = a->p + a->s;
    float top = -INFINITY;
    for (int64_t j = 0; j < len; j++) {
        score[j] = m[j] ? dot_avx2(qr, pk + j * d, d) * a->ks : -INFINITY;
        if (score[j] > top) top = score[j];
    }
    if (top == -INFINITY) { /* no key allowed (or every score -inf): zeros */
        memset(o, 0, (size_t)d * sizeof(float));
        return;
    }
    const float inv = 1.0f / exp_scores_avx2(score, len, top);
    for (int64_t i = 0; i < d; i += 32) {
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        for (int64_t jj = 0; jj < len; jj++) {
            if (score[jj] == 0.0f) continue;
            const __m256 pj = _mm256_set1_ps(score[jj] * inv);
            const float *vj = pv + jj * d + i;
            o0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj), o0);
            o1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8), o1);
            o2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 16), o2);
            o3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 24), o3);
        }
        _mm256_storeu_ps(o + i, o0);
        _mm256_storeu_ps(o + i + 8, o1);
        _mm256_storeu_ps(o + i + 16, o2);
        _mm256_storeu_ps(o + i + 24, o3);
    }
}
/* Prefill (several new tokens): the same step with the keys transposed (kt), so that the scores of 8 keys come out
 * of one vector per head dimension (q[i] broadcast times kt[i, j..j+8]) with no horizontal sum per key, in 8
 * independent FMA chains (up to 4 key blocks, even and odd i apart), and only up to the last key the mask allows (a
 * causal prefill's query t reads t + 1 keys, not all of them). The value sum runs 2 keys at a time (8 chains). */
#define QKT_BLOCKS(NB)                                                                                               \
    do {                                                                                                             \
        __m256 acc[NB][2];                                                                                           \
        for (int k = 0; k < (NB); k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();                                  \
        const float *col = kt + jb * 8;                                                                              \
        int64_t i = 0;                                                                                               \
        for (; i + 2 <= d; i += 2) {                                                                                 \
            const __m256 q0 = _mm256_set1_ps(qr[i]), q1 = _mm256_set1_ps(qr[i + 1]);                                 \
            for (int k = 0; k < (NB); k++) {                                                                         \
                acc[k][0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(col + i * ldk + 8 * k), acc[k][0]);                  \
                acc[k][1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(col + (i + 1) * ldk + 8 * k), acc[k][1]);            \
            }                                                                                                        \
        }                                                                                                            \
        for (int k = 0; k < (NB); k++)                                                                               \
            _mm256_storeu_ps(score + (jb + k) * 8, _mm256_mul_ps(_mm256_add_ps(acc[k][0], acc[k][1]), vks));         \
    } while (0)
__attribute__((target("avx2,fma,popcnt"))) static void query_keys_t_avx2(const attn_t *a, const float *qr,
                                                                          const float *pk, const float *kt,
                                                                          const float *pv, const uint8_t *m,
                                                                          float *score, float *o) {
    (void)pk;
    const int64_t d = a->d, len = a->p + a->s, ldk = keys_t_stride(len); /* d a multiple of 32 */
    int64_t lim = len; /* one past the last key the mask allows */
    while (lim > 0 && !m[lim - 1]) lim--;
    if (lim == 0) { /* no key allowed: zeros */
        memset(o, 0, (size_t)d * sizeof(float));
        return;
    }
    const int64_t nb = (lim + 7) / 8; /* key blocks of 8; ldk covers them */
    const __m256 vks = _mm256_set1_ps(a->ks);
    int64_t jb = 0;
    for (; jb + 4 <= nb; jb += 4) QKT_BLOCKS(4);
    switch (nb - jb) {
    case 3: QKT_BLOCKS(3); break;
    case 2: QKT_BLOCKS(2); break;
    case 1: QKT_BLOCKS(1); break;
    default: break;
    }
    float top = -INFINITY;
    for (int64_t j = 0; j < lim; j++) {
        if (!m[j]) score[j] = -INFINITY;
        if (score[j] > top) top = score[j];
    }
    if (top == -INFINITY) { /* every allowed score -inf: zeros */
        memset(o, 0, (size_t)d * sizeof(float));
        return;
    }
    const float inv = 1.0f / exp_scores_avx2(score, lim, top);
    for (int64_t j = 0; j < lim; j++) score[j] *= inv;
    for (int64_t i = 0; i < d; i += 32) {
        __m256 e0 = _mm256_setzero_ps(), e1 = e0, e2 = e0, e3 = e0, o0 = e0, o1 = e0, o2 = e0, o3 = e0;
        int64_t jj = 0;
        for (; jj + 2 <= lim; jj += 2) {
            const __m256 p0 = _mm256_set1_ps(score[jj]), p1 = _mm256_set1_ps(score[jj + 1]);
            const float *v0 = pv + jj * d + i, *v1 = v0 + d;
            e0 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0), e0);
            e1 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 8), e1);
            e2 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 16), e2);
            e3 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 24), e3);
            o0 = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1), o0);
            o1 = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + 8), o1);
            o2 = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + 16), o2);
            o3 = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + 24), o3);
        }
        if (jj < lim) {
            const __m256 p0 = _mm256_set1_ps(score[jj]);
            const float *v0 = pv + jj * d + i;
            e0 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0), e0);
            e1 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 8), e1);
            e2 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 16), e2);
            e3 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 24), e3);
        }
        _mm256_storeu_ps(o + i, _mm256_add_ps(e0, o0));
        _mm256_storeu_ps(o + i + 8, _mm256_add_ps(e1, o1));
        _mm256_storeu_ps(o + i + 16, _mm256_add_ps(e2, o2));
        _mm256_storeu_ps(o + i + 24, _mm256_add_ps(e3, o3));
    }
}
#undef QKT_BLOCKS
#endif
/* Every batch row: the cache, then each query head and new token (query head h reads kv head h / (hq / hkv)). */
static void attention_walk(const attn_t *a, query_fn query, int keys_t) {
    const int64_t d = a->d, s = a->s, len = a->p + s, w = (a->hq + 2 * a->hkv) * d, rep = a->hq / a->hkv;
    const int64_t ldk = keys_t_stride(len);
    float *qr = a->work, *score = a->work + d, *kt = keys_t ? score + ldk : NULL;
    for (int64_t b = 0; b < a->b; b++) {
        fill_cache(a, b);
        for (int64_t g = 0; g < a->hkv; g++) {
            const float *pk = a->present_k + (b * a->hkv + g) * len * d;
            const float *pv = a->present_v + (b * a->hkv + g) * len * d;
            if (kt) /* this kv head's keys transposed, zero columns up to ldk */
                for (int64_t i = 0; i < d; i++) {
                    for (int64_t j = 0; j < len; j++) kt[i * ldk + j] = pk[j * d + i];
                    for (int64_t j = len; j < ldk; j++) kt[i * ldk + j] = 0.0f;
                }
            for (int64_t h = g * rep; h < (g + 1) * rep; h++)
                for (int64_t t = 0; t < s; t++) {
                    const float *c = a->cos + b * a->cs_b + t * d;
                    rotary(a->qkv + (b * s + t) * w + h * d, c, a->sin + (c - a->cos), d, a->qs, qr);
                    query(a, qr, pk, kt, pv, a->mask + b * a->m_b + t * a->m_s, score,
                          a->out + ((b * s + t) * a->hq + h) * d);
                }
        }
    }
}

SDK_EXPORT int sdk_attention(const float *qkv, int64_t b, int64_t s, int64_t hq, int64_t hkv, int64_t d,
                             const float *cos, const float *sin, int64_t cs_b, const float *past_k,
                             const float *past_v, int64_t p, const uint8_t *mask, int64_t m_b, int64_t m_s, int64_t lm,
                             float qs, float ks, float *out, float *present_k, float *present_v, int isa) {
    if (b < 1 || s < 1 || hq < 1 || hkv < 1 || hq % hkv || d < 2 || d % 2 || p < 0 || lm < p + s || !qkv || !cos ||
        !sin || !mask || !out || !present_k || !present_v || (p && (!past_k || !past_v)))
        return ERR_ARGS;
    isa = small_call_isa(isa);
    if (isa == ERR_ISA) return ERR_ISA;
    query_fn query = query_portable;
    int keys_t = 0; /* prefill: the keys transposed (query_keys_t_avx2) */
#if SDK_X86
    if ((isa == ISA_AVX2 || isa == ISA_AVX512) && d % 32 == 0) {
        keys_t = s > 1;
        query = keys_t ? query_keys_t_avx2 : query_avx2;
    }
#endif
    const int64_t ldk = keys_t_stride(p + s);
    float *work = malloc((size_t)(d + ldk + (keys_t ? d * ldk : 0)) * sizeof(float));
    if (!work) return ERR_NOMEM;
    const attn_t a = {qkv, cos, sin, past_k, past_v, mask, b, s, hq, hkv, d, p, cs_b, m_b, m_s, qs, ks,
                      out, present_k, present_v, work};
    attention_walk(&a, query, keys_t);
    free(work);
    return 0;
}

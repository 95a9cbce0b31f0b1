/* Products in Z/2^64 for small channel counts: one gathered matrix product (see ringkernels.py).

   torch's int64 convolution runs 2.9-3.9 G multiply-adds a second on the benchmark's 8-16
   channel layers (one Xeon core with AVX-512DQ); this loop keeps R rows by V groups of 8 columns
   in vector registers and multiplies 8 words an instruction (vpmullq), about 10 G a second.
   Unsigned arithmetic wraps mod 2^64 in C, which is the ring's own arithmetic. */
#include <Python.h>
#include <stdint.h>

#define LANES 8
#define BAND_LANES 2 /* columns a band: two vectors (3 or 4 measured slower per word) */

typedef uint64_t lanes __attribute__((vector_size(LANES * 8), aligned(8)));

static inline lanes load_lanes(const uint64_t *p, int count) {
    lanes v = {0};
    if (count == LANES) {
        __builtin_memcpy(&v, p, sizeof v);
        return v;
    }
    for (int l = 0; l < count; l++) v[l] = p[l];
    return v;
}

static inline void store_lanes(uint64_t *p, lanes v, int count) {
    if (count == LANES) {
        __builtin_memcpy(p, &v, sizeof v);
        return;
    }
    for (int l = 0; l < count; l++) p[l] = v[l];
}

/* R rows of c from row offsets `rows`, V groups of columns, the last group `last` wide. The
   accumulators stay in registers over the whole sum: 12 independent chains at V = 1 cover the
   multiply's latency. */
#define BLOCK(R, V)                                                                             \
    static inline void block_##R##_##V(const uint64_t *x, const int64_t *rows,                 \
                                       const int64_t *cols, const uint64_t *b, uint64_t *c,    \
                                       int64_t k, int64_t n, int last) {                       \
        lanes acc[R][V];                                                                        \
        for (int r = 0; r < R; r++)                                                             \
            for (int v = 0; v < V; v++) acc[r][v] = (lanes){0};                                 \
        for (int64_t p = 0; p < k; p++) {                                                       \
            lanes bv[V];                                                                        \
            for (int v = 0; v < V; v++)                                                         \
                bv[v] = load_lanes(b + p * n + LANES * v, v == V - 1 ? last : LANES);           \
            const uint64_t *xp = x + cols[p];                                                   \
            for (int r = 0; r < R; r++) {                                                       \
                uint64_t a = xp[rows[r]];                                                       \
                for (int v = 0; v < V; v++) acc[r][v] += a * bv[v];                             \
            }                                                                                   \
        }                                                                                       \
        for (int r = 0; r < R; r++)                                                             \
            for (int v = 0; v < V; v++)                                                         \
                store_lanes(c + r * n + LANES * v, acc[r][v], v == V - 1 ? last : LANES);       \
    }
BLOCK(12, 1)
BLOCK(8, 2)
BLOCK(1, 1)
BLOCK(1, 2)

#define ROWS(R, V)                                                                              \
    for (; r + R <= m; r += R) block_##R##_##V(x, rows + r, cols, b, c + r * n, k, n, last);   \
    for (; r < m; r++) block_1_##V(x, rows + r, cols, b, c + r * n, k, n, last);               \
    break;

/* One band of up to 16 columns (b and c already offset to it). */
#define BAND_BODY                                                                               \
    int groups = (int)((width + LANES - 1) / LANES);                                            \
    int last = (int)(width - LANES * (groups - 1));                                             \
    int64_t r = 0;                                                                              \
    switch (groups) {                                                                           \
    case 1: ROWS(12, 1)                                                                         \
    default: ROWS(8, 2)                                                                         \
    }

/* The same loops compiled twice: for AVX-512DQ (chosen at run time) and for the baseline. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512dq"), flatten)) static void band_avx512(
    const uint64_t *x, const int64_t *rows, const int64_t *cols, const uint64_t *b, uint64_t *c,
    int64_t m, int64_t k, int64_t n, int64_t width) {
    BAND_BODY
}
#endif

__attribute__((flatten)) static void band_plain(const uint64_t *x, const int64_t *rows,
                                                const int64_t *cols, const uint64_t *b,
                                                uint64_t *c, int64_t m, int64_t k, int64_t n,
                                                int64_t width) {
    BAND_BODY
}

/* 1 where the loops multiply 8 words an instruction here; the caller uses them only then. */
int vectorised(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512dq") ? 1 : 0;
#else
    return 0;
#endif
}

/* c[r, j] = sum over p < k of x[rows[r] + cols[p]] * b[p, j] for r < m, j < n (b and c
   row-major, n columns), by the vector loop where `vector` asks for it and this CPU has it.
   Every offset must lie inside x: the caller checks. */
void gathered_product(const uint64_t *x, const int64_t *rows, const int64_t *cols,
                      const uint64_t *b, uint64_t *c, int64_t m, int64_t k, int64_t n,
                      int vector) {
    int fast = vector && vectorised();
    for (int64_t j0 = 0; j0 < n; j0 += BAND_LANES * LANES) {
        int64_t width = n - j0 < BAND_LANES * LANES ? n - j0 : BAND_LANES * LANES;
#if defined(__x86_64__) && defined(__GNUC__)
        if (fast) {
            band_avx512(x, rows, cols, b + j0, c + j0, m, k, n, width);
            continue;
        }
#endif
        (void)fast;
        band_plain(x, rows, cols, b + j0, c + j0, m, k, n, width);
    }
}

/* An importable module, so that setuptools builds and installs this file as an extension;
   ringkernels.py calls the two functions above through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ringkernels", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__ringkernels(void) { return PyModule_Create(&module); }

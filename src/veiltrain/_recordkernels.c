/* The owner's passes over the data set in one loop each (see recordkernels.py).

   numpy spent five passes a chunk on the record encoding (subtract, divide, min, max, rint) and
   four on the fit's sums (subtract, sum, square, sum), each over a fresh float64 array; these
   loops read each value once and write each word once. ctypes releases the GIL around them, so
   they run beside the writer thread's keystream. Compiled for AVX-512, AVX2 and plain x86-64
   (the loader picks one at run time); the arithmetic is the same IEEE double operations in each,
   so every build writes the same words. */
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* v + 1.5 * 2^52 lies in [2^52, 2^53) for |v| < 2^51, where a double's unit in the last place is
   1: the addition rounds v to an integer, half to even (the default rounding mode, as np.rint),
   and the sum's bit pattern minus the constant's is that integer. Vectorises where a conversion
   instruction would not; callers keep |v| < 2^24. */
static const double ROUNDER = 6755399441055744.0;

static inline int64_t rounded(double v) {
    double t = v + ROUNDER;
    int64_t bits, base;
    memcpy(&bits, &t, sizeof bits);
    memcpy(&base, &ROUNDER, sizeof base);
    return bits - base;
}

#define ENCODE_ROW(T)                                                                           \
    static inline int64_t encode_row_##T(const T *x, const double *mean, const double *quantum,  \
                                         double limit, int64_t n, int64_t *out) {               \
        int64_t bad = 0;                                                                        \
        for (int64_t j = 0; j < n; j++) {                                                       \
            double v = ((double)x[j] - mean[j]) / quantum[j];                                   \
            bad += !(v < limit && v > -limit); /* NaN fails both */                             \
            out[j] = rounded(v);                                                                \
        }                                                                                       \
        return bad;                                                                             \
    }
ENCODE_ROW(float)
ENCODE_ROW(double)

/* out[r] = rint((x[rows[r]] - mean) / quantum), then `classes` label words: `one` at labels[r],
   0 elsewhere. Returns how many values are not finite or not inside +-limit (their words are
   then meaningless and the caller refuses the chunk), or -1 for a label outside 0..classes-1.
   Row offsets are the caller's to check. */
#define ENCODE_RECORDS(T)                                                                       \
    CLONES int64_t encode_records_##T(                                                          \
        const T *x, const int64_t *rows, int64_t count, int64_t features, const double *mean,   \
        const double *quantum, double limit, const int64_t *labels, int64_t classes,           \
        int64_t one, int64_t *out) {                                                            \
        int64_t bad = 0, width = features + classes;                                            \
        for (int64_t r = 0; r < count; r++) {                                                   \
            int64_t *row = out + r * width;                                                     \
            if (labels[r] < 0 || labels[r] >= classes) return -1;                               \
            bad += encode_row_##T(x + rows[r] * features, mean, quantum, limit, features, row);  \
            memset(row + features, 0, (size_t)classes * sizeof *row);                          \
            row[features + labels[r]] = one;                                                    \
        }                                                                                       \
        return bad;                                                                             \
    }
ENCODE_RECORDS(float)
ENCODE_RECORDS(double)

/* Per-feature sums of d = x[rows[r], j] - shift[j] and of d * d over r, added in numpy's order
   (Standardizer.fit's passes): `chunk` rows at a time into scratch (2 * features doubles), row
   after row, and each chunk's sums then into sums and squares. rows == NULL reads rows
   0..count-1; row offsets are checked by the caller. */
#define MOMENTS(T)                                                                              \
    CLONES void shifted_moments_##T(const T *x, const int64_t *rows, int64_t count,             \
                                    int64_t features, const double *shift, int64_t chunk,        \
                                    double *scratch, double *sums, double *squares) {           \
        double *part = scratch, *part_sq = scratch + features;                                  \
        for (int64_t r = 0; r < count; r++) {                                                   \
            const T *row = x + (rows ? rows[r] : r) * features;                                 \
            int first = r % chunk == 0;                                                         \
            for (int64_t j = 0; j < features; j++) {                                            \
                double d = (double)row[j] - shift[j];                                           \
                part[j] = first ? d : part[j] + d;                                              \
                part_sq[j] = first ? d * d : part_sq[j] + d * d;                                \
            }                                                                                   \
            if (r % chunk == chunk - 1 || r == count - 1)                                       \
                for (int64_t j = 0; j < features; j++) {                                        \
                    sums[j] += part[j];                                                         \
                    squares[j] += part_sq[j];                                                   \
                }                                                                               \
        }                                                                                       \
    }
MOMENTS(float)
MOMENTS(double)

/* An importable module, so that setuptools builds and installs this file as an extension;
   recordkernels.py calls the functions above through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_recordkernels", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__recordkernels(void) { return PyModule_Create(&module); }

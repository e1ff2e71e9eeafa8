/* symdiff's elementary functions for the generated kernels: exp, expm1, log, log1p, tanh, sigmoid, softplus.
 *
 * Why: the kernels are loops over arrays, and a call of libm's scalar exp keeps a loop from
 * vectorising. Two builds, both vectorising on any x86-64 level (SSE2, AVX2, AVX-512):
 *
 * - with SYMDIFF_VECTOR_MATH (symdiff.native tries it first: glibc's libmvec is there), exp, expm1,
 *   log and log1p are libm's (float32 expm1 excepted: the C below is faster), declared `simd` so gcc
 *   calls libmvec's 2-8 lane variants; the kernels
 *   are built with -fno-trapping-math, without which gcc does not if-convert sigmoid's select below
 *   AVX-512 and calls scalar exp instead;
 * - otherwise (musl, macOS, clang without libmvec, aarch64 before glibc 2.38) they are the
 *   straight-line C below: selects, no branches, calls or tables, in the manner of fdlibm, Cephes and
 *   SLEEF: reduce the argument by a multiple k of ln 2 (Cody-Waite, ln 2 in two parts), a polynomial
 *   on the small remainder (Taylor coefficients, enough terms for the type, Estrin's scheme so the
 *   loops are not latency-bound), scale by 2^k built from bits (no 64-bit arithmetic shift or
 *   int64 -> double conversion, which AVX2 lacks).
 *
 * Accuracy against mpmath (tests/test_sd_math.py; README "Performance"): the inline functions within
 * 3 ulp in float64 and float32 (largest seen: 2.5, tanh). Special values as numpy in both builds:
 * NaN in, NaN out; exp(-inf) = 0, exp(inf) = inf, overflow to inf and gradual underflow through the
 * subnormals; log(0) = -inf, log(x < 0) = NaN; log1p(-1) = -inf; expm1, log1p and tanh keep the sign
 * of zero and return tiny (and subnormal) arguments unchanged; tanh(+-inf) = +-1.
 *
 * Needs: C99, <math.h> (fabs, copysign, INFINITY, NAN), <stdint.h>, <string.h>.
 */
#ifndef SYMDIFF_SD_MATH_H
#define SYMDIFF_SD_MATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline int64_t sd_bits(double x) { int64_t i; memcpy(&i, &x, 8); return i; }
static inline double sd_double(int64_t i) { double x; memcpy(&x, &i, 8); return x; }
static inline int32_t sd_bitsf(float x) { int32_t i; memcpy(&i, &x, 4); return i; }
static inline float sd_float(int32_t i) { float x; memcpy(&x, &i, 4); return x; }

/* ------------------------------------------------- float32 expm1: this straight-line C, libmvec or not
 * (libmvec's 8-lane expm1f in glibc 2.36 cost 5x its expf: the LSTM cell's float32 forward kernel,
 * three sigmoids and two tanh, ran 10% faster with this one on AVX2; float64 measured the same) */
#define SD_LN2_HIF 6.9313812256e-01f /* 0x3f317180: k * SD_LN2_HIF is exact */
#define SD_LN2_LOF 9.0580006145e-06f
#define SD_LOG2EF 1.44269504088896338700e+00f

static inline float sd_reducef(float x, int32_t *k) {
    float kd = x * SD_LOG2EF + 0x1.8p23f;
    *k = sd_bitsf(kd) - sd_bitsf(0x1.8p23f);
    kd -= 0x1.8p23f;
    return (x - kd * SD_LN2_HIF) - kd * SD_LN2_LOF;
}

/* e^r - 1 - r for |r| <= ln2/2, up to r^8/8! (remainder < 2^-30 relative), Estrin */
static inline float sd_expm1_tailf(float r) {
    float r2 = r * r, r4 = r2 * r2;
    float a0 = 0.5f + r * (1.0f / 6), a1 = 1.0f / 24 + r * (1.0f / 120), a2 = 1.0f / 720 + r * (1.0f / 5040);
    float b0 = a0 + r2 * a1, b1 = a2 + r2 * (1.0f / 40320);
    return r2 * (b0 + r4 * b1);
}

static inline float sd_expm1f(float x) {
    float xc = x < -18.0f ? -18.0f : x; /* e^-18 < 2^-25 */
    xc = xc > 89.0f ? 89.0f : xc;
    int32_t k;
    float r = sd_reducef(xc, &k);
    float q = r + sd_expm1_tailf(r);
    float s = sd_float((k - 1 + 127) << 23);
    float y = 2.0f * (s * q + (s - 0.5f));
    return fabsf(x) < 0x1p-25f ? x : y;
}

#ifdef SYMDIFF_VECTOR_MATH
/* glibc's vector math library (libmvec) is there: its exp, expm1, log and log1p, declared `simd` so
 * the compiler calls their 2-8 lane variants. Whole LSTM epochs measured ~5% faster with them than
 * with the inline versions below, on AVX2 (float64 and float32). */
#define SD_SIMD_MATH __attribute__((simd("notinbranch"), nothrow, const))
double exp(double) SD_SIMD_MATH; double expm1(double) SD_SIMD_MATH;
double log(double) SD_SIMD_MATH; double log1p(double) SD_SIMD_MATH;
float expf(float) SD_SIMD_MATH;
float logf(float) SD_SIMD_MATH; float log1pf(float) SD_SIMD_MATH;
static inline double sd_exp(double x) { return exp(x); }
static inline double sd_expm1(double x) { return expm1(x); }
static inline double sd_log(double x) { return log(x); }
static inline double sd_log1p(double x) { return log1p(x); }
static inline float sd_expf(float x) { return expf(x); }
static inline float sd_logf(float x) { return logf(x); }
static inline float sd_log1pf(float x) { return log1pf(x); }
#else
/* ---------------------------------------------------------------------------------- float64 */
#define SD_LN2_HI 6.93147180369123816490e-01 /* ln 2 rounded to 32 bits: k * SD_LN2_HI is exact */
#define SD_LN2_LO 1.90821492927058770002e-10
#define SD_LOG2E 1.44269504088896338700e+00

/* x = k ln2 + r, |r| <= ln2/2; k as a double and as an integer (round to nearest by the 1.5*2^52 trick) */
static inline double sd_reduce(double x, int64_t *k) {
    double kd = x * SD_LOG2E + 0x1.8p52;
    *k = sd_bits(kd) - sd_bits(0x1.8p52);
    kd -= 0x1.8p52;
    return (x - kd * SD_LN2_HI) - kd * SD_LN2_LO;
}

/* e^r - 1 - r for |r| <= ln2/2: r^2 (1/2! + r/3! + ... + r^11/13!), remainder < 2^-56 relative.
 * Estrin's scheme: a dependency chain of 5 operations instead of Horner's 12, so several
 * vectors are in flight at once (the loops are latency-bound otherwise) */
static inline double sd_expm1_tail(double r) {
    double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    double a0 = 1.0 / 2 + r * (1.0 / 6), a1 = 1.0 / 24 + r * (1.0 / 120), a2 = 1.0 / 720 + r * (1.0 / 5040);
    double a3 = 1.0 / 40320 + r * (1.0 / 362880), a4 = 1.0 / 3628800 + r * (1.0 / 39916800);
    double a5 = 1.0 / 479001600 + r * (1.0 / 6227020800.0);
    double b0 = a0 + r2 * a1, b1 = a2 + r2 * a3, b2 = a4 + r2 * a5;
    return r2 * ((b0 + r4 * b1) + r8 * b2);
}

static inline double sd_exp(double x) {
    x = x < -746.0 ? -746.0 : x; /* NaN compares false and passes through */
    x = x > 710.0 ? 710.0 : x;
    int64_t k;
    double r = sd_reduce(x, &k);
    double p = 1.0 + (r + sd_expm1_tail(r));
    /* 2^k in two factors, so k from -1077 (exp underflows to 0) to 1024 (overflows to inf) fit;
     * the last product rounds once into the subnormals */
    /* (k + 2048) >= 0: a logical shift (AVX2 has no 64-bit arithmetic one) */
    int64_t k1 = (int64_t)((uint64_t)(k + 2048) >> 1) - 1024, k2 = k - k1;
    return p * sd_double((k1 + 1023) << 52) * sd_double((k2 + 1023) << 52);
}

static inline double sd_expm1(double x) {
    double xc = x < -40.0 ? -40.0 : x; /* e^-40 < 2^-57: expm1 rounds to -1 below */
    xc = xc > 710.0 ? 710.0 : xc;
    int64_t k;
    double r = sd_reduce(xc, &k);
    double q = r + sd_expm1_tail(r);
    /* expm1(x) = 2^k q + (2^k - 1), computed as 2 (s q + (s - 1/2)) with s = 2^(k-1): finite up
     * to k = 1024, and the last doubling overflows to inf exactly when expm1 does */
    double s = sd_double((k - 1 + 1023) << 52);
    double y = 2.0 * (s * q + (s - 0.5));
    return fabs(x) < 0x1p-54 ? x : y; /* +-0 and tiny x: expm1(x) = x exactly (keeps -0) */
}

/* log of a positive normal or subnormal x; the caller handles 0, negatives, inf and NaN */
static inline double sd_log_core(double x) {
    int sub = x < 0x1p-1022;
    double y = sub ? x * 0x1p54 : x;
    /* y = 2^k m with m in [sqrt(2)/2, sqrt(2)) (musl's bit trick) */
    int64_t i = sd_bits(y) + (0x3ff0000000000000LL - 0x3fe6a09e00000000LL);
    int64_t k = (int64_t)((uint64_t)i >> 52) - 1023 - (sub ? 54 : 0); /* i > 0 for the x that matter */
    double f = sd_double((i & 0x000fffffffffffffLL) + 0x3fe6a09e00000000LL) - 1.0;
    /* log(1 + f) = 2 atanh(s), s = f / (2 + f), |s| < 0.1716; fdlibm's arrangement of the sum */
    double s = f / (2.0 + f), z = s * s, hfsq = 0.5 * f * f;
    double z2 = z * z, z4 = z2 * z2, z8 = z4 * z4; /* R = z (2/3 + 2/5 z + ... + 2/21 z^9), Estrin */
    double a0 = 2.0 / 3 + z * (2.0 / 5), a1 = 2.0 / 7 + z * (2.0 / 9), a2 = 2.0 / 11 + z * (2.0 / 13);
    double a3 = 2.0 / 15 + z * (2.0 / 17), a4 = 2.0 / 19 + z * (2.0 / 21);
    double R = z * (((a0 + z2 * a1) + z4 * (a2 + z2 * a3)) + z8 * a4);
    double dk = sd_double(k + sd_bits(0x1.8p52)) - 0x1.8p52; /* (double)k: AVX2 has no int64 -> double */
    return dk * SD_LN2_HI - ((hfsq - (s * (hfsq + R) + dk * SD_LN2_LO)) - f);
}

static inline double sd_log(double x) {
    double y = sd_log_core(x);
    y = x == 0 ? -INFINITY : y;
    y = x < 0 ? NAN : y;
    y = x == INFINITY ? x : y;
    return x != x ? x : y;
}

static inline double sd_log1p(double x) {
    double u = 1.0 + x;
    /* log(u) is log1p's value up to the rounding of 1 + x; c puts that rounding error back */
    double c = (x - (u - 1.0)) / u;
    double y = sd_log_core(u) + c;
    y = x == -1.0 ? -INFINITY : y;
    y = x < -1.0 ? NAN : y;
    y = x == INFINITY ? x : y;
    y = fabs(x) < 0x1p-54 ? x : y; /* +-0 and tiny x: log1p(x) = x (keeps -0) */
    return x != x ? x : y;
}


/* ---------------------------------------------------------------------------------- float32 */
static inline float sd_expf(float x) {
    x = x < -104.0f ? -104.0f : x;
    x = x > 89.0f ? 89.0f : x;
    int32_t k;
    float r = sd_reducef(x, &k);
    float p = 1.0f + (r + sd_expm1_tailf(r));
    int32_t k1 = k >> 1, k2 = k - k1;
    return p * sd_float((k1 + 127) << 23) * sd_float((k2 + 127) << 23);
}

static inline float sd_log_coref(float x) {
    int sub = x < 0x1p-126f;
    float y = sub ? x * 0x1p25f : x;
    int32_t i = sd_bitsf(y) + (0x3f800000 - 0x3f3504f3);
    int32_t k = (i >> 23) - 127 - (sub ? 25 : 0);
    float f = sd_float((i & 0x007fffff) + 0x3f3504f3) - 1.0f;
    float s = f / (2.0f + f), z = s * s, hfsq = 0.5f * f * f;
    float z2 = z * z, z4 = z2 * z2;
    float R = z * (((2.0f / 3 + z * (2.0f / 5)) + z2 * (2.0f / 7 + z * (2.0f / 9))) + z4 * (2.0f / 11));
    float dk = (float)k;
    return dk * SD_LN2_HIF - ((hfsq - (s * (hfsq + R) + dk * SD_LN2_LOF)) - f);
}

static inline float sd_logf(float x) {
    float y = sd_log_coref(x);
    y = x == 0 ? -INFINITY : y;
    y = x < 0 ? NAN : y;
    y = x == INFINITY ? x : y;
    return x != x ? x : y;
}

static inline float sd_log1pf(float x) {
    float u = 1.0f + x;
    float c = (x - (u - 1.0f)) / u;
    float y = sd_log_coref(u) + c;
    y = x == -1.0f ? -INFINITY : y;
    y = x < -1.0f ? NAN : y;
    y = x == INFINITY ? x : y;
    y = fabsf(x) < 0x1p-25f ? x : y;
    return x != x ? x : y;
}

#endif /* SYMDIFF_VECTOR_MATH */

/* ------------------------------------------------------------- on top of either: tanh, sigmoid, softplus */
static inline double sd_tanh(double x) {
    double e = sd_expm1(-2.0 * fabs(x)); /* in (-1, 0]: no overflow, accurate near 0 */
    return copysign(-e / (e + 2.0), x);
}

static inline double sd_sigmoid(double u) {
    double e = sd_exp(-fabs(u)), r = 1.0 / (1.0 + e);
    return u >= 0 ? r : e * r; /* e r for u < 0: accurate tails (no 1 - r cancellation) */
}

static inline double sd_softplus(double u) {
    return (u > 0 ? u : 0.0) + sd_log1p(sd_exp(-fabs(u)));
}

static inline float sd_tanhf(float x) {
    float e = sd_expm1f(-2.0f * fabsf(x));
    return copysignf(-e / (e + 2.0f), x);
}

static inline float sd_sigmoidf(float u) {
    float e = sd_expf(-fabsf(u)), r = 1.0f / (1.0f + e);
    return u >= 0 ? r : e * r;
}

static inline float sd_softplusf(float u) {
    return (u > 0 ? u : 0.0f) + sd_log1pf(sd_expf(-fabsf(u)));
}
#endif

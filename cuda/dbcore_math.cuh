// Per-element math of the dbcore kernels, shared by NVRTC (device) and g++ (host test library).
// Every function here is __host__ __device__ so the host build checks the exact code the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DBC_HD __host__ __device__ __forceinline__
#define DBC_UNROLL _Pragma("unroll")
#else
#define DBC_HD inline
#define DBC_UNROLL
#include <math.h>
#include <string.h>
#endif

typedef unsigned int dbc_u32;
typedef unsigned long long dbc_u64;
typedef long long dbc_i64;

// bfloat16 as raw bits: no cuda_bf16.h, so NVRTC needs no CUDA include path.
struct dbc_bf16 {
    unsigned short bits;
};

DBC_HD dbc_u32 dbc_float_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    dbc_u32 u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

DBC_HD float dbc_bits_float(dbc_u32 u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

DBC_HD float dbc_to_float(float x) { return x; }
DBC_HD float dbc_to_float(dbc_bf16 x) { return dbc_bits_float((dbc_u32)x.bits << 16); }

// float -> bfloat16, round to nearest even (NaN stays a quiet NaN), as torch's .to(bfloat16).
DBC_HD dbc_bf16 dbc_bf16_from_float(float f) {
    dbc_u32 b = dbc_float_bits(f);
    dbc_bf16 r;
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((b >> 16) | 0x40u);
        return r;
    }
    b += 0x7fffu + ((b >> 16) & 1u);
    r.bits = (unsigned short)(b >> 16);
    return r;
}

DBC_HD void dbc_store(float* p, float x) { *p = x; }
DBC_HD void dbc_store(dbc_bf16* p, float x) { *p = dbc_bf16_from_float(x); }
// The value a store of x would hold, read back as float (keeps z and c_in*z consistent).
DBC_HD float dbc_round(float, float x) { return x; }
DBC_HD float dbc_round(dbc_bf16, float x) { return dbc_to_float(dbc_bf16_from_float(x)); }

DBC_HD float dbc_neg_inf() { return dbc_bits_float(0xff800000u); }
DBC_HD double dbc_inf_f64() { return 1.0 / 0.0; }

// --- inverse normal CDF ----------------------------------------------------------------------
// Wichura (1988), Algorithm AS 241 PPND16: Phi^-1(p) to about 1e-16 relative, double precision.
// One implementation for host and device so both sample identical sigmas.
DBC_HD double dbc_ndtri(double p) {
    const double q = p - 0.5;
    if (fabs(q) <= 0.425) {
        const double r = 0.180625 - q * q;
        const double num =
            (((((((2.5090809287301226727e+3 * r + 3.3430575583588128105e+4) * r +
                  6.7265770927008700853e+4) * r + 4.5921953931549871457e+4) * r +
                1.3731693765509461125e+4) * r + 1.9715909503065514427e+3) * r +
              1.3314166789178437745e+2) * r + 3.3871328727963666080e+0);
        const double den =
            (((((((5.2264952788528545610e+3 * r + 2.8729085735721942674e+4) * r +
                  3.9307895800092710610e+4) * r + 2.1213794301586595867e+4) * r +
                5.3941960214247511077e+3) * r + 6.8718700749205790830e+2) * r +
              4.2313330701600911252e+1) * r + 1.0);
        return q * num / den;
    }
    double r = q < 0.0 ? p : 1.0 - p;
    if (r <= 0.0) return q < 0.0 ? -dbc_inf_f64() : dbc_inf_f64();
    r = sqrt(-log(r));
    double val;
    if (r <= 5.0) {
        r -= 1.6;
        const double num =
            (((((((7.74545014278341407640e-4 * r + 2.27238449892691845833e-2) * r +
                  2.41780725177450611770e-1) * r + 1.27045825245236838258e+0) * r +
                3.64784832476320460504e+0) * r + 5.76949722146069140550e+0) * r +
              4.63033784615654529590e+0) * r + 1.42343711074968357734e+0);
        const double den =
            (((((((1.05075007164441684324e-9 * r + 5.47593808499534494600e-4) * r +
                  1.51986665636164571966e-2) * r + 1.48103976427480074590e-1) * r +
                6.89767334985100004550e-1) * r + 1.67638483018380384940e+0) * r +
              2.05319162663775882187e+0) * r + 1.0);
        val = num / den;
    } else {
        r -= 5.0;
        const double num =
            (((((((2.01033439929228813265e-7 * r + 2.71155556874348757815e-5) * r +
                  1.24266094738807843860e-3) * r + 2.65321895265761230930e-2) * r +
                2.96560571828504891230e-1) * r + 1.78482653991729133580e+0) * r +
              5.46378491116411436990e+0) * r + 6.65790464350110377720e+0);
        const double den =
            (((((((2.04426310338993978564e-15 * r + 1.42151175831644588870e-7) * r +
                  1.84631831751005468180e-5) * r + 7.86869131145613259100e-4) * r +
                1.48753612908506148525e-2) * r + 1.36929880922735805310e-1) * r +
              5.99832206555887937690e-1) * r + 1.0);
        val = num / den;
    }
    return q < 0.0 ? -val : val;
}

// --- sigma of a block (METHOD.md section 3) ------------------------------------------------------
enum { DBC_DIST_LOGNORMAL = 0, DBC_DIST_LOGUNIFORM = 1 };

// lognormal: a, b = Phi(lo), Phi(hi) of the training log-normal; sigma = exp(P_mean + P_std *
// Phi^-1(a + u (b - a))). loguniform: a, b = ln lo, ln hi; sigma = exp(a + u (b - a)).
DBC_HD double dbc_sigma(int dist, double u, double a, double b, double p_mean, double p_std) {
    const double t = a + u * (b - a);
    if (dist == DBC_DIST_LOGNORMAL) return exp(p_mean + p_std * dbc_ndtri(t));
    return exp(t);
}

// --- EDM preconditioning (METHOD.md section 2) -------------------------------------------------
struct dbc_precond {
    float c_skip, c_out, c_in;
};

DBC_HD dbc_precond dbc_precond_of(double s, double sd) {
    const double s2 = s * s, sd2 = sd * sd, n = sqrt(s2 + sd2);
    dbc_precond p;
    p.c_skip = (float)(sd2 / (s2 + sd2));
    p.c_out = (float)(s * sd / n);
    p.c_in = (float)(1.0 / n);
    return p;
}

// Residual D - y of one element, D = c_skip*z + c_out*F.
DBC_HD float dbc_residual(dbc_precond p, float z, float f, float y) {
    return p.c_skip * z + p.c_out * f - y;
}

// --- online softmax: running (max m, sum of exp(x - m)) pairs, merged in any order -------------
struct dbc_softmax_state {
    float m, s;
};

DBC_HD dbc_softmax_state dbc_softmax_init() {
    dbc_softmax_state st;
    st.m = dbc_neg_inf();
    st.s = 0.0f;
    return st;
}

DBC_HD dbc_softmax_state dbc_softmax_merge(dbc_softmax_state a, dbc_softmax_state b) {
    dbc_softmax_state r;
    r.m = fmaxf(a.m, b.m);
    if (r.m == dbc_neg_inf()) {  // both empty or all -inf: exp(-inf - -inf) would be NaN
        r.s = 0.0f;
        return r;
    }
    r.s = a.s * expf(a.m - r.m) + b.s * expf(b.m - r.m);
    return r;
}

// One element: a single exp per element (the merge would take two).
DBC_HD dbc_softmax_state dbc_softmax_push(dbc_softmax_state a, float x) {
    if (x > a.m) {
        a.s = a.s * expf(a.m - x) + 1.0f;
        a.m = x;
    } else if (a.m != dbc_neg_inf()) {
        a.s += expf(x - a.m);
    }
    return a;
}

// Row statistics kept for the backward pass: max m and ln(sum exp(x - m)); lse = m + ln s.
// Kept apart because m + ln s rounds away the small terms when |m| is large.

#define DBC_IGNORE_INDEX (-100)

// Loss of one row: w ((m - x_label) + ln s); 0 for an ignored row, NaN for a label outside [0, v).
DBC_HD float dbc_ce_row_loss(float m, float log_s, float x_label, dbc_i64 label, dbc_i64 v,
                             float w) {
    if (label == DBC_IGNORE_INDEX) return 0.0f;
    if (label < 0 || label >= v) return dbc_bits_float(0x7fc00000u);
    return w * ((m - x_label) + log_s);
}

// d loss_i / d logit_ij = coef * (softmax_ij - [j == label]), coef = upstream grad * w_i.
DBC_HD float dbc_ce_grad(float x, float m, float log_s, bool is_label, float coef) {
    return coef * (expf((x - m) - log_s) - (is_label ? 1.0f : 0.0f));
}

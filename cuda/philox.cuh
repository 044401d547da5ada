// Philox4x32-10 and Box-Muller, bit-compatible with dbcore.rng (its docstring is the contract).
#pragma once
#include "dbcore_math.cuh"

#define DBC_PHILOX_M0 0xD2511F53u
#define DBC_PHILOX_M1 0xCD9E8D57u
#define DBC_PHILOX_W0 0x9E3779B9u
#define DBC_PHILOX_W1 0xBB67AE85u
#define DBC_SIGMA_GROUP 0xFFFFFFFFu

struct dbc_u32x4 {
    dbc_u32 v[4];
};

DBC_HD dbc_u32 dbc_mulhi(dbc_u32 a, dbc_u32 b) {
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return (dbc_u32)(((dbc_u64)a * b) >> 32);
#endif
}

// counter = (j, sample, block, draw); key = (seed lo, seed hi).
DBC_HD dbc_u32x4 dbc_philox(dbc_u32 c0, dbc_u32 c1, dbc_u32 c2, dbc_u32 c3, dbc_u32 k0, dbc_u32 k1) {
DBC_UNROLL
    for (int r = 0; r < 10; ++r) {
        if (r) {
            k0 += DBC_PHILOX_W0;
            k1 += DBC_PHILOX_W1;
        }
        const dbc_u32 hi0 = dbc_mulhi(DBC_PHILOX_M0, c0), lo0 = DBC_PHILOX_M0 * c0;
        const dbc_u32 hi1 = dbc_mulhi(DBC_PHILOX_M1, c2), lo1 = DBC_PHILOX_M1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    dbc_u32x4 out;
    out.v[0] = c0;
    out.v[1] = c1;
    out.v[2] = c2;
    out.v[3] = c3;
    return out;
}

#define DBC_INV_2_32 2.3283064365386962890625e-10

// u = (x + 0.5) 2^-32 in (0, 1), exact in double.
DBC_HD double dbc_uniform_f64(dbc_u32 x) { return ((double)x + 0.5) * DBC_INV_2_32; }

// -2 ln u in float. Near u = 1 the float u loses the small complement 1 - u, so take
// log1p(-(1 - u)) with 1 - u = ((2^32 - 1 - x) + 0.5) 2^-32 computed exactly from the integer.
DBC_HD float dbc_neg2_log_u(dbc_u32 x) {
    if (x < 0x80000000u) return -2.0f * logf(((float)x + 0.5f) * (float)DBC_INV_2_32);
    return -2.0f * log1pf(-(((float)(0xFFFFFFFFu - x) + 0.5f) * (float)DBC_INV_2_32));
}

// (sin, cos) of 2 pi u with u from x; sincospi scales by pi exactly on the device.
DBC_HD void dbc_sincos_2pi_u(dbc_u32 x, float* s, float* c) {
#ifdef __CUDA_ARCH__
    sincospif((float)(2.0 * dbc_uniform_f64(x)), s, c);
#else
    const double a = 3.14159265358979323846 * (double)(float)(2.0 * dbc_uniform_f64(x));
    *s = (float)sin(a);
    *c = (float)cos(a);
#endif
}

// Four standard normals from one Philox output: (0, 1) and (2, 3) are Box-Muller pairs,
// n_even = sqrt(-2 ln u_a) cos(2 pi u_b), n_odd = sqrt(-2 ln u_a) sin(2 pi u_b).
struct dbc_f32x4 {
    float v[4];
};

DBC_HD dbc_f32x4 dbc_box_muller(dbc_u32x4 x) {
    dbc_f32x4 n;
    float s, c;
    const float r01 = sqrtf(dbc_neg2_log_u(x.v[0]));
    dbc_sincos_2pi_u(x.v[1], &s, &c);
    n.v[0] = r01 * c;
    n.v[1] = r01 * s;
    const float r23 = sqrtf(dbc_neg2_log_u(x.v[2]));
    dbc_sincos_2pi_u(x.v[3], &s, &c);
    n.v[2] = r23 * c;
    n.v[3] = r23 * s;
    return n;
}

// Gaussians of group j of one sample: elements 4j .. 4j+3 of its noise.
DBC_HD dbc_f32x4 dbc_gaussian4(dbc_u32 j, dbc_u32 sample, dbc_u32 block, dbc_u32 draw,
                               dbc_u32 k0, dbc_u32 k1) {
    return dbc_box_muller(dbc_philox(j, sample, block, draw, k0, k1));
}

// The uniform that picks the sample's sigma (group SIGMA_GROUP, output 0), in double.
DBC_HD double dbc_sigma_uniform(dbc_u32 sample, dbc_u32 block, dbc_u32 draw, dbc_u32 k0,
                                dbc_u32 k1) {
    return dbc_uniform_f64(dbc_philox(DBC_SIGMA_GROUP, sample, block, draw, k0, k1).v[0]);
}

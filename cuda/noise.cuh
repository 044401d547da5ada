// Per-sample and per-group math of the noise kernel (host and device).
#pragma once
#include "philox.cuh"

struct dbc_noise_sample {
    float sigma, c_in;
    dbc_u32 sample;
};

// Sigma and c_in of one sample; an index outside 32 bits poisons the sample with NaN.
DBC_HD dbc_noise_sample dbc_noise_setup(dbc_i64 sample, dbc_u32 k0, dbc_u32 k1, dbc_u32 block,
                                        dbc_u32 draw, int dist, double a, double b,
                                        double p_mean, double p_std, double sd) {
    dbc_noise_sample r;
    r.sigma = dbc_bits_float(0x7fc00000u);
    r.sample = (dbc_u32)sample;
    if (sample >= 0 && sample <= 0xFFFFFFFFll) {
        const double u = dbc_sigma_uniform(r.sample, block, draw, k0, k1);
        r.sigma = (float)dbc_sigma(dist, u, a, b, p_mean, p_std);
    }
    r.c_in = dbc_precond_of(r.sigma, sd).c_in;
    return r;
}

// Elements 4g .. 4g+3 (those below e) of one sample: z = y + sigma*eps, c_in*z (z as stored).
template <typename T>
DBC_HD void dbc_noise_group(const T* y, T* z, T* c_in_z, dbc_i64 g, dbc_i64 e,
                            dbc_noise_sample smp, dbc_u32 k0, dbc_u32 k1, dbc_u32 block,
                            dbc_u32 draw) {
    const dbc_f32x4 eps = dbc_gaussian4((dbc_u32)g, smp.sample, block, draw, k0, k1);
    for (int r = 0; r < 4 && 4 * g + r < e; ++r) {
        const dbc_i64 at = 4 * g + r;
        const float zr = dbc_round(T(), dbc_to_float(y[at]) + smp.sigma * eps.v[r]);
        dbc_store(z + at, zr);
        dbc_store(c_in_z + at, smp.c_in * zr);
    }
}

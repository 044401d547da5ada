// Noised block input in one pass: sigma from the block's distribution, eps from Philox,
// z = y + sigma*eps and c_in*z (METHOD.md sections 2-3). Grid: x over groups of 4 elements,
// y over samples (strided). y, z, c_in_z are (n, e) contiguous; vec: 4-element vector access.
#include "noise.cuh"
#include "reduce.cuh"

template <typename T>
__device__ void dbc_noise(const T* y, T* z, T* c_in_z, float* sigma_out, const dbc_i64* sample,
                          dbc_i64 n, dbc_i64 e, int vec, dbc_u32 k0, dbc_u32 k1, dbc_u32 block,
                          dbc_u32 draw, int dist, double a, double b, double p_mean, double p_std,
                          double sd) {
    __shared__ dbc_noise_sample sh;
    const dbc_i64 groups = (e + 3) / 4;
    for (dbc_i64 i = blockIdx.y; i < n; i += gridDim.y) {
        if (threadIdx.x == 0) {
            sh = dbc_noise_setup(sample[i], k0, k1, block, draw, dist, a, b, p_mean, p_std, sd);
            if (blockIdx.x == 0) sigma_out[i] = sh.sigma;
        }
        __syncthreads();
        const dbc_noise_sample smp = sh;
        const T* yi = y + i * e;
        T* zi = z + i * e;
        T* ci = c_in_z + i * e;
        for (dbc_i64 g = blockIdx.x * (dbc_i64)blockDim.x + threadIdx.x; g < groups;
             g += (dbc_i64)blockDim.x * gridDim.x) {
            if (vec) {  // same math as dbc_noise_group, with 4-element loads and stores
                const dbc_f32x4 eps = dbc_gaussian4((dbc_u32)g, smp.sample, block, draw, k0, k1);
                float v[4], c[4];
                dbc_load4(yi + 4 * g, v);
DBC_UNROLL
                for (int r = 0; r < 4; ++r) {
                    v[r] = dbc_round(T(), v[r] + smp.sigma * eps.v[r]);
                    c[r] = smp.c_in * v[r];
                }
                dbc_store4(zi + 4 * g, v);
                dbc_store4(ci + 4 * g, c);
            } else {
                dbc_noise_group(yi, zi, ci, g, e, smp, k0, k1, block, draw);
            }
        }
        __syncthreads();  // sh is rewritten for the next sample
    }
}

#define DBC_NOISE_ENTRY(NAME, T)                                                                 \
    extern "C" __global__ void NAME(const T* y, T* z, T* c_in_z, float* sigma_out,              \
                                    const dbc_i64* sample, dbc_i64 n, dbc_i64 e, int vec,       \
                                    dbc_u32 k0, dbc_u32 k1, dbc_u32 block, dbc_u32 draw,        \
                                    int dist, double a, double b, double p_mean, double p_std,  \
                                    double sd) {                                                \
        dbc_noise<T>(y, z, c_in_z, sigma_out, sample, n, e, vec, k0, k1, block, draw, dist, a, \
                     b, p_mean, p_std, sd);                                                     \
    }

DBC_NOISE_ENTRY(dbc_noise_f32, float)
DBC_NOISE_ENTRY(dbc_noise_bf16, dbc_bf16)

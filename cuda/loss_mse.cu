// Fused per-block loss for continuous targets (METHOD.md section 4): D = c_skip*z + c_out*F,
// loss_i = w_i * mean_e (D - y)^2, and its gradients in one elementwise pass.
// Tensors are (n, e) contiguous; sigma, w, upstream grads are (n,) float32.
#include "reduce.cuh"

// Grid (parts, samples): partial[i, part] = sum over the part's elements of (D - y)^2.
template <typename T>
__device__ void dbc_mse_partial(const T* z, const T* f, const T* y, const float* sigma, dbc_i64 n,
                                dbc_i64 e, double sd, float* partial) {
    __shared__ float smem[32];
    for (dbc_i64 i = blockIdx.y; i < n; i += gridDim.y) {
        const dbc_precond p = dbc_precond_of(sigma[i], sd);
        float acc = 0.0f;
        for (dbc_i64 k = blockIdx.x * (dbc_i64)blockDim.x + threadIdx.x; k < e;
             k += (dbc_i64)blockDim.x * gridDim.x) {
            const dbc_i64 at = i * e + k;
            const float d = dbc_residual(p, dbc_to_float(z[at]), dbc_to_float(f[at]),
                                         dbc_to_float(y[at]));
            acc += d * d;
        }
        acc = dbc_block_sum(acc, smem);
        if (threadIdx.x == 0) partial[i * gridDim.x + blockIdx.x] = acc;
    }
}

// One thread per sample, partial sums added in a fixed order (deterministic).
extern "C" __global__ void dbc_mse_finalize(const float* partial, int parts, const float* w,
                                            dbc_i64 n, dbc_i64 e, float* mse, float* loss) {
    const dbc_i64 i = blockIdx.x * (dbc_i64)blockDim.x + threadIdx.x;
    if (i >= n) return;
    double acc = 0.0;
    for (int k = 0; k < parts; ++k) acc += partial[i * parts + k];
    const float m = (float)(acc / (double)e);
    mse[i] = m;
    loss[i] = w[i] * m;
}

// d loss_i / dF = coef c_out (D - y), / dz = coef c_skip (D - y), / dy = -coef (D - y),
// coef = g_i w_i 2 / e. A null output pointer skips that gradient.
template <typename T>
__device__ void dbc_mse_backward(const T* z, const T* f, const T* y, const float* sigma,
                                 const float* w, const float* g, dbc_i64 n, dbc_i64 e, double sd,
                                 T* grad_f, T* grad_z, T* grad_y) {
    for (dbc_i64 i = blockIdx.y; i < n; i += gridDim.y) {
        const dbc_precond p = dbc_precond_of(sigma[i], sd);
        const float coef = (float)((double)g[i] * (double)w[i] * 2.0 / (double)e);
        for (dbc_i64 k = blockIdx.x * (dbc_i64)blockDim.x + threadIdx.x; k < e;
             k += (dbc_i64)blockDim.x * gridDim.x) {
            const dbc_i64 at = i * e + k;
            const float d = coef * dbc_residual(p, dbc_to_float(z[at]), dbc_to_float(f[at]),
                                                dbc_to_float(y[at]));
            if (grad_f) dbc_store(grad_f + at, p.c_out * d);
            if (grad_z) dbc_store(grad_z + at, p.c_skip * d);
            if (grad_y) dbc_store(grad_y + at, -d);
        }
    }
}

#define DBC_MSE_ENTRIES(SUFFIX, T)                                                              \
    extern "C" __global__ void dbc_mse_partial_##SUFFIX(const T* z, const T* f, const T* y,     \
                                                        const float* sigma, dbc_i64 n,          \
                                                        dbc_i64 e, double sd, float* partial) { \
        dbc_mse_partial<T>(z, f, y, sigma, n, e, sd, partial);                                  \
    }                                                                                           \
    extern "C" __global__ void dbc_mse_backward_##SUFFIX(                                       \
        const T* z, const T* f, const T* y, const float* sigma, const float* w, const float* g, \
        dbc_i64 n, dbc_i64 e, double sd, T* grad_f, T* grad_z, T* grad_y) {                     \
        dbc_mse_backward<T>(z, f, y, sigma, w, g, n, e, sd, grad_f, grad_z, grad_y);            \
    }

DBC_MSE_ENTRIES(f32, float)
DBC_MSE_ENTRIES(bf16, dbc_bf16)

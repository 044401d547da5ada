// Fused weighted cross-entropy over a head's logits (METHOD.md section 4, discrete targets):
// loss_i = w_i * (lse_i - x_i,label), grad x_ij = g_i w_i (softmax_ij - [j == label]).
// logits (n, v) contiguous; labels (n,) int64, -100 ignores a row (loss 0, grad 0), any other
// label outside [0, v) gives a NaN loss.
#include "reduce.cuh"

// One block per row (strided): online softmax of the row, then the row's loss and its
// statistics (max, ln sum exp(x - max)) as stats (n, 2).
template <typename T>
__device__ void dbc_ce_forward(const T* logits, const dbc_i64* labels, const float* w, dbc_i64 n,
                               dbc_i64 v, float* loss, float* stats) {
    __shared__ dbc_softmax_state smem[32];
    for (dbc_i64 row = blockIdx.x; row < n; row += gridDim.x) {
        const T* x = logits + row * v;
        dbc_softmax_state st = dbc_softmax_init();
        for (dbc_i64 j = threadIdx.x; j < v; j += blockDim.x) {
            st = dbc_softmax_push(st, dbc_to_float(x[j]));
        }
        st = dbc_block_softmax(st, smem);
        if (threadIdx.x == 0) {
            const float log_s = logf(st.s);
            const dbc_i64 lab = labels[row];
            const float x_lab = lab >= 0 && lab < v ? dbc_to_float(x[lab]) : 0.0f;
            loss[row] = dbc_ce_row_loss(st.m, log_s, x_lab, lab, v, w[row]);
            stats[2 * row] = st.m;
            stats[2 * row + 1] = log_s;
        }
    }
}

// Grid (chunks of the row, rows strided).
template <typename T>
__device__ void dbc_ce_backward(const T* logits, const dbc_i64* labels, const float* stats,
                                const float* w, const float* g, dbc_i64 n, dbc_i64 v, T* grad) {
    for (dbc_i64 row = blockIdx.y; row < n; row += gridDim.y) {
        const dbc_i64 lab = labels[row];
        const float coef = lab == DBC_IGNORE_INDEX ? 0.0f : g[row] * w[row];
        const float m = stats[2 * row], log_s = stats[2 * row + 1];
        for (dbc_i64 j = blockIdx.x * (dbc_i64)blockDim.x + threadIdx.x; j < v;
             j += (dbc_i64)blockDim.x * gridDim.x) {
            const dbc_i64 at = row * v + j;
            dbc_store(grad + at, dbc_ce_grad(dbc_to_float(logits[at]), m, log_s, j == lab, coef));
        }
    }
}

#define DBC_CE_ENTRIES(SUFFIX, T)                                                               \
    extern "C" __global__ void dbc_ce_forward_##SUFFIX(const T* logits, const dbc_i64* labels,  \
                                                       const float* w, dbc_i64 n, dbc_i64 v,    \
                                                       float* loss, float* stats) {               \
        dbc_ce_forward<T>(logits, labels, w, n, v, loss, stats);                                  \
    }                                                                                           \
    extern "C" __global__ void dbc_ce_backward_##SUFFIX(                                        \
        const T* logits, const dbc_i64* labels, const float* stats, const float* w,               \
        const float* g, dbc_i64 n, dbc_i64 v, T* grad) {                                        \
        dbc_ce_backward<T>(logits, labels, stats, w, g, n, v, grad);                              \
    }

DBC_CE_ENTRIES(f32, float)
DBC_CE_ENTRIES(bf16, dbc_bf16)

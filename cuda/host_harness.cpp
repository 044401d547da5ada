// Host build of the kernels' per-element math (g++), called from the tests through ctypes.
// Each function loops over what one CUDA thread or block would compute, using the same headers.
#include "noise.cuh"

template <typename T>
static void noise(const T* y, T* z, T* c_in_z, float* sigma, const dbc_i64* sample, dbc_i64 n,
                  dbc_i64 e, dbc_u32 k0, dbc_u32 k1, dbc_u32 block, dbc_u32 draw, int dist,
                  double a, double b, double p_mean, double p_std, double sd) {
    for (dbc_i64 i = 0; i < n; ++i) {
        const dbc_noise_sample smp =
            dbc_noise_setup(sample[i], k0, k1, block, draw, dist, a, b, p_mean, p_std, sd);
        sigma[i] = smp.sigma;
        for (dbc_i64 g = 0; 4 * g < e; ++g)
            dbc_noise_group(y + i * e, z + i * e, c_in_z + i * e, g, e, smp, k0, k1, block, draw);
    }
}

extern "C" {

void dbc_h_philox(const dbc_u32* ctr, dbc_i64 n, dbc_u32 k0, dbc_u32 k1, dbc_u32* out) {
    for (dbc_i64 i = 0; i < n; ++i) {
        const dbc_u32* c = ctr + 4 * i;
        const dbc_u32x4 x = dbc_philox(c[0], c[1], c[2], c[3], k0, k1);
        for (int r = 0; r < 4; ++r) out[4 * i + r] = x.v[r];
    }
}

void dbc_h_gaussian(const dbc_i64* sample, dbc_i64 n, dbc_i64 e, dbc_u32 k0, dbc_u32 k1,
                    dbc_u32 block, dbc_u32 draw, float* out) {
    for (dbc_i64 i = 0; i < n; ++i)
        for (dbc_i64 g = 0; 4 * g < e; ++g) {
            const dbc_f32x4 x = dbc_gaussian4((dbc_u32)g, (dbc_u32)sample[i], block, draw, k0, k1);
            for (int r = 0; r < 4 && 4 * g + r < e; ++r) out[i * e + 4 * g + r] = x.v[r];
        }
}

void dbc_h_ndtri(const double* p, dbc_i64 n, double* out) {
    for (dbc_i64 i = 0; i < n; ++i) out[i] = dbc_ndtri(p[i]);
}

void dbc_h_bf16(const float* x, dbc_i64 n, unsigned short* out) {
    for (dbc_i64 i = 0; i < n; ++i) out[i] = dbc_bf16_from_float(x[i]).bits;
}

void dbc_h_noise_f32(const float* y, float* z, float* c_in_z, float* sigma, const dbc_i64* sample,
                     dbc_i64 n, dbc_i64 e, dbc_u32 k0, dbc_u32 k1, dbc_u32 block, dbc_u32 draw,
                     int dist, double a, double b, double p_mean, double p_std, double sd) {
    noise(y, z, c_in_z, sigma, sample, n, e, k0, k1, block, draw, dist, a, b, p_mean, p_std, sd);
}

void dbc_h_noise_bf16(const dbc_bf16* y, dbc_bf16* z, dbc_bf16* c_in_z, float* sigma,
                      const dbc_i64* sample, dbc_i64 n, dbc_i64 e, dbc_u32 k0, dbc_u32 k1,
                      dbc_u32 block, dbc_u32 draw, int dist, double a, double b, double p_mean,
                      double p_std, double sd) {
    noise(y, z, c_in_z, sigma, sample, n, e, k0, k1, block, draw, dist, a, b, p_mean, p_std, sd);
}

// Per-sample mse and w*mse; float partial sums per 256 elements as a kernel thread would keep.
void dbc_h_mse_forward(const float* z, const float* f, const float* y, const float* sigma,
                       const float* w, dbc_i64 n, dbc_i64 e, double sd, float* mse, float* loss) {
    for (dbc_i64 i = 0; i < n; ++i) {
        const dbc_precond p = dbc_precond_of(sigma[i], sd);
        double acc = 0.0;
        for (dbc_i64 k0 = 0; k0 < e; k0 += 256) {
            float part = 0.0f;
            for (dbc_i64 k = k0; k < e && k < k0 + 256; ++k) {
                const float d = dbc_residual(p, z[i * e + k], f[i * e + k], y[i * e + k]);
                part += d * d;
            }
            acc += part;
        }
        mse[i] = (float)(acc / (double)e);
        loss[i] = w[i] * mse[i];
    }
}

void dbc_h_mse_backward(const float* z, const float* f, const float* y, const float* sigma,
                        const float* w, const float* g, dbc_i64 n, dbc_i64 e, double sd,
                        float* grad_f, float* grad_z, float* grad_y) {
    for (dbc_i64 i = 0; i < n; ++i) {
        const dbc_precond p = dbc_precond_of(sigma[i], sd);
        const float coef = (float)((double)g[i] * (double)w[i] * 2.0 / (double)e);
        for (dbc_i64 k = 0; k < e; ++k) {
            const dbc_i64 at = i * e + k;
            const float d = coef * dbc_residual(p, z[at], f[at], y[at]);
            grad_f[at] = p.c_out * d;
            grad_z[at] = p.c_skip * d;
            grad_y[at] = -d;
        }
    }
}

// One row as a block of `threads` threads: strided online softmax per thread, then a tree merge.
void dbc_h_ce_forward(const float* logits, const dbc_i64* labels, const float* w, dbc_i64 n,
                      dbc_i64 v, int threads, dbc_softmax_state* scratch, float* loss,
                      float* stats) {
    for (dbc_i64 row = 0; row < n; ++row) {
        const float* x = logits + row * v;
        for (int t = 0; t < threads; ++t) {
            dbc_softmax_state st = dbc_softmax_init();
            for (dbc_i64 j = t; j < v; j += threads) st = dbc_softmax_push(st, x[j]);
            scratch[t] = st;
        }
        for (int width = threads / 2; width > 0; width /= 2)
            for (int t = 0; t < width; ++t) scratch[t] = dbc_softmax_merge(scratch[t], scratch[t + width]);
        const float m = scratch[0].m, log_s = logf(scratch[0].s);
        const dbc_i64 lab = labels[row];
        const float x_lab = lab >= 0 && lab < v ? x[lab] : 0.0f;
        loss[row] = dbc_ce_row_loss(m, log_s, x_lab, lab, v, w[row]);
        stats[2 * row] = m;
        stats[2 * row + 1] = log_s;
    }
}

void dbc_h_ce_backward(const float* logits, const dbc_i64* labels, const float* stats,
                       const float* w, const float* g, dbc_i64 n, dbc_i64 v, float* grad) {
    for (dbc_i64 row = 0; row < n; ++row) {
        const dbc_i64 lab = labels[row];
        const float coef = lab == DBC_IGNORE_INDEX ? 0.0f : g[row] * w[row];
        for (dbc_i64 j = 0; j < v; ++j)
            grad[row * v + j] = dbc_ce_grad(logits[row * v + j], stats[2 * row], stats[2 * row + 1], j == lab, coef);
    }
}

}  // extern "C"

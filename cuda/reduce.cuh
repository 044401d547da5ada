// Block-wide reductions (device only). The result is valid in thread 0; smem holds 32 slots.
#pragma once
#include "dbcore_math.cuh"

#define DBC_FULL_MASK 0xffffffffu

__device__ __forceinline__ float dbc_block_sum(float v, float* smem) {
DBC_UNROLL
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(DBC_FULL_MASK, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // smem may still be read by a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)((blockDim.x + 31) >> 5) ? smem[lane] : 0.0f;
DBC_UNROLL
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(DBC_FULL_MASK, v, off);
    }
    return v;
}

__device__ __forceinline__ dbc_softmax_state dbc_block_softmax(dbc_softmax_state st,
                                                               dbc_softmax_state* smem) {
DBC_UNROLL
    for (int off = 16; off > 0; off >>= 1) {
        dbc_softmax_state o;
        o.m = __shfl_xor_sync(DBC_FULL_MASK, st.m, off);
        o.s = __shfl_xor_sync(DBC_FULL_MASK, st.s, off);
        st = dbc_softmax_merge(st, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) smem[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < (int)((blockDim.x + 31) >> 5) ? smem[lane] : dbc_softmax_init();
DBC_UNROLL
        for (int off = 16; off > 0; off >>= 1) {
            dbc_softmax_state o;
            o.m = __shfl_xor_sync(DBC_FULL_MASK, st.m, off);
            o.s = __shfl_xor_sync(DBC_FULL_MASK, st.s, off);
            st = dbc_softmax_merge(st, o);
        }
    }
    return st;
}

// Vector loads/stores of 4 consecutive elements (caller guarantees alignment).
__device__ __forceinline__ void dbc_load4(const float* p, float* v) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
}

__device__ __forceinline__ void dbc_load4(const dbc_bf16* p, float* v) {
    const uint2 t = *reinterpret_cast<const uint2*>(p);
    v[0] = dbc_bits_float(t.x << 16);
    v[1] = dbc_bits_float(t.x & 0xffff0000u);
    v[2] = dbc_bits_float(t.y << 16);
    v[3] = dbc_bits_float(t.y & 0xffff0000u);
}

__device__ __forceinline__ void dbc_store4(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ void dbc_store4(dbc_bf16* p, const float* v) {
    uint2 t;
    t.x = (dbc_u32)dbc_bf16_from_float(v[0]).bits | ((dbc_u32)dbc_bf16_from_float(v[1]).bits << 16);
    t.y = (dbc_u32)dbc_bf16_from_float(v[2]).bits | ((dbc_u32)dbc_bf16_from_float(v[3]).bits << 16);
    *reinterpret_cast<uint2*>(p) = t;
}

// Benchmark-only kernels (bench/bench_copy_patterns.py): the data movement of HT dispatch and combine
// for all ranks of a GPU in one launch, with no synchronisation between ranks, to measure what the copy
// loops alone can reach against the HBM floor, and which loop shape gets closest.
//
// scatter (dispatch): token t of the whole GPU is read once and stored to row slot[t][d] of every
//   destination region d with slot >= 0.
// gather (combine): for token t, the rows slot[t][d] of every region d with slot >= 0 are read, summed in
//   float32 (d ascending) and the sum written once.
//
// Defines: EPK_NUM_RANKS, EPK_ROW_BYTES (multiple of 16), EPK_THREADS, EPK_UNROLL, EPK_STORE_CS (1:
// streaming stores, st.global.cs), EPK_LOADS_FIRST (gather: 1 issues every region's loads before adding).
// The library's kernels folder (epk_common.cuh) is on the include path after this file's folder.
#include "epk_common.cuh"

#ifndef EPK_NUM_RANKS
#error "EPK_NUM_RANKS must be defined"
#endif
#ifndef EPK_ROW_BYTES
#error "EPK_ROW_BYTES must be defined"
#endif
#ifndef EPK_THREADS
#error "EPK_THREADS must be defined"
#endif
#ifndef EPK_UNROLL
#error "EPK_UNROLL must be defined"
#endif
#ifndef EPK_STORE_CS
#error "EPK_STORE_CS must be defined"
#endif
#ifndef EPK_LOADS_FIRST
#error "EPK_LOADS_FIRST must be defined"
#endif

constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kRowVecs = EPK_ROW_BYTES / 16;
constexpr int kThreads = EPK_THREADS;
constexpr int kUnroll = EPK_UNROLL;

__device__ __forceinline__ void st_out(int4 *p, const int4 &v) {
#if EPK_STORE_CS
  asm volatile("st.global.cs.v4.s32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
#else
  *p = v;
#endif
}

// Slots of token t for every region, one per lane (< kRanks), broadcast to the warp.
__device__ __forceinline__ unsigned load_slots(const int *slot, int64_t t, int lane, int (&slots)[kRanks]) {
  int s = lane < kRanks ? slot[t * kRanks + lane] : -1;
  const unsigned mask = __ballot_sync(0xffffffffu, s >= 0) & ((1u << kRanks) - 1u);
#pragma unroll
  for (int d = 0; d < kRanks; ++d) slots[d] = __shfl_sync(0xffffffffu, s, d);
  return mask;
}

extern "C" __global__ void __launch_bounds__(kThreads)
    epk_bench_scatter(int num_tokens, const int4 *__restrict__ x, const int *__restrict__ slot, int4 *__restrict__ out,
                      long long region_rows) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (kThreads / 32);
  for (int t = blockIdx.x * (kThreads / 32) + threadIdx.x / 32; t < num_tokens; t += warps) {
    int slots[kRanks];
    const unsigned dests = load_slots(slot, t, lane, slots);
    const int4 *src = x + static_cast<int64_t>(t) * kRowVecs;
    for (int base = 0; base < kRowVecs; base += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * 32 + lane < kRowVecs) v[u] = epk::ld_nc_v4(src + base + u * 32 + lane);
#pragma unroll
      for (int d = 0; d < kRanks; ++d) {
        if (!(dests >> d & 1u)) continue;
        int4 *dst = out + (d * region_rows + slots[d]) * kRowVecs;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (base + u * 32 + lane < kRowVecs) st_out(dst + base + u * 32 + lane, v[u]);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    epk_bench_gather(int num_tokens, const int4 *__restrict__ in, const int *__restrict__ slot, int4 *__restrict__ out,
                     long long region_rows) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (kThreads / 32);
  for (int t = blockIdx.x * (kThreads / 32) + threadIdx.x / 32; t < num_tokens; t += warps) {
    int slots[kRanks];
    const unsigned srcs = load_slots(slot, t, lane, slots);
    for (int base = 0; base < kRowVecs; base += 32 * kUnroll) {
      float acc[kUnroll][8] = {};
#if EPK_LOADS_FIRST
      int4 v[kRanks][kUnroll];
#pragma unroll
      for (int d = 0; d < kRanks; ++d)
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32 + lane;
          v[d][u] = (srcs >> d & 1u) && i < kRowVecs ? epk::ld_nc_v4(in + (d * region_rows + slots[d]) * kRowVecs + i)
                                                     : make_int4(0, 0, 0, 0);
        }
#pragma unroll
      for (int d = 0; d < kRanks; ++d)
        if (srcs >> d & 1u)
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) epk::add_bf16x8(acc[u], v[d][u]);
#else
#pragma unroll
      for (int d = 0; d < kRanks; ++d) {
        if (!(srcs >> d & 1u)) continue;
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32 + lane;
          if (i < kRowVecs) v[u] = epk::ld_nc_v4(in + (d * region_rows + slots[d]) * kRowVecs + i);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) epk::add_bf16x8(acc[u], v[u]);
      }
#endif
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
        if (i < kRowVecs) {
          st_out(out + static_cast<int64_t>(t) * kRowVecs + i, epk::pack_bf16x8(acc[u]));
        }
      }
    }
  }
}

// get_dispatch_layout: per-rank / per-node / per-expert token counts and the is_token_in_rank map,
// in one launch. Blocks count into shared memory (warp-aggregated, so a skewed routing does not
// serialise on one address), add their counts to a zeroed global workspace, and the last block to
// finish (a ticket) moves the totals into the outputs and re-zeroes the workspace for the next launch.
//
// Specialised by defines: EPK_NUM_EXPERTS, EPK_NUM_RANKS, EPK_NUM_NODES (0 = one node, no per-node
// counts), EPK_TOPK, EPK_IDX_T (int64_t or int32_t), EPK_THREADS.
#include "epk_common.cuh"

#ifndef EPK_NUM_EXPERTS
#error "EPK_NUM_EXPERTS must be defined"
#endif
#ifndef EPK_NUM_RANKS
#error "EPK_NUM_RANKS must be defined"
#endif
#ifndef EPK_NUM_NODES
#error "EPK_NUM_NODES must be defined"
#endif
#ifndef EPK_TOPK
#error "EPK_TOPK must be defined"
#endif
#ifndef EPK_IDX_T
#error "EPK_IDX_T must be defined"
#endif
#ifndef EPK_THREADS
#error "EPK_THREADS must be defined"
#endif

namespace {
constexpr int kExperts = EPK_NUM_EXPERTS;
constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kNodes = EPK_NUM_NODES;
constexpr int kTopk = EPK_TOPK;
constexpr int kThreads = EPK_THREADS;
constexpr int kExpertsPerRank = kExperts / kRanks;
static_assert(kExperts % kRanks == 0, "experts must divide evenly over ranks");
static_assert(kThreads % 32 == 0, "whole warps");
// Counter layout in shared and global workspace: experts, ranks, nodes, invalid indices.
constexpr int kRankBase = kExperts;
constexpr int kNodeBase = kRankBase + kRanks;
constexpr int kInvalid = kNodeBase + kNodes;
constexpr int kCounters = kInvalid + 1;

// Adds 1 to s_count[key] for every lane holding that key, with one shared atomic per distinct key.
__device__ __forceinline__ void warp_count(int *s_count, int key) {
  const unsigned same = __match_any_sync(0xffffffffu, key);
  if (key >= 0 && (threadIdx.x % 32) == __ffs(same) - 1) atomicAdd(&s_count[key], __popc(same));
}
// Counter i (layout above) into its output.
__device__ __forceinline__ void write_count(int i, int v, int *per_rank, int *per_node, int *per_expert,
                                            int *invalid_out) {
  if (i < kRankBase) {
    per_expert[i] = v;
  } else if (i < kNodeBase) {
    per_rank[i - kRankBase] = v;
  } else if (i < kInvalid) {
    per_node[i - kNodeBase] = v;
  } else if (invalid_out != nullptr) {
    *reinterpret_cast<volatile int *>(invalid_out) = v;
  }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    epk_get_dispatch_layout(const EPK_IDX_T *__restrict__ topk_idx, int num_tokens,
                            const int *__restrict__ rank_to_node, int *__restrict__ num_tokens_per_rank,
                            int *__restrict__ num_tokens_per_node, int *__restrict__ num_tokens_per_expert,
                            bool *__restrict__ is_token_in_rank, unsigned *ticket, int *counters, int *invalid_out) {
  __shared__ int s_count[kCounters];
  __shared__ bool s_last;
  for (int i = threadIdx.x; i < kCounters; i += kThreads) s_count[i] = 0;
  __syncthreads();

  // Block-uniform trip count, so every lane of a warp reaches the warp-wide match instructions.
  for (int base = blockIdx.x * kThreads; base < num_tokens; base += gridDim.x * kThreads) {
    const int t = base + threadIdx.x;
    const bool valid_token = t < num_tokens;
    int rank_of[kTopk];
#pragma unroll
    for (int k = 0; k < kTopk; ++k) {
      int e = -1;
      if (valid_token) {
        const int64_t raw = static_cast<int64_t>(topk_idx[static_cast<int64_t>(t) * kTopk + k]);
        if (raw >= 0 && raw < kExperts) {
          e = static_cast<int>(raw);
        } else if (raw != -1) {
          atomicAdd(&s_count[kInvalid], 1);
        }
      }
      rank_of[k] = e >= 0 ? e / kExpertsPerRank : -1;
      warp_count(s_count, e);
    }
    // A token counts once per rank (and once per node) however many of its experts live there.
#pragma unroll
    for (int k = 0; k < kTopk; ++k) {
      bool first = rank_of[k] >= 0;
#pragma unroll
      for (int j = 0; j < k; ++j) first = first && rank_of[j] != rank_of[k];
      warp_count(s_count, first ? kRankBase + rank_of[k] : -1);
    }
    if constexpr (kNodes > 0) {
      int node_of[kTopk];
#pragma unroll
      for (int k = 0; k < kTopk; ++k) node_of[k] = rank_of[k] >= 0 ? __ldg(rank_to_node + rank_of[k]) : -1;
#pragma unroll
      for (int k = 0; k < kTopk; ++k) {
        bool first = node_of[k] >= 0;
#pragma unroll
        for (int j = 0; j < k; ++j) first = first && node_of[j] != node_of[k];
        warp_count(s_count, first ? kNodeBase + node_of[k] : -1);
      }
    }
    if (valid_token) {
      bool *row = is_token_in_rank + static_cast<int64_t>(t) * kRanks;
      if constexpr (kRanks % 8 == 0) {
        // Eight flags per 8-byte store; the row start is 8-byte aligned because kRanks is.
        for (int c = 0; c < kRanks / 8; ++c) {
          uint64_t word = 0;
#pragma unroll
          for (int k = 0; k < kTopk; ++k)
            if (rank_of[k] >= 0 && rank_of[k] / 8 == c) word |= 1ull << (8 * (rank_of[k] % 8));
          reinterpret_cast<uint64_t *>(row)[c] = word;
        }
      } else {
        for (int r = 0; r < kRanks; ++r) {
          bool in = false;
#pragma unroll
          for (int k = 0; k < kTopk; ++k) in = in || rank_of[k] == r;
          row[r] = in;
        }
      }
    }
  }
  __syncthreads();

  if (gridDim.x == 1) {  // small T: one block holds every count, no cross-block reduction needed
    for (int i = threadIdx.x; i < kCounters; i += kThreads)
      write_count(i, s_count[i], num_tokens_per_rank, num_tokens_per_node, num_tokens_per_expert, invalid_out);
    return;
  }
  for (int i = threadIdx.x; i < kCounters; i += kThreads)
    if (s_count[i] != 0) atomicAdd(&counters[i], s_count[i]);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = epk::atomic_add_acq_rel_gpu(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;

  // Last block: every other block's counts are in `counters`; read-and-clear them atomically.
  __threadfence();
  for (int i = threadIdx.x; i < kCounters; i += kThreads)
    write_count(i, atomicExch(&counters[i], 0), num_tokens_per_rank, num_tokens_per_node, num_tokens_per_expert,
                invalid_out);
  if (threadIdx.x == 0) atomicExch(ticket, 0u);
}

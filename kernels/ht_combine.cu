// HT combine: each source rank pulls the returned rows of its tokens straight from the peers that
// received them and reduces them in float32 (bias_0, bias_1, then destination ranks ascending — the
// reference's order), writing each combined row once. Peers publish where their inputs are; at the end
// every rank tells each peer it has finished reading its rows and waits until all have finished with its
// own, so the caller may reuse its input as soon as the kernel ends.
//
// Defines: EPK_NUM_RANKS, EPK_TOPK, EPK_HIDDEN (bf16 elements, multiple of 8), EPK_HAS_WEIGHTS,
// EPK_THREADS, EPK_MIN_BLOCKS, EPK_PROBE (ht_phases.cuh), EPK_UNROLL, EPK_LOADS_FIRST (1: every peer's loads
// of a chunk are issued before the first add).
#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "ht_common.cuh"
#include "ht_phases.cuh"

#ifndef EPK_NUM_RANKS
#error "EPK_NUM_RANKS must be defined"
#endif
#ifndef EPK_TOPK
#error "EPK_TOPK must be defined"
#endif
#ifndef EPK_HIDDEN
#error "EPK_HIDDEN must be defined"
#endif
#ifndef EPK_HAS_WEIGHTS
#error "EPK_HAS_WEIGHTS must be defined"
#endif
#ifndef EPK_THREADS
#error "EPK_THREADS must be defined"
#endif
#ifndef EPK_MIN_BLOCKS
#error "EPK_MIN_BLOCKS must be defined"
#endif
#ifndef EPK_UNROLL
#error "EPK_UNROLL must be defined"
#endif
#ifndef EPK_LOADS_FIRST
#error "EPK_LOADS_FIRST must be defined"
#endif

constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kTopk = EPK_TOPK;
constexpr int kRowVecs = EPK_HIDDEN / 8;  // int4 = 8 bf16
constexpr bool kHasWeights = EPK_HAS_WEIGHTS != 0;
constexpr int kThreads = EPK_THREADS;
constexpr int kUnroll = EPK_UNROLL;
constexpr int kMinBlocks = EPK_MIN_BLOCKS;  // blocks per SM the launch needs resident (caps registers)
static_assert(EPK_HIDDEN % 8 == 0, "hidden must be a multiple of 8");
static_assert(kRanks <= epk::kMaxPeers && kTopk <= 32, "at most 8 ranks and top-32");

enum { kInX = 0, kInWeights, kNumIns };

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)
    epk_ht_combine(int dry_run, int rank, int call, int num_tokens, long long in_x, long long in_weights,
                   const int *__restrict__ send_slot, const int4 *__restrict__ bias0, const int4 *__restrict__ bias1,
                   const unsigned long long *__restrict__ peers, int4 *__restrict__ out_x,
                   float *__restrict__ out_weights, unsigned *ticket, epk::ErrorRecord *err,
                   unsigned long long timeout_ns) {
  if (dry_run) return;  // first use: makes the driver load this kernel before any peer spins
  epk::mark_started(err, call);
  const int epoch = epk::begin_epoch(epk::ctrl_of(peers, rank));
  epk::probe(0);
  const int p = epoch & 1;
  const int tid = threadIdx.x, lane = tid % 32;
  __shared__ const char *s_src[kRanks][kNumIns];
  const epk::Deadline deadline{err, rank, timeout_ns};
  epk::HtCtrl *mine = epk::ctrl_of(peers, rank);

  // 1. Tell every peer where my (received-side) inputs are, and learn where theirs are.
  const long long my_base = static_cast<long long>(peers[rank]);
  const long long mine_in[kNumIns] = {in_x - my_base, in_weights - my_base};
  epk::send_entries<kRanks>(
      peers, epoch, mine_in, [&](epk::HtCtrl *c) { return c->combine_addr[p][rank]; },
      [&](epk::HtCtrl *c) { return &c->combine_addr_flag[p][rank]; });
  const bool ok = epk::receive_entries<kRanks>(
      mine, epoch, deadline, EPK_ERR_PHASE_HT_COMBINE_ADDRS,
      [&](epk::HtCtrl *c, int d) { return &c->combine_addr_flag[p][d]; },
      [&](int d) {
        for (int o = 0; o < kNumIns; ++o)
          s_src[d][o] = reinterpret_cast<const char *>(peers[d] + mine->combine_addr[p][d][o]);
      });
  if (!ok) return;
  epk::probe(1);

  // 2. Warp per token: pull and reduce.
  const int warps = gridDim.x * (kThreads / 32);
  for (int t = blockIdx.x * (kThreads / 32) + tid / 32; t < num_tokens; t += warps) {
    int slot = -1;
    if (lane < kRanks) slot = send_slot[static_cast<int64_t>(t) * kRanks + lane];
    const unsigned dests = __ballot_sync(0xffffffffu, slot >= 0) & ((1u << kRanks) - 1u);
    int slots[kRanks];
#pragma unroll
    for (int d = 0; d < kRanks; ++d) slots[d] = __shfl_sync(0xffffffffu, slot, d);

    for (int base = 0; base < kRowVecs; base += 32 * kUnroll) {
      float acc[kUnroll][8];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[u][j] = 0.f;
        if (i < kRowVecs) {
          if (bias0 != nullptr) epk::add_bf16x8(acc[u], bias0[static_cast<int64_t>(t) * kRowVecs + i]);
          if (bias1 != nullptr) epk::add_bf16x8(acc[u], bias1[static_cast<int64_t>(t) * kRowVecs + i]);
        }
      }
#if EPK_LOADS_FIRST
      // Every peer's loads in flight before the first add (kRanks * kUnroll per lane); same add order.
      int4 v[kRanks][kUnroll];
#pragma unroll
      for (int d = 0; d < kRanks; ++d) {
        const int4 *row = reinterpret_cast<const int4 *>(s_src[d][kInX]) + static_cast<int64_t>(slots[d]) * kRowVecs;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32 + lane;
          if ((dests >> d & 1u) && i < kRowVecs) v[d][u] = row[i];
        }
      }
#pragma unroll
      for (int d = 0; d < kRanks; ++d)
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if ((dests >> d & 1u) && base + u * 32 + lane < kRowVecs) epk::add_bf16x8(acc[u], v[d][u]);
#else
#pragma unroll
      for (int d = 0; d < kRanks; ++d) {
        if (!(dests >> d & 1u)) continue;
        const int4 *row = reinterpret_cast<const int4 *>(s_src[d][kInX]) + static_cast<int64_t>(slots[d]) * kRowVecs;
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32 + lane;
          if (i < kRowVecs) v[u] = row[i];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (base + u * 32 + lane < kRowVecs) epk::add_bf16x8(acc[u], v[u]);
      }
#endif
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
        if (i < kRowVecs) {
          out_x[static_cast<int64_t>(t) * kRowVecs + i] = epk::pack_bf16x8(acc[u]);
        }
      }
    }
    if constexpr (kHasWeights) {
      if (lane < kTopk) {
        float w = 0.f;
#pragma unroll
        for (int d = 0; d < kRanks; ++d)
          if (dests >> d & 1u)
            w = __fadd_rn(w, reinterpret_cast<const float *>(
                                 s_src[d][kInWeights])[static_cast<int64_t>(slots[d]) * kTopk + lane]);
        out_weights[static_cast<int64_t>(t) * kTopk + lane] = w;
      }
    }
  }

  // 3. Done reading peers' rows: tell them, and wait until every peer is done with mine.
  epk::finish_all<kRanks>(
      ticket, peers, mine, deadline, EPK_ERR_PHASE_HT_COMBINE_DONE,
      [&](epk::HtCtrl *c, int q) { return &c->combine_done[q][rank]; },
      [&](epk::HtCtrl *c, int d, int q) { return &c->combine_done[q][d]; });
}

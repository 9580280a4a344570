// HT dispatch: each token row is read once from x and written straight into its final row of every
// destination rank's output (no staging). Destinations publish their output addresses first; after the
// copies each rank tells every peer it is done and waits until every peer is done with it.
//
// Defines: EPK_NUM_RANKS, EPK_TOPK, EPK_ROW_BYTES (bytes of one x row, multiple of 16), EPK_SCALE_COLS
// (float32 scales per row for FP8 input, else 0), EPK_NUM_LOCAL_EXPERTS, EPK_WITH_META (0: cached
// dispatch, x and scales only), EPK_THREADS, EPK_MIN_BLOCKS, EPK_PROBE (ht_phases.cuh), EPK_UNROLL.
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
#ifndef EPK_ROW_BYTES
#error "EPK_ROW_BYTES must be defined"
#endif
#ifndef EPK_SCALE_COLS
#error "EPK_SCALE_COLS must be defined"
#endif
#ifndef EPK_NUM_LOCAL_EXPERTS
#error "EPK_NUM_LOCAL_EXPERTS must be defined"
#endif
#ifndef EPK_WITH_META
#error "EPK_WITH_META must be defined"
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

constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kTopk = EPK_TOPK;
constexpr int kRowVecs = EPK_ROW_BYTES / 16;
constexpr int kScaleCols = EPK_SCALE_COLS;
constexpr int kLocalExperts = EPK_NUM_LOCAL_EXPERTS;
constexpr bool kWithMeta = EPK_WITH_META != 0;
constexpr int kThreads = EPK_THREADS;
constexpr int kUnroll = EPK_UNROLL;
constexpr int kMinBlocks = EPK_MIN_BLOCKS;  // blocks per SM the launch needs resident (caps registers)
static_assert(EPK_ROW_BYTES % 16 == 0, "row bytes must be a multiple of 16");
static_assert(kRanks <= epk::kMaxPeers && kTopk <= 32, "at most 8 ranks and top-32");

// Output arrays of a destination, in the order they are published; then its row count and its call's shapes.
enum { kOutX = 0, kOutScales, kOutIdx, kOutWeights, kOutSrc, kNumOuts, kOutRows = kNumOuts, kOutShape };
// What a destination's outputs were sized for: a source whose call differs sends it nothing (and reports it), so a
// mismatch between ranks' calls can never write past a peer's outputs.
constexpr long long kShape = static_cast<long long>(EPK_ROW_BYTES) << 33 | static_cast<long long>(kWithMeta) << 32 |
                             static_cast<long long>(kTopk) << 26 | kScaleCols << 10 | (kLocalExperts - 1);
static_assert(EPK_ROW_BYTES < (1 << 30) && kScaleCols < (1 << 16) && kLocalExperts <= 1024, "shape word fields");

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)
    epk_ht_dispatch(int dry_run, int rank, int call, int num_tokens, const int4 *__restrict__ x,
                    const float *__restrict__ x_scales, const int64_t *__restrict__ topk_idx,
                    const float *__restrict__ topk_weights, const bool *__restrict__ is_token_in_rank,
                    const int *__restrict__ send_slot, const unsigned long long *__restrict__ peers, long long out_x,
                    long long out_scales, long long out_idx, long long out_weights, long long out_src, int out_rows,
                    unsigned *ticket, epk::ErrorRecord *err, unsigned long long timeout_ns) {
  if (dry_run) return;  // first use: makes the driver load this kernel before any peer spins
  epk::mark_started(err, call);
  const int epoch = epk::begin_epoch(epk::ctrl_of(peers, rank));
  epk::probe(0);
  const int p = epoch & 1;
  const int tid = threadIdx.x, lane = tid % 32;
  __shared__ char *s_dst[kRanks][kNumOuts];
  __shared__ int s_rows[kRanks];
  __shared__ bool s_same[kRanks];
  const epk::Deadline deadline{err, rank, timeout_ns};
  epk::HtCtrl *mine = epk::ctrl_of(peers, rank);

  // 1. Tell every source where my outputs are; 2. every block learns every destination's outputs.
  const long long my_base = static_cast<long long>(peers[rank]);
  const long long mine_out[kNumOuts + 2] = {
      out_x - my_base, out_scales - my_base, out_idx - my_base, out_weights - my_base, out_src - my_base, out_rows,
      kShape};
  epk::send_entries<kRanks>(
      peers, epoch, mine_out, [&](epk::HtCtrl *c) { return c->dispatch_addr[p][rank]; },
      [&](epk::HtCtrl *c) { return &c->dispatch_addr_flag[p][rank]; });
  const bool ok = epk::receive_entries<kRanks>(
      mine, epoch, deadline, EPK_ERR_PHASE_HT_DISPATCH_ADDRS,
      [&](epk::HtCtrl *c, int d) { return &c->dispatch_addr_flag[p][d]; },
      [&](int d) {
        for (int o = 0; o < kNumOuts; ++o)
          s_dst[d][o] = reinterpret_cast<char *>(peers[d] + mine->dispatch_addr[p][d][o]);
        s_rows[d] = static_cast<int>(mine->dispatch_addr[p][d][kOutRows]);
        s_same[d] = mine->dispatch_addr[p][d][kOutShape] == kShape;
      });
  if (!ok) return;
  epk::probe(1);

  // 3. Warp per token: read the row once, store it to each destination.
  const int warps = gridDim.x * (kThreads / 32);
  for (int t = blockIdx.x * (kThreads / 32) + tid / 32; t < num_tokens; t += warps) {
    int slot = -1;
    if (lane < kRanks) {
      slot = send_slot[static_cast<int64_t>(t) * kRanks + lane];
      if (slot >= 0 && !s_same[lane]) {  // the destination's call has other shapes: send it nothing
        const long long theirs = mine->dispatch_addr[p][lane][kOutShape];
        epk::report_error(err, epk::kBadIndex, rank, EPK_ERR_PHASE_HT_SHAPE, lane, static_cast<int>(theirs >> 33),
                          EPK_ROW_BYTES);
        slot = -1;
      } else if (slot >= s_rows[lane]) {  // more rows than the destination allocated (num_worst_tokens too small)
        epk::report_error(err, epk::kOverflow, rank, EPK_ERR_PHASE_HT_DISPATCH_OVERFLOW, lane, slot, s_rows[lane]);
        slot = -1;
      }
    }
    const unsigned dests = __ballot_sync(0xffffffffu, slot >= 0) & ((1u << kRanks) - 1u);
    if (dests == 0) continue;
    int slots[kRanks];
#pragma unroll
    for (int d = 0; d < kRanks; ++d) slots[d] = __shfl_sync(0xffffffffu, slot, d);

    const int4 *src = x + static_cast<int64_t>(t) * kRowVecs;
    for (int base = 0; base < kRowVecs; base += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
        if (i < kRowVecs) v[u] = epk::ld_nc_v4(src + i);
      }
#pragma unroll
      for (int d = 0; d < kRanks; ++d) {
        if (!(dests >> d & 1u)) continue;
        int4 *dst = reinterpret_cast<int4 *>(s_dst[d][kOutX]) + static_cast<int64_t>(slots[d]) * kRowVecs;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32 + lane;
          if (i < kRowVecs) dst[i] = v[u];
        }
      }
    }
    if constexpr (kScaleCols > 0) {
      for (int c = lane; c < kScaleCols; c += 32) {
        const float s = x_scales[static_cast<int64_t>(t) * kScaleCols + c];
#pragma unroll
        for (int d = 0; d < kRanks; ++d)
          if (dests >> d & 1u)
            reinterpret_cast<float *>(s_dst[d][kOutScales])[static_cast<int64_t>(slots[d]) * kScaleCols + c] = s;
      }
    }
    if constexpr (kWithMeta) {
      int64_t e = -1;
      float w = 0.f;
      if (lane < kTopk) {
        e = topk_idx[static_cast<int64_t>(t) * kTopk + lane];
        if (topk_weights != nullptr) w = topk_weights[static_cast<int64_t>(t) * kTopk + lane];
      }
#pragma unroll
      for (int d = 0; d < kRanks; ++d) {
        if (!(dests >> d & 1u)) continue;
        const int64_t row = slots[d];
        if (lane < kTopk) {
          const int64_t local = e - static_cast<int64_t>(d) * kLocalExperts;
          const bool here = e >= 0 && local >= 0 && local < kLocalExperts;
          reinterpret_cast<int64_t *>(s_dst[d][kOutIdx])[row * kTopk + lane] = here ? local : -1;
          // Always (0 from a rank without weights): every receiver's weights output is allocated, and a row left
          // unwritten would be uninitialised memory (as across nodes, ht_inter_dispatch.cu).
          reinterpret_cast<float *>(s_dst[d][kOutWeights])[row * kTopk + lane] = here ? w : 0.f;
        }
        if (lane == 0) reinterpret_cast<int *>(s_dst[d][kOutSrc])[row] = t;
      }
    }
  }

  // 4. Tell every destination this rank is done; wait until every source is done with me.
  epk::finish_all<kRanks>(
      ticket, peers, mine, deadline, EPK_ERR_PHASE_HT_DISPATCH_DONE,
      [&](epk::HtCtrl *c, int q) { return &c->dispatch_done[q][rank]; },
      [&](epk::HtCtrl *c, int d, int q) { return &c->dispatch_done[q][d]; });
}

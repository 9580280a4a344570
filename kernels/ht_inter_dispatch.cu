// HT dispatch across nodes (issue #18; docs/architecture.md, "Internode HT"). Each token crosses the network once per
// destination node, to the rank of that node with this rank's local index (its forwarder), which writes the row into
// its final place in every destination of its node over IPC; destinations on this rank's own node get their rows
// over IPC straight from x, as in ht_dispatch.cu. The output order (source rank, then token) is the reference's.
//
// Block roles (the host launches at least 2 * kNodes + 1 blocks, all resident):
// - block n < kNodes, n != my node: SENDER to node n: in this call's message order (node_tokens), the warps write
//   whole chunks of messages into the staging ring, then thread 0 posts the chunk (ht_stream.cuh send_chunk: one
//   WRITE, two where it wraps, then the tail inline) after waiting for ring space (the forwarder's credit).
// - block kNodes + n, n != my node: FORWARDER from node n: waits for each chunk of the stream from the rank of node n
//   with this rank's local index, copies each message's row to the ranks of this node it lists, returns credit.
// - every other block: copies this rank's tokens to the destinations on its own node.
// Streams count messages over the Buffer's life (Words); a call starts once everything of the previous one was
// forwarded (so the ring restarts empty and may have another size), and message i lives in slot i % ring.
// Then the last block tells every rank of this node this rank is done and waits until each of them is.
//
// Defines: EPK_NUM_RANKS, EPK_NUM_NODES, EPK_TOPK, EPK_ROW_BYTES, EPK_SCALE_COLS, EPK_NUM_LOCAL_EXPERTS,
// EPK_WITH_META, EPK_THREADS, EPK_MIN_BLOCKS, EPK_UNROLL. Exact on an H100 (session O: tests/test_ht_inter_gpu.py, the
// MPS worker).
#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "ht_common.cuh"
#include "ht_inter.cuh"
#define EPK_PROBE 0  // ht_phases.cuh's finish_all, without the probe build
#include "ht_phases.cuh"
#include "ht_stream.cuh"

#ifndef EPK_NUM_RANKS
#error "EPK_NUM_RANKS must be defined"
#endif
#ifndef EPK_NUM_NODES
#error "EPK_NUM_NODES must be defined"
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
constexpr int kNodes = EPK_NUM_NODES;
constexpr int kTopk = EPK_TOPK;
constexpr int kRowVecs = EPK_ROW_BYTES / 16;
constexpr int kScaleCols = EPK_SCALE_COLS;
constexpr int kLocalExperts = EPK_NUM_LOCAL_EXPERTS;
constexpr bool kWithMeta = EPK_WITH_META != 0;
constexpr int kThreads = EPK_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = EPK_UNROLL;
constexpr int kMinBlocks = EPK_MIN_BLOCKS;
constexpr int kMeta = epk::inter::dispatch_meta_bytes(kTopk, kScaleCols);  // message bytes before the row
constexpr int kMsgBytes = kMeta + EPK_ROW_BYTES;
static_assert(EPK_ROW_BYTES % 16 == 0, "row bytes must be a multiple of 16");
static_assert(kRanks <= epk::inter::kMaxRanks && kTopk <= 32, "at most 128 ranks and top-32");
static_assert(kNodes >= 2 && kNodes <= epk::inter::kMaxNodes && kNodes <= kRanks, "2..16 nodes");
constexpr int kL = epk::inter::kSlotsPerMsg;  // the most ranks of one node: per-destination arrays by local index

// As ht_dispatch.cu: the output arrays a destination publishes, then its row count and its call's shape word.
enum { kOutX = 0, kOutScales, kOutIdx, kOutWeights, kOutSrc, kNumOuts, kOutRows = kNumOuts, kOutShape };
constexpr long long kShape = static_cast<long long>(EPK_ROW_BYTES) << 33 | static_cast<long long>(kWithMeta) << 32 |
                             static_cast<long long>(kTopk) << 26 | kScaleCols << 10 | (kLocalExperts - 1);

// Row (16-byte vectors) from `src` to each destination in `dests` at its slot; `fresh`: src was written by the NIC
// during this kernel (a ring slot reused within the call), so it is read past L1.
template <bool kFresh>
EPK_DEVICE void copy_row(const int4 *src, unsigned dests, const int (&slots)[kL], char *const (&dst_x)[kL], int lane) {
  for (int base = 0; base < kRowVecs; base += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * 32 + lane;
      if (i < kRowVecs) v[u] = kFresh ? __ldcv(src + i) : epk::ld_nc_v4(src + i);
    }
#pragma unroll
    for (int j = 0; j < kL; ++j) {
      if (!(dests >> j & 1u)) continue;
      int4 *dst = reinterpret_cast<int4 *>(dst_x[j]) + static_cast<int64_t>(slots[j]) * kRowVecs;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
        if (i < kRowVecs) dst[i] = v[u];
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) epk_ht_inter_dispatch(
    int dry_run, int rank, int call, int num_tokens, const int4 *__restrict__ x, const float *__restrict__ x_scales,
    const int64_t *__restrict__ topk_idx, const float *__restrict__ topk_weights, const int *__restrict__ send_slot,
    const int *__restrict__ node_tokens, const int *__restrict__ node_counts, int *__restrict__ fwd_slots, int fwd_cap,
    const int *notify_out, const unsigned long long *__restrict__ peers, long long area_offset,
    const epk::inter::QpEntry *__restrict__ qps, const int *node_of, const int *peer_of_node, long long ring_offset,
    int ring, int chunk, long long out_x, long long out_scales, long long out_idx, long long out_weights,
    long long out_src, int out_rows, unsigned *ticket, epk::ErrorRecord *err, unsigned long long timeout_ns) {
  if (dry_run) return;
  epk::mark_started(err, call);
  const int epoch = epk::begin_epoch(epk::ctrl_of(peers, rank));
  const int p = epoch & 1;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (notify_out != nullptr) {  // num_worst_tokens: the host did not wait for notify's checks; every rank's verdict
    const volatile int *v = notify_out;  // is the same (a difference anywhere differs from every rank's own shapes)
    const int peer = v[EPK_HT_INTER_OUT_SHAPE] - 1;
    if (peer >= 0 || v[EPK_HT_INTER_OUT_BAD_INDEX] != 0 || v[EPK_HT_INTER_OUT_LAYOUT_OK] == 0) {
      if (blockIdx.x == 0 && tid == 0)
        epk::report_error(err, epk::kBadIndex, rank, EPK_ERR_PHASE_HT_SHAPE, peer > 0 ? peer : 0,
                          v[EPK_HT_INTER_OUT_SHAPE + 2], v[EPK_HT_INTER_OUT_SHAPE + 3]);
      return;  // nothing sent, nothing expected: the streams stay in step on every rank
    }
  }
  __shared__ epk::inter::Nodes<kRanks, kNodes> nodes;
  __shared__ char *s_dst[kL][kNumOuts];  // by local index: the outputs of the ranks of this node
  __shared__ int s_rows[kL];
  __shared__ bool s_same[kL];
  __shared__ bool s_failed;
  if (tid == 0) s_failed = false;
  epk::inter::load_nodes(nodes, node_of, peer_of_node, rank);  // synced
  const int my_node = nodes.my_node, me = nodes.my_index, L = nodes.per_node;
  const epk::Deadline deadline{err, rank, timeout_ns};
  epk::HtCtrl *ctrl = epk::ctrl_of(peers, rank);
  auto *area = reinterpret_cast<epk::inter::Area *>(peers[rank] + area_offset);
  const epk::inter::Rings rings{ring_offset, ring, kMsgBytes};

  // 1. Tell the ranks of this node where my outputs are (block 0; HtCtrl entries by local index); every block that
  //    writes rows learns theirs (senders write none: they skip the wait).
  const long long my_base = static_cast<long long>(peers[rank]);
  const long long mine_out[kNumOuts + 2] = {
      out_x - my_base, out_scales - my_base, out_idx - my_base, out_weights - my_base, out_src - my_base, out_rows,
      kShape};
  epk::send_entries<kL>(
      peers, epoch, mine_out, [&](epk::HtCtrl *c) { return c->dispatch_addr[p][me]; },
      [&](epk::HtCtrl *c) { return &c->dispatch_addr_flag[p][me]; },
      [&](int j) { return j < L ? nodes.local(j) : -1; });
  const int role_node = blockIdx.x < kNodes ? blockIdx.x : blockIdx.x - kNodes;
  const bool sender = blockIdx.x < kNodes && role_node != my_node;
  const bool forwarder = blockIdx.x >= kNodes && blockIdx.x < 2 * kNodes && role_node != my_node;
  const bool copier = blockIdx.x >= 2 * kNodes;
  const bool ok = epk::receive_entries<kL>(
      ctrl, epoch, deadline, EPK_ERR_PHASE_HT_DISPATCH_ADDRS,
      [&](epk::HtCtrl *c, int j) { return &c->dispatch_addr_flag[p][j]; },
      [&](int j) {
        for (int o = 0; o < kNumOuts; ++o)
          s_dst[j][o] = reinterpret_cast<char *>(peers[nodes.local(j)] + ctrl->dispatch_addr[p][j][o]);
        s_rows[j] = static_cast<int>(ctrl->dispatch_addr[p][j][kOutRows]);
        s_same[j] = ctrl->dispatch_addr[p][j][kOutShape] == kShape;
      },
      [&](int j) { return !sender && j < L ? nodes.local(j) : -1; });
  if (!ok) return;

  // The row slot at this node's local index j after the checks of ht_dispatch.cu (its call's shapes, its output
  // rows); -1: skip it.
  auto checked_slot = [&](int j, int slot) {
    if (slot < 0) return -1;
    if (!s_same[j]) {
      const long long theirs = ctrl->dispatch_addr[p][j][kOutShape];
      epk::report_error(err, epk::kBadIndex, rank, EPK_ERR_PHASE_HT_SHAPE, nodes.local(j),
                        static_cast<int>(theirs >> 33), EPK_ROW_BYTES);
      return -1;
    }
    if (slot >= s_rows[j]) {
      epk::report_error(err, epk::kOverflow, rank, EPK_ERR_PHASE_HT_DISPATCH_OVERFLOW, nodes.local(j), slot, s_rows[j]);
      return -1;
    }
    return slot;
  };
  // The metadata of one row at each destination (local index j): expert ids local to it (-1 elsewhere), weights,
  // source token.
  auto write_meta = [&](unsigned dests, const int (&slots)[kL], int64_t e, float w, int token) {
#pragma unroll
    for (int j = 0; j < kL; ++j) {
      if (!(dests >> j & 1u)) continue;
      const int64_t row = slots[j];
      if (lane < kTopk) {
        const int64_t local = e - static_cast<int64_t>(nodes.local(j)) * kLocalExperts;
        const bool here = e >= 0 && local >= 0 && local < kLocalExperts;
        reinterpret_cast<int64_t *>(s_dst[j][kOutIdx])[row * kTopk + lane] = here ? local : -1;
        // Always: a forwarder writes the rows of other ranks' tokens, whether or not it has weights of its own
        // (a rank of 0 tokens passes none).
        reinterpret_cast<float *>(s_dst[j][kOutWeights])[row * kTopk + lane] = here ? w : 0.f;
      }
      if (lane == 0) reinterpret_cast<int *>(s_dst[j][kOutSrc])[row] = token;
    }
  };
  // A row (and its scales) to the destinations `dests` (bits by local index) at their slots.
  auto scatter_scales = [&](unsigned dests, const int (&slots)[kL], int c, float v) {
#pragma unroll
    for (int j = 0; j < kL; ++j)
      if (dests >> j & 1u)
        reinterpret_cast<float *>(s_dst[j][kOutScales])[static_cast<int64_t>(slots[j]) * kScaleCols + c] = v;
  };
  char *dst_x[kL];
#pragma unroll
  for (int j = 0; j < kL; ++j) dst_x[j] = s_dst[j][kOutX];

  if (copier) {
    // 2a. Warp per token: this rank's rows to the destinations of its own node (ht_dispatch.cu's loop).
    const int warps = (gridDim.x - 2 * kNodes) * kWarps;
    for (int t = (blockIdx.x - 2 * kNodes) * kWarps + warp; t < num_tokens; t += warps) {
      int slot = -1;
      if (lane < L) slot = checked_slot(lane, send_slot[static_cast<int64_t>(t) * kRanks + nodes.local(lane)]);
      const unsigned dests = __ballot_sync(0xffffffffu, slot >= 0) & ((1u << kL) - 1u);
      if (dests == 0) continue;
      int slots[kL];
#pragma unroll
      for (int j = 0; j < kL; ++j) slots[j] = __shfl_sync(0xffffffffu, slot, j);
      copy_row<false>(x + static_cast<int64_t>(t) * kRowVecs, dests, slots, dst_x, lane);
      if constexpr (kScaleCols > 0) {
        for (int c = lane; c < kScaleCols; c += 32)
          scatter_scales(dests, slots, c, x_scales[static_cast<int64_t>(t) * kScaleCols + c]);
      }
      if constexpr (kWithMeta) {
        const int64_t e = lane < kTopk ? topk_idx[static_cast<int64_t>(t) * kTopk + lane] : -1;
        const float w =
            lane < kTopk && topk_weights != nullptr ? topk_weights[static_cast<int64_t>(t) * kTopk + lane] : 0.f;
        write_meta(dests, slots, e, w, t);
      }
    }
  } else if (sender) {
    // 2b. Messages to node n in order, a chunk at a time, through the staging ring to its forwarder.
    const int n = role_node, peer = nodes.peer(n);
    const epk::inter::StreamEnd end{
        qps[peer], area, rings, n, my_node, peer, node_counts[n], chunk, &area->words.sent[n], deadline};
    auto stage = [&](int i, uint64_t seq, char *m) {
      const int t = node_tokens[static_cast<int64_t>(n) * num_tokens + i];
      if (lane == 0) *reinterpret_cast<int4 *>(m) = make_int4(static_cast<int>(static_cast<uint32_t>(seq)), t, 0, 0);
      if (lane < epk::inter::kSlotsPerMsg) {
        const int d = nodes.rank_at[n][lane];
        reinterpret_cast<int *>(m + EPK_HT_INTER_MSG_HEADER)[lane] =
            d >= 0 ? send_slot[static_cast<int64_t>(t) * kRanks + d] : -1;
      }
      if constexpr (kWithMeta) {
        int *idx = reinterpret_cast<int *>(m + EPK_HT_INTER_MSG_HEADER + 4 * epk::inter::kSlotsPerMsg);
        if (lane < kTopk) {
          idx[lane] = static_cast<int>(topk_idx[static_cast<int64_t>(t) * kTopk + lane]);
          reinterpret_cast<float *>(idx + kTopk)[lane] =
              topk_weights != nullptr ? topk_weights[static_cast<int64_t>(t) * kTopk + lane] : 0.f;
        }
      }
      if constexpr (kScaleCols > 0) {
        float *sc = reinterpret_cast<float *>(m + EPK_HT_INTER_MSG_HEADER + 4 * epk::inter::kSlotsPerMsg + 8 * kTopk);
        for (int c = lane; c < kScaleCols; c += 32) sc[c] = x_scales[static_cast<int64_t>(t) * kScaleCols + c];
      }
      const int4 *src = x + static_cast<int64_t>(t) * kRowVecs;
      int4 *dst = reinterpret_cast<int4 *>(m + kMeta);
      for (int v = lane; v < kRowVecs; v += 32) dst[v] = epk::ld_nc_v4(src + v);
    };
    if (!epk::inter::send_stream<kWarps>(end, &area->words.credit[n], &area->words.tail[my_node], s_failed, stage))
      return;
  } else if (forwarder) {
    // 2c. The stream from node n: each chunk once it arrived, each message's row to the ranks of this node it lists.
    const int n = role_node, peer = nodes.peer(n);
    const epk::inter::StreamEnd end{qps[peer],
                                    area,
                                    rings,
                                    n,
                                    my_node,
                                    peer,
                                    node_counts[epk::inter::kMaxNodes + n],
                                    chunk,
                                    &area->words.received[n],
                                    deadline};
    auto forward = [&](int i, uint64_t seq, const char *m) {
      const int4 head = __ldcv(reinterpret_cast<const int4 *>(m));
      if (static_cast<uint32_t>(head.x) != static_cast<uint32_t>(seq)) {  // overwritten or never written: skipped
        if (lane == 0)
          epk::report_error(err, epk::kBadIndex, rank, EPK_ERR_PHASE_HT_INTER_ORDER, peer, head.x,
                            static_cast<int>(seq));
        if (fwd_slots != nullptr && i < fwd_cap && lane < kL)  // combine skips it too (no read at a garbage slot)
          fwd_slots[(static_cast<int64_t>(n) * fwd_cap + i) * kL + lane] = -1;
        return;
      }
      int slot = -1;  // lane j: the slot of this node's local index j
      if (lane < kL) {
        const int s = __ldcv(reinterpret_cast<const int *>(m + EPK_HT_INTER_MSG_HEADER) + lane);
        if (lane < L) slot = checked_slot(lane, s);
        if (fwd_slots != nullptr) {  // what combine reduces for this message (null: a cached dispatch)
          if (i < fwd_cap)
            fwd_slots[(static_cast<int64_t>(n) * fwd_cap + i) * kL + lane] = slot;
          else if (lane == 0)
            epk::report_error(err, epk::kOverflow, rank, EPK_ERR_PHASE_HT_DISPATCH_OVERFLOW, peer, i, fwd_cap);
        }
      }
      const unsigned dests = __ballot_sync(0xffffffffu, slot >= 0) & ((1u << kL) - 1u);
      if (dests == 0) return;
      int slots[kL];
#pragma unroll
      for (int j = 0; j < kL; ++j) slots[j] = __shfl_sync(0xffffffffu, slot, j);
      copy_row<true>(reinterpret_cast<const int4 *>(m + kMeta), dests, slots, dst_x, lane);
      if constexpr (kScaleCols > 0) {
        const float *sc =
            reinterpret_cast<const float *>(m + EPK_HT_INTER_MSG_HEADER + 4 * epk::inter::kSlotsPerMsg + 8 * kTopk);
        for (int c = lane; c < kScaleCols; c += 32) scatter_scales(dests, slots, c, __ldcv(sc + c));
      }
      if constexpr (kWithMeta) {
        const int *idx = reinterpret_cast<const int *>(m + EPK_HT_INTER_MSG_HEADER + 4 * epk::inter::kSlotsPerMsg);
        const int64_t e = lane < kTopk ? __ldcv(idx + lane) : -1;
        const float w = lane < kTopk ? __ldcv(reinterpret_cast<const float *>(idx + kTopk) + lane) : 0.f;
        write_meta(dests, slots, e, w, head.y);
      }
    };
    if (!epk::inter::receive_stream<kWarps>(end, &area->words.tail[n], &area->words.credit[my_node], s_failed, forward,
                                            [](int) {}))
      return;
  }

  // 3. The last block: tell every rank of this node this rank is done (its own rows and what it forwarded), then
  //    wait until each of them is.
  epk::finish_all<kL>(
      ticket, peers, ctrl, deadline, EPK_ERR_PHASE_HT_DISPATCH_DONE,
      [&](epk::HtCtrl *c, int q) { return &c->dispatch_done[q][me]; },
      [&](epk::HtCtrl *c, int j, int q) { return &c->dispatch_done[q][j]; },
      [&](int j) { return j < L ? nodes.local(j) : -1; });
}

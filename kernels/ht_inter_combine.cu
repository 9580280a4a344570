// HT combine across nodes (issue #18; docs/architecture.md, "Internode HT"): the dispatch streams reversed. For each
// message it forwarded in dispatch, a forwarder reduces the returned rows of its node's destinations (pulled over
// IPC from their combine inputs) to one partial, float32 from +0.0 in rank order, rounded once to BF16 (weights: a
// float32 partial), and sends it back to the source through the combine rings. The source sums, per token: +0.0,
// bias_0, bias_1, then per node in ascending order that node's BF16 partial (its own node's made the same way from
// IPC pulls) — reference.ht_combine(..., rank_to_node=...)'s order, bit for bit.
//
// Block roles (at least 2 * kNodes + 1 blocks, all resident):
// - block n < kNodes, n != my node: FORWARDER back to node n: partial i for each message i it forwarded from node n
//   (fwd_slots, kept by dispatch), staged and sent a chunk at a time (ht_stream.cuh), after waiting for credit.
// - block kNodes + n, n != my node: RECEIVER from node n: copies the partials of this rank's tokens, in order, into
//   `scratch` (this rank's memory), publishes how many are there (`copied[n]`) and returns credit.
// - every other block: REDUCERS, a warp per token: the sum above, the own node's partial pulled straight from the
//   peers, another node's read from scratch once copied.
// Then the last block tells every rank of this node this rank is done reading its inputs and waits for each.
//
// Defines: EPK_NUM_RANKS, EPK_NUM_NODES, EPK_TOPK, EPK_HIDDEN (bf16 elements, multiple of 8), EPK_HAS_WEIGHTS,
// EPK_THREADS, EPK_MIN_BLOCKS. Exact on an H100 (session O: tests/test_ht_inter_gpu.py, the MPS worker).
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

constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kNodes = EPK_NUM_NODES;
constexpr int kTopk = EPK_TOPK;
constexpr int kRowVecs = EPK_HIDDEN / 8;  // int4 = 8 bf16
constexpr bool kHasWeights = EPK_HAS_WEIGHTS != 0;
constexpr int kThreads = EPK_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocks = EPK_MIN_BLOCKS;
constexpr int kSlots = epk::inter::kSlotsPerMsg;
constexpr int kMeta = epk::inter::combine_meta_bytes(kTopk);  // a partial: header, K weights, then the BF16 row
constexpr int kMsgBytes = kMeta + 2 * EPK_HIDDEN;
constexpr unsigned kReducerSleepNs = 256;  // reducer warps waiting for another node's partials back off between polls
static_assert(EPK_HIDDEN % 8 == 0, "hidden must be a multiple of 8");
static_assert(kRanks <= epk::inter::kMaxRanks && kTopk <= 32, "at most 128 ranks and top-32");
static_assert(kNodes >= 2 && kNodes <= epk::inter::kMaxNodes && kNodes <= kRanks, "2..16 nodes");

enum { kInX = 0, kInWeights, kNumIns };

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)
    epk_ht_inter_combine(int dry_run, int rank, int call, int num_tokens, long long in_x, long long in_weights,
                         const int *__restrict__ send_slot, const int *__restrict__ node_slot,
                         const int *__restrict__ fwd_slots, int fwd_cap, const int *__restrict__ node_counts,
                         const int4 *__restrict__ bias0, const int4 *__restrict__ bias1,
                         const unsigned long long *__restrict__ peers, long long area_offset,
                         const epk::inter::QpEntry *__restrict__ qps, const int *node_of, const int *peer_of_node,
                         long long ring_offset, int ring, int chunk, char *__restrict__ scratch, int *copied,
                         int4 *__restrict__ out_x, float *__restrict__ out_weights, unsigned *ticket,
                         epk::ErrorRecord *err, unsigned long long timeout_ns) {
  if (dry_run) return;
  epk::mark_started(err, call);
  const int epoch = epk::begin_epoch(epk::ctrl_of(peers, rank));
  const int p = epoch & 1;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  __shared__ epk::inter::Nodes<kRanks, kNodes> nodes;
  __shared__ const char *s_src[kSlots][kNumIns];  // by local index: the inputs of the ranks of this node
  __shared__ bool s_failed;
  if (tid == 0) s_failed = false;
  epk::inter::load_nodes(nodes, node_of, peer_of_node, rank);  // synced
  const int my_node = nodes.my_node, me = nodes.my_index, L = nodes.per_node;
  const epk::Deadline deadline{err, rank, timeout_ns};
  epk::HtCtrl *ctrl = epk::ctrl_of(peers, rank);
  auto *area = reinterpret_cast<epk::inter::Area *>(peers[rank] + area_offset);
  const epk::inter::Rings rings{ring_offset, ring, kMsgBytes};

  // 1. Tell the ranks of this node where my inputs are (block 0; HtCtrl entries by local index); every block that
  //    pulls rows learns theirs (receivers pull none: they skip the wait).
  const long long my_base = static_cast<long long>(peers[rank]);
  const long long mine_in[kNumIns] = {in_x - my_base, in_weights - my_base};
  epk::send_entries<kSlots>(
      peers, epoch, mine_in, [&](epk::HtCtrl *c) { return c->combine_addr[p][me]; },
      [&](epk::HtCtrl *c) { return &c->combine_addr_flag[p][me]; }, [&](int j) { return j < L ? nodes.local(j) : -1; });
  const int role_node = blockIdx.x < kNodes ? blockIdx.x : blockIdx.x - kNodes;
  const bool forwarder = blockIdx.x < kNodes && role_node != my_node;
  const bool receiver = blockIdx.x >= kNodes && blockIdx.x < 2 * kNodes && role_node != my_node;
  const bool reducer = blockIdx.x >= 2 * kNodes;
  const bool ok = epk::receive_entries<kSlots>(
      ctrl, epoch, deadline, EPK_ERR_PHASE_HT_COMBINE_ADDRS,
      [&](epk::HtCtrl *c, int j) { return &c->combine_addr_flag[p][j]; },
      [&](int j) {
        for (int o = 0; o < kNumIns; ++o)
          s_src[j][o] = reinterpret_cast<const char *>(peers[nodes.local(j)] + ctrl->combine_addr[p][j][o]);
      },
      [&](int j) { return !receiver && j < L ? nodes.local(j) : -1; });
  if (!ok) return;
  // The float32 sum from +0.0, local indices ascending (= ranks ascending), of the returned rows (weights) at
  // `slots` (by local index; -1: none): one node's partial.
  auto partial_row = [&](const int (&slots)[kSlots], int v, float (&part)[8]) {
#pragma unroll
    for (int k = 0; k < 8; ++k) part[k] = 0.f;
#pragma unroll
    for (int j = 0; j < kSlots; ++j)
      if (slots[j] >= 0)
        epk::add_bf16x8(part,
                        reinterpret_cast<const int4 *>(s_src[j][kInX])[static_cast<int64_t>(slots[j]) * kRowVecs + v]);
  };
  auto partial_weight = [&](const int (&slots)[kSlots]) {
    float w = 0.f;
#pragma unroll
    for (int j = 0; j < kSlots; ++j)
      if (slots[j] >= 0)
        w = __fadd_rn(
            w, reinterpret_cast<const float *>(s_src[j][kInWeights])[static_cast<int64_t>(slots[j]) * kTopk + lane]);
    return w;
  };

  if (forwarder) {
    // 2a. Partials back to node n's source, in the order its messages came (fwd_slots), a chunk at a time.
    const int n = role_node, peer = nodes.peer(n);
    const epk::inter::StreamEnd end{
        qps[peer], area, rings, n, my_node, peer, node_counts[epk::inter::kMaxNodes + n], chunk, &area->words.c_sent[n],
        deadline};
    auto stage = [&](int i, uint64_t seq, char *m) {
      int slot = -1;
      if (i < fwd_cap && lane < L) slot = fwd_slots[(static_cast<int64_t>(n) * fwd_cap + i) * kSlots + lane];
      int slots[kSlots];
#pragma unroll
      for (int j = 0; j < kSlots; ++j) slots[j] = __shfl_sync(0xffffffffu, slot, j);
      if (lane == 0) *reinterpret_cast<int4 *>(m) = make_int4(static_cast<int>(static_cast<uint32_t>(seq)), 0, 0, 0);
      if constexpr (kHasWeights) {
        if (lane < kTopk) reinterpret_cast<float *>(m + EPK_HT_INTER_MSG_HEADER)[lane] = partial_weight(slots);
      }
      int4 *row = reinterpret_cast<int4 *>(m + kMeta);
      for (int v = lane; v < kRowVecs; v += 32) {
        float part[8];
        partial_row(slots, v, part);
        row[v] = epk::pack_bf16x8(part);  // the node's partial, rounded once to BF16
      }
    };
    if (!epk::inter::send_stream<kWarps>(end, &area->words.c_credit[n], &area->words.c_tail[my_node], s_failed, stage))
      return;
  } else if (receiver) {
    // 2b. The partials of this rank's tokens from node n, in order, into scratch; `copied[n]` tells the reducers.
    const int n = role_node, peer = nodes.peer(n);
    const epk::inter::StreamEnd end{
        qps[peer], area, rings, n, my_node, peer, node_counts[n], chunk, &area->words.c_received[n], deadline};
    char *const mine = scratch + static_cast<int64_t>(n) * num_tokens * kMsgBytes;
    auto copy = [&](int i, uint64_t seq, const char *msg) {
      const int4 *m = reinterpret_cast<const int4 *>(msg);
      const int4 head = __ldcv(m);
      if (static_cast<uint32_t>(head.x) != static_cast<uint32_t>(seq) && lane == 0)
        epk::report_error(err, epk::kBadIndex, rank, EPK_ERR_PHASE_HT_INTER_ORDER, peer, head.x, static_cast<int>(seq));
      int4 *to = reinterpret_cast<int4 *>(mine + static_cast<int64_t>(i) * kMsgBytes);
      for (int v = lane; v < kMsgBytes / 16; v += 32) to[v] = __ldcv(m + v);
    };
    auto copied_up_to = [&](int done) { epk::st_release_gpu(&copied[n], done); };  // after the chunk's fence
    if (!epk::inter::receive_stream<kWarps>(end, &area->words.c_tail[n], &area->words.c_credit[my_node], s_failed, copy,
                                            copied_up_to))
      return;
  } else if (reducer) {
    // 2c. Warp per token: biases, then each node's partial in ascending order.
    const int warps = (gridDim.x - 2 * kNodes) * kWarps;
    for (int t = (blockIdx.x - 2 * kNodes) * kWarps + warp; t < num_tokens && !s_failed; t += warps) {
      int slot = -1;  // lane j: the row of this token at this node's local index j
      if (lane < L) slot = send_slot[static_cast<int64_t>(t) * kRanks + nodes.local(lane)];
      const bool local_dests = __any_sync(0xffffffffu, slot >= 0);
      int slots[kSlots];
#pragma unroll
      for (int j = 0; j < kSlots; ++j) slots[j] = __shfl_sync(0xffffffffu, slot, j);
      int msg[kNodes];  // index of this token's partial from each other node (-1: it went to none of its ranks)
#pragma unroll
      for (int n = 0; n < kNodes; ++n) {
        msg[n] = n == my_node ? -1 : node_slot[static_cast<int64_t>(t) * kNodes + n];
        if (msg[n] >= 0 && lane == 0 &&
            !epk::wait_reached(&copied[n], msg[n] + 1, deadline, epk::stream::kPhaseStreamArrival, nodes.peer(n),
                               kReducerSleepNs))
          s_failed = true;
      }
      __syncwarp();
      if (s_failed) break;
      for (int v = lane; v < kRowVecs; v += 32) {
        float acc[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] = 0.f;
        if (bias0 != nullptr) epk::add_bf16x8(acc, bias0[static_cast<int64_t>(t) * kRowVecs + v]);
        if (bias1 != nullptr) epk::add_bf16x8(acc, bias1[static_cast<int64_t>(t) * kRowVecs + v]);
#pragma unroll
        for (int n = 0; n < kNodes; ++n) {
          if (n == my_node) {
            if (!local_dests) continue;
            float part[8];
            partial_row(slots, v, part);
            epk::add_bf16x8(acc, epk::pack_bf16x8(part));  // the node's partial, rounded once to BF16
          } else if (msg[n] >= 0) {
            const char *m = scratch + (static_cast<int64_t>(n) * num_tokens + msg[n]) * kMsgBytes;
            epk::add_bf16x8(acc, __ldcg(reinterpret_cast<const int4 *>(m + kMeta) + v));  // written in this kernel
          }
        }
        out_x[static_cast<int64_t>(t) * kRowVecs + v] = epk::pack_bf16x8(acc);
      }
      if constexpr (kHasWeights) {
        if (lane < kTopk) {
          float w = 0.f;
#pragma unroll
          for (int n = 0; n < kNodes; ++n) {
            if (n == my_node) {
              if (!local_dests) continue;
              w = __fadd_rn(w, partial_weight(slots));
            } else if (msg[n] >= 0) {
              const char *m = scratch + (static_cast<int64_t>(n) * num_tokens + msg[n]) * kMsgBytes;
              w = __fadd_rn(w, __ldcg(reinterpret_cast<const float *>(m + EPK_HT_INTER_MSG_HEADER) + lane));
            }
          }
          out_weights[static_cast<int64_t>(t) * kTopk + lane] = w;
        }
      }
    }
    if (s_failed) return;
  }

  // 3. The last block: tell every rank of this node this rank is done reading its inputs; wait for each of them.
  epk::finish_all<kSlots>(
      ticket, peers, ctrl, deadline, EPK_ERR_PHASE_HT_COMBINE_DONE,
      [&](epk::HtCtrl *c, int q) { return &c->combine_done[q][me]; },
      [&](epk::HtCtrl *c, int j, int q) { return &c->combine_done[q][j]; },
      [&](int j) { return j < L ? nodes.local(j) : -1; });
}

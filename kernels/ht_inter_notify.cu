// HT notify across nodes (issue #18): ht_notify.cu's job for a group of several nodes. Every rank sends every rank
// its counts (rows per rank, selections per local expert of the receiver, messages per node, its call's shapes):
// into peers of its node's areas by IPC stores, to peers of other nodes by one RDMA WRITE of the staged entry and
// then the flag as an inline WRITE on the QP to that peer. Then it waits for every rank's entry and computes the
// handle: rank_prefix_matrix, send_slot[t, d] (the row of token t in rank d's output, -1 if not sent) for every rank
// d, node_slot[t, n] (the message index of token t in this call's stream to node n, -1 if none or this node) and
// node_tokens[n, i] (the token of message i to node n), and for the host: the rows received, per source, per local
// expert, the shape check, and per node the messages this rank sends and forwards. One block.
//
// Defines: EPK_NUM_RANKS, EPK_NUM_NODES. Exact on an H100 (session O).
#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "ht_common.cuh"
#include "ht_inter.cuh"
#include "mlx5_wqe.cuh"

#ifndef EPK_NUM_RANKS
#error "EPK_NUM_RANKS must be defined"
#endif
#ifndef EPK_NUM_NODES
#error "EPK_NUM_NODES must be defined"
#endif

constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kNodes = EPK_NUM_NODES;
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = kRanks + kNodes;  // scanned per token: each rank, then each node
constexpr int kGroup = 8;               // columns scanned at once (registers)
static_assert(kRanks <= epk::inter::kMaxRanks && kNodes >= 2 && kNodes <= epk::inter::kMaxNodes && kNodes <= kRanks,
              "2..16 nodes, at most 128 ranks");
static_assert(kRanks * epk::inter::kShapeFields <= kThreads, "a thread per (source, shape field)");

using epk::inter::NotifyEntry;
using Nodes = epk::inter::Nodes<kRanks, kNodes>;

// The other nodes token t has a destination on (a bit per node).
EPK_DEVICE unsigned nodes_of_token(const bool *is_token_in_rank, const Nodes &nodes, int t) {
  unsigned in_node = 0;
  for (int d = 0; d < kRanks; ++d)
    if (is_token_in_rank[static_cast<int64_t>(t) * kRanks + d]) in_node |= 1u << nodes.node(d);
  return in_node & ~(1u << nodes.my_node);
}

// Whether token t is in scan column c: rank c (c < kRanks), else node c - kRanks (from its node bits).
EPK_DEVICE bool member(const bool *is_token_in_rank, int num_tokens, int t, unsigned in_node, int c) {
  if (t >= num_tokens) return false;
  return c < kRanks ? is_token_in_rank[static_cast<int64_t>(t) * kRanks + c] : (in_node >> (c - kRanks) & 1u) != 0;
}

// host_out (EPK_HT_INTER_OUT_*): [0] epoch when complete, [1] rows received, [2 + s] rows from source s, the
// selections per local expert, the shape check, the bad index, per node the messages sent then forwarded, whether
// num_tokens_per_rdma_rank agrees. node_counts (device, the handle's): messages sent to node n at [n], forwarded from
// node n at [kMaxNodes + n].
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    epk_ht_inter_notify(int dry_run, int rank, int call, int num_tokens, const int *__restrict__ num_tokens_per_rank,
                        const int *__restrict__ num_tokens_per_rdma_rank, const int *__restrict__ num_tokens_per_expert,
                        const bool *__restrict__ is_token_in_rank, const unsigned long long *__restrict__ peers,
                        long long area_offset, const epk::inter::QpEntry *__restrict__ qps, const int *node_of,
                        const int *peer_of_node, int *__restrict__ rank_prefix_matrix, int *__restrict__ send_slot,
                        int *__restrict__ node_slot, int *__restrict__ node_tokens, int *__restrict__ node_counts,
                        const int64_t *__restrict__ topk_idx, int topk, int num_experts, int row_bytes, int scale_cols,
                        int *host_out, epk::ErrorRecord *err, unsigned long long timeout_ns) {
  if (dry_run) return;
  const int local_experts = num_experts / kRanks;  // checked by the host: a multiple of R, at most kMaxLocalExperts
  epk::mark_started(err, call);
  const int epoch = epk::begin_epoch(epk::ctrl_of(peers, rank));
  const int p = epoch & 1;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  __shared__ Nodes nodes;
  __shared__ int s_node_msgs[kNodes];
  __shared__ int s_base[kRanks];
  __shared__ int s_warp_count[kWarps][kCols];
  __shared__ int s_carry[kCols];
  __shared__ bool s_failed;
  __shared__ unsigned long long s_bad;
  __shared__ unsigned s_mismatch;
  if (tid == 0) {
    s_failed = false;
    s_bad = ~0ull;
    s_mismatch = ~0u;
  }
  if (tid < kNodes) s_node_msgs[tid] = 0;
  epk::inter::load_nodes(nodes, node_of, peer_of_node, rank);  // synced
  const int my_node = nodes.my_node;
  auto *mine = reinterpret_cast<epk::inter::Area *>(peers[rank] + area_offset);
  const epk::Deadline deadline{err, rank, timeout_ns};

  // 0. The checks every rank agrees on through the shapes: topk_idx entries, and the messages per node that
  //    num_tokens_per_rdma_rank says against those is_token_in_rank gives (counted here: they size the streams).
  for (long long i = tid; i < static_cast<long long>(num_tokens) * topk; i += kThreads) {
    const int64_t e = topk_idx[i];
    if (e < -1 || e >= num_experts)
      atomicMin(&s_bad, static_cast<unsigned long long>(i) << 32 | static_cast<unsigned>(e));
  }
  for (int t = tid; t < num_tokens; t += kThreads) {
    const unsigned in_node = nodes_of_token(is_token_in_rank, nodes, t);
    for (int n = 0; n < kNodes; ++n)
      if (in_node >> n & 1u) atomicAdd(&s_node_msgs[n], 1);
  }
  __syncthreads();
  bool layout_ok = true;
  for (int n = 0; n < kNodes; ++n)
    if (n != my_node && num_tokens_per_rdma_rank[n] != s_node_msgs[n]) layout_ok = false;
  const int shape[epk::inter::kShapeFields] = {
      row_bytes, topk, scale_cols, local_experts, s_bad == ~0ull ? 1 : 0, layout_ok ? 1 : 0};

  // 1. My entry for every rank: its fields into the peer's area (this node) or into my staging slot (other nodes).
  for (int d = 0; d < kRanks; ++d) {
    const bool local = nodes.node(d) == my_node;
    NotifyEntry *e =
        local ? &reinterpret_cast<epk::inter::Area *>(peers[d] + area_offset)->entry[p][rank] : &mine->stage[p][d];
    for (int j = tid; j < kRanks; j += kThreads) e->rows[j] = num_tokens_per_rank[j];
    for (int f = tid; f < epk::inter::kShapeFields; f += kThreads) e->shape[f] = shape[f];
    for (int n = tid; n < kNodes; n += kThreads) e->node_msgs[n] = s_node_msgs[n];
    for (int x = tid; x < local_experts; x += kThreads) e->experts[x] = num_tokens_per_expert[d * local_experts + x];
  }
  __threadfence_system();
  __syncthreads();
  if (tid < kRanks) {
    const int d = tid;
    if (nodes.node(d) == my_node) {
      epk::publish(&reinterpret_cast<epk::inter::Area *>(peers[d] + area_offset)->entry[p][rank].flag, epoch);
    } else {  // the entry's body (after the flag) as one WRITE, then the flag as an inline WRITE: one doorbell
      const epk::inter::QpEntry &q = qps[d];
      const epk::stream::Qp qp = q.qp();
      constexpr long long body = 64;  // NotifyEntry: the flag and its padding, then the body
      const uint64_t from =
          epk::inter::offset_in(mine, reinterpret_cast<const unsigned long long *>(&mine->stage[p][d]));
      const uint64_t to =
          epk::inter::offset_in(mine, reinterpret_cast<const unsigned long long *>(&mine->entry[p][rank]));
      const uint64_t pi = epk::mlx5::reserve_wqes(qp.ctr, 2);
      bool ok = epk::mlx5::wait_sq_space(qp.retired, pi + 2, qp.wqe_cnt, deadline, d);
      if (ok) {
        epk::mlx5::write_rdma_write(qp.sq, qp.wqe_cnt, pi, qp.qpn, q.raddr + to + body, qp.rkey,
                                    reinterpret_cast<uint64_t>(mine) + from + body, qp.lkey,
                                    static_cast<uint32_t>(sizeof(NotifyEntry) - body), false);
        epk::mlx5::write_inline_u32(qp.sq, qp.wqe_cnt, pi + 1, qp.qpn, q.raddr + to, qp.rkey,
                                    static_cast<uint32_t>(epoch), true);
        ok = epk::mlx5::commit_in_order(qp.ctr + 1, pi, pi + 2, qp.dbrec, qp.db, qp.qpn, deadline, d);
      }
      if (!ok) s_failed = true;
    }
  }
  __syncthreads();
  if (s_failed) return;

  // 2. Every rank's entry.
  if (tid < kRanks && !epk::wait_reached(&mine->entry[p][tid].flag, epoch, deadline, EPK_ERR_PHASE_HT_NOTIFY, tid))
    s_failed = true;
  __syncthreads();
  if (s_failed) return;

  // 3. Shapes, the handle's matrices (each column from the entries), this rank's counts, the streams' counts.
  if (tid < kRanks * epk::inter::kShapeFields) {
    const int s = tid / epk::inter::kShapeFields, f = tid % epk::inter::kShapeFields;
    if (mine->entry[p][s].shape[f] != shape[f]) atomicMin(&s_mismatch, static_cast<unsigned>(s) << 8 | f);
  }
  if (tid < kRanks) {
    int prefix = 0, base = 0;
    for (int s = 0; s < kRanks; ++s) {
      const int rows = mine->entry[p][s].rows[tid];
      prefix += rows;
      rank_prefix_matrix[s * kRanks + tid] = prefix;
      if (s < rank) base += rows;
    }
    s_base[tid] = base;
    host_out[2 + tid] = mine->entry[p][tid].rows[rank];
  }
  if (tid < kCols) s_carry[tid] = 0;
  if (tid == 0) {
    int total = 0;
    for (int s = 0; s < kRanks; ++s) total += mine->entry[p][s].rows[rank];
    host_out[1] = total;
  }
  for (int e = tid; e < local_experts; e += kThreads) {
    int sum = 0;
    for (int s = 0; s < kRanks; ++s) sum += mine->entry[p][s].experts[e];
    host_out[EPK_HT_INTER_OUT_EXPERTS + e] = sum;
  }
  if (tid < epk::inter::kMaxNodes) {  // sent to node n; forwarded from node n (its peer with my local index sends)
    const int n = tid;
    const int sent = n < kNodes ? s_node_msgs[n] : 0;
    const int fwd = n < kNodes && n != my_node ? mine->entry[p][nodes.peer(n)].node_msgs[my_node] : 0;
    node_counts[n] = host_out[EPK_HT_INTER_OUT_NODES + n] = sent;
    node_counts[epk::inter::kMaxNodes + n] = host_out[EPK_HT_INTER_OUT_NODES + epk::inter::kMaxNodes + n] = fwd;
  }
  __syncthreads();
  if (tid == 0) {
    const unsigned m = s_mismatch;
    const int peer = m == ~0u ? -1 : static_cast<int>(m >> 8), field = static_cast<int>(m & 0xff);
    host_out[EPK_HT_INTER_OUT_SHAPE] = peer + 1;
    host_out[EPK_HT_INTER_OUT_SHAPE + 1] = field;
    host_out[EPK_HT_INTER_OUT_SHAPE + 2] = peer >= 0 ? mine->entry[p][peer].shape[field] : 0;
    host_out[EPK_HT_INTER_OUT_SHAPE + 3] = peer >= 0 ? shape[field] : 0;
    const unsigned long long b = s_bad;
    host_out[EPK_HT_INTER_OUT_BAD_INDEX] = b == ~0ull ? 0 : static_cast<int>(b >> 32) + 1;
    host_out[EPK_HT_INTER_OUT_BAD_INDEX + 1] = static_cast<int>(static_cast<unsigned>(b));
    host_out[EPK_HT_INTER_OUT_LAYOUT_OK] = layout_ok ? 1 : 0;
  }

  // 4. Exclusive scans over tokens, kGroup columns at a time: per rank (plus its base: send_slot), per other node
  //    (node_slot, node_tokens). Column c < kRanks: rank c; else node c - kRanks.
  for (int chunk = 0; chunk < num_tokens; chunk += kThreads) {
    const int t = chunk + tid;
    const unsigned in_node = t < num_tokens ? nodes_of_token(is_token_in_rank, nodes, t) : 0u;
    for (int g = 0; g < kCols; g += kGroup) {
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const int c = g + k;
        const bool in = c < kCols && member(is_token_in_rank, num_tokens, t, in_node, c);
        const unsigned ballot = __ballot_sync(0xffffffffu, in);
        if (lane == 0 && c < kCols) s_warp_count[warp][c] = __popc(ballot);
      }
    }
    __syncthreads();
    if (tid < kCols) {  // exclusive scan over warps, carried across chunks
      int run = s_carry[tid];
      for (int w = 0; w < kWarps; ++w) {
        const int c = s_warp_count[w][tid];
        s_warp_count[w][tid] = run;
        run += c;
      }
      s_carry[tid] = run;
    }
    __syncthreads();
    for (int g = 0; g < kCols; g += kGroup) {
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const int c = g + k;
        const bool in = c < kCols && member(is_token_in_rank, num_tokens, t, in_node, c);
        const unsigned ballot = __ballot_sync(0xffffffffu, in);
        if (t >= num_tokens || c >= kCols) continue;
        const int index = s_warp_count[warp][c] + __popc(ballot & ((1u << lane) - 1u));
        if (c < kRanks) {
          send_slot[static_cast<int64_t>(t) * kRanks + c] = in ? s_base[c] + index : -1;
        } else {
          const int n = c - kRanks;
          node_slot[static_cast<int64_t>(t) * kNodes + n] = in ? index : -1;
          if (in) node_tokens[static_cast<int64_t>(n) * num_tokens + index] = t;
        }
      }
    }
    __syncthreads();
  }

  // 5. Tell the host (if it is listening) that the counts are final.
  __threadfence_system();
  __syncthreads();
  if (tid == 0) {
    epk::end_epoch(epk::ctrl_of(peers, rank), epoch);
    if (host_out != nullptr) *reinterpret_cast<volatile int *>(host_out) = call;
  }
}

// HT notify across nodes (issue #18): ht_notify.cu's job for a group of several nodes. Every rank sends every rank
// its counts (rows per rank, selections per local expert of the receiver, messages per node, its call's shapes):
// into peers of its node's areas by IPC stores, to peers of other nodes by one RDMA WRITE of the staged entry and
// then the flag as an inline WRITE on the QP to that peer. Then it waits for every rank's entry and computes the
// handle: rank_prefix_matrix, send_slot[t, d] (the row of token t in rank d's output, -1 if not sent) for every rank
// d, node_slot[t, n] (the message index of token t in this call's stream to node n, -1 if none or this node) and
// node_tokens[n, i] (the token of message i to node n), and for the host: the rows received, per source, per local
// expert, the shape check, and per node the messages this rank sends and forwards. One block.
//
// Defines: EPK_NUM_RANKS, EPK_NUM_NODES. NOT RUN on a GPU yet (compiled for sm_90 by the CPU tests).
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
static_assert(kRanks <= epk::kMaxPeers && kNodes >= 2 && kNodes <= kRanks, "2..8 nodes of at most 8 ranks");

using epk::inter::NotifyEntry;

// host_out: as ht_notify.cu, plus [EPK_HT_NOTIFY_INTER + n] messages sent to node n and
// [EPK_HT_NOTIFY_INTER + kMaxNodes + n] messages forwarded from node n. node_counts (device, the handle's): the same
// 2 x kMaxNodes ints.
extern "C" __global__ void __launch_bounds__(kThreads)
    epk_ht_inter_notify(int dry_run, int rank, int epoch, int num_tokens, const int *__restrict__ num_tokens_per_rank,
                        const int *__restrict__ num_tokens_per_rdma_rank, const int *__restrict__ num_tokens_per_expert,
                        const bool *__restrict__ is_token_in_rank, const unsigned long long *__restrict__ peers,
                        long long area_offset, const epk::inter::QpEntry *__restrict__ qps, int node_of_rank,
                        int peer_of_node, int *__restrict__ rank_prefix_matrix, int *__restrict__ send_slot,
                        int *__restrict__ node_slot, int *__restrict__ node_tokens, int *__restrict__ node_counts,
                        const int64_t *__restrict__ topk_idx, int topk, int num_experts, int row_bytes, int scale_cols,
                        int *host_out, epk::ErrorRecord *err, unsigned long long timeout_ns) {
  if (dry_run) return;
  const int local_experts = num_experts / kRanks;  // checked by the host: a multiple of R, at most kMaxLocalExperts
  epk::mark_started(err, epoch);
  const int p = epoch & 1;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const epk::inter::Nodes nodes{node_of_rank, peer_of_node};
  const int my_node = nodes.node(rank);
  auto *mine = reinterpret_cast<epk::inter::Area *>(peers[rank] + area_offset);
  const epk::Deadline deadline{err, rank, timeout_ns};
  __shared__ int s_rows[kRanks][kRanks];
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
  __syncthreads();

  // 0. The checks every rank agrees on through the shapes: topk_idx entries, and the messages per node that
  //    num_tokens_per_rdma_rank says against those is_token_in_rank gives (counted here: they size the streams).
  for (long long i = tid; i < static_cast<long long>(num_tokens) * topk; i += kThreads) {
    const int64_t e = topk_idx[i];
    if (e < -1 || e >= num_experts)
      atomicMin(&s_bad, static_cast<unsigned long long>(i) << 32 | static_cast<unsigned>(e));
  }
  for (int t = tid; t < num_tokens; t += kThreads) {
    unsigned in_node = 0;
#pragma unroll
    for (int d = 0; d < kRanks; ++d)
      if (is_token_in_rank[static_cast<int64_t>(t) * kRanks + d]) in_node |= 1u << nodes.node(d);
#pragma unroll
    for (int n = 0; n < kNodes; ++n)
      if (in_node >> n & 1u) atomicAdd(&s_node_msgs[n], 1);
  }
  __syncthreads();
  if (tid == 0) s_node_msgs[my_node] = 0;  // this node's destinations get their rows over IPC: no messages
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
      const long long from = reinterpret_cast<const char *>(&mine->stage[p][d]) - reinterpret_cast<const char *>(mine);
      const long long to = reinterpret_cast<const char *>(&mine->entry[p][rank]) - reinterpret_cast<const char *>(mine);
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

  // 3. Shapes, the handle's matrices, this rank's counts (as ht_notify.cu), and the streams' message counts.
  if (tid < kRanks * epk::inter::kShapeFields) {
    const int s = tid / epk::inter::kShapeFields, f = tid % epk::inter::kShapeFields;
    if (mine->entry[p][s].shape[f] != shape[f]) atomicMin(&s_mismatch, static_cast<unsigned>(s) << 8 | f);
  }
  if (tid < kRanks * kRanks) s_rows[tid / kRanks][tid % kRanks] = mine->entry[p][tid / kRanks].rows[tid % kRanks];
  __syncthreads();
  if (tid < kRanks) {
    int prefix = 0, base = 0;
    for (int s = 0; s < kRanks; ++s) {
      prefix += s_rows[s][tid];
      rank_prefix_matrix[s * kRanks + tid] = prefix;
      if (s < rank) base += s_rows[s][tid];
    }
    s_base[tid] = base;
    host_out[2 + tid] = s_rows[tid][rank];
  }
  if (tid < kCols) s_carry[tid] = 0;
  if (tid == 0) {
    int total = 0;
    for (int s = 0; s < kRanks; ++s) total += s_rows[s][rank];
    host_out[1] = total;
  }
  for (int e = tid; e < local_experts; e += kThreads) {
    int sum = 0;
    for (int s = 0; s < kRanks; ++s) sum += mine->entry[p][s].experts[e];
    host_out[2 + kRanks + e] = sum;
  }
  if (tid < epk::inter::kMaxNodes) {  // sent to node n; forwarded from node n (its peer with my local index sends)
    const int n = tid;
    const int sent = n < kNodes ? s_node_msgs[n] : 0;
    const int fwd = n < kNodes && n != my_node ? mine->entry[p][nodes.peer(n)].node_msgs[my_node] : 0;
    node_counts[n] = host_out[EPK_HT_NOTIFY_INTER + n] = sent;
    node_counts[epk::inter::kMaxNodes + n] = host_out[EPK_HT_NOTIFY_INTER + epk::inter::kMaxNodes + n] = fwd;
  }
  __syncthreads();
  if (tid == 0) {
    const unsigned m = s_mismatch;
    const int peer = m == ~0u ? -1 : static_cast<int>(m >> 8), field = static_cast<int>(m & 0xff);
    host_out[EPK_HT_NOTIFY_SHAPE] = peer + 1;
    host_out[EPK_HT_NOTIFY_SHAPE + 1] = field;
    host_out[EPK_HT_NOTIFY_SHAPE + 2] = peer >= 0 ? mine->entry[p][peer].shape[field] : 0;
    host_out[EPK_HT_NOTIFY_SHAPE + 3] = peer >= 0 ? shape[field] : 0;
    const unsigned long long b = s_bad;
    host_out[EPK_HT_NOTIFY_BAD_INDEX] = b == ~0ull ? 0 : static_cast<int>(b >> 32) + 1;
    host_out[EPK_HT_NOTIFY_BAD_INDEX + 1] = static_cast<int>(static_cast<unsigned>(b));
    host_out[EPK_HT_NOTIFY_LAYOUT_OK] = layout_ok ? 1 : 0;
  }

  // 4. Exclusive scans over tokens: per rank (plus its base: send_slot), per other node (node_slot, node_tokens).
  for (int chunk = 0; chunk < num_tokens; chunk += kThreads) {
    const int t = chunk + tid;
    bool in[kCols];
    int below[kCols];
#pragma unroll
    for (int c = 0; c < kNodes; ++c) in[kRanks + c] = false;
#pragma unroll
    for (int j = 0; j < kRanks; ++j) {
      in[j] = t < num_tokens && is_token_in_rank[static_cast<int64_t>(t) * kRanks + j];
      const int n = nodes.node(j);
      if (in[j] && n != my_node) in[kRanks + n] = true;
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const unsigned ballot = __ballot_sync(0xffffffffu, in[c]);
      below[c] = __popc(ballot & ((1u << lane) - 1u));
      if (lane == 0) s_warp_count[warp][c] = __popc(ballot);
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
    if (t < num_tokens) {
#pragma unroll
      for (int j = 0; j < kRanks; ++j)
        send_slot[static_cast<int64_t>(t) * kRanks + j] = in[j] ? s_base[j] + s_warp_count[warp][j] + below[j] : -1;
#pragma unroll
      for (int n = 0; n < kNodes; ++n) {
        const int c = kRanks + n;
        const int i = in[c] ? s_warp_count[warp][c] + below[c] : -1;
        node_slot[static_cast<int64_t>(t) * kNodes + n] = i;
        if (i >= 0) node_tokens[static_cast<int64_t>(n) * num_tokens + i] = t;
      }
    }
    __syncthreads();
  }

  // 5. Tell the host (if it is listening) that the counts are final.
  __threadfence_system();
  __syncthreads();
  if (tid == 0 && host_out != nullptr) *reinterpret_cast<volatile int *>(host_out) = epoch;
}

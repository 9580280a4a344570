// HT notify: every rank tells every peer how many rows it will send it (and per local expert how many
// selections), waits for all peers, then computes the handle: rank_prefix_matrix, this rank's receive
// count and per-expert counts (into host-mapped memory for the host), and send_slot[t, d], the row of
// token t in rank d's output (-1 if not sent). One block; runs before the host knows output sizes.
// Also for the host to check before it dispatches: whether every peer's call has this call's shapes (row bytes,
// top-k, FP8 scale columns, experts per rank) and whether every topk_idx entry lies in [-1, num_experts).
//
// Defines: EPK_NUM_RANKS only: the experts per rank are an argument (num_experts / R), so ranks whose calls differ
// in it still run the same code (one specialisation per Buffer) and the shape check below catches the difference.
#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "ht_common.cuh"

#ifndef EPK_NUM_RANKS
#error "EPK_NUM_RANKS must be defined"
#endif

constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
static_assert(kRanks <= epk::kMaxPeers, "intranode HT supports up to 8 ranks");

// host_out layout (int32): [0] the host's call number when complete, [1] rows received, [2, 2+R) rows from each source,
// [2+R, 2+R+E_loc) selections per local expert (not yet rounded to expert_alignment).
extern "C" __global__ void __launch_bounds__(kThreads)
    epk_ht_notify(int dry_run, int rank, int call, int num_tokens, const int *__restrict__ num_tokens_per_rank,
                  const int *__restrict__ num_tokens_per_expert, const bool *__restrict__ is_token_in_rank,
                  const unsigned long long *__restrict__ peers, int *__restrict__ rank_prefix_matrix,
                  int *__restrict__ send_slot, const int64_t *__restrict__ topk_idx, int topk, int num_experts,
                  int row_bytes, int scale_cols, int *host_out, epk::ErrorRecord *err, unsigned long long timeout_ns) {
  if (dry_run) return;  // first use: makes the driver load this kernel before any peer spins
  // The host checked num_experts (a multiple of R, at most kMaxLocalExperts per rank) before the launch.
  const int local_experts = num_experts / kRanks;
  epk::mark_started(err, call);
  const int epoch = epk::begin_epoch(epk::ctrl_of(peers, rank));
  const int p = epoch & 1;
  const int tid = threadIdx.x;
  __shared__ int s_rows[kRanks][kRanks];
  __shared__ int s_base[kRanks];  // first row of my tokens in each destination
  __shared__ int s_warp_count[kWarps][kRanks];
  __shared__ int s_carry[kRanks];
  __shared__ bool s_failed;
  __shared__ unsigned long long s_bad;  // (flat index << 32 | value) of the first bad topk_idx entry
  __shared__ unsigned s_mismatch;       // (peer << 8 | field) of the first differing shape
  if (tid == 0) {
    s_failed = false;
    s_bad = ~0ull;
    s_mismatch = ~0u;
  }
  __syncthreads();
  for (long long i = tid; i < static_cast<long long>(num_tokens) * topk; i += kThreads) {
    const int64_t e = topk_idx[i];
    if (e < -1 || e >= num_experts)
      atomicMin(&s_bad, static_cast<unsigned long long>(i) << 32 | static_cast<unsigned>(e));
  }
  __syncthreads();
  // A rank with a bad topk_idx entry differs from the others in the last field: every rank then refuses the call.
  const int shape[EPK_HT_SHAPE_FIELDS] = {row_bytes, topk, scale_cols, local_experts, s_bad == ~0ull ? 1 : 0};

  // 1. Send my counts to every peer.
  for (int i = tid; i < kRanks * kRanks; i += kThreads) {
    const int d = i / kRanks, j = i % kRanks;
    epk::ctrl_of(peers, d)->notify_rows[p][rank][j] = num_tokens_per_rank[j];
  }
  for (int i = tid; i < kRanks * local_experts; i += kThreads) {
    const int d = i / local_experts, e = i % local_experts;
    epk::ctrl_of(peers, d)->notify_experts[p][rank][e] = num_tokens_per_expert[d * local_experts + e];
  }
  for (int i = tid; i < kRanks * EPK_HT_SHAPE_FIELDS; i += kThreads)
    epk::ctrl_of(peers, i / EPK_HT_SHAPE_FIELDS)->notify_shape[p][rank][i % EPK_HT_SHAPE_FIELDS] =
        shape[i % EPK_HT_SHAPE_FIELDS];
  __threadfence_system();
  __syncthreads();
  if (tid < kRanks) epk::publish(&epk::ctrl_of(peers, tid)->notify_flag[p][rank], epoch);

  // 2. Wait for every peer's counts.
  epk::HtCtrl *mine = epk::ctrl_of(peers, rank);
  const epk::Deadline deadline{err, rank, timeout_ns};
  if (tid < kRanks && !epk::wait_reached(&mine->notify_flag[p][tid], epoch, deadline, EPK_ERR_PHASE_HT_NOTIFY, tid))
    s_failed = true;
  __syncthreads();
  if (s_failed) return;

  // 3. The shapes every peer called with; the handle's matrices and this rank's counts.
  if (tid < kRanks * EPK_HT_SHAPE_FIELDS) {
    const int s = tid / EPK_HT_SHAPE_FIELDS, f = tid % EPK_HT_SHAPE_FIELDS;
    if (mine->notify_shape[p][s][f] != shape[f]) atomicMin(&s_mismatch, static_cast<unsigned>(s) << 8 | f);
  }
  if (tid < kRanks * kRanks) s_rows[tid / kRanks][tid % kRanks] = mine->notify_rows[p][tid / kRanks][tid % kRanks];
  __syncthreads();
  if (tid < kRanks) {
    int prefix = 0, base = 0;
    for (int s = 0; s < kRanks; ++s) {
      prefix += s_rows[s][tid];
      rank_prefix_matrix[s * kRanks + tid] = prefix;
      if (s < rank) base += s_rows[s][tid];
    }
    s_base[tid] = base;
    s_carry[tid] = 0;
    host_out[2 + tid] = s_rows[tid][rank];
  }
  if (tid == 0) {
    int total = 0;
    for (int s = 0; s < kRanks; ++s) total += s_rows[s][rank];
    host_out[1] = total;
  }
  for (int e = tid; e < local_experts; e += kThreads) {
    int sum = 0;
    for (int s = 0; s < kRanks; ++s) sum += mine->notify_experts[p][s][e];
    host_out[2 + kRanks + e] = sum;
  }
  __syncthreads();
  if (tid == 0) {
    const unsigned m = s_mismatch;
    const int peer = m == ~0u ? -1 : static_cast<int>(m >> 8), field = static_cast<int>(m & 0xff);
    host_out[EPK_HT_NOTIFY_SHAPE] = peer + 1;
    host_out[EPK_HT_NOTIFY_SHAPE + 1] = field;
    host_out[EPK_HT_NOTIFY_SHAPE + 2] = peer >= 0 ? mine->notify_shape[p][peer][field] : 0;
    host_out[EPK_HT_NOTIFY_SHAPE + 3] = peer >= 0 ? shape[field] : 0;
    const unsigned long long b = s_bad;
    host_out[EPK_HT_NOTIFY_BAD_INDEX] = b == ~0ull ? 0 : static_cast<int>(b >> 32) + 1;
    host_out[EPK_HT_NOTIFY_BAD_INDEX + 1] = static_cast<int>(static_cast<unsigned>(b));
  }

  // 4. send_slot: per destination, an exclusive scan of is_token_in_rank over tokens, plus the base.
  const int lane = tid % 32, warp = tid / 32;
  for (int chunk = 0; chunk < num_tokens; chunk += kThreads) {
    const int t = chunk + tid;
    bool in[kRanks];
    int below[kRanks];
#pragma unroll
    for (int j = 0; j < kRanks; ++j) {
      in[j] = t < num_tokens && is_token_in_rank[static_cast<int64_t>(t) * kRanks + j];
      const unsigned ballot = __ballot_sync(0xffffffffu, in[j]);
      below[j] = __popc(ballot & ((1u << lane) - 1u));
      if (lane == 0) s_warp_count[warp][j] = __popc(ballot);
    }
    __syncthreads();
    if (tid < kRanks) {  // exclusive scan over warps, carried across chunks
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

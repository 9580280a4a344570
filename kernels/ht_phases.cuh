// The phases that the intranode HT copy kernels (ht_dispatch.cu, ht_combine.cu) share: the exchange of output /
// input addresses through the peers' control areas, the end of a call (every peer done), and the diagnostic probe.
//
// Defines: EPK_PROBE (0, or 1 for a diagnostic build, GpuBuffer.ht_probe: thread 0 of each block records the
// global timer (ns, one clock for every process on the GPU) at the kernel's phase boundaries: 0 start, 1 peers'
// entries received, 2 copies done, 3 every peer done (the last block only), in epk_probe).
#pragma once
#include "epk_common.cuh"
#include "ht_common.cuh"

#ifndef EPK_PROBE
#error "EPK_PROBE must be defined"
#endif

namespace epk {
constexpr int kProbeBlocks = 1024;
}  // namespace epk
#if EPK_PROBE
extern "C" {  // C linkage, so the host finds it by name (the braces make it a definition)
__device__ unsigned long long epk_probe[epk::kProbeBlocks][4];
}
#endif
namespace epk {
EPK_DEVICE void probe(int point) {
#if EPK_PROBE
  if (threadIdx.x == 0 && blockIdx.x < kProbeBlocks) epk_probe[blockIdx.x][point] = now_ns();
#endif
}

// Entry and flag selectors are lambdas over a peer's HtCtrl. `rank_of(d)`, in all three phases below: the rank that
// index d of the entries and flags stands for (-1: none). Within one node, rank d itself (the default); across
// nodes, this node's ranks by local index (HtCtrl holds at most kMaxPeers of them).
struct SameRank {
  EPK_DEVICE int operator()(int d) const { return d; }
};

// Block 0 writes this rank's `n` values (addresses relative to its own region base, so each peer adds its
// own mapping of that region) into every peer's entry, then publishes the peer's flag.
template <int kRanks, int N, typename EntryOf, typename FlagOf, typename RankOf = SameRank>
EPK_DEVICE void send_entries(const unsigned long long *peers, int epoch, const long long (&values)[N], EntryOf entry_of,
                             FlagOf flag_of, RankOf rank_of = {}) {
  if (blockIdx.x != 0 || threadIdx.x >= kRanks) return;
  const int r = rank_of(threadIdx.x);
  if (r < 0) return;
  HtCtrl *peer = ctrl_of(peers, r);
  long long *entry = entry_of(peer);
#pragma unroll
  for (int i = 0; i < N; ++i) entry[i] = values[i];
  publish(flag_of(peer), epoch);
}

// Every block: thread d < kRanks waits for peer d's flag in my control area and hands the peer's entry
// to `take(d, entry)`. False in every thread (after one record of the error) if any wait expired.
template <int kRanks, typename FlagOf, typename Take, typename RankOf = SameRank>
EPK_DEVICE bool receive_entries(HtCtrl *mine, int epoch, const Deadline &deadline, int phase, FlagOf flag_of, Take take,
                                RankOf rank_of = {}) {
  __shared__ bool s_failed;
  if (threadIdx.x == 0) s_failed = false;
  __syncthreads();
  const int d = threadIdx.x;
  if (d < kRanks) {
    const int r = rank_of(d);
    if (r >= 0) {
      if (wait_reached(flag_of(mine, d), epoch, deadline, phase, r))
        take(d);
      else
        s_failed = true;
    }
  }
  __syncthreads();
  return !s_failed;
}

// End of a copy kernel: the last block to finish tells every peer this rank is done (its flag in the peer's
// control area) and waits until every peer has said the same in mine. The ticket is reset for the next call, and the
// rank's epoch counter advanced (ht_common.cuh). The flag lambdas take the epoch's parity: the epoch is read again
// here rather than kept in a register through the copy loop (the combine's 64-register budget).
template <int kRanks, typename MyFlagAt, typename PeerFlagOf, typename RankOf = SameRank>
EPK_DEVICE void finish_all(unsigned *ticket, const unsigned long long *peers, HtCtrl *mine, const Deadline &deadline,
                           int phase, MyFlagAt my_flag_at, PeerFlagOf flag_of_peer, RankOf rank_of = {}) {
  __shared__ bool s_last;
  const int epoch = begin_epoch(mine);  // before this block's ticket, so before the last block advances it
  __threadfence_system();
  __syncthreads();
  probe(2);  // every warp of the block has finished its copies
  if (threadIdx.x == 0) s_last = atomic_add_acq_rel_gpu(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  if (threadIdx.x == 0) {
    atomicExch(ticket, 0u);
    end_epoch(mine, epoch);  // every block has read it: each took its ticket after
  }
  const int d = threadIdx.x, p = epoch & 1;
  if (d < kRanks) {
    const int r = rank_of(d);
    if (r >= 0) {
      publish(my_flag_at(ctrl_of(peers, r), p), epoch);
      wait_reached(flag_of_peer(mine, d, p), epoch, deadline, phase, r);
    }
  }
  if constexpr (EPK_PROBE) {
    __syncthreads();
    probe(3);
  }
}

}  // namespace epk

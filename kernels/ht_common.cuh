// Shared by the intranode high-throughput kernels: the control area at the start of every rank's
// symmetric region, and how a rank finds a peer's copy of it.
//
// Every slot is doubled and indexed by (epoch & 1). Reuse of a slot is safe whatever the parity sequence
// (consecutive cached dispatches, for one, share a parity): every operation ends with each rank having
// heard "done" from every peer, so when a rank writes a slot again every peer has finished reading it.
// Flags hold the epoch of the call that wrote them, so nothing is ever reset.
#pragma once
#include "epk_common.cuh"

#ifndef EPK_CTRL_BYTES
#error "EPK_CTRL_BYTES (size of the control area) must be defined"
#endif

namespace epk {

constexpr int kMaxPeers = 8;            // ranks reached by IPC in the HT kernels
constexpr int kMaxLocalExperts = 1024;  // per rank

struct HtCtrl {
  int notify_flag[2][kMaxPeers];
  int notify_rows[2][kMaxPeers][kMaxPeers];            // [src][dst]: rows src sends to dst
  int notify_experts[2][kMaxPeers][kMaxLocalExperts];  // [src][local expert]: selections src sends me
  int dispatch_addr_flag[2][kMaxPeers];
  int dispatch_done[2][kMaxPeers];
  int combine_addr_flag[2][kMaxPeers];
  int combine_done[2][kMaxPeers];
  int pad[8];
  long long dispatch_addr[2][kMaxPeers][8];  // [dst]: dst's output arrays, relative to dst's region base
  long long combine_addr[2][kMaxPeers][4];   // [src of rows]: its combine inputs, relative to its base
};
static_assert(sizeof(HtCtrl) <= EPK_CTRL_BYTES, "control area too small");

// EPK_PROBE=1 (a diagnostic build, GpuBuffer.ht_probe): thread 0 of each block records the global timer (ns,
// one clock for every process on the GPU) at the kernel's phase boundaries: 0 start, 1 peers' entries
// received, 2 copies done, 3 every peer done (the last block only).
#ifndef EPK_PROBE
#define EPK_PROBE 0
#endif
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

EPK_DEVICE HtCtrl *ctrl_of(const unsigned long long *peers, int r) { return reinterpret_cast<HtCtrl *>(peers[r]); }

// Stores data-carrying writes must be visible system-wide before the flag that publishes them.
EPK_DEVICE void publish(int *flag, int epoch) {
  __threadfence_system();
  st_release_sys(flag, epoch);
}

// ---- the phases that every HT copy kernel shares (entry/flag selectors are lambdas over a peer's HtCtrl) ----

// Block 0 writes this rank's `n` values (addresses relative to its own region base, so each peer adds its
// own mapping of that region) into every peer's entry, then publishes the peer's flag.
template <int kRanks, int N, typename EntryOf, typename FlagOf>
EPK_DEVICE void send_entries(const unsigned long long *peers, int epoch, const long long (&values)[N], EntryOf entry_of,
                             FlagOf flag_of) {
  if (blockIdx.x != 0 || threadIdx.x >= kRanks) return;
  HtCtrl *peer = ctrl_of(peers, threadIdx.x);
  long long *entry = entry_of(peer);
#pragma unroll
  for (int i = 0; i < N; ++i) entry[i] = values[i];
  publish(flag_of(peer), epoch);
}

// Every block: thread d < kRanks waits for peer d's flag in my control area and hands the peer's entry
// to `take(d, entry)`. False in every thread (after one record of the error) if any wait expired.
template <int kRanks, typename FlagOf, typename Take>
EPK_DEVICE bool receive_entries(HtCtrl *mine, int epoch, const Deadline &deadline, int phase, FlagOf flag_of,
                                Take take) {
  __shared__ bool s_failed;
  if (threadIdx.x == 0) s_failed = false;
  __syncthreads();
  const int d = threadIdx.x;
  if (d < kRanks) {
    if (wait_reached(flag_of(mine, d), epoch, deadline, phase, d))
      take(d);
    else
      s_failed = true;
  }
  __syncthreads();
  return !s_failed;
}

// End of a copy kernel: the last block to finish tells every peer this rank is done (its flag in the peer's
// control area) and waits until every peer has said the same in mine. The ticket is reset for the next call.
template <int kRanks, typename MyFlagAt, typename PeerFlagOf>
EPK_DEVICE void finish_all(unsigned *ticket, const unsigned long long *peers, HtCtrl *mine, int epoch,
                           const Deadline &deadline, int phase, MyFlagAt my_flag_at, PeerFlagOf flag_of_peer) {
  __shared__ bool s_last;
  __threadfence_system();
  __syncthreads();
  probe(2);  // every warp of the block has finished its copies
  if (threadIdx.x == 0) s_last = atomic_add_acq_rel_gpu(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  if (threadIdx.x == 0) atomicExch(ticket, 0u);
  const int d = threadIdx.x;
  if (d < kRanks) {
    publish(my_flag_at(ctrl_of(peers, d)), epoch);
    wait_reached(flag_of_peer(mine, d), epoch, deadline, phase, d);
  }
  if constexpr (EPK_PROBE) {
    __syncthreads();
    probe(3);
  }
}

}  // namespace epk

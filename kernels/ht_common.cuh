// Shared by the intranode high-throughput kernels: the control area at the start of every rank's
// symmetric region (EPK_CTRL_BYTES, epk_constants.cuh), and how a rank finds a peer's copy of it.
//
// Every slot is doubled and indexed by (epoch & 1). Reuse of a slot is safe whatever the parity sequence
// (consecutive cached dispatches, for one, share a parity): every operation ends with each rank having
// heard "done" from every peer, so when a rank writes a slot again every peer has finished reading it.
// Flags hold the epoch of the call that wrote them, so nothing is ever reset.
#pragma once
#include "epk_common.cuh"
#include "epk_constants.cuh"

namespace epk {

constexpr int kMaxPeers = EPK_HT_MAX_PEERS;                 // ranks reached by IPC in the HT kernels
constexpr int kMaxLocalExperts = EPK_HT_MAX_LOCAL_EXPERTS;  // per rank

struct HtCtrl {  // (needs epk_constants.cuh)
  int notify_flag[2][kMaxPeers];
  int notify_rows[2][kMaxPeers][kMaxPeers];             // [src][dst]: rows src sends to dst
  int notify_experts[2][kMaxPeers][kMaxLocalExperts];   // [src][local expert]: selections src sends me
  int notify_shape[2][kMaxPeers][EPK_HT_SHAPE_FIELDS];  // [src]: the shapes of src's dispatch call
  int dispatch_addr_flag[2][kMaxPeers];
  int dispatch_done[2][kMaxPeers];
  int combine_addr_flag[2][kMaxPeers];
  int combine_done[2][kMaxPeers];
  int pad[8];
  long long dispatch_addr[2][kMaxPeers][8];  // [dst]: dst's output arrays, relative to dst's region base
  long long combine_addr[2][kMaxPeers][4];   // [src of rows]: its combine inputs, relative to its base
};
static_assert(sizeof(HtCtrl) <= EPK_CTRL_BYTES, "control area too small");

EPK_DEVICE HtCtrl *ctrl_of(const unsigned long long *peers, int r) { return reinterpret_cast<HtCtrl *>(peers[r]); }

// Stores data-carrying writes must be visible system-wide before the flag that publishes them.
EPK_DEVICE void publish(int *flag, int epoch) {
  __threadfence_system();
  st_release_sys(flag, epoch);
}

}  // namespace epk

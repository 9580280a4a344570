// Shared by the intranode high-throughput kernels: the control area at the start of every rank's
// symmetric region (EPK_CTRL_BYTES, epk_constants.cuh), and how a rank finds a peer's copy of it.
//
// Every slot is doubled and indexed by (epoch & 1). Reuse of a slot is safe whatever the parity sequence
// (consecutive cached dispatches, for one, share a parity): every operation ends with each rank having
// heard "done" from every peer, so when a rank writes a slot again every peer has finished reading it.
// Flags hold the epoch of the call that wrote them, so nothing is ever reset.
//
// Epochs are counted on the device: each rank's HT kernels (notify, dispatch, combine, intranode or across nodes)
// take epoch = epoch_counter + 1 in the rank's own control area, and the kernel's last block writes the counter
// back (finish_all; notify at its end). Nothing comes from a host argument, so a captured call replays with a fresh
// epoch, as the LL kernels' sequence does.
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
  int epoch_counter;  // the epoch of this rank's last HT kernel; written only by this rank (EPK_HT_CTRL_COUNTER_AT)
  int pad[7];
  long long dispatch_addr[2][kMaxPeers][8];  // [dst]: dst's output arrays, relative to dst's region base
  long long combine_addr[2][kMaxPeers][4];   // [src of rows]: its combine inputs, relative to its base
};
static_assert(sizeof(HtCtrl) <= EPK_CTRL_BYTES, "control area too small");
// The host and the CPU models find the counter at EPK_HT_CTRL_COUNTER_AT: the int arrays before it, unpadded.
static_assert(sizeof(HtCtrl::notify_flag) + sizeof(HtCtrl::notify_rows) + sizeof(HtCtrl::notify_experts) +
                      sizeof(HtCtrl::notify_shape) + sizeof(HtCtrl::dispatch_addr_flag) +
                      sizeof(HtCtrl::dispatch_done) + sizeof(HtCtrl::combine_addr_flag) +
                      sizeof(HtCtrl::combine_done) ==
                  EPK_HT_CTRL_COUNTER_AT,
              "epoch_counter's offset");

// This kernel's epoch. Every block reads it before its ticket of finish_all, the last block writes it back after
// every ticket, so no block can read the new value.
EPK_DEVICE int begin_epoch(const HtCtrl *mine) {
  return static_cast<int>(static_cast<unsigned>(*reinterpret_cast<const volatile int *>(&mine->epoch_counter)) + 1u);
}
EPK_DEVICE void end_epoch(HtCtrl *mine, int epoch) { *reinterpret_cast<volatile int *>(&mine->epoch_counter) = epoch; }

EPK_DEVICE HtCtrl *ctrl_of(const unsigned long long *peers, int r) { return reinterpret_cast<HtCtrl *>(peers[r]); }

// Stores data-carrying writes must be visible system-wide before the flag that publishes them.
EPK_DEVICE void publish(int *flag, int epoch) {
  __threadfence_system();
  st_release_sys(flag, epoch);
}

}  // namespace epk

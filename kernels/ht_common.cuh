// Shared by the intranode high-throughput kernels: the control area at the start of every rank's
// symmetric region, and how a rank finds a peer's copy of it.
//
// Every slot is doubled and indexed by (epoch & 1): consecutive operations of one kind never share a
// slot, and two operations apart every peer has provably finished reading it (each operation ends with
// all ranks having heard from all ranks). Flags hold the epoch of the call that wrote them, so nothing
// is ever reset.
#pragma once
#include "epk_common.cuh"

#ifndef EPK_CTRL_BYTES
#error "EPK_CTRL_BYTES (size of the control area) must be defined"
#endif

namespace epk {

constexpr int kMaxPeers = 8;           // ranks reached by IPC in the HT kernels
constexpr int kMaxLocalExperts = 1024;  // per rank

struct HtCtrl {
  int notify_flag[2][kMaxPeers];
  int notify_rows[2][kMaxPeers][kMaxPeers];           // [src][dst]: rows src sends to dst
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

EPK_DEVICE HtCtrl *ctrl_of(const unsigned long long *peers, int r) {
  return reinterpret_cast<HtCtrl *>(peers[r]);
}

// Stores data-carrying writes must be visible system-wide before the flag that publishes them.
EPK_DEVICE void publish(int *flag, int epoch) {
  __threadfence_system();
  st_release_sys(flag, epoch);
}

// ---- the phases that every HT copy kernel shares (entry/flag selectors are lambdas over a peer's HtCtrl) ----

// Block 0 writes this rank's `n` values (addresses relative to its own region base, so each peer adds its
// own mapping of that region) into every peer's entry, then publishes the peer's flag.
template <int kRanks, int N, typename EntryOf, typename FlagOf>
EPK_DEVICE void send_entries(const unsigned long long *peers, int epoch, const long long (&values)[N],
                             EntryOf entry_of, FlagOf flag_of) {
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
  if (threadIdx.x == 0) s_last = atomic_add_acq_rel_gpu(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  if (threadIdx.x == 0) atomicExch(ticket, 0u);
  const int d = threadIdx.x;
  if (d < kRanks) {
    publish(my_flag_at(ctrl_of(peers, d)), epoch);
    wait_reached(flag_of_peer(mine, d), epoch, deadline, phase, d);
  }
}

// bf16 <-> float without cuda_bf16.h conversions in the hot loop: exact widening, RNE narrowing.
EPK_DEVICE float bf16_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
EPK_DEVICE float bf16_hi(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }
EPK_DEVICE uint32_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN stays NaN
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
EPK_DEVICE uint32_t pack_bf16(float lo, float hi) { return f32_to_bf16_bits(lo) | (f32_to_bf16_bits(hi) << 16); }

// acc[0..8) += the 8 bf16 values of v (float32, round-to-nearest adds in element order).
EPK_DEVICE void add_bf16x8(float (&acc)[8], const int4 &v) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[2 * j] = __fadd_rn(acc[2 * j], bf16_lo(w[j]));
    acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], bf16_hi(w[j]));
  }
}

EPK_DEVICE int4 pack_bf16x8(const float (&acc)[8]) {
  int4 o;
  o.x = static_cast<int>(pack_bf16(acc[0], acc[1]));
  o.y = static_cast<int>(pack_bf16(acc[2], acc[3]));
  o.z = static_cast<int>(pack_bf16(acc[4], acc[5]));
  o.w = static_cast<int>(pack_bf16(acc[6], acc[7]));
  return o;
}

// 16-byte load of data read once (no L1 allocation, read-only path).
EPK_DEVICE int4 ld_nc_v4(const int4 *p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

}  // namespace epk

// Shared by the low-latency (LL) kernels: the LL device state, the LL area layout, the call counter that
// picks one of two alternating buffer sets, tagged signals and their deadline-bounded wait.
//
// LL area (num_rdma_bytes at `ll_off` in every rank's symmetric region; offsets below relative to it):
//   set p (p = call seq & 1) at p * set_stride, each set:
//     [0, 4E)                 signals: dispatch count of (local expert e, source rank s) at index e*R + s,
//                             combine flag of global expert g at index g (both int32, tagged, see below)
//     [4E, 8E)                the direct dispatch's fill counter of each local expert (int32, reset by the
//                             owner's receive; no other mode writes there)
//     [send_off, ...)         send region: dispatch staging (one message per source token), and the
//                             zero-copy combine buffer [E_loc, R*num_max, H] BF16 (never both in one call)
//     [recv_off, ...)         receive region: dispatch slots [E_loc][R][num_max] messages of 16 + 2H bytes,
//                             or combine slots [E][num_max] rows of 2H bytes, or the direct dispatch's
//                             outputs (recv_x, scales, src_info, layout_range, count; ll_dispatch_direct.cuh)
//   Host side: src/epkern/ll_intranode.py (ll_layout) computes the offsets; they fit the size hint.
//
// Call counter: the Buffer's device state holds the seq of the last call that sent. A kernel that sends
// takes seq = counter + 1 and its last block writes the counter back at the end; a receive-only kernel (the
// recv hook) takes seq = counter - back, `back` being the number of sends the host issued after its own.
// Nothing comes from a host epoch, so a captured dispatch + combine pair replays correctly in a CUDA graph.
//
// Signals carry a tag of the call (1..2^20-1, never 0, so zeroed memory never matches) in bits 11..30 and a
// token count (<= 1024) in bits 0..10: a slot never needs resetting, and a stale value from an earlier call
// never satisfies a wait.
#pragma once
#include "epk_common.cuh"
#include "ll_route.cuh"

namespace epk {
namespace ll {

// ---- device state (int32 words; mirrored by STATE_* in src/epkern/ll_intranode.py) ----
constexpr int kMaxRanks = 1024;
constexpr int kMaxExperts = 8192;
constexpr int kStateCounter = 0;                      // seq of the last call that sent
constexpr int kStateTicket = 1;                       // blocks of the running sending kernel that finished
constexpr int kStateMask = 64;                        // [kMaxRanks]: 1 = peer masked (skipped at every send and wait)
constexpr int kStateRoute = kStateMask + kMaxRanks;   // [kMaxRanks]: RouteKind of each peer
constexpr int kStateSlot = kStateRoute + kMaxRanks;   // [kMaxExperts]: dispatch slot allocator per expert
constexpr int kStateDone = kStateSlot + kMaxExperts;  // [kMaxExperts]: dispatch puts finished per expert
constexpr int kStatePair = kStateDone + kMaxExperts;  // [kMaxExperts]: combine warps finished per (e, src)
constexpr int kStateSent = kStatePair + kMaxExperts;  // [kMaxExperts]: diagnostics, dispatch count of g: -seq
                                                      // once its warp waits for the local sends, seq once sent
constexpr int kStateReadback = kStateSent + kMaxExperts;      // [kMaxExperts]: diagnostics (EPK_LL_DIAG), the count
                                                              // word read back from the owner right after its store
constexpr int kStateSentAddr = kStateReadback + kMaxExperts;  // [kMaxExperts] int64: ... and the address stored to
constexpr int kMaxSelections = 1024 * 32;                     // num_max * top-k at most
// The direct dispatch (EPK_LL_DIRECT): per expert, the begin of this rank's block at its owner and the seq once
// published; per selection (t * K + k), its slot within the block (token order).
constexpr int kStateBegin = kStateSentAddr + 2 * kMaxExperts;
constexpr int kStateBeginTag = kStateBegin + kMaxExperts;
constexpr int kStateSlotOf = kStateBeginTag + kMaxExperts;
constexpr int kStateWords = kStateSlotOf + kMaxSelections;

// ---- phases of a launch (bit mask) and of an error record (PHASES in gpu_buffer.py) ----
constexpr int kSend = 1;
constexpr int kRecv = 2;
constexpr int kPhaseDispatchRecv = 7;  // waiting for a peer's token count
constexpr int kPhaseLocalSends = 8;    // waiting for this rank's own dispatch puts (a bug if it expires)
constexpr int kPhaseCombineRecv = 9;   // waiting for a peer's expert outputs
constexpr int kPhaseBadIndex = 10;     // a topk_idx entry outside [-1, num_experts)
constexpr int kPhaseBadHandle = 11;    // a layout_range / src_info entry out of range in combine
constexpr int kPhaseRoute = 12;        // a peer's route kind is not implemented
constexpr int kPhaseOverflow = 13;     // more selections of one expert than num_max slots

constexpr int kCountBits = 11;
constexpr int kCountMask = (1 << kCountBits) - 1;

EPK_DEVICE int tag_of(unsigned seq) { return 1 + static_cast<int>(seq % 0xFFFFFu); }
EPK_DEVICE int pack_signal(int tag, int count) { return (tag << kCountBits) | count; }

EPK_DEVICE int ld_volatile(const int *p) { return *reinterpret_cast<const volatile int *>(p); }

EPK_DEVICE unsigned call_seq(const int *state, int phase, int back) {
  const unsigned last = static_cast<unsigned>(ld_volatile(state + kStateCounter));
  return (phase & kSend) ? last + 1u : last - static_cast<unsigned>(back);
}

// End of a kernel that sent: the last block to get here publishes `seq` as the counter for the next call.
// Every block must reach this (no early return between the start and here).
EPK_DEVICE void finish_call(int *state, unsigned seq) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(state + kStateTicket, 1) == static_cast<int>(gridDim.x) - 1) {
      state[kStateCounter] = static_cast<int>(seq);
      state[kStateTicket] = 0;
      __threadfence();
    }
  }
}

enum WaitResult : int { kArrived = 0, kExpired = 1, kGaveUp = 2 };

// Polling experiments (not yet measured; the defaults poll as the code that ran exact on the H200). Thousands of
// threads per rank poll peers' signals while the senders' copies are in flight:
//   EPK_POLL_SLEEP_NS (EPKERN_LL_POLL_SLEEP_NS): __nanosleep between polls after the first 32 (0 = none);
//   EPK_POLL_RELAXED (EPKERN_LL_POLL_RELAXED): poll with relaxed (volatile) loads and make one acquire load once
//   the tag shows, instead of an acquire load per poll. Same ordering: the acquire load reads the released value
//   (or a later one, which cannot exist within a call: the slot's next writer is two calls later).
#ifndef EPK_POLL_SLEEP_NS
#define EPK_POLL_SLEEP_NS 0
#endif
#ifndef EPK_POLL_RELAXED
#define EPK_POLL_RELAXED 0
#endif
EPK_DEVICE void poll_pause(unsigned iter) {
  if constexpr (EPK_POLL_SLEEP_NS > 0) {
    if (iter >= 32u) __nanosleep(EPK_POLL_SLEEP_NS);
  }
}
EPK_DEVICE int poll_load(const int *p) {
  if constexpr (EPK_POLL_RELAXED != 0) return ld_volatile(p);
  return ld_acquire_sys(p);
}

// Spin until the tagged signal at `p` carries `tag` (acquire, system scope) or the deadline passes. On
// expiry record (rank, phase, peer, value seen, expected tag) and return kExpired; kGaveUp when another
// thread of this rank recorded an error first (stop rather than wait out a second deadline).
EPK_DEVICE int wait_signal(const int *p, int tag, const Deadline &d, int phase, int peer, int &value) {
  value = poll_load(p);
  if ((value >> kCountBits) == tag) {
    if constexpr (EPK_POLL_RELAXED != 0) value = ld_acquire_sys(p);
    return kArrived;
  }
  const uint64_t start = now_ns();
  for (unsigned iter = 1;; ++iter) {
    poll_pause(iter);
    value = poll_load(p);
    if ((value >> kCountBits) == tag) {
      if constexpr (EPK_POLL_RELAXED != 0) value = ld_acquire_sys(p);
      return kArrived;
    }
    if ((iter & 255u) == 0) {
      if (now_ns() - start > d.timeout_ns) {
        report_error(d.rec, kTimeout, d.rank, phase, peer, value >> kCountBits, tag);
        return kExpired;
      }
      if (d.rec != nullptr && *reinterpret_cast<volatile int *>(&d.rec->claimed) != 0) return kGaveUp;
    }
  }
}

// Spin until a local counter reaches `target` (this rank's own warps; never gives up early, because the
// caller resets the counter afterwards and must not do so while puts are still counted).
EPK_DEVICE bool wait_local(const int *p, int target, const Deadline &d, int phase, int peer) {
  const uint64_t start = now_ns();
  for (unsigned iter = 0;; ++iter) {
    const int v = ld_acquire_gpu(p);
    if (v >= target) return true;
    if ((iter & 255u) == 255u && now_ns() - start > d.timeout_ns) {
      report_error(d.rec, kTimeout, d.rank, phase, peer, v, target);
      return false;
    }
  }
}

// Every peer's mask bit and route, read once per block so every send and wait site of a call sees the same
// picture. Threads below R load; the caller synchronises the block before use.
template <int R>
EPK_DEVICE void load_peers(const int *state, const unsigned long long *peers, long long ll_off, int (&mask)[R],
                           Route (&route)[R]) {
  const int p = threadIdx.x;
  if (p < R) {
    mask[p] = ld_volatile(state + kStateMask + p);
    route[p] = make_route(ld_volatile(state + kStateRoute + p), peers[p], ll_off);
  }
}

// Diagnostics (the flaky absent-rank test, docs/architecture.md "Known problems"): at its end, thread 0 of blocks 0..14
// stores (seq << 32) | the mask bits its block loaded into int64 slot `which * 15 + block` at state words 2..61 (which:
// 0 dispatch, 1 combine); tests/ll_scenarios.ll_signal_dump prints them. One store per block and call.
constexpr int kStateSeenMask = 2;
constexpr int kSeenBlocks = 15;
template <int R>
EPK_DEVICE void note_seen_mask(int *state, int which, unsigned seq, const int (&mask)[R]) {
  if (threadIdx.x != 0 || blockIdx.x >= kSeenBlocks) return;
  unsigned bits = 0;
#pragma unroll
  for (int p = 0; p < R; ++p) bits |= (mask[p] != 0 ? 1u : 0u) << p;
  reinterpret_cast<unsigned long long *>(state + kStateSeenMask)[which * kSeenBlocks + blockIdx.x] =
      (static_cast<unsigned long long>(seq) << 32) | bits;
}

// A peer that did not answer within the deadline is masked for every later call (host raises once).
EPK_DEVICE void mask_peer(int *state, int peer) { atomicExch(state + kStateMask + peer, 1); }

EPK_DEVICE int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 16-byte load that bypasses L1: data written by peers (or other SMs) during this kernel.
EPK_DEVICE int4 ld_cg(const int4 *p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
EPK_DEVICE int ld_cg(const int *p) {
  int v;
  asm volatile("ld.global.cg.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// Warp copy of `n` 16-byte vectors with kInFlight loads per lane issued before their stores. One load per lane at
// a time leaves a warp ~512 bytes in flight, far below what hides DRAM latency (on the H200 the LL receive half,
// which copied that way, moved ~66 GB/s per rank). Lane l copies vectors l, l + 32, ...
template <int kInFlight, typename Load>
EPK_DEVICE void warp_copy_v4(int4 *dst, const int4 *src, int n, int lane, Load load) {
  int i = lane;
  for (; i + 32 * (kInFlight - 1) < n; i += 32 * kInFlight) {
    int4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = load(src + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) dst[i + 32 * u] = v[u];
  }
  for (; i < n; i += 32) dst[i] = load(src + i);
}

// ---- FP8 cast (reference/fp8.py, bit-exact) ----
// 2^ceil(log2(s)) for positive float32 s, exactly: s itself when already a power of two, else the next one.
// inf / NaN stay as they are (as the reference's pow2_ceil).
EPK_DEVICE float pow2_ceil(float s) {
  const uint32_t u = __float_as_uint(s);
  if ((u & 0x007fffffu) == 0u || (u >> 23) >= 0xffu) return s;
  return __uint_as_float(((u >> 23) + 1u) << 23);
}
// Two float32 -> two e4m3 bytes (lo in the low byte), round-to-nearest-even, saturating to +-448 (inf ->
// 448, as the reference's clip; NaN stays NaN). One instruction on sm_89+.
EPK_DEVICE uint32_t cvt_e4m3x2(float lo, float hi) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

}  // namespace ll
}  // namespace epk

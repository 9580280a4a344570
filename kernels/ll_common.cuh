// Shared by the low-latency (LL) kernels: the LL device state, the LL area layout, the call counter that
// picks one of two alternating buffer sets, tagged signals and their deadline-bounded wait.
//
// LL area (num_rdma_bytes at `ll_off` in every rank's symmetric region; offsets below relative to it):
//   set p (p = call seq & 1) at p * set_stride, each set:
//     [0, 4E)                 signals: dispatch count of (local expert e, source rank s) at index e*R + s in the
//                             IPC-only builds, s*E_loc + e in NIC builds (a source's counts consecutive: an RDMA
//                             route sends them as one WRITE; ll_dispatch_common.cuh, count_word); combine flag of
//                             global expert g at index g (both int32, tagged, see below)
//     [4E, 8E)                the direct dispatch's fill counter of each local expert (int32); or, with NIC
//                             routes (never with the direct dispatch), the sender's staged signal words: the
//                             dispatch count of global expert g at 4E + 4g, the combine flag of pair
//                             (local expert e, destination s) at 4E + 4(s*E_loc + e)
//     [send_off, ...)         send region: dispatch staging (one message per source token), and the
//                             zero-copy combine buffer [E_loc, R*num_max, H] BF16 (never both in one call)
//     [recv_off, ...)         receive region: dispatch slots [E_loc][R][num_max] messages of 16 + 2H bytes,
//                             or combine slots [E][num_max] rows of 2H bytes, or the direct dispatch's
//                             outputs (recv_x, scales, src_info, layout_range, count; ll_dispatch_direct.cuh)
//   Host side: src/epkern/ll_layout.py (ll_layout) computes the offsets; they fit the size hint.
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
#include "epk_constants.cuh"
#include "ll_route.cuh"

#ifndef EPK_POLL_SLEEP_NS
#error "EPK_POLL_SLEEP_NS must be defined"
#endif

namespace epk {
namespace ll {

// The device state's words (EPK_STATE_*), the limits (EPK_LL_*), the launch phase bits (EPK_PHASE_*) and the
// error-record phases (EPK_ERR_PHASE_LL_*) are in epk_constants.cuh, shared with the Python side.
static_assert(EPK_LL_MAX_RANKS <= 32, "one lane per source rank");
static_assert(EPK_LL_MAX_RANKS <= EPK_STATE_MAX_RANKS, "the per-peer state arrays hold every rank");

constexpr int kCountBits = 11;
constexpr int kCountMask = (1 << kCountBits) - 1;
static_assert(EPK_LL_MAX_NUM_MAX <= kCountMask, "a signal's count field holds num_max");

EPK_DEVICE int tag_of(unsigned seq) { return 1 + static_cast<int>(seq % 0xFFFFFu); }
EPK_DEVICE int pack_signal(int tag, int count) { return (tag << kCountBits) | count; }

EPK_DEVICE int ld_volatile(const int *p) { return *reinterpret_cast<const volatile int *>(p); }

EPK_DEVICE unsigned call_seq(const int *state, int phase, int back) {
  const unsigned last = static_cast<unsigned>(ld_volatile(state + EPK_STATE_COUNTER));
  return (phase & EPK_PHASE_SEND) ? last + 1u : last - static_cast<unsigned>(back);
}

// End of a kernel that sent: the last block to get here publishes `seq` as the counter for the next call.
// Every block must reach this (no early return between the start and here).
EPK_DEVICE void finish_call(int *state, unsigned seq) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(state + EPK_STATE_TICKET, 1) == static_cast<int>(gridDim.x) - 1) {
      state[EPK_STATE_COUNTER] = static_cast<int>(seq);
      state[EPK_STATE_TICKET] = 0;
      __threadfence();
    }
  }
}

enum WaitResult : int { kArrived = 0, kExpired = 1, kGaveUp = 2 };

// Thousands of threads per rank poll peers' signals while the senders' copies are in flight. A poll is a relaxed
// (volatile) load; once the tag shows, one acquire load re-reads the word: the same ordering as an acquire load per
// poll, since the acquire load reads the released value (or a later one, which cannot exist within a call: the
// slot's next writer is two calls later). EPK_POLL_SLEEP_NS (EPKERN_LL_POLL_SLEEP_NS): __nanosleep between polls
// after the first 32 (0 = none).
EPK_DEVICE void poll_pause(unsigned iter) {
  if constexpr (EPK_POLL_SLEEP_NS > 0) {
    if (iter >= 32u) __nanosleep(EPK_POLL_SLEEP_NS);
  }
}

// Spin until the tagged signal at `p` carries `tag` (acquire, system scope) or the deadline passes. On
// expiry record (rank, phase, peer, value seen, expected tag) and return kExpired; kGaveUp when another
// thread of this rank recorded an error first (stop rather than wait out a second deadline).
EPK_DEVICE int wait_signal(const int *p, int tag, const Deadline &d, int phase, int peer, int &value) {
  value = ld_volatile(p);
  if ((value >> kCountBits) == tag) {
    value = ld_acquire_sys(p);
    return kArrived;
  }
  const uint64_t start = now_ns();
  for (unsigned iter = 1;; ++iter) {
    poll_pause(iter);
    value = ld_volatile(p);
    if ((value >> kCountBits) == tag) {
      value = ld_acquire_sys(p);
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
// picture. Threads below R load; the caller synchronises the block before use. `mine`: this rank's LL area,
// `area_bytes` its size (both sets): the source region of NIC puts.
template <int R>
EPK_DEVICE void load_peers(const int *state, const unsigned long long *peers, long long ll_off, char *mine,
                           long long area_bytes, int (&mask)[R], Route (&route)[R]) {
  const int p = threadIdx.x;
  if (p < R) {
    mask[p] = ld_volatile(state + EPK_STATE_MASK + p);
    route[p] = make_route(ld_volatile(state + EPK_STATE_ROUTE + p), p, peers[p], ll_off, state, mine, area_bytes);
  }
}

// A peer that did not answer within the deadline is masked for every later call (host raises once).
EPK_DEVICE void mask_peer(int *state, int peer) { atomicExch(state + EPK_STATE_MASK + peer, 1); }

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

// The LL dispatch's specialisation (constants from its defines) and the message helpers that the staged dispatch
// (ll_dispatch.cu) and the direct one (ll_dispatch_direct.cuh) share: the FP8 cast, building a message in the local
// staging slot, the send phase's warps per token, the receive phase's wait for a count and the count signal.
//
// Message (16 + 2H bytes per slot): int4 header {source token, 0, 0, 0}, then the BF16 row, or the e4m3 row
// followed by H/128 float32 scales (or H/128 UE8M0 bytes = H/512 packed int32 words).
//
// Defines: EPK_NUM_RANKS, EPK_HIDDEN (multiple of 128), EPK_TOPK (<= 32), EPK_USE_FP8, EPK_ROUND_SCALE,
// EPK_USE_UE8M0 (needs EPK_ROUND_SCALE and EPK_HIDDEN % 512 == 0), EPK_THREADS, EPK_LL_PULL (0 / 1), and
// ll_common.cuh's EPK_POLL_SLEEP_NS.
#pragma once
#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "ll_common.cuh"
#include "ll_route.cuh"

#ifndef EPK_NUM_RANKS
#error "EPK_NUM_RANKS must be defined"
#endif
#ifndef EPK_HIDDEN
#error "EPK_HIDDEN must be defined"
#endif
#ifndef EPK_TOPK
#error "EPK_TOPK must be defined"
#endif
#ifndef EPK_USE_FP8
#error "EPK_USE_FP8 must be defined"
#endif
#ifndef EPK_ROUND_SCALE
#error "EPK_ROUND_SCALE must be defined"
#endif
#ifndef EPK_USE_UE8M0
#error "EPK_USE_UE8M0 must be defined"
#endif
#ifndef EPK_THREADS
#error "EPK_THREADS must be defined"
#endif
#ifndef EPK_LL_PULL
#error "EPK_LL_PULL must be defined"
#endif

namespace epk {
namespace ll_dispatch {

constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kHidden = EPK_HIDDEN;
constexpr int kTopk = EPK_TOPK;
constexpr bool kFp8 = EPK_USE_FP8 != 0;
constexpr bool kRoundScale = EPK_ROUND_SCALE != 0;
constexpr bool kUe8m0 = EPK_USE_UE8M0 != 0;
constexpr int kThreads = EPK_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kGroups = kHidden / 128;  // FP8 scale groups per row
constexpr int kScaleBytes = kFp8 ? (kUe8m0 ? kGroups : 4 * kGroups) : 0;
constexpr int kPayloadBytes = kFp8 ? kHidden + kScaleBytes : 2 * kHidden;
constexpr int kMsgBytes = (16 + kPayloadBytes + 15) / 16 * 16;  // bytes actually sent
constexpr int kSlotBytes = 16 + 2 * kHidden;                    // slot stride (fits every message kind)
// 16-byte loads per lane before their stores in the message copies (EPKERN_LL_COPY_INFLIGHT's A/B: 3 is the kept
// value, docs/performance.md; FP8 spilled with more than 4 at 64 registers).
constexpr int kCopyInFlight = 3;
constexpr bool kPull = EPK_LL_PULL != 0;
static_assert(kHidden % 128 == 0, "hidden must be a multiple of 128");
static_assert(!kUe8m0 || (kFp8 && kRoundScale && kHidden % 512 == 0), "UE8M0 needs FP8, round_scale, H % 512");
static_assert(kTopk >= 1 && kTopk <= EPK_LL_MAX_TOPK, "top-k in 1..32");
static_assert(kRanks >= 1 && kRanks <= EPK_LL_MAX_RANKS, "LL kernels handle up to 32 ranks (one lane per source rank)");
static_assert(kMsgBytes <= kSlotBytes, "message larger than its slot");
static_assert(kThreads % 32 == 0, "whole warps");

// One 128-channel group of the FP8 message by a half-warp (hl = lane in the half): amax over the 16 lanes, the
// scale (a power of two with round_scale), the e4m3 bytes and the scale (float32, or the UE8M0 byte).
__device__ __forceinline__ void convert_group(int4 raw, int g, bool active, char *msg, int hl) {
  float f[8];
  epk::unpack_bf16x8(raw, f);
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(f[j]));
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  amax = fmaxf(amax, 1e-4f);
  float scale = __fdiv_rn(amax, 448.f);
  if constexpr (kRoundScale) scale = ll::pow2_ceil(scale);
  if (active) {
    uint32_t q[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) q[j] = ll::cvt_e4m3x2(__fdiv_rn(f[2 * j], scale), __fdiv_rn(f[2 * j + 1], scale));
    *reinterpret_cast<uint2 *>(msg + 16 + g * 128 + hl * 8) = make_uint2(q[0] | (q[1] << 16), q[2] | (q[3] << 16));
    if (hl == 0) {
      if constexpr (kUe8m0)
        reinterpret_cast<uint8_t *>(msg + 16 + kHidden)[g] = static_cast<uint8_t>(__float_as_uint(scale) >> 23);
      else
        reinterpret_cast<float *>(msg + 16 + kHidden)[g] = scale;
    }
  }
}

// Part `part` of `parts` of the message of token t into `msg` (the local staging slot), by one warp: the header
// (part 0) and a contiguous share of the row (BF16 vectors, or FP8 group pairs).
__device__ __forceinline__ void build_message(const int4 *__restrict__ xrow, int t, char *msg, int lane, int part,
                                              int parts) {
  if (lane == 0 && part == 0) *reinterpret_cast<int4 *>(msg) = make_int4(t, 0, 0, 0);
  if constexpr (!kFp8) {
    constexpr int n = kHidden / 8;
    const int lo = n * part / parts, hi = n * (part + 1) / parts;
    ll::warp_copy_v4<kCopyInFlight>(reinterpret_cast<int4 *>(msg + 16) + lo, xrow + lo, hi - lo, lane,
                                    [](const int4 *p) { return epk::ld_nc_v4(p); });
  } else {
    // Half-warp per 128-channel group: lane holds 8 channels (one int4 of BF16); amax over 16 lanes. The loads of
    // kGroupsInFlight groups are issued before any is converted: one load at a time left the send phase a chain
    // of 28 DRAM round trips per token at H 7168 (90 us for the FP8 send phase on 8 ranks of an H200).
    constexpr int kPairs = (kGroups + 1) / 2;  // iterations of the two half-warps
    constexpr int kGroupsInFlight = 4;
    const int half = lane >> 4, hl = lane & 15;
    const int lo = kPairs * part / parts, hi = kPairs * (part + 1) / parts;
    for (int c0 = lo; c0 < hi; c0 += kGroupsInFlight) {
      int4 raw[kGroupsInFlight];
#pragma unroll
      for (int u = 0; u < kGroupsInFlight; ++u) {
        const int g = 2 * (c0 + u) + half;
        raw[u] = c0 + u < hi && g < kGroups ? epk::ld_nc_v4(xrow + g * 16 + hl) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kGroupsInFlight; ++u) {
        if (c0 + u >= hi) break;  // warp-uniform: both half-warps run the same iterations
        const int g = 2 * (c0 + u) + half;
        const bool active = g < kGroups;
        convert_group(raw[u], g, active, msg, hl);
      }
    }
  }
}

// Warps per token in the send phase: 1 pushed (each warp's put reads its whole message); pulled, up to 4 when
// warps outnumber tokens (128 tokens left half of a rank's 256 warps idle).
__device__ __forceinline__ int send_parts(int num_tokens, int num_warps) {
  if constexpr (!kPull) return 1;
  return num_tokens > 0 ? max(1, min(4, num_warps / num_tokens)) : 1;
}

// Word of the dispatch count of (source s, local expert e) in a set's signals (ll_common.cuh): by expert in the
// IPC-only builds (e * R + s: the receiving lanes, one per source, read neighbouring words), by source in NIC builds
// (s * e_loc + e: a source's counts for one owner are consecutive, which an RDMA route sends as one WRITE). Every
// rank of a Buffer runs the same build (the route table is identical and symmetric).
__device__ __forceinline__ int count_word(int s, int e, int e_loc) {
  return kNicRoutes ? s * e_loc + e : e * kRanks + s;
}

// Lane l < R of an unmasked source l waits for l's count of local expert e (the call's tag, at count_word(l, e));
// returns the count, 0 for other lanes, masked sources and a source that stays silent past the deadline (masked
// from then on). `waited`: the lane's wait in ns (0 where it did not wait).
__device__ __forceinline__ int wait_count(const int *sig, int e, int e_loc, int tag, const Deadline &deadline,
                                          int *state, const int *s_mask, int num_max, int lane,
                                          unsigned long long &waited, bool &arrived) {
  arrived = false;
  if (lane >= kRanks || s_mask[lane]) return 0;
  const uint64_t t0 = now_ns();
  int v = 0;
  const int got =
      ll::wait_signal(sig + count_word(lane, e, e_loc), tag, deadline, EPK_ERR_PHASE_LL_DISPATCH_RECV, lane, v);
  waited = now_ns() - t0;
  arrived = got == ll::kArrived;
  if (arrived) return min(v & ll::kCountMask, num_max);
  if (got == ll::kExpired) ll::mask_peer(state, lane);
  return 0;
}

// Lane 0 of expert g's count warp (owner d, local expert e there): once this rank's `done` puts for g are counted,
// the tagged count `cnt` to the owner, at count_word(rank, e) of its signals (route_signal; a NIC route stages
// the word at 4E + 4g of this rank's set, ll_common.cuh: PROXY pushes it after the data warps' triggers, which were
// pushed before they were counted; RDMA sends the owner's e_loc counts as one WRITE once all are staged).
__device__ __forceinline__ void signal_count(int g, int d, int e, int rank, int tag, int cnt, int done, int num_max,
                                             int num_experts, long long set_base, const int *done_ctr,
                                             const Route &route, ErrorRecord *err, const Deadline &deadline) {
  ll::wait_local(done_ctr + g, done, deadline, EPK_ERR_PHASE_LL_LOCAL_SENDS, d);
  const int e_loc = num_experts / kRanks;
  const long long off = set_base + 4LL * count_word(rank, e, e_loc);
  const long long stage = set_base + 4LL * (num_experts + g);
  const SignalBatch batch{e, e_loc, static_cast<unsigned>(tag)};
  if (!route_signal(route, off, ll::pack_signal(tag, min(cnt, num_max)), stage, batch, deadline))
    report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, d, route.kind, 0);
}

}  // namespace ll_dispatch
}  // namespace epk

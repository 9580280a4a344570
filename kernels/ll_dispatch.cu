// LL dispatch (semantics.md "Low-latency dispatch"): every (token, k) selection of expert g sends the token's
// message to g's owner d, into slot i of block (local expert, this rank) of d's receive region; once all
// selections of g are out, one tagged count tells d how many. The receiver waits for the R counts of each
// local expert, packs the blocks by source rank ascending (begin = counts of lower ranks: deterministic
// block order; rows within a block follow the sender's slot order) into recv_x / scales / src_info and
// writes layout_range and recv_count.
//
// Message (16 + 2H bytes per slot): int4 header {source token, 0, 0, 0}, then the BF16 row, or the e4m3 row
// followed by H/128 float32 scales (or H/128 UE8M0 bytes = H/512 packed int32 words).
//
// phase: 1 = send only, 2 = receive only (the recv hook), 3 = both. Warps: the send phase walks tokens
// (warp per token: build the message once in the local staging slot, then one put per selection) and
// then experts (warp per expert: count, wait for its own puts, signal); the receive phase takes one local
// expert per block at a time (R waiting lanes, then every warp of the block unpacks its rows). The receive
// that gave each (expert, source) pair its own warps, each waiting for all R counts (R^2 waiters per expert),
// was 13x slower on 8 ranks sharing an H200 (docs/performance.md) and is gone.
//
// Pulled variant (EPK_LL_PULL, EPKERN_LL_DISPATCH_PULL=1): the send phase only stages each message once and
// lists, per expert, the tokens in slot order (int32 [E][num_max] at the start of this rank's receive region,
// which the pulled dispatch does not otherwise use); the count signal is the same. The receiver reads each
// row straight from the sender's staging slot (through the peer's route) into recv_x: one remote read per row
// instead of a put into a receive slot and a read back (18 row transfers per token against 27, floor 9).
// The staging and the list stay untouched until every rank has run this call's receive: their set is next
// written two calls later, as for the receive slots.
//
// Defines: EPK_NUM_RANKS, EPK_HIDDEN (multiple of 128), EPK_TOPK (<= 32), EPK_USE_FP8, EPK_ROUND_SCALE,
// EPK_USE_UE8M0 (needs EPK_ROUND_SCALE and EPK_HIDDEN % 512 == 0), EPK_THREADS, EPK_LL_PULL (0 / 1),
// EPK_LL_COPY_INFLIGHT (1..8), EPK_LL_DIAG (0 / 1), EPK_LL_DIRECT (0 / 1: ll_dispatch_direct.cuh).
#include "ll_common.cuh"

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
#ifndef EPK_LL_COPY_INFLIGHT
#define EPK_LL_COPY_INFLIGHT 3
#endif
// EPKERN_LL_COPY_INFLIGHT: 16-byte loads per lane before their stores (FP8: at most 4, more spill at 64 registers).
constexpr int kCopyInFlight = kFp8 && EPK_LL_COPY_INFLIGHT > 4 ? 4 : EPK_LL_COPY_INFLIGHT;
static_assert(kCopyInFlight >= 1 && kCopyInFlight <= 8, "copy loads in flight in 1..8");
#ifndef EPK_LL_PULL
#define EPK_LL_PULL 1
#endif
constexpr bool kPull = EPK_LL_PULL != 0;
#ifndef EPK_LL_DIRECT
#define EPK_LL_DIRECT 0
#endif
constexpr bool kDirect = EPK_LL_DIRECT != 0;  // zero_copy_recv: rows written once into the owners' outputs
#ifndef EPK_LL_DIAG
#define EPK_LL_DIAG 0
#endif
constexpr bool kDiag = EPK_LL_DIAG != 0;  // EPKERN_LL_DIAG: the absent-rank diagnostics (docs/architecture.md)
static_assert(kHidden % 128 == 0, "hidden must be a multiple of 128");
static_assert(!kUe8m0 || (kFp8 && kRoundScale && kHidden % 512 == 0), "UE8M0 needs FP8, round_scale, H % 512");
static_assert(kTopk >= 1 && kTopk <= 32, "top-k in 1..32");
static_assert(kRanks >= 1 && kRanks <= 32, "LL kernels handle up to 32 ranks (one lane per source rank)");
static_assert(kMsgBytes <= kSlotBytes, "message larger than its slot");
static_assert(kThreads % 32 == 0, "whole warps");

using namespace epk;

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

// Lane l < R of an unmasked source l waits for l's count of local expert e (the call's tag); returns the count,
// 0 for other lanes, masked sources and a source that stays silent past the deadline (masked from then on).
// `waited`: the lane's wait in ns (0 where it did not wait).
__device__ __forceinline__ int wait_count(const int *sig, int e, int tag, const Deadline &deadline, int *state,
                                          const int *s_mask, int num_max, int lane, unsigned long long &waited,
                                          bool &arrived) {
  arrived = false;
  if (lane >= kRanks || s_mask[lane]) return 0;
  const uint64_t t0 = now_ns();
  int v = 0;
  const int got = ll::wait_signal(sig + e * kRanks + lane, tag, deadline, ll::kPhaseDispatchRecv, lane, v);
  waited = now_ns() - t0;
  arrived = got == ll::kArrived;
  if (arrived) return min(v & ll::kCountMask, num_max);
  if (got == ll::kExpired) ll::mask_peer(state, lane);
  return 0;
}

// Received message `msg` into output row `row` (of `rows` per local expert) of local expert e, by one warp:
// source token into src_info, the BF16 row or the e4m3 row and its scales (column-major [E_loc][S][rows]).
__device__ __forceinline__ void unpack_message(const char *msg, long long row, int e, int rows, uint8_t *out_x,
                                               void *out_scales, int *out_src, int lane) {
  if (lane == 0) out_src[row] = ll::ld_cg(reinterpret_cast<const int *>(msg));
  const int4 *src = reinterpret_cast<const int4 *>(msg + 16);
  const auto load = [](const int4 *p) { return ll::ld_cg(p); };
  if constexpr (!kFp8) {
    ll::warp_copy_v4<kCopyInFlight>(reinterpret_cast<int4 *>(out_x) + row * (kHidden / 8), src, kHidden / 8, lane,
                                    load);
  } else {
    ll::warp_copy_v4<kCopyInFlight>(reinterpret_cast<int4 *>(out_x) + row * (kHidden / 16), src, kHidden / 16, lane,
                                    load);
    // Scales are stored column-major, [E_loc][S][rows] (DeepEP's transposed view).
    constexpr int kWords = kUe8m0 ? kGroups / 4 : kGroups;
    const int *sc = reinterpret_cast<const int *>(msg + 16 + kHidden);
    int *out_sc = reinterpret_cast<int *>(out_scales);
    const long long col = row - static_cast<long long>(e) * rows;
    for (int j = lane; j < kWords; j += 32)
      out_sc[(static_cast<long long>(e) * kWords + j) * rows + col] = ll::ld_cg(sc + j);
  }
}

// Lane 0 of expert g's count warp (owner d, local expert e there): once this rank's `done` puts for g are counted,
// the tagged count `cnt` to the owner (route_signal), and the diagnostics words (ll_signal_dump; with EPK_LL_DIAG
// also the signal's address and the word read back right after the store).
__device__ __forceinline__ void signal_count(int *state, int g, int d, int e, int rank, unsigned seq, int tag, int cnt,
                                             int done, int num_max, long long set_base, const int *done_ctr,
                                             const Route &route, ErrorRecord *err, const Deadline &deadline) {
  state[ll::kStateSent + g] = -static_cast<int>(seq);
  ll::wait_local(done_ctr + g, done, deadline, ll::kPhaseLocalSends, d);
  const long long off = set_base + 4LL * (e * kRanks + rank);
  if (!route_signal(route, off, ll::pack_signal(tag, min(cnt, num_max))))
    report_error(err, kUnsupportedRoute, rank, ll::kPhaseRoute, d, route.kind, 0);
  state[ll::kStateSent + g] = static_cast<int>(seq);
  if constexpr (kDiag) {  // the same thread reads back what it stored (its value, or a later one)
    if (route.kind == kRouteIpc) {
      const int *word = reinterpret_cast<const int *>(route.base + off);
      state[ll::kStateReadback + g] = ld_acquire_sys(word);
      reinterpret_cast<unsigned long long *>(state + ll::kStateSentAddr)[g] =
          reinterpret_cast<unsigned long long>(word);
    }
  }
}

#include "ll_dispatch_direct.cuh"

// Two blocks per SM (at most 64 registers at 512 threads): the spin-waiting LL kernels of every rank sharing
// a GPU, a dispatch and a combine each, must be resident at once.
extern "C" __global__ void __launch_bounds__(kThreads, 2)
    epk_ll_dispatch(int dry_run, int rank, int phase, int back, const int4 *__restrict__ x, int num_tokens,
                    const int64_t *__restrict__ topk_idx, int num_experts, int num_max,
                    const unsigned long long *__restrict__ peers, long long ll_off, long long set_stride,
                    long long send_off, long long recv_off, int *state, uint8_t *out_x, void *out_scales, int *out_src,
                    long long *out_layout, int *out_count, int *recv_stats, long long *wait_stats, ErrorRecord *err,
                    unsigned long long timeout_ns) {
  if (dry_run) return;  // first use: makes the driver load this kernel before any peer spins
  const int tid = threadIdx.x, lane = tid & 31;
  const int gw = blockIdx.x * kWarps + tid / 32, num_warps = gridDim.x * kWarps;
  const int e_loc = num_experts / kRanks;
  const unsigned seq = ll::call_seq(state, phase, back);
  const int tag = ll::tag_of(seq);
  const long long set_base = static_cast<long long>(seq & 1u) * set_stride;
  char *const mine = reinterpret_cast<char *>(peers[rank] + ll_off);
  const Deadline deadline{err, rank, timeout_ns};

  // Mask and routes, read once per block: every send and wait site of this call sees the same picture.
  __shared__ int s_mask[kRanks];
  __shared__ Route s_route[kRanks];
  ll::load_peers(state, peers, ll_off, s_mask, s_route);
  __syncthreads();

  if constexpr (kDirect) {
    if (phase & ll::kSend)
      direct::send(rank, seq, tag, set_base, x, num_tokens, topk_idx, num_experts, num_max, send_off, recv_off, state,
                   s_mask, s_route, mine, err, deadline, lane, gw, num_warps);
    if (phase & ll::kRecv)
      direct::recv(seq, tag, set_base, num_experts, s_mask, mine, state, out_layout, out_count, recv_stats, wait_stats,
                   deadline, num_max, lane);
  } else {
    if (phase & ll::kSend) {
      char *const staging = mine + set_base + send_off;
      int *const token_list = reinterpret_cast<int *>(mine + set_base + recv_off);  // pulled: [E][num_max]
      int *const slot_ctr = state + ll::kStateSlot;
      int *const done_ctr = state + ll::kStateDone;
      // 1. Warp per token: message once, then one put to all its selections' owners' slots. Pulled, idle warps
      // share the tokens' rows: `parts` warps per token (each counts every selection as done once its share is
      // written; part 0 claims the slots), so the expert's count warp waits for cnt * parts.
      const int parts = send_parts(num_tokens, num_warps);
      for (int item = gw; item < num_tokens * parts; item += num_warps) {
        const int t = item / parts, part = item - t * parts;
        char *msg = staging + static_cast<long long>(t) * kSlotBytes;
        build_message(x + static_cast<long long>(t) * (kHidden / 8), t, msg, lane, part, parts);
        __syncwarp();  // the whole message is written (and visible to every lane) before any put reads it
        // Lane k < kTopk takes selection k: checks it, claims its slot in the owner's block, and is destination k
        // of one put that reads the message once for all selections.
        const long long g = lane < kTopk ? topk_idx[static_cast<long long>(t) * kTopk + lane] : -1;
        bool active = false;
        int d = 0;
        long long off = 0;
        if (g < -1 || g >= num_experts) {
          report_error(err, kBadIndex, rank, ll::kPhaseBadIndex, -1, static_cast<int>(g), num_experts);
        } else if (g >= 0) {
          d = static_cast<int>(g) / e_loc;
          const int e = static_cast<int>(g) % e_loc;
          if (!s_mask[d] && part == 0) {
            const int slot = atomicAdd(slot_ctr + g, 1);
            if (slot < num_max) {
              active = true;
              if constexpr (kPull)
                off = static_cast<long long>(slot) << 32;  // only the slot is needed (the list entry)
              else
                off = set_base + recv_off + (static_cast<long long>(e * kRanks + rank) * num_max + slot) * kSlotBytes;
            } else {
              report_error(err, kOverflow, rank, ll::kPhaseOverflow, d, slot, num_max);
            }
          }
        }
        const bool counted = g >= 0 && g < num_experts && !s_mask[d];  // counted by its expert's count warp
        if constexpr (kPull) {
          // The owner reads the staged message itself; the list tells it which (slot order).
          if (active) token_list[g * num_max + (off >> 32)] = t;
        } else {
          const unsigned unsupported = route_put_warp_lanes<kTopk>(s_route[d], off, active, msg, kMsgBytes, lane);
          if (unsupported >> lane & 1u)
            report_error(err, kUnsupportedRoute, rank, ll::kPhaseRoute, d, s_route[d].kind, 0);
        }
        __syncwarp();
        // Release (GPU scope) after the warp's stores; the expert's count warp acquires it.
        if (counted) atomic_add_acq_rel_gpu(reinterpret_cast<unsigned *>(done_ctr + g), 1u);
      }
      // 2. Warp per expert: count its selections, wait until all are out, signal the owner, reset counters.
      for (int g = gw; g < num_experts; g += num_warps) {
        const int d = g / e_loc, e = g % e_loc;
        if (s_mask[d]) continue;
        int cnt = 0;
        for (int i = lane; i < num_tokens * kTopk; i += 32) cnt += topk_idx[i] == g;
        cnt = ll::warp_sum(cnt);
        if (lane == 0) {
          signal_count(state, g, d, e, rank, seq, tag, cnt, cnt * parts, num_max, set_base, done_ctr, s_route[d], err,
                       deadline);
          slot_ctr[g] = 0;  // every put of this call took its slot before it was counted done
          done_ctr[g] = 0;
        }
        // Reconverge before anything else: without this, lanes 1..31 ran ahead into the receive phase and spun
        // on peers' counts while lane 0 still waited here, and a warp whose spinning lanes are scheduled ahead
        // of lane 0 holds back the count every peer waits for (suspected cause of the fused dispatch's 4.4 ms
        // against 0.35 ms for its two halves, and of a count that never arrived; not yet measured).
        __syncwarp();
      }
    }

    if (phase & ll::kRecv) {
      // One block per local expert at a time: warp 0's lanes l < R wait for source l's count (R waiters per expert),
      // then every warp of the block unpacks the expert's rows, flattened over the sources in rank order.
      __shared__ int s_begin[kRanks + 1];
      const int rows = kRanks * num_max;
      const char *const recv = mine + set_base + recv_off;
      const int *const sig = reinterpret_cast<const int *>(mine + set_base);
      const int warp = tid / 32;
      for (int e = blockIdx.x; e < e_loc; e += gridDim.x) {
        if (warp == 0) {
          unsigned long long waited = 0;
          bool arrived = false;
          const int cnt = wait_count(sig, e, tag, deadline, state, s_mask, num_max, lane, waited, arrived);
          if (wait_stats != nullptr && lane < kRanks)
            atomicAdd(reinterpret_cast<unsigned long long *>(wait_stats) + lane, waited);
          __syncwarp();    // the acquiring lanes' view of the messages is every lane's view from here
          int incl = cnt;  // inclusive prefix over lanes (sources) of the counts
#pragma unroll
          for (int o = 1; o < 32; o <<= 1) {
            const int up = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += up;
          }
          if (lane < kRanks) {
            s_begin[lane + 1] = incl;
            out_layout[e * kRanks + lane] = (static_cast<long long>(incl - cnt) << 32) | static_cast<unsigned>(cnt);
          }
          if (lane == 0) s_begin[0] = 0;
          if (lane == kRanks - 1) {
            out_count[e] = incl;
            if (recv_stats != nullptr) atomicAdd(recv_stats + e, incl);
          }
        }
        __syncthreads();
        __threadfence();  // warp 0's acquires order every warp's reads of the messages below (as in combine)
        const int total = s_begin[kRanks];
        for (int j = warp; j < total; j += kWarps) {
          int s = 0;
          while (s_begin[s + 1] <= j) ++s;  // the source whose rows hold j (at most R steps)
          const int i = j - s_begin[s];
          const char *msg;
          if constexpr (kPull) {
            // Source s listed its tokens for expert (rank, e) in slot order; the row is its staged message.
            const char *peer = route_peer_ptr(s_route[s], set_base);
            if (peer == nullptr) {
              if (lane == 0) report_error(err, kUnsupportedRoute, rank, ll::kPhaseRoute, s, s_route[s].kind, 0);
              continue;
            }
            const int *list = reinterpret_cast<const int *>(peer + recv_off);
            int t = lane == 0 ? ll::ld_cg(list + (static_cast<long long>(rank) * e_loc + e) * num_max + i) : 0;
            t = __shfl_sync(0xffffffffu, t, 0);
            if (t < 0 || t >= num_max) {  // cannot happen unless the list is corrupt: refuse rather than fault
              if (lane == 0) report_error(err, kBadIndex, rank, ll::kPhaseBadIndex, s, t, num_max);
              continue;
            }
            msg = peer + send_off + static_cast<long long>(t) * kSlotBytes;
          } else {
            msg = recv + (static_cast<long long>(e * kRanks + s) * num_max + i) * kSlotBytes;
          }
          unpack_message(msg, static_cast<long long>(e) * rows + j, e, rows, out_x, out_scales, out_src, lane);
        }
        __syncthreads();  // s_begin is the next expert's
      }
    }

  }  // !kDirect

  ll::note_seen_mask(state, 0, seq, s_mask);  // at the end: no registers held across the call
  if (phase & ll::kSend) ll::finish_call(state, seq);
}

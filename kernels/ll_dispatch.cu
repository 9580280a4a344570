// LL dispatch (semantics.md "Low-latency dispatch"): every (token, k) selection of expert g sends the token's
// message to g's owner d, into slot i of block (local expert, this rank) of d's receive region; once all
// selections of g are out, one tagged count tells d how many. The receiver waits for the R counts of each
// local expert, packs the blocks by source rank ascending (begin = counts of lower ranks: deterministic
// block order; rows within a block follow the sender's slot order) into recv_x / scales / src_info and
// writes layout_range and recv_count.
//
// Message (ll_dispatch_common.cuh): int4 header {source token, 0, 0, 0}, then the row (BF16, or e4m3 and scales).
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
// EPK_LL_DIRECT (0 / 1: ll_dispatch_direct.cuh), EPK_POLL_SLEEP_NS (ll_common.cuh), EPK_LL_NIC (0 or a NIC
// route kind: ll_route.cuh). No other define is read.
#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "ll_common.cuh"
#include "ll_dispatch_common.cuh"
#include "ll_dispatch_direct.cuh"
#include "ll_route.cuh"

#ifndef EPK_LL_DIRECT
#error "EPK_LL_DIRECT must be defined"
#endif

using namespace epk;
using namespace epk::ll_dispatch;

constexpr bool kDirect = EPK_LL_DIRECT != 0;  // zero_copy_recv: rows written once into the owners' outputs

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
  ll::load_peers(state, peers, ll_off, mine, 2 * set_stride, s_mask, s_route);
  __syncthreads();

  if constexpr (kDirect) {
    if (phase & EPK_PHASE_SEND)
      direct::send(rank, seq, tag, set_base, x, num_tokens, topk_idx, num_experts, num_max, send_off, recv_off, state,
                   s_mask, s_route, mine, err, deadline, lane, gw, num_warps);
    if (phase & EPK_PHASE_RECV)
      direct::recv(seq, tag, set_base, num_experts, s_mask, mine, state, out_layout, out_count, recv_stats, wait_stats,
                   deadline, num_max, lane);
  } else {
    if (phase & EPK_PHASE_SEND) {
      char *const staging = mine + set_base + send_off;
      int *const token_list = reinterpret_cast<int *>(mine + set_base + recv_off);  // pulled: [E][num_max]
      int *const slot_ctr = state + EPK_STATE_SLOT;
      int *const done_ctr = state + EPK_STATE_DONE;
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
          report_error(err, kBadIndex, rank, EPK_ERR_PHASE_LL_BAD_INDEX, -1, static_cast<int>(g), num_experts);
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
              report_error(err, kOverflow, rank, EPK_ERR_PHASE_LL_OVERFLOW, d, slot, num_max);
            }
          }
        }
        const bool counted = g >= 0 && g < num_experts && !s_mask[d];  // counted by its expert's count warp
        if constexpr (kPull) {
          // The owner reads the staged message itself; the list tells it which (slot order).
          if (active) token_list[g * num_max + (off >> 32)] = t;
        } else {
          const unsigned unsupported =
              route_put_warp_lanes<kTopk>(s_route[d], off, active, msg, kMsgBytes, lane, deadline);
          if (unsupported >> lane & 1u)
            report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, d, s_route[d].kind, 0);
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
          signal_count(g, d, e, rank, tag, cnt, cnt * parts, num_max, num_experts, set_base, done_ctr, s_route[d], err,
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

    if (phase & EPK_PHASE_RECV) {
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
          const int cnt = wait_count(sig, e, e_loc, tag, deadline, state, s_mask, num_max, lane, waited, arrived);
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
              if (lane == 0) report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, s, s_route[s].kind, 0);
              continue;
            }
            const int *list = reinterpret_cast<const int *>(peer + recv_off);
            int t = lane == 0 ? ll::ld_cg(list + (static_cast<long long>(rank) * e_loc + e) * num_max + i) : 0;
            t = __shfl_sync(0xffffffffu, t, 0);
            if (t < 0 || t >= num_max) {  // cannot happen unless the list is corrupt: refuse rather than fault
              if (lane == 0) report_error(err, kBadIndex, rank, EPK_ERR_PHASE_LL_BAD_INDEX, s, t, num_max);
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

  if (phase & EPK_PHASE_SEND) ll::finish_call(state, seq);
}

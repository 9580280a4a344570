// The direct LL dispatch (EPK_LL_DIRECT, `zero_copy_recv=True`): every row is written once, by its sender,
// straight into its final place in the owner's outputs, which live in the owner's LL area (the receive region of
// the call's set; offsets in direct_offsets below, mirrored by src/epkern/ll_layout.direct_recv_layout). 9 row
// transfers per BF16 token (read x once, write each of its selections), the floor's count; the staged dispatches
// move 18 (pulled) or 27 (pushed).
//
// Send phase, three loops over the rank's warps:
//   A. warp per expert g: scan topk_idx in order (ballots) giving each selection of g its slot (token order)
//      and the count n; lane 0 reserves n rows of g's owner on the owner's tagged fill word of g (route_reserve;
//      begin = the rows taken before: blocks follow arrival order, as semantics.md allows), writes the block's
//      layout_range entry (begin << 32 | n) at the owner, and publishes begin to this rank's warps (tag = seq).
//   B. warp per (token, part) as in the pulled dispatch: lanes k < K take selection k, wait for their expert's
//      begin, and one put sends the token's row share to every selection's row (BF16 straight from x; FP8
//      from the local staging slot the warp just built, plus the share's scales); part 0 stores src_info.
//   C. warp per expert: once all its puts are done, the tagged count signal (release) as in the other modes.
// Receive phase: per local expert, lanes s < R wait for source s's count; the count of rows is their sum (the
// fill word's final count); layout_range entries of masked or silent sources are written (0) here, and the fill
// word is cleared (compare-and-swap: only if no later call reserved there yet). Nothing is copied.
//
// Uses the dispatch's specialisation and message helpers (ll_dispatch_common.cuh); the kernel is ll_dispatch.cu.
#pragma once
#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "ll_common.cuh"
#include "ll_dispatch_common.cuh"
#include "ll_route.cuh"

namespace epk {
namespace ll_dispatch {
namespace direct {

// Bytes from the start of the set's receive region (ll_layout.direct_recv_layout) of what senders write; the
// receiver writes recv_count through its own output pointer.
struct Offsets {
  long long x, scales, src, layout;
};

__device__ __forceinline__ long long align16(long long n) { return (n + 15) / 16 * 16; }

__device__ __forceinline__ Offsets direct_offsets(int e_loc, int rows) {
  Offsets o;
  o.x = 0;
  o.scales = align16(static_cast<long long>(e_loc) * rows * kHidden);
  o.src = align16(static_cast<long long>(e_loc) * rows * 2 * kHidden);  // past every combine's slots (ll_layout.py)
  o.layout = align16(o.src + static_cast<long long>(e_loc) * rows * 4);
  return o;
}

// The tag of a call's fill words (route_reserve): 1..0xFFFF, never 0 (a cleared word is empty to every call).
__device__ __forceinline__ unsigned fill_tag(unsigned seq) { return 1u + seq % 0xFFFFu; }

// Wait (this rank's own warps) until expert g's begin is published for this call; returns it, or -1 on expiry.
__device__ __forceinline__ int wait_begin(const int *state, int g, unsigned seq, const Deadline &deadline, int d) {
  const int *tag = state + EPK_STATE_BEGIN_TAG + g;
  const uint64_t start = now_ns();
  for (unsigned iter = 0;; ++iter) {
    if (ld_acquire_gpu(tag) == static_cast<int>(seq)) return ld_acquire_gpu(state + EPK_STATE_BEGIN + g);
    if ((iter & 255u) == 255u && now_ns() - start > deadline.timeout_ns) {
      report_error(deadline.rec, kTimeout, deadline.rank, EPK_ERR_PHASE_LL_LOCAL_SENDS, d, -1, static_cast<int>(seq));
      return -1;
    }
  }
}

__device__ void send(int rank, unsigned seq, int tag, long long set_base, const int4 *__restrict__ x, int num_tokens,
                     const int64_t *__restrict__ topk_idx, int num_experts, int num_max, long long send_off,
                     long long recv_off, int *state, const int *s_mask, const Route *s_route, char *mine,
                     ErrorRecord *err, const Deadline &deadline, int lane, int gw, int num_warps) {
  const int e_loc = num_experts / kRanks, rows = kRanks * num_max;
  const long long out_base = set_base + recv_off;            // the owners' outputs, in their LL areas
  const long long fill_base = set_base + 4LL * num_experts;  // the owners' fill counters
  int *const slot_of = state + EPK_STATE_SLOT_OF;
  int *const cnt_of = state + EPK_STATE_SLOT;  // the expert's count of valid selections (the other modes' slots)
  int *const done_ctr = state + EPK_STATE_DONE;
  const int n_sel = num_tokens * kTopk;

  // A. Slots, counts and block reservations, warp per expert. topk_idx is staged in shared memory once per block
  // (valid entries; -2 for a bad one): the scan reads 32 entries per ballot, and a global load per step made it a
  // chain of L2 round trips before any row could move. Calls with more selections read it in place.
  constexpr int kStagedSelections = 4096;
  __shared__ int s_idx[kStagedSelections];
  const bool staged = n_sel <= kStagedSelections;  // uniform over the block
  if (staged) {
    for (int i = threadIdx.x; i < n_sel; i += blockDim.x) {
      const long long v = topk_idx[i];
      s_idx[i] = v >= -1 && v < num_experts ? static_cast<int>(v) : -2;
    }
    __syncthreads();
  }
  for (int g = gw; g < num_experts; g += num_warps) {
    const int d = g / e_loc, e = g % e_loc;
    int base = 0;
    for (int i0 = 0; i0 < n_sel; i0 += 32) {
      const int i = i0 + lane;
      const bool m = i < n_sel && (staged ? s_idx[i] == g : topk_idx[i] == g);
      const unsigned b = __ballot_sync(0xffffffffu, m);
      if (m) slot_of[i] = base + __popc(b & ((1u << lane) - 1u));
      base += __popc(b);
    }
    if (lane == 0 && !s_mask[d]) {
      const int n = min(base, num_max);
      if (base > num_max) report_error(err, kOverflow, rank, EPK_ERR_PHASE_LL_OVERFLOW, d, base, num_max);
      int begin = n > 0 ? route_reserve(s_route[d], fill_base + 4LL * e, fill_tag(seq), n) : 0;
      if (begin < 0 || begin + n > rows) {  // no route, or a fill counter not reset: refuse rather than overrun
        report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, d, s_route[d].kind, begin);
        begin = -1;
      } else {
        const long long entry = (static_cast<long long>(begin) << 32) | static_cast<unsigned>(n);
        route_store_dword(s_route[d], out_base + direct_offsets(e_loc, rows).layout + 8LL * (e * kRanks + rank), entry);
      }
      cnt_of[g] = base;
      state[EPK_STATE_BEGIN + g] = begin;
    }
    __syncwarp();  // every lane's slot_of stores come before lane 0's release below
    if (lane == 0 && !s_mask[d]) {
      __threadfence();
      st_release_gpu(state + EPK_STATE_BEGIN_TAG + g, static_cast<int>(seq));
    }
  }

  // B. Rows, warp per (token, part): one put per share to every selection's final row.
  const int parts = send_parts(num_tokens, num_warps);
  char *const staging = mine + set_base + send_off;
  for (int item = gw; item < num_tokens * parts; item += num_warps) {
    const int t = item / parts, part = item - t * parts;
    const int4 *xrow = x + static_cast<long long>(t) * (kHidden / 8);
    if constexpr (kFp8) {  // first, so that nothing below is live across the cast (64 registers)
      build_message(xrow, t, staging + static_cast<long long>(t) * kSlotBytes, lane, part, parts);
      __syncwarp();  // the share (e4m3 bytes and its scales) is written and visible to every lane
    }
    const long long g = lane < kTopk ? topk_idx[static_cast<long long>(t) * kTopk + lane] : -1;
    const bool valid = g >= 0 && g < num_experts;
    if (g < -1 || g >= num_experts)
      report_error(err, kBadIndex, rank, EPK_ERR_PHASE_LL_BAD_INDEX, -1, static_cast<int>(g), num_experts);
    const int d = valid ? static_cast<int>(g) / e_loc : 0, e = valid ? static_cast<int>(g) % e_loc : 0;
    const bool counted = valid && !s_mask[d];
    bool active = false;
    long long row = 0;
    if (counted) {
      const int begin = wait_begin(state, static_cast<int>(g), seq, deadline, d);
      const int slot = slot_of[t * kTopk + lane];  // after the acquire that publishes it (phase A's expert warp)
      active = begin >= 0 && slot < num_max;
      row = static_cast<long long>(e) * rows + begin + slot;
    }
    const Offsets o = direct_offsets(e_loc, rows);  // here: live across the FP8 cast they spilled registers
    if constexpr (!kFp8) {
      constexpr int n = kHidden / 8;
      const int lo = n * part / parts, hi = n * (part + 1) / parts;
      const long long off = out_base + o.x + row * (2 * kHidden) + 16LL * lo;
      const unsigned unsupported = route_put_warp_lanes<kTopk, kCopyInFlight>(s_route[d], off, active, xrow + lo,
                                                                              16 * (hi - lo), lane, deadline);
      if (unsupported >> lane & 1u)
        report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, d, s_route[d].kind, 0);
    } else {
      const char *msg = staging + static_cast<long long>(t) * kSlotBytes;
      constexpr int kPairs = (kGroups + 1) / 2;
      const int glo = 2 * (kPairs * part / parts), ghi = min(kGroups, 2 * (kPairs * (part + 1) / parts));
      const long long off = out_base + o.x + row * kHidden + 128LL * glo;
      const unsigned unsupported = route_put_warp_lanes<kTopk, 2>(s_route[d], off, active, msg + 16 + 128 * glo,
                                                                  128 * (ghi - glo), lane, deadline);
      if (unsupported >> lane & 1u)
        report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, d, s_route[d].kind, 0);
      // The share's scales, column-major [E_loc][S][rows]: each destination lane stores its row's (few, small;
      // a warp-wide loop over destinations spilled registers).
      if (active) {
        const long long col = row - static_cast<long long>(e) * rows;
        const char *sc = msg + 16 + kHidden;
        if constexpr (kUe8m0) {
          for (int j = glo; j < ghi; ++j)
            route_store_byte(
                s_route[d],
                out_base + o.scales + 4 * ((static_cast<long long>(e) * (kGroups / 4) + j / 4) * rows + col) + (j & 3),
                reinterpret_cast<const unsigned char *>(sc)[j]);
        } else {
          long long at = out_base + o.scales + 4 * ((static_cast<long long>(e) * kGroups + glo) * rows + col);
          for (int j = glo; j < ghi; ++j, at += 4LL * rows)
            route_store_word(s_route[d], at, reinterpret_cast<const int *>(sc)[j]);
        }
      }
    }
    if (active && part == 0) route_store_word(s_route[d], out_base + o.src + 4 * row, t);
    __syncwarp();
    // Release (GPU scope) after the warp's stores; the expert's count warp acquires it.
    if (counted) atomic_add_acq_rel_gpu(reinterpret_cast<unsigned *>(done_ctr + g), 1u);
  }

  // C. Count signals, warp per expert.
  for (int g = gw; g < num_experts; g += num_warps) {
    const int d = g / e_loc, e = g % e_loc;
    if (s_mask[d]) continue;
    if (lane == 0) {
      const int cnt = cnt_of[g];
      signal_count(g, d, e, rank, tag, cnt, cnt * parts, num_max, num_experts, set_base, done_ctr, s_route[d], err,
                   deadline);
      cnt_of[g] = 0;
      done_ctr[g] = 0;
    }
    __syncwarp();  // reconverge before the next expert or the receive phase (see ll_dispatch.cu)
  }
}

// Receive phase: block per local expert; warp 0's lanes s < R wait for source s's count.
__device__ void recv(unsigned seq, int tag, long long set_base, int num_experts, const int *s_mask, char *mine,
                     int *state, long long *out_layout, int *out_count, int *recv_stats, long long *wait_stats,
                     const Deadline &deadline, int num_max, int lane) {
  const int e_loc = num_experts / kRanks;
  const int *const sig = reinterpret_cast<const int *>(mine + set_base);
  int *const fill = reinterpret_cast<int *>(mine + set_base + 4LL * num_experts);
  if (threadIdx.x >= 32) return;
  for (int e = blockIdx.x; e < e_loc; e += gridDim.x) {
    unsigned long long waited = 0;
    bool arrived = false;
    const int cnt = wait_count(sig, e, e_loc, tag, deadline, state, s_mask, num_max, lane, waited, arrived);
    if (wait_stats != nullptr && lane < kRanks)
      atomicAdd(reinterpret_cast<unsigned long long *>(wait_stats) + lane, waited);
    if (lane < kRanks && !arrived) out_layout[e * kRanks + lane] = 0;  // masked or silent: no rows
    const int total = ll::warp_sum(cnt);
    if (lane == 0) {
      out_count[e] = total;
      if (recv_stats != nullptr) atomicAdd(recv_stats + e, total);
      // Clear this call's fill word unless a later call already reserved there (then it holds another tag):
      // every unmasked source reserved before it signalled. A word never cleared only counts as empty anyway.
      atomicCAS_system(reinterpret_cast<unsigned *>(fill + e), (fill_tag(seq) << 16) | static_cast<unsigned>(total),
                       0u);
    }
  }
}

}  // namespace direct
}  // namespace ll_dispatch
}  // namespace epk

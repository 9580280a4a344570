// LL combine (semantics.md "Low-latency combine"): each expert owner d sends every row it received back to
// the token's source rank s, into slot [global expert g][source token t] of s's receive region, and after
// the last row of (local expert, s) one tagged flag for g. The source waits for the flags of all E experts
// (skipping masked owners), then reduces each token in the reference's order: acc = +0; for k ascending with
// a selection: acc = fp32(acc + fp32(w[t, k] * y)); one RNE cast to BF16 (no FMA: __fmul_rn / __fadd_rn).
//
// Rows are addressed by (g, t), so a token listing one expert twice would have both rows land in one slot
// (DeepEP's assumption of distinct experts per token; reference/low_latency.py says the same).
//
// phase: 1 = send only, 2 = receive only (the recv hook), 3 = both. The send phase gives each (local expert,
// source rank) pair max(1, warps / pairs) warps; the last of them (a counter in the device state) raises the
// flag. The receive phase is a warp per token, or up to kCombineSplit (4) warps per token when warps outnumber
// tokens.
//
// Pulled variant (EPK_LL_COMBINE_PULL, zero-copy combines with EPKERN_LL_COMBINE_PULL=1): the expert outputs already
// lie in each owner's LL area (get_next_low_latency_combine_buffer), so the owner sends only where each row is:
// for every row of (local expert e, source s) its offset in the owner's LL area (16-byte units) into s's table
// row_of[g][t] (int32 [E][num_max] at the start of s's receive region, unused otherwise in a pulled combine),
// then the flag; the source reads each selected row straight from the owner's buffer. 1152 row transfers at 128 tokens,
// top-8 (the floor's count) against 3200 pushed. The owner's buffer is next written two calls later, after every rank
// has run this call's receive (the rule the two sets rely on).
//
// Defines: EPK_NUM_RANKS, EPK_HIDDEN (multiple of 128), EPK_TOPK (<= 32), EPK_THREADS, EPK_LL_COMBINE_PULL (0 / 1),
// EPK_POLL_SLEEP_NS (ll_common.cuh), EPK_LL_NIC (0 or a NIC route kind: ll_route.cuh). No other define is read.
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
#ifndef EPK_THREADS
#error "EPK_THREADS must be defined"
#endif
#ifndef EPK_LL_COMBINE_PULL
#error "EPK_LL_COMBINE_PULL must be defined"
#endif

constexpr int kRanks = EPK_NUM_RANKS;
constexpr int kHidden = EPK_HIDDEN;
constexpr int kTopk = EPK_TOPK;
constexpr int kThreads = EPK_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kVecs = kHidden / 8;  // int4 (8 BF16) per row
constexpr int kRowBytes = 2 * kHidden;
// Most warps reducing one token (EPKERN_LL_COMBINE_SPLIT's A/B: 4 is the kept value, docs/performance.md).
constexpr int kCombineSplit = 4;
constexpr bool kPull = EPK_LL_COMBINE_PULL != 0;
// Selections whose 16-byte loads a lane issues before adding them (EPKERN_LL_COMBINE_AHEAD's A/B: 8 is the kept
// value), at most top-k.
constexpr int kCombineAhead = 8;
constexpr int kAhead = kCombineAhead < kTopk ? kCombineAhead : kTopk;
static_assert(kHidden % 128 == 0, "hidden must be a multiple of 128");
static_assert(kTopk >= 1 && kTopk <= EPK_LL_MAX_TOPK, "top-k in 1..32");
static_assert(kRanks >= 1 && kRanks <= EPK_LL_MAX_RANKS, "LL kernels handle up to 32 ranks");
static_assert(kThreads % 32 == 0, "whole warps");

using namespace epk;

// Two blocks per SM (at most 64 registers at 512 threads), as the dispatch: the spin-waiting LL kernels of every
// rank sharing a GPU, a dispatch and a combine each, must be resident at once.
extern "C" __global__ void __launch_bounds__(kThreads, 2)
    epk_ll_combine(int dry_run, int rank, int phase, int back, const int4 *__restrict__ x,
                   const int *__restrict__ src_info, const long long *__restrict__ layout,
                   const int64_t *__restrict__ topk_idx, const float *__restrict__ topk_weights, int num_tokens,
                   int4 *__restrict__ out, int num_experts, int num_max, const unsigned long long *__restrict__ peers,
                   long long ll_off, long long set_stride, long long send_off, long long recv_off, int *state,
                   long long *wait_stats, ErrorRecord *err, unsigned long long timeout_ns) {
  if (dry_run) return;  // first use: makes the driver load this kernel before any peer spins
  const int tid = threadIdx.x, lane = tid & 31;
  const int gw = blockIdx.x * kWarps + tid / 32, num_warps = gridDim.x * kWarps;
  const int e_loc = num_experts / kRanks;
  const unsigned seq = ll::call_seq(state, phase, back);
  const int tag = ll::tag_of(seq);
  const long long set_base = static_cast<long long>(seq & 1u) * set_stride;
  char *const mine = reinterpret_cast<char *>(peers[rank] + ll_off);
  const Deadline deadline{err, rank, timeout_ns};

  __shared__ int s_mask[kRanks];
  __shared__ int s_skip[kRanks];  // owners left out of this call's sums: masked, or silent past the deadline
  __shared__ Route s_route[kRanks];
  ll::load_peers(state, peers, ll_off, mine, 2 * set_stride, s_mask, s_route);
  if (tid < kRanks) s_skip[tid] = s_mask[tid];  // this thread loaded s_mask[tid] just above
  __syncthreads();

  if (phase & EPK_PHASE_SEND) {
    const int pairs = e_loc * kRanks;
    const int per = max(1, num_warps / pairs);
    const int rows = kRanks * num_max;
    // A PROXY put's source must lie in this rank's registered LL area: a zero-copy buffer (or any x inside the area)
    // is sent in place; rows of another x are first copied into the send region of this call's set, at the offset
    // the zero-copy buffer would give them (free: the dispatch staging there belongs to the call two back).
    const char *const xb = reinterpret_cast<const char *>(x);
    const bool x_in_area = xb >= mine && xb + static_cast<long long>(e_loc) * rows * kRowBytes <= mine + 2 * set_stride;
    int4 *const stage_rows = reinterpret_cast<int4 *>(mine + set_base + send_off);
    for (int p = gw / per; p < pairs; p += num_warps / per) {
      const int e = p / kRanks, s = p % kRanks, sub = gw % per;
      if (s_mask[s]) continue;  // every warp of the pair skips: no flag either
      const long long lr = layout[p];
      long long begin = lr >> 32;
      int n = static_cast<int>(lr & 0xffffffffLL);
      if (n < 0 || n > num_max || begin < 0 || begin + n > rows) {
        if (sub == 0 && lane == 0) report_error(err, kBadIndex, rank, EPK_ERR_PHASE_LL_BAD_HANDLE, s, n, num_max);
        n = 0;
        begin = 0;
      }
      const int g = rank * e_loc + e;
      if constexpr (kPull) {
        // A lane per row: where the row lies in this owner's LL area (in 16-byte units, so the source finds it
        // whichever set the caller's buffer is in), into the source's table at [g][t].
        const long long x_units = (reinterpret_cast<const char *>(x) - mine) / 16;
        for (int i = sub * 32 + lane; i < n; i += per * 32) {
          const long long row = static_cast<long long>(e) * rows + begin + i;
          const int t = src_info[row];
          if (t < 0 || t >= num_max) {
            report_error(err, kBadIndex, rank, EPK_ERR_PHASE_LL_BAD_HANDLE, s, t, num_max);
            continue;
          }
          const long long off = set_base + recv_off + 4LL * (static_cast<long long>(g) * num_max + t);
          if (!route_store_word(s_route[s], off, static_cast<int>(x_units + row * kVecs)))
            report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, s, s_route[s].kind, 0);
        }
      } else {
        for (int i = sub; i < n; i += per) {
          const long long row = static_cast<long long>(e) * rows + begin + i;
          const int t = src_info[row];
          if (t < 0 || t >= num_max) {
            if (lane == 0) report_error(err, kBadIndex, rank, EPK_ERR_PHASE_LL_BAD_HANDLE, s, t, num_max);
            continue;
          }
          const long long off = set_base + recv_off + (static_cast<long long>(g) * num_max + t) * kRowBytes;
          const int4 *src = x + row * kVecs;
          if (kNicRoutes && s_route[s].kind == EPK_LL_NIC && !x_in_area) {  // stage the row (NIC routes only)
            ll::warp_copy_v4<1>(stage_rows + row * kVecs, src, kVecs, lane, [](const int4 *q) { return *q; });
            src = stage_rows + row * kVecs;
          }
          if (!route_put_warp(s_route[s], off, src, kRowBytes, lane, deadline) && lane == 0)
            report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, s, s_route[s].kind, 0);
        }
      }
      __syncwarp();
      if (lane == 0) {
        // acq_rel: the last warp of the pair acquires every other warp's released puts before the flag.
        const unsigned done = atomic_add_acq_rel_gpu(reinterpret_cast<unsigned *>(state + EPK_STATE_PAIR + p), 1u);
        if (done == static_cast<unsigned>(per - 1)) {
          state[EPK_STATE_PAIR + p] = 0;  // all `per` warps of the pair have counted: reset for the next call
          // NIC routes: the flag is staged at 4E + 4(s e_loc + e) of this set (ll_common.cuh); PROXY pushes it after
          // every data trigger of the pair (each warp pushed its rows before it counted itself done), RDMA sends the
          // e_loc flags for s as one WRITE once all are staged (after every row posted to s).
          const long long stage = set_base + 4LL * (num_experts + s * e_loc + e);
          const SignalBatch batch{e, e_loc, static_cast<unsigned>(tag)};
          if (!route_signal(s_route[s], set_base + 4LL * g, ll::pack_signal(tag, 0), stage, batch, deadline))
            report_error(err, kUnsupportedRoute, rank, EPK_ERR_PHASE_LL_ROUTE, s, s_route[s].kind, 0);
        }
      }
    }
  }

  if (phase & EPK_PHASE_RECV) {
    // 1. Every block waits for all E flags (cheap local polls), so any warp may then read any slot.
    const int *const sig = reinterpret_cast<const int *>(mine + set_base);
    for (int g = tid; g < num_experts; g += kThreads) {
      const int d = g / e_loc;
      if (s_mask[d]) continue;
      const uint64_t t0 = now_ns();
      int v = 0;
      const int got = ll::wait_signal(sig + g, tag, deadline, EPK_ERR_PHASE_LL_COMBINE_RECV, d, v);
      if (got != ll::kArrived) {
        s_skip[d] = 1;
        if (got == ll::kExpired) ll::mask_peer(state, d);
      }
      if (wait_stats != nullptr && blockIdx.x == 0)
        atomicAdd(reinterpret_cast<unsigned long long *>(wait_stats) + d, now_ns() - t0);
    }
    __syncthreads();
    __threadfence();  // the acquires of the waiting threads order every thread's reads of the slots below

    // 2. Warp per token (or per part of a token: up to kCombineSplit warps when warps outnumber tokens, each taking
    // every parts-th run of 32 vectors): weighted sum over k in the reference's order.
    const int4 *const recv = reinterpret_cast<const int4 *>(mine + set_base + recv_off);
    const int area_units = static_cast<int>(2 * set_stride / 16);  // pulled: the LL area (both sets) in 16 B
    const int parts = max(1, min(kCombineSplit, num_tokens > 0 ? num_warps / num_tokens : 1));
    for (int item = gw; item < num_tokens * parts; item += num_warps) {
      const int t = item / parts, part = item % parts;
      long long my_g = -1;
      float my_w = 0.f;
      if (lane < kTopk) {
        my_g = topk_idx[static_cast<long long>(t) * kTopk + lane];
        if (my_g >= 0 && my_g < num_experts && !s_skip[my_g / e_loc])
          my_w = topk_weights[static_cast<long long>(t) * kTopk + lane];
        else
          my_g = -1;  // no selection, a masked owner, or out of range (dispatch skipped it too)
      }
      // Pulled: the row of each selection in its owner's buffer, as the owner named it in row_of[g][t].
      const int4 *my_row = nullptr;
      if constexpr (kPull) {
        if (my_g >= 0) {
          const int units = ll::ld_cg(reinterpret_cast<const int *>(recv) + my_g * num_max + t);
          const int d = static_cast<int>(my_g) / e_loc;
          const char *peer = route_peer_ptr(s_route[d], 0);
          const bool no_route = peer == nullptr, out_of_range = units < 0 || units > area_units - kVecs;
          if (no_route || out_of_range) {  // one report site (each call site of report_error costs a stack frame)
            report_error(err, no_route ? kUnsupportedRoute : kBadIndex, rank,
                         no_route ? EPK_ERR_PHASE_LL_ROUTE : EPK_ERR_PHASE_LL_BAD_HANDLE, d,
                         no_route ? s_route[d].kind : units, area_units);
            my_g = -1;
          } else {
            my_row = reinterpret_cast<const int4 *>(peer) + units;
          }
        }
      }
      // Lane k < kTopk holds selection k's row (its start) and weight; the loop below fetches them by shuffle
      // (registers: 64 per thread for two blocks per SM, and kAhead loads in flight take 4 * kAhead of them).
      const int4 *my_src = nullptr;
      if constexpr (kPull)
        my_src = my_row;
      else if (my_g >= 0)
        my_src = recv + (my_g * num_max + t) * kVecs;
      const unsigned valid = __ballot_sync(0xffffffffu, my_src != nullptr);  // warp-uniform: bit k = selection k
      // The loop is warp-uniform (the shuffles below need every lane; H = 128 leaves lanes 16..31 without a vector).
      for (int c0 = 32 * part; c0 < kVecs; c0 += 32 * parts) {
        const int c = c0 + lane;
        const bool has_vec = c < kVecs;
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.f;
        // kAhead selections' loads are issued before any is added (the adds keep k ascending): one load at a
        // time left each lane a chain of K dependent round trips per vector.
#pragma unroll
        for (int k0 = 0; k0 < kTopk; k0 += kAhead) {
          int4 v[kAhead];
#pragma unroll
          for (int u = 0; u < kAhead; ++u) {
            const int k = k0 + u < kTopk ? k0 + u : kTopk - 1;
            const auto row = reinterpret_cast<const int4 *>(
                __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_src), k));
            v[u] = has_vec && k0 + u < kTopk && (valid >> k & 1u) ? ll::ld_cg(row + c) : make_int4(0, 0, 0, 0);
          }
#pragma unroll
          for (int u = 0; u < kAhead; ++u) {
            const int k = k0 + u < kTopk ? k0 + u : kTopk - 1;
            const float w = __shfl_sync(0xffffffffu, my_w, k);
            if (k0 + u >= kTopk || !(valid >> k & 1u)) continue;
            float f[8];
            epk::unpack_bf16x8(v[u], f);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w, f[j]));
          }
        }
        if (has_vec) out[static_cast<long long>(t) * kVecs + c] = epk::pack_bf16x8(acc);
      }
    }
  }

  if (phase & EPK_PHASE_SEND) ll::finish_call(state, seq);
}

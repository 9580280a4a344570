// The low-latency send-site abstraction: one Route per peer, chosen at run time from a per-peer kind.
//
// The LL kernels touch a peer's LL area only through the functions below, at exactly four send sites:
// dispatch data (route_put_warp_lanes: one message to all its selections; the direct dispatch also stores
// src_info / scales / layout_range words and reserves its block with route_reserve), dispatch count (route_signal),
// combine data (route_put_warp, or the pulled combine's row indices, route_store_word) and combine flag
// (route_signal); and one read site, the pulled dispatch's and combine's reads of a peer's staged rows
// (route_peer_ptr). Offsets are relative to the peer's LL area base, which is what a NIC route needs too (remote
// address = peer's registered LL base + offset).
//
// IPC: the peer's region is mapped into this process (a VMM mapping, cudaIpcOpenMemHandle, or a plain pointer for
// in-process ranks); a put is a warp copy with 16-byte stores, a signal a release store at system scope.
//
// PROXY (issue #17; exact on the H200 as 8 MPS processes): the peer's memory is not mapped here. A put pushes
// one WRITE trigger (local offset of the source in this rank's registered LL area -> the peer's LL offset) into the
// FIFO serving the peer (peer % number of FIFOs, so one proxy thread posts all of a peer's triggers on one QP in
// ticket order); a signal stores its 4-byte word into a staging slot of this rank's LL area (the caller names it)
// and pushes a 4-byte WRITE. The count / flag is pushed after the data of its destination (the count warp waits
// for the data warps' put counter; they push before they count), so it lands after the data.
//
// RDMA (issue #17, step 5; exact on the H100 as 8 MPS processes and 2 or 4 in-process ranks): the kernel posts mlx5
// WQEs itself into the send ring of the peer's QP (RdmaQp below; rings and doorbells in host-mapped memory, the NIC
// polls the doorbell).
// A put is one unsignaled RDMA WRITE from the source (inside this rank's registered LL area) to the peer's LL area,
// committed in reservation order without a doorbell. A signal stores its word in its staging slot and counts itself
// in the peer's batch (a tagged counter of the call): the warp whose signal completes the batch posts ONE RDMA WRITE
// of the batch's staged words (the `words` signals of this call to that peer, consecutive at the peer and in the
// staging area) as the batch's only signaled WQE, and rings the doorbell once for everything reserved before it.
// An RC QP executes in order, so the signals land after every data WRITE posted before them.
//
// Only pushes for NIC routes: the pulled modes, the direct dispatch's stores and reservations and route_peer_ptr
// have no NIC form (the host chooses push for any non-IPC peer and refuses zero_copy_recv).
//
// Contract of a put: `src` is local device memory, 16-byte aligned, `bytes` a multiple of 16, `dst_off`
// 16-byte aligned; every lane of the warp calls it (lane = threadIdx.x % 32). IPC data is not ordered with respect
// to anything until the caller publishes it: __syncwarp, then one lane's release (atomic or fence) before the
// route_signal that tells the peer. A NIC put needs `src` inside this rank's LL area (the dispatch staging slot
// is; the combine stages a user array's row there first unless it is already inside, as a zero-copy buffer is).
#pragma once
#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "mlx5_wqe.cuh"
#include "proxy_fifo.cuh"

// EPK_LL_NIC: the NIC route kind this specialisation carries code for: 0 for a Buffer whose peers are all IPC (the
// kernels are then the IPC-only ones, as before NIC routes existed), EPK_ROUTE_PROXY or EPK_ROUTE_RDMA (one
// transport per Buffer). A NIC kind met by a build without its code is refused like any unimplemented route.
#ifndef EPK_LL_NIC
#error "EPK_LL_NIC must be defined"
#endif
namespace epk {

// The kinds (EPK_ROUTE_*, epk_constants.cuh) are written into the device state by the host.
enum RouteKind : int {
  kRouteNone = EPK_ROUTE_NONE,
  kRouteIpc = EPK_ROUTE_IPC,
  kRouteProxy = EPK_ROUTE_PROXY,
  kRouteRdma = EPK_ROUTE_RDMA
};

// Error code recorded when a send site meets a route kind this build does not implement.
constexpr int kUnsupportedRoute = 4;
static_assert(EPK_LL_NIC == 0 || EPK_LL_NIC == EPK_ROUTE_PROXY || EPK_LL_NIC == EPK_ROUTE_RDMA,
              "EPK_LL_NIC must be 0, EPK_ROUTE_PROXY or EPK_ROUTE_RDMA");
constexpr bool kProxyRoutes = EPK_LL_NIC == EPK_ROUTE_PROXY;
constexpr bool kRdmaRoutes = EPK_LL_NIC == EPK_ROUTE_RDMA;
constexpr bool kNicRoutes = EPK_LL_NIC != 0;

// One RDMA QP as the kernels post to it (EPK_RDMA_QP_BYTES; packed by src/epkern/gpu/ll/rdma.py, one per peer in
// the table at state words EPK_STATE_RDMA_TABLE). Ring, doorbell record and doorbell word are the QP's own
// (host-mapped for the emulated NIC, the UAR page for an mlx5); `retired` is advanced by the host's CQ poller.
struct RdmaQp {
  uint8_t *sq;                        // send ring of wqe_cnt 64-byte WQEBBs
  uint32_t *dbrec;                    // doorbell record ([1]: send, BE32)
  unsigned long long *db;             // the 8-byte doorbell word
  const unsigned long long *retired;  // producer index the NIC has completed (host CQ poller)
  unsigned long long *ctr;            // device memory: [0] producer index, [1] committed index, [2] batch counter
  unsigned long long raddr;           // the peer's LL area base as this QP's remote addresses name it
  uint32_t rkey, lkey;                // the peer's LL area / this rank's LL area (sources)
  uint32_t qpn, wqe_cnt;
};
// Five pointers, a u64 and four u32 in declaration order: no padding, so the size pins every offset.
static_assert(sizeof(RdmaQp) == EPK_RDMA_QP_BYTES, "RdmaQp layout is shared with gpu/ll/rdma.py");

struct Route {
  int kind;
  char *base;  // IPC: the peer's LL area as mapped in this process
#if EPK_LL_NIC
  int peer;               // NIC: the destination rank
  char *local;            // NIC: this rank's own LL area (registered on its NIC; sources of WRITEs lie inside)
  long long local_bytes;  // NIC: bytes of that area (both sets)
  proxy::Fifo fifo;       // PROXY: the FIFO serving this peer
  const RdmaQp *qp;       // RDMA: this peer's QP
#endif
};

// The signals of one call to one peer over RDMA: this one is word `index` of `words` consecutive words at the
// peer (and in this rank's staging area), `tag` the call's (the batch counter's tag).
struct SignalBatch {
  int index, words;
  unsigned tag;
};

// The route to `peer`: its kind (device state), its region as mapped here (0 for peers off this node), and for
// NIC routes the FIFO table (PROXY: state words EPK_STATE_PROXY_*: FIFO i's block at table[i], its head word at
// table[EPK_PROXY_MAX_FIFOS + i]) or the QP table (RDMA: state words EPK_STATE_RDMA_TABLE, entry `peer`).
EPK_DEVICE Route make_route(int kind, int peer, unsigned long long peer_region, long long ll_offset, const int *state,
                            char *mine, long long area_bytes) {
  Route r;
  r.kind = kind;
  r.base = peer_region != 0 ? reinterpret_cast<char *>(peer_region + ll_offset) : nullptr;
  if (kind == kRouteIpc && r.base == nullptr) r.kind = kRouteNone;  // no mapping: refuse rather than fault
  if ((kind == kRouteProxy && !kProxyRoutes) || (kind == kRouteRdma && !kRdmaRoutes))
    r.kind = kRouteNone;  // a build without that route's code
#if EPK_LL_NIC
  r.peer = peer;
  r.local = mine;
  r.local_bytes = area_bytes;
  r.fifo = proxy::make_fifo(nullptr, nullptr, 0);
  r.qp = nullptr;
  if (r.kind == kRouteProxy) {
    const int n = state[EPK_STATE_PROXY_FIFOS];
    const unsigned long long *table =
        *reinterpret_cast<unsigned long long *const *>(state + EPK_STATE_PROXY_TABLE);  // 8-byte aligned word
    if (n <= 0 || n > EPK_PROXY_MAX_FIFOS || table == nullptr) {
      r.kind = kRouteNone;  // no FIFO set up: refuse rather than fault
    } else {
      const int i = peer % n;
      r.fifo = proxy::make_fifo(reinterpret_cast<uint8_t *>(table[i]),
                                reinterpret_cast<unsigned long long *>(table[EPK_PROXY_MAX_FIFOS + i]),
                                static_cast<uint32_t>(state[EPK_STATE_PROXY_CAPACITY]));
    }
  } else if (r.kind == kRouteRdma) {
    const RdmaQp *table = *reinterpret_cast<const RdmaQp *const *>(state + EPK_STATE_RDMA_TABLE);
    r.qp = table != nullptr ? table + peer : nullptr;
    if (r.qp == nullptr || r.qp->sq == nullptr) r.kind = kRouteNone;  // no QP set up: refuse rather than fault
  }
#endif
  return r;
}

// Whether [src, src + bytes) lies in this rank's registered LL area (NIC sources must); its offset there.
EPK_DEVICE bool local_offset(const Route &r, const void *src, int bytes, long long &off) {
#if EPK_LL_NIC
  off = reinterpret_cast<const char *>(src) - r.local;
  return off >= 0 && off + bytes <= r.local_bytes;
#else
  off = 0;
  return false;
#endif
}

// RDMA: one RDMA WRITE of `bytes` from local `src` to the peer's LL area at `dst_off`, posted by the calling thread:
// a slot reserved on the QP's producer index, ring space awaited, the WQE written, then committed in reservation
// order; `last` makes it the batch's signaled WQE and rings the doorbell for everything committed up to it. False
// when `src` is outside the registered area (nothing posted); a deadline is recorded by the waits (true then).
EPK_DEVICE bool rdma_write(const Route &r, long long dst_off, const void *src, int bytes, bool last,
                           const Deadline &d) {
#if EPK_LL_NIC
  long long off;
  if (!local_offset(r, src, bytes, off)) return false;
  const RdmaQp &q = *r.qp;
  const uint64_t pi = mlx5::reserve_wqes(q.ctr, 1);
  if (!mlx5::wait_sq_space(q.retired, pi + 1, q.wqe_cnt, d, r.peer)) return true;
  mlx5::write_rdma_write(q.sq, q.wqe_cnt, pi, q.qpn, q.raddr + static_cast<uint64_t>(dst_off), q.rkey,
                         reinterpret_cast<uint64_t>(src), q.lkey, static_cast<uint32_t>(bytes), last);
  if (last)
    mlx5::commit_in_order(q.ctr + 1, pi, pi + 1, q.dbrec, q.db, q.qpn, d, r.peer);
  else
    mlx5::commit_quiet(q.ctr + 1, pi, pi + 1, d, r.peer);
  return true;
#else
  return false;
#endif
}

// RDMA: count one signal of the call tagged `tag` in the peer's batch counter (tag << 32 | signals counted: a word
// left by an earlier call counts as empty, so nothing resets it). True for the signal that completes the batch of
// `words`. Release before (this thread's staged word), acquire after (the others' staged words).
EPK_DEVICE bool rdma_batch_complete(unsigned long long *counter, unsigned tag, int words) {
  __threadfence();
  unsigned long long old = *reinterpret_cast<volatile unsigned long long *>(counter);
  for (;;) {
    const unsigned long long taken = (old >> 32) == tag ? (old & 0xffffffffull) : 0ull;
    const unsigned long long seen = atomicCAS(counter, old, (static_cast<unsigned long long>(tag) << 32) | (taken + 1));
    if (seen == old) {
      __threadfence();
      return taken + 1 == static_cast<unsigned long long>(words);
    }
    old = seen;
  }
}

// PROXY: one WRITE trigger of `bytes` from local `src` (inside this rank's LL area) to the peer's LL area at
// `dst_off`, pushed by the calling thread after a system-scope fence (the proxy's NIC reads `src` from the host
// side: every store the caller published to this thread must be visible first). False when `src` is outside the
// registered area (nothing pushed); a full FIFO past the deadline or a failed proxy is recorded by proxy::push.
EPK_DEVICE bool proxy_put(const Route &r, long long dst_off, const void *src, int bytes, const Deadline &d) {
#if EPK_LL_NIC
  long long off;
  if (!local_offset(r, src, bytes, off)) return false;
  __threadfence_system();
  proxy::push_write(r.fifo, static_cast<uint32_t>(r.peer), 0, static_cast<uint64_t>(off),
                    static_cast<uint64_t>(dst_off), static_cast<uint32_t>(bytes), d);
  return true;
#else
  return false;
#endif
}

// Warp-wide copy of `bytes` from local `src` to the peer's LL area at `dst_off` (PROXY: lane 0 pushes one WRITE
// once the warp's stores are done). False (in every lane) when the route kind is not implemented, or for PROXY
// when `src` is outside this rank's LL area; nothing is written then.
EPK_DEVICE bool route_put_warp(const Route &r, long long dst_off, const void *src, int bytes, int lane,
                               const Deadline &d) {
  switch (r.kind) {
    case kRouteIpc: {
      const int4 *s = reinterpret_cast<const int4 *>(src);
      int4 *dst = reinterpret_cast<int4 *>(r.base + dst_off);
      const int n = bytes / 16;
      // Plain (coherent) loads: `src` may have been written by this warp moments ago (the dispatch staging
      // slot), which the non-coherent read-only path could miss.
      int i = lane;
      for (; i + 96 < n; i += 128) {  // four 16-byte loads in flight per lane before the stores
        const int4 a = s[i], b = s[i + 32], c = s[i + 64], e = s[i + 96];
        dst[i] = a;
        dst[i + 32] = b;
        dst[i + 64] = c;
        dst[i + 96] = e;
      }
      for (; i < n; i += 32) dst[i] = s[i];
      return true;
    }
    case kRouteProxy:
    case kRouteRdma: {
      if constexpr (kNicRoutes) {
        __syncwarp();  // the warp's stores to `src` (a staged row) before lane 0's fence and post
        bool ok = true;
        if (lane == 0)
          ok = kProxyRoutes ? proxy_put(r, dst_off, src, bytes, d) : rdma_write(r, dst_off, src, bytes, false, d);
        return __shfl_sync(0xffffffffu, ok, 0);
      }
      return false;
    }
    default:
      return false;
  }
}

// The same message to several peers at once, by one warp: lane k's (`my_route`, `my_off`) is destination k when
// `my_active`. Each 16-byte chunk of `src` is loaded once and stored to every IPC destination (one read of the
// message however many selections it has); each PROXY lane pushes its own WRITE trigger of the whole message
// (after the IPC stores, so the message written by this warp is complete). Returns the ballot of active lanes
// whose route kind is not implemented (nothing written for them). Same contract as route_put_warp.
template <int kLanes, int kInFlight = 3>  // lanes that can be destinations (0..kLanes-1); 16-byte loads per lane
EPK_DEVICE unsigned route_put_warp_lanes(const Route &my_route, long long my_off, bool my_active, const void *src,
                                         int bytes, int lane, const Deadline &dl) {
  const bool ipc = my_active && my_route.kind == kRouteIpc;
  const bool via_nic = kNicRoutes && my_active && my_route.kind == EPK_LL_NIC;
  const unsigned ipc_lanes = __ballot_sync(0xffffffffu, ipc);
  unsigned unsupported = __ballot_sync(0xffffffffu, my_active && !ipc && !via_nic);
  const unsigned long long my_dst = ipc ? reinterpret_cast<unsigned long long>(my_route.base + my_off) : 0ull;
  const int4 *s = reinterpret_cast<const int4 *>(src);
  const int n = bytes / 16;
  // Warp-uniform trip count (the shuffles need every lane); kInFlight 16-byte loads in flight per lane (three by
  // default; four spilled in the FP8 build), then the stores of those chunks to every destination.
  for (int base = 0; base < n; base += 32 * kInFlight) {
    int4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (base + 32 * u + lane < n) v[u] = s[base + 32 * u + lane];
#pragma unroll
    for (int k = 0; k < kLanes; ++k) {
      if (!(ipc_lanes >> k & 1u)) continue;
      int4 *d = reinterpret_cast<int4 *>(__shfl_sync(0xffffffffu, my_dst, k));
#pragma unroll
      for (int u = 0; u < kInFlight; ++u)
        if (base + 32 * u + lane < n) d[base + 32 * u + lane] = v[u];
    }
  }
  if constexpr (kNicRoutes) {
    if (__any_sync(0xffffffffu, via_nic)) {  // warp-uniform; not taken when every destination is IPC
      __syncwarp();  // the message in `src` is complete (written by this warp) before any lane's fence and post
      bool pushed = true;
      if constexpr (kProxyRoutes) {
        pushed = !via_nic || proxy_put(my_route, my_off, src, bytes, dl);
      } else {
        // RDMA: one lane at a time. Two lanes may name one QP, whose slots commit in reservation order; a lane
        // spinning on its turn beside the lane it waits for is avoided.
        for (unsigned todo = __ballot_sync(0xffffffffu, via_nic); todo != 0u; todo &= todo - 1u) {
          if (lane == __ffs(todo) - 1) pushed = rdma_write(my_route, my_off, src, bytes, false, dl);
          __syncwarp();
        }
      }
      unsupported |= __ballot_sync(0xffffffffu, !pushed);
    }
  }
  return unsupported;
}

// A pointer through which this GPU reads the peer's LL area at `off` (the pulled dispatch reads staged messages
// and token lists with it), or nullptr when the route kind gives no load path (an RDMA route would read into a
// local bounce buffer instead). Reads through it must bypass L1 (ll::ld_cg): the peer wrote the data.
EPK_DEVICE const char *route_peer_ptr(const Route &r, long long off) {
  return r.kind == kRouteIpc ? r.base + off : nullptr;
}

// One-thread store of a 4-byte word at the peer's LL area + `off` (the pulled combine's row indices), unordered
// until the caller publishes it (as a put). False when the route kind is not implemented.
EPK_DEVICE bool route_store_word(const Route &r, long long off, int value) {
  switch (r.kind) {
    case kRouteIpc:
      *reinterpret_cast<int *>(r.base + off) = value;
      return true;
    case kRouteProxy:
    case kRouteRdma:
    default:
      return false;
  }
}

// One-thread stores of an 8-byte word (the direct dispatch's layout_range entry) and of one byte (its UE8M0
// scales) at the peer's LL area + `off`, unordered until published. False when the route kind is not implemented.
EPK_DEVICE bool route_store_dword(const Route &r, long long off, long long value) {
  if (r.kind != kRouteIpc) return false;
  *reinterpret_cast<long long *>(r.base + off) = value;
  return true;
}
EPK_DEVICE bool route_store_byte(const Route &r, long long off, unsigned char value) {
  if (r.kind != kRouteIpc) return false;
  *reinterpret_cast<unsigned char *>(r.base + off) = value;
  return true;
}

// One-thread reservation of `n` rows in a tagged fill word at the peer's LL area + `off` (the direct dispatch's
// block of an owner's expert): the word holds (tag << 16 | rows taken) of the call that wrote it last, so a word
// left by an earlier call counts as empty and no reset races with the reservations (a plain reset by the owner
// let 8 MPS ranks' next reservations start from stale counts). Returns the begin, or -1 when the route kind is
// not implemented (an RDMA route would post a masked compare-and-swap). At most one retry per concurrent
// reserver of the word (R ranks), so no deadline is needed. `tag` in 1..0xFFFF, rows taken below 0x10000.
EPK_DEVICE int route_reserve(const Route &r, long long off, unsigned tag, int n) {
  if (r.kind != kRouteIpc) return -1;
  unsigned *p = reinterpret_cast<unsigned *>(r.base + off);
  unsigned old = *reinterpret_cast<volatile unsigned *>(p);  // a first guess: the compare-and-swap checks it
  for (;;) {
    const unsigned taken = (old >> 16) == tag ? (old & 0xFFFFu) : 0u;
    const unsigned seen = atomicCAS_system(p, old, (tag << 16) | (taken + static_cast<unsigned>(n)));
    if (seen == old) return static_cast<int>(taken);
    old = seen;
  }
}

// One-thread signal: store `value` at the peer's LL area + `off` with release semantics at system scope, so
// that every write this thread has observed (the data, published to it by __syncwarp / an acquire) is
// visible to the peer before the value is. NIC routes: `value` is stored at `stage_off` of this rank's own LL area
// (a word no other signal of this call uses, left alone until the call two later); PROXY pushes a 4-byte WRITE of
// it, which lands after every trigger pushed earlier to the same peer (one FIFO, one QP, ticket order); RDMA counts
// it in the peer's batch (`batch`) and the signal completing the batch posts the batch's words as one signaled
// WRITE and rings the doorbell (see the top of this file). False when the route kind is not implemented.
EPK_DEVICE bool route_signal(const Route &r, long long off, int value, long long stage_off, const SignalBatch &batch,
                             const Deadline &d) {
  switch (r.kind) {
    case kRouteIpc:
      __threadfence_system();  // cumulativity for data written by other warps and published to us
      st_release_sys(reinterpret_cast<int *>(r.base + off), value);
      return true;
    case kRouteProxy:
    case kRouteRdma: {
#if EPK_LL_NIC
      int *stage = reinterpret_cast<int *>(r.local + stage_off);
      *stage = value;
      if constexpr (kProxyRoutes) return proxy_put(r, off, stage, 4, d);
      if (!rdma_batch_complete(r.qp->ctr + 2, batch.tag, batch.words)) return true;
      const long long first = 4LL * batch.index;  // the batch's first word, here and at the peer
      return rdma_write(r, off - first, stage - batch.index, 4 * batch.words, true, d);
#else
      return false;
#endif
    }
    default:
      return false;
  }
}

// One-thread atomic add at the peer (release, system scope). Not used by the LL protocol today (signals
// carry the call's tag, so no counter needs resetting); kept for routes and protocols that count.
EPK_DEVICE bool route_atomic_add(const Route &r, long long off, int value) {
  switch (r.kind) {
    case kRouteIpc:
      __threadfence_system();
      atomic_add_release_sys(reinterpret_cast<int *>(r.base + off), value);
      return true;
    case kRouteProxy:
    case kRouteRdma:
    default:
      return false;
  }
}

}  // namespace epk

// The low-latency send-site abstraction: one Route per peer, chosen at run time from a per-peer kind.
//
// The LL kernels touch a peer's LL area only through the functions below, at exactly four send sites:
// dispatch data (route_put_warp_lanes: one message to all its selections; the direct dispatch also stores
// src_info / scales / layout_range words and reserves its block with route_reserve), dispatch count (route_signal),
// combine data (route_put_warp, or the pulled combine's row indices, route_store_word) and combine flag
// (route_signal); and one read site, the pulled dispatch's and combine's reads of a peer's staged rows
// (route_peer_ptr). Offsets are relative to the peer's LL area base, which
// is what an RDMA route needs too (remote address = peer's registered LL base + offset), so PROXY (host FIFO) and RDMA
// (GPU-written WQEs) routes are added here, as new `case`s, without touching the kernels.
//
// Today only IPC is implemented: the peer's region is mapped into this process (cudaIpcOpenMemHandle, or
// a plain pointer for in-process ranks), a put is a warp copy with 16-byte stores, a signal a release
// store at system scope (the peer and the host may be on another device).
//
// Contract of a put: `src` is local device memory, 16-byte aligned, `bytes` a multiple of 16, `dst_off`
// 16-byte aligned; every lane of the warp calls it (lane = threadIdx.x % 32). The data is not ordered
// with respect to anything until the caller publishes it: __syncwarp, then one lane's release (atomic or
// fence) before the route_signal that tells the peer. An RDMA route would need `src` inside the registered
// LL area (the dispatch staging slot is; a combine from a user array would stage first unless zero_copy).
#pragma once
#include "epk_common.cuh"
#include "epk_constants.cuh"

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

struct Route {
  int kind;
  char *base;  // IPC: the peer's LL area as mapped in this process
};

EPK_DEVICE Route make_route(int kind, unsigned long long peer_region, long long ll_offset) {
  Route r;
  r.kind = kind;
  r.base = peer_region != 0 ? reinterpret_cast<char *>(peer_region + ll_offset) : nullptr;
  if (kind == kRouteIpc && r.base == nullptr) r.kind = kRouteNone;  // no mapping: refuse rather than fault
  return r;
}

// Warp-wide copy of `bytes` from local `src` to the peer's LL area at `dst_off`. False (in every lane) when
// the route kind is not implemented; nothing is written then.
EPK_DEVICE bool route_put_warp(const Route &r, long long dst_off, const void *src, int bytes, int lane) {
  switch (r.kind) {
    case kRouteIpc: {
      const int4 *s = reinterpret_cast<const int4 *>(src);
      int4 *d = reinterpret_cast<int4 *>(r.base + dst_off);
      const int n = bytes / 16;
      // Plain (coherent) loads: `src` may have been written by this warp moments ago (the dispatch staging
      // slot), which the non-coherent read-only path could miss.
      int i = lane;
      for (; i + 96 < n; i += 128) {  // four 16-byte loads in flight per lane before the stores
        const int4 a = s[i], b = s[i + 32], c = s[i + 64], e = s[i + 96];
        d[i] = a;
        d[i + 32] = b;
        d[i + 64] = c;
        d[i + 96] = e;
      }
      for (; i < n; i += 32) d[i] = s[i];
      return true;
    }
    case kRouteProxy:  // host FIFO + proxy thread: not implemented yet
    case kRouteRdma:   // GPU-written WQEs: not implemented yet
    default:
      return false;
  }
}

// The same message to several peers at once, by one warp: lane k's (`my_route`, `my_off`) is destination k when
// `my_active`. Each 16-byte chunk of `src` is loaded once and stored to every IPC destination (one read of the
// message however many selections it has). Returns the ballot of active lanes whose route kind is not
// implemented (nothing written for them). Same contract as route_put_warp.
template <int kLanes, int kInFlight = 3>  // lanes that can be destinations (0..kLanes-1); 16-byte loads per lane
EPK_DEVICE unsigned route_put_warp_lanes(const Route &my_route, long long my_off, bool my_active, const void *src,
                                         int bytes, int lane) {
  const bool ipc = my_active && my_route.kind == kRouteIpc;
  const unsigned ipc_lanes = __ballot_sync(0xffffffffu, ipc);
  const unsigned unsupported = __ballot_sync(0xffffffffu, my_active && !ipc);
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
// visible to the peer before the value is. False when the route kind is not implemented.
EPK_DEVICE bool route_signal(const Route &r, long long off, int value) {
  switch (r.kind) {
    case kRouteIpc:
      __threadfence_system();  // cumulativity for data written by other warps and published to us
      st_release_sys(reinterpret_cast<int *>(r.base + off), value);
      return true;
    case kRouteProxy:
    case kRouteRdma:
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

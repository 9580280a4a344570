// Device-side producer of the PROXY transport's GPU -> host trigger FIFO. The byte layout is defined once, in
// src/epkern/nic/fifo.py (control header of 256 bytes, then `capacity` 32-byte records):
//   header: head u64 @0, tail u64 @64 (written by the proxy), flushed u64 @128, error u32 @136
//   record: local_offset u64 @0, remote_offset u64 @8, value u64 @16,
//           header u64 @24 = peer | qp << 16 | op << 24 | seq << 32, seq = (ticket + 1) mod 2^32, stored LAST
//           with one release store at system scope, so the proxy never reads a half-written record.
// Push protocol: ticket = atomicAdd(head, 1); wait (with a deadline) until ticket - tail < capacity; write the
// body; release-store the header word. The head may live in the FIFO block (host-mapped) or in device memory
// (faster; then every producer of this FIFO must use that same word).
//
// Without __CUDACC__ (a host C++ compiler) the same protocol builds on C++ atomics, so that CPU tests can run
// this code against the Python proxy; on the device it uses PTX acquire/release at system scope.
#pragma once

#if defined(__CUDACC__)
#include "epk_common.cuh"
#else
#include <atomic>
#include <chrono>
#include <cstdint>
#ifndef EPK_DEVICE
#define EPK_DEVICE inline
#endif
namespace epk {
// Host stand-ins with the device types' layout (test builds only).
struct ErrorRecord {
  int claimed, code, rank, phase, peer, seen, expected, started;
};
enum ErrorCode : int { kOk = 0, kTimeout = 1, kBadIndex = 2, kOverflow = 3 };
struct Deadline {
  ErrorRecord *rec;
  int rank;
  uint64_t timeout_ns;
};
inline uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}
inline void report_error(ErrorRecord *rec, int code, int rank, int phase, int peer, int seen, int expected) {
  if (rec == nullptr) return;
  int zero = 0;
  if (!__atomic_compare_exchange_n(&rec->claimed, &zero, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
  rec->rank = rank;
  rec->phase = phase;
  rec->peer = peer;
  rec->seen = seen;
  rec->expected = expected;
  __atomic_store_n(&rec->code, code, __ATOMIC_RELEASE);  // last, as the device's report_error
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
}  // namespace epk
#endif

namespace epk {
namespace proxy {

constexpr uint32_t kFifoHeaderBytes = 256;
constexpr uint32_t kTriggerBytes = 32;
constexpr uint32_t kFifoHeadOffset = 0;
constexpr uint32_t kFifoTailOffset = 64;
constexpr uint32_t kFifoFlushedOffset = 128;
constexpr uint32_t kFifoErrorOffset = 136;
constexpr uint32_t kTriggerWrite = 1;
constexpr uint32_t kTriggerAtomicAdd = 2;
constexpr uint32_t kTriggerFlush = 3;

constexpr int kProxyFailed = 4;         // ErrorRecord code: the proxy service set the FIFO's error word
constexpr int kPhaseFifoSpace = 0x501;  // ErrorRecord phase: waiting for a free FIFO slot
constexpr int kPhaseFifoFlush = 0x502;  // ErrorRecord phase: waiting for a flush to complete

struct Fifo {
  uint8_t *base;             // the FIFO block (host-mapped)
  unsigned long long *head;  // reservation counter: base + kFifoHeadOffset, or a word in device memory
  uint32_t capacity;         // records, a power of two
};

EPK_DEVICE Fifo make_fifo(uint8_t *base, unsigned long long *head, uint32_t capacity) {
  Fifo f;
  f.base = base;
  f.head = head != nullptr ? head : reinterpret_cast<unsigned long long *>(base + kFifoHeadOffset);
  f.capacity = capacity;
  return f;
}

// ---- primitives (system scope: the proxy is a host thread) ----
#if defined(__CUDACC__)
// The names the host build defines too (below); on the device, epk_common.cuh's system-scope primitives.
EPK_DEVICE uint64_t ld_acquire_u64(const unsigned long long *p) { return ld_acquire_sys(p); }
EPK_DEVICE uint32_t ld_acquire_u32(const uint32_t *p) { return ld_acquire_sys(p); }
EPK_DEVICE void st_release_u64(unsigned long long *p, uint64_t v) { st_release_sys(p, v); }
EPK_DEVICE uint64_t fetch_add_u64(unsigned long long *p, uint64_t v) {
  return atomicAdd(p, static_cast<unsigned long long>(v));
}
EPK_DEVICE bool error_claimed(const ErrorRecord *rec) {
  return rec != nullptr && *reinterpret_cast<const volatile int *>(&rec->claimed) != 0;
}
#else
inline uint64_t ld_acquire_u64(const unsigned long long *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline uint32_t ld_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void st_release_u64(unsigned long long *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
inline uint64_t fetch_add_u64(unsigned long long *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline bool error_claimed(const ErrorRecord *rec) {
  return rec != nullptr && __atomic_load_n(&rec->claimed, __ATOMIC_ACQUIRE) != 0;
}
#endif

EPK_DEVICE unsigned long long *fifo_word(const Fifo &f, uint32_t offset) {
  return reinterpret_cast<unsigned long long *>(f.base + offset);
}

EPK_DEVICE uint64_t trigger_header(uint32_t op, uint32_t peer, uint32_t qp, uint64_t ticket) {
  return static_cast<uint64_t>(peer & 0xffffu) | (static_cast<uint64_t>(qp & 0xffu) << 16) |
         (static_cast<uint64_t>(op & 0xffu) << 24) | (static_cast<uint64_t>((ticket + 1) & 0xffffffffu) << 32);
}

// Reserve `count` consecutive tickets; returns the first.
EPK_DEVICE uint64_t reserve(const Fifo &f, uint32_t count) { return fetch_add_u64(f.head, count); }

// Wait until `ticket`'s slot is free (ticket - tail < capacity). False, with the error recorded, when the
// deadline passes or the proxy reports failure (then the FIFO is unusable: the ticket is never written).
EPK_DEVICE bool wait_space(const Fifo &f, uint64_t ticket, const Deadline &d, int peer) {
  const unsigned long long *tail = fifo_word(f, kFifoTailOffset);
  uint64_t t = ld_acquire_u64(tail);
  if (ticket - t < f.capacity) return true;
  const uint32_t *err = reinterpret_cast<const uint32_t *>(f.base + kFifoErrorOffset);
  const uint64_t start = now_ns();
  for (unsigned iter = 1;; ++iter) {
    t = ld_acquire_u64(tail);
    if (ticket - t < f.capacity) return true;
    if ((iter & 63u) == 0) {
      if (ld_acquire_u32(err) != 0) {
        report_error(d.rec, kProxyFailed, d.rank, kPhaseFifoSpace, peer, static_cast<int>(ld_acquire_u32(err)), 0);
        return false;
      }
      if (now_ns() - start > d.timeout_ns) {
        report_error(d.rec, kTimeout, d.rank, kPhaseFifoSpace, peer, static_cast<int>(ticket - t),
                     static_cast<int>(f.capacity));
        return false;
      }
      if (error_claimed(d.rec)) return false;  // another thread of this rank gave up already
    }
  }
}

// Store the record of `ticket`: the body, then the header word (release, system scope) that publishes it.
EPK_DEVICE void write_record(const Fifo &f, uint64_t ticket, uint32_t op, uint32_t peer, uint32_t qp,
                             uint64_t local_offset, uint64_t remote_offset, uint64_t value) {
  unsigned long long *rec = reinterpret_cast<unsigned long long *>(
      f.base + kFifoHeaderBytes +
      static_cast<uint64_t>(static_cast<uint32_t>(ticket) & (f.capacity - 1)) * kTriggerBytes);
  rec[0] = local_offset;
  rec[1] = remote_offset;
  rec[2] = value;
  st_release_u64(rec + 3, trigger_header(op, peer, qp, ticket));
}

// One thread pushes one trigger. Returns false (error recorded) on deadline / proxy failure; *ticket_out gets
// the ticket (wait_flushed takes a FLUSH's ticket).
EPK_DEVICE bool push(const Fifo &f, uint32_t op, uint32_t peer, uint32_t qp, uint64_t local_offset,
                     uint64_t remote_offset, uint64_t value, const Deadline &d, uint64_t *ticket_out = nullptr) {
  const uint64_t t = reserve(f, 1);
  if (ticket_out != nullptr) *ticket_out = t;
  if (!wait_space(f, t, d, static_cast<int>(peer))) return false;
  write_record(f, t, op, peer, qp, local_offset, remote_offset, value);
  return true;
}

EPK_DEVICE bool push_write(const Fifo &f, uint32_t peer, uint32_t qp, uint64_t local_offset, uint64_t remote_offset,
                           uint32_t length, const Deadline &d) {
  return push(f, kTriggerWrite, peer, qp, local_offset, remote_offset, length, d);
}

EPK_DEVICE bool push_atomic_add(const Fifo &f, uint32_t peer, uint32_t qp, uint64_t remote_offset, int64_t value,
                                const Deadline &d) {
  return push(f, kTriggerAtomicAdd, peer, qp, 0, remote_offset, static_cast<uint64_t>(value), d);
}

// Wait until the FLUSH of `flush_ticket` completed (flushed >= ticket + 1): every earlier trigger of this FIFO
// has completed at the NIC. False (error recorded) at the deadline or on proxy failure.
EPK_DEVICE bool wait_flushed(const Fifo &f, uint64_t flush_ticket, const Deadline &d) {
  const unsigned long long *flushed = fifo_word(f, kFifoFlushedOffset);
  if (ld_acquire_u64(flushed) >= flush_ticket + 1) return true;
  const uint32_t *err = reinterpret_cast<const uint32_t *>(f.base + kFifoErrorOffset);
  const uint64_t start = now_ns();
  for (unsigned iter = 1;; ++iter) {
    const uint64_t v = ld_acquire_u64(flushed);
    if (v >= flush_ticket + 1) return true;
    if ((iter & 63u) == 0) {
      if (ld_acquire_u32(err) != 0) {
        report_error(d.rec, kProxyFailed, d.rank, kPhaseFifoFlush, -1, static_cast<int>(ld_acquire_u32(err)), 0);
        return false;
      }
      if (now_ns() - start > d.timeout_ns) {
        report_error(d.rec, kTimeout, d.rank, kPhaseFifoFlush, -1, static_cast<int>(v),
                     static_cast<int>(flush_ticket + 1));
        return false;
      }
      if (error_claimed(d.rec)) return false;
    }
  }
}

// Push a FLUSH and wait for it.
EPK_DEVICE bool flush(const Fifo &f, const Deadline &d) {
  uint64_t t = 0;
  return push(f, kTriggerFlush, 0, 0, 0, 0, 0, d, &t) && wait_flushed(f, t, d);
}

#if defined(__CUDACC__)
// Warp-aggregated push: all 32 lanes call it (converged); lanes with `active` push their trigger, with one
// atomicAdd for the warp. Tickets follow lane order. Returns this lane's success (inactive lanes: true).
EPK_DEVICE bool warp_push(const Fifo &f, bool active, uint32_t op, uint32_t peer, uint32_t qp, uint64_t local_offset,
                          uint64_t remote_offset, uint64_t value, const Deadline &d, uint64_t *ticket_out = nullptr) {
  const unsigned mask = __ballot_sync(0xffffffffu, active);
  if (mask == 0) return true;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int leader = __ffs(mask) - 1;
  unsigned long long base = 0;
  if (lane == leader) base = fetch_add_u64(f.head, static_cast<uint64_t>(__popc(mask)));
  base = __shfl_sync(0xffffffffu, base, leader);
  if (!active) return true;
  const uint64_t t = base + static_cast<uint64_t>(__popc(mask & ((1u << lane) - 1u)));
  if (ticket_out != nullptr) *ticket_out = t;
  if (!wait_space(f, t, d, static_cast<int>(peer))) return false;
  write_record(f, t, op, peer, qp, local_offset, remote_offset, value);
  return true;
}
#endif

}  // namespace proxy
}  // namespace epk

// mlx5 send WQEs written by device code: the same bytes as src/epkern/nic/wqe.py (the single source of truth;
// layouts in shared/reference/mlx5_wqe.md). Multi-byte fields are big-endian, inline payloads in memory order.
//
// Every builder writes one whole 64-byte WQEBB (unused bytes zero, as the Python builders do) at producer index
// `pi` of a ring of `wqe_cnt` (a power of two) WQEBBs, and returns the WQEBBs used (1). Posting a batch:
//   1. start = reserve_wqes(pi_counter, n)             slot reservation on the producer index (one atomicAdd)
//   2. wait_sq_space(retired, start + n, wqe_cnt, ...) the ring must not lap WQEs the NIC has not completed
//   3. write n WQEs at start .. start+n-1: data WQEs unsignaled, the trailing one signaled
//   4. commit_in_order(ready, start, start + n, ...)  waits for earlier reservations to be committed, then
//      post_doorbell: system fence, send doorbell record (BE32 pi), ONE 8-byte doorbell write for the batch.
//      (commit_quiet commits without a doorbell: a later commit_in_order of the QP rings for it.)
//
// The byte-layout part (segment values, builders, doorbell values) has no CUDA dependency so that a host C++
// compiler can check it against the Python encoder (tests/test_nic_proxy.py); the ordering part (reservation,
// waits, doorbells) is device code only.
#pragma once

#if defined(__CUDACC__)
#include "epk_common.cuh"
#else
#include <cstdint>
#include <cstring>
#ifndef EPK_DEVICE
#define EPK_DEVICE inline
#endif
#endif

namespace epk {
namespace mlx5 {

constexpr uint32_t kMlx5SendWqeBb = 64;
constexpr uint32_t kMlx5SendWqeDs = 16;
constexpr uint32_t kMlx5InlineSeg = 0x80000000u;
constexpr uint32_t kMlx5SndDbr = 1;
constexpr uint32_t kMlx5OpcodeNop = 0x00;
constexpr uint32_t kMlx5OpcodeRdmaWrite = 0x08;
constexpr uint32_t kMlx5OpcodeAtomicFa = 0x12;
constexpr uint32_t kMlx5WqeCtrlCqUpdate = 0x08;

// A 16-byte segment as four 32-bit words in memory order (each already byte-swapped where the field is BE).
struct Seg {
  uint32_t w[4];
};

EPK_DEVICE uint32_t bswap32(uint32_t x) {
  return (x >> 24) | ((x >> 8) & 0x0000ff00u) | ((x << 8) & 0x00ff0000u) | (x << 24);
}

EPK_DEVICE Seg ctrl_seg(uint32_t pi, uint32_t opcode, uint32_t qpn, uint32_t ds, uint32_t fm_ce_se, uint32_t opmod = 0,
                        uint32_t signature = 0, uint32_t imm = 0) {
  Seg s;
  s.w[0] = bswap32(((opmod & 0xffu) << 24) | ((pi & 0xffffu) << 8) | (opcode & 0xffu));
  s.w[1] = bswap32(((qpn & 0xffffffu) << 8) | (ds & 0xffu));
  s.w[2] = (signature & 0xffu) | ((fm_ce_se & 0xffu) << 24);  // bytes: signature, dci_stream (2, zero), fm_ce_se
  s.w[3] = bswap32(imm);
  return s;
}

EPK_DEVICE Seg raddr_seg(uint64_t raddr, uint32_t rkey) {
  Seg s;
  s.w[0] = bswap32(static_cast<uint32_t>(raddr >> 32));
  s.w[1] = bswap32(static_cast<uint32_t>(raddr));
  s.w[2] = bswap32(rkey);
  s.w[3] = 0;
  return s;
}

EPK_DEVICE Seg data_seg(uint32_t byte_count, uint32_t lkey, uint64_t addr) {
  Seg s;
  s.w[0] = bswap32(byte_count & 0x7fffffffu);
  s.w[1] = bswap32(lkey);
  s.w[2] = bswap32(static_cast<uint32_t>(addr >> 32));
  s.w[3] = bswap32(static_cast<uint32_t>(addr));
  return s;
}

// Inline segments of 4 and 8 bytes: BE32 header (len | MLX5_INLINE_SEG), the payload little-endian as a
// host/GPU integer, zero padding to 16 bytes.
EPK_DEVICE Seg inline_u32_seg(uint32_t value) {
  Seg s;
  s.w[0] = bswap32(4u | kMlx5InlineSeg);
  s.w[1] = value;
  s.w[2] = 0;
  s.w[3] = 0;
  return s;
}

EPK_DEVICE Seg inline_u64_seg(uint64_t value) {
  Seg s;
  s.w[0] = bswap32(8u | kMlx5InlineSeg);
  s.w[1] = static_cast<uint32_t>(value);
  s.w[2] = static_cast<uint32_t>(value >> 32);
  s.w[3] = 0;
  return s;
}

EPK_DEVICE Seg atomic_seg(uint64_t swap_add, uint64_t compare) {
  Seg s;
  s.w[0] = bswap32(static_cast<uint32_t>(swap_add >> 32));
  s.w[1] = bswap32(static_cast<uint32_t>(swap_add));
  s.w[2] = bswap32(static_cast<uint32_t>(compare >> 32));
  s.w[3] = bswap32(static_cast<uint32_t>(compare));
  return s;
}

EPK_DEVICE Seg zero_seg() {
  Seg s;
  s.w[0] = s.w[1] = s.w[2] = s.w[3] = 0;
  return s;
}

EPK_DEVICE void store_seg(uint8_t *p, const Seg &s) {
#if defined(__CUDACC__)
  *reinterpret_cast<uint4 *>(p) = make_uint4(s.w[0], s.w[1], s.w[2], s.w[3]);  // one 16-byte store
#else
  std::memcpy(p, s.w, 16);
#endif
}

EPK_DEVICE uint8_t *wqe_slot(uint8_t *sq, uint32_t wqe_cnt, uint64_t pi) {
  return sq + static_cast<uint64_t>(static_cast<uint32_t>(pi) & (wqe_cnt - 1)) * kMlx5SendWqeBb;
}

EPK_DEVICE uint32_t ce_flags(bool signaled) { return signaled ? kMlx5WqeCtrlCqUpdate : 0u; }

// RDMA WRITE from (laddr, lkey) to (raddr, rkey): ctrl + raddr + data, ds = 3.
EPK_DEVICE uint32_t write_rdma_write(uint8_t *sq, uint32_t wqe_cnt, uint64_t pi, uint32_t qpn, uint64_t raddr,
                                     uint32_t rkey, uint64_t laddr, uint32_t lkey, uint32_t length, bool signaled) {
  uint8_t *w = wqe_slot(sq, wqe_cnt, pi);
  store_seg(w, ctrl_seg(static_cast<uint32_t>(pi), kMlx5OpcodeRdmaWrite, qpn, 3, ce_flags(signaled)));
  store_seg(w + 16, raddr_seg(raddr, rkey));
  store_seg(w + 32, data_seg(length, lkey, laddr));
  store_seg(w + 48, zero_seg());
  return 1;
}

// 4-byte inline RDMA WRITE of `value`: ctrl + raddr + inline, ds = 3.
EPK_DEVICE uint32_t write_inline_u32(uint8_t *sq, uint32_t wqe_cnt, uint64_t pi, uint32_t qpn, uint64_t raddr,
                                     uint32_t rkey, uint32_t value, bool signaled) {
  uint8_t *w = wqe_slot(sq, wqe_cnt, pi);
  store_seg(w, ctrl_seg(static_cast<uint32_t>(pi), kMlx5OpcodeRdmaWrite, qpn, 3, ce_flags(signaled)));
  store_seg(w + 16, raddr_seg(raddr, rkey));
  store_seg(w + 32, inline_u32_seg(value));
  store_seg(w + 48, zero_seg());
  return 1;
}

// 8-byte inline RDMA WRITE of `value`: ctrl + raddr + inline, ds = 3.
EPK_DEVICE uint32_t write_inline_u64(uint8_t *sq, uint32_t wqe_cnt, uint64_t pi, uint32_t qpn, uint64_t raddr,
                                     uint32_t rkey, uint64_t value, bool signaled) {
  uint8_t *w = wqe_slot(sq, wqe_cnt, pi);
  store_seg(w, ctrl_seg(static_cast<uint32_t>(pi), kMlx5OpcodeRdmaWrite, qpn, 3, ce_flags(signaled)));
  store_seg(w + 16, raddr_seg(raddr, rkey));
  store_seg(w + 32, inline_u64_seg(value));
  store_seg(w + 48, zero_seg());
  return 1;
}

// 64-bit fetch-and-add of `add` at raddr (8-byte aligned, remote-atomic MR); the old value lands at
// (laddr, lkey): ctrl + raddr + atomic + data, ds = 4.
EPK_DEVICE uint32_t write_fetch_add(uint8_t *sq, uint32_t wqe_cnt, uint64_t pi, uint32_t qpn, uint64_t raddr,
                                    uint32_t rkey, uint64_t add, uint64_t laddr, uint32_t lkey, bool signaled) {
  uint8_t *w = wqe_slot(sq, wqe_cnt, pi);
  store_seg(w, ctrl_seg(static_cast<uint32_t>(pi), kMlx5OpcodeAtomicFa, qpn, 4, ce_flags(signaled)));
  store_seg(w + 16, raddr_seg(raddr, rkey));
  store_seg(w + 32, atomic_seg(add, 0));
  store_seg(w + 48, data_seg(8, lkey, laddr));
  return 1;
}

EPK_DEVICE uint32_t write_nop(uint8_t *sq, uint32_t wqe_cnt, uint64_t pi, uint32_t qpn, bool signaled) {
  uint8_t *w = wqe_slot(sq, wqe_cnt, pi);
  store_seg(w, ctrl_seg(static_cast<uint32_t>(pi), kMlx5OpcodeNop, qpn, 1, ce_flags(signaled)));
  store_seg(w + 16, zero_seg());
  store_seg(w + 32, zero_seg());
  store_seg(w + 48, zero_seg());
  return 1;
}

// The send doorbell record word (dbrec[MLX5_SND_DBR]) as stored: BE32 of the low 16 bits of pi.
EPK_DEVICE uint32_t dbrec_value(uint64_t pi) { return bswap32(static_cast<uint32_t>(pi) & 0xffffu); }

// The 8-byte doorbell word {BE32(pi16 << 8), BE32(qpn << 8)} as the little-endian u64 one store writes
// (wqe.doorbell_u64).
EPK_DEVICE uint64_t doorbell_value(uint64_t pi, uint32_t qpn) {
  const uint32_t lo = bswap32((static_cast<uint32_t>(pi) & 0xffffu) << 8);
  const uint32_t hi = bswap32((qpn & 0xffffffu) << 8);
  return static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
}

#if defined(__CUDACC__)
// ---- ordering: device only ----

constexpr int kPhaseSqSpace = 0x601;   // ErrorRecord phase: waiting for send-ring space
constexpr int kPhaseSqCommit = 0x602;  // ErrorRecord phase: waiting for earlier reservations to be rung

// Slot reservation on the producer index: n consecutive WQEBBs, returns the first (monotonic 64-bit).
EPK_DEVICE uint64_t reserve_wqes(unsigned long long *pi_counter, uint32_t n) {
  return atomicAdd(pi_counter, static_cast<unsigned long long>(n));
}

// Wait (bounded) until producer index `end` does not lap WQEs not yet completed: end - *retired <= wqe_cnt.
// `retired` is advanced by whoever polls the CQ. False (error recorded) at the deadline.
EPK_DEVICE bool wait_sq_space(const unsigned long long *retired, uint64_t end, uint32_t wqe_cnt, const Deadline &d,
                              int peer) {
  uint64_t r = ld_acquire_sys(retired);
  if (end - r <= wqe_cnt) return true;
  const uint64_t start = now_ns();
  for (unsigned iter = 1;; ++iter) {
    r = ld_acquire_sys(retired);
    if (end - r <= wqe_cnt) return true;
    if ((iter & 255u) == 0) {
      if (now_ns() - start > d.timeout_ns) {
        report_error(d.rec, kTimeout, d.rank, kPhaseSqSpace, peer, static_cast<int>(end - r),
                     static_cast<int>(wqe_cnt));
        return false;
      }
      if (d.rec != nullptr && *reinterpret_cast<volatile int *>(&d.rec->claimed) != 0) return false;
    }
  }
}

// Post: make the WQEs visible at system scope, store the send doorbell record, then ONE 8-byte doorbell write.
EPK_DEVICE void post_doorbell(uint32_t *dbrec, unsigned long long *db_reg, uint64_t pi, uint32_t qpn) {
  __threadfence_system();
  st_release_sys(dbrec + kMlx5SndDbr, dbrec_value(pi));
  st_release_sys(db_reg, doorbell_value(pi, qpn));
}

// Wait (bounded) until every reservation before `start` has been committed (`ready` holds the producer index
// committed so far; it starts equal to the producer counter). False (error recorded) at the deadline.
EPK_DEVICE bool wait_turn(const unsigned long long *ready, uint64_t start, const Deadline &d, int peer) {
  uint64_t v = ld_acquire_sys(ready);
  if (v == start) return true;
  const uint64_t t0 = now_ns();
  for (unsigned iter = 1; v != start; ++iter) {
    v = ld_acquire_sys(ready);
    if ((iter & 255u) == 0 && v != start) {
      if (now_ns() - t0 > d.timeout_ns) {
        report_error(d.rec, kTimeout, d.rank, kPhaseSqCommit, peer, static_cast<int>(v), static_cast<int>(start));
        return false;
      }
      if (d.rec != nullptr && *reinterpret_cast<volatile int *>(&d.rec->claimed) != 0) return false;
    }
  }
  return true;
}

// Commit reservation [start, end) without a doorbell (its WQEs are rung by a later commit_in_order of the same
// QP): in reservation order, after a system fence, so that whoever rings sees these WQEs written.
EPK_DEVICE bool commit_quiet(unsigned long long *ready, uint64_t start, uint64_t end, const Deadline &d, int peer) {
  if (!wait_turn(ready, start, d, peer)) return false;
  __threadfence_system();
  st_release_sys(ready, end);
  return true;
}

// Ring the doorbell for reservation [start, end) once every earlier reservation has been committed: keeps the
// doorbell record monotonic when several warps post to one QP, and covers the quiet commits before it. False
// (error recorded) at the deadline.
EPK_DEVICE bool commit_in_order(unsigned long long *ready, uint64_t start, uint64_t end, uint32_t *dbrec,
                                unsigned long long *db_reg, uint32_t qpn, const Deadline &d, int peer) {
  if (!wait_turn(ready, start, d, peer)) return false;
  post_doorbell(dbrec, db_reg, end, qpn);
  st_release_sys(ready, end);
  return true;
}
#endif  // __CUDACC__

}  // namespace mlx5
}  // namespace epk

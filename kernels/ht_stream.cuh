// One ordered message stream over an RDMA QP: the network primitive of internode HT (issue #18; docs/architecture.md,
// "Internode HT (issue #18): the plan"), the device side of tests/ht_internode_ring_model.py's Stream.
//
// The receiver owns a ring of `ring` message slots of `msg` bytes and a tail word (messages arrived, u64); the sender
// owns a staging ring laid out the same way and a credit word (messages the receiver is done with, u64). Message i
// lives in slot i % ring on both sides. The sender waits for room (wait_space), writes messages into its staging
// slots, then send_chunk posts
// them as one RDMA WRITE (two where the chunk wraps) followed by the new tail as an 8-byte *inline* WRITE, the one
// signaled WQE, and rings the doorbell once. An inline tail carries its value in the WQE: a staged tail word could
// be overwritten by the next chunk's tail before the NIC reads it (found by the ring model). The RC QP keeps the
// WRITEs in order, so a receiver that sees tail > i finds message i in place. The receiver returns credit the same
// way on its own QP back to the sender. Every wait ends at the Deadline with an ErrorRecord naming the peer.
//
// Addresses in WQEs are as the NIC sees them (device addresses: the emulated NIC's DeviceMemory, or a dma-buf MR).
// Its GPU self-test (tests/test_ht_stream_gpu.py) passed on an H100 (session O).
#pragma once

#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "mlx5_wqe.cuh"

namespace epk {
namespace stream {

constexpr int kPhaseStreamSpace = EPK_ERR_PHASE_HT_INTER_SPACE;      // ErrorRecord phase: the sender waits for credit
constexpr int kPhaseStreamArrival = EPK_ERR_PHASE_HT_INTER_ARRIVAL;  // ErrorRecord phase: the receiver waits for i

// One QP as the stream's poster sees it (the fields of epk::RdmaQp that posting needs).
struct Qp {
  uint8_t *sq;                        // send ring of wqe_cnt 64-byte WQEBBs
  uint32_t *dbrec;                    // doorbell record ([1]: send, BE32)
  unsigned long long *db;             // the 8-byte doorbell word
  const unsigned long long *retired;  // producer index the NIC has completed (host CQ poller)
  unsigned long long *ctr;            // device memory: [0] producer index, [1] committed index
  uint32_t qpn, wqe_cnt, lkey, rkey;  // lkey: this side's registered area; rkey: the other side's
};

#ifdef __CUDACC__
// Wait (bounded) until the u64 at `word` is at least `target` (wrap-free: 64-bit counters).
EPK_DEVICE bool wait_u64_at_least(const unsigned long long *word, uint64_t target, const Deadline &d, int phase,
                                  int peer) {
  uint64_t v = ld_acquire_sys(word);
  if (v >= target) return true;
  const uint64_t start = now_ns();
  for (unsigned iter = 1;; ++iter) {
    v = ld_acquire_sys(word);
    if (v >= target) return true;
    if ((iter & 255u) == 0) {
      if (now_ns() - start > d.timeout_ns) {
        report_error(d.rec, kTimeout, d.rank, phase, peer, static_cast<int>(v), static_cast<int>(target));
        return false;
      }
      if (d.rec != nullptr && *reinterpret_cast<volatile int *>(&d.rec->claimed) != 0) return false;
    }
  }
}

// Sender, one thread, before its messages [first, first + count) are written into the staging ring: wait (bounded)
// until the receiver's credit at `credit` frees their slots (a slot is reused `ring` messages later; the receiver
// gives credit only for messages that arrived, so their WRITEs have read the staging slots too).
EPK_DEVICE bool wait_space(const unsigned long long *credit, uint32_t ring, uint64_t first, uint32_t count,
                           const Deadline &d, int peer) {
  const uint64_t end = first + count;
  return end <= ring || wait_u64_at_least(credit, end - ring, d, kPhaseStreamSpace, peer);
}

// Sender, one thread, after wait_space and after messages [first, first + count) were written into the staging ring
// at `staging` (each writer's stores made visible at system scope before): post them to the receiver's ring at
// `remote_ring`, then the tail `first + count` to `remote_tail`, one doorbell. False (error recorded) at the deadline.
EPK_DEVICE bool send_chunk(const Qp &q, uint64_t staging, uint64_t remote_ring, uint64_t remote_tail, uint32_t ring,
                           uint32_t msg, uint64_t first, uint32_t count, const Deadline &d, int peer) {
  if (count == 0) return true;
  const uint32_t slot = static_cast<uint32_t>(first % ring);
  const uint32_t head = count < ring - slot ? count : ring - slot;  // messages before the ring's end
  const uint32_t n = (head < count ? 2u : 1u) + 1u;                 // data WRITEs, then the tail
  const uint64_t pi = mlx5::reserve_wqes(q.ctr, n);
  if (!mlx5::wait_sq_space(q.retired, pi + n, q.wqe_cnt, d, peer)) return false;
  const uint64_t at = static_cast<uint64_t>(slot) * msg;
  mlx5::write_rdma_write(q.sq, q.wqe_cnt, pi, q.qpn, remote_ring + at, q.rkey, staging + at, q.lkey, head * msg, false);
  if (head < count)  // the wrapped rest, from slot 0
    mlx5::write_rdma_write(q.sq, q.wqe_cnt, pi + 1, q.qpn, remote_ring, q.rkey, staging, q.lkey, (count - head) * msg,
                           false);
  mlx5::write_inline_u64(q.sq, q.wqe_cnt, pi + n - 1, q.qpn, remote_tail, q.rkey, first + count, true);
  return mlx5::commit_in_order(q.ctr + 1, pi, pi + n, q.dbrec, q.db, q.qpn, d, peer);
}

// Receiver: wait (bounded) until message i has arrived (the tail word at `tail` passed it).
EPK_DEVICE bool wait_message(const unsigned long long *tail, uint64_t i, const Deadline &d, int peer) {
  return wait_u64_at_least(tail, i + 1, d, kPhaseStreamArrival, peer);
}

// Receiver, one thread: messages before `consumed` are done with (their slots may be reused): post the credit as an
// 8-byte inline WRITE to the sender's credit word at `remote_credit` on the QP back to it, signaled, one doorbell.
EPK_DEVICE bool release(const Qp &back, uint64_t remote_credit, uint64_t consumed, const Deadline &d, int peer) {
  const uint64_t pi = mlx5::reserve_wqes(back.ctr, 1);
  if (!mlx5::wait_sq_space(back.retired, pi + 1, back.wqe_cnt, d, peer)) return false;
  mlx5::write_inline_u64(back.sq, back.wqe_cnt, pi, back.qpn, remote_credit, back.rkey, consumed, true);
  return mlx5::commit_in_order(back.ctr + 1, pi, pi + 1, back.dbrec, back.db, back.qpn, d, peer);
}
#endif  // __CUDACC__

}  // namespace stream
}  // namespace epk

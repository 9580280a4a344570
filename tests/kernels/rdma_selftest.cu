// Self-test kernels for the device-side RDMA writers (mlx5_wqe.cuh) and the proxy FIFO producer
// (proxy_fifo.cuh). tests/test_rdma_gpu.py decodes what they write with epkern.nic.wqe / epkern.nic.fifo and
// compares it with the Python encoders, and drives the emulated NIC and the proxy service with them.
// No specialisation defines are needed. The headers are the library's (kernels/, on the include path after this
// file's folder).
#include "epk_common.cuh"
#include "mlx5_wqe.cuh"
#include "proxy_fifo.cuh"

// WQE kinds in the `ops` rows of epk_selftest_write_wqes
#define EPK_OP_RDMA_WRITE 0
#define EPK_OP_INLINE_U32 1
#define EPK_OP_INLINE_U64 2
#define EPK_OP_FETCH_ADD 3
#define EPK_OP_NOP 4

// One warp per block posts one batch of `per_batch` WQEs (batch = blockIdx.x, rows ops[batch * per_batch + i],
// each 6 u64: kind, raddr, rkey, laddr, lkey, value-or-length) to one QP: lane 0 reserves the slots on the
// producer index, waits for ring space, the lanes write the WQEs (only the batch's last one signaled), then
// lane 0 rings once, in reservation order: send doorbell record, then the 8-byte doorbell word.
// `pi_counter` and `ready` start equal (the producer index so far); `retired` is the completed index.
extern "C" __global__ void epk_selftest_write_wqes(uint8_t *sq, uint32_t wqe_cnt, unsigned long long *pi_counter,
                                                   unsigned long long *ready, const unsigned long long *retired,
                                                   uint32_t *dbrec, unsigned long long *db_reg, uint32_t qpn,
                                                   const uint64_t *ops, int per_batch, epk::ErrorRecord *err,
                                                   uint64_t timeout_ns) {
  using namespace epk::mlx5;
  const epk::Deadline d{err, 0, timeout_ns};
  const int lane = threadIdx.x & 31;
  if (threadIdx.x >= 32) return;
  unsigned long long start = 0;
  int ok = 1;
  if (lane == 0) {
    start = reserve_wqes(pi_counter, static_cast<uint32_t>(per_batch));
    ok = wait_sq_space(retired, start + per_batch, wqe_cnt, d, static_cast<int>(blockIdx.x)) ? 1 : 0;
  }
  start = __shfl_sync(0xffffffffu, start, 0);
  ok = __shfl_sync(0xffffffffu, ok, 0);
  if (!ok) return;
  const uint64_t *rows = ops + static_cast<uint64_t>(blockIdx.x) * per_batch * 6;
  for (int i = lane; i < per_batch; i += 32) {
    const uint64_t *r = rows + 6 * i;
    const uint64_t pi = start + i;
    const bool sig = i == per_batch - 1;
    const uint64_t raddr = r[1], laddr = r[3], value = r[5];
    const uint32_t rkey = static_cast<uint32_t>(r[2]), lkey = static_cast<uint32_t>(r[4]);
    switch (static_cast<int>(r[0])) {
      case EPK_OP_RDMA_WRITE:
        write_rdma_write(sq, wqe_cnt, pi, qpn, raddr, rkey, laddr, lkey, static_cast<uint32_t>(value), sig);
        break;
      case EPK_OP_INLINE_U32:
        write_inline_u32(sq, wqe_cnt, pi, qpn, raddr, rkey, static_cast<uint32_t>(value), sig);
        break;
      case EPK_OP_INLINE_U64:
        write_inline_u64(sq, wqe_cnt, pi, qpn, raddr, rkey, value, sig);
        break;
      case EPK_OP_FETCH_ADD:
        write_fetch_add(sq, wqe_cnt, pi, qpn, raddr, rkey, value, laddr, lkey, sig);
        break;
      default:
        write_nop(sq, wqe_cnt, pi, qpn, sig);
        break;
    }
  }
  __syncwarp();
  if (lane == 0) commit_in_order(ready, start, start + per_batch, dbrec, db_reg, qpn, d, static_cast<int>(blockIdx.x));
}

// Thread i pushes trigger i (rows of 4 u64: op | peer << 8 | qp << 24, local_offset, remote_offset, value) into
// FIFO (i / 32) % num_fifos (a warp shares a FIFO). warp_aggregated: one atomicAdd per warp (warp_push);
// otherwise one per thread (push). tickets[i] receives the ticket. FIFO f: block fifo_base[f], its reservation
// counter at fifo_head[f] (0: the head word inside the block).
extern "C" __global__ void epk_selftest_push_triggers(const uint64_t *fifo_base, const uint64_t *fifo_head,
                                                      int num_fifos, uint32_t capacity, const uint64_t *triggers, int n,
                                                      int warp_aggregated, unsigned long long *tickets,
                                                      epk::ErrorRecord *err, uint64_t timeout_ns) {
  using namespace epk::proxy;
  const epk::Deadline d{err, 0, timeout_ns};
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int fi = (i / 32) % num_fifos;
  const Fifo f = make_fifo(reinterpret_cast<uint8_t *>(fifo_base[fi]),
                           reinterpret_cast<unsigned long long *>(fifo_head[fi]), capacity);
  const bool active = i < n;
  uint64_t row0 = 0, local = 0, remote = 0, value = 0;
  if (active) {
    const uint64_t *r = triggers + 4 * static_cast<uint64_t>(i);
    row0 = r[0];
    local = r[1];
    remote = r[2];
    value = r[3];
  }
  const uint32_t op = row0 & 0xff, peer = (row0 >> 8) & 0xffff, qp = (row0 >> 24) & 0xff;
  uint64_t t = ~0ull;
  if (warp_aggregated) {
    // the whole warp reaches here (no early return above), as warp_push requires
    warp_push(f, active, op, peer, qp, local, remote, value, d, &t);
  } else if (active) {
    push(f, op, peer, qp, local, remote, value, d, &t);
  }
  if (active) tickets[i] = t;
}

// Thread f < num_fifos pushes a FLUSH into FIFO f and waits for it; flushed[f] = the FIFO's flushed word seen
// (flush ticket + 1), or 0 when the wait failed (error recorded).
extern "C" __global__ void epk_selftest_flush(const uint64_t *fifo_base, const uint64_t *fifo_head, int num_fifos,
                                              uint32_t capacity, unsigned long long *flushed, epk::ErrorRecord *err,
                                              uint64_t timeout_ns) {
  using namespace epk::proxy;
  const epk::Deadline d{err, 0, timeout_ns};
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= num_fifos) return;
  const Fifo f = make_fifo(reinterpret_cast<uint8_t *>(fifo_base[i]),
                           reinterpret_cast<unsigned long long *>(fifo_head[i]), capacity);
  uint64_t t = 0;
  const bool ok = push(f, kTriggerFlush, 0, 0, 0, 0, 0, d, &t) && wait_flushed(f, t, d);
  flushed[i] = ok ? ld_acquire_u64(fifo_word(f, kFifoFlushedOffset)) : 0ull;
}

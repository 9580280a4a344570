// Self-test kernels for kernels/ht_stream.cuh (issue #18): one warp sends `n` messages over a stream, one warp
// receives and checks them and returns credit. tests/test_ht_stream_gpu.py runs them against two emulated NICs.
// Message i (msg bytes, a multiple of 8): u64 words, word 0 = i, word j = i * 0x9E3779B97F4A7C15 + j.
#include "epk_common.cuh"
#include "ht_stream.cuh"
#include "mlx5_wqe.cuh"

__device__ __forceinline__ uint64_t epk_selftest_word(uint64_t i, uint32_t j) {
  return j == 0 ? i : i * 0x9E3779B97F4A7C15ull + j;
}

__device__ __forceinline__ epk::stream::Qp epk_selftest_qp(uint8_t *sq, uint32_t *dbrec, unsigned long long *db,
                                                           const unsigned long long *retired, unsigned long long *ctr,
                                                           uint32_t qpn, uint32_t wqe_cnt, uint32_t lkey,
                                                           uint32_t rkey) {
  epk::stream::Qp q;
  q.sq = sq;
  q.dbrec = dbrec;
  q.db = db;
  q.retired = retired;
  q.ctr = ctr;
  q.qpn = qpn;
  q.wqe_cnt = wqe_cnt;
  q.lkey = lkey;
  q.rkey = rkey;
  return q;
}

// One warp: for each chunk, lane 0 waits for room; the lanes write the messages into the staging ring; lane 0 posts.
extern "C" __global__ void epk_selftest_stream_send(uint8_t *sq, uint32_t *dbrec, unsigned long long *db,
                                                    const unsigned long long *retired, unsigned long long *ctr,
                                                    uint32_t qpn, uint32_t wqe_cnt, uint32_t lkey, uint32_t rkey,
                                                    unsigned long long *staging, unsigned long long remote_ring,
                                                    unsigned long long remote_tail, const unsigned long long *credit,
                                                    uint32_t ring, uint32_t msg, unsigned long long n, uint32_t chunk,
                                                    epk::ErrorRecord *err, unsigned long long timeout_ns) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const epk::Deadline d{err, 0, timeout_ns};
  const epk::stream::Qp q = epk_selftest_qp(sq, dbrec, db, retired, ctr, qpn, wqe_cnt, lkey, rkey);
  const uint32_t words = msg / 8;
  for (uint64_t first = 0; first < n; first += chunk) {
    const uint32_t count = static_cast<uint32_t>(n - first < chunk ? n - first : chunk);
    int ok = 1;
    if (lane == 0) ok = epk::stream::wait_space(credit, ring, first, count, d, 1) ? 1 : 0;
    if (!__shfl_sync(0xffffffffu, ok, 0)) return;
    for (uint32_t k = lane; k < count * words; k += 32) {
      const uint64_t i = first + k / words;
      staging[(i % ring) * words + k % words] = epk_selftest_word(i, k % words);
    }
    __threadfence_system();  // this lane's staging stores, before lane 0's doorbell
    __syncwarp();
    if (lane == 0)
      ok = epk::stream::send_chunk(q, reinterpret_cast<uint64_t>(staging), remote_ring, remote_tail, ring, msg, first,
                                   count, d, 1)
               ? 1
               : 0;
    if (!__shfl_sync(0xffffffffu, ok, 0)) return;
  }
}

// One warp: waits for each message, checks every word (mismatches counted in `bad`), and after every `chunk`
// messages (and the last) returns credit on the QP back.
extern "C" __global__ void epk_selftest_stream_recv(
    uint8_t *sq, uint32_t *dbrec, unsigned long long *db, const unsigned long long *retired, unsigned long long *ctr,
    uint32_t qpn, uint32_t wqe_cnt, uint32_t lkey, uint32_t rkey, const unsigned long long *ring_words,
    const unsigned long long *tail, unsigned long long remote_credit, uint32_t ring, uint32_t msg, unsigned long long n,
    uint32_t chunk, unsigned long long *bad, epk::ErrorRecord *err, unsigned long long timeout_ns) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const epk::Deadline d{err, 1, timeout_ns};
  const epk::stream::Qp back = epk_selftest_qp(sq, dbrec, db, retired, ctr, qpn, wqe_cnt, lkey, rkey);
  const uint32_t words = msg / 8;
  for (uint64_t i = 0; i < n; ++i) {
    int ok = 1;
    if (lane == 0) ok = epk::stream::wait_message(tail, i, d, 0) ? 1 : 0;
    if (!__shfl_sync(0xffffffffu, ok, 0)) return;
    const volatile unsigned long long *m = ring_words + (i % ring) * words;  // written by the NIC: no stale cache
    for (uint32_t j = lane; j < words; j += 32)
      if (m[j] != epk_selftest_word(i, j)) atomicAdd(bad, 1ull);
    __syncwarp();
    if ((i + 1) % chunk == 0 || i + 1 == n) {
      if (lane == 0) ok = epk::stream::release(back, remote_credit, i + 1, d, 0) ? 1 : 0;
      if (!__shfl_sync(0xffffffffu, ok, 0)) return;
    }
  }
}

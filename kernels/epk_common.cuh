// Common device helpers shared by every epkern kernel: fixed-width types without the C library
// (NVRTC has no <cstdint>), memory-ordering primitives with explicit scope, and the error record
// that a kernel fills in host-mapped memory before it gives up on a wait.
#pragma once
#include "epk_constants.cuh"

typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;

#define EPK_DEVICE __device__ __forceinline__

namespace epk {

// ---- memory ordering (PTX scopes: .gpu for one device, .sys for peers and the host) ----
EPK_DEVICE int ld_acquire_sys(const int *p) {
  int v;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
EPK_DEVICE int ld_acquire_gpu(const int *p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
EPK_DEVICE void st_release_sys(int *p, int v) {
  asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
EPK_DEVICE void st_release_gpu(int *p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Unsigned 32- and 64-bit forms (FIFO indices, doorbell records and registers).
EPK_DEVICE unsigned ld_acquire_sys(const unsigned *p) {
  unsigned v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
EPK_DEVICE uint64_t ld_acquire_sys(const unsigned long long *p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
EPK_DEVICE void st_release_sys(unsigned *p, unsigned v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
EPK_DEVICE void st_release_sys(unsigned long long *p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
EPK_DEVICE void st_relaxed_sys(int *p, int v) {
  asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
EPK_DEVICE int atomic_add_release_sys(int *p, int v) {
  int old;
  asm volatile("atom.add.release.sys.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
EPK_DEVICE unsigned atomic_add_acq_rel_gpu(unsigned *p, unsigned v) {
  unsigned old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// ---- wall clock for deadlines (globaltimer counts nanoseconds) ----
EPK_DEVICE uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// ---- error record, in host-mapped memory; the first failing thread claims it ----
// Layout mirrored by epkern/_errors_record.py: {claimed, code, rank, phase, peer, seen, expected, pad}.
struct ErrorRecord {
  int claimed;
  int code;
  int rank;
  int phase;
  int peer;
  int seen;
  int expected;
  int started;  // epoch of the last kernel that began (see mark_started); not part of the error
};
static_assert(sizeof(ErrorRecord) == EPK_ERROR_RECORD_BYTES, "the host allocates EPK_ERROR_RECORD_BYTES");

// Lets the host tell "a peer never answered" from "this call's kernel never ran" when a wait expires.
EPK_DEVICE void mark_started(ErrorRecord *rec, int epoch) {
  if (rec != nullptr && blockIdx.x == 0 && threadIdx.x == 0) st_relaxed_sys(&rec->started, epoch);
}

enum ErrorCode : int {
  kOk = 0,
  kTimeout = EPK_ERR_CODE_TIMEOUT,
  kBadIndex = EPK_ERR_CODE_BAD_INDEX,
  kOverflow = EPK_ERR_CODE_OVERFLOW
};

// The code is stored last, after a system fence: a host that sees the record claimed with code 0 reads it again
// later (on the H100 a host poll read a claimed record before its fields: "error code 0 (peer 0, ...)").
EPK_DEVICE void report_error(ErrorRecord *rec, int code, int rank, int phase, int peer, int seen, int expected) {
  if (rec == nullptr) return;
  if (atomicCAS(&rec->claimed, 0, 1) != 0) return;
  rec->rank = rank;
  rec->phase = phase;
  rec->peer = peer;
  rec->seen = seen;
  rec->expected = expected;
  __threadfence_system();
  st_release_sys(&rec->code, code);
}

// True once *flag has reached `target` (wrap-safe: epochs only grow, compared as a signed difference).
EPK_DEVICE bool reached(int value, int target) {
  return static_cast<int>(static_cast<unsigned>(value) - static_cast<unsigned>(target)) >= 0;
}

// Spin until *flag reaches `target` (acquire, system scope) or the deadline passes; on expiry record
// (rank, phase, peer, value seen, expected) and return false. Every device-side wait goes through here.
struct Deadline {
  ErrorRecord *rec;
  int rank;
  uint64_t timeout_ns;
};

// `sleep_ns` > 0: __nanosleep between polls after the first 32 (waiters in the hundreds per rank, e.g. the internode
// combine's reducer warps, otherwise flood the memory system the data they wait for travels through).
EPK_DEVICE bool wait_reached(const int *flag, int target, const Deadline &d, int phase, int peer,
                             unsigned sleep_ns = 0) {
  int v = ld_acquire_sys(flag);
  if (reached(v, target)) return true;
  const uint64_t start = now_ns();
  for (unsigned iter = 1;; ++iter) {
    if (sleep_ns > 0 && iter >= 32u) __nanosleep(sleep_ns);
    v = ld_acquire_sys(flag);
    if (reached(v, target)) return true;
    if ((iter & 255u) == 0) {
      if (now_ns() - start > d.timeout_ns) {
        report_error(d.rec, kTimeout, d.rank, phase, peer, v, target);
        return false;
      }
      // Another thread of this rank already gave up: stop too rather than wait out a second deadline.
      if (d.rec != nullptr && *reinterpret_cast<volatile int *>(&d.rec->claimed) != 0) return false;
    }
  }
}

// ---- bf16 data (HT and LL kernels) ----
// bf16 <-> float without cuda_bf16.h conversions in the hot loop: exact widening, RNE narrowing.
EPK_DEVICE float bf16_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
EPK_DEVICE float bf16_hi(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }
EPK_DEVICE uint32_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN stays NaN
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
EPK_DEVICE uint32_t pack_bf16(float lo, float hi) { return f32_to_bf16_bits(lo) | (f32_to_bf16_bits(hi) << 16); }

// acc[0..8) += the 8 bf16 values of v (float32, round-to-nearest adds in element order).
EPK_DEVICE void add_bf16x8(float (&acc)[8], const int4 &v) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[2 * j] = __fadd_rn(acc[2 * j], bf16_lo(w[j]));
    acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], bf16_hi(w[j]));
  }
}

EPK_DEVICE int4 pack_bf16x8(const float (&acc)[8]) {
  int4 o;
  o.x = static_cast<int>(pack_bf16(acc[0], acc[1]));
  o.y = static_cast<int>(pack_bf16(acc[2], acc[3]));
  o.z = static_cast<int>(pack_bf16(acc[4], acc[5]));
  o.w = static_cast<int>(pack_bf16(acc[6], acc[7]));
  return o;
}

// 16-byte load of data read once (no L1 allocation, read-only path).
EPK_DEVICE int4 ld_nc_v4(const int4 *p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The 8 bf16 values of v as float32 (exact).
EPK_DEVICE void unpack_bf16x8(const int4 &v, float (&f)[8]) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = bf16_lo(w[j]);
    f[2 * j + 1] = bf16_hi(w[j]);
  }
}

}  // namespace epk

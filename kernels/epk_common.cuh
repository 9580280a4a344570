// Common device helpers shared by every epkern kernel: fixed-width types without the C library
// (NVRTC has no <cstdint>), memory-ordering primitives with explicit scope, and the error record
// that a kernel fills in host-mapped memory before it gives up on a wait.
#pragma once

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

// Lets the host tell "a peer never answered" from "this call's kernel never ran" when a wait expires.
EPK_DEVICE void mark_started(ErrorRecord *rec, int epoch) {
  if (rec != nullptr && blockIdx.x == 0 && threadIdx.x == 0) st_relaxed_sys(&rec->started, epoch);
}

enum ErrorCode : int { kOk = 0, kTimeout = 1, kBadIndex = 2, kOverflow = 3 };

EPK_DEVICE void report_error(ErrorRecord *rec, int code, int rank, int phase, int peer, int seen,
                             int expected) {
  if (rec == nullptr) return;
  if (atomicCAS(&rec->claimed, 0, 1) != 0) return;
  rec->code = code;
  rec->rank = rank;
  rec->phase = phase;
  rec->peer = peer;
  rec->seen = seen;
  rec->expected = expected;
  __threadfence_system();
}

// True once *flag has reached `target` (wrap-safe: epochs only grow, compared as a signed difference).
EPK_DEVICE bool reached(int value, int target) { return static_cast<int>(static_cast<unsigned>(value) -
                                                                         static_cast<unsigned>(target)) >= 0; }

// Spin until *flag reaches `target` (acquire, system scope) or the deadline passes; on expiry record
// (rank, phase, peer, value seen, expected) and return false. Every device-side wait goes through here.
struct Deadline {
  ErrorRecord *rec;
  int rank;
  uint64_t timeout_ns;
};

EPK_DEVICE bool wait_reached(const int *flag, int target, const Deadline &d, int phase, int peer) {
  int v = ld_acquire_sys(flag);
  if (reached(v, target)) return true;
  const uint64_t start = now_ns();
  for (unsigned iter = 1;; ++iter) {
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

}  // namespace epk

// The emulated NIC's fetch-and-add on GPU-visible memory (src/epkern/nic/device_memory.py): one thread adds
// `add` to the 64-bit word at `target` at system scope (atomic against device code of every process sharing
// the GPU, e.g. MPS clients of an IPC-opened allocation) and stores the old value at `old`.
// No specialisation defines are needed.
extern "C" __global__ void epk_nic_fetch_add64(unsigned long long *target, unsigned long long add,
                                               unsigned long long *old) {
  *old = atomicAdd_system(target, add);
}

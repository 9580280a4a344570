// bench/bench_p2p.py's SM copy: the GPU running it pulls `n` 16-byte vectors from `src` (another GPU's memory,
// peer access enabled) into its own `dst`, grid-stride. No specialisation defines are needed.
extern "C" __global__ void epk_bench_pull(const int4 *__restrict__ src, int4 *__restrict__ dst, long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[i];
}

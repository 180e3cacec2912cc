// Runs CUDA kernels on the CPU for tests/test_cuda_kernels_on_cpu.py: each block is one OS thread
// per CUDA thread with __syncthreads() as a barrier and __shared__ variables as statics (blocks run
// one at a time), so the kernels' own indexing, reductions and atomics execute without a GPU; a
// launch past the dynamic shared memory the kernel may use (48 KB, or what it opted in to through
// cudaFuncSetAttribute) fails. Included first by the test's copies of kernels/*.cu and *.cuh, in
// which the test rewrote
//   kernel<<<grid, block, smem, stream>>>(args)  into  ::emu::launch(kernel, grid, block, smem, stream)(args)
//   extern __shared__ T name[];                   into  static T name[kSharedBytes / sizeof(T)];
// What it cannot show: timing, memory-model races between blocks, warp-level behaviour.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

inline thread_local uint3 thread_idx, block_idx;
inline thread_local dim3 block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;

constexpr size_t kDefaultSharedBytes = 48 * 1024;  // dynamic shared memory without opting in
constexpr size_t kSharedBytes = 227 * 1024;        // the most a kernel may opt in to (sm_90)
// per kernel, the dynamic shared memory it opted in to (cudaFuncSetAttribute)
inline std::map<const void*, size_t> opted_in_shared;

inline cudaError_t set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || static_cast<size_t>(value) > kSharedBytes) {
    return cudaErrorInvalidValue;
  }
  opted_in_shared[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}

template <typename Kernel>
auto launch(Kernel kernel, unsigned grid, unsigned block, size_t smem, cudaStream_t) {
  const auto opted = opted_in_shared.find(reinterpret_cast<const void*>(kernel));
  const size_t smem_limit = opted == opted_in_shared.end() ? kDefaultSharedBytes : opted->second;
  return [=](auto... args) {
    if (grid == 0 || block == 0 || block > 1024 || smem > smem_limit) {
      std::fprintf(stderr, "emu: invalid launch grid=%u block=%u smem=%zu\n", grid, block, smem);
      std::exit(3);
    }
    // one OS thread per thread of a block, running the blocks one after the other: the barrier
    // after each block keeps the static "__shared__" memory to one block at a time
    std::barrier<> barrier(block);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        thread_idx = {t, 0, 0};
        block_dim = dim3(block);
        grid_dim = dim3(grid);
        block_barrier = &barrier;
        for (unsigned b = 0; b < grid; ++b) {
          block_idx = {b, 0, 0};
          kernel(args...);
          barrier.arrive_and_wait();
        }
      });
    }
    for (std::thread& th : threads) th.join();
  };
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { ::emu::block_barrier->arrive_and_wait(); }
inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

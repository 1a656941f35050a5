// GPU side of the copy engine: token-slice gather/scatter between device tensors and pinned
// host memory on a side stream, so swaps overlap the next layer's compute.
//
// Layout (same convention as copy_engine.cpp): a contiguous tensor viewed as
// [outer, full_len, inner_bytes]; ranges [start, start+len) along the middle dim are packed
// back to back into a buffer [outer, total, inner_bytes].
//
// Two paths:
//   * DMA: one cudaMemcpy2DAsync per range (the hardware copy engines do the strided walk;
//     the host side must be pinned for the copy to be asynchronous).
//   * kernel: a device-side pack/unpack into a contiguous device staging buffer, followed by
//     one large contiguous transfer (better when there are many short ranges).
// Completion is an event recorded on the side stream; the compute stream waits on it only
// where the data is needed (cudaStreamWaitEvent), never on the whole side stream.
//
// Pure CUDA runtime API (no torch headers): compile-checked with nvcc in the test suite.
// The torch binding is csrc/copy_engine_cuda.cpp, built with this file into the same
// extension (setup.py's CUDAExtension, -DDISTTRAIN_WITH_CUDA) where torch has CUDA and nvcc
// exists. Events are optional (nullptr: the caller orders the streams itself).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace disttrain {

struct SliceLayout {
  int64_t outer;        // product of the dims before the token dim
  int64_t full_len;     // tokens in the full tensor
  int64_t inner_bytes;  // bytes of one token's row (product of the dims after, times itemsize)
};

// Buffer byte offset -> tensor byte offset, one thread per 16-byte word (inner_bytes % 16 == 0)
// or per byte otherwise. range_starts/range_cum are device arrays of num_ranges entries;
// range_cum[i] = tokens of the ranges before i, total = tokens of all ranges.
template <typename Word>
__global__ void pack_slices_kernel(const char* __restrict__ full, char* __restrict__ packed,
                                   SliceLayout layout, const int64_t* __restrict__ range_starts,
                                   const int64_t* __restrict__ range_cum, int num_ranges,
                                   int64_t total, bool to_packed) {
  const int64_t words_per_token = layout.inner_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t count = layout.outer * total * words_per_token;
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; w < count;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t word_in_token = w % words_per_token;
    const int64_t token = (w / words_per_token) % total;
    const int64_t row = w / (words_per_token * total);
    int lo = 0, hi = num_ranges - 1;  // last range whose cum <= token
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (range_cum[mid] <= token) lo = mid; else hi = mid - 1;
    }
    const int64_t src_token = range_starts[lo] + (token - range_cum[lo]);
    Word* full_word = reinterpret_cast<Word*>(const_cast<char*>(full)) +
                      (row * layout.full_len + src_token) * words_per_token + word_in_token;
    Word* packed_word = reinterpret_cast<Word*>(packed) + w;
    if (to_packed) *packed_word = *full_word; else *full_word = *packed_word;
  }
}

struct alignas(16) Word16 { uint4 v; };

static cudaError_t launch_pack(const char* full, char* packed, SliceLayout layout,
                               const int64_t* d_starts, const int64_t* d_cum, int num_ranges,
                               int64_t total, bool to_packed, cudaStream_t stream) {
  if (num_ranges == 0 || total == 0 || layout.outer == 0) return cudaSuccess;
  const int threads = 256;
  const bool wide = layout.inner_bytes % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(full) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(packed) % 16 == 0;
  const int64_t words = layout.outer * total * (wide ? layout.inner_bytes / 16 : layout.inner_bytes);
  const int blocks = static_cast<int>(words / threads + 1 < 65535 ? words / threads + 1 : 65535);
  if (wide) {
    pack_slices_kernel<Word16><<<blocks, threads, 0, stream>>>(full, packed, layout, d_starts, d_cum,
                                                              num_ranges, total, to_packed);
  } else {
    pack_slices_kernel<char><<<blocks, threads, 0, stream>>>(full, packed, layout, d_starts, d_cum,
                                                            num_ranges, total, to_packed);
  }
  return cudaGetLastError();
}

}  // namespace disttrain

extern "C" {

// Device tensor ranges -> pinned host buffer (DMA path). `ready` is recorded on the compute
// stream when the source is final; the side stream waits for it, copies, records `done`.
cudaError_t disttrain_gather_d2h_async(const void* device_full, void* pinned_packed,
                                       int64_t outer, int64_t full_len, int64_t inner_bytes,
                                       const int64_t* starts, const int64_t* lengths,
                                       int num_ranges, cudaEvent_t ready,
                                       cudaStream_t side_stream, cudaEvent_t done) {
  cudaError_t err = ready ? cudaStreamWaitEvent(side_stream, ready, 0) : cudaSuccess;
  if (err != cudaSuccess) return err;
  int64_t total = 0;
  for (int i = 0; i < num_ranges; ++i) total += lengths[i];
  int64_t cum = 0;
  for (int i = 0; i < num_ranges; ++i) {
    if (lengths[i] > 0 && outer > 0) {
      err = cudaMemcpy2DAsync(static_cast<char*>(pinned_packed) + cum * inner_bytes,
                              static_cast<size_t>(total * inner_bytes),
                              static_cast<const char*>(device_full) + starts[i] * inner_bytes,
                              static_cast<size_t>(full_len * inner_bytes),
                              static_cast<size_t>(lengths[i] * inner_bytes),
                              static_cast<size_t>(outer), cudaMemcpyDeviceToHost, side_stream);
      if (err != cudaSuccess) return err;
    }
    cum += lengths[i];
  }
  return done ? cudaEventRecord(done, side_stream) : cudaSuccess;
}

// Pinned host buffer -> device tensor ranges (the prefetch before a layer's backward).
cudaError_t disttrain_scatter_h2d_async(const void* pinned_packed, void* device_full,
                                        int64_t outer, int64_t full_len, int64_t inner_bytes,
                                        const int64_t* starts, const int64_t* lengths,
                                        int num_ranges, cudaStream_t side_stream,
                                        cudaEvent_t done) {
  int64_t total = 0;
  for (int i = 0; i < num_ranges; ++i) total += lengths[i];
  int64_t cum = 0;
  for (int i = 0; i < num_ranges; ++i) {
    if (lengths[i] > 0 && outer > 0) {
      cudaError_t err = cudaMemcpy2DAsync(
          static_cast<char*>(device_full) + starts[i] * inner_bytes,
          static_cast<size_t>(full_len * inner_bytes),
          static_cast<const char*>(pinned_packed) + cum * inner_bytes,
          static_cast<size_t>(total * inner_bytes), static_cast<size_t>(lengths[i] * inner_bytes),
          static_cast<size_t>(outer), cudaMemcpyHostToDevice, side_stream);
      if (err != cudaSuccess) return err;
    }
    cum += lengths[i];
  }
  return done ? cudaEventRecord(done, side_stream) : cudaSuccess;
}

// Device-side pack (to_packed=1) or unpack (0) between a tensor's ranges and a contiguous
// device staging buffer; d_starts/d_cum are device arrays (see pack_slices_kernel).
cudaError_t disttrain_pack_slices_device(const void* device_full, void* device_packed,
                                         int64_t outer, int64_t full_len, int64_t inner_bytes,
                                         const int64_t* d_starts, const int64_t* d_cum,
                                         int num_ranges, int64_t total, int to_packed,
                                         cudaStream_t stream) {
  disttrain::SliceLayout layout{outer, full_len, inner_bytes};
  return disttrain::launch_pack(static_cast<const char*>(device_full),
                                static_cast<char*>(device_packed), layout, d_starts, d_cum,
                                num_ranges, total, to_packed != 0, stream);
}

}  // extern "C"

// Torch binding of the CUDA token-slice copies in csrc/copy_engine.cu, registered into the
// copy engine's module (`offload._copy_engine`) by `bind_cuda`. Compiled to nothing unless
// DISTTRAIN_WITH_CUDA is defined (setup.py defines it in the CUDAExtension it builds where
// torch has CUDA and nvcc exists), so the CPU-only CppExtension can glob csrc/*.cpp.
//
// Every function queues its copies on the *current* CUDA stream of the tensor's device and
// returns at once; the caller chooses the stream (the device's copy stream) and orders it
// against compute with events (disttrain.device). Host buffers must be pinned, so the DMA is
// asynchronous.
#ifdef DISTTRAIN_WITH_CUDA

// The ATen pieces used and torch's pybind11 casters for at::Tensor, not <torch/extension.h>
// (all of libtorch's C++ API): the binding compiles in well under half the time.
#include <ATen/WrapDimUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <vector>

extern "C" {
cudaError_t disttrain_gather_d2h_async(const void* device_full, void* pinned_packed,
                                       int64_t outer, int64_t full_len, int64_t inner_bytes,
                                       const int64_t* starts, const int64_t* lengths,
                                       int num_ranges, cudaEvent_t ready,
                                       cudaStream_t side_stream, cudaEvent_t done);
cudaError_t disttrain_scatter_h2d_async(const void* pinned_packed, void* device_full,
                                        int64_t outer, int64_t full_len, int64_t inner_bytes,
                                        const int64_t* starts, const int64_t* lengths,
                                        int num_ranges, cudaStream_t side_stream,
                                        cudaEvent_t done);
cudaError_t disttrain_pack_slices_device(const void* device_full, void* device_packed,
                                         int64_t outer, int64_t full_len, int64_t inner_bytes,
                                         const int64_t* d_starts, const int64_t* d_cum,
                                         int num_ranges, int64_t total, int to_packed,
                                         cudaStream_t stream);
}

namespace {

struct Layout {
  int64_t outer;
  int64_t full_len;
  int64_t inner_bytes;
  int64_t total;  // tokens of all ranges
};

// Checks shapes and ranges (as the CPU engine's gather/scatter do) and returns the layout of
// `full` viewed as [outer, full_len, inner_bytes] around `dim`.
Layout check_layout(const at::Tensor& full, int64_t dim, const std::vector<int64_t>& starts,
                    const std::vector<int64_t>& lengths, const at::Tensor& packed) {
  TORCH_CHECK(full.is_contiguous() && packed.is_contiguous(),
              "cuda gather/scatter need contiguous tensors");
  TORCH_CHECK(full.scalar_type() == packed.scalar_type(), "cuda gather/scatter: dtypes differ");
  TORCH_CHECK(starts.size() == lengths.size(), "starts and lengths differ in length");
  TORCH_CHECK(full.dim() == packed.dim(), "cuda gather/scatter: ranks differ");
  dim = at::maybe_wrap_dim(dim, full.dim());
  Layout layout{1, full.size(dim), full.element_size(), 0};
  for (size_t i = 0; i < starts.size(); ++i) {
    TORCH_CHECK(starts[i] >= 0 && lengths[i] >= 0 && starts[i] + lengths[i] <= full.size(dim),
                "range ", i, " out of bounds for dim ", dim);
    layout.total += lengths[i];
  }
  for (int64_t d = 0; d < full.dim(); ++d) {
    TORCH_CHECK(packed.size(d) == (d == dim ? layout.total : full.size(d)),
                "buffer shape does not match the ranges");
    if (d < dim) layout.outer *= full.size(d);
    if (d > dim) layout.inner_bytes *= full.size(d);
  }
  return layout;
}

// Device tensor ranges -> pinned host buffer, DMA (cudaMemcpy2DAsync per range).
void gather_d2h(const at::Tensor& full, int64_t dim, const std::vector<int64_t>& starts,
                const std::vector<int64_t>& lengths, const at::Tensor& packed) {
  TORCH_CHECK(full.is_cuda(), "gather_d2h: the source must be a CUDA tensor");
  TORCH_CHECK(packed.is_cpu() && packed.is_pinned(), "gather_d2h: the buffer must be pinned host memory");
  Layout l = check_layout(full, dim, starts, lengths, packed);
  c10::cuda::CUDAGuard guard(full.device());
  C10_CUDA_CHECK(disttrain_gather_d2h_async(
      full.data_ptr(), packed.data_ptr(), l.outer, l.full_len, l.inner_bytes, starts.data(),
      lengths.data(), static_cast<int>(starts.size()), nullptr,
      c10::cuda::getCurrentCUDAStream(full.device().index()).stream(), nullptr));
}

// Pinned host buffer -> device tensor ranges, DMA.
void scatter_h2d(const at::Tensor& packed, int64_t dim, const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& lengths, const at::Tensor& full) {
  TORCH_CHECK(full.is_cuda(), "scatter_h2d: the destination must be a CUDA tensor");
  TORCH_CHECK(packed.is_cpu() && packed.is_pinned(), "scatter_h2d: the buffer must be pinned host memory");
  Layout l = check_layout(full, dim, starts, lengths, packed);
  c10::cuda::CUDAGuard guard(full.device());
  C10_CUDA_CHECK(disttrain_scatter_h2d_async(
      packed.data_ptr(), full.data_ptr(), l.outer, l.full_len, l.inner_bytes, starts.data(),
      lengths.data(), static_cast<int>(starts.size()),
      c10::cuda::getCurrentCUDAStream(full.device().index()).stream(), nullptr));
}

// Device tensor ranges <-> contiguous device buffer with the pack kernel (to_packed: gather).
void pack_slices(const at::Tensor& full, int64_t dim, const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& lengths, const at::Tensor& packed, bool to_packed) {
  TORCH_CHECK(full.is_cuda() && packed.is_cuda() && full.device() == packed.device(),
              "pack_slices: both tensors on the same CUDA device");
  Layout l = check_layout(full, dim, starts, lengths, packed);
  const int64_t n = static_cast<int64_t>(starts.size());
  if (n == 0 || l.total == 0) return;
  // starts and cumulative lengths, through pinned memory so the upload is stream-ordered
  at::Tensor host = at::empty({2, n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t cum = 0;
  for (int64_t i = 0; i < n; ++i) {
    h[i] = starts[i];
    h[n + i] = cum;
    cum += lengths[i];
  }
  c10::cuda::CUDAGuard guard(full.device());
  at::Tensor ranges = host.to(full.device(), /*non_blocking=*/true);
  const int64_t* d = ranges.data_ptr<int64_t>();
  C10_CUDA_CHECK(disttrain_pack_slices_device(
      full.data_ptr(), packed.data_ptr(), l.outer, l.full_len, l.inner_bytes, d, d + n,
      static_cast<int>(n), l.total, to_packed ? 1 : 0,
      c10::cuda::getCurrentCUDAStream(full.device().index()).stream()));
}

}  // namespace

void bind_cuda(pybind11::module& m) {
  m.def("gather_d2h", &gather_d2h, "ranges of a CUDA tensor -> pinned host buffer (current stream)");
  m.def("scatter_h2d", &scatter_h2d, "pinned host buffer -> ranges of a CUDA tensor (current stream)");
  m.def("pack_slices", &pack_slices, "ranges of a CUDA tensor <-> contiguous CUDA buffer (kernel)");
}

#endif  // DISTTRAIN_WITH_CUDA

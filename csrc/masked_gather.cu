// CUDA implementation of the masked-token gather/scatter (schema in masked_gather.cpp).
// Rows are moved as raw bytes in the widest vector (16, 8, 4, 2 or 1 bytes) that the row size and the
// pointers' alignment allow, so bf16 rows of 64+ elements move in 16-byte accesses.
#include "masked_gather.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

namespace vtp_fast {
namespace {

constexpr int kThreads = 256;

template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ src, V* __restrict__ dst,
                                   const int64_t* __restrict__ index, int64_t src_rows, int64_t m_rows,
                                   int64_t row_vecs) {
  const int64_t total = m_rows * row_vecs;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total; i += stride) {
    const int64_t m = i / row_vecs;
    const int64_t r = index[m];
    CUDA_KERNEL_ASSERT(r >= 0 && r < src_rows);  // checking on the host would sync; the CPU op checks there
    dst[i] = src[r * row_vecs + (i - m * row_vecs)];
  }
}

// dst row r = src row pos[r] when pos[r] >= 0, else the fill row (zeros when fill is null).
template <typename V>
__global__ void scatter_rows_kernel(const V* __restrict__ src, V* __restrict__ dst,
                                    const int64_t* __restrict__ pos, const V* __restrict__ fill,
                                    int64_t rows, int64_t row_vecs) {
  const int64_t total = rows * row_vecs;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / row_vecs;
    const int64_t c = i - r * row_vecs;
    const int64_t p = pos[r];
    V v{};
    if (p >= 0) {
      v = src[p * row_vecs + c];
    } else if (fill != nullptr) {
      v = fill[c];
    }
    dst[i] = v;
  }
}

// Widest access width (bytes) that divides the row size and every pointer's address.
int vector_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = row_bytes % w == 0;
    for (const void* p : ptrs) ok = ok && (p == nullptr || reinterpret_cast<std::uintptr_t>(p) % w == 0);
    if (ok) return w;
  }
  return 1;
}

int64_t grid_for(int64_t total, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{sms} * 32));
}

// Calls f.template operator()<V>() with V the unsigned type of `bytes` bytes.
template <typename F>
void dispatch_vector(int bytes, F&& f) {
  switch (bytes) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

}  // namespace

at::Tensor masked_gather_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_masked_gather_args(x, index);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m_rows = index.size(0);
  auto out = at::empty({m_rows, x.size(1)}, x.options());
  const int64_t row_bytes = x.size(1) * x.element_size();
  if (m_rows == 0 || row_bytes == 0) return out;
  const int bytes = vector_bytes(row_bytes, {x.data_ptr(), out.data_ptr()});
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_vector(bytes, [&](auto tag) {
    using V = decltype(tag);
    const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
    gather_rows_kernel<V><<<grid_for(m_rows * row_vecs, x.get_device()), kThreads, 0, stream>>>(
        static_cast<const V*>(x.data_ptr()), static_cast<V*>(out.data_ptr()), index.data_ptr<int64_t>(),
        x.size(0), m_rows, row_vecs);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor masked_scatter_cuda(const at::Tensor& src, const at::Tensor& index,
                               const c10::optional<at::Tensor>& fill, int64_t num_rows) {
  check_masked_scatter_args(src, index, fill, num_rows);
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t dim = src.size(1), m_rows = index.size(0);
  auto out = at::empty({num_rows, dim}, src.options());
  const int64_t row_bytes = dim * src.element_size();
  if (num_rows == 0 || row_bytes == 0) return out;
  // pos[r] = m where index[m] == r, else -1: one pass then writes every output row exactly once.
  auto pos = at::full({num_rows}, -1, index.options());
  pos.index_put_({index}, at::arange(m_rows, index.options()));
  const void* fill_ptr = fill.has_value() ? fill->data_ptr() : nullptr;
  const int bytes = vector_bytes(row_bytes, {src.data_ptr(), out.data_ptr(), fill_ptr});
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_vector(bytes, [&](auto tag) {
    using V = decltype(tag);
    const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
    scatter_rows_kernel<V><<<grid_for(num_rows * row_vecs, src.get_device()), kThreads, 0, stream>>>(
        static_cast<const V*>(src.data_ptr()), static_cast<V*>(out.data_ptr()), pos.data_ptr<int64_t>(),
        static_cast<const V*>(fill_ptr), num_rows, row_vecs);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(vtp_fast, CUDA, m) {
  m.impl("masked_gather", &masked_gather_cuda);
  m.impl("masked_scatter", &masked_scatter_cuda);
}

}  // namespace vtp_fast

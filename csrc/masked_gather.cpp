// CPU (ATen parallel_for, OpenMP in torch builds) implementation and the schema of the masked-token ops.
#include "masked_gather.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace vtp_fast {

namespace {

void check_rows_and_index(const at::Tensor& x, const at::Tensor& index, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be (rows, dim), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              op, ": index must be a 1-D int64 tensor, got ", index.scalar_type(), index.sizes());
  TORCH_CHECK(index.is_contiguous(), op, ": index must be contiguous");
  TORCH_CHECK(index.device() == x.device(), op, ": index is on ", index.device(), ", ", name, " on ", x.device());
}

}  // namespace

void check_masked_gather_args(const at::Tensor& x, const at::Tensor& index) {
  check_rows_and_index(x, index, "masked_gather", "x");
}

void check_masked_scatter_args(const at::Tensor& src, const at::Tensor& index,
                               const c10::optional<at::Tensor>& fill, int64_t num_rows) {
  check_rows_and_index(src, index, "masked_scatter", "src");
  TORCH_CHECK(index.size(0) == src.size(0), "masked_scatter: index has ", index.size(0), " rows, src ",
              src.size(0));
  TORCH_CHECK(num_rows >= src.size(0), "masked_scatter: num_rows=", num_rows, " < ", src.size(0),
              " packed rows");
  if (fill.has_value()) {
    const auto& f = *fill;
    TORCH_CHECK(f.dim() == 1 && f.size(0) == src.size(1), "masked_scatter: fill must be (", src.size(1),
                ",), got ", f.sizes());
    TORCH_CHECK(f.scalar_type() == src.scalar_type() && f.device() == src.device(),
                "masked_scatter: fill must match src in dtype and device");
    TORCH_CHECK(f.is_contiguous(), "masked_scatter: fill must be contiguous");
  }
}

namespace {

constexpr int64_t kGrainRows = 256;

void check_index_range_cpu(const at::Tensor& index, int64_t rows, const char* op) {
  if (index.numel() == 0) return;
  const auto lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < rows, op, ": index out of range [0, ", rows, "): min ", lo, ", max ", hi);
}

at::Tensor masked_gather_cpu(const at::Tensor& x, const at::Tensor& index) {
  check_masked_gather_args(x, index);
  check_index_range_cpu(index, x.size(0), "masked_gather");
  const int64_t m_rows = index.size(0);
  auto out = at::empty({m_rows, x.size(1)}, x.options());
  const int64_t row_bytes = x.size(1) * x.element_size();
  const auto* src = static_cast<const char*>(x.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const auto* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, m_rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) std::memcpy(dst + m * row_bytes, src + idx[m] * row_bytes, row_bytes);
  });
  return out;
}

at::Tensor masked_scatter_cpu(const at::Tensor& src, const at::Tensor& index,
                              const c10::optional<at::Tensor>& fill, int64_t num_rows) {
  check_masked_scatter_args(src, index, fill, num_rows);
  check_index_range_cpu(index, num_rows, "masked_scatter");
  const int64_t dim = src.size(1), m_rows = index.size(0);
  auto out = fill.has_value() ? fill->unsqueeze(0).expand({num_rows, dim}).contiguous()
                              : at::zeros({num_rows, dim}, src.options());
  const int64_t row_bytes = dim * src.element_size();
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(out.data_ptr());
  const auto* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, m_rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) std::memcpy(d + idx[m] * row_bytes, s + m * row_bytes, row_bytes);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vtp_fast, m) {
  m.def("masked_gather(Tensor x, Tensor index) -> Tensor");
  m.def("masked_scatter(Tensor src, Tensor index, Tensor? fill, int num_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(vtp_fast, CPU, m) {
  m.impl("masked_gather", &masked_gather_cpu);
  m.impl("masked_scatter", &masked_scatter_cpu);
}

}  // namespace vtp_fast

// Masked-token gather/scatter: move rows of a (rows, dim) token buffer to and from a packed buffer.
//
//   masked_gather(x (R, D), index (M,) int64)                      -> (M, D)   out[m] = x[index[m]]
//   masked_scatter(src (M, D), index (M,) int64, fill (D,)?, R)    -> (R, D)   out[index[m]] = src[m],
//                                                                             every other row = fill (or 0)
// `index` holds distinct row ids in [0, R) (the flattened (sample, token) positions of the visible or the
// masked tokens, in order). Rows are copied as raw bytes, so every dtype is supported.
#pragma once
#include <ATen/ATen.h>

namespace vtp_fast {

void check_masked_gather_args(const at::Tensor& x, const at::Tensor& index);
void check_masked_scatter_args(const at::Tensor& src, const at::Tensor& index,
                               const c10::optional<at::Tensor>& fill, int64_t num_rows);

#ifdef VTP_FAST_WITH_CUDA
at::Tensor masked_gather_cuda(const at::Tensor& x, const at::Tensor& index);
at::Tensor masked_scatter_cuda(const at::Tensor& src, const at::Tensor& index,
                               const c10::optional<at::Tensor>& fill, int64_t num_rows);
#endif

}  // namespace vtp_fast

// Pixel-shuffle and the fused pixel-shuffle + L1 loss: what pixel_shuffle_l1.cpp (the schema, the checks, the CPU
// implementation; the semantics are written there) and pixel_shuffle_l1.cu (CUDA) share.
//
//   pixel_shuffle(tokens (B, h*w, 3*p*p), h, w, p)           -> image (B, 3, h*p, w*p)
//   pixel_shuffle_l1(tokens, target (B, 3, h*p, w*p), p)    -> () mean |image - target|
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <type_traits>

namespace vtp_fast {

void check_pixel_shuffle_args(const at::Tensor& tokens, int64_t h, int64_t w, int64_t patch);
void check_pixel_shuffle_l1_args(const at::Tensor& tokens, const at::Tensor& target, int64_t patch);
at::ScalarType pixel_shuffle_l1_loss_dtype(const at::Tensor& tokens);

// Calls f(T{}, U{}) for the tokens' type T and the target's type U (a pair check_pixel_shuffle_l1_args allows).
template <typename F>
void dispatch_pair(const at::Tensor& tokens, const at::Tensor& target, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "pixel_shuffle_l1", [&] {
    using T = scalar_t;
    if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
      if (target.scalar_type() == at::kFloat) return f(T{}, float{});
    }
    f(T{}, T{});
  });
}

}  // namespace vtp_fast

// Pixel-shuffle of decoder tokens into the image, and the L1 loss against a target image fused with it:
// the schema of the ops, their argument checks (declared in pixel_shuffle_l1.h) and the CPU implementation
// (ATen parallel_for, OpenMP in torch builds).
//
//   pixel_shuffle(tokens (B, h*w, 3*p*p), h, w, p)           -> image (B, 3, h*p, w*p)
//   pixel_shuffle_l1(tokens, target (B, 3, h*p, w*p), p)    -> () mean |image - target|
//   pixel_shuffle_l1_backward(grad (), tokens, target, p, need_tokens, need_target)
//                                                            -> (grad_tokens (B, h*w, 3*p*p) or (0,),
//                                                                grad_target (B, 3, h*p, w*p) or (0,))
// Channel c*p*p + i*p + j of token (y, x) is pixel (c, y*p + i, x*p + j). The loss never writes the image: it
// reads both inputs once, summing |diff| per fixed block of image rows (deterministic for a given shape, no
// atomics). grad_tokens = sign(tokens - unshuffled target) * grad / numel (sign(0) = 0, as torch), grad_target
// = -that in image layout; the backward re-reads the inputs instead of saving anything. Dtypes: target has the
// tokens' dtype, or is float32 with half/bfloat16 tokens; the loss is float32 (float64 for float64 inputs).
#include "pixel_shuffle_l1.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace vtp_fast {

void check_pixel_shuffle_args(const at::Tensor& tokens, int64_t h, int64_t w, int64_t patch) {
  TORCH_CHECK(patch >= 1, "pixel_shuffle: patch must be >= 1, got ", patch);
  TORCH_CHECK(h >= 0 && w >= 0, "pixel_shuffle: grid must be non-negative, got ", h, "x", w);
  TORCH_CHECK(tokens.dim() == 3 && tokens.size(1) == h * w && tokens.size(2) == 3 * patch * patch,
              "pixel_shuffle: tokens must be (B, h*w=", h * w, ", 3*p*p=", 3 * patch * patch, "), got ",
              tokens.sizes());
  TORCH_CHECK(tokens.is_contiguous(), "pixel_shuffle: tokens must be contiguous");
}

void check_pixel_shuffle_l1_args(const at::Tensor& tokens, const at::Tensor& target, int64_t patch) {
  TORCH_CHECK(patch >= 1, "pixel_shuffle_l1: patch must be >= 1, got ", patch);
  TORCH_CHECK(tokens.dim() == 3 && tokens.size(2) == 3 * patch * patch,
              "pixel_shuffle_l1: tokens must be (B, h*w, 3*p*p=", 3 * patch * patch, "), got ", tokens.sizes());
  TORCH_CHECK(target.dim() == 4 && target.size(0) == tokens.size(0) && target.size(1) == 3 &&
                  target.size(2) % patch == 0 && target.size(3) % patch == 0 &&
                  (target.size(2) / patch) * (target.size(3) / patch) == tokens.size(1),
              "pixel_shuffle_l1: target must be (B, 3, h*p, w*p) with h*w = ", tokens.size(1), " tokens, got ",
              target.sizes());
  TORCH_CHECK(tokens.is_contiguous() && target.is_contiguous(), "pixel_shuffle_l1: inputs must be contiguous");
  TORCH_CHECK(tokens.device() == target.device(), "pixel_shuffle_l1: tokens on ", tokens.device(), ", target on ",
              target.device());
  const auto tok = tokens.scalar_type(), tgt = target.scalar_type();
  TORCH_CHECK(tok == at::kFloat || tok == at::kDouble || tok == at::kHalf || tok == at::kBFloat16,
              "pixel_shuffle_l1: unsupported dtype ", tok);
  TORCH_CHECK(tgt == tok || (tgt == at::kFloat && (tok == at::kHalf || tok == at::kBFloat16)),
              "pixel_shuffle_l1: target dtype ", tgt, " with tokens ", tok,
              " (supported: the same dtype, or float32 with half/bfloat16 tokens)");
}

at::ScalarType pixel_shuffle_l1_loss_dtype(const at::Tensor& tokens) {
  return tokens.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// Image geometry: B images of 3 x H x W pixels made of h x w tokens of C = 3*p*p channels.
struct Geom {
  int64_t b, h, w, p, C, H, W;
  Geom(const at::Tensor& tokens, int64_t h_, int64_t w_, int64_t p_)
      : b(tokens.size(0)), h(h_), w(w_), p(p_), C(3 * p_ * p_), H(h_ * p_), W(w_ * p_) {}
  int64_t rows() const { return b * 3 * H; }
  // First tokens element of image row r = (n, c, Y): channel c*p*p + i*p of token (y, 0), Y = y*p + i. The
  // row's pixel x*p + j is that plus x*C + j.
  int64_t token_offset(int64_t r) const {
    const int64_t Y = r % H, c = (r / H) % 3, n = r / (3 * H);
    const int64_t y = Y / p, i = Y - y * p;
    return (n * h * w + y * w) * C + c * p * p + i * p;
  }
};

// Rows per work block, so a block moves ~16K elements whatever the row length; fixed by the shape alone.
int64_t rows_per_block(const Geom& g) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(g.W, 1)); }

template <typename E>  // pure data movement: E is an integer type of the element size
void shuffle_cpu_kernel(const E* tokens, E* image, const Geom& g) {
  at::parallel_for(0, g.rows(), rows_per_block(g), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const E* src = tokens + g.token_offset(r);
      E* dst = image + r * g.W;
      for (int64_t x = 0; x < g.w; ++x, src += g.C, dst += g.p) {
        for (int64_t j = 0; j < g.p; ++j) dst[j] = src[j];
      }
    }
  });
}

at::Tensor pixel_shuffle_cpu(const at::Tensor& tokens, int64_t h, int64_t w, int64_t patch) {
  check_pixel_shuffle_args(tokens, h, w, patch);
  const Geom g(tokens, h, w, patch);
  auto image = at::empty({g.b, 3, g.H, g.W}, tokens.options());
  if (image.numel() == 0) return image;
  const void* src = tokens.data_ptr();
  void* dst = image.data_ptr();
  switch (tokens.element_size()) {
    case 1: shuffle_cpu_kernel(static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), g); break;
    case 2: shuffle_cpu_kernel(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), g); break;
    case 4: shuffle_cpu_kernel(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), g); break;
    case 8: shuffle_cpu_kernel(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), g); break;
    default: TORCH_CHECK(false, "pixel_shuffle: unsupported element size ", tokens.element_size());
  }
  return image;
}

std::tuple<int64_t, int64_t> grid_of(const at::Tensor& target, int64_t patch) {
  return {target.size(2) / patch, target.size(3) / patch};
}

at::Tensor pixel_shuffle_l1_cpu(const at::Tensor& tokens, const at::Tensor& target, int64_t patch) {
  check_pixel_shuffle_l1_args(tokens, target, patch);
  const auto [h, w] = grid_of(target, patch);
  const Geom g(tokens, h, w, patch);
  const int64_t rows = g.rows(), per_block = rows_per_block(g);
  const int64_t blocks = (rows + per_block - 1) / per_block;
  std::vector<double> partials(blocks, 0.0);
  dispatch_pair(tokens, target, [&](auto t_tag, auto u_tag) {
    using T = decltype(t_tag);
    using U = decltype(u_tag);
    using acc_t = at::opmath_type<T>;
    const T* tok = tokens.const_data_ptr<T>();
    const U* tgt = target.const_data_ptr<U>();
    // One partial per fixed block of rows, combined in order below: the result does not depend on threads.
    at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
      for (int64_t blk = bb; blk < be; ++blk) {
        double block_sum = 0;
        for (int64_t r = blk * per_block; r < std::min(rows, (blk + 1) * per_block); ++r) {
          const T* a = tok + g.token_offset(r);
          const U* t = tgt + r * g.W;
          for (int64_t x = 0; x < g.w; ++x, a += g.C, t += g.p) {
            acc_t run = 0;  // one patch row: <= p terms in acc_t, runs added in double
            for (int64_t j = 0; j < g.p; ++j) {
              run += std::abs(static_cast<acc_t>(a[j]) - static_cast<acc_t>(t[j]));
            }
            block_sum += static_cast<double>(run);
          }
        }
        partials[blk] = block_sum;
      }
    });
  });
  double total = 0;
  for (double s : partials) total += s;
  const double numel = static_cast<double>(target.numel());
  return at::scalar_tensor(total / numel, tokens.options().dtype(pixel_shuffle_l1_loss_dtype(tokens)));
}

std::tuple<at::Tensor, at::Tensor> pixel_shuffle_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& tokens,
                                                                 const at::Tensor& target, int64_t patch,
                                                                 bool need_tokens, bool need_target) {
  check_pixel_shuffle_l1_args(tokens, target, patch);
  TORCH_CHECK(grad.numel() == 1, "pixel_shuffle_l1_backward: grad must be a scalar, got ", grad.sizes());
  const auto [h, w] = grid_of(target, patch);
  const Geom g(tokens, h, w, patch);
  auto grad_tokens = need_tokens ? at::empty_like(tokens) : at::empty({0}, tokens.options());
  auto grad_target = need_target ? at::empty_like(target) : at::empty({0}, target.options());
  if ((!need_tokens && !need_target) || target.numel() == 0) return {grad_tokens, grad_target};
  const auto acc_dtype = pixel_shuffle_l1_loss_dtype(tokens);
  const auto g_acc = grad.reshape({}).to(acc_dtype);
  dispatch_pair(tokens, target, [&](auto t_tag, auto u_tag) {
    using T = decltype(t_tag);
    using U = decltype(u_tag);
    using acc_t = at::opmath_type<T>;
    // Divided, not multiplied by 1/numel, so the value is bit-identical to autograd's mean backward.
    const acc_t scale = g_acc.item<acc_t>() / static_cast<acc_t>(target.numel());
    const T* tok = tokens.const_data_ptr<T>();
    const U* tgt = target.const_data_ptr<U>();
    T* gtok = need_tokens ? grad_tokens.mutable_data_ptr<T>() : nullptr;
    U* gtgt = need_target ? grad_target.mutable_data_ptr<U>() : nullptr;
    at::parallel_for(0, g.rows(), rows_per_block(g), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = g.token_offset(r);
        for (int64_t x = 0; x < g.w; ++x) {
          const int64_t ti = off + x * g.C, pi = r * g.W + x * g.p;
          for (int64_t j = 0; j < g.p; ++j) {
            const acc_t d = static_cast<acc_t>(tok[ti + j]) - static_cast<acc_t>(tgt[pi + j]);
            const acc_t v = static_cast<acc_t>((d > 0) - (d < 0)) * scale;
            if (gtok) gtok[ti + j] = static_cast<T>(v);
            if (gtgt) gtgt[pi + j] = static_cast<U>(-v);
          }
        }
      }
    });
  });
  return {grad_tokens, grad_target};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vtp_fast, m) {
  m.def("pixel_shuffle(Tensor tokens, int h, int w, int patch) -> Tensor");
  m.def("pixel_shuffle_l1(Tensor tokens, Tensor target, int patch) -> Tensor");
  m.def("pixel_shuffle_l1_backward(Tensor grad, Tensor tokens, Tensor target, int patch, bool need_tokens, "
        "bool need_target) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vtp_fast, CPU, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cpu);
  m.impl("pixel_shuffle_l1", &pixel_shuffle_l1_cpu);
  m.impl("pixel_shuffle_l1_backward", &pixel_shuffle_l1_backward_cpu);
}

}  // namespace vtp_fast

// CUDA implementation of the pixel-shuffle and the fused pixel-shuffle + L1 loss (schema, checks and the
// semantics in pixel_shuffle_l1.cpp).
//
// A block takes a fixed run of tokens. It first computes, once per token, where the token's pixel (0, 0, 0)
// sits in the image; thread (cv, t) then handles channel vector cv (N channels, one 16-byte access for bf16
// when p % 8 == 0) of token t, whose pixels are a contiguous run of row i of the token's patch: the image
// address is that token base plus a per-thread channel offset, so the inner loop does no division. The loss
// writes one fp32 partial per block (fixed by the shape) and a second one-block kernel adds them in order:
// deterministic, no float atomics, and the image is never written.
#include "pixel_shuffle_l1.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace vtp_fast {

namespace {

constexpr int kThreads = 256;
constexpr int kTileElems = 8192;     // elements a block handles (~16 KB of bf16 tokens + the target's)
constexpr int kMaxTileTokens = 1024;  // bounds the shared token table (8 KB)
constexpr int kReduceThreads = 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct Geom {
  int64_t tokens, hw, w, p, C, H, W;
  int tile_tokens;  // tokens per block
  int vecs;         // channel vectors per token, C / N
  int bx, by;       // threads along channel vectors and along tokens (bx * by <= kThreads)
  int threads;      // bx * by rounded up to whole warps: the block size
};

Geom make_geom(const at::Tensor& tokens, int64_t h, int64_t w, int64_t p, int n) {
  Geom g;
  g.tokens = tokens.size(0) * h * w;
  g.hw = h * w;
  g.w = w;
  g.p = p;
  g.C = 3 * p * p;
  g.H = h * p;
  g.W = w * p;
  g.vecs = static_cast<int>(g.C / n);
  g.bx = std::min(g.vecs, kThreads);
  g.by = kThreads / g.bx;
  g.threads = (g.bx * g.by + 31) / 32 * 32;
  const int64_t want = std::max<int64_t>(1, kTileElems / g.C);
  g.tile_tokens = static_cast<int>(std::min<int64_t>(kMaxTileTokens, (want + g.by - 1) / g.by * g.by));
  return g;
}

int64_t num_blocks(const Geom& g) { return (g.tokens + g.tile_tokens - 1) / g.tile_tokens; }

// Calls f(tokens_elem, image_elem) for the first element of every N-channel vector of this block's tokens.
template <int N, typename F>
__device__ __forceinline__ void for_each_vector(const Geom& g, int64_t* token_base, F&& f) {
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * g.tile_tokens;
  const int nt = static_cast<int>(min(static_cast<int64_t>(g.tile_tokens), g.tokens - t0));
  for (int t = threadIdx.x; t < nt; t += blockDim.x) {
    const int64_t tok = t0 + t, b = tok / g.hw, n = tok - b * g.hw, y = n / g.w, x = n - y * g.w;
    token_base[t] = (b * 3 * g.H + y * g.p) * g.W + x * g.p;  // pixel (0, 0, 0) of the token
  }
  __syncthreads();
  const int tx = threadIdx.x % g.bx, ty = threadIdx.x / g.bx;
  if (ty >= g.by) return;
  const int64_t pp = g.p * g.p;
  for (int cv = tx; cv < g.vecs; cv += g.bx) {
    const int64_t ch = static_cast<int64_t>(cv) * N, c = ch / pp, r = ch - c * pp, i = r / g.p, j = r - i * g.p;
    const int64_t ch_off = (c * g.H + i) * g.W + j;
#pragma unroll 4
    for (int t = ty; t < nt; t += g.by) f((t0 + t) * g.C + ch, token_base[t] + ch_off);
  }
}

// Sum over the block (1-D, whole warps, at most 1024 threads); the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = A(0);
  if (warp == 0) {
    if (lane < static_cast<int>(blockDim.x >> 5)) v = scratch[lane];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename E, int N>
__global__ void __launch_bounds__(kThreads) shuffle_kernel(const E* __restrict__ tokens, E* __restrict__ image,
                                                           Geom g) {
  __shared__ int64_t token_base[kMaxTileTokens];
  using V = Pack<E, N>;
  for_each_vector<N>(g, token_base, [&](int64_t ti, int64_t pi) {
    *reinterpret_cast<V*>(image + pi) = *reinterpret_cast<const V*>(tokens + ti);
  });
}

template <typename T, typename U, typename A, int N>
__global__ void __launch_bounds__(kThreads) l1_partials_kernel(const T* __restrict__ tokens,
                                                               const U* __restrict__ target,
                                                               A* __restrict__ partials, Geom g) {
  __shared__ int64_t token_base[kMaxTileTokens];
  __shared__ A scratch[kThreads / 32];
  A acc = A(0);
  for_each_vector<N>(g, token_base, [&](int64_t ti, int64_t pi) {
    const auto a = *reinterpret_cast<const Pack<T, N>*>(tokens + ti);
    const auto t = *reinterpret_cast<const Pack<U, N>*>(target + pi);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A d = static_cast<A>(a.v[k]) - static_cast<A>(t.v[k]);
      acc += d < A(0) ? -d : d;  // NaN stays NaN
    }
  });
  // Threads that left for_each_vector early (ty >= by) still hold 0 and must join the reduction.
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// loss = (sum of the partials, in a fixed order) / numel.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads) l1_finish_kernel(const A* __restrict__ partials, int64_t count,
                                                                   A numel, A* __restrict__ loss) {
  __shared__ A scratch[kReduceThreads / 32];
  A acc = A(0);
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) acc += partials[k];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *loss = acc / numel;
}

template <typename T, typename U, typename A, int N>
__global__ void __launch_bounds__(kThreads) l1_backward_kernel(const T* __restrict__ tokens,
                                                               const U* __restrict__ target,
                                                               const A* __restrict__ grad, A numel,
                                                               T* __restrict__ grad_tokens,
                                                               U* __restrict__ grad_target, Geom g) {
  __shared__ int64_t token_base[kMaxTileTokens];
  // Divided, not multiplied by 1/numel, so the value is bit-identical to autograd's mean backward.
  const A scale = *grad / numel;
  for_each_vector<N>(g, token_base, [&](int64_t ti, int64_t pi) {
    const auto a = *reinterpret_cast<const Pack<T, N>*>(tokens + ti);
    const auto t = *reinterpret_cast<const Pack<U, N>*>(target + pi);
    Pack<T, N> gt;
    Pack<U, N> gu;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A d = static_cast<A>(a.v[k]) - static_cast<A>(t.v[k]);
      const A v = static_cast<A>((d > A(0)) - (d < A(0))) * scale;  // sign(0) = sign(NaN) = 0, as torch
      gt.v[k] = static_cast<T>(v);
      gu.v[k] = static_cast<U>(-v);
    }
    if (grad_tokens != nullptr) *reinterpret_cast<Pack<T, N>*>(grad_tokens + ti) = gt;
    if (grad_target != nullptr) *reinterpret_cast<Pack<U, N>*>(grad_target + pi) = gu;
  });
}

bool aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Widest N (channels per access, N * sizeof(T) <= 16 bytes) that divides p and that every pointer (each with
// its element size) is aligned to; runs of N channels then stay inside one patch row and one image row.
int vector_width(int64_t p, int64_t max_n, std::initializer_list<std::pair<const void*, int64_t>> ptrs) {
  for (int64_t n = max_n; n > 1; n /= 2) {
    bool ok = p % n == 0;
    for (const auto& [ptr, elem] : ptrs) ok = ok && aligned(ptr, n * elem);
    if (ok) return static_cast<int>(n);
  }
  return 1;
}

// Calls f(std::integral_constant<int, N>{}) for N in {1, 2, 4, 8}.
template <typename F>
void dispatch_width(int n, F&& f) {
  switch (n) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

template <typename E>
void launch_shuffle(const at::Tensor& tokens, at::Tensor& image, int64_t h, int64_t w, int64_t p,
                    cudaStream_t stream) {
  constexpr int64_t kMaxN = 16 / sizeof(E) < 8 ? 16 / sizeof(E) : 8;
  const int n = vector_width(p, kMaxN, {{tokens.data_ptr(), sizeof(E)}, {image.data_ptr(), sizeof(E)}});
  dispatch_width(n, [&](auto width) {
    constexpr int N = decltype(width)::value;
    if constexpr (N * sizeof(E) <= 16) {
      const Geom g = make_geom(tokens, h, w, p, N);
      shuffle_kernel<E, N><<<num_blocks(g), g.threads, 0, stream>>>(static_cast<const E*>(tokens.data_ptr()),
                                                                    static_cast<E*>(image.data_ptr()), g);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor pixel_shuffle_cuda(const at::Tensor& tokens, int64_t h, int64_t w, int64_t patch) {
  check_pixel_shuffle_args(tokens, h, w, patch);
  const c10::cuda::CUDAGuard guard(tokens.device());
  auto image = at::empty({tokens.size(0), 3, h * patch, w * patch}, tokens.options());
  if (image.numel() == 0) return image;
  auto stream = c10::cuda::getCurrentCUDAStream();
  switch (tokens.element_size()) {
    case 1: launch_shuffle<uint8_t>(tokens, image, h, w, patch, stream); break;
    case 2: launch_shuffle<uint16_t>(tokens, image, h, w, patch, stream); break;
    case 4: launch_shuffle<uint32_t>(tokens, image, h, w, patch, stream); break;
    case 8: launch_shuffle<uint64_t>(tokens, image, h, w, patch, stream); break;
    default: TORCH_CHECK(false, "pixel_shuffle: unsupported element size ", tokens.element_size());
  }
  return image;
}

at::Tensor pixel_shuffle_l1_cuda(const at::Tensor& tokens, const at::Tensor& target, int64_t patch) {
  check_pixel_shuffle_l1_args(tokens, target, patch);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t h = target.size(2) / patch, w = target.size(3) / patch;
  auto loss = at::empty({}, tokens.options().dtype(pixel_shuffle_l1_loss_dtype(tokens)));
  if (target.numel() == 0) return loss.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of nothing
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(tokens, target, [&](auto t_tag, auto u_tag) {
    using T = decltype(t_tag);
    using U = decltype(u_tag);
    using A = at::opmath_type<T>;
    const int n =
        vector_width(patch, 16 / sizeof(T), {{tokens.data_ptr(), sizeof(T)}, {target.data_ptr(), sizeof(U)}});
    dispatch_width(n, [&](auto width) {
      constexpr int N = decltype(width)::value;
      if constexpr (N * sizeof(T) <= 16) {
        const Geom g = make_geom(tokens, h, w, patch, N);
        const int64_t blocks = num_blocks(g);
        auto partials = at::empty({blocks}, loss.options());
        l1_partials_kernel<T, U, A, N><<<blocks, g.threads, 0, stream>>>(
            tokens.const_data_ptr<T>(), target.const_data_ptr<U>(), partials.mutable_data_ptr<A>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        l1_finish_kernel<A><<<1, kReduceThreads, 0, stream>>>(partials.const_data_ptr<A>(), blocks,
                                                              static_cast<A>(target.numel()),
                                                              loss.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> pixel_shuffle_l1_backward_cuda(const at::Tensor& grad, const at::Tensor& tokens,
                                                                  const at::Tensor& target, int64_t patch,
                                                                  bool need_tokens, bool need_target) {
  check_pixel_shuffle_l1_args(tokens, target, patch);
  TORCH_CHECK(grad.numel() == 1, "pixel_shuffle_l1_backward: grad must be a scalar, got ", grad.sizes());
  TORCH_CHECK(grad.device() == tokens.device(), "pixel_shuffle_l1_backward: grad on ", grad.device(),
              ", tokens on ", tokens.device());
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t h = target.size(2) / patch, w = target.size(3) / patch;
  auto grad_tokens = need_tokens ? at::empty_like(tokens) : at::empty({0}, tokens.options());
  auto grad_target = need_target ? at::empty_like(target) : at::empty({0}, target.options());
  if ((!need_tokens && !need_target) || target.numel() == 0) return {grad_tokens, grad_target};
  const auto g_acc = grad.reshape({}).to(pixel_shuffle_l1_loss_dtype(tokens)).contiguous();  // stays on device
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(tokens, target, [&](auto t_tag, auto u_tag) {
    using T = decltype(t_tag);
    using U = decltype(u_tag);
    using A = at::opmath_type<T>;
    T* gt = need_tokens ? grad_tokens.mutable_data_ptr<T>() : nullptr;
    U* gu = need_target ? grad_target.mutable_data_ptr<U>() : nullptr;
    const int n = vector_width(patch, 16 / sizeof(T),
                               {{tokens.data_ptr(), sizeof(T)}, {target.data_ptr(), sizeof(U)},
                                {gt, sizeof(T)}, {gu, sizeof(U)}});
    dispatch_width(n, [&](auto width) {
      constexpr int N = decltype(width)::value;
      if constexpr (N * sizeof(T) <= 16) {
        const Geom g = make_geom(tokens, h, w, patch, N);
        l1_backward_kernel<T, U, A, N><<<num_blocks(g), g.threads, 0, stream>>>(
            tokens.const_data_ptr<T>(), target.const_data_ptr<U>(), g_acc.const_data_ptr<A>(),
            static_cast<A>(target.numel()), gt, gu, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {grad_tokens, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(vtp_fast, CUDA, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cuda);
  m.impl("pixel_shuffle_l1", &pixel_shuffle_l1_cuda);
  m.impl("pixel_shuffle_l1_backward", &pixel_shuffle_l1_backward_cuda);
}

}  // namespace vtp_fast

// Host code of the CUDA squeeze-excite kernels (squeeze, excite, scale and the backwards):
// argument checks, device guard, dtype dispatch, the choice of vector width, flat planes and
// tiling, fp32 workspaces, and the launches on the current stream, each checked.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "host_utils.h"
#include "squeeze_excite.cuh"

namespace fused_mbconv {
namespace {

// Pixel indices inside one image plane are ints in the kernels; chunk bounds stay below 2^31 when
// planes are below 2^30.
constexpr int64_t kMaxPlanePixels = int64_t{1} << 30;

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x: expected a 4-D CUDA tensor, got ", x.dim(), "-D on ", x.device());
  TORCH_CHECK(x.numel() > 0, "x: expected a non-empty tensor, got shape ", x.sizes());
  TORCH_CHECK(x.size(2) * x.size(3) < kMaxPlanePixels, "x: each image plane must have fewer than 2^30 pixels, got ",
              x.sizes());
}

// y, grad_y, grad_x: x's dtype and shape, any strides
void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cuda(t, name, x);
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes(), name, ": expected a ", x.scalar_type(),
              " tensor of shape ", x.sizes(), " (that of x), got ", t.scalar_type(), " ", t.sizes());
}

// An (N, C) tensor in `like`'s dtype or fp32; any strides unless `contiguous`.
void check_per_image(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name,
                     bool contiguous) {
  check_cuda(t, name, like, like_name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == like.size(1), name,
              ": expected shape (", like.size(0), ", ", like.size(1), "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() || t.scalar_type() == at::kFloat, name, ": expected ",
              like.scalar_type(), " (the dtype of ", like_name, ") or float32, got ", t.scalar_type());
  TORCH_CHECK(!contiguous || t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

PerImageIn per_image_in(const at::Tensor& t) {
  return {t.data_ptr(), {t.stride(0), t.stride(1)}, t.scalar_type() == at::kFloat};
}

PerImageOut per_image_out(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type() == at::kFloat}; }

// Whether every tensor walks (H, W) as one pixel index with a single stride (NCHW and
// channels_last do): the kernels then skip a division per pixel.
bool flat_planes(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->size(2) != 1 && t->size(3) != 1 && t->stride(2) != t->size(3) * t->stride(3)) return false;
  }
  return true;
}

// (N, C, H, W) strides; with flat planes, stride[3] is that of the flat pixel index (= stride(2)
// when W == 1, the pixel index then being h).
void plane_strides(const at::Tensor& t, bool flat, int64_t (&strides)[4]) {
  copy_strides(t, strides);
  if (flat && t.size(3) == 1) strides[3] = strides[2];
}

// The tiling over x's planes (vectorised when every activation tensor allows it), the sizes and
// the strides of x; the caller adds the other tensors.
SEPlaneParams plane_params(const at::Tensor& x, std::initializer_list<const at::Tensor*> activations, bool flat,
                           int min_pixels_per_lane) {
  SEPlaneParams p{};
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.width = static_cast<int>(x.size(3));
  const int vec = vector_width(activations);
  p.tiling = make_tiling(p.batch, p.channels, static_cast<int>(x.size(2) * x.size(3)), vec,
                         vec > 1 || channels_inner(x), min_pixels_per_lane);
  plane_strides(x, flat, p.x_stride);
  p.x = x.data_ptr();
  p.out_scale = 1.f;
  return p;
}

// After a reducing tile kernel: with several chunks per image, add their partial sums into out.
template <typename scalar_t>
void finish_chunks(const SEPlaneParams& p, const char* what, cudaStream_t stream) {
  if (p.tiling.chunks > 1) check_launch(launch_se_sum_chunks<scalar_t>(p, stream), what);
}

void se_squeeze(const at::Tensor& x, const at::Tensor& pooled) {
  check_x(x);
  check_per_image(pooled, "pooled", x, "x", /*contiguous=*/true);
  TORCH_CHECK(pooled.scalar_type() == x.scalar_type(), "pooled: expected ", x.scalar_type(),
              " (the dtype of x), got ", pooled.scalar_type());

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool flat = flat_planes({&x});
  SEPlaneParams p = plane_params(x, {&x}, flat, kReduceMinPixelsPerLane);
  p.out = per_image_out(pooled);
  p.out_scale = static_cast<float>(1.0 / static_cast<double>(x.size(2) * x.size(3)));
  at::Tensor partial;
  if (p.tiling.chunks > 1) {
    partial = float_workspace(x, {p.tiling.rows, p.channels});
    p.partial = partial.data_ptr<float>();
  }
  dispatch_dtype(x, "x", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    check_launch(launch_se_squeeze<scalar_t>(p, flat, stream), "se_squeeze_kernel");
    finish_chunks<scalar_t>(p, "se_sum_chunks_kernel (pooled)", stream);
  });
}

void se_scale(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  check_x(x);
  check_per_image(gate, "gate", x, "x", /*contiguous=*/false);
  check_like_x(y, "y", x);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool flat = flat_planes({&x, &y});
  SEPlaneParams p = plane_params(x, {&x, &y}, flat, kApplyMinPixelsPerLane);
  plane_strides(y, flat, p.y_stride);
  p.y = y.data_ptr();
  p.gate = per_image_in(gate);
  dispatch_dtype(x, "x", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    check_launch(launch_se_scale<scalar_t>(p, flat, stream), "se_scale_kernel");
  });
}

void se_scale_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gate,
                       const at::Tensor& grad_x, const at::Tensor& grad_gate) {
  check_x(x);
  check_like_x(grad_y, "grad_y", x);
  check_per_image(gate, "gate", x, "x", /*contiguous=*/false);
  check_like_x(grad_x, "grad_x", x);
  check_per_image(grad_gate, "grad_gate", x, "x", /*contiguous=*/true);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool flat = flat_planes({&x, &grad_y, &grad_x});
  SEPlaneParams p = plane_params(x, {&x, &grad_y, &grad_x}, flat, kReduceMinPixelsPerLane);
  plane_strides(grad_y, flat, p.dy_stride);
  plane_strides(grad_x, flat, p.y_stride);
  p.dy = grad_y.data_ptr();
  p.y = grad_x.data_ptr();
  p.gate = per_image_in(gate);
  p.out = per_image_out(grad_gate);
  at::Tensor partial;
  if (p.tiling.chunks > 1) {
    partial = float_workspace(x, {p.tiling.rows, p.channels});
    p.partial = partial.data_ptr<float>();
  }
  dispatch_dtype(x, "x", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    check_launch(launch_se_scale_backward<scalar_t>(p, flat, stream), "se_scale_backward_kernel");
    finish_chunks<scalar_t>(p, "se_sum_chunks_kernel (grad_gate)", stream);
  });
}

// A contiguous fp32 tensor of exactly `sizes`, on pooled's device.
void check_f32(const at::Tensor& t, const char* name, const at::Tensor& pooled, at::IntArrayRef sizes) {
  check_cuda(t, name, pooled, "pooled");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == sizes, name,
              ": expected a contiguous float32 tensor of shape ", sizes, ", got ", t.scalar_type(), " ", t.sizes(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

// Checks pooled and the weights (as matrices: w1 (R, C), w2 (C, R)); returns the parameter block
// with sizes, lane counts and inputs filled in.
SEExciteParams check_excite(const at::Tensor& pooled, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2) {
  TORCH_CHECK(pooled.is_cuda() && pooled.dim() == 2, "pooled: expected a 2-D CUDA tensor, got ", pooled.dim(),
              "-D on ", pooled.device());
  TORCH_CHECK(pooled.numel() > 0, "pooled: expected a non-empty tensor, got shape ", pooled.sizes());
  const int64_t channels = pooled.size(1);
  check_cuda(w1, "w1", pooled, "pooled");
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == channels && w1.size(0) > 0, "w1: expected shape (R, ", channels,
              ") with R > 0, got ", w1.sizes());
  const int64_t reduced = w1.size(0);
  check_f32(w1, "w1", pooled, {reduced, channels});
  check_f32(b1, "b1", pooled, {reduced});
  check_f32(w2, "w2", pooled, {channels, reduced});
  check_f32(b2, "b2", pooled, {channels});

  SEExciteParams p{};
  p.batch = pooled.size(0);
  p.channels = channels;
  p.reduced = reduced;
  p.c_lanes = channels < 32 ? pow2_ceil(channels) : 32;
  p.r_lanes = reduced < 32 ? pow2_ceil(reduced) : 32;
  p.pooled_stride[0] = pooled.stride(0);
  p.pooled_stride[1] = pooled.stride(1);
  p.pooled = pooled.data_ptr();
  p.w1 = w1.data_ptr<float>();
  p.b1 = b1.data_ptr<float>();
  p.w2 = w2.data_ptr<float>();
  p.b2 = b2.data_ptr<float>();
  return p;
}

void se_excite(const at::Tensor& pooled, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
               const at::Tensor& b2, const at::Tensor& gate) {
  SEExciteParams p = check_excite(pooled, w1, b1, w2, b2);
  check_per_image(gate, "gate", pooled, "pooled", /*contiguous=*/true);
  TORCH_CHECK(gate.scalar_type() == pooled.scalar_type(), "gate: expected ", pooled.scalar_type(),
              " (the dtype of pooled), got ", gate.scalar_type());

  const c10::cuda::CUDAGuard guard(pooled.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor act = float_workspace(pooled, {excite_column_blocks(p.channels), p.batch, p.reduced});
  p.act = act.data_ptr<float>();
  p.gate = gate.data_ptr();
  dispatch_dtype(pooled, "pooled", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    check_launch(launch_se_excite<scalar_t>(p, stream), "se_excite_kernel");
  });
}

void se_excite_backward(const at::Tensor& grad_gate, const at::Tensor& pooled, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                        const at::Tensor& grad_pooled, const at::Tensor& grad_w1, const at::Tensor& grad_b1,
                        const at::Tensor& grad_w2, const at::Tensor& grad_b2) {
  SEExciteParams p = check_excite(pooled, w1, b1, w2, b2);
  check_per_image(grad_gate, "grad_gate", pooled, "pooled", /*contiguous=*/false);
  check_per_image(grad_pooled, "grad_pooled", pooled, "pooled", /*contiguous=*/true);
  TORCH_CHECK(grad_pooled.scalar_type() == pooled.scalar_type(), "grad_pooled: expected ", pooled.scalar_type(),
              " (the dtype of pooled), got ", grad_pooled.scalar_type());
  check_f32(grad_w1, "grad_w1", pooled, w1.sizes());
  check_f32(grad_b1, "grad_b1", pooled, b1.sizes());
  check_f32(grad_w2, "grad_w2", pooled, w2.sizes());
  check_f32(grad_b2, "grad_b2", pooled, b2.sizes());

  const c10::cuda::CUDAGuard guard(pooled.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor per_hidden = float_workspace(pooled, {3, p.batch, p.reduced});  // act, hidden, dhidden
  const at::Tensor dlogits = float_workspace(pooled, {p.batch, p.channels});
  const int64_t plane = p.batch * p.reduced;
  p.act = per_hidden.data_ptr<float>();
  p.hidden = p.act + plane;
  p.dhidden = p.act + 2 * plane;
  p.dlogits = dlogits.data_ptr<float>();
  p.grad_gate = per_image_in(grad_gate);
  p.grad_pooled = grad_pooled.data_ptr();
  p.grad_w1 = grad_w1.data_ptr<float>();
  p.grad_b1 = grad_b1.data_ptr<float>();
  p.grad_w2 = grad_w2.data_ptr<float>();
  p.grad_b2 = grad_b2.data_ptr<float>();
  dispatch_dtype(pooled, "pooled", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    check_launch(launch_se_excite_backward_samples<scalar_t>(p, stream), "se_excite_backward_samples_kernel");
    check_launch(launch_se_excite_backward_weights<scalar_t>(p, stream), "se_excite_backward_weights_kernel");
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_mbconv_cuda, CUDA, m) {
  m.impl("se_squeeze", &se_squeeze);
  m.impl("se_excite", &se_excite);
  m.impl("se_excite_backward", &se_excite_backward);
  m.impl("se_scale", &se_scale);
  m.impl("se_scale_backward", &se_scale_backward);
}

}  // namespace fused_mbconv

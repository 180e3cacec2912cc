// Host code of the CUDA depthwise conv + BN + SiLU kernels (inference, training forward,
// backward): argument checks, device guard, dtype dispatch, tiling and fp32 workspaces, and the
// launches on the current stream, each checked.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dwconv_bn_silu.cuh"
#include "host_utils.h"

namespace fused_mbconv {
namespace {

// Pixel indices inside one image plane are ints in the kernels (int64 division per pixel would
// cost more than the convolution); chunk bounds stay below 2^31 when planes are below 2^30.
constexpr int64_t kMaxPlanePixels = int64_t{1} << 30;

void check_vector(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cuda(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == x.size(1) && t.is_contiguous(), name,
              ": expected a contiguous float32 tensor of shape (", x.size(1), "), got ", t.scalar_type(), " ",
              t.sizes());
}

// (N, C) fp32 per-image-and-channel buffer: the squeeze sums or the squeeze's gradient
void check_per_image(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cuda(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == x.size(0) * x.size(1), name,
              ": expected a contiguous float32 tensor of ", x.size(0) * x.size(1), " elements (N * C), got ",
              t.scalar_type(), " ", t.sizes());
}

// Checks x, weight, stride and padding; returns the sizes the kernels work with.
DWConvShape check_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, at::IntArrayRef padding) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x: expected a 4-D CUDA tensor, got ", x.dim(), "-D on ", x.device());
  TORCH_CHECK(x.numel() > 0, "x: expected a non-empty tensor, got shape ", x.sizes());
  const int64_t channels = x.size(1);
  check_cuda(weight, "weight", x);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 4 &&
                  weight.size(0) == channels && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "weight: expected a contiguous float32 tensor of shape (", channels, ", 1, k, k), got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t k = weight.size(2);
  TORCH_CHECK(k == 3 || k == 5, "weight: only kernel sizes 3 and 5 are supported, got ", k);
  TORCH_CHECK(stride == 1 || stride == 2, "stride: expected 1 or 2, got ", stride);
  TORCH_CHECK(padding.size() == 4, "padding: expected (top, bottom, left, right), got ", padding);
  for (const int64_t pad : padding) {
    TORCH_CHECK(pad >= 0 && pad < k, "padding: expected values in [0, ", k - 1, "] for kernel size ", k, ", got ",
                padding);
  }
  const int64_t padded_h = x.size(2) + padding[0] + padding[1], padded_w = x.size(3) + padding[2] + padding[3];
  TORCH_CHECK(padded_h >= k && padded_w >= k, "x: spatial size ", x.sizes(), " with padding ", padding,
              " is smaller than the kernel size ", k);
  const int64_t out_h = (padded_h - k) / stride + 1, out_w = (padded_w - k) / stride + 1;
  TORCH_CHECK(x.size(2) * x.size(3) < kMaxPlanePixels && out_h * out_w < kMaxPlanePixels,
              "x: each image plane (and output plane) must have fewer than 2^30 pixels, got ", x.sizes());
  DWConvShape s{};
  s.batch = x.size(0);
  s.channels = channels;
  s.in_h = static_cast<int>(x.size(2));
  s.in_w = static_cast<int>(x.size(3));
  s.out_h = static_cast<int>(out_h);
  s.out_w = static_cast<int>(out_w);
  s.pad_top = static_cast<int>(padding[0]);
  s.pad_left = static_cast<int>(padding[2]);
  return s;
}

// y or grad_y: x's dtype, shape (N, C, Ho, Wo), any strides
void check_activation(const at::Tensor& t, const char* name, const at::Tensor& x, const DWConvShape& s) {
  check_cuda(t, name, x);
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.dim() == 4 && t.size(0) == s.batch && t.size(1) == s.channels &&
                  t.size(2) == s.out_h && t.size(3) == s.out_w,
              name, ": expected a ", x.scalar_type(), " tensor of shape (", s.batch, ", ", s.channels, ", ", s.out_h,
              ", ", s.out_w, ") (the convolution of x ", x.sizes(), "), got ", t.scalar_type(), " ", t.sizes());
}

// y = silu((conv(x) - mean) * scale + shift), squeeze_sum += spatial sums of y.
template <typename scalar_t>
void run_apply(const at::Tensor& x, const at::Tensor& weight, const float* mean, const float* scale,
               const float* shift, const DWConvShape& shape, int64_t k, int64_t stride, const at::Tensor& y,
               const std::optional<at::Tensor>& squeeze_sum, cudaStream_t stream) {
  DWConvFwdParams p{};
  p.shape = shape;
  p.vec = vector_width({&x, &y});
  p.tiling = make_halo_tiling(shape.batch, shape.channels, shape.out_h, shape.out_w, static_cast<int>(k),
                              static_cast<int>(stride), channels_inner(x));
  copy_strides(x, p.x_stride);
  copy_strides(y, p.y_stride);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.mean = mean;
  p.scale = scale;
  p.shift = shift;
  p.y = y.data_ptr();
  p.squeeze_sum = squeeze_sum.has_value() ? squeeze_sum->data_ptr<float>() : nullptr;
  check_launch(launch_dwconv_bn_silu_apply<scalar_t>(p, static_cast<int>(k), static_cast<int>(stride), stream),
               "dwconv_bn_silu_apply_kernel");
}

void dwconv_bn_silu_infer(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                          const at::Tensor& shift, int64_t stride, at::IntArrayRef padding, const at::Tensor& y,
                          const std::optional<at::Tensor>& squeeze_sum) {
  const DWConvShape shape = check_conv(x, weight, stride, padding);
  check_vector(scale, "scale", x);
  check_vector(shift, "shift", x);
  check_activation(y, "y", x, shape);
  if (squeeze_sum.has_value()) check_per_image(*squeeze_sum, "squeeze_sum", x);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_dtype(x, "x", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    run_apply<scalar_t>(x, weight, nullptr, scale.data_ptr<float>(), shift.data_ptr<float>(), shape, weight.size(2),
                        stride, y, squeeze_sum, stream);
  });
}

void dwconv_bn_silu_train(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gamma,
                          const at::Tensor& beta, double eps, int64_t stride, at::IntArrayRef padding,
                          const at::Tensor& y, const std::optional<at::Tensor>& squeeze_sum, const at::Tensor& mean,
                          const at::Tensor& var) {
  const DWConvShape shape = check_conv(x, weight, stride, padding);
  check_vector(gamma, "gamma", x);
  check_vector(beta, "beta", x);
  check_vector(mean, "mean", x);
  check_vector(var, "var", x);
  check_activation(y, "y", x, shape);
  if (squeeze_sum.has_value()) check_per_image(*squeeze_sum, "squeeze_sum", x);
  const int64_t k = weight.size(2);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  DWConvStatsParams p{};
  p.shape = shape;
  p.tiling = make_halo_tiling(shape.batch, shape.channels, shape.out_h, shape.out_w, static_cast<int>(k),
                              static_cast<int>(stride), channels_inner(x));
  p.vec = vector_width({&x});
  copy_strides(x, p.x_stride);
  const at::Tensor partial = float_workspace(x, {3, p.tiling.rows, shape.channels});
  const at::Tensor scale = float_workspace(x, {shape.channels});
  p.x = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.partial = partial.data_ptr<float>();
  p.gamma = gamma.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  p.mean = mean.data_ptr<float>();
  p.var = var.data_ptr<float>();
  p.scale = scale.data_ptr<float>();
  dispatch_dtype(x, "x", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    check_launch(launch_dwconv_stats<scalar_t>(p, static_cast<int>(k), static_cast<int>(stride), stream),
                 "dwconv_stats_kernel");
    check_launch(launch_welford_combine(p, stream), "welford_combine_kernel");
    run_apply<scalar_t>(x, weight, p.mean, p.scale, beta.data_ptr<float>(), shape, k, stride, y, squeeze_sum, stream);
  });
}

void dwconv_bn_silu_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_squeeze,
                             const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gamma,
                             const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& invstd, int64_t stride,
                             at::IntArrayRef padding, bool training, const at::Tensor& grad_x,
                             const at::Tensor& grad_weight, const at::Tensor& grad_gamma,
                             const at::Tensor& grad_beta) {
  const DWConvShape shape = check_conv(x, weight, stride, padding);
  check_vector(gamma, "gamma", x);
  check_vector(beta, "beta", x);
  check_vector(mean, "mean", x);
  check_vector(invstd, "invstd", x);
  check_vector(grad_gamma, "grad_gamma", x);
  check_vector(grad_beta, "grad_beta", x);
  check_activation(grad_y, "grad_y", x, shape);
  if (grad_squeeze.has_value()) check_per_image(*grad_squeeze, "grad_squeeze", x);
  check_cuda(grad_x, "grad_x", x);
  TORCH_CHECK(grad_x.scalar_type() == x.scalar_type() && grad_x.sizes() == x.sizes(), "grad_x: expected a ",
              x.scalar_type(), " tensor of shape ", x.sizes(), ", got ", grad_x.scalar_type(), " ", grad_x.sizes());
  check_cuda(grad_weight, "grad_weight", x);
  TORCH_CHECK(grad_weight.scalar_type() == at::kFloat && grad_weight.is_contiguous() &&
                  grad_weight.sizes() == weight.sizes(),
              "grad_weight: expected a contiguous float32 tensor of shape ", weight.sizes(), ", got ",
              grad_weight.scalar_type(), " ", grad_weight.sizes());
  const int64_t k = weight.size(2), taps = k * k;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  DWConvBwdParams p{};
  p.shape = shape;
  p.vec = vector_width({&x, &grad_y, &grad_x});
  copy_strides(x, p.x_stride);
  copy_strides(grad_y, p.dy_stride);
  copy_strides(grad_x, p.dx_stride);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.dy = grad_y.data_ptr();
  p.dsqueeze = grad_squeeze.has_value() ? grad_squeeze->data_ptr<float>() : nullptr;
  p.gamma = gamma.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.mean = mean.data_ptr<float>();
  p.invstd = invstd.data_ptr<float>();
  p.sum_dz = grad_beta.data_ptr<float>();
  p.sum_dz_xhat = grad_gamma.data_ptr<float>();
  p.training = training;
  p.dx = grad_x.data_ptr();
  const int64_t channels = shape.channels;

  dispatch_dtype(x, "x", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    // pass 1, over output pixels: dbeta = sum dz, dgamma = sum dz * xhat
    p.halo = make_halo_tiling(shape.batch, channels, shape.out_h, shape.out_w, static_cast<int>(k),
                              static_cast<int>(stride), channels_inner(x));
    const at::Tensor sums = float_workspace(x, {2, p.halo.rows, channels});
    p.partial = sums.data_ptr<float>();
    check_launch(launch_dwconv_bn_silu_bwd_reduce<scalar_t>(p, static_cast<int>(k), static_cast<int>(stride), stream),
                 "dwconv_bn_silu_bwd_reduce_kernel");
    const int64_t plane = p.halo.rows * channels;
    check_launch(launch_sum_rows(p.partial, 1, p.halo.rows, channels, grad_beta.data_ptr<float>(), 0, 1, stream),
                 "sum_rows_kernel (grad_beta)");
    check_launch(
        launch_sum_rows(p.partial + plane, 1, p.halo.rows, channels, grad_gamma.data_ptr<float>(), 0, 1, stream),
        "sum_rows_kernel (grad_gamma)");

    // pass 2, over input pixels: dx, and dweight partial sums of the same (output, tap) pairs
    p.gather = make_gather_tiling(shape.batch, channels, shape.in_h, shape.in_w, static_cast<int>(k),
                                  static_cast<int>(stride), channels_inner(x));
    const at::Tensor dweight = float_workspace(x, {taps, p.gather.rows, channels});
    p.partial = dweight.data_ptr<float>();
    check_launch(launch_dwconv_bn_silu_bwd_input<scalar_t>(p, static_cast<int>(k), static_cast<int>(stride), stream),
                 "dwconv_bn_silu_bwd_input_kernel");
    // grad_weight (C, 1, k, k): tap j of channel c at c * k*k + j
    check_launch(
        launch_sum_rows(p.partial, taps, p.gather.rows, channels, grad_weight.data_ptr<float>(), 1, taps, stream),
        "sum_rows_kernel (grad_weight)");
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_mbconv_cuda, CUDA, m) {
  m.impl("dwconv_bn_silu_infer", &dwconv_bn_silu_infer);
  m.impl("dwconv_bn_silu_train", &dwconv_bn_silu_train);
  m.impl("dwconv_bn_silu_backward", &dwconv_bn_silu_backward);
}

}  // namespace fused_mbconv

// Host code of the CUDA depthwise conv + BN + SiLU kernels: argument checks, device guard,
// dtype dispatch and launch on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "dwconv_bn_silu.cuh"

namespace fused_mbconv {
namespace {

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), name, ": expected a tensor on ", x.device(), " (the device of x), got ",
              t.device());
}

void check_vector(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cuda(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == x.size(1) && t.is_contiguous(), name,
              ": expected a contiguous float32 tensor of shape (", x.size(1), "), got ", t.scalar_type(), " ",
              t.sizes());
}

void dwconv_bn_silu_infer(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                          const at::Tensor& shift, int64_t stride, at::IntArrayRef padding, const at::Tensor& y,
                          const std::optional<at::Tensor>& squeeze_sum) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x: expected a 4-D CUDA tensor, got ", x.dim(), "-D on ", x.device());
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
  check_vector(scale, "scale", x);
  check_vector(shift, "shift", x);
  check_cuda(y, "y", x);
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.dim() == 4 && y.size(0) == x.size(0) && y.size(1) == channels,
              "y: expected a ", x.scalar_type(), " tensor of shape (", x.size(0), ", ", channels, ", Ho, Wo), got ",
              y.scalar_type(), " ", y.sizes());
  TORCH_CHECK(y.size(2) == (x.size(2) + padding[0] + padding[1] - k) / stride + 1 &&
                  y.size(3) == (x.size(3) + padding[2] + padding[3] - k) / stride + 1,
              "y: spatial size ", y.sizes(), " does not match the convolution of x ", x.sizes());
  if (squeeze_sum.has_value()) {
    check_cuda(*squeeze_sum, "squeeze_sum", x);
    TORCH_CHECK(squeeze_sum->scalar_type() == at::kFloat && squeeze_sum->is_contiguous() &&
                    squeeze_sum->numel() == x.size(0) * channels,
                "squeeze_sum: expected a contiguous float32 tensor of ", x.size(0) * channels, " elements");
  }

  DWConvParams p{};
  p.batch = x.size(0);
  p.channels = channels;
  p.in_h = x.size(2);
  p.in_w = x.size(3);
  p.out_h = y.size(2);
  p.out_w = y.size(3);
  p.pad_top = static_cast<int>(padding[0]);
  p.pad_left = static_cast<int>(padding[2]);
  for (int d = 0; d < 4; ++d) {
    p.x_stride[d] = x.stride(d);
    p.y_stride[d] = y.stride(d);
  }
  p.channels_last = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.scale = scale.data_ptr<float>();
  p.shift = shift.data_ptr<float>();
  p.y = y.data_ptr();
  p.squeeze_sum = squeeze_sum.has_value() ? squeeze_sum->data_ptr<float>() : nullptr;
  if (y.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err;
  switch (x.scalar_type()) {
    case at::kFloat: err = launch_dwconv_bn_silu_infer<float>(p, k, stride, stream); break;
    case at::kHalf: err = launch_dwconv_bn_silu_infer<__half>(p, k, stride, stream); break;
    case at::kBFloat16: err = launch_dwconv_bn_silu_infer<__nv_bfloat16>(p, k, stride, stream); break;
    default: TORCH_CHECK(false, "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "dwconv_bn_silu_infer: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_mbconv_cuda, CUDA, m) { m.impl("dwconv_bn_silu_infer", &dwconv_bn_silu_infer); }

}  // namespace fused_mbconv

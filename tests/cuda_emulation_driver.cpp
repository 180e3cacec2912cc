// Driver for tests/test_cuda_kernels_on_cpu.py: fills the kernels' parameter blocks and calls the
// launchers of kernels/*.cu (compiled for the CPU through cuda_emulation.h) in the order the host
// code csrc/dwconv_bn_silu.cpp and csrc/squeeze_excite.cpp does, on tensors the test wrote as raw
// files.
//
// Depthwise conv + BN + SiLU:
//   driver op=infer|train|bwd dtype=f32|f16|bf16 dir=DIR k= stride= n= c= h= w= pad_top= pad_left=
//          out_h= out_w= vec= inner=0|1 x_strides=a,b,c,d y_strides=... (infer/train)
//          dy_strides=... dx_strides=... (bwd) y_numel= dx_numel= squeeze=0|1 training=0|1 eps=
// Inputs in DIR: x (the storage from element 0), weight, and scale, shift (infer) / gamma, beta
// (train) / gamma, beta, mean, invstd, dy, dsq (bwd, dsq when squeeze=1), fp32 unless x's dtype.
// Outputs in DIR: y, squeeze_sum (infer/train), mean_out, var (train), dx, dweight, dgamma, dbeta
// (bwd).
//
// Squeeze-excite over the activations (strides as the host passes them: flat planes have the flat
// pixel stride in the last place):
//   driver op=se_squeeze|se_scale|se_scale_bwd dtype= dir= n= c= h= w= vec= inner=0|1 flat=0|1
//          x_strides= y_strides= y_numel= (scale: y; bwd: dx) dy_strides= (bwd)
//          gate_strides= gate_float=0|1 (scale, bwd) out_float=0|1 (bwd: grad_gate in fp32)
// Inputs: x, gate, dy. Outputs: pooled (squeeze), y (scale), dx, dgate (bwd). Prints the tiling's
// chunks per image and vector width.
// The excite:
//   driver op=se_excite|se_excite_bwd dtype= dir= n= c= r= pooled_strides=a,b grad_strides=a,b
//          grad_float=0|1 (bwd)
// Inputs: pooled, w1 (R, C), b1, w2 (C, R), b2 (fp32), dg (bwd). Outputs: gate (excite),
// dpooled, dw1, db1, dw2, db2 (bwd).
#include "cuda_emulation.h"

#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "dwconv_bn_silu.cuh"
#include "squeeze_excite.cuh"

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }  // the emulated launches fail loudly
extern "C" cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  return ::emu::set_attribute(kernel, attr, value);
}

namespace {

using namespace fused_mbconv;

std::map<std::string, std::string> g_args;

const std::string& arg(const std::string& key) {
  const auto it = g_args.find(key);
  if (it == g_args.end()) {
    std::fprintf(stderr, "driver: missing argument %s\n", key.c_str());
    std::exit(2);
  }
  return it->second;
}

int64_t int_arg(const std::string& key) { return std::stoll(arg(key)); }

void strides_arg(const std::string& key, int64_t (&strides)[4]) {
  std::stringstream s(arg(key));
  std::string item;
  for (int64_t& v : strides) {
    std::getline(s, item, ',');
    v = std::stoll(item);
  }
}

// 16-byte aligned bytes, as cudaMalloc gives
struct Buffer {
  std::vector<float4> storage;
  explicit Buffer(size_t bytes = 0) : storage((bytes + 15) / 16, float4{0.f, 0.f, 0.f, 0.f}) {}
  template <typename T>
  T* as() { return reinterpret_cast<T*>(storage.data()); }
};

std::string path(const std::string& name) { return arg("dir") + "/" + name; }

Buffer load(const std::string& name) {
  std::ifstream in(path(name), std::ios::binary | std::ios::ate);
  if (!in) {
    std::fprintf(stderr, "driver: cannot read %s\n", path(name).c_str());
    std::exit(2);
  }
  const size_t bytes = static_cast<size_t>(in.tellg());
  Buffer b(bytes);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(b.storage.data()), static_cast<std::streamsize>(bytes));
  return b;
}

void save(const std::string& name, const Buffer& b, size_t bytes) {
  std::ofstream out(path(name), std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.storage.data()), static_cast<std::streamsize>(bytes));
}

void check(cudaError_t err, const char* kernel) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "driver: %s failed\n", kernel);
    std::exit(4);
  }
}

void strides2_arg(const std::string& key, int64_t (&strides)[2]) {
  std::stringstream s(arg(key));
  std::string item;
  for (int64_t& v : strides) {
    std::getline(s, item, ',');
    v = std::stoll(item);
  }
}

template <typename scalar_t>
int run_se_plane(const std::string& op) {
  const cudaStream_t stream = nullptr;
  const int64_t n = int_arg("n"), c = int_arg("c"), h = int_arg("h"), w = int_arg("w");
  const bool flat = int_arg("flat") != 0;
  const int vec = static_cast<int>(int_arg("vec"));
  const size_t nc_bytes = sizeof(float) * n * c;
  const bool reduces = op != "se_scale";
  SEPlaneParams p{};
  p.batch = n;
  p.channels = c;
  p.width = static_cast<int>(w);
  p.tiling = make_tiling(n, c, static_cast<int>(h * w), vec, vec > 1 || int_arg("inner") != 0,
                         reduces ? kReduceMinPixelsPerLane : kApplyMinPixelsPerLane);
  strides_arg("x_strides", p.x_stride);
  Buffer x = load("x"), gate, dy, y, out(nc_bytes), partial(sizeof(float) * p.tiling.rows * c);
  p.x = x.as<scalar_t>();
  p.partial = p.tiling.chunks > 1 ? partial.as<float>() : nullptr;
  p.out_scale = 1.f;
  std::printf("chunks=%d vec=%d\n", p.tiling.chunks, p.tiling.vec);
  if (op != "se_squeeze") {
    gate = load("gate");
    p.gate.data = gate.as<float>();
    strides2_arg("gate_strides", p.gate.stride);
    p.gate.is_float = int_arg("gate_float") != 0;
    y = Buffer(sizeof(scalar_t) * int_arg("y_numel"));
    strides_arg("y_strides", p.y_stride);
    p.y = y.as<scalar_t>();
  }
  if (op == "se_squeeze") {
    p.out = {out.as<float>(), false};
    p.out_scale = static_cast<float>(1.0 / static_cast<double>(h * w));
    check(launch_se_squeeze<scalar_t>(p, flat, stream), "se_squeeze");
    if (p.tiling.chunks > 1) check(launch_se_sum_chunks<scalar_t>(p, stream), "se_sum_chunks");
    save("pooled", out, sizeof(scalar_t) * n * c);
  } else if (op == "se_scale") {
    check(launch_se_scale<scalar_t>(p, flat, stream), "se_scale");
    save("y", y, sizeof(scalar_t) * int_arg("y_numel"));
  } else {
    dy = load("dy");
    p.dy = dy.as<scalar_t>();
    strides_arg("dy_strides", p.dy_stride);
    const bool out_float = int_arg("out_float") != 0;
    p.out = {out.as<float>(), out_float};
    check(launch_se_scale_backward<scalar_t>(p, flat, stream), "se_scale_backward");
    if (p.tiling.chunks > 1) check(launch_se_sum_chunks<scalar_t>(p, stream), "se_sum_chunks");
    save("dx", y, sizeof(scalar_t) * int_arg("y_numel"));
    save("dgate", out, (out_float ? sizeof(float) : sizeof(scalar_t)) * n * c);
  }
  return 0;
}

template <typename scalar_t>
int run_se_excite(const std::string& op) {
  const cudaStream_t stream = nullptr;
  SEExciteParams p{};
  p.batch = int_arg("n");
  p.channels = int_arg("c");
  p.reduced = int_arg("r");
  const int64_t n = p.batch, c = p.channels, r = p.reduced;
  p.c_lanes = c < 32 ? pow2_ceil(c) : 32;
  p.r_lanes = r < 32 ? pow2_ceil(r) : 32;
  strides2_arg("pooled_strides", p.pooled_stride);
  Buffer pooled = load("pooled"), w1 = load("w1"), b1 = load("b1"), w2 = load("w2"), b2 = load("b2");
  p.pooled = pooled.as<scalar_t>();
  p.w1 = w1.as<float>();
  p.b1 = b1.as<float>();
  p.w2 = w2.as<float>();
  p.b2 = b2.as<float>();
  Buffer per_hidden(sizeof(float) * 3 * n * r), dlogits(sizeof(float) * n * c);
  p.act = per_hidden.as<float>();
  p.hidden = p.act + n * r;
  p.dhidden = p.act + 2 * n * r;
  p.dlogits = dlogits.as<float>();
  if (op == "se_excite") {
    Buffer gate(sizeof(scalar_t) * n * c), act(sizeof(float) * excite_column_blocks(c) * n * r);
    p.act = act.as<float>();
    p.gate = gate.as<scalar_t>();
    check(launch_se_excite<scalar_t>(p, stream), "se_excite");
    save("gate", gate, sizeof(scalar_t) * n * c);
    return 0;
  }
  Buffer dg = load("dg"), dpooled(sizeof(scalar_t) * n * c), dw1(sizeof(float) * r * c), db1(sizeof(float) * r),
      dw2(sizeof(float) * c * r), db2(sizeof(float) * c);
  p.grad_gate.data = dg.as<float>();
  strides2_arg("grad_strides", p.grad_gate.stride);
  p.grad_gate.is_float = int_arg("grad_float") != 0;
  p.grad_pooled = dpooled.as<scalar_t>();
  p.grad_w1 = dw1.as<float>();
  p.grad_b1 = db1.as<float>();
  p.grad_w2 = dw2.as<float>();
  p.grad_b2 = db2.as<float>();
  check(launch_se_excite_backward_samples<scalar_t>(p, stream), "se_excite_backward_samples");
  check(launch_se_excite_backward_weights<scalar_t>(p, stream), "se_excite_backward_weights");
  save("dpooled", dpooled, sizeof(scalar_t) * n * c);
  save("dw1", dw1, sizeof(float) * r * c);
  save("db1", db1, sizeof(float) * r);
  save("dw2", dw2, sizeof(float) * c * r);
  save("db2", db2, sizeof(float) * c);
  return 0;
}

template <typename scalar_t>
int run() {
  const std::string op = arg("op");
  if (op == "se_excite" || op == "se_excite_bwd") return run_se_excite<scalar_t>(op);
  if (op.rfind("se_", 0) == 0) return run_se_plane<scalar_t>(op);
  const int k = static_cast<int>(int_arg("k")), stride = static_cast<int>(int_arg("stride"));
  DWConvShape shape{};
  shape.batch = int_arg("n");
  shape.channels = int_arg("c");
  shape.in_h = static_cast<int>(int_arg("h"));
  shape.in_w = static_cast<int>(int_arg("w"));
  shape.out_h = static_cast<int>(int_arg("out_h"));
  shape.out_w = static_cast<int>(int_arg("out_w"));
  shape.pad_top = static_cast<int>(int_arg("pad_top"));
  shape.pad_left = static_cast<int>(int_arg("pad_left"));
  const int64_t channels = shape.channels;
  const bool inner = int_arg("inner") != 0, with_squeeze = int_arg("squeeze") != 0;
  const cudaStream_t stream = nullptr;
  Buffer x = load("x"), weight = load("weight");
  Buffer squeeze_sum(sizeof(float) * shape.batch * channels);

  if (op == "infer" || op == "train") {
    const int vec = static_cast<int>(int_arg("vec"));
    const size_t y_bytes = sizeof(scalar_t) * int_arg("y_numel");
    Buffer y(y_bytes), mean(sizeof(float) * channels), var(sizeof(float) * channels),
        scale(sizeof(float) * channels);
    Buffer shift = load(op == "infer" ? "shift" : "beta");
    DWConvFwdParams p{};
    p.shape = shape;
    p.vec = vec;
    p.tiling = make_halo_tiling(shape.batch, channels, shape.out_h, shape.out_w, k, stride, inner);
    strides_arg("x_strides", p.x_stride);
    strides_arg("y_strides", p.y_stride);
    p.x = x.as<scalar_t>();
    p.weight = weight.as<float>();
    p.shift = shift.as<float>();
    p.y = y.as<scalar_t>();
    p.squeeze_sum = with_squeeze ? squeeze_sum.as<float>() : nullptr;
    if (op == "infer") {
      scale = load("scale");
    } else {
      Buffer gamma = load("gamma");
      DWConvStatsParams s{};
      s.shape = shape;
      s.tiling = p.tiling;
      s.vec = vec;
      std::copy(p.x_stride, p.x_stride + 4, s.x_stride);
      Buffer partial(sizeof(float) * 3 * s.tiling.rows * channels);
      s.x = p.x;
      s.weight = p.weight;
      s.partial = partial.as<float>();
      s.gamma = gamma.as<float>();
      s.eps = std::stof(arg("eps"));
      s.mean = mean.as<float>();
      s.var = var.as<float>();
      s.scale = scale.as<float>();
      check(launch_dwconv_stats<scalar_t>(s, k, stride, stream), "stats");
      check(launch_welford_combine(s, stream), "welford_combine");
      p.mean = s.mean;
      save("mean_out", mean, sizeof(float) * channels);
      save("var", var, sizeof(float) * channels);
    }
    p.scale = scale.as<float>();
    check(launch_dwconv_bn_silu_apply<scalar_t>(p, k, stride, stream), "apply");
    save("y", y, y_bytes);
    save("squeeze_sum", squeeze_sum, sizeof(float) * shape.batch * channels);
    return 0;
  }

  // backward
  Buffer dy = load("dy"), gamma = load("gamma"), beta = load("beta"), mean = load("mean"), invstd = load("invstd");
  Buffer dsq = with_squeeze ? load("dsq") : Buffer();
  const size_t dx_bytes = sizeof(scalar_t) * int_arg("dx_numel");
  const int64_t taps = k * k;
  Buffer dx(dx_bytes), dweight(sizeof(float) * taps * channels), dgamma(sizeof(float) * channels),
      dbeta(sizeof(float) * channels);
  DWConvBwdParams p{};
  p.shape = shape;
  p.vec = static_cast<int>(int_arg("vec"));
  strides_arg("x_strides", p.x_stride);
  strides_arg("dy_strides", p.dy_stride);
  strides_arg("dx_strides", p.dx_stride);
  p.x = x.as<scalar_t>();
  p.weight = weight.as<float>();
  p.dy = dy.as<scalar_t>();
  p.dsqueeze = with_squeeze ? dsq.as<float>() : nullptr;
  p.gamma = gamma.as<float>();
  p.beta = beta.as<float>();
  p.mean = mean.as<float>();
  p.invstd = invstd.as<float>();
  p.sum_dz = dbeta.as<float>();
  p.sum_dz_xhat = dgamma.as<float>();
  p.training = int_arg("training") != 0;
  p.dx = dx.as<scalar_t>();

  p.halo = make_halo_tiling(shape.batch, channels, shape.out_h, shape.out_w, k, stride, inner);
  Buffer sums(sizeof(float) * 2 * p.halo.rows * channels);
  p.partial = sums.as<float>();
  check(launch_dwconv_bn_silu_bwd_reduce<scalar_t>(p, k, stride, stream), "bwd_reduce");
  const int64_t plane = p.halo.rows * channels;
  check(launch_sum_rows(p.partial, 1, p.halo.rows, channels, dbeta.as<float>(), 0, 1, stream), "sum_rows");
  check(launch_sum_rows(p.partial + plane, 1, p.halo.rows, channels, dgamma.as<float>(), 0, 1, stream), "sum_rows");

  p.gather = make_gather_tiling(shape.batch, channels, shape.in_h, shape.in_w, k, stride, inner);
  Buffer partial(sizeof(float) * taps * p.gather.rows * channels);
  p.partial = partial.as<float>();
  check(launch_dwconv_bn_silu_bwd_input<scalar_t>(p, k, stride, stream), "bwd_input");
  check(launch_sum_rows(p.partial, taps, p.gather.rows, channels, dweight.as<float>(), 1, taps, stream), "sum_rows");
  save("dx", dx, dx_bytes);
  save("dweight", dweight, sizeof(float) * taps * channels);
  save("dgamma", dgamma, sizeof(float) * channels);
  save("dbeta", dbeta, sizeof(float) * channels);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (eq != std::string::npos) g_args[a.substr(0, eq)] = a.substr(eq + 1);
  }
  const std::string dtype = arg("dtype");
  if (dtype == "f32") return run<float>();
  if (dtype == "f16") return run<__half>();
  if (dtype == "bf16") return run<__nv_bfloat16>();
  std::fprintf(stderr, "driver: unknown dtype %s\n", dtype.c_str());
  return 2;
}

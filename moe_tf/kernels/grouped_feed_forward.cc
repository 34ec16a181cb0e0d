// The experts' feed-forward networks over rows sorted by expert, forward and backward
// (grouped_feed_forward.h), and the two CPU ops that run them in TensorFlow: each
// expert's matmuls run on one thread while the experts are spread over the threads.
// xla_custom_calls.cc runs the same functions inside programs that XLA compiles.
//
// Why: with a few dozen rows per expert (512 experts, 4096 tokens, k = 4) a oneDNN
// matmul per expert is half as fast as the same FLOPs in one large matmul, and a batched
// matmul needs padded, gathered copies of the rows. Here each expert streams its
// weights once per pass through register-blocked vector loops (AVX-512 or AVX2, simd.h)
// and writes its rows and weight gradients in place; nothing is padded, gathered or
// scattered.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"
#include "grouped_feed_forward.h"
#include "simd.h"

namespace moe_tf {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using simd::kLanes;
using simd::Vec;

// Memory to pull into cache while computing: the weights the thread reads next. One
// cache line per step of the inner loops keeps DRAM busy while the FMAs run (the
// hardware prefetchers do not follow a panel's 4 KiB-strided rows far enough ahead).
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  inline void Step() {
    if (next < end) {
      _mm_prefetch(next, _MM_HINT_T0);
      next += 64;
    }
  }
};

// A buffer of at least `floats` for the calling thread, one per `slot`, kept across
// calls: one expert's temporaries (a [rows, h] temporary for all experts would add to the
// step's peak memory; these hold the largest group's per thread).
float* ThreadScratch(int slot, size_t floats) {
  thread_local std::vector<float> buffers[3];
  if (buffers[slot].size() < floats) buffers[slot].resize(floats);
  return buffers[slot].data();
}

// What a product does with A B: C = [C +] A B [+ bias], [ReLU], with streaming stores or
// not. Streaming stores skip reading the lines first: for a weight gradient, written once
// and not read again in the op.
struct Output {
  const float* bias = nullptr;  // [columns], added to every row
  bool relu = false;
  bool accumulate = false;
  bool stream = false;
};

// C[R rows, kLanes J cols] (out)= A[R, K] B[K, kLanes J], all row-major. R x J
// accumulators stay in registers for the whole reduction.
template <int R, int J>
inline void BlockTimes(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                       int64_t ldc, int64_t k_size, const Output& out, Prefetch* prefetch) {
  Vec acc[R][J];
  for (int j = 0; j < J; ++j) {
    const Vec init = out.bias ? simd::Load(out.bias + kLanes * j) : simd::Zero();
    for (int r = 0; r < R; ++r) {
      acc[r][j] = out.accumulate ? simd::Add(init, simd::Load(c + r * ldc + kLanes * j)) : init;
    }
  }
  for (int64_t k = 0; k < k_size; ++k) {
    prefetch->Step();
    const float* b_row = b + k * ldb;
    Vec b_vec[J];
    for (int j = 0; j < J; ++j) b_vec[j] = simd::Load(b_row + kLanes * j);
    for (int r = 0; r < R; ++r) {
      const Vec a_val = simd::Broadcast(a[r * lda + k]);
      for (int j = 0; j < J; ++j) acc[r][j] = simd::MulAdd(a_val, b_vec[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) {
      const Vec value = out.relu ? simd::Max(acc[r][j], simd::Zero()) : acc[r][j];
      if (out.stream) {
        simd::StoreStreaming(c + r * ldc + kLanes * j, value);
      } else {
        simd::Store(c + r * ldc + kLanes * j, value);
      }
    }
  }
}

// The block of R rows x `vectors` x kLanes columns (vectors <= J) starting at b and c.
template <int R, int J>
void BlockOfWidth(int64_t vectors, const float* a, int64_t lda, const float* b, int64_t ldb,
                  float* c, int64_t ldc, int64_t k_size, const Output& out,
                  Prefetch* prefetch) {
  if constexpr (J > 1) {
    if (vectors < J) {
      return BlockOfWidth<R, J - 1>(vectors, a, lda, b, ldb, c, ldc, k_size, out, prefetch);
    }
  }
  BlockTimes<R, J>(a, lda, b, ldb, c, ldc, k_size, out, prefetch);
}

constexpr int64_t kPanel = simd::kBlockVectors * kLanes;  // columns of a register block

// C[R rows, n_size cols] (out)= A[R, K] B[K, n_size], one register block after another
// along the row: its output is written left to right.
template <int R>
void RowsTimes(int64_t n_size, const float* a, int64_t lda, const float* b, int64_t ldb,
               float* c, int64_t ldc, int64_t k_size, const Output& out, Prefetch* prefetch) {
  for (int64_t n = 0; n < n_size; n += kPanel) {
    Output block_out = out;
    if (out.bias) block_out.bias += n;
    BlockOfWidth<R, simd::kBlockVectors>(std::min(kPanel, n_size - n) / kLanes, a, lda,
                                         b + n, ldb, c + n, ldc, k_size, block_out, prefetch);
  }
}

// B's columns per pass over A's rows: as many as keep a [k, columns] block of B within
// 128 KiB, so that it stays in L2 while every six rows of A (in L1) meet all of it. A
// short reduction (a weight gradient's: the expert's rows) takes all columns in one
// pass, so each output row is written in one sweep; a long one (the forward pass's
// weights) takes a few panels at a time.
int64_t ColumnsPerPass(int64_t k_size) {
  constexpr int64_t kBlockBytes = 128 << 10;
  const int64_t columns = kBlockBytes / (sizeof(float) * std::max<int64_t>(1, k_size));
  return std::max(kPanel, columns / kPanel * kPanel);
}

Output HiddenLayer(const float* bias) {
  Output out;
  out.bias = bias;
  out.relu = true;
  return out;
}

// C[m, n] (out)= sum_k A[m, k] B[k, n]. n_size % kLanes == 0. Six rows at a time (see
// simd::kBlockVectors), over a pass of columns (ColumnsPerPass) at a time.
void Times(int64_t m_size, int64_t n_size, int64_t k_size, const float* a, int64_t lda,
           const float* b, int64_t ldb, float* c, int64_t ldc, Prefetch* prefetch,
           const Output& out = {}) {
  const int64_t pass = ColumnsPerPass(k_size);
  for (int64_t n = 0; n < n_size; n += pass) {
    const int64_t width = std::min(pass, n_size - n);
    Output pass_out = out;
    if (out.bias) pass_out.bias += n;
    const float* b_n = b + n;
    int64_t m = 0;
    for (; m + 6 <= m_size; m += 6) {
      RowsTimes<6>(width, a + m * lda, lda, b_n, ldb, c + m * ldc + n, ldc, k_size, pass_out,
                   prefetch);
    }
    const float* a_m = a + m * lda;
    float* c_m = c + m * ldc + n;
    switch (m_size - m) {
      case 1: RowsTimes<1>(width, a_m, lda, b_n, ldb, c_m, ldc, k_size, pass_out, prefetch); break;
      case 2: RowsTimes<2>(width, a_m, lda, b_n, ldb, c_m, ldc, k_size, pass_out, prefetch); break;
      case 3: RowsTimes<3>(width, a_m, lda, b_n, ldb, c_m, ldc, k_size, pass_out, prefetch); break;
      case 4: RowsTimes<4>(width, a_m, lda, b_n, ldb, c_m, ldc, k_size, pass_out, prefetch); break;
      case 5: RowsTimes<5>(width, a_m, lda, b_n, ldb, c_m, ldc, k_size, pass_out, prefetch); break;
      default: break;
    }
  }
}

// dst [cols, rows] (row stride ld) = src [rows, cols]^T (row stride ls); cols % kLanes
// == 0.
void TransposeInto(const float* src, int64_t rows, int64_t cols, int64_t ls, float* dst,
                   int64_t ld) {
  int64_t r = 0;
  for (; r + kLanes <= rows; r += kLanes) {
    for (int64_t c = 0; c < cols; c += kLanes) {
      simd::TransposeBlock(src + r * ls + c, ls, dst + c * ld + r, ld);
    }
  }
  for (; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = src[r * ls + c];
  }
}

// C[m, n] = sum_k A[m, k] B[n, k]. Each panel of B's rows is transposed into a scratch
// buffer (k x kPanel floats, in L2) and multiplied as above: faster than dot products of
// rows, whose horizontal sums cost a fifth of the FMAs (measured on AVX-512 at every
// block size).
void TimesTransposed(int64_t m_size, int64_t n_size, int64_t k_size, const float* a,
                     int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                     Prefetch* prefetch) {
  float* panel = ThreadScratch(1, k_size * kPanel);
  for (int64_t n = 0; n < n_size; n += kPanel) {
    const int64_t width = std::min(kPanel, n_size - n);
    TransposeInto(b + n * ldb, width, k_size, ldb, panel, kPanel);
    Times(m_size, width, k_size, a, lda, panel, kPanel, c + n, ldc, prefetch);
  }
}

// C[m, n] (out)= sum_k A[k, m] B[k, n], A transposed into a scratch buffer first
// (reading A column-wise in the product would use a fraction of each cache line).
void TransposedTimes(int64_t m_size, int64_t n_size, int64_t k_size, const float* a,
                     int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                     Prefetch* prefetch, const Output& out) {
  float* a_t = ThreadScratch(2, m_size * k_size);
  TransposeInto(a, k_size, m_size, lda, a_t, k_size);
  Times(m_size, n_size, k_size, a_t, k_size, b, ldb, c, ldc, prefetch, out);
}

// out[n] (+)= sum over m_size rows of x[m, n] (a bias gradient).
void ColumnSums(int64_t m_size, int64_t n_size, const float* x, float* out,
                bool accumulate) {
  if (!accumulate) std::fill(out, out + n_size, 0.0f);
  for (int64_t m = 0; m < m_size; ++m) {
    const float* row = x + m * n_size;
    for (int64_t n = 0; n < n_size; n += kLanes) {
      simd::Store(out + n, simd::Add(simd::Load(out + n), simd::Load(row + n)));
    }
  }
}

// Rows of one expert handled together: bounds the per-thread scratch buffers (a chunk's
// activations and their gradients) and keeps the weight gradients' reductions short
// enough for a panel of the other operand to stay in L2.
constexpr int64_t kChunkRows = 512;

// The stacked weights of expert e (nothing past the last expert).
Prefetch WeightsOf(const float* stacked, int64_t e, int64_t size, int64_t experts) {
  if (e >= experts) return {};
  const char* begin = reinterpret_cast<const char*>(stacked + e * size);
  return {begin, begin + sizeof(float) * size};
}

// Runs fn(e) for every expert through `parallel_for`. An expert's work grows with its
// rows, plus a fixed part for streaming its weights.
void ForEachExpert(const ParallelFor& parallel_for, const Dims& dims, int64_t flops_per_row,
                   const std::function<void(int64_t)>& fn) {
  const int64_t mean_rows = std::max<int64_t>(1, dims.rows / std::max<int64_t>(1, dims.experts));
  const int64_t cost = mean_rows * flops_per_row + 4 * dims.h * (dims.d + dims.o);
  parallel_for(dims.experts, cost, [&fn](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) fn(e);
  });
}

}  // namespace

tensorflow::Status CheckFeedForwardShapes(const TensorShape& inputs,
                                          const TensorShape& group_sizes,
                                          const TensorShape& kernel_in,
                                          const TensorShape& bias_in,
                                          const TensorShape& kernel_out, Dims* dims) {
  if (inputs.dims() != 2) {
    return InvalidArgument("inputs must be [rows, d], got shape ", inputs.DebugString());
  }
  if (group_sizes.dims() != 1) {
    return InvalidArgument("group_sizes must be [experts], got shape ",
                           group_sizes.DebugString());
  }
  if (kernel_in.dims() != 3 || kernel_out.dims() != 3) {
    return InvalidArgument("kernel_in and kernel_out must be [experts, ., .], got ",
                           kernel_in.DebugString(), " and ", kernel_out.DebugString());
  }
  *dims = {inputs.dim_size(0), group_sizes.dim_size(0), inputs.dim_size(1),
           kernel_in.dim_size(2), kernel_out.dim_size(2)};
  if (kernel_in.dim_size(0) != dims->experts || kernel_out.dim_size(0) != dims->experts ||
      kernel_in.dim_size(1) != dims->d || kernel_out.dim_size(1) != dims->h) {
    return InvalidArgument("kernel_in must be [experts, d, h] and kernel_out [experts, h, o] "
                           "for ", dims->experts, " experts and d = ", dims->d, "; got ",
                           kernel_in.DebugString(), " and ", kernel_out.DebugString());
  }
  constexpr int kMultiple = simd::kWidthMultiple;
  if (dims->d % kMultiple != 0 || dims->h % kMultiple != 0 || dims->o % kMultiple != 0) {
    return InvalidArgument("d, h and o must be multiples of ", kMultiple, ", got ", dims->d,
                           ", ", dims->h, ", ", dims->o);
  }
  if (bias_in.num_elements() != dims->experts * dims->h) {
    return InvalidArgument("bias_in must be [experts, h] = [", dims->experts, ", ", dims->h,
                           "], got ", bias_in.DebugString());
  }
  return tensorflow::OkStatus();
}

tensorflow::Status CheckBiasOut(const TensorShape& bias_out, const Dims& dims) {
  if (bias_out.num_elements() != dims.experts * dims.o) {
    return InvalidArgument("bias_out must be [experts, o] = [", dims.experts, ", ", dims.o,
                           "], got ", bias_out.DebugString());
  }
  return tensorflow::OkStatus();
}

tensorflow::Status CheckGradientShapes(const TensorShape& hidden,
                                       const TensorShape& d_outputs, const Dims& dims) {
  if (hidden.num_elements() != 0 &&
      !(hidden.dims() == 2 && hidden.dim_size(0) == dims.rows && hidden.dim_size(1) == dims.h)) {
    return InvalidArgument("hidden must be [rows, h] or empty (recomputed), got ",
                           hidden.DebugString());
  }
  if (!(d_outputs.dims() == 2 && d_outputs.dim_size(0) == dims.rows &&
        d_outputs.dim_size(1) == dims.o)) {
    return InvalidArgument("d_outputs must be [rows, o] = [", dims.rows, ", ", dims.o,
                           "], got ", d_outputs.DebugString());
  }
  return tensorflow::OkStatus();
}

tensorflow::Status GroupOffsets(const int32_t* group_sizes, const Dims& dims,
                                std::vector<int64_t>* offsets) {
  offsets->assign(dims.experts + 1, 0);
  for (int64_t e = 0; e < dims.experts; ++e) {
    if (group_sizes[e] < 0) {
      return InvalidArgument("group_sizes[", e, "] = ", group_sizes[e], " is negative");
    }
    (*offsets)[e + 1] = (*offsets)[e] + group_sizes[e];
  }
  if (offsets->back() > dims.rows) {
    return InvalidArgument("group_sizes sum to ", offsets->back(), ", more than the ",
                           dims.rows, " rows of inputs");
  }
  return tensorflow::OkStatus();
}

void FeedForward(const Dims& n, const std::vector<int64_t>& offsets,
                 const FeedForwardWeights& weights, float* y, float* hid,
                 const ParallelFor& parallel_for) {
  const float *x = weights.x, *w1 = weights.w1, *b1 = weights.b1, *w2 = weights.w2;
  ForEachExpert(parallel_for, n, 2 * n.h * (n.d + n.o), [&](int64_t e) {
    const int64_t begin = offsets[e], m = offsets[e + 1] - offsets[e];
    if (m == 0) return;
    // While one kernel is multiplied, the next one is fetched.
    Prefetch next_out = WeightsOf(w2, e, n.h * n.o, n.experts);
    Prefetch next_in = WeightsOf(w1, e + 1, n.d * n.h, n.experts);
    Output output_layer;
    output_layer.bias = weights.b2 + e * n.o;
    for (int64_t r = begin; r < begin + m; r += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, begin + m - r);
      float* act = hid != nullptr ? hid + r * n.h : ThreadScratch(0, rows * n.h);
      Times(rows, n.h, n.d, x + r * n.d, n.d, w1 + e * n.d * n.h, n.h, act, n.h, &next_out,
            HiddenLayer(b1 + e * n.h));
      Times(rows, n.o, n.h, act, n.h, w2 + e * n.h * n.o, n.o, y + r * n.o, n.o, &next_in,
            output_layer);
    }
  });
  const int64_t used = offsets.back();
  std::memset(y + used * n.o, 0, sizeof(float) * (n.rows - used) * n.o);
  if (hid != nullptr) std::memset(hid + used * n.h, 0, sizeof(float) * (n.rows - used) * n.h);
}

void FeedForwardGrad(const Dims& n, const std::vector<int64_t>& offsets,
                     const FeedForwardWeights& weights, const float* hid,
                     const float* dy_all, const FeedForwardGradients& gradients,
                     const ParallelFor& parallel_for) {
  const float *x = weights.x, *w1 = weights.w1, *b1 = weights.b1, *w2 = weights.w2;
  const bool recompute = hid == nullptr;
  ForEachExpert(parallel_for, n, 4 * n.h * (n.d + n.o), [&](int64_t e) {
    const int64_t begin = offsets[e], m = offsets[e + 1] - offsets[e];
    const float* w1e = w1 + e * n.d * n.h;
    const float* w2e = w2 + e * n.h * n.o;
    // While one kernel is read, the next one is fetched: kernel_in for dx, then the
    // next expert's kernel_out.
    Prefetch next_in = WeightsOf(w1, e, n.d * n.h, n.experts);
    Prefetch next_out = WeightsOf(w2, e + 1, n.h * n.o, n.experts);
    // One pass even without rows, which writes the expert's zero weight gradients.
    int64_t r = begin;
    do {
      const int64_t rows = std::min(kChunkRows, begin + m - r);
      const bool first = r == begin, last = r + rows == begin + m;
      const float* xr = x + r * n.d;
      const float* dy = dy_all + r * n.o;
      // The gradient at the hidden pre-activations, then the recomputed activations.
      float* d_pre = ThreadScratch(0, (recompute ? 2 : 1) * rows * n.h);
      const float* act = recompute ? nullptr : hid + r * n.h;
      if (recompute) {
        float* recomputed = d_pre + rows * n.h;
        Times(rows, n.h, n.d, xr, n.d, w1e, n.h, recomputed, n.h, &next_out,
              HiddenLayer(b1 + e * n.h));
        act = recomputed;
      }
      // d_pre = (dy W2^T) where the ReLU passed its input, else 0.
      TimesTransposed(rows, n.h, n.o, dy, n.o, w2e, n.o, d_pre, n.h, &next_in);
      for (int64_t i = 0; i < rows * n.h; i += kLanes) {
        simd::Store(d_pre + i, simd::WherePositive(simd::Load(act + i), simd::Load(d_pre + i)));
      }
      // Weight gradients act^T dy and x^T d_pre, summed over the chunks.
      Output weight_gradient;
      weight_gradient.accumulate = !first;
      weight_gradient.stream = last;
      TransposedTimes(n.h, n.o, rows, act, n.h, dy, n.o, gradients.dw2 + e * n.h * n.o, n.o,
                      &next_out, weight_gradient);
      ColumnSums(rows, n.o, dy, gradients.db2 + e * n.o, !first);
      TransposedTimes(n.d, n.h, rows, xr, n.d, d_pre, n.h, gradients.dw1 + e * n.d * n.h, n.h,
                      &next_out, weight_gradient);
      ColumnSums(rows, n.h, d_pre, gradients.db1 + e * n.h, !first);
      TimesTransposed(rows, n.d, n.h, d_pre, n.h, w1e, n.h, gradients.dx + r * n.d, n.d,
                      &next_out);
      r += rows;
    } while (r < begin + m);
    // Streaming stores are weakly ordered: make them visible before the op's output is.
    _mm_sfence();
  });
  const int64_t used = offsets.back();
  std::memset(gradients.dx + used * n.d, 0, sizeof(float) * (n.rows - used) * n.d);
}

namespace {

// ParallelFor over the intra-op threads of the op's device.
ParallelFor DeviceThreads(OpKernelContext* ctx) {
  return [ctx](int64_t n, int64_t cost, const std::function<void(int64_t, int64_t)>& body) {
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(n, cost, body);
  };
}

// The shapes, group offsets and weights both op kernels start with.
struct Operands {
  Dims dims;
  std::vector<int64_t> offsets;
  FeedForwardWeights weights;
};

tensorflow::Status ReadOperands(OpKernelContext* ctx, Operands* operands) {
  TF_RETURN_IF_ERROR(CheckFeedForwardShapes(ctx->input(0).shape(), ctx->input(1).shape(),
                                            ctx->input(2).shape(), ctx->input(3).shape(),
                                            ctx->input(4).shape(), &operands->dims));
  TF_RETURN_IF_ERROR(GroupOffsets(ctx->input(1).flat<int32_t>().data(), operands->dims,
                                  &operands->offsets));
  operands->weights = {ctx->input(0).flat<float>().data(), ctx->input(2).flat<float>().data(),
                       ctx->input(3).flat<float>().data(), ctx->input(4).flat<float>().data(),
                       nullptr};
  return tensorflow::OkStatus();
}

class GroupedFeedForwardOp : public OpKernel {
 public:
  explicit GroupedFeedForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("keep_hidden", &keep_hidden_));
  }

  void Compute(OpKernelContext* ctx) override {
    Operands operands;
    OP_REQUIRES_OK(ctx, ReadOperands(ctx, &operands));
    const Dims& n = operands.dims;
    const Tensor& bias_out = ctx->input(5);
    OP_REQUIRES_OK(ctx, CheckBiasOut(bias_out.shape(), n));
    operands.weights.b2 = bias_out.flat<float>().data();

    Tensor* outputs = nullptr;
    Tensor* hidden = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n.rows, n.o}), &outputs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, TensorShape({keep_hidden_ ? n.rows : 0, n.h}), &hidden));
    FeedForward(n, operands.offsets, operands.weights, outputs->flat<float>().data(),
                keep_hidden_ ? hidden->flat<float>().data() : nullptr, DeviceThreads(ctx));
  }

 private:
  bool keep_hidden_;
};

class GroupedFeedForwardGradOp : public OpKernel {
 public:
  explicit GroupedFeedForwardGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    Operands operands;
    OP_REQUIRES_OK(ctx, ReadOperands(ctx, &operands));
    const Dims& n = operands.dims;
    const Tensor& hidden = ctx->input(5);
    const Tensor& d_outputs = ctx->input(6);
    OP_REQUIRES_OK(ctx, CheckGradientShapes(hidden.shape(), d_outputs.shape(), n));

    Tensor *d_inputs, *d_kernel_in, *d_bias_in, *d_kernel_out, *d_bias_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(2).shape(), &d_kernel_in));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, ctx->input(4).shape(), &d_kernel_out));
    // d_inputs may take over d_outputs' buffer (when d = o and nothing else reads it): a
    // chunk's input gradients are written after its last read of d_outputs.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({6}, 0, ctx->input(0).shape(),
                                                              &d_inputs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n.experts, n.h}), &d_bias_in));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({n.experts, n.o}), &d_bias_out));
    FeedForwardGrad(n, operands.offsets, operands.weights,
                    hidden.NumElements() == 0 ? nullptr : hidden.flat<float>().data(),
                    d_outputs.flat<float>().data(),
                    {d_inputs->flat<float>().data(), d_kernel_in->flat<float>().data(),
                     d_bias_in->flat<float>().data(), d_kernel_out->flat<float>().data(),
                     d_bias_out->flat<float>().data()},
                    DeviceThreads(ctx));
  }
};

tensorflow::Status SameAsInputShapes(tensorflow::shape_inference::InferenceContext* c) {
  using tensorflow::shape_inference::ShapeHandle;
  ShapeHandle inputs, kernel_in, kernel_out;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &inputs));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 3, &kernel_in));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 3, &kernel_out));
  c->set_output(0, inputs);
  c->set_output(1, kernel_in);
  c->set_output(2, c->Matrix(c->Dim(kernel_in, 0), c->Dim(kernel_in, 2)));
  c->set_output(3, kernel_out);
  c->set_output(4, c->Matrix(c->Dim(kernel_out, 0), c->Dim(kernel_out, 2)));
  return tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("MoeGroupedFeedForward")
    .Input("inputs: float")
    .Input("group_sizes: int32")
    .Input("kernel_in: float")
    .Input("bias_in: float")
    .Input("kernel_out: float")
    .Input("bias_out: float")
    .Attr("keep_hidden: bool = true")
    .Output("outputs: float")
    .Output("hidden: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      using tensorflow::shape_inference::ShapeHandle;
      ShapeHandle inputs, kernel_in, kernel_out;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &inputs));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 3, &kernel_in));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 3, &kernel_out));
      bool keep_hidden;
      TF_RETURN_IF_ERROR(c->GetAttr("keep_hidden", &keep_hidden));
      c->set_output(0, c->Matrix(c->Dim(inputs, 0), c->Dim(kernel_out, 2)));
      c->set_output(1, c->Matrix(keep_hidden ? c->Dim(inputs, 0) : c->MakeDim(0),
                                 c->Dim(kernel_in, 2)));
      return tensorflow::OkStatus();
    })
    .Doc("The experts' ReLU FFNs on rows sorted by expert; hidden = the activations.");

REGISTER_OP("MoeGroupedFeedForwardGrad")
    .Input("inputs: float")
    .Input("group_sizes: int32")
    .Input("kernel_in: float")
    .Input("bias_in: float")
    .Input("kernel_out: float")
    .Input("hidden: float")
    .Input("d_outputs: float")
    .Output("d_inputs: float")
    .Output("d_kernel_in: float")
    .Output("d_bias_in: float")
    .Output("d_kernel_out: float")
    .Output("d_bias_out: float")
    .SetShapeFn(SameAsInputShapes)
    .Doc("Gradients of MoeGroupedFeedForward; an empty hidden is recomputed.");

REGISTER_KERNEL_BUILDER(Name("MoeGroupedFeedForward").Device(DEVICE_CPU),
                        GroupedFeedForwardOp);
REGISTER_KERNEL_BUILDER(Name("MoeGroupedFeedForwardGrad").Device(DEVICE_CPU),
                        GroupedFeedForwardGradOp);

}  // namespace moe_tf

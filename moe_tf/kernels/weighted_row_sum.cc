// Gate-weighted sums of gathered rows, and their gradient, as two CPU ops: the sparse
// dispatch's combine (each token's sum of gate * expert output) and the gradient of its
// dispatch (each token's sum of its rows' gradients).
//
// Why: in TensorFlow ops each is a gather, a multiply and a sum, three passes over a
// [assignments, d] tensor and two temporaries of that size; its gradient is a gather,
// two multiplies and a sum. Here each is one pass that reads every row once.
//
// Layouts (row-major float32): rows [R, d]; row_index [A] (int32, the row of each
// entry); weights [A] or empty (all 1); offsets [N + 1] (int32, output n sums the entries
// offsets[n] .. offsets[n + 1] - 1, so offsets is non-decreasing from 0 to A).

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"
#include "simd.h"

namespace moe_tf {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;

struct Entries {
  const float* rows;
  const int32_t* row_index;
  const float* weights;  // nullptr: every weight is 1
  const int32_t* offsets;
  int64_t num_rows, d, num_entries, num_sums;
};

// Checks the operands shared by both ops; every index is checked before any is used.
// Empty weights stand for all 1 where `weights_optional`.
Status ReadEntries(OpKernelContext* ctx, bool weights_optional, Entries* entries) {
  const Tensor& rows = ctx->input(0);
  const Tensor& row_index = ctx->input(1);
  const Tensor& weights = ctx->input(2);
  const Tensor& offsets = ctx->input(3);
  if (rows.dims() != 2) {
    return InvalidArgument("rows must be [rows, d], got shape ", rows.shape().DebugString());
  }
  if (row_index.dims() != 1) {
    return InvalidArgument("row_index must be [entries], got shape ",
                           row_index.shape().DebugString());
  }
  const int64_t num_entries = row_index.dim_size(0);
  const bool all_ones = weights_optional && weights.dims() == 1 && weights.dim_size(0) == 0;
  if (!all_ones && (weights.dims() != 1 || weights.dim_size(0) != num_entries)) {
    return InvalidArgument("weights must be [entries] = [", num_entries, "]",
                           weights_optional ? " or empty" : "", ", got shape ",
                           weights.shape().DebugString());
  }
  if (offsets.dims() != 1 || offsets.dim_size(0) < 1) {
    return InvalidArgument("offsets must be [sums + 1], got shape ",
                           offsets.shape().DebugString());
  }
  *entries = {rows.flat<float>().data(), row_index.flat<int32_t>().data(),
              all_ones ? nullptr : weights.flat<float>().data(),
              offsets.flat<int32_t>().data(), rows.dim_size(0), rows.dim_size(1),
              num_entries, offsets.dim_size(0) - 1};
  for (int64_t a = 0; a < num_entries; ++a) {
    const int32_t r = entries->row_index[a];
    if (r < 0 || r >= entries->num_rows) {
      return InvalidArgument("row_index[", a, "] = ", r, " is not in [0, ",
                             entries->num_rows, ")");
    }
  }
  if (entries->offsets[0] != 0 || entries->offsets[entries->num_sums] != num_entries) {
    return InvalidArgument("offsets must run from 0 to the ", num_entries,
                           " entries, got ", entries->offsets[0], " to ",
                           entries->offsets[entries->num_sums]);
  }
  for (int64_t n = 0; n < entries->num_sums; ++n) {
    if (entries->offsets[n + 1] < entries->offsets[n]) {
      return InvalidArgument("offsets must not decrease, but offsets[", n + 1, "] = ",
                             entries->offsets[n + 1], " < offsets[", n, "] = ",
                             entries->offsets[n]);
    }
  }
  return tensorflow::OkStatus();
}

// out = w * x, and returns <x, y>. A vector of partial sums: a scalar sum would be one
// dependent add per element (the compiler may not reorder float additions).
inline float ScaleAndDot(float w, const float* x, const float* y, float* out, int64_t d) {
  using simd::kLanes;
  const simd::Vec weight = simd::Broadcast(w);
  simd::Vec dot = simd::Zero();
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    const simd::Vec xi = simd::Load(x + i);
    dot = simd::MulAdd(xi, simd::Load(y + i), dot);
    simd::Store(out + i, simd::Mul(weight, xi));
  }
  float sum = simd::Sum(dot);
  for (; i < d; ++i) {
    sum += x[i] * y[i];
    out[i] = w * x[i];
  }
  return sum;
}

// Runs fn(begin, end) over the sums [0, num_sums) on the intra-op threads.
void ForEachSum(OpKernelContext* ctx, const Entries& e, int64_t passes,
                const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t per_sum = std::max<int64_t>(1, e.num_entries / std::max<int64_t>(1, e.num_sums));
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      e.num_sums, passes * per_sum * e.d, fn);
}

class WeightedRowSumOp : public OpKernel {
 public:
  explicit WeightedRowSumOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    Entries e;
    OP_REQUIRES_OK(ctx, ReadEntries(ctx, /*weights_optional=*/true, &e));
    Tensor* sums = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({e.num_sums, e.d}), &sums));
    float* out = sums->flat<float>().data();
    ForEachSum(ctx, e, 2, [&e, out](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        float* sum = out + n * e.d;
        std::fill(sum, sum + e.d, 0.0f);
        for (int32_t a = e.offsets[n]; a < e.offsets[n + 1]; ++a) {
          const float* row = e.rows + e.row_index[a] * e.d;
          const float w = e.weights ? e.weights[a] : 1.0f;
          for (int64_t i = 0; i < e.d; ++i) sum[i] += w * row[i];
        }
      }
    });
  }
};

// For sums = WeightedRowSum(rows, row_index, weights, offsets) and their gradient d_sums:
// d_rows[row_index[a]] = weights[a] d_sums[n] and d_weights[a] = <d_sums[n], rows[row_index[a]]>
// for every entry a of sum n. row_index must be a permutation of the rows (every row in
// exactly one entry), so that each row of d_rows is written once, with no scatter-add.
class WeightedRowSumGradOp : public OpKernel {
 public:
  explicit WeightedRowSumGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    Entries e;
    OP_REQUIRES_OK(ctx, ReadEntries(ctx, /*weights_optional=*/false, &e));
    OP_REQUIRES(ctx, e.num_entries == e.num_rows,
                InvalidArgument("row_index must be a permutation of the ", e.num_rows,
                                " rows, but has ", e.num_entries, " entries"));
    std::vector<bool> seen(e.num_rows, false);
    for (int64_t a = 0; a < e.num_entries; ++a) {
      OP_REQUIRES(ctx, !seen[e.row_index[a]],
                  InvalidArgument("row_index must be a permutation of the rows, but row ",
                                  e.row_index[a], " appears twice"));
      seen[e.row_index[a]] = true;
    }
    const Tensor& d_sums = ctx->input(4);
    OP_REQUIRES(ctx, d_sums.dims() == 2 && d_sums.dim_size(0) == e.num_sums &&
                         d_sums.dim_size(1) == e.d,
                InvalidArgument("d_sums must be [sums, d] = [", e.num_sums, ", ", e.d,
                                "], got ", d_sums.shape().DebugString()));
    Tensor* d_rows = nullptr;
    Tensor* d_weights = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &d_rows));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({e.num_entries}), &d_weights));
    const float* dy = d_sums.flat<float>().data();
    float* dx = d_rows->flat<float>().data();
    float* dw = d_weights->flat<float>().data();
    ForEachSum(ctx, e, 3, [&e, dy, dx, dw](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const float* d_sum = dy + n * e.d;
        for (int32_t a = e.offsets[n]; a < e.offsets[n + 1]; ++a) {
          const int64_t r = e.row_index[a];
          const float* row = e.rows + r * e.d;
          float* d_row = dx + r * e.d;
          dw[a] = ScaleAndDot(e.weights[a], d_sum, row, d_row, e.d);
        }
      }
    });
  }
};

}  // namespace

REGISTER_OP("MoeWeightedRowSum")
    .Input("rows: float")
    .Input("row_index: int32")
    .Input("weights: float")
    .Input("offsets: int32")
    .Output("sums: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      using tensorflow::shape_inference::DimensionHandle;
      using tensorflow::shape_inference::ShapeHandle;
      ShapeHandle rows, offsets;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &rows));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &offsets));
      DimensionHandle num_sums;
      TF_RETURN_IF_ERROR(c->Subtract(c->Dim(offsets, 0), 1, &num_sums));
      c->set_output(0, c->Matrix(num_sums, c->Dim(rows, 1)));
      return tensorflow::OkStatus();
    })
    .Doc("sums[n] = sum over a in [offsets[n], offsets[n+1]) of weights[a] rows[row_index[a]].");

REGISTER_OP("MoeWeightedRowSumGrad")
    .Input("rows: float")
    .Input("row_index: int32")
    .Input("weights: float")
    .Input("offsets: int32")
    .Input("d_sums: float")
    .Output("d_rows: float")
    .Output("d_weights: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return tensorflow::OkStatus();
    })
    .Doc("Gradients of MoeWeightedRowSum for rows and weights (row_index a permutation).");

REGISTER_KERNEL_BUILDER(Name("MoeWeightedRowSum").Device(DEVICE_CPU), WeightedRowSumOp);
REGISTER_KERNEL_BUILDER(Name("MoeWeightedRowSumGrad").Device(DEVICE_CPU),
                        WeightedRowSumGradOp);

}  // namespace moe_tf

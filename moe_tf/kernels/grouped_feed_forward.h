// The experts' feed-forward networks over rows sorted by expert (grouped_feed_forward.cc),
// as the two places that run them see it: TensorFlow's CPU op kernels (same file) and
// XLA's custom calls (xla_custom_calls.cc).
//
// Layouts (row-major float32): inputs [rows, d], group_sizes [experts] (int32, rows of
// each expert in order; rows after the last group are padding), kernel_in [experts, d, h],
// bias_in [experts, h], kernel_out [experts, h, o], bias_out [experts, o], hidden
// [rows, h] (the activations, or nothing), outputs [rows, o]. d, h and o must be
// multiples of 16 (simd::kWidthMultiple).

#ifndef MOE_TF_KERNELS_GROUPED_FEED_FORWARD_H_
#define MOE_TF_KERNELS_GROUPED_FEED_FORWARD_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/status.h"

namespace moe_tf {

struct Dims {
  int64_t rows, experts, d, h, o;
};

// Runs body(begin, end) over subranges of [0, n) (the experts), spread over threads;
// `cost` estimates one item's work, for the runners that size their shards by it.
using ParallelFor = std::function<void(int64_t n, int64_t cost,
                                       const std::function<void(int64_t, int64_t)>& body)>;

// The shapes both ops start with (inputs, group_sizes, kernel_in, bias_in, kernel_out),
// checked; their sizes into `dims`.
tensorflow::Status CheckFeedForwardShapes(const tensorflow::TensorShape& inputs,
                                          const tensorflow::TensorShape& group_sizes,
                                          const tensorflow::TensorShape& kernel_in,
                                          const tensorflow::TensorShape& bias_in,
                                          const tensorflow::TensorShape& kernel_out,
                                          Dims* dims);
// The forward op's bias_out.
tensorflow::Status CheckBiasOut(const tensorflow::TensorShape& bias_out, const Dims& dims);
// The gradient op's hidden ([rows, h], or empty: recomputed) and d_outputs.
tensorflow::Status CheckGradientShapes(const tensorflow::TensorShape& hidden,
                                       const tensorflow::TensorShape& d_outputs,
                                       const Dims& dims);

// Each group's first row (offsets[e]; the last entry is the number of rows in use),
// from group_sizes; an error for a negative size or more rows than there are.
tensorflow::Status GroupOffsets(const int32_t* group_sizes, const Dims& dims,
                                std::vector<int64_t>* offsets);

struct FeedForwardWeights {
  const float *x, *w1, *b1, *w2, *b2;
};

struct FeedForwardGradients {
  float *dx, *dw1, *db1, *dw2, *db2;
};

// outputs = the experts' FFNs of their rows (zeros for the padding rows); `hidden`, when
// not null, receives the activations.
void FeedForward(const Dims& dims, const std::vector<int64_t>& offsets,
                 const FeedForwardWeights& weights, float* outputs, float* hidden,
                 const ParallelFor& parallel_for);

// The gradients of FeedForward for d_outputs; a null `hidden` is recomputed. `dx` may be
// d_outputs' own buffer when d = o.
void FeedForwardGrad(const Dims& dims, const std::vector<int64_t>& offsets,
                     const FeedForwardWeights& weights, const float* hidden,
                     const float* d_outputs, const FeedForwardGradients& gradients,
                     const ParallelFor& parallel_for);

}  // namespace moe_tf

#endif  // MOE_TF_KERNELS_GROUPED_FEED_FORWARD_H_

// The experts' feed-forward ops inside programs that XLA compiles (`jit_compile=True`):
// each op becomes a custom call to the same functions its TensorFlow kernel runs
// (grouped_feed_forward.h), on XLA's intra-op threads.
//
// Why: XLA's CPU backend runs the fixed-capacity dispatch's experts as batched dots,
// 1.1-1.3x the time of one dense dot of the same FLOPs at 256 rows per expert and twice
// that at 32 (benchmarks/RESULTS.md, sessions 15-20); these kernels run both near the
// dense rate. Two registrations: the op's compilation kernel for XLA's CPU device, which
// emits the custom call (registered as a kernel of that device directly, so that it
// counts whether or not XLA registered its own kernels before this library was loaded),
// and the custom call's handler, through XLA's FFI.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "grouped_feed_forward.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "xla/ffi/api/ffi.h"
#include "xla/hlo/builder/xla_builder.h"
#include "xla/shape_util.h"

namespace moe_tf {
namespace {

namespace ffi = ::xla::ffi;
using ::tensorflow::TensorShape;
using ::tensorflow::XlaOpKernel;
using ::tensorflow::XlaOpKernelContext;

constexpr char kFeedForwardTarget[] = "moe_grouped_feed_forward";
constexpr char kFeedForwardGradTarget[] = "moe_grouped_feed_forward_grad";

// ParallelFor on XLA's intra-op threads: the calling thread and up to one task per pool
// thread take the experts one at a time from a shared counter, and the call returns
// when every expert is done. A task that starts late finds nothing left and touches
// nothing of the call's (the counter lives in shared state), so nothing waits for tasks
// that never start.
ParallelFor PoolThreads(ffi::ThreadPool* pool) {
  return [pool](int64_t n, int64_t /*cost*/,
                const std::function<void(int64_t, int64_t)>& body) {
    struct Progress {
      std::atomic<int64_t> next{0};
      int64_t done = 0;
      std::mutex mutex;
      std::condition_variable all_done;
    };
    auto progress = std::make_shared<Progress>();
    auto work = [progress, n, &body] {
      int64_t finished = 0;
      for (int64_t i; (i = progress->next.fetch_add(1)) < n; ++finished) body(i, i + 1);
      if (finished == 0) return;
      std::lock_guard<std::mutex> lock(progress->mutex);
      progress->done += finished;
      if (progress->done == n) progress->all_done.notify_all();
    };
    const int64_t helpers = std::min<int64_t>(pool->num_threads(), n - 1);
    for (int64_t t = 0; t < helpers; ++t) pool->Schedule([work] { work(); });
    work();
    std::unique_lock<std::mutex> lock(progress->mutex);
    progress->all_done.wait(lock, [&] { return progress->done == n; });
  };
}

// The sizes the compilation kernel checked, read back from the buffers, and each group's
// first row (group_sizes are only known now; a bad one is the call's error).
ffi::Error ReadGroups(const ffi::Buffer<ffi::F32>& inputs,
                      const ffi::Buffer<ffi::S32>& group_sizes,
                      const ffi::Buffer<ffi::F32>& kernel_in,
                      const ffi::Buffer<ffi::F32>& kernel_out, Dims* dims,
                      std::vector<int64_t>* offsets) {
  *dims = {inputs.dimensions()[0], group_sizes.dimensions()[0], inputs.dimensions()[1],
           kernel_in.dimensions()[2], kernel_out.dimensions()[2]};
  const tensorflow::Status status = GroupOffsets(group_sizes.typed_data(), *dims, offsets);
  return status.ok() ? ffi::Error::Success()
                     : ffi::Error::InvalidArgument(std::string(status.message()));
}

ffi::Error FeedForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> inputs,
                           ffi::Buffer<ffi::S32> group_sizes, ffi::Buffer<ffi::F32> kernel_in,
                           ffi::Buffer<ffi::F32> bias_in, ffi::Buffer<ffi::F32> kernel_out,
                           ffi::Buffer<ffi::F32> bias_out,
                           ffi::ResultBuffer<ffi::F32> outputs,
                           ffi::ResultBuffer<ffi::F32> hidden) {
  Dims dims;
  std::vector<int64_t> offsets;
  ffi::Error error = ReadGroups(inputs, group_sizes, kernel_in, kernel_out, &dims, &offsets);
  if (error.failure()) return error;
  const bool keep_hidden = hidden->element_count() > 0;
  FeedForward(dims, offsets,
              {inputs.typed_data(), kernel_in.typed_data(), bias_in.typed_data(),
               kernel_out.typed_data(), bias_out.typed_data()},
              outputs->typed_data(), keep_hidden ? hidden->typed_data() : nullptr,
              PoolThreads(&pool));
  return ffi::Error::Success();
}

ffi::Error FeedForwardGradCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> inputs,
                               ffi::Buffer<ffi::S32> group_sizes,
                               ffi::Buffer<ffi::F32> kernel_in, ffi::Buffer<ffi::F32> bias_in,
                               ffi::Buffer<ffi::F32> kernel_out, ffi::Buffer<ffi::F32> hidden,
                               ffi::Buffer<ffi::F32> d_outputs,
                               ffi::ResultBuffer<ffi::F32> d_inputs,
                               ffi::ResultBuffer<ffi::F32> d_kernel_in,
                               ffi::ResultBuffer<ffi::F32> d_bias_in,
                               ffi::ResultBuffer<ffi::F32> d_kernel_out,
                               ffi::ResultBuffer<ffi::F32> d_bias_out) {
  Dims dims;
  std::vector<int64_t> offsets;
  ffi::Error error = ReadGroups(inputs, group_sizes, kernel_in, kernel_out, &dims, &offsets);
  if (error.failure()) return error;
  FeedForwardGrad(dims, offsets,
                  {inputs.typed_data(), kernel_in.typed_data(), bias_in.typed_data(),
                   kernel_out.typed_data(), nullptr},
                  hidden.element_count() > 0 ? hidden.typed_data() : nullptr,
                  d_outputs.typed_data(),
                  {d_inputs->typed_data(), d_kernel_in->typed_data(), d_bias_in->typed_data(),
                   d_kernel_out->typed_data(), d_bias_out->typed_data()},
                  PoolThreads(&pool));
  return ffi::Error::Success();
}

// The operands both handlers start with, in the ops' order: inputs, group_sizes,
// kernel_in, bias_in, kernel_out.
auto BindFeedForwardOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeGroupedFeedForwardHandler, FeedForwardCall,
                              BindFeedForwardOperands()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias_out
                                  .Ret<ffi::Buffer<ffi::F32>>()    // outputs
                                  .Ret<ffi::Buffer<ffi::F32>>());  // hidden

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeGroupedFeedForwardGradHandler, FeedForwardGradCall,
                              BindFeedForwardOperands()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // hidden
                                  .Arg<ffi::Buffer<ffi::F32>>()    // d_outputs
                                  .Ret<ffi::Buffer<ffi::F32>>()    // d_inputs
                                  .Ret<ffi::Buffer<ffi::F32>>()    // d_kernel_in
                                  .Ret<ffi::Buffer<ffi::F32>>()    // d_bias_in
                                  .Ret<ffi::Buffer<ffi::F32>>()    // d_kernel_out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_bias_out

XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kFeedForwardTarget, "Host",
                         MoeGroupedFeedForwardHandler);
XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), kFeedForwardGradTarget, "Host",
                         MoeGroupedFeedForwardGradHandler);

xla::Shape RowMajorF32(std::initializer_list<int64_t> dims) {
  return xla::ShapeUtil::MakeShapeWithDescendingLayout(xla::F32, std::vector<int64_t>(dims));
}

// Row-major shapes of the op's inputs, as the handlers read them.
std::vector<xla::Shape> OperandShapes(XlaOpKernelContext* ctx) {
  std::vector<xla::Shape> shapes;
  for (int i = 0; i < ctx->num_inputs(); ++i) {
    const TensorShape shape = ctx->InputShape(i);
    shapes.push_back(xla::ShapeUtil::MakeShapeWithDescendingLayout(
        i == 1 ? xla::S32 : xla::F32, shape.dim_sizes()));
  }
  return shapes;
}

// A custom call to `target` with the op's inputs and `results`, whose parts become the
// op's outputs.
void EmitCustomCall(XlaOpKernelContext* ctx, const char* target,
                    const std::vector<xla::Shape>& results) {
  std::vector<xla::XlaOp> operands;
  for (int i = 0; i < ctx->num_inputs(); ++i) operands.push_back(ctx->Input(i));
  const xla::XlaOp call = xla::CustomCallWithLayout(
      ctx->builder(), target, operands, xla::ShapeUtil::MakeTupleShape(results),
      OperandShapes(ctx), /*opaque=*/"", /*has_side_effect=*/false,
      /*output_operand_aliasing=*/{}, /*literal=*/nullptr,
      xla::CustomCallSchedule::SCHEDULE_NONE, xla::CustomCallApiVersion::API_VERSION_TYPED_FFI);
  for (int i = 0; i < static_cast<int>(results.size()); ++i) {
    ctx->SetOutput(i, xla::GetTupleElement(call, i));
  }
}

tensorflow::Status CheckedDims(XlaOpKernelContext* ctx, Dims* dims) {
  return CheckFeedForwardShapes(ctx->InputShape(0), ctx->InputShape(1), ctx->InputShape(2),
                                ctx->InputShape(3), ctx->InputShape(4), dims);
}

class GroupedFeedForwardXlaOp : public XlaOpKernel {
 public:
  explicit GroupedFeedForwardXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("keep_hidden", &keep_hidden_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    Dims n;
    OP_REQUIRES_OK(ctx, CheckedDims(ctx, &n));
    OP_REQUIRES_OK(ctx, CheckBiasOut(ctx->InputShape(5), n));
    EmitCustomCall(ctx, kFeedForwardTarget,
                   {RowMajorF32({n.rows, n.o}), RowMajorF32({keep_hidden_ ? n.rows : 0, n.h})});
  }

 private:
  bool keep_hidden_;
};

class GroupedFeedForwardGradXlaOp : public XlaOpKernel {
 public:
  using XlaOpKernel::XlaOpKernel;

  void Compile(XlaOpKernelContext* ctx) override {
    Dims n;
    OP_REQUIRES_OK(ctx, CheckedDims(ctx, &n));
    OP_REQUIRES_OK(ctx, CheckGradientShapes(ctx->InputShape(5), ctx->InputShape(6), n));
    EmitCustomCall(ctx, kFeedForwardGradTarget,
                   {RowMajorF32({n.rows, n.d}), RowMajorF32({n.experts, n.d, n.h}),
                    RowMajorF32({n.experts, n.h}), RowMajorF32({n.experts, n.h, n.o}),
                    RowMajorF32({n.experts, n.o})});
  }
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("MoeGroupedFeedForward").Device(tensorflow::DEVICE_CPU_XLA_JIT),
                        GroupedFeedForwardXlaOp);
REGISTER_KERNEL_BUILDER(
    Name("MoeGroupedFeedForwardGrad").Device(tensorflow::DEVICE_CPU_XLA_JIT),
    GroupedFeedForwardGradXlaOp);

}  // namespace moe_tf

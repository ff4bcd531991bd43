// ONNX Runtime custom-op library for the nodes `export --target sparse-cpu` writes (domain ai.sparsedeploy), so a
// sparse-cpu artifact runs whole in one ONNX Runtime session:
//   SparseLinear(x, mask, values, block_ptr, negzero, shape) -> y   (bitmask16-v2 weight; kernels/format.py)
//   Int8Linear(x, q, scales, shape) -> y                            (scaled-int8 weight; kernels/scaled_int8.py)
//   Int8Gather(indices, q, scales, shape) -> rows                   (the same weight read as an embedding)
// x: float [..., K]; y: float [..., N]; inputs in the order export writes them (the node's `arrays` attribute).
// negzero only matters for unpacking; the kernel never reads it. Threads of the kernels: the session config entry
// `sparsedeploy.threads` (set before registering the library: so.add_session_config_entry("sparsedeploy.threads",
// "1")), else the CPUs this process may run on; an int attribute `threads` on a node overrides it for that node.
//
// Built by scripts/build_ort_op.sh (ONNX Runtime's C/C++ headers from Debian's libonnxruntime-dev, fetched and
// checked by hash, or any ONNX Runtime package: ONNXRUNTIME_ROOT) with CMakeLists.txt beside it; it calls the same
// C ABI as the Python binding (../sparse_cpu.c, compiled into this library). It links nothing of ONNX Runtime: the
// API comes from the session that registers it, so one build serves any ONNX Runtime from the headers' version on.
// Each SparseLinear node binds its weight once (sdk_linear_new): the library picks the form per call (bitmask, row or
// tile form; sparse_cpu.c pick_form, the same rules the Python runtime's calls go by) and builds a derived form at
// the first call that needs it. Tests: tests/kernels/test_ort_op.py.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <sched.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

extern "C" {
struct sdk_linear;
sdk_linear *sdk_linear_new(const uint16_t *mask, const float *values, const int64_t *block_ptr, int64_t n, int64_t k);
void sdk_linear_free(sdk_linear *w);
int sdk_linear_matmul(sdk_linear *w, const float *x, int64_t b, float *y, int threads, int isa, int form);
int sdk_int8_matmul(const float *x, int64_t b, int64_t k, const int8_t *q, const float *scales, int64_t n, float *y,
                    int threads, int isa);
}

namespace {

constexpr int64_t kInt8Block = 32, kInt8Rows = 4;  // scaled_int8.BLOCK, scaled_int8.ROWS

struct OpError {
    std::string message;
};

[[noreturn]] void fail(const std::string &op, const std::string &what) { throw OpError{op + ": " + what}; }

std::string dims_text(const std::vector<int64_t> &dims) {
    std::string s = "[";
    for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "]";
}

int default_threads() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    return 1;
}

// A node's threads: its `threads` attribute if it has one, else the session's.
int node_threads(const OrtKernelInfo *info, int session_threads) {
    Ort::ConstKernelInfo ki(info);
    int64_t threads = 0;
    try {
        threads = ki.GetAttribute<int64_t>("threads");
    } catch (const Ort::Exception &) {  // not set
        return session_threads;
    }
    if (threads < 1) fail("sparsedeploy", "attribute `threads` must be >= 1, got " + std::to_string(threads));
    return static_cast<int>(threads);
}

// The session's threads: its config entry `sparsedeploy.threads`, else the CPUs this process may run on.
int session_threads(OrtSessionOptions *options) {
    Ort::UnownedSessionOptions so(options);
    const char *key = "sparsedeploy.threads";
    if (!so.HasConfigEntry(key)) return default_threads();
    const std::string text = so.GetConfigEntry(key);
    size_t used = 0;
    long value = 0;
    try {
        value = std::stol(text, &used);
    } catch (const std::exception &) {
        used = 0;
    }
    if (used != text.size() || value < 1 || value > 1024)
        fail("sparsedeploy", std::string("session config entry `") + key + "` must be a thread count >= 1, got '" + text + "'");
    return static_cast<int>(value);
}

// The weight's [N, K] from its `shape` input.
void weight_shape(const std::string &op, const Ort::ConstValue &shape, int64_t *n, int64_t *k) {
    const auto info = shape.GetTensorTypeAndShapeInfo();
    if (info.GetElementCount() != 2) fail(op, "input `shape` must hold [N, K], got " + dims_text(info.GetShape()));
    const int64_t *nk = shape.GetTensorData<int64_t>();
    *n = nk[0];
    *k = nk[1];
    if (*n < 1 || *k < 1) fail(op, "weight shape must be positive, got [" + std::to_string(*n) + ", " + std::to_string(*k) + "]");
}

void expect_count(const std::string &op, const char *name, const Ort::ConstValue &v, int64_t want) {
    const int64_t got = static_cast<int64_t>(v.GetTensorTypeAndShapeInfo().GetElementCount());
    if (got != want)
        fail(op, std::string("input `") + name + "` has " + std::to_string(got) + " elements, the weight's shape needs " +
                     std::to_string(want));
}

// x [..., K] -> (rows, output dims [..., N]).
int64_t rows_of(const std::string &op, const Ort::ConstValue &x, int64_t n, int64_t k, std::vector<int64_t> *out) {
    *out = x.GetTensorTypeAndShapeInfo().GetShape();
    if (out->empty() || out->back() != k) fail(op, "x " + dims_text(*out) + " does not end in K = " + std::to_string(k));
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < out->size(); ++i) rows *= (*out)[i];
    out->back() = n;
    return rows;
}

void check_rc(const std::string &op, int rc) {
    if (rc != 0) fail(op, "kernel error " + std::to_string(rc) + (rc == -3 ? " (out of memory)" : ""));
}

// Runs `body`, turning what it throws into an ONNX Runtime status (never an exception across the C ABI).
template <typename F>
OrtStatusPtr guarded(F &&body) {
    try {
        body();
        return nullptr;
    } catch (const OpError &e) {
        return Ort::Status(e.message.c_str(), ORT_INVALID_ARGUMENT).release();
    } catch (const Ort::Exception &e) {
        return Ort::Status(e.what(), e.GetOrtErrorCode()).release();
    } catch (const std::exception &e) {
        return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION).release();
    }
}

// A kernel's Compute: `body(op name, context)`, what it throws returned as a status.
template <typename F>
OrtStatusPtr compute(const char *name, OrtKernelContext *raw, F &&body) {
    return guarded([&] {
        const std::string op = name;
        Ort::KernelContext ctx(raw);
        body(op, ctx);
    });
}

// The whole weight checked once (its arrays are initializers: the same each call): block_ptr starts at 0, never
// decreases, and each block's count is its masks' stored bits, so a corrupt file is an error, not a read out of bounds.
void check_blocks(const std::string &op, const uint16_t *mask, const int64_t *ptr, int64_t nb, int64_t g) {
    if (ptr[0] != 0) fail(op, "block_ptr must start at 0, got " + std::to_string(ptr[0]));
    for (int64_t b = 0; b < nb; ++b) {
        int64_t bits = 0;
        for (int64_t i = 0; i < g * 4; ++i) bits += __builtin_popcount(mask[b * g * 4 + i]);
        if (ptr[b + 1] - ptr[b] != bits)
            fail(op, "block " + std::to_string(b) + " stores " + std::to_string(bits) + " elements by its masks but " +
                         std::to_string(ptr[b + 1] - ptr[b]) + " by block_ptr: the weight is corrupt, export it again");
    }
}

struct SparseLinearKernel {
    int threads = 1;
    std::mutex lock;                   // guards the binding (ONNX Runtime may run a kernel from several threads)
    const int64_t *bound_ptr = nullptr;  // the block_ptr `bound` was made for (its weight passed check_blocks)
    std::unique_ptr<sdk_linear, void (*)(sdk_linear *)> bound{nullptr, sdk_linear_free};

    // The bound weight for these inputs: checked and bound at the first call (and again if the arrays move).
    sdk_linear *bind(const std::string &op, Ort::KernelContext &ctx, int64_t *n, int64_t *k) {
        if (ctx.GetInputCount() != 6) fail(op, "expects 6 inputs (x, mask, values, block_ptr, negzero, shape)");
        auto mask = ctx.GetInput(1), values = ctx.GetInput(2), block_ptr = ctx.GetInput(3);
        weight_shape(op, ctx.GetInput(5), n, k);
        const int64_t nb = (*n + 3) / 4, g = (*k + 15) / 16;
        expect_count(op, "mask", mask, nb * g * 4);
        expect_count(op, "block_ptr", block_ptr, nb + 1);
        const int64_t *ptr = block_ptr.GetTensorData<int64_t>();
        std::lock_guard<std::mutex> hold(lock);
        if (ptr == bound_ptr) return bound.get();
        const int64_t stored = static_cast<int64_t>(values.GetTensorTypeAndShapeInfo().GetElementCount());
        check_blocks(op, mask.GetTensorData<uint16_t>(), ptr, nb, g);
        if (ptr[nb] + 16 > stored)  // the format pads 16 floats after the stored values
            fail(op, "block_ptr ends at " + std::to_string(ptr[nb]) + " but `values` holds " + std::to_string(stored) +
                         " floats (stored + 16 padding)");
        bound.reset(sdk_linear_new(mask.GetTensorData<uint16_t>(), values.GetTensorData<float>(), ptr, *n, *k));
        if (!bound) fail(op, "could not bind the weight (out of memory)");
        bound_ptr = ptr;
        return bound.get();
    }

    OrtStatusPtr ComputeV2(OrtKernelContext *raw) {
        return compute("SparseLinear", raw, [&](const std::string &op, Ort::KernelContext &ctx) {
            int64_t n = 0, k = 0;
            sdk_linear *w = bind(op, ctx, &n, &k);
            auto x = ctx.GetInput(0);
            std::vector<int64_t> dims;
            const int64_t rows = rows_of(op, x, n, k, &dims);
            auto y = ctx.GetOutput(0, dims);
            if (rows == 0) return;
            check_rc(op, sdk_linear_matmul(w, x.GetTensorData<float>(), rows, y.GetTensorMutableData<float>(), threads,
                                           0, 0));
        });
    }
};

// scaled-int8 weight checks: q int8 [ceil(N / 4), K / 32, 4, 32], scales float32 [ceil(N / 4), K / 32, 4].
void int8_weight(const std::string &op, Ort::KernelContext &ctx, int64_t *n, int64_t *k) {
    if (ctx.GetInputCount() != 4) fail(op, "expects 4 inputs (" + std::string(op == "Int8Gather" ? "indices" : "x") + ", q, scales, shape)");
    weight_shape(op, ctx.GetInput(3), n, k);
    if (*k % kInt8Block) fail(op, "K = " + std::to_string(*k) + " is not a multiple of 32");
    const int64_t groups = (*n + kInt8Rows - 1) / kInt8Rows;
    expect_count(op, "q", ctx.GetInput(1), groups * *k * kInt8Rows);
    expect_count(op, "scales", ctx.GetInput(2), groups * (*k / kInt8Block) * kInt8Rows);
}

struct Int8LinearKernel {
    int threads = 1;
    OrtStatusPtr ComputeV2(OrtKernelContext *raw) {
        return compute("Int8Linear", raw, [&](const std::string &op, Ort::KernelContext &ctx) {
            int64_t n = 0, k = 0;
            int8_weight(op, ctx, &n, &k);
            auto x = ctx.GetInput(0);
            std::vector<int64_t> dims;
            const int64_t rows = rows_of(op, x, n, k, &dims);
            auto y = ctx.GetOutput(0, dims);
            if (rows == 0) return;
            check_rc(op, sdk_int8_matmul(x.GetTensorData<float>(), rows, k, ctx.GetInput(1).GetTensorData<int8_t>(),
                                         ctx.GetInput(2).GetTensorData<float>(), n, y.GetTensorMutableData<float>(),
                                         threads, 0));
        });
    }
};

struct Int8GatherKernel {
    OrtStatusPtr ComputeV2(OrtKernelContext *raw) {
        return compute("Int8Gather", raw, [&](const std::string &op, Ort::KernelContext &ctx) {
            int64_t n = 0, k = 0;
            int8_weight(op, ctx, &n, &k);
            auto indices = ctx.GetInput(0);
            const auto info = indices.GetTensorTypeAndShapeInfo();
            std::vector<int64_t> dims = info.GetShape();
            const int64_t count = static_cast<int64_t>(info.GetElementCount());
            dims.push_back(k);
            auto out = ctx.GetOutput(0, dims);
            const int64_t *idx = indices.GetTensorData<int64_t>();
            const int8_t *q = ctx.GetInput(1).GetTensorData<int8_t>();
            const float *scales = ctx.GetInput(2).GetTensorData<float>();
            float *o = out.GetTensorMutableData<float>();
            const int64_t blocks = k / kInt8Block;
            for (int64_t i = 0; i < count; ++i) {
                int64_t r = idx[i];
                if (r < -n || r >= n)
                    fail(op, "index " + std::to_string(r) + " is out of range [-" + std::to_string(n) + ", " + std::to_string(n) + ")");
                if (r < 0) r += n;
                const int64_t grp = r / kInt8Rows, row = r % kInt8Rows;
                for (int64_t blk = 0; blk < blocks; ++blk) {
                    const int8_t *code = q + ((grp * blocks + blk) * kInt8Rows + row) * kInt8Block;
                    const float s = scales[(grp * blocks + blk) * kInt8Rows + row];
                    float *dst = o + i * k + blk * kInt8Block;
                    for (int64_t c = 0; c < kInt8Block; ++c) dst[c] = static_cast<float>(code[c]) * s;
                }
            }
        });
    }
};

// One op definition per node type: its inputs' element types and a kernel factory.
// One op definition per node type and session: its inputs' element types, the session's threads, a kernel factory.
template <typename Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, Kernel, true> {
    Op(const char *name, std::vector<ONNXTensorElementDataType> inputs, int threads)
        : name_(name), inputs_(std::move(inputs)), threads_(threads) {}
    OrtStatusPtr CreateKernelV2(const OrtApi &, const OrtKernelInfo *info, void **kernel) const {
        return guarded([&] {
            auto made = std::make_unique<Kernel>();
            if constexpr (!std::is_same_v<Kernel, Int8GatherKernel>) made->threads = node_threads(info, threads_);
            *kernel = made.release();
        });
    }
    const char *GetName() const { return name_; }
    size_t GetInputTypeCount() const { return inputs_.size(); }
    ONNXTensorElementDataType GetInputType(size_t i) const { return inputs_[i]; }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

    const char *name_;
    std::vector<ONNXTensorElementDataType> inputs_;
    int threads_;
};

// What one registration adds (kept for the life of the process: ONNX Runtime uses a domain as long as its session).
struct Registration {
    explicit Registration(int threads)
        : sparse_linear("SparseLinear",
                        {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16,
                         ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
                         ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64},
                        threads),
          int8_linear("Int8Linear",
                      {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
                       ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64},
                      threads),
          int8_gather("Int8Gather",
                      {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
                       ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64},
                      threads),
          domain("ai.sparsedeploy") {
        domain.Add(&sparse_linear);
        domain.Add(&int8_linear);
        domain.Add(&int8_gather);
    }
    Op<SparseLinearKernel> sparse_linear;
    Op<Int8LinearKernel> int8_linear;
    Op<Int8GatherKernel> int8_gather;
    Ort::CustomOpDomain domain;
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options,
                                                                                           const OrtApiBase *api_base) {
    Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
    return guarded([&] {
        static std::mutex lock;
        static std::vector<std::unique_ptr<Registration>> registrations;
        auto made = std::make_unique<Registration>(session_threads(options));
        Ort::UnownedSessionOptions(options).Add(made->domain);
        std::lock_guard<std::mutex> hold(lock);
        registrations.push_back(std::move(made));
    });
}

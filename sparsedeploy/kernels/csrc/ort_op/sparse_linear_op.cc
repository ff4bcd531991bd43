// ONNX Runtime custom-op library for sparsedeploy's SparseLinear node (domain ai.sparsedeploy).
//
// UNVERIFIED: ONNX Runtime's C/C++ headers are in no package reachable from the machines this project is built on,
// so this file has never been compiled or run there. It is written against ONNX Runtime's documented C++ custom-op
// API (onnxruntime_cxx_api.h, Ort::CustomOpBase) and calls the same C ABI as the Python binding
// (sparsedeploy/kernels/native.py -> sdk_matmul in ../sparse_cpu.c). Build: see CMakeLists.txt beside it.
//
// Node: SparseLinear(x, mask, values, block_ptr, negzero, shape) -> y, inputs in the order of the node's `arrays`
// attribute (what export --target sparse-cpu writes: mask, values, block_ptr, negzero, shape). x: float [..., K];
// y: float [..., N]. negzero only matters for unpacking; the kernel never reads it.
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" int sdk_matmul(const float *x, int64_t b, int64_t k, const uint16_t *mask, const float *values,
                          const int64_t *block_ptr, int64_t n, float *y, int threads, int isa);

namespace {

struct SparseLinearKernel {
    explicit SparseLinearKernel(const OrtKernelInfo *info) {
        Ort::ConstKernelInfo ki(info);
        try {  // optional attribute `threads` (export does not write it: set it on the node to use more cores)
            threads_ = static_cast<int>(ki.GetAttribute<int64_t>("threads"));
        } catch (const Ort::Exception &) {
            threads_ = 1;
        }
    }

    void Compute(OrtKernelContext *raw) {
        Ort::KernelContext ctx(raw);
        auto x = ctx.GetInput(0);
        auto mask = ctx.GetInput(1);
        auto values = ctx.GetInput(2);
        auto block_ptr = ctx.GetInput(3);
        auto shape = ctx.GetInput(5);
        const int64_t *nk = shape.GetTensorData<int64_t>();
        const int64_t n = nk[0], k = nk[1];
        std::vector<int64_t> dims = x.GetTensorTypeAndShapeInfo().GetShape();
        if (dims.empty() || dims.back() != k) throw std::runtime_error("SparseLinear: x's last dimension is not K");
        int64_t rows = 1;
        for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
        dims.back() = n;
        auto y = ctx.GetOutput(0, dims);
        if (rows == 0) return;
        int rc = sdk_matmul(x.GetTensorData<float>(), rows, k, mask.GetTensorData<uint16_t>(),
                            values.GetTensorData<float>(), block_ptr.GetTensorData<int64_t>(), n,
                            y.GetTensorMutableData<float>(), threads_ > 0 ? threads_ : 1, 0);
        if (rc != 0) throw std::runtime_error("SparseLinear: kernel error " + std::to_string(rc));
    }

    int threads_ = 1;
};

struct SparseLinearOp : Ort::CustomOpBase<SparseLinearOp, SparseLinearKernel> {
    void *CreateKernel(const OrtApi &, const OrtKernelInfo *info) const { return new SparseLinearKernel(info); }
    const char *GetName() const { return "SparseLinear"; }
    size_t GetInputTypeCount() const { return 6; }
    ONNXTensorElementDataType GetInputType(size_t i) const {
        switch (i) {
            case 0: case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;   // x, values
            case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;          // mask
            case 4: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;           // negzero (bit array)
            default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;          // block_ptr, shape
        }
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

SparseLinearOp g_op;

}  // namespace

extern "C" OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
    Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
    static Ort::CustomOpDomain domain{"ai.sparsedeploy"};
    domain.Add(&g_op);
    Ort::UnownedSessionOptions(options).Add(domain);
    return nullptr;
}

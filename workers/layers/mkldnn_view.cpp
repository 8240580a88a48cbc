// An oneDNN-layout (mkldnn) tensor over memory it does not own: a weight that lies packed in
// the peer memory pool's shared region, or in a prefetch buffer, given to oneDNN as it gives
// a private packed weight. Built with the other kernels by workers/layers/native.py.
//
// Why: oneDNN runs a plain-layout weight at 45-90 % of its packed layout's speed at decode's
// few rows (AMX Xeon, 2 threads), and torch makes packed tensors only in memory of its own.
// AOTInductor's shim makes one over any memory, from the layout's serialized descriptor
// (`torch.ops.mkldnn._get_mkldnn_serialized_md`).
#include <torch/extension.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <vector>

torch::Tensor mkldnn_view(int64_t ptr, std::vector<int64_t> sizes, torch::ScalarType dtype,
                          torch::Tensor md) {
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16,
              "mkldnn_view: float32 or bfloat16, not ", dtype);
  TORCH_CHECK(md.scalar_type() == torch::kUInt8 && md.dim() == 1 && md.is_contiguous(),
              "mkldnn_view: the descriptor is a 1-D uint8 tensor");
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t i = static_cast<int64_t>(sizes.size()) - 2; i >= 0; --i) {
    strides[i] = strides[i + 1] * sizes[i + 1];
  }
  const int32_t code =
      dtype == torch::kBFloat16 ? aoti_torch_dtype_bfloat16() : aoti_torch_dtype_float32();
  AtenTensorHandle handle = nullptr;
  const auto err = aoti_torch_create_tensor_from_blob_v2(
      reinterpret_cast<void*>(ptr), static_cast<int64_t>(sizes.size()), sizes.data(),
      strides.data(), 0, code, aoti_torch_device_type_cpu(), 0, &handle,
      aoti_torch_layout__mkldnn(), md.data_ptr<uint8_t>(), md.numel());
  TORCH_CHECK(err == AOTI_TORCH_SUCCESS && handle != nullptr,
              "mkldnn_view: torch could not make the tensor");
  // the shim's handle is a heap-allocated at::Tensor: ours to take and free
  auto* made = reinterpret_cast<torch::Tensor*>(handle);
  torch::Tensor out = *made;
  delete made;
  return out;
}

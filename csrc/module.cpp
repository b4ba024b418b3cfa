// The Python module vtp_fast._C. Importing it registers the ops (static TORCH_LIBRARY blocks in the other
// translation units); the functions here only say how the extension was built.
#include <pybind11/pybind11.h>

#include <string>

namespace {

bool cuda_compiled() {
#ifdef VTP_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_archs() {
#ifdef VTP_FAST_WITH_CUDA
  return VTP_FAST_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vtp_fast native ops (C++ CPU, and CUDA when compiled); the ops live in torch.ops.vtp_fast";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA sources were compiled into this extension");
  m.def("cuda_archs", &cuda_archs, "CUDA architectures compiled for, comma-separated ('' without CUDA)");
}

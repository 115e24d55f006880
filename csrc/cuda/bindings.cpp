// pybind11 bindings of the CUDA kernels (soupkern._cuda). Framework-free: addresses and streams
// are integers (torch's data_ptr() and Stream.cuda_stream), so no torch or CUDA headers here.
// The GIL is released around every CUDA call; a failed call raises RuntimeError with CUDA's
// error name and text.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "soupkern_cuda.h"

namespace py = pybind11;
namespace skc = soupkern::cuda;

#ifndef SOUPKERN_CUDA_ARCHS
#define SOUPKERN_CUDA_ARCHS "unknown"
#endif

namespace {

constexpr int kErrorInsufficientDriver = 35;  // cudaErrorInsufficientDriver: no (or too old a) driver
constexpr int kErrorNoDevice = 100;           // cudaErrorNoDevice

[[noreturn]] void raise_cuda(const char* what, int code) {
  throw std::runtime_error(std::string(what) + ": CUDA error " + std::to_string(code) + " (" + skc::error_name(code) +
                           "): " + skc::error_string(code));
}

std::tuple<int, int, std::string> device_status() {
  int count = 0, code = 0;
  {
    py::gil_scoped_release release;
    code = skc::device_count(&count);
  }
  return {count, code, code == 0 ? std::string() : std::string(skc::error_string(code))};
}

int device_count() {
  const auto [count, code, message] = device_status();
  if (code == kErrorInsufficientDriver || code == kErrorNoDevice) return 0;
  if (code != 0) raise_cuda("cudaGetDeviceCount", code);
  return count;
}

std::size_t table_bytes(const std::vector<std::int64_t>& numels, int k) {
  if (k < 1 || k > skc::kMaxInputs)
    throw py::value_error("table with " + std::to_string(k) + " inputs: need 1 <= k <= " + std::to_string(skc::kMaxInputs));
  const std::int64_t tensors = static_cast<std::int64_t>(numels.size());
  const std::int64_t tiles = skc::tile_count(numels.data(), tensors);
  if (tiles < 0) throw py::value_error("negative element count, or a tensor of 2^31 tiles or more");
  return skc::table_layout(tensors, k, tiles).total;
}

void check_rows(const std::vector<std::uint64_t>& outs, const std::vector<int>& out_dtypes, const std::vector<std::uint64_t>& ins,
                const std::vector<int>& in_dtypes, std::size_t k) {
  if (out_dtypes.size() != outs.size()) throw py::value_error("outs and out_dtypes must have the same length");
  if (ins.size() != outs.size() * k || in_dtypes.size() != outs.size() * k)
    throw py::value_error("ins and in_dtypes must hold len(outs) * k entries (row-major)");
}

std::vector<int> access_widths(const std::vector<std::uint64_t>& outs, const std::vector<int>& out_dtypes,
                               const std::vector<std::uint64_t>& ins, const std::vector<int>& in_dtypes, int k) {
  if (k < 1) throw py::value_error("k must be >= 1");
  check_rows(outs, out_dtypes, ins, in_dtypes, static_cast<std::size_t>(k));
  std::vector<int> widths(outs.size());
  for (std::size_t t = 0; t < outs.size(); ++t)
    widths[t] = skc::access_width(outs[t], out_dtypes[t], ins.data() + t * k, in_dtypes.data() + t * k, k);
  return widths;
}

std::int64_t pack_table(std::uintptr_t host, std::size_t nbytes, int width, const std::vector<std::uint64_t>& outs,
                        const std::vector<int>& out_dtypes, const std::vector<std::uint64_t>& ins,
                        const std::vector<int>& in_dtypes, const std::vector<std::int64_t>& numels,
                        const std::vector<double>& weights, double divisor, int op) {
  if (op < skc::kWeightedSum || op > skc::kGreedyAccept) throw py::value_error("unknown op " + std::to_string(op));
  const std::int64_t tensors = static_cast<std::int64_t>(outs.size());
  const int k = static_cast<int>(weights.size());
  check_rows(outs, out_dtypes, ins, in_dtypes, weights.size());
  if (numels.size() != outs.size()) throw py::value_error("outs and numels must have the same length");
  const std::size_t need = table_bytes(numels, k);
  if (nbytes < need) throw py::value_error("table buffer holds " + std::to_string(nbytes) + " bytes, needs " + std::to_string(need));
  if (host == 0) throw py::value_error("table buffer address is null");
  const char* error = nullptr;  // the weights go into the table as the fp64 values given
  const std::int64_t tiles =
      skc::pack_table(reinterpret_cast<void*>(host), static_cast<skc::Op>(op), width, tensors, k, outs.data(), out_dtypes.data(),
                      ins.data(), in_dtypes.data(), numels.data(), weights.data(), divisor, &error);
  if (tiles < 0) throw py::value_error(error);
  return tiles;
}

void launch(int op, int width, std::uintptr_t table, std::int64_t tensors, int k, std::int64_t tiles, int device,
            std::uintptr_t stream, int input_dtype) {
  if (op < skc::kWeightedSum || op > skc::kGreedyAccept) throw py::value_error("unknown op " + std::to_string(op));
  if (width != 1 && width != 4 && width != 8) throw py::value_error("access width must be 1, 4 or 8");
  if (op != skc::kWeightedSum && width == 8) throw py::value_error("access width 8 is for the weighted sum only");
  if (op != skc::kWeightedSum && k != 2) throw py::value_error("the greedy ops take k = 2 (running sum, candidate)");
  if (tiles > 0 && table == 0) throw py::value_error("table address is null");
  if (input_dtype != -1 && input_dtype != soupkern::F32 && input_dtype != soupkern::F16 && input_dtype != soupkern::BF16)
    throw py::value_error("input_dtype must be F32, F16, BF16 or -1 (mixed), got " + std::to_string(input_dtype));
  int code = 0;
  {
    py::gil_scoped_release release;
    code = skc::launch(static_cast<skc::Op>(op), width, reinterpret_cast<const void*>(table), tensors, k, tiles, device,
                       stream, input_dtype);
  }
  if (code != 0) raise_cuda("kernel launch", code);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "soupkern CUDA kernels (framework-free; contracts in csrc/cuda/soupkern_cuda.h)";
  m.def("device_count", &device_count,
        "Number of CUDA devices; 0 when there is no driver (error 35) or no device (error 100).");
  m.def("device_status", &device_status, "(count, cudaError_t code, message) of cudaGetDeviceCount.");
  m.def("runtime_version", &skc::runtime_version, "CUDA runtime version linked in (e.g. 13000).");
  m.def("driver_version", &skc::driver_version, "CUDA driver version, 0 when no driver is installed.");
  m.def("table_bytes", &table_bytes, py::arg("numels"), py::arg("k"),
        "Bytes of the launch table of tensors of these element counts with k inputs each.");
  m.def("access_widths", &access_widths, py::arg("outs"), py::arg("out_dtypes"), py::arg("ins"), py::arg("in_dtypes"),
        py::arg("k"), "Per tensor, the widest access (8, 4 or 1 elements) its addresses and dtypes allow.");
  m.def("pack_table", &pack_table, py::arg("host"), py::arg("nbytes"), py::arg("width"), py::arg("outs"), py::arg("out_dtypes"),
        py::arg("ins"), py::arg("in_dtypes"), py::arg("numels"), py::arg("weights"), py::arg("divisor") = 1.0,
        py::arg("op") = static_cast<int>(skc::kWeightedSum),
        "Write the launch table of `op` with one access width into host memory at address `host` (nbytes long; fp64 "
        "weights and divisor); returns the tile count. Launch it with the same op.");
  m.def("launch", &launch, py::arg("op"), py::arg("width"), py::arg("table"), py::arg("tensors"), py::arg("k"), py::arg("tiles"),
        py::arg("device"), py::arg("stream"), py::arg("input_dtype") = -1,
        "Launch `op` over a device copy of a packed table on `stream` (cudaStream_t as int) of `device`; "
        "input_dtype: the dtype code all inputs share (a specialized kernel), or -1 for any mix.");
  m.attr("archs") = SOUPKERN_CUDA_ARCHS;
  m.attr("OP_WEIGHTED_SUM") = static_cast<int>(skc::kWeightedSum);
  m.attr("OP_GREEDY_CANDIDATE") = static_cast<int>(skc::kGreedyCandidate);
  m.attr("OP_GREEDY_ACCEPT") = static_cast<int>(skc::kGreedyAccept);
  m.attr("F64") = static_cast<int>(soupkern::F64);
  m.attr("F32") = static_cast<int>(soupkern::F32);
  m.attr("F16") = static_cast<int>(soupkern::F16);
  m.attr("BF16") = static_cast<int>(soupkern::BF16);
  m.attr("TILE") = skc::kTile;
  m.attr("MAX_INPUTS") = skc::kMaxInputs;
}

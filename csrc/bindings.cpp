// pybind11 bindings: buffers in (anything with the buffer protocol), bounds checked here,
// GIL released around every kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "soupkern.h"

namespace py = pybind11;
using soupkern::DType;

namespace soupkern {
void register_mapping(py::module_& m);  // mapping.cpp: Mapping, guard_take
}

namespace {

DType parse_dtype(const std::string& s) {
  if (s == "F32") return soupkern::F32;
  if (s == "F16") return soupkern::F16;
  if (s == "BF16") return soupkern::BF16;
  if (s == "F64") return soupkern::F64;
  throw py::value_error("unsupported dtype '" + s + "' (expected F64, F32, F16 or BF16)");
}

// A contiguous byte view of obj with at least nbytes; keeps the buffer alive while held.
py::buffer_info byte_view(const py::handle& obj, std::size_t nbytes, bool writable, const char* what) {
  py::buffer buf = py::reinterpret_borrow<py::buffer>(obj);
  py::buffer_info info = buf.request(writable);
  std::size_t size = static_cast<std::size_t>(info.size) * static_cast<std::size_t>(info.itemsize);
  bool contiguous = info.ndim <= 1 && (info.ndim == 0 || info.strides[0] == info.itemsize);
  if (!contiguous) throw py::value_error(std::string(what) + " must be a contiguous 1-d buffer");
  if (size < nbytes)
    throw py::value_error(std::string(what) + " holds " + std::to_string(size) + " bytes, needs " +
                          std::to_string(nbytes));
  return info;
}

void weighted_sum_py(const py::object& out, const std::string& out_dtype, const py::sequence& inputs,
                     const std::vector<std::string>& in_dtypes, const std::vector<double>& weights,
                     std::size_t n, int threads, const std::string& isa, double divisor) {
  soupkern::WeightedSumFn fn = nullptr;
  if (!isa.empty()) {
    fn = soupkern::isa_by_name(isa.c_str());
    if (fn == nullptr) throw py::value_error("ISA '" + isa + "' is unknown or not supported by this CPU");
  }
  const std::size_t k = py::len(inputs);
  if (k == 0) throw py::value_error("weighted_sum needs at least one input");
  if (!(divisor > 0.0) || divisor == std::numeric_limits<double>::infinity())
    throw py::value_error("divisor must be a positive finite number");
  if (in_dtypes.size() != k || weights.size() != k)
    throw py::value_error("inputs, in_dtypes and weights must have the same length");
  const DType od = parse_dtype(out_dtype);
  std::vector<DType> dts(k);
  std::vector<py::buffer_info> infos;
  std::vector<const void*> ptrs(k);
  infos.reserve(k + 1);
  infos.push_back(byte_view(out, n * soupkern::itemsize(od), true, "out"));
  for (std::size_t j = 0; j < k; ++j) {
    dts[j] = parse_dtype(in_dtypes[j]);
    infos.push_back(byte_view(inputs[j], n * soupkern::itemsize(dts[j]), false,
                              ("input " + std::to_string(j)).c_str()));
    ptrs[j] = infos.back().ptr;
  }
  void* optr = infos[0].ptr;
  py::gil_scoped_release release;
  soupkern::weighted_sum(optr, od, ptrs.data(), dts.data(), weights.data(), divisor, static_cast<int>(k), n, threads, fn);
}

// Pointers as integers: the Python caller (soupkern.engine.run_jobs) keeps every tensor alive
// and checks sizes; this entry point is private to the package.
void weighted_sum_many_py(const std::vector<std::uintptr_t>& outs, const std::vector<int>& out_dtypes,
                          const std::vector<std::uintptr_t>& inputs, const std::vector<int>& in_dtypes,
                          const std::vector<std::size_t>& numels, const std::vector<double>& weights,
                          const std::vector<double>& divisors, int k, int threads) {
  const std::size_t count = outs.size();
  if (k < 1) throw py::value_error("weighted_sum_many needs k >= 1");
  const std::size_t tk = count * static_cast<std::size_t>(k);
  if (out_dtypes.size() != count || numels.size() != count || divisors.size() != count ||
      inputs.size() != tk || in_dtypes.size() != tk || weights.size() != tk)
    throw py::value_error("weighted_sum_many: table sizes disagree");
  for (int d : out_dtypes) if (d < 0 || d > 3) throw py::value_error("weighted_sum_many: bad dtype code");
  for (int d : in_dtypes) if (d < 0 || d > 3) throw py::value_error("weighted_sum_many: bad dtype code");
  for (double d : divisors)
    if (!(d > 0.0) || d == std::numeric_limits<double>::infinity())
      throw py::value_error("divisor must be a positive finite number");
  static_assert(sizeof(DType) == sizeof(int), "DType is passed as int");
  py::gil_scoped_release release;
  soupkern::weighted_sum_many(reinterpret_cast<void* const*>(outs.data()), reinterpret_cast<const DType*>(out_dtypes.data()),
                              reinterpret_cast<const void* const*>(inputs.data()), reinterpret_cast<const DType*>(in_dtypes.data()),
                              numels.data(), weights.data(), divisors.data(), k, count, threads);
}

void copy_py(const py::object& dst, const py::object& src, std::size_t nbytes, int threads) {
  py::buffer_info d = byte_view(dst, nbytes, true, "dst");
  py::buffer_info s = byte_view(src, nbytes, false, "src");
  py::gil_scoped_release release;
  soupkern::parallel_copy(d.ptr, s.ptr, nbytes, threads);
}

bool equal_py(const py::object& a, const py::object& b) {
  py::buffer_info x = byte_view(a, 0, false, "a");
  py::buffer_info y = byte_view(b, 0, false, "b");
  const std::size_t n = static_cast<std::size_t>(x.size) * static_cast<std::size_t>(x.itemsize);
  if (n != static_cast<std::size_t>(y.size) * static_cast<std::size_t>(y.itemsize)) return false;
  py::gil_scoped_release release;
  return n == 0 || std::memcmp(x.ptr, y.ptr, n) == 0;
}

uint64_t read_py(const py::sequence& buffers, std::size_t nbytes, int threads) {
  std::vector<py::buffer_info> infos;
  std::vector<const void*> ptrs;
  for (const py::handle& b : buffers) {
    infos.push_back(byte_view(b, nbytes, false, "buffer"));
    ptrs.push_back(infos.back().ptr);
  }
  py::gil_scoped_release release;
  return soupkern::parallel_read(ptrs.data(), static_cast<int>(ptrs.size()), nbytes, threads);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "soupkern C++ kernels (framework-free; see csrc/soupkern.h for the contract)";
  m.def("weighted_sum", &weighted_sum_py, py::arg("out"), py::arg("out_dtype"), py::arg("inputs"),
        py::arg("in_dtypes"), py::arg("weights"), py::arg("n"), py::arg("threads") = 0, py::arg("isa") = "",
        py::arg("divisor") = 1.0,
        "out[i] = round((sum_k w_k * x_k[i]) / divisor) over n elements, fp64 accumulation; contract in "
        "csrc/soupkern.h. isa: '' (best), 'avx512', 'avx2' or 'generic' (each gives the same bits).");
  m.def("weighted_sum_many", &weighted_sum_many_py, py::arg("outs"), py::arg("out_dtypes"), py::arg("inputs"),
        py::arg("in_dtypes"), py::arg("numels"), py::arg("weights"), py::arg("divisors"), py::arg("k"),
        py::arg("threads") = 0,
        "Private: weighted_sum over a table of tensors given by address (dtype codes F64=0, F32=1, F16=2, "
        "BF16=3); the caller keeps the memory alive.");
  m.def("copy", &copy_py, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("threads") = 0,
        "OpenMP memcpy of nbytes: the same-run memory-copy baseline for the kernel.");
  m.def("equal", &equal_py, py::arg("a"), py::arg("b"),
        "Whether two contiguous buffers hold the same bytes (memcmp, without the GIL).");
  m.def("read", &read_py, py::arg("buffers"), py::arg("nbytes"), py::arg("threads") = 0,
        "Read nbytes of every buffer once and return a checksum: the same-run read-only floor.");
  const char* isa = nullptr;
  soupkern::select_isa(&isa);
  m.attr("isa") = isa;
  m.def("supported_isas", []() {
    std::vector<std::string> out;
    for (const char* name : {"avx512", "avx2", "generic"})
      if (soupkern::isa_by_name(name) != nullptr) out.emplace_back(name);
    return out;
  });
  m.def("max_threads", []() { return omp_get_max_threads(); });
  soupkern::register_mapping(m);
}

// SIGBUS-guarded read-only file mappings (contract in mapping.h) and their binding,
// soupkern._native.Mapping / guard_take.
//
// The handler touches only atomics, the fixed tables below and the mmap/sigaction/raise system
// calls. mmap is not on POSIX's async-signal-safe list, but glibc's is a plain system call (no
// locks, no allocation), which is what makes it usable here.
#include <pybind11/pybind11.h>

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sched.h>
#include <string>

#include "mapping.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux >= 5.14
#endif

namespace py = pybind11;

namespace soupkern {
namespace {

// Registered ranges [begin, end): begin 0 = free, kClaimed = being filled or emptied. A slot is
// published by storing begin last (release); the handler reads begin, then end (acquire).
constexpr std::uintptr_t kClaimed = 1;
struct Slot {
  std::atomic<std::uintptr_t> begin{0};
  std::atomic<std::uintptr_t> end{0};
};
static_assert(std::atomic<std::uintptr_t>::is_always_lock_free, "the SIGBUS handler needs lock-free atomics");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "the SIGBUS handler needs lock-free atomics");
Slot g_slots[kGuardSlots];
std::atomic<std::size_t> g_used{0};  // slots at or above this index have never been used

// Faults: bit 63 is the parity of the current take window, bits 0..62 its count. The fault that
// counts a window's first stores its address in g_first[parity]; guard_take flips the parity
// and zeroes the count in one CAS, then collects that window's address.
constexpr std::uint64_t kParity = std::uint64_t{1} << 63;
std::atomic<std::uint64_t> g_faults{0};
std::atomic<std::uintptr_t> g_first[2];
std::mutex g_take_mutex;

// The handler found in place when ours was installed; two copies, so that a re-install never
// rewrites the one a running handler may be reading.
struct sigaction g_prev[2];
std::atomic<int> g_prev_index{0};
// Set when an unguarded fault was passed to a previous handler: a SIGBUS that handler then
// sends itself (Python's faulthandler restores the handler it replaced and raise()s, which may
// be ours) gets the default action instead of going round again.
std::atomic<bool> g_chained{false};
std::mutex g_install_mutex;
std::uintptr_t g_page = 0;  // set before the handler is first installed

bool guarded(std::uintptr_t a) {
  const std::size_t used = g_used.load(std::memory_order_acquire);
  for (std::size_t i = 0; i < used; ++i) {
    const std::uintptr_t b = g_slots[i].begin.load(std::memory_order_acquire);
    if (b > kClaimed && a >= b && a < g_slots[i].end.load(std::memory_order_acquire)) return true;
  }
  return false;
}

void record(std::uintptr_t a) {
  const std::uint64_t before = g_faults.fetch_add(1, std::memory_order_acq_rel);
  if ((before & ~kParity) == 0) g_first[before >> 63].store(a, std::memory_order_release);
}

void reset_default() {
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
}

std::uintptr_t handler_address(const struct sigaction& sa) {
  return (sa.sa_flags & SA_SIGINFO) ? reinterpret_cast<std::uintptr_t>(sa.sa_sigaction)
                                    : reinterpret_cast<std::uintptr_t>(sa.sa_handler);
}

void call(const struct sigaction& sa, int sig, siginfo_t* info, void* ctx) {
  if (sa.sa_flags & SA_SIGINFO)
    sa.sa_sigaction(sig, info, ctx);
  else
    sa.sa_handler(sig);
}

// SIGBUS is blocked while this runs (no SA_NODEFER), so raise() here stays pending until it
// returns.
void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  const int saved_errno = errno;
  const bool from_kernel = info != nullptr && info->si_code > 0;  // a fault: si_addr is its address
  if (from_kernel) {
    const auto a = reinterpret_cast<std::uintptr_t>(info->si_addr);
    if (guarded(a)) {
      void* page = reinterpret_cast<void*>(a & ~(g_page - 1));
      if (mmap(page, g_page, PROT_READ, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) != MAP_FAILED) {
        record(a);
        errno = saved_errno;
        return;  // the load re-executes and reads zeros
      }
      // No zero page (e.g. vm.max_map_count reached): fatal, as without the guard.
    }
  }
  const struct sigaction& prev = g_prev[g_prev_index.load(std::memory_order_acquire)];
  const std::uintptr_t h = handler_address(prev);
  const bool is_default = h == reinterpret_cast<std::uintptr_t>(SIG_DFL);
  const bool is_ignore = h == reinterpret_cast<std::uintptr_t>(SIG_IGN);
  if (from_kernel) {
    if (!is_default && !is_ignore) {
      g_chained.store(true, std::memory_order_relaxed);
      call(prev, sig, info, ctx);
    } else {
      reset_default();  // the load re-executes, faults again and kills (an ignored fault kills too)
    }
  } else if (!is_ignore) {  // sent by kill/raise: nothing to repair
    if (!is_default && !g_chained.load(std::memory_order_relaxed)) {
      call(prev, sig, info, ctx);
    } else {
      reset_default();
      raise(SIGBUS);
    }
  }
  errno = saved_errno;
}

bool is_ours(const struct sigaction& sa) {
  return (sa.sa_flags & SA_SIGINFO) && sa.sa_sigaction == on_sigbus;
}

// Installs on_sigbus unless it is in place; whatever it replaces becomes the previous handler.
int install_handler() {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  if (g_page == 0) g_page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  struct sigaction cur;
  if (sigaction(SIGBUS, nullptr, &cur) != 0) return errno;
  if (is_ours(cur)) return 0;
  int slot = 1 - g_prev_index.load(std::memory_order_relaxed);
  g_prev[slot] = cur;
  g_prev_index.store(slot, std::memory_order_release);
  g_chained.store(false, std::memory_order_relaxed);
  struct sigaction sa, old;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, &old) != 0) return errno;
  if (!is_ours(old) && (handler_address(old) != handler_address(cur) || old.sa_flags != cur.sa_flags)) {
    slot = 1 - slot;  // replaced in between by another thread: chain to that one
    g_prev[slot] = old;
    g_prev_index.store(slot, std::memory_order_release);
  }
  return 0;
}

bool register_range(std::uintptr_t begin, std::uintptr_t end) {
  for (std::size_t i = 0; i < kGuardSlots; ++i) {
    std::uintptr_t expected = 0;
    if (!g_slots[i].begin.compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel)) continue;
    g_slots[i].end.store(end, std::memory_order_release);
    std::size_t used = g_used.load(std::memory_order_acquire);
    while (used < i + 1 && !g_used.compare_exchange_weak(used, i + 1, std::memory_order_acq_rel)) {
    }
    g_slots[i].begin.store(begin, std::memory_order_release);
    return true;
  }
  return false;
}

void unregister_range(std::uintptr_t begin) {
  const std::size_t used = g_used.load(std::memory_order_acquire);
  for (std::size_t i = 0; i < used; ++i) {
    std::uintptr_t expected = begin;
    if (g_slots[i].begin.compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel)) {
      g_slots[i].end.store(0, std::memory_order_release);
      g_slots[i].begin.store(0, std::memory_order_release);
      return;
    }
  }
}

}  // namespace

int map_guarded(int fd, std::size_t length, void** addr) {
  *addr = nullptr;
  if (length == 0) return 0;
  if (const int rc = install_handler()) return rc;
  void* p = mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return errno;
  const auto begin = reinterpret_cast<std::uintptr_t>(p);
  // The whole last page: a load past `length` but inside it faults as well once truncated.
  if (!register_range(begin, (begin + length + g_page - 1) & ~(g_page - 1))) {
    munmap(p, length);
    return kGuardTableFull;
  }
  *addr = p;
  return 0;
}

void unmap_guarded(void* addr, std::size_t length) {
  if (addr == nullptr || length == 0) return;
  unregister_range(reinterpret_cast<std::uintptr_t>(addr));
  munmap(addr, length);
}

GuardFaults guard_take() {
  std::lock_guard<std::mutex> lock(g_take_mutex);
  std::uint64_t old = g_faults.load(std::memory_order_acquire);
  while (!g_faults.compare_exchange_weak(old, (old & kParity) ^ kParity, std::memory_order_acq_rel)) {
  }
  const std::uint64_t count = old & ~kParity;
  if (count == 0) return {0, 0};
  // The window's first fault stores its address right after counting itself.
  std::uintptr_t first;
  while ((first = g_first[old >> 63].exchange(0, std::memory_order_acq_rel)) == 0) sched_yield();
  return {count, first};
}

namespace {

[[noreturn]] void throw_os_error(int err) {
  errno = err;
  PyErr_SetFromErrno(PyExc_OSError);
  throw py::error_already_set();
}

// A read-only shared mapping of an open fd (which the caller may close at once), exported as a
// 1-d uint8 buffer; views keep it alive, and it is unmapped when the last reference goes.
class Mapping {
 public:
  Mapping(int fd, std::size_t length) : length_(length) {
    const int rc = map_guarded(fd, length, &addr_);
    if (rc == kGuardTableFull) {
      const std::string msg = "soupkern: " + std::to_string(kGuardSlots) +
                              " guarded mappings are live; the SIGBUS guard table is full";
      PyErr_SetObject(PyExc_OSError, py::make_tuple(ENOMEM, msg).ptr());
      throw py::error_already_set();
    }
    if (rc != 0) throw_os_error(rc);
  }
  ~Mapping() { unmap_guarded(addr_, length_); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  std::uintptr_t address() const { return reinterpret_cast<std::uintptr_t>(addr_); }
  std::size_t length() const { return length_; }

  py::buffer_info buffer() const {
    static const unsigned char empty = 0;  // a valid pointer for the zero-length buffer
    const void* p = addr_ != nullptr ? addr_ : &empty;
    return py::buffer_info(const_cast<void*>(p), 1, "B", 1, {static_cast<py::ssize_t>(length_)}, {1}, true);
  }

  void advise(int advice, std::size_t offset, std::size_t length) const {
    std::size_t n = 0;
    void* start = covering(offset, length, &n);
    if (n == 0) return;
    int rc;
    {
      py::gil_scoped_release release;
      rc = madvise(start, n, advice) == 0 ? 0 : errno;
    }
    if (rc != 0) throw_os_error(rc);
  }

  int populate(std::size_t offset, std::size_t length) const {
    std::size_t n = 0;
    void* start = covering(offset, length, &n);
    if (n == 0) return 0;
    py::gil_scoped_release release;
    return madvise(start, n, MADV_POPULATE_READ) == 0 ? 0 : errno;
  }

 private:
  // The page-aligned range covering [offset, offset + length) clipped to the mapping; *n = 0
  // when that is empty.
  void* covering(std::size_t offset, std::size_t length, std::size_t* n) const {
    *n = 0;
    if (offset >= length_ || length == 0) return nullptr;
    const std::size_t hi = length_ - offset < length ? length_ : offset + length;
    const std::size_t lo = offset & ~(static_cast<std::size_t>(g_page) - 1);
    *n = hi - lo;
    return static_cast<char*>(addr_) + lo;
  }

  void* addr_ = nullptr;
  std::size_t length_ = 0;
};

}  // namespace

void register_mapping(py::module_& m) {
  py::class_<Mapping>(m, "Mapping", py::buffer_protocol(),
                      "Read-only shared mmap of an open fd (which may be closed at once), guarded "
                      "against SIGBUS: a page lost to truncation reads as zeros and is counted by "
                      "guard_take(). Buffer protocol: 1-d read-only uint8; views keep it alive; "
                      "unmapped when the last reference goes.")
      .def(py::init<int, std::size_t>(), py::arg("fd"), py::arg("length"))
      .def_buffer(&Mapping::buffer)
      .def_property_readonly("address", &Mapping::address, "start of the mapping (0 when length is 0)")
      .def_property_readonly("length", &Mapping::length)
      .def("advise", &Mapping::advise, py::arg("advice"), py::arg("offset"), py::arg("length"),
           "madvise(advice) on the pages covering [offset, offset + length), clipped to the "
           "mapping; raises OSError.")
      .def("populate", &Mapping::populate, py::arg("offset"), py::arg("length"),
           "MADV_POPULATE_READ on the pages covering [offset, offset + length), clipped, GIL "
           "released: 0, or the errno (EINVAL/ENOSYS: kernel without it; EFAULT: pages past the "
           "end of a truncated file).")
      .def("__repr__", [](const Mapping& self) {
        char buf[96];
        std::snprintf(buf, sizeof buf, "<soupkern._native.Mapping address=0x%zx length=%zu>",
                      static_cast<std::size_t>(self.address()), self.length());
        return std::string(buf);
      });
  m.def("guard_take", []() {
    const GuardFaults f = guard_take();
    return py::make_tuple(f.count, f.first);
  }, "(faults repaired by the SIGBUS guard since the previous call, address of the first of them); "
     "resets both.");
}

}  // namespace soupkern

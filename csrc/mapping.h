// Read-only file mappings guarded against SIGBUS (framework-free; bindings in mapping.cpp).
//
// A file truncated by another process while it is mapped makes every load from a page past its
// new end raise SIGBUS, which kills the process. Every live guarded mapping is registered in a
// fixed lock-free table; a process-wide SIGBUS handler maps an anonymous zero page over a
// faulting page inside a registered mapping, records the fault and returns, so the load
// re-executes and reads zeros. The caller polls guard_take() after reading and reports an error
// when it counts faults. A SIGBUS outside every registered mapping goes on to the handler that
// was installed before (or kills, as without the guard). No longjmp: faults may happen inside
// OpenMP regions.
#pragma once
#include <cstddef>
#include <cstdint>

namespace soupkern {

// Live guarded mappings at most; map_guarded fails with kGuardTableFull beyond.
constexpr std::size_t kGuardSlots = std::size_t{1} << 16;
constexpr int kGuardTableFull = -1;

// mmap(NULL, length, PROT_READ, MAP_SHARED, fd, 0), registered with the guard (whose handler is
// installed, or re-installed if another one replaced it, first). The mapping holds no fd.
// length 0: *addr = nullptr, nothing mapped. Returns 0, an errno (mmap or sigaction failed) or
// kGuardTableFull (nothing left mapped). Thread-safe.
int map_guarded(int fd, std::size_t length, void** addr);

// Unregisters, then munmaps (a no-op for length 0). No access to the range may be in flight.
void unmap_guarded(void* addr, std::size_t length);

// Faults repaired with a zero page since the previous call, and the address of the first of
// them (0 when count is 0); both reset in one step, so a fault racing with the call is counted
// exactly once, with its window's first address. Lock-free apart from a mutex among callers.
struct GuardFaults {
  std::uint64_t count;
  std::uintptr_t first;
};
GuardFaults guard_take();

}  // namespace soupkern

// The CPU emulator's runtime: fibers, barriers, shuffles, cp.async groups and the few CUDA runtime calls
// the kernels' host code makes. See cuda_emu.h.
#include "cuda_emu.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace mmfast_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kWarp = 32;

const DeviceProps kDevices[] = {
    {3, 232448, 233472},  // a small H100: the H100's shared memory, 3 SMs (grids stay small at test sizes)
    {2, 65536, 102400},   // little shared memory: the staged backward does not fit at the wide widths
    {132, 232448, 233472},  // an H100's SM count
};
constexpr int kNumDevices = static_cast<int>(sizeof(kDevices) / sizeof(kDevices[0]));

enum class State { kRunnable, kAtWarp, kAtBlock, kDone };

struct Copy {
  void* dst;
  const void* src;
  bool done;  // performed at issue (eager mode)
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // mmap'd, guard page at the low end
  uint3 tid;
  int linear = 0;
  State state = State::kRunnable;
  int parity = 0;          // which exchange buffer this lane's next shuffle uses
  int shfl_lane_mask = 0;  // the shuffle it waits at (checked across the warp)
  int shfl_width = 0;
  std::vector<Copy> open;                 // cp.async copies not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

struct Grid {
  dim3 grid, block;
  uint3 bidx;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> exchange[2];  // [warps * 32] per parity
  std::vector<unsigned char> smem;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  bool faulted = false;
};

Grid* g_grid = nullptr;  // the running launch
int g_device = 0;
cudaError_t g_last_error = cudaSuccess;
std::string g_fault;
int64_t g_launches = 0;  // alternates the warp order of one-block grids
std::map<std::pair<int, const void*>, int> g_max_dynamic_smem;  // cudaFuncSetAttribute, per device and kernel
std::vector<char*> g_stack_pool;

// cp.async: copies land at the wait that retires their group (a stage read too early holds stale bytes)
// or, when eager, at issue (a copy into a stage that is still being read overwrites it at once).
bool g_eager_copies = false;

// Buffers that end at a PROT_NONE page (alloc_fenced): an access past one ends the launch with a fault.
struct Fence {
  uintptr_t map, guard;  // mapping start, guard page start
  size_t map_len;
};
std::map<uintptr_t, Fence> g_fences;  // by data start
size_t g_page = 0;

// SIGSEGV inside a fiber jumps back to the scheduler, which reports it as a fault.
sigjmp_buf g_segv_jump;
volatile sig_atomic_t g_in_fiber = 0;
void* volatile g_segv_addr = nullptr;
struct sigaction g_old_segv;
stack_t g_old_alt_stack;
char g_alt_stack[1 << 16];

void on_segv(int, siginfo_t* info, void*) {
  if (g_in_fiber) {
    g_segv_addr = info->si_addr;
    siglongjmp(g_segv_jump, 1);
  }
  sigaction(SIGSEGV, &g_old_segv, nullptr);  // not from a kernel: the previous handler gets the re-fault
}

// For the duration of a launch (uninstall_segv_handler puts the previous handler and stack back).
void install_segv_handler() {
  stack_t ss{};
  ss.ss_sp = g_alt_stack;
  ss.ss_size = sizeof(g_alt_stack);
  sigaltstack(&ss, &g_old_alt_stack);  // a fiber whose stack overflowed cannot run the handler on it
  struct sigaction sa{};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;  // NODEFER: no mask to restore after the jump
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
}

void uninstall_segv_handler() {
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaltstack(&g_old_alt_stack, nullptr);
}

void fault(const std::string& what) {
  if (g_fault.empty()) g_fault = what;
  if (g_grid) g_grid->faulted = true;
}

std::string where(const Fiber& f) {
  char buf[96];
  snprintf(buf, sizeof(buf), "block (%u,%u,%u) thread (%u,%u,%u)", g_grid->bidx.x, g_grid->bidx.y, g_grid->bidx.z,
           f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

std::string segv_message(const Fiber& f) {
  const auto a = reinterpret_cast<uintptr_t>(g_segv_addr);
  char buf[64];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(a));
  for (const auto& kv : g_fences) {
    const Fence& fe = kv.second;
    if (a >= fe.guard && a < fe.guard + g_page)
      return "access past the end of a buffer (" + std::to_string(a - kv.first) + " bytes from its start, address " +
             buf + ") by " + where(f);
  }
  const auto st = reinterpret_cast<uintptr_t>(f.stack);
  if (a >= st && a < st + kGuardBytes) return "fiber stack overflow in " + where(f);
  return std::string("invalid address ") + buf + " in " + where(f);
}

char* take_stack() {
  if (!g_stack_pool.empty()) {
    char* s = g_stack_pool.back();
    g_stack_pool.pop_back();
    return s;
  }
  void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  mprotect(p, kGuardBytes, PROT_NONE);  // an overflowing fiber stack faults instead of corrupting memory
  return static_cast<char*>(p);
}

Fiber& running() {
  if (g_grid == nullptr || g_grid->current == nullptr) {
    fprintf(stderr, "mmfast_emu: a device function was called outside a kernel launch\n");
    abort();
  }
  return *g_grid->current;
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield_to_scheduler(Fiber& f) {
  swapcontext(&f.ctx, &g_grid->scheduler);
}

void fiber_entry() {
  Grid* g = g_grid;
  (*g->body)();
  Fiber& f = *g->current;
  if (!f.open.empty() || !f.groups.empty())
    fault("cp.async copies still in flight when " + where(f) + " returned");
  f.state = State::kDone;
  // returning resumes uc_link (the scheduler)
}

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable: return "running";
    case State::kAtWarp: return "at a warp shuffle";
    case State::kAtBlock: return "at __syncthreads";
    case State::kDone: return "returned";
  }
  return "?";
}

// Runs one block to completion (or to a fault). Returns false on a fault.
bool run_block(Grid& g) {
  const int n = static_cast<int>(g.block.x * g.block.y * g.block.z);
  const int warps = (n + kWarp - 1) / kWarp;
  g.fibers.assign(n, Fiber{});
  std::fill(g.smem.begin(), g.smem.end(), static_cast<unsigned char>(0xFF));  // NaN for every block
  for (int p = 0; p < 2; ++p) g.exchange[p].assign(static_cast<size_t>(warps) * kWarp, 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i % g.block.x), static_cast<unsigned>((i / g.block.x) % g.block.y),
                  static_cast<unsigned>(i / (g.block.x * g.block.y))};
    f.stack = take_stack();
    if (f.stack == nullptr) {
      fault("out of memory for fiber stacks");
      return false;
    }
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack + kGuardBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // Warps run greedily, one after another (ascending in even blocks, descending in odd ones): each runs
  // through its own shuffles to the next __syncthreads before the next warp starts. A warp that writes
  // shared memory for its next step before a slower warp has read the last one is thereby always ahead.
  std::vector<int> order(warps);
  for (int w = 0; w < warps; ++w) order[w] = w;
  const unsigned linear_block = g.bidx.x + g.grid.x * (g.bidx.y + g.grid.y * g.bidx.z);
  if ((linear_block + g_launches) % 2 == 1) std::reverse(order.begin(), order.end());  // 1-block grids too
  bool ok = true;
  while (ok) {
    bool progressed = false;
    for (int w : order) {
      const int lo = w * kWarp, hi = lo + kWarp < n ? lo + kWarp : n;
      for (bool warp_moved = true; warp_moved && ok;) {
        warp_moved = false;
        for (int i = lo; i < hi && ok; ++i) {
          Fiber& f = g.fibers[i];
          if (f.state != State::kRunnable) continue;
          g.current = &f;
          if (sigsetjmp(g_segv_jump, 0) == 0) {
            g_in_fiber = 1;
            swapcontext(&g.scheduler, &f.ctx);
            g_in_fiber = 0;
          } else {
            g_in_fiber = 0;
            fault(segv_message(f));
          }
          g.current = nullptr;
          progressed = warp_moved = true;
          if (g.faulted) ok = false;
        }
        if (!ok) break;
        // the warp's lanes all at a shuffle: they exchange and go on
        int at = 0, done = 0;
        for (int i = lo; i < hi; ++i) {
          at += g.fibers[i].state == State::kAtWarp;
          done += g.fibers[i].state == State::kDone;
        }
        if (at == 0) continue;
        if (at + done == hi - lo && done > 0) {
          fault("a warp shuffle in " + where(g.fibers[lo]) + "'s warp while some lanes have returned");
          ok = false;
        } else if (at == hi - lo) {
          for (int i = lo; i < hi; ++i) {
            const Fiber& f = g.fibers[i];
            if (f.shfl_lane_mask != g.fibers[lo].shfl_lane_mask || f.shfl_width != g.fibers[lo].shfl_width ||
                f.parity != g.fibers[lo].parity) {
              fault("the lanes of " + where(g.fibers[lo]) + "'s warp met at different shuffles");
              ok = false;
              break;
            }
          }
          for (int i = lo; i < hi; ++i) g.fibers[i].state = State::kRunnable;
          warp_moved = true;
        }
      }
      if (!ok) break;
    }
    if (!ok) break;
    int at_block = 0, done = 0;
    for (const Fiber& f : g.fibers) {
      at_block += f.state == State::kAtBlock;
      done += f.state == State::kDone;
    }
    if (done == n) break;
    if (at_block > 0 && at_block + done == n) {
      if (done > 0) {
        fault("__syncthreads in block (" + std::to_string(g.bidx.x) + "," + std::to_string(g.bidx.y) +
              ") after " + std::to_string(done) + " of its threads returned (the barrier is not uniform)");
        ok = false;
        break;
      }
      for (Fiber& f : g.fibers) f.state = State::kRunnable;
      progressed = true;
    }
    if (!progressed) {
      std::string states;
      for (const Fiber& f : g.fibers) {
        if (f.linear % kWarp == 0) states += "\n  warp " + std::to_string(f.linear / kWarp) + ": lane 0 " + state_name(f.state);
      }
      fault("deadlock in block (" + std::to_string(g.bidx.x) + "," + std::to_string(g.bidx.y) +
            "): threads wait at different barriers" + states);
      ok = false;
    }
  }
  for (Fiber& f : g.fibers) g_stack_pool.push_back(f.stack);
  g.fibers.clear();
  return ok;
}

}  // namespace

const uint3& thread_idx() { return running().tid; }
const uint3& block_idx() {
  running();
  return g_grid->bidx;
}
const dim3& block_dim() {
  running();
  return g_grid->block;
}
const dim3& grid_dim() {
  running();
  return g_grid->grid;
}

void sync_block() {
  Fiber& f = running();
  f.state = State::kAtBlock;
  yield_to_scheduler(f);
}

uint64_t shuffle_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width) {
  Fiber& f = running();
  const int n = static_cast<int>(g_grid->block.x * g_grid->block.y * g_grid->block.z);
  const int warp = f.linear / kWarp, lane = f.linear % kWarp;
  if (mask != 0xffffffffu || width != kWarp || (warp + 1) * kWarp > n || lane_mask < 0 || lane_mask >= kWarp) {
    fault("unsupported shuffle in " + where(f) + " (the emulator takes full masks over full warps)");
    yield_to_scheduler(f);  // the scheduler abandons the faulted launch
  }
  std::vector<uint64_t>& buf = g_grid->exchange[f.parity];
  buf[warp * kWarp + lane] = bits;
  f.shfl_lane_mask = lane_mask;
  f.shfl_width = width;
  f.state = State::kAtWarp;
  yield_to_scheduler(f);
  const uint64_t out = buf[warp * kWarp + (lane ^ lane_mask)];
  f.parity ^= 1;  // the next shuffle writes the other buffer while slower lanes may still read this one
  return out;
}

void* dynamic_shared() {
  running();
  return g_grid->smem.empty() ? nullptr : g_grid->smem.data();
}

void vector_access(const void* p, bool store) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if ((a & 15u) == 0) return;
  Fiber& f = running();
  char buf[32];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(a));
  fault(std::string("misaligned 16-byte vector ") + (store ? "store to " : "load from ") + buf + " (" +
        std::to_string(a & 15u) + " bytes past a multiple of 16) in " + where(f));
  yield_to_scheduler(f);
}

void cp_async16(void* smem, const void* gmem) {
  Fiber& f = running();
  const auto s = reinterpret_cast<uintptr_t>(smem), gm = reinterpret_cast<uintptr_t>(gmem);
  const auto lo = reinterpret_cast<uintptr_t>(g_grid->smem.data());
  if ((s & 15u) || (gm & 15u) || s < lo || s + 16 > lo + g_grid->smem.size()) {
    fault("cp.async of 16 bytes outside the dynamic shared memory or misaligned, in " + where(f));
    yield_to_scheduler(f);
  }
  if (g_eager_copies) std::memcpy(smem, gmem, 16);
  f.open.push_back(Copy{smem, gmem, g_eager_copies});
}

void cp_async_commit() {
  Fiber& f = running();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = running();
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const Copy& c : f.groups.front())
      if (!c.done) std::memcpy(c.dst, c.src, 16);
    f.groups.erase(f.groups.begin());
  }
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, const void* kernel_id, const std::function<void()>& body) {
  ++g_launches;
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  const long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  cudaError_t err = cudaSuccess;
  if (threads < 1 || threads > 1024 || blocks < 1) err = cudaErrorInvalidConfiguration;
  const auto limit = g_max_dynamic_smem.find({g_device, kernel_id});
  const size_t allowed = limit == g_max_dynamic_smem.end() ? 48 * 1024 : static_cast<size_t>(limit->second);
  if (smem > allowed) err = cudaErrorInvalidValue;
  if (err != cudaSuccess) {
    if (g_last_error == cudaSuccess) g_last_error = err;
    return err;
  }
  Grid g;
  g.grid = grid;
  g.block = block;
  g.body = &body;
  g.smem.assign(smem, 0xFF);
  g_grid = &g;
  install_segv_handler();
  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z)
    for (unsigned y = 0; y < grid.y && ok; ++y)
      for (unsigned x = 0; x < grid.x && ok; ++x) {
        g.bidx = uint3{x, y, z};
        ok = run_block(g);
      }
  uninstall_segv_handler();
  g_grid = nullptr;
  if (!ok) {
    if (g_last_error == cudaSuccess) g_last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

void set_copy_mode(bool eager) { g_eager_copies = eager; }

void* alloc_fenced(size_t bytes, size_t align) {
  if (g_page == 0) g_page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (align == 0 || align > 16 || (align & (align - 1)) != 0) return nullptr;
  const size_t body = (bytes + align - 1) / align * align;
  const size_t data_pages = (body + 64 + g_page - 1) / g_page;  // >= 64 bytes of margin before the data
  const size_t len = (data_pages + 1) * g_page;
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  const auto map = reinterpret_cast<uintptr_t>(m);
  const uintptr_t guard = map + data_pages * g_page;
  std::memset(m, 0xFF, data_pages * g_page);
  mprotect(reinterpret_cast<void*>(guard), g_page, PROT_NONE);
  const uintptr_t data = guard - body;
  g_fences[data] = Fence{map, guard, len};
  return reinterpret_cast<void*>(data);
}

size_t fenced_offset(const void* data) {
  const auto it = g_fences.find(reinterpret_cast<uintptr_t>(data));
  return it == g_fences.end() ? 0 : it->first - it->second.map;
}

bool in_fence(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto it = g_fences.upper_bound(a);  // the first buffer starting after p; p can only be in the one before
  if (it == g_fences.begin()) return false;
  --it;
  return a >= it->first && a < it->second.guard;
}

void free_fenced(void* data) {
  const auto it = g_fences.find(reinterpret_cast<uintptr_t>(data));
  if (it == g_fences.end()) return;
  munmap(reinterpret_cast<void*>(it->second.map), it->second.map_len);
  g_fences.erase(it);
}

bool select_device(int dev) {
  if (dev < 0 || dev >= kNumDevices) return false;
  g_device = dev;
  return true;
}

bool device_props(int dev, DeviceProps* out) {
  if (dev < 0 || dev >= kNumDevices) return false;
  *out = kDevices[dev];
  return true;
}

const char* take_fault() {
  static std::string out;
  out = g_fault;
  g_fault.clear();
  return out.c_str();
}

}  // namespace mmfast_emu

// ---- the CUDA runtime calls the kernels' host code makes -------------------------------------------------

extern "C" {

cudaError_t cudaGetLastError() {
  const cudaError_t e = mmfast_emu::g_last_error;
  mmfast_emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = mmfast_emu::g_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev < 0 || dev >= mmfast_emu::kNumDevices) return cudaErrorInvalidDevice;
  const mmfast_emu::DeviceProps& d = mmfast_emu::kDevices[dev];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > mmfast_emu::kDevices[mmfast_emu::g_device].smem_optin) return cudaErrorInvalidValue;
  mmfast_emu::g_max_dynamic_smem[{mmfast_emu::g_device, func}] = value;
  return cudaSuccess;
}

// Threads per SM bound the estimate (2048, as on sm_80/sm_90), and so does dynamic shared memory; static
// shared memory and registers are not modelled.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int block_size,
                                                           size_t dynamic_smem) {
  if (block_size < 1 || block_size > 1024) return cudaErrorInvalidValue;
  const mmfast_emu::DeviceProps& d = mmfast_emu::kDevices[mmfast_emu::g_device];
  int n = 2048 / block_size;
  if (n > 32) n = 32;
  if (dynamic_smem > 0) {
    const int by_smem = static_cast<int>(d.smem_per_sm / static_cast<int64_t>(dynamic_smem));
    if (by_smem < n) n = by_smem;
  }
  *blocks = n;
  return cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator fault)";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "error";
  }
}

}  // extern "C"

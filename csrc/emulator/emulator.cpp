// pk_emu: host-side emulation of the CUDA features the kernels use. See emulator.h for the API, README.md for what
// is and is not modelled.
//
// Sources for the warp-level instruction semantics (read independently of the kernels' own reading):
//  - PTX ISA (NVIDIA, "Parallel Thread Execution ISA", release 8.x), section 9.7.14.5.8 "Matrix Fragments for
//    mma.m16n8k16 with floating point type" (the groupID / threadID_in_group formulas for A, B and C/D of .f16/.bf16)
//    and section 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix" (row addresses from threads 0-7, 8-15,
//    16-23, 24-31 for matrices 0..3 of .x4; each thread receives a 32-bit piece of each matrix: without .trans, row
//    laneid/4, elements 2*(laneid%4) and +1). The mma formulas below are written from that text.
//  - Cross-checked (by csrc/emulator/selftest.cpp, which derives its expectations from these instead) against CUTLASS
//    CuTe: include/cute/atom/mma_traits_sm80.hpp (ALayout / BLayout / CLayout of SM80_16x8x16_F32F16F16F32_TN and
//    ..._F32BF16BF16F32_TN) and include/cute/atom/copy_traits_sm75.hpp (DstLayout of SM75_U32x4_LDSM_N and
//    SM75_U16x8_LDSM_T).
//  - shfl.sync.bfly (PTX ISA 9.7.9.6 shfl.sync): source lane j = lane ^ b; if j is outside the (32-lane) segment the
//    thread keeps its own value.
//  - cp.async (PTX ISA 9.7.9.25.3): with src-size < cp-size the rest of the destination is zero-filled.
#include "emulator.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <array>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// The hand-written switch on x86-64; swapcontext elsewhere or when asked (-DPK_EMU_UCONTEXT).
#if defined(__x86_64__) && !defined(PK_EMU_UCONTEXT)
#define PK_EMU_ASM_SWITCH 1
// void pk_emu_switch_context(void** save_sp, void* load_sp): saves the callee-saved registers (System V x86-64 ABI:
// rbp, rbx, r12-r15, MXCSR and the x87 control word) on the current stack, stores the stack pointer in *save_sp, and
// resumes the context whose stack pointer is load_sp. About 20 instructions: no system call, unlike swapcontext.
extern "C" void pk_emu_switch_context(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl pk_emu_switch_context
  .hidden pk_emu_switch_context
  .type pk_emu_switch_context,@function
pk_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pk_emu_switch_context,.-pk_emu_switch_context
)");
#else
#include <ucontext.h>
#endif

// Under AddressSanitizer every switch is announced (start/finish_switch_fiber), so that it knows which stack runs:
// kernels can then be run under ASan to catch out-of-bounds global-memory accesses.
#if defined(__SANITIZE_ADDRESS__)
#define PK_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PK_EMU_ASAN 1
#endif
#endif
#ifdef PK_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace pk_emu {
namespace {

// ------------------------------------------------------------------------------------------------------------------
// Fiber stacks: mmap'd (committed lazily by the OS), with a PROT_NONE guard region at the low end so that a stack
// overflow faults (SIGSEGV) instead of silently corrupting the neighbouring fiber. Kept per OS thread across launches.
// Size: 256 KiB, or $PK_EMU_STACK_KIB (read once).

size_t stack_bytes() {
  static const size_t bytes = [] {
    size_t kib = 256;
    if (const char* env = std::getenv("PK_EMU_STACK_KIB")) {
      long v = std::strtol(env, nullptr, 10);
      if (v >= 64) kib = static_cast<size_t>(v);
    }
    return kib * 1024;
  }();
  return bytes;
}

struct Stack {
  char* map = nullptr;  // guard + usable stack
  size_t map_bytes = 0;
  char* base() const { return map + guard(); }
  size_t size() const { return map_bytes - guard(); }
  static size_t guard() {  // 64 KiB: more than one large frame can skip
    static const size_t bytes = std::max<size_t>(65536, static_cast<size_t>(sysconf(_SC_PAGESIZE)));
    return bytes;
  }
};

struct StackPool {
  std::vector<Stack> stacks;
  ~StackPool() {
    for (Stack& s : stacks) munmap(s.map, s.map_bytes);
  }
  void reserve(size_t n) {
    while (stacks.size() < n) {
      Stack s;
      s.map_bytes = Stack::guard() + stack_bytes();
      void* p = mmap(nullptr, s.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("pk_emu::launch: cannot map a fiber stack");
      s.map = static_cast<char*>(p);
      mprotect(s.map, Stack::guard(), PROT_NONE);
      stacks.push_back(s);
    }
  }
};

thread_local StackPool t_stacks;

// ------------------------------------------------------------------------------------------------------------------
// Contexts.

[[noreturn]] void fiber_main();

#ifdef PK_EMU_ASM_SWITCH
struct Context {
  void* sp = nullptr;
};

void context_init(Context& ctx, const Stack& stack) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack.base() + stack.size()) & ~uintptr_t(15);
  uint64_t* p = reinterpret_cast<uint64_t*>(top);
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  p[-1] = 0;                                           // fiber_main's return address: it never returns
  p[-2] = reinterpret_cast<uint64_t>(&fiber_main);     // popped by `ret`; fiber_main then sees rsp % 16 == 8
  for (int i = 3; i <= 8; ++i) p[-i] = 0;              // rbp, rbx, r12, r13, r14, r15
  p[-9] = uint64_t(mxcsr) | (uint64_t(fcw) << 32);     // MXCSR, x87 control word
  ctx.sp = &p[-9];
}

inline void context_switch(Context& from, Context& to) { pk_emu_switch_context(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void context_init(Context& ctx, const Stack& stack) {
  if (getcontext(&ctx.uc) != 0) throw std::runtime_error("pk_emu::launch: getcontext failed");
  ctx.uc.uc_stack.ss_sp = stack.base();
  ctx.uc.uc_stack.ss_size = stack.size();
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
}

inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------------------------------------------------------
// Block state.

enum class Op : uint8_t { shfl_xor, ldmatrix, mma, wgmma, named_barrier, sync_warp };
enum class FiberState : uint8_t {
  ready, parked_warp, parked_block, parked_mbarrier, parked_named, parked_registers, done
};

struct FiberAbort {};  // thrown into parked fibers to unwind them when a launch fails; not a std::exception

struct LaneSlot {
  // inputs
  float value;
  unsigned lane_mask;
  const unsigned char* address;
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  // outputs
  float out;
  uint32_t r[4];
  float d[4];
  // wgmma (inputs and outputs): this lane's accumulators in, the results out
  float wd[64];
  uint64_t a_desc, b_desc;
  int n;
  bool a_in_registers, accumulate, transpose_b;
};

struct Warp {
  unsigned arrived = 0;
  uint64_t generation = 0;  // collectives completed by this warp
  Op op = Op::shfl_xor;     // of the collective being gathered (set by its first lane)
  bool trans = false;
  Element type = Element::f16;
  LaneSlot slots[2][32];    // double-buffered by generation parity: no second barrier needed before reuse
  // the shared chunks a wgmma read, by generation parity (as slots); every lane's pending wgmma holds the list
  std::shared_ptr<const std::vector<uint32_t>> wgmma_chunks[2];
  // wgmmas issued and a hash of their shapes, descriptors and flags: the 4 warps of a warpgroup must agree
  uint64_t wgmma_issued = 0, wgmma_signature = 0;
};

struct Fiber {
  Context ctx;
  unsigned tid = 0;
  FiberState state = FiberState::ready;
  bool started = false;
  uint64_t warp_calls = 0;   // warp collectives called
  uint64_t block_calls = 0;  // sync_threads called
  void* asan_fake_stack = nullptr;
  struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;  // null: zero fill
    uint64_t group;
  };
  std::vector<AsyncCopy> in_flight;  // this thread's cp.async copies not landed yet
  uint64_t groups_committed = 0;     // the open group's number
  struct PendingWgmma {
    float* d;
    int n;
    uint64_t group;
    float values[64];
    // the warp's shared chunks this wgmma reads: each lane's count on them is released at that lane's wait (a
    // thread that hands a stage back before its own wait lets a copy into it fail, whatever the other lanes did)
    std::shared_ptr<const std::vector<uint32_t>> chunks;
    const uint32_t* a;             // the A registers (null: A from shared memory), read until the wait
    uint32_t a_values[4];
  };
  std::vector<PendingWgmma> wgmma_pending;  // this thread's wgmma results not waited for yet (oldest first)
  uint64_t wgmma_groups_committed = 0;      // the open wgmma group's number
  bool wgmma_fenced = false;                // a wgmma_fence since this thread's last wgmma_wait
  uint64_t proxy_fences = 0;                // fence_proxy_async calls
  uint32_t mbarrier_waited = 0;             // while parked_mbarrier: the barrier's shared offset
  unsigned mbarrier_parity = 0;             // and the parity waited for
  std::map<uint32_t, uint64_t> mbarrier_seen;  // barrier -> its completed phases when this thread last waited on it
  unsigned named_waited = 0;                // while parked_named: the barrier id
};

// A named barrier (bar.sync / bar.arrive with an id and a thread count).
struct NamedBarrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;  // phases completed
};
constexpr unsigned kNamedBarriers = 16;

// A warpgroup's register count (setmaxnreg) and the request being gathered from its 128 threads.
struct WarpGroupRegisters {
  unsigned current = 0;       // per thread
  unsigned arrived = 0, count = 0;
  bool increase = false;
  uint64_t generation = 0;    // requests applied
};

// An mbarrier (sm_90 transaction barrier): the current phase completes when `pending` reaches 0 with no bytes of
// transactions outstanding (tx, announced by arrive_expect_tx, counted off by landing TMA copies).
struct MBarrier {
  unsigned expected = 0, pending = 0;
  int64_t tx = 0;
  uint64_t completed = 0;  // phases completed
};

// A TMA copy in flight: the box's bytes (read from global memory at issue), where they go, which barrier they count
// off.
struct TmaCopy {
  uint32_t dst, bar;
  std::vector<unsigned char> bytes;
};

constexpr size_t kCanaryBytes = 1024;  // checked on both sides of the shared buffer when a block ends
inline unsigned char canary_byte(size_t i) { return static_cast<unsigned char>((i * 131u + 71u) & 0xFFu); }

struct Block {
  Dim3 grid, idx;
  unsigned nthreads = 0;
  size_t smem_bytes = 0;
  char* smem = nullptr;
  const std::function<void()>* body = nullptr;

  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned> order;                       // thread ids in the order the scheduler starts / wakes them
  std::vector<std::array<unsigned, 32>> warp_order;  // per warp: its lanes in that order
  std::vector<Fiber*> queue;  // ring buffer of ready fibers (a power of two long); each fiber is in it at most once
  size_t queue_head = 0, queue_count = 0;
  std::vector<uint16_t> chunk_in_flight;  // per 16-byte shared chunk: cp.async copies into it not landed yet
  // per chunk, when its last cp.async landed: the landing thread and how many sync_threads it had passed then.
  // Another thread may read the chunk only after passing one more (the barrier that publishes the copy).
  std::vector<int64_t> chunk_landed_epoch;
  std::vector<unsigned> chunk_landed_by;
  // per chunk, the landing thread's fence_proxy_async count when it landed: the async proxy (wgmma) may read it
  // only after that thread's next fence
  std::vector<uint64_t> chunk_landed_proxy;
  // per chunk, the wgmmas (one per warp) that read it and were not waited for yet: no copy may land there until then
  std::vector<uint32_t> chunk_wgmma_reads;  // lanes (32 per warp) whose wgmma reading the chunk was not waited for
  // per chunk, when a TMA copy landed in it: its barrier's offset (-1: none) and the phase count its waiters must
  // have seen (the phase the copy completed, plus one)
  std::vector<int64_t> chunk_tma_barrier;
  std::vector<uint64_t> chunk_tma_phase;
  std::map<uint32_t, MBarrier> mbarriers;  // by shared offset, from mbarrier_init
  std::vector<TmaCopy> tma_in_flight;      // oldest first
  NamedBarrier named[kNamedBarriers];
  std::vector<WarpGroupRegisters> warp_group_registers;
  int64_t free_registers = 0;  // returned to the block's pool by setmaxnreg.dec, not yet taken by an inc
  bool greedy = false;         // pop the ready fiber that comes first in `order`, not the oldest
  std::vector<unsigned> rank;  // thread id -> its position in `order`

  unsigned block_arrived = 0;
  unsigned live = 0;
  Fiber* current = nullptr;
  Context main_ctx;
  void* main_asan_fake_stack = nullptr;
  const void* main_stack_bottom = nullptr;  // launch()'s stack (for AddressSanitizer)
  size_t main_stack_size = 0;
  bool aborting = false;
  bool failed = false;
  std::string error;

  void push(Fiber* f) {
    queue[(queue_head + queue_count) & (queue.size() - 1)] = f;
    ++queue_count;
  }
  Fiber* pop() {
    if (queue_count == 0) return nullptr;
    if (greedy) {  // bring the first-ranked ready fiber to the head
      const size_t mask = queue.size() - 1;
      size_t best = queue_head;
      for (size_t i = 1; i < queue_count; ++i) {
        const size_t at = (queue_head + i) & mask;
        if (rank[queue[at]->tid] < rank[queue[best]->tid]) best = at;
      }
      std::swap(queue[best], queue[queue_head]);
    }
    Fiber* f = queue[queue_head];
    queue_head = (queue_head + 1) & (queue.size() - 1);
    --queue_count;
    return f;
  }
};

thread_local Block* t_block = nullptr;

std::string dim3_str(Dim3 d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}

std::string where(const Block& b, unsigned tid) {
  std::ostringstream s;
  s << "block " << dim3_str(b.idx) << ", thread " << tid << " (warp " << tid / 32 << ", lane " << tid % 32 << ")";
  return s.str();
}

// "0-3, 7, 9-10"
std::string ranges(const std::vector<unsigned>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) s << ", ";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

// ------------------------------------------------------------------------------------------------------------------
// Scheduling.

// Switches from the running context `from` to fiber `to`, or to launch()'s context when `to` is null. `from_fake_stack`
// is where AddressSanitizer keeps the leaving context's fake stack, null when that context has finished for good.
void switch_to(Block& b, Context& from, void** from_fake_stack, Fiber* to) {
  Context* target = &b.main_ctx;
  const void* bottom = b.main_stack_bottom;
  size_t size = b.main_stack_size;
  if (to) {
    const Stack& stack = t_stacks.stacks[to->tid];
    if (!to->started) {
      to->started = true;
      to->asan_fake_stack = nullptr;
#ifdef PK_EMU_ASAN
      __asan_unpoison_memory_region(stack.base(), stack.size());  // left poisoned by the stack's previous fiber
#endif
      context_init(to->ctx, stack);
    }
    target = &to->ctx;
    bottom = stack.base();
    size = stack.size();
  }
  b.current = to;
#ifdef PK_EMU_ASAN
  __sanitizer_start_switch_fiber(from_fake_stack, bottom, size);
#else
  (void)from_fake_stack, (void)bottom, (void)size;
#endif
  context_switch(from, *target);
#ifdef PK_EMU_ASAN
  __sanitizer_finish_switch_fiber(from_fake_stack ? *from_fake_stack : nullptr, nullptr, nullptr);
#endif
}

void land_tma_copies(Block& b, uint32_t bar);

// Leaves fiber f (parked, or done for good): runs the next ready fiber, or goes back to launch() when none is left
// (every thread finished, or a deadlock), or when the launch failed.
void leave(Block& b, Fiber& f) {
  Fiber* next = (b.failed || b.aborting) ? nullptr : b.pop();
  while (!next && !b.failed && !b.aborting && b.live > 0 && !b.tma_in_flight.empty()) {
    land_tma_copies(b, b.tma_in_flight.front().bar);  // nothing else can run: the oldest barrier's copies land
    next = b.pop();
  }
  if (next == &f) return;  // a yielding thread that runs next anyway (see arrive)
  switch_to(b, f.ctx, f.state == FiberState::done ? nullptr : &f.asan_fake_stack, next);
  b.current = &f;  // resumed
}

// While a failed launch unwinds its parked fibers, a barrier must not wait any more: returns true when the caller
// should return at once (a destructor calls it during the unwinding), throws FiberAbort to start the unwinding.
bool aborted(const Block& b) {
  if (!b.aborting) return false;
  if (std::uncaught_exceptions() > 0) return true;
  throw FiberAbort{};
}

void park(Block& b, Fiber& f, FiberState why) {
  f.state = why;
  leave(b, f);
  aborted(b);
}

void wake(Block& b, Fiber& f) {
  f.state = FiberState::ready;
  b.push(&f);
}

void record_error(Block& b, unsigned tid, const std::string& what) {
  if (b.failed || b.aborting) return;
  b.failed = true;
  b.error = "pk_emu::launch: " + where(b, tid) + ": " + what;
}

[[noreturn]] void fiber_main() {
#ifdef PK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  Block& b = *t_block;
  Fiber& f = *b.current;
  try {
    (*b.body)();
  } catch (const FiberAbort&) {
  } catch (const std::exception& e) {
    record_error(b, f.tid, e.what());
  } catch (...) {
    record_error(b, f.tid, "a non-standard exception was thrown");
  }
  if (!f.in_flight.empty() && !b.aborting)
    record_error(b, f.tid, std::to_string(f.in_flight.size()) +
                               " cp.async copies were never waited for (cp_async_wait) before the thread finished");
  if (!f.wgmma_pending.empty() && !b.aborting)
    record_error(b, f.tid, std::to_string(f.wgmma_pending.size()) +
                               " wgmma results were never waited for (wgmma_wait) before the thread finished");
  f.state = FiberState::done;
  --b.live;
  leave(b, f);
  std::abort();  // nothing resumes a finished fiber
}

Block& block_of(const char* what) {
  Block* b = t_block;
  if (!b || !b->current) throw std::logic_error(std::string("pk_emu::") + what + " called outside a launched thread");
  return *b;
}

// ------------------------------------------------------------------------------------------------------------------
// Warp collectives: every lane fills its slot and waits; the last lane to arrive computes every lane's outputs.

std::string op_name(Op op, bool trans, Element type) {
  switch (op) {
    case Op::shfl_xor: return "shfl_xor";
    case Op::ldmatrix: return trans ? "ldmatrix_x4(.trans)" : "ldmatrix_x4";
    case Op::mma: return type == Element::bf16 ? "mma_m16n8k16(bf16)" : "mma_m16n8k16(f16)";
    case Op::wgmma: return type == Element::bf16 ? "wgmma_m64k16(bf16)" : "wgmma_m64k16(f16)";
    case Op::named_barrier: return trans ? "named_barrier_sync" : "named_barrier_arrive";
    case Op::sync_warp: return "sync_warp";
  }
  return "?";
}

template <class Fill, class Compute>
const LaneSlot& collective(Op op, bool trans, Element type, const char* what, Fill fill, Compute compute) {
  Block& b = block_of(what);
  Fiber& f = *b.current;
  const unsigned lane = f.tid % 32;
  Warp& w = b.warps[f.tid / 32];
  if (aborted(b)) return w.slots[0][lane];  // results do not matter any more
  if (w.arrived == 0) {
    w.op = op;
    w.trans = trans;
    w.type = type;
  } else if (w.op != op || ((op == Op::ldmatrix || op == Op::named_barrier) && w.trans != trans) ||
             ((op == Op::mma || op == Op::wgmma) && w.type != type)) {
    std::vector<unsigned> waiting;
    for (unsigned l = 0; l < 32; ++l)
      if (b.fibers[(f.tid / 32) * 32 + l].state == FiberState::parked_warp) waiting.push_back(l);
    std::ostringstream s;
    s << "calls " << op_name(op, trans, type) << " (its warp collective #" << f.warp_calls + 1 << ") while lanes "
      << ranges(waiting) << " of its warp wait at " << op_name(w.op, w.trans, w.type)
      << ": every lane of a warp must execute the same warp-level instruction";
    throw std::runtime_error(s.str());
  }
  LaneSlot& slot = w.slots[w.generation & 1][lane];
  fill(slot);  // may throw (bad address): then this lane never arrives and the launch fails, naming it
  ++f.warp_calls;
  if (++w.arrived < 32) {
    park(b, f, FiberState::parked_warp);
  } else {
    w.arrived = 0;
    compute(w.slots[w.generation & 1]);
    ++w.generation;
    Fiber* warp_fibers = &b.fibers[(f.tid / 32) * 32];
    for (unsigned l : b.warp_order[f.tid / 32])
      if (l != lane) wake(b, warp_fibers[l]);
  }
  return slot;
}

long long shared_offset(const Block& b, const void* p) {
  return static_cast<long long>(reinterpret_cast<intptr_t>(p) - reinterpret_cast<intptr_t>(b.smem));
}

void check_shared(const Block& b, const void* p, size_t bytes, const char* what) {
  const long long offset = shared_offset(b, p);
  if (offset < 0 || static_cast<unsigned long long>(offset) + bytes > b.smem_bytes) {
    std::ostringstream s;
    s << what << ": shared address " << p << " (offset " << offset << ", " << bytes
      << " bytes) is outside the block's " << b.smem_bytes << " bytes of shared memory";
    throw std::runtime_error(s.str());
  }
}

void check_aligned(const Block& b, const void* p, size_t alignment, const char* what, const char* which) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) {
    std::ostringstream s;
    s << what << ": " << which << " address " << p;
    const long long offset = shared_offset(b, p);
    if (offset >= 0 && static_cast<unsigned long long>(offset) <= b.smem_bytes) s << " (shared offset " << offset << ")";
    s << " is not " << alignment << "-byte aligned";
    throw std::runtime_error(s.str());
  }
}

// A chunk a TMA copy landed in is visible to a thread once it has waited for the barrier phase the copy completed.
void check_tma_visible(const Block& b, const Fiber& reader, size_t chunk, const std::string& what) {
  const int64_t bar = b.chunk_tma_barrier[chunk];
  if (bar < 0) return;
  const auto seen = reader.mbarrier_seen.find(static_cast<uint32_t>(bar));
  const uint64_t phases = seen == reader.mbarrier_seen.end() ? 0 : seen->second;
  if (phases < b.chunk_tma_phase[chunk])
    throw std::runtime_error(what + " at shared offset " + std::to_string(chunk * 16) +
                             " that a TMA copy landed in, completing phase " +
                             std::to_string(b.chunk_tma_phase[chunk] - 1) + " of the mbarrier at shared offset " +
                             std::to_string(bar) + ", which this thread has not waited for (mbarrier_wait): the " +
                             "copy is not visible to it");
}

inline uint16_t load_u16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline uint32_t load_u32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// IEEE binary16 -> float (exact).
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float v = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exponent == 31) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN (payload kept)
  return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// bfloat16 -> float (exact): the high half of a binary32.
inline float bf16_to_float(uint16_t h) { return float_from_bits(uint32_t(h) << 16); }

}  // namespace

// ------------------------------------------------------------------------------------------------------------------
// API.

unsigned thread_index() { return block_of("thread_index").current->tid; }
Dim3 block_index() { return block_of("block_index").idx; }
Dim3 grid_dim() { return block_of("grid_dim").grid; }
unsigned block_dim() { return block_of("block_dim").nthreads; }
char* shared_memory() { return block_of("shared_memory").smem; }

void sync_threads() {
  Block& b = block_of("sync_threads");
  Fiber& f = *b.current;
  if (aborted(b)) return;
  ++f.block_calls;
  if (++b.block_arrived < b.nthreads) {
    park(b, f, FiberState::parked_block);
  } else {
    b.block_arrived = 0;
    for (unsigned t : b.order)
      if (t != f.tid) wake(b, b.fibers[t]);
  }
}

namespace {
// bar.sync / bar.arrive is a warp instruction (.aligned): the 32 lanes arrive together, with the same id and count,
// and count as 32 threads; then each lane of a sync waits for the phase.
void named_arrival(unsigned id, unsigned count, bool wait, const char* what) {
  Block& b = block_of(what);
  if (id == 0 || id >= kNamedBarriers)
    throw std::runtime_error(std::string(what) + ": barrier id " + std::to_string(id) + " is not in [1, 15] (0 is " +
                             "sync_threads')");
  if (count == 0 || count % 32 != 0 || count > b.nthreads)
    throw std::runtime_error(std::string(what) + ": thread count " + std::to_string(count) + " is not a multiple of " +
                             "32 in [32, " + std::to_string(b.nthreads) + "]");
  const LaneSlot& slot = collective(
      Op::named_barrier, wait, Element::f16, what,
      [&](LaneSlot& lane) {
        lane.lane_mask = id;
        lane.n = static_cast<int>(count);
      },
      [what](LaneSlot* lanes) {
        Block& blk = *t_block;
        const unsigned barrier = lanes[0].lane_mask, threads = static_cast<unsigned>(lanes[0].n);
        for (unsigned l = 1; l < 32; ++l)
          if (lanes[l].lane_mask != barrier || static_cast<unsigned>(lanes[l].n) != threads)
            throw std::runtime_error(std::string(what) + ": the lanes of a warp name different barriers or counts");
        NamedBarrier& nb = blk.named[barrier];
        if (nb.arrived == 0) {
          nb.expected = threads;
        } else if (nb.expected != threads) {
          throw std::runtime_error(std::string(what) + ": named barrier " + std::to_string(barrier) + " with " +
                                   std::to_string(threads) + " threads while this phase's earlier arrivals named " +
                                   std::to_string(nb.expected));
        }
        for (unsigned l = 0; l < 32; ++l) lanes[l].a_desc = nb.generation;  // the phase this warp arrived in
        nb.arrived += 32;
        if (nb.arrived == nb.expected) {
          nb.arrived = 0;
          ++nb.generation;
          for (unsigned t : blk.order) {
            Fiber& w = blk.fibers[t];
            if (w.state == FiberState::parked_named && w.named_waited == barrier) wake(blk, w);
          }
        }
      });
  Fiber& f = *b.current;
  const uint64_t generation = slot.a_desc;
  f.named_waited = id;
  while (wait && b.named[id].generation == generation) {
    park(b, f, FiberState::parked_named);
    if (aborted(b)) return;
  }
}
}  // namespace

void set_max_registers(unsigned count, bool increase) {
  Block& b = block_of("set_max_registers");
  Fiber& f = *b.current;
  if (aborted(b)) return;
  if (b.nthreads % 128 != 0)
    throw std::runtime_error("setmaxnreg in a block of " + std::to_string(b.nthreads) + " threads: whole warpgroups "
                             "(128 threads) execute it");
  if (count < 24 || count > 256 || count % 8 != 0)
    throw std::runtime_error("setmaxnreg: " + std::to_string(count) + " registers is not a multiple of 8 in [24, 256]");
  const unsigned group = f.tid / 128;
  WarpGroupRegisters& g = b.warp_group_registers[group];
  const char* what = increase ? "setmaxnreg.inc" : "setmaxnreg.dec";
  if (g.arrived == 0) {
    g.count = count;
    g.increase = increase;
  } else if (g.count != count || g.increase != increase) {
    throw std::runtime_error(std::string(what) + " " + std::to_string(count) + " while other threads of warpgroup " +
                             std::to_string(group) + " ask for setmaxnreg." + (g.increase ? "inc " : "dec ") +
                             std::to_string(g.count) + ": the whole warpgroup executes the same one");
  }
  const uint64_t generation = g.generation;
  if (++g.arrived < 128) {
    while (b.warp_group_registers[group].generation == generation) park(b, f, FiberState::parked_registers);
    return;
  }
  if (increase ? count < g.current : count > g.current)
    throw std::runtime_error(std::string(what) + " " + std::to_string(count) + " from " + std::to_string(g.current) +
                             " registers per thread goes the wrong way");
  if (increase) {
    const int64_t need = int64_t(count - g.current) * 128;
    while (b.free_registers < need) park(b, f, FiberState::parked_registers);  // until another warpgroup's dec
    b.free_registers -= need;
  } else {
    b.free_registers += int64_t(g.current - count) * 128;
  }
  g.current = count;
  g.arrived = 0;
  ++g.generation;
  for (unsigned t : b.order) {  // this warpgroup goes on; a waiting inc looks at the pool again
    Fiber& w = b.fibers[t];
    if (w.state == FiberState::parked_registers && w.tid != f.tid) wake(b, w);
  }
}

void named_barrier_sync(unsigned id, unsigned count) {
  if (aborted(block_of("named_barrier_sync"))) return;
  named_arrival(id, count, true, "named_barrier_sync");
}

void named_barrier_arrive(unsigned id, unsigned count) {
  if (aborted(block_of("named_barrier_arrive"))) return;
  named_arrival(id, count, false, "named_barrier_arrive");
}

void sync_warp() {
  collective(Op::sync_warp, false, Element::f16, "sync_warp", [](LaneSlot&) {}, [](LaneSlot*) {});
}

float shfl_xor(float value, int lane_mask) {
  const LaneSlot& s = collective(
      Op::shfl_xor, false, Element::f16, "shfl_xor",
      [&](LaneSlot& slot) {
        slot.value = value;
        slot.lane_mask = static_cast<unsigned>(lane_mask);
      },
      [](LaneSlot* lanes) {
        for (unsigned l = 0; l < 32; ++l) {
          const unsigned src = l ^ lanes[l].lane_mask;
          lanes[l].out = src < 32 ? lanes[src].value : lanes[l].value;
        }
      });
  return s.out;
}

namespace {
std::atomic<uint64_t> g_ldmatrix_phases{0}, g_ldmatrix_extra_wavefronts{0}, g_largest_launch_bytes{0},
    g_blocks_launched{0}, g_works_noted{0};

// The wavefronts beyond one that 8 row addresses of one ldmatrix phase cost (distinct rows in one bank group).
unsigned extra_wavefronts(const Block& b, const unsigned char* const (&rows)[8]) {
  unsigned per_group[8] = {};
  for (int i = 0; i < 8; ++i) {
    bool repeat = false;  // the same row twice is a broadcast, not a conflict
    for (int k = 0; k < i; ++k) repeat = repeat || rows[k] == rows[i];
    if (!repeat) ++per_group[(shared_offset(b, rows[i]) / 16) % 8];
  }
  unsigned most = 0;
  for (unsigned count : per_group) most = std::max(most, count);
  return most - 1;
}
}  // namespace

SharedMemoryStats shared_memory_stats() {
  return {g_ldmatrix_phases.load(), g_ldmatrix_extra_wavefronts.load(), g_largest_launch_bytes.load(),
          g_blocks_launched.load(), g_works_noted.load()};
}

void note_work() { ++g_works_noted; }

void reset_shared_memory_stats() {
  g_ldmatrix_phases = 0;
  g_ldmatrix_extra_wavefronts = 0;
  g_largest_launch_bytes = 0;
  g_blocks_launched = 0;
  g_works_noted = 0;
}

void ldmatrix_x4(uint32_t r[4], const void* row_address, bool transpose) {
  const LaneSlot& s = collective(
      Op::ldmatrix, transpose, Element::f16, "ldmatrix_x4",
      [&](LaneSlot& slot) {
        const Block& b = *t_block;
        check_aligned(b, row_address, 16, "ldmatrix_x4", "row");
        check_shared(b, row_address, 16, "ldmatrix_x4");
        const size_t chunk = static_cast<size_t>(shared_offset(b, row_address)) / 16;
        if (b.chunk_in_flight[chunk] != 0)
          throw std::runtime_error("ldmatrix_x4 reads shared offset " + std::to_string(chunk * 16) +
                                   " while a copy (cp.async or TMA) into it has not landed (a missing "
                                   "cp_async_wait, sync_threads or mbarrier_wait)");
        const Fiber& reader = *b.current;
        check_tma_visible(b, reader, chunk, "ldmatrix_x4 reads");
        if (b.chunk_landed_by[chunk] != reader.tid &&
            static_cast<int64_t>(reader.block_calls) <= b.chunk_landed_epoch[chunk])
          throw std::runtime_error("ldmatrix_x4 reads shared offset " + std::to_string(chunk * 16) +
                                   " that thread " + std::to_string(b.chunk_landed_by[chunk]) +
                                   "'s cp.async landed in without a sync_threads since (the copy is not visible)");
        slot.address = static_cast<const unsigned char*>(row_address);
      },
      [transpose](LaneSlot* lanes) {
        for (unsigned j = 0; j < 4; ++j) {
          const unsigned char* const rows[8] = {lanes[8 * j].address,     lanes[8 * j + 1].address,
                                                lanes[8 * j + 2].address, lanes[8 * j + 3].address,
                                                lanes[8 * j + 4].address, lanes[8 * j + 5].address,
                                                lanes[8 * j + 6].address, lanes[8 * j + 7].address};
          ++g_ldmatrix_phases;
          g_ldmatrix_extra_wavefronts += extra_wavefronts(*t_block, rows);
        }
        // Matrix j's row i (8 b16 elements, 16 bytes) starts at the address given by lane 8j+i.
        for (unsigned l = 0; l < 32; ++l) {
          for (unsigned j = 0; j < 4; ++j) {
            if (!transpose) {
              // row l/4, elements 2(l%4) (low half) and 2(l%4)+1 (high half): one 32-bit word of the row
              lanes[l].r[j] = load_u32(lanes[8 * j + l / 4].address + 4 * (l % 4));
            } else {
              // column l/4, rows 2(l%4) (low half) and 2(l%4)+1 (high half)
              const uint32_t lo = load_u16(lanes[8 * j + 2 * (l % 4)].address + 2 * (l / 4));
              const uint32_t hi = load_u16(lanes[8 * j + 2 * (l % 4) + 1].address + 2 * (l / 4));
              lanes[l].r[j] = lo | (hi << 16);
            }
          }
        }
      });
  for (int j = 0; j < 4; ++j) r[j] = s.r[j];
}

void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], Element type) {
  const LaneSlot& s = collective(
      Op::mma, false, type, "mma_m16n8k16",
      [&](LaneSlot& slot) {
        for (int i = 0; i < 4; ++i) slot.a[i] = a[i];
        for (int i = 0; i < 2; ++i) slot.b[i] = b[i];
        for (int i = 0; i < 4; ++i) slot.c[i] = c[i];
      },
      [type](LaneSlot* lanes) {
        // PTX ISA 9.7.14.5.8, .f16/.bf16, with groupID = laneid >> 2, threadID_in_group = laneid % 4:
        //   A (16x16, a0..a7 low to high, two per register):
        //     row = groupID for a0,a1,a4,a5, groupID + 8 otherwise;
        //     col = threadID_in_group*2 + (i & 1) for i < 4, + 8 for i >= 4
        //   B (16x8, b0..b3): row = threadID_in_group*2 + (i & 1) for i < 2, + 8 for i >= 2; col = groupID
        //   C/D (16x8, c0..c3): row = groupID for c0,c1, groupID + 8 otherwise; col = threadID_in_group*2 + (i & 1)
        double A[16][16], Bt[8][16];  // Bt[n][k] = B[k][n]
        auto cvt = [type](uint16_t h) { return type == Element::bf16 ? bf16_to_float(h) : f16_to_float(h); };
        for (unsigned l = 0; l < 32; ++l) {
          const unsigned g = l >> 2, t = l % 4;
          for (unsigned i = 0; i < 8; ++i) {
            const uint16_t h = static_cast<uint16_t>(lanes[l].a[i / 2] >> (16 * (i & 1)));
            const unsigned row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
            const unsigned col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = cvt(h);
          }
          for (unsigned i = 0; i < 4; ++i) {
            const uint16_t h = static_cast<uint16_t>(lanes[l].b[i / 2] >> (16 * (i & 1)));
            const unsigned row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            Bt[g][row] = cvt(h);
          }
        }
        for (unsigned l = 0; l < 32; ++l) {
          const unsigned g = l >> 2, t = l % 4;
          for (unsigned i = 0; i < 4; ++i) {
            const unsigned row = i < 2 ? g : g + 8;
            const unsigned col = t * 2 + (i & 1);
            double acc = lanes[l].c[i];
            for (unsigned k = 0; k < 16; ++k) acc += A[row][k] * Bt[col][k];  // products are exact in double
            lanes[l].d[i] = static_cast<float>(acc);
          }
        }
      });
  for (int i = 0; i < 4; ++i) d[i] = s.d[i];
}

void cp_async_16(void* shared_dst, const void* global_src, bool copy) {
  Block& b = block_of("cp_async_16");
  check_aligned(b, shared_dst, 16, "cp_async_16", "destination");
  check_shared(b, shared_dst, 16, "cp_async_16");
  check_aligned(b, global_src, 16, "cp_async_16", "source");
  uint16_t& chunk = b.chunk_in_flight[shared_offset(b, shared_dst) / 16];
  if (chunk != 0)
    throw std::runtime_error("cp_async_16 into shared offset " + std::to_string(shared_offset(b, shared_dst)) +
                             " while an earlier cp.async into it has not landed");
  if (b.chunk_wgmma_reads[shared_offset(b, shared_dst) / 16] != 0)
    throw std::runtime_error("cp_async_16 into shared offset " + std::to_string(shared_offset(b, shared_dst)) +
                             " that a wgmma not yet waited for (wgmma_wait) still reads");
  ++chunk;
  Fiber& f = *b.current;
  f.in_flight.push_back({static_cast<unsigned char*>(shared_dst),
                         copy ? static_cast<const unsigned char*>(global_src) : nullptr, f.groups_committed});
}

void cp_async_commit() {
  Block& b = block_of("cp_async_commit");
  ++b.current->groups_committed;
}

namespace {
// wait_group N (cp.async and wgmma alike): groups 0 .. committed-1 are closed; all but the newest N of them land,
// i.e. those numbered below the value returned. The open group (issued since the last commit) is not waited for.
uint64_t groups_landing_below(uint64_t committed, int pending_groups, const char* what) {
  if (pending_groups < 0) throw std::runtime_error(std::string(what) + ": negative group count");
  return committed > static_cast<uint64_t>(pending_groups) ? committed - static_cast<uint64_t>(pending_groups) : 0;
}
}  // namespace

void cp_async_wait(int pending_groups) {
  Block& b = block_of("cp_async_wait");
  Fiber& f = *b.current;
  const uint64_t land_below = groups_landing_below(f.groups_committed, pending_groups, "cp_async_wait");
  size_t kept = 0;
  for (const Fiber::AsyncCopy& c : f.in_flight) {
    if (c.group < land_below) {
      if (c.src)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
      const size_t chunk = static_cast<size_t>(shared_offset(b, c.dst)) / 16;
      --b.chunk_in_flight[chunk];
      b.chunk_landed_epoch[chunk] = static_cast<int64_t>(f.block_calls);
      b.chunk_landed_by[chunk] = f.tid;
      b.chunk_landed_proxy[chunk] = f.proxy_fences;
      b.chunk_tma_barrier[chunk] = -1;
    } else {
      f.in_flight[kept++] = c;
    }
  }
  f.in_flight.resize(kept);
}

// ------------------------------------------------------------------------------------------------------------------
// wgmma (sm_90a), emulated per warp: warp w of a warpgroup computes rows 16 (w % 4) .. + 15 of the 64, which depend
// only on its own A rows and the shared B. The results are held back until wgmma_wait covers their group.

namespace {

// The PTX ISA's shared-memory matrix descriptor (start address, leading / stride byte offsets, base offset and
// swizzle mode), with addresses relative to the block's shared memory.
struct MatrixDescriptor {
  uint32_t start, leading, stride, base_offset, swizzle;
  uint32_t reserved;  // bits 14-15 and 30-31: where a carry out of the start or leading field would land
};

MatrixDescriptor decode_descriptor(uint64_t desc) {
  return {static_cast<uint32_t>(desc & 0x3FFF) << 4, static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4, static_cast<uint32_t>((desc >> 49) & 0x7),
          static_cast<uint32_t>(desc >> 62), static_cast<uint32_t>(desc & 0xC000C000u)};
}

// Byte offset of element (mn, k) (k < 16) of a 16-bit operand with the 128-byte swizzle (CuTe's canonical GMMA
// layouts, in 16-bit elements):
//   K-major:  ((8, m), (8, 2)) : ((64, SBO), (1, 8))      rows of 128 bytes, 8-row groups SBO bytes apart
//   MN-major: ((64, m), (8, k)) : ((1, LBO), (64, SBO))    64-element panels LBO bytes apart, 8-k groups SBO apart
// then the swizzle of the address: its 16-byte chunk index (bits 4-6) XOR its row in the 1024-byte atom (bits 7-9).
size_t operand_offset(const MatrixDescriptor& d, bool mn_major, unsigned mn, unsigned k) {
  size_t offset = mn_major ? d.start + (mn % 64) * 2 + (mn / 64) * size_t(d.leading) + (k % 8) * 128 +
                                 (k / 8) * size_t(d.stride)
                           : d.start + (mn % 8) * 128 + (mn / 8) * size_t(d.stride) + k * 2;
  return offset ^ (((offset >> 7) & 7) << 4);
}

void check_descriptor(const MatrixDescriptor& d, const char* which) {
  if (d.reserved != 0)  // e.g. descriptor_plus stepped the start address past its 14 bits (the hardware drops it)
    throw std::runtime_error(std::string("wgmma_m64k16: the ") + which + " descriptor sets reserved bits 14-15 or "
                             "30-31 (a start or leading offset that carried out of its field)");
  if (d.swizzle != 1)
    throw std::runtime_error(std::string("wgmma_m64k16: the ") + which + " descriptor's swizzle mode " +
                             std::to_string(d.swizzle) + " is not emulated (only 1, the 128-byte swizzle)");
  if (d.base_offset != 0 || ((d.start >> 7) & 7) != 0)
    throw std::runtime_error(std::string("wgmma_m64k16: the ") + which + " descriptor starts at shared offset " +
                             std::to_string(d.start) + ", inside the rows of a 1024-byte swizzle atom (or sets a " +
                             "base offset): not emulated");
}

// A 16-bit operand element that wgmma reads from shared memory: the chunk must have landed, been published by a
// barrier and handed to the async proxy (fence_proxy_async by the thread that landed it).
uint16_t read_operand(const Block& b, const Fiber& reader, size_t offset, const char* which) {
  if (offset + 2 > b.smem_bytes)
    throw std::runtime_error(std::string("wgmma_m64k16: ") + which + " element at shared offset " +
                             std::to_string(offset) + " is outside the block's " + std::to_string(b.smem_bytes) +
                             " bytes of shared memory");
  const size_t chunk = offset / 16;
  if (b.chunk_in_flight[chunk] != 0)
    throw std::runtime_error(std::string("wgmma_m64k16 reads ") + which + " at shared offset " +
                             std::to_string(offset) + " while a copy (cp.async or TMA) into it has not landed");
  check_tma_visible(b, reader, chunk, std::string("wgmma_m64k16 reads ") + which);
  if (b.chunk_landed_epoch[chunk] >= 0) {
    const Fiber& writer = b.fibers[b.chunk_landed_by[chunk]];
    if (writer.tid != reader.tid && static_cast<int64_t>(reader.block_calls) <= b.chunk_landed_epoch[chunk])
      throw std::runtime_error(std::string("wgmma_m64k16 reads ") + which + " at shared offset " +
                               std::to_string(offset) + " that thread " + std::to_string(writer.tid) +
                               "'s cp.async landed in without a sync_threads since (the copy is not visible)");
    if (writer.proxy_fences <= b.chunk_landed_proxy[chunk])
      throw std::runtime_error(std::string("wgmma_m64k16 reads ") + which + " at shared offset " +
                               std::to_string(offset) + " that thread " + std::to_string(writer.tid) +
                               "'s cp.async landed in with no fence_proxy_async by it since (the async proxy "
                               "may not see the copy)");
  }
  return load_u16(reinterpret_cast<const unsigned char*>(b.smem) + offset);
}

}  // namespace

void wgmma_m64k16(float* d, int n, const uint32_t a[4], uint64_t a_desc, uint64_t b_desc, bool accumulate,
                  bool transpose_b, Element type) {
  Block& blk = block_of("wgmma_m64k16");
  Fiber& f = *blk.current;
  if (n < 8 || n > 128 || n % 8 != 0)
    throw std::runtime_error("wgmma_m64k16: n = " + std::to_string(n) + " is not emulated (8, 16, ..., 128)");
  if (!f.wgmma_fenced)
    throw std::runtime_error("wgmma_m64k16 without a wgmma_fence since this thread's last wgmma_wait (the "
                             "accumulator and A registers written before it need one)");
  Warp& warp = blk.warps[f.tid / 32];
  const uint64_t generation = warp.generation;  // of the collective this call joins
  const LaneSlot& s = collective(
      Op::wgmma, false, type, "wgmma_m64k16",
      [&](LaneSlot& slot) {
        slot.n = n;
        slot.a_in_registers = a != nullptr;
        for (int i = 0; i < 4; ++i) slot.a[i] = a ? a[i] : 0;
        slot.a_desc = a_desc;
        slot.b_desc = b_desc;
        slot.accumulate = accumulate;
        slot.transpose_b = transpose_b;
        const float* in = d;  // the newest result still pending for these registers, else the registers
        for (auto p = f.wgmma_pending.rbegin(); p != f.wgmma_pending.rend(); ++p)
          if (p->d == d) {
            if (p->n != n) throw std::runtime_error("wgmma_m64k16: accumulators reused with another n in flight");
            in = p->values;
            break;
          }
        for (int i = 0; i < n / 2; ++i) slot.wd[i] = accumulate ? in[i] : 0.f;
      },
      [type](LaneSlot* lanes) {
        Block& b = *t_block;
        const Fiber& reader = *b.current;
        const LaneSlot& first = lanes[0];
        for (unsigned l = 1; l < 32; ++l)
          if (lanes[l].n != first.n || lanes[l].a_in_registers != first.a_in_registers ||
              lanes[l].a_desc != first.a_desc || lanes[l].b_desc != first.b_desc ||
              lanes[l].accumulate != first.accumulate || lanes[l].transpose_b != first.transpose_b)
            throw std::runtime_error("wgmma_m64k16: the lanes of a warp pass different shapes, descriptors or flags");
        const int n = first.n;
        const unsigned warp_in_group = (reader.tid / 32) % 4;
        auto cvt = [type](uint16_t h) { return type == Element::bf16 ? bf16_to_float(h) : f16_to_float(h); };
        double A[16][16], Bt[128][16];  // this warp's 16 rows; Bt[n][k] = B[k][n]
        if (first.a_in_registers) {  // the mma.m16n8k16 A layout (see mma_m16n8k16)
          for (unsigned l = 0; l < 32; ++l) {
            const unsigned g = l >> 2, t = l % 4;
            for (unsigned i = 0; i < 8; ++i) {
              const uint16_t h = static_cast<uint16_t>(lanes[l].a[i / 2] >> (16 * (i & 1)));
              A[(i < 2 || (i >= 4 && i < 6)) ? g : g + 8][t * 2 + (i & 1) + (i >= 4 ? 8 : 0)] = cvt(h);
            }
          }
        } else {
          const MatrixDescriptor da = decode_descriptor(first.a_desc);
          check_descriptor(da, "A");
          for (unsigned r = 0; r < 16; ++r)
            for (unsigned k = 0; k < 16; ++k)
              A[r][k] = cvt(read_operand(b, reader, operand_offset(da, false, 16 * warp_in_group + r, k), "A"));
        }
        const MatrixDescriptor db = decode_descriptor(first.b_desc);
        check_descriptor(db, "B");
        auto list = std::make_shared<std::vector<uint32_t>>();
        std::vector<uint32_t>& chunks = *list;
        for (int c = 0; c < n; ++c)
          for (unsigned k = 0; k < 16; ++k) {
            const size_t offset = operand_offset(db, first.transpose_b, c, k);
            Bt[c][k] = cvt(read_operand(b, reader, offset, "B"));
            chunks.push_back(static_cast<uint32_t>(offset / 16));
          }
        if (!first.a_in_registers) {
          const MatrixDescriptor da = decode_descriptor(first.a_desc);
          for (unsigned r = 0; r < 16; ++r)
            for (unsigned k = 0; k < 16; ++k)
              chunks.push_back(static_cast<uint32_t>(operand_offset(da, false, 16 * warp_in_group + r, k) / 16));
        }
        std::sort(chunks.begin(), chunks.end());
        chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
        for (uint32_t c : chunks) b.chunk_wgmma_reads[c] += 32;
        b.warps[reader.tid / 32].wgmma_chunks[b.warps[reader.tid / 32].generation & 1] = std::move(list);
        Warp& warp = b.warps[reader.tid / 32];
        ++warp.wgmma_issued;
        for (uint64_t x : {uint64_t(n), uint64_t(first.a_in_registers), first.a_in_registers ? 0 : first.a_desc,
                           first.b_desc, uint64_t(first.accumulate), uint64_t(first.transpose_b)})
          warp.wgmma_signature = (warp.wgmma_signature ^ x) * 0x100000001B3ull;  // FNV-style mixing
        // d[4j + q]: row g + 8 (q >= 2), column 8j + 2t + (q & 1): the m16n8 C layout once per 8 columns
        for (unsigned l = 0; l < 32; ++l) {
          const unsigned g = l >> 2, t = l % 4;
          for (int i = 0; i < n / 2; ++i) {
            const unsigned row = g + ((i % 4) >= 2 ? 8 : 0), col = 8 * (i / 4) + 2 * t + (i & 1);
            double acc = lanes[l].wd[i];
            for (unsigned k = 0; k < 16; ++k) acc += A[row][k] * Bt[col][k];
            lanes[l].wd[i] = static_cast<float>(acc);
          }
        }
      });
  Fiber::PendingWgmma pending{d, n, f.wgmma_groups_committed, {}, {}, a, {}};
  if (a) std::memcpy(pending.a_values, a, sizeof(pending.a_values));
  pending.chunks = warp.wgmma_chunks[generation & 1];  // this lane's share is released at its wait
  for (int i = 0; i < n / 2; ++i) {
    pending.values[i] = s.wd[i];
    d[i] = std::numeric_limits<float>::quiet_NaN();  // undefined until the wait: a read before it is a bug
  }
  f.wgmma_pending.push_back(pending);
}

void wgmma_fence() { block_of("wgmma_fence").current->wgmma_fenced = true; }

void wgmma_commit() { ++block_of("wgmma_commit").current->wgmma_groups_committed; }

void wgmma_wait(int pending_groups) {
  Block& b = block_of("wgmma_wait");
  Fiber& f = *b.current;
  const uint64_t land_below = groups_landing_below(f.wgmma_groups_committed, pending_groups, "wgmma_wait");
  size_t kept = 0;
  for (size_t i = 0; i < f.wgmma_pending.size(); ++i) {
    Fiber::PendingWgmma& p = f.wgmma_pending[i];
    if (p.group < land_below) {
      if (p.a && std::memcmp(p.a, p.a_values, sizeof(p.a_values)) != 0)
        throw std::runtime_error("wgmma_wait: the A registers of a wgmma were overwritten before this wait (the "
                                 "wgmma reads them asynchronously until it completes)");
      std::memcpy(p.d, p.values, sizeof(float) * static_cast<size_t>(p.n / 2));
      for (uint32_t c : *p.chunks) --b.chunk_wgmma_reads[c];
    } else {
      if (kept != i) f.wgmma_pending[kept] = std::move(f.wgmma_pending[i]);
      ++kept;
    }
  }
  f.wgmma_pending.erase(f.wgmma_pending.begin() + static_cast<std::ptrdiff_t>(kept), f.wgmma_pending.end());
  f.wgmma_fenced = false;
}

void fence_proxy_async() { ++block_of("fence_proxy_async").current->proxy_fences; }

// ------------------------------------------------------------------------------------------------------------------
// mbarrier and TMA (sm_90).

namespace {

// The barrier at `bar`: in shared memory, 8-byte aligned and initialized (except for mbarrier_init itself).
uint32_t barrier_offset(Block& b, const void* bar, const char* what, bool must_exist = true) {
  check_aligned(b, bar, 8, what, "mbarrier");
  check_shared(b, bar, 8, what);
  const uint32_t offset = static_cast<uint32_t>(shared_offset(b, bar));
  if (must_exist && b.mbarriers.count(offset) == 0)
    throw std::runtime_error(std::string(what) + ": the mbarrier at shared offset " + std::to_string(offset) +
                             " was never initialized (mbarrier_init)");
  return offset;
}

// Completes the current phase when every arrival came and every announced byte landed; wakes the waiters (each
// checks its parity again).
void complete_if_done(Block& b, uint32_t offset, MBarrier& m) {
  if (m.pending != 0 || m.tx != 0) return;
  ++m.completed;
  m.pending = m.expected;
  for (unsigned t : b.order) {
    Fiber& w = b.fibers[t];
    if (w.state == FiberState::parked_mbarrier && w.mbarrier_waited == offset) wake(b, w);
  }
}

void arrive(Block& b, uint32_t offset, const char* what) {
  MBarrier& m = b.mbarriers.at(offset);
  if (m.pending == 0)
    throw std::runtime_error(std::string(what) + ": more arrivals at the mbarrier at shared offset " +
                             std::to_string(offset) + " than the " + std::to_string(m.expected) +
                             " its phase expects");
  --m.pending;
  complete_if_done(b, offset, m);
  // An arrival hands something over (a stage freed, a tile announced): the other threads may run first, so that a
  // release that comes before the releasing thread's own reads completed (a wgmma_wait after the arrive) lets the
  // producer's next copy into the stage show up as a copy into an operand still being read.
  Fiber& f = *b.current;
  wake(b, f);
  leave(b, f);
  aborted(b);
}

// Lands every TMA copy in flight on barrier `bar` (oldest first), counting their bytes off its transactions.
void land_tma_copies(Block& b, uint32_t bar) {
  std::vector<TmaCopy> landing;
  size_t kept = 0;
  for (size_t i = 0; i < b.tma_in_flight.size(); ++i) {
    if (b.tma_in_flight[i].bar == bar)
      landing.push_back(std::move(b.tma_in_flight[i]));
    else if (kept++ != i)
      b.tma_in_flight[kept - 1] = std::move(b.tma_in_flight[i]);
  }
  b.tma_in_flight.resize(kept);
  if (landing.empty()) return;
  MBarrier& m = b.mbarriers.at(bar);
  for (const TmaCopy& c : landing) {
    std::memcpy(b.smem + c.dst, c.bytes.data(), c.bytes.size());
    for (size_t chunk = c.dst / 16; chunk < (c.dst + c.bytes.size()) / 16; ++chunk) {
      --b.chunk_in_flight[chunk];
      b.chunk_landed_epoch[chunk] = -1;  // not a cp.async: visibility comes from the barrier
      b.chunk_tma_barrier[chunk] = bar;
      b.chunk_tma_phase[chunk] = m.completed + 1;
    }
    m.tx -= static_cast<int64_t>(c.bytes.size());
  }
  complete_if_done(b, bar, m);
}

}  // namespace

void mbarrier_init(void* bar, unsigned count) {
  Block& b = block_of("mbarrier_init");
  const uint32_t offset = barrier_offset(b, bar, "mbarrier_init", false);
  if (count == 0 || count > (1u << 20) - 1)
    throw std::runtime_error("mbarrier_init: arrival count " + std::to_string(count) + " is not in [1, 2^20 - 1]");
  MBarrier& m = b.mbarriers[offset];
  m = MBarrier{};
  m.expected = m.pending = count;
}

void mbarrier_arrive(void* bar) {
  Block& b = block_of("mbarrier_arrive");
  arrive(b, barrier_offset(b, bar, "mbarrier_arrive"), "mbarrier_arrive");
}

void mbarrier_arrive_expect_tx(void* bar, unsigned bytes) {
  Block& b = block_of("mbarrier_arrive_expect_tx");
  const uint32_t offset = barrier_offset(b, bar, "mbarrier_arrive_expect_tx");
  b.mbarriers.at(offset).tx += bytes;
  arrive(b, offset, "mbarrier_arrive_expect_tx");
}

void mbarrier_wait(void* bar, unsigned parity) {
  Block& b = block_of("mbarrier_wait");
  Fiber& f = *b.current;
  const uint32_t offset = barrier_offset(b, bar, "mbarrier_wait");
  land_tma_copies(b, offset);
  for (;;) {
    if (aborted(b)) return;
    const MBarrier& m = b.mbarriers.at(offset);
    if ((m.completed & 1) != (parity & 1)) {  // the phase of that parity has completed
      f.mbarrier_seen[offset] = m.completed;
      return;
    }
    f.mbarrier_waited = offset;
    f.mbarrier_parity = parity & 1;
    park(b, f, FiberState::parked_mbarrier);
  }
}

std::string encode_tensor_map(TensorMap& map, const void* base, int rank, const uint64_t* dims,
                              const uint64_t* strides_bytes, const uint32_t* box, bool swizzle_128b) {
  constexpr unsigned kElementBytes = 2;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return "the tensor's address is not 16-byte aligned";
  if (rank < 1 || rank > 5) return "rank " + std::to_string(rank) + " is not in [1, 5]";
  for (int d = 0; d < rank; ++d) {
    if (dims[d] == 0 || dims[d] > (uint64_t(1) << 32))
      return "dim " + std::to_string(d) + " = " + std::to_string(dims[d]) + " is not in [1, 2^32]";
    if (box[d] == 0 || box[d] > 256)
      return "box dim " + std::to_string(d) + " = " + std::to_string(box[d]) + " is not in [1, 256]";
    if (d > 0 && (strides_bytes[d - 1] % 16 != 0 || strides_bytes[d - 1] >= (uint64_t(1) << 40)))
      return "the stride of dim " + std::to_string(d) + " (" + std::to_string(strides_bytes[d - 1]) +
             " bytes) is not a multiple of 16 below 2^40";
  }
  if (box[0] * kElementBytes % 16 != 0) return "the box's inner dim is not a multiple of 16 bytes";
  if (swizzle_128b && box[0] * kElementBytes > 128) return "the box's inner dim is over 128 bytes (128-byte swizzle)";
  map = TensorMap{};
  map.base = base;
  map.rank = rank;
  map.swizzle_128b = swizzle_128b;
  map.strides[0] = kElementBytes;
  for (int d = 0; d < rank; ++d) {
    map.dims[d] = dims[d];
    map.box[d] = box[d];
    if (d > 0) map.strides[d] = strides_bytes[d - 1];
  }
  return "";
}

void tma_load(void* shared_dst, const TensorMap& map, void* bar, const int32_t* coords) {
  Block& b = block_of("tma_load");
  const uint32_t bar_offset = barrier_offset(b, bar, "tma_load");
  if (map.rank == 0) throw std::runtime_error("tma_load: the tensor map was never encoded");
  const size_t element = map.strides[0];
  size_t elements = 1;
  for (int d = 0; d < map.rank; ++d) elements *= map.box[d];
  const size_t bytes = elements * element;
  check_aligned(b, shared_dst, map.swizzle_128b ? 1024 : 128, "tma_load", "destination");
  check_shared(b, shared_dst, bytes, "tma_load");
  const uint32_t dst = static_cast<uint32_t>(shared_offset(b, shared_dst));
  for (size_t chunk = dst / 16; chunk < (dst + bytes) / 16; ++chunk) {
    if (b.chunk_in_flight[chunk] != 0)
      throw std::runtime_error("tma_load into shared offset " + std::to_string(chunk * 16) +
                               " while an earlier copy into it has not landed");
    if (b.chunk_wgmma_reads[chunk] != 0)
      throw std::runtime_error("tma_load into shared offset " + std::to_string(chunk * 16) +
                               " that a wgmma not yet waited for (wgmma_wait) still reads");
  }
  for (const auto& barrier : b.mbarriers)
    if (barrier.first + 8 > dst && barrier.first < dst + bytes)
      throw std::runtime_error("tma_load into shared bytes [" + std::to_string(dst) + ", " +
                               std::to_string(dst + bytes) + ") that hold the mbarrier at offset " +
                               std::to_string(barrier.first));
  TmaCopy copy{dst, bar_offset, std::vector<unsigned char>(bytes)};
  uint32_t index[5] = {};  // the element's position in the box, dim 0 fastest
  for (size_t e = 0; e < elements; ++e) {
    size_t at = e * element;
    if (map.swizzle_128b) at ^= ((at >> 7) & 7) << 4;  // the 16-byte chunk XOR the row in the 1024-byte atom
    bool inside = true;
    size_t source = 0;
    for (int d = 0; d < map.rank; ++d) {
      const int64_t coordinate = int64_t(coords[d]) + index[d];
      inside = inside && coordinate >= 0 && uint64_t(coordinate) < map.dims[d];
      source += size_t(coordinate) * map.strides[d];
    }
    if (inside) std::memcpy(&copy.bytes[at], static_cast<const unsigned char*>(map.base) + source, element);
    for (int d = 0; d < map.rank && ++index[d] == map.box[d]; ++d) index[d] = 0;
  }
  for (size_t chunk = dst / 16; chunk < (dst + bytes) / 16; ++chunk) ++b.chunk_in_flight[chunk];
  b.tma_in_flight.push_back(std::move(copy));
}

namespace {

std::string thread_state(const Block& b, const Fiber& f) {
  std::ostringstream s;
  switch (f.state) {
    case FiberState::done:
      s << "finished (after " << f.block_calls << " sync_threads and " << f.warp_calls << " warp collectives)";
      break;
    case FiberState::parked_block:
      s << "waiting at sync_threads (call #" << f.block_calls << ")";
      break;
    case FiberState::parked_warp: {
      const Warp& w = b.warps[f.tid / 32];
      s << "waiting at " << op_name(w.op, w.trans, w.type) << " in warp " << f.tid / 32 << " (warp collective #"
        << f.warp_calls << ")";
      break;
    }
    case FiberState::parked_mbarrier: {
      const MBarrier& m = b.mbarriers.at(f.mbarrier_waited);
      s << "waiting at the mbarrier at shared offset " << f.mbarrier_waited << " for its phase of parity "
        << f.mbarrier_parity << " (" << m.completed << " phases completed; " << m.pending << " of " << m.expected
        << " arrivals and " << m.tx << " transaction bytes missing)";
      break;
    }
    case FiberState::parked_named: {
      const NamedBarrier& nb = b.named[f.named_waited];
      s << "waiting at named barrier " << f.named_waited << " (" << nb.arrived << " of " << nb.expected
        << " threads arrived)";
      break;
    }
    case FiberState::parked_registers: {
      const WarpGroupRegisters& g = b.warp_group_registers[f.tid / 128];
      s << "waiting at setmaxnreg in warpgroup " << f.tid / 128 << " (" << g.arrived << " of 128 threads arrived; "
        << g.current << " registers per thread, " << (g.increase ? "inc" : "dec") << " to " << g.count
        << " asked; " << b.free_registers << " free in the block's pool)";
      break;
    }
    case FiberState::ready:
      s << "ready to run";
      break;
  }
  return s.str();
}

// Lists `ids` grouped by their description: "threads 0-3, 9 finished (...); thread 5 waits at ...".
std::string describe(const Block& b, const std::vector<unsigned>& ids, const char* noun) {
  std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
  for (unsigned id : ids) {
    const Fiber& f = b.fibers[id];
    std::string st = thread_state(b, f);
    bool found = false;
    for (auto& g : groups)
      if (g.first == st) {
        g.second.push_back(id);
        found = true;
        break;
      }
    if (!found) groups.push_back({st, {id}});
  }
  std::ostringstream s;
  for (size_t i = 0; i < groups.size(); ++i) {
    if (i) s << "; ";
    s << noun << (groups[i].second.size() > 1 ? "s " : " ") << ranges(groups[i].second) << ": " << groups[i].first;
  }
  return s.str();
}

std::string deadlock_message(const Block& b) {
  std::ostringstream s;
  s << "pk_emu::launch: deadlock in block " << dim3_str(b.idx) << " of grid " << dim3_str(b.grid) << ", " << b.nthreads
    << " threads: every unfinished thread waits at a barrier that can no longer complete.";
  if (b.block_arrived > 0) {
    std::vector<unsigned> waiting, missing;
    uint64_t call = 0;
    for (const Fiber& f : b.fibers) {
      if (f.state == FiberState::parked_block) {
        waiting.push_back(f.tid);
        call = f.block_calls;
      } else {
        missing.push_back(f.tid);
      }
    }
    s << "\n  sync_threads: " << b.block_arrived << " of " << b.nthreads << " threads wait there (threads "
      << ranges(waiting) << ", at their call #" << call << "); never arriving: " << describe(b, missing, "thread");
  }
  std::vector<unsigned> barrier_waiters;
  for (const Fiber& f : b.fibers)
    if (f.state == FiberState::parked_mbarrier) barrier_waiters.push_back(f.tid);
  if (!barrier_waiters.empty()) s << "\n  mbarriers: " << describe(b, barrier_waiters, "thread");
  std::vector<unsigned> named_waiters;
  for (const Fiber& f : b.fibers)
    if (f.state == FiberState::parked_named) named_waiters.push_back(f.tid);
  if (!named_waiters.empty()) s << "\n  named barriers: " << describe(b, named_waiters, "thread");
  std::vector<unsigned> register_waiters;
  for (const Fiber& f : b.fibers)
    if (f.state == FiberState::parked_registers) register_waiters.push_back(f.tid);
  if (!register_waiters.empty()) s << "\n  setmaxnreg: " << describe(b, register_waiters, "thread");
  for (size_t wi = 0; wi < b.warps.size(); ++wi) {
    const Warp& w = b.warps[wi];
    if (w.arrived == 0) continue;
    std::vector<unsigned> waiting, missing;
    uint64_t call = 0;
    for (unsigned l = 0; l < 32; ++l) {
      const Fiber& f = b.fibers[wi * 32 + l];
      if (f.state == FiberState::parked_warp) {
        waiting.push_back(l);
        call = f.warp_calls;
      } else {
        missing.push_back(f.tid);
      }
    }
    s << "\n  warp " << wi << ": lanes " << ranges(waiting) << " wait at " << op_name(w.op, w.trans, w.type)
      << " (their warp collective #" << call << "); never arriving: " << describe(b, missing, "thread");
  }
  return s.str();
}

struct SharedBuffer {
  std::unique_ptr<char[]> storage;
  size_t capacity = 0;
  // returns a 1024-byte aligned pointer (the 128-byte swizzle atoms of wgmma operands are aligned to their start,
  // as on a GPU, where the dynamic shared memory starts 1024-byte aligned) with kCanaryBytes of room on both sides
  char* ensure(size_t bytes) {
    const size_t need = bytes + 2 * kCanaryBytes + 1024;
    if (need > capacity) {
      storage.reset(new char[need]);
      capacity = need;
    }
    uintptr_t p = reinterpret_cast<uintptr_t>(storage.get()) + kCanaryBytes;
    p = (p + 1023) & ~uintptr_t(1023);
    return reinterpret_cast<char*>(p);
  }
};

thread_local SharedBuffer t_shared;

// Under AddressSanitizer the canary bytes around the shared buffer are also poisoned while the block's threads run,
// so that a plain load or store there is reported at once (with its stack), not only a store when the block ends.
void poison_canaries(const Block& b, bool poison) {
#ifdef PK_EMU_ASAN
  char* below = b.smem - kCanaryBytes;
  char* above = b.smem + b.smem_bytes;
  if (poison) {
    __asan_poison_memory_region(below, kCanaryBytes);
    __asan_poison_memory_region(above, kCanaryBytes);
  } else {
    __asan_unpoison_memory_region(below, kCanaryBytes);
    __asan_unpoison_memory_region(above, kCanaryBytes);
  }
#else
  (void)b, (void)poison;
#endif
}

// $PK_EMU_SCHEDULE, read at each launch: the order in which a block's threads start and are woken from barriers.
// "forward" (default): thread 0 first; "reverse": the last thread first; "random" or "random:<seed>": a permutation
// drawn per block. These interleave the warps collective by collective (lockstep). "greedy" and "greedy-reverse"
// instead always run the first (last) thread that can run, so one warp runs ahead until it blocks in
// sync_threads: a shared tile overwritten while another warp still reads it (a missing sync_threads) shows up.
// Running a kernel's tests under several orders exposes more missing-barrier races.
struct Schedule {
  enum Kind { forward, reverse, random } kind = forward;
  bool greedy = false;
  uint64_t seed = 0;
};

Schedule read_schedule() {
  Schedule s;
  const char* env = std::getenv("PK_EMU_SCHEDULE");
  if (!env || !*env || std::strcmp(env, "forward") == 0) return s;
  if (std::strcmp(env, "reverse") == 0) {
    s.kind = Schedule::reverse;
  } else if (std::strcmp(env, "greedy") == 0) {
    s.greedy = true;
  } else if (std::strcmp(env, "greedy-reverse") == 0) {
    s.kind = Schedule::reverse;
    s.greedy = true;
  } else if (std::strncmp(env, "random", 6) == 0 && (env[6] == 0 || env[6] == ':')) {
    s.kind = Schedule::random;
    if (env[6] == ':') s.seed = std::strtoull(env + 7, nullptr, 10);
  } else {
    throw std::runtime_error(std::string("pk_emu::launch: PK_EMU_SCHEDULE=") + env +
                             " is not one of forward, reverse, random, random:<seed>, greedy, greedy-reverse");
  }
  return s;
}

void set_order(Block& b, const Schedule& schedule, uint64_t block_linear) {
  for (unsigned t = 0; t < b.nthreads; ++t) b.order[t] = t;
  if (schedule.kind == Schedule::reverse) {
    std::reverse(b.order.begin(), b.order.end());
  } else if (schedule.kind == Schedule::random) {
    std::mt19937_64 rng(schedule.seed * 0x9E3779B97F4A7C15ull + block_linear);
    std::shuffle(b.order.begin(), b.order.end(), rng);
  }
  std::vector<unsigned> filled(b.warp_order.size(), 0);
  for (unsigned t : b.order) b.warp_order[t / 32][filled[t / 32]++] = t % 32;
  b.greedy = schedule.greedy;
  b.rank.resize(b.nthreads);
  for (unsigned i = 0; i < b.nthreads; ++i) b.rank[b.order[i]] = i;
}

struct ClearBlock {
  ~ClearBlock() { t_block = nullptr; }
};

void abort_all(Block& b) {
  b.aborting = true;
  for (Fiber& f : b.fibers) {
    if (f.started && f.state != FiberState::done) switch_to(b, b.main_ctx, &b.main_asan_fake_stack, &f);
  }
}

}  // namespace

namespace {
// $name as a count in 1..most (`unit` names it in the error), or `fallback` where it is unset.
unsigned long count_from_env(const char* name, unsigned long fallback, unsigned long most, const char* unit) {
  const char* env = std::getenv(name);
  if (!env) return fallback;
  char* end = nullptr;
  const unsigned long count = std::strtoul(env, &end, 10);
  if (end == env || *end != '\0' || count == 0 || count > most) {
    throw std::runtime_error(std::string("pk_emu: $") + name + "=" + env + " is not a count of " + unit + " in 1-" +
                             std::to_string(most));
  }
  return count;
}

size_t kib_from_env(const char* name, size_t fallback_kib) {
  return count_from_env(name, fallback_kib, 1ul << 20, "KiB") * 1024;
}
}  // namespace

size_t max_shared_bytes_optin() { return kib_from_env("PK_EMU_MAX_SHARED_KIB", 227); }

unsigned max_grid_yz() { return static_cast<unsigned>(count_from_env("PK_EMU_MAX_GRID_Y", 65535, 65535, "blocks")); }

size_t shared_bytes_per_sm() { return kib_from_env("PK_EMU_SHARED_PER_SM_KIB", 228); }

namespace {
// kernel -> bytes allowed by allow_shared_bytes: process-wide, like the attribute on a GPU.
std::mutex g_shared_optin_mutex;
std::map<const void*, size_t> g_shared_optin;

bool shared_opted_in(const void* kernel, size_t bytes) {
  const std::lock_guard<std::mutex> lock(g_shared_optin_mutex);
  const auto allowed = g_shared_optin.find(kernel);
  return allowed != g_shared_optin.end() && allowed->second >= bytes;
}
}  // namespace

void allow_shared_bytes(const void* kernel, size_t bytes) {
  if (bytes > max_shared_bytes_optin()) {
    throw std::runtime_error("pk_emu::allow_shared_bytes: " + std::to_string(bytes) +
                             " bytes of dynamic shared memory is more than this device allows per block (" +
                             std::to_string(max_shared_bytes_optin()) + ")");
  }
  const std::lock_guard<std::mutex> lock(g_shared_optin_mutex);
  g_shared_optin[kernel] = bytes;
}

void launch(Dim3 grid, unsigned threads_per_block, size_t shared_bytes, const std::function<void()>& thread_body,
            const void* kernel) {
  if (t_block) throw std::logic_error("pk_emu::launch: called from inside a launched thread");
  if (threads_per_block == 0 || threads_per_block % 32 != 0 || threads_per_block > 1024) {
    throw std::runtime_error("pk_emu::launch: threads_per_block must be a multiple of 32 in [32, 1024], got " +
                                std::to_string(threads_per_block));
  }
  const unsigned max_yz = max_grid_yz();
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > max_yz || grid.z > max_yz) {
    throw std::runtime_error("pk_emu::launch: invalid grid " + dim3_str(grid) + " (each dimension >= 1; y, z <= " +
                             std::to_string(max_yz) + "; x < 2^31)");
  }
  const size_t max_shared = max_shared_bytes_optin();
  if (shared_bytes > max_shared) {
    throw std::runtime_error("pk_emu::launch: " + std::to_string(shared_bytes) +
                                " bytes of dynamic shared memory is more than a block can have (" +
                                std::to_string(max_shared) + ")");
  }
  if (kernel && shared_bytes > 48 * 1024) {
    if (!shared_opted_in(kernel, shared_bytes)) {
      throw std::runtime_error("pk_emu::launch: " + std::to_string(shared_bytes) +
                               " bytes of dynamic shared memory without the opt-in for that much (a GPU refuses "
                               "more than 48 KiB unless cudaFuncSetAttribute(MaxDynamicSharedMemorySize) came first: "
                               "allow_shared_bytes)");
    }
  }
  if (!thread_body) throw std::runtime_error("pk_emu::launch: empty thread_body");
  for (uint64_t seen = g_largest_launch_bytes.load(); shared_bytes > seen;) {
    if (g_largest_launch_bytes.compare_exchange_weak(seen, shared_bytes)) break;
  }
  g_blocks_launched += uint64_t{grid.x} * grid.y * grid.z;
  const Schedule schedule = read_schedule();

  t_stacks.reserve(threads_per_block);
  auto block = std::make_unique<Block>();
  Block& b = *block;
  b.grid = grid;
  b.nthreads = threads_per_block;
  b.smem_bytes = shared_bytes;
  b.smem = t_shared.ensure(shared_bytes);
  b.body = &thread_body;
  b.fibers.resize(threads_per_block);
  b.warps.resize(threads_per_block / 32);
  b.order.resize(threads_per_block);
  b.warp_order.resize(threads_per_block / 32);
  size_t queue_size = 1;
  while (queue_size < threads_per_block) queue_size *= 2;
  b.queue.resize(queue_size);
  ClearBlock clear;
  t_block = &b;
#ifdef PK_EMU_ASAN
  {
    pthread_attr_t attr;
    void* addr = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &addr, &size);
      pthread_attr_destroy(&attr);
    }
    b.main_stack_bottom = addr;
    b.main_stack_size = size;
  }
#endif

  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        b.idx = Dim3{x, y, z};
        std::memset(b.smem, 0xFF, shared_bytes);
        b.chunk_in_flight.assign((shared_bytes + 15) / 16, 0);
        b.chunk_landed_epoch.assign((shared_bytes + 15) / 16, -1);
        b.chunk_landed_by.assign((shared_bytes + 15) / 16, 0);
        b.chunk_landed_proxy.assign((shared_bytes + 15) / 16, 0);
        b.chunk_wgmma_reads.assign((shared_bytes + 15) / 16, 0);
        b.chunk_tma_barrier.assign((shared_bytes + 15) / 16, -1);
        b.chunk_tma_phase.assign((shared_bytes + 15) / 16, 0);
        b.mbarriers.clear();
        b.tma_in_flight.clear();
        for (NamedBarrier& nb : b.named) nb = NamedBarrier{};
        b.warp_group_registers.assign((threads_per_block + 127) / 128, WarpGroupRegisters{});
        for (WarpGroupRegisters& g : b.warp_group_registers)
          g.current = std::min(256u, 65536u / threads_per_block / 8 * 8);
        b.free_registers = 0;
        for (size_t i = 0; i < kCanaryBytes; ++i) {
          b.smem[-1 - static_cast<ptrdiff_t>(i)] = static_cast<char>(canary_byte(i));
          b.smem[shared_bytes + i] = static_cast<char>(canary_byte(i));
        }
        b.queue_head = b.queue_count = 0;
        set_order(b, schedule, (uint64_t(z) * grid.y + y) * grid.x + x);
        for (unsigned t : b.order) {
          Fiber& f = b.fibers[t];
          f.tid = t;
          f.state = FiberState::ready;
          f.started = false;
          f.warp_calls = f.block_calls = 0;
          f.in_flight.clear();
          f.groups_committed = 0;
          f.wgmma_pending.clear();
          f.wgmma_groups_committed = 0;
          f.wgmma_fenced = false;
          f.proxy_fences = 0;
          f.mbarrier_seen.clear();
          b.push(&f);
        }
        for (Warp& w : b.warps) {
          w.arrived = 0;
          w.generation = 0;
          w.wgmma_issued = w.wgmma_signature = 0;
        }
        b.block_arrived = 0;
        b.live = threads_per_block;
        b.aborting = b.failed = false;

        poison_canaries(b, true);
        {
          struct Unpoison {
            const Block& b;
            ~Unpoison() { poison_canaries(b, false); }
          } unpoison{b};
          switch_to(b, b.main_ctx, &b.main_asan_fake_stack, b.pop());  // returns when no fiber can run any more
        }

        if (b.failed) {
          std::string error = b.error;
          abort_all(b);
          throw std::runtime_error(error);
        }
        if (b.live > 0) {
          std::string error = deadlock_message(b);
          abort_all(b);
          throw std::runtime_error(error);
        }
        for (unsigned id = 1; id < kNamedBarriers; ++id)
          if (b.named[id].arrived != 0)
            throw std::runtime_error("pk_emu::launch: block " + dim3_str(b.idx) + ": named barrier " +
                                     std::to_string(id) + " ended with " + std::to_string(b.named[id].arrived) +
                                     " of " + std::to_string(b.named[id].expected) + " threads arrived (its " +
                                     "arrivals and waits do not pair up)");
        if (!b.tma_in_flight.empty())
          throw std::runtime_error("pk_emu::launch: block " + dim3_str(b.idx) + ": " +
                                   std::to_string(b.tma_in_flight.size()) + " TMA copies (tma_load) never landed: " +
                                   "no thread waited on their mbarrier before the block ended");
        for (size_t g = 0; g + 4 <= b.warps.size(); g += 4) {  // wgmma is a warpgroup instruction
          for (size_t w = g + 1; w < g + 4; ++w)
            if (b.warps[w].wgmma_issued != b.warps[g].wgmma_issued ||
                b.warps[w].wgmma_signature != b.warps[g].wgmma_signature)
              throw std::runtime_error("pk_emu::launch: block " + dim3_str(b.idx) + ": warps " + std::to_string(g) +
                                       "-" + std::to_string(g + 3) + " (a warpgroup) issued different wgmma " +
                                       "sequences (warp " + std::to_string(g) + ": " +
                                       std::to_string(b.warps[g].wgmma_issued) + ", warp " + std::to_string(w) +
                                       ": " + std::to_string(b.warps[w].wgmma_issued) + " wgmmas)");
        }
        for (size_t i = 0; i < kCanaryBytes; ++i) {
          if (static_cast<unsigned char>(b.smem[-1 - static_cast<ptrdiff_t>(i)]) != canary_byte(i)) {
            throw std::runtime_error("pk_emu::launch: block " + dim3_str(b.idx) +
                                     ": shared memory was written before its start (at byte offset -" +
                                     std::to_string(i + 1) + ")");
          }
        }
        for (size_t i = 0; i < kCanaryBytes; ++i) {
          if (static_cast<unsigned char>(b.smem[shared_bytes + i]) != canary_byte(i)) {
            throw std::runtime_error("pk_emu::launch: block " + dim3_str(b.idx) + ": shared memory was written past its " +
                                     std::to_string(shared_bytes) + " bytes (at byte offset " +
                                     std::to_string(shared_bytes + i) + ")");
          }
        }
      }
    }
  }
}

}  // namespace pk_emu

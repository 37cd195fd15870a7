"""A CPU stand-in for CuPy and a GPU, so that CI runs distffn's GPU code on every commit.

Two parts:

- **The kernels.** Each registered CUDA C source (``distffn.cuda``) is compiled by the host's
  C++ compiler with a prelude that defines CUDA's built-ins (``threadIdx``, ``__shared__``,
  ``__syncthreads`` ...). A launch runs the blocks one after another and the threads of a
  block one after another; in kernels that reach ``__syncthreads`` every thread is a fiber
  (``ucontext``) that yields at the barrier, so each barrier is a real one. float32
  arithmetic is the host's IEEE arithmetic without contraction (``-ffp-contract=off``, as
  ``--fmad=false``), with subnormals flushed while a kernel runs when the options say
  ``-ftz=true`` (as CuPy's do). A barrier some threads never reach, an invalid launch
  configuration or an argument whose type does not match the kernel's parameter is an error.
  Built libraries are cached by a hash of the source and prelude.

- **A fake ``cupy`` module** backed by NumPy. Its :class:`ndarray` is not a NumPy array: as
  with CuPy, ``np.asarray`` of it raises, mixing it with host arrays raises, ``get``/``set``
  check shape and dtype, ``a[...] = host_array`` is refused. Work on the device is
  asynchronous as on a GPU: kernel launches and copies from page-locked host memory queue on
  the (single, in-order) device, and run when the host waits for them (``get``, a stream's or
  an event's ``synchronize``, or any other operation on a device array, which runs in order
  after them). So a page-locked buffer rewritten before its copy ran shows up as a wrong
  value, as it would on a GPU. Stream capture records kernel launches into a graph that
  ``launch`` replays; anything else during capture is refused.

:func:`installed` puts the fake in ``sys.modules`` and takes it out again.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------- the kernels

PRELUDE = r"""
// CUDA built-ins for host C++ (tests/cuda_emulator.py)
#include <cmath>
#include <cstdint>
#include <cstring>
#include <chrono>
#include <functional>
#include <mutex>
#include <vector>
#include <ucontext.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
using std::exp; using std::log; using std::sqrt;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
typedef dim3 uint3;
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
static constexpr int warpSize = 32;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline long long clock64() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

namespace emu {
enum Status { OK = 0, BARRIER_OUTSIDE_FIBERS = 1, DIVERGENT_BARRIER = 2, BAD_CONFIG = 3 };
static std::mutex lock;                 // one launch at a time: __shared__ is static
static int status = OK;
static bool fibers = false;
static const std::function<void()>* body = nullptr;
static std::vector<char> finished;
static std::vector<char> stacks;
static unsigned current = 0;
static constexpr size_t STACK = 64 * 1024;

static void set_thread(unsigned t) {
    threadIdx = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
}

#if defined(__x86_64__)
// A fiber switch without a system call (swapcontext saves the signal mask with one, which
// made a barrier ~20x dearer): the callee-saved registers, MXCSR and the x87 control word
// pushed on the old stack, popped from the new one.
extern "C" void emu_switch(void** save_sp, void* new_sp);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
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
    .size emu_switch, .-emu_switch
)");
static std::vector<void*> sp;           // each fiber's saved stack pointer
static void* scheduler_sp;

static void to_scheduler() { emu_switch(&sp[current], scheduler_sp); }
static void to_fiber(unsigned t) { emu_switch(&scheduler_sp, sp[t]); }

[[noreturn]] static void fiber_main() {
    (*body)();
    finished[current] = 1;
    to_scheduler();
    __builtin_unreachable();
}

static void make_fiber(unsigned t) {
    uintptr_t top = (uintptr_t)(stacks.data() + (t + 1) * STACK) & ~(uintptr_t)15;
    uint64_t* s = (uint64_t*)top;
    *--s = 0;                                   // fiber_main's return address: never used
    *--s = (uint64_t)(uintptr_t)&fiber_main;    // where emu_switch's ret goes
    for (int r = 0; r < 6; ++r) *--s = 0;       // rbp rbx r12 r13 r14 r15
    unsigned csr = 0; unsigned short cw = 0;
    asm volatile("stmxcsr %0" : "=m"(csr));
    asm volatile("fnstcw %0" : "=m"(cw));
    --s;
    std::memcpy(s, &csr, 4);
    std::memcpy((char*)s + 4, &cw, 2);
    sp[t] = s;
}
#else
static std::vector<ucontext_t> ctx;
static ucontext_t scheduler;
static void to_scheduler() { swapcontext(&ctx[current], &scheduler); }
static void to_fiber(unsigned t) { swapcontext(&scheduler, &ctx[t]); }
static void fiber_main() { (*body)(); finished[current] = 1; }     // then back to uc_link
static void make_fiber(unsigned t) {
    getcontext(&ctx[t]);
    ctx[t].uc_stack.ss_sp = stacks.data() + t * STACK;
    ctx[t].uc_stack.ss_size = STACK;
    ctx[t].uc_link = &scheduler;
    makecontext(&ctx[t], fiber_main, 0);
}
#endif

// __syncthreads: back to the scheduler, which resumes this fiber once all have arrived
static void barrier() {
    if (!fibers) { status = BARRIER_OUTSIDE_FIBERS; return; }
    to_scheduler();
}

static void run_block_as_fibers(unsigned n) {
    if (stacks.size() < n * STACK) stacks.resize(n * STACK);
#if defined(__x86_64__)
    sp.resize(n);
#else
    ctx.resize(n);
#endif
    finished.assign(n, 0);
    for (unsigned t = 0; t < n; ++t) make_fiber(t);
    for (;;) {                           // one round: every live thread to its next barrier or its end
        for (unsigned t = 0; t < n; ++t) {
            if (finished[t]) continue;
            current = t;
            set_thread(t);
            to_fiber(t);
        }
        unsigned done = 0;
        for (unsigned t = 0; t < n; ++t) done += finished[t];
        if (done == n) return;
        if (done != 0) { status = DIVERGENT_BARRIER; return; }   // some exited, some wait
    }
}

static int launch(const std::function<void()>& f, unsigned gx, unsigned gy, unsigned gz,
                  unsigned bx, unsigned by, unsigned bz, bool use_fibers, bool ftz) {
    std::lock_guard<std::mutex> guard(lock);
    const unsigned long long n = 1ULL * bx * by * bz;
    if (n == 0 || n > 1024 || bz > 64 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535)
        return BAD_CONFIG;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    status = OK;
    fibers = use_fibers;
    body = &f;
#if defined(__SSE__)
    const unsigned csr = _mm_getcsr();
    if (ftz) _mm_setcsr(csr | 0x8040);   // flush-to-zero and denormals-are-zero, as -ftz=true
#endif
    for (unsigned z = 0; z < gz && status == OK; ++z)
        for (unsigned y = 0; y < gy && status == OK; ++y)
            for (unsigned x = 0; x < gx && status == OK; ++x) {
                blockIdx = {x, y, z};
                if (use_fibers) {
                    run_block_as_fibers((unsigned)n);
                } else {
                    for (unsigned t = 0; t < n && status == OK; ++t) { set_thread(t); f(); }
                }
            }
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
    return status;
}
}  // namespace emu

inline void __syncthreads() { emu::barrier(); }
"""

STATUS = {1: "__syncthreads reached in a kernel the emulator judged barrier-free (a bug in its analysis)",
          2: "__syncthreads not reached by every thread of a block (some threads exited first)",
          3: "invalid launch configuration (block of 1..1024 threads, z ≤ 64; grid y, z ≤ 65535)"}

# C parameter types -> (ctypes type, NumPy dtype); pointers take a device array of the dtype
SCALARS = {
    "bool": (ctypes.c_bool, np.bool_), "char": (ctypes.c_char, np.int8),
    "signed char": (ctypes.c_byte, np.int8), "unsigned char": (ctypes.c_ubyte, np.uint8),
    "short": (ctypes.c_short, np.int16), "unsigned short": (ctypes.c_ushort, np.uint16),
    "int": (ctypes.c_int, np.int32), "unsigned int": (ctypes.c_uint, np.uint32),
    "unsigned": (ctypes.c_uint, np.uint32),
    "long": (ctypes.c_long, np.int64), "unsigned long": (ctypes.c_ulong, np.uint64),
    "long long": (ctypes.c_longlong, np.int64), "unsigned long long": (ctypes.c_ulonglong, np.uint64),
    "float": (ctypes.c_float, np.float32), "double": (ctypes.c_double, np.float64),
    "int64_t": (ctypes.c_int64, np.int64), "int32_t": (ctypes.c_int32, np.int32),
    "uint8_t": (ctypes.c_uint8, np.uint8), "size_t": (ctypes.c_size_t, np.uint64),
}
# kernel name -> launches run so far (a test can check that the GPU path really ran)
LAUNCHES: collections.Counter = collections.Counter()
# Python scalars CuPy passes as is: int as a 64-bit integer, float as double, bool as bool
PYTHON_SCALARS = {int: np.int64, float: np.float64, bool: np.bool_}


class EmulatorUnavailable(RuntimeError):
    """No C++ compiler to build the emulated kernels with."""


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its name, and its C type (``pointer``: the pointee's)."""

    name: str
    ctype: str
    pointer: bool

    @property
    def dtype(self):
        return None if self.ctype == "void" else np.dtype(SCALARS[self.ctype][1])


def _params(text: str) -> list[Param]:
    out = []
    for p in (p.strip() for p in text.replace("\n", " ").split(",")):
        if not p or p == "void":
            continue
        name = re.findall(r"(\w+)\s*$", p)[0]
        words = re.sub(r"\b(const|volatile|__restrict__|__restrict|restrict)\b", " ", p[:-len(name)])
        pointer = "*" in words
        ctype = " ".join(words.replace("*", " ").split())
        if ctype not in SCALARS and not (pointer and ctype == "void"):
            raise ValueError(f"the emulator does not know the C type {ctype!r} (parameter {name!r})")
        out.append(Param(name, ctype, pointer))
    return out


def _functions(code: str) -> dict[str, tuple[str, str, str]]:
    """``name -> (qualifiers, parameter text, body)`` of every ``__global__``/``__device__``
    function defined in ``code`` (bodies found by matching braces)."""
    found = {}
    for m in re.finditer(r"((?:__global__|__device__)[\w\s\*]*?)\b(\w+)\s*\(([^)]*)\)\s*\{", code):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        found[m.group(2)] = (m.group(1), m.group(3), code[m.end():i - 1])
    return found


def _barrier_functions(funcs: dict) -> set[str]:
    """The functions that reach ``__syncthreads``, directly or through those they call."""
    calls = {name: set(re.findall(r"\b(\w+)\s*\(", body)) & funcs.keys() for name, (_, _, body) in funcs.items()}
    reach = {name for name, (_, _, body) in funcs.items() if "__syncthreads" in body}
    while True:
        more = {name for name, called in calls.items() if called & reach} - reach
        if not more:
            return reach
        reach |= more


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``g++`` on the PATH, else /usr/bin/g++."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or "/usr/bin/g++"
    if not (shutil.which(cxx) or os.access(cxx, os.X_OK)):
        raise EmulatorUnavailable(f"the CUDA emulator (tests/cuda_emulator.py) needs a C++17 compiler to build "
                                  f"the kernels, and {cxx!r} is not there: install g++ (apt-get install g++) "
                                  f"or set $CXX")
    return cxx


def default_cache_dir() -> str:
    """Where built libraries are kept: ``$XDG_CACHE_HOME/distffn-cuda-emulator`` (or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distffn-cuda-emulator")


class Library:
    """One CUDA source built for the host: its kernels as :class:`Kernel` objects."""

    def __init__(self, code: str, name: str, options=(), cache_dir: str | None = None):
        funcs = _functions(code)
        barriers = _barrier_functions(funcs)
        self.kernels = {k: _params(p) for k, (quals, p, _) in funcs.items() if "__global__" in quals}
        # the last -ftz option wins (CuPy appends its own -ftz=true after the source's)
        ftz = [o for o in options if o.startswith(("-ftz=", "--ftz="))]
        self.ftz = bool(ftz) and ftz[-1].endswith("true")
        wrappers = []
        for k, params in self.kernels.items():
            decl = ", ".join(funcs[k][1].replace("\n", " ").split(","))
            args = ", ".join(p.name for p in params)
            sep = ", " if params else ""
            wrappers.append(
                f'extern "C" int emu_launch_{k}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                f'unsigned by, unsigned bz, int ftz{sep}{decl}) {{\n'
                f'    const std::function<void()> f = [=]() {{ {k}({args}); }};\n'
                f'    return emu::launch(f, gx, gy, gz, bx, by, bz, {str(k in barriers).lower()}, ftz != 0);\n}}')
        source = PRELUDE + "\n#line 1 \"" + name + ".cu\"\n" + code + "\n" + "\n".join(wrappers) + "\n"
        self.path = _build(source, name, cache_dir or default_cache_dir())
        self._lib = ctypes.CDLL(self.path)
        self.barrier_kernels = barriers & self.kernels.keys()

    def function(self, entry: str) -> "Kernel":
        if entry not in self.kernels:
            raise KeyError(f"no kernel {entry!r} in this source (it has {sorted(self.kernels)})")
        fn = getattr(self._lib, f"emu_launch_{entry}")
        params = self.kernels[entry]
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_int] + [
            ctypes.c_void_p if p.pointer else SCALARS[p.ctype][0] for p in params]
        fn.restype = ctypes.c_int
        return Kernel(entry, fn, params, self.ftz)


def _build(source: str, name: str, cache_dir: str) -> str:
    """The shared library of ``source``, compiled once per distinct source (cached by hash)."""
    cxx = compiler()
    flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-w"]
    digest = hashlib.sha256("\0".join([source, cxx, *flags]).encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    so = os.path.join(cache_dir, f"{name}-{digest}.so")
    if os.path.exists(so):
        return so
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cpp, out = os.path.join(tmp, f"{name}.cpp"), os.path.join(tmp, f"{name}.so")
        with open(cpp, "w") as f:
            f.write(source)
        r = subprocess.run([cxx, *flags, cpp, "-o", out], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"the emulator could not compile CUDA source {name!r} as C++:\n{r.stderr[-4000:]}")
        os.replace(out, so)      # atomic: a concurrent build of the same source is harmless
    return so


def _dim3(v) -> tuple[int, int, int]:
    v = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(v) <= 3:
        raise ValueError(f"grid/block must have 1 to 3 dimensions, got {v}")
    return tuple(int(x) for x in v) + (1,) * (3 - len(v))


class Kernel:
    """An emulated ``cupy.RawKernel``: ``kernel(grid, block, args, shared_mem=0, stream=None)``.

    Arguments are checked as the CUDA source declares them: device arrays of the pointee's
    dtype for pointers, NumPy scalars of the exact type (or the Python scalars CuPy maps to
    64-bit types) for values. The launch queues on the device (see the module docstring)."""

    def __init__(self, name, fn, params, ftz):
        self.name, self._fn, self.params, self.ftz = name, fn, params, ftz

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, **_):
        g, b = _dim3(grid), _dim3(block)
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name}: {len(args)} arguments for {len(self.params)} parameters "
                            f"({', '.join(p.name for p in self.params)})")
        for p, a in zip(self.params, args):
            self._check(p, a)
        _DEVICE.submit(_Launch(self, g, b, args), stream)

    def _check(self, p: Param, a):
        where = f"kernel {self.name}, parameter {p.name} ({p.ctype}{'*' if p.pointer else ''})"
        if p.pointer:
            if isinstance(a, np.ndarray):
                raise TypeError(f"{where}: Unsupported type {type(a)} (a host array; CuPy takes device arrays)")
            if not isinstance(a, ndarray):
                raise TypeError(f"{where}: expected a device array, got {type(a).__name__}")
            if p.dtype is not None and a.dtype != p.dtype:
                raise TypeError(f"{where}: a {a.dtype} array where the kernel reads {p.dtype}")
            return
        want = p.dtype
        if isinstance(a, np.generic):
            ok = a.dtype == want
        else:
            ok = type(a) in PYTHON_SCALARS and np.dtype(PYTHON_SCALARS[type(a)]) == want
        if not ok:
            got = a.dtype if isinstance(a, np.generic) else type(a).__name__
            raise TypeError(f"{where}: got {got}, expected a NumPy {want} scalar (CuPy passes the bytes as "
                            f"they are: a mismatched type is read wrongly)")

    def run(self, g, b, args):
        conv = [a._a.ctypes.data if isinstance(a, ndarray) else (a.item() if isinstance(a, np.generic) else a)
                for a in args]
        status = self._fn(*g, *b, int(self.ftz), *conv)
        LAUNCHES[self.name] += 1
        if status:
            raise RuntimeError(f"kernel {self.name} (grid {g}, block {b}): {STATUS.get(status, status)}")


# ---------------------------------------------------------------------------- the device

@dataclass
class _Launch:
    kernel: Kernel
    grid: tuple
    block: tuple
    args: tuple

    def __call__(self):
        self.kernel.run(self.grid, self.block, self.args)


class _Device:
    """The GPU's work queue: one in-order queue for every stream (a simplification: real
    streams may overlap), run when the host waits."""

    def __init__(self):
        self.pending: list = []
        self.capturing = None            # the Stream capturing, if any

    def submit(self, op, stream=None):
        stream = stream or _STATE.current_stream
        if self.capturing is not None:
            if stream is not self.capturing:
                raise RuntimeError("emulator: a launch on another stream while a stream captures")
            self.capturing._graph_ops.append(op)
            return
        self.pending.append(op)

    def flush(self):
        """Run everything queued (the host waits for the device)."""
        while self.pending:
            ops, self.pending = self.pending, []
            for op in ops:
                op()

    def sync_for_host_op(self, what: str = "this operation"):
        """Before an operation the fake runs at once: the queue first (device order), and no
        capture in progress (the emulator captures kernel launches only)."""
        if self.capturing is not None:
            raise RuntimeError(f"emulator: {what} while a stream captures a CUDA graph (the emulator "
                               f"records only RawKernel launches in a graph)")
        self.flush()


_DEVICE = _Device()


class _State:
    """What the fake keeps per process: the current stream and device, the allocator."""

    def __init__(self):
        self.current_stream = None
        self.device = 0
        self.allocator = None
        self.tf32 = False


_STATE = _State()


def _allocate(nbytes: int):
    # every new device array asks the allocator (cuda_graph's capture swaps in one that refuses)
    if _STATE.allocator is not None:
        _STATE.allocator(int(nbytes))


# ---------------------------------------------------------------------------- device arrays

def _is_pinned(a: np.ndarray) -> bool:
    """Whether ``a`` lives in memory from ``cuda.alloc_pinned_memory``."""
    b = a
    while isinstance(b, np.ndarray):
        b = b.base
    if isinstance(b, memoryview):
        b = b.obj
    return isinstance(b, PinnedMemory)


def _unwrap(x):
    """Device arrays to their NumPy storage; host arrays refused, as CuPy refuses them."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x, new: bool = True):
    """NumPy results as device arrays (scalars as 0-d arrays, as CuPy returns them)."""
    if isinstance(x, np.ndarray):
        if new and x.base is None:
            _allocate(x.nbytes)
        return ndarray._of(x)
    if isinstance(x, np.generic):
        return ndarray._of(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v, new) for v in x)
    if isinstance(x, list):
        return [_wrap(v, new) for v in x]
    return x


class _MemoryPointer:
    def __init__(self, a):
        self.ptr = a.ctypes.data if a.size else 0


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """A device array (NumPy storage): the parts of ``cupy.ndarray`` distffn uses, with
    CuPy's refusals of implicit host transfers."""

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("emulator: ndarray(memptr=, strides=)")
        self._a = np.empty(shape, dtype, order=order)
        _allocate(self._a.nbytes)

    @classmethod
    def _of(cls, a: np.ndarray) -> "ndarray":
        obj = cls.__new__(cls)
        obj._a = a
        return obj

    # ---- metadata (no device work)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._of(self._a.T))
    data = property(lambda self: _MemoryPointer(self._a))
    device = property(lambda self: Device(_STATE.device))

    @property
    def base(self):
        return None if self._a.base is None else ndarray._of(self._a.base) if isinstance(self._a.base, np.ndarray) else None

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        _DEVICE.flush()
        return f"emulated-cupy {self._a!r}"

    # ---- transfers
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
                        "construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A host copy (waits for the device: a blocking copy)."""
        _DEVICE.sync_for_host_op("ndarray.get")
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained fromcupy.ndarray")
            if out.dtype != self.dtype:
                raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
            if out.shape != self.shape:
                raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}")
            if not (out.flags.c_contiguous or out.flags.f_contiguous):
                raise RuntimeError("`out` cannot be specified when copying to non-contiguous ndarray")
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        """Host → device on the current (or given) stream, asynchronously: from page-locked
        memory the bytes are read when the copy runs, from pageable memory now (the driver
        stages them)."""
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self.flags.c_contiguous or self.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        src = arr if _is_pinned(arr) else arr.copy()
        dst = self._a

        def copy():
            dst[...] = src
        _DEVICE.submit(copy, stream)

    # ---- NumPy protocol: device arrays in, device arrays out; host arrays refused
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _DEVICE.sync_for_host_op(f"{ufunc.__name__}")
        out = kwargs.get("out")
        result = getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        _DEVICE.sync_for_host_op(func.__name__)
        out = kwargs.get("out")
        result = func(*_unwrap(args), **_unwrap(kwargs))
        return out if out is not None else _wrap(result)

    # ---- indexing: basic indexing gives views (a 0-d view for a single element, as CuPy)
    @staticmethod
    def _key(key):
        if isinstance(key, ndarray):
            key = key._a
        elif isinstance(key, tuple):
            key = tuple(k._a if isinstance(k, ndarray) else k for k in key)
        parts = key if isinstance(key, tuple) else (key,)
        basic = all(isinstance(k, (int, np.integer, slice, type(None))) or k is Ellipsis for k in parts)
        return parts + (Ellipsis,) if basic and Ellipsis not in parts else key

    def __getitem__(self, key):
        _DEVICE.sync_for_host_op("indexing")
        return _wrap(self._a[self._key(key)], new=False)

    def __setitem__(self, key, value):
        _DEVICE.sync_for_host_op("assignment")
        if isinstance(value, np.ndarray):
            if value.shape != ():        # CuPy fills with a scalar, or copies a device array
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        self._a[self._key(key)] = _unwrap(value)

    # ---- methods
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        _DEVICE.sync_for_host_op("astype")
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _wrap(self._a.astype(dtype, order=order))

    def copy(self, order="C"):
        _DEVICE.sync_for_host_op("copy")
        return _wrap(self._a.copy(order=order))

    def fill(self, value):
        _DEVICE.sync_for_host_op("fill")
        if isinstance(value, np.ndarray):
            if value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        self._a.fill(_unwrap(value))

    def item(self):
        _DEVICE.sync_for_host_op("item")
        return self._a.item()

    def tolist(self):
        return self.get().tolist()

    def tobytes(self, order="C"):
        return self.get().tobytes(order)

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __bool__(self):
        _DEVICE.sync_for_host_op("bool")
        return bool(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getattr__(self, name):
        # the rest of NumPy's methods (sum, reshape, ravel, view, ...), device in and out
        if name == "_a" or name.startswith("__") or name == "ctypes":
            # not NumPy's __array_interface__ & co.: NumPy would read the storage through them
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr, new=False)

        @functools.wraps(attr)
        def method(*args, **kwargs):
            _DEVICE.sync_for_host_op(name)
            out = kwargs.get("out")
            r = attr(*_unwrap(args), **_unwrap(kwargs))
            return out if out is not None else _wrap(r)
        return method

    __hash__ = None


# ---------------------------------------------------------------------------- cupy.cuda

class PinnedMemory(bytearray):
    """``cupy.cuda.alloc_pinned_memory``'s buffer (host bytes the device copies from later)."""


class Event:
    """A marker in the device queue; ``synchronize`` waits for the work queued before it."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._reached = True

    def record(self, stream=None):
        self._reached = False

        def reach():
            self._reached = True
        _DEVICE.submit(reach, stream)

    def synchronize(self):
        if not self._reached:
            _DEVICE.flush()

    @property
    def done(self) -> bool:
        return self._reached


class Graph:
    """A captured CUDA graph: the kernel launches, replayed in order."""

    def __init__(self, ops):
        self._ops = list(ops)

    def launch(self, stream=None):
        for op in self._ops:
            _DEVICE.submit(op, stream)


class Stream:
    """A CUDA stream (all streams share the emulated device's one queue)."""

    null = None                          # set below

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0 if null else id(self)
        self._prev: list = []
        self._graph_ops = None

    def use(self):
        _STATE.current_stream = self
        return self

    def __enter__(self):
        self._prev.append(_STATE.current_stream)
        _STATE.current_stream = self
        return self

    def __exit__(self, *exc):
        _STATE.current_stream = self._prev.pop()

    def synchronize(self):
        _DEVICE.sync_for_host_op("Stream.synchronize")

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass                             # one in-order queue: already ordered

    def begin_capture(self, mode=None):
        if self is Stream.null:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: the legacy default stream cannot capture")
        _DEVICE.sync_for_host_op("begin_capture")
        self._graph_ops = []
        _DEVICE.capturing = self

    def is_capturing(self) -> bool:
        return _DEVICE.capturing is self

    def end_capture(self):
        if _DEVICE.capturing is not self:
            raise RuntimeError("end_capture: this stream is not capturing")
        _DEVICE.capturing = None
        graph, self._graph_ops = Graph(self._graph_ops), None
        return graph


Stream.null = Stream(null=True)


class Device:
    """``cupy.cuda.Device``: the emulator has ``device_count`` devices, all the same memory."""

    def __init__(self, device=None):
        self.id = _STATE.device if device is None else int(device)
        if not 0 <= self.id < _FAKE_CONFIG["device_count"]:
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id}")
        self._prev: list = []

    def use(self):
        _STATE.device = self.id

    def __enter__(self):
        self._prev.append(_STATE.device)
        _STATE.device = self.id
        return self

    def __exit__(self, *exc):
        _STATE.device = self._prev.pop()

    def synchronize(self):
        _DEVICE.sync_for_host_op("Device.synchronize")

    compute_capability = "90"


_FAKE_CONFIG = {"device_count": 1, "mem_info": (40 << 30, 48 << 30)}


class _Runtime:
    @staticmethod
    def getDeviceCount():
        return _FAKE_CONFIG["device_count"]

    @staticmethod
    def memGetInfo():
        return _FAKE_CONFIG["mem_info"]

    @staticmethod
    def getDevice():
        return _STATE.device

    @staticmethod
    def deviceSynchronize():
        _DEVICE.sync_for_host_op("deviceSynchronize")


class MemoryPool:
    """The default pool: allocation is NumPy's; this only counts nothing and frees nothing."""

    def malloc(self, size):
        return None

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass


_POOL = MemoryPool()
_PINNED_POOL = MemoryPool()


def _set_allocator(allocator=None):
    _STATE.allocator = allocator


def _get_current_stream(device_id=-1):
    return _STATE.current_stream


# ---------------------------------------------------------------------------- cupy itself

def _device_or_host(a, dtype=None, order="K", copy=True):
    """``cupy.array``: a device array from a device array, a host array or anything NumPy
    takes (``__array__``, lists)."""
    if isinstance(a, ndarray):
        _DEVICE.sync_for_host_op("array")
        if not copy and (dtype is None or np.dtype(dtype) == a.dtype) and order in ("K", "A", None):
            return a
        out = np.array(a._a, dtype=dtype, order=order or "K", copy=True)
    else:
        out = np.array(a, dtype=dtype, order=order or "K", copy=True)
    _allocate(out.nbytes)
    return ndarray._of(out)


def asarray(a, dtype=None, order=None, *, blocking=False):
    return _device_or_host(a, dtype, order, copy=False)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    out = _device_or_host(obj, dtype, order, copy=copy)
    return out if out.ndim >= ndmin else out.reshape((1,) * (ndmin - out.ndim) + out.shape)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _device_or_host(_unwrap(a) if isinstance(a, ndarray) else a, dtype, "C")


def asfortranarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.f_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _device_or_host(_unwrap(a) if isinstance(a, ndarray) else a, dtype, "F")


def _creator(np_func):
    @functools.wraps(np_func)
    def create(*args, **kwargs):
        _DEVICE.sync_for_host_op(np_func.__name__)
        out = np_func(*_unwrap(args), **_unwrap(kwargs))
        _allocate(out.nbytes)
        return ndarray._of(out)
    return create


def take(a, indices, axis=None, out=None):
    """``cupy.take``: no ``mode`` (CuPy wraps indices around, NumPy's default raises)."""
    _DEVICE.sync_for_host_op("take")
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    idx = _unwrap(indices)
    r = np.take(a._a, idx, axis=axis, out=None if out is None else out._a, mode="wrap")
    return out if out is not None else _wrap(r)


def get_array_module(*args):
    return sys.modules["cupy"] if any(isinstance(a, ndarray) for a in args) else np


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    return a.get(stream=stream, order=order, out=out) if isinstance(a, ndarray) else np.asarray(a, order=order)


class RawModule:
    """``cupy.RawModule`` built by the emulator."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 *, enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None:
            raise NotImplementedError("emulator: RawModule(path=...)")
        from distffn.cuda import SOURCES  # the registered name, for the cached file's name
        name = next((n for n, src in SOURCES.items() if src.code == code), "module")
        self._lib = _library(code, name, tuple(options) + CUPY_OPTIONS)

    def get_function(self, name):
        return self._lib.function(name)


def RawKernel(code, name, options=(), backend="nvrtc", translate_cucomplex=False, **_):
    """``cupy.RawKernel`` built by the emulator."""
    return _library(code, f"kernel_{name}", tuple(options) + CUPY_OPTIONS).function(name)


CUPY_OPTIONS = ("-ftz=true",)           # what RawModule adds (see distffn.cuda.CUPY_OPTIONS)
_CACHE_DIR = [None]


@functools.lru_cache(maxsize=None)
def _library(code: str, name: str, options: tuple) -> Library:
    return Library(code, name, options, _CACHE_DIR[0])


class _FakeCupy(types.ModuleType):
    """The module: explicit functions above; any other NumPy function, device in and out."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr                  # dtypes (cupy.float32 is numpy.float32), constants

        @functools.wraps(attr)
        def function(*args, **kwargs):
            _DEVICE.sync_for_host_op(name)
            out = kwargs.get("out")
            r = attr(*_unwrap(args), **_unwrap(kwargs))
            return out if out is not None else _wrap(r)
        return function


def _routines_linalg_module():
    m = types.ModuleType("cupy._core._routines_linalg")
    m.COMPUTE_TYPE_DEFAULT, m.COMPUTE_TYPE_TF32 = 0, 4

    def set_compute_type(dtype, compute_type):
        # the emulator's products are NumPy's float32 whatever this says
        _STATE.tf32 = compute_type == m.COMPUTE_TYPE_TF32
    m.set_compute_type = set_compute_type
    return m


def make_fake_cupy() -> types.ModuleType:
    """A fresh fake ``cupy`` module (with ``cupy.cuda``, ``cupy._core._routines_linalg``)."""
    cp = _FakeCupy("cupy", "NumPy-backed fake CuPy (tests/cuda_emulator.py)")
    cp.ndarray = ndarray
    cp.asarray, cp.array = asarray, array
    cp.ascontiguousarray, cp.asfortranarray = ascontiguousarray, asfortranarray
    for name in ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like", "arange"):
        setattr(cp, name, _creator(getattr(np, name)))
    cp.take, cp.get_array_module, cp.asnumpy = take, get_array_module, asnumpy
    cp.RawModule, cp.RawKernel = RawModule, RawKernel
    cp.get_default_memory_pool = lambda: _POOL
    cp.get_default_pinned_memory_pool = lambda: _PINNED_POOL
    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime = _Runtime()
    cuda.Device, cuda.Stream, cuda.Event = Device, Stream, Event
    cuda.get_current_stream = _get_current_stream
    cuda.alloc_pinned_memory = PinnedMemory
    cuda.PinnedMemoryPointer = PinnedMemory
    cuda.set_allocator = _set_allocator
    cuda.get_allocator = lambda: _STATE.allocator
    cuda.MemoryPool = MemoryPool
    cuda.graph = types.SimpleNamespace(Graph=Graph)
    cp.cuda = cuda
    core = types.ModuleType("cupy._core")
    core._routines_linalg = _routines_linalg_module()
    cp._core = core
    return cp


def synchronize() -> None:
    """Run everything queued on the emulated device (a test's ``deviceSynchronize``)."""
    _DEVICE.flush()


@contextlib.contextmanager
def installed(cache_dir: str | None = None, device_count: int = 1):
    """The fake CuPy as ``sys.modules["cupy"]`` inside the block, distffn's CUDA caches
    emptied on the way in and out (their kernels and device buffers belong to one CuPy),
    everything as it was afterwards. Yields the fake module."""
    compiler()                           # fail now, clearly, without a compiler
    import distffn.cuda
    import distffn.nn.cublas
    import distffn.nn.cuda_layer_kernels as layer_kernels
    names = ("cupy", "cupy.cuda", "cupy._core", "cupy._core._routines_linalg")
    saved = {n: sys.modules.get(n) for n in names}
    saved_rows = dict(layer_kernels._ROWS)
    saved_cfg, saved_cache = dict(_FAKE_CONFIG), _CACHE_DIR[0]
    caches = (distffn.cuda.module, distffn.cuda.kernel, distffn.nn.cublas._library)

    def clear():
        for c in caches:
            c.cache_clear()
        layer_kernels._ROWS.clear()
        _DEVICE.pending.clear()
        _DEVICE.capturing = None
        _STATE.__init__()
        _STATE.current_stream = Stream.null

    cp = make_fake_cupy()
    _CACHE_DIR[0] = cache_dir
    _FAKE_CONFIG["device_count"] = device_count
    clear()
    sys.modules.update({"cupy": cp, "cupy.cuda": cp.cuda, "cupy._core": cp._core,
                        "cupy._core._routines_linalg": cp._core._routines_linalg})
    try:
        yield cp
        _DEVICE.flush()                  # a kernel's error surfaces in the test that queued it
    finally:
        clear()
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        layer_kernels._ROWS.update(saved_rows)
        _FAKE_CONFIG.update(saved_cfg)
        _CACHE_DIR[0] = saved_cache

"""Compile Triton kernels for a real GPU on a machine without one (sm_80 / sm_90), and report resources.

The interpreter accepts code the compiler rejects (dtype mismatches in tl.dot, layouts, shared memory), so every
configuration a launcher can choose is compiled here through the same argument binding the runtime uses: the
launcher's own (grid, args, kwargs) on CPU tensors, specialized exactly as a real launch would be.

Run as `python -m prefix_kernels.triton.compile_check` (it must run with TRITON_INTERPRET unset: under the
interpreter @triton.jit gives functions that cannot be compiled). Exit status 1 if anything failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Shared memory a block may use (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class CompileReport:
    name: str
    arch: int
    shared: int
    registers: int | None
    spills: int | None
    seconds: float
    error: str | None = None


def compile_for_target(jit_fn, args, kwargs, arch: int):
    """triton.compile the kernel for `arch` with the specialization a launch with these arguments gets."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from .device import with_fixed_options

    kwargs = with_fixed_options(kwargs)  # as launch() passes them
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_for(arch: int) -> str:
    """The ptxas Triton itself assembles `arch` with: Triton 3.9 emits PTX 9.x for sm_90, which only its bundled
    newer ptxas ("ptxas-blackwell", CUDA 13) reads; its plain ptxas (CUDA 12.9) refuses it."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):  # a Triton without get_ptxas: its bundled ptxas
        import triton.backends.nvidia as nvidia_backend

        return os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "ptxas")


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spilled bytes) from `ptxas -v` on the kernel's PTX."""
    ptxas = ptxas_for(arch)
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.devnull],
                                capture_output=True, text=True)
    text = result.stdout + result.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    if result.returncode != 0 or regs is None or not spills:  # never report a kernel unchecked as "ok"
        raise RuntimeError(f"ptxas ({ptxas}) for {gpu} did not report registers and spills: {text.strip()[-400:]}")
    return int(regs.group(1)), sum(map(int, spills))


def check(name: str, jit_fn, args, kwargs, arch: int) -> CompileReport:
    start = time.perf_counter()
    try:
        kernel = compile_for_target(jit_fn, args, kwargs, arch)
        registers, spills = ptxas_usage(kernel.asm["ptx"], arch)
    except Exception as exc:  # report every failing configuration, not only the first
        return CompileReport(name, arch, 0, None, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    report = CompileReport(name, arch, kernel.metadata.shared, registers, spills, time.perf_counter() - start)
    if report.shared > SHARED_MEMORY_LIMIT[arch]:
        report.error = f"shared memory {report.shared} B > {SHARED_MEMORY_LIMIT[arch]} B"
    return report


def all_cases():
    """(name, jit_fn, args, kwargs) for every kernel configuration the launchers can choose."""
    from .backward_cases import backward_cases
    from .decode_cases import decode_cases
    from .forward_cases import forward_cases
    from .lean_cases import lean_cases

    yield from forward_cases()
    yield from backward_cases()
    yield from decode_cases()
    yield from lean_cases()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--filter", default="", help="only cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    names = [case[0] for case in all_cases() if args.filter in case[0]]
    # TMA tensor descriptors exist from sm_90 on: those configurations launch only there.
    jobs = [(name, arch) for name in names for arch in args.arch if arch >= 90 or "-tma" not in name]
    failures = 0
    # One process per core: compiling is CPU-bound and each job is independent.
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for done, report in enumerate(pool.map(_check_by_name, jobs), start=1):
            status = "FAIL" if report.error else "ok"
            print(f"[{done}/{len(jobs)}] sm_{report.arch} {report.name}: {status} shared={report.shared} "
                  f"regs={report.registers} spills={report.spills} ({report.seconds:.1f}s)"
                  + (f"\n    {report.error}" if report.error else ""), flush=True)
            failures += bool(report.error)
    print(f"compile_check: {len(jobs) - failures} passed, {failures} failed")
    return 1 if failures else 0


def _check_by_name(job) -> CompileReport:
    # Cases hold tensors; each worker rebuilds them instead of receiving pickles.
    name, arch = job
    for case_name, jit_fn, args, kwargs in all_cases():
        if case_name == name:
            return check(name, jit_fn, args, kwargs, arch)
    raise KeyError(name)


if __name__ == "__main__":
    sys.exit(main())

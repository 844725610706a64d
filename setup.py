"""Build entry. The Python package needs no build; the optional CUDA extension prefix_kernels._C (csrc/) is built here.

Knobs (environment):
  PREFIX_KERNELS_SKIP_CUDA_BUILD=1      never build the extension
  PREFIX_KERNELS_FORCE_CUDA_BUILD=1     fail the install when the extension cannot be built or does not compile
                                        (otherwise: one line saying why, and the pure-Python package installs)
  PREFIX_KERNELS_CUDA_ARCHS="8.0;9.0a"  archs to build for (the default); it sets TORCH_CUDA_ARCH_LIST
  MAX_JOBS                              parallel compile jobs (torch's own knob)

The extension is built from csrc/*.cu and csrc/*.cpp (top level only: csrc/emulator/ is a host emulator for tests)
when torch is importable at build time and is a CUDA build, and nvcc is found (CUDA_HOME, or nvcc on PATH).
Warnings are errors. The compiler output goes to build/cuda_extension.log.

pip's default build isolation hides the installed torch from this script, so `pip install -e .` installs the
pure-Python package only. To build the extension:
  python3 setup.py build_ext --inplace               (puts prefix_kernels/_C*.so in the source tree)
  pip install --no-build-isolation -e .
"""
import contextlib
import glob
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
LOG = os.path.join(ROOT, "build", "cuda_extension.log")
DEFAULT_ARCHS = "8.0;9.0a"
FORCE = os.environ.get("PREFIX_KERNELS_FORCE_CUDA_BUILD") == "1"
SKIP = os.environ.get("PREFIX_KERNELS_SKIP_CUDA_BUILD") == "1"
SOURCES = sorted(os.path.relpath(p, ROOT) for pattern in ("*.cu", "*.cpp")  # not csrc/emulator/
                 for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def say(message):
    print(f"prefix-kernels: {message}", file=sys.stderr, flush=True)


def toolkit_of(nvcc):
    """The CUDA toolkit folder of this nvcc, or None. The folder above nvcc's bin/ (symlinks resolved); for a
    wrapper script (/usr/local/bin/nvcc that execs /usr/local/cuda-13.0/bin/nvcc), where nvcc says it runs from."""
    def is_toolkit(folder):
        return os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h"))

    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_toolkit(home):
        return home
    try:  # -dryrun prints the steps it would run, among them `#$ _HERE_=<its bin folder>`; no file is read
        dry = subprocess.run([nvcc, "-dryrun", "-c", "x.cu", "-o", "x.o"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            home = os.path.dirname(os.path.realpath(line.split("=", 1)[1].strip()))
            return home if is_toolkit(home) else None
    return None


def append_path(name, folders):
    present = [p for p in os.environ.get(name, "").split(os.pathsep) if p]
    os.environ[name] = os.pathsep.join(present + [f for f in folders if f not in present])


def prepare_cuda_environment():
    """Find the toolkit and set what torch.utils.cpp_extension and the compilers need: CUDA_HOME (read when
    cpp_extension is imported: it must be set before), LIBRARY_PATH += $CUDA_HOME/lib64, CPATH += every
    <site-packages>/nvidia/*/include (ATen's CUDA headers include cusparse.h, cublas_v2.h etc., which the pip-installed
    torch ships there and a bare toolkit may lack). Returns why the extension cannot be built, or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        if not os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return f"CUDA_HOME={home} has no bin/nvcc"
    else:
        nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK)
                                        else None)
        if nvcc is None:
            return "nvcc not found (not on PATH, no CUDA_HOME, no /usr/local/cuda)"
        home = toolkit_of(nvcc)
        if home is None:
            return f"cannot tell which CUDA toolkit {nvcc} belongs to; set CUDA_HOME"
    os.environ["CUDA_HOME"] = home
    append_path("LIBRARY_PATH", [d for d in (os.path.join(home, "lib64"),) if os.path.isdir(d)])
    append_path("CPATH", [d for entry in sys.path if entry and os.path.isdir(entry)
                          for d in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))])
    return None


@contextlib.contextmanager
def output_to(path):
    """Send this process's stdout and stderr (and the compilers', which inherit them) to a file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def loaded_libstdcxx():
    """The shared libstdc++ this process (python with torch imported) runs with, or None where that is unknown."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return None
    return min(paths) if paths else None


def needed_libraries(path):
    """The DT_NEEDED entries of a shared object (readelf), or None without readelf."""
    if shutil.which("readelf") is None:
        return None
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]


def cuda_extension():
    """(the extension, its build_ext command) or (None, why not)."""
    if SKIP:
        return None, "PREFIX_KERNELS_SKIP_CUDA_BUILD=1"
    if not SOURCES:
        return None, "csrc/ has no .cu/.cpp sources"
    why = prepare_cuda_environment()
    if why:
        return None, why
    try:
        import torch
    except ImportError as exc:
        return None, (f"torch is not importable at build time ({exc}); with pip, build with "
                      "`pip install --no-build-isolation`")
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found": expected
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("PREFIX_KERNELS_CUDA_ARCHS") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # ours wins over an inherited TORCH_CUDA_ARCH_LIST

    class OptionalBuildExtension(BuildExtension):
        """Compiles into build/cuda_extension.log. A failure installs the package without the extension (one line
        says so), unless PREFIX_KERNELS_FORCE_CUDA_BUILD=1: then it shows the log's end and fails the install."""

        def build_extensions(self):
            os.makedirs(os.path.dirname(LOG), exist_ok=True)
            start = time.monotonic()
            try:
                with output_to(LOG):
                    print(f"CUDA_HOME={os.environ['CUDA_HOME']} TORCH_CUDA_ARCH_LIST={archs} "
                          f"MAX_JOBS={os.environ.get('MAX_JOBS', '')} torch={torch.__version__}", flush=True)
                    super().build_extensions()
            except (Exception, SystemExit) as exc:
                self.failed(exc, time.monotonic() - start)
                return
            needed = needed_libraries(self.get_ext_fullpath("prefix_kernels._C"))
            if needed is not None and not any(name.startswith("libstdc++.so") for name in needed):
                self.failed(RuntimeError(f"the extension does not link libstdc++ dynamically (needs {needed}): "
                                         "its private copy would crash formatting error messages"),
                            time.monotonic() - start)
                return
            say(f"built the CUDA extension prefix_kernels._C for {archs} in {time.monotonic() - start:.0f} s "
                f"(log: {os.path.relpath(LOG)})")

        def failed(self, exc, seconds):
            with open(LOG, "a") as log:
                traceback.print_exception(exc, file=log)
            # An older _C*.so, in the source tree from an earlier in-place build or in build/lib*, would be loaded
            # or packaged in place of these sources.
            name = os.path.basename(self.get_ext_filename("prefix_kernels._C"))
            for stale in (os.path.join(ROOT, "prefix_kernels", name), self.get_ext_fullpath("prefix_kernels._C")):
                if os.path.exists(stale):
                    os.remove(stale)
            if FORCE:  # show the first failure (ninja's "FAILED:" and the compiler's errors), else the log's end
                with open(LOG, errors="replace") as log:
                    lines = log.read().splitlines()
                first = next((i for i, line in enumerate(lines) if line.startswith("FAILED:")), max(len(lines) - 80, 0))
                print("\n".join(lines[first:first + 150]), file=sys.stderr)
                say(f"the CUDA extension failed to build after {seconds:.0f} s (PREFIX_KERNELS_FORCE_CUDA_BUILD=1; "
                    f"whole log: {LOG})")
                raise SystemExit(1)
            self.extensions = []  # nothing to copy in place or to package
            self.distribution.ext_modules = []
            say(f"the CUDA extension failed to build, installing without it (log: {LOG})")

    ext = CUDAExtension(
        "prefix_kernels._C",
        SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # -std=c++20: torch's headers require it (torch/all.h: "C++20 or later ... is required"); torch's
            # own default too.
            "cxx": ["-O3", "-std=c++20", "-Wall", "-Werror"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-Werror=all-warnings"],
        },
        # Link the shared libstdc++ torch runs with, never a private static copy: the GPU image's
        # CXX=/opt/gcc/bin/g++ linked a static one (a plain -lstdc++ did not change that there), and with two
        # libstdc++ in the process, formatting a number into an error message crashed (H100). Named by path, the
        # .so resolves our references before any static archive; build_extensions checks the result.
        extra_link_args=[loaded_libstdcxx() or "-lstdc++"],
    )
    return (ext, OptionalBuildExtension), None


built, skipped_because = cuda_extension()
if skipped_because:
    if FORCE and not SKIP and SOURCES:  # (no sources: nothing to build, nothing failed)
        sys.exit(f"prefix-kernels: PREFIX_KERNELS_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: "
                 f"{skipped_because}")
    say(f"skipping the CUDA extension: {skipped_because}")
setup(
    ext_modules=[built[0]] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
)

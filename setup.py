"""Build of amfor and its extension `amfor._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build and a CUDA toolkit
(nvcc and the CUDA runtime library) is found; otherwise, or when the CUDA part fails to compile, the CPU extension
is built with one warning. `AMFOR_BUILD_CUDA=0` skips the CUDA part, `AMFOR_BUILD_CUDA=1` makes its absence or
failure an error. Build against the installed torch:

    pip install -e . --no-build-isolation

The toolkit is looked for, in order, at `CUDA_HOME`, `CUDA_PATH` (honoured as given: a toolkit named there is used
or the CUDA part is skipped), the toolkit behind the `nvcc` on PATH (followed through symbolic links and through
wrapper scripts, by asking nvcc for its own root with `-dryrun`), and /usr/local/cuda.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDART_DIRS = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux",
                                                                                              "lib"))


def _packages() -> tuple[list[str], dict[str, str]]:
    """`amfor.*` from amfor/, plus kernels/ installed as `amfor.kernels`."""
    packages = find_packages(include=["amfor", "amfor.*"])
    packages.append("amfor.kernels")
    return packages, {"amfor.kernels": "kernels"}


# --- locating CUDA -------------------------------------------------------------------------------------------
def cudart_dir(home: str) -> str | None:
    """The folder of `home` holding the CUDA runtime library (libcudart.so or cudart.lib), or None."""
    names = ("libcudart.so", "cudart.lib")
    for sub in CUDART_DIRS + (os.path.join("lib", "x64"),):
        if any(os.path.exists(os.path.join(home, sub, name)) for name in names):
            return os.path.join(home, sub)
    return None


def is_toolkit(home: str) -> bool:
    """Whether `home` is a CUDA toolkit we can build with: bin/nvcc and the runtime library."""
    nvcc = os.path.join(home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")
    return os.path.isfile(nvcc) and cudart_dir(home) is not None


def nvcc_root(nvcc: str) -> str | None:
    """The toolkit root nvcc itself reports (`#$ TOP=<root>/bin/..` in `nvcc -dryrun`): right even when `nvcc` is a
    wrapper script outside the toolkit."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        open(source, "w").close()
        try:
            out = subprocess.run([nvcc, "-dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(match.group(1).strip()) if match else None


def find_cuda_home(environ: dict[str, str] | None = None, default: str = "/usr/local/cuda") -> tuple[str | None, str]:
    """(toolkit root or None, how it was found or why none was). `environ` defaults to os.environ."""
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(var)
        if home:
            if is_toolkit(home):
                return home, f"{home} ({var})"
            return None, f"{var}={home} is not a CUDA toolkit with bin/nvcc and the runtime library (libcudart)"
    nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
    if nvcc is not None:
        real = os.path.realpath(nvcc)
        for home in (os.path.dirname(os.path.dirname(real)), nvcc_root(real)):
            if home and is_toolkit(home):
                return home, f"{home} (the toolkit of {nvcc})"
        return None, f"{nvcc} was found, but no CUDA toolkit with the runtime library (libcudart) behind it"
    if is_toolkit(default):
        return default, default
    return None, f"no nvcc on PATH, no CUDA_HOME or CUDA_PATH, and no toolkit at {default}"


# --- the extension -------------------------------------------------------------------------------------------
def _openmp_flags(torch) -> list[str]:
    """-fopenmp where torch's intra-op threads are OpenMP and the compiler is GCC-like (Linux): without it the
    at::parallel_for of the C++ kernels (inlined from ATen's headers) compiles to a serial loop. The extension
    then needs libgomp.so.1, which resolves to the copy torch has already loaded: one OpenMP runtime, whose
    thread count torch.set_num_threads sets."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _warn(message: str) -> None:
    print(f"amfor: WARNING: {message}; building the CPU kernels only (set AMFOR_BUILD_CUDA=1 to make this an error)",
          file=sys.stderr)


def _cuda_plan() -> tuple[bool, str]:
    """(build the CUDA part, reason): decided before torch's cpp_extension is imported, since it reads CUDA_HOME
    once at import."""
    flag = os.environ.get("AMFOR_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, "AMFOR_BUILD_CUDA=0"
    import torch
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        home, reason = find_cuda_home()
        if home is not None:
            os.environ["CUDA_HOME"] = home
            return True, reason
    if flag == "1":
        raise RuntimeError(f"amfor: AMFOR_BUILD_CUDA=1, but the CUDA kernels cannot be built: {reason}")
    return False, reason


def _cpu_extension(cpp_extension, torch):
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    openmp = _openmp_flags(torch)  # the C++ standard is the one torch's cpp_extension picks for its headers
    return cpp_extension.CppExtension("amfor._C", sources, extra_compile_args={"cxx": ["-O3", *openmp]},
                                      extra_link_args=openmp)


def _cuda_extension(cpp_extension, torch):
    cpu = _cpu_extension(cpp_extension, torch)
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "amfor._C", cpu.sources + sorted(glob.glob("csrc/cuda/*.cu")), define_macros=[("AMFOR_WITH_CUDA", None)],
        extra_compile_args={"cxx": cpu.extra_compile_args["cxx"], "nvcc": nvcc},
        extra_link_args=cpu.extra_link_args, py_limited_api=False,
    )


def _build_command(cpp_extension, torch):
    """torch's BuildExtension that, when the CUDA part fails to compile or link and AMFOR_BUILD_CUDA is not 1,
    warns once and builds the CPU extension instead: the install never fails for the optional part."""

    class BuildExtension(cpp_extension.BuildExtension):
        def build_extensions(self):
            if not any(source.endswith(".cu") for ext in self.extensions for source in ext.sources):
                return super().build_extensions()
            try:
                return super().build_extensions()
            except Exception as exc:  # CompileError, LinkError, a toolkit/torch CUDA version mismatch
                if os.environ.get("AMFOR_BUILD_CUDA", "").strip() == "1":
                    raise
                _warn(f"the CUDA kernels failed to build ({type(exc).__name__}: {exc})")
                cpu = _cpu_extension(cpp_extension, torch)
                for ext in self.extensions:  # in place: build_ext has set private fields on these objects
                    for field in ("sources", "include_dirs", "define_macros", "library_dirs", "libraries",
                                  "runtime_library_dirs", "extra_compile_args", "extra_link_args", "language"):
                        setattr(ext, field, getattr(cpu, field))
                return super().build_extensions()

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


def _extensions():
    """The `amfor._C` extension and its build command, or nothing when torch is not importable."""
    try:
        import torch
    except ImportError:
        print("amfor: torch is not installed; building without the amfor._C extension", file=sys.stderr)
        return [], {}
    want_cuda, reason = _cuda_plan()  # before cpp_extension's import, which reads CUDA_HOME once
    from torch.utils import cpp_extension
    ext = None
    if want_cuda:
        print(f"amfor: building the CUDA kernels with the toolkit found at {reason}", file=sys.stderr)
        try:
            ext = _cuda_extension(cpp_extension, torch)
        except (OSError, RuntimeError) as exc:
            if os.environ.get("AMFOR_BUILD_CUDA", "").strip() == "1":
                raise
            _warn(f"the CUDA kernels cannot be built ({exc})")
    elif reason != "AMFOR_BUILD_CUDA=0":
        _warn(f"the CUDA kernels are not built: {reason}")
    if ext is None:
        ext = _cpu_extension(cpp_extension, torch)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    return [ext], {"build_ext": _build_command(cpp_extension, torch)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its functions under another name
    packages, package_dir = _packages()
    ext_modules, cmdclass = _extensions()
    setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)

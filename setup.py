"""Build of amfor and its extension `amfor._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when nvcc and a CUDA build of torch are
present (`AMFOR_BUILD_CUDA=0|1` forces off/on). Build against the installed torch:

    pip install -e . --no-build-isolation
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _packages() -> tuple[list[str], dict[str, str]]:
    """`amfor.*` from amfor/, plus kernels/ installed as `amfor.kernels`."""
    packages = find_packages(include=["amfor", "amfor.*"])
    packages.append("amfor.kernels")
    return packages, {"amfor.kernels": "kernels"}


def _want_cuda(torch_cuda_version: str | None, cuda_home: str | None) -> bool:
    flag = os.environ.get("AMFOR_BUILD_CUDA", "").strip()
    if flag in ("0", "1"):
        if flag == "1" and (torch_cuda_version is None or cuda_home is None):
            raise RuntimeError("AMFOR_BUILD_CUDA=1 but torch has no CUDA build or nvcc/CUDA_HOME was not found")
        return flag == "1"
    return torch_cuda_version is not None and cuda_home is not None


def _openmp_flags(torch) -> list[str]:
    """-fopenmp where torch's intra-op threads are OpenMP and the compiler is GCC-like (Linux): without it the
    at::parallel_for of the C++ kernels (inlined from ATen's headers) compiles to a serial loop. The extension
    then needs libgomp.so.1, which resolves to the copy torch has already loaded: one OpenMP runtime, whose
    thread count torch.set_num_threads sets."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _extensions():
    """The `amfor._C` extension and its build command, or nothing when torch is not importable."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("amfor: torch is not installed; building without the amfor._C extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    openmp = _openmp_flags(torch)
    cxx = ["-O3", *openmp]  # the C++ standard is the one torch's cpp_extension picks for its headers
    macros = []
    if _want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME):
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        macros.append(("AMFOR_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "amfor._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=openmp, py_limited_api=False,
        )
    else:
        ext = cpp_extension.CppExtension("amfor._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=openmp)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)

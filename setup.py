"""Build script: installs the ``fused_mbconv`` package and, when a CUDA toolkit is found, the
extension ``fused_mbconv._C`` (host code from csrc/*.cpp, device code from kernels/*.cu).

Environment knobs:
  FUSED_MBCONV_SKIP_CUDA_BUILD=1   install the pure-Python package only (Triton + reference).
  TORCH_CUDA_ARCH_LIST             GPU architectures to compile for (default "8.0;9.0").
  CUDA_HOME                        the toolkit root, if the automatic search picks the wrong one.

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _is_toolkit_root(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "lib64").is_dir()


def find_cuda_home() -> Path | None:
    """The real toolkit root: the folder holding bin/nvcc and lib64/.

    ``nvcc`` on PATH may be a wrapper script in a folder without lib64 (torch's own guess, the
    wrapper's grandparent, then fails to link -lcudart), so ask nvcc itself where it lives:
    ``nvcc --dryrun`` prints ``TOP=<root>/bin/..``.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and _is_toolkit_root(Path(env)):
        return Path(env)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(nvcc).resolve().parent.parent
    if _is_toolkit_root(real):
        return real
    try:
        dryrun = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    if match:
        top = Path(match.group(1).strip()).resolve()
        if _is_toolkit_root(top):
            return top
    return None


def cuda_extensions() -> tuple[list, dict]:
    if os.environ.get("FUSED_MBCONV_SKIP_CUDA_BUILD", "0") == "1":
        print("fused_mbconv: FUSED_MBCONV_SKIP_CUDA_BUILD=1, not building fused_mbconv._C")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("fused_mbconv: no CUDA toolkit found, not building fused_mbconv._C (Triton/reference only)")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ["CUDA_HOME"] = str(cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("kernels/*.cu"))
    extension = CUDAExtension(
        name="fused_mbconv._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), str(ROOT / "kernels")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
        },
        py_limited_api=False,
    )
    print(f"fused_mbconv: building fused_mbconv._C with CUDA_HOME={cuda_home} "
          f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")  # fmt: skip
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    ext_modules, cmdclass = cuda_extensions()
    setup(
        packages=find_packages(include=["fused_mbconv", "fused_mbconv.*"]),
        package_data={"fused_mbconv.ops": ["auto_table.json"]},  # the measured "auto" choices, once written
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )

"""Builds the native extension `vtp_fast._C` through CMakeLists.txt.

C++ sources in csrc/ always; CUDA sources (csrc/*.cu, for sm_90a and sm_80) when torch is a CUDA build and a
CUDA toolkit is found. Switches (environment):
  VTP_FAST_NO_CUDA=1      skip the CUDA sources even when a toolkit is present
  VTP_FAST_NO_NATIVE=1    build no extension at all (the package then runs on its pure-PyTorch references)
  CUDA_HOME=/path         the CUDA toolkit to use (otherwise found from the `nvcc` on the PATH)
  VTP_FAST_CUDA_ARCHS     CMake CUDA architectures (default "80;90a")
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME, else the toolkit that `nvcc` on the PATH belongs to.

    `nvcc` may be a wrapper script naming the real compiler (as on the project's CPU machines); the path it
    names is followed.
    """
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = Path(nvcc).resolve()
    if nvcc.stat().st_size < 4096:  # a wrapper script, not the compiler itself
        named = re.search(r"(/\S+/bin/nvcc)\b", nvcc.read_text(errors="replace"))
        if named:
            nvcc = Path(named.group(1)).resolve()
    home = nvcc.parent.parent
    return home if (home / "include" / "cuda_runtime.h").exists() else None


def tool(name: str) -> str:
    """A build tool from this Python environment (pip's cmake/ninja) before the one on the PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        cuda_home = None if _truthy("VTP_FAST_NO_CUDA") or torch.version.cuda is None else find_cuda_home()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DVTP_FAST_WITH_CUDA={'ON' if cuda_home else 'OFF'}",
        ]
        env = dict(os.environ)
        if cuda_home:
            env["CUDA_HOME"] = str(cuda_home)
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DVTP_FAST_CUDA_ARCHS={os.environ.get('VTP_FAST_CUDA_ARCHS', '80;90a')}",
            ]
        if Path(tool("ninja")).exists():
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}"]
        print(f"vtp_fast: building _C ({'C++ + CUDA from ' + str(cuda_home) if cuda_home else 'C++ only'})")
        subprocess.run([tool("cmake"), str(ROOT), *args], cwd=build_dir, env=env, check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run([tool("cmake"), "--build", ".", "--parallel", jobs], cwd=build_dir, env=env, check=True)


ext_modules = [] if _truthy("VTP_FAST_NO_NATIVE") else [CMakeExtension("vtp_fast._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})

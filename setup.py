"""Build tangle_kernels._C with CMake + ninja + pybind11.

Switches (environment variables):
  TANGLE_SKIP_CUDA=1        do not compile the CUDA kernels even if nvcc is found
  TANGLE_CUDA_ARCHS="80;90" CUDA architectures (default: 80;90)
  TANGLE_BUILD_TYPE=Debug   CMake build type (default: Release)
  TANGLE_SKIP_EXT=1         build no extension at all (pure-Python install; the
                            package falls back to its torch backends)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("TANGLE_BUILD_TYPE", "Release")
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        if os.environ.get("TANGLE_SKIP_CUDA", "0") not in ("", "0"):
            args.append("-DTANGLE_SKIP_CUDA=ON")
        archs = os.environ.get("TANGLE_CUDA_ARCHS")
        if archs:
            args.append(f"-DTANGLE_CUDA_ARCHS={archs}")
        if shutil.which("ninja") or _pip_ninja():
            args += ["-G", "Ninja"]
            ninja = shutil.which("ninja") or _pip_ninja()
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        cmake = shutil.which("cmake") or _pip_cmake()
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(
            [cmake, "--build", ".", "--config", build_type, "-j", jobs], cwd=build_temp, check=True
        )


def _pip_ninja():
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except Exception:
        return None


def _pip_cmake():
    try:
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except Exception:
        return "cmake"


ext_modules = []
if os.environ.get("TANGLE_SKIP_EXT", "0") in ("", "0"):
    ext_modules.append(CMakeExtension("tangle_kernels._C", ROOT))

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})

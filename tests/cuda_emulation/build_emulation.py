"""Builds the test-only emulated CUDA backend and the fault-injection program, with sanitizers.

The CUDA sources (csrc/cuda/*.cu, *.cpp) are compiled unchanged as host C++ (``-x c++
-DFOCAL_CUDA_EMULATION``) against ``cuda_emulation.h``, with AddressSanitizer and UBSan, and linked
with csrc/focal_ops.cpp and emulated_library.cpp into a library that registers the ops under
``torch.ops.focal_emu`` on the CPU key. It is never part of the installed package.

Builds go to ``build/emulated/<name>-<hash>/``, where the hash covers the compiler, torch, the flags
and every file under csrc/ and this folder, so a build is reused until any of them changes (older
builds of the same name are removed). A process that loads the library needs the ASan runtime
preloaded: see :func:`sanitizer_env`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
BUILD_ROOT = ROOT / "build" / "emulated"
CXX = os.environ.get("FOCAL_EMU_CXX", "g++")

SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# No floating-point contraction, as in the CPU build (see csrc/focal_math.h): the emulated kernels
# round like the GPU's, whose sums use explicit round-to-nearest additions. -O0: every access the
# sanitizers check is still there (no optimisation folds any away), and the build takes 115
# core-seconds where -O1 took 178 (focal_cuda.cu alone 34 s against 74), for checks that run 36 s
# instead of 30, beside the rest of the suite. What -O0 gives up is GCC's flow-based warnings
# (-Wmaybe-uninitialized), which need the optimiser.
FLAGS = [
    "-std=c++20",
    "-O0",
    "-g1",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-ffp-contract=off",
    "-fPIC",
    "-DFOCAL_CUDA_EMULATION",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    f"-I{CSRC}",
    f"-I{CSRC / 'cuda'}",
    f"-I{HERE}",
] + [f"-isystem{p}" for p in cpp_extension.include_paths()]
TORCH_LIBS = [f"-L{p}" for p in cpp_extension.library_paths()] + [
    f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()
]

LIBRARY_SOURCES = sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp")) + [
    CSRC / "focal_ops.cpp", CSRC / "softmax_ops.cpp", CSRC / "box_ops.cpp", HERE / "emulated_library.cpp"
]
FAULTS = {None: [], "tail": ["-DFOCAL_EMU_BREAK_TAIL"], "align": ["-DFOCAL_EMU_BREAK_ALIGN"]}


class BuildError(RuntimeError):
    """A compile or link step failed; the message holds the command and the compiler's output."""


def sanitizer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Python process that loads the library: the ASan runtime preloaded (it must
    come before every other library) with the C++ runtime (ASan's exception interceptor looks for it
    when it starts; python itself does not link it), leak checks off (CPython and torch keep memory
    to the end), and every report fatal, with a non-zero exit status."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = " ".join(_runtime_library(name) for name in ("libasan.so", "libstdc++.so"))
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=86:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=87"
    return env


def _runtime_library(name: str) -> str:
    found = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True, check=True)
    return os.path.realpath(found.stdout.strip())


def _digest(name: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    for part in (name, version, torch.__version__, sys.version, *flags):
        h.update(part.encode() + b"\0")
    sources = (*CSRC.rglob("*"), *HERE.glob("*"))
    files = sorted(p for p in sources if p.is_file() and p.suffix in (".h", ".cuh", ".cu", ".cpp"))
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\n{result.stdout}{result.stderr}")


def _build(name: str, flags: list[str], make) -> Path:
    """Runs make(tmp_dir) -> file name once per digest and returns the cached output's path."""
    out_dir = BUILD_ROOT / f"{name}-{_digest(name, flags)}"
    done = out_dir / ".done"
    if done.exists():
        return out_dir / done.read_text()
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=BUILD_ROOT))
    try:
        output = make(tmp)
        (tmp / ".done").write_text(output)
        try:
            tmp.rename(out_dir)
        except OSError:  # another process finished the same build first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in BUILD_ROOT.glob(f"{name}-*"):
        if old != out_dir:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir / output


def build_library() -> Path:
    """The emulated backend as a shared library (``focal_emu.so``), built if needed."""
    flags = FLAGS + SANITIZERS

    def make(tmp: Path) -> str:
        objects = [tmp / f"{src.name}.o" for src in LIBRARY_SOURCES]
        jobs = [
            [CXX, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)] for src, obj in zip(LIBRARY_SOURCES, objects)
        ]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for future in [pool.submit(_run, cmd) for cmd in jobs]:
                future.result()
        _run([CXX, "-shared", *SANITIZERS, *map(str, objects), *TORCH_LIBS,
              "-lc10", "-ltorch_cpu", "-ltorch", "-o", str(tmp / "focal_emu.so")])
        return "focal_emu.so"

    return _build("focal_emu", flags, make)


def build_fault_program(fault: str | None) -> Path:
    """fault_driver.cpp as a program, correct (None) or with a deliberate fault ("tail", "align")."""
    flags = FLAGS + SANITIZERS + FAULTS[fault]
    name = f"fault_driver_{fault or 'none'}"

    def make(tmp: Path) -> str:
        _run([CXX, *flags, str(HERE / "fault_driver.cpp"), *TORCH_LIBS, "-lc10", "-o", str(tmp / name)])
        return name

    return _build(name, flags, make)

"""Builds focal and its extension module focal._C, against the torch already installed.

torch is deliberately absent from pyproject.toml's build requirements (as in apex and flash-attn): an
isolated build would compile against whatever torch the registry serves, and the extension would then
fail with undefined symbols when loaded by the user's own torch. Build with
`pip install --no-build-isolation .`.

Next to focal._C the build writes focal/_build_info.json (torch's version, its CUDA version and C++
ABI, the CUDA architectures and CPU instruction sets compiled), which focal checks at import.

Environment switches:
  FOCAL_WITH_CUDA=0|1   force the CUDA kernels off or on (default: on when a CUDA toolkit and a
                        CUDA build of torch are present, whether or not a GPU is visible)
  FOCAL_DEBUG=1         -O0 -g builds (a release build has no debug information: -O3 -g0)
  FOCAL_CPU_ISAS=native compile the CPU kernels for this machine's instruction set alone (a build
                        for one machine: a CPU without that set is refused with the rebuild command),
                        rather than for every x86-64 one; or a list, to which DEFAULT is added: AVX2
  TORCH_CUDA_ARCH_LIST  architectures to compile for (default without a visible GPU: "8.0;9.0+PTX")
  CUDA_HOME             toolkit root (default: /usr/local/cuda when it exists)
"""

import concurrent.futures
import glob
import json
import os
import platform
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/lib64"):
    # torch would otherwise guess the root from nvcc's location, which need not hold lib64.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
except ImportError as error:
    sys.exit(f"focal is compiled against the installed torch, and this build cannot import one ({error}; pip "
             "hides the environment's packages from a build unless given --no-build-isolation): "
             "run `pip install torch`, then `pip install --no-build-isolation .`")
from torch.utils import cpp_extension  # noqa: E402


def env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


DEBUG = bool(env_flag("FOCAL_DEBUG"))
CUDA_REQUESTED = env_flag("FOCAL_WITH_CUDA")
CUDA_POSSIBLE = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
if CUDA_REQUESTED and not CUDA_POSSIBLE:
    sys.exit("FOCAL_WITH_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found")
WITH_CUDA = CUDA_POSSIBLE if CUDA_REQUESTED is None else CUDA_REQUESTED
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

# The CPU kernel files are compiled once per instruction set; focal_cpu.cpp picks one at run time.
# Their own code lives in namespaces named after the instruction set. DEFAULT comes first: inline
# functions of other headers that a copy emits out of line (debug builds do) are merged by the
# linker into the first copy it sees, which must be the one every CPU can run (a build for one
# machine, without DEFAULT, runs only where its one copy runs). The DEFAULT copy, without vector
# instructions, compiles at -O2: half the time of -O3 (its slowest file 25 s against 47), and as
# fast on this machine (ATEN_CPU_CAPABILITY=default, every loss, 1 thread: within the noise).
ISA_FLAGS = {"DEFAULT": [] if DEBUG else ["-O2"]}
if X86_64:
    ISA_FLAGS["AVX2"] = ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c"]
    # GCC 12 reports false "maybe uninitialized" warnings inside its own AVX-512 intrinsics.
    ISA_FLAGS["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                           "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
ISA_REQUEST = os.environ.get("FOCAL_CPU_ISAS", "").strip().upper()
if ISA_REQUEST:
    # "native": a build for this machine, with the one copy torch picks on this CPU (the DEFAULT copy,
    # compiled without vector instructions, is the slowest file of the build). A list: the copies
    # named, and the DEFAULT one, which every CPU runs.
    if ISA_REQUEST == "NATIVE":  # a capability this build has no copy for (not x86-64): DEFAULT
        capability = torch.backends.cpu.get_cpu_capability()
        wanted = {capability if capability in ISA_FLAGS else "DEFAULT"}
    else:
        wanted = set(ISA_REQUEST.split(",")) | {"DEFAULT"}
    unknown = wanted - set(ISA_FLAGS)
    if unknown:
        sys.exit(f"FOCAL_CPU_ISAS names {sorted(unknown)}; this build knows {list(ISA_FLAGS)} and 'native'")
    ISA_FLAGS = {isa: flags for isa, flags in ISA_FLAGS.items() if isa in wanted}
ISA_SOURCES = [
    os.path.join(CSRC, "cpu", name) for name in ("focal_kernel.cpp", "family_kernel.cpp", "softmax_kernel.cpp")
]


def cxx_flags() -> list[str]:
    # Python's own compile flags (sysconfig's CFLAGS, which setuptools puts first) carry -g; a
    # release build turns it off again: debug information was two thirds of the module's 94 MB and
    # half the C++ compile time.
    flags = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    # No floating-point contraction: the math spells out its fused multiply-adds, and every
    # instantiation of it must round alike (see csrc/focal_math.h).
    flags += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-ffp-contract=off"]
    flags += [f"-DFOCAL_HAVE_{isa}" for isa in ISA_FLAGS]
    return flags


def nvcc_flags() -> list[str]:
    flags = ["-O0", "-g", "-G"] if DEBUG else ["-O3", "-lineinfo"]
    return flags + ["--expt-relaxed-constexpr"]


DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# Headers of the CUDA libraries that ATen's CUDA headers include (ATen/cuda/CUDAContextLight.h).
CUDA_LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")


def cuda_library_include_dirs() -> list[str]:
    """The include folders of torch's CUDA wheels (site-packages/nvidia/<package>/include) that hold
    the library headers ATen needs: one folder for the CUDA 13 wheels (nvidia/cu13), one per library
    for the CUDA 12 ones (nvidia/cusparse, nvidia/cublas, ...). Empty when the toolkit has them."""
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    found = []
    for header in CUDA_LIBRARY_HEADERS:
        for path in sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "include", header))):
            folder = os.path.dirname(path)
            if folder not in found:
                found.append(folder)
    return found


def extension():
    sources = [
        os.path.join(CSRC, "module.cpp"),
        os.path.join(CSRC, "focal_ops.cpp"),
        os.path.join(CSRC, "cpu", "focal_cpu.cpp"),
        os.path.join(CSRC, "cpu", "hugepage_alloc.cpp"),
        os.path.join(CSRC, "softmax_ops.cpp"),
        os.path.join(CSRC, "cpu", "softmax_cpu.cpp"),
        os.path.join(CSRC, "box_ops.cpp"),
        os.path.join(CSRC, "cpu", "box_cpu.cpp"),
    ]
    kwargs = dict(
        name="focal._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags()},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if not WITH_CUDA:
        return cpp_extension.CppExtension(**kwargs)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # SASS for Ampere and Hopper, plus Hopper's PTX, which newer GPUs compile when loading.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    kwargs["sources"] += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    kwargs["sources"] += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    kwargs["extra_compile_args"]["nvcc"] = nvcc_flags()
    kwargs["extra_compile_args"]["cxx"].append("-DFOCAL_WITH_CUDA")
    kwargs["include_dirs"] = cuda_library_include_dirs()
    return cpp_extension.CUDAExtension(**kwargs)


BUILD_INFO_NAME = "_build_info.json"


def cuda_archs_compiled() -> tuple[list[str], list[str]]:
    """The architectures nvcc compiles for, as torch's build derives them: (SASS, PTX) lists like
    ["8.0", "9.0"], ["9.0"] (a suffix such as 9.0a is kept)."""
    sass, ptx = [], []
    for flag in cpp_extension._get_cuda_arch_flags():
        for kind, digits in re.findall(r"code=(sm|compute)_(\d+[a-z]?)", flag):
            number, suffix = digits.rstrip("abcdefghijklmnopqrstuvwxyz"), digits.lstrip("0123456789")
            arch = f"{number[:-1]}.{number[-1]}{suffix}"
            found = sass if kind == "sm" else ptx
            if arch not in found:
                found.append(arch)
    return sass, ptx


def build_info(with_cuda: bool) -> dict:
    """What focal/_build_info.json records: what the extension was compiled against and for."""
    sass, ptx = cuda_archs_compiled() if with_cuda else ([], [])
    return {
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "cuda_sass": sass,
        "cuda_ptx": ptx,
        "cpu_isas": list(ISA_FLAGS),
    }


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus one object of each CPU kernel file per instruction set, and the
    build record written next to the module (and copied to the source tree with it when in place)."""

    def finalize_options(self):
        super().finalize_options()
        # One object folder for every kind of build (in place, editable, wheel) instead of a fresh
        # temporary one each time: ninja then recompiles only what changed, and a wheel built after
        # an editable install, by the same Python and with the same switches, only links.
        self.build_temp = os.path.join(ROOT, "build", "temp")

    def run(self):
        super().run()
        info = json.dumps(build_info(WITH_CUDA), indent=1) + "\n"
        folders = {os.path.dirname(os.path.join(self.build_lib, self.get_ext_filename("focal._C")))}
        if self.inplace:
            folders.add(os.path.join(ROOT, "focal"))
        for folder in folders:
            with open(os.path.join(folder, BUILD_INFO_NAME), "w") as file:
                file.write(info)

    def build_extension(self, ext):
        # The instruction-set copies compile on a thread of their own while torch's build compiles the
        # module's other sources (and the CUDA kernels), so that neither leaves a core idle waiting for
        # its slowest file; the link waits for both. Without ninja, torch's compile swaps the
        # compiler's command line in and out, so the copies go first, one after another.
        folders = {isa: os.path.abspath(os.path.join(self.build_temp, f"isa_{isa.lower()}")) for isa in ISA_FLAGS}
        for folder in folders.values():
            ext.extra_objects.extend(o for o in self.compiler.object_filenames(ISA_SOURCES, output_dir=folder)
                                     if o not in ext.extra_objects)
        if not self.use_ninja:
            self.compile_isa_copies(ext, folders)
            return super().build_extension(ext)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            copies = pool.submit(self.compile_isa_copies, ext, folders)
            link = self.compiler.link_shared_object

            def link_after_copies(*args, **kwargs):
                copies.result()
                return link(*args, **kwargs)

            self.compiler.link_shared_object = link_after_copies
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
        copies.result()

    def compile_isa_copies(self, ext, folders):
        """ISA_SOURCES compiled once per instruction set, into ``folders[isa]``."""
        base = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
        for isa, flags in ISA_FLAGS.items():
            self.compiler.compile(
                ISA_SOURCES,
                output_dir=folders[isa],
                include_dirs=ext.include_dirs,
                debug=DEBUG,
                extra_postargs={"cxx": base + flags + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]},
                depends=ext.depends,
            )


setup(
    name="focal",
    version="0.1.0",
    description="Fused sigmoid focal loss for PyTorch (CPU + CUDA) and a RetinaNet that trains with it",
    packages=find_packages(include=["focal", "focal.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    python_requires=">=3.10",
    install_requires=["torch"],
)

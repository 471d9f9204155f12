"""benchmarks/sass_count.py: parsing of cuobjdump listings, finding the grid-stride loop, naming the
instantiations, the budget check; end to end on a small kernel compiled with nvcc at test time (no
GPU needed to compile), and on the built extension when it holds sm_90 code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import background
import benchmark_scripts

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "sass_count.py"


sc = benchmark_scripts.load("sass_count")


def sass(*lines: str) -> str:
    """A `cuobjdump -sass` style listing: numbered instruction lines with their encoding comments."""
    out = []
    for line in lines:
        if line.startswith(("code for", "Function")):
            out.append(f"\t{line}" if line.startswith("code") else f"\t\t{line}")
        else:
            addr, text = line.split(" ", 1)
            out.append(f"        /*{addr}*/                   {text} ;   /* 0x000fe20000000f00 */")
            out.append("                                                 /* 0x000fc80000000000 */")
    return "\n".join(out) + "\n"


# A kernel shaped like focal's: prologue, the grid-stride loop (with an inner loop that stores
# nothing, and a predicated exit from it), a block-reduction loop without global stores, a
# subroutine called from the loop, and the `BRA .` that ends every function.
GRID_STRIDE = sass(
    "code for sm_90",
    "Function : _Z6kernelPf",
    "0000 S2R R0, SR_TID.X",
    "0010 @P0 EXIT",
    "0020 LDG.E.128 R4, desc[UR4][R2.64]",  # loop head
    "0030 FMUL R4, R4, R4",
    "0040 IADD3 R9, R9, 0x1, RZ",  # inner loop head
    "0050 ISETP.NE.AND P1, PT, R9, 0x4, PT",
    "0060 @P1 BRA 0x40",  # inner back edge
    "0070 @!P2 BRA P3, 0x90",
    "0080 CALL.REL.NOINC 0x120",
    "0090 STG.E.128 desc[UR4][R6.64], R4",
    "00a0 ISETP.GE.AND P0, PT, R8, R10, PT",
    "00b0 @!P0 BRA 0x20",  # grid-stride back edge
    "00c0 SHFL.DOWN PT, R3, R2, 0x1, 0x1f",  # reduction loop: no global store
    "00d0 @P4 BRA 0xc0",
    "00e0 STG.E desc[UR4][R10.64], R3",
    "00f0 EXIT",
    "0100 BRA 0x100",
    "0110 NOP",
    "0120 RET.REL.NODEC R20 0x0",
)

# An unrolled loop and its remainder, as nvcc emits for a short grid-stride body.
UNROLLED = sass(
    "code for sm_80",
    "Function : _Z3oldPf",
    "0000 EXIT",
    "code for sm_90",
    "Function : _Z8unrolledPf",
    "0000 LDG.E R4, desc[UR4][R2.64]",  # remainder loop
    "0010 STG.E desc[UR4][R6.64], R4",
    "0020 @P1 BRA 0x0",
    "0030 @!P0 EXIT",
    "0040 LDG.E R4, desc[UR4][R2.64]",  # main loop, four elements per trip
    "0050 LDG.E R5, desc[UR4][R2.64+0x4]",
    "0060 LDG.E R6, desc[UR4][R2.64+0x8]",
    "0070 LDG.E R7, desc[UR4][R2.64+0xc]",
    "0080 STG.E desc[UR4][R8.64], R4",
    "0090 STG.E desc[UR4][R8.64+0x4], R5",
    "00a0 STG.E desc[UR4][R8.64+0x8], R6",
    "00b0 STG.E desc[UR4][R8.64+0xc], R7",
    "00c0 @P0 BRA.U !UP0, 0x40",
    "00d0 EXIT",
    "00e0 BRA 0xe0",
)


def test_parse_sass_reads_functions_arches_and_predicates():
    functions = sc.parse_sass(UNROLLED)
    assert [(f.mangled, f.arch, len(f.instructions)) for f in functions] == [
        ("_Z3oldPf", "sm_80", 1),
        ("_Z8unrolledPf", "sm_90", 15),
    ]
    branch = functions[1].instructions[2]
    assert (branch.address, branch.predicate, branch.opcode, branch.operands) == (0x20, "@P1", "BRA", "0x0")
    assert functions[1].instructions[4].opcode == "LDG.E"


def test_hot_loop_is_the_outermost_loop_that_stores():
    (fn,) = sc.parse_sass(GRID_STRIDE)
    loops = sc.find_loops(fn.instructions)
    # The grid-stride, inner and reduction loops; the final `BRA .` is not one.
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0xB0), (0x40, 0x60), (0xC0, 0xD0)]
    hot = sc.find_hot_loop(fn.instructions)
    assert (hot.loop.start, hot.loop.end, hot.unroll, len(hot.candidates)) == (0x20, 0xB0, 1, 1)
    summary = hot.loop.summary()
    assert summary["instructions"] == 10
    assert summary["global_stores"] == 1 and summary["global_loads"] == 1
    assert summary["branches"] == 2  # the inner back edge and the forward branch; not its own back edge
    assert summary["calls"] == 1


# focal_ids_kernel's shape: an outer loop (the slow chunks, with a call) around the hot loop, which
# alone stores 16-byte packs.
NESTED = sass(
    "code for sm_90",
    "Function : _Z16focal_ids_kernelIfLN5focal9GammaKindE2EEvv",
    "0000 MOV R1, c[0x0][0x28]",
    "0010 LDG.E.64 R2, desc[UR4][R4.64]",        # outer loop: the class id
    "0020 LDG.E.128 R8, desc[UR4][R6.64]",       # hot loop start
    "0030 FFMA R8, R8, R9, R10",
    "0040 STG.E.128 desc[UR4][R6.64], R8",
    "0050 STG.E.128 desc[UR4][R12.64], R8",
    "0060 @P0 BRA 0x20",                         # hot loop end
    "0070 CALL.REL.NOINC 0x100",
    "0080 STG.E desc[UR4][R6.64], R8",
    "0090 @P1 BRA 0x10",                         # outer loop end
    "00a0 EXIT",
    "00b0 BRA 0xb0",
)


def test_hot_loop_is_the_innermost_loop_that_stores_packs():
    (fn,) = sc.parse_sass(NESTED)
    hot = sc.find_hot_loop(fn.instructions)
    assert (hot.loop.start, hot.loop.end, hot.unroll) == (0x20, 0x60, 1)
    assert hot.loop.summary()["calls"] == 0


@pytest.mark.skipif(sc.find_demangler() is None, reason="needs c++filt (binutils) to demangle kernel names")
def test_focal_ids_kernel_is_the_class_id_kernel_with_two_packs_per_trip():
    """Its name, not its template arguments, says ClassId; a trip takes 32 bytes: 8 float32."""
    (record,) = sc.analyse(NESTED, "", "sm_90", sc.DEFAULT_KERNEL_PATTERN, {"GammaKind": ["Zero", "One", "Two"]},
                           sc.find_demangler())
    assert (record["dtype"], record["target"], record["gamma"]) == ("float32", "ClassId", "Two")
    assert record["hot_loop"]["elements_per_iteration"] == 8
    assert record["hot_loop"]["instructions_per_element"] == 5 / 8


# Two copies of one loop, unswitched on an optional output: the second also stores the loss.
UNSWITCHED = sass(
    "code for sm_90",
    "Function : _Z8unswitchPf",
    "0000 LDG.E.128 R4, desc[UR4][R2.64]",   # gradient only
    "0010 LDG.E.128 R8, desc[UR4][R12.64]",
    "0020 STG.E.128 desc[UR4][R14.64], R4",
    "0030 @P1 BRA 0x0",
    "0040 LDG.E.128 R4, desc[UR4][R2.64]",   # loss and gradient
    "0050 LDG.E.128 R8, desc[UR4][R12.64]",
    "0060 STG.E.128 desc[UR4][R14.64], R4",
    "0070 STG.E.128 desc[UR4][R16.64], R8",
    "0080 @P2 BRA 0x40",
    "0090 EXIT",
    "00a0 BRA 0xa0",
)


def test_unswitched_copies_are_not_an_unroll():
    (fn,) = sc.parse_sass(UNSWITCHED)
    hot = sc.find_hot_loop(fn.instructions)
    assert (hot.loop.start, hot.unroll, len(hot.candidates)) == (0x40, 1, 2)


def test_unrolled_loop_counts_its_unroll_factor():
    fn = sc.parse_sass(UNROLLED)[1]
    hot = sc.find_hot_loop(fn.instructions)
    assert (hot.loop.start, hot.loop.end) == (0x40, 0xC0)  # the longer of the two, `BRA.U !UP0, addr` parsed
    assert hot.unroll == 4 and len(hot.candidates) == 2
    assert hot.loop.summary()["branches"] == 0


def test_function_without_loop_has_no_hot_loop():
    fn = sc.parse_sass(UNROLLED)[0]
    assert sc.find_loops(fn.instructions) == []
    assert sc.find_hot_loop(fn.instructions) is None
    only_end = sc.parse_sass(sass("code for sm_90", "Function : f", "0000 STG.E [R2], R3", "0010 EXIT", "0020 BRA 0x20"))
    assert sc.find_hot_loop(only_end[0].instructions) is None


def test_occupancy_from_registers_and_block_size():
    # sm_90: 65536 registers, allocated per warp in units of 256, at most 64 warps and 32 blocks.
    assert sc.occupancy(40, 256) == 0.75  # 1280 registers a warp: 51 warps, 6 blocks of 8
    assert sc.occupancy(41, 256) == 0.625  # 48 a thread once rounded: 42 warps, 5 blocks
    assert sc.occupancy(64, 256) == 0.5
    assert sc.occupancy(32, 256) == 1.0
    assert sc.occupancy(40, 128) == 0.75  # 12 blocks of 4 warps
    assert sc.occupancy(32, 64) == 1.0 and sc.occupancy(16, 32) == 0.5  # the 32-block limit
    assert sc.occupancy(40, 256, "sm_89") == 1.0 and sc.occupancy(64, 256, "sm_89") == 32 / 48  # 48 warps
    # Shared memory: 228 KiB an SM on sm_90, 100 KiB on sm_89, 1 KiB of it a block's own.
    assert sc.occupancy(40, 256, shared_bytes=25 * 1024) == 0.75  # 8 blocks would fit, registers allow 6
    assert sc.occupancy(40, 256, shared_bytes=56 * 1024) == 0.5  # 4 blocks of 57 KiB
    assert sc.occupancy(40, 256, "sm_89", shared_bytes=24 * 1024) == 32 / 48  # 4 blocks of 25 KiB


def test_bytes_in_flight_stop_at_the_first_use():
    loop = sc.Loop(0, 0x90, tuple(sc.parse_sass(sass(
        "code for sm_90",
        "Function : f",
        "0000 IMAD.WIDE R2, R0, 0x10, R4",
        "0010 @!P1 LDG.E.128 R8, desc[UR4][R2.64]",
        "0020 LDG.E.64 R12, desc[UR4][R6.64]",
        "0030 LD.E.128 R16, desc[UR4][R2.64+0x200]",
        "0040 ISETP.NE.AND P0, PT, R14, RZ, PT",  # R14 is no load's: not a use
        "0050 FMUL R20, R10, R11",  # R10: the first load's
        "0060 LDG.E.128 R24, desc[UR4][R2.64+0x400]",
        "0070 STG.E.128 desc[UR4][R6.64], R8",
        "0080 EXIT",
        "0090 @P0 BRA 0x0",
    ))[0].instructions))
    assert sc.bytes_in_flight(loop) == {"bytes": 40, "loads": 3}
    stored_first = sc.Loop(0, 0x20, tuple(sc.parse_sass(sass(
        "code for sm_90", "Function : g",
        "0000 LDG.E R8, desc[UR4][R2.64]",
        "0010 STG.E desc[UR4][R6.64], R8",  # a store reads its operands: a use
        "0020 @P0 BRA 0x0",
    ))[0].instructions))
    assert sc.bytes_in_flight(stored_first) == {"bytes": 4, "loads": 1}


def test_passes_are_the_innermost_loops_that_load():
    """A row loop around three passes (two loads in flight, then one, then a pass that stores), and
    an inner loop that only stores (an ignored row's zeros): the passes are the three loading ones."""
    fn = sc.parse_sass(sass(
        "code for sm_90", "Function : rows",
        "0000 S2R R0, SR_TID.X",  # row loop head
        "0010 LDG.E R4, desc[UR4][R2.64]",  # maximum: both loads before the first use
        "0020 LDG.E R5, desc[UR4][R2.64+0x100]",
        "0030 FMNMX R6, R4, R5, !PT",
        "0040 @P0 BRA 0x10",
        "0050 LDG.E R4, desc[UR4][R2.64]",  # sum of exponentials: one
        "0060 FADD R7, R4, -R6",
        "0070 MUFU.EX2 R7, R7",
        "0080 @P1 BRA 0x50",
        "0090 LDG.E.U16 R4, desc[UR4][R2.64]",  # gradient
        "00a0 STG.E.U16 desc[UR4][R8.64], R4",
        "00b0 @P2 BRA 0x90",
        "00c0 STG.E desc[UR4][R8.64], RZ",  # zeros: no load
        "00d0 @P3 BRA 0xc0",
        "00e0 @P4 BRA 0x0",  # row loop
        "00f0 EXIT",
    ))[0]
    found = sc.passes(fn.instructions)
    assert [(p["start"], p["global_loads"], p["global_stores"], p["bytes_in_flight"]) for p in found] == [
        ("0x10", 2, 0, 8), ("0x50", 1, 0, 4), ("0x90", 1, 1, 2)]
    assert [p["instructions_per_load"] for p in found] == [2.0, 4.0, 3.0]


def test_bytes_in_flight_of_a_ring_of_async_copies():
    # Two packs a trip, each a group of a 16-byte and an 8-byte cp.async, waited for with two
    # groups left pending: three groups of 24 bytes are in flight at every wait.
    ring = sc.Loop(0, 0xf0, tuple(sc.parse_sass(sass(
        "code for sm_90", "Function : h",
        "0000 DEPBAR.LE SB0, 0x2",
        "0010 LDS.128 R8, [R2]",
        "0020 LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64]",
        "0030 LDGSTS.E.64 [R3], desc[UR4][R6.64]",
        "0040 LDGDEPBAR",
        "0050 FMUL R8, R8, R9",
        "0060 STG.E.128 desc[UR4][R10.64], R8",
        "0070 DEPBAR.LE SB0, 0x2",
        "0080 LDS.128 R8, [R2+0x1000]",
        "0090 LDGSTS.E.BYPASS.128 [R2+0x1000], desc[UR4][R4.64+0x200]",
        "00a0 LDGSTS.E.64 [R3+0x800], desc[UR4][R6.64+0x8]",
        "00b0 LDGDEPBAR",
        "00c0 FMUL R8, R8, R9",
        "00d0 STG.E.128 desc[UR4][R10.64+0x200], R8",
        "00f0 @P0 BRA 0x0",
    ))[0].instructions))
    assert sc.bytes_in_flight(ring) == {"bytes": 72, "loads": 6}


def test_launch_shape_and_roofline_check():
    name = ("void focal::cuda::focal_ids_kernel<c10::BFloat16, (focal::GammaKind)2, (focal::LossKind)0, "
            "focal::cuda::LaunchShape<256, 64, 6> >(focal::KernelArgs, focal::cuda::ScaleArgs)")
    args = sc.split_template_args(name, re.compile(r"\bfocal_ids_kernel<"))
    shape = sc.parse_launch_shape(args)
    assert shape == {"threads": 256, "in_flight_bytes": 64, "blocks_per_sm": 6, "async_loads": False}
    assert sc.parse_launch_shape(["focal::cuda::LaunchShape<256, 64, 6, true>"])["async_loads"] is True
    assert sc.KERNEL_FACTS["focal_ids_kernel"]["shape_bytes"](64) == 64
    assert sc.KERNEL_FACTS["focal_float_kernel"]["shape_bytes"](64) == 32
    assert sc.KERNEL_FACTS["focal_float_kernel"]["shape_bytes"](32) == 16
    record = {"kernel": "focal_ids_kernel", "dtype": "bfloat16", "gamma": "Two", "launch_shape": shape,
              "registers": 40, "occupancy": 0.75,
              "hot_loop": {"bytes_in_flight": 72, "spill_stores": 0, "spill_loads": 2,
                           "instructions_per_element": 27.5}}
    results = sc.check_roofline([record], {("focal_ids_kernel", "bfloat16"): 28.0,
                                           ("focal_float_kernel", "bfloat16"): 41.0})
    status = {(r["kernel"], r["check"]): (r["status"], r["measured"]) for r in results}
    assert status == {
        ("focal_ids_kernel", "occupancy"): ("PASS", 0.75),
        ("focal_ids_kernel", "bytes_in_flight"): ("PASS", 72),
        ("focal_ids_kernel", "hot_loop_spills"): ("FAIL", 2),
        ("focal_ids_kernel", "instructions_per_element"): ("PASS", 27.5),
        ("focal_float_kernel", "instantiation"): ("FAIL", None),
    }
    other_shape = sc.check_roofline([record], {("focal_ids_kernel", "bfloat16"): 28.0},
                                    shape={"threads": 128, "in_flight_bytes": 32, "blocks_per_sm": 12,
                                           "async_loads": False})
    assert [r["status"] for r in other_shape] == ["FAIL"]


def test_resource_usage():
    text = textwrap.dedent("""\
        Fatbin elf code:
        ================
        arch = sm_90
        code version = [1,8]

        Resource usage:
         Common:
          GLOBAL:28 CONSTANT[4]:224
         Function _Z6kernelPf:
          REG:58 STACK:16 SHARED:1068 LOCAL:8 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0
        """)
    usage = sc.parse_resource_usage(text)
    assert usage == {("sm_90", "_Z6kernelPf"): {"REG": 58, "STACK": 16, "SHARED": 1068, "LOCAL": 8, "CONSTANT[0]": 664,
                                                 "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}}


def test_template_arguments_are_named_from_the_source_enums(tmp_path):
    (tmp_path / "kinds.h").write_text(textwrap.dedent("""\
        enum class TargetKind {
          kFloat,    // dense, {not, an, enumerator}
          kClassId,  /* ids */
        };
        enum class GammaKind : int { kZero = 0, kTwo = 2, kGeneral };
        """))
    enums = sc.read_enums(tmp_path)
    assert enums == {"TargetKind": ["Float", "ClassId"], "GammaKind": ["Zero", "1", "Two", "General"]}
    name = ("void focal::cuda::(anonymous namespace)::focal_kernel<c10::BFloat16, (focal::TargetKind)1, "
            "(focal::GammaKind)3, 8>(focal::FocalArgs, bool, at::OpMathType<c10::BFloat16>::type const*)")
    pattern = re.compile(r"\bfocal_kernel<")
    args = sc.split_template_args(name, pattern)
    assert args == ["c10::BFloat16", "(focal::TargetKind)1", "(focal::GammaKind)3", "8"]
    info = sc.describe_instantiation(args, enums)
    assert (info["dtype"], info["element_bytes"], info["target"], info["gamma"], info["extra"]) == (
        "bfloat16", 2, "ClassId", "General", ["8"])
    nested = sc.split_template_args("k<std::pair<float, int>, (focal::GammaKind)9>()", re.compile(r"\bk<"))
    assert nested == ["std::pair<float, int>", "(focal::GammaKind)9"]
    assert sc.describe_instantiation(nested, enums)["gamma"] == "GammaKind=9"  # out of range: raw value


def _record(dtype, target, gamma, per_element):
    hot = None if per_element is None else {"instructions_per_element": per_element}
    return {"dtype": dtype, "target": target, "gamma": gamma, "hot_loop": hot}


def test_budgets_pass_fail_and_fail_when_nothing_matches():
    records = [_record("float32", "ClassId", "Two", 50.0), _record("bfloat16", "ClassId", "Two", 30.0),
               _record("float16", "ClassId", "Two", None)]
    results = sc.check_budgets(records, {
        ("float32", "ClassId", "Two"): 55, ("bfloat16", "ClassId", "Two"): 28,
        ("float64", "ClassId", "Two"): 100, ("float16", "ClassId", "Two"): 100,
    })
    assert [(r["status"], r["measured"]) for r in results] == [("PASS", 50.0), ("FAIL", 30.0), ("FAIL", None), ("FAIL", None)]
    assert results[2]["note"] == "no instantiation matched" and results[3]["note"] == "no hot loop found"
    assert sc.parse_budget("bf16,ClassId,Two=28") == (("bfloat16", "ClassId", "Two"), 28.0)
    with pytest.raises(Exception, match="DTYPE,TARGET,GAMMA=N"):
        sc.parse_budget("float32=55")


# --------------------------------------------------------------------------------------------------
# End to end on real compiler output

NVCC = (sc.cuda_home() / "bin" / "nvcc") if sc.cuda_home() and (sc.cuda_home() / "bin" / "nvcc").is_file() else shutil.which("nvcc")
CUOBJDUMP = sc.find_tool("cuobjdump", "CUOBJDUMP")
DEMANGLER = sc.find_demangler()
needs_toolkit = pytest.mark.skipif(
    not (NVCC and CUOBJDUMP and DEMANGLER),
    reason=f"needs nvcc ({NVCC}), cuobjdump ({CUOBJDUMP}) and c++filt/cu++filt ({DEMANGLER})",
)

TINY_KERNEL = """\
#include "kinds.h"
namespace focal::cuda { namespace {
template <typename scalar_t, TargetKind TK, GammaKind G>
__global__ void focal_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, long n) {
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    float v = (float)x[i];
    if (G == GammaKind::kTwo) v = v * v;
    if (TK == TargetKind::kClassId) v = v + 1.f;
    y[i] = (scalar_t)v;
  }
}
__global__ void other_kernel(float* y) { y[threadIdx.x] = 0.f; }
}  // namespace
void launch(const float* x, float* y, long n) {
  focal_kernel<float, TargetKind::kClassId, GammaKind::kTwo><<<1, 32>>>(x, y, n);
  focal_kernel<double, TargetKind::kFloat, GammaKind::kZero><<<1, 32>>>((const double*)x, (double*)y, n);
  other_kernel<<<1, 32>>>(y);
}
}  // namespace focal::cuda
"""


@pytest.fixture(scope="module")
def tiny_cubin(tmp_path_factory):
    src = tmp_path_factory.mktemp("tiny")
    (src / "kinds.h").write_text("namespace focal {\nenum class TargetKind { kFloat, kClassId };\n"
                                 "enum class GammaKind { kZero, kOne, kTwo };\n}\n")
    (src / "tiny.cu").write_text(TINY_KERNEL)
    cubin = src / "tiny.cubin"
    subprocess.run([str(NVCC), "-cubin", "-arch=sm_90", "-O3", "-o", str(cubin), str(src / "tiny.cu")],
                   check=True, capture_output=True, timeout=120)
    return cubin


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


@needs_toolkit
def test_tiny_kernel_end_to_end(tiny_cubin, tmp_path):
    out = tmp_path / "sass.json"
    proc = _run("--binary", tiny_cubin, "--source", tiny_cubin.parent, "--kernel", r"\bfocal_kernel<", "--elements-per-iteration", 1,
                "--budget", "float32,ClassId,Two=1000", "--check", "--json", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    kernels = {(k["dtype"], k["target"], k["gamma"]): k for k in result["kernels"]}
    assert set(kernels) == {("float32", "ClassId", "Two"), ("float64", "Float", "Zero")}  # not other_kernel
    for k in kernels.values():
        hot = k["hot_loop"]
        assert k["registers"] > 0 and k["spill_stores"] == k["spill_loads"] == 0
        # One element and one global store per trip of the source loop: the unroll factor the
        # script derives must be the number of stores in the loop it picked.
        assert hot["global_stores"] == hot["unroll"] == hot["elements_per_iteration"]
        assert hot["instructions_per_element"] == pytest.approx(hot["instructions"] / hot["unroll"])
        assert hot["instructions"] < k["function_instructions"]
        assert (hot["start"], hot["end"]) in {(lp["start"], lp["end"]) for lp in k["loops"]}
    assert result["budgets"][0]["status"] == "PASS" and result["budgets_ok"]
    assert "float32   ClassId" in proc.stdout and "PASS" in proc.stdout


@needs_toolkit
def test_tiny_kernel_budget_failure_and_errors(tiny_cubin):
    kernel = ("--kernel", r"\bfocal_kernel<")
    too_tight = _run("--binary", tiny_cubin, "--source", tiny_cubin.parent, *kernel, "--budget", "float32,ClassId,Two=0.5", "--check")
    assert too_tight.returncode == 1 and "FAIL float32 ClassId gamma Two" in too_tight.stdout
    without_check = _run("--binary", tiny_cubin, "--source", tiny_cubin.parent, *kernel, "--budget", "float32,ClassId,Two=0.5")
    assert without_check.returncode == 0 and "FAIL" in without_check.stdout
    renamed = _run("--binary", tiny_cubin, "--source", tiny_cubin.parent, *kernel, "--check")  # default budgets: no bfloat16 here
    assert renamed.returncode == 1 and "no instantiation matched" in renamed.stdout
    wrong_arch = _run("--binary", tiny_cubin, "--arch", "sm_80")
    assert wrong_arch.returncode == 2 and "no sm_80 code in the binary (it holds: sm_90)" in wrong_arch.stderr
    no_match = _run("--binary", tiny_cubin, "--kernel", r"\bnot_a_kernel<")
    assert no_match.returncode == 2 and "matches" in no_match.stderr
    missing = _run("--binary", tiny_cubin.parent / "missing.so")
    assert missing.returncode == 2 and "no binary to read" in missing.stderr


BUILT = sc.default_binary()


SHAPE_NAMES = {(256, 64, 4): "t256_f64_b4", (128, 32, 12): "t128_f32_b12", (256, 64, 6): "t256_f64_b6"}
# What the launch shapes other than t256_f64_b6 give up by design, for both roofline kernels and
# every 16- and 32-bit dtype, with the number measured: t256_f64_b4 its occupancy (64 registers a
# thread: 50 %), t128_f32_b12 its bytes in flight (two 16-byte packs of logits, or of logits and
# targets, and, for class ids, their rows' ids).
BY_DESIGN = {
    **{(kernel, dtype, "t256_f64_b4", "occupancy"): 0.5
       for kernel in ("focal_ids_kernel", "focal_float_kernel") for dtype in ("float32", "bfloat16", "float16")},
    **{("focal_float_kernel", dtype, "t128_f32_b12", "bytes_in_flight"): 32
       for dtype in ("float32", "bfloat16", "float16")},
    ("focal_ids_kernel", "float32", "t128_f32_b12", "bytes_in_flight"): 56,
    ("focal_ids_kernel", "bfloat16", "t128_f32_b12", "bytes_in_flight"): 52,
    ("focal_ids_kernel", "float16", "t128_f32_b12", "bytes_in_flight"): 52,
}
# The roofline budgets the built kernels miss (sm_90, nvcc 13.0), with the number measured:
# (kernel, dtype, launch shape name, check) -> measured. Only those above, by design: every shape
# meets the instruction budget in every dtype, and shape 2 meets all four. Kept here rather than
# loosened, so that a change in either direction fails the test below and is written down
# (csrc/cuda/README.md).
KNOWN_MISSES = dict(BY_DESIGN)


def _shape_name(shape):
    return SHAPE_NAMES.get((shape["threads"], shape["in_flight_bytes"], shape["blocks_per_sm"]))


# The loss kernels of the built extension (the sigmoid family's three, the softmax's four), read by
# one run of the script: its listing of a
# two-architecture build is some 400 MB, which takes cuobjdump and the parser most of a minute.
BUILT_KERNELS = (r"\b(?:focal_ids_kernel|focal_float_kernel|focal_kernel|softmax_elements_kernel"
                 r"|softmax_elements_ring_kernel|softmax_warp_rows_kernel|softmax_rows_kernel)<")


# The general kernel's instantiations that spill (sm_90, nvcc 13.0): (dtype, target kind, gamma kind,
# loss) -> (spill stores, spill loads); none did before element() (focal_kernels.cuh) applied a
# per-class alpha tensor, under the 64 registers of 4 blocks of 256 threads per SM. Mostly 16-bit
# float targets and smoothed class ids, a few instructions each, outside the roofline kernels
# (which take no tensor alpha).
KNOWN_SPILLS = {
    ('bfloat16', 'ClassIdSmoothed', 'General', 'LossKind::Focal'): (8, 9),
    ('bfloat16', 'ClassIdSmoothed', 'General', 'LossKind::FocalStar'): (2, 2),
    ('bfloat16', 'Float', 'General', 'LossKind::Focal'): (2, 2),
    ('bfloat16', 'Float', 'General', 'LossKind::FocalStar'): (2, 2),
    ('bfloat16', 'Float', 'General', 'LossKind::Quality'): (2, 2),
    ('bfloat16', 'Float', 'General', 'LossKind::Varifocal'): (2, 2),
    ('bfloat16', 'Float', 'One', 'LossKind::Focal'): (4, 5),
    ('bfloat16', 'Float', 'One', 'LossKind::Quality'): (4, 5),
    ('bfloat16', 'Float', 'One', 'LossKind::Varifocal'): (2, 2),
    ('bfloat16', 'Float', 'Two', 'LossKind::Focal'): (2, 2),
    ('bfloat16', 'Float', 'Two', 'LossKind::Quality'): (2, 2),
    ('bfloat16', 'Float', 'Two', 'LossKind::Varifocal'): (2, 2),
    ('bfloat16', 'Float', 'Zero', 'LossKind::Focal'): (4, 5),
    ('bfloat16', 'Float', 'Zero', 'LossKind::Quality'): (2, 2),
    ('bfloat16', 'Float', 'Zero', 'LossKind::Varifocal'): (2, 2),
    ('float16', 'ClassIdSmoothed', 'General', 'LossKind::Focal'): (8, 9),
    ('float16', 'ClassIdSmoothed', 'General', 'LossKind::FocalStar'): (2, 2),
    ('float16', 'Float', 'General', 'LossKind::Focal'): (2, 2),
    ('float16', 'Float', 'General', 'LossKind::FocalStar'): (2, 2),
    ('float16', 'Float', 'General', 'LossKind::Quality'): (2, 2),
    ('float16', 'Float', 'General', 'LossKind::Varifocal'): (2, 2),
    ('float16', 'Float', 'One', 'LossKind::Focal'): (4, 5),
    ('float16', 'Float', 'One', 'LossKind::Quality'): (4, 5),
    ('float16', 'Float', 'One', 'LossKind::Varifocal'): (2, 2),
    ('float16', 'Float', 'Two', 'LossKind::Focal'): (2, 2),
    ('float16', 'Float', 'Two', 'LossKind::Quality'): (2, 2),
    ('float16', 'Float', 'Two', 'LossKind::Varifocal'): (2, 2),
    ('float16', 'Float', 'Zero', 'LossKind::Focal'): (4, 5),
    ('float16', 'Float', 'Zero', 'LossKind::Quality'): (2, 2),
    ('float16', 'Float', 'Zero', 'LossKind::Varifocal'): (2, 2),
    ('float32', 'Float', 'Two', 'LossKind::Quality'): (1, 1),
    ('float64', 'Float', 'General', 'LossKind::Varifocal'): (1, 1),
}


# The script on the built extension, beside the rest of the suite (tests/background.py): its listing
# is most of half a minute of cuobjdump and parsing.
LISTING = background.Job(lambda folder: [sys.executable, SCRIPT, "--roofline", "--kernel", BUILT_KERNELS,
                                         "--json", folder / "built.json"])
# Only a build with CUDA code and the toolkit's tools have a listing to wait for.
uses_listing = pytest.mark.background(LISTING) if NVCC and CUOBJDUMP and DEMANGLER and BUILT else needs_toolkit


@pytest.fixture(scope="module")
def built():
    """The script's JSON for the built extension (sm_90, the roofline checks on), or a skip when the
    extension holds no sm_90 code."""
    if not (NVCC and CUOBJDUMP and DEMANGLER):
        pytest.skip(f"needs nvcc ({NVCC}), cuobjdump ({CUOBJDUMP}) and c++filt/cu++filt ({DEMANGLER})")
    if BUILT is None:
        pytest.skip("focal/_C*.so is not built")
    proc = LISTING.result(timeout=300)
    if proc.returncode == 2 and ("no sm_90 code" in proc.stderr or "does not contain device code" in proc.stderr):
        pytest.skip(f"{BUILT} holds no sm_90 code (CPU-only build, or built for other arches)")
    # 1: a roofline budget is missed (KNOWN_MISSES says which).
    assert proc.returncode in (0, 1), proc.output
    assert "roofline budgets" in proc.stdout
    return json.loads((proc.folder / "built.json").read_text())


@uses_listing
def test_built_extension_roofline_budgets(built):
    """The class-id and float-target kernels of the built extension in every launch shape and
    dtype: every instantiation has its hot loop, taking its shape's bytes per trip, with no call in
    it (float64's libm calls and the IEEE division of the float32 float-target kernel at a general
    gamma apart: at gamma 0, 1 and 2 the soft target's gradient has no quotient); each roofline budget
    (occupancy >= 75 %, >= 64 bytes in flight, no spill in the hot loop, instructions per element)
    holds, or misses by exactly the number KNOWN_MISSES records (among them what shapes 0 and 1 give
    up by design, BY_DESIGN). No hot loop spills."""
    size = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
    kernels = [k for k in built["kernels"] if k["kernel"] in ("focal_ids_kernel", "focal_float_kernel")]
    shaped = {(k["kernel"], k["dtype"], _shape_name(k["launch_shape"])) for k in kernels
              if k["dtype"] != "float64" and k["gamma"] == "Two"}
    assert shaped == {(kernel, d, name) for kernel in ("focal_ids_kernel", "focal_float_kernel")
                      for d in ("float32", "bfloat16", "float16") for name in SHAPE_NAMES.values()}
    for k in kernels:
        hot, shape = k["hot_loop"], k["launch_shape"]
        assert hot is not None and hot["global_stores"] >= 1 and shape is not None, k["name"]
        trip = shape["in_flight_bytes"] if k["kernel"] == "focal_ids_kernel" else max(16, shape["in_flight_bytes"] // 2)
        assert hot["elements_per_iteration"] == trip // size[k["dtype"]], k["name"]
        # The loop counted is a trip of the shape's packs, not the partial tile's loop of one pack:
        # two 16-byte stores a pack (class ids: the gradient, or an ignored row's zeros; float
        # targets: the loss and the gradient).
        assert hot["global_stores"] == 2 * (trip // 16), (k["name"], hot["global_stores"])
        float32_division = (k["kernel"], k["dtype"], k["gamma"]) == ("focal_float_kernel", "float32", "General")
        assert hot["calls"] == 0 or k["dtype"] == "float64" or float32_division, k["name"]
    misses, unexpected = {}, []
    for r in built["roofline"]:
        key = (r["kernel"], r["dtype"], _shape_name(r["shape"]), r["check"])
        if r["status"] == "FAIL":
            misses[key] = r["measured"]
        elif key in KNOWN_MISSES:
            unexpected.append(f"{key} now passes ({r['measured']}): remove it from KNOWN_MISSES")
    for key, measured in misses.items():
        if key not in KNOWN_MISSES:
            unexpected.append(f"{key} misses its budget: {measured}")
        elif measured != pytest.approx(KNOWN_MISSES[key], abs=0.05):
            unexpected.append(f"{key} moved: {measured}, KNOWN_MISSES has {KNOWN_MISSES[key]}")
    assert not unexpected, "\n".join(unexpected)


def _softmax_variant(k) -> str:
    """The variant of a softmax kernel: c1 / c16 (classes per load) of the thread-per-element one,
    w16 / w32 (lanes per row) of the warp-per-row one, "rows" for the block-per-row one; the row
    kernels' with "-ring" where they stage their rows in shared memory."""
    args = k["other_template_args"]
    if k["kernel"] == "softmax_elements_ring_kernel":  # ring-rows, ring-pixelpieces, ring-pixelwords
        return "ring-" + args[0].removeprefix("ElementLayout::").lower()
    if k["kernel"] == "softmax_elements_kernel":
        return f"c{args[1]}"
    if k["kernel"] == "softmax_warp_rows_kernel":
        return f"w{args[1]}" + ("-ring" if args[2] == "true" else "")
    return "rows" + ("-ring" if args[1] == "true" else "")


def _smoothing(k) -> str:
    """Whether a softmax kernel has label smoothing ("true" / "false"; the thread-per-element
    kernel's ring has none)."""
    return "false" if k["kernel"] == "softmax_elements_ring_kernel" else k["other_template_args"][0]


@uses_listing
def test_built_extension_softmax_kernels_never_spill_and_hold_their_occupancy_at_gamma_2(built):
    """The softmax focal loss's three kernels (blocks of 128 threads) in every dtype, gamma kind and
    smoothing, the thread-per-element one in both variants (c16 only without smoothing and not in
    float64): no local memory in any pass over the classes, and none at all at gamma 0, 1 and 2 (at a
    general gamma nvcc keeps a value or three of the thread-per-element kernel in local memory
    across its tiles, loaded once per tile); and at gamma 2 without label smoothing, the common case, in 16- and
    32-bit data: c1, the warp-per-row and the block-per-row kernels at most 40 registers (75 %
    occupancy; the row kernels' ring variants with their 16 KiB of shared memory per block too);
    c16, which holds a chunk of 16 classes, at least 50 % occupancy with 64 bytes in flight in
    float32 (csrc/cuda/README.md). Bytes in flight are read pass by pass in the next test."""
    names = ("softmax_elements_kernel", "softmax_elements_ring_kernel", "softmax_warp_rows_kernel", "softmax_rows_kernel")
    kernels = [k for k in built["kernels"] if k["kernel"] in names]
    found = {(k["kernel"], k["dtype"], k["gamma"], _smoothing(k), _softmax_variant(k)) for k in kernels}
    dtypes, gammas = ("float32", "bfloat16", "float16", "float64"), ("Zero", "One", "Two", "General")
    want = {("softmax_rows_kernel", d, g, smooth, "rows") for d in dtypes for g in gammas for smooth in ("false", "true")}
    want |= {("softmax_rows_kernel", d, g, smooth, "rows-ring") for d in dtypes[:3] for g in gammas
             for smooth in ("false", "true")}
    want |= {("softmax_warp_rows_kernel", d, g, smooth, f"w{lanes}") for d in dtypes for g in gammas
             for smooth in ("false", "true") for lanes in (16, 32)}
    want |= {("softmax_warp_rows_kernel", d, g, smooth, f"w{lanes}-ring") for d in dtypes[:3] for g in gammas
             for smooth in ("false", "true") for lanes in (16, 32)}
    want |= {("softmax_elements_kernel", d, g, smooth, "c1") for d in dtypes for g in gammas for smooth in ("false", "true")}
    want |= {("softmax_elements_kernel", d, g, "false", "c16") for d in dtypes[:3] for g in gammas}
    want |= {("softmax_elements_ring_kernel", d, g, "false", f"ring-{layout}") for d in dtypes[:3] for g in gammas
             for layout in ("rows", "pixelpieces", "pixelwords")}
    assert found == want
    for k in kernels:
        if k["dtype"] != "float64":  # float64 is not budgeted: its exp and log are libm calls
            assert all(p["spill_stores"] == p["spill_loads"] == 0 for p in k["passes"]), k["name"]
            if k["gamma"] != "General":
                assert k["spill_stores"] == k["spill_loads"] == k["local_bytes"] == 0, k["name"]
            else:
                assert k["spill_stores"] + k["spill_loads"] <= 6, k["name"]
        if k["gamma"] == "Two" and _smoothing(k) == "false" and k["dtype"] != "float64":
            if _softmax_variant(k) == "c16":
                assert k["occupancy"] >= 0.5, (k["name"], k["registers"], k["occupancy"])
            else:
                assert k["registers"] <= 40 and k["occupancy"] >= 0.75, (k["name"], k["registers"], k["occupancy"])


# The softmax kernels' passes over a row (sass_count.passes), bytes in flight of each in address
# order, at gamma 2 without smoothing (sm_90, nvcc 13.0): c1 has one loop per pass (maximum, sum of
# exponentials, gradient; in 16-bit data ptxas unrolls the sum's, with a remainder loop), all below
# the 64-byte budget; c16 and the block-per-row kernel (chunks of 8 of a thread's classes, 128
# apart) have the whole chunks' loop and the remainder's of each pass: c16 64 bytes or more in its
# float32 chunks (16 classes of 2 bytes are 32 in 16-bit data), the block-per-row kernel 32 in
# float32 (16 in 16-bit data; ptxas unrolls the remainder loops too). The warp-per-row kernel (16
# or 32 lanes per row) makes its three passes over registers: its one pass over memory is its row
# loop's, which requests a lane's 8 logits and the row's class id before it uses any (40 bytes in
# float32, 24 in 16-bit data); the loops nvcc's layout of the ignored rows' and the gradient's
# branches adds after it are not passes. Its ring variant copies its rows into shared memory
# (cp.async) a round ahead and more: 96 bytes per lane in flight in its rounds' loop, at 40
# registers, and makes its three passes as loops over the lane's classes in shared memory; the
# block-per-row kernel's ring variant does the same for a block (64 bytes a thread at each wait).
# A change in either direction fails the test below and is written down here.
KNOWN_SOFTMAX_IN_FLIGHT = {
    **{("softmax_warp_rows_kernel", dtype, lanes): [24 if dtype != "float32" else 40]
       for dtype in ("float32", "bfloat16", "float16") for lanes in ("w16", "w32")},
    # The ring variant: its rounds' loop keeps 6 groups of 16-byte copies in flight per lane (bytes
    # in flight of the loop that copies and waits), and its three passes read shared memory, so
    # what is recorded is their instructions per element (maximum, sum of exponentials, gradient).
    **{("softmax_warp_rows_kernel", dtype, f"{lanes}-ring"): [96, *([11, 25, 27] if dtype == "float32" else [12, 18, 21])]
       for dtype in ("float32", "bfloat16", "float16") for lanes in ("w16", "w32")},
    # The thread-per-element kernel's ring (segmentation logits, and rows): 8 groups of 16 bytes a
    # lane in flight at each wait (7 steps ahead and the one waited for; one copy of 16 bytes, or four
    # of a word for segmentation logits of other image sizes), and the static instructions of its
    # loop over steps, whose three passes' branches each take up to 4 classes of a step in float32
    # and 8 in 16-bit data.
    **{("softmax_elements_ring_kernel", dtype, "ring-pixelpieces"): [128, 491 if dtype == "float32" else 615]
       for dtype in ("float32", "bfloat16", "float16")},
    **{("softmax_elements_ring_kernel", dtype, "ring-pixelwords"): [128, 532 if dtype == "float32" else 674]
       for dtype in ("float32", "bfloat16", "float16")},
    **{("softmax_elements_ring_kernel", dtype, "ring-rows"): [128, 567 if dtype == "float32" else 654]
       for dtype in ("float32", "bfloat16", "float16")},
    # The block-per-row kernel's ring: 4 groups of 16-byte copies a thread in flight at each wait
    # (its rows reach 4 steps past their first), and passes that nvcc unrolls (16 / 4 / 4 classes).
    **{("softmax_rows_kernel", dtype, "rows-ring"): [64, *([86 / 16, 76 / 4, 103 / 4] if dtype == "float32"
                                                         else [102 / 16, 54 / 4, 69 / 4])]
       for dtype in ("float32", "bfloat16", "float16")},
    ("softmax_elements_kernel", "float32", "c1"): [16, 12, 4],
    ("softmax_elements_kernel", "bfloat16", "c1"): [8, 10, 8, 2],
    ("softmax_elements_kernel", "float16", "c1"): [8, 10, 8, 2],
    ("softmax_elements_kernel", "float32", "c16"): [96, 64, 64, 16, 64, 4],
    ("softmax_elements_kernel", "bfloat16", "c16"): [40, 32, 32, 32, 32, 2],
    ("softmax_elements_kernel", "float16", "c16"): [36, 32, 32, 32, 32, 2],
    ("softmax_rows_kernel", "float32", "rows"): [32, 64, 32, 16, 32, 4],
    ("softmax_rows_kernel", "bfloat16", "rows"): [16, 28, 16, 20, 16, 2],
    ("softmax_rows_kernel", "float16", "rows"): [16, 28, 16, 20, 16, 2],
}


@uses_listing
def test_built_extension_softmax_passes_are_read_one_by_one(built):
    """Each pass of the softmax kernels is read on its own: loads only for the maximum and the sum
    of exponentials, then the gradient's pass (c16 and the block-per-row kernel: its chunks' loop
    and its remainder), which stores; each pass's bytes in flight are the ones recorded; the
    warp-per-row kernel's one pass over memory requests a lane's logits and the row's id first; its
    ring variant keeps at least 64 bytes a lane in flight and reads each class from shared memory
    once a pass."""
    expected = dict(KNOWN_SOFTMAX_IN_FLIGHT)
    for k in built["kernels"]:
        key = (k["kernel"], k["dtype"], _softmax_variant(k)) if k["kernel"].startswith("softmax") else None
        if key not in expected or k["gamma"] != "Two" or _smoothing(k) != "false":
            continue
        passes = k["passes"]
        if key[0] == "softmax_elements_ring_kernel":
            bytes_in_flight, step_instructions = expected.pop(key)
            assert k["async_loop"]["bytes_in_flight"] == bytes_in_flight >= 64, (key, k["async_loop"])
            assert k["async_loop"]["instructions"] == step_instructions, (key, k["async_loop"])
            continue
        if key[2].endswith("-ring"):
            bytes_in_flight, *per_element = expected.pop(key)
            assert k["async_loop"]["bytes_in_flight"] == bytes_in_flight >= 64, (key, k["async_loop"])
            assert [p["reads"] for p in passes] == ["shared"] * 3, (key, passes)
            assert [p["global_stores"] > 0 for p in passes] == [False, False, True], (key, passes)
            assert [p["instructions_per_load"] for p in passes] == pytest.approx(per_element), (key, passes)
            continue
        if key[2] in ("w16", "w32"):
            (row, *_) = passes
            assert row["global_loads"] >= 9 and row["global_stores"] > 0, (key, passes)  # 8 logits, the id
            assert [row["bytes_in_flight"]] == expected.pop(key), (key, passes)
            continue
        storing = 2 if key[2] in ("c16", "rows") else 1
        assert [p["global_stores"] > 0 for p in passes] == [False] * (len(passes) - storing) + [True] * storing, (key, passes)
        assert all(p["instructions_per_load"] > 1 for p in passes), (key, passes)
        assert [p["bytes_in_flight"] for p in passes] == expected.pop(key), (key, passes)
    assert not expected, f"not found: {sorted(expected)}"


@uses_listing
def test_built_extension_general_kernel_has_a_hot_loop_per_instantiation(built):
    kernels = [k for k in built["kernels"] if re.search(r"\bfocal_kernel<", k["name"])]
    found = {(k["dtype"], k["target"], k["gamma"]) for k in kernels}
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        for target in ("Float", "ClassId", "ClassIdSmoothed"):
            assert (dtype, target, "Two") in found
    for k in kernels:
        assert k["hot_loop"] is not None and k["hot_loop"]["global_stores"] >= 1, k["name"]
        # No instantiation, the family's included, spills to local memory, but those KNOWN_SPILLS
        # records, by exactly that much.
        key = (k["dtype"], k["target"], k["gamma"], k["other_template_args"][0])
        assert (k["spill_stores"], k["spill_loads"]) == KNOWN_SPILLS.get(key, (0, 0)), (k["name"], key)
        assert k["local_bytes"] == 0, k["name"]
    # The family's instantiations: FL* with the focal loss's target forms (one gamma kind), QFL and VFL
    # with float targets and class ids with scores, for every gamma kind.
    losses = {}
    for k in kernels:
        losses.setdefault(k["other_template_args"][0], set()).add((k["dtype"], k["target"], k["gamma"]))
    dtypes, gammas = ("float32", "bfloat16", "float16", "float64"), ("Zero", "One", "Two", "General")
    assert losses["LossKind::FocalStar"] == {
        (d, t, "General") for d in dtypes for t in ("Float", "ClassId", "ClassIdSmoothed")}
    for loss in ("LossKind::Quality", "LossKind::Varifocal"):
        assert losses[loss] == {(d, t, g) for d in dtypes for t in ("Float", "ClassIdScore") for g in gammas}

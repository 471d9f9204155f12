"""Static instruction budget of the CUDA focal kernel: SASS instructions per element of its hot loop.

Reads the machine code of the built extension (``focal/_C*.so``, or any file ``cuobjdump`` reads: a
cubin, an object file) for one architecture, finds every instantiation of the kernel by its demangled
name, finds the loop that walks the elements (the grid-stride loop) and reports, per instantiation
(dtype x target kind x gamma kind): registers, stack and spill instructions, the loop's length in
instructions, the elements one trip of it handles, and their ratio.

    python benchmarks/sass_count.py                          # table for sm_90 of focal/_C*.so
    python benchmarks/sass_count.py --check --json sass.json  # exit 1 if a budget is exceeded
    python benchmarks/sass_count.py --binary build/x.so --arch sm_80 --kernel 'focal_ids_kernel<'

How the hot loop is found (see also benchmarks/README.md):

1. Every branch (``BRA``) whose target address is at or before its own address closes a loop that
   spans [target, branch]; the one-instruction ``BRA`` to itself that ends every function is not a
   loop. Loops inside another loop's span are nested in it.
2. The hot loop writes the gradient in 16-byte packs (``STG.E.128``): it is the innermost loop that
   does (focal_ids_kernel keeps its rare slow chunks in an outer loop around it, so that the call
   they make stays out of the hot one). Without such a loop, the outermost loop that stores to global
   memory (``STG`` / generic ``ST``) is taken. When the compiler made several such loops (an unrolled loop and
   its remainder, say), the longest is counted, and its unroll factor is its number of global loads
   over that of the loop with the fewest (loads, not stores: a copy unswitched on an optional output
   stores more without taking more elements).
3. Elements per trip = unroll x (``--bytes-per-iteration`` / size of the dtype): 32 bytes for
   focal_ids_kernel (two packs per trip), 16 for other kernels (one pack). ``--elements-per-
   iteration N`` overrides the pack size for kernels that take another amount. A kernel with a
   launch shape (the roofline kernels) takes the shape's bytes per trip, unroll 1: its rounds are
   loops of their own, and a loop beside them that loads a pack at a time is its partial tile's.
4. The loop's length is static: every instruction in its address range, taken or not on a given
   trip. For a loop body without branches it is the executed count; ``branches`` and ``calls`` in the
   table say when it is not (a ``CALL`` runs code outside the range, not counted).

5. A kernel that makes several passes over each row (the softmax focal loss's: maximum, sum of
   exponentials, gradient) is also read pass by pass (``passes`` in the JSON): its innermost loops
   that load from global memory, each with its bytes in flight and instructions per load.

Spills: ``cuobjdump -res-usage`` gives registers and the stack frame; spill traffic is counted as the
local-memory instructions in the code (``STL`` stores, ``LDL`` loads), the only local accesses of a
kernel without local arrays.

Template arguments are named from the demangled name: ``float``/``double``/``c10::BFloat16``/
``c10::Half`` give the dtype, ``(ns::TargetKind)1`` is looked up in the ``enum class TargetKind`` of
the headers under ``--source`` (csrc/ by default), so ``ClassId``; the same for ``GammaKind``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_KERNEL_PATTERN = r"\bfocal_ids_kernel<"

# What a kernel's name implies that its template arguments do not say: focal_ids_kernel is the
# class-id kernel, focal_float_kernel the float-target one. The logits' bytes one trip of the hot
# loop takes follow from the launch shape (LaunchShape<threads, bytes in flight, blocks per SM>):
# the class-id kernel loads its bytes in flight of logits, the float-target kernel half of them
# (as many of targets), at least one 16-byte pack; without a shape, one pack (32 bytes for
# focal_ids_kernel, whose shapes all hold at least two).
KERNEL_FACTS = {
    "focal_ids_kernel": {"target": "ClassId", "bytes_per_iteration": 32,
                         "shape_bytes": lambda in_flight: max(16, in_flight)},
    "focal_float_kernel": {"target": "Float", "bytes_per_iteration": 16,
                           "shape_bytes": lambda in_flight: max(16, in_flight // 2)},
    # The softmax focal loss's kernels (softmax_cuda.cu): blocks of 128 threads, no launch shapes;
    # several passes over each row, read one by one (passes()).
    "softmax_elements_kernel": {"target": "ClassId", "threads": 128, "passes": True},
    "softmax_warp_rows_kernel": {"target": "ClassId", "threads": 128, "passes": True},
    "softmax_rows_kernel": {"target": "ClassId", "threads": 128, "passes": True},
    "softmax_elements_ring_kernel": {"target": "ClassId", "threads": 128, "passes": True},
}
DEFAULT_ARCH = "sm_90"

# Demangled C++ scalar types of the kernel's template arguments -> (dtype name, bytes).
SCALAR_TYPES = {
    "float": ("float32", 4),
    "double": ("float64", 8),
    "c10::BFloat16": ("bfloat16", 2),
    "c10::Half": ("float16", 2),
}
DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}

# (dtype, target kind, gamma kind) -> the most instructions per element allowed (sm_90).
DEFAULT_BUDGETS = {
    ("float32", "ClassId", "Two"): 55.0,
    ("bfloat16", "ClassId", "Two"): 28.0,
}

# The roofline budgets (README.md in csrc/cuda says why each predicts the memory roofline), per
# (kernel, dtype): the most instructions per element of the hot loop, at gamma 2. Occupancy, bytes
# in flight and spills are the same for every kernel: see ROOFLINE_LIMITS.
ROOFLINE_BUDGETS = {
    ("focal_ids_kernel", "float32"): 55.0,
    ("focal_ids_kernel", "bfloat16"): 28.0,
    ("focal_ids_kernel", "float16"): 28.0,
    ("focal_float_kernel", "float32"): 82.0,
    ("focal_float_kernel", "bfloat16"): 41.0,
    ("focal_float_kernel", "float16"): 41.0,
}
ROOFLINE_LIMITS = {"min_occupancy": 0.75, "min_bytes_in_flight": 64}

# The register file of one SM (sm_80 to sm_120): 65536 registers, allocated per warp in units of
# 256; at most 64 resident warps (48 on sm_86/sm_89) and 32 blocks (16 on sm_86/sm_89). Shared
# memory per SM, of which each block also takes 1 KiB for the system: 164 KiB on sm_80, 100 KiB on
# sm_86/sm_89, 228 KiB on sm_90.
SM_LIMITS = {"registers": 65536, "register_unit": 256, "warps": 64, "blocks": 32, "shared": 228 * 1024}
SM_LIMITS_BY_ARCH = {"sm_80": {"shared": 164 * 1024}, "sm_86": {"warps": 48, "blocks": 16, "shared": 100 * 1024},
                     "sm_89": {"warps": 48, "blocks": 24, "shared": 100 * 1024}}

# One instruction line of `cuobjdump -sass`:  /*0350*/   @!P0 BRA 0x350 ;   /* 0x... */
INSTRUCTION = re.compile(r"^\s*/\*(?P<addr>[0-9a-fA-F]{4,})\*/\s+(?P<text>[^;]*);")
FUNCTION_HEADER = re.compile(r"^\s*Function\s*:\s*(?P<name>\S+)")
ARCH_HEADER = re.compile(r"^\s*code for (?P<arch>sm_\w+)")
BRANCH = re.compile(r"^BRA(?:\.[\w.]+)?\s+(?:[!\w.]+\s*,\s*)*(?P<target>0x[0-9a-fA-F]+)\s*$")
GLOBAL_STORE = re.compile(r"^(?:STG|ST)(?:\.|$)")
PACK_STORE = re.compile(r"^(?:STG|ST)\..*\b128$")
GLOBAL_LOAD = re.compile(r"^(?:LDG|LD)(?:\.|$)")
SHARED_LOAD = re.compile(r"^LDS(?:\.|$)")


class SassError(Exception):
    """A problem with the input: no tool, no such architecture, no matching kernel."""


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str | None  # "@!P0" or None
    opcode: str  # "BRA", "STG.E.128", ...
    operands: str

    @property
    def base_opcode(self) -> str:
        return self.opcode.split(".", 1)[0]


@dataclasses.dataclass
class Function:
    mangled: str
    arch: str
    instructions: list[Instruction]


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # address of the branch target (loop head)
    end: int  # address of the backward branch
    instructions: tuple[Instruction, ...]

    def count(self, pattern: re.Pattern) -> int:
        return sum(1 for i in self.instructions if pattern.match(i.opcode))

    def summary(self) -> dict:
        return {
            "start": hex(self.start),
            "end": hex(self.end),
            "instructions": len(self.instructions),
            "global_stores": self.count(GLOBAL_STORE),
            "global_loads": self.count(GLOBAL_LOAD),
            # Branches other than the loop's own back edge: the body is straight-line when 0.
            "branches": sum(1 for i in self.instructions if i.base_opcode in ("BRA", "BRX", "JMP", "JMX")) - 1,
            "calls": sum(1 for i in self.instructions if i.base_opcode == "CALL"),
            "spill_stores": sum(1 for i in self.instructions if i.base_opcode == "STL"),
            "spill_loads": sum(1 for i in self.instructions if i.base_opcode == "LDL"),
        }


# --------------------------------------------------------------------------------------------------
# Parsing


def parse_instruction(address: str, text: str) -> Instruction:
    text = " ".join(text.split())
    predicate = None
    if text.startswith("@"):
        predicate, text = text.split(" ", 1)
    opcode, _, operands = text.partition(" ")
    return Instruction(int(address, 16), predicate, opcode, operands.strip())


def parse_sass(text: str) -> list[Function]:
    """Functions of a ``cuobjdump -sass`` listing, each with its architecture and instructions."""
    functions: list[Function] = []
    arch = "unknown"
    current: Function | None = None
    for line in text.splitlines():
        if m := ARCH_HEADER.match(line):
            arch = m["arch"]
            current = None
        elif m := FUNCTION_HEADER.match(line):
            current = Function(m["name"], arch, [])
            functions.append(current)
        elif current is not None and (m := INSTRUCTION.match(line)):
            current.instructions.append(parse_instruction(m["addr"], m["text"]))
    return functions


def parse_resource_usage(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """``cuobjdump -res-usage``: (arch, mangled name) -> {"REG": .., "STACK": .., "LOCAL": .., ...}."""
    usage: dict[tuple[str, str], dict[str, int]] = {}
    arch = "unknown"
    name = None
    for line in text.splitlines():
        stripped = line.strip()
        if m := re.match(r"arch\s*=\s*(sm_\w+)", stripped):
            arch = m[1]
        elif m := re.match(r"Function\s+(\S+?):?$", stripped):
            name = m[1]
        elif name is not None and stripped.startswith("REG:"):
            usage[(arch, name)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", stripped)}
            name = None
    return usage


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop closed by a backward branch, in address order."""
    by_address = {i.address: n for n, i in enumerate(instructions)}
    loops = []
    for n, ins in enumerate(instructions):
        if ins.base_opcode != "BRA":
            continue
        m = BRANCH.match(f"{ins.opcode} {ins.operands}")
        if not m:
            continue
        target = int(m["target"], 16)
        if target > ins.address or target not in by_address:
            continue
        if target == ins.address and ins.predicate is None:
            continue  # the `BRA .` that ends every function: the end of the code, not a loop
        loops.append(Loop(target, ins.address, tuple(instructions[by_address[target] : n + 1])))
    return sorted(loops, key=lambda lp: (lp.start, -lp.end))


def outermost(loops: list[Loop]) -> list[Loop]:
    return [a for a in loops if not any(b is not a and b.start <= a.start and a.end <= b.end for b in loops)]


@dataclasses.dataclass
class HotLoop:
    loop: Loop
    unroll: int
    candidates: list[Loop]  # the outermost loops that store to global memory


def innermost(loops: list[Loop]) -> list[Loop]:
    return [a for a in loops if not any(b is not a and a.start <= b.start and b.end <= a.end for b in loops)]


def find_hot_loop(instructions: list[Instruction]) -> HotLoop | None:
    """The loop that walks the elements (see the module docstring): the innermost loops that store
    16-byte packs, else the outermost loops that store to global memory; the longest of them. None
    when the function has no loop that stores."""
    storing = [lp for lp in find_loops(instructions) if lp.count(GLOBAL_STORE) > 0]
    packed = [lp for lp in storing if lp.count(PACK_STORE) > 0]
    candidates = innermost(packed) if packed else outermost(storing)
    if not candidates:
        return None
    hot = max(candidates, key=lambda lp: len(lp.instructions))
    # An unrolled copy loads (and stores) k times what its remainder loop does; a copy made by
    # unswitching on an optional output (focal_float_kernel's loss) stores more but loads the same:
    # the loads tell the two apart.
    fewest = min(lp.count(GLOBAL_LOAD) for lp in candidates)
    loads = hot.count(GLOBAL_LOAD)
    unroll = loads // fewest if fewest and loads % fewest == 0 else 1
    return HotLoop(hot, unroll, candidates)


def passes(instructions: list[Instruction]) -> list[dict]:
    """The passes over a row's elements of a kernel that makes several (the softmax focal loss's:
    maximum, sum of exponentials, gradient): its innermost loops that load from global memory, or
    that read shared memory where the kernel stages its rows there (``reads``: "global" or
    "shared"), in address order, each its loop summary with instructions per load and, for global
    memory, bytes in flight. Where each load is one element (a thread's classes `inner` apart, or a
    lane's classes in shared memory), instructions per load are instructions per element. The
    compiler's unrolled copy of a pass and its remainder are two entries; the unrolled one has the
    most loads."""
    out = []
    for lp in innermost(find_loops(instructions)):
        if lp.count(GLOBAL_LOAD):
            out.append({**lp.summary(), "reads": "global", "instructions_per_load": len(lp.instructions) / lp.count(GLOBAL_LOAD),
                        "bytes_in_flight": bytes_in_flight(lp)["bytes"]})
        elif lp.count(SHARED_LOAD):
            out.append({**lp.summary(), "reads": "shared", "instructions_per_load": len(lp.instructions) / lp.count(SHARED_LOAD),
                        "bytes_in_flight": None})
    return out


def async_loop(instructions: list[Instruction]) -> dict | None:
    """The innermost loop that both copies into shared memory (cp.async) and waits for its copies,
    a kernel's loop over what it stages there (the softmax warp-per-row kernel's rounds through its
    ring): its summary, with bytes in flight read as bytes_in_flight() reads them. None without one."""
    staging = [lp for lp in find_loops(instructions)
               if lp.count(ASYNC_COPY) and any(i.base_opcode == "DEPBAR" and ASYNC_WAIT.search(i.operands)
                                               for i in lp.instructions)]
    inner = innermost(staging)
    if not inner:
        return None
    lp = min(inner, key=lambda x: len(x.instructions))
    return {**lp.summary(), "bytes_in_flight": bytes_in_flight(lp)["bytes"]}


def occupancy(registers: int, threads: int, arch: str = DEFAULT_ARCH, shared_bytes: int = 0) -> float:
    """Resident warps per SM over the most an SM holds, for blocks of `threads` threads whose
    threads use `registers` registers each and which take `shared_bytes` of shared memory."""
    limits = {**SM_LIMITS, **SM_LIMITS_BY_ARCH.get(arch, {})}
    unit = limits["register_unit"]
    per_warp = -(-max(registers, 1) * 32 // unit) * unit
    warps_per_block = -(-threads // 32)
    blocks = min(limits["registers"] // per_warp // warps_per_block, limits["warps"] // warps_per_block,
                 limits["blocks"])
    if shared_bytes:
        blocks = min(blocks, limits["shared"] // (shared_bytes + 1024))
    return blocks * warps_per_block / limits["warps"]


REGISTER = re.compile(r"\bR(\d+)(?:\.64)?\b")
LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# Instructions none of whose operands is a destination register.
NO_DESTINATION = ("ST", "STG", "STS", "STL", "RED", "BRA", "BRX", "JMP", "EXIT", "RET", "CALL", "BAR",
                  "BSYNC", "BSSY", "WARPSYNC", "YIELD", "NOP", "DEPBAR")


def _registers(operand: str, width: int = 1) -> set[int]:
    out = set()
    for m in REGISTER.finditer(operand):
        first = int(m[1])
        n = 2 if m[0].endswith(".64") else width
        out.update(range(first, first + n))
    return out


ASYNC_COPY = re.compile(r"^LDGSTS(?:\.|$)")  # cp.async: global to shared memory, no register
ASYNC_WAIT = re.compile(r"SB0\s*,\s*(0x[0-9a-fA-F]+|\d+)")  # DEPBAR.LE SB0, n: cp.async.wait_group n


def _load_bytes(opcode: str) -> int:
    return next((b for suffix, b in LOAD_BYTES.items() if f".{suffix}" in opcode), 4)


def bytes_in_flight(loop: Loop) -> dict:
    """Bytes of global loads the hot loop issues, from its head, before the first instruction that
    reads a register one of them writes: the memory-level parallelism of one thread. Also how many
    loads that is.

    A loop that loads through shared memory (cp.async: LDGSTS, holding no register) waits with
    ``DEPBAR.LE SB0, n`` until at most n of its groups of copies are pending: at each wait n + 1
    groups are in flight, so it counts (n + 1) times the bytes of one group: the loop's copied
    bytes over its groups (``LDGDEPBAR``, cp.async.commit_group, closes one), or over its waits
    where it commits none itself."""
    copies = [ins for ins in loop.instructions if ASYNC_COPY.match(ins.opcode)]
    waits = [int(m[1], 0) for ins in loop.instructions
             if ins.base_opcode == "DEPBAR" and (m := ASYNC_WAIT.search(ins.operands))]
    if copies and waits:
        groups = sum(ins.base_opcode == "LDGDEPBAR" for ins in loop.instructions) or len(waits)
        group = sum(_load_bytes(ins.opcode) for ins in copies) / groups
        depth = min(waits) + 1
        return {"bytes": int(group * depth), "loads": round(len(copies) / groups * depth)}
    pending: set[int] = set()
    total = loads = 0
    for ins in loop.instructions:
        operands = [o.strip() for o in ins.operands.split(",")]
        is_load = GLOBAL_LOAD.match(ins.opcode) is not None
        sources = operands if (ins.base_opcode in NO_DESTINATION) else operands[1:]
        read = set().union(*(_registers(o) for o in sources)) if sources else set()
        if ins.predicate is None and read & pending:
            break
        if read & pending:
            break
        if is_load:
            size = _load_bytes(ins.opcode)
            pending |= _registers(operands[0], max(1, size // 4))
            total += size
            loads += 1
    return {"bytes": total, "loads": loads}


def parse_launch_shape(args: list[str]) -> dict | None:
    """threads, bytes in flight and blocks per SM of a ``LaunchShape<t, b, s>`` template argument."""
    for arg in args:
        m = re.search(r"LaunchShape<\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*(?:,\s*(true|false|1|0)\s*)?>", arg)
        if m:
            return {"threads": int(m[1]), "in_flight_bytes": int(m[2]), "blocks_per_sm": int(m[3]),
                    "async_loads": m[4] in ("true", "1")}
    return None


# --------------------------------------------------------------------------------------------------
# Names


def split_template_args(demangled: str, kernel_pattern: re.Pattern) -> list[str]:
    """The template arguments of the kernel's name: ``f<a, b<c, d>, e>(...)`` -> [a, b<c, d>, e]."""
    m = kernel_pattern.search(demangled)
    start = demangled.find("<", m.start()) if m else -1
    if start < 0:
        return []
    args, depth, current = [], 0, []
    for ch in demangled[start + 1 :]:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    args.append("".join(current).strip())
    return [a for a in args if a]


def read_enums(source_root: Path) -> dict[str, list[str]]:
    """``enum class Name { kA, kB = 4, ... }`` of the headers and sources under ``source_root``:
    Name -> enumerator names by value (leading ``k`` dropped), so that ``(ns::Name)1`` can be named."""
    enums: dict[str, list[str]] = {}
    if not source_root.is_dir():
        return enums
    for path in sorted(source_root.rglob("*")):
        if path.suffix not in (".h", ".hpp", ".cuh", ".cu", ".cpp"):
            continue
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(errors="replace"), flags=re.S)
        for m in re.finditer(r"enum\s+class\s+(\w+)\s*(?::\s*[\w:]+\s*)?\{([^}]*)\}", text):
            names: dict[int, str] = {}
            value = -1
            for item in (s.strip() for s in m[2].split(",")):
                if not item:
                    continue
                name, _, explicit = (p.strip() for p in item.partition("="))
                value = int(explicit, 0) if explicit else value + 1
                names[value] = name[1:] if re.match(r"k[A-Z]", name) else name
            enums[m[1]] = [names.get(v, str(v)) for v in range(max(names, default=-1) + 1)]
    return enums


def describe_instantiation(args: list[str], enums: dict[str, list[str]]) -> dict:
    """dtype, target and gamma kinds (and any other template argument) of one instantiation."""
    info: dict = {"dtype": None, "target": None, "gamma": None, "extra": []}
    for arg in args:
        if arg in SCALAR_TYPES:
            info["dtype"] = SCALAR_TYPES[arg][0]
            info["element_bytes"] = SCALAR_TYPES[arg][1]
            continue
        m = re.fullmatch(r"\((?:[\w:]+::)?(\w+)\)(-?\d+)", arg)
        if m:
            enum, value = m[1], int(m[2])
            names = enums.get(enum, [])
            name = names[value] if 0 <= value < len(names) else f"{enum}={value}"
            key = {"TargetKind": "target", "GammaKind": "gamma"}.get(enum)
            if key:
                info[key] = name
                continue
            arg = f"{enum}::{name}"
        info["extra"].append(arg)
    return info


def demangle(names: list[str], tool: str) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    demangled = out.splitlines()
    if len(demangled) != len(names):
        raise SassError(f"{tool} returned {len(demangled)} names for {len(names)}")
    return dict(zip(names, demangled))


# --------------------------------------------------------------------------------------------------
# Tools and inputs


def cuda_home() -> Path | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def find_tool(name: str, env_var: str | None = None) -> str | None:
    """``$ENV_VAR``, then ``$CUDA_HOME/bin``, then PATH, then the copy that ships with triton."""
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    home = cuda_home()
    if home and (home / "bin" / name).is_file():
        return str(home / "bin" / name)
    if found := shutil.which(name):
        return found
    spec = importlib.util.find_spec("triton") if name in ("cuobjdump", "nvdisasm") else None
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    return None


def find_demangler() -> str | None:
    return find_tool("cu++filt", "CUFILT") or shutil.which("c++filt")


def default_binary() -> Path | None:
    built = sorted(glob.glob(str(REPO_ROOT / "focal" / "_C*.so")))
    return Path(built[0]) if built else None


def run_cuobjdump(tool: str, flag: str, binary: Path) -> str:
    proc = subprocess.run([tool, flag, str(binary)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SassError(f"{tool} {flag} {binary} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def dump_sass(tool: str, binary: Path, arch: str) -> str:
    """``cuobjdump -sass`` of ``binary``'s ``arch`` code: its cubins of that architecture (one per
    CUDA source file) extracted, then disassembled side by side, one per core. A listing of the
    whole built extension is some 200 MB and most of a minute of one core; every other
    architecture's code and the fat binary's headers are skipped."""
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.run([tool, "-xelf", "all", str(binary.resolve())], capture_output=True, text=True, cwd=folder)
        cubins = sorted(Path(folder).glob(f"*.{arch}.cubin"), key=lambda p: -p.stat().st_size)
        if proc.returncode != 0 or not cubins:  # a cubin itself, or no code of that architecture
            return run_cuobjdump(tool, "-sass", binary)
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return "".join(pool.map(lambda cubin: run_cuobjdump(tool, "-sass", cubin), cubins))


# --------------------------------------------------------------------------------------------------
# Analysis


def analyse(
    sass: str,
    resource_usage: str,
    arch: str,
    kernel_pattern: str,
    enums: dict[str, list[str]],
    demangler: str,
    bytes_per_iteration: int | None = None,
    elements_per_iteration: int | None = None,
) -> list[dict]:
    """One record per kernel instantiation matching ``kernel_pattern`` in ``arch``'s code."""
    functions = parse_sass(sass)
    arches = sorted({f.arch for f in functions})
    functions = [f for f in functions if f.arch == arch]
    if not functions:
        raise SassError(f"no {arch} code in the binary (it holds: {', '.join(arches) or 'no SASS'})")
    names = demangle([f.mangled for f in functions], demangler)
    usage = parse_resource_usage(resource_usage)
    pattern = re.compile(kernel_pattern)
    records = []
    for fn in functions:
        demangled = names[fn.mangled]
        if not pattern.search(demangled):
            continue
        template_args = split_template_args(demangled, pattern)
        info = describe_instantiation(template_args, enums)
        shape = parse_launch_shape(template_args)
        kernel = next((name for name in KERNEL_FACTS if re.search(rf"\b{name}<", demangled)), None)
        facts = KERNEL_FACTS.get(kernel, {})
        info["target"] = info["target"] or facts.get("target")
        res = usage.get((arch, fn.mangled)) or usage.get(("unknown", fn.mangled), {})
        threads = shape["threads"] if shape else facts.get("threads", 256)
        record = {
            "name": demangled,
            "kernel": kernel or pattern.pattern,
            "launch_shape": shape,
            "mangled": fn.mangled,
            "arch": arch,
            **{k: info[k] for k in ("dtype", "target", "gamma")},
            "other_template_args": info["extra"],
            "registers": res.get("REG"),
            "stack_bytes": res.get("STACK"),
            "local_bytes": res.get("LOCAL"),
            "shared_bytes": res.get("SHARED"),
            "spill_stores": sum(1 for i in fn.instructions if i.base_opcode == "STL"),
            "spill_loads": sum(1 for i in fn.instructions if i.base_opcode == "LDL"),
            "function_instructions": len(fn.instructions),
            "loops": [lp.summary() for lp in find_loops(fn.instructions)],
            "passes": passes(fn.instructions) if facts.get("passes") else None,
            "async_loop": async_loop(fn.instructions),
            "hot_loop": None,
        }
        if record["registers"] is not None:
            record["occupancy"] = occupancy(record["registers"], threads, arch, record["shared_bytes"] or 0)
        hot = find_hot_loop(fn.instructions)
        if hot is not None:
            if elements_per_iteration is not None:
                per_pack = elements_per_iteration
            elif info.get("element_bytes"):
                trip_bytes = bytes_per_iteration or (facts["shape_bytes"](shape["in_flight_bytes"]) if shape and facts
                                                     else facts.get("bytes_per_iteration", 16))
                per_pack = max(1, trip_bytes // info["element_bytes"])
            else:
                per_pack = None  # no dtype among the template arguments: say so rather than guess
            # A launch shape fixes the trip (its rounds are loops of their own, never unrolled by
            # the compiler); a loop beside it that takes a pack at a time is the kernel's own path
            # for a partial tile, not a remainder of an unrolled copy.
            from_shape = shape is not None and facts and bytes_per_iteration is None and elements_per_iteration is None
            unroll = 1 if from_shape else hot.unroll
            elements = unroll * per_pack if per_pack else None
            record["hot_loop"] = {
                **hot.loop.summary(),
                "candidate_loops": len(hot.candidates),
                "unroll": unroll,
                "elements_per_iteration": elements,
                "instructions_per_element": len(hot.loop.instructions) / elements if elements else None,
                "bytes_in_flight": bytes_in_flight(hot.loop)["bytes"],
            }
        records.append(record)
    if not records:
        raise SassError(f"no {arch} function's demangled name matches {kernel_pattern!r}")
    order = {name: i for i, name in enumerate(["float32", "bfloat16", "float16", "float64"])}
    records.sort(key=lambda r: (order.get(r["dtype"], 9), str(r["target"]), str(r["gamma"]), r["name"]))
    return records


def check_budgets(records: list[dict], budgets: dict[tuple[str, str, str], float]) -> list[dict]:
    """PASS / FAIL per budget; a budget that matches no instantiation FAILS (a renamed kernel or
    enum must not pass silently)."""
    results = []
    for (dtype, target, gamma), limit in budgets.items():
        match = [r for r in records if (r["dtype"], r["target"], r["gamma"]) == (dtype, target, gamma)]
        result = {"dtype": dtype, "target": target, "gamma": gamma, "max_instructions_per_element": limit}
        measured = [r["hot_loop"]["instructions_per_element"] for r in match if r["hot_loop"]]
        measured = [m for m in measured if m is not None]
        if not match or not measured:
            result.update(measured=None, status="FAIL",
                          note="no instantiation matched" if not match else "no hot loop found")
        else:
            worst = max(measured)
            result.update(measured=worst, status="PASS" if worst <= limit else "FAIL")
        results.append(result)
    return results


def check_roofline(records: list[dict], budgets: dict = ROOFLINE_BUDGETS, limits: dict = ROOFLINE_LIMITS,
                   shape: dict | None = None) -> list[dict]:
    """The roofline budgets of every (kernel, dtype) in `budgets`, for the focal loss at gamma 2, in launch shape
    `shape` (threads, in_flight_bytes, blocks_per_sm; None: every shape found): occupancy, bytes in
    flight before their first use, no spill in the hot loop, instructions per element. One result per
    instantiation and budget, PASS or FAIL with the measured number; FAIL when nothing matches."""
    results = []
    for (kernel, dtype), limit in budgets.items():
        match = [r for r in records if r.get("kernel") == kernel and r["dtype"] == dtype and r["gamma"] == "Two"
                 and (shape is None or r.get("launch_shape") == shape)
                 and not any(a.startswith("LossKind::") and a != "LossKind::Focal"  # the focal loss's own
                             for a in r.get("other_template_args", []))]
        if not match:
            results.append({"kernel": kernel, "dtype": dtype, "shape": shape, "check": "instantiation",
                            "measured": None, "limit": None, "status": "FAIL"})
            continue
        for r in match:
            hot = r["hot_loop"] or {}
            checks = [
                ("occupancy", r.get("occupancy"), limits["min_occupancy"], ">="),
                ("bytes_in_flight", hot.get("bytes_in_flight"), limits["min_bytes_in_flight"], ">="),
                ("hot_loop_spills", (hot.get("spill_stores") or 0) + (hot.get("spill_loads") or 0) if hot else None, 0, "<="),
                ("instructions_per_element", hot.get("instructions_per_element"), limit, "<="),
            ]
            for name, measured, bound, op in checks:
                ok = measured is not None and (measured >= bound if op == ">=" else measured <= bound)
                results.append({"kernel": kernel, "dtype": dtype, "shape": r.get("launch_shape"),
                                "registers": r["registers"], "check": name, "measured": measured,
                                "limit": f"{op} {bound:g}", "status": "PASS" if ok else "FAIL"})
    return results


def format_roofline(results: list[dict]) -> str:
    lines = []
    for b in results:
        shape = b["shape"]
        shape = f"{shape['threads']}t/{shape['in_flight_bytes']}B/{shape['blocks_per_sm']}b" if shape else "-"
        m = b["measured"]
        m = "-" if m is None else (f"{m:.3g}" if isinstance(m, float) else str(m))
        lines.append(f"  {b['status']:4s} {b['kernel']} {b['dtype']} {shape}: {b['check']} {m} ({b['limit']})")
    return "\n".join(lines)


def parse_budget(spec: str) -> tuple[tuple[str, str, str], float]:
    """``DTYPE,TARGET,GAMMA=N``, e.g. ``float32,ClassId,Two=55``."""
    try:
        key, value = spec.split("=")
        dtype, target, gamma = (s.strip() for s in key.split(","))
        return (DTYPE_ALIASES.get(dtype, dtype), target, gamma), float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"budget {spec!r} is not DTYPE,TARGET,GAMMA=N (e.g. float32,ClassId,Two=55)") from exc


# --------------------------------------------------------------------------------------------------
# Output


def format_table(records: list[dict]) -> str:
    header = (f"{'dtype':9s} {'target':16s} {'gamma':8s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s} "
              f"{'loop':>6s} {'branch':>6s} {'calls':>5s} {'unroll':>6s} {'elem/it':>7s} {'instr/elem':>10s} "
              f"{'occup':>5s} {'B/flight':>8s} {'shape':>11s}")
    lines = [header, "-" * len(header)]
    for r in records:
        hot = r["hot_loop"] or {}
        ipe = hot.get("instructions_per_element")
        lines.append(
            f"{r['dtype'] or '?':9s} {r['target'] or '?':16s} {r['gamma'] or '?':8s} "
            f"{r['registers'] if r['registers'] is not None else '?':>4} {r['stack_bytes'] if r['stack_bytes'] is not None else '?':>5} "
            f"{r['spill_stores']:>5d}/{r['spill_loads']:<5d} "
            f"{hot.get('instructions', '-'):>6} {hot.get('branches', '-'):>6} {hot.get('calls', '-'):>5} "
            f"{hot.get('unroll', '-'):>6} {hot.get('elements_per_iteration') or '-':>7} "
            + (f"{ipe:10.1f}" if ipe is not None else f"{'-':>10s}")
            + (f" {r['occupancy']:5.2f}" if r.get("occupancy") is not None else f" {'-':>5s}")
            + f" {hot.get('bytes_in_flight', '-'):>8}"
            + (f" {sh['threads']:>4d}/{sh['in_flight_bytes']:>3d}/{sh['blocks_per_sm']:<2d}" if (sh := r.get("launch_shape")) else f" {'-':>11s}")
        )
    return "\n".join(lines)


def format_budgets(results: list[dict]) -> str:
    lines = []
    for b in results:
        measured = f"{b['measured']:.1f}" if b["measured"] is not None else "-"
        note = f"  [{b['note']}]" if b.get("note") else ""
        lines.append(f"  {b['status']:4s} {b['dtype']} {b['target']} gamma {b['gamma']}: "
                     f"{measured} instructions/element (budget <= {b['max_instructions_per_element']:g}){note}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, help="file with the kernels' machine code (default: focal/_C*.so)")
    parser.add_argument("--arch", default=DEFAULT_ARCH, help=f"architecture whose code is read (default {DEFAULT_ARCH})")
    parser.add_argument("--kernel", default=DEFAULT_KERNEL_PATTERN,
                        help=f"regular expression matched against demangled names (default {DEFAULT_KERNEL_PATTERN!r})")
    parser.add_argument("--bytes-per-iteration", type=int, default=None,
                        help="logits bytes one thread takes per trip of the source loop (default 16)")
    parser.add_argument("--elements-per-iteration", type=int, help="elements per trip of the source loop, overriding --bytes-per-iteration")
    parser.add_argument("--source", type=Path, default=REPO_ROOT / "csrc", help="where the TargetKind / GammaKind enums are read (default csrc/)")
    parser.add_argument("--budget", action="append", type=parse_budget, metavar="DTYPE,TARGET,GAMMA=N",
                        help="instructions-per-element budget (repeatable; default: float32,ClassId,Two=55 and bfloat16,ClassId,Two=28)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a budget is exceeded or matches no kernel")
    parser.add_argument("--roofline", action="store_true",
                        help="also check the roofline budgets (occupancy, bytes in flight, spills, instructions) of "
                             "focal_ids_kernel and focal_float_kernel in every launch shape (implies --kernel for both)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every record here")
    parser.add_argument("--cuobjdump", help="cuobjdump to use (default: $CUOBJDUMP, $CUDA_HOME/bin, PATH, triton's)")
    args = parser.parse_args(argv)
    if args.elements_per_iteration is not None and args.elements_per_iteration < 1:
        parser.error("--elements-per-iteration must be >= 1")
    if args.bytes_per_iteration is not None and args.bytes_per_iteration < 1:
        parser.error("--bytes-per-iteration must be >= 1")
    try:
        re.compile(args.kernel)
    except re.error as exc:
        parser.error(f"--kernel {args.kernel!r} is not a regular expression: {exc}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    binary = args.binary or default_binary()
    if binary is None or not binary.is_file():
        print(f"error: no binary to read ({binary or 'focal/_C*.so not built'}); build with "
              "TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace, or pass --binary", file=sys.stderr)
        return 2
    cuobjdump = args.cuobjdump or find_tool("cuobjdump", "CUOBJDUMP")
    demangler = find_demangler()
    if cuobjdump is None:
        print("error: cuobjdump not found (set CUOBJDUMP or CUDA_HOME, or pass --cuobjdump)", file=sys.stderr)
        return 2
    if demangler is None:
        print("error: neither cu++filt nor c++filt found to demangle kernel names", file=sys.stderr)
        return 2
    budgets = dict(args.budget) if args.budget else dict(DEFAULT_BUDGETS)
    if args.roofline and args.kernel == DEFAULT_KERNEL_PATTERN:
        args.kernel = r"\b(?:focal_ids_kernel|focal_float_kernel)<"
    try:
        sass, usage = dump_sass(cuobjdump, binary, args.arch), run_cuobjdump(cuobjdump, "-res-usage", binary)
        records = analyse(
            sass, usage,
            args.arch, args.kernel, read_enums(args.source), demangler,
            args.bytes_per_iteration, args.elements_per_iteration,
        )
    except SassError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    budget_results = check_budgets([r for r in records if r.get("kernel") in (None, "focal_ids_kernel")
                                    or not args.roofline], budgets)
    roofline = check_roofline(records) if args.roofline else []
    print(f"{binary} ({args.arch}): {len(records)} instantiations of {args.kernel!r}")
    print(format_table(records))
    print("\nbudgets (static SASS instructions of the hot loop per element):")
    print(format_budgets(budget_results))
    if roofline:
        print("\nroofline budgets (gamma 2; occupancy on this architecture's register file):")
        print(format_roofline(roofline))
    ok = all(b["status"] == "PASS" for b in budget_results + roofline)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "binary": str(binary),
            "arch": args.arch,
            "kernel_pattern": args.kernel,
            "bytes_per_iteration": args.bytes_per_iteration,
            "elements_per_iteration": args.elements_per_iteration,
            "kernels": records,
            "budgets": budget_results,
            "roofline": roofline,
            "budgets_ok": ok,
        }, indent=1))
        print(f"wrote {args.json}")
    if args.check and not ok:
        print("error: a SASS budget is exceeded or matched no kernel (see 'budgets' above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

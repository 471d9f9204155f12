"""Installing focal: the build cannot pick another torch, a wheel works in a second environment, and
the build's record stops an extension built against another torch from loading.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
import torch

import focal
from focal import _extension

REPO_ROOT = Path(__file__).resolve().parents[1]


def _clean_env(**extra) -> dict:
    """The environment without PYTHONPATH, so that `import focal` finds only what is installed."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, **extra}


def test_build_requirements_leave_torch_to_the_environment():
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert requires and not [r for r in requires if re.match(r"torch\b", r)]


def test_setup_without_torch_stops_at_once_with_the_commands():
    """As in pip's isolated build: setuptools present, torch not importable."""
    hide_torch = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; " \
                 "runpy.run_path('setup.py', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", hide_torch], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "`pip install torch`, then `pip install --no-build-isolation .`" in line


def test_cpu_isas_switch_builds_this_machines_copies_and_refuses_unknown_names():
    """FOCAL_CPU_ISAS=native (make demo's CPU build): only the copy torch runs here; a list: the copies
    named and the DEFAULT one; a name the build does not know stops it with the list of those it does."""
    # All in one process (one import of torch): setup.py read with each setting in turn, the C++ flags of
    # the native build too, and the unknown name last (it ends the process).
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    requests = ("native", "avx2", "avx2,sse9") if x86 else ("native", "sse9")  # AVX2 is x86's alone
    show = textwrap.dedent(f"""
        import json, os, runpy, sys
        sys.argv = ["setup.py", "--version"]
        for request in {requests!r}:
            os.environ["FOCAL_CPU_ISAS"] = request
            setup = runpy.run_path("setup.py")
            print(json.dumps(list(setup["ISA_FLAGS"])))
            if request == "native":
                print("flags", json.dumps(setup["cxx_flags"]()))
    """)
    result = subprocess.run([sys.executable, "-c", show], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    capability = torch.backends.cpu.get_cpu_capability()
    native = [capability] if x86 and capability in ("AVX2", "AVX512") else ["DEFAULT"]
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert printed == ([native, ["DEFAULT", "AVX2"]] if x86 else [native]), result.stdout + result.stderr
    assert result.returncode == 1 and "FOCAL_CPU_ISAS names ['SSE9']" in result.stderr, result.stderr
    # A one-machine build says so to its own compiler: no DEFAULT copy, so no FOCAL_HAVE_DEFAULT, which
    # is what makes the C++ dispatch refuse a CPU below it (csrc/cpu/isa.h).
    (flags,) = [json.loads(line[len("flags "):]) for line in result.stdout.splitlines() if line.startswith("flags ")]
    defined = [f for f in flags if f.startswith("-DFOCAL_HAVE_")]
    assert defined == [f"-DFOCAL_HAVE_{isa}" for isa in native], result.stdout + result.stderr


def test_a_build_for_one_machine_refuses_a_cpu_below_it_with_the_rebuild_command():
    """A native build has one CPU copy and no DEFAULT one: a CPU that cannot run it gets an error that
    names the build and the fix, never an illegal instruction."""
    # isa.h's rule: a copy runs on its own capability and above; DEFAULT (or an unknown name) is the lowest.
    rank = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
    for built in (["DEFAULT", "AVX2", "AVX512"], ["DEFAULT"], ["AVX2"], ["AVX512"]):
        for capability in ("DEFAULT", "AVX2", "AVX512", "SVE256"):
            runs = any(rank[isa] <= rank.get(capability, 0) for isa in built)
            assert (_extension.cpu_kernel_error({"cpu_isas": built}, capability) is None) == runs, (built, capability)
    avx2 = {"cpu_isas": ["AVX2"]}
    for built, capability in ((avx2, "DEFAULT"), ({"cpu_isas": ["AVX512"]}, "AVX2")):
        message = _extension.cpu_kernel_error(built, capability)
        assert message.startswith(f"focal has no CPU kernel for this CPU (ATen capability {capability}): this "
                                  f"build compiled its CPU kernels for {built['cpu_isas'][0]} only")
        assert message.endswith(_extension.rebuild_command())
    assert _extension.CPU_KERNEL_ERROR is None  # this suite's own build runs here


def test_build_record_matches_the_running_torch_and_the_kernels():
    info = _extension.BUILD_INFO
    assert info is not None, "no focal/_build_info.json: build with `pip install --no-build-isolation -e .`"
    assert _extension.torch_mismatch(info, _extension.running_torch()) is None
    assert info["torch"] == str(torch.__version__) and info["torch_cuda"] == torch.version.cuda
    assert info["cpu_isas"][0] == "DEFAULT" and torch.ops.focal.cpu_kernel_isa() in info["cpu_isas"]
    archs = info["cuda_sass"] + info["cuda_ptx"]
    assert all(re.fullmatch(r"\d+\.\d[a-z]?", arch) for arch in archs)
    assert bool(archs) == ("cuda" in _extension.KERNEL_DEVICE_TYPES)


def test_mismatch_message_names_both_torches_and_the_fix():
    running = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "cxx11_abi": True}
    assert _extension.torch_mismatch(dict(running), running) is None
    for change in ({"torch": "2.14.1+cpu", "torch_cuda": None}, {"torch": "2.13.0+cu130"}, {"cxx11_abi": False}):
        message = _extension.torch_mismatch({**running, **change}, running)
        assert f"built against {_extension.describe_torch({**running, **change})}" in message
        assert f"but {_extension.describe_torch(running)} is installed" in message
        assert "pip install --no-build-isolation" in message


def _load_extension_module_with(record: dict, folder: Path):
    """Runs focal/_extension.py, as `import focal` does, from a copy whose build record is ``record``."""
    (folder / "focal").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "focal" / "_extension.py", folder / "focal" / "_extension.py")
    (folder / "focal" / "_build_info.json").write_text(json.dumps(record))
    spec = importlib.util.spec_from_file_location("focal_extension_copy", folder / "focal" / "_extension.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_import_refuses_an_extension_built_against_another_torch(tmp_path):
    record = dict(_extension.running_torch(), cuda_sass=["8.0"], cuda_ptx=[], cpu_isas=["DEFAULT"])
    _load_extension_module_with(record, tmp_path / "same")  # the same torch: loads
    record.update(torch="2.0.0+cu118", torch_cuda="11.8", cxx11_abi=False)
    with pytest.raises(ImportError) as raised:
        _load_extension_module_with(record, tmp_path / "other")
    assert type(raised.value).__name__ == "TorchMismatchError"
    assert str(raised.value).startswith("focal's compiled extension was built against torch 2.0.0+cu118 (CUDA 11.8, "
                                        f"pre-C++11 ABI), but torch {torch.__version__} (")
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in str(raised.value)


ROUND_TRIP = textwrap.dedent("""
    import json, sys
    import torch
    import focal
    from focal import _extension, info
    x = torch.randn(64, 80, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(-1, 80, (64,))
    loss = focal.sigmoid_focal_loss(x, labels, reduction="sum")
    loss.backward()
    expected = focal.reference.sigmoid_focal_loss_grad(x.detach(), labels, reduction="sum")
    print(json.dumps({
        "focal": focal.__file__, "extension": _extension._C.__file__, "record": _extension.BUILD_INFO,
        "loss_ok": torch.allclose(loss, focal.reference.sigmoid_focal_loss(x, labels, reduction="sum")),
        "grad_ok": torch.allclose(x.grad, expected), "torch": torch.__file__, "info": dict(info.report()[0]),
        "compiler_loaded": "torch._dynamo" in sys.modules,
    }))
""")


def test_wheel_installs_and_runs_in_a_second_environment(tmp_path):
    """`pip wheel --no-build-isolation` of this checkout (with the switches of the build that the tests
    run against, so it reuses that build's objects and only links), installed without an index into a
    fresh virtual environment that sees this environment's torch through a .pth file; there, from a
    folder outside the source tree, `import focal` is the wheel's copy, forward + backward agree
    with the reference, and focal.info's report works."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", tmp_path / "dist", REPO_ROOT],
                           capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("focal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "focal/_build_info.json" in names and any(re.fullmatch(r"focal/_C\..*\.so", n) for n in names)

    env_dir = tmp_path / "second-env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site_packages = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip())
    # This environment's packages as a plain path entry: their .pth files (the editable install of
    # this checkout among them) are not processed there, so only the wheel provides focal.
    (site_packages / "first-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run([*pip, "--python", python, "install", "--no-index", wheel], capture_output=True,
                             text=True, timeout=300, env=_clean_env())
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "Successfully installed focal-" in install.stdout and "torch" not in install.stdout.split("Successfully")[-1]
    assert "Successfully uninstalled" not in install.stdout  # this environment's focal is left alone

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # With ATEN_CPU_CAPABILITY=default, ATen and focal's CPU kernel both fall back to the generic copy.
    run = subprocess.run([python, "-c", ROUND_TRIP], cwd=outside, env=_clean_env(ATEN_CPU_CAPABILITY="default"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["focal"]).parent == site_packages / "focal"
    assert Path(result["extension"]).parent == site_packages / "focal"
    assert Path(result["torch"]) == Path(torch.__file__)
    assert result["record"]["torch"] == str(torch.__version__)
    assert result["loss_ok"] and result["grad_ok"]
    assert not result["compiler_loaded"]  # torch.compile's 1.5 s of imports are paid only by who compiles
    assert result["info"]["CPU kernel"] == "DEFAULT (ATen capability DEFAULT)"
    assert result["info"]["self-test cpu"].startswith("ok, ")
    assert focal.__file__ != result["focal"]

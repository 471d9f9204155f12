"""The public surface: the package, its exports, the module form, and the build/device error."""

from __future__ import annotations

import inspect

import pytest
import torch

import focal
import focal._extension


def test_import_and_exports():
    assert sorted(focal.__all__) == sorted(
        ["sigmoid_focal_loss", "SigmoidFocalLoss", "softmax_focal_loss", "SoftmaxFocalLoss", "sigmoid_focal_loss_star",
         "SigmoidFocalLossStar", "quality_focal_loss", "QualityFocalLoss", "varifocal_loss", "VarifocalLoss",
         "empty_cache", "reference"]
    )
    for name in focal.__all__:
        assert getattr(focal, name) is not None
    assert callable(focal.sigmoid_focal_loss)
    assert issubclass(focal.SigmoidFocalLoss, torch.nn.Module)
    assert callable(focal.reference.sigmoid_focal_loss) and callable(focal.reference.sigmoid_focal_loss_grad)
    assert isinstance(focal.__version__, str) and focal.__version__.count(".") >= 1


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from focal import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(focal.__all__)


def test_extension_is_loaded_and_op_registered():
    assert focal._extension.BUILD_ERROR is None
    schema = str(torch.ops.focal.sigmoid_focal_loss.default._schema)
    assert schema.startswith("focal::sigmoid_focal_loss(Tensor logits, Tensor targets, Tensor? weight")
    assert schema.endswith("-> (Tensor, Tensor)")
    assert "cpu" in focal._extension.KERNEL_DEVICE_TYPES


def test_signature_matches_torchvision_then_the_extras():
    """torchvision's five parameters first; the extras follow, positional-or-keyword, since
    TorchScript cannot compile keyword-only parameters with defaults."""
    parameters = inspect.signature(focal.sigmoid_focal_loss).parameters
    assert list(parameters) == [
        "inputs", "targets", "alpha", "gamma", "reduction", "weight", "normalizer", "ignore_index", "label_smoothing",
        "background_index",
    ]
    defaults = tuple(parameters[name].default for name in list(parameters)[2:])
    assert defaults == (0.25, 2.0, "none", None, None, -100, 0.0, -1)


def test_module_has_no_state_and_describes_itself():
    criterion = focal.SigmoidFocalLoss(alpha=None, gamma=1.5, reduction="sum", ignore_index=-7, label_smoothing=0.1)
    assert list(criterion.parameters()) == [] and criterion.state_dict() == {}
    assert repr(criterion) == (
        "SigmoidFocalLoss(alpha=None, gamma=1.5, reduction='sum', ignore_index=-7, label_smoothing=0.1, "
        "background_index=-1)"
    )


def test_module_equals_function_with_weight_and_normalizer():
    x = torch.randn(2, 7, 4, requires_grad=True)
    labels = torch.tensor([[0, 3, -1, -7, 2, 1, -1], [-7, -7, 0, 0, 1, 2, 3]])
    weight = torch.rand(2, 7, 1)
    criterion = focal.SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction="sum", ignore_index=-7, label_smoothing=0.1)
    by_module = criterion(x, labels, weight, torch.tensor(3.0))
    by_function = focal.sigmoid_focal_loss(x, labels, 0.5, 1.5, "sum", weight=weight, normalizer=torch.tensor(3.0),
                                           ignore_index=-7, label_smoothing=0.1)
    assert torch.equal(by_module, by_function)
    (g_module,) = torch.autograd.grad(by_module, x)
    (g_function,) = torch.autograd.grad(by_function, x)
    assert torch.equal(g_module, g_function)


def test_docstring_example_runs():
    logits = torch.randn(8, 100, 80, requires_grad=True)  # (N, anchors, classes)
    labels = torch.randint(-1, 80, (8, 100))  # -1 = background
    num_pos = (labels >= 0).sum().clamp(min=1)
    loss = focal.sigmoid_focal_loss(logits, labels, reduction="sum", normalizer=num_pos)
    loss.backward()
    expected = focal.reference.sigmoid_focal_loss(logits, labels, reduction="sum") / num_pos
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert logits.grad.shape == logits.shape


def test_missing_cuda_kernel_error_says_how_to_rebuild(monkeypatch):
    """What a CPU-only build says for a CUDA tensor (checked without a GPU by removing the kernel)."""
    monkeypatch.setattr(focal._extension, "KERNEL_DEVICE_TYPES", frozenset({"cpu"}))
    message = r"focal has no kernel for cuda tensors: rebuild focal .*FOCAL_WITH_CUDA=1 pip install"
    with pytest.raises(RuntimeError, match=message):
        focal._extension.require_kernels(torch.device("cuda"))
    focal._extension.require_kernels(torch.device("cpu"))  # and the CPU still passes


@pytest.mark.parametrize("device_type", ["mps", "xpu", "meta"])
def test_device_without_kernels_names_it_the_build_and_the_way_out(device_type):
    message = (rf"focal has no kernel for {device_type} tensors: only CPU and CUDA tensors are supported "
               rf"\(this build: cpu.*\)\. Move the tensors to one of those, or use focal\.reference")
    with pytest.raises(RuntimeError, match=message):
        focal._extension.require_kernels(torch.device(device_type))


def _two_gpus(monkeypatch) -> list:
    """Made-up GPUs for a build with CUDA code for sm_80, sm_90 and compute_90: cuda:0 an H200 (9.0),
    cuda:1 a T4 (7.5). Returns the list of device indices whose capability was asked for."""
    asked = []
    gpus = {0: ("NVIDIA H200", (9, 0)), 1: ("Tesla T4", (7, 5))}
    monkeypatch.setattr(focal._extension, "KERNEL_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(focal._extension, "BUILD_INFO", dict(focal._extension.BUILD_INFO or {}, cuda_sass=["8.0", "9.0"],
                                                             cuda_ptx=["9.0"]))
    monkeypatch.setattr(focal._extension, "_CUDA_DEVICE_ERRORS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: gpus[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or gpus[index][1])
    return asked


def test_gpu_the_build_does_not_cover_is_refused_once_checked(monkeypatch):
    asked = _two_gpus(monkeypatch)
    message = (r"focal has no kernel for cuda:1 \(Tesla T4, compute capability 7\.5\): this build has CUDA code for "
               r"sm_80, sm_90, compute_90 \(PTX\), none of which runs there\. Rebuild for it: "
               r"TORCH_CUDA_ARCH_LIST=7\.5 pip install --no-build-isolation")
    for _ in range(2):
        focal._extension.require_kernels(torch.device("cuda", 0))
        focal._extension.require_kernels(torch.device("cuda"))  # the current device, cuda:0
        with pytest.raises(RuntimeError, match=message):
            focal._extension.require_kernels(torch.device("cuda", 1))
    assert asked == [0, 1]  # each device's capability is read once


def test_gpu_check_traces_under_compile(monkeypatch):
    """Under torch.compile the check runs once, while tracing, and leaves nothing in the graph."""
    asked = _two_gpus(monkeypatch)

    def step(x):
        focal._extension.require_kernels(torch.device("cuda", 0))
        return x * 2

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0)) and asked == [0]
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0)) and asked == [0]


def test_gpu_check_carries_the_mark_of_assume_constant_result():
    """focal/_extension.py marks the check by hand, to keep torch._dynamo out of `import focal`: the
    mark must be the one the public decorator sets in this torch."""
    def probe(index):
        return None

    marked = vars(torch.compiler.assume_constant_result(probe))
    assert marked and marked.items() <= vars(focal._extension.cuda_device_error).items()


def test_unloadable_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(focal._extension, "BUILD_ERROR", "No module named 'focal._C'")
    message = r"focal\._C could not be loaded \(No module named 'focal._C'\)\. Build it with: pip install"
    with pytest.raises(RuntimeError, match=message):
        focal.sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_reference_is_usable_without_the_extension():
    # The reference is plain PyTorch: same values as the op on a small case.
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([1, -1, 3])
    torch.testing.assert_close(focal.reference.sigmoid_focal_loss(x, t, reduction="sum"),
                               focal.sigmoid_focal_loss(x, t, reduction="sum"), rtol=1e-12, atol=0)

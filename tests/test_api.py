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
    ]
    defaults = tuple(parameters[name].default for name in list(parameters)[2:])
    assert defaults == (0.25, 2.0, "none", None, None, -100, 0.0)


def test_module_has_no_state_and_describes_itself():
    criterion = focal.SigmoidFocalLoss(alpha=None, gamma=1.5, reduction="sum", ignore_index=-7, label_smoothing=0.1)
    assert list(criterion.parameters()) == [] and criterion.state_dict() == {}
    assert repr(criterion) == (
        "SigmoidFocalLoss(alpha=None, gamma=1.5, reduction='sum', ignore_index=-7, label_smoothing=0.1)"
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

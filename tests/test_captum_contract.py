"""The Captum adapters keep Captum's contract: training-mode models explained with eval
semantics and left unchanged, the inputs LayerGradCam takes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from torch import nn

from captum_split import GradCAMPlusPlus, LayerCAM, SplitCAM, plugin


def _state(model: nn.Module) -> tuple[list[bool], list[torch.Tensor]]:
    return [m.training for m in model.modules()], [b.clone() for b in model.buffers()]


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    flags, buffers = before
    assert [m.training for m in model.modules()] == flags
    after = list(model.buffers())
    assert len(after) == len(buffers)
    for old, new in zip(buffers, after, strict=True):  # bit for bit, dtype included
        assert old.dtype == new.dtype and torch.equal(old, new)


def _explain_resnet(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    if method == "LayerCAM":
        return LayerCAM(model, model.layer3).attribute(x, target=y)
    if method == "GradCAMPlusPlus":
        return GradCAMPlusPlus(model, "layer3").attribute(x, target=y)
    return plugin.grad_cam(model, x, y, layer="layer3")


@pytest.mark.parametrize("method", ["LayerCAM", "GradCAMPlusPlus", "grad_cam"])
def test_training_mode_model_is_explained_in_eval_semantics_and_left_unchanged(method):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    model.layer1[0].bn1.momentum = 0.5  # a changed running mean would be plain to see
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    before = _state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _explain_resnet(method, model, x, y)
    _assert_unchanged(model, before)
    assert model.layer1[0].bn1.num_batches_tracked.item() == 0
    mode = [w for w in caught if "training mode" in str(w.message)]
    assert len(mode) == 1 and mode[0].filename == __file__  # points at the user's line
    model.eval()
    want = _explain_resnet(method, model, x, y)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
    assert got.abs().sum() > 0


class _Text(nn.Module):
    """A text model as Captum's tutorials have it: token ids, an embedding, a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 6, 3)
        self.fc = nn.Linear(6, 3)

    def head(self, act: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(act).mean(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.emb(ids).transpose(1, 2)))


def test_layercam_explains_token_ids_as_layergradcam_does():
    torch.manual_seed(0)
    model = _Text().eval()
    ids, y = torch.randint(0, 20, (4, 9)), torch.tensor([0, 2, 1, 2])
    act = model.conv(model.emb(ids).transpose(1, 2)).detach().requires_grad_()
    (grad,) = torch.autograd.grad(model.head(act).gather(1, y[:, None]).sum(), act)
    want = F.relu((F.relu(grad) * act).sum(1, keepdim=True)).detach()
    got = LayerCAM(model, model.conv).attribute(ids, target=y)
    torch.testing.assert_close(got.detach(), want)
    # Grad-CAM from Captum on the same ids: the channel mean of the same gradient
    weights = grad.mean(2, keepdim=True)
    torch.testing.assert_close(
        LayerGradCam(model, model.conv).attribute(ids, target=y).detach(),
        (weights * act).sum(1, keepdim=True).detach())
    assert GradCAMPlusPlus(model, "conv").attribute(ids, target=y).shape == (4, 1, 7)


class _SelfCasting(nn.Module):
    """A model that casts its own input: uint8 images or float64 arrays are fine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("cls", [LayerCAM, GradCAMPlusPlus])
def test_cams_take_uint8_and_float64_into_a_model_that_casts_its_input(cls):
    torch.manual_seed(0)
    model = _SelfCasting().eval()
    x, y = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 2])
    got = cls(model, model.conv).attribute(x, target=y)
    assert got.dtype == torch.float32 and got.shape == (2, 1, 6, 6)
    torch.testing.assert_close(cls(model, "conv").attribute(x.double(), target=y), got)
    if cls is LayerCAM:  # by hand: the model after its cast
        act = model.conv(x.float() / 255).detach().requires_grad_()
        out = model.fc(torch.relu(act).mean((2, 3)))
        (grad,) = torch.autograd.grad(out.gather(1, y[:, None]).sum(), act)
        torch.testing.assert_close(got.detach(),
                                   F.relu((F.relu(grad) * act).sum(1, keepdim=True)))


@pytest.mark.parametrize("cls", [LayerCAM, GradCAMPlusPlus])
def test_a_true_dtype_mismatch_is_one_typeerror_naming_both_dtypes(cls):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"^LayerCAM|^GradCAMPlusPlus") as err:
        cls(model, model[0]).attribute(x.double(), target=0)
    message = str(err.value)
    assert "inputs is torch.float64 but the model's parameters are torch.float32; pass " \
           "x.to(torch.float32)" in message and "\n" not in message
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(TypeError, match=r"inputs is torch\.uint8 but the model's parameters "
                                        r"are torch\.float32; pass x\.to\(torch\.float32\)\.$"):
        cls(model, model[0]).attribute(x.to(torch.uint8), target=0)


def test_split_methods_still_refuse_integer_inputs_saying_what_to_do():
    model = _SelfCasting().eval()
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"SplitCAM: inputs must be floating-point.*got "
                                        r"torch\.uint8\. Pass x\.float\(\)"):
        SplitCAM(model, "conv").attribute(x, target=0)

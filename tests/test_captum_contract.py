"""The Captum adapters keep Captum's contract: training-mode models explained with eval
semantics and left unchanged, the inputs LayerGradCam takes, errors in the adapter's words,
``output=``, ``reuse_capture`` and ``target=None`` for single-score models."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam, LayerGradientXActivation, Saliency
from torch import nn

from captum_split import GradCAMPlusPlus, LayerCAM, SplitCAM, SplitGrad, plugin


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
    if method == "SplitCAM":
        return SplitCAM(model, "layer3", alpha=0.5).attribute(x, target=y)
    return plugin.grad_cam(model, x, y, layer="layer3")


@pytest.mark.parametrize("method", ["LayerCAM", "GradCAMPlusPlus", "grad_cam", "SplitCAM"])
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


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv(x))
        return {"logits": self.fc(h.mean((2, 3))), "features": h}


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["logits"]


def test_output_picks_the_logits_of_a_dict_output():
    torch.manual_seed(0)
    model = _DictOut().eval()
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    wrapped = _Logits(model).eval()
    got = SplitCAM(model, "conv", output="logits").attribute(x, target=y)
    want = SplitCAM(wrapped, "model.conv").attribute(x, target=y)
    torch.testing.assert_close(got, want)
    pick = lambda out: out["logits"]  # noqa: E731
    torch.testing.assert_close(SplitGrad(model, alpha=0.5, output=pick).attribute(x, target=y),
                               SplitGrad(wrapped, alpha=0.5).attribute(x, target=y))
    torch.testing.assert_close(
        plugin.split_cam(model, x, y, layer="conv", output="logits"),
        plugin.split_cam(wrapped, x, y, layer="model.conv"))
    assert got.abs().sum() > 0


def test_core_advice_reaches_the_user_in_the_adapters_words():
    model, x = _DictOut().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"Pass output=.*e\.g\. SplitCAM\(model, 'conv', "
                                        r"output=0\)\.$") as err:
        SplitCAM(model, "conv").attribute(x, target=0)
    assert "core.split" not in str(err.value)
    with pytest.raises(TypeError, match=r"e\.g\. SplitGrad\(model, output=0\)\.$"):
        SplitGrad(model).attribute(x, target=0)

    class Gelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.gelu(self.conv(x)).mean((2, 3)))

    with pytest.raises(TypeError, match=r"SplitCAM\(model, 'conv', nonlinear='freeze'\) "
                                        r"splits it") as err:
        SplitCAM(Gelu().eval(), "conv").attribute(x, target=0)
    assert "core.split" not in str(err.value)
    with pytest.raises(TypeError, match=r"^SplitCAM: output must be an int index"):
        SplitCAM(model, "conv", output=1.5)


class _Configured(nn.Module):
    """A forward that branches on a config object, which no module fingerprint sees."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(flip=False)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        if self.cfg.flip:
            z = -z
        return self.fc(torch.relu(z).mean((2, 3)))


def test_reuse_capture_false_follows_python_state_the_forward_reads():
    torch.manual_seed(0)
    model = _Configured().eval()
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    cam = SplitCAM(model, "conv", alpha=0.5, reuse_capture=False)
    grad = SplitGrad(model, alpha=0.5, reuse_capture=False)
    maps = []
    for flip in (False, True):
        model.cfg.flip = flip
        got = cam.attribute(x, target=y)
        want = LayerGradientXActivation(model, model.conv).attribute(x, target=y)
        torch.testing.assert_close(got, want.sum(1, keepdim=True).detach() / 2)
        torch.testing.assert_close(grad.attribute(x, target=y),
                                   Saliency(model).attribute(x, target=y, abs=False) / 2)
        maps.append(got)
    assert not torch.allclose(maps[0], maps[1])  # the flip changes the map
    assert cam.reuse_capture is False
    with pytest.raises(TypeError, match="reuse_capture"):
        SplitCAM(model, "conv", reuse_capture="no")


class _OneScore(nn.Module):
    def __init__(self, flat: bool = False, classes: int = 1) -> None:
        super().__init__()
        self.flat = flat
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        return out[:, 0] if self.flat else out


@pytest.mark.parametrize("flat", [False, True], ids=["B_1", "B"])
def test_target_none_explains_the_one_score_of_each_row(flat):
    torch.manual_seed(0)
    model = _OneScore(flat).eval()
    x = torch.randn(3, 3, 8, 8)
    got = SplitCAM(model, "conv", alpha=0.5).attribute(x)
    want = LayerGradientXActivation(model, model.conv).attribute(x)  # Captum, target=None
    torch.testing.assert_close(got, want.sum(1, keepdim=True).detach() / 2)
    torch.testing.assert_close(SplitGrad(model, alpha=0.5).attribute(x),
                               Saliency(model).attribute(x, abs=False) / 2)
    if not flat:
        torch.testing.assert_close(got, SplitCAM(model, "conv", alpha=0.5).attribute(x, 0))
    assert LayerCAM(model, "conv").attribute(x).shape == got.shape
    assert got.abs().sum() > 0


def test_target_none_is_refused_for_several_scores_per_row():
    model, x = _OneScore(classes=3).eval(), torch.randn(2, 3, 8, 8)
    for explainer in (SplitCAM(model, "conv"), SplitGrad(model)):
        with pytest.raises(ValueError, match=r"target=None explains a model with one score "
                                             r"per row.*this one is \(2, 3\)\. Pass target="):
            explainer.attribute(x)


def test_target_none_on_a_dict_output_asks_for_output_then_explains_its_one_score():
    class Scored(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _OneScore(flat=True)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"score": self.inner(x)}

    torch.manual_seed(0)
    model, x = Scored().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"e\.g\. SplitCAM\(model, 'inner\.conv', output=0\)"):
        SplitCAM(model, "inner.conv").attribute(x)
    got = SplitCAM(model, "inner.conv", alpha=0.5, output="score").attribute(x)
    torch.testing.assert_close(got, SplitCAM(model.inner, "conv", alpha=0.5).attribute(x))

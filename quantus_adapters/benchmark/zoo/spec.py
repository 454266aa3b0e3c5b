"""``--model``/``--weights`` as a picklable value: the same model in every process.

A :class:`ModelSpec` names a model the way the command line does. The driver calls
:meth:`ModelSpec.load` (weights from ``--weights``, the built-in digits CNN from its cache or
trained); a Ray worker calls :meth:`ModelSpec.architecture` and loads the driver's
``state_dict`` into it, so that every worker holds exactly the driver's weights without
downloading or training anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from quantus_adapters.benchmark.zoo import models

__all__ = ["BUILTIN_MODELS", "ModelSpec"]

BUILTIN_MODELS = ("digits-cnn", "cifar10-resnet20", "vgg16", "resnet18")
_DEFAULT_FOR_DATA = {"digits": "digits-cnn", "cifar10-resnet20": "cifar10-resnet20"}


@dataclass(frozen=True)
class ModelSpec:
    """A model named by ``--model`` and ``--weights``.

    Attributes
    ----------
    name: str
        ``digits-cnn``, ``cifar10-resnet20``, ``vgg16``, ``resnet18`` or ``FILE.py:FACTORY``.
    weights: str or None
        A ``state_dict`` file (``--weights``).
    cache_dir: str or None
        Where the built-in digits CNN is cached.
    """

    name: str
    weights: str | None = None
    cache_dir: str | None = None

    @classmethod
    def from_options(cls, model: str | None, weights: str | None, data: str,
                     cache_dir: str | None = None) -> ModelSpec:
        """The spec of ``--model`` (its default follows ``--data``).

        Raises
        ------
        ModelError
            No ``--model`` for data without a built-in model, or an unknown model name.
        """
        name = model
        if name is None:
            name = _DEFAULT_FOR_DATA.get(data)
            if name is None:
                raise models.ModelError(f"--data {data}: give --model (vgg16, resnet18 or "
                                        "FILE.py:FACTORY)")
        if name == "resnet20":
            name = "cifar10-resnet20"
        if name not in BUILTIN_MODELS and not (":" in name or name.endswith(".py")):
            raise models.ModelError(f"--model {name!r}: use one of "
                                    f"{', '.join(BUILTIN_MODELS)} or FILE.py:FACTORY")
        if name not in BUILTIN_MODELS and ":" in name:
            # absolute paths: other processes (Ray workers) may start in another folder
            file, factory = name.rsplit(":", 1)
            name = f"{Path(file).expanduser().absolute()}:{factory}"
        if weights is not None:
            weights = str(Path(weights).expanduser().absolute())
        return cls(name, weights, cache_dir)

    def architecture(self) -> nn.Module:
        """The model without trained weights (nothing is downloaded or trained)."""
        if self.name == "digits-cnn":
            return models.DigitsVGG().eval()
        if self.name == "cifar10-resnet20":
            from core import zoo

            return models.Normalised(zoo.resnet20(pretrained=False), zoo.CIFAR10_MEAN,
                                     zoo.CIFAR10_STD).eval()
        if self.name in ("vgg16", "resnet18"):
            import torchvision

            builder = getattr(torchvision.models, self.name)
            return models.Normalised(builder(weights=None), models.IMAGENET_MEAN,
                                     models.IMAGENET_STD).eval()
        return models.load_factory(self.name).eval()

    def load(self, progress: bool = True,
             log: Callable[[str], None] | None = print) -> nn.Module:
        """The model with its weights: ``--weights``, else the built-in ones.

        The built-in digits CNN comes from its cache (trained and cached on first use);
        vgg16 / resnet18 without ``--weights`` use torchvision's ImageNet weights; a
        ``FILE.py:FACTORY`` model keeps the weights its factory gives it.
        """
        if self.name in ("vgg16", "resnet18"):
            return models.torchvision_imagenet(self.name, self.weights)
        if self.weights is not None:
            model = self.architecture()
            models.load_weights(model, self.weights)
            return model.eval()
        if self.name == "digits-cnn":
            return models.digits_cnn(cache_dir=self.cache_dir, seed=0, log=log,
                                     progress=progress).eval()
        if self.name == "cifar10-resnet20":
            return models.cifar10_resnet20()
        return self.architecture()

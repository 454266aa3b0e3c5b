"""Plugin discovery: entry points, third-party distributions, clashes, broken plugins."""

from __future__ import annotations

import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import quantus_adapters
from quantus_adapters import (
    MethodClashError,
    PluginLoadWarning,
    UnknownMethodError,
    available_methods,
    explain,
    refresh,
)

BASELINES = [
    "Saliency", "InputXGradient", "IntegratedGradients", "GradientShap", "GuidedBackprop",
    "Deconvolution", "DeepLift", "Occlusion", "FeatureAblation", "Random",
]

PLUGIN_SOURCE = '''
"""A third-party splitxai plugin used by the tests."""
import pluggy
import torch

hookimpl = pluggy.HookimplMarker("splitxai")


def brightness(model, inputs, targets, *, power: float = 1.0):
    """Brightness: the input's channel sum to a power (a third-party test method).

    More text that is not part of the description.
    """
    return inputs.sum(dim=1, keepdim=True) ** power


@hookimpl
def splitxai_explainers():
    return {METHODS}
'''


class TempDistributions:
    """Install distributions into a temporary directory on ``sys.path``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def add(self, dist: str, entry_points: dict[str, str], modules: dict[str, str],
            version: str = "1.0") -> None:
        for name, source in modules.items():
            (self.root / f"{name}.py").write_text(textwrap.dedent(source))
            self.modules.append(name)
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[splitxai]\n{lines}")


@pytest.fixture
def dists(tmp_path):
    """A temporary site directory on sys.path; the registry is re-created afterwards."""
    sys.path.insert(0, str(tmp_path))
    installer = TempDistributions(tmp_path)
    try:
        yield installer
    finally:
        sys.path.remove(str(tmp_path))
        for name in installer.modules:
            sys.modules.pop(name, None)
        refresh()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def plugin_source(methods: str) -> str:
    return PLUGIN_SOURCE.replace("{METHODS}", methods)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_markers_and_project_name():
    assert quantus_adapters.PROJECT_NAME == "splitxai"
    assert quantus_adapters.ENTRY_POINT_GROUP == "splitxai"
    assert quantus_adapters.hookimpl.project_name == "splitxai"
    assert quantus_adapters.hookspec.project_name == "splitxai"
    manager = quantus_adapters.get_plugin_manager()
    assert manager.project_name == "splitxai"
    assert hasattr(manager.hook, "splitxai_explainers")


def test_baselines_come_from_the_entry_point():
    methods = available_methods()
    for name in BASELINES:
        assert name in methods
        info = quantus_adapters.method_info(name)
        assert info.plugin == "baselines"
        assert info.distribution.startswith("splitxai ")
        description = methods[name]
        assert description and "\n" not in description and not description.startswith("CLASH")
    assert list(methods) == sorted(methods)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(UnknownMethodError) as err:
        explain(tiny_model(), np.ones((1, 3, 8, 8), np.float32), [0], method="NoSuchMethod")
    message = str(err.value)
    assert "'NoSuchMethod'" in message
    for name in ("Saliency", "Random", "Occlusion"):
        assert name in message


def test_unknown_method_suggests_the_case_fix():
    with pytest.raises(UnknownMethodError, match="Did you mean 'Saliency'"):
        quantus_adapters.get_explainer("saliency")


def test_third_party_distribution_is_discovered(dists):
    module = unique("thirdparty_xai")
    dists.add("thirdparty-xai", {"thirdparty": module},
              {module: plugin_source('{"Brightness": brightness}')}, version="2.3")
    assert "Brightness" not in available_methods()
    refresh()
    methods = available_methods()
    assert methods["Brightness"] == (
        "Brightness: the input's channel sum to a power (a third-party test method)."
    )
    info = quantus_adapters.method_info("Brightness")
    assert info.plugin == "thirdparty"
    assert info.distribution == "thirdparty-xai 2.3"
    for name in BASELINES:  # the project's own plugins are still there
        assert name in methods

    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    out = explain(tiny_model(), x, np.array([0, 2]), method="Brightness", power=2.0)
    np.testing.assert_allclose(out, x.sum(axis=1, keepdims=True) ** 2, rtol=1e-6)


def test_clash_with_a_project_method_names_both_plugins(dists):
    module = unique("clashing_xai")
    dists.add("clashing-xai", {"clasher": module},
              {module: plugin_source('{"Saliency": brightness, "Brightness2": brightness}')})
    refresh()
    methods = available_methods()
    assert methods["Saliency"].startswith("CLASH")
    assert "Brightness2" in methods  # the plugin's other methods still work
    with pytest.raises(MethodClashError) as err:
        explain(tiny_model(), np.ones((1, 3, 8, 8), np.float32), [0], method="Saliency")
    message = str(err.value)
    assert "'baselines'" in message and "'clasher'" in message
    assert "clashing-xai 1.0" in message and "splitxai" in message


def test_clash_between_two_third_party_plugins(dists):
    first, second = unique("first_xai"), unique("second_xai")
    dists.add("first-xai", {"first": first}, {first: plugin_source('{"Shared": brightness}')})
    dists.add("second-xai", {"second": second},
              {second: plugin_source('{"Shared": brightness}')})
    refresh()
    with pytest.raises(MethodClashError, match="'first'.*'second'|'second'.*'first'"):
        quantus_adapters.get_explainer("Shared")


def test_same_entry_point_name_in_two_distributions_is_not_dropped(dists):
    first, second = unique("dup_a"), unique("dup_b")
    dists.add("dup-a", {"dup": first}, {first: plugin_source('{"DupMethod": brightness}')})
    dists.add("dup-b", {"dup": second}, {second: plugin_source('{"DupMethod": brightness}')})
    refresh()
    with pytest.raises(MethodClashError) as err:
        quantus_adapters.get_explainer("DupMethod")
    assert "dup-a 1.0" in str(err.value) and "dup-b 1.0" in str(err.value)


def test_broken_plugin_is_reported_and_others_still_load(dists):
    module = unique("broken_xai")
    dists.add("broken-xai", {"broken": module},
              {module: "import this_module_does_not_exist_anywhere\n"})
    with pytest.warns(PluginLoadWarning, match="'broken'.*this_module_does_not_exist"):
        refresh()
    assert "broken" in quantus_adapters.plugin_errors()
    assert "Saliency" in available_methods()
    with pytest.raises(UnknownMethodError, match="broken.*this_module_does_not_exist"):
        quantus_adapters.get_explainer("WhatBrokenWouldOffer")


def test_plugin_returning_a_non_dict_is_reported(dists):
    module = unique("nondict_xai")
    source = PLUGIN_SOURCE.replace("return {METHODS}", 'return ["not", "a", "dict"]')
    dists.add("nondict-xai", {"nondict": module}, {module: source})
    with pytest.warns(PluginLoadWarning, match="'nondict'.*expected a dict"):
        refresh()
    assert "Saliency" in available_methods()


@pytest.mark.parametrize("source, reason", [
    (PLUGIN_SOURCE.replace("def splitxai_explainers():", "def splitxai_explainers(model):"),
     "PluginValidationError"),
    (PLUGIN_SOURCE.replace("def splitxai_explainers():", "def splitxai_explainer():"),
     "splitxai_explainer"),
])
def test_plugin_with_a_bad_hook_is_reported_and_others_still_load(dists, source, reason):
    module = unique("badhook_xai")
    after = unique("after_xai")  # a good plugin whose name sorts after the bad one
    dists.add("badhook-xai", {"badhook": module},
              {module: source.replace("{METHODS}", '{"BadHook": brightness}')})
    dists.add("zz-after-xai", {"zz_after": after},
              {after: plugin_source('{"AfterBad": brightness}')})
    with pytest.warns(PluginLoadWarning, match=f"'badhook'.*{reason}"):
        refresh()
    methods = available_methods()
    assert "BadHook" not in methods
    assert "AfterBad" in methods and "Saliency" in methods


def test_register_at_run_time():
    class Plugin:
        @quantus_adapters.hookimpl
        def splitxai_explainers(self):
            def half(model, inputs, targets):
                """Half: half the input."""
                return inputs / 2

            return {"RuntimeHalf": half}

    try:
        name = quantus_adapters.register(Plugin(), name="runtime")
        assert name == "runtime"
        assert available_methods()["RuntimeHalf"] == "Half: half the input."
        info = quantus_adapters.method_info("RuntimeHalf")
        assert (info.plugin, info.distribution) == ("runtime", "registered at run time")
    finally:
        refresh()
    assert "RuntimeHalf" not in available_methods()


def test_the_project_plugins_load_through_their_entry_points():
    manager = quantus_adapters.get_plugin_manager()
    errors = quantus_adapters.plugin_errors()
    for name in ("baselines", "captum", "zennit", "dc"):
        assert name not in errors, errors[name]
        assert manager.has_plugin(name)
    assert set(available_methods()) >= {
        "SplitCAM", "SplitGrad", "LayerCAM", "GradCAM", "GradCAMPlusPlus", "SplitLRP", "LRP",
        "DCGrad", *BASELINES,
    }


def test_one_module_under_two_entry_point_names_is_registered_once(dists):
    module = unique("twice")
    dists.add("twice-xai", {"one": module, "two": module},
              {module: plugin_source('{"TwiceMethod": brightness}')})
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)
        refresh()
    methods = quantus_adapters.available_methods()
    assert "TwiceMethod" in methods and "SplitCAM" in methods
    assert quantus_adapters.method_info("TwiceMethod").plugin == "one"
    assert not {"one", "two"} & set(quantus_adapters.plugin_errors())

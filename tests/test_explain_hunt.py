"""``splitxai explain``: map file names, duplicate configurations, empty --methods, models
whose output is not a tensor."""


import numpy as np
import pytest

from tests.benchmark_files import TINY_MODEL_PY
from tests.explain_runs import read_index as _index
from tests.explain_runs import run_explain as _run


def _folder(tmp_path, names):
    """A ``folder:`` data set of 16x16 RGB images named ``names`` (labels ``i % 3``) and the
    tiny 3-class model file; returns the common arguments."""
    from PIL import Image

    (tmp_path / "tiny.py").write_text(TINY_MODEL_PY)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "images" / name)
    (root / "labels.csv").write_text(
        "".join(f"{name},{i % 3}\n" for i, name in enumerate(names)), encoding="utf-8")
    return ["--model", f"{tmp_path / 'tiny.py'}:build", "--data", f"folder:{root}"]


@pytest.mark.parametrize("names", [["a b.png", "a_b.png", "c.png"],
                                   ["猫.png", "犬.png"],
                                   ["Cat.png", "cat.png"]])
def test_names_sharing_a_map_file_are_refused(tmp_path, capsys, names):
    """Two images whose names give one map file: the second map overwrote the first and the
    run said it wrote both (exit 0)."""
    base = _folder(tmp_path, names)
    out = tmp_path / "maps"
    rc, printed = _run([*base, "--methods", "Saliency", "--out", out], capsys)
    assert rc == 2, printed.err
    assert len(printed.err.strip().splitlines()) == 1
    assert "would share one map file" in printed.err and "rename" in printed.err
    assert repr(names[0]) in printed.err and repr(names[1]) in printed.err
    assert not out.exists()


def test_distinct_names_get_one_file_each(tmp_path, capsys):
    names = ["a b.png", "a-b.png", "café.png", "x.png"]
    base = _folder(tmp_path, names)
    out = tmp_path / "maps"
    rc, printed = _run([*base, "--methods", "Saliency", "--out", out], capsys)
    assert rc == 0, printed.err
    rows = _index(out)
    assert sorted(r["image"] for r in rows) == sorted(names)
    assert len({r["file"] for r in rows}) == len(names) == len(list(out.rglob("*.npz")))


def test_a_layer_given_twice_is_one_configuration(tmp_path, capsys):
    """``--layers 3 3``: two configurations in one folder -- each map computed and indexed
    twice, and "wrote 6 maps" for 3 files."""
    base = _folder(tmp_path, ["a.png", "b.png", "c.png"])
    out = tmp_path / "maps"
    rc, printed = _run([*base, "--methods", "SplitCAM", "--layers", "3", "3", "0",
                        "--out", out], capsys)
    assert rc == 0, printed.err
    rows = _index(out)
    assert len(rows) == 6 == len({r["file"] for r in rows}) == len(list(out.rglob("*.npz")))
    assert "wrote 6 maps (2 configuration(s) x 3 images" in printed.out


def test_configurations_sharing_a_folder_are_refused():
    from quantus_adapters.bulk import plan_configs

    # module names of an nn.ModuleDict may hold any character
    with pytest.raises(ValueError, match="would share the map folder 'SplitCAM@conv_1'"):
        plan_configs(["SplitCAM"], ["conv 1", "conv_1"])
    with pytest.raises(ValueError, match="would share the map folder"):
        plan_configs(["SplitCAM"], ["head.Conv", "head.conv"])
    assert len(plan_configs(["SplitCAM", "Saliency"], ["conv_1", "conv_2"])) == 3


@pytest.mark.parametrize("methods", [[""], [","], [" , "]])
def test_no_method_named_is_refused(tmp_path, capsys, methods):
    """``--methods ''`` (an empty shell variable): 0 configurations, an empty --out, exit 0."""
    base = _folder(tmp_path, ["a.png"])
    out = tmp_path / "maps"
    rc, printed = _run([*base, "--methods", *methods, "--out", out], capsys)
    assert rc == 2, printed
    assert printed.err.startswith("splitxai explain: error: --methods names no method; give "
                                  "one or more of ")
    assert "SplitCAM" in printed.err and len(printed.err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("returns, kind", [("(logits, x)", "tuple"),
                                           ("{'logits': logits}", "dict")])
def test_a_model_returning_no_tensor_is_a_usage_error(tmp_path, capsys, returns, kind):
    """A model returning a tuple or dict: 'internal error: AttributeError: ... no attribute
    'ndim'', exit 1."""
    base = _folder(tmp_path, ["a.png"])
    (tmp_path / "wrapped.py").write_text(
        TINY_MODEL_PY + "\n\n"
        "class Wrapped(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = build()\n\n"
        "    def forward(self, x):\n"
        "        logits = self.net(x)\n"
        f"        return {returns}\n\n"
        "def wrapped():\n"
        "    return Wrapped().eval()\n")
    base[1] = f"{tmp_path / 'wrapped.py'}:wrapped"
    out = tmp_path / "maps"
    rc, printed = _run([*base, "--methods", "Saliency", "--out", out], capsys)
    assert rc == 2, printed.err
    assert printed.err.strip() == (
        f"splitxai explain: error: the model returns a {kind}, not a tensor; a classifier "
        "returning (batch, classes) logits is needed (wrap the model so that its forward "
        "returns the logits alone)")
    assert not out.exists()


def test_methods_quoted_with_spaces_after_commas(tmp_path, capsys):
    """``--methods "Saliency, SplitCAM"``: "unknown method ' SplitCAM'"."""
    base = _folder(tmp_path, ["a.png"])
    out = tmp_path / "maps"
    rc, printed = _run([*base, "--methods", "Saliency, SplitCAM", "--out", out], capsys)
    assert rc == 0, printed.err
    assert {r["method"] for r in _index(out)} == {"Saliency", "SplitCAM"}


def test_repeated_methods_and_layers_add_up(tmp_path, capsys):
    """``--methods A --methods B --layers 0 --layers 3``: only B at layer 3 (the last of
    each), silently."""
    base = _folder(tmp_path, ["a.png"])
    out = tmp_path / "maps"
    rc, printed = _run([*base, "--methods", "Saliency", "--methods", "SplitCAM",
                        "--layers", "0", "--layers", "3", "--out", out], capsys)
    assert rc == 0, printed.err
    assert {(r["method"], r["layer"]) for r in _index(out)} == {
        ("Saliency", ""), ("SplitCAM", "0"), ("SplitCAM", "3")}


def test_resume_refuses_a_folder_of_other_options(tmp_path, capsys):
    """``--option tag="a b"`` then ``--resume --option tag=a_b``: one folder name
    (``Tagged_tag=a_b``), and --resume took the maps of "a b" for those of "a_b"."""
    from quantus_adapters import registry

    class Plugin:
        @registry.hookimpl
        def splitxai_explainers(self):
            def tagged(model, inputs, targets, *, tag=""):
                """The input times the tag's length (maps that depend on the option)."""
                return inputs.sum(1, keepdim=True) * (1 + len(tag))

            return {"Tagged": tagged}

    base = _folder(tmp_path, ["a.png", "b.png"])
    out = tmp_path / "maps"
    name = registry.register(Plugin(), name="tagged-test")
    try:
        rc, printed = _run([*base, "--methods", "Tagged", "--option", "tag=a b",
                            "--max-images", "1", "--out", out], capsys)
        assert rc == 0, printed.err
        rc, printed = _run([*base, "--methods", "Tagged", "--option", "tag=a_b", "--resume",
                            "--out", out], capsys)
        assert rc == 2, printed
        assert "holds maps of Tagged with options {\"tag\": \"a b\"}, not {\"tag\": \"a_b\"}" \
            in printed.err and "choose another --out" in printed.err
        rc, printed = _run([*base, "--methods", "Tagged", "--option", "tag=a b", "--resume",
                            "--out", out], capsys)  # the same options: the missing map
        assert rc == 0, printed.err
        assert "--resume: 1 of 2 maps already in" in printed.out
    finally:
        registry.get_plugin_manager().unregister(name=name)
        registry.refresh()


@pytest.mark.parametrize("args, flag", [(["--alpha", "0.3", "--option", "alpha=0.4"], "--alpha"),
                                        (["--layers", "3", "--option", "layer=0"], "--layers")])
def test_an_option_given_twice_is_refused(tmp_path, capsys, args, flag):
    """``--alpha 0.3 --option alpha=0.4``: alpha 0.3, the --option silently dropped."""
    base = _folder(tmp_path, ["a.png"])
    out = tmp_path / "maps"
    rc, printed = _run([*base, "--methods", "SplitCAM", *args, "--out", out], capsys)
    assert rc == 2, printed
    key = flag.lstrip("-").rstrip("s")
    assert printed.err.strip() == (f"splitxai explain: error: --option {key}=... and {flag} "
                                   "both give the same option; give one of them")
    assert not out.exists()

"""``splitxai explain`` in this process: files, index, float16, resume, errors."""

import json
import sys

import numpy as np
import pytest
import torch

import quantus_adapters
from quantus_adapters import cli, registry
from quantus_adapters.benchmark.data import cluttered_digits
from quantus_adapters.benchmark.zoo import models
from tests.explain_runs import read_index as _index
from tests.explain_runs import run_explain as _run


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights of the built-in digits CNN (no training needed to explain)."""
    path = tmp_path_factory.mktemp("weights") / "digits.pt"
    torch.manual_seed(0)
    torch.save(models.DigitsVGG().state_dict(), path)
    return path


def test_maps_index_and_float16(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # without --ray, Ray is never imported
    out = tmp_path / "maps"
    rc, printed = _run(["--weights", weights, "--methods", "SplitCAM", "Saliency", "--layers",
                        "features.6", "features.10", "--alpha", "0.3", "--max-images", "5",
                        "--batch-size", "3", "--out", out], capsys)
    assert rc == 0, printed.err
    rows = _index(out)
    # SplitCAM at two layers (alpha given), Saliency once (no layer, no alpha)
    assert len(rows) == 3 * 5
    assert {(r["method"], r["layer"]) for r in rows} == {
        ("SplitCAM", "features.6"), ("SplitCAM", "features.10"), ("Saliency", "")}
    assert all(json.loads(r["options"]).get("alpha") == 0.3 for r in rows
               if r["method"] == "SplitCAM")
    # each map equals quantus_adapters.explain on the same image and label
    data = cluttered_digits()
    model = models.DigitsVGG()
    models.load_weights(model, weights)
    model.eval()
    for r in rows:
        blob = np.load(out / r["file"])
        assert blob["map"].dtype == np.float32 and blob["map"].shape == (64, 64)
        i = data.names.index(r["image"])
        assert int(blob["label"]) == int(r["label"]) == int(data.labels[i])
        ref = quantus_adapters.explain(model, data.images[i:i + 1], data.labels[i:i + 1],
                                       **{"method": r["method"], **json.loads(r["options"])})
        np.testing.assert_allclose(blob["map"], ref[0, 0], rtol=1e-5, atol=1e-6)
    # float16: same maps rounded, half the bytes per value
    out16 = tmp_path / "maps16"
    rc, printed = _run(["--weights", weights, "--methods", "SplitCAM", "--max-images", "2",
                        "--float16", "--out", out16], capsys)
    assert rc == 0, printed.err
    rows16 = _index(out16)
    assert {r["dtype"] for r in rows16} == {"float16"}
    a16 = np.load(out16 / rows16[0]["file"])["map"]
    ref = quantus_adapters.explain(model, data.images[:1], data.labels[:1], method="SplitCAM")
    assert a16.dtype == np.float16
    np.testing.assert_allclose(a16.astype(np.float32), ref[0, 0], rtol=2e-3,
                               atol=2e-3 * np.abs(ref).max())


def test_resume_adds_only_missing_maps_and_refuses_another_setup(weights, tmp_path, capsys):
    out = tmp_path / "maps"
    common = ["--weights", weights, "--methods", "SplitGrad", "--out", out]
    rc, printed = _run([*common, "--max-images", "3"], capsys)
    assert rc == 0, printed.err
    first = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in _index(out)}
    assert len(first) == 3
    # without --resume an existing output is refused, nothing is touched
    rc, printed = _run([*common, "--max-images", "5"], capsys)
    assert rc == 2 and "--resume" in printed.err and "Traceback" not in printed.err
    # an index line cut by an interruption is dropped; its map is made again
    lines = (out / "index.csv").read_text().splitlines()
    (out / "index.csv").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:12])
    rc, printed = _run([*common, "--max-images", "5", "--resume"], capsys)
    assert rc == 0, printed.err
    assert "2 of 5 maps already" in printed.out
    rows = _index(out)
    assert len(rows) == 5 and len({r["file"] for r in rows}) == 5
    kept = [f for f in first if (out / f).stat().st_mtime_ns == first[f]]
    assert len(kept) == 2  # the two indexed maps were not recomputed
    # other weights: --resume refuses and names what differs
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(models.DigitsVGG().state_dict(), other)
    rc, printed = _run(["--weights", other, "--methods", "SplitGrad", "--out", out, "--resume"],
                       capsys)
    assert rc == 2 and "weights" in printed.err and "another setup" in printed.err


@pytest.mark.parametrize("args, message", [
    (["--methods", "NoSuchMethod"], "unknown method 'NoSuchMethod'"),
    (["--methods", "SplitCAM", "--layers", "features.99"], "features.99"),
    (["--methods", "Saliency", "--alpha", "0.3"], "alpha"),
    (["--methods", "SplitCAM", "--option", "stream"], "KEY=VALUE"),
    (["--methods", "SplitCAM", "--option", "stream=q"], "SplitCAM with"),
    (["--methods", "SplitCAM", "--workers", "2"], "need --ray"),
    (["--methods", "SplitCAM", "--ray", "--gpus-per-worker", "0.5"], "--device cuda"),
    (["--methods", "SplitCAM", "--batch-size", "0"], "--batch-size"),
])
def test_bad_input_is_one_line_before_work(weights, tmp_path, capsys, args, message):
    out = tmp_path / "maps"
    rc, printed = _run(["--weights", weights, "--max-images", "2", "--out", out, *args], capsys)
    assert rc == 2
    assert message in printed.err and "Traceback" not in printed.err
    assert len(printed.err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("command", ["explain", "benchmark"])
def test_ray_missing_gives_the_install_line(weights, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    args = ["--weights", weights, "--out", tmp_path / "o", "--no-progress"]
    args += ["--methods", "SplitCAM"] if command == "explain" else ["--quick"]
    rc = cli.main([command, *map(str, args), "--ray"])
    printed = capsys.readouterr()
    assert rc == 2 and 'pip install "splitxai[ray]"' in printed.err
    assert len(printed.err.strip().splitlines()) == 1
    rc = cli.main([command, *map(str, args), "--workers", "2"])
    assert rc == 2 and "--workers and --gpus-per-worker need --ray" in capsys.readouterr().err


def test_failing_maps_are_named_others_kept_exit_1(weights, tmp_path, capsys):
    class Plugin:
        @registry.hookimpl
        def splitxai_explainers(self):
            def picky(model, inputs, targets, *, layer=None):
                """Fails on images of class 3 (to test the failure report)."""
                if bool((targets == 3).any()):
                    raise RuntimeError("out of memory (simulated)")
                return inputs.sum(1, keepdim=True)

            return {"Picky": picky}

    name = registry.register(Plugin(), name="picky-test")
    try:
        out = tmp_path / "maps"
        labels = cluttered_digits().labels[:6].tolist()
        assert labels[0] != 3 and 3 in labels
        rc, printed = _run(["--weights", weights, "--methods", "Picky", "SplitCAM",
                            "--max-images", "6", "--batch-size", "1", "--out", out], capsys)
    finally:
        registry.get_plugin_manager().unregister(name=name)
        registry.refresh()
    assert rc == 1
    assert "failed: Picky on 1 image(s)" in printed.err and "out of memory" in printed.err
    rows = _index(out)
    assert len(rows) == 6 + 5  # SplitCAM everywhere, Picky on all but the class-3 image


def test_resume_refuses_maps_of_another_model_code(tmp_path, capsys):
    """The model's forward changed (a module-level constant): repr and weights are the
    same, and --resume kept the old model's maps beside the new one's."""
    source = (
        "import torch\nfrom torch import nn\nSCALE = 1.0\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 4, 3, padding=1)\n"
        "        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                                  nn.Linear(4, 10))\n\n"
        "    def forward(self, x):\n"
        "        return self.head(self.conv(x * SCALE))\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Net().eval()\n"
    )
    model_py = tmp_path / "net.py"
    model_py.write_text(source)
    out = tmp_path / "maps"
    common = ["--model", f"{model_py}:build", "--methods", "SplitGrad", "--max-images", "2",
              "--out", out]
    rc, printed = _run(common, capsys)
    assert rc == 0, printed.err
    model_py.write_text(source.replace("SCALE = 1.0", "SCALE = 50.0"))
    rc, printed = _run([*common, "--resume"], capsys)
    assert rc == 2 and "code" in printed.err and "another setup" in printed.err


def test_resume_keeps_one_index_line_per_map(weights, tmp_path, capsys):
    """Two runs into one --out at once each index every map; --resume keeps one line each."""
    out = tmp_path / "maps"
    common = ["--weights", weights, "--methods", "SplitGrad", "--max-images", "3", "--out", out]
    rc, printed = _run(common, capsys)
    assert rc == 0, printed.err
    lines = (out / "index.csv").read_text().splitlines()
    (out / "index.csv").write_text("\n".join(lines + lines[1:]) + "\n")  # every map twice
    rc, printed = _run([*common, "--resume"], capsys)
    assert rc == 0, printed.err
    rows = _index(out)
    assert len(rows) == 3 and len({r["file"] for r in rows}) == 3


def _one_image_folder(tmp_path):
    """A ``folder:`` data set of one 16x16 RGB image (and a tiny 3-class model file)."""
    from PIL import Image

    from tests.benchmark_files import TINY_MODEL_PY

    (tmp_path / "tiny.py").write_text(TINY_MODEL_PY)
    root = tmp_path / "one"
    (root / "images").mkdir(parents=True)
    rgb = (np.random.default_rng(0).uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "images" / "a.png")
    (root / "labels.csv").write_text("a.png,2\n")
    return f"{tmp_path / 'tiny.py'}:build", root


def test_one_image_folder_is_explained_and_bad_weights_come_first(tmp_path, capsys):
    factory, root = _one_image_folder(tmp_path)
    base = ["--data", f"folder:{root}", "--model", factory, "--methods", "Saliency"]
    rc, printed = _run([*base, "--out", tmp_path / "maps"], capsys)
    assert rc == 0, printed.err
    assert [(r["image"], r["label"]) for r in _index(tmp_path / "maps")] == [("a.png", "2")]
    # weights are checked before the data: also with data the benchmark would refuse
    (root / "images" / "b.png").write_bytes(b"not an image")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    rc, printed = _run([*base, "--weights", tmp_path / "junk.pt", "--out", tmp_path / "m2"],
                       capsys)
    assert rc == 2 and "junk.pt' is not a readable torch file" in printed.err, printed.err
    from tests.benchmark_files import TINY_MODEL_PY

    namespace: dict = {}
    exec(TINY_MODEL_PY, namespace)
    torch.save(namespace["build"](), tmp_path / "module.pt")
    rc, printed = _run([*base, "--weights", tmp_path / "module.pt", "--out", tmp_path / "m2"],
                       capsys)
    assert rc == 2 and len(printed.err.splitlines()) == 1, printed.err
    assert ("module.pt' holds a pickled model (torch.nn.modules.container.Sequential, "
            "written by torch.save(model)), not a state_dict; save its weights with "
            "torch.save(model.state_dict(), PATH)") in printed.err
    assert "\x1b" not in printed.err and "weights_only" not in printed.err


def test_seed_range_and_nested_images_note(tmp_path, capsys):
    factory, root = _one_image_folder(tmp_path)
    base = ["--data", f"folder:{root}", "--model", factory, "--methods", "Saliency"]
    for seed in ("-1", str(2**32), "99999999999999999999999"):
        rc, printed = _run([*base, "--seed", seed, "--out", tmp_path / "maps"], capsys)
        assert rc == 2, printed.err
        assert printed.err.strip() == ("splitxai explain: error: --seed must be an integer "
                                       f"from 0 to 4294967295 (2**32 - 1), got {seed}")
    (root / "images" / "cats").mkdir()
    (root / "images" / "a.png").rename(root / "images" / "cats" / "a.png")
    rc, printed = _run([*base, "--out", tmp_path / "maps"], capsys)
    assert rc == 2 and "subfolders are not read" in printed.err, printed.err
    (root / "images" / "cats" / "a.png").rename(root / "images" / "a.png")
    (root / "images" / "cats" / "b.png").write_bytes(b"unused")
    rc, printed = _run([*base, "--seed", str(2**32 - 1), "--out", tmp_path / "maps"], capsys)
    assert rc == 0, printed.err
    assert ("splitxai explain: note: 1 image file(s) in subfolders of" in printed.err
            and "were not used (e.g. cats/b.png)" in printed.err)


def test_random_methods_are_seeded_per_batch(tmp_path, capsys):
    """GradientShap and Random: the same command gives the same maps; --seed changes them
    and is part of what --resume checks."""
    from tests.benchmark_files import TINY_MODEL_PY, write_masked_folder

    (tmp_path / "tiny.py").write_text(TINY_MODEL_PY)
    root = write_masked_folder(tmp_path / "data", 3)
    common = ["--model", f"{tmp_path / 'tiny.py'}:build", "--data", f"folder:{root}",
              "--methods", "GradientShap", "Random", "--batch-size", "2"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 7)):
        rc, printed = _run([*common, "--seed", seed, "--out", tmp_path / name], capsys)
        assert rc == 0, printed.err
        runs[name] = {f.relative_to(tmp_path / name): np.load(f)["map"]
                      for f in sorted((tmp_path / name).rglob("*.npz"))}
    assert len(runs["a"]) == 2 * 3 and runs["a"].keys() == runs["c"].keys()
    for rel, amap in runs["a"].items():
        np.testing.assert_array_equal(amap, runs["b"][rel])
    assert any(not np.array_equal(amap, runs["c"][rel]) for rel, amap in runs["a"].items())
    rc, printed = _run([*common, "--seed", 7, "--out", tmp_path / "a", "--resume"], capsys)
    assert rc == 2 and "different seed" in printed.err


@pytest.mark.parametrize("data", ["digits", "cifar10-resnet20"])
def test_image_size_with_fixed_size_data_is_refused(weights, tmp_path, capsys, data):
    """``--image-size 32 --data digits`` wrote 64x64 maps, exit 0 (the option was ignored)."""
    out = tmp_path / "maps"
    args = ["--data", data, "--methods", "Saliency", "--image-size", "32", "--max-images",
            "1", "--out", out]
    rc, printed = _run(["--weights", weights, *args] if data == "digits" else args, capsys)
    assert rc == 2, printed.err
    assert printed.err.strip() == (
        "splitxai explain: error: --image-size resizes the images of --data folder:PATH or "
        f"imagenet-s:PATH; those of --data {data} keep their size (drop --image-size)")
    assert not out.exists()

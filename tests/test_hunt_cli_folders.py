"""A user's folder and model file with ``splitxai explain``: what ``--resume`` refuses."""

import numpy as np

from tests.explain_runs import read_index as _index
from tests.explain_runs import run_explain as _run

# every class comes from torch: the model file defines none, so its source is not part of
# the code digest; the slope is no weight either -- only the architecture (repr) shows it
MODEL_PY = (
    "import torch\nfrom torch import nn\nSLOPE = 0.01\n\n"
    "def build():\n"
    "    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(SLOPE),\n"
    "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
)


def _folder(tmp_path, n=3):
    from PIL import Image

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        rgb = (rng.uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"im{i}.png")
    (root / "labels.csv").write_text("".join(f"im{i}.png,{i % 3}\n" for i in range(n)))
    return root


def _first_run(tmp_path, capsys, source: str) -> tuple:
    """Write the model file, explain the first image of a folder with Saliency; returns the
    model file, the --out folder and the arguments common to the runs."""
    model_py = tmp_path / "net.py"
    model_py.write_text(source)
    root = _folder(tmp_path)
    out = tmp_path / "maps"
    common = ["--model", f"{model_py}:build", "--data", f"folder:{root}", "--methods",
              "Saliency", "--out", out]
    rc, printed = _run([*common, "--max-images", "1"], capsys)
    assert rc == 0, printed.err
    return model_py, out, common


def test_resume_refuses_maps_of_another_module_option_set_in_the_factory(tmp_path, capsys):
    """The factory's nn.Sequential got another LeakyReLU slope (the same holds for
    transforms.Normalize's mean): weights and code were the same, and --resume added the new
    model's maps to the old one's (slope 0.01 -> 0.5: the first image's Saliency map
    sums to 0.30 -> 0.51)."""
    model_py, out, common = _first_run(tmp_path, capsys, MODEL_PY)
    rc, printed = _run([*common, "--max-images", "2", "--resume"], capsys)  # same setup
    assert rc == 0, printed.err
    assert len(_index(out)) == 2
    model_py.write_text(MODEL_PY.replace("SLOPE = 0.01", "SLOPE = 0.5"))
    rc, printed = _run([*common, "--resume"], capsys)
    assert rc == 2 and len(printed.err.splitlines()) == 1, printed.err
    assert "another setup (different architecture" in printed.err  # and code: the file
    assert len(_index(out)) == 2  # nothing added
    # the new slope gives other maps: mixing them would have been wrong
    rc, printed = _run([*common, "--out", tmp_path / "new"], capsys)
    assert rc == 0, printed.err
    old = np.load(out / "maps" / "Saliency" / "im0.png.npz")["map"]
    new = np.load(tmp_path / "new" / "maps" / "Saliency" / "im0.png.npz")["map"]
    assert not np.allclose(old, new)


def test_weights_with_nan_are_refused_before_the_run(tmp_path, capsys):
    """A model whose weights hold NaN passed the check on the first image, and every map
    then failed in the run (exit 1); it is refused up front, naming the tensor."""
    import torch

    model_py = tmp_path / "net.py"
    model_py.write_text(MODEL_PY)
    namespace: dict = {}
    exec(MODEL_PY, namespace)  # noqa: S102 - the test's own model file
    weights = namespace["build"]().state_dict()
    weights["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(weights, tmp_path / "w.pt")
    root = _folder(tmp_path)
    rc, printed = _run(["--model", f"{model_py}:build", "--weights", tmp_path / "w.pt",
                        "--data", f"folder:{root}", "--methods", "Saliency",
                        "--out", tmp_path / "maps"], capsys)
    assert rc == 2 and len(printed.err.splitlines()) == 1, printed.err
    assert "not finite" in printed.err and "'0.weight'" in printed.err
    assert not (tmp_path / "maps" / "maps").exists()


def test_resume_refuses_maps_of_a_factory_file_changed_where_nothing_else_shows_it(
        tmp_path, capsys):
    """A factory file whose change shows neither in the weights, nor in repr, nor in the
    source of a class (a pre-hook function that scales the input, defined in the file): the
    file itself is part of the code digest."""
    hooked = MODEL_PY.replace(
        "    torch.manual_seed(0)\n    return nn.Sequential(",
        "    torch.manual_seed(0)\n    model = nn.Sequential(") + (
        "    model.register_forward_pre_hook(lambda m, args: (args[0] * SCALE,))\n"
        "    return model\n")
    model_py, out, common = _first_run(
        tmp_path, capsys, hooked.replace("SLOPE = 0.01", "SLOPE = 0.01\nSCALE = 1.0"))
    model_py.write_text(hooked.replace("SLOPE = 0.01", "SLOPE = 0.01\nSCALE = 3.0"))
    rc, printed = _run([*common, "--resume"], capsys)
    assert rc == 2 and "another setup (different code)" in printed.err, printed.err
    assert len(_index(out)) == 1  # nothing added


def test_resume_refuses_maps_made_with_other_library_versions(tmp_path, capsys, monkeypatch):
    """Another splitxai (or Captum, Zennit, torch) may give other maps (SplitLRP's changed
    in 800e4a5): --resume refuses an --out made with other versions, as the benchmark's
    cells do."""
    from quantus_adapters.benchmark import cells

    _, out, common = _first_run(tmp_path, capsys, MODEL_PY)
    versions = cells.library_versions()
    monkeypatch.setattr(cells, "library_versions",
                        lambda: {**versions, "captum": versions["captum"] + ".post1"})
    rc, printed = _run([*common, "--resume"], capsys)
    assert rc == 2 and "another setup (different versions)" in printed.err, printed.err
    assert len(_index(out)) == 1


def test_float16_refuses_a_map_that_would_be_all_subnormal(tmp_path):
    """A map whose values are all below float16's normal range (6.1e-5) kept a digit or none
    (below 6e-8: zero), silently; it is refused as a map beyond 65504 is."""
    import pytest

    from quantus_adapters.bulk import MapConfig, MapStore, StoreError

    store = MapStore(tmp_path / "out", {"test": 1}, float16=True)
    config = MapConfig("Saliency", {})
    small = np.full((4, 4), 3e-6, np.float32)
    small[0, 0] = 2e-8
    assert np.float16(2e-8) == 0 and abs(float(np.float16(3e-6)) - 3e-6) > 1e-8
    with pytest.raises(StoreError, match="below float16's normal range"):
        store.put(config, "a.png", 0, small)
    normal = np.full((4, 4), 3e-4, np.float32)
    store.put(config, "b.png", 0, normal)  # normal: kept to about three digits
    store.put(config, "c.png", 0, np.zeros((4, 4), np.float32))  # all zero: exact
    kept = np.load(tmp_path / "out" / store.relpath(config, "b.png"))["map"]
    assert kept.dtype == np.float16
    np.testing.assert_allclose(kept.astype(np.float32), normal, rtol=1e-3, atol=0)

"""``splitxai benchmark`` command line: bad input fails early and clearly; --resume."""

import textwrap

import numpy as np
import pytest
from PIL import Image

from quantus_adapters.benchmark import cli, runner
from quantus_adapters.benchmark.zoo import models
from tests.benchmark_files import TINY_MODEL_PY

MODEL_PY = TINY_MODEL_PY + textwrap.dedent("""

    def not_a_model():
        return 42
""")


@pytest.fixture
def setup(tmp_path):
    model_file = tmp_path / "tiny.py"
    model_file.write_text(MODEL_PY)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    lines = ["name,label"]
    for i in range(6):
        Image.fromarray((rng.uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)).save(
            root / "images" / f"im{i}.png")
        m = np.zeros((16, 16), np.uint8)
        m[4:10, 3:9] = 255
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
        lines.append(f"im{i}.png,{i % 3}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path, f"{model_file}:build", root


def _fail(argv, capsys, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err, err
    assert "Traceback" not in err


def test_bad_input_is_reported_before_any_work(setup, capsys, monkeypatch):
    tmp, factory, root = setup

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("heavy work started")

    monkeypatch.setattr(models, "digits_cnn", no_heavy_work)
    monkeypatch.setattr(runner.Benchmark, "run", no_heavy_work)
    out = ["--out", str(tmp / "out"), "--no-progress"]
    _fail(["--data", f"folder:{tmp / 'missing'}", "--model", factory] + out, capsys,
          "does not exist")
    _fail(["--data", f"folder:{root}", "--model", f"{tmp / 'tiny.py'}:not_a_model"] + out,
          capsys, "returned int, not a torch.nn.Module")
    _fail(["--data", f"folder:{root}", "--model", f"{tmp / 'nofile.py'}:build"] + out,
          capsys, "does not exist")
    _fail(["--data", f"folder:{root}", "--model", factory, "--layers", "99"] + out, capsys,
          "'99' is not a module of the model")
    _fail(["--layers", "features.99"] + out + ["--cache-dir", str(tmp / "cache")], capsys,
          "'features.99' is not a module")
    # the built-in data keep their sizes: --image-size was ignored without a word
    for data in ("digits", "cifar10-resnet20"):
        _fail(["--data", data, "--image-size", "32"] + out, capsys,
              f"those of --data {data} keep their size (drop --image-size)")
    _fail(["--data", f"folder:{root}", "--model", factory, "--methods", "NoSuchMethod"] + out,
          capsys, "--methods: unknown method 'NoSuchMethod'")
    (root / "labels.csv").write_text("name,label\n" + "\n".join(
        f"im{i}.png,{5 if i == 2 else 0}" for i in range(6)))
    _fail(["--data", f"folder:{root}", "--model", factory] + out, capsys,
          "label 5 of 'im2.png' is out of the model's range [0, 3)")
    (root / "labels.csv").write_text("name,label\nim0.png,0\n")
    _fail(["--data", f"folder:{root}", "--model", factory] + out, capsys, "have no label")
    assert not (tmp / "cache").exists()


def test_spatially_constant_maps_are_reported_not_ranked(setup, capsys):
    tmp, factory, root = setup
    out = tmp / "const"
    # SplitGrad at the last ReLU before global average pooling: a constant map per image
    rc = cli.main(["--data", f"folder:{root}", "--model", factory, "--methods", "SplitGrad",
                   "LayerCAM", "--layers", "4", "--alphas", "0.4", "--max-sens-samples", "2",
                   "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "spatially constant" in report
    table = (out / "table1_comparison.md").read_text()
    assert "(4, g)" not in table and "LayerCAM" in table


def test_more_bad_input_is_one_line_before_any_work(setup, capsys, monkeypatch):
    tmp, factory, root = setup

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("heavy work started")

    monkeypatch.setattr(runner.Benchmark, "run", no_heavy_work)
    base = ["--data", f"folder:{root}", "--model", factory, "--no-progress"]
    out = ["--out", str(tmp / "out")]
    _fail(base + out + ["--alpha", "0.7"], capsys, "--alpha 0.7: alpha must lie in [0, 0.5]")
    _fail(base + out + ["--alphas", "0.4", "-0.1"], capsys,
          "--alphas -0.1: alpha must lie in [0, 0.5]")
    _fail(base + out + ["--alphas", "x"], capsys, "--alphas 'x' is not a number")
    _fail(base + out + ["--metrics", "PF@20", "Faithfulness"], capsys,
          "--metrics: unknown 'Faithfulness'")
    (tmp / "afile").write_text("x")
    _fail(base + ["--out", str(tmp / "afile")], capsys, "is a file, not a folder")
    _fail(base + ["--out", str(tmp / "afile" / "sub")], capsys, "cannot be written")
    (tmp / "two.py").write_text(MODEL_PY.replace("nn.Conv2d(3, 4", "nn.Conv2d(2, 4"))
    _fail(["--data", f"folder:{root}", "--model", f"{tmp / 'two.py'}:build"] + out, capsys,
          "first layer takes 2 channels")
    _fail(["--model", factory, "--cache-dir", str(tmp / "cache")] + out, capsys,
          "first layer takes 3 channel(s) but --data digits has 1")
    (root / "images" / "im5.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rc = cli.main(base + out)
    err = capsys.readouterr().err
    assert rc == 2 and "im5.png' as an image" in err and err.count("\n") == 1
    with pytest.raises(Exception, match="im5.png"):  # --debug: the exception itself
        cli.main(base + out + ["--debug"])


def test_grayscale_folder_runs_with_a_one_channel_model(tmp_path, capsys):
    (tmp_path / "lenet.py").write_text(MODEL_PY.replace("nn.Conv2d(3, 4", "nn.Conv2d(1, 4"))
    root = tmp_path / "gray"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 65535, (12, 12)).astype(np.uint16)).save(
            root / "images" / f"g{i}.png")
    (root / "labels.csv").write_text("".join(f"g{i}.png,{i % 3}\n" for i in range(4)))
    rc = cli.main(["--data", f"folder:{root}", "--model", f"{tmp_path / 'lenet.py'}:build",
                   "--methods", "Saliency", "--metrics", "PF@5", "PF@20", "--out",
                   str(tmp_path / "out"), "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert "Saliency" in (tmp_path / "out" / "table1_comparison.md").read_text()


def test_selectivity_patch_and_seed_are_checked_before_any_work(setup, capsys, monkeypatch):
    tmp, factory, root = setup

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("heavy work started")

    monkeypatch.setattr(runner.Benchmark, "run", no_heavy_work)
    base = ["--data", f"folder:{root}", "--model", factory, "--no-progress", "--out",
            str(tmp / "out")]
    for patch in ("5", "100", "32"):
        _fail(base + ["--selectivity-patch", patch], capsys,
              f"--selectivity-patch {patch} does not divide the image size 16x16; use one "
              "of 1, 2, 4, 8, 16")
    _fail(base + ["--seed", "-1"], capsys,
          "--seed must be an integer from 0 to 4294967295 (2**32 - 1), got -1")
    _fail(base + ["--seed", "99999999999999999999999"], capsys,
          "--seed must be an integer from 0 to 4294967295 (2**32 - 1), got 9999")


def test_a_failing_metric_cell_is_named_on_stderr_and_exits_1(setup, capsys, monkeypatch):
    from quantus_adapters.benchmark import cells

    tmp, factory, root = setup
    real = cells.evaluate_metric

    def failing(metric, *args, **kwargs):
        if metric == "PF@20":
            raise RuntimeError("simulated metric failure")
        return real(metric, *args, **kwargs)

    monkeypatch.setattr(cells, "evaluate_metric", failing)
    out = tmp / "fail"
    rc = cli.main(["--data", f"folder:{root}", "--model", factory, "--methods", "Saliency",
                   "--metrics", "PF@5", "PF@20", "--out", str(out), "--no-progress",
                   "--threads", "1", "--no-figures"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "splitxai benchmark: failed: Saliency input PF@20: RuntimeError: simulated metric " \
           "failure" in err
    assert "part(s) failed; their cells are missing from the tables" in err
    assert "simulated metric failure" in (out / "report.md").read_text()


def test_a_model_file_imports_a_module_next_to_it(tmp_path):
    """``--model FILE.py:FACTORY`` puts FILE's folder on the import path, as ``python FILE.py``
    does (``from blocks import Net`` failed with "No module named 'blocks'")."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "splitxai_test_blocks_7f3a.py").write_text(textwrap.dedent("""
        from torch import nn

        class Net(nn.Sequential):
            def __init__(self):
                super().__init__(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 3))
    """))
    (folder / "model.py").write_text(textwrap.dedent("""
        from splitxai_test_blocks_7f3a import Net

        def build():
            return Net()
    """))
    model = models.load_factory(f"{folder / 'model.py'}:build")
    assert type(model).__name__ == "Net" and len(list(model.parameters())) == 4

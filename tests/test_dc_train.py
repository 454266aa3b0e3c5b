"""``splitxai train-dc``: data loading, training, reports, checkpoints, explanation figures."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
import torch

import core.dc.models as dc
from core.dc import train as dc_train
from core.dc.explain import figure_classes, render_explanations, split_colour_map
from quantus_adapters.cli import main as cli_main


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    """Write ``array`` (uint8) in the IDX format, as the MNIST files are stored."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def fake_mnist(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    return images, labels


def class_gradients(fn, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        k = fn(x[:1]).shape[1]
    repeated = x.detach().repeat_interleave(k, dim=0).requires_grad_(True)
    out = fn(repeated).unflatten(0, (-1, k))
    grad = torch.autograd.grad(out.diagonal(dim1=1, dim2=2).sum(), repeated)[0]
    return grad.unflatten(0, (-1, k))


@pytest.fixture(scope="module")
def digits():
    return dc_train.load_digits_28()


# -------------------------------------------------------------------------------- data


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    images, labels = fake_mnist(np.random.default_rng(0), 7)
    write_idx(tmp_path / "images", images, compress)
    write_idx(tmp_path / "labels", labels, compress)
    np.testing.assert_array_equal(dc_train.read_idx(tmp_path / "images"), images)
    np.testing.assert_array_equal(dc_train.read_idx(tmp_path / "labels"), labels)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        dc_train.read_idx(tmp_path / "bad")
    images, _ = fake_mnist(np.random.default_rng(0), 3)
    write_idx(tmp_path / "short", images, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        dc_train.read_idx(tmp_path / "short")


def _write_pair(folder, images, labels, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "t10k-images-idx3-ubyte", images, compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels, compress)


@pytest.mark.parametrize("case", ["wrong magic", "no dimensions", "cut header", "cut data",
                                  "extra bytes", "cut gzip", "labels out of 0-9", "empty set",
                                  "one sample"])
def test_train_dc_refuses_bad_idx_data_with_one_line(tmp_path, capsys, case):
    images, labels = fake_mnist(np.random.default_rng(3), 6)
    folder = tmp_path / "idx"
    _write_pair(folder, images, labels)
    img_file = folder / "t10k-images-idx3-ubyte"
    raw = img_file.read_bytes()
    expected = {"wrong magic": "not an IDX file", "no dimensions": "not an IDX file",
                "cut header": "truncated", "cut data": "truncated",
                "extra bytes": "bytes more than its header", "cut gzip": "damaged or truncated",
                "labels out of 0-9": "label(s) outside 0-9 (e.g. 12 at index 2)",
                "empty set": "the set is empty", "one sample": "holds 1 sample"}[case]
    if case == "wrong magic":
        img_file.write_bytes(b"\x00\x01" + raw[2:])
    elif case == "no dimensions":
        img_file.write_bytes(raw[:3] + b"\x00")
    elif case == "cut header":
        img_file.write_bytes(raw[:10])
    elif case == "cut data":
        img_file.write_bytes(raw[:-100])
    elif case == "extra bytes":
        img_file.write_bytes(raw + b"\x00" * 7)
    elif case == "cut gzip":
        img_file.unlink()
        gz = folder / "t10k-images-idx3-ubyte.gz"
        write_idx(gz, images, compress=True)
        gz.write_bytes(gz.read_bytes()[:-20])
    elif case == "labels out of 0-9":
        labels = labels.copy()
        labels[2] = 12
        _write_pair(folder, images, labels)
    elif case == "empty set":
        _write_pair(folder, images[:0], labels[:0])
    else:
        _write_pair(folder, images[:1], labels[:1])
    rc = dc_train.main(["--data", f"idx:{folder}", "--out", str(tmp_path / "out"),
                        "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_idx_folder_train_and_test(tmp_path):
    rng = np.random.default_rng(1)
    train, test = fake_mnist(rng, 30), fake_mnist(rng, 12)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train[0], True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train[1], True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test[0], False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test[1], False)
    data = dc_train.load_idx_folder(tmp_path)
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (12, 1, 28, 28)
    assert data.train_x.dtype == torch.float32
    np.testing.assert_allclose(data.test_x[:, 0].numpy(), test[0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.train_y.numpy(), train[1])


def test_idx_folder_with_only_the_test_set_is_split(tmp_path):
    images, labels = fake_mnist(np.random.default_rng(2), 50)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, True)
    data = dc_train.load_data(f"idx:{tmp_path}")
    assert (len(data.train_y), len(data.test_y)) == (40, 10)
    # the two parts are disjoint and together the whole file
    rows = torch.cat([data.train_x, data.test_x]).flatten(1).mul(255).round().to(torch.uint8)
    assert sorted(map(bytes, rows.numpy())) == sorted(map(bytes, images.reshape(50, -1)))
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        dc_train.load_idx_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no IDX pair.*t10k-images-idx3-ubyte"):
        dc_train.load_idx_folder(tmp_path / "empty")


def test_digits_are_mnist_shaped(digits):
    assert digits.train_x.shape[1:] == (1, 28, 28)
    assert len(digits.train_y) + len(digits.test_y) == 1797
    assert 0 <= digits.train_x.min() and digits.train_x.max() <= 1
    assert digits.train_x[:, :, :2].abs().max() == 0  # the padded border
    assert set(digits.test_y.tolist()) == set(range(10))


def test_offline_mnist_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(RuntimeError, match="offline.*idx:FOLDER"):
        dc_train.load_mnist(tmp_path)
    assert dc_train.main(["--data", "mnist", "--data-root", str(tmp_path),
                          "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--data digits" in err and err.count("\n") == 1, err

    def offline_multiline(*args, **kwargs):  # torchvision's message spans several lines
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x/, "
                           "got:\n<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline_multiline)
    assert dc_train.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(Error downloading train-images-idx3-ubyte.gz)" in err, err
    assert "Pass --data digits (scikit-learn's digits, no download)" in err


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--init-std", "0"], "--init-std must be a finite number > 0, got 0.0"),
    (["--batch-size", "1"], "--batch-size must be >= 2 (batch norm needs two samples"),
    (["--limit", "1"], "--limit must be >= 2"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--explain", "-2"], "--explain must be >= 0, got -2"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
    (["--seed", str(2**32 - 1), "--seeds", "2"], "got 4294967295 .. 4294967296"),
])
def test_numeric_options_out_of_range_are_one_line(tmp_path, capsys, monkeypatch, args,
                                                   message):
    def no_data(*a, **k):
        raise AssertionError("data loaded before the options were checked")

    monkeypatch.setattr(dc_train, "load_data", no_data)
    assert dc_train.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitxai train-dc: error: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- training


def test_quick_path_on_a_subset(tmp_path, capsys):
    """``--quick`` trains every mode on digits and writes the table-12 style reports."""
    out = tmp_path / "quick"
    status = cli_main(["train-dc", "--quick", "--limit", "40", "--epochs", "1",
                       "--batch-size", "20", "--no-progress", "--out", str(out)])
    assert status == 0
    table = (out / "accuracy_table.md").read_text()
    header = table.splitlines()[-3]
    assert header.split("|")[2:-1] == [
        " IC ", " Mon ", " None ", " DIC ", " DM ", " Diff.None ", " DICIN ", " DMIN "
    ]
    assert "digits" in table and "mlp_maxout" in table.splitlines()[-1]
    with open(out / "accuracy_runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert [r["mode"] for r in runs] == list(dc.MODES)
    assert all(0 <= float(r["accuracy"]) <= 100 for r in runs)
    with open(out / "accuracy_table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and all(r["runs"] == "1" for r in rows)
    assert not (out / "checkpoints").exists()  # --quick keeps no checkpoints by default
    assert "Diff.None" in capsys.readouterr().out


def test_accuracy_table_median_min_max():
    results = [dc_train.RunResult("mlp_maxout", "DM", s, 1, acc, 0.0)
               for s, acc in enumerate([97.0, 99.5, 98.25])]
    results.append(dc_train.RunResult("cnn_maxout", "IC", 0, 1, 90.0, 0.0))
    table = dc_train.accuracy_table(results)
    lines = table.splitlines()
    assert lines[0] == "| Model | IC | DM |"
    assert lines[2] == "| mlp_maxout | - | 98.25 [97.00, 99.50] |"
    assert lines[3] == "| cnn_maxout | 90.00 [90.00, 90.00] | - |"


def test_bad_cli_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        dc_train.main(["--mode", "DQ", "--out", str(tmp_path)])
    assert "unknown mode 'DQ'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dc_train.main(["--quick", "--data", "mnist", "--out", str(tmp_path)])


def test_training_learns_and_keeps_guarantees_and_checkpoint_round_trips(tmp_path, digits):
    """A short training: accuracy above chance, guarantees intact, exact reload."""
    data = digits.limit(320)
    torch.manual_seed(0)
    model = dc.mlp_maxout("DMIN")
    dc_train.train_model(model, data, epochs=3, batch_size=32, progress=False)
    assert not model.training
    # some raw weights were pushed below zero: the transform is what keeps them positive
    assert model.g.layers.fc2.weight.min() < 0
    assert dc_train.evaluate(model, digits.test_x, digits.test_y) > 30  # chance is 10
    x = digits.test_x[:4]
    for stream in (model.g, model.h):
        assert class_gradients(stream, x).min() >= 0
    assert torch.equal(model(x), model.g(x) - model.h(1 - x))
    # an IC stream after training: midpoint convexity on random pairs (float64)
    ic = dc.mlp_maxout("IC")
    dc_train.train_model(ic, digits.limit(96), epochs=1, batch_size=32, progress=False)
    ic = ic.double()
    a, b = torch.rand(2, 8, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        gap = ic((a + b) / 2) - (ic(a) + ic(b)) / 2
    assert gap.max() <= 1e-10 * ic(a).abs().max() and gap.min() < 0
    path = dc_train.save_checkpoint(model, tmp_path / "m.pt", "mlp_maxout", positivity="relu")
    restored = dc_train.load_checkpoint(path)
    assert restored.mode == "DMIN" and restored.inverted
    assert torch.equal(restored(digits.test_x), model(digits.test_x))


def test_cli_idx_run_saves_checkpoints_and_figures(tmp_path):
    images, labels = fake_mnist(np.random.default_rng(3), 60)
    folder = tmp_path / "mnist"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images, True)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels, True)
    out = tmp_path / "out"
    status = dc_train.main(["--data", f"idx:{folder}", "--mode", "DICIN,IC", "--seeds", "2",
                            "--epochs", "1", "--batch-size", "16", "--explain", "2",
                            "--no-progress", "--out", str(out)])
    assert status == 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["mlp_maxout_DICIN_seed0.pt", "mlp_maxout_IC_seed0.pt"]
    figures = sorted(p.name for p in (out / "explanations").iterdir())
    assert figures == [f"mlp_maxout_{m}_{kind}.png" for m in ("DICIN", "IC")
                       for kind in ("classes", "samples")]
    with open(out / "accuracy_table.csv") as handle:
        assert [r["runs"] for r in csv.DictReader(handle)] == ["2", "2"]


# ------------------------------------------------------------------------ explanations


def test_split_colour_map_threshold_and_decay():
    red = np.zeros((28, 28))
    red[5, 5:10] = [1.0, 0.8, 0.5, 0.3, 0.1]  # 0.1 is below the 0.2 threshold
    blue = np.zeros((28, 28))
    blue[20, 20] = 0.9
    image = split_colour_map(red, blue, threshold=0.2, decay=0.05)
    assert image.shape == (28, 28, 3)
    row = image[5, 5:10, 0]
    assert row[0] == 1.0 and np.all(np.diff(row[:4]) < 0) and row[4] == 0
    np.testing.assert_allclose(row[1] / row[0], np.exp(-1 / (0.05 * 784)), rtol=1e-6)
    assert image[20, 20, 2] == 1.0 and image[..., 1].max() == 0
    assert image[..., 2].sum() == 1.0 and image[..., 0].sum() == pytest.approx(row.sum())


def test_figures_are_written(tmp_path, digits):
    from matplotlib.image import imread

    torch.manual_seed(0)
    model = dc.mlp_maxout("DICIN").eval()
    x, y = digits.test_x[:2], digits.test_y[:2]
    paths = render_explanations(model, x, y, tmp_path / "dicin")
    assert [p.name for p in paths] == ["dicin_classes.png", "dicin_samples.png"]
    picture = imread(paths[0])
    assert picture.shape[0] > 100 and picture.shape[1] > 500
    # red (g) and blue (h) pixels are both present
    r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
    assert ((r > 0.5) & (g < 0.1) & (b < 0.1)).sum() > 0
    assert ((b > 0.5) & (g < 0.1) & (r < 0.1)).sum() > 0
    single = dc.mlp_maxout("IC").eval()
    assert figure_classes(single, x, tmp_path / "ic.png", y).stat().st_size > 1000
    assert single.training is False and all(not m.training for m in single.modules())


def test_example_script_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train_dc.py"
    spec = importlib.util.spec_from_file_location("train_dc_example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--limit", "64", "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"model.pt", "figure3.png", "figure8.png"}
    assert "DCGrad maps (4, 1, 28, 28)" in capsys.readouterr().out

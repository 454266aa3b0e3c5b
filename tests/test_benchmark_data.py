"""Benchmark data: the built-in cluttered digits and the folder loader (with its errors)."""

import numpy as np
import pytest
import torch
from PIL import Image

from quantus_adapters.benchmark.data import DataError, cluttered_digits, load_folder


def test_cluttered_digits_are_deterministic_with_masks_on_the_digit():
    a = cluttered_digits(n_val_per_class=1, n_test_per_class=2, seed=3)
    b = cluttered_digits(n_val_per_class=1, n_test_per_class=2, seed=3)
    c = cluttered_digits(n_val_per_class=1, n_test_per_class=2, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (30, 1, 64, 64) and a.masks.shape == (30, 1, 64, 64)
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert len(a.val_idx) == 10 and len(a.test_idx) == 20
    assert sorted(a.labels[a.val_idx].tolist()) == list(range(10))
    # the mask covers the bright target strokes, and there is clutter outside it
    for img, m in zip(a.images[:, 0], a.masks[:, 0], strict=True):
        assert 20 < int(m.sum()) < 64 * 64 // 3
        assert float(img[m].mean()) > 0.4
        assert float((img[~m] > 0.3).sum()) > 10


def _write_folder(root, n=4, size=8, labels=None, masks=True):
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = ["name,label"]
    for i in range(n):
        arr = (rng.uniform(0, 1, (size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "images" / f"im{i}.png")
        if masks:
            m = np.zeros((size, size), np.uint8)
            m[2:5, 2:5] = 255
            Image.fromarray(m).save(root / "masks" / f"im{i}.png")
        rows.append(f"im{i}.png,{(labels or [i % 3] * n)[i]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def test_folder_reads_images_labels_masks(tmp_path):
    _write_folder(tmp_path, labels=[0, 1, 2, 1])
    d = load_folder(tmp_path, n_classes=3)
    assert d.images.shape == (4, 3, 8, 8) and d.images.dtype == torch.float32
    assert 0 <= float(d.images.min()) and float(d.images.max()) <= 1
    assert d.labels.tolist() == [0, 1, 2, 1]
    assert d.masks.shape == (4, 1, 8, 8) and int(d.masks[0].sum()) == 9
    assert len(d.val_idx) + len(d.test_idx) == 4 and len(d.val_idx) >= 1
    assert not set(d.val_idx) & set(d.test_idx)


def test_folder_without_masks_notes_skipped_metrics(tmp_path):
    _write_folder(tmp_path, masks=False)
    d = load_folder(tmp_path)
    assert d.masks is None and any("skipped" in n for n in d.notes)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope")
    _write_folder(tmp_path / "a", labels=[0, 1, 5, 1])
    with pytest.raises(DataError, match="out of the model's range"):
        load_folder(tmp_path / "a", n_classes=3)
    _write_folder(tmp_path / "b")
    (tmp_path / "b" / "labels.csv").write_text("name,label\nim0.png,0\nim1.png,1\n")
    with pytest.raises(DataError, match="have no label"):
        load_folder(tmp_path / "b")
    _write_folder(tmp_path / "c")
    (tmp_path / "c" / "labels.csv").unlink()
    with pytest.raises(DataError, match="labels.csv"):
        load_folder(tmp_path / "c")
    _write_folder(tmp_path / "d")
    (tmp_path / "d" / "labels.csv").write_text("im0.png,cat\n")
    with pytest.raises(DataError, match="not an integer"):
        load_folder(tmp_path / "d")
    _write_folder(tmp_path / "e")
    (tmp_path / "e" / "masks" / "im1.png").unlink()
    with pytest.raises(DataError, match="no mask"):
        load_folder(tmp_path / "e")


@pytest.mark.parametrize("value,message", [
    ("1_0", "not an integer class index"),      # int() reads it as 10
    ("\u0663", "not an integer class index"),   # an Arabic-Indic three: int() reads 3
    ("99999999999999999999999", "too large"),   # was numpy's 'Overflow when unpacking'
])
def test_folder_label_that_int_would_misread_is_refused_by_line(tmp_path, value, message):
    _write_folder(tmp_path)
    (tmp_path / "labels.csv").write_text(
        f"name,label\nim0.png,0\nim1.png,{value}\nim2.png,1\nim3.png,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"labels.csv:3: .*{message}"):
        load_folder(tmp_path)


def test_folder_label_with_sign_and_spaces_is_read(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("im0.png, +2\nim1.png,0\nim2.png,1 \nim3.png,02\n")
    assert load_folder(tmp_path, n_classes=3).labels.tolist() == [2, 0, 1, 2]


def test_folder_subfolder_named_like_an_image_is_a_subfolder(tmp_path):
    """images/old.png/ (a folder) was taken for an image: 'has no label', or with a label
    an unreadable image; it is a subfolder, whose images are noted as not read."""
    _write_folder(tmp_path, labels=[0, 1, 2, 1])
    (tmp_path / "images" / "old.png").mkdir()
    (tmp_path / "images" / "im0.png").rename(tmp_path / "images" / "old.png" / "im9.png")
    (tmp_path / "labels.csv").write_text("im1.png,1\nim2.png,2\nim3.png,1\n")
    d = load_folder(tmp_path, n_classes=3)
    assert d.labels.tolist() == [1, 2, 1]
    assert any("subfolders" in n for n in d.notes)


def test_imagenet_s_layout_one_validation_image_per_class(tmp_path):
    from quantus_adapters.benchmark.data import load_imagenet_s

    wnids = ["n01443537", "n01491361"]
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n00000001 a\nn01443537 goldfish\nn00000002 b\nn01491361 shark\n")
    for w in wnids:
        (tmp_path / "validation" / w).mkdir(parents=True)
        (tmp_path / "validation-segmentation" / w).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(
                tmp_path / "validation" / w / f"x{i}.JPEG")
            seg = np.zeros((20, 30, 3), np.uint8)
            seg[5:10, 5:15, 0] = 2           # class id 2 = object
            seg[0:2, 0:2, 0] = 232           # id 1000 = 232 + 3 * 256: ignored
            seg[0:2, 0:2, 1] = 3
            Image.fromarray(seg).save(tmp_path / "validation-segmentation" / w / f"x{i}.png")
    d = load_imagenet_s(tmp_path, size=16)
    assert d.images.shape == (6, 3, 16, 16)
    assert sorted(set(d.labels.tolist())) == [1, 3]
    assert len(d.val_idx) == 2 and sorted(d.labels[d.val_idx].tolist()) == [1, 3]
    assert len(d.test_idx) == 4
    m = d.masks[0, 0]
    assert 0 < int(m.sum()) < 16 * 16 // 2 and not bool(m[0, 0])
    with pytest.raises(DataError, match="LOC_synset_mapping"):
        (tmp_path / "LOC_synset_mapping.txt").unlink()
        load_imagenet_s(tmp_path, size=16)
    with pytest.raises(DataError, match="not an ImageNet-S-50 folder"):
        load_imagenet_s(tmp_path / "validation", size=16)


def test_imagenet_model_offline_gives_a_clear_error(monkeypatch):
    import torch.hub

    from quantus_adapters.benchmark.zoo import models

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-splitxai-test")
    with pytest.raises(models.ModelError, match="could not download .*--weights"):
        models.torchvision_imagenet("resnet18")
    with pytest.raises(models.ModelError, match="unknown ImageNet model"):
        models.torchvision_imagenet("alexnet")

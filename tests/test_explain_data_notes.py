"""How a user's images were read: ``splitxai explain`` says it; masks match in either
Unicode normal form."""

import unicodedata

import numpy as np
from PIL import Image

from quantus_adapters.benchmark.data import load_folder, load_imagenet_s
from tests.explain_runs import run_explain as _run

MODEL_PY = (
    "import torch\nfrom torch import nn\n\n"
    "def build():\n"
    "    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),\n"
    "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
)


def _rgb(seed: int, h: int = 16, w: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.uniform(0, 1, (h, w, 3)) * 255).astype(np.uint8))


def _folder(root, animated: bool = True, rotated: bool = True):
    """Three 16x16 images: a plain PNG, an animated GIF of two frames, an EXIF-rotated
    JPEG (as cameras write them), with their labels."""
    (root / "images").mkdir(parents=True)
    _rgb(0).save(root / "images" / "a.png")
    names = ["a.png"]
    if animated:
        _rgb(1).save(root / "images" / "b.gif", save_all=True, append_images=[_rgb(2)])
        names.append("b.gif")
    if rotated:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees to show
        _rgb(3).save(root / "images" / "c.jpg", exif=exif)
        names.append("c.jpg")
    (root / "labels.csv").write_text("".join(f"{n},{i}\n" for i, n in enumerate(names)))
    return root


def test_explain_prints_how_the_images_were_read(tmp_path, capsys):
    model_py = tmp_path / "net.py"
    model_py.write_text(MODEL_PY)
    root = _folder(tmp_path / "data")
    rc, printed = _run(["--model", f"{model_py}:build", "--data", f"folder:{root}",
                        "--methods", "Saliency", "--image-size", "12",
                        "--out", tmp_path / "maps"], capsys)
    assert rc == 0, printed.err
    notes = [line for line in printed.err.splitlines()
             if line.startswith("splitxai explain: note: ")]
    assert any("only the first frame was read" in line for line in notes), printed.err
    assert any("EXIF orientation" in line for line in notes), printed.err
    assert any("resized to 12x12" in line for line in notes), printed.err
    # masks play no part in explain: no note about skipped localisation metrics
    assert not any("masks" in line for line in notes), printed.err


def test_explain_of_plain_images_prints_no_note(tmp_path, capsys):
    model_py = tmp_path / "net.py"
    model_py.write_text(MODEL_PY)
    root = _folder(tmp_path / "data", animated=False, rotated=False)
    rc, printed = _run(["--model", f"{model_py}:build", "--data", f"folder:{root}",
                        "--methods", "Saliency", "--out", tmp_path / "maps"], capsys)
    assert rc == 0, printed.err
    assert "note:" not in printed.err


def test_folder_keeps_image_notes_apart_from_mask_notes(tmp_path):
    root = _folder(tmp_path / "data")
    data = load_folder(root, channels=3, split=False)
    assert data.masks is None
    assert any("first frame" in n for n in data.image_notes)
    assert any("EXIF" in n for n in data.image_notes)
    assert not any("masks" in n for n in data.image_notes)
    assert set(data.image_notes) < set(data.notes)  # the report still has all of them
    assert any("no masks/" in n for n in data.notes)
    assert data.limit(None, 1).image_notes == data.image_notes


def test_mask_name_in_the_other_unicode_normal_form_is_its_mask(tmp_path):
    nfc = unicodedata.normalize("NFC", "café.png")
    nfd = unicodedata.normalize("NFD", "café.png")
    assert nfc != nfd
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    _rgb(0, 8, 8).save(root / "images" / nfc)
    _rgb(1, 8, 8).save(root / "images" / "b.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 255
    Image.fromarray(mask).save(root / "masks" / nfd)  # as macOS stores the name
    Image.fromarray(255 - mask).save(root / "masks" / "b.png")
    (root / "labels.csv").write_text(f"{nfc},0\nb.png,1\n")
    data = load_folder(root, channels=3, split=False)
    i = [unicodedata.normalize("NFC", n) for n in data.names].index(nfc)
    assert np.array_equal(data.masks[i, 0].numpy(), mask > 0)


def test_imagenet_s_notes_the_resize(tmp_path):
    wnid = "n01443537"
    (tmp_path / "LOC_synset_mapping.txt").write_text(f"{wnid} goldfish\n")
    (tmp_path / "validation" / wnid).mkdir(parents=True)
    (tmp_path / "validation-segmentation" / wnid).mkdir(parents=True)
    for i in range(2):
        _rgb(i, 20, 30).save(tmp_path / "validation" / wnid / f"x{i}.JPEG")
        seg = np.zeros((20, 30, 3), np.uint8)
        seg[5:10, 5:15, 0] = 2
        Image.fromarray(seg).save(tmp_path / "validation-segmentation" / wnid / f"x{i}.png")
    data = load_imagenet_s(tmp_path, size=16)
    assert data.image_notes == ["images of another size resized to 16x16 (bilinear, "
                                "antialiased; no crop)"]
    assert data.notes == data.image_notes

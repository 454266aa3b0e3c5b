"""Image and mask files of every PIL mode load to the right values and channel count."""

import numpy as np
import pytest
from PIL import Image
from torch import nn

from quantus_adapters.benchmark import images as imio
from quantus_adapters.benchmark.data import DataError, load_folder

RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [51, 102, 204]]], np.uint8)


def _save(tmp_path, name, img):
    path = tmp_path / name
    img.save(path)
    return path


@pytest.mark.parametrize("mode", ["1", "L", "I;16", "I", "F"])
def test_grayscale_modes_scale_to_unit_range(tmp_path, mode):
    frac = np.array([[0.0, 0.2], [0.6, 1.0]])
    if mode == "1":
        frac = np.array([[0.0, 1.0], [1.0, 0.0]])
        img = Image.fromarray(frac.astype(bool))
    elif mode == "L":
        img = Image.fromarray(np.rint(frac * 255).astype(np.uint8))
    elif mode == "I;16":
        img = Image.fromarray(np.rint(frac * 65535).astype(np.uint16))
    elif mode == "I":
        img = Image.fromarray(np.rint(frac * 65535).astype(np.int32))
    else:
        img = Image.fromarray(frac.astype(np.float32))
    path = _save(tmp_path, "g.tif" if mode in ("I", "F") else "g.png", img)
    with Image.open(path) as check:
        assert check.mode == mode
    notes: set = set()
    gray = imio.read_image(path, 1, notes=notes)
    assert gray.shape == (1, 2, 2) and gray.dtype == np.float32
    np.testing.assert_allclose(gray[0], frac, atol=1e-6)  # 16 bit: not all white
    # 32-bit integers are read as 16-bit data: said, as 8-bit values would come out dark
    assert any("32-bit integer images were read as 16-bit" in n for n in notes) == (mode == "I")
    rgb = imio.read_image(path, 3)
    assert rgb.shape == (3, 2, 2) and np.array_equal(rgb[0], rgb[2])


def test_integer_and_float_images_without_known_scale_are_refused(tmp_path):
    big = _save(tmp_path, "big.tif", Image.fromarray(np.array([[0, 70000]], np.int32)))
    with pytest.raises(imio.ImageError, match="big.tif.*16-bit"):
        imio.read_image(big, 1)
    hot = _save(tmp_path, "hot.tif", Image.fromarray(np.array([[0, 255.0]], np.float32)))
    with pytest.raises(imio.ImageError, match=r"hot.tif.*outside \[0, 1\]"):
        imio.read_image(hot, 1)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK", "LA"])
def test_colour_modes_give_rgb_and_gray(tmp_path, mode):
    base = Image.fromarray(RGB)
    if mode == "RGBA":
        img = Image.fromarray(np.dstack([RGB, np.array([[0, 255], [128, 255]], np.uint8)]))
    elif mode == "P":
        img = base.quantize(colors=4)
    elif mode == "LA":
        img = base.convert("LA")
    else:
        img = base.convert(mode)
    path = _save(tmp_path, f"c.{'tif' if mode == 'CMYK' else 'png'}", img)
    notes: set = set()
    rgb = imio.read_image(path, 3, notes=notes)
    if mode == "LA":
        expected = np.repeat(np.asarray(base.convert("L"), np.float64)[None] / 255, 3, 0)
    elif mode == "P":
        expected = np.asarray(img.convert("RGB"), np.float64).transpose(2, 0, 1) / 255
    else:
        expected = RGB.transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(rgb, expected, atol=1 / 255 + 1e-6)
    assert ("alpha channels of the images were dropped" in notes) == (mode in ("RGBA", "LA"))
    gray = imio.read_image(path, 1)
    luma = np.tensordot(np.array(imio.LUMA_WEIGHTS), expected, axes=1)
    np.testing.assert_allclose(gray[0], luma, atol=2 / 255)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_corrupt_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        _save(tmp_path, "full.png", Image.fromarray(
            np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
        content = (tmp_path / "full.png").read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(imio.ImageError, match="cannot read '.*bad.png' as an image") as e:
        imio.read_image(path, 3)
    assert "\n" not in str(e.value)


def test_masks_alpha_and_colour(tmp_path):
    alpha = np.zeros((4, 4, 4), np.uint8)
    alpha[1:3, 1:3, 3] = 255  # object only in the alpha channel
    notes: set = set()
    m = imio.read_mask(_save(tmp_path, "a.png", Image.fromarray(alpha)), notes)
    assert m.sum() == 4 and m[1, 1] and notes
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0, 2] = 7
    assert imio.read_mask(_save(tmp_path, "c.png", Image.fromarray(rgb))).sum() == 1


def test_model_channels_follow_the_first_convolution():
    assert imio.model_channels(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())) == 1
    assert imio.model_channels(nn.Sequential(nn.Flatten(), nn.Linear(3, 2))) is None


def _folder(root, sizes=((8, 8),) * 4, mode="L", masks=None, label_text=None):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        arr = rng.integers(0, 65535, (h, w)).astype(np.uint16)
        img = Image.fromarray(arr) if mode == "I;16" else Image.fromarray(
            (arr // 257).astype(np.uint8)).convert(mode)
        img.save(root / "images" / f"im{i}.png")
    if masks is not None:
        (root / "masks").mkdir()
        for i, m in enumerate(masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / f"im{i}.png")
    text = label_text or "name,label\n" + "".join(f"im{i}.png,{i % 2}\n"
                                                  for i in range(len(sizes)))
    (root / "labels.csv").write_text(text)


def test_sixteen_bit_grayscale_folder_loads_with_one_channel(tmp_path):
    _folder(tmp_path, mode="I;16")
    d = load_folder(tmp_path, channels=1)
    raw = np.asarray(Image.open(tmp_path / "images" / "im0.png"), np.float64) / 65535
    assert d.images.shape == (4, 1, 8, 8)
    np.testing.assert_allclose(d.images[0, 0].numpy(), raw, atol=1e-6)
    assert 0.3 < float(d.images.mean()) < 0.7


def test_sizes_are_refused_or_resized(tmp_path):
    _folder(tmp_path / "a", sizes=((8, 8), (8, 8), (10, 12)))
    with pytest.raises(DataError, match="different sizes 8x8, 10x12; pass --image-size"):
        load_folder(tmp_path / "a")
    d = load_folder(tmp_path / "a", size=6)
    assert d.images.shape == (3, 3, 6, 6) and any("resized to 6x6" in n for n in d.notes)


def test_masks_resized_empty_and_full_are_noted_and_excluded(tmp_path):
    obj = np.zeros((8, 8), bool)
    obj[2:5, 2:5] = True
    small = np.zeros((4, 4), bool)
    small[1:3, 1:3] = True
    masks = [obj, np.zeros((8, 8), bool), np.ones((8, 8), bool), small, obj, obj]
    _folder(tmp_path, sizes=((8, 8),) * 6, masks=masks)
    d = load_folder(tmp_path, n_val=1)
    assert any("1 mask(s) of another size" in n and "im3.png" in n for n in d.notes)
    assert int(d.masks[3].sum()) == 16  # nearest: 2x2 -> 4x4 object pixels
    usable = np.concatenate([d.usable_masks("val"), d.usable_masks("test")])
    order = np.concatenate([d.val_idx, d.test_idx])
    assert sorted(order[~usable].tolist()) == [1, 2]
    notes = " ".join(d.mask_notes())
    assert "excluded from the localisation metrics" in notes
    assert "im1.png" in notes and "im2.png" in notes
    assert d.has_usable_masks


def test_no_usable_mask_skips_localisation_with_a_note(tmp_path):
    _folder(tmp_path, masks=[np.zeros((8, 8), bool)] * 4)
    d = load_folder(tmp_path)
    assert not d.has_usable_masks
    assert any("Pointing Game are skipped" in n for n in d.mask_notes())


def test_labels_bom_crlf_duplicates_and_orphans(tmp_path):
    text = "\ufeffname,label\r\nim0.png,1\r\nim1.png,0\r\nim2.png,1\r\nim3.png,0\r\n"
    _folder(tmp_path / "bom", label_text=text)
    (tmp_path / "bom" / "labels.csv").write_bytes(text.encode("utf-8"))
    assert load_folder(tmp_path / "bom").labels.tolist() == [1, 0, 1, 0]
    _folder(tmp_path / "dup", label_text="name,label\nim0.png,1\nim1.png,0\nim2.png,1\n"
                                          "im3.png,0\nim1.png,1\n")
    with pytest.raises(DataError, match=r"listed more than once: im1.png \(lines 3, 6\)"):
        load_folder(tmp_path / "dup")
    _folder(tmp_path / "orphan", label_text="name,label\nim0.png,1\nim1.png,0\nim2.png,1\n"
                                             "im3.png,0\nim9.png,1\n")
    with pytest.raises(DataError, match="match no image.*im9.png"):
        load_folder(tmp_path / "orphan")


def _png16(path, arr):
    """Write ``arr`` (uint16, (H, W, C) with C = 1..4) as a 16-bit PNG (no Pillow)."""
    import struct
    import zlib

    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_sixteen_bit_colour_png_is_refused_gray_is_exact(tmp_path, channels):
    arr = np.random.default_rng(0).integers(0, 65536, (5, 7, channels)).astype(np.uint16)
    with pytest.raises(imio.ImageError, match=r"c\.png' has 16-bit colour or alpha channels, "
                                              r"which Pillow reads at 8 bits.*convert it"):
        imio.read_image(_png16(tmp_path / "c.png", arr), 3)
    with pytest.raises(imio.ImageError, match="16-bit colour"):  # masks too
        imio.read_mask(tmp_path / "c.png")
    gray = arr[..., :1]
    got = imio.read_image(_png16(tmp_path / "g.png", gray), 1)
    np.testing.assert_allclose(got[0], gray[..., 0] / 65535.0, atol=1e-7)


def test_sixteen_bit_colour_tiff_is_refused(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    arr = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", arr, photometric="rgb")
    with pytest.raises(imio.ImageError, match="16-bit colour"):
        imio.read_image(tmp_path / "c.tif", 3)


def test_nested_images_are_named_not_silently_ignored(tmp_path):
    _folder(tmp_path / "a")
    (tmp_path / "a" / "images" / "cat").mkdir()
    for i in range(2):
        Image.new("L", (8, 8)).save(tmp_path / "a" / "images" / "cat" / f"x{i}.png")
    d = load_folder(tmp_path / "a")
    assert len(d.names) == 4
    assert len(d.warnings) == 1 and "2 image file(s) in subfolders" in d.warnings[0]
    assert d.warnings[0] in d.notes and d.limit(1, 1).warnings == d.warnings
    only = tmp_path / "b" / "images" / "dog"
    only.mkdir(parents=True)
    Image.new("L", (8, 8)).save(only / "y.png")
    (tmp_path / "b" / "labels.csv").write_text("y.png,0\n")
    with pytest.raises(DataError, match=r"no images .* directly in .*subfolders hold 1 image "
                                        r"file\(s\) \(e\.g\. dog/y\.png\), but subfolders are "
                                        r"not read: put the images directly in images/"):
        load_folder(tmp_path / "b")


def test_negative_label_and_one_image(tmp_path):
    _folder(tmp_path / "neg", label_text="im0.png,-1\nim1.png,0\nim2.png,0\nim3.png,0\n")
    with pytest.raises(DataError, match="label -1 of 'im0.png' is negative") as info:
        load_folder(tmp_path / "neg")
    assert "None" not in str(info.value)
    _folder(tmp_path / "one", sizes=((8, 8),), label_text="im0.png,1\n")
    with pytest.raises(DataError, match="holds one image; the benchmark needs at least two"):
        load_folder(tmp_path / "one")
    d = load_folder(tmp_path / "one", split=False)
    assert d.test_idx.tolist() == [0] and d.val_idx.tolist() == [] and d.labels.tolist() == [1]


def test_exif_rotated_jpeg_loads_as_shown_and_its_mask_fits(tmp_path):
    # a phone photo: pixels stored 8 high x 12 wide, EXIF orientation 6 (rotate 90 degrees
    # clockwise to show): viewers and annotation tools show it 12 high x 8 wide
    _folder(tmp_path, sizes=((12, 8),) * 3, masks=[np.zeros((12, 8), bool)] * 3,
            label_text="im0.png,0\nim1.png,1\nim2.png,0\nphoto.jpg,1\n")
    shown = np.zeros((12, 8, 3), np.uint8)
    shown[:3] = 255  # a white band at the top of the shown image
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(
        tmp_path / "images" / "photo.jpg", exif=exif, quality=100)
    obj = np.zeros((12, 8), np.uint8)
    obj[:3] = 255
    Image.fromarray(obj).save(tmp_path / "masks" / "photo.png")
    notes: set = set()
    x = imio.read_image(tmp_path / "images" / "photo.jpg", 3, notes=notes)
    assert x.shape == (3, 12, 8) and x[:, :3].min() > 0.9 and x[:, 4:].max() < 0.1
    assert any("EXIF orientation" in n for n in notes)
    d = load_folder(tmp_path)  # was: "different sizes 12x8, 8x12"
    i = d.names.index("photo.jpg")
    assert d.images.shape[-2:] == (12, 8) and not any("resized" in n for n in d.notes)
    assert (d.masks[i, 0].numpy() == (obj > 0)).all()
    assert d.images[i, :, d.masks[i, 0]].min() > 0.9


def test_mask_of_the_same_file_name_wins_and_two_candidates_are_refused(tmp_path):
    obj = np.zeros((8, 8), bool)
    obj[2:5, 2:5] = True
    _folder(tmp_path, masks=[obj] * 4)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "im0.bmp")
    d = load_folder(tmp_path)  # was: the empty im0.bmp (sorted first) taken for im0.png
    assert [int(m.sum()) for m in d.masks] == [9] * 4
    (tmp_path / "images" / "im1.png").rename(tmp_path / "images" / "im1.tif")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "im1.bmp")
    (tmp_path / "labels.csv").write_text("im0,0\nim1,1\nim2,0\nim3,1\n")
    with pytest.raises(DataError, match=r"1 image\(s\) have several masks .*"
                                        r"im1.tif \(im1.bmp, im1.png\)"):
        load_folder(tmp_path)


def test_mask_resize_is_centred_and_mirror_symmetric(tmp_path):
    # a 3x3 mask of a 2x2 image: output pixel centres map to source 0.75 and 2.25, so
    # the corner objects land in the matching corners (PyTorch's legacy "nearest" took
    # source rows/columns 0 and 1: the bottom-right object vanished, the mask shifted)
    corners = []
    for r, c in ((0, 0), (0, 2), (2, 0), (2, 2)):
        m = np.zeros((3, 3), bool)
        m[r, c] = True
        corners.append(m)
    _folder(tmp_path, sizes=((2, 2),) * 4, masks=corners)
    d = load_folder(tmp_path)
    for i, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        want = np.zeros((2, 2), bool)
        want[r, c] = True
        assert (d.masks[i, 0].numpy() == want).all(), i


def test_hidden_files_like_macos_appledouble_are_not_read(tmp_path):
    _folder(tmp_path, masks=[np.ones((8, 8), bool)] * 4)
    for sub in ("images", "masks"):  # what macOS leaves on a FAT / exFAT drive
        (tmp_path / sub / "._im0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
        (tmp_path / sub / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    d = load_folder(tmp_path)  # was: "1 image(s) ... have no label ...: ._im0.png"
    assert d.names == ["im0.png", "im1.png", "im2.png", "im3.png"]


def test_labels_match_file_names_in_either_unicode_normal_form(tmp_path):
    import unicodedata

    _folder(tmp_path, label_text="name,label\ncaf\u00e9.png,1\nim1.png,0\nim2.png,1\n"
                                 "im3.png,0\n")  # typed: 'é' composed (NFC)
    decomposed = unicodedata.normalize("NFD", "caf\u00e9.png")  # as macOS's HFS+ stores it
    (tmp_path / "images" / "im0.png").rename(tmp_path / "images" / decomposed)
    d = load_folder(tmp_path)  # was: "1 image(s) ... have no label ...: café.png"
    assert d.labels[d.names.index(decomposed)] == 1


def test_first_frame_of_an_animated_gif_is_read_and_noted(tmp_path):
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (255, 0)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    notes: set = set()
    x = imio.read_image(tmp_path / "a.gif", 3, notes=notes)
    assert x.min() == 1.0 and any("only the first frame" in n for n in notes)


def test_soft_or_jpeg_masks_are_noted(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    notes: set = set()
    assert imio.read_mask(_save(tmp_path, "hard.png", Image.fromarray(m)), notes).sum() == 64
    assert not notes
    imio.read_mask(_save(tmp_path, "m.jpg", Image.fromarray(m)), notes)  # JPEG ringing
    assert any("several non-zero levels" in n for n in notes)
    notes.clear()
    soft = Image.fromarray(m).resize((8, 8), Image.BILINEAR)  # anti-aliased edges
    imio.read_mask(_save(tmp_path, "soft.png", soft.convert("RGB")), notes)
    assert any("several non-zero levels" in n for n in notes)


def test_with_image_size_masks_are_checked_against_their_own_image(tmp_path):
    obj = np.zeros((10, 12), bool)
    obj[2:6, 3:9] = True
    small = np.zeros((6, 6), bool)  # drawn for another image size
    small[1:4, 1:4] = True
    _folder(tmp_path, sizes=((10, 12), (10, 12), (6, 6), (10, 12)),
            masks=[obj, obj, obj, small])
    d = load_folder(tmp_path, size=6)
    note = " ".join(n for n in d.notes if "mask(s) of another size" in n)
    # im2 (6x6 image, 10x12 mask) and im3 (10x12 image, 6x6 mask) do not fit their image;
    # im0 and im1 fit (was: im0, im1, im3 named, im2 silently resized)
    assert note.startswith("2 mask(s)") and "im2.png" in note and "im3.png" in note
    assert "im0.png" not in note and d.masks.shape == (4, 1, 6, 6)

"""dataset.prepare_dataset against the files users really have: every bad file is built here."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_core.dataset import DatasetError, bucket_sizes, prepare_dataset
from dreambooth_core.dataset import decode as ds_decode  # opens the files

RES = 64


def pattern(seed: int, w: int = 96, h: int = 96) -> Image.Image:
    """A smooth, structured image (random 6×6 colour grid, upscaled): distinct per seed, and
    robust to JPEG so duplicate detection behaves as on photos."""
    grid = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)


def prep(source, **kw):
    kw.setdefault("token", "sks")
    kw.setdefault("class_noun", "dog")
    kw.setdefault("resolution", RES)
    return prepare_dataset(source, **kw)


def report(ds, name):
    matches = [r for r in ds.report if r.source == name]
    assert matches, f"{name} not in report {[r.source for r in ds.report]}"
    return matches[0]


def notes(ds, name) -> str:
    return " | ".join(report(ds, name).notes)


def good(folder: Path, name: str = "good.png", seed: int = 99) -> None:
    pattern(seed).save(folder / name)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --- broken files --------------------------------------------------------------------------


def test_zero_byte_file_is_skipped(tmp_path):
    good(tmp_path)
    (tmp_path / "empty.jpg").write_bytes(b"")
    ds = prep(tmp_path)
    assert report(ds, "empty.jpg").status == "skipped"
    assert "empty file" in notes(ds, "empty.jpg")
    assert [i.source for i in ds.items] == ["good.png"]


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_image_is_skipped(tmp_path, ext):
    good(tmp_path)
    buf = io.BytesIO()
    pattern(1, 128, 128).save(buf, format="JPEG" if ext == "jpg" else "PNG")
    data = buf.getvalue()
    (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    ds = prep(tmp_path)
    assert report(ds, f"cut.{ext}").status == "skipped"
    assert "truncated" in notes(ds, f"cut.{ext}")


def test_text_and_binary_files_with_image_extension_are_skipped(tmp_path):
    good(tmp_path)
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    (tmp_path / "blob.png").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8)))
    ds = prep(tmp_path)
    for name in ("text.jpg", "blob.png"):
        assert report(ds, name).status == "skipped"
        assert "not an image" in notes(ds, name)
    assert "text" in notes(ds, "text.jpg")


def test_png_named_jpg_and_image_without_extension_load_with_a_note(tmp_path):
    pattern(1).save(tmp_path / "really_png.jpg", format="PNG")
    pattern(2).save(tmp_path / "photo.dat", format="PNG")
    ds = prep(tmp_path)
    assert report(ds, "really_png.jpg").status == "fixed"
    assert "content is PNG" in notes(ds, "really_png.jpg")
    assert "no image extension" in notes(ds, "photo.dat")
    assert len(ds.items) == 2


def test_unreadable_file_chmod(tmp_path):
    good(tmp_path)
    locked = tmp_path / "locked.png"
    pattern(3).save(locked)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running with privileges that read chmod-000 files (root)")
        ds = prep(tmp_path)
        assert report(ds, "locked.png").status == "skipped"
        assert "permission denied" in notes(ds, "locked.png")
    finally:
        locked.chmod(0o644)


def test_unreadable_file_permission_error(tmp_path, monkeypatch):
    # The same handling as above, reachable when tests run as root.
    good(tmp_path)
    pattern(3).save(tmp_path / "locked.png")
    real_open = open

    def fake_open(path, *a, **kw):
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(ds_decode, "open", fake_open, raising=False)
    ds = prep(tmp_path)
    assert report(ds, "locked.png").status == "skipped"
    assert "permission denied" in notes(ds, "locked.png")
    assert len(ds.items) == 1


def test_broken_symlink_is_skipped(tmp_path):
    good(tmp_path)
    try:
        os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not available")
    ds = prep(tmp_path)
    assert report(ds, "link.png").status == "skipped"
    assert "broken symbolic link" in notes(ds, "link.png")


# --- colour modes and orientation ---------------------------------------------------------------


def test_cmyk_jpeg_converted_to_rgb(tmp_path):
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    ds = prep(tmp_path)
    assert "CMYK converted to RGB" in notes(ds, "cmyk.jpg")
    img = ds.items[0].image
    assert img.mode == "RGB"
    r, g, b = img.getpixel((32, 32))
    assert r > 200 and g < 60 and b < 60  # red, as printed


def test_16bit_png_scaled_not_clipped(tmp_path):
    arr = np.full((80, 80), 32768, dtype=np.uint16)  # 50 % grey in 16 bit
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    ds = prep(tmp_path)
    assert abs(ds.items[0].image.getpixel((10, 10))[0] - 128) <= 1  # clipping would give 255
    assert "scaled to 8-bit" in notes(ds, "deep.png")


def test_grayscale_becomes_rgb(tmp_path):
    pattern(4).convert("L").save(tmp_path / "gray.png")
    ds = prep(tmp_path)
    assert ds.items[0].image.mode == "RGB"
    assert "grayscale converted to RGB" in notes(ds, "gray.png")


def test_palette_with_transparency_composited_on_grey(tmp_path):
    im = Image.new("P", (80, 80), 0)
    im.putpalette([0, 0, 0] + [255, 0, 0] * 255)  # index 0 (black) is transparent
    im.paste(1, (40, 0, 80, 80))
    im.save(tmp_path / "pal.png", transparency=0)
    ds = prep(tmp_path)
    img = ds.items[0].image
    assert img.getpixel((2, 32)) == (128, 128, 128)
    assert img.getpixel((60, 32)) == (255, 0, 0)
    assert "composited on grey" in notes(ds, "pal.png")


def test_rgba_composited_on_mid_grey_not_black(tmp_path):
    arr = np.zeros((64, 64, 4), dtype=np.uint8)  # left: transparent black
    arr[:, 32:] = (0, 0, 255, 255)  # right: opaque blue
    Image.fromarray(arr, "RGBA").save(tmp_path / "cutout.png")
    ds = prep(tmp_path)
    img = ds.items[0].image
    assert img.getpixel((4, 10)) == (128, 128, 128)
    assert img.getpixel((60, 10)) == (0, 0, 255)
    assert report(ds, "cutout.png").status == "fixed"


def test_opaque_alpha_is_dropped_without_a_note(tmp_path):
    pattern(5).convert("RGBA").save(tmp_path / "opaque.png")
    ds = prep(tmp_path)
    assert report(ds, "opaque.png").status == "ok"


@pytest.mark.parametrize("orientation,top,bottom", [(6, "red", "blue"), (8, "blue", "red")])
def test_exif_orientation_makes_subject_upright(tmp_path, orientation, top, bottom):
    # Stored landscape: red left half, blue right half; the camera says "rotate to view".
    stored = Image.new("RGB", (128, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 64, 64))
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    ds = prep(tmp_path)
    img = ds.items[0].image  # upright 64×128, centre-cropped to 64×64: top half one colour
    colour = {"red": lambda p: p[0] > 180 and p[2] < 80, "blue": lambda p: p[2] > 180 and p[0] < 80}
    assert colour[top](img.getpixel((32, 4))) and colour[top](img.getpixel((4, 4)))
    assert colour[bottom](img.getpixel((32, 60))) and colour[bottom](img.getpixel((60, 60)))
    assert "EXIF rotated 90°" in notes(ds, "phone.jpg")
    assert report(ds, "phone.jpg").original_size == (64, 128)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_uses_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (80, 80), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    name = f"anim.{fmt.lower()}"
    frames[0].save(tmp_path / name, format=fmt, save_all=True, append_images=frames[1:], duration=100,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    ds = prep(tmp_path)
    assert "first frame of 3" in notes(ds, name)
    r, g, b = ds.items[0].image.getpixel((10, 10))
    assert r > 240 and g < 15 and b < 15


def test_webp_tiff_bmp_load(tmp_path):
    pattern(6).save(tmp_path / "a.webp", lossless=True)
    pattern(7).save(tmp_path / "b.tiff")
    pattern(8).save(tmp_path / "c.bmp")
    ds = prep(tmp_path)
    assert [i.source for i in ds.items] == ["a.webp", "b.tiff", "c.bmp"]
    assert all(r.status == "ok" for r in ds.report), ds.report_text()


# --- sizes ---------------------------------------------------------------------------------------


def test_small_images_skipped_below_min_size_and_warned_above(tmp_path):
    pattern(1, 20, 24).save(tmp_path / "tiny.png")  # below min_size 32
    pattern(2, 48, 48).save(tmp_path / "small.png")  # kept, upscaled to 64
    pattern(3, 80, 64).save(tmp_path / "fine.png")
    ds = prep(tmp_path)
    assert report(ds, "tiny.png").status == "skipped" and "too small" in notes(ds, "tiny.png")
    assert report(ds, "small.png").status == "warning" and "upscaled" in notes(ds, "small.png")
    assert report(ds, "fine.png").status == "ok"
    assert report(ds, "small.png").size == (RES, RES)
    ds2 = prep(tmp_path, min_size=16)
    assert report(ds2, "tiny.png").status == "warning"


def test_huge_png_header_is_refused_without_decoding(tmp_path):
    # A 20000×20000 RGB PNG header (1.2 GB decoded) in a few bytes: a decompression bomb.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(data)
    good(tmp_path)
    ds = prep(tmp_path)
    assert report(ds, "bomb.png").status == "skipped"
    assert "too large to decode safely: 20000x20000" in notes(ds, "bomb.png")
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is left in place


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    pattern(9, 2000, 1600).save(tmp_path / "big.jpg", quality=80)
    pattern(10, 1200, 1000).save(tmp_path / "big.png")
    ds = prep(tmp_path, max_pixels=1_000_000)
    big = report(ds, "big.jpg")
    assert big.status == "fixed" and big.original_size == (2000, 1600)
    assert "downscaled from 2000x1600" in notes(ds, "big.jpg") and "250x200" in notes(ds, "big.jpg")
    assert report(ds, "big.png").status == "skipped"  # PNG cannot be decoded partially
    assert "too large" in notes(ds, "big.png")


# --- duplicates ----------------------------------------------------------------------------------


def test_exact_duplicates_dropped_and_near_duplicates_warned(tmp_path):
    base = pattern(11, 128, 128)
    base.save(tmp_path / "a.png")
    base.save(tmp_path / "b.png")  # same pixels
    base.save(tmp_path / "c.jpg", quality=85)  # re-encoded: near duplicate
    pattern(12, 128, 128).save(tmp_path / "d.png")
    ds = prep(tmp_path)
    assert report(ds, "b.png").status == "skipped" and "exact duplicate of a.png" in notes(ds, "b.png")
    assert report(ds, "c.jpg").status == "warning" and "near duplicate of a.png" in notes(ds, "c.jpg")
    assert report(ds, "d.png").status == "ok"
    assert [i.source for i in ds.items] == ["a.png", "c.jpg", "d.png"]


def test_flat_images_of_different_colours_are_not_near_duplicates(tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / "blue.png")
    ds = prep(tmp_path)
    assert all(r.status == "ok" for r in ds.report), ds.report_text()


# --- captions -----------------------------------------------------------------------------------


def test_sidecar_captions_fill_placeholders_and_flag_missing_token(tmp_path):
    pattern(1).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a {token} {class} on the beach\n")
    pattern(2).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a dog on the grass")
    pattern(3).save(tmp_path / "c.png")
    ds = prep(tmp_path)
    caps = {i.source: i.caption for i in ds.items}
    assert caps == {"a.png": "a sks dog on the beach", "b.png": "a dog on the grass", "c.png": "a photo of sks dog"}
    assert report(ds, "b.png").status == "warning" and "does not contain the identifier" in notes(ds, "b.png")
    assert report(ds, "a.png").status == "ok"
    off = prep(tmp_path, use_captions=False)
    assert {i.caption for i in off.items} == {"a photo of sks dog"}


def test_non_utf8_caption_decoded_with_fallback(tmp_path):
    pattern(1).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("{token} caf\u00e9 \u2013 na\u00efve".encode("cp1252"))
    ds = prep(tmp_path)
    assert ds.items[0].caption == "sks caf\u00e9 \u2013 na\u00efve"
    assert "not UTF-8" in notes(ds, "a.png")


def test_empty_caption_falls_back_to_template(tmp_path):
    pattern(1).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n")
    ds = prep(tmp_path)
    assert ds.items[0].caption == "a photo of sks dog"
    assert "empty" in notes(ds, "a.png")


# --- listing -----------------------------------------------------------------------------------


def test_hidden_system_and_text_files_ignored_quietly(tmp_path):
    good(tmp_path, "a.png")
    (tmp_path / "a.txt").write_text("a photo of {token} {class}")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "._a.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (tmp_path / "desktop.ini").write_text("[.ShellClassInfo]")
    pattern(2).save(tmp_path / ".hidden.png")
    (tmp_path / "notes.md").write_text("# my dog")
    ds = prep(tmp_path)
    assert [r.source for r in ds.report] == ["a.png"]


def test_order_is_sorted_for_folders_and_lists(tmp_path):
    for i, name in enumerate(["c.png", "a.png", "b.png"]):
        pattern(i).save(tmp_path / name)
    assert [i.source for i in prep(tmp_path).items] == ["a.png", "b.png", "c.png"]
    listed = prep([tmp_path / "c.png", str(tmp_path / "a.png"), tmp_path / "b.png"])
    assert [i.source for i in listed.items] == ["a.png", "b.png", "c.png"]


def test_recursive_and_relative_names(tmp_path):
    good(tmp_path, "top.png", 1)
    (tmp_path / "sub").mkdir()
    good(tmp_path / "sub", "inner.png", 2)
    assert [i.source for i in prep(tmp_path).items] == ["top.png"]
    assert [i.source for i in prep(tmp_path, recursive=True).items] == ["sub/inner.png", "top.png"]
    only_sub = tmp_path / "only"
    (only_sub / "deeper").mkdir(parents=True)
    good(only_sub / "deeper", "x.png", 3)
    with pytest.raises(DatasetError, match="recursive=True"):
        prep(only_sub)


def test_no_usable_image_raises_actionable_error(tmp_path):
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(DatasetError) as err:
        prep(tmp_path)
    assert "bad.jpg" in str(err.value) and "not an image" in str(err.value)
    with pytest.raises(DatasetError, match="no such file"):
        prep(tmp_path / "missing")
    with pytest.raises(DatasetError, match="empty"):
        prep([])
    with pytest.raises(DatasetError, match="no such file"):
        prep("")  # not the current folder


# --- in-memory sources --------------------------------------------------------------------------


def test_in_memory_images(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    f01 = np.full((64, 64, 3), 0.5, dtype=np.float32)
    pil = pattern(13, 64, 64)
    ds = prep([pil, u8, f01])
    assert [i.source for i in ds.items] == ["memory[0]", "memory[1]", "memory[2]"]
    assert np.array_equal(np.asarray(ds.items[0].image), np.asarray(pil))
    assert np.array_equal(np.asarray(ds.items[1].image), u8)
    assert ds.items[2].image.getpixel((0, 0)) == (128, 128, 128)  # float [0,1] → 0..255
    batch = np.stack([u8.astype(np.float32) / 255.0, f01])  # a ComfyUI-style B×H×W×C batch
    assert len(prep(batch).items) == 2


def test_in_memory_float_0_255_and_bad_arrays(tmp_path):
    ds = prep([np.full((64, 64, 3), 200.0, dtype=np.float32), np.zeros((64, 64, 7), np.uint8),
               np.full((64, 64, 3), np.nan, np.float32)])
    assert ds.items[0].image.getpixel((0, 0)) == (200, 200, 200)  # clipping would give 255
    assert "0-255" in notes(ds, "memory[0]")
    assert report(ds, "memory[1]").status == "skipped" and "shape" in notes(ds, "memory[1]")
    assert report(ds, "memory[2]").status == "skipped" and "NaN" in notes(ds, "memory[2]")


# --- crops -----------------------------------------------------------------------------------------


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float64)
    return Image.fromarray(np.repeat(np.repeat(x[None, :, None], h, 0), 3, 2).round().astype(np.uint8))


def test_center_and_random_crops(tmp_path):
    gradient(256, 64).save(tmp_path / "wide.png")
    center = prep(tmp_path, crop="center").items[0].image
    assert center.size == (RES, RES)
    assert abs(np.asarray(center).mean() - 127.5) < 3  # the middle of the gradient
    means = [np.asarray(prep(tmp_path, crop="random", seed=s).items[0].image).mean() for s in range(6)]
    again = [np.asarray(prep(tmp_path, crop="random", seed=s).items[0].image).mean() for s in range(6)]
    assert means == again  # seeded
    assert len({round(m) for m in means}) > 1 and any(abs(m - 127.5) > 5 for m in means)


def test_bucket_sizes_depend_on_resolution():
    b512 = bucket_sizes(512)
    assert {(512, 512), (576, 448), (448, 576), (640, 384), (384, 640)} <= set(b512)
    for w, h in b512 + bucket_sizes(1024):
        assert w % 64 == 0 and h % 64 == 0 and 0.5 <= w / h <= 2
    assert all(w * h <= 512 * 512 for w, h in b512)
    assert max(w * h for w, h in bucket_sizes(1024)) == 1024 * 1024
    assert set(bucket_sizes(1024)) != set(b512)


def test_bucket_crop_picks_nearest_aspect(tmp_path):
    pattern(1, 1024, 512).save(tmp_path / "wide.png")
    pattern(2, 512, 512).save(tmp_path / "square.png")
    pattern(3, 480, 640).save(tmp_path / "tall.png")
    ds = prep(tmp_path, resolution=512, crop="bucket")
    sizes = {i.source: i.image.size for i in ds.items}
    assert sizes == {"wide.png": (640, 384), "square.png": (512, 512), "tall.png": (448, 576)}
    assert report(ds, "wide.png").size == (640, 384)


def test_bad_arguments_name_the_input(tmp_path):
    good(tmp_path)
    with pytest.raises(ValueError, match="crop"):
        prep(tmp_path, crop="middle")
    with pytest.raises(ValueError, match="resolution"):
        prep(tmp_path, resolution=500)


# --- output -----------------------------------------------------------------------------------------


def test_save_writes_crops_captions_and_reports(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    pattern(1).save(src / "a.png")
    (src / "bad.jpg").write_bytes(b"")
    ds = prep(src, flip=True)
    out = tmp_path / "out"
    ds.save(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000_a.png", "0000_a.txt", "report.json", "report.txt"]
    assert Image.open(out / "0000_a.png").size == (RES, RES)
    assert (out / "0000_a.txt").read_text().strip() == "a photo of sks dog"
    data = json.loads((out / "report.json").read_text())
    assert data["flip"] is True and [r["source"] for r in data["report"]] == ["a.png", "bad.jpg"]
    text = (out / "report.txt").read_text()
    assert "bad.jpg" in text and "empty file" in text and "flip=on" in ds.summary()


# --- more real-world variants --------------------------------------------------------------------


def test_in_memory_pil_image_with_exif_orientation_is_made_upright(tmp_path):
    stored = Image.new("RGB", (128, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 64, 64))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif.tobytes())
    ds = prep([Image.open(tmp_path / "phone.png")])
    assert ds.items[0].image.getpixel((32, 4)) == (255, 0, 0)
    assert "EXIF rotated 90°" in notes(ds, "memory[0]")


def test_unreadable_exif_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    pattern(1).save(tmp_path / "a.jpg")

    def broken(self):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    ds = prep(tmp_path)
    assert report(ds, "a.jpg").status == "warning" and "EXIF data unreadable" in notes(ds, "a.jpg")


def test_mpo_camera_jpeg_is_not_called_animated(tmp_path):
    pattern(1).save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[pattern(2)])
    assert Image.open(tmp_path / "camera.jpg").format == "MPO"
    ds = prep(tmp_path)
    assert report(ds, "camera.jpg").status == "ok", ds.report_text()


def test_heic_without_plugin_says_what_to_do(tmp_path):
    good(tmp_path)
    (tmp_path / "iphone.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(200))
    ds = prep(tmp_path)
    assert report(ds, "iphone.heic").status == "skipped" and "pillow-heif" in notes(ds, "iphone.heic")


def test_rgb_png_with_colour_key_transparency(tmp_path):
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.paste((0, 200, 0), (32, 0, 64, 64))
    im.save(tmp_path / "key.png", transparency=(0, 0, 0))
    ds = prep(tmp_path)
    assert ds.items[0].image.getpixel((4, 4)) == (128, 128, 128)
    assert ds.items[0].image.getpixel((60, 4)) == (0, 200, 0)


def test_32bit_integer_and_float_tiff_scaled_by_range(tmp_path):
    Image.fromarray(np.full((64, 64), 65535 // 4, dtype=np.int32), "I").save(tmp_path / "int.tif")
    Image.fromarray(np.full((64, 64), 0.75, dtype=np.float32), "F").save(tmp_path / "float.tif")
    ds = prep(tmp_path)
    px = {i.source: i.image.getpixel((0, 0))[0] for i in ds.items}
    assert abs(px["int.tif"] - 64) <= 1 and abs(px["float.tif"] - 191) <= 1


def test_more_in_memory_layouts():
    import torch

    chw = np.zeros((3, 64, 64), dtype=np.uint8)
    chw[0] = 255
    u16 = np.full((64, 64, 3), 65535 // 2, dtype=np.uint16)
    gray = np.full((64, 64), 7, dtype=np.uint8)
    mask = np.ones((64, 64, 3), dtype=bool)
    tensor = torch.full((64, 64, 3), 0.25)
    ds = prep([chw, u16, gray, mask, tensor])
    px = [i.image.getpixel((0, 0)) for i in ds.items]
    assert px == [(255, 0, 0), (127, 127, 127), (7, 7, 7), (255, 255, 255), (64, 64, 64)]
    assert "channels-first" in notes(ds, "memory[0]")
    assert len(prep(torch.rand(2, 64, 64, 3)).items) == 2  # a ComfyUI IMAGE batch as such
    with pytest.raises(DatasetError, match="mixes"):
        prep([chw, "a.png"])


def test_other_sidecar_names_and_unreadable_sidecar(tmp_path, monkeypatch):
    pattern(1).save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("{token} in kohya style")
    pattern(2).save(tmp_path / "b.jpg")
    (tmp_path / "b.jpg.txt").write_text("{token} beside the full name")
    pattern(3).save(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("{token} hidden")
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "c.txt" else real(self))
    ds = prep(tmp_path)
    caps = {i.source: i.caption for i in ds.items}
    assert caps["a.png"] == "sks in kohya style" and caps["b.jpg"] == "sks beside the full name"
    assert caps["c.png"] == "a photo of sks dog" and "unreadable" in notes(ds, "c.png")


def test_system_folders_skipped_when_recursive(tmp_path):
    good(tmp_path, "a.png")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "a.png").write_bytes(b"\0\5\26\7")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.png").write_bytes(b"junk")
    ds = prep(tmp_path, recursive=True)
    assert [r.source for r in ds.report] == ["a.png"]


# --- subject masks (masked loss) -----------------------------------------------------------------


def cutout(seed: int, w: int = 128, h: int = 96, box=(40, 20, 100, 80)) -> Image.Image:
    """A photo whose subject (a box of the pattern) is opaque and whose background is transparent."""
    im = pattern(seed, w, h).convert("RGBA")
    alpha = Image.new("L", (w, h), 0)
    alpha.paste(255, box)
    im.putalpha(alpha)
    return im


def shrink(region: np.ndarray, by: int = 2) -> np.ndarray:
    for _ in range(by):
        pad = np.pad(region, 1)
        region = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return region


def test_alpha_masks_are_cropped_exactly_like_their_photos(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cutout(1).save(src / "a.png")
    cutout(2, box=(0, 0, 30, 96)).save(src / "b.png")
    for crop in ("center", "random"):
        ds = prep(src, masks="alpha", crop=crop, seed=3)
        assert "2 with a subject mask" in ds.summary()
        for item in ds.items:
            assert item.mask.size == item.image.size == (RES, RES)
            mask, rgb = np.asarray(item.mask, np.int16), np.asarray(item.image, np.int16)
            # transparent areas were composited on grey: wherever the mask is clearly off the photo
            # is grey, and wherever it is clearly on, the photo is the (not grey) pattern
            # (2 px from the mask's edge, where resampling blends the two)
            off, on = shrink(mask < 3), shrink(mask > 252)
            assert off.sum() > 200 and on.sum() > 200
            assert np.all(np.abs(rgb[off] - 128).max(-1) <= 2)
            assert np.mean(np.abs(rgb[on] - 128).max(-1) > 2) > 0.95
    # centre crop: the mask is the alpha channel under the photo's own resize and crop (128x96 → 85x64 → 64x64)
    alpha = cutout(1).getchannel("A").resize((85, 64), Image.Resampling.LANCZOS).crop((10, 0, 74, 64))
    assert np.abs(np.asarray(prep(src, masks="alpha").items[0].mask, np.int16) - np.asarray(alpha, np.int16)).max() <= 2


def test_in_memory_masks_one_per_image_and_their_errors():
    photos = [np.asarray(pattern(i)) for i in range(3)]
    masks = np.zeros((3, 48, 48), np.float32)  # ComfyUI's MASK layout, at half the photos' size
    masks[:, 10:30, 5:20] = 1.0
    ds = prep(photos, masks=masks)
    m = np.asarray(ds.items[0].mask) > 127
    ys, xs = np.nonzero(m)
    # 96 px → 64 px: the mask's 20x15 box at half size lands at 2/3 × 2 of its coordinates
    assert abs(ys.min() - 13) <= 1 and abs(ys.max() - 39) <= 1 and abs(xs.min() - 7) <= 1 and abs(xs.max() - 26) <= 1
    with pytest.raises(DatasetError, match="2 mask"):
        prep(photos, masks=masks[:2])
    with pytest.raises(DatasetError, match=r"masks\[0\].*aspect"):
        prep(photos, masks=np.ones((3, 48, 20), np.float32))
    with pytest.raises(DatasetError, match="none of the images .* alpha"):
        prep(photos, masks="alpha")
    empty = masks.copy()
    empty[1] = 0
    ds = prep(photos, masks=empty)
    assert len(ds.items) == 2 and "mask is empty" in notes(ds, "memory[1]")


def test_mask_list_with_files_is_refused_and_masks_are_saved_apart(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cutout(1).save(src / "a.png")
    pattern(2).save(src / "b.png")  # no transparency: learned whole, with a warning
    with pytest.raises(DatasetError, match="in-memory"):
        prep(src, masks=[np.ones((96, 128))])
    ds = prep(src, masks="alpha")
    assert ds.items[0].mask is not None and ds.items[1].mask is None
    assert "whole image is learned" in notes(ds, "b.png")
    ds.save(tmp_path / "out")
    assert Image.open(tmp_path / "out" / "masks" / "0000_a.png").size == (RES, RES)
    # the saved folder reads back as the same photos: the masks' subfolder is not taken for photos
    assert len(prep(tmp_path / "out").items) == 2


def test_captions_one_per_in_memory_image_as_a_hosts_image_text_loader_gives_them(tmp_path):
    images = [pattern(i, 64, 64) for i in (3, 5, 7)]
    ds = prep(images, captions=["{token} {class} on a red chair", "", "a photo of sks dog, side view"])
    assert [i.caption for i in ds.items] == ["sks dog on a red chair", "a photo of sks dog",
                                            "a photo of sks dog, side view"]
    with pytest.raises(DatasetError, match=r"captions: 2 caption\(s\) for 3 image\(s\)"):
        prep(images, captions=["a", "b"])
    with pytest.raises(DatasetError, match="captions: one string, not a list"):
        prep(images, captions="a photo of sks dog")


def test_a_given_caption_wins_over_the_sidecar_file(tmp_path):
    pattern(3, 64, 64).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("{token} {class} from the sidecar")
    assert prep([tmp_path / "a.png"]).items[0].caption == "sks dog from the sidecar"
    assert prep([tmp_path / "a.png"], captions=["{token} {class} given"]).items[0].caption == "sks dog given"

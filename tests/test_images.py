"""Reading image references: every kind of bad file gives an ImageLoadError naming it."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib

import pytest
from PIL import Image

from beamcap.images import ImageLoadError, load_image


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""
    raw = io.BytesIO()
    Image.new("L", (1, 1)).save(raw, format="PNG")
    data = bytearray(raw.getvalue())
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


# Noise comes from a fixed seed: about one run in 10,000, os.urandom's bytes begin like a PCX header and are
# refused as "PCX" instead (that failed a CI run).
@pytest.mark.parametrize(
    "make, cause",
    [
        (lambda d: str(d / "missing.jpg"), "file not found"),
        (lambda d: (open(d / "empty.jpg", "wb").close(), str(d / "empty.jpg"))[1], "the file is empty"),
        (lambda d: (os.mkdir(d / "dir.jpg"), str(d / "dir.jpg"))[1], "is a directory"),
        (
            lambda d: ((d / "r.jpg").write_bytes(random.Random(2048).randbytes(2048)), str(d / "r.jpg"))[1],
            "not a recognised image",
        ),
        (lambda d: ((d / "t.jpg").write_text("hello, I am text"), str(d / "t.jpg"))[1], "not a recognised image"),
    ],
)
def test_bad_files(tmp_path, make, cause):
    ref = make(tmp_path)
    with pytest.raises(ImageLoadError) as e:
        load_image(ref)
    assert cause in str(e.value) and repr(ref) in str(e.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable(tmp_path):
    path = save(Image.new("RGB", (4, 4)), tmp_path / "locked.png")
    os.chmod(path, 0)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_image(path)


def test_decompression_bomb_refused_by_pixel_limit_before_decoding():
    with pytest.raises(ImageLoadError, match="over the max_image_pixels limit of 1000000"):
        load_image(png_with_declared_size(5_000, 5_000), max_pixels=1_000_000)
    # Above Pillow's own Image.MAX_IMAGE_PIXELS, Pillow refuses it first (also a failure, not a crash).
    with pytest.raises(ImageLoadError, match="refused as a possible decompression bomb"):
        load_image(png_with_declared_size(100_000, 100_000))


@pytest.mark.parametrize(
    "image",
    [
        Image.new("CMYK", (8, 6), (0, 255, 255, 0)),
        Image.new("LA", (8, 6), (128, 255)),
        Image.new("I;16", (8, 6), 40000),
        Image.new("1", (8, 6), 1),
        Image.new("RGBA", (8, 6), (255, 0, 0, 128)),
        Image.new("L", (1, 1), 7),
        Image.new("RGB", (1000, 10), (1, 2, 3)),
    ],
    ids=["CMYK", "LA", "I16", "1bit", "RGBA", "1x1", "1000x10"],
)
def test_unusual_modes_and_sizes_become_rgb(tmp_path, image):
    path = save(image, tmp_path / ("x.tif" if image.mode in ("CMYK", "I;16") else "x.png"))
    out = load_image(path)
    assert out.mode == "RGB" and out.size == image.size


def test_i16_is_scaled_not_clipped(tmp_path):
    out = load_image(save(Image.new("I;16", (2, 2), 32768), tmp_path / "g.png"))
    assert out.getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize(
    "image, grey",
    [
        (Image.new("I;16", (2, 2), 200), 0),  # 16-bit: scaled by its full range, even when every value is small
        (Image.new("I;16", (2, 2), 65535), 255),
        (Image.new("F", (2, 2), 0.5), 128),  # floats of 0-1 (float TIFFs) scaled to 0-255
        (Image.new("F", (2, 2), 200.0), 200),  # larger floats read as 0-255
        (Image.new("F", (2, 2), float("nan")), 0),
        (Image.new("I", (2, 2), -5), 0),
    ],
)
def test_wide_greys_are_scaled_by_their_range(tmp_path, image, grey):
    from beamcap.images import to_rgb

    assert to_rgb(image).getpixel((0, 0)) == (grey, grey, grey)
    if image.mode == "I;16":  # also through a real file
        assert load_image(save(image, tmp_path / "g.png")).getpixel((0, 0)) == (grey, grey, grey)


def test_a_16_bit_pgm_is_scaled_by_its_full_range(tmp_path):
    """Pillow opens a PGM of more than 8 bits as mode I (scaled to 0-65535), not I;16: 200 of 65535 is black."""
    path = tmp_path / "g.pgm"
    path.write_bytes(b"P5\n2 1\n65535\n" + (200).to_bytes(2, "big") + (40000).to_bytes(2, "big"))
    image = load_image(str(path))
    assert (image.getpixel((0, 0)), image.getpixel((1, 0))) == ((0, 0, 0), (155, 155, 155))
    path.write_bytes(b"P5\n1 1\n65535\n" + (200).to_bytes(2, "big"))  # values that would fit 8 bits
    assert load_image(str(path)).getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    out = load_image(save(image, tmp_path / "p.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(str(path)).getpixel((0, 0))[0] > 200


def test_multiframe_tiff_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in [(0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "multi.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(str(path)).getpixel((0, 0)) == (0, 255, 0)


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = save(image, tmp_path / "rot.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


def test_bytes_good_and_corrupt():
    buf = io.BytesIO()
    Image.new("RGB", (5, 7), (0, 0, 255)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (5, 7)
    with pytest.raises(ImageLoadError, match=r"image <5 bytes>: not a recognised image"):
        load_image(b"\x00\x01\x02\x03\x04")


def test_wrong_reference_type():
    with pytest.raises(ImageLoadError, match="must be a path, URL or bytes, not int"):
        load_image(5)


def test_http_unreachable_fails_fast():
    with pytest.raises(ImageLoadError, match="cannot download"):
        load_image("http://127.0.0.1:9/x.jpg")


def test_image_root_confinement(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    save(Image.new("RGB", (3, 3)), root / "in.png")
    outside = save(Image.new("RGB", (3, 3)), tmp_path / "out.png")
    os.symlink(outside, root / "link.png")
    assert load_image("in.png", image_root=str(root)).size == (3, 3)
    for ref in ["../out.png", outside, "link.png", "http://127.0.0.1:9/x.png"]:
        with pytest.raises(ImageLoadError, match="refused"):
            load_image(ref, image_root=str(root))


def test_jpeg_draft_decodes_smaller_but_never_below_the_target(tmp_path):
    Image.new("RGB", (640, 480), (0, 90, 200)).save(tmp_path / "big.jpg", quality=90)
    Image.new("RGB", (640, 480), (0, 90, 200)).save(tmp_path / "big.png")
    small = load_image(str(tmp_path / "big.jpg"), draft_size=96)
    assert small.size == (160, 120) and small.getpixel((5, 5))[2] > 150
    assert load_image(str(tmp_path / "big.jpg"), draft_size=400).size == (640, 480)
    assert load_image(str(tmp_path / "big.png"), draft_size=96).size == (640, 480)  # only JPEG has draft mode


def test_processor_input_size():
    from transformers import BlipImageProcessor, CLIPImageProcessor

    from beamcap.model import processor_input_size

    assert processor_input_size(BlipImageProcessor(size={"height": 96, "width": 96})) == 96
    assert processor_input_size(CLIPImageProcessor(size={"shortest_edge": 224})) == 224
    assert processor_input_size(BlipImageProcessor(do_resize=False)) is None


def test_fit_pixels_downscales_keeping_aspect():
    from beamcap.images import fit_pixels

    image = Image.new("RGB", (2000, 1000))
    assert fit_pixels(image, None) is image
    assert fit_pixels(image, 3_000_000) is image
    small = fit_pixels(image, 200_000)
    assert small.size == (632, 316) and small.size[0] * small.size[1] <= 200_000

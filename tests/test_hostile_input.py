"""Hostile input: no file, path, URL or sample can crash, hang or exhaust a job.

The invariant every case checks: each input sample ends in ``good`` or in ``failed`` with a clear reason, its
batch-mates are captioned as without it, memory stays bounded and the job ends in bounded time.
"""

from __future__ import annotations

import http.server
import io
import os
import random
import shutil
import socketserver
import struct
import threading
import time
import types
import urllib.error
import zlib

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that
from helpers import IMG, canonical, run_dofn, same_elements
from PIL import Image

from beamcap import CaptionConfig, CaptionImages, images
from beamcap.images import ImageLoadError, decode_image, load_image, read_bytes

FAST = dict(max_new_tokens=3, do_sample=False)


def encoded(fmt: str, **kwargs) -> bytes:
    """A small real file in ``fmt``; GIF and TIFF with three frames / pages."""
    rng = random.Random(fmt)
    frames = []
    for i in range(3):
        table = [(v + rng.randint(0, 80)) % 256 for v in range(256)] * 3
        frames.append(Image.effect_noise((40, 30), 30 + 20 * i).convert("RGB").point(table))
    buf = io.BytesIO()
    if fmt in ("GIF", "TIFF"):
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **kwargs)
    else:
        frames[0].save(buf, format=fmt, **kwargs)
    return buf.getvalue()


FORMATS = {"JPEG": {}, "PNG": {}, "GIF": {}, "TIFF": {"compression": "tiff_deflate"}, "WEBP": {}}


def mutations(data: bytes, n: int, seed: int) -> list[bytes]:
    """``n`` corruptions of ``data``: truncations at every kind of point, and one to eight flipped bytes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(data[: rng.randrange(1, len(data))])
        else:
            buf = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            out.append(bytes(buf))
    return out


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fuzzed_files_only_ever_raise_image_load_error(fmt):
    """600 corruptions per format (3,000 in all): the decoder gives an RGB image or an ImageLoadError, never
    anything else, and never decodes more than max_pixels."""
    data = encoded(fmt, **FORMATS[fmt])
    assert decode_image(data, "good", max_pixels=10_000).mode == "RGB"
    outcomes = {"decoded": 0, "refused": 0}
    for i, mutated in enumerate(mutations(data, 600, seed=zlib.crc32(fmt.encode()))):
        try:
            image = decode_image(mutated, f"m{i}", max_pixels=1_000_000)
        except ImageLoadError as e:
            assert str(e).startswith(f"image 'm{i}': "), e
            outcomes["refused"] += 1
        else:
            assert image.mode == "RGB" and image.width * image.height <= 1_000_000
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 100, outcomes  # the corruptions do reach the decoder's error paths


def accounted(samples: list):
    """Matcher for :func:`tagged` outputs: every sample comes out once, as original or as failure."""
    ids = sorted(s["id"] for s in samples)

    def check(tagged):
        seen = sorted(sample_id for tag, sample_id in tagged if tag in ("original", "failed"))
        if seen != ids:
            raise BeamAssertException(f"samples not accounted for exactly once: {seen} != {ids}")

    return check


def _tag_good(sample):
    return ("original" if sample["text"] == sample["_orig"] else "generated", sample["id"])


def _tag_failed(record):
    return ("failed", record["sample"]["id"])


def tagged(result):
    """(tag, sample id) for every output of a CaptionResult: 'original', 'generated' or 'failed'."""
    return (
        result.good | "TagGood" >> beam.Map(_tag_good),
        result.failed | "TagFailed" >> beam.Map(_tag_failed),
    ) | "Tagged" >> beam.Flatten()


@pytest.mark.slow
def test_fuzzed_files_through_the_transform_every_sample_accounted(blip_dir, image_dir, tmp_path):
    """Corrupt files of every format, each beside good samples in the same batches: all accounted for, and the
    good samples come out as they do alone."""
    good = [{"id": f"g{i}", "text": IMG, "images": [str(image_dir / f"{c}.jpg")]} for i, c in enumerate(COLOURS)]
    bad = []
    for fmt, kwargs in FORMATS.items():
        for i, mutated in enumerate(mutations(encoded(fmt, **kwargs), 12, seed=7)):
            path = tmp_path / f"{fmt}-{i}.img"
            path.write_bytes(mutated)
            bad.append({"id": f"{fmt}-{i}", "text": IMG, "images": [str(path)]})
    samples = [dict(s, _orig=s["text"]) for s in good + bad]
    random.Random(1).shuffle(samples)
    clean = run_dofn(CaptionConfig(blip_dir, **FAST), [dict(s, _orig=s["text"]) for s in good])
    with TestPipeline() as p:
        result = p | beam.Create(samples) | CaptionImages(blip_dir, gpu_batch_size=4, **FAST).with_exception_handling()
        assert_that(tagged(result), accounted(samples), label="accounted")
        good_out = result.good | beam.Filter(lambda s: s["id"].startswith("g"))
        assert_that(good_out, same_elements(clean["generated"] + clean["original"]), label="good unchanged")


COLOURS = ("red", "green", "blue")


# --- paths that are not regular files ---------------------------------------------------------------------------


def test_a_named_pipe_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="is a named pipe, not an image file"):
        load_image(str(fifo))
    with pytest.raises(ImageLoadError, match="is a named pipe"):
        load_image("pipe.jpg", image_root=str(tmp_path))
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_a_device_is_never_read(tmp_path, device):
    with pytest.raises(ImageLoadError, match="is a character device, not an image file"):
        read_bytes(device)
    os.symlink(device, tmp_path / "dev.jpg")
    with pytest.raises(ImageLoadError, match="refused: the path resolves outside image_root"):
        read_bytes("dev.jpg", image_root=str(tmp_path))


def test_no_source_gives_more_than_max_image_bytes(tmp_path):
    (tmp_path / "big.png").write_bytes(encoded("PNG") + b"\0" * 5000)
    with pytest.raises(ImageLoadError, match="larger than the max_image_bytes limit of 4096 bytes"):
        read_bytes(str(tmp_path / "big.png"), max_bytes=4096)
    with pytest.raises(ImageLoadError, match="larger than the max_image_bytes limit"):
        read_bytes(b"\0" * 5000, max_bytes=4096)
    assert len(read_bytes(str(tmp_path / "big.png"))) > 5000


@pytest.mark.parametrize("ref", ["a\0b.jpg", "/tmp/x\0.png"])
def test_a_path_with_a_nul_character_fails_alone(ref, tmp_path):
    with pytest.raises(ImageLoadError, match="NUL character"):
        read_bytes(ref)
    with pytest.raises(ImageLoadError, match="NUL character"):
        read_bytes(ref.lstrip("/"), image_root=str(tmp_path))


# --- remote reads ----------------------------------------------------------------------------------------------


class _Hostile(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _drip(self, byte: bytes, every: float) -> None:
        """``byte`` every ``every`` seconds until the server stops or the client goes."""
        while not self.server.stop.wait(every):
            try:
                self.wfile.write(byte)
                self.wfile.flush()
            except OSError:
                return

    def do_GET(self):  # noqa: N802 - the http.server API
        stop = self.server.stop
        if self.path == "/endless":  # a body that never ends
            self.send_response(200)
            self.end_headers()
            while not stop.is_set():
                try:
                    self.wfile.write(b"\xff" * 65536)
                except OSError:
                    return
        elif self.path == "/drip":  # a byte every 0.3 s, for ever
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self._drip(b"\x89", 0.3)
        elif self.path == "/huge":  # says so up front
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 30))
            self.end_headers()
        elif self.path == "/drip-headers":  # headers a byte at a time, for ever (each byte within any timeout)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            self._drip(b"a", 0.2)
        elif self.path == "/to-ftp":  # a redirect out of HTTP
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1:1/x.png")
            self.end_headers()
        elif self.path == "/slow-headers":  # never finishes its headers
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.wfile.flush()
            stop.wait(30)
        else:
            body = encoded("PNG")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.fixture(scope="module")
def hostile_server():
    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), _Hostile)
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.stop.set()
    server.shutdown()
    server.server_close()


def test_a_good_download(hostile_server):
    assert load_image(f"{hostile_server}/ok.png").mode == "RGB"
    assert load_image(f"HTTP{hostile_server[4:]}/ok.png").mode == "RGB"  # a scheme in capitals is a URL too


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/endless", "larger than the max_image_bytes limit of 1 MiB"),
        ("/drip", "within 2 s"),
        ("/huge", "over the max_image_bytes limit"),
        ("/slow-headers", "within 2 s"),
    ],
)
def test_a_hostile_server_cannot_hold_or_flood_the_worker(hostile_server, path, reason):
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=reason):
        read_bytes(f"{hostile_server}{path}", max_bytes=1 << 20, download_timeout=2)
    assert time.monotonic() - start < 4  # the deadline is for the whole download, not per socket read


@pytest.mark.parametrize("late", [True, False], ids=["past-the-deadline", "before-it"])
@pytest.mark.parametrize(
    "error", [TimeoutError("timed out"), urllib.error.URLError(TimeoutError("timed out"))], ids=["read", "connect"]
)
def test_a_socket_timeout_reads_as_the_deadline_only_once_it_has_passed(monkeypatch, error, late):
    """The connection's own timeout can beat the caller to the deadline (the caller's thread woke late: 5 times in
    720 on a loaded machine); it then gives the deadline's reason. A timeout before the deadline (the kernel's own
    ETIMEDOUT on connect) keeps its own. The clock and the connection are faked here: no network, no race."""
    now = [1000.0]
    monkeypatch.setattr(images, "time", types.SimpleNamespace(monotonic=lambda: now[0]))  # images' clock only

    class Opener:
        def open(self, url, timeout):
            if late:
                now[0] += timeout
            raise error

    monkeypatch.setattr(images, "_opener", lambda sockets: Opener())
    expected = "no complete answer within 5 s" if late else "cannot download: (TimeoutError|URLError): .*timed out"
    with pytest.raises(ImageLoadError, match=expected):
        images.download("http://example.invalid/x.png", "http://example.invalid/x.png", 1 << 20, 5)


def test_the_body_reader_stops_at_the_deadline():
    with pytest.raises(TimeoutError):
        images._read_bounded(io.BytesIO(b"x" * 100), "ref", 1 << 20, deadline=time.monotonic() - 1)


def _download_threads() -> set:
    return {t for t in threading.enumerate() if t.name == "beamcap-download" and t.is_alive()}


def test_a_download_given_up_leaves_no_thread_or_socket_behind(hostile_server):
    """The caller shuts the connection down at the deadline, so the helper thread ends even while a server drips
    its headers (each byte inside any per-read timeout), and the deadline is kept."""
    before = _download_threads()
    for _ in range(3):
        start = time.monotonic()
        with pytest.raises(ImageLoadError, match="no complete answer within 1 s"):
            read_bytes(f"{hostile_server}/drip-headers", download_timeout=1)
        assert time.monotonic() - start < 1.8
    deadline = time.monotonic() + 3
    while _download_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _download_threads() - before  # (an earlier test's thread may end meanwhile: only new ones count)


def test_a_redirect_out_of_http_is_refused(hostile_server):
    with pytest.raises(ImageLoadError, match="refused a redirect to a non-HTTP URL"):
        read_bytes(f"{hostile_server}/to-ftp", download_timeout=2)


# --- formats, compression, paths in messages ---------------------------------------------------------------------


EPS_LOOP = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n{} loop\n"  # Ghostscript would run it for ever


@pytest.mark.parametrize(
    "data, name",
    [
        (EPS_LOOP, "EPS"),
        (lambda: (b := io.BytesIO(), Image.new("RGB", (64, 64)).save(b, "ICO"), b.getvalue())[-1], "ICO"),
        (lambda: (b := io.BytesIO(), Image.new("RGB", (8, 8)).save(b, "PCX"), b.getvalue())[-1], "PCX"),
    ],
)
def test_formats_outside_the_list_are_refused_by_name(data, name):
    """EPS would run Ghostscript, ICO decodes its pixels before their size can be checked: neither is decoded."""
    data = data() if callable(data) else data
    with pytest.raises(ImageLoadError, match=f"refused: the file is {name}, a format beamcap does not decode"):
        decode_image(data, "x", 10**6)


@pytest.mark.parametrize("fmt", ["BMP", "PPM", "TGA", "MPO", "JPEG2000"])
def test_the_other_listed_formats_still_decode(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 40)).save(buf, fmt)
    image = decode_image(buf.getvalue(), "x", 10**6)
    assert image.size == (24, 16) and image.mode == "RGB"


def test_a_beam_filesystem_file_is_read_as_stored_never_decompressed(tmp_path):
    """A .bz2 of 64 MiB of zeros is a few hundred bytes: read as stored, it is those bytes (Beam's AUTO compression
    would have inflated it past the byte limit before the limit saw a byte)."""
    import bz2

    from beamcap.images import read_filesystem

    path = tmp_path / "bomb.png.bz2"
    path.write_bytes(bz2.compress(bytes(64 << 20)))
    assert read_filesystem("bomb", str(path), 1 << 20) == path.read_bytes()


def test_paths_in_messages_are_one_printable_line(tmp_path):
    with pytest.raises(ImageLoadError) as caught:
        read_bytes("a\nforged log line\x1b[31m.jpg", base_dir=str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and "\\nforged log line\\x1b[31m" in message


# --- memory per call -----------------------------------------------------------------------------------------------


def test_a_sample_with_many_images_holds_at_most_a_call_of_them(blip_dir, image_dir, monkeypatch):
    """Images are decoded call by call: however many a sample names, at most gpu_batch_size are alive at once."""
    import weakref

    import beamcap.samples
    from beamcap.model import Captioner

    alive, peaks = [0], []
    real_load, real_caption = beamcap.samples.load_image, Captioner.caption

    def load(*args, **kwargs):
        image = real_load(*args, **kwargs)
        alive[0] += 1
        weakref.finalize(image, lambda: alive.__setitem__(0, alive[0] - 1))
        return image

    def caption(captioner, images, *args):
        peaks.append(alive[0])
        return real_caption(captioner, images, *args)

    monkeypatch.setattr(beamcap.samples, "load_image", load)
    monkeypatch.setattr(Captioner, "caption", caption)
    refs = [f"{image_dir}/{'./' * i}{c}.jpg" for i in range(3) for c in COLOURS]  # 9 distinct references
    sample = {"text": "<__dj__image>" * len(refs), "images": refs}
    out = run_dofn(CaptionConfig(blip_dir, gpu_batch_size=2, **FAST), [sample])
    assert len(out["generated"]) == 1 and not out["failed"]
    assert len(peaks) == 5 and max(peaks) <= 2, peaks


# --- image_root under races ------------------------------------------------------------------------------------


def test_image_root_holds_while_a_folder_is_swapped_for_a_symlink(tmp_path):
    """A thread inside the root swaps ``sub`` between a real folder and a symlink to a folder outside, as fast as
    it can, while the reader reads ``sub/x.png``: every read is the inside file or a refusal, never the outside
    file, and nothing but ImageLoadError escapes."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    inside_bytes, outside_bytes = encoded("PNG"), encoded("GIF")
    (outside / "x.png").write_bytes(outside_bytes)
    real, link = root / "real", root / "link"
    real.mkdir()
    (real / "x.png").write_bytes(inside_bytes)
    os.symlink(outside, link)
    stop = threading.Event()

    def swap():
        sub = root / "sub"
        while not stop.is_set():
            for target in (real, link):
                tmp = root / "sub.tmp"
                if target is link:
                    os.symlink(outside, tmp)
                else:
                    os.symlink(real, tmp)  # a symlink inside the root is allowed
                os.replace(tmp, sub)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    reads = {"inside": 0, "refused": 0, "missing": 0}
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                data = read_bytes("sub/x.png", image_root=str(root))
            except ImageLoadError as e:
                key = "refused" if "outside image_root" in str(e) else "missing"
                reads[key] += 1
                continue
            assert data != outside_bytes, "read a file outside image_root"
            assert data == inside_bytes
            reads["inside"] += 1
    finally:
        stop.set()
        swapper.join()
        shutil.rmtree(root)
    assert reads["inside"] > 0 and reads["refused"] > 0, reads


# --- samples themselves ----------------------------------------------------------------------------------------


def nested(depth: int):
    value: object = "leaf"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


def test_deeply_nested_and_odd_samples_fail_alone_or_pass(blip_dir, image_dir):
    img = str(image_dir / "red.jpg")
    cycle = {"id": "cycle", "text": IMG, "images": [img]}
    cycle["me"] = cycle
    samples = [
        cycle,
        {"id": "deep", "text": IMG, "images": [img], "extra": nested(500)},
        {"id": "deep-but-ok", "text": IMG, "images": [img], "extra": nested(50)},
        {"id": "int-key", "text": IMG, "images": [img], 3: "an int key"},
        {"id": "images-str", "text": IMG, "images": "red.jpg"},
        {"id": "uncopyable", "text": IMG, "images": [img], "lock": threading.Lock()},
        {"id": "good", "text": IMG, "images": [img]},
    ]
    out = run_dofn(CaptionConfig(blip_dir, seed=3, caption_num=2, **{**FAST, "do_sample": True}), samples, 7)
    failed = {f["sample"]["id"]: f["error"] for f in out["failed"]}
    assert set(failed) == {"cycle", "deep", "images-str", "uncopyable"}, failed
    assert "nested more than 100 levels deep" in failed["deep"] and "nested more than 100" in failed["cycle"]
    assert "must be a list of image references, got str 'red.jpg'" in failed["images-str"]
    assert "cannot make the generated samples: TypeError" in failed["uncopyable"]
    assert sorted(o["id"] for o in out["original"]) == ["deep-but-ok", "good", "int-key"]
    assert sorted(g["id"] for g in out["generated"]) == ["deep-but-ok", "good", "int-key"]


def test_a_prompt_longer_than_the_context_says_so_and_fails_its_samples_alone(blip_dir, image_dir, monkeypatch):
    from beamcap.model import Captioner

    calls = []
    real = Captioner.caption
    monkeypatch.setattr(Captioner, "caption", lambda c, *a: (calls.append(len(a[0])), real(c, *a))[1])
    img = str(image_dir / "red.jpg")
    samples = [{"id": i, "text": IMG, "images": [img], "p": "cat " * 300 if i < 4 else None} for i in range(6)]
    out = run_dofn(CaptionConfig(blip_dir, prompt_key="p", gpu_batch_size=4, **FAST), samples, 6)
    assert sorted(f["sample"]["id"] for f in out["failed"]) == [0, 1, 2, 3]
    assert all("longer than the model's context of 128 positions" in f["error"] for f in out["failed"])
    assert len(out["generated"]) == 2
    assert calls == [4, 2]  # the long prompt's call is not retried in halves: no smaller call can cure it


def test_a_huge_prompt_is_refused_before_tokenizing(blip_dir, image_dir):
    from beamcap.samples import MAX_PROMPT_CHARS, parse

    config = CaptionConfig(blip_dir, prompt_key="p")
    sample = {"text": IMG, "images": [str(image_dir / "red.jpg")], "p": "x" * (MAX_PROMPT_CHARS + 1)}
    assert parse(sample, config).error == (
        f"the prompt is {MAX_PROMPT_CHARS + 1} characters, more than the {MAX_PROMPT_CHARS} beamcap tokenizes (no "
        "image-to-text model's context holds it): shorten it"
    )
    assert parse(dict(sample, p="x" * MAX_PROMPT_CHARS), config).error is None


def test_every_sample_is_accounted_for_whatever_it_is(blip_dir, image_dir, tmp_path):
    """A mixed bag through the transform: each sample comes out once, as original or as failure."""
    os.mkfifo(tmp_path / "fifo.png")
    img = str(image_dir / "red.jpg")
    bag = [
        {"text": IMG, "images": [str(tmp_path / "fifo.png")]},
        {"text": IMG, "images": ["/dev/zero"]},
        {"text": IMG, "images": ["a\0b.png"]},
        {"text": IMG, "images": [img], "extra": nested(300)},
        {"text": IMG, "images": [img], 7: "int key"},
        {"text": IMG, "images": [{"not": "a ref"}]},
        {"text": IMG, "images": [img]},
    ]
    samples = [dict(s, id=i, _orig=s["text"]) for i, s in enumerate(bag)]
    with TestPipeline() as p:
        result = p | beam.Create(samples) | CaptionImages(blip_dir, seed=1, **FAST).with_exception_handling()
        assert_that(tagged(result), accounted(samples))


def test_outputs_are_the_same_with_hostile_batch_mates(blip_dir, image_dir):
    good = [{"id": c, "text": IMG, "images": [str(image_dir / f"{c}.jpg")]} for c in COLOURS]
    alone = run_dofn(CaptionConfig(blip_dir, **FAST), good, 3)
    mixed = run_dofn(CaptionConfig(blip_dir, **FAST), [good[0], {"text": IMG, "images": ["/dev/zero"]}, *good[1:]], 4)
    assert canonical(mixed["generated"]) == canonical(alone["generated"])
    assert len(mixed["failed"]) == 1


def _progressive_jpeg(extra_scans: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rfind(b"\xff\xda") : -2]  # its header and entropy-coded data, up to EOI
    return data[:-2] + last_scan * extra_scans + b"\xff\xd9"


def test_a_jpeg_repeating_a_scan_is_refused_before_decoding():
    from beamcap.images import MAX_JPEG_SCANS, _jpeg_scans

    plain = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(plain, "JPEG")
    assert _jpeg_scans(plain.getvalue(), 1000) == 1
    assert 2 <= _jpeg_scans(_progressive_jpeg(0), 1000) <= 20
    assert decode_image(_progressive_jpeg(0), "p.jpg", 10**6).size == (64, 48)
    bomb = _progressive_jpeg(5000)  # ~100 KB; at 179 Mpx such a file decodes for hours
    assert _jpeg_scans(bomb, MAX_JPEG_SCANS) == MAX_JPEG_SCANS + 1  # counting stops past the limit
    with pytest.raises(ImageLoadError, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode_image(bomb, "bomb.jpg", 10**6)


def test_only_the_first_jpeg_images_scans_count():
    """An MPO's other frames, or JPEGs appended after the first's EOI, are not decoded with it: their scans do not
    count (a 12-frame progressive MPO was refused), nor do markers in fill bytes."""
    from beamcap.images import MAX_JPEG_SCANS, _jpeg_scans

    one = _progressive_jpeg(0)
    scans = _jpeg_scans(one, 1000)
    assert _jpeg_scans(one + one * 200, 1000) == scans
    frames = [Image.new("RGB", (32, 24), (40 * i, 0, 0)) for i in range(12)]
    mpo = io.BytesIO()
    frames[0].save(mpo, "MPO", save_all=True, append_images=frames[1:], progressive=True)
    assert decode_image(mpo.getvalue(), "p.mpo", 10**6).size == (32, 24)
    assert _jpeg_scans(b"\xff\xd8" + b"\xff" * 100_000, MAX_JPEG_SCANS) == 0


def _tiled_tiff(width: int, height: int, tile: int, then: int | None = None) -> bytes:
    """A one-tile, deflated, 8-bit grey TIFF (written by hand: Pillow writes strips); with ``then``, its tile tags
    given a second time with that value."""
    import struct
    import zlib

    data = zlib.compress(bytes(tile * tile), 9)
    entries = [(256, width), (257, height), (258, 8), (259, 8), (262, 1), (277, 1), (322, tile), (323, tile)]
    entries += [] if then is None else [(322, then), (323, then)]
    ifd = [struct.pack("<HHIHH", tag, 3, 1, value, 0) for tag, value in entries]
    offset = 8 + 2 + 12 * (len(ifd) + 2) + 4
    ifd += [struct.pack("<HHII", 324, 4, 1, offset), struct.pack("<HHII", 325, 4, 1, len(data))]
    return b"II*\x00" + struct.pack("<IH", 8, len(ifd)) + b"".join(ifd) + struct.pack("<I", 0) + data


def test_a_tiff_whose_tiles_dwarf_it_is_refused_before_decoding():
    assert decode_image(_tiled_tiff(12, 10, 16), "small.tif", 10**6).size == (12, 10)  # a tile a bit larger: fine
    assert decode_image(_tiled_tiff(200, 200, 512), "gdal.tif", 10**6).size == (200, 200)  # GDAL's tiles: fine
    bomb = _tiled_tiff(1, 1, 8192)  # 66 KB that libtiff inflates to 67 MB (16384 would be 268 MB)
    with pytest.raises(ImageLoadError, match="TIFF tiles of 8192x8192 pixels are far larger than its 1x1"):
        decode_image(bomb, "bomb.tif", 10**9)
    with pytest.raises(ImageLoadError, match="TIFF tiles"):  # over max_pixels, however large the picture
        decode_image(_tiled_tiff(16, 16, 64), "t.tif", 1000)


# --- the job's reader and writer ---------------------------------------------------------------------------------


def test_a_tile_tag_given_twice_counts_at_its_largest():
    """Pillow keeps a repeated tag's last value and libtiff its first: either order is refused."""
    for first, then in ((4096, 16), (16, 4096)):
        with pytest.raises(ImageLoadError, match="TIFF tiles of 4096x4096 pixels"):
            decode_image(_tiled_tiff(1, 1, first, then), "twice.tif", 10**6)


def _shared_tags(tags: int, size: int) -> bytes:
    """A TIFF structure whose first IFD holds ``tags`` UNDEFINED tags, all pointing at one ``size``-byte block."""
    import struct

    block_at = 8 + 2 + 12 * tags + 4
    entries = b"".join(struct.pack("<HHII", 1000 + i, 7, size, block_at) for i in range(tags))
    return b"II*\x00" + struct.pack("<IH", 8, tags) + entries + bytes(4) + b"B" * size


def test_a_tiff_of_too_many_tags_is_refused_without_walking_them_all():
    """A BigTIFF IFD may declare 2**64 tags, and linked IFDs may overlap: the walk stops past MAX_TIFF_TAGS, where
    the IFDs of a 256 MB file could hold a billion entries."""
    import struct

    from beamcap.images import MAX_TIFF_TAGS, tiff_tags

    tags = 200_000
    entries = b"".join(struct.pack("<HHQQ", 1000 + i % 60_000, 3, 1, 0) for i in range(tags))
    data = b"II+\x00" + struct.pack("<HHQQ", 8, 0, 16, tags) + entries + bytes(8)  # BigTIFF, first IFD at 16
    assert tiff_tags(data)[2] == MAX_TIFF_TAGS + 1
    with pytest.raises(ImageLoadError, match=f"holds more than {MAX_TIFF_TAGS} tags"):
        decode_image(data, "many.tif", 10**6)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP", "JPEG"])
def test_tags_sharing_one_value_cannot_claim_memory(fmt):
    """3,000 tags pointing at one 8 KB block: 24 MB for Pillow to copy out of a 45 KB file (with 60,000 tags of
    64 KB, 4 GB out of 800 KB). Refused before Pillow reads them, as a TIFF and as the EXIF of the other formats;
    an honest EXIF (an orientation) still applies."""

    from beamcap.images import TAG_DATA_SLACK, tiff_tags

    bomb = _shared_tags(3000, 8192)
    assert tiff_tags(bomb)[:1] == (3000 * 8192,) and 3000 * 8192 > len(bomb) + TAG_DATA_SLACK
    picture = io.BytesIO()
    if fmt == "TIFF":
        data = bomb  # the tags are read before any pixel, so the file needs none
    elif fmt == "PNG":
        data = _png_with_chunks([(b"eXIf", bomb)], Image.new("RGB", (4, 4), "red"))
    else:  # in a WebP EXIF chunk, or a JPEG APP1 segment (which holds at most 64 KB)
        Image.new("RGB", (4, 4), "red").save(picture, fmt, exif=b"Exif\x00\x00" + bomb)
        data = picture.getvalue()
    with pytest.raises(ImageLoadError, match=r"declares 24576000 bytes of tag values in \d+ bytes"):
        decode_image(data, fmt, 10**6)
    honest, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # rotated: 4x2 stored, 2x4 shown
    Image.new("RGB", (4, 2), "red").save(honest, fmt, exif=exif)
    assert decode_image(honest.getvalue(), "honest", 10**6).size == (2, 4)


@pytest.mark.parametrize(
    "line, lone",
    [
        (rb'{"text": "\ud800"}', "\ud800"),
        (rb'{"\uDFFF": 1}', "\udfff"),  # in a key, upper-case escape
        (rb'{"a": [{"b": "x\udc00y"}]}', "\udc00"),
        (rb'{"text": "\ud83d\ude00"}', None),  # a pair is one character
        (rb'{"text": "\\ud800"}', None),  # an escaped backslash, then plain letters
        (rb'{"text": "caf\u00e9"}', None),
    ],
)
def test_the_reader_finds_a_lone_surrogate_wherever_it_is(line, lone):
    from pipelines.caption import parse_json_line

    value, reason = parse_json_line(line)
    if lone is None:
        assert reason is None and isinstance(value, dict)
    else:
        assert value == line.decode() and reason == f"holds a lone surrogate ({lone!r}), which is not valid Unicode"


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"v": 1e400}', "invalid JSON: the number 1e400 is too large for a float"),
        (b'{"v": [-1.5E+999]}', "invalid JSON: the number -1.5E+999 is too large for a float"),
        (b'{"v": 1e308, "w": 1e-400}', None),  # the largest float, and one that rounds to 0: kept
    ],
)
def test_a_number_too_large_for_a_float_is_refused_not_made_infinite(line, reason):
    """Python reads 1e400 as inf, which the output could only write as null or as non-strict JSON."""
    from pipelines.caption import parse_json_line

    value, problem = parse_json_line(line)
    assert problem == reason
    assert value == (line.decode() if reason else {"v": 1e308, "w": 0.0})


def test_the_writer_writes_any_record_as_one_strict_json_line():
    import datetime
    import decimal
    import json

    from pipelines.caption import to_json_line

    record = {
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "day": datetime.date(2026, 1, 2),
        "price": decimal.Decimal("1.10"),
        "blob": b"abc",
        "nan": float("nan"),
        "tags": {"a"},
    }
    assert json.loads(to_json_line(record)) == {
        "when": "2026-01-02T03:04:05", "day": "2026-01-02", "price": "1.10", "blob": "<3 bytes>", "nan": None,
        "tags": ["a"],
    }  # fmt: skip
    deep: object = "leaf"
    for _ in range(100_000):  # deeper than any stack
        deep = [deep]
    line = to_json_line({"sample": deep, "error": "why"})
    assert "\n" not in line and json.loads(line)["error"].startswith("cannot be written as JSON: RecursionError")
    text = "a\u2028b\u2029c\x85d\u00e9\U0001f600"  # line breaks for str.splitlines; then plain UTF-8
    line = to_json_line({"text": text})
    assert line == '{"text": "a\\u2028b\\u2029c\\u0085d\u00e9\U0001f600"}' and len(line.splitlines()) == 1
    assert json.loads(line) == {"text": text}


def _readable(path):
    from apache_beam.io import fileio
    from apache_beam.io.filesystems import FileSystems

    return fileio.ReadableFile(FileSystems.match([str(path)])[0].metadata_list[0])


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".xz", ".zst", ".deflate"])
def test_numbered_lines_measure_content_not_line_ends(tmp_path, suffix):
    """CRLF or LF, a line exactly at the limit is read and one byte more is not; compressed inputs alike."""
    import bz2
    import gzip
    import lzma
    import zlib

    import zstandard

    from pipelines.caption import numbered_lines

    data = b"abcd\r\n\r\nabcde\r\nabcd\nabcde\nlast"
    compress = {"": bytes, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
                ".zst": zstandard.ZstdCompressor().compress, ".deflate": zlib.compress}[suffix]  # fmt: skip
    path = tmp_path / f"in.jsonl{suffix}"
    path.write_bytes(compress(data))
    assert [(n, line, length) for _, n, line, length in numbered_lines(_readable(path), 4)] == [
        (1, b"abcd", 4),
        (3, b"abcde\r", 6),  # over the limit (its \r counted): ParseRecord fails it
        (4, b"abcd", 4),
        (5, b"abcde", 5),
        (6, b"last", 4),
    ]


@pytest.mark.parametrize("suffix", [".gz", ".deflate", ".zst"])
def test_a_compressed_input_cannot_inflate_past_the_line_limit(tmp_path, suffix, monkeypatch):
    """100 MB of one line, compressed to about 100 KB: read in bounded pieces, never whole (Beam's own reader
    inflates a whole compressed block at once). (Its ratio is about 1,000: the inflation bound is lifted here.)"""
    import gzip
    import tracemalloc
    import zlib

    import zstandard

    from pipelines import caption
    from pipelines.caption import numbered_lines

    monkeypatch.setattr(caption, "MAX_INFLATION", 10**6)
    compress = {".gz": gzip.compress, ".deflate": zlib.compress,
                ".zst": lambda data, level: zstandard.ZstdCompressor(level).compress(data)}[suffix]  # fmt: skip
    path = tmp_path / f"bomb.jsonl{suffix}"
    path.write_bytes(compress(b'{"id": 1}\n' + b"x" * 100_000_000 + b"\n{}\n", 9))
    tracemalloc.start()
    try:
        lines = [(n, length) for _, n, _, length in numbered_lines(_readable(path), 1 << 20)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines == [(1, 9), (2, 100_000_000), (3, 2)]
    assert peak < 20 << 20, peak


def test_a_sample_failing_on_a_later_image_leaves_its_call_whole(blip_dir, image_dir, monkeypatch, caplog):
    """Calls are filled image by image; a sample whose second image fails after its first was taken into the call
    leaves the call (no call is made on an image that is gone, and none is split for it). The call is handed to
    the DoFn as it is (the transform's batching never gives it more images than gpu_batch_size; a caller may)."""
    from apache_beam.transforms.window import GlobalWindows

    from beamcap.dofn import CaptionDoFn
    from beamcap.model import Captioner
    from beamcap.samples import parse

    calls = []
    real = Captioner.caption
    monkeypatch.setattr(Captioner, "caption", lambda c, images, *a: (calls.append(len(images)), real(c, images, *a))[1])
    good = str(image_dir / "red.jpg")
    samples = [
        {"id": "x", "text": IMG, "images": ["/nope/x.jpg"]},
        {"id": "a", "text": IMG + IMG, "images": [good, "/nope/a.jpg"]},
        {"id": "b", "text": IMG, "images": [good]},
    ]
    config = CaptionConfig(blip_dir, gpu_batch_size=2, **FAST)
    dofn = CaptionDoFn(config, handle_failures=True)
    dofn.setup()
    place = GlobalWindows.windowed_value(None)
    call = [parse(sample, config) for sample in samples]
    for work in call:
        work.timestamp, work.window, work.pane = place.timestamp, place.windows[0], place.pane_info
    with caplog.at_level("WARNING", logger="beamcap.isolation"):
        out = list(dofn.process(call))
    failed = {o.value.value["sample"]["id"]: o.value.value["error"] for o in out if getattr(o, "tag", "") == "failed"}
    assert failed == {
        "x": "image '/nope/x.jpg': file not found (images[0])",
        "a": "image '/nope/a.jpg': file not found (images[1])",
    }
    generated = [o.value for o in out if not hasattr(o, "tag")]
    assert [g["id"] for g in generated] == ["b"] and calls == [1]
    split = [r.getMessage() for r in caplog.records if r.name == "beamcap.isolation"]
    assert not split, split


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst", ".deflate"])
def test_an_empty_or_truncated_compressed_input_says_where_it_ends(tmp_path, suffix):
    """Empty: no lines, as Beam reads it. Truncated: its whole lines, then a failure record naming the file and the
    line it could not read (Beam's reader drops the rest silently, or stops the job)."""
    import bz2
    import gzip
    import lzma
    import zlib

    import zstandard

    from pipelines.caption import ParseRecord, numbered_lines

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".deflate": zlib.compress,
                ".zst": zstandard.ZstdCompressor(write_content_size=False).compress}[suffix]  # fmt: skip
    empty = tmp_path / f"empty.jsonl{suffix}"
    empty.write_bytes(b"")
    assert list(numbered_lines(_readable(empty))) == []
    data = compress(b"".join(b'{"id": %d}\n' % i for i in range(20_000)))
    cut = tmp_path / f"cut.jsonl{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    *lines, last = numbered_lines(_readable(cut))
    assert [n for _, n, _, _ in lines] == list(range(1, len(lines) + 1))
    assert last[1] == len(lines) + 1 and last[2].startswith(b"cannot read on: ")
    (record,) = [o.value for o in ParseRecord().process(last)]
    assert record["sample"] == "" and record["error"].startswith(f"{cut}:{len(lines) + 1}: cannot read on: ")


def test_an_xz_or_lzma_input_cannot_ask_for_gigabytes_and_its_streams_are_read_whole(tmp_path):
    """An .lzma header may claim a 4 GiB dictionary (Python's LZMAFile would allocate it): over 128 MiB is refused.
    Streams one after another, with xz's zero padding, read as one; bytes after the last stream are reported."""
    import lzma
    import struct

    from pipelines.caption import MAX_XZ_STREAMS, XZ_MAGIC, numbered_lines

    second = lzma.compress(b'{"id": 2}\n' * 50)  # a real second stream, corrupt past its header: its own error
    zero_props = [{"id": lzma.FILTER_LZMA1, "lc": 0, "lp": 0, "pb": 0}]  # a .lzma file whose first byte is 0
    claim = bytearray(lzma.compress(b'{"id": 1}\n', format=lzma.FORMAT_ALONE))
    claim[1:5] = struct.pack("<I", 1 << 30)  # the dictionary size in the header: the stream stays valid
    cases = {
        "claim.jsonl.lzma": bytes(claim),
        "streams.jsonl.xz": lzma.compress(b'{"id": 1}\n') + bytes(8) + lzma.compress(b'{"id": 2}\n') + bytes(4),
        "tail.jsonl.xz": lzma.compress(b'{"id": 1}\n') + b"not a stream",
        "junk.jsonl.xz": b"not a stream at all",
        "newline.jsonl.xz": lzma.compress(b'{"id": 1}\n') + b"\n",  # not a cut: a stray byte after the end
        "corrupt.jsonl.xz": lzma.compress(b'{"id": 1}\n') + second[:20] + b"\x55" * 8 + second[28:],
        "zero-props.jsonl.lzma": lzma.compress(b'{"id": 1}\n', format=lzma.FORMAT_ALONE, filters=zero_props),
        "zeros.jsonl.xz": bytes(64),
        "cut-magic.jsonl.xz": lzma.compress(b'{"id": 1}\n') + XZ_MAGIC[:3],
        "alone-tail.jsonl.lzma": lzma.compress(b'{"id": 1}\n', format=lzma.FORMAT_ALONE) + b"junk",
        "many.jsonl.xz": lzma.compress(b'{"id": 1}\n') + lzma.compress(b"") * MAX_XZ_STREAMS,
    }
    read = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        read[name] = [
            (n, line if length < 0 else length) for _, n, line, length in numbered_lines(_readable(tmp_path / name))
        ]
    assert read == {
        "claim.jsonl.lzma": [(1, b"cannot read on: LZMAError: Memory usage limit exceeded")],
        "streams.jsonl.xz": [(1, 9), (2, 9)],
        "junk.jsonl.xz": [(1, b"cannot read on: LZMAError: Input format not supported by decoder")],
        "tail.jsonl.xz": [
            (1, 9),
            (2, b"cannot read on: LZMAError: bytes after the last xz stream are not a stream: b'not a stream'"),
        ],
        "newline.jsonl.xz": [
            (1, 9),
            (2, b"cannot read on: LZMAError: bytes after the last xz stream are not a stream: b'\\n'"),
        ],
        "corrupt.jsonl.xz": [(1, 9), (2, b"cannot read on: LZMAError: Corrupt input data")],
        "zero-props.jsonl.lzma": [(1, 9)],
        "zeros.jsonl.xz": [  # 13 zero bytes are an empty .lzma stream (no properties, a size of 0)
            (
                1,
                b"cannot read on: LZMAError: bytes after the last .lzma stream are not a stream: "
                + repr(bytes(16)).encode(),
            )
        ],
        "cut-magic.jsonl.xz": [
            (1, 9),
            (2, b"cannot read on: EOFError: the compressed file ended inside the header of its next stream"),
        ],
        "alone-tail.jsonl.lzma": [
            (1, 9),
            (2, b"cannot read on: LZMAError: bytes after the last .lzma stream are not a stream: b'junk'"),
        ],
        "many.jsonl.xz": [(1, 9), (2, b"cannot read on: LZMAError: the file holds more than 10000 xz streams")],
    }


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst", ".deflate"])
def test_a_compressed_input_inflating_a_thousandfold_is_read_no_further(tmp_path, suffix):
    """2 MB of one repeated line compresses to a few hundred bytes in bzip2, xz and zstd: past 1,000 times its size
    (or 1 MiB) the rest is one failure record, where a bzip2 file of 238 bytes made 3 million records. Ordinary
    lines, compressed some tens of times, are read whole."""
    import bz2
    import gzip
    import lzma
    import zlib

    import zstandard

    from pipelines import caption

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".deflate": zlib.compress,
                ".zst": zstandard.ZstdCompressor().compress}[suffix]  # fmt: skip
    bomb = tmp_path / f"bomb.jsonl{suffix}"
    bomb.write_bytes(compress(b'{"id": 1}\n' * 200_000))
    *lines, last = caption.numbered_lines(_readable(bomb))
    if suffix in (".gz", ".deflate"):  # deflate cannot inflate past about 1,030 times: here some 500 times
        assert len(lines) + 1 == 200_000 and last[3] > 0
    else:
        assert 0 < len(lines) < 200_000 * 2 // 3 and last[3] < 0, (len(lines), last)
        assert last[2].startswith(b"cannot read on: InflationError: it inflates past 1000 times its "), last
    rows = b"".join(b'{"id": %d, "text": "sample %d of many"}\n' % (i, i * 7919 % 100_003) for i in range(60_000))
    plain = tmp_path / f"plain.jsonl{suffix}"
    plain.write_bytes(compress(rows))
    assert sum(1 for _ in caption.numbered_lines(_readable(plain))) == 60_000


def test_a_deflate_input_of_several_streams_or_a_tail_is_read_whole_then_reported(tmp_path):
    """Streams one after another, each inflating past one read: all read, in order (zlib leaves the next stream's
    bytes in the ended stream's unconsumed_tail too; fed back to it, the reader looped forever). A tail that is not
    a stream is one failure record."""
    import zlib

    from pipelines.caption import numbered_lines

    first = b"".join(b'{"id": %d}\n' % i for i in range(150_000))  # 1.7 MB: several reads
    second = b"".join(b'{"id": %d}\n' % i for i in range(150_000, 160_000))
    streams = tmp_path / "streams.jsonl.deflate"
    streams.write_bytes(zlib.compress(first) + zlib.compress(second))
    assert [line for _, _, line, _ in numbered_lines(_readable(streams))] == (first + second).splitlines()
    tail = tmp_path / "tail.jsonl.deflate"
    tail.write_bytes(zlib.compress(first) + b"JUNK")
    *lines, last = numbered_lines(_readable(tail))
    assert len(lines) == 150_000 and last[3] < 0 and last[2].startswith(b"cannot read on: "), last


def test_a_zst_input_of_many_frames_is_read_whole_and_a_cut_in_any_frame_is_reported(tmp_path):
    """Frames one after another (as pzstd and appending writers make them), skippable ones among them, read as one
    stream; a cut inside the last frame, or right after a skippable frame's header, is reported, not lost."""
    import zstandard

    from pipelines.caption import numbered_lines

    frame = zstandard.ZstdCompressor().compress
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"
    data = skippable + frame(b'{"id": 1}\n{"id": 2}\n') + skippable + frame(b"") + frame(b'{"id": 3}\n')
    whole = tmp_path / "frames.jsonl.zst"
    whole.write_bytes(data)
    assert [line for _, _, line, _ in numbered_lines(_readable(whole))] == [b'{"id": 1}', b'{"id": 2}', b'{"id": 3}']
    for cut, lines in ((len(data) - 4, 2), (len(skippable) - 2, 0)):
        path = tmp_path / f"cut{cut}.jsonl.zst"
        path.write_bytes(data[:cut])
        *read, last = numbered_lines(_readable(path))
        assert len(read) == lines and last[3] < 0 and last[2].startswith(b"cannot read on: "), (cut, read, last)
    big = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(window_log=30)).compressobj()
    wide = tmp_path / "wide.jsonl.zst"  # a frame asking for a 1 GiB window: refused, not given the memory
    wide.write_bytes(big.compress(b'{"id": 1}\n') + big.flush())
    (entry,) = numbered_lines(_readable(wide))
    assert entry[3] < 0 and b"Frame requires too much memory" in entry[2], entry


def test_parquet_rows_are_read_one_at_a_time_and_oversized_row_groups_are_skipped(tmp_path, monkeypatch):
    """400 rows of one 1 MiB string, dictionary-encoded into a 1 MB file: Beam's reader expanded all of them at
    once (~420 MB); here Arrow never holds more than a few rows. A row group whose column is over the bound is
    skipped with one entry; the next group is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import caption

    path = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"text": ["y" * (1 << 20)] * 400, "images": [[]] * 400}), path, use_dictionary=True)
    assert path.stat().st_size < 2 << 20
    peak, numbers = 0, []
    with open(path, "rb") as f:
        for number, row, problem in caption.parquet_rows(f, 2 << 20):
            assert problem is None and len(row["text"]) == 1 << 20
            peak = max(peak, pa.total_allocated_bytes())
            numbers.append(number)
            del row
    assert numbers == list(range(1, 401)) and peak < 40 << 20, peak

    grouped = tmp_path / "groups.parquet"
    table = pa.table({"text": ["a" * 5000, "b", "c"], "images": [[], [], []]})
    pq.write_table(table, grouped, row_group_size=1, use_dictionary=False, compression="none")
    monkeypatch.setattr(caption, "PARQUET_GROUP_BOUND", 1)
    with open(grouped, "rb") as f:
        entries = list(caption.parquet_rows(f, 1000))
    assert [(n, r) for n, r, p in entries if p is None] == [
        (2, {"text": "b", "images": []}),
        (3, {"text": "c", "images": []}),
    ]
    ((number, row, problem),) = [e for e in entries if e[2] is not None]
    assert number == 1 and row == "" and problem.startswith("row group 0 (rows 1-1) holds ")


def test_parquet_rows_of_many_tiny_values_are_refused_before_python_holds_them(tmp_path):
    """A list of nulls costs Arrow next to nothing (an 800-byte file can declare ten million of them) but Python 8
    bytes each: a row is held to the values a line of --max_line_bytes could hold, a row group to 16 times that."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import caption

    path = tmp_path / "nulls.parquet"
    nulls = pa.array([[None] * 3000, [None], [None] * 100_000], pa.list_(pa.null()))
    table = pa.table({"images": [[], [], []], "junk": nulls})
    pq.write_table(table, path, row_group_size=1)
    assert path.stat().st_size < 4000
    with open(path, "rb") as f:
        entries = list(caption.parquet_rows(f, 1000))
    assert [(n, r) for n, r, p in entries if p is None] == [(2, {"images": [], "junk": [None]})]
    (row_1, row_3) = [(n, p) for n, r, p in entries if p is not None]
    assert row_1 == (1, "the row holds 3002 values, more than a line of --max_line_bytes (1000) could (500)")
    assert row_3[0] == 3 and row_3[1].startswith("row group 2 (rows 3-3) holds ") and "100001 values" in row_3[1]


# --- files whose header costs far more to read than their size ---------------------------------------------------


def _jpeg_with_segment(marker: int, payload: bytes) -> bytes:
    import struct

    picture = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(picture, "JPEG")
    jpeg = picture.getvalue()
    return jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _shared_value_tags(tags: int, count: int, size: int) -> bytes:
    """A big-endian TIFF block of ``size`` bytes whose ``tags`` SHORT tags each hold ``count`` values at offset 8."""
    import struct

    block = b"MM\x00\x2a" + struct.pack(">IH", 8, tags)
    block += b"".join(struct.pack(">HHII", 0x1000 + i, 3, count, 8) for i in range(tags)) + bytes(4)
    assert 8 + 2 * count <= size  # the values lie inside the block, so Pillow reads them
    return block + bytes(size - len(block))


@pytest.mark.parametrize("before", [b"", b"\xff\xd9", b"\xff\xc8", b"\xff\xfd", b"junk\xff\xff"])
def test_a_jpegs_mpf_block_sharing_one_value_is_refused_before_pillow_reads_it(before):
    """Pillow parses a JPEG's MPF (APP2) block while opening it, every tag into Python ints: 1,000 tags of 31,000
    SHORTs at one offset of a 64 KB block take about 1 GB. Refused from the bytes, before opening, walking the header
    as Pillow does (an EOI, markers without a segment, junk and fill before the block do not hide it); an honest
    MPO still decodes (test_the_other_listed_formats_still_decode)."""
    from beamcap.images import TAG_DATA_SLACK, tiff_tags

    block = _shared_value_tags(1000, 31000, 64000)
    assert tiff_tags(block)[0] == 1000 * 31000 * 2 > len(block) + TAG_DATA_SLACK
    data = _jpeg_with_segment(0xE2, b"MPF\x00" + block)
    data = data[:2] + before + data[2:]
    with pytest.raises(ImageLoadError, match=r"refused: its MPF declares 62000000 bytes of tag values"):
        decode_image(data, "mpf.jpg", 10**6)


def test_a_jpegs_exif_split_over_segments_is_checked_joined():
    """Pillow joins every Exif APP1 segment into one block (and reads it while opening): the tags in a second
    segment, after the header in the first, are counted with it."""
    import struct

    from beamcap.images import _too_costly_to_open

    block = _shared_value_tags(2000, 10000, 24100)
    first, second = _jpeg_with_segment(0xE1, b"Exif\x00\x00" + block[:10]), b"Exif\x00\x00" + block[10:]
    end = 2 + 4 + 6 + 10  # SOI, then the first APP1: marker, length, prefix, the TIFF header and the tag count
    data = first[:end] + b"\xff\xe1" + struct.pack(">H", len(second) + 2) + second + first[end:]
    reason = "its EXIF declares 40000000 bytes of tag values"
    assert _too_costly_to_open(data).startswith(reason)  # before Image.open, which reads it (121 MB for 2,000 tags)
    with pytest.raises(ImageLoadError, match=f"refused: {reason}"):
        decode_image(data, "split.jpg", 10**6)


def _segment(marker: int, payload: bytes) -> bytes:
    import struct

    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


@pytest.mark.parametrize(
    "flood",
    [
        _segment(0xE1, b"Exif\x00\x00" + b"A" * 10) * 5_000,  # Pillow joins them by copying: quadratic
        _segment(0xC0, bytes(60_000)),  # a tuple for every 3 bytes of a frame header
        _segment(0xE0, b"") * 10_001,  # Pillow lists every segment
        b"\xff" * 10_001,  # fill, a byte at a time
        b"\x00" * 10_001,  # junk, a byte at a time
    ],
    ids=["exif-segments", "frame-header", "segments", "fill", "junk"],
)
def test_a_jpeg_header_that_pillow_would_read_for_minutes_is_refused_unread(flood):
    """Pillow reads a JPEG's header (to its first scan) marker by marker in Python, keeps what each holds and joins
    EXIF segments by copying (8 MB of small EXIF segments took 32 s, 15 MB of frame headers 610 MB): past 10,000
    steps the file is refused before opening. The markers after the header are bounded the same way."""
    from beamcap.images import MAX_JPEG_HEADER_STEPS

    picture = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(picture, "JPEG")
    jpeg = picture.getvalue()
    with pytest.raises(ImageLoadError, match=f"the JPEG header takes more than {MAX_JPEG_HEADER_STEPS} steps"):
        decode_image(jpeg[:2] + flood + jpeg[2:], "flood.jpg", 10**6)
    after = jpeg[:-2] + b"\xff\x01" * (MAX_JPEG_HEADER_STEPS + 1) + jpeg[-2:]  # markers after the header
    with pytest.raises(ImageLoadError, match=f"more than {MAX_JPEG_HEADER_STEPS} markers in its first picture"):
        decode_image(after, "markers.jpg", 10**6)


def _gif(comment_blocks: list[bytes]) -> bytes:
    """A 1x1 GIF with these extension blocks (label and sub-blocks) before its picture."""
    import struct

    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    picture = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00;"
    return header + b"".join(comment_blocks) + picture


def test_a_gif_of_masses_of_comments_or_blocks_is_refused_unread():
    """Pillow joins GIF comments by copying (5 MB of comments took a minute, quadratic) and reads extensions,
    sub-blocks and junk one by one in Python: past 64 KiB of comments or 100,000 blocks before the first picture,
    the file is refused. The blocks are walked as Pillow walks them: an extension whose first sub-block is empty
    reads on to the next terminator, so a ',' there is data, not the picture."""
    from beamcap.images import MAX_GIF_BLOCKS, MAX_GIF_COMMENT_BYTES, _gif_preamble

    long_comment = b"!\xfe" + (b"\xff" + b"x" * 255) * 300 + b"\x00"  # 76,500 bytes in one comment
    honest = _gif([b"!\xfe\x0cmade by hand\x00", b"!\xf9\x04\x00\x00\x00\x00\x00"])
    assert _gif_preamble(honest) == (13, 4)  # the comment and its end, the control block and its end
    assert decode_image(honest, "honest.gif", 10**6).size == (1, 1)
    for name, blocks in {
        "long": [long_comment],
        "hidden": [b"!\xf9\x00\x01,\x00", long_comment],
        "many": [b"!\xfe\x01x\x00"] * 40_000,
    }.items():
        with pytest.raises(ImageLoadError, match=f"more than {MAX_GIF_COMMENT_BYTES} bytes of comments"):
            decode_image(_gif(blocks), name, 10**6)
    for name, blocks in {
        "controls": [b"!\xf9\x04\x00\x00\x00\x00\x00"] * (MAX_GIF_BLOCKS // 2 + 1),
        "sub-blocks": [b"!\x01" + b"\x01x" * MAX_GIF_BLOCKS + b"\x00"],
        "junk": [b"\x00" * (MAX_GIF_BLOCKS + 1)],  # Pillow skips junk bytes one at a time
    }.items():
        with pytest.raises(ImageLoadError, match=f"more than {MAX_GIF_BLOCKS} blocks"):
            decode_image(_gif(blocks), name, 10**6)
    no_picture = _gif([])[:13] + b"\x00" * (MAX_GIF_BLOCKS + 1)  # junk to the end, no picture at all
    with pytest.raises(ImageLoadError, match=f"more than {MAX_GIF_BLOCKS} blocks"):
        decode_image(no_picture, "no-picture.gif", 10**6)


def test_pnm_files_that_pillow_would_read_for_minutes_are_refused_unread():
    """Pillow reads a PNM header a byte at a time and decodes plain (ASCII) PBM/PGM/PPM in Python, at about 1 MB a
    second, copying its buffer once per comment (1 MB of comments took 20 s): a header over 64 KiB, a file
    decoded in Python (plain, or binary of a maximum value other than 255) over 16 MiB, a plain file of over 1,000
    comments is refused; honest ones decode, '#' banners and all."""
    from beamcap.images import MAX_PLAIN_PNM_COMMENTS, MAX_PNM_HEADER_BYTES, MAX_SLOW_PNM_BYTES

    banners = b"P2\n" + b"#" * 60 + b"\n" + b"# made by hand #########\n" * 29 + b"2 1\n255\n0 255\n"
    assert decode_image(banners, "banners.pgm", 10**6).size == (2, 1)
    commented = b"P1\n1 1\n" + b"#\n" * (MAX_PLAIN_PNM_COMMENTS + 1) + b"0\n"
    with pytest.raises(ImageLoadError, match=f"more than {MAX_PLAIN_PNM_COMMENTS} comments"):
        decode_image(commented, "comments.pbm", 10**6)
    big = b"P2\n2048 4096\n255\n" + b"0 " * (MAX_SLOW_PNM_BYTES // 2)
    with pytest.raises(ImageLoadError, match=f"decodes in Python .* of {len(big)} bytes, over {MAX_SLOW_PNM_BYTES}"):
        decode_image(big, "big.pgm", 10**8)
    odd_maxval = b"P5\n4096 4097\n254\n" + bytes(4096 * 4097)  # binary, but not 255: Pillow's Python decoder
    with pytest.raises(ImageLoadError, match="maximum value b'254'"):
        decode_image(odd_maxval, "254.pgm", 10**8)
    deep = b"P5\n4096 4097\n65535\n" + bytes(2 * 4096 * 4097)  # 16-bit PGM: decoded in C
    assert decode_image(deep, "deep.pgm", 10**8).size == (4096, 4097)
    binary = io.BytesIO()
    Image.new("L", (8, 4), 9).save(binary, "PPM")  # P5: its pixels are decoded in C, at any size
    assert decode_image(binary.getvalue(), "ok.pgm", 10**6).size == (8, 4)
    long_header = b"P5\n" + b"# padding\n" * 7000 + binary.getvalue()[3:]
    with pytest.raises(ImageLoadError, match=f"its PNM header is over {MAX_PNM_HEADER_BYTES} bytes long"):
        decode_image(long_header, "header.pgm", 10**6)
    for name, header in {
        "blanks": b"P6\n8" + b" " * 16_000_000 + b"4\n255\n",  # looked at only up to the limit (regexes keep state)
        "cmyk": b"P0CMYK 1 1\n#" + b"x" * (MAX_PNM_HEADER_BYTES + 1) + b"\n255\n",  # a six-byte magic
    }.items():
        with pytest.raises(ImageLoadError, match="its PNM header is over"):
            decode_image(header + bytes(96), name, 10**6)


def test_an_image_far_longer_than_wide_is_refused_and_fails_alone_on_an_upscaling_processor(tmp_path, image_dir):
    """A 1x200000 PNG of 862 bytes: GIT's CLIP processor scales its short side up to the crop size, the long one
    with it, so the one image ran out of memory alone and failed the bundle. Refused from its header instead;
    an aspect ratio of 100:1 is still decoded, and max_aspect_ratio raises the limit (for BLIP's fixed square)."""
    from beamcap.images import DEFAULT_MAX_ASPECT_RATIO as MAX_ASPECT_RATIO
    from beamcap.testing.models import build_git

    Image.new("RGB", (1, 200_000)).save(tmp_path / "thin.png")
    Image.new("RGB", (MAX_ASPECT_RATIO * 20, 20), "blue").save(tmp_path / "wide.png")
    with pytest.raises(ImageLoadError, match="1x200000 pixels is an aspect ratio over the max_aspect_ratio limit"):
        load_image(str(tmp_path / "thin.png"))
    assert load_image(str(tmp_path / "thin.png"), max_aspect_ratio=200_000).size == (1, 200_000)
    assert load_image(str(tmp_path / "wide.png")).size == (MAX_ASPECT_RATIO * 20, 20)
    git = build_git(str(tmp_path / "git"))
    good = [{"id": c, "text": IMG, "images": [str(image_dir / f"{c}.jpg")]} for c in COLOURS]
    samples = [*good[:2], {"id": "thin", "text": IMG, "images": [str(tmp_path / "thin.png")]}, good[2]]
    out = run_dofn(CaptionConfig(git, **FAST), samples, 4)
    alone = run_dofn(CaptionConfig(git, **FAST), good, 3)
    assert canonical(out["generated"]) == canonical(alone["generated"])
    (failed,) = out["failed"]
    assert failed["sample"]["id"] == "thin" and "aspect ratio over" in failed["error"]


def test_image_root_refuses_a_descriptor_that_is_no_file(tmp_path):
    """/proc/self/fd/N of a pipe resolves to 'pipe:[...]', not a path: refused as outside the root (it raised
    ValueError from os.path.commonpath)."""
    read_end, write_end = os.pipe()
    (tmp_path / "p.jpg").symlink_to(f"/proc/self/fd/{read_end}")  # a name under the root, opening the pipe
    try:
        with pytest.raises(ImageLoadError, match="resolves outside image_root"):
            read_bytes(str(tmp_path / "p.jpg"), str(tmp_path), None, 1 << 20, 1.0)
    finally:
        os.close(read_end)
        os.close(write_end)


def _tiff_listing_strips(n: int) -> bytes:
    """An 8x8 uncompressed RGB TIFF whose StripOffsets and StripByteCounts list ``n`` strips, all of the same 24
    bytes: every number is in the file (nothing is shared), but Pillow makes an object of each."""
    pixels, entries = b"\x80" * 24, 9
    ifd_at = 8 + len(pixels)
    bits_at = ifd_at + 2 + 12 * entries + 4
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * n

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")

    short = lambda v: struct.pack("<H", v)  # noqa: E731
    tags = [entry(256, 3, 1, short(8)), entry(257, 3, 1, short(8)), entry(258, 3, 3, struct.pack("<I", bits_at)),
            entry(259, 3, 1, short(1)), entry(262, 3, 1, short(2)), entry(273, 4, n, struct.pack("<I", offsets_at)),
            entry(277, 3, 1, short(3)), entry(278, 3, 1, short(1)), entry(279, 4, n, struct.pack("<I", counts_at))]  # fmt: skip
    return (
        b"II*\0" + struct.pack("<I", ifd_at) + pixels + struct.pack("<H", entries) + b"".join(tags)
        + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + struct.pack("<I", 8) * n + struct.pack("<I", 24) * n
    )  # fmt: skip


def test_a_tiff_listing_millions_of_strips_is_refused_before_pillow_reads_them():
    """33 million strip offsets (264 MB) took Pillow over 8 GB to open; the numbers are counted first."""
    from beamcap.images import MAX_TIFF_VALUES

    assert decode_image(_tiff_listing_strips(8), "few", max_pixels=10_000).size == (8, 8)
    with pytest.raises(ImageLoadError, match=rf"tags list \d+ numbers, over {MAX_TIFF_VALUES}"):
        decode_image(_tiff_listing_strips(MAX_TIFF_VALUES // 2 + 1), "many", max_pixels=10_000)


def _png_with_chunks(chunks: list[tuple[bytes, bytes]], image: Image.Image | None = None, **save) -> bytes:
    """A small PNG with ``(type, body)`` chunks put right after its header."""
    buf = io.BytesIO()
    (image or Image.new("RGB", (8, 8), (200, 30, 30))).save(buf, format="PNG", **save)
    png, header_end = buf.getvalue(), 8 + 8 + 13 + 4
    extra = b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks
    )
    return png[:header_end] + extra + png[header_end:]


def _raw_profile_exif(block: bytes) -> tuple[bytes, bytes]:
    """A tEXt chunk holding an EXIF block as ImageMagick writes it (hex after three header lines)."""
    return b"tEXt", b"Raw profile type exif\0\nexif\n" + str(len(block)).encode() + b"\n" + block.hex().encode()


def test_exif_in_a_png_text_chunk_is_checked_and_applied():
    """Pillow also reads a PNG's EXIF from a 'Raw profile type exif' text chunk; 3,000 tags sharing one 8 MB block
    there took an 8 GB job down. Honest EXIF there still turns the picture."""
    turn = Image.Exif()
    turn[0x0112] = 6  # rotate 90 degrees
    upright = _png_with_chunks([_raw_profile_exif(turn.tobytes())], Image.new("RGB", (20, 10)))
    assert decode_image(upright, "turned", max_pixels=10_000).size == (10, 20)
    with pytest.raises(ImageLoadError, match="its EXIF declares 60000000 bytes of tag values"):
        decode_image(_png_with_chunks([_raw_profile_exif(_shared_tags(300, 200_000))]), "bomb", max_pixels=10_000)


def test_png_chunk_floods_and_extra_icc_profiles_are_refused_unread():
    """21 million empty private chunks took 56 s and 2.8 GB to open; 30,000 ICC profiles of 1 KB, each inflated
    to 1 MiB, 70 s. One profile, and a few private chunks, are fine."""
    from beamcap.images import MAX_PNG_CHUNKS

    profile = zlib.compress(b"\0" * ((1 << 20) - 1), 9)
    fine = _png_with_chunks([(b"prIv", b"")] * 10, icc_profile=b"\0" * 200)
    assert decode_image(fine, "fine", max_pixels=10_000).size == (8, 8)
    with pytest.raises(ImageLoadError, match=f"more than {MAX_PNG_CHUNKS} chunks besides its picture data"):
        decode_image(_png_with_chunks([(b"prIv", b"")] * (MAX_PNG_CHUNKS + 1)), "flood", max_pixels=10_000)
    with pytest.raises(ImageLoadError, match="holds 3 ICC profiles"):
        decode_image(_png_with_chunks([(b"iCCP", b"icc\0\0" + profile)] * 3), "profiles", max_pixels=10_000)
    # Pillow's 64 MiB text budget skips a zTXt of empty keyword: 65,536 of them would inflate 64 GiB
    some = _png_with_chunks([(b"zTXt", b"\0\0" + profile)] * 4)
    assert decode_image(some, "some text", max_pixels=10_000).size == (8, 8)
    with pytest.raises(ImageLoadError, match="holds 65 compressed text chunks"):
        decode_image(_png_with_chunks([(b"zTXt", b"\0\0" + profile)] * 65), "text", max_pixels=10_000)
    frames = [(b"fdAT", b"")] * (MAX_PNG_CHUNKS + 1)  # an animation's frame data counts as picture data
    assert "besides" not in (images._too_costly_to_open(_png_with_chunks(frames)) or "")

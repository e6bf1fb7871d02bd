"""What the project defends against, one test per bad input a new user may bring.

Images (decoded as a viewer shows them; `ldm_pipeline.data.datasets.to_rgb` and `preprocess_image`):
16-bit and float grey levels, EXIF orientation, transparency, extreme aspect ratios, decompression bombs.
Metadata (`--train_data_dir` imagefolders): null or missing captions, missing file names, non-UTF-8 files,
malformed or non-object JSON lines, Excel CSV (byte-order mark, CRLF), unquoted commas, list captions.
Unreadable images: found where decoded, named, or skipped with --skip_bad_images (deterministic replacement,
counted across DataLoader workers). `ldm-generate`, `ldm-eval`'s sampling flags and `ldm-export-shapes`: flags
checked before any work, one line per error.
"""

import io
import json
import logging
import os
import re
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_pipeline.cli_eval import main as eval_main
from ldm_pipeline.cli_generate import build_parser, generate
from ldm_pipeline.cli_generate import main as generate_main
from ldm_pipeline.config import data_config_from_argv
from ldm_pipeline.data import build_dataset, collate_examples, dataset_captions, preprocess_image
from ldm_pipeline.data.datasets import image_to_tensor, to_rgb
from ldm_pipeline.data.export import main as export_main
from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline
from conftest import make_tiny_pipeline
from test_streaming import encode, shapes_shards, write_shard


def folder_args(root, *extra):
    return data_config_from_argv(["--resolution", "8", "--train_data_dir", str(root), "--num_validation_samples", "1",
                                  *extra])


def random_rgb(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_imagefolder(root, num_images=6, metadata_lines=None, images=None):
    """``num_images`` random 8x8 PNGs and a metadata.jsonl (``metadata_lines`` replaces the generated lines)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        (images or {}).get(i, random_rgb(8, 8, seed=i)).save(root / f"img_{i}.png")
    lines = metadata_lines or [json.dumps({"file_name": f"img_{i}.png", "text": f"caption {i}"}) for i in range(num_images)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def passes_verify_but_fails_to_decode(image: Image.Image) -> bytes:
    """PNG bytes whose chunk CRCs are right (so ``Image.verify()`` passes) but whose pixel data is not zlib."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4:start])[0]
    payload = b"\x78\x9c" + b"\xff" * (length - 2)
    return data[:start + 4] + payload + struct.pack(">I", zlib.crc32(b"IDAT" + payload)) + data[start + 8 + length:]


def resize_then_crop(image, resolution, random_crop=False):
    """The preprocessing before crop-then-resize: resize the whole image, then crop (reference)."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC) if min(width, height) != resolution else image
    if random_crop:
        left = int(torch.randint(0, size[0] - resolution + 1, ()).item())
        top = int(torch.randint(0, size[1] - resolution + 1, ()).item())
    else:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution))).astype(int)


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(int)


# ------------------------------------------------------------------------------------------ image decoding


@pytest.mark.parametrize("kind", ["png I;16", "tiff I;16B", "I (32-bit)", "tiff F"])
def test_high_bit_depth_grey_is_scaled_not_clipped(tmp_path, kind):
    levels = np.random.default_rng(0).integers(0, 65536, (12, 10)).astype(np.uint16)
    levels[0, :3] = (0, 257, 65535)
    if kind == "png I;16":
        Image.fromarray(levels).save(tmp_path / "x.png")
        image = Image.open(tmp_path / "x.png")
    elif kind == "tiff I;16B":
        Image.fromarray(levels.astype(">u2")).save(tmp_path / "x.tiff")
        image = Image.open(tmp_path / "x.tiff")
    elif kind == "I (32-bit)":
        image = Image.fromarray(levels.astype(np.int32))
    else:
        Image.fromarray((levels / 65535).astype(np.float32)).save(tmp_path / "x.tiff")
        image = Image.open(tmp_path / "x.tiff")
    expected = np.rint(levels / 65535 * 255)
    decoded = np.asarray(to_rgb(image)).astype(int)
    assert decoded.shape == (12, 10, 3) and (decoded == decoded[..., :1]).all()
    np.testing.assert_allclose(decoded[..., 0], expected, atol=0.5 if kind != "tiff F" else 1)
    assert decoded[0, :3, 0].tolist() == [0, 1, 255]
    np.testing.assert_allclose(image_to_tensor(image)[0].numpy(), expected / 127.5 - 1, atol=1.01 / 127.5)


def test_float_grey_outside_zero_one_is_an_error_not_a_white_image():
    with pytest.raises(ValueError, match=r"grey levels span \[0, 300\].*8-bit or 16-bit"):
        to_rgb(Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32)))


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.new("RGB", (32, 16), (200, 30, 30))
    upright.paste((20, 20, 220), (0, 0, 8, 8))  # a blue corner top left: any rotation moves it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.jpg", exif=exif, quality=95, subsampling=0)
    upright.save(tmp_path / "upright.jpg", quality=95, subsampling=0)
    shown = np.asarray(to_rgb(Image.open(tmp_path / "photo.jpg"))).astype(int)
    reference = np.asarray(Image.open(tmp_path / "upright.jpg")).astype(int)
    assert shown.shape == reference.shape == (16, 32, 3)
    assert np.abs(shown - reference).max() <= 8
    trained = as_uint8(preprocess_image(Image.open(tmp_path / "photo.jpg"), 16))
    assert np.abs(trained - as_uint8(preprocess_image(Image.open(tmp_path / "upright.jpg"), 16))).max() <= 8


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGBA fully transparent"])
def test_transparency_is_composited_on_white(mode):
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    if mode == "RGBA fully transparent":
        alpha[:] = 0
    if mode == "LA":
        colour[...] = colour[..., :1]
        image = Image.fromarray(np.dstack([colour[..., 0], alpha]), mode="LA")
    elif mode == "P":
        alpha = np.where(alpha > 127, 255, 0).astype(np.uint8)
        palette_index = np.arange(42, dtype=np.uint8).reshape(6, 7)
        palette_index[alpha == 0] = 255
        colour = np.zeros((6, 7, 3), dtype=np.uint8)
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        colour[...] = palette[palette_index]
        image = Image.fromarray(palette_index, mode="P")
        image.putpalette(palette.flatten().tolist())
        image.info["transparency"] = 255
    else:
        image = Image.fromarray(np.dstack([colour, alpha]), mode="RGBA")
    a = alpha[..., None] / 255.0
    expected = a * colour + (1 - a) * 255
    np.testing.assert_allclose(np.asarray(to_rgb(image)).astype(float), expected, atol=1.0)
    if mode == "RGBA fully transparent":
        assert (np.asarray(to_rgb(image)) == 255).all()


@pytest.mark.parametrize("size, resolution", [((40, 30), 16), ((33, 97), 32), ((20, 15), 32), ((640, 480), 64),
                                               ((300, 90), 16), ((90, 700), 24), ((50, 50), 50)])
@pytest.mark.parametrize("random_crop", [False, True])
def test_crop_then_resize_equals_resize_then_crop(size, resolution, random_crop):
    image = random_rgb(size[1], size[0], seed=size[0])
    torch.manual_seed(3)
    expected = resize_then_crop(image, resolution, random_crop)
    torch.manual_seed(3)
    got = as_uint8(preprocess_image(image, resolution, random_crop=random_crop))
    assert np.abs(got - expected).max() <= 1 and np.abs(got - expected).mean() < 0.01


def test_extreme_aspect_ratio_resamples_only_the_kept_square(tmp_path, monkeypatch):
    levels = (np.arange(100_000) % 251).astype(np.uint8)[:, None]  # a 1 x 100000 PNG of a few hundred bytes
    Image.fromarray(levels, mode="L").save(tmp_path / "strip.png")
    resampled_pixels = []
    original_resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        resampled_pixels.append(size[0] * size[1])
        return original_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    pixels = preprocess_image(Image.open(tmp_path / "strip.png"), 512)
    assert max(resampled_pixels) <= 512 * 512  # resizing the whole strip would be 512 x 51,200,000 pixels
    assert (pixels == pixels[:, :, :1]).all()  # a 1-pixel-wide column stretched across
    centre = int(levels[50_000, 0])
    assert abs(as_uint8(pixels)[256, 0, 0] - centre) <= 1


@pytest.mark.parametrize("side", [40, 100])  # over the limit (Pillow warns) and over twice the limit (Pillow raises)
def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch, side):
    root = write_imagefolder(tmp_path / "data", images={1: random_rgb(side, side)})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    dataset = build_dataset(folder_args(root), "train")
    position = dataset.rows.index(1)
    with pytest.raises(ValueError, match=r"img_1\.png.*line 2.*MAX_IMAGE_PIXELS = 1000.*downscale it.*--skip_bad_images"):
        dataset[position]


# ------------------------------------------------------------------------------------------ metadata


@pytest.mark.parametrize("row", [{"file_name": "img_2.png", "text": None}, {"file_name": "img_2.png"}],
                         ids=["null", "missing"])
def test_row_without_caption_is_named_or_left_out(tmp_path, row):
    lines = [json.dumps({"file_name": f"img_{i}.png", "text": f"caption {i}"}) for i in range(6)]
    lines[2] = json.dumps(row)
    root = write_imagefolder(tmp_path / "data", metadata_lines=lines)
    with pytest.raises(ValueError, match=r"metadata\.jsonl line 3 has no caption.*--skip_bad_images"):
        build_dataset(folder_args(root), "train")
    train = build_dataset(folder_args(root, "--skip_bad_images"), "train")
    validation = build_dataset(folder_args(root, "--skip_bad_images"), "validation")
    captions = [train[i]["caption"] for i in range(len(train))] + [validation[0]["caption"]]
    assert sorted(captions) == [f"caption {i}" for i in (0, 1, 3, 4, 5)]
    summary = (train.skipped_summary() or "") + (validation.skipped_summary() or "")
    assert "1 row(s) without a caption" in summary and "line 3" in summary


@pytest.mark.parametrize("line, message", [
    ('{"text": "a cat"}', r"metadata\.jsonl line 4 has no 'file_name'"),
    ('{"file_name": "img_3.png", "text": "a cat",}', r"metadata\.jsonl line 4 is not valid JSON \(.* column \d+\)"),
    ('["img_3.png", "a cat"]', r"metadata\.jsonl line 4 is a JSON list, not an object"),
    ('"img_3.png"', r"metadata\.jsonl line 4 is a JSON str, not an object"),
    ('{"file_name": "img_3.png", "text": ["a cat", "a kitten"]}', r"line 4: the caption is a list.*one string"),
], ids=["no file_name", "malformed", "list", "string", "list caption"])
def test_bad_metadata_line_is_named(tmp_path, line, message):
    lines = [json.dumps({"file_name": f"img_{i}.png", "text": f"caption {i}"}) for i in range(6)]
    lines[2] = ""  # a blank line still counts in the line numbers
    lines[3] = line
    root = write_imagefolder(tmp_path / "data", metadata_lines=lines)
    with pytest.raises(ValueError, match=message):
        build_dataset(folder_args(root), "train")


def test_non_utf8_metadata_names_the_line(tmp_path):
    root = write_imagefolder(tmp_path / "data", num_images=3)
    text = "file_name,text\nimg_0.png,a cat\nimg_1.png,un café\nimg_2.png,a dog\n"
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata\.csv line 3 is not UTF-8 \(byte 0xe9\).*CSV UTF-8"):
        build_dataset(folder_args(root), "train")


def test_excel_csv_with_byte_order_mark_and_crlf_loads(tmp_path):
    root = write_imagefolder(tmp_path / "data", num_images=3)
    (root / "metadata.jsonl").unlink()
    text = 'file_name,text\r\nimg_0.png,un café\r\nimg_1.png,"a cat, a dog"\r\nimg_2.png,a tree\r\n'
    (root / "metadata.csv").write_bytes(text.encode("utf-8-sig"))
    train = build_dataset(folder_args(root), "train")
    validation = build_dataset(folder_args(root), "validation")
    by_row = {train.rows[i]: train[i] for i in range(len(train))} | {validation.rows[0]: validation[0]}
    assert [by_row[row]["caption"] for row in range(3)] == ["un café", "a cat, a dog", "a tree"]
    np.testing.assert_array_equal(as_uint8(by_row[1]["pixel_values"]), np.asarray(random_rgb(8, 8, seed=1)))


def test_unquoted_comma_in_csv_is_named(tmp_path):
    root = write_imagefolder(tmp_path / "data", num_images=3)
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_text("file_name,text\nimg_0.png,a cat\nimg_1.png,a cat, a dog\nimg_2.png,a\n")
    with pytest.raises(ValueError, match=r"metadata\.csv line 3 has 3 fields but the header has 2.*double quotes"):
        build_dataset(folder_args(root), "train")


@pytest.mark.parametrize("file_name", ["/etc/hostname", "../outside.png", "sub/../../outside.png"])
def test_a_file_name_outside_the_data_folder_is_refused(tmp_path, file_name):
    random_rgb(8, 8).save(tmp_path / "outside.png")  # would be read if the path were followed
    lines = [json.dumps({"file_name": f"img_{i}.png", "text": "a cat"}) for i in range(3)]
    lines[1] = json.dumps({"file_name": file_name, "text": "a dog"})
    root = write_imagefolder(tmp_path / "data", num_images=3, metadata_lines=lines)
    with pytest.raises(ValueError, match=rf"metadata\.jsonl line 2: file_name {re.escape(repr(file_name))} points "
                                         r"outside .*data: image paths must be relative"):
        build_dataset(folder_args(root), "train")


def test_metadata_jsonl_and_csv_side_by_side_are_refused_naming_both(tmp_path):
    root = write_imagefolder(tmp_path / "data", num_images=3)
    (root / "metadata.csv").write_text("file_name,text\nimg_0.png,a dog\n")
    with pytest.raises(ValueError, match=r"data has both metadata\.jsonl and metadata\.csv; only one of them"):
        build_dataset(folder_args(root), "train")


# ------------------------------------------------------------------------------------------ tar shards


@pytest.mark.parametrize("streaming", [False, True])
def test_tar_shards_beside_an_imagefolder_are_refused_naming_both(tmp_path, streaming):
    root = write_imagefolder(tmp_path / "data", num_images=3)
    shapes_shards(root, 2, 2)
    with pytest.raises(ValueError, match=r"holds both tar shards \(.*shard-000\.tar and 1 more\) and an "
                                         r"imagefolder \(.*data/metadata\.jsonl\); only one of them would be read"):
        build_dataset(folder_args(root, *(["--streaming"] if streaming else [])), "train")


def test_a_shard_rewritten_with_its_time_restored_is_read_again_and_its_new_count_named(tmp_path, caplog):
    """Not streamed, shards are read through an Arrow copy in the ``datasets`` cache, which ``datasets`` keys by
    modification time: a shard rewritten with its old time must still be read again."""
    root = tmp_path / "shards"
    shapes_shards(root, 3, 4)  # 2 training shards of 4 samples, 1 held out
    assert len(build_dataset(folder_args(root), "train")) == 8
    shard, image = root / "shard-000.tar", encode(random_rgb(16, 16), "png")
    stat = shard.stat()
    write_shard(shard, [(f"new{i}", {"png": image, "txt": b"a new caption"}) for i in range(2)])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_mtime_ns == stat.st_mtime_ns
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(folder_args(root), "train")
    assert len(dataset) == 6 and dataset_captions(dataset)[:2] == ["a new caption"] * 2
    assert re.search(r"shard-000\.tar now holds 2 samples; it held 4 when it was last read", caplog.text)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_shard_cut_short_is_named(tmp_path, streaming):
    root = tmp_path / "shards"
    shapes_shards(root, 3, 10)
    shard = root / "shard-001.tar"
    raw = shard.read_bytes()
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    at_a_sample_end = members[5].offset_data + (members[5].size + 511) // 512 * 512  # no end-of-archive blocks
    for cut in (len(raw) // 2, at_a_sample_end):
        shard.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"Shard .*shard-001\.tar is cut short"):
            build_dataset(folder_args(root, *(["--streaming"] if streaming else [])), "train")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_sample_whose_image_type_differs_from_the_first_sample_is_named(tmp_path, streaming):
    root = tmp_path / "shards"
    shapes_shards(root, 3, 2)
    write_shard(root / "shard-001.tar", [("odd", {"jpg": encode(random_rgb(16, 16), "jpg"), "txt": b"a dog"})])
    with pytest.raises(ValueError, match=r"shard-001\.tar sample 'odd' has the member\(s\) \.jpg, which the first "
                                         r"sample \(.*shard-000\.tar sample '00000': \.png, \.txt\) does not have"):
        build_dataset(folder_args(root, *(["--streaming"] if streaming else [])), "train")


# ------------------------------------------------------------------------------------------ unreadable images


def test_images_are_not_opened_up_front_and_a_bad_one_is_named_where_read(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "data")
    (root / "img_4.png").write_bytes(b"this is not a png")
    opened = []
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or original_open(*a, **k))
    train = build_dataset(folder_args(root), "train")
    assert opened == []
    position = train.rows.index(4)
    train[(position + 1) % len(train)]
    with pytest.raises(ValueError, match=r"Cannot read image .*img_4\.png \(.*metadata\.jsonl line 5\).*--skip_bad_images"):
        train[position]


def test_skip_bad_images_replaces_with_the_next_readable_row_and_counts_across_workers(tmp_path):
    bad = passes_verify_but_fails_to_decode(random_rgb(8, 8))
    Image.open(io.BytesIO(bad)).verify()  # the up-front check this replaces would have let it through
    root = write_imagefolder(tmp_path / "data", num_images=9)
    train = build_dataset(folder_args(root, "--skip_bad_images"), "train")
    positions = [2, 3]
    bad_rows = [train.rows[position] for position in positions]
    (root / f"img_{bad_rows[0]}.png").write_bytes(bad)
    (root / f"img_{bad_rows[1]}.png").write_bytes(b"not an image")
    assert len(train) == 8  # a bad image keeps its place: batches keep their size
    replacement = train[4]
    for position in positions:
        item = train[position]
        assert item["index"] == position and item["caption"] == replacement["caption"]
        assert torch.equal(item["pixel_values"], replacement["pixel_values"])
    fresh = build_dataset(folder_args(root, "--skip_bad_images"), "train")
    loader = torch.utils.data.DataLoader(fresh, batch_size=4, num_workers=2, collate_fn=collate_examples)
    batches = list(loader)
    assert [len(batch["captions"]) for batch in batches] == [4, 4]
    assert fresh.skipped_images == 2  # marked by the workers, counted here
    summary = fresh.skipped_summary()
    assert "2 unreadable image(s)" in summary and all(f"img_{row}.png" in summary for row in bad_rows)


def test_all_images_unreadable_is_an_error_not_an_endless_loop(tmp_path):
    root = write_imagefolder(tmp_path / "data", num_images=3)
    for i in range(3):
        (root / f"img_{i}.png").write_bytes(b"junk")
    train = build_dataset(folder_args(root, "--skip_bad_images"), "train")
    with pytest.raises(ValueError, match="None of the 2 images is readable"):
        train[0]


def test_a_held_out_size_the_data_cannot_spare_is_refused_or_warned(tmp_path):
    root = write_imagefolder(tmp_path / "data", num_images=12)
    with pytest.raises(ValueError, match=r"--num_held_out_samples 7 holds out more than half of the 12 items of "
                                         r".*data, leaving 5 to train on: lower --num_held_out_samples \(e\.g\. 1\)"):
        build_dataset(folder_args(root, "--num_held_out_samples", "7"), "train")
    with pytest.warns(UserWarning, match=r"--num_held_out_samples 4 holds out 4 of the 12 items of .*data: every "
                                         r"stage trains on the other 8 only"):
        assert len(build_dataset(folder_args(root, "--num_held_out_samples", "4"), "train")) == 8
    assert len(build_dataset(folder_args(root), "train")) == 11  # the default: a tenth, at least one
    one = write_imagefolder(tmp_path / "one", num_images=1)
    with pytest.raises(ValueError, match=r"one has 1 usable item\(s\); at least 2 are needed"):
        build_dataset(folder_args(one), "train")


# ------------------------------------------------------------------------------- ldm-generate, ldm-eval, ldm-export-shapes


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance_scale", "inf", "must be a finite number, got inf"),
    ("--guidance_scale", "nan", "must be a finite number, got nan"),
    ("--eta", "-1", "must be >= 0"),
    ("--height", "0", "must be a positive integer, got 0"),
    ("--width", "-16", "must be a positive integer, got -16"),
    ("--steps", "0", "must be a positive integer, got 0"),
    ("--num_images", "0", "must be a positive integer, got 0"),
])
def test_generate_rejects_bad_values_before_loading(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert f"ldm-generate: error: argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "must be a positive integer, got 0"),
    ("--guidance_scale", "nan", "must be a finite number, got nan"),
    ("--guidance_interval", "-1", "must be a noise level >= 0"),
])
def test_eval_rejects_bad_sampling_values_before_loading(tmp_path, capsys, flag, value, message):
    """ldm-eval takes ldm-generate's sampling flags (``add_sampling_args``), with the same checks."""
    argv = ["--model", str(tmp_path), "--out", str(tmp_path / "out"), flag, value]
    argv += ["1"] if flag == "--guidance_interval" else []  # its second bound
    with pytest.raises(SystemExit) as exit_info:
        eval_main(argv)
    assert exit_info.value.code == 2
    assert f"ldm-eval: error: argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_sampling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("images were generated")

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", fail)


def test_generate_checks_out_is_writable_before_sampling(tiny_pipeline_dir, tmp_path, no_sampling):
    (tmp_path / "a_file").write_text("x")
    for out, message in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "sub", "is not writable")):
        args = build_parser().parse_args(["--model", str(tiny_pipeline_dir), "--prompt", "a cat", "--out", str(out),
                                          "--steps", "1", "--device", "cpu"])
        with pytest.raises(OSError, match=f"--out {out} {message}"):
            generate(args)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_generate_read_only_out_folder_fails_before_sampling(tiny_pipeline_dir, tmp_path, no_sampling):
    out = tmp_path / "read_only"
    out.mkdir(mode=0o500)
    args = build_parser().parse_args(["--model", str(tiny_pipeline_dir), "--prompt", "a cat", "--out", str(out)])
    with pytest.raises(PermissionError, match="is not writable"):
        generate(args)


@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available on this machine.*--device cpu"),
                                             ("gpu", "gpu is not a device")])
def test_generate_unavailable_device_is_one_line(tmp_path, capsys, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "o"), "--device", device])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"ldm-generate: error: --device {device}") and re.search(message, err)


@pytest.mark.parametrize("model, scheduler, message", [(None, None, "holds no pipeline"),
                                                       ("tiny", "x", "Unknown scheduler 'x': choose one of .*ddim")])
def test_generate_errors_are_one_line_and_write_nothing(tiny_pipeline_dir, tmp_path, capsys, model, scheduler, message):
    argv = ["--model", str(tiny_pipeline_dir if model else tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        generate_main(argv + ["--device", "cpu"] + (["--scheduler", scheduler] if scheduler else []))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside loading bars
    assert exit_info.value.code == 2 and len(errors) == 1
    assert errors[0].startswith("ldm-generate: error: ") and re.search(message, errors[0])
    assert not (tmp_path / "o").exists()


def test_export_errors_are_one_line(tmp_path, capsys):
    export_main(["--out", str(tmp_path / "export"), "--num_samples", "2", "--resolution", "16"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--out", str(tmp_path / "export"), "--num_samples", "2", "--resolution", "16"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("ldm-export-shapes: error: ") and "--overwrite" in err


@pytest.mark.parametrize("command, argv", [
    ("ldm-generate", ["--model", "m", "--prompt", "a cat", "--out", "o", "--stepss", "2"]),
    ("ldm-eval", ["--real", "--out", "o", "--guidance_sacle", "2"]),
    ("ldm-export-shapes", ["--out", "o", "--num_smaples", "2"]),
    ("ldm-serve", ["--model", "m", "--prot", "8000"]),
    ("run_demo.py", ["--output_dirr", "runs/x"]),
])
def test_a_misspelt_flag_is_one_line_naming_the_closest_flag(command, argv, capsys):
    from ldm_pipeline.cli_eval import main as eval_main
    from ldm_pipeline.serve import main as serve_main
    from training.run_demo import main as demo_main

    mains = {"ldm-generate": generate_main, "ldm-eval": eval_main, "ldm-export-shapes": export_main,
             "ldm-serve": serve_main, "run_demo.py": demo_main}
    with pytest.raises(SystemExit) as exit_info:
        mains[command](argv)
    typo = argv[-2]
    closest = {"--stepss": "--steps", "--guidance_sacle": "--guidance_scale", "--num_smaples": "--num_samples",
               "--prot": "--port", "--output_dirr": "--output_dir"}[typo]
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"{command}: error: unrecognized argument {typo}: did you mean {closest}? "
                                       "(--help lists the flags)\n")


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 0}, r"`height`=0 must be a positive multiple"),
    ({"width": -16}, r"`width`=-16 must be a positive multiple"),
    ({"guidance_scale": float("inf")}, r"`guidance_scale` must be a finite number"),
    ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number"),
])
def test_the_pipeline_rejects_sizes_and_guidance_it_cannot_use(tiny_pipeline_factory, kwargs, message):
    pipe = tiny_pipeline_factory("clip")
    with pytest.raises(ValueError, match=message):
        pipe("a red cat", num_inference_steps=2, **kwargs)


@pytest.mark.parametrize("kwargs", [{"prompt": "a red \ud800 cat"}, {"prompt": ["a cat", "a dog"],
                                                                      "negative_prompt": ["blurry", "\udc80"]}])
def test_a_prompt_with_a_lone_surrogate_is_named(tiny_pipeline_factory, kwargs):
    pipe = tiny_pipeline_factory("clip")
    name = "negative_prompt" if "negative_prompt" in kwargs else "prompt"
    with pytest.raises(ValueError, match=rf"`{name}` .* is not valid Unicode text \(a lone UTF-16 surrogate"):
        pipe(**kwargs, num_inference_steps=1)


@pytest.mark.parametrize("flag", ["--text_encoder", "--vae"])
def test_a_missing_stage_folder_that_could_be_a_hub_name_says_neither_exists(tmp_path, monkeypatch, flag):
    from ldm_pipeline.text_encoder import load_pretrained_text_encoder
    from ldm_pipeline.vae import load_vae

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load = load_pretrained_text_encoder if flag == "--text_encoder" else load_vae
    with pytest.raises(FileNotFoundError, match=rf"^{flag} te_out: no such local directory, and no Hub model of that "
                                                r"name could be loaded \(.*\)\. Pass the stage's output directory"):
        load("te_out", flag)


# ------------------------------------------------------------------------------------------ non-finite outputs


def damage_unet(pipe):
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")


def damage_text_encoder(pipe):
    with torch.no_grad():
        pipe.text_encoder.embeddings.position_embedding.weight[0, 0] = float("inf")  # every prompt's


@pytest.mark.parametrize("damage, guidance_scale, message", [
    (damage_unet, 3.0, r"The denoised latents hold NaN or inf \(256 of 256 values\), so no image is returned: the "
                       r"U-Net weight unet\.conv_in\.weight is NaN or inf"),
    (damage_text_encoder, 3.0, r"The denoised latents .*: the text encoder weight text_encoder\..*weight is NaN"),
    (lambda pipe: pipe.vae.register_to_config(scaling_factor=float("nan")), 3.0,
     r"The decoded images hold NaN or inf .*: vae\.config\.scaling_factor is nan: set it in vae/config\.json"),
    (None, 1e30, r"hold NaN or inf .*: guidance_scale=1e\+30 makes the guided prediction .* overflow"),
])
def test_the_pipeline_returns_no_image_made_of_nan_or_inf_and_names_the_cause(tiny_pipeline_factory, damage,
                                                                             guidance_scale, message):
    pipe = tiny_pipeline_factory("clip")
    generator = torch.Generator().manual_seed(0)
    healthy = pipe("a red cat", num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="pt")
    assert torch.isfinite(healthy.images).all()
    if damage is not None:
        damage(pipe)
    with pytest.raises(ValueError, match=message):
        pipe("a red cat", num_inference_steps=2, guidance_scale=guidance_scale, generator=generator)


def test_generate_saves_no_image_from_nan_weights(tmp_path, capsys):
    pipe = make_tiny_pipeline("clip")
    damage_unet(pipe)
    pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--model", str(tmp_path / "model"), "--prompt", "a cat", "--steps", "2", "--device", "cpu",
                       "--out", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert errors[0].startswith("ldm-generate: error: The denoised latents hold NaN or inf") and "unet.conv_in" in errors[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == []

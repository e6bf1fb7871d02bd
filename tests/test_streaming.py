"""Streaming and WebDataset tar-shard input: items equal what was written, a split across processes and
DataLoader workers covers every sample once per epoch, a killed and resumed streaming run sees the batches of an
uninterrupted one, and every bad input is one clear error naming its shard (or skipped and counted)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_stage
from ldm_pipeline.config import ConfigError, DataConfig
from ldm_pipeline.data import ShapesDataset, build_dataset, collate_examples, dataset_captions, dataset_fingerprint
from ldm_pipeline.data.datasets import StreamingImageCaptionDataset, image_to_tensor
from ldm_pipeline.data.export import export_main
from ldm_pipeline.stream_loading import StreamLoader, check_same_shards, stream_train_batches

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = REPO / "configs" / "tiny" / "vae.json"
TINY_UNET = REPO / "configs" / "tiny" / "unet.json"


def encode(image: Image.Image, extension: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}[extension],
               **({"lossless": True} if extension == "webp" else {}))
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar of ``[(key, {extension: bytes})]``, members in sample order (the WebDataset layout)."""
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for extension, payload in members.items():
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(payload)
                archive.addfile(member, io.BytesIO(payload))
    return path


def shapes_shards(folder: Path, num_shards: int, per_shard: int, resolution: int = 16,
                  caption_as: str = "txt") -> dict[str, tuple[Image.Image, str]]:
    """``num_shards`` shards of shapes renders with unique captions ("... #i"); returns ``{key: (image, caption)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(num_shards * per_shard, resolution, seed=3)
    written = {}
    for shard in range(num_shards):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            key, caption = f"{i:05d}", f"{data[i]['caption']} #{i}"
            text = caption.encode() if caption_as == "txt" else json.dumps({"text": caption}).encode()
            samples.append((key, {"png": encode(data[i]["image"], "png"), caption_as: text}))
            written[key] = (data[i]["image"], caption)
        write_shard(folder / f"shard-{shard:03d}.tar", samples)
    return written


def config(folder: Path, **overrides) -> DataConfig:
    return DataConfig(**{"train_data_dir": str(folder), "resolution": 16, "num_validation_samples": 4, **overrides})


# --------------------------------------------------------------------------------------------- reading shards


@pytest.mark.parametrize("streaming", [False, True])
def test_items_read_from_tar_shards_equal_the_images_and_captions_written(tmp_path, streaming):
    written = shapes_shards(tmp_path / "txt", 2, 3)
    data = ShapesDataset(4, 16, seed=9)
    samples = [(f"w{i}", {extension: encode(data[i]["image"], extension),
                          "json": json.dumps({"text": data[i]["caption"], "other": 1}).encode()})
               for i, extension in enumerate(("webp", "webp", "webp", "webp"))]
    write_shard(tmp_path / "txt" / "shard-002.tar", samples)  # held out (the last in name order)
    dataset = build_dataset(config(tmp_path / "txt", streaming=streaming), "train")
    items = list(dataset) if streaming else [dataset[i] for i in range(len(dataset))]
    assert len(items) == 6
    for item, (image, caption) in zip(items, written.values()):
        assert item["caption"] == caption
        assert torch.equal(item["pixel_values"], image_to_tensor(image))
    validation = build_dataset(config(tmp_path / "txt", streaming=streaming), "validation")
    assert [validation[i]["caption"] for i in range(len(validation))] == [data[i]["caption"] for i in range(4)]
    assert torch.equal(validation[2]["pixel_values"], image_to_tensor(data[2]["image"]))  # lossless WebP
    assert dataset_captions(dataset) == [caption for _, caption in written.values()]


def test_exported_shards_hold_the_shapes_data_and_a_validation_folder_is_its_split(tmp_path):
    export_main(["--out", str(tmp_path / "train"), "--num_samples", "10", "--resolution", "16", "--format",
                 "webdataset", "--shard_size", "4"])
    export_main(["--out", str(tmp_path / "validation"), "--num_samples", "3", "--resolution", "16", "--format",
                 "webdataset", "--split", "validation"])
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    expected = ShapesDataset(10, 16, seed=0, split="train")
    dataset = build_dataset(config(tmp_path, streaming=True), "train")
    items = list(dataset)
    assert [item["caption"] for item in items] == [expected[i]["caption"] for i in range(10)]
    assert torch.equal(items[7]["pixel_values"], image_to_tensor(expected[7]["image"]))
    validation = build_dataset(config(tmp_path), "validation")
    assert [validation[i]["caption"] for i in range(3)] == [ShapesDataset(3, 16, seed=0, split="validation")[i][
        "caption"] for i in range(3)]
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_main(["--out", str(tmp_path / "train"), "--num_samples", "2", "--format", "webdataset"])


@pytest.mark.parametrize("source", ["train_data_dir", "dataset_name"])
def test_parquet_files_stream_with_the_last_file_held_out(tmp_path, source):
    import datasets

    data = ShapesDataset(9, 16, seed=2)
    table = datasets.Dataset.from_list([{"image": data[i]["image"], "text": data[i]["caption"]} for i in range(9)])
    table = table.cast_column("image", datasets.Image())
    for part in range(3):
        table.shard(3, part, contiguous=True).to_parquet(str(tmp_path / f"part-{part}.parquet"))
    settings = DataConfig(**{source: str(tmp_path)}, resolution=16, streaming=True, num_validation_samples=2)
    items = list(build_dataset(settings, "train"))
    assert [item["caption"] for item in items] == [data[i]["caption"] for i in range(6)]
    assert torch.equal(items[4]["pixel_values"], image_to_tensor(data[4]["image"]))
    validation = build_dataset(settings, "validation")
    assert [validation[i]["caption"] for i in range(len(validation))] == [data[6]["caption"], data[7]["caption"]]


# --------------------------------------------------------------------------------------------- splitting


def indices_seen(dataset: StreamingImageCaptionDataset, epoch: int, rank: int, world_size: int) -> list[int]:
    share = dataset.for_training(seed=5, buffer_size=4, rank=rank, world_size=world_size)
    share.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(share, batch_size=1, num_workers=2, collate_fn=collate_examples)
    return [index for batch in loader for index in batch["index"].tolist()]


@pytest.mark.parametrize("num_shards,strategy", [(4, "shards"), (3, "examples")])
def test_two_ranks_with_two_workers_each_see_every_sample_exactly_once_per_epoch(tmp_path, num_shards, strategy):
    shapes_shards(tmp_path, num_shards + 1, 5)  # the last shard is held out for validation
    dataset = build_dataset(config(tmp_path, streaming=True), "train")
    everything = sorted(item["index"] for item in dataset)
    assert len(set(everything)) == num_shards * 5
    assert dataset.for_training(5, 4, 0, 2).split_strategy == strategy
    orders = []
    for epoch in (0, 1):
        seen = [indices_seen(dataset, epoch, rank, 2) for rank in (0, 1)]
        assert sorted(seen[0] + seen[1]) == everything, f"epoch {epoch}: a sample is missing or repeated"
        if strategy == "shards":
            assert len(seen[0]) == len(seen[1]) == num_shards * 5 // 2
        orders.append(seen)
        assert seen == [indices_seen(dataset, epoch, rank, 2) for rank in (0, 1)]  # the order is reproducible
    assert orders[0] != orders[1]  # set_epoch reshuffles


# --------------------------------------------------------------------------------------------- exact resume


def test_stream_loader_resumed_at_step_k_gives_the_remaining_batches_of_an_uninterrupted_run(tmp_path):
    shapes_shards(tmp_path, 4, 5)
    dataset = build_dataset(config(tmp_path, streaming=True, random_flip=True), "train")

    def loader():
        return StreamLoader(dataset.for_training(seed=1, buffer_size=3), 4, collate_examples, 2, seed=1)

    full = [(b["index"].tolist(), b["pixel_values"]) for b in stream_train_batches(loader(), 0, 9)]
    assert len({tuple(i) for i, _ in full[:3]}) == 3 and len(full) == 9  # 3 batches of 4 per epoch (15 samples)
    for k in (2, 3, 5):
        interrupted = loader()
        list(stream_train_batches(interrupted, 0, k))
        resumed = loader()
        resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
        rest = [(b["index"].tolist(), b["pixel_values"]) for b in stream_train_batches(resumed, k, 9)]
        assert [i for i, _ in rest] == [i for i, _ in full[k:]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, full[k:]))  # the same random flips


def read_log(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records if "rec_loss" in r]


def test_streaming_vae_run_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    shapes_shards(tmp_path / "shards", 5, 8, resolution=32)  # 4 training shards of 8: 4 batches of 8 per epoch
    common = ["--config", str(TINY_VAE), "--train_data_dir", str(tmp_path / "shards"), "--streaming",
              "--random_flip", "--dataloader_num_workers", "2", "--shuffle_buffer_size", "6", "--report_to", "none"]
    run_stage("vae", common + ["--output_dir", str(tmp_path / "full")])
    run_stage("vae", common + ["--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "3"])
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "checkpoint-3" / "stream_state_0.json").read_text())
    assert state == {"epoch": 0, "position": 3}
    run_stage("vae", common + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 are in the second epoch
    assert resumed == full
    assert json.loads((tmp_path / "full" / "checkpoints" / "checkpoint-6" / "stream_state_0.json").read_text()) == {
        "epoch": 1, "position": 2}


def test_unet_stage_streams_uncached_with_a_message(tmp_path, tiny_stage_dirs, capsys):
    shapes_shards(tmp_path / "shards", 3, 4)
    metrics = run_stage("unet", [
        "--config", str(TINY_UNET), "--text_encoder", str(tiny_stage_dirs / "text"),
        "--vae", str(tiny_stage_dirs / "vae_stage"), "--output_dir", str(tmp_path / "out"), "--resolution", "16",
        "--train_data_dir", str(tmp_path / "shards"), "--streaming", "--train_batch_size", "4",
        "--max_train_steps", "3", "--report_to", "none", "--validation_steps", "100"])
    assert "--streaming: the latent cache needs random access" in capsys.readouterr().out
    assert metrics["cached"] is False and metrics["train_steps"] == 3
    assert not (tmp_path / "cache").exists()


def test_text_encoder_stage_trains_its_tokenizer_on_the_streamed_captions(tmp_path):
    written = shapes_shards(tmp_path / "shards", 3, 8, resolution=32, caption_as="json")
    metrics = run_stage("text_encoder", [
        "--config", str(REPO / "configs" / "tiny" / "text_encoder.json"), "--output_dir", str(tmp_path / "out"),
        "--train_data_dir", str(tmp_path / "shards"), "--streaming", "--train_batch_size", "8",
        "--max_train_steps", "2", "--num_validation_samples", "6", "--report_to", "none"])
    assert metrics["num_pairs"] == 6 and metrics["train_steps"] == 2
    vocabulary = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    training_words = {word for _, caption in list(written.values())[:16] for word in caption.split()}
    assert "#15" in training_words and "15" in vocabulary  # a word that only a training caption holds
    assert "23" not in vocabulary  # only a held-out caption holds it


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_shards(tmp_path):
    """Two good shards and a third whose second sample's image is not an image (plus a held-out shard)."""
    folder = tmp_path / "shards"
    shapes_shards(folder, 2, 3)
    good = ShapesDataset(2, 16, seed=4)
    write_shard(folder / "shard-002.tar", [
        ("bad0", {"png": encode(good[0]["image"], "png"), "txt": b"a cat"}),
        ("bad1", {"png": b"not an image", "txt": b"a dog"}),
    ])
    write_shard(folder / "shard-003.tar", [("val", {"png": encode(good[1]["image"], "png"), "txt": b"a box"})])
    return folder


@pytest.mark.parametrize("streaming", [False, True])
def test_a_corrupt_member_names_its_shard_and_key_or_is_skipped_and_counted(bad_shards, streaming):
    dataset = build_dataset(config(bad_shards, streaming=streaming), "train")
    with pytest.raises(ValueError, match=r"shard-002\.tar sample 'bad1'.*--skip_bad_images"):
        list(dataset) if streaming else [dataset[i] for i in range(len(dataset))]
    skipping = build_dataset(config(bad_shards, streaming=streaming, skip_bad_images=True), "train")
    items = list(skipping) if streaming else [skipping[i] for i in range(len(skipping))]
    assert "a dog" not in [item["caption"] for item in items] and "a cat" in [item["caption"] for item in items]
    assert skipping.skipped_images == 1 and "Skipped (--skip_bad_images)" in skipping.skipped_summary()


@pytest.mark.parametrize("streaming", [False, True])
def test_the_training_script_stops_at_a_corrupt_member_naming_it_in_one_line(bad_shards, tmp_path, streaming):
    with pytest.raises(ValueError, match=r"^Cannot read image .*shard-002\.tar sample 'bad1'") as raised:
        run_stage("vae", ["--config", str(TINY_VAE), "--train_data_dir", str(bad_shards)]
                  + (["--streaming"] if streaming else []) + ["--resolution", "16", "--train_batch_size", "2", "--dataloader_num_workers", "1",
                          "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert "\n" not in str(raised.value) and "Traceback" not in str(raised.value)  # not the worker's traceback
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_a_sample_without_a_caption_names_its_shard_and_key(tmp_path, streaming):
    shapes_shards(tmp_path, 2, 2)
    image = encode(ShapesDataset(1, 16, seed=0)[0]["image"], "png")
    captioned = [(f"k{i}", {"png": image, "txt": b"a cat"}) for i in range(5)]  # the builder infers its columns
    write_shard(tmp_path / "shard-000.tar", captioned + [("k5", {"png": image})])  # from the first 5 samples
    dataset = build_dataset(config(tmp_path, streaming=streaming), "train") if streaming else None
    with pytest.raises(ValueError, match=r"shard-000\.tar sample 'k5' has no caption"):
        list(dataset) if streaming else build_dataset(config(tmp_path), "train")
    skipping = build_dataset(config(tmp_path, streaming=streaming, skip_bad_images=True), "train")
    captions = [item["caption"] for item in skipping] if streaming else dataset_captions(skipping)
    assert captions == ["a cat"] * 5
    write_shard(tmp_path / "shard-000.tar", [("k0", {"png": image})] + captioned)
    with pytest.raises(ValueError, match=r"Cannot read the shards .*shard-000\.tar.*same members"):
        build_dataset(config(tmp_path, streaming=streaming), "train")


def test_an_empty_or_unreadable_shard_is_named(tmp_path):
    shapes_shards(tmp_path, 2, 2)
    write_shard(tmp_path / "shard-001.tar", [])
    with pytest.raises(ValueError, match=r"Shard .*shard-001\.tar is empty"):
        build_dataset(config(tmp_path, streaming=True), "train")
    (tmp_path / "shard-001.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=r"Shard .*shard-001\.tar is not a readable tar archive"):
        build_dataset(config(tmp_path), "train")


def test_a_single_shard_cannot_hold_out_validation(tmp_path):
    shapes_shards(tmp_path, 1, 2)
    with pytest.raises(ValueError, match=r"has 1 shard\(s\) and no validation split.*validation/ folder"):
        build_dataset(config(tmp_path, streaming=True), "train")


def test_streaming_from_a_source_that_cannot_stream_is_refused(tmp_path):
    with pytest.raises(ValueError, match="built-in shapes data .* does not stream"):
        build_dataset(DataConfig(resolution=16, num_train_samples=8, streaming=True), "train")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n')
    with pytest.raises(ValueError, match="is an imagefolder, which is read on access.*--format webdataset"):
        build_dataset(config(tmp_path, streaming=True), "train")
    with pytest.raises(ConfigError, match="--max_train_samples cannot be combined with --streaming"):
        config(tmp_path, streaming=True, max_train_samples=3)


class TwoProcesses:
    """The part of an ``Accelerator`` that `check_same_shards` uses, with a second process's tensor given."""

    device, process_index = torch.device("cpu"), 0

    def __init__(self, other: torch.Tensor | None = None):
        self.other = other

    def gather(self, tensor):
        return torch.cat([tensor, tensor if self.other is None else self.other])


def test_processes_that_see_different_shards_stop_with_an_error_instead_of_a_hang(tmp_path):
    shapes_shards(tmp_path, 3, 2)
    dataset = build_dataset(config(tmp_path, streaming=True), "train")
    check_same_shards(TwoProcesses(), dataset.shard_ids)
    with pytest.raises(ValueError, match=r"do not see the same training shards \(process 0: 2 shard\(s\).*"
                                         r"process 1: 1 shard\(s\)"):
        check_same_shards(TwoProcesses(torch.tensor([[12345, 1]])), dataset.shard_ids)


# --------------------------------------------------------------------------------------------- fingerprint


def test_the_data_fingerprint_covers_the_shards_and_the_streaming_settings(tmp_path):
    shapes_shards(tmp_path, 3, 2)
    data = config(tmp_path, streaming=True)
    before = dataset_fingerprint(data)
    assert dataset_fingerprint(data) == before
    assert dataset_fingerprint(config(tmp_path)) != before
    assert dataset_fingerprint(config(tmp_path, streaming=True, shuffle_buffer_size=7)) != before
    shard = tmp_path / "shard-001.tar"
    stat = shard.stat()
    shard.write_bytes(shard.read_bytes())  # the same bytes, written again
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same modification time: the ctime still moves
    assert dataset_fingerprint(data) != before
    as_name = dataset_fingerprint(DataConfig(dataset_name=str(tmp_path), resolution=16, streaming=True))
    (tmp_path / "shard-003.tar").write_bytes(shard.read_bytes())
    assert dataset_fingerprint(DataConfig(dataset_name=str(tmp_path), resolution=16, streaming=True)) != as_name


def test_two_process_launch_streams_disjoint_shares_and_saves_each_position(tmp_path):
    """``accelerate launch`` of 2 CPU processes: the shard lists are compared across processes (gloo), each process
    streams 2 of the 4 training shards and its checkpoint holds its own stream position."""
    shapes_shards(tmp_path / "shards", 5, 4, resolution=32)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                                                         else []))}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_2_processes.yaml"), str(REPO / "training" / "train_vae.py"),
               "--config", str(TINY_VAE), "--train_data_dir", str(tmp_path / "shards"), "--streaming",
               "--train_batch_size", "2", "--max_train_steps", "5", "--checkpointing_steps", "5",
               "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Streaming 4 shard(s) split across 2 processes by shards." in result.stdout
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-5"
    for process in (0, 1):  # 8 samples per process: 4 batches of 2 per epoch, so step 5 is epoch 1, batch 1
        state = json.loads((checkpoint / f"stream_state_{process}.json").read_text())
        assert state == {"epoch": 1, "position": 1}

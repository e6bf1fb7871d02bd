"""The sharded latent/text cache (``ldm_pipeline.caching``) and ``training/cache_latents.py``: shard contents
against the frozen models run directly, caption deduplication, batched reads, resume after a kill, damaged and
foreign shards, fp16 storage error, processes that disagree, and a 2-process build equal to a 1-process one."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from conftest import run_stage
from ldm_pipeline import caching
from ldm_pipeline.caching import (
    MANIFEST,
    ShardedLatentCache,
    agree_across_processes,
    encode_captions,
    encode_posterior,
    fp16_storage_error,
    shard_path,
)
from ldm_pipeline.config import DataConfig
from ldm_pipeline.data import build_dataset, collate_examples, dataset_captions
from ldm_pipeline.text_encoder import load_pretrained_text_encoder
from ldm_pipeline.trainer import run_in_process
from ldm_pipeline.vae import load_vae

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny" / "unet.json"
RESOLUTION, NUM_SAMPLES, SHARD_SIZE, BATCH = 16, 20, 8, 4  # 3 sample shards (8, 8, 4)


def cache_args(stages: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--text_encoder", str(stages / "text"), "--vae", str(stages / "vae_stage"),
            "--resolution", str(RESOLUTION), "--num_train_samples", str(NUM_SAMPLES), "--cache_dir", str(cache_dir),
            "--cache_shard_size", str(SHARD_SIZE), "--cache_batch_size", str(BATCH), *extra]


def build(argv: list[str]) -> dict:
    from training import cache_latents

    return run_in_process(cache_latents.main, argv)


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def built(tiny_stage_dirs, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    result = build(cache_args(tiny_stage_dirs, cache_dir))
    return tiny_stage_dirs, cache_dir, Path(result["cache_dir"])


@pytest.fixture(scope="module")
def reference(built):
    """What the cache must hold, computed directly: the VAE posterior over the images in batches of BATCH, the
    text encoder over the sorted distinct captions and over ""."""
    stages, _, _ = built
    vae = load_vae(str(stages / "vae_stage")).eval()
    tokenizer, text_encoder = load_pretrained_text_encoder(str(stages / "text"), "--text_encoder")
    dataset = build_dataset(DataConfig(resolution=RESOLUTION, num_train_samples=NUM_SAMPLES), "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=collate_examples)
    means, stds = zip(*(encode_posterior(vae, batch["pixel_values"]) for batch in loader))
    captions = dataset_captions(dataset)
    distinct = sorted(set(captions))
    return {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions, "distinct": distinct,
            "text": torch.cat([encode_captions(text_encoder, tokenizer, distinct[i:i + SHARD_SIZE], BATCH)
                               for i in range(0, len(distinct), SHARD_SIZE)]),
            "empty": encode_captions(text_encoder, tokenizer, [""])[0]}


def test_shards_hold_the_vae_posterior_and_one_text_row_per_distinct_caption(built, reference):
    _, _, directory = built
    manifest = json.loads((directory / MANIFEST).read_text())
    num_distinct = len(reference["distinct"])
    assert manifest["key"][:24] == directory.name.split("-")[-1]
    assert (manifest["num_samples"], manifest["shard_size"], manifest["num_captions"]) == (NUM_SAMPLES, SHARD_SIZE,
                                                                                           num_distinct)
    assert manifest["num_sample_shards"] == 3 and manifest["num_text_shards"] == -(-num_distinct // SHARD_SIZE)
    assert manifest["latent_shape"] == [4, RESOLUTION // 2, RESOLUTION // 2]
    assert manifest["storage_dtype"] == "float32" and manifest["text_shape"] == list(reference["empty"].shape)

    samples = [load_file(str(shard_path(directory, "samples", i))) for i in range(3)]
    assert [len(s["caption_ids"]) for s in samples] == [8, 8, 4]
    assert torch.equal(torch.cat([s["latent_mean"] for s in samples]), reference["mean"])
    assert torch.equal(torch.cat([s["latent_std"] for s in samples]), reference["std"])
    caption_ids = torch.cat([s["caption_ids"] for s in samples]).tolist()
    assert [reference["distinct"][i] for i in caption_ids] == reference["captions"]

    texts = [load_file(str(shard_path(directory, "text", i))) for i in range(manifest["num_text_shards"])]
    text_embeds = torch.cat([t["text_embeds"] for t in texts])
    assert text_embeds.shape[0] == num_distinct
    assert torch.equal(text_embeds, reference["text"])
    assert torch.equal(texts[0]["empty_embeds"], reference["empty"])


def test_repeated_captions_are_encoded_once(built, tmp_path):
    from PIL import Image

    stages, _, _ = built
    folder, captions = tmp_path / "data", ["a red cat", "two blue stars", "a red cat", "a box"] * 3
    folder.mkdir()
    for i, caption in enumerate(captions):
        Image.new("RGB", (RESOLUTION, RESOLUTION), (20 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n"
                                                   for i, caption in enumerate(captions)))
    argv = cache_args(stages, tmp_path / "cache", "--train_data_dir", str(folder), "--num_held_out_samples", "2")
    directory = Path(build(argv)["cache_dir"])
    dataset = build_dataset(DataConfig(resolution=RESOLUTION, train_data_dir=str(folder), num_held_out_samples=2))
    distinct = sorted(set(dataset_captions(dataset)))
    assert len(distinct) == 3 and len(dataset) == 10
    assert json.loads((directory / MANIFEST).read_text())["num_captions"] == 3
    [text_shard] = [p for p in directory.iterdir() if p.name.startswith("text-")]
    text = load_file(str(text_shard))
    tokenizer, text_encoder = load_pretrained_text_encoder(str(stages / "text"), "--text_encoder")
    assert torch.equal(text["text_embeds"], encode_captions(text_encoder, tokenizer, distinct, BATCH))
    caption_ids = torch.cat([load_file(str(shard_path(directory, "samples", i)))["caption_ids"] for i in range(2)])
    assert [distinct[i] for i in caption_ids] == dataset_captions(dataset)


def test_getitems_gathers_the_same_rows_as_per_item_access(built, reference):
    _, _, directory = built
    cache = ShardedLatentCache(directory, json.loads((directory / MANIFEST).read_text())["key"])
    indices = [17, 3, 9, 3, 0, 19, 8]  # three shards, unsorted, a repeat
    batch = cache.__getitems__(indices)
    items = [cache[i] for i in indices]
    for name in ("latent_mean", "latent_std", "prompt_embeds", "index"):
        assert torch.equal(batch[name], torch.stack([item[name] for item in items])), name
    assert torch.equal(batch["latent_mean"], reference["mean"][indices])
    rows = [reference["distinct"].index(reference["captions"][i]) for i in indices]
    assert torch.equal(batch["prompt_embeds"], reference["text"][rows])
    assert torch.equal(cache.empty_embeds(), reference["empty"])

    loader = torch.utils.data.DataLoader(cache, batch_size=5, collate_fn=caching.collate_gathered)
    first = next(iter(loader))
    assert torch.equal(first["latent_std"], reference["std"][:5]) and first["index"].tolist() == [0, 1, 2, 3, 4]

    held = caching.training_cache(cache, torch.device("cpu"), on_device=True)  # what a GPU run holds in its memory
    assert isinstance(held, caching.DeviceLatentCache) and caching.training_cache(cache, torch.device("cpu"), None) is cache
    loader = torch.utils.data.DataLoader(held, batch_size=len(indices), sampler=indices, collate_fn=caching.collate_gathered)
    [only] = list(loader)
    assert sorted(only) == ["index"], "the loader of a held cache moves indices only"
    fetched = held.fetch(only)
    for name in ("latent_mean", "latent_std", "prompt_embeds", "index"):
        assert torch.equal(fetched[name], batch[name]), name
    assert torch.equal(held.empty_embeds(), reference["empty"]) and len(held) == len(cache)
    assert cache.size_in_memory() == sum(t.numel() * t.element_size() for t in (
        held.latent_mean, held.latent_std, held.caption_ids, held.text_embeds, held.empty_embeds()))


def resident_kib_of_maps(maps: dict[str, mmap.mmap]) -> dict[str, int]:
    """``{name: Rss in KiB}`` of the given memory maps of this process (``/proc/self/smaps``): only these maps, not
    other maps of the same files (another cache's, or the ones that checked each shard once)."""
    starts = {np.frombuffer(mapped, dtype=np.uint8).ctypes.data: name for name, mapped in maps.items()}
    resident, current = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: address perms offset dev inode
            current = starts.get(int(fields[0].split("-")[0], 16))
        elif current is not None and fields[0] == "Rss:":
            resident[current] = resident.get(current, 0) + int(fields[1])
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux's /proc/self/smaps")
def test_reads_keep_the_shards_mapped_without_keeping_their_pages(built):
    """The shards stay mapped (no file is reopened per batch), but every gather hands their pages back, so the
    process's memory does not grow with the rows it has read."""
    _, _, directory = built
    cache = ShardedLatentCache(directory, json.loads((directory / MANIFEST).read_text())["key"])
    for _ in range(2):
        batch = cache.__getitems__(list(range(NUM_SAMPLES)))
    assert batch["latent_mean"].shape[0] == NUM_SAMPLES
    maps = {path.name: shard.map for path, shard in cache._shards.items()}
    resident = resident_kib_of_maps(maps)
    assert sorted(resident) == sorted(p.name for p in directory.glob("*.safetensors")), resident
    assert sum(resident.values()) == 0, resident
    touched = next(iter(cache._shards.values()))
    np.asarray(touched.arrays["latent_mean" if "latent_mean" in touched.arrays else "text_embeds"]).sum()
    assert sum(resident_kib_of_maps(maps).values()) > 0, "a read without handing back keeps its pages"


def count_vae_encodes(monkeypatch) -> dict:
    calls = {"images": 0}
    original = AutoencoderKL.encode

    def counting_encode(self, x, *args, **kwargs):
        calls["images"] += x.shape[0]
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    return calls


def test_a_killed_build_keeps_finished_shards_and_the_next_run_computes_only_the_missing_ones(
        built, tmp_path, monkeypatch):
    stages, _, complete = built
    cache_dir = tmp_path / "cache"
    real_compute, calls = caching.compute_sample_shard, {"n": 0}

    def killed_at_the_third_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(caching, "compute_sample_shard", killed_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build(cache_args(stages, cache_dir))
    directory = cache_dir / complete.name
    assert sorted(p.name for p in directory.iterdir()) == ["samples-00000.safetensors", "samples-00001.safetensors"]
    monkeypatch.setattr(caching, "compute_sample_shard", real_compute)

    (directory / ".samples-00002.safetensors.partial-4242").write_bytes(b"torn")  # a writer killed mid-write
    encoded = count_vae_encodes(monkeypatch)
    build(cache_args(stages, cache_dir))
    assert encoded["images"] == NUM_SAMPLES - 2 * SHARD_SIZE, "only the missing shard is computed"
    assert file_digests(directory) == file_digests(complete)  # the partial file is gone, the rest is identical

    shard_path(directory, "samples", 1).unlink()
    encoded["images"] = 0
    build(cache_args(stages, cache_dir))
    assert encoded["images"] == SHARD_SIZE
    assert file_digests(directory) == file_digests(complete)

    encoded["images"] = 0
    build(cache_args(stages, cache_dir))
    assert encoded["images"] == 0


def test_a_damaged_shard_is_an_error_naming_it(built, tmp_path):
    import shutil

    _, _, complete = built
    directory = tmp_path / complete.name
    shutil.copytree(complete, directory)
    damaged = shard_path(directory, "samples", 1)
    raw = bytearray(damaged.read_bytes())
    raw[-5] ^= 0xFF  # a bit flip in the tensor data, after the header
    damaged.write_bytes(bytes(raw))
    cache = ShardedLatentCache(directory, json.loads((directory / MANIFEST).read_text())["key"])
    assert cache.__getitems__([0, 1])["latent_mean"].shape[0] == 2  # shard 0 is intact
    with pytest.raises(ValueError, match=r"samples-00001\.safetensors is damaged \(its checksum.*delete it"):
        cache.__getitems__([0, 9])


def test_other_frozen_models_get_another_directory_and_a_renamed_one_is_refused(built, tmp_path):
    stages, _, complete = built
    cache_dir = tmp_path / "cache"
    first = Path(build(cache_args(stages, cache_dir))["cache_dir"])
    argv = cache_args(stages, cache_dir)
    argv[argv.index("--vae") + 1] = str(stages / "other_vae")
    second = Path(build(argv)["cache_dir"])
    assert first != second and first.name == complete.name
    assert load_file(str(shard_path(first, "samples", 0)))["latent_mean"].ne(
        load_file(str(shard_path(second, "samples", 0)))["latent_mean"]).any()

    import shutil

    shutil.rmtree(second)
    shutil.copytree(first, second)  # another cache's files under this key's name
    with pytest.raises(ValueError, match="does not match its directory name"):
        build(argv)


def test_fp16_storage_error_is_bounded_by_half_precision_rounding(built, reference, tmp_path):
    stages, _, _ = built
    half = Path(build(cache_args(stages, tmp_path, "--cache_dtype", "float16"))["cache_dir"])
    shard = load_file(str(shard_path(half, "samples", 0)))
    assert shard["latent_mean"].dtype == torch.float16
    assert torch.equal(shard["latent_mean"], reference["mean"][:SHARD_SIZE].half())
    assert json.loads((half / MANIFEST).read_text())["storage_dtype"] == "float16"

    mean, std = reference["mean"].double(), reference["std"].double()
    error = fp16_storage_error(reference["mean"], reference["std"])
    relative = np.concatenate([((x.half().double() - x) / std).flatten().numpy() for x in (mean, std)])
    assert error["max"] == pytest.approx(np.abs(relative).max(), rel=1e-6)
    assert error["rms"] == pytest.approx(np.sqrt(np.mean(relative ** 2)), rel=1e-6)
    bound = 2.0 ** -11 * max((mean.abs() / std).max().item(), 1.0)  # round to nearest: |fp16(x) - x| <= 2^-11 |x|
    assert 0 < error["max"] <= bound


def test_processes_that_disagree_on_the_data_stop_with_an_error_instead_of_waiting():
    def fake_accelerator(other_count: int, other_key: str, other_complete: bool = True):
        def gather(mine):
            return torch.cat([mine, torch.tensor([[other_count, int(other_key[:15], 16), int(other_complete)]])])
        return types.SimpleNamespace(num_processes=2, device=torch.device("cpu"), gather=gather)

    key = "ab" * 32
    assert agree_across_processes(fake_accelerator(16, key), 16, key, complete=True)
    assert not agree_across_processes(fake_accelerator(16, key, other_complete=False), 16, key, complete=True)
    with pytest.raises(ValueError, match="Process 1 has 12 training samples but process 0 has 16"):
        agree_across_processes(fake_accelerator(12, key), 16, key, complete=True)
    with pytest.raises(ValueError, match="another cache key"):
        agree_across_processes(fake_accelerator(16, "cd" * 32), 16, key, complete=False)


def run_script(command: list[str]) -> str:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_two_processes_build_the_same_shards_as_one_and_training_reuses_them(built, tmp_path, monkeypatch, capsys):
    stages, _, _ = built
    script = str(REPO / "training" / "cache_latents.py")
    one, two = tmp_path / "one", tmp_path / "two"
    run_script([sys.executable, script, *cache_args(stages, one)])
    output = run_script([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                         str(REPO / "configs" / "accelerate" / "cpu_2_processes.yaml"), script,
                         *cache_args(stages, two)])
    assert "2 process(es)" in output
    [one_dir], [two_dir] = list(one.iterdir()), list(two.iterdir())
    assert one_dir.name == two_dir.name
    assert file_digests(one_dir) == file_digests(two_dir)  # bitwise the same shards and manifest

    encoded = count_vae_encodes(monkeypatch)
    run_stage("unet", cache_args(stages, two, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
                                 "--train_batch_size", "4", "--report_to", "none", "--validation_prompts", "a cat"))
    assert "Reusing latent/text cache" in capsys.readouterr().out
    assert encoded["images"] == 0

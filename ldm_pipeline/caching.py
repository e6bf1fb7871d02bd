"""Latent and text-embedding cache for U-Net training: the frozen VAE and text encoder run once, not every step.

The U-Net stage trains on z_0 = (z - shift_factor) · scaling_factor with z ~ q_VAE(z | x) and on the context
c = text_encoder(caption). Both frozen models are deterministic functions of the data, so their outputs are
computed once per (VAE, text encoder + tokenizer, data, resolution, storage) and stored on disk in a directory
``CACHE_DIR/<split>-<key[:24]>/`` of fixed-size safetensors shards:

    manifest.json             key, format version, sample count, shard size, storage dtype, shapes, caption count
    samples-00000.safetensors samples [0, S):
        latent_mean, latent_std   [S, C, h, w]  mean and std of the VAE posterior q(z | x_i) (float32 or float16)
        caption_ids               [S]           row of the text shards holding sample i's caption
        grounding_tokens          [S, K]        with a grounding loss only (``ldm_pipeline.grounding``): token
        grounding_masks           [S, K, h, w]  positions of the object words and their objects' coverage (uint8)
    text-00000.safetensors    rows [0, S) of the U sorted distinct captions:
        text_embeds               [S, L, D]     ``encode_prompts`` of each distinct caption, once (deduplicated)
        empty_embeds              [L, D]        the empty prompt "" (caption dropout / guidance; shard 0 only)

Every shard is written atomically (``durable.atomic_file``: temporary name, fsync, rename) with the SHA-256 of its
tensors (``hash_tensors``), the cache key and its own file name in its metadata; a shard is checked against them
the first time a run reads it (a shard of another cache, or one copied over another of the same cache, is
refused). Process ``p`` of ``n`` computes shards ``p, p + n, ...``, so all processes build the cache together;
a killed build keeps its finished shards and the next run computes only the missing ones.

Training reads only the rows a batch needs (``ShardedLatentCache.__getitems__``: one sorted gather per shard from a
memory map that stays open, whose pages are handed back to the system after every gather), so memory does not grow
with the number of samples. On a GPU the whole cache is held in device memory when it fits (``DeviceLatentCache``):
the DataLoader then gives only each batch's indices, and the rows are gathered on the device.

The posterior's mean *and* std are cached and a fresh latent z = mean + std · ε is drawn every step, as LDM
(``DiagonalGaussianDistribution.sample``) and Diffusers' ``train_text_to_image.py`` do, so caching does not
change the training distribution.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ldm_pipeline.data import collate_examples, dataset_captions
from ldm_pipeline.durable import atomic_file, check_writable, remove_partial_files, write_json_atomic
from ldm_pipeline.fast_path import resolve_fast_path
from ldm_pipeline.grounding import MAX_GROUNDED_TOKENS
from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts

CACHE_FORMAT_VERSION = "4"
MANIFEST = "manifest.json"
SHARD_METADATA = "ldm_pipeline_cache"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SAFETENSORS_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8}
GROUNDING_TENSORS = ("grounding_tokens", "grounding_masks")

# ------------------------------------------------------------------------------------------------ fingerprints


def fingerprint_model(model: torch.nn.Module) -> str:
    """SHA-256 over a model's class, config and every tensor of its ``state_dict`` (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        config_dict = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    return hash_tensors(model.state_dict(), digest)


def fingerprint_tokenizer(tokenizer) -> str:
    """SHA-256 over the tokenizer's vocabulary/rules, ``model_max_length`` and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{rules}|{tokenizer.model_max_length}|{special}".encode()).hexdigest()


def cache_key(frozen_fingerprints: dict[str, str], data_key: str, storage: str = "") -> str:
    """The cache's identity: one hash over the format version, the VAE, text encoder and tokenizer fingerprints,
    the data's fingerprint and the storage layout (dtype and shard size)."""
    parts = [CACHE_FORMAT_VERSION] + [frozen_fingerprints[name] for name in ("vae", "text_encoder", "tokenizer")]
    return hashlib.sha256("|".join(parts + [data_key, storage]).encode()).hexdigest()


def hash_tensors(tensors: dict[str, torch.Tensor], digest=None) -> str:
    """SHA-256 (continuing ``digest`` when given) over the names, dtypes, shapes and bytes of ``tensors``, in name
    order."""
    digest = digest or hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ frozen models


@torch.no_grad()
def encode_posterior(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior q(z | x) for images in [-1, 1]."""
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``encode_prompts(text_encoder, tokenize_prompts(tokenizer, captions))`` in batches -> FloatTensor[N, L, D]."""
    embeds = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenize_prompts(tokenizer, list(captions[start:start + batch_size]))
        embeds.append(encode_prompts(text_encoder, tokens.input_ids, tokens.attention_mask).float().cpu())
    return torch.cat(embeds)


def fp16_storage_error(latent_mean: torch.Tensor, latent_std: torch.Tensor) -> dict[str, float]:
    """Error of storing the posterior in float16, in units of the posterior's std (the scale of the noise that
    ``sample_latents`` adds anyway): e = (fp16(x) - x) / std for x in {mean, std}, element-wise.
    Returns ``{"max": max |e|, "rms": sqrt(mean e²)}`` over both tensors."""
    errors = [(x.half().float() - x) / latent_std for x in (latent_mean.float(), latent_std.float())]
    relative = torch.cat([e.flatten() for e in errors]).double()
    return {"max": relative.abs().max().item(), "rms": relative.square().mean().sqrt().item()}


# ------------------------------------------------------------------------------------------------ shard files


def cache_directory(cache_dir: str | os.PathLike, split: str, key: str) -> Path:
    return Path(cache_dir) / f"{split}-{key[:24]}"


def shard_path(directory: Path, kind: str, index: int) -> Path:
    """``directory/samples-00003.safetensors`` or ``directory/text-00003.safetensors``."""
    return directory / f"{kind}-{index:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    """Write one shard atomically, with the cache key, its file name and the SHA-256 of its tensors in its
    metadata, so that the same tensors always give the same bytes."""
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    metadata = {"key": key, "format_version": CACHE_FORMAT_VERSION, "shard": path.name,
                "sha256": hash_tensors(tensors)}
    with atomic_file(path) as partial:  # one metadata entry: safetensors writes several in a random order
        save_file(tensors, str(partial), metadata={SHARD_METADATA: json.dumps(metadata, sort_keys=True)})


def read_header(path: Path) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file: the JSON header (``{name: {dtype, shape, data_offsets}}``,
    ``__metadata__``) and the byte where the tensor data begins (format: 8-byte little-endian length + header)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return header, 8 + length


def damaged_shard_error(path: Path, reason: str) -> ValueError:
    return ValueError(f"Cache shard {path} is damaged ({reason}): delete it and run again; only the missing "
                      "shard is recomputed.")


def load_verified_shard(path: Path, key: str) -> dict[str, torch.Tensor]:
    """A shard's tensors, after checking its key and file name and recomputing the SHA-256 of its tensors against
    its metadata."""
    if not path.is_file():
        raise FileNotFoundError(f"Cache shard {path} is missing: run again (or training/cache_latents.py) to "
                                "recompute it.")
    try:
        header, _ = read_header(path)
        metadata = json.loads(header["__metadata__"][SHARD_METADATA])
        tensors = load_file(str(path))
    except Exception as error:  # a torn or overwritten file
        raise damaged_shard_error(path, f"unreadable: {error}") from error
    if metadata.get("key") != key:
        raise damaged_shard_error(path, f"it belongs to another cache, key {metadata.get('key')}")
    if metadata.get("shard") != path.name:
        raise damaged_shard_error(path, f"it holds shard {metadata.get('shard')}, copied over this one")
    if hash_tensors(tensors) != metadata.get("sha256"):
        raise damaged_shard_error(path, "its checksum does not match its contents")
    return tensors


class MappedShard:
    """One shard file, memory-mapped once per process, read by row gathers. After every gather its pages are handed
    back (``madvise(MADV_DONTNEED)``; the system's file cache keeps them), so a map that stays open does not make
    the process's memory grow with the rows it has read, and no file is reopened per batch."""

    def __init__(self, path: Path):
        self.header, data_start = read_header(path)
        with open(path, "rb") as file:
            self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.arrays = {}
        for name, entry in self.header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(SAFETENSORS_NUMPY_DTYPES[entry["dtype"]])
            count = math.prod(entry["shape"])
            self.arrays[name] = np.frombuffer(self.map, dtype=dtype, count=count,
                                              offset=data_start + entry["data_offsets"][0]).reshape(entry["shape"])

    def gather(self, name: str, rows: np.ndarray | slice) -> np.ndarray:
        """Rows ``rows`` (sorted indices or a slice) of tensor ``name``, copied out of the map."""
        rows_read = np.array(self.arrays[name][rows])
        if hasattr(self.map, "madvise"):
            self.map.madvise(mmap.MADV_DONTNEED)
        return rows_read


# ------------------------------------------------------------------------------------------------ reading


def collate_gathered(batch: dict) -> dict:
    """The DataLoader's ``collate_fn`` for ``ShardedLatentCache``: ``__getitems__`` already returns the batch."""
    return batch


class ShardedLatentCache(torch.utils.data.Dataset):
    """The cache in ``directory`` as a training dataset: batch ``{"latent_mean", "latent_std" [B, C, h, w],
    "prompt_embeds" [B, L, D], "index" [B]}`` (float32), read from the shards on access."""

    def __init__(self, directory: str | os.PathLike, key: str):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, key)
        self.key = key
        self.shard_size = self.manifest["shard_size"]
        self._shards: dict[Path, MappedShard] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # a DataLoader worker started by "spawn" maps the shards itself
        return {**self.__dict__, "_shards": {}}

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    @property
    def num_shards(self) -> int:
        return self.manifest["num_sample_shards"] + self.manifest["num_text_shards"]

    def _shard(self, path: Path) -> MappedShard:
        """The shard, verified (``load_verified_shard``) and mapped the first time this process uses it."""
        if self._pid != os.getpid():  # a forked DataLoader worker maps its own
            self._shards, self._pid = {}, os.getpid()
        if path not in self._shards:
            load_verified_shard(path, self.key)
            self._shards[path] = MappedShard(path)
        return self._shards[path]

    def _gather(self, kind: str, names: Sequence[str], indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` of the ``kind`` shards' tensors ``names``, in the order of ``indices``: one sorted
        gather per shard."""
        shards, rows = np.divmod(indices, self.shard_size)
        gathered = {}
        for shard in np.unique(shards):
            positions = np.flatnonzero(shards == shard)
            unique_rows, inverse = np.unique(rows[positions], return_inverse=True)
            shard_file = self._shard(shard_path(self.directory, kind, int(shard)))
            for name in names:
                values = shard_file.gather(name, unique_rows)
                if name not in gathered:
                    gathered[name] = np.empty((len(indices), *values.shape[1:]), dtype=values.dtype)
                gathered[name][positions] = values[inverse]
        return gathered

    def __getitems__(self, indices: Sequence[int]) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices out of range for a cache of {len(self)} samples")
        grounding = GROUNDING_TENSORS if self.manifest.get("grounding") else ()
        samples = self._gather("samples", ("latent_mean", "latent_std", "caption_ids", *grounding), indices)
        text = self._gather("text", ("text_embeds",), samples["caption_ids"])
        return {
            "latent_mean": torch.from_numpy(samples["latent_mean"]).float(),  # [B, C, h, w]
            "latent_std": torch.from_numpy(samples["latent_std"]).float(),
            "prompt_embeds": torch.from_numpy(text["text_embeds"]).float(),  # [B, L, D]
            "index": torch.from_numpy(indices),
            **{name: torch.from_numpy(samples[name]) for name in grounding},  # [B, K], [B, K, h, w]
        }

    def __getitem__(self, index: int) -> dict:
        batch = self.__getitems__([index])
        return {name: values[0] for name, values in batch.items()}

    def empty_embeds(self) -> torch.Tensor:
        """Embedding of the empty prompt "", FloatTensor[L, D]."""
        return torch.from_numpy(self._shard(shard_path(self.directory, "text", 0)).gather("empty_embeds",
                                                                                           slice(None))).float()

    def fetch(self, batch: dict) -> dict:
        """The training batch of what the DataLoader gave: here the rows themselves (see `DeviceLatentCache`)."""
        return batch

    def size_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())

    def size_in_memory(self) -> int:
        """Bytes of the whole cache as stored: posteriors, caption rows, distinct text embeddings."""
        manifest = self.manifest
        item = STORAGE_DTYPES[manifest["storage_dtype"]].itemsize
        samples = manifest["num_samples"] * (2 * math.prod(manifest["latent_shape"]) * item + 8)
        if manifest.get("grounding"):
            samples += manifest["num_samples"] * (8 + math.prod(manifest["latent_shape"][1:])) * MAX_GROUNDED_TOKENS
        return samples + (manifest["num_captions"] + 1) * math.prod(manifest["text_shape"]) * item

    def read_all(self, kind: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors ``names`` of every ``kind`` shard (verified), concatenated in row order."""
        count = self.manifest["num_sample_shards" if kind == "samples" else "num_text_shards"]
        shards = [load_verified_shard(shard_path(self.directory, kind, i), self.key) for i in range(count)]
        return {name: torch.cat([shard[name] for shard in shards]) for name in names}


class DeviceLatentCache(torch.utils.data.Dataset):
    """A ``ShardedLatentCache`` held whole in ``device`` memory (in its storage dtype): the DataLoader gives each
    batch's indices only (``__getitems__``, no worker needed) and ``fetch`` gathers the rows on the device, the same
    values as the shards give (``latent_mean``, ``latent_std`` [B, C, h, w], ``prompt_embeds`` [B, L, D], float32,
    and the grounding targets when the cache has them)."""

    def __init__(self, cache: ShardedLatentCache, device: torch.device | str):
        self.device = torch.device(device)
        grounding = GROUNDING_TENSORS if cache.manifest.get("grounding") else ()
        samples = cache.read_all("samples", ("latent_mean", "latent_std", "caption_ids", *grounding))
        text = cache.read_all("text", ("text_embeds",))
        self.latent_mean, self.latent_std, self.caption_ids = (samples[name].to(self.device) for name in
                                                               ("latent_mean", "latent_std", "caption_ids"))
        self.grounding = {name: samples[name].to(self.device) for name in grounding}
        self.text_embeds = text["text_embeds"].to(self.device)
        self._empty_embeds = cache.empty_embeds().to(self.device)

    def __len__(self) -> int:
        return len(self.caption_ids)

    def __getitems__(self, indices: Sequence[int]) -> dict:
        return {"index": torch.as_tensor(indices, dtype=torch.int64)}

    def fetch(self, batch: dict) -> dict:
        index = batch["index"].to(self.device, non_blocking=True)
        return {"latent_mean": self.latent_mean[index].float(), "latent_std": self.latent_std[index].float(),
                "prompt_embeds": self.text_embeds[self.caption_ids[index]].float(), "index": index,
                **{name: values[index] for name, values in self.grounding.items()}}

    def empty_embeds(self) -> torch.Tensor:
        return self._empty_embeds


def device_cache_fits(cache: ShardedLatentCache, device: torch.device, share: float = 0.25) -> bool:
    """Whether the whole cache takes at most ``share`` of the free memory of a CUDA ``device``."""
    return device.type == "cuda" and cache.size_in_memory() <= share * torch.cuda.mem_get_info(device)[0]


def training_cache(cache: ShardedLatentCache, device: torch.device, on_device: bool | None):
    """The cache a run trains from: held on ``device`` (``DeviceLatentCache``) when ``on_device`` is True, or when
    it is None (the default) and ``device`` is a GPU the cache fits (``device_cache_fits``); else read from the
    shards."""
    if on_device or (on_device is None and device_cache_fits(cache, device)):
        return DeviceLatentCache(cache, device)
    return cache


def read_manifest(directory: Path, key: str) -> dict:
    """The manifest of a finished cache directory, checked against ``key`` and against the directory's name."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"Cache manifest {path} is unreadable ({error}): delete {directory} and run again.") from None
    if not str(manifest.get("key", "")).startswith(directory.name.rsplit("-", 1)[-1]):
        raise ValueError(f"Cache manifest {path} has key {manifest.get('key')}, which does not match its directory "
                         f"name {directory.name}: the directory was renamed or copied over; delete it and run again.")
    if manifest["key"] != key or manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"Cache {directory} was computed for other inputs (key {manifest['key']}, format "
                         f"{manifest.get('format_version')}; expected {key}, format {CACHE_FORMAT_VERSION}): delete "
                         "it and run again.")
    return manifest


# ------------------------------------------------------------------------------------------------ building


def shards_of(num_rows: int, shard_size: int, process_index: int, num_processes: int) -> list[int]:
    """The shards process ``process_index`` of ``num_processes`` computes: ``p, p + n, p + 2n, ...``."""
    return list(range(process_index, math.ceil(num_rows / shard_size), num_processes))


@torch.no_grad()
def compute_sample_shard(dataset, collate_fn: Callable, vae, caption_rows: dict[str, int], start: int, stop: int,
                         batch_size: int, dtype: torch.dtype, num_workers: int = 0,
                         grounding: Callable | None = None) -> dict[str, torch.Tensor]:
    """VAE posteriors and caption rows of samples [start, stop), in batches of ``batch_size`` from ``start`` (made
    by ``num_workers`` DataLoader workers, in order), and with ``grounding`` (``grounding.grounding_encoder``)
    their grounding targets."""
    subset = torch.utils.data.Subset(dataset, range(start, stop))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                                         num_workers=num_workers)
    means, stds, ids, targets = [], [], [], []
    for batch in loader:
        mean, std = encode_posterior(vae, batch["pixel_values"])
        means.append(mean)
        stds.append(std)
        if grounding is not None:
            targets.append(grounding(batch["captions"], batch.get("groundings") or [None] * len(batch["captions"])))
        for caption in batch["captions"]:
            if caption not in caption_rows:
                raise ValueError(f"The caption {caption!r} of the training data changed while the cache was built: "
                                 "run again on unchanged data.")
            ids.append(caption_rows[caption])
    grounded = {name: torch.cat([target[name] for target in targets]) for name in GROUNDING_TENSORS} if targets else {}
    return {"latent_mean": torch.cat(means).to(dtype), "latent_std": torch.cat(stds).to(dtype),
            "caption_ids": torch.tensor(ids, dtype=torch.long), **grounded}


def agree_across_processes(accelerator, num_samples: int, key: str, complete: bool) -> bool:
    """Whether every process found the cache complete; but first, stop every process with the same error, before
    any of them waits for the others, when they do not see the same data or frozen models (a difference would
    otherwise corrupt the cache or leave a process waiting at a barrier forever)."""
    if accelerator.num_processes == 1:
        return complete
    mine = torch.tensor([[num_samples, int(key[:15], 16), int(complete)]], dtype=torch.long, device=accelerator.device)
    everyone = accelerator.gather(mine).cpu().tolist()
    for index, (count, key_prefix, _) in enumerate(everyone):
        if count != everyone[0][0]:
            raise ValueError(f"Process {index} has {count} training samples but process 0 has {everyone[0][0]}: "
                             "every process must read the same data (same --train_data_dir / flags on every "
                             "machine).")
        if key_prefix != everyone[0][1]:
            raise ValueError(f"Process {index} computed another cache key than process 0: every process must load "
                             "the same --vae, --text_encoder and data.")
    return all(found for _, _, found in everyone)


def build_cache(directory: Path, key: str, dataset, collate_fn: Callable, vae, text_encoder, tokenizer,
                captions: Sequence[str], shard_size: int, batch_size: int, dtype: torch.dtype,
                process_index: int = 0, num_processes: int = 1, num_workers: int = 0,
                grounding: Callable | None = None) -> int:
    """Compute this process's missing shards (``shards_of``) of the cache in ``directory``; returns how many.

    ``captions`` are the samples' captions in dataset order (``dataset_captions``); their sorted distinct values
    are the text rows."""
    distinct = sorted(set(captions))
    caption_rows = {caption: row for row, caption in enumerate(distinct)}
    computed = 0
    for shard in shards_of(len(dataset), shard_size, process_index, num_processes):
        path = shard_path(directory, "samples", shard)
        if path.is_file():
            continue
        remove_partial_files(path)
        start, stop = shard * shard_size, min((shard + 1) * shard_size, len(dataset))
        write_shard(path, compute_sample_shard(dataset, collate_fn, vae, caption_rows, start, stop, batch_size,
                                               dtype, num_workers, grounding), key)
        computed += 1
    for shard in shards_of(len(distinct), shard_size, process_index, num_processes):
        path = shard_path(directory, "text", shard)
        if path.is_file():
            continue
        remove_partial_files(path)
        rows = distinct[shard * shard_size:(shard + 1) * shard_size]
        tensors = {"text_embeds": encode_captions(text_encoder, tokenizer, rows, batch_size)}
        if shard == 0:
            tensors["empty_embeds"] = encode_captions(text_encoder, tokenizer, [""])[0]
        write_shard(path, tensors, key)
        computed += 1
    return computed


def write_manifest(directory: Path, key: str, split: str, num_samples: int, num_captions: int, shard_size: int,
                   storage_dtype: str, grounding: bool = False) -> dict:
    """Write ``manifest.json`` of a cache whose shards are all written; the shapes are read from shard 0."""
    samples, _ = read_header(shard_path(directory, "samples", 0))
    text, _ = read_header(shard_path(directory, "text", 0))
    manifest = {
        "key": key, "format_version": CACHE_FORMAT_VERSION, "split": split, "num_samples": num_samples,
        "shard_size": shard_size, "num_sample_shards": math.ceil(num_samples / shard_size),
        "num_text_shards": math.ceil(num_captions / shard_size), "storage_dtype": storage_dtype,
        "latent_shape": samples["latent_mean"]["shape"][1:], "text_shape": text["empty_embeds"]["shape"],
        "num_captions": num_captions, "grounding": grounding,
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def missing_shards(directory: Path, manifest: dict) -> list[Path]:
    paths = [shard_path(directory, "samples", i) for i in range(manifest["num_sample_shards"])]
    paths += [shard_path(directory, "text", i) for i in range(manifest["num_text_shards"])]
    return [path for path in paths if not path.is_file()]


def default_cache_dir(args) -> Path:
    """``--cache_dir``, else OUTPUT_DIR/../cache."""
    return Path(args.cache_dir) if args.cache_dir else Path(args.output_dir).resolve().parent / "cache"


def open_or_build_cache(config, accelerator, dataset, vae, text_encoder, tokenizer, frozen_fingerprints: dict,
                        data_key: str, split: str = "train", grounding: Callable | None = None) -> ShardedLatentCache:
    """The cache of the U-Net stage ``config`` (``UNetTrainingConfig``: ``cache_dir``, ``cache_dtype``,
    ``cache_shard_size``, ``cache_batch_size``) over ``dataset``: reused when it is complete, else its missing
    shards are computed by all processes in parallel (``build_cache``), then every process opens it. With
    ``grounding`` (``grounding.grounding_encoder``) the sample shards also hold the grounding targets (another key).

    Called by ``training/train_unet.py`` and ``training/cache_latents.py``, so both compute the same key."""
    args = config.training
    storage = f"{args.cache_dtype}/{args.cache_shard_size}"
    if grounding is not None:
        storage += f"/grounding/{config.data.grounding_column}"
    key = cache_key(frozen_fingerprints, data_key, storage)
    directory = cache_directory(check_writable(default_cache_dir(args), "--cache_dir"), split, key)
    manifest_path = directory / MANIFEST
    complete = False
    if manifest_path.is_file():
        manifest = read_manifest(directory, key)
        if manifest["num_samples"] != len(dataset):
            raise ValueError(f"Cache manifest {manifest_path} counts {manifest['num_samples']} samples but the data "
                             f"has {len(dataset)}: delete {directory} and run again.")
        complete = not missing_shards(directory, manifest)
    if agree_across_processes(accelerator, len(dataset), key, complete):
        cache = ShardedLatentCache(directory, key)
        accelerator.print(f"Reusing latent/text cache {directory} ({len(cache)} samples, {cache.num_shards} shards).")
        return cache
    directory.mkdir(parents=True, exist_ok=True)
    captions = dataset_captions(dataset)
    num_captions = len(set(captions))
    accelerator.print(f"Computing latent/text cache {directory}: {len(dataset)} samples, {num_captions} distinct "
                      f"captions, shards of {args.cache_shard_size}, {accelerator.num_processes} process(es); "
                      "finished shards are kept.")
    workers = resolve_fast_path(args, accelerator.device).dataloader_num_workers  # render images in workers on a GPU
    computed = build_cache(directory, key, dataset, collate_examples, vae, text_encoder, tokenizer, captions,
                           args.cache_shard_size, args.cache_batch_size, STORAGE_DTYPES[args.cache_dtype],
                           accelerator.process_index, accelerator.num_processes, workers, grounding)
    if accelerator.num_processes > 1:
        accelerator.print(f"Process {accelerator.process_index} computed {computed} shard(s); waiting for the others.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not manifest_path.is_file():
        write_manifest(directory, key, split, len(dataset), num_captions, args.cache_shard_size, args.cache_dtype,
                       grounding is not None)
    accelerator.wait_for_everyone()
    return ShardedLatentCache(directory, key)


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor, scaling_factor: float, shift_factor: float | None = None
) -> torch.Tensor:
    """z_0 = (mean + std · ε - shift_factor) · scaling_factor: a fresh draw from the cached posterior, scaled
    as the pipeline expects (it decodes ``z_0 / scaling_factor + shift_factor``)."""
    latents = mean + std * noise
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor

"""In-domain prompt alignment with the stage-1 contrastive towers (the user's own CLIPScore).

Stage 1 trains a text tower and an image tower into one joint space (``ldm_pipeline.text_encoder``). For an
image ``x`` and a caption ``c`` the alignment is CLIPScore's cosine (Hessel et al., 2021, arXiv:2104.08718, Eq. 1
without the rescaling):

    t(c) = normalize(W_text · pool(text_encoder(c)))        v(x) = normalize(image_tower(x))
    cos(x, c) = <v(x), t(c)>

and the retrieval of the caption: ``x`` ranks all ``U`` distinct held-out captions by ``cos``; top-k is a hit
when its own caption is among the first k (chance k / U).

What it shows and what it cannot: the U-Net was conditioned on this same text encoder, so a generation can
score high by matching whatever the encoder attends to, including its blind spots (two captions the encoder
confuses are also confused by the score). Read it against the real held-out images (the ceiling: what these
towers give true pairs) and shuffled captions (the floor), never as an absolute measure of correctness.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm_pipeline.prompt_encoding import tokenize_prompts
from ldm_pipeline.text_encoder import (
    TEXT_PROJECTION_FILE,
    ImageTower,
    load_pretrained_text_encoder,
    pooled_text_features,
    save_text_projection,
)

RIDGE = 1e-3


def fit_text_projection(pooled_text: torch.Tensor, image_embeds: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Ridge least squares ``W = argmin ||T Wᵀ - V||² + ridge · N · ||W||²`` = ``Vᵀ T (TᵀT + ridge · N · I)⁻¹``.

    ``T`` [N, H]: pooled text features of training captions, ``V`` [N, P]: the unit image embeddings of their
    images. Stands in for the trained ``W_text`` when a text stage was saved without it.
    """
    text = pooled_text.double()
    gram = text.T @ text + ridge * len(text) * torch.eye(text.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, text.T @ image_embeds.double()).T.float()  # [P, H]


@dataclass
class StageOneTowers:
    """The stage-1 text encoder, tokenizer, text projection and image tower, in evaluation mode.

    ``projection_source`` says where ``text_projection`` came from (``"saved"`` or the least-squares refit).
    """

    tokenizer: object
    text_encoder: torch.nn.Module
    image_tower: ImageTower
    text_projection: torch.Tensor | None
    projection_source: str = "saved"
    batch_size: int = 64

    @torch.no_grad()
    def pooled_text(self, captions: Sequence[str]) -> torch.Tensor:
        """[N, H] pooled text features (``pooled_text_features``)."""
        chunks = []
        for first in range(0, len(captions), self.batch_size):
            tokens = tokenize_prompts(self.tokenizer, list(captions[first : first + self.batch_size]))
            chunks.append(pooled_text_features(self.text_encoder, tokens["input_ids"], tokens["attention_mask"]))
        return torch.cat(chunks).float()

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """[N, P] unit vectors ``t(c)``."""
        if self.text_projection is None:
            raise ValueError("The towers have no text projection: load them with load_stage_one_towers(..., "
                             "fit_dataset=TRAIN_DATASET) to refit it.")
        return F.normalize(self.pooled_text(captions) @ self.text_projection.T, dim=-1)

    @torch.no_grad()
    def embed_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v, features)`` of images in [-1, 1] [N, 3, H, W]: unit joint embeddings [N, P] and the image
        tower's pooled features before its projection [N, C · pooled_size²] (the feature space of FID,
        precision/recall and memorization, as Inception's pool features are for the usual FID)."""
        joint, features = [], []
        for first in range(0, len(pixel_values), self.batch_size):
            pooled = self.image_tower.features(pixel_values[first : first + self.batch_size].float())
            features.append(pooled)
            joint.append(F.normalize(self.image_tower.projection(pooled), dim=-1))
        return torch.cat(joint), torch.cat(features)


def load_stage_one_towers(text_stage: str | Path, fit_dataset=None, max_fit_pairs: int = 2048,
                          batch_size: int = 64) -> StageOneTowers:
    """The towers of a text-stage output dir (``tokenizer/``, ``text_encoder/``, ``image_tower/``).

    ``W_text`` is read from ``text_projection.safetensors``; a stage saved without it gets the ridge fit of
    :func:`fit_text_projection` on the first ``max_fit_pairs`` items of ``fit_dataset`` (the training split).
    """
    root = Path(text_stage)
    missing = [name for name in ("tokenizer", "text_encoder", "image_tower") if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"--text_stage {root}: no {', '.join(m + '/' for m in missing)} there. Pass the "
                                "output dir of training/train_text_encoder.py (it writes all three).")
    tokenizer, text_encoder = load_pretrained_text_encoder(root)
    towers = StageOneTowers(tokenizer, text_encoder.eval(), ImageTower.from_pretrained(root / "image_tower").eval(),
                            None, batch_size=batch_size)
    projection_path = root / TEXT_PROJECTION_FILE
    if projection_path.is_file():
        from safetensors.torch import load_file

        towers.text_projection = load_file(str(projection_path))["weight"].float()
        return towers
    if fit_dataset is None:
        raise FileNotFoundError(f"{projection_path} not found and no training data to refit it: pass the training "
                                "data flags (--train_data_dir ...) or retrain the text stage.")
    items = [fit_dataset[i] for i in range(min(len(fit_dataset), max_fit_pairs))]
    image_embeds, _ = towers.embed_images(torch.stack([item["pixel_values"] for item in items]))
    towers.text_projection = fit_text_projection(towers.pooled_text([item["caption"] for item in items]), image_embeds)
    towers.projection_source = f"refit by ridge least squares on {len(items)} training pairs (no {TEXT_PROJECTION_FILE})"
    return towers


def shuffled_captions(captions: Sequence[str], seed: int) -> list[str]:
    """Every caption moved to another position: a seeded random cyclic derangement of the indices."""
    order = np.random.default_rng(seed).permutation(len(captions))
    shuffled = list(captions)
    for position, index in enumerate(order):
        shuffled[index] = captions[order[(position + 1) % len(order)]]
    return shuffled


def alignment_scores(image_embeds: torch.Tensor, captions: Sequence[str], caption_pool: Sequence[str],
                     pool_embeds: torch.Tensor, k: Sequence[int] = (1, 5)) -> dict:
    """Per image ``i``: ``cos(x_i, c_i)`` and the rank of ``c_i`` among the distinct captions of ``caption_pool``.

    ``image_embeds`` [N, P] and ``pool_embeds`` [U, P] are unit vectors, ``caption_pool`` the U distinct captions
    (every ``c_i`` is one of them). Returns the means (``cosine``, ``top1``, ``top5``, chance ``chance_top1``,
    ``chance_top5``) and the per-image ``cosines`` and ``ranks`` (1 = best).
    """
    index = {caption: position for position, caption in enumerate(caption_pool)}
    if len(index) != len(caption_pool):
        raise ValueError("caption_pool must hold distinct captions.")
    targets = torch.tensor([index[caption] for caption in captions])
    similarity = image_embeds.float() @ pool_embeds.float().T  # [N, U]
    own = similarity.gather(1, targets[:, None])[:, 0]
    ranks = 1 + (similarity > own[:, None]).sum(dim=1)
    summary = {"cosine": own.mean().item()}
    summary.update({f"top{kk}": (ranks <= kk).float().mean().item() for kk in k})
    summary.update({f"chance_top{kk}": min(kk, len(caption_pool)) / len(caption_pool) for kk in k})
    return {**summary, "cosines": own.tolist(), "ranks": ranks.tolist()}


def prompt_alignment(towers: StageOneTowers, generated_embeds: torch.Tensor, real_embeds: torch.Tensor,
                     captions: Sequence[str], seed: int = 0) -> dict:
    """Alignment of generated images to their captions, beside the ceiling (the real held-out images of those
    captions) and the floor (the real images against :func:`shuffled_captions`). ``generated_embeds`` and
    ``real_embeds`` [N, P] are ``towers.embed_images(...)[0]``; image i belongs to ``captions[i]``.
    Returns ``{"generated": ..., "real": ..., "shuffled": ..., "num_captions": U}``."""
    pool = list(dict.fromkeys(captions))
    pool_embeds = towers.embed_texts(pool)
    return {
        "generated": alignment_scores(generated_embeds, captions, pool, pool_embeds),
        "real": alignment_scores(real_embeds, captions, pool, pool_embeds),
        "shuffled": alignment_scores(real_embeds, shuffled_captions(captions, seed), pool, pool_embeds),
        "num_captions": len(pool),
    }

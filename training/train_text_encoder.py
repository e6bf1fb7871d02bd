"""Stage 1: train a tokenizer and a text encoder (CLIP or T5) with a CLIP contrastive objective.

    accelerate launch -q --config_file configs/accelerate/single_process.yaml \\
        training/train_text_encoder.py --config configs/demo/text_encoder.json --output_dir OUT
        [--train_data_dir DIR | --dataset_name NAME] [--pretrained_text_encoder NAME_OR_PATH]

Writes OUT/tokenizer, OUT/text_encoder (safetensors), OUT/image_tower and OUT/text_projection.safetensors (the
image-text model's other parts, used by ldm-eval --text_stage),
OUT/text_encoder_metrics.json (held-out text-to-image retrieval top-1/top-5), OUT/data_split.json (what is held out,
``ldm_pipeline.data.split``), OUT/train_log.jsonl, tensorboard logs
in OUT/logs and resumable states in OUT/checkpoints. With --hard_negatives each shapes caption with a binding/order
counterpart ("a red star and a green box" -> "a green star and a red box") adds it as a text no image matches
(NegCLIP). With --token_region_weight W > 0 the loss adds W times FILIP's token-wise loss, which asks each token
state to find its region of the image. With --pretrained_text_encoder nothing is trained: the named CLIP or T5 text encoder and its tokenizer
are copied to OUT/text_encoder and OUT/tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoTokenizer

from ldm_pipeline.config import load_stage_config
from ldm_pipeline.data import build_dataset, collate_examples, dataset_captions
from ldm_pipeline.data.split import record_stage_split
from ldm_pipeline.errors import run_cli
from ldm_pipeline.model_card import write_model_card
from ldm_pipeline.prompt_encoding import tokenize_prompts
from ldm_pipeline.text_encoder import (
    CollateWithTokens,
    build_contrastive_model,
    contrastive_loss,
    evaluate_retrieval,
    gather_captions,
    gather_rows,
    load_pretrained_text_encoder,
    mask_words,
    masked_token_loss,
    own_hard_negatives,
    same_caption_matrix,
    save_text_projection,
    token_region_loss,
    train_tokenizer,
)
from ldm_pipeline.durable import check_writable
from ldm_pipeline.run_lock import acquire_run_lock
from ldm_pipeline.trainer import StageTrainer


def copy_pretrained(name_or_path: str, output_dir: Path) -> dict:
    """Copy a pretrained CLIP/T5 text encoder and its tokenizer into the stage layout (no training)."""
    tokenizer, text_encoder = load_pretrained_text_encoder(name_or_path)
    text_encoder.save_pretrained(output_dir / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(output_dir / "tokenizer")
    metrics = {"pretrained_text_encoder": name_or_path, "architecture": text_encoder.config.model_type}
    (output_dir / "text_encoder_metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(output_dir, base_models={"text_encoder": name_or_path})
    print(f"Copied pretrained {text_encoder.config.model_type} text encoder {name_or_path} to "
          f"{output_dir / 'text_encoder'} and {output_dir / 'tokenizer'} (no training).")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    config = load_stage_config("text_encoder", argv, __doc__)
    args, data = config.training, config.data
    if args.pretrained_text_encoder:
        state, output_dir = PartialState(), check_writable(args.output_dir, "--output_dir")
        lock = acquire_run_lock(output_dir, state)
        metrics = copy_pretrained(args.pretrained_text_encoder, output_dir) if state.is_main_process else {}
        state.wait_for_everyone()
        lock.release()
        return metrics
    trainer = StageTrainer(config)
    device = trainer.device

    # 1. Data: image-caption pairs; the held-out split is only read by the main process.
    train_dataset = build_dataset(data, split="train")
    record_stage_split(data, trainer.output_dir, trainer.is_main_process)

    # 2. Tokenizer, trained on the training captions by the main process, then loaded by every process.
    #    A resumed run keeps the tokenizer its checkpoint was trained with.
    tokenizer_dir = trainer.output_dir / "tokenizer"
    reuse_tokenizer = bool(args.resume_from_checkpoint) and (tokenizer_dir / "tokenizer_config.json").exists()
    if trainer.is_main_process and not reuse_tokenizer:
        tokenizer_config = config.model.get("tokenizer", {})
        tokenizer = train_tokenizer(dataset_captions(train_dataset),
                                    vocab_size=tokenizer_config.get("vocab_size", 1000),
                                    model_max_length=tokenizer_config.get("model_max_length", 32),
                                    min_frequency=tokenizer_config.get("min_frequency", 1))
        tokenizer.save_pretrained(tokenizer_dir)
    trainer.accelerator.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    # 3. Model: text tower + image tower joined in a shared embedding space.
    token_regions, masked_tokens = args.token_region_weight > 0, args.masked_token_weight > 0
    if masked_tokens and tokenizer.mask_token_id is None:
        raise ValueError(f"--masked_token_weight needs a tokenizer with a mask token; {tokenizer_dir} has none: "
                         "train a new one (start without --resume_from_checkpoint) or set --masked_token_weight 0.")
    model = build_contrastive_model(config.model, tokenizer, token_region_head=token_regions,
                                    masked_token_head=masked_tokens)
    if args.gradient_checkpointing:
        model.text_encoder.gradient_checkpointing_enable()
    trainer.print(f"{config.model['architecture']} text encoder: "
                  f"{sum(p.numel() for p in model.text_encoder.parameters()) / 1e6:.2f} M parameters, vocabulary "
                  f"{len(tokenizer)}, max length {tokenizer.model_max_length}")

    # 4. Optimizer, learning-rate schedule, data loaders.
    optimizer = trainer.adamw(model.parameters())
    lr_scheduler = trainer.lr_schedule(optimizer)
    train_dataloader, sampler = trainer.dataloader(train_dataset, CollateWithTokens(tokenizer))
    model, optimizer, train_dataloader, lr_scheduler = trainer.prepare(model, optimizer, train_dataloader, lr_scheduler)
    validation_dataloader = torch.utils.data.DataLoader(
        build_dataset(data, split="validation"), batch_size=args.validation_batch_size or args.train_batch_size,
        collate_fn=collate_examples) if trainer.is_main_process else None

    def validate() -> dict:
        metrics = evaluate_retrieval(trainer.accelerator.unwrap_model(model), tokenizer, validation_dataloader, device)
        trainer.log_metrics(metrics)
        return metrics

    # 5. Training loop.
    trainer.start(dataset=train_dataset)
    model.train()
    for batch in trainer.batches(train_dataloader, sampler):
        with trainer.accelerator.accumulate(model):
            captions = gather_captions(trainer.accelerator, batch["captions"])
            negatives, num_negatives = (own_hard_negatives(trainer.accelerator, captions, len(batch["captions"]))
                                        if args.hard_negatives else ([], 0))
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # tokenized by the loader
            num_own = len(batch["captions"])
            if negatives:
                tokens = tokenize_prompts(tokenizer, negatives)
                input_ids = torch.cat([input_ids, tokens["input_ids"].to(device, non_blocking=True)])
                attention_mask = torch.cat([attention_mask, tokens["attention_mask"].to(device, non_blocking=True)])
            masked_ids = targets = None
            if masked_tokens:
                uniform = trainer.global_randn((num_own, input_ids.shape[1], 3), trainer.generator(), draw=torch.rand)
                masked_ids, targets = mask_words(input_ids[:num_own], attention_mask[:num_own],
                                                 tokenizer.all_special_ids, tokenizer.mask_token_id,
                                                 args.masked_token_probability, uniform, len(tokenizer))  # [B, L] each
            output = model(input_ids, attention_mask, batch["pixel_values"], masked_input_ids=masked_ids)
            text_embeds, negative_embeds = output.text_embeds[:num_own], None
            if args.hard_negatives:
                negative_embeds = gather_rows(trainer.accelerator, output.text_embeds[num_own:])
            text_embeds = gather_rows(trainer.accelerator, text_embeds)  # [B, D] -> [n·B, D]
            image_embeds = gather_rows(trainer.accelerator, output.image_embeds)
            same_caption = same_caption_matrix(captions)
            loss = contrastive_loss(text_embeds, image_embeds, output.logit_scale, same_caption, negative_embeds)
            if token_regions:
                token_mask = attention_mask[:num_own].float()
                token_loss = token_region_loss(gather_rows(trainer.accelerator, output.token_embeds),
                                               gather_rows(trainer.accelerator, token_mask),
                                               gather_rows(trainer.accelerator, output.region_embeds),
                                               output.token_logit_scale, same_caption)
                loss = loss + args.token_region_weight * token_loss
            backward_loss = loss  # the global batch's loss, through this process's rows (`gather_rows`)
            if masked_tokens:
                # This process's share of the global batch's mean over masked words: the n shares add up to it.
                num_masked = trainer.accelerator.reduce((targets != -100).sum(), "sum")
                word_share = masked_token_loss(output.masked_token_logits, targets, num_masked)
                word_loss = word_share * trainer.accelerator.num_processes  # its mean over processes: the global mean
                loss = loss + args.masked_token_weight * word_loss
                backward_loss = backward_loss + args.masked_token_weight * word_share
            trainer.backward(backward_loss * trainer.accelerator.num_processes, model)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        logged = {"hard_negatives": num_negatives} if args.hard_negatives else {}
        if token_regions:
            logged["token_region_loss"] = token_loss
        if masked_tokens:
            logged["masked_token_loss"] = word_loss
        if (trainer.end_micro_step(loss=loss, lr=lr_scheduler.get_last_lr()[0], logit_scale=output.logit_scale,
                                    **logged)
                and trainer.validation_due()):
            metrics = trainer.on_main_process(validate)
            if metrics:
                trainer.progress.write(f"step {trainer.global_step}: retrieval top1={metrics['top1']:.3f} "
                                       f"top5={metrics['top5']:.3f}")

    # 6. Save the text encoder (and the training-only image tower), report held-out retrieval.
    def save() -> dict:
        trained = trainer.accelerator.unwrap_model(model)
        trained.text_encoder.save_pretrained(trainer.output_dir / "text_encoder", safe_serialization=True)
        trained.image_tower.save_pretrained(trainer.output_dir / "image_tower", safe_serialization=True)
        save_text_projection(trained, trainer.output_dir)
        metrics = validate()
        print(f"retrieval top1={metrics['top1']:.3f} top5={metrics['top5']:.3f} ({metrics['num_pairs']} held-out "
              f"pairs; chance top1={metrics['chance_top1']:.3f})", flush=True)
        return {**metrics, "architecture": config.model["architecture"]}

    return trainer.finish(save)


if __name__ == "__main__":
    run_cli(main, prog="train_text_encoder.py")

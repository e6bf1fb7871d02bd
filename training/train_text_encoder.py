"""Stage 1: train a tokenizer and a text encoder (CLIP or T5) with a CLIP contrastive objective.

    accelerate launch training/train_text_encoder.py --config configs/demo/text_encoder.json --output_dir OUT
        [--train_data_dir DIR | --dataset_name NAME] [--pretrained_text_encoder NAME_OR_PATH]

Writes OUT/tokenizer, OUT/text_encoder (safetensors), OUT/image_tower (the training-only image side),
OUT/text_encoder_metrics.json (held-out text-to-image retrieval top-1/top-5), tensorboard logs in OUT/logs and
resumable states in OUT/checkpoints. With --pretrained_text_encoder nothing is trained: the named CLIP or T5
text encoder and its tokenizer are copied to OUT/text_encoder and OUT/tokenizer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ldm_pipeline.data import add_data_args, build_dataset, collate_examples
from ldm_pipeline.prompt_encoding import tokenize_prompts
from ldm_pipeline.text_encoder import (
    build_contrastive_model,
    contrastive_loss,
    load_pretrained_text_encoder,
    retrieval_accuracy,
    same_caption_matrix,
    train_tokenizer,
)
from ldm_pipeline.training_utils import (
    EpochShuffleSampler,
    JsonlLogger,
    add_training_args,
    check_finite_loss,
    init_trackers,
    make_accelerator,
    parse_args,
    resume_from_checkpoint,
    save_checkpoint,
    train_batches,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    add_data_args(parser)
    parser.add_argument("--pretrained_text_encoder", type=str, default=None,
                        help="Skip training: copy this CLIP/T5 text encoder and tokenizer (Hub name or directory) to OUT.")
    parser.add_argument("--validation_batch_size", type=int, default=None, help="Batch size for held-out retrieval.")
    return parser


def dataset_captions(dataset) -> list[str]:
    """The captions of a dataset's items, in item order, read without decoding any image when possible."""
    if hasattr(dataset, "shapes"):  # built-in shapes: captions come from the sampled scenes
        return [dataset.shapes.scene(index).caption for index in range(len(dataset))]
    if hasattr(dataset, "rows") and hasattr(dataset, "captions"):  # user data: captions of this split's rows only
        return [dataset.captions[row] for row in dataset.rows]
    return [dataset[index]["caption"] for index in range(len(dataset))]


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, dataloader, device) -> dict:
    """Held-out text-to-image retrieval: every caption ranks every held-out image (see ``retrieval_accuracy``)."""
    was_training = model.training
    model.eval()
    text_embeds, image_embeds, captions = [], [], []
    for batch in dataloader:
        tokens = tokenize_prompts(tokenizer, batch["captions"])
        text_embeds.append(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).cpu())
        image_embeds.append(model.encode_image(batch["pixel_values"].to(device)).cpu())
        captions += batch["captions"]
    model.train(was_training)
    metrics = retrieval_accuracy(torch.cat(text_embeds), torch.cat(image_embeds), captions, k=(1, 5))
    return {**metrics, "num_pairs": len(captions)}


def copy_pretrained(args) -> None:
    tokenizer, text_encoder = load_pretrained_text_encoder(args.pretrained_text_encoder)
    output_dir = Path(args.output_dir)
    text_encoder.save_pretrained(output_dir / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(output_dir / "tokenizer")
    metrics = {"pretrained_text_encoder": args.pretrained_text_encoder, "architecture": text_encoder.config.model_type}
    (output_dir / "text_encoder_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"Copied pretrained {text_encoder.config.model_type} text encoder {args.pretrained_text_encoder} "
          f"to {output_dir / 'text_encoder'} and {output_dir / 'tokenizer'} (no training).")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    if args.validation_batch_size is None:
        args.validation_batch_size = args.train_batch_size
    accelerator = make_accelerator(args)
    output_dir = Path(args.output_dir)

    # 0. A pretrained text encoder replaces the whole stage.
    if args.pretrained_text_encoder:
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            copy_pretrained(args)
        accelerator.wait_for_everyone()
        return {}

    # 1. Data: image-caption pairs; the held-out split is only read by the main process.
    train_dataset = build_dataset(args, split="train")

    # 2. Tokenizer, trained on the training captions by the main process, then loaded by every process.
    #    A resumed run keeps the tokenizer its checkpoint was trained with.
    tokenizer_dir = output_dir / "tokenizer"
    reuse_tokenizer = bool(args.resume_from_checkpoint) and (tokenizer_dir / "tokenizer_config.json").exists()
    if accelerator.is_main_process and not reuse_tokenizer:
        tokenizer_config = args.model_config.get("tokenizer", {})
        tokenizer = train_tokenizer(
            dataset_captions(train_dataset),
            vocab_size=tokenizer_config.get("vocab_size", 1000),
            model_max_length=tokenizer_config.get("model_max_length", 32),
            min_frequency=tokenizer_config.get("min_frequency", 1),
        )
        tokenizer.save_pretrained(tokenizer_dir)
    accelerator.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    # 3. Model: text tower + image tower joined in a shared embedding space.
    model = build_contrastive_model(args.model_config, tokenizer)
    if args.gradient_checkpointing:
        model.text_encoder.gradient_checkpointing_enable()
    num_parameters = sum(p.numel() for p in model.text_encoder.parameters())
    accelerator.print(f"{args.model_config['architecture']} text encoder: {num_parameters / 1e6:.2f} M parameters, "
                      f"vocabulary {len(tokenizer)}, max length {tokenizer.model_max_length}")

    # 4. Optimizer, learning-rate schedule, data loader.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    sampler = EpochShuffleSampler(len(train_dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate_examples,
        drop_last=True, num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # iterators draw their seed here, not from the global RNG
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)
    if accelerator.is_main_process:
        validation_dataloader = torch.utils.data.DataLoader(
            build_dataset(args, split="validation"), batch_size=args.validation_batch_size, collate_fn=collate_examples
        )

    # 5. Resume, trackers.
    global_step = resume_from_checkpoint(accelerator, args)
    init_trackers(accelerator, args, "text_encoder")
    history = JsonlLogger(output_dir / "logs" / "text_encoder_train.jsonl", accelerator, start_step=global_step)

    def validate(step: int) -> dict:
        metrics = evaluate_retrieval(accelerator.unwrap_model(model), tokenizer, validation_dataloader, accelerator.device)
        accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
        history.log(step=step, **{f"validation_{k}": v for k, v in metrics.items()})
        return metrics

    # 6. Training loop.
    accelerator.print(f"Training {args.max_train_steps} steps from step {global_step}: {len(train_dataset)} pairs, "
                      f"batch {args.train_batch_size} x {accelerator.num_processes} processes x "
                      f"{args.gradient_accumulation_steps} accumulation steps")
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="text encoder",
                    disable=not accelerator.is_local_main_process)
    model.train()
    start_time = time.perf_counter()
    accumulated_loss = 0.0
    for step, batch in train_batches(accelerator, train_dataloader, sampler, global_step, args.max_train_steps,
                                     args.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            tokens = tokenize_prompts(tokenizer, batch["captions"])
            text_embeds, image_embeds, logit_scale = model(
                tokens["input_ids"].to(accelerator.device), tokens["attention_mask"].to(accelerator.device),
                batch["pixel_values"],
            )
            loss = contrastive_loss(text_embeds, image_embeds, logit_scale, same_caption_matrix(batch["captions"]))
            check_finite_loss(loss, step)
            accumulated_loss += accelerator.reduce(loss.detach(), "mean").item() / args.gradient_accumulation_steps
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        if accelerator.sync_gradients:
            global_step += 1
            progress.update(1)
            logs = {"train/loss": accumulated_loss, "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/logit_scale": logit_scale.item()}
            progress.set_postfix(loss=f"{accumulated_loss:.3f}")
            accelerator.log(logs, step=global_step)
            history.log(step=global_step, loss=accumulated_loss)
            accumulated_loss = 0.0
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, global_step)
            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                if accelerator.is_main_process:
                    metrics = validate(global_step)
                    progress.write(f"step {global_step}: retrieval top1={metrics['top1']:.3f} top5={metrics['top5']:.3f}")
                accelerator.wait_for_everyone()
    progress.close()
    train_seconds = time.perf_counter() - start_time

    # 7. Save the text encoder (and the training-only image tower), report held-out retrieval.
    accelerator.wait_for_everyone()
    metrics = {}
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        trained.text_encoder.save_pretrained(output_dir / "text_encoder", safe_serialization=True)
        trained.image_tower.save_pretrained(output_dir / "image_tower", safe_serialization=True)
        metrics = {**validate(global_step), "architecture": args.model_config["architecture"],
                   "train_steps": global_step, "train_seconds_this_run": round(train_seconds, 1)}
        (output_dir / "text_encoder_metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"retrieval top1={metrics['top1']:.3f} top5={metrics['top5']:.3f} ({metrics['num_pairs']} held-out pairs; "
              f"chance top1={metrics['chance_top1']:.3f})", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()

import json

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from ldm_pipeline.training_utils import (
    EpochShuffleSampler,
    NonFiniteLossError,
    add_training_args,
    check_finite_loss,
    list_checkpoints,
    load_config,
    parse_args,
    resume_from_checkpoint,
    save_checkpoint,
    train_batches,
)


def _loader(accelerator, n=10, batch_size=3, seed=7):
    sampler = EpochShuffleSampler(n, seed)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, sampler=sampler, drop_last=True)
    return sampler, accelerator.prepare(loader)


def _indices(start, stop, accumulation=1):
    accelerator = Accelerator(cpu=True)
    sampler, loader = _loader(accelerator)
    return [(step, batch[0].tolist()) for step, batch in train_batches(accelerator, loader, sampler, start, stop, accumulation)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resumed_batches_continue_the_uninterrupted_sequence(accumulation):
    full = _indices(0, 7, accumulation)
    assert len(full) == 7 * accumulation
    assert _indices(0, 4, accumulation) + _indices(4, 7, accumulation) == full
    # epochs are reshuffled: 3 batches per epoch, epoch 1 differs from epoch 0
    assert [b for _, b in full[:3]] != [b for _, b in full[3:6]]
    assert [s for s, _ in full] == [m // accumulation for m in range(7 * accumulation)]


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(20, 1), EpochShuffleSampler(20, 1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert sorted(a) == list(range(20))


def _parser():
    import argparse

    parser = argparse.ArgumentParser()
    add_training_args(parser)
    parser.add_argument("--kl_weight", type=float, default=None)
    return parser


def test_parse_args_precedence(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"a": 1}, "training": {"learning_rate": 0.5, "kl_weight": 0.1,
                                                                   "extra_key": 3}, "data": {"resolution": 32}}))
    args = parse_args(_parser(), ["--config", str(config), "--learning_rate", "0.25", "--output_dir", str(tmp_path)])
    assert args.learning_rate == 0.25  # command line wins
    assert args.kl_weight == 0.1  # from config
    assert args.extra_key == 3 and args.resolution == 32
    assert args.train_batch_size == 16  # built-in default
    assert args.model_config == {"a": 1}
    assert args.logging_dir == str(tmp_path / "logs")


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad)
    bad.write_text("{}")
    with pytest.raises(ValueError, match="'model' section"):
        load_config(bad)


def test_checkpoints_save_prune_and_resume(tmp_path):
    import argparse

    args = argparse.Namespace(output_dir=str(tmp_path), checkpoints_total_limit=2, resume_from_checkpoint=None)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(accelerator, args, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not any(p.name.startswith(".partial") for p in (tmp_path / "checkpoints").iterdir())

    with torch.no_grad():
        model.weight.zero_()
    args.resume_from_checkpoint = "latest"
    assert resume_from_checkpoint(accelerator, args) == 3
    assert torch.all(model.weight == 3)

    args.resume_from_checkpoint = str(tmp_path / "checkpoints" / "checkpoint-9")
    with pytest.raises(FileNotFoundError, match="checkpoint-9"):
        resume_from_checkpoint(accelerator, args)


def test_non_finite_loss_is_an_error():
    check_finite_loss(torch.tensor(1.0), 0)
    with pytest.raises(NonFiniteLossError, match="step 5"):
        check_finite_loss(torch.tensor(float("nan")), 5)

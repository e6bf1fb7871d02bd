import json

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from ldm_pipeline.checkpoints import list_checkpoints, resolve_resume_path, save_checkpoint
from ldm_pipeline.data_order import EpochShuffleSampler, train_batches
from ldm_pipeline.trainer import NonFiniteLossError, check_finite_loss


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


def test_checkpoints_save_prune_and_resume(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not any(p.name.startswith(".partial") for p in (tmp_path / "checkpoints").iterdir())

    with torch.no_grad():
        model.weight.zero_()
    path = resolve_resume_path("latest", tmp_path)
    assert path.name == "checkpoint-3"
    accelerator.load_state(str(path))
    assert torch.all(model.weight == 3)
    with pytest.raises(FileNotFoundError, match="checkpoint-9"):
        resolve_resume_path(str(tmp_path / "checkpoints" / "checkpoint-9"), tmp_path)
    assert resolve_resume_path(None, tmp_path) is None
    assert resolve_resume_path("latest", tmp_path / "empty", print_fn=lambda *a: None) is None


def test_non_finite_loss_is_an_error():
    check_finite_loss(torch.tensor(1.0), 0)
    with pytest.raises(NonFiniteLossError, match="step 5"):
        check_finite_loss(torch.tensor(float("nan")), 5)


@pytest.mark.parametrize("name, kind, processes", [
    ("cpu_2_processes", "MULTI_GPU", 2), ("single_process", "NO", 1), ("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 8),
    ("fsdp", "FSDP", 8), ("deepspeed_zero2", "DEEPSPEED", 8), ("multi_node", "MULTI_GPU", 16)])
def test_accelerate_configs_parse_as_accelerate_reads_them(name, kind, processes):
    """configs/accelerate/*.yaml, as ``accelerate launch --config_file`` loads them (the CPU one is launched by
    tests/test_text_encoder.py::test_two_process_cpu_launch)."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind and config.num_processes == processes
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


def test_option_added_since_a_checkpoint_is_no_difference_at_its_default():
    from ldm_pipeline.config import load_stage_config
    from ldm_pipeline.checkpoints import fingerprint_differences

    config = load_stage_config("text_encoder", ["--config", "configs/tiny/text_encoder.json", "--output_dir", "x"])
    current = json.loads(json.dumps(config.fingerprint(), default=str))
    defaults = json.loads(json.dumps(config.option_defaults(), default=str))
    saved = json.loads(json.dumps(current))
    del saved["training"]["hard_negatives"], saved["data"]["streaming"]
    assert fingerprint_differences(saved, current, defaults=defaults) == []
    assert fingerprint_differences(saved, current) == ["data.streaming: None -> False",
                                                       "training.hard_negatives: None -> False"]
    current["training"]["hard_negatives"] = True
    assert fingerprint_differences(saved, current, defaults=defaults) == ["training.hard_negatives: None -> True"]


@pytest.mark.parametrize("loss_read_steps, expected", [
    (1, [(1, 1.0), (2, 2.0), (3, 6.0), (4, 4.0)]),  # a CPU's default: every step read
    (3, [(3, 3.0), (4, 4.0)]),                      # a GPU's way: the mean of the steps since the last read; the
])                                                  # rest before the final save
def test_losses_are_summed_where_they_are_and_read_every_loss_read_steps(tmp_path, loss_read_steps, expected):
    from accelerate.state import AcceleratorState

    from ldm_pipeline.config import load_stage_config
    from ldm_pipeline.durable import read_jsonl
    from ldm_pipeline.trainer import TRAIN_LOG, StageTrainer

    config = load_stage_config("vae", ["--config", "configs/tiny/vae.json", "--output_dir", str(tmp_path),
                                       "--report_to", "none", "--loss_read_steps", str(loss_read_steps)])
    try:
        trainer = StageTrainer(config)
        assert trainer.fast.loss_read_steps == loss_read_steps and not trainer.fast.cuda
        assert config.training.mixed_precision == "no", "auto resolves to fp32 on a CPU (and is fingerprinted so)"
        trainer.start()
        for value in (1.0, 2.0, 6.0, 4.0):
            assert trainer.end_micro_step(loss=torch.tensor(value), lr=0.5)
        assert trainer.finish(lambda: {})["train_steps"] == 4
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    records = [r for r in read_jsonl(tmp_path / TRAIN_LOG) if "loss" in r]
    assert [(r["step"], r["loss"]) for r in records] == expected and all(r["lr"] == 0.5 for r in records)


def test_a_non_finite_loss_is_recorded_on_its_device_at_its_first_step():
    from ldm_pipeline.trainer import first_non_finite_step

    first = torch.tensor(-1)
    for step, loss in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0]):
        first = first_non_finite_step(first, torch.tensor(loss), step)
    assert first.item() == 2
    assert first_non_finite_step(torch.tensor(-1), torch.tensor([1.0, float("nan")]), 7).item() == 7


@pytest.mark.parametrize("saved_processes, num_processes", [(2, 1), (1, 2), (2, 4)])
def test_a_resume_under_another_process_count_rescales_the_learning_rate_schedule(tmp_path, saved_processes,
                                                                                   num_processes):
    """Accelerate steps a schedule once per process and update, so after k updates a schedule saved by n processes
    counts n·k; resumed by m processes it must count m·k, with the learning rate of k updates (warm-up 10)."""
    from types import SimpleNamespace

    from diffusers.optimization import get_scheduler

    from ldm_pipeline.checkpoints import load_checkpoint

    def schedule(processes: int, updates: int):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=10 * processes)
        for _ in range(updates * processes):
            optimizer.step()
            scheduler.step()
        return scheduler

    resumed = schedule(num_processes, 0)  # the new run's schedule, then the checkpoint's state loaded into it
    accelerator = SimpleNamespace(num_processes=num_processes, process_index=0,
                                  _schedulers=[SimpleNamespace(scheduler=resumed)],
                                  load_state=lambda path: resumed.load_state_dict(schedule(saved_processes, 3)
                                                                                  .state_dict()))
    load_checkpoint(accelerator, tmp_path, saved_processes)
    expected = schedule(num_processes, 3)
    assert resumed.last_epoch == expected.last_epoch == 3 * num_processes
    assert resumed.get_last_lr() == pytest.approx(expected.get_last_lr()) and expected.get_last_lr()[0] == 0.3

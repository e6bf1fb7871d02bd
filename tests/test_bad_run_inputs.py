"""What the training side defends against: each bad config value, flag, output location or checkpoint ends in
one clear error (naming the file, key, flag or path and what to do) or in correct handling, and nothing already
written is lost. One test per case; read top to bottom as the list of defences."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import run_stage
from ldm_pipeline.config import ConfigError, load_stage_config, local_or_hub
from ldm_pipeline.checkpoints import list_checkpoints, save_checkpoint
from ldm_pipeline.durable import read_jsonl

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "tiny"
RESOLUTION = 16


@pytest.fixture(scope="module")
def stages(tiny_stage_dirs):
    return tiny_stage_dirs


def unet_args(stages: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "unet.json"), "--text_encoder", str(stages / "text"),
            "--vae", str(stages / "vae_stage"), "--output_dir", str(out), "--resolution", str(RESOLUTION),
            "--num_train_samples", "8", "--train_batch_size", "4", "--report_to", "none",
            "--cache_dir", str(out.parent / "cache"), *extra]


def write_config(tmp_path: Path, base: str, section: str, **changes) -> Path:
    config = json.loads((CONFIGS / base).read_text())
    config[section].update(changes)
    path = tmp_path / base
    path.write_text(json.dumps(config))
    return path


# ------------------------------------------------------------------------------------- config values


def test_a_misspelt_key_names_the_file_and_the_closest_key(tmp_path):
    path = write_config(tmp_path, "unet.json", "training", snr_gama=5.0)
    with pytest.raises(ConfigError, match=r"unet.json: training.snr_gama .* Did you mean 'snr_gamma'\?"):
        load_stage_config("unet", ["--config", str(path), "--text_encoder", "a", "--vae", "b"])


def test_a_string_for_a_boolean_is_rejected_not_read_as_true(tmp_path):
    path = write_config(tmp_path, "unet.json", "training", use_ema="false")
    with pytest.raises(ConfigError, match=r"training.use_ema must be true or false, got 'false' \(a str\)"):
        load_stage_config("unet", ["--config", str(path), "--text_encoder", "a", "--vae", "b"])


def test_a_string_for_a_number_is_rejected(tmp_path):
    path = write_config(tmp_path, "vae.json", "training", learning_rate="1e-3")
    with pytest.raises(ConfigError, match=r"training.learning_rate must be a number"):
        load_stage_config("vae", ["--config", str(path)])


def test_another_stages_config_is_named_as_such():
    with pytest.raises(ConfigError, match=r"vae.json is a vae config .* training/train_vae.py"):
        load_stage_config("unet", ["--config", str(CONFIGS / "vae.json"), "--text_encoder", "a", "--vae", "b"])


def test_a_key_in_the_wrong_section_says_where_it_belongs(tmp_path):
    path = write_config(tmp_path, "vae.json", "training", resolution=32)
    with pytest.raises(ConfigError, match=r"training.resolution belongs in the 'data' section"):
        load_stage_config("vae", ["--config", str(path)])


@pytest.mark.parametrize("flag, value, message", [
    ("--snr_gamma", "-5", r"--snr_gamma = -5.0 is out of range: it must be > 0"),
    ("--max_grad_norm", "-1", r"--max_grad_norm = -1.0 is out of range: it must be >= 0"),
    ("--max_train_steps", "0", r"--max_train_steps = 0 is out of range: it must be > 0"),
    ("--max_train_steps", "-5", r"--max_train_steps = -5 is out of range"),
    ("--gradient_accumulation_steps", "0", r"--gradient_accumulation_steps = 0 is out of range"),
    ("--checkpointing_steps", "0", r"--checkpointing_steps = 0 is out of range"),
    ("--caption_dropout_prob", "1.5", r"--caption_dropout_prob = 1.5 is out of range: it must be <= 1"),
    ("--learning_rate", "nan", r"--learning_rate must be a finite number"),
])
def test_out_of_range_flags_are_rejected_before_any_work(flag, value, message, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=message):
        run_stage("unet", ["--config", str(CONFIGS / "unet.json"), "--text_encoder", "a", "--vae", "b",
                           "--output_dir", str(out), flag, value])
    assert not out.exists()


def test_a_required_flag_is_named():
    with pytest.raises(ConfigError, match=r"--vae is required"):
        load_stage_config("unet", ["--config", str(CONFIGS / "unet.json"), "--text_encoder", "a"])


def test_command_line_beats_json_beats_defaults(tmp_path):
    path = write_config(tmp_path, "vae.json", "training", kl_weight=0.25)
    config = load_stage_config("vae", ["--config", str(path), "--learning_rate", "0.5", "--use_ema", "false",
                                       "--output_dir", str(tmp_path)])
    assert config.training.learning_rate == 0.5  # command line
    assert config.training.kl_weight == 0.25  # JSON
    assert config.training.adam_beta1 == 0.9  # default
    assert config.training.use_ema is False and config.data.resolution == 32
    assert config.training.logging_dir == str(tmp_path / "logs")


def test_an_unknown_model_key_is_named_with_the_closest_argument(tmp_path, stages):
    path = write_config(tmp_path, "unet.json", "model", unet={"block_out_channel": [16, 32]})
    with pytest.raises(ValueError, match=r"model.unet.block_out_channel .* Did you mean 'block_out_channels'"):
        run_stage("unet", unet_args(stages, tmp_path / "out", "--config", str(path)))


def test_a_missing_config_file_lists_the_files_that_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"Config file not found: .*tiny/text_encoders.json\. .*tiny has: eval.json, "
                                          r"text_encoder.json, text_encoder_t5.json, unet.json, vae.json, "
                                          r"vae_f8.json\. Did you mean '.*tiny/text_encoder.json'\?"):
        load_stage_config("text_encoder", ["--config", str(CONFIGS / "text_encoders.json")])
    with pytest.raises(ConfigError, match=r"configs/small does not exist; .*configs has the folders: accelerate, "
                                          r"demo, gpu, gpu_demo, tiny\."):
        load_stage_config("vae", ["--config", str(REPO / "configs" / "small" / "vae.json")])


# ------------------------------------------------------------------------------------- paths


def test_a_missing_relative_stage_path_is_not_taken_for_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--text_encoder runs/te: no such directory"):
        local_or_hub("runs/te", "--text_encoder")
    assert local_or_hub("org/model", "--text_encoder") == "org/model"  # a Hub name stays one


def test_stage_outputs_passed_to_each_others_flags_are_named(stages, tmp_path):
    with pytest.raises(ValueError, match=r"^--text_encoder .*vae_stage holds a VAE stage output \(vae/\), which "
                                         r"belongs to --vae; --vae .*text holds a text stage output \(text_encoder/, "
                                         r"tokenizer/\), which belongs to --text_encoder\. Swap them\.$"):
        run_stage("unet", unet_args(stages, tmp_path / "out", "--text_encoder", str(stages / "vae_stage"),
                                    "--vae", str(stages / "text")))
    with pytest.raises(ValueError, match=r"--text_encoder .*vae_stage/vae holds a VAE \(an AutoencoderKL "
                                         r"config.json\), which belongs to --vae\.$"):
        run_stage("unet", unet_args(stages, tmp_path / "out", "--text_encoder", str(stages / "vae_stage" / "vae")))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """40 exported shapes items at 16 px: a held-out slice of 4 by default."""
    from ldm_pipeline.data.export import export_main

    folder = tmp_path_factory.mktemp("user") / "folder"
    export_main(["--out", str(folder), "--num_samples", "40", "--resolution", str(RESOLUTION)])
    return folder


def record_split(directory: Path, folder: Path, **data) -> None:
    """Write the data_split.json a stage trained on ``folder`` with the data settings ``data`` would write."""
    from ldm_pipeline.config import DataConfig
    from ldm_pipeline.data.datasets import data_split_record
    from ldm_pipeline.data.split import write_split_record

    write_split_record(directory, data_split_record(DataConfig(resolution=RESOLUTION, train_data_dir=str(folder),
                                                               **data)))


def test_a_frozen_stage_that_trained_on_the_held_out_items_is_refused(stages, user_folder, tmp_path):
    """The U-Net stage holds out the items every stage holds out: a VAE stage whose data_split.json shows it trained
    on some of them (here: another --data_seed) stops the run before it trains."""
    folder = user_folder
    vae = tmp_path / "vae_stage"
    shutil.copytree(stages / "vae_stage", vae)
    record_split(vae, folder, data_seed=1)
    with pytest.raises(ValueError, match=r"train_unet.py would hold out items that --vae .*vae_stage trained on: \d of "
                                         r"its 4 held-out item\(s\) were training data there\. .*--data_seed 1.*"
                                         r"--data_seed 0"):
        run_stage("unet", unet_args(stages, tmp_path / "out", "--vae", str(vae), "--train_data_dir", str(folder)))
    assert not list((tmp_path / "out").glob("checkpoints/*"))


def test_ldm_eval_on_items_a_stage_trained_on_is_an_error_naming_both_runs(user_folder, tiny_pipeline_dir, tmp_path):
    from ldm_pipeline.cli_eval import evaluate_command

    stage = tmp_path / "text_stage"
    stage.mkdir()
    record_split(stage, user_folder)  # the default: 4 of the 40 items held out
    argv = ["--model", str(tiny_pipeline_dir), "--text_stage", str(stage), "--train_data_dir", str(user_folder),
            "--out", str(tmp_path / "eval")]
    with pytest.raises(ValueError, match=r"ldm-eval would hold out items that --text_stage .*text_stage trained on: 4 "
                                         r"of its 8 held-out item\(s\) were training data there\. .*text_stage: "
                                         r"held-out slice: 4 of 40 items .*--num_held_out_samples default\); ldm-eval: "
                                         r"held-out slice: 8 of 40 items .*--num_held_out_samples 8\)"):
        evaluate_command(argv + ["--num_held_out_samples", "8"])
    changed = tmp_path / "changed"  # the stage trained on it; then 4 rows were added
    shutil.copytree(user_folder, changed)
    record_split(stage, changed)
    metadata = changed / "metadata.jsonl"
    metadata.write_text(metadata.read_text() + "".join(metadata.read_text().splitlines(True)[:4]))
    with pytest.raises(ValueError, match=r"the data had 40 items when one run read it and 44 when the other did"):
        evaluate_command(argv[:5] + [str(changed)] + argv[6:])
    assert not (tmp_path / "eval").exists()


def test_an_unwritable_output_dir_fails_before_the_cache_is_computed(tmp_path, stages):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match=r"--output_dir .*a_file/out is not writable"):
        run_stage("unet", unet_args(stages, blocker / "out"))
    with pytest.raises(PermissionError, match=r"--cache_dir .*a_file/cache is not writable"):
        run_stage("unet", unet_args(stages, tmp_path / "out") + ["--cache_dir", str(blocker / "cache")])
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_an_output_dir_inside_the_data_folder_is_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(ConfigError, match=r"--output_dir .*data/out is inside --train_data_dir .*data: the run's "
                                          r"checkpoints and logs would become part of the training data"):
        run_stage("vae", ["--config", str(CONFIGS / "vae.json"), "--train_data_dir", str(data),
                          "--output_dir", str(data / "out"), "--report_to", "none"])
    assert list(data.iterdir()) == []


# ------------------------------------------------------------------------------------- one run per output directory


def test_a_second_run_into_a_held_output_dir_stops_naming_the_holder(tmp_path):
    from ldm_pipeline.run_lock import RunLockedError, acquire_run_lock

    out = tmp_path / "run"
    held = acquire_run_lock(out)
    try:
        with pytest.raises(RunLockedError, match=rf"run is in use by another training run \(pid {os.getpid()} "
                                                 r"\(rank 0\) on host .*; lock file .*\.run\.lock\): wait for it"):
            run_stage("vae", ["--config", str(CONFIGS / "vae.json"), "--output_dir", str(out), "--report_to", "none"])
        assert sorted(p.name for p in out.iterdir()) == [".run.lock"]
    finally:
        held.release()
    assert (out / ".run.lock").read_text() == ""  # released cleanly: no records left


def test_the_lock_of_a_killed_run_is_named_and_taken_over(tmp_path, capsys):
    from ldm_pipeline.run_lock import acquire_run_lock, read_records

    out = tmp_path / "run"
    out.mkdir()
    (out / ".run.lock").write_text(json.dumps({"host": "h", "pid": 2 ** 22 + 1, "rank": 0, "started": "then"}) + "\n")
    lock = acquire_run_lock(out)
    try:
        assert re.search(r"\.run\.lock was left by a run that ended without releasing it \(pid 4194305 \(rank 0\) "
                         r"on host h, started then; no longer running\): taking it over", capsys.readouterr().err)
        assert [r["pid"] for r in read_records(lock.fd)] == [os.getpid()]
    finally:
        lock.release()


def test_a_multi_process_launch_whose_processes_run_alone_is_refused(monkeypatch):
    from types import SimpleNamespace

    from ldm_pipeline.run_lock import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"The launcher started 2 processes but each one runs alone .*set "
                                         r"ACCELERATE_USE_CPU=1"):
        check_launch(SimpleNamespace(num_processes=1))
    check_launch(SimpleNamespace(num_processes=2))


# ------------------------------------------------------------------------------------- runs and checkpoints


@pytest.fixture(scope="module")
def finished_run(stages, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run_stage("unet", unet_args(stages, out, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_fresh_run_over_another_runs_checkpoints_is_refused(finished_run, stages, tmp_path):
    out = copy_run(finished_run, tmp_path)
    before = sorted(p.name for p in list_checkpoints(out))
    with pytest.raises(FileExistsError, match=r"holds checkpoints of an earlier run .* --resume_from_checkpoint "
                                              r"latest .* --overwrite_output_dir"):
        run_stage("unet", unet_args(stages, out, "--max_train_steps", "2"))
    assert sorted(p.name for p in list_checkpoints(out)) == before  # nothing deleted
    run_stage("unet", unet_args(stages, out, "--max_train_steps", "1", "--overwrite_output_dir"))
    assert list_checkpoints(out) == []  # the old run's checkpoints are gone, on request
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [1]


def test_resuming_with_another_config_or_frozen_stage_is_refused(finished_run, stages, tmp_path):
    out = copy_run(finished_run, tmp_path)
    with pytest.raises(ValueError, match=r"belongs to a different run \(training.learning_rate: 0.001 -> 0.5\)"):
        run_stage("unet", unet_args(stages, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest",
                                    "--learning_rate", "0.5"))
    with pytest.raises(ValueError, match=r"belongs to a different run \(vae: "):
        run_stage("unet", unet_args(stages, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest",
                                    "--vae", str(stages / "other_vae")))


@pytest.mark.parametrize("name, damage", [("random_states_0.pkl", "missing"), ("random_states_0.pkl", "truncated"),
                                          ("model.safetensors", "flipped"), ("optimizer.bin", "truncated"),
                                          ("run_fingerprint.json", "missing")])
def test_a_damaged_checkpoint_file_stops_the_resume_naming_it(finished_run, stages, tmp_path, name, damage):
    out = copy_run(finished_run, tmp_path)
    path = out / "checkpoints" / "checkpoint-4" / name
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:20])
    else:
        raw = bytearray(path.read_bytes())
        raw[-len(raw) // 3] ^= 0x01  # one bit of a weight: the file still loads
        path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"checkpoint-4/{re.escape(name)} is (missing|damaged).*--resume_from_"
                                         r"checkpoint .*checkpoint-2"):
        run_stage("unet", unet_args(stages, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))


def test_a_checkpoint_without_its_fingerprint_is_refused(finished_run, tmp_path):
    from ldm_pipeline.checkpoints import CHECKSUMS_FILE, FINGERPRINT_FILE, check_checkpoint, write_checksums

    checkpoint = copy_run(finished_run, tmp_path) / "checkpoints" / "checkpoint-4"
    (checkpoint / FINGERPRINT_FILE).unlink()
    (checkpoint / CHECKSUMS_FILE).unlink()
    write_checksums(checkpoint)  # consistent, but without the fingerprint
    with pytest.raises(ValueError, match=r"run_fingerprint\.json is missing, so checkpoint checkpoint-4 cannot be "
                                         r"matched to this run: resume from an earlier checkpoint"):
        check_checkpoint(checkpoint, 1, {"training": {}})


def test_a_torn_last_log_line_does_not_block_the_resume(finished_run, stages, tmp_path):
    out = copy_run(finished_run, tmp_path)
    log = out / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "lo')
    run_stage("unet", unet_args(stages, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3, 4, 5, 6]


def test_a_resume_at_the_last_checkpoint_writes_the_snapshot_a_kill_left_out(finished_run, stages, tmp_path):
    out = copy_run(finished_run, tmp_path)
    run_stage("unet", unet_args(stages, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                                "--snapshot_steps", "2"))
    assert (out / "snapshots" / "step-4" / "diffusion_pytorch_model.safetensors").is_file()
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [1, 2, 3, 4]


def test_a_validation_logged_again_after_a_resume_replaces_the_earlier_record(tmp_path):
    """A run killed after its last checkpoint and its final validation, then resumed from that checkpoint, validates
    that step again: the log keeps one record of it (the new one)."""
    from types import SimpleNamespace

    from ldm_pipeline.durable import JsonlLogger

    main = SimpleNamespace(is_main_process=True)
    first = JsonlLogger(tmp_path / "log.jsonl", main)
    for step in (1, 2):
        first.log(step=step, loss=1.0 / step, elapsed_s=0.1)
    first.log(step=2, validation_psnr=10.0)
    resumed = JsonlLogger(tmp_path / "log.jsonl", main, start_step=2)
    resumed.log(step=2, validation_psnr=11.0)
    resumed.log(step=3, loss=0.2, elapsed_s=0.3)
    assert read_jsonl(tmp_path / "log.jsonl") == [{"step": 1, "loss": 1.0, "elapsed_s": 0.1},
                                                  {"step": 2, "loss": 0.5, "elapsed_s": 0.1},
                                                  {"step": 2, "validation_psnr": 11.0},
                                                  {"step": 3, "loss": 0.2, "elapsed_s": 0.3}]


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr(accelerator, "save_state", full_disk)
    with pytest.raises(OSError, match="No space left on device while writing checkpoint-2") as raised:
        save_checkpoint(accelerator, tmp_path, 2)
    assert raised.value.errno == errno.ENOSPC
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert load_file(str(tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors"))
    del model


def test_a_snapshot_killed_mid_write_leaves_no_snapshot(tmp_path, monkeypatch):
    from ldm_pipeline.unet import save_unet_snapshot
    from conftest import make_tiny_unet

    unet = make_tiny_unet()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(unet), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        save_unet_snapshot(unet, None, tmp_path / "snapshots" / "step-2")
    assert list((tmp_path / "snapshots").iterdir()) == []


# ------------------------------------------------------------------------------------- the command line


def test_an_error_is_one_line_under_accelerate_launch_and_run_directly(tmp_path, capsys):
    """The launch line of the docs, ``accelerate launch -q --config_file configs/accelerate/single_process.yaml``:
    no launch warning, a misspelt flag is one line naming the closest flag, and the exit status is 1 (the launcher's
    status for any failure of the script). Run directly, a bad value is the same one line with status 2, and
    --verbose raises it with its traceback."""
    from ldm_pipeline.errors import run_cli
    from training.train_vae import main as vae_main

    argv = ["--config", str(CONFIGS / "vae.json"), "--output_dir", str(tmp_path / "o")]
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
               str(REPO / "configs" / "accelerate" / "single_process.yaml"), str(REPO / "training" / "train_vae.py"),
               *argv, "--max_trian_steps", "0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == ["train_vae.py: error: unrecognized argument --max_trian_steps: did you mean "
                                          "--max_train_steps? (--help lists the flags)"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(vae_main, argv + ["--max_train_steps", "0"], prog="train_vae.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "train_vae.py: error: --max_train_steps = 0 is out of range: it must be > 0.\n"
    with pytest.raises(ConfigError, match="--max_train_steps = 0"):
        run_cli(vae_main, argv + ["--max_train_steps", "0", "--verbose"], prog="train_vae.py")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*/*.json") if p.stem != "eval"),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_passes_the_schema(path):
    stage = next(name for name in ("text_encoder", "vae", "unet") if path.stem.startswith(name))
    config = load_stage_config(stage, ["--config", str(path)] + (["--text_encoder", "a", "--vae", "b"]
                                                                 if stage == "unet" else []))
    assert config.data.resolution > 0 and config.training.max_train_steps > 0


# ------------------------------------------------------------------------------------- caches and data edits


def test_a_cache_shard_with_flipped_bytes_is_an_error_naming_it(tmp_path):
    from ldm_pipeline.caching import ShardedLatentCache, shard_path, write_manifest, write_shard

    key = "k" * 64
    directory = tmp_path / f"train-{key[:24]}"
    write_shard(shard_path(directory, "samples", 0), {"latent_mean": torch.zeros(2, 4, 2, 2),
                                                      "latent_std": torch.ones(2, 4, 2, 2),
                                                      "caption_ids": torch.tensor([0, 1])}, key)
    write_shard(shard_path(directory, "text", 0), {"text_embeds": torch.ones(2, 3, 8),
                                                   "empty_embeds": torch.zeros(3, 8)}, key)
    write_manifest(directory, key, "train", num_samples=2, num_captions=2, shard_size=4, storage_dtype="float32")
    assert torch.equal(ShardedLatentCache(directory, key)[1]["prompt_embeds"], torch.ones(3, 8))
    path = shard_path(directory, "text", 0)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # a bit flip in the tensor data, after the header
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"text-00000\.safetensors is damaged \(its checksum does not match"):
        ShardedLatentCache(directory, key)[1]


def test_a_cache_shard_copied_over_another_is_an_error_naming_it(tmp_path):
    from ldm_pipeline.caching import ShardedLatentCache, shard_path, write_manifest, write_shard

    key = "k" * 64
    directory = tmp_path / f"train-{key[:24]}"
    for index in range(2):
        write_shard(shard_path(directory, "samples", index), {
            "latent_mean": torch.full((2, 4, 2, 2), float(index)), "latent_std": torch.ones(2, 4, 2, 2),
            "caption_ids": torch.tensor([0, 1])}, key)
    write_shard(shard_path(directory, "text", 0), {"text_embeds": torch.ones(2, 3, 8),
                                                   "empty_embeds": torch.zeros(3, 8)}, key)
    write_manifest(directory, key, "train", num_samples=4, num_captions=2, shard_size=2, storage_dtype="float32")
    shutil.copyfile(shard_path(directory, "samples", 0), shard_path(directory, "samples", 1))
    with pytest.raises(ValueError, match=r"samples-00001\.safetensors is damaged \(it holds shard "
                                         r"samples-00000\.safetensors, copied over this one"):
        ShardedLatentCache(directory, key)[3]


def test_an_image_edited_with_the_same_size_and_time_changes_the_data_fingerprint(tmp_path):
    import os

    from PIL import Image

    from ldm_pipeline.config import DataConfig
    from ldm_pipeline.data import dataset_fingerprint

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a red cat"}) + "\n"
                                                   for i in range(3)))
    data = DataConfig(resolution=8, train_data_dir=str(folder), num_validation_samples=1)
    before = dataset_fingerprint(data)
    image = folder / "1.png"
    stat = image.stat()
    payload = bytearray(image.read_bytes())
    payload[-20] ^= 0x01
    image.write_bytes(bytes(payload))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    assert dataset_fingerprint(data) != before


@pytest.mark.parametrize("error, line", [
    (PermissionError(errno.EACCES, "--output_dir out is not writable (Not a directory): choose a writable location"),
     "--output_dir out is not writable (Not a directory): choose a writable location"),
    (PermissionError(errno.EACCES, "Permission denied", "/read-only/out"),
     "Permission denied (/read-only/out): choose a writable location."),
    (OSError(errno.ENOSPC, "No space left on device", "ckpt"),
     "No space left on device (ckpt): free disk space, then run the same command again."),
    (KeyError("x"), "KeyError: 'x'"),
])
def test_the_error_line_keeps_the_message_and_adds_advice_only_when_missing(error, line):
    from ldm_pipeline.errors import error_line

    assert error_line(error) == line


def test_a_full_disk_behind_another_error_is_named():
    from ldm_pipeline.errors import error_line

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from cause
    except RuntimeError as error:
        assert error_line(error).startswith("No space left on device while writing")

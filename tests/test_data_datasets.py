"""Training data: shapes items, preprocessing, user folders (corrupt files, columns), export round trip, fingerprints.

The bad inputs defended against (16-bit, EXIF, transparency, metadata errors, ...) are in test_bad_inputs.py."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_pipeline.data import (
    ShapesDataset,
    build_dataset,
    collate_examples,
    dataset_fingerprint,
    preprocess_image,
)
from ldm_pipeline.config import ConfigError, DataConfig, data_config_from_argv
from ldm_pipeline.data.export import export_main


def data_args(*argv):
    return data_config_from_argv(argv)


def shapes_args(resolution=32, num_train=12, num_validation=6, *extra):
    return data_args("--resolution", str(resolution), "--num_train_samples", str(num_train),
                     "--num_validation_samples", str(num_validation), *extra)


def to_tensor_reference(image):
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1


def write_folder(root, num_images=8, corrupt=(), size=(40, 30), metadata="jsonl"):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(num_images):
        name = f"img_{i}.png"
        if i in corrupt:
            (root / name).write_bytes(b"this is not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
        rows.append({"file_name": name, "text": f"caption {i}"})
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        (root / "metadata.csv").write_text("file_name,text\n" + "\n".join(f"{r['file_name']},{r['text']}" for r in rows))
    return root


def test_shapes_items_are_the_rendered_images_in_minus_one_one():
    args = shapes_args(32, 12, 6)
    train, validation = build_dataset(args, "train"), build_dataset(args, "validation")
    assert (len(train), len(validation)) == (12, 6)
    reference = ShapesDataset(12, 32, seed=0, split="train")
    for i in (0, 5, 11):
        item = train[i]
        assert item["index"] == i and item["caption"] == reference[i]["caption"]
        assert item["pixel_values"].dtype == torch.float32 and item["pixel_values"].shape == (3, 32, 32)
        torch.testing.assert_close(item["pixel_values"], to_tensor_reference(reference[i]["image"]), rtol=0, atol=1e-6)
    batch = collate_examples([train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["captions"] == [reference[i]["caption"] for i in range(4)]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2, 3]
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1


def test_shapes_categories_weight_the_training_mix_by_repetition():
    from scipy.stats import chisquare

    args = shapes_args(32, 600, 300, "--shapes_categories", "position", "position", "colors")
    train, validation = build_dataset(args, "train"), build_dataset(args, "validation")
    counts = np.unique([train.shapes.scene(i).category for i in range(600)], return_counts=True)
    assert counts[0].tolist() == ["colors", "position"]
    assert chisquare(counts[1], [200, 400]).pvalue > 1e-3
    assert len({validation.shapes.scene(i).category for i in range(300)}) == 6  # held-out data keeps every category
    assert dataset_fingerprint(args, "train") != dataset_fingerprint(shapes_args(32, 600, 300), "train")
    assert dataset_fingerprint(args, "validation") == dataset_fingerprint(shapes_args(32, 600, 300), "validation")


def test_shapes_categories_reject_an_unknown_name():
    with pytest.raises(ConfigError, match=r"--shapes_categories position colour: unknown colour; name some of "
                                          r"single_object, .* \(repeat one to weight it\)"):
        shapes_args(32, 12, 6, "--shapes_categories", "position", "colour")


def test_shapes_train_and_validation_are_disjoint_and_seeded():
    args = shapes_args(32, 40, 20)
    train = {build_dataset(args, "train")[i]["pixel_values"].numpy().tobytes() for i in range(40)}
    validation = {build_dataset(args, "validation")[i]["pixel_values"].numpy().tobytes() for i in range(20)}
    assert not train & validation
    other_seed = shapes_args(32, 40, 20, "--data_seed", "1")
    assert build_dataset(other_seed)[0]["caption"] != build_dataset(args)[0]["caption"] or not torch.equal(
        build_dataset(other_seed)[0]["pixel_values"], build_dataset(args)[0]["pixel_values"])
    assert len(build_dataset(shapes_args(32, 40, 20, "--max_train_samples", "7"))) == 7


def test_shapes_any_resolution():
    for resolution in (32, 64, 128):
        assert build_dataset(shapes_args(resolution, 2, 2))[1]["pixel_values"].shape == (3, resolution, resolution)
    with pytest.raises(ValueError, match="resolution"):
        build_dataset(data_args("--num_train_samples", "2"))


def test_no_flip_by_default_and_flip_when_asked():
    assert DataConfig(resolution=32).random_flip is False
    args = shapes_args(32, 8, 2)
    reference = ShapesDataset(8, 32, seed=0)
    for seed in range(5):
        torch.manual_seed(seed)
        for i in range(8):
            assert torch.equal(build_dataset(args)[i]["pixel_values"], to_tensor_reference(reference[i]["image"]))
    flipping = build_dataset(shapes_args(32, 8, 2, "--random_flip"))
    torch.manual_seed(0)
    flipped = [torch.equal(flipping[i]["pixel_values"], to_tensor_reference(reference[i]["image"]).flip(-1))
               for i in range(8) for _ in range(4)]
    assert any(flipped) and not all(flipped)


def test_preprocess_resizes_shorter_side_and_centre_crops():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    resized = image.resize((27, 16), Image.Resampling.BICUBIC)  # shorter side 30 -> 16, 50 * 16 / 30 = 26.7
    expected = to_tensor_reference(resized.crop((5, 0, 21, 16)))
    torch.testing.assert_close(preprocess_image(image, 16), expected, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    crops = {preprocess_image(image, 16, random_crop=True).numpy().tobytes() for _ in range(10)}
    assert len(crops) > 1
    gray = Image.new("L", (20, 20), 255)
    assert torch.equal(preprocess_image(gray, 20), torch.ones(3, 20, 20))


def test_user_folder_loads_and_holds_out_validation(tmp_path):
    root = write_folder(tmp_path / "folder", num_images=10)
    args = data_args("--resolution", "16", "--train_data_dir", str(root), "--num_held_out_samples", "2")
    train, validation = build_dataset(args, "train"), build_dataset(args, "validation")
    assert (len(train), len(validation)) == (8, 2)
    captions = [train[i]["caption"] for i in range(8)] + [validation[i]["caption"] for i in range(2)]
    assert sorted(captions) == sorted(f"caption {i}" for i in range(10))
    assert [validation[i]["caption"] for i in range(2)] == [build_dataset(args, "validation")[i]["caption"]
                                                            for i in range(2)]
    assert train[0]["pixel_values"].shape == (3, 16, 16)
    csv_root = write_folder(tmp_path / "csv", num_images=4, metadata="csv")
    csv_args = data_args("--resolution", "16", "--train_data_dir", str(csv_root), "--num_validation_samples", "1")
    assert len(build_dataset(csv_args)) == 3


def test_the_held_out_items_are_the_same_whatever_a_stage_validates_on(tmp_path):
    """A held-out slice is a property of the data and --data_seed: the first H of permutation(N) (H = N / 10 by
    default), whatever --num_validation_samples; a stage validates on the first of them and trains on the rest."""
    from ldm_pipeline.data.datasets import data_split_record

    root = write_folder(tmp_path / "folder", num_images=30, size=(8, 8))
    order = np.random.default_rng(0).permutation(30)
    records, trains = [], []
    for count in (1, 2, 3, 50):
        args = data_args("--resolution", "8", "--train_data_dir", str(root), "--num_validation_samples", str(count))
        records.append(data_split_record(args))
        assert build_dataset(args, "validation").rows == sorted(order[:min(count, 3)].tolist())
        trains.append(build_dataset(args, "train").rows)
    assert all(record == records[0] for record in records) and all(rows == trains[0] for rows in trains)
    assert records[0]["held_out_ids"] == sorted(order[:3].tolist()) and records[0]["num_items"] == 30
    assert trains[0] == sorted(set(range(30)) - set(order[:3].tolist()))
    other_seed = data_split_record(data_args("--resolution", "8", "--train_data_dir", str(root), "--data_seed", "1"))
    assert other_seed["held_out_ids"] == sorted(np.random.default_rng(1).permutation(30)[:3].tolist())
    shapes = data_split_record(shapes_args(32, 12, 6))
    assert (shapes["kind"], shapes["num_held_out"], shapes["held_out_ids"]) == ("shapes", 6, None)


def test_corrupt_image_is_named_when_read_or_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "folder", num_images=8, corrupt=(2, 6))
    args = data_args("--resolution", "16", "--train_data_dir", str(root), "--num_held_out_samples", "2")
    for split in ("train", "validation"):  # the seeded held-out slice of 8 is rows {2, 4}: one bad file per split
        dataset = build_dataset(args, split)
        with pytest.raises(ValueError, match=r"img_[26]\.png \(.*metadata\.jsonl line [37]\).*--skip_bad_images"):
            [dataset[i] for i in range(len(dataset))]
    args.skip_bad_images = True
    train, validation = build_dataset(args, "train"), build_dataset(args, "validation")
    assert (len(train), len(validation)) == (6, 2)
    loader = torch.utils.data.DataLoader(train, batch_size=2, collate_fn=collate_examples)
    assert [len(batch["captions"]) for batch in loader] == [2, 2, 2]
    [validation[i] for i in range(2)]
    assert (train.skipped_images, validation.skipped_images) == (1, 1)
    assert "img_6.png" in train.skipped_summary() and "img_2.png" in validation.skipped_summary()
    assert "caption 6" not in [train[i]["caption"] for i in range(6)]


def test_missing_column_error_names_column_and_columns(tmp_path):
    root = write_folder(tmp_path / "folder", num_images=4)
    args = data_args("--resolution", "16", "--train_data_dir", str(root), "--caption_column", "prompt")
    with pytest.raises(ValueError, match=r"'prompt'.*'file_name'.*'text'"):
        build_dataset(args)
    saved = tmp_path / "saved"
    ShapesDataset(6, 32, seed=0).to_hf_dataset().save_to_disk(str(saved))
    args = data_args("--resolution", "32", "--train_data_dir", str(saved), "--image_column", "picture",
                     "--num_validation_samples", "2")
    with pytest.raises(ValueError, match=r"'picture'.*--image_column.*'image'"):
        build_dataset(args)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_dataset(data_args("--resolution", "16", "--train_data_dir", str(tmp_path / "missing")))


def test_saved_and_parquet_datasets_use_their_own_validation_split(tmp_path):
    import datasets

    dataset_dict = datasets.DatasetDict({"train": ShapesDataset(6, 32, seed=0).to_hf_dataset(),
                                         "validation": ShapesDataset(3, 32, seed=0, split="validation").to_hf_dataset()})
    dataset_dict.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parquet").mkdir()
    for split, dataset in dataset_dict.items():
        dataset.to_parquet(str(tmp_path / "parquet" / f"{split}-00000-of-00001.parquet"))
    reference = ShapesDataset(3, 32, seed=0, split="validation")
    for folder in ("saved", "parquet"):
        args = data_args("--resolution", "32", "--train_data_dir", str(tmp_path / folder), "--num_validation_samples", "2")
        assert len(build_dataset(args, "train")) == 6
        validation = build_dataset(args, "validation")
        assert len(validation) == 3
        assert validation[2]["caption"] == reference[2]["caption"]
        assert torch.equal(validation[2]["pixel_values"], to_tensor_reference(reference[2]["image"]))


def test_export_round_trip(tmp_path):
    out = tmp_path / "export"
    export_main(["--out", str(out), "--num_samples", "10", "--resolution", "32", "--seed", "4"])
    reference = ShapesDataset(10, 32, seed=4)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 10
    for line, item in zip(lines, reference):
        assert line["text"] == item["caption"]
        assert line["objects"] == [{"kind": o.kind, "color": o.color, "box": list(o.box)} for o in item["objects"]]
        assert np.array_equal(np.asarray(Image.open(out / line["file_name"])), np.asarray(item["image"]))
    args = data_args("--resolution", "32", "--train_data_dir", str(out), "--num_validation_samples", "2")
    for split in ("train", "validation"):
        dataset = build_dataset(args, split)
        for i in range(len(dataset)):
            row = dataset.rows[i]
            assert dataset[i]["caption"] == reference[row]["caption"]
            assert torch.equal(dataset[i]["pixel_values"], to_tensor_reference(reference[row]["image"]))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_main(["--out", str(out), "--num_samples", "2", "--resolution", "32"])


def test_exported_folder_loads_with_datasets_imagefolder(tmp_path):
    import datasets

    out = tmp_path / "export"
    export_main(["--out", str(out), "--num_samples", "4", "--resolution", "32", "--seed", "1"])
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    reference = ShapesDataset(4, 32, seed=1)
    assert loaded["text"] == [item["caption"] for item in reference]
    assert np.array_equal(np.asarray(loaded[3]["image"].convert("RGB")), np.asarray(reference[3]["image"]))


def test_fingerprint_is_stable_and_tracks_what_defines_the_data(tmp_path):
    base = shapes_args(32, 12, 6)
    assert dataset_fingerprint(base) == dataset_fingerprint(shapes_args(32, 12, 6))
    changed = [shapes_args(64, 12, 6), shapes_args(32, 13, 6), shapes_args(32, 12, 6, "--data_seed", "1")]
    prints = {dataset_fingerprint(base), dataset_fingerprint(base, "validation")}
    prints |= {dataset_fingerprint(args) for args in changed}
    assert len(prints) == 5
    root = write_folder(tmp_path / "folder", num_images=4)
    args = data_args("--resolution", "16", "--train_data_dir", str(root), "--num_validation_samples", "1")
    before = dataset_fingerprint(args)
    assert before == dataset_fingerprint(args)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(root / "img_1.png")
    os.utime(root / "img_1.png", ns=(1, 1))
    assert dataset_fingerprint(args) != before

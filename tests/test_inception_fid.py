"""The FID Inception-v3 of ldm_pipeline.evaluation.fid: the published layer names and sizes, loading a weights file
in pytorch-fid's layout (.pth or safetensors; the test writes one with random weights), the pool features, the
Inception FID against the Frechet formula, and ``ldm-eval --inception_weights``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm_pipeline.evaluation.fid as fid_module
from ldm_pipeline.cli_eval import main as eval_main
from ldm_pipeline.evaluation.fid import (
    FIDInceptionV3,
    frechet_distance_of_features,
    inception_features,
    inception_fid,
    load_fid_inception,
)

# torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and fc (2,049,000) the
# trunk that pytorch-fid keeps has 21,785,568.
TRUNK_PARAMETERS = 21_785_568
PUBLISHED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
}


@pytest.fixture(scope="module")
def random_inception():
    """A seeded FIDInceptionV3 with random batch-norm statistics (so that every tensor of the file matters)."""
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def weights_file(random_inception, tmp_path_factory):
    """The random weights in pytorch-fid's layout: the trunk plus the fc head (1008 classes), as a .pth file."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    state_dict = dict(random_inception.state_dict())
    state_dict["fc.weight"], state_dict["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state_dict, path)
    return path


@pytest.fixture()
def small_input(monkeypatch):
    """Resize to 75 px (the smallest input the network takes) instead of 299 to keep a CPU test fast: the file
    and report plumbing is the same; ``test_features_are_the_pool_of_a_299_pixel_input`` keeps 299."""
    monkeypatch.setattr(fid_module, "INCEPTION_SIZE", 75)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(3)]


def test_layer_names_and_sizes_are_those_of_the_published_network():
    model = FIDInceptionV3()
    assert sum(parameter.numel() for parameter in model.parameters()) == TRUNK_PARAMETERS
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for key, shape in PUBLISHED_SHAPES.items():
        assert shapes[key] == shape, key


def test_weights_file_loads_as_pth_and_as_safetensors(random_inception, weights_file, images, tmp_path, small_input):
    loaded = load_fid_inception(weights_file, device="cpu")
    pixels = torch.from_numpy(np.stack([np.asarray(image, np.float32) / 255 for image in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = random_inception(pixels).double().numpy()
    features = inception_features(loaded, images, batch_size=2)
    assert features.shape == (3, 2048)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)

    copy = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(weights_file, weights_only=True).items()}, str(copy))
    np.testing.assert_allclose(inception_features(load_fid_inception(copy, device="cpu"), images[:1]),
                               features[:1], rtol=1e-5, atol=1e-6)


def test_features_are_the_pool_of_a_299_pixel_input(random_inception, images):
    """Input is resized to 299 x 299 whatever its size: a 24 px image and its bilinear 299 px resize agree."""
    small = torch.from_numpy(np.asarray(images[0], np.float32) / 255).permute(2, 0, 1)[None]
    large = torch.nn.functional.interpolate(small, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(random_inception(small), random_inception(large))


def test_inception_fid_is_the_frechet_distance_of_the_features(images):
    """inception_fid = d^2 of the features of both sets, for any feature network (here a small linear one)."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 4)).eval()
    features = inception_features(network, images)
    with torch.no_grad():
        expected = network(torch.stack([torch.from_numpy(np.asarray(i, np.float32) / 255).permute(2, 0, 1)
                                        for i in images])).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-6)
    reference = images[::-1][:2]
    assert inception_fid(network, images, reference) == pytest.approx(
        frechet_distance_of_features(features, features[::-1][:2]))
    assert inception_fid(network, images, images) == pytest.approx(0.0, abs=1e-9)


def test_a_missing_or_wrong_weights_file_is_named(tmp_path, random_inception):
    with pytest.raises(FileNotFoundError, match="no_such.pth: no such file"):
        load_fid_inception(tmp_path / "no_such.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth cannot be read"):
        load_fid_inception(garbage)
    partial = tmp_path / "partial.safetensors"
    state_dict = {k: v for k, v in random_inception.state_dict().items() if not k.startswith("Mixed_7c.")}
    state_dict["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    save_file(state_dict, str(partial))
    with pytest.raises(ValueError, match="not in the FID Inception layout: missing .* wrong shape of 1 tensors "
                                         "\\(e.g. Conv2d_1a_3x3.conv.weight\\)"):
        load_fid_inception(partial)


def test_ldm_eval_reports_a_real_inception_fid(weights_file, tmp_path, capsys, small_input):
    out = tmp_path / "eval"
    eval_main(["--real", "--num_images", "1", "--resolution", "32", "--out", str(out),
               "--inception_weights", str(weights_file)])
    report = json.loads((out / "report.json").read_text())
    assert isinstance(report["inception_fid"], float) and report["inception_fid"] > 0
    assert str(weights_file) in report["inception_fid_note"]
    assert f"Inception FID: {report['inception_fid']:.3f}" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        eval_main(["--real", "--num_images", "1", "--out", str(tmp_path / "o"),
                   "--inception_weights", str(tmp_path / "missing.pth")])
    assert re.search(r"ldm-eval: error: --inception_weights .*missing.pth: no such file", capsys.readouterr().err)
    assert not (tmp_path / "o").exists()

"""zoo-eval: metric maths against known values, resumable sampling, Inception weights, the CLI."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import TINY_RECIPE
from zoo.eval.metrics import feature_statistics, frechet_distance, frechet_distance_of_features, psnr, ssim

# ------------------------------------------------------------------------------------------ helpers

TINY_DIT = {**TINY_RECIPE, "sample": {**TINY_RECIPE["sample"], "steps": 3, "batch_size": 8}}


def make_model_dir(path, raw: dict, seed: int = 0):
    """An untrained model directory of the recipe ``raw`` (weights as initialised, seeded)."""
    from zoo.hub.model_dir import model_config_dict, save_model_dir
    from zoo.recipe import recipe_from_dict

    recipe = recipe_from_dict(copy.deepcopy(raw), source="tiny.yaml")
    torch.manual_seed(seed)
    objective = recipe.objective.build() if recipe.objective is not None else None
    generator = recipe.model.build(objective=objective)
    tokenizer = recipe.tokenizer.build()
    save_model_dir(path, model_config_dict(recipe), generator.state_dict(), tokenizer_state=tokenizer.state_dict())
    return path


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("eval") / "dit", TINY_DIT)


# ------------------------------------------------------------------------------------------ Fréchet distance

def test_frechet_distance_of_identical_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance_of_features(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_gaussians_is_the_analytic_value():
    # N(0, diag(1, 4)) vs N((3, 4), diag(4, 9)): |mu|^2 + sum (s1 - s2)^2 over std devs = 25 + 1 + 1.
    assert frechet_distance([0, 0], np.diag([1.0, 4.0]), [3, 4], np.diag([4.0, 9.0])) == pytest.approx(27.0)


def test_frechet_distance_of_shifted_gaussian_samples_approaches_the_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) + np.array([1.0, 0.0, -2.0, 0.0])  # |shift|^2 = 5, same covariance
    assert frechet_distance_of_features(a, b) == pytest.approx(5.0, abs=0.05)


def test_feature_statistics_are_the_mean_and_sample_covariance():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


def test_frechet_distance_equals_the_sqrtm_formula_for_random_covariances():
    from scipy import linalg

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6))
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------------ PSNR and SSIM

def test_psnr_of_a_known_error():
    a = torch.zeros(2, 1, 4, 4)
    b = a + 0.2  # MSE 0.04 on a range of 2: 10 log10(4 / 0.04) = 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    c = a.clone()
    c[1] += 0.02  # per image: 20 dB and 40 dB
    assert psnr(a, torch.cat([b[:1], c[1:]]), per_image=True) == pytest.approx(30.0)
    assert psnr(a, a) == math.inf


def test_ssim_is_one_for_identical_images_and_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(16, 16))
    y = np.clip(x + rng.normal(scale=0.3, size=x.shape), -1, 1)
    tx, ty = torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None]
    assert ssim(tx, tx) == pytest.approx(1.0)
    expected = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=2.0)
    assert ssim(tx, ty) == pytest.approx(expected, abs=1e-6)
    assert ssim(tx, ty) < 0.9


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="smaller than the 11-px window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


# ------------------------------------------------------------------------------------------ digits metrics

def test_digits_frechet_distance_is_small_for_real_digits_and_large_for_noise():
    from zoo.data.digits import digits_tensors
    from zoo.eval.digits_classifier import frechet_distance_to_digits

    real = digits_tensors(8, "bilinear", split="val")[0]
    noise = torch.rand(len(real), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert frechet_distance_to_digits(real) < frechet_distance_to_digits(noise) / 10


# ------------------------------------------------------------------------------------------ sampling

def test_eval_sampling_resumes_with_the_same_images(dit_dir, tmp_path):
    from zoo.eval.sampling import sample_for_eval
    from zoo.hub.model_dir import load_model_dir
    from zoo.pipeline import parse_labels

    pipe = load_model_dir(dit_dir)
    labels = parse_labels("all", 12, 10)
    whole = sample_for_eval(pipe, labels, seed=3, batch_size=5, work_dir=tmp_path / "a", progress=False)
    assert whole.shape == (12, 8, 8, 1) and whole.dtype == np.uint8
    # An interrupted run: only the first batch was written; the rest is sampled on resume.
    (tmp_path / "b").mkdir()
    first = sample_for_eval(pipe, labels[:5], seed=3, batch_size=5, progress=False)
    np.testing.assert_array_equal(first, whole[:5])
    sample_for_eval(pipe, labels, seed=3, batch_size=5, work_dir=tmp_path / "b", progress=False)
    for shard in sorted((tmp_path / "b").glob("batch-*.npz"))[1:]:
        shard.unlink()
    calls = []
    original = pipe.generate
    pipe.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    resumed = sample_for_eval(pipe, labels, seed=3, batch_size=5, work_dir=tmp_path / "b", progress=False)
    assert len(calls) == 2  # batches 1 and 2 were drawn again, batch 0 was read back
    np.testing.assert_array_equal(resumed, whole)


def test_eval_sampling_refuses_a_work_dir_of_other_settings(dit_dir, tmp_path):
    from zoo.eval.sampling import sample_for_eval
    from zoo.hub.model_dir import load_model_dir
    from zoo.pipeline import parse_labels

    pipe = load_model_dir(dit_dir)
    labels = parse_labels("all", 4, 10)
    sample_for_eval(pipe, labels, seed=0, batch_size=4, work_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(seed differ\)"):
        sample_for_eval(pipe, labels, seed=1, batch_size=4, work_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------------------ zoo-eval

def test_zoo_eval_writes_json_and_adm_npz(dit_dir, tmp_path, capsys):
    from zoo.cli import eval as eval_cli

    out = tmp_path / "eval.json"
    npz = tmp_path / "samples.npz"
    assert eval_cli.main([str(dit_dir), "--num", "20", "--batch-size", "8", "--out", str(out), "--save-npz",
                          str(npz), "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"agreement", "fd_digits", "fd_digits_floor"}
    assert 0 <= report["metrics"]["agreement"] <= 1 and report["metrics"]["fd_digits"] > 0
    assert report["num"] == 20 and report["sampling"]["steps"] == 3
    with np.load(npz) as data:
        assert data["arr_0"].shape == (20, 8, 8, 1) and data["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(data["arr_1"], np.arange(20) % 10)
    assert (tmp_path / "eval.work" / "manifest.json").is_file()  # resumable by default next to --out


def test_zoo_eval_without_inception_weights_names_the_option(dit_dir, tmp_path, capsys):
    from zoo.cli import eval as eval_cli

    assert eval_cli.main([str(dit_dir), "--num", "4", "--metrics", "fid", "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--inception-weights PATH" in err and "weights-inception-2015-12-05-6726825d.pth" in err
    assert eval_cli.main([str(dit_dir), "--num", "4", "--metrics", "isc", "--no-progress", "--device", "cpu",
                          "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth: no such file" in capsys.readouterr().err


def test_zoo_eval_refuses_an_unknown_metric(dit_dir, capsys):
    from zoo.cli import eval as eval_cli

    assert eval_cli.main([str(dit_dir), "--metrics", "fid,sharpness", "--no-progress"]) == 2
    assert "unknown metric 'sharpness'" in capsys.readouterr().err


def test_zoo_eval_scores_a_tokenizer_directory_by_psnr_and_ssim(tmp_path):
    from zoo.eval.evaluate import evaluate_model_dir
    from zoo.hub.model_dir import save_model_dir

    config = {"tokenizer": {"name": "pixel", "channels": 1}, "data": {"name": "digits", "image_size": 16,
                                                                      "channels": 1, "num_classes": 10}}
    save_model_dir(tmp_path / "tok", config, None)
    report = evaluate_model_dir(tmp_path / "tok", num=30, metrics="psnr,ssim")
    assert report["num"] == 30 and report["metrics"]["ssim"] == pytest.approx(1.0)  # pixels reconstruct exactly
    assert report["metrics"]["psnr"] == math.inf
    from zoo.cli import eval as eval_cli

    assert eval_cli.main([str(tmp_path / "tok"), "--num", "10", "--out", str(tmp_path / "tok.json")]) == 0
    assert json.loads((tmp_path / "tok.json").read_text())["metrics"]["psnr"] == "inf"  # strict JSON


def test_fid_and_precision_recall_run_through_torch_fidelity_with_local_weights(tmp_path):
    """The plumbing with a randomly initialised Inception saved as a weights file (the real one is 91 MB)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fx

    from zoo.eval.inception import fid_from_reference_stats, fidelity_metrics, inception_features

    with mock.patch.object(fx, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        torch.manual_seed(0)
        net = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 8, 8, 1), dtype=np.uint8)
    # Inception's smallest input (75 px) instead of 299 px: the same code path at 1/16 of the CPU time.
    with mock.patch.object(fx.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75):
        scores = fidelity_metrics(a, a, ["isc", "prc"], str(weights))
        features = inception_features(a, str(weights), feature="64")
        ref = tmp_path / "ref.npz"
        mu, sigma = feature_statistics(features)
        np.savez(ref, mu=mu, sigma=sigma)
        from_stats = fid_from_reference_stats(a, ref, str(weights))
    assert scores["inception_score_mean"] > 0
    assert scores["precision"] == pytest.approx(1.0) and scores["recall"] == pytest.approx(1.0)
    assert features.shape == (4, 64)
    assert from_stats == pytest.approx(0.0, abs=1e-3)


def test_inception_weights_that_are_not_a_plain_state_dict_are_refused(tmp_path):
    from zoo.eval.inception import inception_features

    bad = tmp_path / "weights.pth"
    torch.save({"net": object.__new__(torch.nn.ReLU)}, bad)  # a pickled module, not tensors
    with pytest.raises(ValueError, match="weights.pth: not a plain state dict of tensors"):
        inception_features(np.zeros((2, 8, 8, 1), np.uint8), str(bad))


def test_zoo_eval_scores_super_resolution_models_by_psnr_and_ssim_beside_bicubic(tmp_path, capsys):
    """A generator whose dataset serves image conditions is scored against HR images, not by label."""
    from PIL import Image

    from zoo.cli.eval import main as zoo_eval
    from zoo.eval.evaluate import evaluate_model_dir

    from .test_upscale import make_model_dir

    sr_dir = make_model_dir(tmp_path / "sr")
    hr = tmp_path / "hr"
    hr.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(hr / name)
    report = evaluate_model_dir(sr_dir, ref=str(hr))
    assert [row["image"] for row in report["images"]] == ["a.png", "b.png"] and report["scale"] == 4
    assert report["psnr"] == pytest.approx(np.mean([row["psnr"] for row in report["images"]]))
    assert {"ssim", "bicubic_psnr", "bicubic_ssim"} <= set(report)
    with pytest.raises(ValueError, match="super-resolution model; it is scored by psnr, ssim"):
        evaluate_model_dir(sr_dir, metrics="fid", ref=str(hr))
    assert zoo_eval([str(sr_dir), "--ref", str(tmp_path / "missing")]) == 2
    assert "a folder of high-resolution images" in capsys.readouterr().err
    from zoo.eval.compare import compare  # a grid by class label does not apply: zoo-compare points to zoo-eval

    with pytest.raises(ValueError, match=r"conditioned on images .* zoo-eval "):
        compare([str(sr_dir)], out=str(tmp_path / "cmp"), num=0)

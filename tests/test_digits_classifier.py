"""The digits classifier that judges generated digits (zoo.eval.digits_classifier)."""

import pytest
import torch
import torch.nn.functional as F

import zoo.eval.digits_classifier as dc
from zoo.data.digits import digits_tensors
from zoo.eval import DigitsClassifier, agreement, get_classifier


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """Keep the on-disk weight cache out of the home folder."""
    path = tmp_path_factory.getbasetemp() / "zoo-cache"
    monkeypatch.setenv("ZOO_CACHE_DIR", str(path))
    return path


@pytest.mark.parametrize("size", [8, 16])
def test_val_accuracy_at_least_97_percent(size):
    x, y = digits_tensors(size, split="val")
    assert len(x) == 297
    assert get_classifier(size).accuracy(x, y) >= 0.97


def test_agreement_of_real_val_digits():
    x, y = digits_tensors(16, split="val")
    assert agreement(x, y) >= 0.97
    assert agreement(x, y.tolist(), image_size=16) == agreement(x, y)


def test_agreement_of_noise_is_near_chance():
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert agreement(noise, torch.arange(500) % 10) <= 0.4


def test_agreement_of_wrong_labels_is_low():
    x, y = digits_tensors(8, split="val")
    assert agreement(x, (y + 1) % 10) <= 0.05


def test_robust_to_light_blur_and_noise():
    x, y = digits_tensors(16, split="val")
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noisy = (blurred + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert get_classifier(16).accuracy(noisy, y) >= 0.95


def test_fit_is_deterministic_and_leaves_global_rng_alone():
    x, _ = digits_tensors(8, split="val")
    state = torch.random.get_rng_state()
    fresh = DigitsClassifier.fit(8, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(fresh.logits(x), get_classifier(8).logits(x))
    assert torch.equal(fresh.predict(x), fresh.predict(x))


def test_outputs_shapes_and_types():
    x, _ = digits_tensors(8, split="val")
    clf = get_classifier(8)
    assert clf.predict(x).dtype == torch.int64 and clf.predict(x).shape == (297,)
    proba = clf.predict_proba(x)
    assert proba.shape == (297, 10) and torch.allclose(proba.sum(1), torch.ones(297))
    assert torch.equal(proba.argmax(1), clf.predict(x))
    features = clf.features(x)
    assert features.shape == (297, dc.FEATURE_DIM) and torch.isfinite(features).all()
    assert features.std(0).min() > 0  # no dead feature dimension on real digits


def test_uint8_images_are_accepted():
    x, y = digits_tensors(8, split="val")
    as_uint8 = torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8)
    clf = get_classifier(8)
    assert (clf.predict(as_uint8) == clf.predict(x)).float().mean() >= 0.99


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (4, 1, 16, 16), (4, 8, 8), (4, 1, 8, 9)])
def test_wrong_shape_names_expected_shape(shape):
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        get_classifier(8).predict(torch.zeros(shape))


def test_agreement_validates_inputs():
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\)"):
        agreement(torch.zeros(4, 1, 12, 12), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="4 labels"):
        agreement(torch.zeros(4, 1, 8, 8), [0, 1])


def test_disk_cache_round_trip(tmp_path):
    x, _ = digits_tensors(8, split="val")
    clf = get_classifier(8)
    path = tmp_path / "clf.npz"
    clf.save(str(path))
    loaded = DigitsClassifier.load(str(path))
    assert (loaded.image_size, loaded.resize) == (8, "bilinear")
    assert torch.equal(loaded.logits(x), clf.logits(x))


def test_get_classifier_reuses_disk_cache(cache_dir, monkeypatch):
    monkeypatch.setattr(dc, "_CACHE", {})  # an earlier test may hold it in memory from another cache folder
    get_classifier(8)  # fitted (or loaded) once, written to the cache folder
    files = list(cache_dir.glob("digits_classifier_v*_8px_bilinear_seed0.npz"))
    assert len(files) == 1
    monkeypatch.setattr(dc, "_CACHE", {})
    monkeypatch.setattr(DigitsClassifier, "fit", classmethod(lambda cls, *a, **k: pytest.fail("refitted")))
    x, y = digits_tensors(8, split="val")
    assert get_classifier(8).accuracy(x, y) >= 0.97


def test_the_fd_floor_is_two_real_halves_apart_and_far_below_noise():
    from zoo.eval.digits_classifier import frechet_distance_floor, frechet_distance_to_digits

    floor = frechet_distance_floor(16)
    assert 0 < floor == frechet_distance_floor(16)  # a fixed split: the same value every time
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert frechet_distance_to_digits(noise) > 20 * floor
    real, _ = __import__("zoo.data.digits", fromlist=["_"]).digits_tensors(16)
    real_500 = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(1))[:500]]
    assert frechet_distance_to_digits(real_500) < 2 * floor  # 500 real digits meet the bar

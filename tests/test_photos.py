"""The super-resolution datasets: ``photos`` (scikit-image's photographs, split by image) and ``pairs``."""

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.config import ConfigError
from zoo.data.photos import TRAIN_IMAGES, VAL_IMAGES, bicubic_upsample, degrade, photo
from zoo.data.transforms import to_tensor_pm1
from zoo.registry import create_dataset


def test_train_and_validation_photographs_are_disjoint():
    assert not set(TRAIN_IMAGES) & set(VAL_IMAGES)
    val = create_dataset("photos", split="val", patches_per_image=4)
    assert val.names == list(VAL_IMAGES) and len(val) == 2 * 4


def test_items_pair_an_hr_patch_with_the_matching_crop_of_the_whole_photographs_bicubic_lr():
    data = create_dataset("photos", image_size=16, scale=4, random_flip=False, patches_per_image=4)
    differs_from_a_downscaled_patch = 0
    for index in range(8):
        hr, cond = data[index]
        assert hr.shape == (3, 16, 16) and cond["lr"].shape == (3, 4, 4) and int(cond["label"]) == 0
        assert -1 <= hr.min() and hr.max() <= 1
        image_index, top, left, _, _ = data._locate(index)
        name = TRAIN_IMAGES[image_index]
        whole = photo(name)[:photo(name).shape[0] // 4 * 4, :photo(name).shape[1] // 4 * 4]
        lr_whole = np.asarray(degrade(Image.fromarray(np.ascontiguousarray(whole)), 4, "bicubic"))
        torch.testing.assert_close(hr, to_tensor_pm1(whole[top:top + 16, left:left + 16]))
        torch.testing.assert_close(cond["lr"], to_tensor_pm1(lr_whole[top // 4:top // 4 + 4, left // 4:left // 4 + 4]))
        hr_uint8 = np.round((hr.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        alone = to_tensor_pm1(np.asarray(degrade(Image.fromarray(hr_uint8), 4, "bicubic")))
        differs_from_a_downscaled_patch += not torch.allclose(cond["lr"], alone)
    assert differs_from_a_downscaled_patch  # a patch downscaled alone treats its edges as the image's border


def test_random_rotate_turns_hr_and_lr_together_by_quarter_turns():
    plain = create_dataset("photos", image_size=16, scale=4, random_flip=False, patches_per_image=8)
    turned = create_dataset("photos", image_size=16, scale=4, random_flip=False, random_rotate=True,
                            patches_per_image=8)
    seen = set()
    for index in range(24):
        (hr, cond), (hr_r, cond_r) = plain[index], turned[index]
        turns = next(k for k in range(4) if torch.equal(torch.rot90(hr, k, dims=(-2, -1)), hr_r))
        torch.testing.assert_close(cond_r["lr"], torch.rot90(cond["lr"], turns, dims=(-2, -1)))
        seen.add(turns)
    assert seen == {0, 1, 2, 3}


def test_image_scales_add_downscaled_copies_of_the_training_photographs():
    data = create_dataset("photos", image_size=16, image_scales=[1.0, 0.5], patches_per_image=2)
    assert data.names == list(TRAIN_IMAGES) + [f"{name}@0.5" for name in TRAIN_IMAGES]
    assert len(data) == 2 * len(TRAIN_IMAGES) * 2
    full, half = data.images[0], data.images[len(TRAIN_IMAGES)]
    assert half.shape[:2] == (full.shape[0] // 2, full.shape[1] // 2)
    assert create_dataset("photos", split="val", image_scales=[1.0, 0.5]).names == list(VAL_IMAGES)


def test_patches_are_a_function_of_seed_epoch_and_index():
    data = create_dataset("photos", image_size=16, degradation="realesrgan")
    a = data[3]
    data.set_epoch(1)
    b = data[3]
    data.set_epoch(0)
    torch.testing.assert_close(data[3][0], a[0])
    torch.testing.assert_close(data[3][1]["lr"], a[1]["lr"])
    assert not torch.equal(a[0], b[0])


def test_residual_targets_are_what_bicubic_misses_times_the_gain():
    image = create_dataset("photos", image_size=16, random_flip=False)
    residual = create_dataset("photos", image_size=16, random_flip=False, target="residual", residual_gain=2.0)
    hr, cond = image[5]
    expected = ((hr - bicubic_upsample(cond["lr"][None], (16, 16))[0]) * 2.0).clamp(-1, 1)
    torch.testing.assert_close(residual[5][0], expected)


def test_negative_items_are_low_quality_targets_with_the_negative_label():
    data = create_dataset("photos", image_size=16, target="residual", negative_rate=0.5)
    labels = [int(data[i][1]["label"]) for i in range(40)]
    assert 5 < sum(labels) < 35
    negative = next(i for i, label in enumerate(labels) if label == 1)
    assert data[negative][0].abs().max() == 0  # the bicubic upsample itself: zero residual
    val = create_dataset("photos", split="val", negative_rate=0.5)
    assert all(int(val[i][1]["label"]) == 0 for i in range(len(val)))


def test_sample_conditions_batch_the_first_items():
    data = create_dataset("photos", split="val", image_size=16)
    cond = data.sample_conditions(3)
    assert cond["lr"].shape == (3, 3, 4, 4) and cond["label"].tolist() == [0, 0, 0]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="image_size"):
        create_dataset("photos", image_size=18, scale=4)
    with pytest.raises(ConfigError, match="scale"):
        create_dataset("photos", scale=3)
    for bad in ([], [1.5], [0.0]):
        with pytest.raises(ConfigError, match=r"image_scales: must be a non-empty list of factors in \(0, 1\]"):
            create_dataset("photos", image_scales=bad)


def _write(folder, name, array):
    folder.mkdir(exist_ok=True)
    Image.fromarray(array).save(folder / name)


def test_pairs_reads_hr_folders_and_makes_or_reads_the_lr(tmp_path):
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (34, 41, 3), dtype=np.uint8)
    _write(tmp_path / "hr", "a.png", hr)
    made = create_dataset("pairs", hr_root=str(tmp_path / "hr"), image_size=16, scale=2, patches_per_image=3)
    assert len(made) == 3 and made[0][1]["lr"].shape == (3, 8, 8)
    _write(tmp_path / "lr", "a.png", np.zeros((17, 20, 3), np.uint8))
    given = create_dataset("pairs", hr_root=str(tmp_path / "hr"), lr_root=str(tmp_path / "lr"), image_size=16,
                           scale=2, random_flip=False)
    assert given[0][1]["lr"].min() == -1 and given[0][1]["lr"].max() == -1  # read from lr_root, not made


def test_pairs_errors_name_the_folder_and_file(tmp_path):
    with pytest.raises(ConfigError, match="hr_root"):
        create_dataset("pairs", hr_root=str(tmp_path / "missing"))
    _write(tmp_path / "hr", "a.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "lr").mkdir()
    _write(tmp_path / "lr", "b.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ConfigError, match="no low-resolution image named a"):
        create_dataset("pairs", hr_root=str(tmp_path / "hr"), lr_root=str(tmp_path / "lr"), image_size=16, scale=2)
    _write(tmp_path / "lr", "a.png", np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(ConfigError, match="expected 16x16"):
        create_dataset("pairs", hr_root=str(tmp_path / "hr"), lr_root=str(tmp_path / "lr"), image_size=16, scale=2)
    _write(tmp_path / "lr", "a.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ConfigError, match="data.image_scales: the LR images of lr_root belong to the full-size"):
        create_dataset("pairs", hr_root=str(tmp_path / "hr"), lr_root=str(tmp_path / "lr"), image_size=16, scale=2,
                       image_scales=[1.0, 0.5])

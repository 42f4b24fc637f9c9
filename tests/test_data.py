"""Datasets (digits, imagefolder) and image helpers of zoo.data."""

import numpy as np
import pytest
import torch
from PIL import Image

import zoo.data  # noqa: F401  (registers the datasets)
from zoo import registry
from zoo.config import ConfigError, build_config
from zoo.data import (
    DigitsConfig,
    DigitsDataset,
    ImageFolderConfig,
    ImageFolderDataset,
    center_crop_arr,
    make_grid_image,
    to_tensor_pm1,
    to_uint8,
)
from zoo.data.digits import split_indices


@pytest.fixture
def create_dataset(monkeypatch):
    """registry.create_dataset without importing the other built-in component modules."""
    monkeypatch.setattr(registry, "_loaded", True)
    return registry.create_dataset


# ---------------------------------------------------------------------------------------- digits
def _raw_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def test_digits_has_1797_items_and_10_classes(create_dataset):
    ds = create_dataset("digits")
    assert len(ds) == 1797
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 1, 16)
    labels = torch.stack([ds[i][1] for i in range(len(ds))])
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_digits_item_types(create_dataset):
    image, label = create_dataset("digits", image_size=8)[5]
    assert image.dtype == torch.float32 and image.shape == (1, 8, 8)
    assert label.dtype == torch.int64 and label.dim() == 0 and int(label) == 5


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("resize", ["bilinear", "nearest", "bicubic"])
def test_digits_shape_and_range_attains_both_ends(size, resize):
    ds = DigitsDataset(DigitsConfig(image_size=size, resize=resize))
    assert ds.images.shape == (1797, 1, size, size)
    assert ds[0][0].shape == (1, size, size)
    assert ds.images.min().item() == -1.0
    assert ds.images.max().item() == 1.0


def test_digits_8px_equals_raw_values_mapped():
    raw, target = _raw_digits()
    ds = DigitsDataset(DigitsConfig(image_size=8))
    expected = torch.from_numpy((raw / 16.0) * 2 - 1).float().unsqueeze(1)
    assert torch.equal(ds.images, expected)
    assert ds[123][0].equal(expected[123]) and int(ds[123][1]) == target[123]


def test_digits_nearest_16px_repeats_each_pixel_2x2():
    raw, _ = _raw_digits()
    ds = DigitsDataset(DigitsConfig(image_size=16, resize="nearest"))
    expected = np.repeat(np.repeat((raw / 16.0) * 2 - 1, 2, axis=1), 2, axis=2)
    assert np.array_equal(ds.images[:, 0].numpy(), expected.astype(np.float32))


def test_digits_split_sizes_disjoint_and_cover_all():
    train, val = split_indices("train"), split_indices("val")
    assert (len(train), len(val)) == (1500, 297)
    assert not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(1797))
    assert len(DigitsDataset(DigitsConfig(split="train"))) == 1500
    val_ds = DigitsDataset(DigitsConfig(split="val", image_size=8))
    all_ds = DigitsDataset(DigitsConfig(split="all", image_size=8))
    assert torch.equal(val_ds.images, all_ds.images[torch.from_numpy(val)])
    assert torch.equal(val_ds.labels, all_ds.labels[torch.from_numpy(val)])


def test_digits_split_does_not_depend_on_seed():
    a = DigitsDataset(DigitsConfig(split="val", seed=0, image_size=8))
    b = DigitsDataset(DigitsConfig(split="val", seed=7, image_size=8))
    assert torch.equal(a.images, b.images)


def test_digits_bad_image_size_lists_choices(create_dataset):
    with pytest.raises(ConfigError, match=r"image_size.*\[8, 16, 32\]"):
        create_dataset("digits", image_size=12)
    with pytest.raises(ConfigError, match=r"\[8, 16, 32\]"):
        DigitsConfig(image_size=64)
    with pytest.raises(ConfigError, match="resize"):
        build_config(DigitsConfig, {"resize": "lanczos"}, where="data")


# ----------------------------------------------------------------------------------- imagefolder
def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _pattern(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr)


@pytest.fixture
def tree(tmp_path):
    """zebra/ (2 images) and ant/ (2 images, one nested) with odd sizes, RGBA and grey."""
    root = tmp_path / "images"
    _save(root / "zebra" / "z1.png", _pattern(37, 23, "RGBA", seed=1))
    _save(root / "zebra" / "z0.JPG", _pattern(20, 31, "L", seed=2))
    _save(root / "ant" / "a0.bmp", _pattern(45, 33, "RGB", seed=3))
    _save(root / "ant" / "nested" / "a1.webp", _pattern(16, 16, "RGB", seed=4))
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_classes_sorted_and_labels(tree):
    ds = ImageFolderDataset(ImageFolderConfig(root=str(tree), image_size=16))
    assert ds.class_names == ["ant", "zebra"]
    assert ds.num_classes == 2 and len(ds) == 4
    names = [p.split("/")[-1] for p in ds.paths]
    assert names == ["a0.bmp", "a1.webp", "z0.JPG", "z1.png"]
    assert [int(ds[i][1]) for i in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_shapes_and_range(tree, channels):
    ds = ImageFolderDataset(ImageFolderConfig(root=str(tree), image_size=12, channels=channels))
    assert ds.channels == channels
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (channels, 12, 12) and image.dtype == torch.float32
        assert label.dtype == torch.int64 and label.dim() == 0
        assert image.min() >= -1 and image.max() <= 1


def test_imagefolder_via_registry(tree, create_dataset):
    ds = create_dataset("imagefolder", root=str(tree), image_size=8, channels=1)
    assert isinstance(ds, ImageFolderDataset) and ds[0][0].shape == (1, 8, 8)


def test_imagefolder_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        _save(tmp_path / f"img{i}.PNG", _pattern(10, 10, seed=i))
    ds = ImageFolderDataset(ImageFolderConfig(root=str(tmp_path), image_size=8))
    assert (ds.num_classes, len(ds)) == (1, 3)
    assert {int(ds[i][1]) for i in range(3)} == {0}


def test_center_crop_box_halving_then_crop():
    # 64x32 image of constant 2x2 blocks: one BOX halving gives the block values exactly (32x16),
    # the short side is then already 16 so the crop takes columns 8..24.
    blocks = np.arange(16 * 32, dtype=np.uint8).reshape(16, 32)
    image = Image.fromarray(np.repeat(np.repeat(blocks, 2, 0), 2, 1))
    out = center_crop_arr(image, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert np.array_equal(out, blocks[:, 8:24])


def test_center_crop_odd_size_halves_with_floor_then_offsets():
    image = _pattern(45, 33, "RGB", seed=3)  # min side 33 >= 32: halve to (22, 16), crop x from 3
    expected = np.asarray(image.resize((22, 16), resample=Image.BOX))[:, 3:19]
    assert np.array_equal(center_crop_arr(image, 16), expected)


def test_center_crop_upscales_short_side_bicubic():
    image = _pattern(20, 10, "RGB", seed=5)  # scale 1.6 -> (32, 16), crop x from 8
    expected = np.asarray(image.resize((32, 16), resample=Image.BICUBIC))[:, 8:24]
    out = center_crop_arr(image, 16)
    assert out.shape == (16, 16, 3) and np.array_equal(out, expected)


def test_imagefolder_serves_center_crop_unflipped(tree):
    ds = ImageFolderDataset(ImageFolderConfig(root=str(tree), image_size=16, random_flip=False))
    expected = center_crop_arr(Image.open(tree / "ant" / "a0.bmp").convert("RGB"), 16)
    assert torch.equal(ds[0][0], to_tensor_pm1(expected))


def test_imagefolder_flip_is_function_of_seed_epoch_index(tree):
    config = ImageFolderConfig(root=str(tree), image_size=16, random_flip=True, seed=3)
    a, b = ImageFolderDataset(config), ImageFolderDataset(config)
    plain = ImageFolderDataset(ImageFolderConfig(root=str(tree), image_size=16, random_flip=False))
    flips = {}
    for epoch in range(6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(a)):
            torch.manual_seed(epoch * 10 + i)  # global RNG state must not matter
            np.random.seed(i)
            x = a[i][0]
            assert torch.equal(x, b[i][0])
            assert torch.equal(x, a[i][0])
            unflipped = plain[i][0]
            flipped = torch.equal(x, unflipped.flip(-1))
            assert flipped or torch.equal(x, unflipped)
            flips[epoch, i] = flipped
    assert any(flips[e, i] != flips[0, i] for e in range(1, 6) for i in range(len(a)))
    assert 0 < sum(flips.values()) < len(flips)


def test_imagefolder_missing_root_names_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"data\.root: '{missing}' does not exist"):
        ImageFolderDataset(ImageFolderConfig(root=str(missing)))
    with pytest.raises(ConfigError, match="data.root"):
        ImageFolderDataset(ImageFolderConfig(root=""))


def test_imagefolder_no_images_lists_extensions(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "cls").mkdir()
    with pytest.raises(ConfigError, match=r"no images found.*\.png.*\.jpg.*\.webp") as err:
        ImageFolderDataset(ImageFolderConfig(root=str(tmp_path)))
    assert str(tmp_path) in str(err.value)


def test_imagefolder_empty_class_folder_is_an_error(tree):
    (tree / "middle").mkdir()
    with pytest.raises(ConfigError, match="middle"):
        ImageFolderDataset(ImageFolderConfig(root=str(tree)))


def test_imagefolder_corrupt_file_named_when_loaded(tree):
    bad = tree / "zebra" / "z2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    ds = ImageFolderDataset(ImageFolderConfig(root=str(tree), image_size=8))
    index = ds.paths.index(str(bad))
    with pytest.raises(ConfigError, match="z2.png"):
        ds[index]


def test_imagefolder_bad_channels():
    with pytest.raises(ConfigError, match=r"\[1, 3\]"):
        build_config(ImageFolderConfig, {"channels": 4}, where="data")


# ------------------------------------------------------------------------------------ transforms
def test_to_uint8_known_values_and_layout():
    values = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    out = to_uint8(values.view(1, 1, 1, 7))
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 1)
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
    rgb = torch.stack([torch.full((2, 3), -1.0), torch.zeros(2, 3), torch.ones(2, 3)]).unsqueeze(0)
    assert to_uint8(rgb).shape == (1, 2, 3, 3)
    assert to_uint8(rgb)[0, 1, 2].tolist() == [0, 128, 255]


def test_to_tensor_pm1_round_trips_every_uint8_value():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = to_tensor_pm1(arr)
    assert x.shape == (1, 16, 16) and x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8(x[None])[0, :, :, 0], arr)
    rgb = np.stack([arr, 255 - arr, arr], axis=-1)
    assert torch.equal(to_tensor_pm1(rgb)[1], to_tensor_pm1(255 - arr)[0])


def test_make_grid_image_size_arithmetic_and_pixels():
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 4, 6).clone()
    images[0, 0, 0, 0] = -1.0
    grid = make_grid_image(images, nrow=3, padding=2, upscale=2)
    # 3 columns of (6*2 + 2) plus 2, 2 rows of (4*2 + 2) plus 2
    assert grid.mode == "L" and grid.size == (3 * 14 + 2, 2 * 10 + 2)
    arr = np.asarray(grid)
    assert arr[0, 0] == 255  # white padding
    assert (arr[2:4, 2:4] == 0).all()  # image 0's (0, 0) pixel, upscaled 2x2
    assert arr[2, 16] == to_uint8(images[1:2])[0, 0, 0, 0]  # image 1 starts at x = 2 + 14
    assert (arr[12:20, 2:14] == 191).all()  # image 3 (value 0.5) opens the second row at y = 2 + 10
    assert (arr[12:20, 30:42] == 255).all()  # sixth cell is empty: pad value


def test_make_grid_image_rgb_and_pad_value():
    grid = make_grid_image(torch.zeros(2, 3, 5, 5), nrow=8, padding=1, pad_value=-1.0)
    assert grid.mode == "RGB" and grid.size == (2 * 6 + 1, 6 + 1)
    arr = np.asarray(grid)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[1, 1].tolist() == [128, 128, 128]


def test_imagefolder_enumerates_its_two_flip_variants(tree):
    ds = ImageFolderDataset(ImageFolderConfig(root=str(tree), image_size=16, random_flip=True, seed=5))
    assert ds.num_variants == 2
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            variant = ds.variant_of(i)
            seen.add(variant)
            assert torch.equal(ds[i][0], ds.get_variant(i, variant)[0])
            assert torch.equal(ds.get_variant(i, 1)[0], ds.get_variant(i, 0)[0].flip(-1))
    assert seen == {0, 1}
    fixed = ImageFolderDataset(ImageFolderConfig(root=str(tree), image_size=16, random_flip=False))
    assert fixed.num_variants == 1 and fixed.variant_of(0) == 0
    with pytest.raises(ValueError, match="variant 1"):
        fixed.get_variant(0, 1)

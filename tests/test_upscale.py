"""zoo-upscale: tiling with blended overlaps, self-ensembling, any image size, grey/RGBA input, clear errors, --eval."""

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.cli.upscale import main
from zoo.data.photos import bicubic_upsample
from zoo.hub.model_dir import model_config_dict, save_model_dir
from zoo.recipe import recipe_from_dict
from zoo.upscale import SRModel, crop_grid, detail_window, dihedral, tile_starts, upscale_tiled


def test_tiles_cover_the_image_and_end_flush_with_its_border():
    assert tile_starts(20, 8, 2) == [0, 6, 12]
    assert tile_starts(21, 8, 2) == [0, 6, 12, 13]
    assert tile_starts(5, 8, 2) == [0]


@pytest.mark.parametrize("size,overlap", [((13, 7), 2), ((8, 8), 0), ((23, 17), 3)])
def test_a_constant_image_upscales_to_a_constant_image(size, overlap):
    def brighten(tiles):  # a per-tile upscaler: constant in, constant out
        return bicubic_upsample(tiles, (tiles.shape[-2] * 4, tiles.shape[-1] * 4)) + 0.25

    lr = torch.full((3, *size), -0.5)
    out = upscale_tiled(brighten, lr, scale=4, tile=8, overlap=overlap, batch_size=3)
    assert out.shape == (3, size[0] * 4, size[1] * 4)
    torch.testing.assert_close(out, torch.full_like(out, -0.25))


def test_overlapping_tiles_blend_into_the_untiled_result_away_from_tile_borders():
    torch.manual_seed(0)
    lr = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6) * 2 - 1, size=(24, 24), mode="bilinear")[0]

    def bicubic(tiles):
        return bicubic_upsample(tiles, (tiles.shape[-2] * 2, tiles.shape[-1] * 2))

    tiled = upscale_tiled(bicubic, lr, scale=2, tile=8, overlap=4, batch_size=4)
    whole = bicubic_upsample(lr[None], (48, 48))[0]
    assert (tiled - whole)[:, 4:-4, 4:-4].abs().max() < 0.05


@pytest.mark.parametrize("k", range(8))
def test_dihedral_views_are_distinct_and_undone_by_their_inverse(k):
    image = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    view = dihedral(image, k)
    assert torch.equal(dihedral(view, k, inverse=True), image)
    others = [dihedral(image, j) for j in range(8) if j != k]
    assert not any(o.shape == view.shape and torch.equal(o, view) for o in others)


class _Fixed(SRModel):
    """An SRModel whose tiles go through a given function instead of a pipeline."""

    def __init__(self, fn, defaults=None):
        super().__init__(pipe=type("P", (), {"sample_config": defaults})(), scale=2, tile=8, channels=1)
        self.fn = fn

    def upscale_fn(self, **_):
        return self.fn


def test_self_ensemble_averages_the_views_and_keeps_equivariant_models_unchanged():
    lr = torch.rand(1, 11, 14) * 2 - 1

    def nearest(tiles):  # pixelwise, so tiling and every flip or turn commute with it
        return tiles.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2).tanh()

    plain = _Fixed(nearest).upscale(lr, overlap=2, ensemble=1)
    torch.testing.assert_close(_Fixed(nearest).upscale(lr, overlap=2, ensemble=8), plain, atol=1e-6, rtol=0)

    def ramp(tiles):  # adds a left-to-right ramp to every tile: a flipped view cancels it
        up = nearest(tiles)
        return up + torch.linspace(-0.5, 0.5, up.shape[-1])
    one, two = (_Fixed(ramp).upscale(lr, overlap=0, ensemble=n) for n in (1, 2))
    assert (one - plain).abs().max() > 0.1
    torch.testing.assert_close(two, plain, atol=1e-5, rtol=0)
    # The recipe's defaults apply when no argument is given; bad sizes are refused by name.
    defaults = type("S", (), {"tile_overlap": 0, "self_ensemble": 2})()
    torch.testing.assert_close(_Fixed(ramp, defaults).upscale(lr), two)
    with pytest.raises(ValueError, match="ensemble 3"):
        _Fixed(ramp).upscale(lr, ensemble=3)


def make_model_dir(path, refiner=False):
    recipe = recipe_from_dict({
        "model": {"name": "var-sr", "depth": 1, "embed_dim": 16, "num_heads": 2, "patch_nums": [1, 2, 4],
                  "vocab_size": 16, "Cvae": 4, "stem_channels": [8, 8, 8], "refiner": refiner, "refiner_width": 16,
                  "refiner_depth": 1, "refiner_steps": "2", "residual_gain": 4.0},
        "tokenizer": {"name": "msvq", "vocab_size": 16, "z_channels": 4, "ch": 32, "ch_mult": [1, 1, 2],
                      "v_patch_nums": [1, 2, 4]},
        "data": {"name": "photos", "image_size": 16, "scale": 4, "target": "residual", "residual_gain": 4.0},
        "sample": {"top_k": 1, "cfg_scale": 0.0},
    }, source="test")
    torch.manual_seed(0)
    model, tokenizer = recipe.model.build(), recipe.tokenizer.build()
    save_model_dir(path, model_config_dict(recipe), model.state_dict(), tokenizer_state=tokenizer.state_dict())
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_model_dir(tmp_path_factory.mktemp("sr") / "model"))


@pytest.mark.parametrize("mode,size", [("RGB", (13, 7)), ("L", (5, 9)), ("RGBA", (11, 6))])
def test_upscales_odd_sizes_and_keeps_grey_and_alpha(model_dir, tmp_path, mode, size, capsys):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(tmp_path / "in.png")
    assert main([model_dir, str(tmp_path / "in.png"), "--scale", "4", "--out", str(tmp_path / "out.png"),
                 "--overlap", "1"]) == 0
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (size[0] * 4, size[1] * 4)
        assert out.mode == {"RGB": "RGB", "L": "L", "RGBA": "RGBA"}[mode]
    assert "wrote" in capsys.readouterr().out


def test_unreadable_and_missing_files_fail_clearly(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    assert main([model_dir, str(broken), "--out", str(tmp_path / "o.png")]) == 2
    assert f"{broken}: cannot read image file" in capsys.readouterr().err
    assert main([model_dir, str(tmp_path / "nope.png"), "--out", str(tmp_path / "o.png")]) == 2
    assert "nope.png: no such image file" in capsys.readouterr().err
    assert main([str(tmp_path), str(broken), "--out", str(tmp_path / "o.png")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main([model_dir, str(broken), "--scale", "2", "--out", str(tmp_path / "o.png")]) == 2
    assert "trained for x4" in capsys.readouterr().err


def test_eval_prints_psnr_and_ssim_beside_bicubic(model_dir, tmp_path, capsys):
    folder = tmp_path / "hr"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (18, 21, 3), dtype=np.uint8)).save(folder / name)
    grid = tmp_path / "grid.png"
    assert main([model_dir, "--eval", str(folder), "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "a.png: 20x16" in out and "bicubic PSNR" in out and "mean over 2 images" in out
    assert f"crop grid (LR, bicubic, zoo, HR): {grid}" in out
    with Image.open(grid) as image:  # two rows of four 16-px crops enlarged 3x, with a margin for names
        assert image.width > 4 * 48 and 2 * 48 < image.height < 3 * 48
    assert main([model_dir, "--eval", str(folder), "--grid", str(tmp_path / "grid.jpg")]) == 2
    assert "--grid" in capsys.readouterr().err


def test_detail_window_finds_where_bicubic_misses_the_most():
    hr = np.zeros((40, 48, 3), np.uint8)
    bicubic = hr.copy()
    hr[24:32, 30:38] = 200  # the only place bicubic is wrong
    top, left = detail_window(hr, bicubic, 16)
    assert top <= 24 and top + 16 >= 32 and left <= 30 and left + 16 >= 38


def test_crop_grid_rows_show_lr_bicubic_model_and_hr_of_one_window(tmp_path):
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    arrays = {"lr": hr[::4, ::4], "bicubic": np.zeros_like(hr), "model": np.full_like(hr, 128), "hr": hr}
    path = crop_grid([("x", arrays)], str(tmp_path / "g.png"), scale=4, side=16, zoom=2)
    top, left = detail_window(hr, arrays["bicubic"], 16)
    with Image.open(path) as image:
        grid = np.asarray(image.convert("RGB"))
    hr_panel = grid[-2 - 32:-2, -2 - 32:-2]  # the last column, 16 px enlarged 2x, above the bottom padding
    np.testing.assert_array_equal(hr_panel[::2, ::2], hr[top:top + 16, left:left + 16])


def test_eval_photos_uses_the_validation_photographs(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no folder named "photos" here
    assert main([model_dir, "--eval", "photos", "--crop", "24", "--ensemble", "2"]) == 0
    out = capsys.readouterr().out
    assert "chelsea: 24x24" in out and "clock: 24x24" in out and "mean over 2 images" in out
    assert (tmp_path / "upscale_eval.png").is_file()  # the default crop grid


def test_bicubic_downscale_is_the_datas_degradation_without_its_rounding():
    from zoo.data.photos import degrade, photo
    from zoo.upscale import bicubic_downscale

    hr = np.ascontiguousarray(photo("chelsea")[:64, :96])
    lr = torch.from_numpy(np.array(degrade(Image.fromarray(hr), 4, "bicubic"))).permute(2, 0, 1) / 127.5 - 1
    ours = bicubic_downscale(torch.from_numpy(hr).permute(2, 0, 1) / 127.5 - 1, 4)
    assert ours.shape == lr.shape == (3, 16, 24)
    assert (ours - lr).abs().max() <= 1.0 / 127.5  # PIL rounds each of its two passes to uint8


def test_back_projection_makes_the_result_agree_with_its_input():
    from zoo.data.photos import photo
    from zoo.upscale import back_project, bicubic_downscale

    hr = torch.from_numpy(np.ascontiguousarray(photo("astronaut")[100:164, 200:280])).permute(2, 0, 1) / 127.5 - 1
    lr = bicubic_downscale(hr, 4)
    start = bicubic_upsample(lr[None], (64, 80))[0]
    errors = [(bicubic_downscale(back_project(start, lr, 4, k), 4) - lr).abs().mean() for k in range(3)]
    assert errors[1] < 0.5 * errors[0] and errors[2] < errors[1]
    assert torch.equal(back_project(start, lr, 4, 0), start)
    # An image that already agrees with its LR (away from the clamp) hardly moves.
    agreed = (hr * 0.5)
    torch.testing.assert_close(back_project(agreed, bicubic_downscale(agreed, 4), 4, 2), agreed, atol=1e-4, rtol=0)
    # And it moves towards the truth: closer to the HR image than bicubic upsampling was.
    assert (back_project(start, lr, 4, 2) - hr).pow(2).mean() < (start - hr).pow(2).mean()
    with pytest.raises(ValueError, match=r"times 4 on each side"):
        back_project(start[:, :-4], lr, 4, 1)


def test_upscale_back_projects_after_the_views_and_eval_reports_what_it_alone_gives(model_dir, tmp_path, capsys):
    from zoo.upscale import back_project

    lr = torch.rand(1, 9, 12) * 2 - 1

    def nearest(tiles):
        return tiles.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)

    plain = _Fixed(nearest).upscale(lr, overlap=0, ensemble=1)
    projected = _Fixed(nearest).upscale(lr, overlap=0, ensemble=1, back_projection=2)
    torch.testing.assert_close(projected, back_project(plain, lr, 2, 2))
    defaults = type("S", (), {"tile_overlap": 0, "self_ensemble": 1, "back_projection": 2})()
    torch.testing.assert_close(_Fixed(nearest, defaults).upscale(lr), projected)  # the recipe's default
    with pytest.raises(ValueError, match="back-projection -1"):
        _Fixed(nearest).upscale(lr, back_projection=-1)
    folder = tmp_path / "hr"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / "a.png")
    assert main([model_dir, "--eval", str(folder), "--grid", "", "--back-project", "2"]) == 0
    out = capsys.readouterr().out
    assert "bicubic + back-projection PSNR" in out and out.count("bicubic + back-projection") == 2  # image, mean
    assert '"backprojected_psnr"' in out
    assert main([model_dir, "--eval", str(folder), "--grid", ""]) == 0  # the test recipe has none: no such row
    assert "back-projection" not in capsys.readouterr().out
    assert main([model_dir, "--eval", str(folder), "--back-project", "-1"]) == 2
    assert "back-projection -1" in capsys.readouterr().err
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (7, 13), dtype=np.uint8)).save(tmp_path / "grey.png")
    assert main([model_dir, str(tmp_path / "grey.png"), "--out", str(tmp_path / "o.png"), "--back-project", "3"]) == 0
    with Image.open(tmp_path / "o.png") as out:  # odd sizes, smaller than a tile, grey: still x4 and grey
        assert out.size == (52, 28) and out.mode == "L"

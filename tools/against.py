"""``tools/bench.py RECIPE --against DIR``: zoo beside a local checkout of the official code, one process.

DIR is a checkout of facebookresearch/DiT, LTH14/mar or FoundationVision/VAR (recognised by its
files; nothing is downloaded). The official model is built from the recipe's generator config,
given zoo's weights (the key names are the official ones, loaded with ``strict=True``), and both
take turns on the same batch: a training step (the official script's loss, backward, AdamW) and a
sampling call with the recipe's sampling settings. Each round runs both once, in alternating order,
after one warm-up each; the medians and ``official / zoo`` (> 1: zoo is faster) are printed.

Variants (``--variants``; on a CPU only the first two exist):

- ``official``: the official code as its train.py runs it (fp32, TF32 allowed, ``torch.optim.AdamW``);
- ``zoo``: zoo at the same numerics (fp32, TF32 allowed, fused AdamW);
- ``zoo-bf16``: zoo under bf16 autocast (CUDA);
- ``zoo-bf16-compile``: bf16 autocast and ``torch.compile`` of the generator (CUDA).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

VARIANTS = ("official", "zoo", "zoo-bf16", "zoo-bf16-compile")


def detect(root: Path) -> str:
    if (root / "models.py").is_file() and (root / "diffusion").is_dir():
        return "dit"
    if (root / "models" / "mar.py").is_file():
        return "mar"
    if (root / "models" / "var.py").is_file() and (root / "models" / "vqvae.py").is_file():
        return "var"
    raise SystemExit(f"--against {root}: not a checkout of facebookresearch/DiT, LTH14/mar or FoundationVision/VAR "
                     f"(looked for models.py + diffusion/, models/mar.py, models/var.py + models/vqvae.py)")


def _import_official(root: Path, names: list[str]):
    """Import the official top-level modules ``names`` from ``root`` (their own absolute imports)."""
    sys.path.insert(0, str(root))
    try:
        return [__import__(name, fromlist=["_"]) for name in names]
    finally:
        sys.path.remove(str(root))


@contextlib.contextmanager
def _cuda_calls_stay_put(device: str):
    """The official MAR sampler calls ``.cuda()``; on a CPU let those calls leave tensors where they are."""
    if device.startswith("cuda"):
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _kwargs_for(fn, fields: dict) -> dict:
    accepted = inspect.signature(fn).parameters
    return {k: v for k, v in fields.items() if k in accepted}


class Pair:
    """The official and the zoo model of one recipe, with the same weights and the same batch."""

    def __init__(self, recipe, generator, root: Path, device: str, batch: int, sample_batch: int):
        from zoo.config import config_to_dict

        self.recipe, self.zoo, self.device = recipe, generator.to(device), device
        self.family = detect(root)
        fields = config_to_dict(recipe.model.config)
        torch.manual_seed(0)
        self.labels = torch.randint(0, getattr(generator, "num_classes", 1000) or 1000, (batch,), device=device)
        self.sample_labels = self.labels[:sample_batch] if sample_batch <= batch else torch.arange(sample_batch,
                                                                                                   device=device) % 10
        getattr(self, f"_build_{self.family}")(root, fields)
        self.official.to(device)

    # -------------------------------------------------------------------------- DiT

    def _build_dit(self, root, fields):
        models, diffusion = _import_official(root, ["models", "diffusion"])
        self.official = models.DiT(**_kwargs_for(models.DiT.__init__, fields))
        self.official.load_state_dict(self.zoo.state_dict(), strict=True)
        self.official_diffusion = diffusion.create_diffusion(timestep_respacing="")
        self.official_sampling = diffusion.create_diffusion(str(self.recipe.sample.steps))  # as sample.py
        self.inputs = torch.randn(len(self.labels), *self.zoo.latent_shape, device=self.device)

    def _official_loss_dit(self):
        t = torch.randint(0, self.official_diffusion.num_timesteps, (len(self.inputs),), device=self.device)
        return self.official_diffusion.training_losses(self.official, self.inputs, t, dict(y=self.labels))[
            "loss"].mean()

    def _official_sample_dit(self):
        diffusion = self.official_sampling
        n = len(self.sample_labels)
        z = torch.randn(n, *self.zoo.latent_shape, device=self.device)
        cfg = self.recipe.sample.cfg_scale
        if cfg == 1.0:
            return diffusion.p_sample_loop(self.official.forward, z.shape, z, clip_denoised=False,
                                           model_kwargs=dict(y=self.sample_labels), device=self.device)
        y = torch.cat([self.sample_labels, torch.full_like(self.sample_labels, self.zoo.num_classes)])
        z = torch.cat([z, z])
        return diffusion.p_sample_loop(self.official.forward_with_cfg, z.shape, z, clip_denoised=False,
                                       model_kwargs=dict(y=y, cfg_scale=cfg), device=self.device)

    # -------------------------------------------------------------------------- MAR

    def _build_mar(self, root, fields):
        (mar,) = _import_official(root, ["models.mar"])
        fields = dict(fields, norm_layer=partial(torch.nn.LayerNorm, eps=fields["norm_eps"]))
        self.official = mar.MAR(**_kwargs_for(mar.MAR.__init__, fields))
        self.official.load_state_dict(self.zoo.state_dict(), strict=True)
        side = self.zoo.config.img_size // self.zoo.config.vae_stride
        self.inputs = torch.randn(len(self.labels), self.zoo.config.vae_embed_dim, side, side, device=self.device)

    def _official_loss_mar(self):
        with _cuda_calls_stay_put(self.device):
            return self.official(self.inputs, self.labels)

    def _official_sample_mar(self):
        s = self.recipe.sample
        with _cuda_calls_stay_put(self.device):
            return self.official.sample_tokens(len(self.sample_labels), num_iter=s.num_iter, cfg=s.cfg_scale,
                                               cfg_schedule=s.cfg_schedule, labels=self.sample_labels,
                                               temperature=s.temperature)

    # -------------------------------------------------------------------------- VAR

    def _build_var(self, root, fields):
        from zoo.config import config_to_dict

        var, vqvae = _import_official(root, ["models.var", "models.vqvae"])
        tok = config_to_dict(self.recipe.tokenizer.config)
        if tuple(tok["ch_mult"]) != (1, 1, 2, 2, 4) or tok["image_channels"] != 3:
            raise SystemExit(f"--against VAR: the official VQVAE hard-codes ch_mult (1, 1, 2, 2, 4) and RGB images; "
                             f"the recipe's tokenizer has ch_mult {tuple(tok['ch_mult'])} and {tok['image_channels']} "
                             f"channel(s) (recipes/var_d16_imagenet256.yaml has the official shape)")
        self.tokenizer = self.recipe.tokenizer.build().to(self.device).eval().requires_grad_(False)
        self.official_vae = vqvae.VQVAE(vocab_size=tok["vocab_size"], z_channels=tok["z_channels"], ch=tok["ch"],
                                        test_mode=True, share_quant_resi=tok["share_quant_resi"],
                                        v_patch_nums=tuple(tok["v_patch_nums"])).to(self.device)
        self.official_vae.load_state_dict(self.tokenizer.state_dict(), strict=True)
        config = self.recipe.model.config  # its derived sizes: 0 or a negative rate mean the release's defaults
        sizes = dict(embed_dim=config.width, num_heads=config.heads, drop_path_rate=config.drop_path)
        options = dict(fields, **sizes, vae_local=self.official_vae, flash_if_available=False, fused_if_available=False)
        self.official = var.VAR(**_kwargs_for(var.VAR.__init__, options))
        self.official.load_state_dict(self.zoo.state_dict(), strict=True)
        info = type(self.tokenizer).describe(self.tokenizer.config)
        side = self.tokenizer.config.v_patch_nums[-1] * info["downsample"]
        self.inputs = torch.rand(len(self.labels), info["image_channels"], side, side, device=self.device) * 2 - 1

    def _official_loss_var(self):
        with torch.no_grad():
            idx_Bl = self.official_vae.img_to_idxBl(self.inputs)
            gt_BL = torch.cat(idx_Bl, dim=1)
            x_BLCv = self.official_vae.quantize.idxBl_to_var_input(idx_Bl)
        logits = self.official(self.labels, x_BLCv)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt_BL.reshape(-1))

    def _official_sample_var(self):
        s = self.recipe.sample
        return self.official.autoregressive_infer_cfg(len(self.sample_labels), self.sample_labels, g_seed=0,
                                                      cfg=s.cfg_scale, top_k=s.top_k, top_p=s.top_p)

    # -------------------------------------------------------------------------- the zoo side

    def zoo_loss(self):
        if self.family == "var":
            with torch.no_grad():
                tokens = self.tokenizer.training_inputs(self.inputs)
            return self.zoo.loss(tokens, self.labels)["loss"]
        return self.zoo.loss(self.inputs, self.labels)["loss"]

    def zoo_sample(self):
        from zoo.pipeline import Pipeline

        pipe = Pipeline(self.zoo, torch.nn.Identity(), self.recipe.sample, num_classes=None, image_size=None)
        kwargs = pipe.sampling_kwargs()
        if self.family in ("dit", "mar"):
            kwargs["sampler"] = "ddpm"  # the release's only sampler (DiT: at the recipe's steps; MAR: the head's)
        if self.family == "var":
            out = self.zoo.sample(self.sample_labels, tokenizer=self.tokenizer, **kwargs)
            return self.tokenizer.decode(out)  # the official call includes decoding
        return self.zoo.sample(self.sample_labels, **kwargs)

    def official_loss(self):
        return getattr(self, f"_official_loss_{self.family}")()

    def official_sample(self):
        return getattr(self, f"_official_sample_{self.family}")()


def _train_step(model: torch.nn.Module, loss_fn, optimizer, bf16: bool, device: str, clip: float):
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn()
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(args, recipe, generator) -> list[dict]:
    """Time the variants (``args.variants``) of ``args.what`` (train, sample); print and return rows."""
    from zoo.optim import make_optimizer

    device = args.device
    cuda = device.startswith("cuda")
    root = Path(args.against).expanduser()
    batch = args.batch_size or 8
    pair = Pair(recipe, generator, root, device, batch, args.sample_batch or 4)
    variants = [v for v in (args.variants or "official,zoo," + ("zoo-bf16,zoo-bf16-compile" if cuda else "")
                            ).split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or (not cuda and any(v.startswith("zoo-bf16") for v in variants)):
        raise SystemExit(f"--variants: choose from {list(VARIANTS)} (the bf16 ones need CUDA)")
    torch.backends.cuda.matmul.allow_tf32 = True  # as DiT's train.py; no effect on a CPU
    torch.backends.cudnn.allow_tf32 = True
    clip = recipe.train.grad_clip
    rows = []
    for what in args.what.split(","):
        if what not in ("train", "sample"):
            continue
        calls = {}
        for variant in variants:
            official = variant == "official"
            model = pair.official if official else pair.zoo
            if what == "train":
                model.train()
                if official:
                    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr, weight_decay=0)
                else:
                    optimizer, _ = make_optimizer(model, recipe.train)
                loss_fn = pair.official_loss if official else pair.zoo_loss
                if variant == "zoo-bf16-compile":
                    compiled = torch.compile(pair.zoo)
                    loss_fn = _with_model(pair, compiled)
                calls[variant] = partial(_train_step, model, loss_fn, optimizer, variant.startswith("zoo-bf16"),
                                         device, clip)
            else:
                model.eval()
                fn = pair.official_sample if official else pair.zoo_sample
                calls[variant] = partial(_no_grad_autocast, fn, device, variant.startswith("zoo-bf16"))
        times = {v: [] for v in variants}
        for round_index in range(args.rounds + 1):  # the first round is the warm-up
            order = variants if round_index % 2 == 0 else variants[::-1]
            for variant in order:
                torch.manual_seed(round_index)
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                calls[variant]()
                if cuda:
                    torch.cuda.synchronize()
                if round_index:
                    times[variant].append(time.perf_counter() - start)
        base = statistics.median(times["official"]) if "official" in times else None
        n = batch if what == "train" else len(pair.sample_labels)
        for variant in variants:
            median = statistics.median(times[variant])
            row = {"what": what, "family": pair.family, "variant": variant, "batch": n,
                   "seconds": round(median, 4), "images_per_s": round(n / median, 2),
                   "official_over_this": round(base / median, 3) if base else None,
                   "rounds": len(times[variant]), "device": device, "threads": torch.get_num_threads()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _with_model(pair: Pair, compiled):
    def loss_fn():
        original, pair.zoo = pair.zoo, compiled
        try:
            return pair.zoo_loss()
        finally:
            pair.zoo = original
    return loss_fn


def _no_grad_autocast(fn, device: str, bf16: bool):
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        return fn()

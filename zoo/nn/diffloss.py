"""MAR's per-token diffusion head ("Diffusion Loss", Li et al., 2024).

A small MLP (:class:`SimpleMLPAdaLN`) denoises one continuous token at a time, conditioned on a
vector ``c`` per token (MAR's decoder output; VAR-SR's refiner reuses it). :class:`DiffLoss` trains
it and samples from it through the **shared** Gaussian objective of :mod:`zoo.diffusion` — the
noise maths (schedule, learned-range variance, respacing, temperature) live there, not here.

Parameter names (``time_embed``, ``cond_embed``, ``input_proj``, ``res_blocks.{i}.in_ln`` /
``mlp`` / ``adaLN_modulation``, ``final_layer.*``) and ``forward(x, t, c)`` /
``forward_with_cfg(x, t, c, cfg_scale)`` follow LTH14/mar ``models/diffloss.py``; inside MAR the
head sits at ``diffloss.net``, so released checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.diffusion import GaussianConfig, GaussianObjective, ModelVarType
from zoo.diffusion.gaussian import randn
from zoo.nn.embed import TimestepEmbedder


class ResBlock(nn.Module):
    """Pre-norm residual MLP whose norm is modulated by the condition (adaLN with a gate)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels, bias=True), nn.SiLU(),
                                 nn.Linear(channels, channels, bias=True))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels, bias=True))

    def forward(self, x_ND: torch.Tensor, y_ND: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y_ND).chunk(3, dim=-1)
        h_ND = self.mlp(self.in_ln(x_ND) * (1 + scale) + shift)
        return x_ND + gate * h_ND


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm (no affine) and a linear map to the output channels."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels, bias=True))

    def forward(self, x_ND: torch.Tensor, y_ND: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y_ND).chunk(2, dim=-1)
        return self.linear(self.norm_final(x_ND) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """The denoiser of one token: x (N, in_channels) at timestep t (N,) given c (N, z_channels).

    The timestep embedding plus the projected condition modulates every residual block; the output
    has ``out_channels`` (2·in_channels with a learned variance: eps then the variance value).
    Initialisation as the release: xavier linears, N(0, 0.02) timestep MLP, zeroed adaLN and
    output layers (the head outputs zeros at init).
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels) noisy tokens, t (N,) timesteps, c (N, z_channels) -> (N, out_channels)."""
        x_ND = self.input_proj(x)
        y_ND = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x_ND = checkpoint(block, x_ND, y_ND, use_reentrant=False)
            else:
                x_ND = block(x_ND, y_ND)
        return self.final_layer(x_ND, y_ND)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale) -> torch.Tensor:
        """Guided output for a batch whose first half is conditional and second half unconditional.

        The first half of ``x`` is run with both halves' conditions; the first ``in_channels``
        outputs (eps) become ``uncond + cfg_scale·(cond − uncond)`` for both halves, the variance
        channels pass through unguided. ``cfg_scale`` is a float or a broadcastable tensor.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def default_head_objective() -> GaussianObjective:
    """MAR's head diffusion: cosine schedule, learned-range sigma, 1000 steps, MSE + VB loss."""
    return GaussianObjective(GaussianConfig(noise_schedule="cosine", learn_sigma=True))


class DiffLoss(nn.Module):
    """Per-token diffusion loss and sampler around a :class:`SimpleMLPAdaLN` (``net``).

    Args:
        target_channels: channels of one token (MAR: ``vae_embed_dim · patch_size²``).
        z_channels: channels of the condition vector.
        depth, width: residual blocks and width of the MLP.
        num_sampling_steps: respacing used by :meth:`sample` (``"100"``, ``"ddim50"``, an int, …).
        objective: the shared Gaussian objective (a :class:`~zoo.diffusion.GaussianObjective`);
            default :func:`default_head_objective`. With a learned variance the net outputs
            2·target_channels. It holds tables, no weights, and is not a submodule.

    ``train_diffusion`` (the objective) and ``gen_diffusion`` (its respacing) keep the release's names.
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: str | int = "100", grad_checkpointing: bool = False,
                 objective: GaussianObjective | None = None):
        super().__init__()
        self.objective = objective if objective is not None else default_head_objective()
        if not hasattr(self.objective, "sampling_diffusion"):
            raise TypeError(f"DiffLoss needs the shared Gaussian objective (zoo.diffusion.GaussianObjective); "
                            f"got {type(self.objective).__name__}")
        learned = self.objective.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(in_channels=target_channels, model_channels=width,
                                  out_channels=target_channels * 2 if learned else target_channels,
                                  z_channels=z_channels, num_res_blocks=depth, grad_checkpointing=grad_checkpointing)
        self.num_sampling_steps = num_sampling_steps
        self.gen_diffusion = self.objective.sampling_diffusion(num_sampling_steps)  # fails early on a bad spec

    @property
    def train_diffusion(self) -> GaussianObjective:
        return self.objective

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over tokens (over ``mask == 1`` tokens when given): target (N, C), z (N, z_channels).

        ``t`` ~ U{0..T−1} and then the noise are drawn from the global RNG in that order (as the
        release) unless given.
        """
        if t is None:
            t = torch.randint(0, self.objective.num_timesteps, (target.shape[0],), device=target.device)
        if mask is None:
            return self.objective.training_losses(self.net, target, t, dict(c=z), noise=noise)["loss"].mean()
        if noise is None:  # drawn for every token, as the release does, so the RNG stream stays the same
            noise = randn(target.shape, like=target)
        # The release runs the head on every token and multiplies the visible ones' loss by 0; only the
        # masked tokens (~87% on average in MAR training) need the network, forward and backward.
        keep = mask != 0
        if not bool(keep.all()):
            target, z, t, noise, weight = target[keep], z[keep], t[keep], noise[keep], mask[keep]
        else:
            weight = mask
        loss = self.objective.training_losses(self.net, target, t, dict(c=z), noise=noise)["loss"]
        return (loss * weight).sum() / mask.sum()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg=1.0, *,
               generator: torch.Generator | None = None, num_sampling_steps: str | int | None = None,
               clip_denoised: bool = False, sampler: str = "ddpm") -> torch.Tensor:
        """Tokens (N, C) drawn for conditions z (N, z_channels) by ancestral sampling (``sampler="ddpm"``,
        the release's), or by another sampler of the objective (``"ddim"``, or the fast ODE solvers
        ``"dpm++2m"`` and ``"unipc"``, which take ``num_sampling_steps`` as their number of steps).

        With ``cfg != 1`` the batch is [conditional; unconditional] halves that share their starting
        noise and are guided by :meth:`SimpleMLPAdaLN.forward_with_cfg`. ``temperature`` scales the
        per-step noise of ``ddpm`` (the release's; not the starting noise); the other samplers add no
        noise after the start, so for them it scales the starting noise (a flow's temperature). All
        draws come from ``generator`` (the global RNG when None): the starting noise, then one
        normal draw per step (also at the last step, where it is unused).
        ``clip_denoised`` clips each step's x0 prediction to [-1, 1]: off in the release (latent
        tokens); for pixel tokens it keeps an imperfect head from blowing up at the first steps,
        where the cosine schedule divides by sqrt(alpha_bar) ~ 1e-4.
        """
        diffusion = self.gen_diffusion if num_sampling_steps is None else \
            self.objective.sampling_diffusion(num_sampling_steps)
        guided = not (cfg == 1.0 if not torch.is_tensor(cfg) else bool((cfg == 1.0).all()))
        n = z.shape[0] // 2 if guided else z.shape[0]
        where = generator.device if generator is not None else z.device
        noise = torch.randn(n, self.in_channels, generator=generator, device=where).to(device=z.device, dtype=z.dtype)
        if guided:
            noise = torch.cat([noise, noise], dim=0)
            model_fn, model_kwargs = self.net.forward_with_cfg, dict(c=z, cfg_scale=cfg)
        else:
            model_fn, model_kwargs = self.net.forward, dict(c=z)
        if sampler != "ddpm":
            steps = self.num_sampling_steps if num_sampling_steps is None else num_sampling_steps
            return self.objective.sample(model_fn, noise * temperature, sampler=sampler, steps=steps,
                                         model_kwargs=model_kwargs, clip_denoised=clip_denoised, generator=generator)
        return diffusion.p_sample_loop(model_fn, tuple(noise.shape), noise=noise, clip_denoised=clip_denoised,
                                       model_kwargs=model_kwargs, device=z.device, temperature=temperature,
                                       generator=generator)

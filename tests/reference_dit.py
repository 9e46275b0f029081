"""An independent, functional oracle for the forward pass of facebookresearch/DiT's `models.py`.

Written from the architecture description (not copied), in plain `torch.nn.functional` on an original-format
state dict, so that the diffusers-based model in `vq4dit.models` can be checked against it numerically:

    ref = ReferenceDiT(state, hidden=64, heads=2, patch=2, input_size=8, in_channels=4, out_channels=8)
    eps = ref.forward(x, t, y)

`random_original_state_dict` makes a random checkpoint in the original layout (non-zero adaLN and final layer,
unlike the original's zero initialisation, so that every path of the network matters).
"""

import math

import torch
import torch.nn.functional as F

FREQUENCY_EMBEDDING_SIZE = 256  # the original TimestepEmbedder's sinusoid width
MLP_RATIO = 4
LN_EPS = 1e-6


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): cat[sin(pos * omega), cos(pos * omega)], omega = 1 / 10000**(i / (dim/2))."""
    assert dim % 2 == 0
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) fixed table; tokens row-major; first half of channels from meshgrid(w, h)[0]."""
    assert dim % 2 == 0
    coords = torch.arange(grid_size, dtype=torch.float64)
    # numpy's meshgrid(w, h) ('xy' indexing): grid[0][i, j] = w[j] (column), grid[1][i, j] = h[i] (row)
    grid0, grid1 = torch.meshgrid(coords, coords, indexing="xy")
    return torch.cat([sincos_1d(dim // 2, grid0), sincos_1d(dim // 2, grid1)], dim=1).float()


def timestep_frequencies(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
    """(B,) timesteps -> (B, dim): cat[cos, sin] of t * exp(-ln(max_period) * i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _linear(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"])


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class ReferenceDiT:
    """forward(x, t, y) and forward_with_cfg(x, t, y, cfg_scale) of the original DiT, from a state dict."""

    def __init__(self, state: dict, hidden: int, heads: int, patch: int, input_size: int, in_channels: int,
                 out_channels: int):
        self.state = {k: v.float() for k, v in state.items()}
        self.hidden, self.heads, self.patch = hidden, heads, patch
        self.input_size, self.in_channels, self.out_channels = input_size, in_channels, out_channels
        self.depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        grid = input_size // patch
        # the original loads its (fixed) pos_embed from the checkpoint; recompute it when it is absent
        stored = self.state.get("pos_embed")
        self.pos_embed = stored if stored is not None else sincos_2d(hidden, grid)[None]

    # --- pieces ---------------------------------------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        s = self.state
        h = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=self.patch)
        return h.flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, hidden)

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.state
        t_emb = _linear(s, "t_embedder.mlp.2", F.silu(_linear(s, "t_embedder.mlp.0", timestep_frequencies(t))))
        y_emb = s["y_embedder.embedding_table.weight"][y]  # no label dropout at inference
        return t_emb + y_emb

    def attention(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        hd = c // self.heads
        qkv = _linear(self.state, f"{prefix}.qkv", x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, hd)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, c)
        return _linear(self.state, f"{prefix}.proj", out)

    def mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(_linear(self.state, f"{prefix}.fc1", x), approximate="tanh")
        return _linear(self.state, f"{prefix}.fc2", h)

    def block(self, i: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        p = f"blocks.{i}"
        mod = _linear(self.state, f"{p}.adaLN_modulation.1", F.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attention(f"{p}.attn", _modulate(_layer_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(f"{p}.mlp", _modulate(_layer_norm(x), shift_mlp, scale_mlp))
        return x

    def final_layer(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = _linear(self.state, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
        return _linear(self.state, "final_layer.linear", _modulate(_layer_norm(x), shift, scale))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # --- the model ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.embed_patches(x.float())
        c = self.condition(t, y)
        for i in range(self.depth):
            h = self.block(i, h, c)
        return self.unpatchify(self.final_layer(h, c))

    __call__ = forward

    @torch.no_grad()
    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float):
        """The original's guidance: the batch's first half is run with y (its two halves: labels, null label);
        only the first 3 output channels are mixed, the rest come straight from the model."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        out = self.forward(combined, t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def random_original_state_dict(depth: int, hidden: int, heads: int, patch: int, input_size: int,
                               in_ch: int, out_ch: int, num_classes: int, seed: int = 0) -> dict:
    """A random state dict in the original layout (float32, CPU), with the correct fixed `pos_embed`.

    Weights are ~N(0, 1/fan_in) so activations stay O(1); the adaLN and final-layer weights are non-zero (the
    original zero-initialises them, which would hide most of the network from a comparison)."""
    assert hidden % heads == 0 and input_size % patch == 0
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, fan_in, gain=1.0):
        return torch.randn(*shape, generator=g) * (gain / math.sqrt(fan_in))

    def linear(prefix, n_out, n_in, gain=1.0):
        return {f"{prefix}.weight": normal(n_out, n_in, fan_in=n_in, gain=gain),
                f"{prefix}.bias": normal(n_out, fan_in=n_in, gain=0.5 * gain)}

    f = FREQUENCY_EMBEDDING_SIZE
    s = {
        "x_embedder.proj.weight": normal(hidden, in_ch, patch, patch, fan_in=in_ch * patch * patch),
        "x_embedder.proj.bias": normal(hidden, fan_in=in_ch * patch * patch, gain=0.5),
        **linear("t_embedder.mlp.0", hidden, f, gain=2.0),
        **linear("t_embedder.mlp.2", hidden, hidden),
        "y_embedder.embedding_table.weight": torch.randn(num_classes + 1, hidden, generator=g),
        "pos_embed": sincos_2d(hidden, input_size // patch)[None],
    }
    for i in range(depth):
        b = f"blocks.{i}"
        s.update(linear(f"{b}.adaLN_modulation.1", 6 * hidden, hidden, gain=0.5))
        s.update(linear(f"{b}.attn.qkv", 3 * hidden, hidden))
        s.update(linear(f"{b}.attn.proj", hidden, hidden))
        s.update(linear(f"{b}.mlp.fc1", MLP_RATIO * hidden, hidden))
        s.update(linear(f"{b}.mlp.fc2", hidden, MLP_RATIO * hidden))
    s.update(linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden, gain=0.5))
    s.update(linear("final_layer.linear", patch * patch * out_ch, hidden))
    return s

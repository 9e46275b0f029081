"""The facebookresearch/DiT state-dict layout (`DiT-XL-2-256x256.pt`) <-> diffusers' DiTTransformer2DModel.

The original keeps one timestep/label embedder and a fused qkv; diffusers keeps a copy of the embedders in every
block and separate q/k/v. The fixed `pos_embed` is not a weight in diffusers (it is recomputed), so it is checked
against the recomputed table instead of loaded.
"""

import torch

# original per-block name -> diffusers per-block name (qkv is handled apart: it splits in three)
_BLOCK = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# original shared embedders -> diffusers per-block copies (under transformer_blocks.N.norm1.emb.)
_EMBEDDERS = {
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
}
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_LABELS = "y_embedder.embedding_table.weight"
_LABELS_DIFFUSERS = "class_embedder.embedding_table.weight"


def is_original_state_dict(state_dict: dict) -> bool:
    return any(k.startswith("blocks.") for k in state_dict) and "x_embedder.proj.weight" in state_dict


def from_original(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Map an original DiT state dict onto diffusers' names. Raises KeyError naming the first missing key."""
    out = {}
    for old, new in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{new}.{p}"] = state[f"{old}.{p}"]
    for i in range(num_layers):
        b, nb = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            q, k, v = state[f"{b}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{nb}attn1.to_q.{p}"], out[f"{nb}attn1.to_k.{p}"], out[f"{nb}attn1.to_v.{p}"] = q, k, v
            for old, new in _BLOCK.items():
                out[f"{nb}{new}.{p}"] = state[f"{b}{old}.{p}"]
            for old, new in _EMBEDDERS.items():
                out[f"{nb}norm1.emb.{new}.{p}"] = state[f"{old}.{p}"]
        out[f"{nb}norm1.emb.{_LABELS_DIFFUSERS}"] = state[_LABELS]
    extra = {k for k in state if not k.startswith("blocks.")} - _known_top_keys() - {"pos_embed"}
    block_ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if extra or block_ids != set(range(num_layers)):
        what = sorted(extra)[0] if extra else f"{len(block_ids)} blocks"
        raise KeyError(f"unexpected {what} (expected {num_layers} blocks)")
    return out


def to_original(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Inverse of `from_original`; the embedders are taken from block 0 (diffusers' forward uses block 0's
    embedder for the final layer, so block 0 is the canonical copy)."""
    out = {}
    for old, new in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{old}.{p}"] = state[f"{new}.{p}"]
    for p in ("weight", "bias"):
        for old, new in _EMBEDDERS.items():
            out[f"{old}.{p}"] = state[f"transformer_blocks.0.norm1.emb.{new}.{p}"]
    out[_LABELS] = state[f"transformer_blocks.0.norm1.emb.{_LABELS_DIFFUSERS}"]
    for i in range(num_layers):
        b, nb = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}attn.qkv.{p}"] = torch.cat([state[f"{nb}attn1.to_{c}.{p}"] for c in "qkv"], dim=0)
            for old, new in _BLOCK.items():
                out[f"{b}{old}.{p}"] = state[f"{nb}{new}.{p}"]
    return out


def _known_top_keys() -> set[str]:
    keys = {f"{old}.{p}" for old in list(_TOP) + list(_EMBEDDERS) for p in ("weight", "bias")}
    return keys | {_LABELS}

"""Which linears of a diffusers DiT block are quantized, and swapping them in place.

All five of the original block's linears: qkv (diffusers splits it into q, k, v), the attention output
projection, the MLP's fc1 and fc2, and the adaLN modulation. Embedders and the final layer stay full precision.
"""

from torch import nn

QUANTIZED_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v",  # the original's fused qkv
    "attn1.to_out.0",                          # attn.proj
    "ff.net.0.proj",                           # mlp.fc1
    "ff.net.2",                                # mlp.fc2
    "norm1.linear",                            # adaLN_modulation.1
)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: block.get_submodule(name) for name in QUANTIZED_LINEARS}


def replace_layer(block: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent), child, layer)


# Where activations are quantized: the input of each site, shared by its linears (the original's fused qkv reads
# one quantized input). A method picks the sites it quantizes (`Method.input_sites`).
INPUT_SITES = {
    "qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "proj": ("attn1.to_out.0",),
    "fc1": ("ff.net.0.proj",),
    "fc2": ("ff.net.2",),
    "adaln": ("norm1.linear",),  # SiLU of the timestep + label embedding, once per sample
}

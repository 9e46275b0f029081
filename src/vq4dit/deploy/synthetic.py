"""Quantized DiTs with random codes, built without their full-precision weights: for size accounting and speed
measurements at DiT-XL/2's shapes, where the values do not matter (no sampling, no calibration)."""

import torch
from torch import nn

from vq4dit.models import ConditionalDiT
from vq4dit.models.dit import build_transformer
from vq4dit.models.embedders import share_embedders
from vq4dit.quant.block_layers import QUANTIZED_LINEARS, replace_layer
from vq4dit.quant.packing import smallest_code_dtype
from vq4dit.quant.presets import UniformPreset, VQPreset
from vq4dit.quant.quantized_linear import QuantizedLinear
from vq4dit.quant.uniform_linear import SCALE_DTYPE, UniformLinear
from vq4dit.quant.vq_linear import CODEBOOK_DTYPE, VQLinear

DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-6)  # configs/model/dit_xl_2.yaml


def random_layer(out_features: int, in_features: int, preset: VQPreset | UniformPreset,
                 g: torch.Generator) -> QuantizedLinear:
    """A deployed layer of `preset` with random codes and stored-precision codebook / scales."""
    bias = 0.02 * torch.randn(out_features, generator=g)
    if isinstance(preset, VQPreset):
        codes = torch.randint(0, preset.k, (out_features * in_features // preset.d,), generator=g,
                              dtype=smallest_code_dtype(preset.k))
        codebook = (0.02 * torch.randn(preset.k, preset.d, generator=g)).to(CODEBOOK_DTYPE).float()
        return VQLinear(codes, codebook, bias, out_features, in_features)
    groups = 1 if preset.group_size is None else in_features // preset.group_size
    levels = 1 << preset.bits
    top = levels - 1 if preset.symmetric else levels  # symmetric codes are 0..2^b - 2 (shifted -half..half)
    codes = torch.randint(0, top, (out_features, in_features), generator=g, dtype=torch.uint8)
    scale = (1e-3 + 1e-2 * torch.rand(out_features, groups, generator=g)).to(SCALE_DTYPE).float()
    zero = (torch.full_like(scale, levels // 2 - 1) if preset.symmetric
            else torch.randint(0, levels, (out_features, groups), generator=g).float())
    return UniformLinear(codes, scale, zero, preset.bits, preset.group_size, preset.symmetric, bias)


def random_quantized_dit(arch: dict, preset: VQPreset | UniformPreset, seed: int = 0,
                         name: str = "dit_xl_2_shaped") -> ConditionalDiT:
    """A DiT of `arch` (parameters never allocated in fp32 for the quantized linears) whose blocks share one
    embedder, as a model converted from the original DiT does, and whose other tensors are random."""
    g = torch.Generator().manual_seed(seed)
    transformer = build_transformer(dict(arch), timestep_shift=0, empty=True)
    blocks = transformer.transformer_blocks
    share_embedders(transformer, {f"transformer_blocks.{i}.norm1.emb": "transformer_blocks.0.norm1.emb"
                                  for i in range(1, len(blocks))})
    for block in blocks:
        for layer_name in QUANTIZED_LINEARS:
            linear = block.get_submodule(layer_name)
            replace_layer(block, layer_name, random_layer(linear.out_features, linear.in_features, preset, g))
    for module in transformer.modules():
        for key, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(module, key, nn.Parameter(0.02 * torch.randn(param.shape, generator=g), requires_grad=False))
    return ConditionalDiT(transformer.eval().requires_grad_(False), name, guided_channels=3).eval()

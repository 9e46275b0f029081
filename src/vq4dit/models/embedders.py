"""The timestep and label embedders that diffusers' DiT copies into every block.

The original DiT has one `t_embedder` and one `y_embedder`; diffusers' `DiTTransformer2DModel` builds a
`CombinedTimestepLabelEmbeddings` inside every block's `norm1` (`transformer_blocks.N.norm1.emb`), and a model
converted from the original holds 28 equal copies (2.78 M parameters each in DiT-XL/2, 297 MiB in fp32). A
checkpoint stores a copy that equals block 0's once, and a loader puts block 0's module back into those blocks, so
they share it in memory too.
"""

import torch
from diffusers import DiTTransformer2DModel

EMBEDDER = "norm1.emb"


def embedder_path(block: int) -> str:
    return f"transformer_blocks.{block}.{EMBEDDER}"


def shared_embedders(transformer: DiTTransformer2DModel) -> dict[str, str]:
    """{embedder of block i: embedder of block 0} for every block i > 0 whose embedder equals block 0's
    tensor for tensor (the same module counts as equal)."""
    blocks = transformer.transformer_blocks
    first = blocks[0].norm1.emb.state_dict()
    shared = {}
    for i, block in enumerate(blocks):
        if i == 0:
            continue
        own = block.norm1.emb.state_dict()
        if own.keys() == first.keys() and all(_same(own[k], first[k]) for k in first):
            shared[embedder_path(i)] = embedder_path(0)
    return shared


def share_embedders(transformer: DiTTransformer2DModel, shared: dict[str, str]) -> None:
    """Make every block named in `shared` use the embedder module of the block it names."""
    for alias, source in shared.items():
        parent, _, child = alias.rpartition(".")
        setattr(transformer.get_submodule(parent), child, transformer.get_submodule(source))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:
        return a is b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return (a.data_ptr(), a.stride()) == (b.data_ptr(), b.stride()) or torch.equal(a, b)

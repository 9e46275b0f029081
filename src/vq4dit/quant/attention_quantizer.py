"""Fake quantization of the attention matmul inputs, as a diffusers attention processor (`act.attention=true`).

The two matmuls inside attention have no weights, so no linear layer can carry their quantizers: this processor
computes DiT self-attention as diffusers' AttnProcessor2_0 does, but quantizes q and k (the inputs of QK^T) and
v (an input of PV) dynamically per token, and the softmax probabilities (the other input of PV) on the fixed
unsigned grid {0, 1/(2^b - 1), ..., 1}. It holds no tensors, so the checkpoint only records its settings
(`attention_quantizer_record`) and loading reinstalls it (`install_attention_quantizers`).
"""

import torch
from torch import nn

from vq4dit.quant.act_quantizer import ActQuantizer, round_ste


class QuantizedAttnProcessor:
    def __init__(self, bits: int, symmetric: bool = False):
        self.bits, self.symmetric = bits, symmetric
        self.tokens = ActQuantizer(bits, "token", dynamic=True, symmetric=symmetric)

    def record(self) -> dict:
        return {"bits": self.bits, "symmetric": self.symmetric}

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("QuantizedAttnProcessor handles unmasked self-attention on (batch, tokens, channels)")
        batch, tokens, _ = hidden_states.shape
        q, k, v = (self.tokens(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        heads = attn.heads
        q, k, v = (t.view(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        levels = (1 << self.bits) - 1
        probs = round_ste(probs * levels) / levels
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_attention_quantizers(blocks, record: dict | None) -> None:
    """Every given DiT block's self-attention (`attn1`) computes with a QuantizedAttnProcessor (record None:
    nothing changes)."""
    if record is None:
        return
    for block in blocks:
        block.attn1.set_processor(QuantizedAttnProcessor(record["bits"], record["symmetric"]))


def attention_quantizer_record(transformer: nn.Module) -> dict | None:
    """The settings of the attention quantizers installed in `transformer`'s blocks, or None."""
    found = [block.attn1.processor.record() for block in transformer.transformer_blocks
             if isinstance(block.attn1.processor, QuantizedAttnProcessor)]
    if not found:
        return None
    if len(found) != len(transformer.transformer_blocks) or any(r != found[0] for r in found):
        raise ValueError("attention quantizers must be installed alike in every block to be saved")
    return found[0]

"""How a group-size candidate is scored during Q-DiT's search (a loss: lower is better).

A candidate is the full-precision model with every block linear quantized round-to-nearest at its gene's group
size (adaLN at the base size) and dynamic activation quantizers at its gene's group size on the searched sites -
cheap to build, as in Q-DiT's released search (which quantizes candidates with RTN, not GPTQ). Its score:
- `psnr`: minus the PSNR of `samples` images against the full-precision model's images from the same noise and
  labels (the fp images are sampled once and kept with the search state);
- `fid`: FID of `samples` images against the real images of the configured metric (Q-DiT's objective);
- `hidden_mse`: the last block's output error against full precision on the pool's held-out rows, relative to
  the fp output's mean square (no sampling at all).
benchmarks/qdit_score_ranking.py measures which of them ranks candidates like the full evaluation.
"""

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from vq4dit.errors import UserError
from vq4dit.files import save_safetensors
from vq4dit.metrics import psnr
from vq4dit.models import ConditionalDiT
from vq4dit.quant.act_quantizer import ActQuantizer, attach_input_quantizer
from vq4dit.quant.attention_quantizer import install_attention_quantizers
from vq4dit.quant.block_layers import INPUT_SITES, QUANTIZED_LINEARS, replace_layer
from vq4dit.quant.presets import ActPreset
from vq4dit.quant.uniform_linear import UniformLinear
from vq4dit.sampling import Sampler, balanced_labels
from vq4dit.search.evolution import SCORES
from vq4dit.search.group_sizes import SITES
from vq4dit.seeds import stream_seed


def candidate_model(model: ConditionalDiT, per_block: list[dict[str, int]], bits: int, symmetric: bool,
                    base: int, act: ActPreset | None) -> ConditionalDiT:
    """A copy of the fp `model` with RTN weights at the candidate's group sizes and dynamic activations."""
    candidate = copy.deepcopy(model)
    site_of = {name: site for site, names in INPUT_SITES.items() for name in names}
    for block, groups in zip(candidate.blocks, per_block):
        for name in QUANTIZED_LINEARS:
            group = groups.get(site_of[name], base)
            layer = UniformLinear.from_linear(block.get_submodule(name), bits, group, symmetric)
            if act is not None and act.enabled and site_of[name] in SITES:
                attach_input_quantizer(layer, ActQuantizer(act.bits, act.granularity, True, act.symmetric,
                                                           group, layer.in_features))
            replace_layer(block, name, layer.to(next(block.parameters()).device))
    install_attention_quantizers(candidate.blocks, act.record_attention() if act is not None else None)
    return candidate


class CandidateScore:
    """Scores candidates of one search: the references it needs are computed once (and kept in `work_dir`)."""

    def __init__(self, kind: str, fp_model: ConditionalDiT, sampler: Sampler, samples: int, seed: int,
                 pool=None, scorer: Callable | None = None, work_dir: Path | None = None, progress: bool = False):
        if kind not in SCORES:
            raise UserError(f"method.search.score={kind}; valid: {', '.join(SCORES)}")
        self.kind, self.sampler, self.seed, self.progress = kind, sampler, seed, progress
        self.labels = balanced_labels(samples, fp_model.num_classes)
        if kind == "psnr":
            self.reference = self._fp_samples(fp_model, work_dir)
        elif kind == "fid":
            if scorer is None:
                raise UserError("method.search.score=fid needs a metric config (metric=digits or metric=imagenet)")
            self.scorer = scorer()
        else:
            rows = pool.heldout_rows
            self.rows = (pool.hidden[rows], pool.timesteps[rows], pool.labels[rows])
            self.reference = self._last_hidden(fp_model)

    def __call__(self, model: ConditionalDiT) -> float:
        if self.kind == "hidden_mse":
            out = self._last_hidden(model)
            return ((out - self.reference).square().mean() / self.reference.square().mean()).item()
        images = self._sample(model)
        if self.kind == "psnr":
            return -psnr(images, self.reference)
        return self.scorer.score(images, self.labels, seed=self.seed)["fid"]

    def _sample(self, model: ConditionalDiT) -> torch.Tensor:
        return self.sampler.sample(model, self.labels, seed=stream_seed(self.seed, "group-size-search"),
                                   progress=self.progress)

    def _fp_samples(self, fp_model: ConditionalDiT, work_dir: Path | None) -> torch.Tensor:
        path = None if work_dir is None else Path(work_dir) / f"search_fp_samples_{len(self.labels)}.safetensors"
        if path is not None and path.exists():
            return load_file(path)["images"]
        images = self._sample(fp_model)
        if path is not None:
            save_safetensors({"images": images.contiguous()}, path)
        return images

    @torch.no_grad()
    def _last_hidden(self, model: ConditionalDiT) -> torch.Tensor:
        device = next(model.parameters()).device
        hidden, t, y = self.rows
        out = []
        for i in range(0, len(hidden), 256):
            h = hidden[i:i + 256].to(device)
            for block in model.blocks:
                h = block(h, timestep=t[i:i + 256].to(device), class_labels=y[i:i + 256].to(device))
            out.append(h.float().cpu())
        return torch.cat(out)

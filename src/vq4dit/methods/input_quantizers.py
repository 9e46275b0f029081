"""A block's activation quantizers: one per input site (the linears of a site share it), static ones calibrated on
the block's training rows (the full-precision block's inputs to each site, from zero-data trajectories)."""

from torch import nn

from vq4dit.methods.block_data import BlockData
from vq4dit.quant.act_quantizer import ActQuantizer, InputSample, calibrate_static
from vq4dit.quant.block_layers import INPUT_SITES
from vq4dit.quant.presets import ActPreset


def build_input_quantizers(act: ActPreset, group_sizes: dict[str, int | None], linears: dict[str, nn.Linear],
                           data: BlockData) -> dict[str, ActQuantizer]:
    """Layer name -> input quantizer for every site in `group_sizes` (site -> channels per range, or None)."""
    device = data.device
    per_site = {site: ActQuantizer(act.bits, act.granularity, act.dynamic, act.symmetric, group,
                                   linears[INPUT_SITES[site][0]].in_features).to(device)
                for site, group in group_sizes.items()}
    static = {INPUT_SITES[site][0]: q for site, q in per_site.items() if not q.dynamic}
    if static:
        samples = {name: InputSample(len(data.train[0])) for name in static}
        data.observe_inputs(list(static), lambda name, x: samples[name].add(x))
        for name, quantizer in static.items():
            calibrate_static(quantizer, samples[name].values())
    return {name: q for site, q in per_site.items() for name in INPUT_SITES[site]}

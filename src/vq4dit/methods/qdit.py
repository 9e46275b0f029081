"""Q-DiT (Chen et al., 2024): group-wise GPTQ weights with per-layer group sizes found by an evolutionary
search, and dynamic activation quantization per token and channel group.

1. `before_blocks`: the group size of every (block, site) - qkv, proj, fc1, fc2 - from an evolutionary search
   over Q-DiT's space scaled to the model (search/group_sizes.py) under a budget on bit operations or mean group
   size. Candidates are quantized cheaply (RTN weights, dynamic activations at the candidate's groups) and scored
   on samples (search/candidate_score.py). The result is written to `<run>/qdit_group_sizes.json` and can be
   reused with `method.group_sizes=<file>`; the search state is kept with the block cache, so an interrupted run
   continues the search. Unlike the released code, the searched sizes set the activation groups too.
2. Per block: dynamic activation quantizers (min-max of every token's channel group, every call) at the inputs
   of qkv, proj, fc1 and fc2 (adaLN's input stays in full precision, as in Q-DiT); GPTQ at the searched group size
   per layer (adaLN at the base size), with Hessians of the quantized activations the layers will see.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from vq4dit.errors import UserError
from vq4dit.methods.gptq import GPTQ
from vq4dit.quant.block_layers import INPUT_SITES, block_linears
from vq4dit.quant.presets import UniformPreset
from vq4dit.search.evolution import EvolutionSearch, SearchSettings
from vq4dit.search.group_sizes import SITES, GroupSizeSpace
from vq4dit.settings import nested, setting

log = logging.getLogger(__name__)
RESULT_FORMAT = "qdit-group-sizes"
RESULT_FILE = "qdit_group_sizes.json"


@dataclass
class QDiT(GPTQ):
    quant: UniformPreset
    # a saved search result (qdit_group_sizes.json of an earlier run): used instead of searching
    group_sizes: str | None = setting(None, path=True)
    space: list[int] = setting(default_factory=lambda: [32, 64, 128, 192, 288])  # on DiT-XL/2; scaled to the model
    base_group_size: int = setting(128, low=1)  # start candidate, budget reference, adaLN's groups (scaled too)
    reference_width: int = setting(1152, low=1)  # the hidden width `space` and `base_group_size` are given for
    budget: Literal["bitops", "mean_group_size"] = "bitops"  # bitops (the paper) | mean_group_size (released code)
    search: SearchSettings = field(default_factory=SearchSettings)  # generations 0: every layer at the base size
    act_order: bool = False  # Q-DiT's code asserts it off
    name = "qdit"
    per_layer_group_sizes = True  # its search chooses them
    input_sites = ("qkv", "proj", "fc1", "fc2")
    act_defaults = {"granularity": "token_group", "dynamic": True}

    def __post_init__(self):
        super().__post_init__()
        if self.quant.group_size is not None:
            raise UserError(f"quant={self.quant.name or self.quant.describe()} fixes group size "
                            f"{self.quant.group_size}; method=qdit chooses group sizes per layer (method.space, "
                            "the search): use a per-channel preset such as w4a8 or w6a8")
        if self.act.group_size is not None:
            raise UserError(f"act.group_size={self.act.group_size} with method=qdit: its activation groups are "
                            "the searched per-layer group sizes; leave act.group_size null")
        self.search = nested(SearchSettings, self.search, "method.search")
        self.genes: list[dict[str, int]] | None = None
        self._space: GroupSizeSpace | None = None

    def space_for(self, linears: dict[str, nn.Linear], blocks: int = 1) -> GroupSizeSpace:
        act_bits = self.activation.bits if self.activation.enabled else None
        return GroupSizeSpace.of(linears, blocks, list(self.space), self.base_group_size, self.reference_width,
                                 self.budget, self.quant.bits, act_bits)

    def check(self, linears: dict[str, nn.Linear]) -> None:
        self._space = self.space_for(linears)
        super().check(linears)
        searching = self.group_sizes is None and self.search.generations > 0
        if searching and self.activation.enabled and not self.activation.dynamic:
            raise UserError("act.dynamic=false with method=qdit: the search scores candidates with dynamic "
                            "activations; give method.group_sizes=<file> or method.search.generations=0")
        if self.group_sizes is not None:
            read_group_sizes(self.group_sizes, linears["norm1.linear"].in_features, linears)

    # -- group sizes -------------------------------------------------------------------------------------------
    def group_size(self, name: str, block: int) -> int | None:
        site = next(s for s, names in INPUT_SITES.items() if name in names)
        if site not in SITES:
            return self._space.base
        return self.genes[block][site] if self.genes is not None else self._space.base

    def act_group_size(self, site: str, block: int) -> int | None:
        if self.activation.granularity != "token_group":
            return None
        return self.genes[block][site] if self.genes is not None else self._space.base

    def before_blocks(self, model, run) -> None:
        linears = block_linears(model.blocks[0])
        space = self.space_for(linears, len(model.blocks))
        self._space = space
        result = None
        if self.group_sizes is not None:
            genes = read_group_sizes(self.group_sizes, space.site_shapes[0][2], linears, len(model.blocks))
            log.info("group sizes from %s", self.group_sizes)
        elif self.search.generations == 0:
            genes = space.per_block((space.base,) * space.genes)
        else:
            result = self._search(model, run, space)
            genes = space.per_block(result["best"])
        self.genes = genes
        if run.output_dir is not None and result is not None:
            write_group_sizes(Path(run.output_dir) / RESULT_FILE, model, space, genes, self.search, result)

    def _search(self, model, run, space: GroupSizeSpace) -> dict:
        # imported here: scoring samples brings the metrics and diffusers, which a command's preflight (it imports
        # every method for its settings) should not pay for
        from vq4dit.search.candidate_score import CandidateScore, candidate_model

        s = self.search
        work = Path(run.work_dir) if run.work_dir is not None else None
        score = CandidateScore(s.score, model, run.pool.sampler, s.samples, run.seed, pool=run.pool,
                               scorer=run.scorer, work_dir=work)
        start = (space.base,) * space.genes
        search = EvolutionSearch(s, space.choices, space.genes, space.legal, start, run.seed,
                                 None if work is None else work / "qdit_search_state.json",
                                 identity={"model": model.name, "blocks": space.blocks, "budget": space.budget,
                                           "bits": space.bits, "act": self.record().get("act")})
        act = self.activation if self.activation.enabled else None

        def loss(genome):
            return score(candidate_model(model, space.per_block(genome), self.quant.bits, self.quant.symmetric,
                                         space.base, act))

        def curve(generation: int, best_loss: float) -> None:
            if run.logger is not None:
                value = -best_loss if s.score == "psnr" else best_loss
                run.logger.experiment.add_scalar(f"search/best_{s.score}", value, generation)

        result = search.run(loss, run.progress, curve)
        log.info("group-size search: %s %.4g -> %.4g over %d candidates", s.score, result["start_loss"],
                 result["loss"], result["evaluated"])
        return result


def write_group_sizes(path: Path, model, space: GroupSizeSpace, genes: list[dict[str, int]],
                      settings: SearchSettings, result: dict) -> None:
    record = {"format": RESULT_FORMAT, "model": model.name, "hidden": space.site_shapes[0][2],
              "blocks": space.blocks, "sites": list(SITES), "space": list(space.choices), "base": space.base,
              "budget": space.budget, "cost": space.cost(result["best"]), "limit": space.limit,
              "score": settings.score, "samples": settings.samples, "start_loss": result["start_loss"],
              "loss": result["loss"], "history": result["history"], "evaluated": result["evaluated"],
              "group_sizes": genes}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def read_group_sizes(path: str, hidden: int, linears: dict[str, nn.Linear],
                     blocks: int | None = None) -> list[dict[str, int]]:
    """A saved search result, checked against this model (its hidden width, block count and layer widths)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"method.group_sizes={path} is unreadable ({type(e).__name__}); give a "
                        f"{RESULT_FILE} written by a qdit run") from None
    if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT:
        raise UserError(f"method.group_sizes={path} is not a {RESULT_FILE} written by a qdit run")
    missing = [key for key in ("hidden", "blocks", "model", "group_sizes") if key not in record]
    if missing:
        raise UserError(f"method.group_sizes={path} lacks {', '.join(missing)}; give a {RESULT_FILE} written by a "
                        "qdit run")
    if record["hidden"] != hidden or (blocks is not None and record["blocks"] != blocks):
        raise UserError(f"method.group_sizes={path} holds group sizes for {record['model']} (hidden "
                        f"{record['hidden']}, {record['blocks']} blocks), not for this model (hidden {hidden}"
                        f"{'' if blocks is None else f', {blocks} blocks'})")
    genes = record["group_sizes"]
    if not isinstance(genes, list) or len(genes) != record["blocks"] or not all(isinstance(b, dict) for b in genes):
        raise UserError(f"method.group_sizes={path}: group_sizes is not one mapping per block "
                        f"({record['blocks']} blocks); give a {RESULT_FILE} written by a qdit run")
    for i, block in enumerate(genes):
        for site in SITES:
            width = linears[INPUT_SITES[site][0]].in_features
            size = block.get(site)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise UserError(f"method.group_sizes={path}: block {i} {site} has group size {size}; valid: a "
                                f"positive divisor of its input width {width}")
            if width % size:
                raise UserError(f"method.group_sizes={path}: group size {size} of block {i} {site} does "
                                f"not divide its input width {width}")
    return genes

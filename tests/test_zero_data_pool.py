"""The zero-data pool covers the label space of a 1000-class DiT (DiT-XL/2's classes, at a small width) and holds
only the rows it keeps, never every step's latents."""

import torch
from diffusers import DDPMScheduler

from vq4dit.calibration.zero_data import ZeroDataBlockInputs, row_plan
from vq4dit.models import ConditionalDiT
from vq4dit.models.dit import build_transformer
from vq4dit.sampling import Sampler

ARCH = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1, sample_size=4,
            patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-6)


def _sampler(steps=5, guidance=1.5):
    return Sampler(DDPMScheduler(beta_schedule="linear", clip_sample=False), steps=steps, guidance_scale=guidance,
                   batch_size=250)


def test_default_pool_covers_every_class_of_a_1000_class_model(monkeypatch):
    model = ConditionalDiT(build_transformer(ARCH, seed=0).eval(), "dit_1000", guided_channels=3)
    visited = []  # rows the sampler hands the pool, step after step
    original = Sampler.guided_output

    def count(self, model, x, t, y, on_step=None):
        visited.append(2 * len(x))
        return original(self, model, x, t, y, on_step)

    monkeypatch.setattr(Sampler, "guided_output", count)
    pool = ZeroDataBlockInputs(model, _sampler(), None, 2048, seed=0, heldout_trajectories=8, heldout_size=64,
                               progress=False)
    train_labels = pool.labels[pool.train_rows]
    guided = train_labels[train_labels != model.null_label]
    assert pool.trajectories == 1000 and pool.num_train == 2048
    assert set(guided.tolist()) == set(range(1000))  # every class among the guided training rows
    # 2048 rows over 1000 trajectories: 48 give 3 rows (guided, null, guided), the others 2 (guided, null)
    assert len(guided) == 952 + 48 * 2 and (train_labels == model.null_label).sum() == 1000
    # the pool held 2048 + 64 rows out of the (1000 + 8) x 5 steps x 2 it saw
    assert sum(visited) == (1000 + 8) * 5 * 2 and len(pool) == 2048 + 64


def test_rows_are_spread_evenly_over_trajectories_at_distinct_steps():
    plan = row_plan(trajectories=7, size=30, steps=5, halves=2, gen=torch.Generator().manual_seed(0))
    rows = [(step, j, half) for step, picks in plan.items() for j, half in picks]
    per = torch.bincount(torch.tensor([j for _, j, _ in rows]), minlength=7)
    assert len(rows) == 30 and per.max() - per.min() <= 1 and len(set(rows)) == 30
    for j in range(7):  # a trajectory's first rows are at distinct steps, guided and null rows alternate
        mine = [(step, half) for step, jj, half in rows if jj == j]
        halves = [half for _, half in mine]
        assert abs(halves.count(0) - halves.count(1)) <= 1 and 0 in halves
        assert len({step for step, _ in mine}) == min(len(mine), 5)
    # asking for more rows than a trajectory has keeps all of them
    full = row_plan(trajectories=3, size=100, steps=4, halves=2, gen=torch.Generator().manual_seed(1))
    assert sorted((s, j, h) for s, p in full.items() for j, h in p) == \
        sorted((s, j, h) for s in range(4) for j in range(3) for h in range(2))


def test_labels_are_balanced_over_the_classes():
    model = ConditionalDiT(build_transformer({**ARCH, "num_embeds_ada_norm": 10}, seed=0).eval(), "dit_10")
    pool = ZeroDataBlockInputs(model, _sampler(steps=3, guidance=1.0), 25, 75, seed=3, heldout_trajectories=2,
                               heldout_size=6, progress=False)
    labels = pool.labels[pool.train_rows]  # no guidance: every row is its trajectory's, 3 rows per trajectory
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 75 and set(counts.tolist()) <= {6, 9}  # 25 trajectories over 10 classes: 2 or 3 each

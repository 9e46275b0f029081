"""The evolutionary search Q-DiT runs over per-layer group sizes (its released code's loop, without its crash).

Generation 0 is the starting candidate plus random legal candidates. Every generation scores the candidates it
has not scored yet, keeps the `select` best as parents (elitism: they stay in the population), and fills the
rest with `mutations` children (a random parent, every gene redrawn with probability `mutation_prob`),
`crossovers` children (two random parents, every gene from either with probability 1/2) and random legal
candidates (uniform, then repaired: see `_random`). Illegal candidates (over the budget) and candidates seen
before are rejected (at most 10 tries per child, as the released code does). Scores are losses (lower is
better).

The state (population, every score so far, best per generation) is written to `state_path` after every scored
candidate, so rerunning the same search continues where it stopped; the random draws of generation g come from
a generator seeded by (seed, g), so an interrupted search breeds the same candidates as an uninterrupted one.
"""

import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from tqdm.auto import tqdm

from vq4dit.errors import UserError
from vq4dit.seeds import stream_seed
from vq4dit.settings import check_settings, setting

Genome = tuple[int, ...]


@dataclass(frozen=True)
class SearchSettings:
    """Q-DiT's evolutionary search (method.search.*)."""

    generations: int = setting(4, low=0)  # 0: no search, every layer at the base group size
    population: int = setting(8, low=1)
    select: int = setting(4, low=1)       # parents kept as they are (elitism)
    mutations: int = setting(2, low=0)
    crossovers: int = setting(2, low=0)   # the rest of the population: random legal candidates
    mutation_prob: float = setting(0.1, low=0, high=1)
    score: Literal["psnr", "fid", "hidden_mse"] = "psnr"  # what a candidate is scored by (candidate_score.py)
    samples: int = setting(32, low=2)  # samples per candidate (psnr, fid) or held-out pool rows (hidden_mse: all)

    def __post_init__(self):
        check_settings(self, "method.search")
        if self.select + self.mutations + self.crossovers > self.population:
            raise UserError(f"method.search: select={self.select} + mutations={self.mutations} + crossovers="
                            f"{self.crossovers} exceed population={self.population}")


SCORES = get_args(SearchSettings.__annotations__["score"])  # how candidates are scored: candidate_score.py


class EvolutionSearch:
    def __init__(self, settings: SearchSettings, choices: tuple[int, ...], genes: int,
                 legal: Callable[[Genome], bool], start: Genome, seed: int, state_path: Path | None = None,
                 identity: dict | None = None):
        self.settings, self.choices, self.genes, self.legal, self.start = settings, choices, genes, legal, start
        self.seed, self.state_path = seed, state_path
        # what must match for a saved state to be continued
        self.identity = {"settings": asdict(settings), "choices": list(choices), "start": list(start),
                         "seed": seed, **(identity or {})}

    def run(self, score: Callable[[Genome], float], progress: bool = True,
            on_generation: Callable[[int, float], None] | None = None) -> dict:
        """Search; returns {"best": genome, "loss": its loss, "start_loss": the start's, "history": per
        generation best loss, "evaluated": number of distinct candidates scored}."""
        state = self._load() or {"identity": self.identity, "generation": 0,
                                 "population": [list(g) for g in self._initial()], "scores": {}, "history": []}
        s = self.settings
        if s.generations < 1:
            raise ValueError("a search needs at least one generation")
        bar = tqdm(total=s.generations * s.population, desc="group-size search", disable=not progress,
                   initial=state["generation"] * s.population)
        while state["generation"] < s.generations:
            g = state["generation"]
            for genome in state["population"]:
                if _key(genome) not in state["scores"]:
                    state["scores"][_key(genome)] = float(score(tuple(genome)))
                    self._save(state)
                bar.update()
            ranked = sorted(state["population"], key=lambda gnm: state["scores"][_key(gnm)])
            best_loss = state["scores"][_key(ranked[0])]
            state["history"].append(best_loss)
            if on_generation is not None:
                on_generation(g, best_loss)
            state["generation"] = g + 1
            if state["generation"] < s.generations:
                state["population"] = [list(c) for c in self._next([tuple(r) for r in ranked[:s.select]],
                                                                   state["scores"], g)]
            self._save(state)
        bar.close()
        best = min(state["population"], key=lambda gnm: state["scores"][_key(gnm)])
        return {"best": tuple(best), "loss": state["scores"][_key(best)],
                "start_loss": state["scores"][_key(self.start)], "history": state["history"],
                "evaluated": len(state["scores"])}

    # -- breeding ------------------------------------------------------------------------------------------
    def _rng(self, generation: int) -> random.Random:
        return random.Random(stream_seed(self.seed, f"group-size-search-{generation}"))

    def _initial(self) -> list[Genome]:
        rng, population = self._rng(-1), [self.start]
        self._fill(population, set(population), lambda: self.random_genome(rng), self.settings.population)
        return population

    def _next(self, parents: list[Genome], scores: dict, generation: int) -> list[Genome]:
        rng, s = self._rng(generation), self.settings
        population, seen = list(parents), set(parents) | {tuple(json.loads(k)) for k in scores}
        mutate = lambda: tuple(rng.choice(self.choices) if rng.random() < s.mutation_prob else gene  # noqa: E731
                               for gene in rng.choice(parents))

        def cross() -> Genome:
            a, b = rng.choice(parents), rng.choice(parents)
            return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

        self._fill(population, seen, mutate, len(parents) + s.mutations)
        self._fill(population, seen, cross, len(parents) + s.mutations + s.crossovers)
        self._fill(population, seen, lambda: self.random_genome(rng), s.population)
        return population

    def random_genome(self, rng: random.Random) -> Genome:
        """Uniform genes, then random genes raised one choice at a time until the candidate is legal: a budget
        at the base size rejects almost every uniform draw, and larger groups always cost less."""
        genome = [rng.choice(self.choices) for _ in range(self.genes)]
        top = max(self.choices)
        while not self.legal(tuple(genome)):
            raisable = [i for i, gene in enumerate(genome) if gene < top]
            if not raisable:
                break
            i = rng.choice(raisable)
            genome[i] = min(c for c in self.choices if c > genome[i])
        return tuple(genome)

    def _fill(self, population: list, seen: set, make: Callable[[], Genome], size: int) -> None:
        tries = 10 * max(0, size - len(population))
        while len(population) < size and tries > 0:
            tries -= 1
            child = make()
            if child not in seen and self.legal(child):
                population.append(child)
                seen.add(child)

    # -- state -----------------------------------------------------------------------------------------------
    def _load(self) -> dict | None:
        if self.state_path is None or not self.state_path.exists():
            return None
        state = json.loads(self.state_path.read_text())
        return state if state.get("identity") == self.identity else None

    def _save(self, state: dict) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state) + "\n")
        os.replace(tmp, self.state_path)


def _key(genome) -> str:
    return json.dumps(list(genome))

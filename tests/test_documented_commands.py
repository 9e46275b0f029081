"""Every shell command of the README and docs/ runs as a user types it: read from the pages, run through the real
command line in a subprocess, at test size (small pool, few steps and samples: overrides appended to the line).

Placeholders stand for what an earlier documented command made (`<timestamp>` for a run this test made), a
command that needs a GPU runs as its CPU twin (`device=cpu`, the same code path) and says so on its page, and the
few commands that are not this project's, or that other tests run, are listed in `ELSEWHERE` with the reason."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# what the test appends to a command, per script: test size, and outputs under the test's folder
TRAIN_SMALL = ["pool.trajectories=2", "pool.size=32", "pool.heldout_trajectories=1", "pool.heldout_size=8",
               "sampler.steps=2", "fit.iterations=2", "log_samples=0", "trainer.enable_progress_bar=false",
               "estimate.steps=1"]
VQ_SMALL = ["method.kmeans_iters=2", "method.kmeans_points_per_codeword=2"]
QDIT_SMALL = ["method.search.generations=1", "method.search.population=2", "method.search.select=1",
              "method.search.mutations=0", "method.search.crossovers=1", "method.search.samples=4"]
EVAL_SMALL = ["num_samples=20", "sampler.steps=2", "grid_columns=2"]
REFERENCE_SMALL = {"classifier": ["reference.epochs=1"], "dit": ["reference.steps=2"]}
# values a documented command gives that take minutes however small the rest is: the same code path, smaller
SMALLER = {"quant.k=4096": "quant.k=64"}  # a custom preset (named by its values); k-means++ of 4096 codewords

# commands other tests run, or that are not this project's: never silently skipped, each with its reason
ELSEWHERE = {
    "make setup": "the set-up itself: CI's `.ci/run` runs `make test`, which runs it first",
    "make test": "the test suite itself (`.ci/run`)",
    "python guided-diffusion/evaluations/evaluator.py": "ADM's own evaluator (another repository), not this project",
    "python benchmarks/compare.py": "the comparison's rows take hours; tests/test_compare_rows.py makes a row and runs "
                                    "`--from-cache` through the command line at test size",
}
SECTION_TESTS = ("test_readme_gpu.py", "test_readme_imagenet.py")  # they run docs/imagenet-gpu.md's commands


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of every ```bash block: continuations joined, comments dropped,
    `a && b` split, activating the venv dropped (the test runs with this interpreter)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                for part in (p.strip() for p in line.split("&&")):
                    if part and not part.startswith("#") and part != ". .venv/bin/activate":
                        found.append((page.name, part))
    return found


def elsewhere(command: str) -> str | None:
    return next((why for prefix, why in ELSEWHERE.items() if command.startswith(prefix)), None)


def test_every_command_is_run_somewhere():
    """Each documented command is run by this test, by the docs/imagenet-gpu.md tests, or is listed with why."""
    gpu_page = [c for page, c in documented_commands() if page == "imagenet-gpu.md" and not elsewhere(c)]
    sys.path.insert(0, str(ROOT / "tests"))
    import test_readme_gpu
    import test_readme_imagenet

    run_there = {f"python {task}.py {shlex.join(words)}" for module in (test_readme_gpu, test_readme_imagenet)
                 for task, words in module.readme_commands()}
    assert {" ".join(shlex.split(c)) for c in gpu_page} <= {" ".join(shlex.split(c)) for c in run_there}
    here = [c for page, c in documented_commands() if page != "imagenet-gpu.md" and not elsewhere(c)]
    assert all(re.match(r"python (train|eval|export)\.py|python data/train_reference\.py", c) for c in here), here
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def commands_here() -> list[str]:
    """The commands this test runs, once each, runs that make a checkpoint or an fp eval first."""
    unique = list(dict.fromkeys(c for page, c in documented_commands()
                                if page != "imagenet-gpu.md" and not elsewhere(c)))
    return sorted(unique, key=lambda c: ("<" in c or "..." in c, c))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, str]:
    """What the placeholders stand for, filled as the commands run (the first train.py run's checkpoint, an fp
    eval run's samples)."""
    return {"logs": str(tmp_path_factory.mktemp("docs") / "logs")}


def user_command(command: str, made: dict[str, str], tmp: Path) -> tuple[list[str], str]:
    """The argv a user's line becomes at test size, and its script."""
    words = shlex.split(command)
    script = words[1]
    args = [SMALLER.get(w, _placeholders(w, made, tmp)) for w in words[2:]]
    args = ["device=cpu" if re.fullmatch(r"device=cuda(:\d+)?", a) else a for a in args]  # the CPU twin
    if script == "train.py":
        method = next((a.split("=", 1)[1] for a in args if a.startswith("method=")), "vq4dit")
        small = TRAIN_SMALL + (VQ_SMALL if method in ("vq4dit", "kmeans", "classic_vq") else [])
        small += QDIT_SMALL if method == "qdit" else []
        small += [] if any(a.startswith("model_fit") for a in args) else ["model_fit.iterations=2"]
        args += small + [f"paths.log_dir={made['logs']}"]
    elif script == "eval.py":
        args += EVAL_SMALL + [f"paths.log_dir={made['logs']}"]
    elif script == "export.py":
        args += [f"paths.log_dir={made['logs']}"]
    elif script == "data/train_reference.py":
        kind = next(a.split("=", 1)[1] for a in args if a.startswith("reference="))
        args = [f"paths.data_dir={tmp / a.split('=', 1)[1]}" if a.startswith("paths.data_dir=") else a for a in args]
        args += REFERENCE_SMALL[kind] + [f"paths.log_dir={made['logs']}"]
    return [sys.executable, script, *args], script


def _placeholders(word: str, made: dict[str, str], tmp: Path) -> str:
    key, _, value = word.partition("=")
    if key == "ckpt" and ("<" in value or value == "..."):
        return f"ckpt={made['checkpoint']}"
    if key == "compare_to":
        return f"compare_to={made['fp_samples']}"
    if key == "out" and "<" in value:
        return f"out={tmp / 'exported'}"
    return word


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.docs
@pytest.mark.parametrize("command", commands_here())
def test_documented_command_runs(command, made, tmp_path):
    if ("<" in command or "..." in command) and "checkpoint" not in made:  # the first train.py run makes it
        first = run(user_command("python train.py quant=w3", made, tmp_path)[0])
        assert first.returncode == 0, first.stderr[-2000:]
        made["checkpoint"] = first.stdout.split("checkpoint: ")[1].split()[0]
    if "compare_to=" in command and "fp_samples" not in made:
        fp = run(user_command("python eval.py ckpt=data/dit_digits", made, tmp_path)[0])
        assert fp.returncode == 0, fp.stderr[-2000:]
        made["fp_samples"] = str(max(Path(made["logs"], "eval", "runs").glob("*/samples.npz"), key=os.path.getmtime))
    argv, script = user_command(command, made, tmp_path)
    result = run(argv)
    assert result.returncode == 0, f"{shlex.join(argv[1:])}\n{result.stderr[-3000:]}"
    if script == "train.py" and "dry_run=true" not in command:
        made.setdefault("checkpoint", result.stdout.split("checkpoint: ")[1].split()[0])
    if script == "export.py":
        assert (tmp_path / "exported" / "config.json").is_file()


def test_gpu_commands_say_they_need_a_gpu():
    """A command run here as its CPU twin names the GPU on its page (the twin is the same code path)."""
    for page in PAGES:
        text = page.read_text()
        for command in (c for p, c in documented_commands() if p == page.name and re.search(r"device=cuda", c)):
            start = text.index(command.split()[2]) if command.split()[2] in text else 0
            assert re.search(r"GPU", text[max(0, start - 2000):start + 2000]), (page.name, command)

"""What every entry point shares: bad input ends in one line on stderr and exit status 2, no traceback, and a
refused run leaves nothing behind.

`preflight` runs before Hydra's own main: it composes the command line's config itself, so a composition error
(an unknown key or option) is one line too; checks every value against the schema (`config_schema`); and checks
the run folder (writable, no earlier result in it, free space for what the run writes). Only then does Hydra
create the run folder and write `.hydra/config.yaml`: a refused rerun into an existing run folder never rewrites
its record. A refusal found later, inside the job, removes the run folder if this run created it.
"""

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vq4dit.errors import UserError

_created_by_this_run: set[Path] = set()  # run folders that did not exist when preflight looked


def run(job: Callable[[], object]) -> object:
    try:
        return job()
    except UserError as e:
        _remove_fresh_run_folder()
        fail(str(e))


def fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


# Hydra's flags. Those that print the composed config check it first (without the run folder, which they do not
# make); a sweep (-m) checks every job's config before the first starts; help is Hydra's.
PRINTING_FLAGS = {"--cfg": 1, "-c": 1, "--package": 1, "-p": 1, "--resolve": 0, "--info": 0, "-i": 0}
SWEEP_FLAGS = ("-m", "--multirun")
HELP_FLAGS = ("-h", "--help", "--hydra-help", "--version", "--shell-completion", "-sc")


def preflight(config_dir: Path, config_name: str, results: tuple[str, ...],
              expected_bytes: Callable[[DictConfig], int] | None = None, argv: list[str] | None = None,
              new_folders: tuple[str, ...] = (), check_job: Callable[[DictConfig], object] | None = None) -> None:
    """Check the command line's config, the final one Hydra will run, before Hydra runs the job; exit 2 with one
    line if it is refused. `results`: what the job writes into its run folder (refused if already there);
    `expected_bytes(cfg)`: how much it writes (refused if the disk has less free); `new_folders`: settings that
    name a folder the job creates (refused if it exists or cannot be made); `check_job(cfg)`: the job's own cheap
    checks (train.py builds its method: a preset of another family), run for every job of a sweep too."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_FLAGS for a in arguments):
        return
    overrides, mode = _overrides(arguments)
    output = next((o.split("=", 1)[1] for o in overrides if o.startswith("paths.output_dir=")), None)
    if output is not None and not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides.append(f"hydra.run.dir={output}")  # the run folder is the output folder given
        if argv is None:
            sys.argv.append(f"hydra.run.dir={output}")
    try:
        if mode == "sweep":
            for job in sweep_jobs(overrides):
                _check_job(compose(config_dir, config_name, job), new_folders, check_job, job)
            return
        cfg = compose(config_dir, config_name, overrides)
        if mode == "print":
            from vq4dit.cli.config_schema import validate

            validate(cfg)
            return
        check_config(cfg, results, expected_bytes, new_folders)
        if check_job is not None:
            check_job(cfg)
    except UserError as e:
        fail(str(e))
    if argv is None and not any(arg.startswith("hydra.run.dir=") for arg in overrides):
        sys.argv.append(f"hydra.run.dir='{cfg.paths.output_dir}'")  # the folder checked is the folder Hydra makes


def _check_job(cfg: DictConfig, new_folders, check_job, job: list[str]) -> None:
    """One job of a sweep: its values, new folders and own checks (its run folder is a fresh numbered one under
    the sweep's)."""
    from vq4dit.cli.config_schema import validate

    try:
        validate(cfg)
        check_new_folders(cfg, new_folders)
        if check_job is not None:
            check_job(cfg)
    except UserError as e:
        raise UserError(f"sweep job {' '.join(job)}: {e}") from None


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of Hydra's basic sweeper: every combination of the comma-separated (or range/choice) values."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*choices)]


def _overrides(arguments: list[str]) -> tuple[list[str], str]:
    """(the overrides, "run" | "print" | "sweep") of the arguments."""
    overrides, mode, skip = [], "run", 0
    for arg in arguments:
        if skip:
            skip -= 1
        elif arg.split("=")[0] in PRINTING_FLAGS:
            mode, skip = "print", 0 if "=" in arg else PRINTING_FLAGS[arg]
        elif arg in SWEEP_FLAGS:
            mode = "sweep"
        elif arg.startswith("-"):
            fail(f"{arg}: not a flag these commands take; valid: --cfg job|hydra|all, --resolve, --info, -m, --help")
        else:
            overrides.append(arg)
    return overrides, mode


def compose(config_dir: Path, config_name: str, overrides: list[str]) -> DictConfig:
    """The config Hydra will run, with `paths.output_dir` set to the run folder it will create."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
        run_dir = Path(str(cfg.hydra.run.dir))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise UserError(_one_line(e, config_dir, config_name, overrides)) from None
    with _unlocked(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def check_config(cfg: DictConfig, results: tuple[str, ...],
                 expected_bytes: Callable[[DictConfig], int] | None = None, new_folders: tuple[str, ...] = ()) -> None:
    from vq4dit.cli.config_schema import validate
    from vq4dit.cli.outputs import check_free_space, check_no_results, check_writable

    validate(cfg)
    check_new_folders(cfg, new_folders)
    out = Path(cfg.paths.output_dir)
    check_no_results(out, results)
    check_writable(out)
    if expected_bytes is not None:  # (may import the model's code: after the cheap checks)
        check_free_space(out, expected_bytes(cfg))
    if not out.exists():
        _created_by_this_run.add(out.resolve())


def check_new_folders(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    from vq4dit.cli.outputs import check_writable

    for key in keys:
        folder = Path(str(OmegaConf.select(cfg, key)))
        if folder.exists():
            raise UserError(f"{key}={folder} already exists; earlier results are never overwritten: give a new folder")
        check_writable(folder, key)


def _remove_fresh_run_folder() -> None:
    """A refused run leaves no run folder (Hydra made it before the job found the problem)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir).resolve()
    except ValueError:  # not under Hydra (the Python API)
        return
    if out in _created_by_this_run:
        shutil.rmtree(out, ignore_errors=True)


def _unlocked(cfg: DictConfig):
    from omegaconf import open_dict

    return open_dict(cfg)


def _one_line(e: BaseException, config_dir: Path, config_name: str, overrides: list[str]) -> str:
    """A Hydra / OmegaConf composition error as one line that names the value and what is valid."""
    text = " ".join(" ".join(str(p).split()) for p in (e, e.__cause__) if p is not None)
    text = text.split(" Config search path:")[0].replace(
        "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", "").strip()
    unparsable = _unparsable(overrides)
    if unparsable is not None:  # the grammar's message does not say which argument it read
        return f"{unparsable}: not a valid override ({text.split(' See https://')[0]})"
    unknown = re.search(r"Could not override '([^']+)'.*Key '[^']+' is not in struct", text)
    if unknown:  # an unknown key: name the settings its group has
        key = unknown.group(1)
        given = next((o for o in overrides if o.split("=")[0] == key), key)
        parent = key.rpartition(".")[0]
        rest = [o for o in overrides if o is not given]
        try:
            cfg = compose(config_dir, config_name, rest)
            node = OmegaConf.select(cfg, parent) if parent else cfg
            while node is None:  # the parent is missing too: name the nearest that exists
                key, parent = parent, parent.rpartition(".")[0]
                node = OmegaConf.select(cfg, parent) if parent else cfg
            known = ", ".join(k for k in node.keys() if not str(k).startswith("_") and k != "hydra")
            return f"{given}: {parent or 'the config'} has no setting {key.rpartition('.')[2]}; its settings: {known}"
        except UserError:
            return f"{given}: no such setting"
    return text


def _unparsable(overrides: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except HydraException:
            return override
    return None

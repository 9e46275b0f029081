"""A class-conditional DiT: diffusers' `DiTTransformer2DModel` plus what sampling needs to know about it.

Two numeric details make diffusers' DiT differ from facebookresearch/DiT's `models.py` for the same weights:
the timestep embedding's frequency shift (diffusers divides by half-1, the original by half) and the eps of the
MLP LayerNorm (1e-5 vs 1e-6). `timestep_shift=0` and `norm_eps=1e-6` in the model config restore the original;
the third difference, which channels classifier-free guidance mixes, is `guided_channels` (see sampling.py).
"""

import inspect
import typing
from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from torch import nn

from vq4dit.errors import UserError
from vq4dit.models.checkpoint_io import load_transformer_weights

BUILDER = "vq4dit.models.load_dit"  # the one `_target_` a model record may name: train.py records its model config
NONE = type(None)
RECORD_FIELDS = {  # a model record's fields, as JSON types; `weights` and `vae` are recorded paths, never opened
    "name": (str,), "arch": (dict,), "weights": (str, NONE), "seed": (int,), "timestep_shift": (int, float),
    "guided_channels": (int, NONE), "vae": (str, NONE), "latent_scale": (int, float),
}


class ConditionalDiT(nn.Module):
    """Noise predictor eps(x_t, t, y) with its label count, null label and optional latent decoder."""

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        name: str,
        guided_channels: int | None = None,
        vae: AutoencoderKL | None = None,
        latent_scale: float = 1.0,
    ):
        super().__init__()
        self.transformer = transformer
        self.name = name
        self.guided_channels = guided_channels
        self.vae = vae
        self.latent_scale = latent_scale

    @classmethod
    def of(cls, model: "ConditionalDiT | DiTTransformer2DModel", name: str = "dit") -> "ConditionalDiT":
        """The project's model around a plain diffusers DiT (guiding every channel), or `model` itself."""
        return model if isinstance(model, ConditionalDiT) else cls(model, name).eval()

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def in_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def sample_size(self) -> int:
        return self.transformer.config.sample_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of decoded samples."""
        if self.vae is None:
            return self.in_channels, self.sample_size, self.sample_size
        side = self.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)  # the VAE's downsampling
        return self.vae.config.out_channels, side, side

    @property
    def learns_sigma(self) -> bool:
        return self.transformer.out_channels == 2 * self.in_channels

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]

    def config_record(self) -> dict:
        """`load_dit`'s arguments for this architecture (without weights, VAE or its path): data only, no
        `_target_`, since the loader builds every record with `load_dit` (`record_arguments`)."""
        arch = {k: v for k, v in self.transformer.config.items() if not k.startswith("_")}
        shift = self.blocks[0].norm1.emb.time_proj.downscale_freq_shift
        return {"name": self.name, "weights": None, "arch": arch, "timestep_shift": shift,
                "guided_channels": self.guided_channels, "vae": None, "latent_scale": self.latent_scale}

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1]."""
        if self.vae is None:
            return x.clamp(-1, 1)
        return self.vae.decode(x / self.latent_scale).sample.clamp(-1, 1)


def build_transformer(arch: dict, timestep_shift: float = 0.0, seed: int = 0,
                      empty: bool = False) -> DiTTransformer2DModel:
    """A randomly initialised transformer (seeded) with the configured timestep-frequency convention; with
    `empty`, its parameters are on the meta device (nothing allocated; buffers stay real), for a loader that
    fills every one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _empty_parameters() if empty else nullcontext():
            transformer = DiTTransformer2DModel(**arch)
    set_timestep_shift(transformer, timestep_shift)
    return transformer


def _empty_parameters():
    from accelerate import init_empty_weights  # imported here: only loaders need it

    return init_empty_weights(include_buffers=False)


def set_timestep_shift(transformer: DiTTransformer2DModel, shift: float) -> None:
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def load_dit(
    name: str,
    arch: dict,
    weights: str | None = None,
    timestep_shift: float = 0.0,
    guided_channels: int | None = None,
    vae: str | None = None,
    latent_scale: float = 1.0,
    seed: int = 0,
    empty: bool = False,
) -> ConditionalDiT:
    """Build the configured DiT; load `weights` (original `.pt`, diffusers folder or `.safetensors`) if given, as
    the model's own tensors. `empty` (without weights): parameters on the meta device, for a loader that fills
    them."""
    # with weights, nothing is initialised: the loader puts the file's tensors in place
    transformer = build_transformer(dict(arch), timestep_shift, seed, empty=empty or weights is not None)
    if weights is not None:
        load_transformer_weights(transformer, Path(weights), name)
    transformer.eval().requires_grad_(False)
    autoencoder = None if vae is None else load_vae(Path(vae))
    return ConditionalDiT(transformer, name, guided_channels, autoencoder, latent_scale).eval()


def record_arguments(record, where: str) -> dict:
    """The `load_dit` arguments a model record gives (a checkpoint manifest's `model`, or a model config), checked
    field by field: a record describes an architecture, and what builds it is always `load_dit`, never code that
    the record names. A `_target_` other than `load_dit`, an unknown field or DiTTransformer2DModel argument, or a
    value of the wrong type is one UserError line naming it (`where`: the record's place, for that line)."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is {_kind(record)}, not a model record (name, arch, ...)")
    fields = dict(record)
    target = fields.pop("_target_", BUILDER)
    if target != BUILDER:
        raise UserError(f"{where}._target_={_short(target)}: a model record does not choose code; valid: "
                        f"{BUILDER!r} or none")
    _check_fields(fields, RECORD_FIELDS, where, "a model field")
    absent = [key for key in ("name", "arch") if key not in fields]
    if absent:
        raise UserError(f"{where} lacks {absent[0]}; a model record needs name and arch")
    _check_fields(fields["arch"], transformer_arguments(), f"{where}.arch", "a DiTTransformer2DModel argument")
    return fields


@cache
def transformer_arguments() -> dict[str, tuple[type, ...]]:
    """DiTTransformer2DModel's arguments and the JSON types each takes (a float argument takes an int too)."""
    hints = typing.get_type_hints(DiTTransformer2DModel.__init__)
    hints.pop("return", None)
    kinds = {name: typing.get_args(hint) or (hint,) for name, hint in hints.items()}
    return {name: (*kind, int) if float in kind else kind for name, kind in kinds.items()}


def full_arch(arch: dict) -> dict:
    """`arch` with DiTTransformer2DModel's defaults for what it leaves out: a model config names a few arguments,
    a stored record every one, and both describe the same architecture."""
    parameters = inspect.signature(DiTTransformer2DModel.__init__).parameters
    return {**{k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}, **arch}


def _check_fields(fields: dict, valid: dict[str, tuple[type, ...]], where: str, what: str) -> None:
    for key, value in fields.items():
        if key not in valid:
            raise UserError(f"{where} has {_short(key)}, which is not {what}; valid: {', '.join(sorted(valid))}")
        kinds = valid[key]
        if not _fits(value, kinds):
            takes = " or ".join("null" if kind is NONE else getattr(kind, "__name__", str(kind)) for kind in kinds)
            raise UserError(f"{where}.{key}={_short(value)} is {_kind(value)}; it takes {takes}")


def _fits(value, kinds: tuple) -> bool:
    if not all(isinstance(kind, type) for kind in kinds):  # a hint such as Literal: any JSON scalar
        return isinstance(value, (str, int, float, bool, NONE))
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))  # True is no int here


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _short(value, width: int = 60) -> str:
    text = repr(value)  # quoted and escaped: a newline in a file's value stays on the one line
    return text if len(text) <= width else text[:width - 3] + "..."


def load_vae(path: Path) -> AutoencoderKL:
    """An AutoencoderKL folder (stabilityai/sd-vae-ft-ema or -mse), or a diffusers pipeline folder holding one
    under vae/ (facebook/DiT-XL-2-256)."""
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise UserError(f"model.vae={path} holds no config.json (nor vae/config.json); give the local folder of an "
                        "AutoencoderKL such as stabilityai/sd-vae-ft-ema, downloaded with its config.json")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)

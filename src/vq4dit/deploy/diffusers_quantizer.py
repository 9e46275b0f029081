"""The `vq4dit` backend of diffusers' quantizers: `DiTTransformer2DModel.from_pretrained(folder)` on a folder that
`export_diffusers` wrote gives the quantized transformer (after `import vq4dit`, which registers it).

diffusers has no public registration call: `from_pretrained` looks `config.json`'s
`quantization_config.quant_method` up in `diffusers.quantizers.auto.AUTO_QUANTIZATION_CONFIG_MAPPING` and
`AUTO_QUANTIZER_MAPPING`, builds the model with its parameters on the meta device, calls `preprocess_model`, hands
every file tensor for which `check_if_quantized_param` is true to `create_quantized_param`, then calls
`postprocess_model`. Here: each quantized linear becomes a placeholder whose meta buffers carry the stored tensor
names and dtypes; when a layer's last tensor arrives, the deployed layer (`from_stored`, the same call as
`load_quantized`) takes its place; afterwards the shared embedders are tied and the original DiT's timestep
shift is set. The file is the project checkpoint's own `model.safetensors`, so both loaders compute the same.
Every tensor is checked against its sha256 in the config (`tensor_sha256`, format version 5 on) as diffusers
hands it over, as read from the file (before diffusers casts it to `torch_dtype`).

This module imports nothing heavy at import time: it is imported while diffusers' quantizers package is still
being initialised (registration hooks that import), so the project's modules are imported inside the methods.
"""

import logging
import weakref
from enum import Enum

import torch
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

METHOD = "vq4dit"
# diffusers versions whose loading path this backend was run against: the installed one by the tests, the others
# (0.33.1, 0.34.0, 0.35.2, 0.38.0) by hand, each wheel's package first on PYTHONPATH (README).
TESTED_DIFFUSERS = ("0.33", "0.43")  # [low, high); 0.32 puts every quantized model on CUDA
SAVE_HOOK = hasattr(DiffusersQuantizer, "get_state_dict_and_metadata")  # diffusers 0.42 has it, 0.38 not
STORED_DTYPES = {str(t).removeprefix("torch."): t for t in (  # a record's tensor dtypes: names looked up here only
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
log = logging.getLogger(__name__)


class VQ4DiTMethod(str, Enum):  # from_pretrained reads `quant_method.value`
    VQ4DIT = METHOD

    def __str__(self) -> str:
        return self.value


def diffusers_version_supported(version: str) -> bool:
    from packaging.version import Version

    low, high = TESTED_DIFFUSERS
    return Version(low) <= Version(Version(version).base_version) < Version(high)


class VQ4DiTConfig(QuantizationConfigMixin):
    """`quantization_config` of an exported folder: the deployed layers' records (type, parameters, stored tensor
    names and dtypes), the blocks whose embedder is block 0's, the original DiT's timestep shift and the decode
    mode. Written by `export_diffusers`; not a recipe for quantizing (that is `train.py` / `vq4dit.api`)."""

    def __init__(self, layers: dict | None = None, shared: dict | None = None, timestep_shift: float = 1.0,
                 decode: str = "per_forward", format_version: int | None = None, provenance: dict | None = None,
                 quant_method: str = METHOD, tensor_sha256: dict | None = None):
        self.quant_method = VQ4DiTMethod(quant_method)
        self.format_version = format_version
        self.layers = layers or {}
        self.shared = shared or {}
        self.timestep_shift = timestep_shift
        self.decode = decode
        self.provenance = provenance or {}  # method, preset, sizes of the checkpoint it was exported from
        self.tensor_sha256 = tensor_sha256  # every file tensor's `tensor_digest` (None: exported before version 5)

    def to_diff_dict(self) -> dict:  # diffusers' repr() of a config calls it
        return self.to_dict()


class VQ4DiTQuantizer(DiffusersQuantizer):
    requires_calibration = True  # only pre-quantized folders: quantizing is train.py's job
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: VQ4DiTConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.dtype: torch.dtype | None = None
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.model_ref = None
        self.verified: set[str] = set()  # file tensors whose digest was checked (diffusers may ask twice)

    # -- checks ---------------------------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        import diffusers

        from vq4dit.errors import UserError
        from vq4dit.quant.checkpoint import READABLE_VERSIONS
        from vq4dit.quant.decode import DECODE_MODES

        if not diffusers_version_supported(diffusers.__version__):
            low, high = TESTED_DIFFUSERS
            raise UserError(f"diffusers {diffusers.__version__} is not one vq4dit's loader is tested with "
                            f"(>={low},<{high}); install such a version, or load the project checkpoint "
                            f"with vq4dit.api.load_quantized")
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise UserError("loading a quantized diffusers folder needs accelerate (diffusers builds the model "
                            "on the meta device with it): pip install accelerate") from None
        config = self.quantization_config
        if config.format_version not in READABLE_VERSIONS:
            raise UserError(f"quantization_config.format_version={config.format_version}; this vq4dit reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
        if config.decode not in DECODE_MODES:
            raise UserError(f"quantization_config.decode={config.decode}; valid: {', '.join(DECODE_MODES)}")
        check_layer_records(config.layers)
        digests = config.tensor_sha256
        if (digests is not None or config.format_version >= 5) and not (
                isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
            raise UserError(f"quantization_config.tensor_sha256={str(digests)[:60]}; valid: a sha256 per tensor of "
                            f"the weights file, as a format-version-{config.format_version} export writes")
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise UserError(f"device_map={device_map} spreads the model over several devices; vq4dit loads "
                            "it onto one (device_map='cuda' or a .to(device) after loading)")
        if kwargs.get("torch_dtype") is not None:
            self.dtype = kwargs["torch_dtype"]

    def update_torch_dtype(self, torch_dtype):
        self.dtype = torch_dtype
        return torch_dtype

    # -- loading --------------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, **kwargs):
        from vq4dit.models.embedders import share_embedders
        from vq4dit.quant.block_layers import replace_layer

        for name, record in self.quantization_config.layers.items():
            replace_layer(model, name, StoredTensorsPlaceholder(record))
            self.pending[name] = {}
        share_embedders(model, self.quantization_config.shared)
        model.is_quantized = bool(self.quantization_config.layers)  # a folder with no layers casts as fp
        return model

    def update_missing_keys(self, model, missing_keys, prefix):
        copies = tuple(f"{alias}." for alias in self.quantization_config.shared)  # stored once, under block 0
        return [k for k in missing_keys if not k.startswith(copies)]

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        # diffusers asks this of every tensor it loads: here each is checked as the file holds it (`state_dict`)
        self.check_digest(param_name, state_dict.get(param_name) if isinstance(state_dict, dict) else None)
        return param_name.rpartition(".")[0] in self.pending

    def check_digest(self, name: str, tensor: torch.Tensor | None) -> None:
        from vq4dit.errors import UserError
        from vq4dit.tensor_checks import tensor_digest

        digests = self.quantization_config.tensor_sha256
        if digests is None or tensor is None or name in self.verified:
            return
        if name not in digests:
            raise UserError(f"the folder's weights hold {name}, which quantization_config.tensor_sha256 does not "
                            "list: the file was changed after export")
        if tensor_digest(tensor) != digests[name]:
            raise UserError(f"the folder's weights: tensor {name} does not match its sha256 in config.json (the "
                            "file is damaged or was edited); export the checkpoint again")
        self.verified.add(name)

    def check_quantized_param_shape(self, *args, **kwargs):
        return True  # placeholders carry names and dtypes; from_stored checks what it reads

    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        from vq4dit.quant.block_layers import replace_layer
        from vq4dit.quant.quantized_linear import from_stored

        name, _, key = param_name.rpartition(".")
        tensors = self.pending[name]
        tensors[key] = param_value.to(target_device)
        record = self.quantization_config.layers[name]
        if set(tensors) == set(record["tensors"]):
            try:
                layer = from_stored(tensors, record)
            except (ValueError, KeyError, TypeError) as e:  # the config's record and the tensors disagree
                from vq4dit.errors import UserError

                reason = f"its record lacks {e}" if isinstance(e, KeyError) else str(e)
                raise UserError(f"the folder's layer {name} ({record.get('type')!r}) is inconsistent: "
                                f"{reason}") from None
            if self.dtype is not None and layer.bias is not None:
                layer.bias.data = layer.bias.data.to(self.dtype)
            replace_layer(model, name, layer.requires_grad_(False))
            del self.pending[name]

    def _process_model_after_weight_loading(self, model, **kwargs):
        from vq4dit.errors import UserError
        from vq4dit.models.dit import set_timestep_shift
        from vq4dit.quant.quantized_linear import decode_once

        if self.pending:
            name, got = next(iter(self.pending.items()))
            absent = sorted(set(self.quantization_config.layers[name]["tensors"]) - set(got))
            raise UserError(f"the folder's weights lack {name}.{absent[0]} ({len(self.pending)} quantized layers "
                            "incomplete): a vq4dit export was modified or truncated")
        empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if empty:
            raise UserError(f"the folder's weights lack {empty[0]} ({len(empty)} tensors): not a complete export")
        unchecked = set(self.quantization_config.tensor_sha256 or ()) - self.verified
        if unchecked:  # a diffusers that loaded them without handing them to the quantizer (offloading)
            log.warning("vq4dit: %d tensors (%s, ...) were loaded without checking their sha256", len(unchecked),
                        min(unchecked))
        set_timestep_shift(model, self.quantization_config.timestep_shift)
        if self.quantization_config.decode == "once":
            decode_once(model, self.dtype or torch.float32)
        self.model_ref = weakref.ref(model)
        return model.requires_grad_(False)

    def _dequantize(self, model):
        """`model.dequantize()`: every quantized layer becomes a dense nn.Linear (decode=once after loading)."""
        from vq4dit.quant.quantized_linear import decode_once

        return decode_once(model, self.dtype or torch.float32)

    # -- saving (diffusers versions that let a quantizer give the state dict to save) ---------------------------
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        from vq4dit.quant.checkpoint import stored_state

        model = self.model_ref() if self.model_ref is not None else None
        if model is None:
            raise ValueError("vq4dit: the quantized model to save is gone")
        return stored_state(model).tensors, {}

    @property
    def is_serializable(self):
        # save_pretrained writes the deployed layers' stored form only where diffusers asks the quantizer for
        # the state dict; elsewhere it would write in-memory codes that no loader reads
        if not SAVE_HOOK:
            log.warning("vq4dit: this diffusers cannot save a quantized model with save_pretrained; export the "
                        "project checkpoint with `python export.py` (vq4dit.deploy.export.export_diffusers)")
        return SAVE_HOOK

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def check_layer_records(layers: dict) -> None:
    """Each layer record names its tensors and their dtypes, from `STORED_DTYPES` only: the folder's config is
    data, never a name looked up in torch."""
    from vq4dit.errors import UserError

    for name, record in layers.items():
        tensors = record.get("tensors") if isinstance(record, dict) else None
        if not isinstance(tensors, dict) or not tensors:
            raise UserError(f"quantization_config.layers[{name!r}] names no tensors: not a vq4dit export")
        for key, dtype in tensors.items():
            if not isinstance(dtype, str) or dtype not in STORED_DTYPES:
                raise UserError(f"quantization_config.layers[{name!r}].tensors[{key!r}]={dtype!r}; valid: "
                                f"{', '.join(STORED_DTYPES)}")


class StoredTensorsPlaceholder(nn.Module):
    """Stands for a quantized layer while diffusers reads the file: meta buffers named and typed as the stored
    tensors, so diffusers routes each of them to `create_quantized_param`."""

    def __init__(self, record: dict):
        super().__init__()
        for key, dtype in record["tensors"].items():
            self.register_buffer(key, torch.empty(0, dtype=STORED_DTYPES[dtype], device="meta"))

    def forward(self, x):
        raise RuntimeError("a vq4dit layer was not loaded from the folder")


def add_backend(auto) -> None:
    """Put the backend into `diffusers.quantizers.auto`'s two mappings: the one place that does, called by
    registration.py's import hook (which takes this module by name) and below. Defined last, so the hook can tell
    a module that has run from one still running."""
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD] = VQ4DiTConfig
    auto.AUTO_QUANTIZER_MAPPING[METHOD] = VQ4DiTQuantizer


add_backend(diffusers_auto)  # where importing this module was what brought diffusers' quantizers in

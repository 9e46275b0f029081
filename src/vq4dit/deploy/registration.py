"""Registering the `vq4dit` backend with diffusers' quantizers when `import vq4dit` runs, without importing
diffusers (and torch) then: a second of import time nobody asked for.

If `diffusers.quantizers.auto` is already imported the backend is added to its two mappings at once; otherwise a
finder on `sys.meta_path` waits for that module and adds it right after the module has run, which happens before
any `from_pretrained` can read a config.

The backend module is taken by name (importlib) and adds itself through its own `add_backend`, the one place that
writes the mappings; it calls that too when its own import brought diffusers' quantizers in. So this module imports
nothing of the backend, and the backend nothing of this module.
"""

import importlib
import importlib.abc
import importlib.util
import sys

AUTO = "diffusers.quantizers.auto"
BACKEND = "vq4dit.deploy.diffusers_quantizer"


def register_with_diffusers() -> None:
    if AUTO in sys.modules:
        _register(sys.modules[AUTO])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _register(auto) -> None:
    backend = sys.modules.get(BACKEND)
    if backend is not None and not hasattr(backend, "add_backend"):  # defined last: the module is still running
        return  # the backend's own import brought diffusers' quantizers in; it registers itself when complete
    importlib.import_module(BACKEND).add_backend(auto)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of `diffusers.quantizers.auto` so `_register` runs after it."""

    def find_spec(self, name, path, target=None):
        if name != AUTO:
            return None
        sys.meta_path.remove(self)  # once, and not while the real finders below are asked
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def run_then_register(module):
            run_module(module)
            _register(module)

        spec.loader.exec_module = run_then_register
        return spec

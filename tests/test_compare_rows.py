"""The comparison's row names and its cache: a row names its settings, and a cached run is reused only if it ran
with the settings the row resolves to today (benchmarks/compare.py)."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402


def test_a_row_names_method_preset_activations_and_settings():
    assert compare.overrides_for("gptq-w3g64") == ["method=gptq", "quant=w3g64"]
    assert compare.overrides_for("vq4dit-w2-a8") == ["method=vq4dit", "quant=w2", "act=a8"]
    assert compare.overrides_for("vq4dit-w3+candidates=3+pool.student_inputs=quantized") == [
        "method=vq4dit", "quant=w3", "method.candidates=3", "pool.student_inputs=quantized"]


def test_a_cached_run_with_other_settings_is_stale(compose_cfg, tmp_path):
    """Settings are compared as a manifest records them: a checkpoint written by train.py is valid for its own
    config, stale for another; a run from before a setting existed ran with the value ADDED_SETTINGS names."""
    from vq4dit.cli.quantize import quantize
    from vq4dit.quant.checkpoint import read_manifest

    cfg = compose_cfg("train", "model=dit_tiny", "method=kmeans", "quant=w2", "debug=fast", "log_samples=0")
    manifest = read_manifest(quantize(cfg))
    assert compare.stale_settings(manifest, cfg) == {}
    older = {**manifest, "method": {k: v for k, v in manifest["method"].items() if k not in compare.ADDED_SETTINGS}}
    assert compare.stale_settings(older, cfg) == {}
    other = compose_cfg("train", "model=dit_tiny", "method=kmeans", "quant=w2", "debug=fast",
                        "method.kmeans_weighting=input_moment")
    assert compare.stale_settings(manifest, other) == {"method.kmeans_weighting": ("none", "input_moment")}
    fitted = compose_cfg("train", "model=dit_tiny", "method=kmeans", "quant=w2", "debug=fast", "model_fit=outputs")
    assert set(compare.stale_settings(manifest, fitted)) == {"model_fit.iterations", "model_fit.lr"}
    quantized_inputs = compose_cfg("train", "model=dit_tiny", "method=kmeans", "quant=w2", "debug=fast",
                                   "pool.student_inputs=quantized")
    assert set(compare.stale_settings(manifest, quantized_inputs)) == {"pool.student_inputs"}
    assert set(compare.stale_settings(manifest, compose_cfg("train", "model=dit_tiny", "method=kmeans",
                                                            "quant=w2", "debug=fast",
                                                            "seed=1"))) == {"seed"}

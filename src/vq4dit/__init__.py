"""Zero-data post-training vector quantization of Diffusion Transformers (VQ4DiT) and its baselines."""

__version__ = "0.1.0"

"""Zero-data post-training vector quantization of Diffusion Transformers (VQ4DiT) and its baselines.

Importing the package registers the `vq4dit` backend of diffusers' quantizers, so the ordinary
`DiTTransformer2DModel.from_pretrained(folder)` loads an exported quantized DiT (vq4dit/deploy/).
"""

from vq4dit.deploy.registration import register_with_diffusers

__version__ = "0.1.0"

register_with_diffusers()

"""Quantization methods on one seam (`base.Method`): each is one module here and one config in configs/method/."""

from vq4dit.methods.base import FitSettings, Method
from vq4dit.methods.classic_vq import ClassicVQ
from vq4dit.methods.gptq import GPTQ
from vq4dit.methods.kmeans_vq import KMeansVQ
from vq4dit.methods.ptq4dit import PTQ4DiT
from vq4dit.methods.qdit import QDiT
from vq4dit.methods.rtn import RTN
from vq4dit.methods.vq4dit import VQ4DiT

__all__ = ["FitSettings", "Method", "RTN", "GPTQ", "KMeansVQ", "ClassicVQ", "VQ4DiT", "QDiT", "PTQ4DiT"]

from vq4dit.models.dit import ConditionalDiT, load_dit

__all__ = ["ConditionalDiT", "load_dit"]

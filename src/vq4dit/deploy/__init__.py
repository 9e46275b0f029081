"""Deployment: quantized DiTs as diffusers folders (export, the `vq4dit` backend of diffusers' quantizers) and
quantized models built without weights for size and speed measurements."""

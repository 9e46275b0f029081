"""The Hydra jobs over the Python API: `train.py`, `eval.py` and `export.py` call these; the library never imports
them."""

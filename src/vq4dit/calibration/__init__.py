"""Zero-data, block-wise calibration: the pool of block inputs, one block's data, its Lightning fit, the loop."""

"""Everything the trainer and the service must agree on.

Labels, image decoding, preprocessing, the model, checkpoints, metrics, RLE, tiling and inference.
"""

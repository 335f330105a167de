"""Everything the trainer and the service must agree on: labels, decoding, preprocessing, model, checkpoints, metrics, RLE, tiling."""

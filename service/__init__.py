"""The SatSeg HTTP service: segmentation and evaluation over FastAPI."""

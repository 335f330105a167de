"""Speed and load measurements for SatSeg."""

"""Training, evaluation, batch prediction and dataset preparation for SatSeg."""

"""Training, evaluation, batch prediction and dataset preparation for SatSeg."""

import os

# albumentations checks PyPI for a newer release on import; a training job must never reach out.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

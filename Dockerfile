# One image for the API, the one-shot quick training, the full training profile and TensorBoard.
#
#   docker build -t satseg .                                   # CUDA build of torch (PyPI default on linux x86_64)
#   docker build -t satseg:cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU-only torch, no CUDA libraries
#
# No data and no checkpoints are baked in: they live on volumes mounted at /data and /runs.
FROM python:3.11-slim

# Empty: torch and torchvision come from PyPI, whose linux x86_64 wheels are the CUDA builds.
# Set to a PyTorch wheel index (https://download.pytorch.org/whl/cpu, .../whl/cu126, ...) to take
# torch and torchvision from there instead; every other dependency still comes from PyPI.
ARG TORCH_INDEX_URL=""

# NO_ALBUMENTATIONS_UPDATE: albumentations otherwise asks PyPI for a newer version on import.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, from pyproject.toml and an empty package skeleton, so that editing the code
# reuses this layer. The editable install registers the satseg distribution (its version goes into
# checkpoints) while the code itself is read from /app, where label_mapping.json sits beside it.
COPY pyproject.toml ./
RUN set -eu; \
    mkdir -p shared trainer service benchmarks; \
    touch README.md shared/__init__.py trainer/__init__.py service/__init__.py benchmarks/__init__.py; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if re.split(r'[<>=!~;\[ ]', d)[0] in ('torch', 'torchvision')))" > /tmp/torch-requirements.txt; \
        pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch-requirements.txt; \
        rm /tmp/torch-requirements.txt; \
    fi; \
    pip install -e .

# A fixed, unprivileged user. /data and /runs are created here and owned by it so that named
# volumes mounted there start out writable by it (Docker copies the ownership on first use).
RUN useradd --create-home --uid 10001 --user-group satseg \
    && mkdir -p /data /runs \
    && chown satseg:satseg /data /runs

# The code stays owned by root: the service user can read it, not change it.
COPY . .

USER satseg

ENV SATSEG_HOST=0.0.0.0 \
    SATSEG_PORT=8000 \
    SATSEG_CHECKPOINT=/runs/quickstart/best.pt

EXPOSE 8000

# /readyz answers 200 only once the checkpoint is loaded and warmed up; urlopen raises on 503.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SATSEG_PORT', '8000') + '/readyz', timeout=4)"

CMD ["python", "-m", "service"]

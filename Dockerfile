# One image for the API, the one-shot quick training, the full training profile and TensorBoard.
#
#   make wheelhouse && docker build -t satseg .               # CUDA torch, installed offline
#   make wheelhouse TORCH_VARIANT=cpu && \
#     docker build -t satseg:cpu --build-arg TORCH_VARIANT=cpu .   # CPU torch, no CUDA libraries
#   docker build -t satseg:cpu --build-arg TORCH_VARIANT=cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .  # no wheelhouse: the index
#
# Hosts that cannot pull python:3.11-slim build on a Debian base made locally
# (`make docker-base`, then --build-arg BASE_IMAGE=satseg-base:bookworm).
#
# Works with the classic builder and with BuildKit: nothing here needs BuildKit.
# No data, checkpoints, wheels, compilers or pip caches end up in the image: data and
# checkpoints live on volumes mounted at /data and /runs.
ARG BASE_IMAGE=python:3.11-slim

# -- build: a virtual environment in /opt/venv with every dependency ---------------------------
FROM ${BASE_IMAGE} AS build

# cuda or cpu: which folder of the wheelhouse to install from (wheelhouse/<variant>/).
ARG TORCH_VARIANT=cuda
# Optional extras of pyproject.toml: ray (Ray Data, for trainer.predict --ray and the compose ray
# profile) by default; --build-arg EXTRAS= leaves Ray out (see the README for the size).
ARG EXTRAS=ray

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A virtual environment works the same on python:3.11-slim and on Debian's python3, whose
# system site-packages pip refuses to touch (PEP 668).
RUN python3 -m venv /opt/venv

WORKDIR /app

# Dependencies first, from pyproject.toml and an empty package skeleton, so that editing the code
# reuses this stage. The editable install registers the satseg distribution (its version goes into
# checkpoints) while the code itself is read from /app, where label_mapping.json sits beside it.
# wheelhouse/ always exists (its README is tracked); `make wheelhouse` fills wheelhouse/<variant>/
# and marks it .complete.
COPY pyproject.toml ./
COPY wheelhouse/ /wheelhouse/
RUN set -eu; \
    mkdir -p shared trainer service benchmarks; \
    touch README.md shared/__init__.py trainer/__init__.py service/__init__.py benchmarks/__init__.py; \
    spec=.; if [ -n "$EXTRAS" ]; then spec=".[$EXTRAS]"; fi; \
    if [ -f /wheelhouse/"$TORCH_VARIANT"/.complete ]; then \
        echo "installing $spec offline from wheelhouse/$TORCH_VARIANT"; \
        /opt/venv/bin/pip install --no-index --find-links /wheelhouse/"$TORCH_VARIANT" -e "$spec"; \
    fi

# Only without a wheelhouse: install from the package index, torch and torchvision from
# TORCH_INDEX_URL when set (https://download.pytorch.org/whl/cpu, ...), else from PyPI (the CUDA
# builds). Declared here, after the offline install, so that its value never invalidates that layer.
ARG TORCH_INDEX_URL=""
RUN set -eu; \
    pip=/opt/venv/bin/pip; \
    if ! "$pip" show --quiet satseg 2>/dev/null; then \
        echo "no wheelhouse/$TORCH_VARIANT: installing from the package index"; \
        if [ -n "$TORCH_INDEX_URL" ]; then \
            python3 -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if re.split(r'[<>=!~;\[ ]', d)[0] in ('torch', 'torchvision')))" > /tmp/torch-requirements.txt; \
            "$pip" install --index-url "$TORCH_INDEX_URL" -r /tmp/torch-requirements.txt; \
        fi; \
        spec=.; if [ -n "$EXTRAS" ]; then spec=".[$EXTRAS]"; fi; \
        "$pip" install -e "$spec"; \
    fi; \
    # pip is not needed at run time. The bytecode pip compiled stays: /opt/venv is read-only to
    # the service user, and without it every start would compile torch again.
    "$pip" uninstall --yes --quiet pip

# -- the image: the base, the environment and the code; nothing else ---------------------------
FROM ${BASE_IMAGE}

# NO_ALBUMENTATIONS_UPDATE: albumentations otherwise asks PyPI for a newer version on import.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONPATH=/app

# A fixed, unprivileged user. /data and /runs are created here and owned by it so that named
# volumes mounted there start out writable by it (Docker copies the ownership on first use).
RUN useradd --create-home --uid 10001 --user-group satseg \
    && mkdir -p /data /runs \
    && chown satseg:satseg /data /runs

COPY --from=build /opt/venv /opt/venv

# The code stays owned by root: the service user can read it, not change it. Named one by one
# so that nothing else in the build context (the wheelhouse above all) reaches the image.
WORKDIR /app
COPY pyproject.toml label_mapping.json ./
COPY shared/ shared/
COPY trainer/ trainer/
COPY service/ service/

USER satseg

ENV SATSEG_HOST=0.0.0.0 \
    SATSEG_PORT=8000 \
    SATSEG_CHECKPOINT=/runs/quickstart/best.pt

EXPOSE 8000

# /readyz answers 200 only once the checkpoint is loaded and warmed up; urlopen raises on 503.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SATSEG_PORT', '8000') + '/readyz', timeout=4)"

CMD ["python", "-m", "service"]

# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   install, prepare the bundled data, train the quick model, serve it on :8000
#   make test   install (or update) and run the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data/bluemarble
RUN    ?= runs/quickstart
CKPT   ?= $(RUN)/best.pt
PORT   ?= 8000

.PHONY: demo test install data train serve lint format bench clean docker-base wheelhouse docker mutants gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(DATA)/TEST_SET: | $(VENV)/.installed
	$(PY) -m trainer.prepare bluemarble --out $(DATA)

data: $(DATA)/TEST_SET

# The quick recipe is skipped when its checkpoint already exists.
$(CKPT): | $(DATA)/TEST_SET
	$(PY) -m trainer.fit --config trainer/configs/quickstart.yaml data.root=$(DATA)

train: $(CKPT)

serve: $(CKPT)
	@echo "Serving $(CKPT) on http://localhost:$(PORT)  (open it in a browser for the viewer)"
	@echo "Try:"
	@echo "  curl -F image=@$$(ls $(DATA)/TEST_SET/IMAGES/* | head -n1) localhost:$(PORT)/segment -o mask.png"
	@echo "  curl -F image=@$$(ls $(DATA)/TEST_SET/IMAGES/* | head -n1) 'localhost:$(PORT)/segment?format=rle'"
	@echo "  curl -F image=@$$(ls $(DATA)/TEST_SET/IMAGES/* | head -n1) -F mask=@$$(ls $(DATA)/TEST_SET/MASKS/* | head -n1) localhost:$(PORT)/evaluate"
	SATSEG_CHECKPOINT=$(CKPT) SATSEG_PORT=$(PORT) $(PY) -m service

demo: install data train serve

# --durations: the slowest tests, named in CI's log, where the suite's time (and CI's 45-minute
# limit on a slower machine) goes.
test: $(VENV)/.installed
	$(PY) -m pytest --durations=15

# Break each protection on purpose and check the tests that guard it fail (tests/mutants.py).
mutants: $(VENV)/.installed
	$(PY) -m tests.mutants

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(CKPT)
	$(PY) -m benchmarks.inference --json benchmarks/inference.json
	$(PY) -m benchmarks.train --json benchmarks/train.json

# On a CUDA machine: the gpu tests, three minutes of the full ResNet-50 recipe and the CUDA
# inference benchmark, in eight minutes, into one JSON (benchmarks/gpu_check.sh --help).
# GPU_PYTHON: the interpreter that holds CUDA PyTorch; WHEELHOUSE: the other dependencies.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHON=$(GPU_PYTHON) benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# -- containers -------------------------------------------------------------------------------
#   make docker-base   a Debian bookworm base image with Python 3.11, for hosts that cannot pull
#                      python:3.11-slim (debootstrap from the Debian mirror apt uses; needs root)
#   make wheelhouse    every wheel the image needs, downloaded here with this host's pip settings
#                      (index, proxy, certificates) into wheelhouse/$(TORCH_VARIANT)/, so that
#                      `docker build` installs with --no-index and needs no network
#   make docker        the image satseg:latest (cuda) or satseg:cpu (TORCH_VARIANT=cpu), with the
#                      [ray] extra unless EXTRAS= is given
TORCH_VARIANT ?= cuda
DOCKER_BASE   ?= satseg-base:bookworm
# A docker-base image when there is one, else the Dockerfile's default (python:3.11-slim).
BASE_IMAGE    ?= $(shell docker image inspect $(DOCKER_BASE) >/dev/null 2>&1 && echo $(DOCKER_BASE))
DEBIAN_MIRROR ?= $(or $(shell sed -n 's/^URIs: *\([^ ]*debian\)$$/\1/p; s/^deb \[*[^]]*\]* *\(http[^ ]*debian\) .*/\1/p' \
                   /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null | head -n1),http://deb.debian.org/debian)
# The cpu wheelhouse takes torch and torchvision from the PyTorch CPU index: PyPI's linux wheels
# of torchvision are linked against the CUDA build of torch, so a +cpu torch beside them fails on
# `import torchvision`. The cuda wheelhouse takes the pins of pyproject.toml as pip resolves them.
CPU_INDEX     ?= https://download.pytorch.org/whl/cpu
CPU_TORCH     ?= torch==2.14.1+cpu torchvision==0.29.1+cpu
TORCH_cpu      = --extra-index-url $(CPU_INDEX) $(CPU_TORCH)
TORCH_cuda     =
IMAGE_cpu      = satseg:cpu
IMAGE_cuda     = satseg:latest
# Optional extras of pyproject.toml installed in the image: ray runs the compose ray profile
# (trainer.predict --ray); EXTRAS= leaves Ray out of the image.
EXTRAS        ?= ray

docker-base:
	@if docker image inspect $(DOCKER_BASE) >/dev/null 2>&1; then \
		echo "$(DOCKER_BASE) exists (docker rmi $(DOCKER_BASE) to rebuild it)"; \
	else \
		set -e; rootfs=$$(mktemp -d); trap 'rm -rf "$$rootfs"' EXIT; \
		chmod 755 "$$rootfs"; \
		echo "debootstrap bookworm from $(DEBIAN_MIRROR)"; \
		debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
			bookworm "$$rootfs" $(DEBIAN_MIRROR) >/dev/null; \
		rm -rf "$$rootfs"/var/cache/apt/archives/*.deb "$$rootfs"/var/lib/apt/lists/* \
			"$$rootfs"/usr/share/doc/* "$$rootfs"/usr/share/man/* "$$rootfs"/usr/share/locale/*; \
		tar -C "$$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' \
			--change 'CMD ["python3"]' - $(DOCKER_BASE); \
	fi

# Downloads only what is missing; .complete marks a download that finished, holds the extras it
# covers, and is what the Dockerfile looks for. A change to pyproject.toml or to EXTRAS makes the
# next `make wheelhouse` fetch again.
wheelhouse:
	@grep -qxF "extras=$(EXTRAS)" wheelhouse/$(TORCH_VARIANT)/.complete 2>/dev/null \
		|| rm -f wheelhouse/$(TORCH_VARIANT)/.complete
	$(MAKE) wheelhouse/$(TORCH_VARIANT)/.complete

wheelhouse/%/.complete: pyproject.toml
	rm -f $@
	$(PYTHON) -m pip download --quiet --dest wheelhouse/$* ".$(if $(EXTRAS),[$(EXTRAS)])" $(TORCH_$*) \
		$$($(PYTHON) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'])")
	echo "extras=$(EXTRAS)" > $@
	du -sh wheelhouse/$*

docker:
	docker build -t $(IMAGE_$(TORCH_VARIANT)) --build-arg TORCH_VARIANT=$(TORCH_VARIANT) \
		--build-arg EXTRAS=$(EXTRAS) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .
	docker image ls $(IMAGE_$(TORCH_VARIANT))

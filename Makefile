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

.PHONY: demo test install data train serve lint format bench clean

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

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(CKPT)
	$(PY) -m benchmarks.inference --json benchmarks/inference.json
	$(PY) -m benchmarks.train --json benchmarks/train.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The README's two commands are `make demo` and `make test`; both bootstrap a fresh machine first.
SHELL := /bin/bash
# uv on PATH, else the copy bootstrap installed with pip (recursive `=`: decided after bootstrap ran).
UV = $(shell command -v uv >/dev/null 2>&1 && echo uv || echo python3 -m uv)

.PHONY: demo test bootstrap lint format up down status clean bench

bootstrap:
	@bash scripts/bootstrap.sh

# SCALE: synthetic data size of the main job (1 = 1M payments), e.g. `make demo SCALE=1`.
SCALE ?= 0.05

demo: bootstrap
	$(UV) run --frozen stripe-platform demo --scale $(SCALE)

test: bootstrap
	$(UV) run --frozen ruff check .
	$(UV) run --frozen pytest

# Every benchmark (bench/run_all.py), embedded profile: bench/results/<date>.json and .md, table printed.
# Scale 1 unless SCALE is given (`make bench SCALE=0.1`); RUNS measured runs after a warm-up;
# ONLY=seed,ingest,transform,mongo,demo,fault,ml,api,stream,security,audit picks some. Never part of `make test`.
RUNS ?= 3
bench: bootstrap
	$(UV) run --frozen stripe-platform bench --runs $(RUNS) \
		--scale $(if $(filter command line environment,$(origin SCALE)),$(SCALE),1) \
		$(if $(ONLY),--only $(ONLY))

lint:
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

format:
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

up down status:
	$(UV) run --frozen stripe-platform $@

clean:
	-$(UV) run --frozen stripe-platform down
	rm -rf .platform

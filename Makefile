# The README's two commands are `make demo` and `make test`; both bootstrap a fresh machine first.
SHELL := /bin/bash
UV ?= uv
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: demo test bootstrap lint format up down status clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(UV) run --frozen stripe-platform demo

test: bootstrap
	$(UV) run --frozen ruff check .
	$(UV) run --frozen pytest

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

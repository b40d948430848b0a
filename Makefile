# The two commands README shows: `make run` (gateway + local replicas) and `make test`.
# Both build the virtual environment from nothing first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint browser loadtools postgres

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is a CPU build on local disk here; a bare `torch` would pull a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[replica,dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/infergate up

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The status-page test drives Debian's chromium headless; as root (CI) install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The front-end benchmark's smoke test drives hey and wrk (small Debian packages); as root
# install them when missing.
loadtools:
	@{ command -v hey >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1; } || \
		[ "$$(id -u)" != 0 ] || \
		{ DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -q hey wrk; }

# The shared job store's tests start a real PostgreSQL server (tests/support/postgres.py); as root
# install Debian's postgresql when missing (its binaries land in /usr/lib/postgresql/*/bin).
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		[ "$$(id -u)" != 0 ] || \
		{ DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

test: lint browser loadtools postgres
	$(PY) -m pytest -q

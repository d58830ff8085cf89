PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test search bench lint clean mlflow browser postgres

# Idempotent: re-installs only when pyproject.toml changes.
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# pytest exits 5 when it collected no test: treat that as a failure.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran" >&2; exit 1; fi; exit $$rc

# The main job on the embedded default (starts runs/digits/ afresh; `s3 search --resume` continues one).
search: setup
	OMP_NUM_THREADS=1 $(BIN)/s3 search --space search_spaces/digits.yaml --fresh

# A local MLflow tracking server on 127.0.0.1:5000 (runs/mlflow-server.db, runs/mlartifacts/);
# searches use it with `s3 search ... --mlflow-uri http://127.0.0.1:5000`.
mlflow: setup
	$(BIN)/s3 mlflow-server --host 127.0.0.1 --port 5000 --runs runs

# Every benchmark runs; the target fails at the end if any of them failed or reported a missed target
# (scaling.py and search_efficiency.py exit 1 then; the README lists the targets missed today).
bench: setup
	rc=0; for b in benchmarks/*.py; do OMP_NUM_THREADS=1 $(BIN)/python $$b || \
	  { echo "make bench: $$b failed or missed a target" >&2; rc=1; }; done; exit $$rc

# PostgreSQL for a shared tracking server (`s3 mlflow-server --backend-store-uri postgresql://...`) and
# tests/test_postgres_tracking.py (Debian's package, as root; the test starts its own cluster, it does
# not use the package's service). Does nothing where initdb is installed.
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }

# Chromium and its WebDriver for tests/test_browser.py (Debian's packages, as root; CI machines start
# without them). Does nothing where both are installed.
browser:
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

lint: setup
	$(BIN)/ruff check s3_ray tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache

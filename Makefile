# ShoalMQ: `make run` starts a broker on the embedded default; `make test` installs what the tests need and runs them.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the tests drive: etcd (server and etcdctl), the mosquitto command-line clients, the
# mosquitto broker (the reference the load tool is checked and compared against), and chromium with its
# WebDriver (the dashboard's browser test).
DEB_PACKAGES := etcd-server etcd-client mosquitto-clients mosquitto iproute2 chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: run test soak bench install system-deps proto clean distclean

run: $(VENV)/.installed
	$(BIN)/broker $(ARGS)

test: system-deps $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The long cluster churn run (tests/test_churn.py, marker soak): SHOALMQ_SOAK_DURATION seconds of publishing
# (default 600) with faults every 4 s; SHOALMQ_CHURN_SEED picks the seed.
soak: system-deps $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/test_churn.py -m soak -s $(PYTEST_ARGS)

bench: system-deps $(VENV)/.installed-test
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-columns=min,median,mean,ops,rounds $(PYTEST_ARGS)
	$(BIN)/python -m bench.compare $(COMPARE_ARGS)
	$(BIN)/python -m bench.cluster $(CLUSTER_ARGS)

install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Editable install: the Cython modules are compiled into the source tree, so tests run against this checkout.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml setup.py $(wildcard shoalmq/_native/*.pyx)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

system-deps:
	@if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null || ! command -v mosquitto_pub >/dev/null \
			|| ! command -v mosquitto >/dev/null || ! command -v mosquitto_passwd >/dev/null \
			|| ! command -v ip >/dev/null || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing $(DEB_PACKAGES) with apt-get"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES); \
	fi

clean:
	rm -rf build shoalmq/_native/*.c shoalmq/_native/*.so .pytest_cache .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info

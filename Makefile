# Two commands on a fresh machine: `make run` (the server, on the demo model unless
# CHATGLM_MODEL is set) and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NODE_DIR := .cache/node
# chatglm-cpp 0.4.2 builds from source; CMake 4 rejects its bundled cmake_minimum_required.
export CMAKE_ARGS ?= -DCMAKE_POLICY_VERSION_MINIMUM=3.5

.PHONY: run test test-fast lint audit settings-table install install-dev install-clients test-servers clean

run: $(VENV)/.installed
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:application

test: $(VENV)/.installed-dev test-servers install-clients lint
	$(BIN)/python -m pytest

# The unit tests alone (tests/unit/: no server, no engine, no subprocess; seconds): run them on every change.
# The rest of tests/ starts real gunicorn, engines, fakes and clients: `make test` runs everything.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests/unit -q

# ruff (bugs, not style) and mypy over the project, as pyproject.toml configures them; before the tests.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

# docs/configuration.md's settings table, rewritten from the settings' declarations (config/settings.py);
# tests/unit/test_settings.py fails while the two differ.
settings-table: $(VENV)/.installed
	$(BIN)/python scripts/settings_table.py --write

# Known vulnerabilities in the pinned requirements (pip-audit asks PyPI's advisory service).
audit: $(VENV)/.installed-dev
	$(BIN)/pip install --quiet pip-audit
	$(BIN)/pip-audit -r requirements.txt

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# chatglm-cpp first, from its PyPI source with aigate's patches on a current ggml (0.4.2+aigate.9 satisfies the
# pin, so requirements.txt keeps it); a stock build works too, with less (see README).
$(VENV)/.installed: requirements.txt $(wildcard patches/chatglm-cpp-0.4.2-*.patch) scripts/build_chatglm_cpp.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import chatglm_cpp, sys; sys.exit(chatglm_cpp.__version__ != '0.4.2+aigate.9')" 2>/dev/null \
	  || scripts/build_chatglm_cpp.sh $(BIN)/pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# The real clients of tests/test_clients.py that come from npm (Codex CLI, Claude Code, Vercel's AI SDK),
# pinned by tests/clients/package-lock.json; without npm or its registry those tests are skipped and say so.
install-clients: $(NODE_DIR)/.installed

$(NODE_DIR)/.installed: tests/clients/package.json tests/clients/package-lock.json
	@if command -v npm >/dev/null; then \
	  mkdir -p $(NODE_DIR) && cp tests/clients/package.json tests/clients/package-lock.json $(NODE_DIR)/ && \
	  (cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error) && touch $@ \
	  || echo "npm ci failed: the Codex CLI, Claude Code and AI SDK tests will be skipped"; \
	else echo "no npm: the Codex CLI, Claude Code and AI SDK tests will be skipped"; fi

# The deployment tests run the real nginx and Apache and check the systemd unit, and the playground
# test drives Debian's Chromium (through Playwright's Python package, which downloads no browser): install them from
# Debian's packages when we can (root); without them those tests are skipped and say so.
test-servers:
	@missing=""; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	[ -x /usr/sbin/apache2 ] || missing="$$missing apache2"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "not root: the tests that need$$missing will be skipped"; fi; \
	fi

clean:
	rm -rf $(VENV) .cache

# Two commands on a fresh machine: `make run` (the server, on the demo model unless
# CHATGLM_MODEL is set) and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# chatglm-cpp 0.4.2 builds from source; CMake 4 rejects its bundled cmake_minimum_required.
export CMAKE_ARGS ?= -DCMAKE_POLICY_VERSION_MINIMUM=3.5

.PHONY: run test install install-dev clean

run: $(VENV)/.installed
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:application

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .cache

# Two commands on a fresh machine:  `make run` (the gateway on the demo config)  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
SECRETS := .enclave/secrets

.PHONY: run test lint setup demo-secrets

run: setup demo-secrets
	$(BIN)/enclave serve

test: setup
	bash tests/node_tools.sh
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The demo weather connector needs an API key; a random one is made once, readable only by you.
demo-secrets:
	@mkdir -p -m 700 .enclave $(SECRETS)
	@test -f $(SECRETS)/weather-api-key || (umask 077; $(BIN)/python -c "import secrets; print('demo-' + secrets.token_hex(16))" > $(SECRETS)/weather-api-key)

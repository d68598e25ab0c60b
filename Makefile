# Tern: `make run` starts the all-in-one platform, `make test` runs every test.
# Targets install what they need on a fresh Debian machine that has the Rust toolchain.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# Builds are cached outside the clone, so a fresh checkout does not rebuild every dependency.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/tern/target
CARGO ?= cargo
# Debian packages: protoc for the gRPC contracts, mosquitto clients and jq for the tests and the
# README quickstart, Chromium for the dashboard tests, authlib (a third-party OAuth client) for the
# authorization server tests, OpenLDAP's slapd and tools for the LDAP directory tests, nats-server
# for the command routing tests, python3-venv for the chart checker's environment.
APT_PACKAGES := protobuf-compiler mosquitto-clients jq chromium python3-paho-mqtt openssl libcoap3-bin chromium-driver \
	python3-authlib python3-requests slapd ldap-utils nats-server python3-venv
TANSU_VERSION := 0.6.0
# The Helm chart checker (deploy/check_chart.py): Helm's Go SDK as a wheel and the Kubernetes
# OpenAPI schemas, in a virtual environment outside the clone.
CHART_VENV := $(HOME)/.cache/tern/chart-venv
CHART_PACKAGES := helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## Install the system packages the build and the tests need (idempotent, quiet)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
	@# tansu: a Kafka-protocol broker for the Kafka event log's tests (about 15 minutes to build
	@# once; its in-memory storage needs the dynostore feature). Installed outside the clone.
	@command -v tansu >/dev/null || { echo "installing tansu $(TANSU_VERSION) (cargo install, once)"; \
		env -u CARGO_TARGET_DIR $(CARGO) install --locked --quiet tansu --version $(TANSU_VERSION) --features dynostore; }
	@[ -x $(CHART_VENV)/bin/python ] || python3 -m venv $(CHART_VENV)
	@$(CHART_VENV)/bin/python -c "import helm_python, kubernetes_validate, yaml" 2>/dev/null || \
		$(CHART_VENV)/bin/pip install --quiet --disable-pip-version-check $(CHART_PACKAGES)

.PHONY: build
build: deps ## Build the release binary into bin/tern
	$(CARGO) build --release --locked -p tern
	@mkdir -p bin && cp "$(CARGO_TARGET_DIR)/release/tern" bin/tern
	@echo "built bin/tern"

.PHONY: agent
agent: deps ## Build the release device agent into bin/tern-agent (docs/agent.md)
	$(CARGO) build --release --locked -p tern-agent
	@mkdir -p bin && cp "$(CARGO_TARGET_DIR)/release/tern-agent" bin/tern-agent
	@echo "built bin/tern-agent"

.PHONY: run
run: build ## Run every service in one process on embedded storage (data in ./data)
	bin/tern up

.PHONY: run-distributed
run-distributed: build ## Run Tern on Kafka (tansu), NATS and the served store, started on loopback (data in ./data-distributed)
	deploy/run-distributed.sh

.PHONY: lint
lint: deps ## Formatting and clippy with warnings as errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

.PHONY: test
test: lint ## Lint, then every unit, conformance and end-to-end test, and the Helm chart
	$(CARGO) test --locked --workspace
	$(CHART_VENV)/bin/python deploy/check_chart.py

.PHONY: chart
chart: deps ## Lint, render and validate the Helm chart (helm/tern)
	$(CHART_VENV)/bin/python deploy/check_chart.py

.PHONY: bench
bench: deps ## Benchmarks: Tern beside Mosquitto and nats-server (BENCH_ARGS="--duration 10 --scale 1")
	@for p in mosquitto nats-server; do dpkg -s $$p >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$p >/dev/null; }; done
	$(CARGO) build --release --locked -p tern -p tern-sim
	python3 deploy/bench/bench.py $(BENCH_ARGS)

.PHONY: fuzz
FUZZ_SECONDS ?= 60
FUZZ_CORPUS := $(HOME)/.cache/tern/fuzz-corpus/mqtt_codec
fuzz: ## Fuzz the MQTT codec with cargo fuzz for FUZZ_SECONDS (not part of make test)
	@command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
	@mkdir -p $(FUZZ_CORPUS)
	# New inputs go to the cache; the checked-in seeds (fuzz/corpus) stay as they are.
	# RUSTC_BOOTSTRAP: cargo fuzz needs sanitizer flags that stable rustc gates.
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run mqtt_codec $(FUZZ_CORPUS) corpus/mqtt_codec \
		-- -max_total_time=$(FUZZ_SECONDS)

.PHONY: clean
clean: ## Remove build output and bin/ (not ./data)
	$(CARGO) clean
	rm -rf bin

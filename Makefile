# The two commands of the README: `make demo` and `make test`. Both install what is missing
# first (Debian packages, uv, the Python environment).

APT_PACKAGES := openvswitch-switch dnsmasq-base qemu-guest-agent busybox iproute2 ethtool \
	libvirt-dev pkg-config bind9-dnsutils socat procps python3-dev gcc postgresql bind9 dnsperf \
	iputils-ping openssh-server openssh-client
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)

.PHONY: install apt uv sync demo test lint unit lab bench down

install: apt sync

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

uv:
	@[ -x "$(UV)" ] || python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv

sync: uv
	@$(UV) sync --frozen --extra postgresql --quiet

demo: install
	@$(UV) run vmfabric lab demo

lint: sync
	$(UV) run ruff check
	$(UV) run ruff format --check
	$(UV) run mypy

unit: sync
	$(UV) run pytest -m "not lab" -q

lab: install
	$(UV) run pytest -m lab -q

test: install lint
	$(UV) run pytest -q

bench: install
	@for b in bench/bench_*.py; do $(UV) run python $$b; done

down: sync
	$(UV) run vmfabric lab down

# The guest proxy as one executable file (a zipapp of the real modules; any python3 >= 3.8
# runs it), to copy into a guest with packaging/vmfabric-guest-proxy.service.
.PHONY: guest-proxy
guest-proxy: sync
	$(UV) run python -m vmfabric.access.bundle dist/vmfabric-guest-proxy

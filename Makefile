# vmmd — two commands do everything on a fresh Debian 12 machine (as root):
#   make run    install what is missing, build, boot the demo guest, show its console
#   make test   install what is missing, build, run every test tier
# Both are idempotent and quick when nothing changed.

SHELL := /bin/bash
.DEFAULT_GOAL := run
.DELETE_ON_ERROR:

# Debian's own python3 (the python3-venv package below), not whichever python3
# is first on PATH.  Debian's interpreter has libpython linked in statically
# and profile-optimised; a machine's default one may be a plain source build
# (here pyenv's 3.11.7, libpython3.11.so, no PGO: `python -I -c pass` takes
# ~60 ms against Debian's ~10 ms, and our control plane runs ~1.5x slower).
# `vmmd run` and every API call pay that.
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
GUEST := build/guest
STAMPS := build/stamps
PVM := $(shell test -e /sys/module/kvm_pvm && echo 1)

# Debian packages: C toolchain and Python headers (the C core), kernel build,
# guest images, network tests (iproute2, dnsmasq), libseccomp (the cell workers'
# system call filter).  The bench target adds QEMU.
# acpica-tools: iasl, which the unit tests use to disassemble (and check) the ACPI tables
# vmmd writes for guests (vmmd/vm/boot/acpi.py).
DEB_PACKAGES := build-essential python3-dev python3-venv flex bison bc libelf-dev \
	libssl-dev dwarves linux-source-6.1 xz-utils busybox-static cpio e2fsprogs lz4 \
	iproute2 dnsmasq-base libseccomp-dev acpica-tools
# Node.js runs the foreign-language API client test; any node >= 18 with npm
# will do (a machine may have it from elsewhere), so it is checked by command.
NODE_PACKAGES := nodejs npm
BENCH_PACKAGES := qemu-system-x86

NATIVE_SRC := $(wildcard native/*.c native/*.h) native/build_ffi.py
PROTO_SRC := $(shell find proto -name '*.proto') proto/generate.py
KERNEL_INPUTS := guest-kernels/build-kernel.sh guest-kernels/microvm-x86_64.config \
	$(wildcard guest-kernels/patches/*.patch)
IMAGE_INPUTS := guest-kernels/mkimages.py guest-kernels/init.sh

# The demo: the built kernel and initramfs, the machine described by ACPI
# tables (as distro kernels expect; our kernel has CONFIG_ACPI, and without
# tables it would say so).  On a PVM host guest user space cannot run (see
# docs/platform.md), so the kernel's READY hook prints the READY line
# instead of the initramfs.
DEMO_ARGS := --kernel $(GUEST)/vmlinux --initrd $(GUEST)/initramfs.cpio.gz --acpi \
	$(if $(PVM),--append vmmd_ready=1)

.PHONY: run test lint guest native testhooks proto deps bench fuzz fuzz-smoke clean distclean

run: deps $(STAMPS)/native $(STAMPS)/proto $(STAMPS)/bytecode guest
	@echo "== booting the demo guest through a temporary daemon: vmmd demo $(DEMO_ARGS)"
	@$(if $(PVM),echo "   (PVM host: guest kernel code is emulated, expect ~2 minutes)";)
	$(VENV)/bin/vmmd demo $(DEMO_ARGS)

# Every tier with the daemon's default isolation (cells), then the core
# daemon tests again with --isolation none (the shared mode stays working;
# its VMs are built on spares made ahead, given their RAM and vCPUs when the
# daemon is quiet, devices added after: vmmd/vm/shelf.py).
CORE_DAEMON_TESTS := tests/api/test_lifecycle.py tests/api/test_snapshots.py \
	tests/api/test_streams.py tests/kvm/test_daemon.py tests/kvm/test_sigbus.py \
	tests/api/test_drives.py tests/api/test_nets.py tests/api/test_vsock.py \
	tests/api/test_entropy.py
test: deps $(STAMPS)/native $(STAMPS)/testhooks $(STAMPS)/proto $(STAMPS)/bytecode guest
	$(PY) -m pytest tests -ra
	VMMD_TEST_ISOLATION=none $(PY) -m pytest -ra $(CORE_DAEMON_TESTS)

# ruff (style and likely bugs), import-linter (the layering contract in
# pyproject.toml: api -> manager -> cells -> vm -> native binding, leaves import no
# layer), mypy (the typed layers).  CI runs it before the tests.
lint: deps $(STAMPS)/native $(STAMPS)/proto
	$(VENV)/bin/ruff check vmmd tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: deps $(STAMPS)/native $(STAMPS)/proto $(STAMPS)/bytecode guest $(STAMPS)/bench-deps
	$(PY) -m bench

# Coverage-guided fuzzing of the C device code (tests/fuzz/README.md): each
# harness in turn for FUZZ_SECONDS; fuzz-smoke is CI's short run (~20 s each),
# failing on any crash.  Both need only clang, not the venv or a guest.
FUZZ_SECONDS ?= 300
fuzz: deps $(STAMPS)/native $(STAMPS)/proto $(STAMPS)/fuzz-deps
	$(PYTHON) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)
	VMMD_FUZZ=1 $(PY) -m pytest tests/api/test_properties.py -q -p no:cacheprovider

fuzz-smoke: $(STAMPS)/fuzz-deps
	$(PYTHON) tests/fuzz/run.py --smoke

# ---- installation ------------------------------------------------------------
deps: $(STAMPS)/deps

$(STAMPS)/deps: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done; \
		command -v node >/dev/null && command -v npm >/dev/null || echo $(NODE_PACKAGES)); \
	if [ -n "$$missing" ]; then \
		echo "== installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@touch $@

$(STAMPS)/bench-deps:
	@mkdir -p $(STAMPS)
	@dpkg-query -W -f='$${Status}\n' $(BENCH_PACKAGES) 2>/dev/null | grep -q "install ok installed" || \
		{ export DEBIAN_FRONTEND=noninteractive; apt-get update -q && \
		  apt-get install -y -q --no-install-recommends $(BENCH_PACKAGES); }
	@touch $@

# clang with libFuzzer and the sanitizer runtimes (Debian's clang 14).
FUZZ_PACKAGES := clang libclang-rt-14-dev
$(STAMPS)/fuzz-deps:
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(FUZZ_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "== installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@touch $@

# editable_mode=compat: the repository on sys.path through a plain .pth line.
# The default mode installs an import hook whose own imports (pathlib, re,
# urllib...) every Python start pays, ~10 ms of `vmmd run`.  setuptools calls
# compat transitional: pyproject.toml keeps setuptools below the release that
# would drop it.
$(STAMPS)/venv: pyproject.toml setup.py $(STAMPS)/deps
	@mkdir -p $(STAMPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@touch $@

# The C core is compiled at install (pip install above); this rebuilds it in
# place when a C file changes, without reinstalling.
native: $(STAMPS)/native
$(STAMPS)/native: $(STAMPS)/venv $(NATIVE_SRC)
	$(PY) setup.py -q build_ext --inplace
	@$(PY) -c "import vmmd.native" && touch $@

# The cell tests' escape attempts (native/testhooks/): a module of their own,
# built for `make test` only, never by `make run` or pip install.
testhooks: $(STAMPS)/testhooks
$(STAMPS)/testhooks: $(STAMPS)/venv $(wildcard native/testhooks/*)
	$(PY) native/testhooks/build.py
	@touch $@

# gRPC code generated from proto/ into vmmd/_proto/ (not committed).
proto: $(STAMPS)/proto
$(STAMPS)/proto: $(STAMPS)/venv $(PROTO_SRC)
	$(PY) proto/generate.py
	@touch $@

# vmmd's modules compiled to bytecode now, as pip does for an installed
# package: an editable install leaves that to the first import, which skips
# the write where PYTHONDONTWRITEBYTECODE is set (and then compiles every
# module at every start: ~130 ms of `vmmd run`).
$(STAMPS)/bytecode: $(STAMPS)/proto $(shell find vmmd -name '*.py' -not -path '*/_proto/*')
	@$(PY) -m compileall -q vmmd >/dev/null
	@touch $@

# ---- guest kernel and images -------------------------------------------------
guest: $(GUEST)/vmlinux $(GUEST)/initramfs.cpio.gz

$(GUEST)/vmlinux: $(KERNEL_INPUTS) $(STAMPS)/deps
	guest-kernels/build-kernel.sh $(GUEST)
	@touch $@

$(GUEST)/initramfs.cpio.gz: $(IMAGE_INPUTS) $(STAMPS)/deps
	$(PYTHON) guest-kernels/mkimages.py $(GUEST)
	@touch $@

clean:
	rm -rf build vmmd/native/_core.* vmmd/native/_testhooks.* vmmd/_proto .pytest_cache

distclean: clean
	rm -rf $(VENV)

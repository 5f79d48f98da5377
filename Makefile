# usvm: `make run` and `make test` work on a fresh Debian 12 machine; they
# install what is missing with apt-get (as root, or through sudo).
SHELL := /bin/bash
PKGS := cmake ninja-build g++ clang libgtest-dev libgmock-dev libbenchmark-dev libfmt-dev \
        libyaml-cpp-dev libcli11-dev nlohmann-json3-dev
# Only the tests need these (the HTML report is checked in headless Chromium).
TEST_PKGS := chromium
CTEST_JOBS ?= 2
BENCH_OUT := build/bench

.PHONY: all deps test-deps build run test test-release test-tsan check-tsa asan bench fuzz clean

all: build

# Installs the missing packages of $(1).
define install_missing
	@missing=""; \
	for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing missing packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" -ne 0 ] && sudo=sudo; \
	  $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing; \
	fi
endef

deps:
	$(call install_missing,$(PKGS))

test-deps: deps
	$(call install_missing,$(TEST_PKGS))

build: deps
	@cmake --preset release >/dev/null
	cmake --build build/release

# The main job: the built-in default scenario (two GPUs, VRAM oversubscribed
# 2x, CPU and GPUs sharing buffers, a prefetch, atomics, a fork and a munmap
# in the middle), every byte checked, and its summary. Only the tool is
# built. `usvm run --help` for scenario files, --compare, --json, --trace.
run: deps
	@cmake --preset release >/dev/null
	cmake --build build/release --target usvm
	./build/release/tools/usvm/usvm run

# Every test (optimised build, assertions on), then every test again under
# AddressSanitizer + UndefinedBehaviorSanitizer (use-after-free is the class
# of bug lifetime rules produce), then the concurrency tests under
# ThreadSanitizer, then clang's thread-safety analysis of the libraries.
test: test-release asan test-tsan check-tsa

test-release: test-deps
	@cmake --preset release >/dev/null
	cmake --build build/release
	cd build/release && ctest --output-on-failure -j$(CTEST_JOBS)

test-tsan: deps
	@cmake --preset tsan >/dev/null
	cmake --build build/tsan
	cd build/tsan && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
	  ctest --output-on-failure -j$(CTEST_JOBS) -L concurrency

check-tsa: deps
	@cmake --preset tsa >/dev/null
	cmake --build build/tsa

asan: test-deps
	@cmake --preset asan >/dev/null
	cmake --build build/asan
	cd build/asan && ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" \
	  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
	  ctest --output-on-failure -j$(CTEST_JOBS)

# Google Benchmark programs; JSON results under build/bench/.
bench: build
	@mkdir -p $(BENCH_OUT)
	@for b in build/release/bench/*_bench; do \
	  n=$$(basename $$b); echo "== $$n"; \
	  $$b --benchmark_out=$(BENCH_OUT)/$$n.json --benchmark_out_format=json || exit 1; \
	done

# The long fuzz budget (docs/fuzz.md): 10^6 single-threaded ops, then
# concurrent and injected-failure runs. FUZZ_SEED / FUZZ_OPS override.
FUZZ_SEED ?= 1
FUZZ_OPS ?= 1000000
fuzz: deps
	@cmake --preset release >/dev/null
	cmake --build build/release --target usvm
	./build/release/tools/usvm/usvm fuzz --seed $(FUZZ_SEED) --ops $(FUZZ_OPS) --check-every 1000
	./build/release/tools/usvm/usvm fuzz --seed $(FUZZ_SEED) --ops $$(( $(FUZZ_OPS) / 10 )) --threads 2
	./build/release/tools/usvm/usvm fuzz --seed $(FUZZ_SEED) --ops $$(( $(FUZZ_OPS) / 10 )) --inject 0.01
	./build/release/tools/usvm/usvm fuzz --seed $(FUZZ_SEED) --ops $$(( $(FUZZ_OPS) / 20 )) --threads 2 --racer

clean:
	rm -rf build

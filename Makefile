# Developer shortcuts. The README's two commands are the supported entry points.
PY ?= python3

.PHONY: dev test lint
# Build the extension in release mode and drop it next to the Python sources (the package
# is installed editable once with `pip install -e . --no-build-isolation`).
dev:
	PYO3_BUILD_EXTENSION_MODULE=1 cargo build --release --lib
	cp target/release/lib_core.so python/zeroload/_core.abi3.so

test: dev
	cargo test --no-default-features
	$(PY) -m pytest -q

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --no-default-features -- -D warnings
	ruff check python tests benchmarks
	ruff format --check python tests benchmarks

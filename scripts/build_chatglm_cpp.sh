#!/usr/bin/env bash
# Build and install chatglm-cpp 0.4.2 from its PyPI sdist with aigate's patches, in order:
#   patches/chatglm-cpp-0.4.2-aigate.patch: the model step runs without the GIL, tokens after a cached prefix are
#     evaluated in one step with a causal mask, and next_token_logits hands the logits to Python (which samples
#     them: grammar masks, logprobs, seeds, logit_bias, penalties);
#   patches/chatglm-cpp-0.4.2-batch.patch: batched steps (model.step) over KV caches for several sequences;
#   patches/chatglm-cpp-0.4.2-ggml.patch: chatglm.cpp on a current ggml, which this script puts in place of the
#     sdist's 2024 one: llama.cpp's, as vendored in the llama-cpp-python 0.3.36 sdist (pinned by its sha256). Its
#     CPU kernels (q4_0 weights repacked at load for AVX2/AVX-512 GEMV/GEMM, llamafile's tiled GEMM for prompts,
#     OpenMP threads) are what make a quantized model decode at the machine's memory bandwidth; the patch also
#     aligns the CPU backend's scratch buffer to a cache line (its kernels' 64-byte loads split in two otherwise)
#     and, on CPUs with AVX512-VNNI, computes the repacked q4_0 matrices with its own GEMV and 4-row GEMM (the
#     nibbles fed to vpdpbusd unsigned: about half the instructions of ggml's sign-extending kernels); a model
#     loads without holding the GIL (the engine's other models keep streaming meanwhile); and decode attends over
#     the KV cache padded to a multiple of 16 positions, where ggml's tiled GEMM takes the attention products.
# It installs as 0.4.2+aigate.9, which still satisfies requirements.txt's chatglm-cpp==0.4.2; a stock install
# works too, with less, and slower.
#   scripts/build_chatglm_cpp.sh PATH/TO/VENV/bin/pip
# CMAKE_BUILD_PARALLEL_LEVEL sets the compile jobs (default: one per core); CMAKE_ARGS passes options on to CMake.
set -euo pipefail
pip=$1
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# CMake 4 (what the isolated build fetches) rejects the sdist's bundled cmake_minimum_required.
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_POLICY_VERSION_MINIMUM=3.5}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
# --no-binary for these packages only: for all, pip would build its build tools (cmake) from source too
"$pip" download --quiet --no-deps --no-binary chatglm-cpp chatglm-cpp==0.4.2 -d "$work"
printf 'llama-cpp-python==0.3.36 --hash=sha256:%s\n' \
  832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e > "$work/ggml-source.txt"
"$pip" download --quiet --no-deps --no-binary llama-cpp-python --require-hashes -r "$work/ggml-source.txt" -d "$work"
src="$work/chatglm_cpp-0.4.2"
tar -xzf "$work"/chatglm_cpp-0.4.2.tar.gz -C "$work"
rm -rf "$src/third_party/ggml"
tar -xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work" \
  llama_cpp_python-0.3.36/vendor/llama.cpp/ggml llama_cpp_python-0.3.36/vendor/llama.cpp/LICENSE
mv "$work/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml" "$src/third_party/ggml"
mv "$work/llama_cpp_python-0.3.36/vendor/llama.cpp/LICENSE" "$src/third_party/ggml/LICENSE"
for p in aigate batch ggml; do
  patch --quiet -p1 -d "$src" < "$here/patches/chatglm-cpp-0.4.2-$p.patch"
done
"$pip" install --quiet --no-deps "$src"

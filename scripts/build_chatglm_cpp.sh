#!/usr/bin/env bash
# Build and install chatglm-cpp 0.4.2 from its PyPI sdist with aigate's patch
# (patches/chatglm-cpp-0.4.2-aigate.patch): the model step runs without the GIL, tokens after a
# cached prefix are evaluated in one step with a causal mask, and next_token_logits hands the logits to
# Python (which samples them: grammar masks, logprobs, seeds, logit_bias, penalties); then
# patches/chatglm-cpp-0.4.2-batch.patch: one Pipeline holds a KV cache per slot and model.step evaluates every
# running sequence's next tokens in one forward pass (the weights read once a step). It installs as
# 0.4.2+aigate.3, which still satisfies requirements.txt's chatglm-cpp==0.4.2; a stock install works too,
# with less.
#   scripts/build_chatglm_cpp.sh PATH/TO/VENV/bin/pip
set -euo pipefail
pip=$1
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# CMake 4 (what the isolated build fetches) rejects the sdist's bundled cmake_minimum_required.
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_POLICY_VERSION_MINIMUM=3.5}"
# --no-binary for this package only: for all, pip would build its build tools (cmake) from source too
"$pip" download --quiet --no-deps --no-binary chatglm-cpp chatglm-cpp==0.4.2 -d "$work"
tar -xzf "$work"/chatglm_cpp-0.4.2.tar.gz -C "$work"
for fix in aigate batch; do  # in this order: the batched step builds on the first patch's changes
  patch --quiet -p1 -d "$work/chatglm_cpp-0.4.2" < "$here/patches/chatglm-cpp-0.4.2-$fix.patch"
done
# its setup.py runs `make -j` without a bound: ~50 compilers at once on a small machine
sed -i 's/build_args += \[f"-j"\]/build_args += [f"-j{os.cpu_count() or 1}"]/' "$work/chatglm_cpp-0.4.2/setup.py"
"$pip" install --quiet --no-deps "$work/chatglm_cpp-0.4.2"

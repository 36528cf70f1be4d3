#!/usr/bin/env bash
# Fill ./.whl with the wheels the GPU machine lacks, for Python 3.12 on manylinux x86_64.
# Run from the repository root on a machine that reaches PyPI:
#
#     bash scripts/prepare_wheels.sh            # extra package specs may follow as arguments
#
# The GPU machine (Python 3.12, torch, torchvision, tensorboard, numpy, tqdm, pytest; no registry)
# lacks hydra-core, omegaconf, antlr4 and pycocotools, and for the export tests onnx, onnxruntime
# and their ml_dtypes and flatbuffers (protobuf is pinned too: onnx needs a recent one). .whl is in
# .gitignore, so the device run must carry it (carry: [".whl"]); there each command begins
#
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# (the same as ../shared/gpu/prepare-wheels.sh, which cannot write .git/info/exclude in a git worktree,
# where .git is a file; versions are the ones the test suite passes with here).
#
# faster-coco-eval (0.6 MB, needs only numpy) is there for the optional eval.backend; matplotlib (plots, optional:
# without it they are skipped with a hint) is left out: with its dependencies it would crowd the 64 MiB carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl 'hydra-core==1.3.*' 'omegaconf==2.3.*' 'pycocotools>=2.0.8' \
  'onnx==1.23.2' 'onnxruntime==1.32.0' 'protobuf==7.36.2' 'ml_dtypes==0.6.0' 'flatbuffers==25.12.19' \
  'faster-coco-eval==1.8.*' "$@"
# antlr4 4.9.3 (what hydra 1.3 needs) exists only as a source archive: build its pure-Python wheel here.
python3 -m pip wheel -q --no-deps -w .whl 'antlr4-python3-runtime==4.9.3'
du -sh .whl && ls -1 .whl

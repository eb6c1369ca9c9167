#!/usr/bin/env bash
# Installs what gmpq builds against, once: a virtualenv (.venv) holding the PyPI wheels
# torch==2.13.0, whose libtorch tch 0.26 links to, and onnxruntime==1.31.0, whose
# libonnxruntime.so the `ort` crate loads at run time (`gmpq eval --onnx`, `gmpq bench
# infer`), and the exporters `gmpq import --onnx` is tested against: torchvision==0.28.0 (the
# release built for torch 2.13) and onnxscript==0.7.2 (torch.onnx.export's default dynamo
# exporter needs it), which scripts/onnx_zoo.py runs. Idempotent: a second run does nothing.
# Override the location with GMPQ_VENV, the interpreter with GMPQ_PYTHON.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GMPQ_VENV:-$root/.venv}"
torch_version="2.13.0"
ort_version="1.31.0"
torchvision_version="0.28.0"
onnxscript_version="0.7.2"

have_torch() {
  compgen -G "$venv/lib/python3*/site-packages/torch-${torch_version}.dist-info" >/dev/null
}
have_ort() {
  compgen -G "$venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.${ort_version}" >/dev/null
}

have_zoo() {
  compgen -G "$venv/lib/python3*/site-packages/torchvision-${torchvision_version}.dist-info" >/dev/null &&
    compgen -G "$venv/lib/python3*/site-packages/onnxscript-${onnxscript_version}.dist-info" >/dev/null
}

if have_torch && have_ort && have_zoo; then
  exit 0
fi

python="${GMPQ_PYTHON:-}"
if [ -z "$python" ]; then
  # Run each candidate: a pyenv shim can exist for a version that is not selected.
  for candidate in python3 python3.12 python3.11 python3.10; do
    if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
      python="$candidate"; break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "gmpq setup: no working Python 3.10+ with venv found; install one (e.g. apt-get install python3 python3-venv) or set GMPQ_PYTHON" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "gmpq setup: creating virtualenv $venv with $($python --version 2>&1)" >&2
  if ! "$python" -m venv "$venv"; then
    echo "gmpq setup: '$python -m venv' failed; on Debian/Ubuntu install python3-venv" >&2
    exit 1
  fi
fi
if ! have_torch; then
  echo "gmpq setup: installing torch==${torch_version} (libtorch for tch; about 4.5 GB with its CUDA libraries, once)" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "torch==${torch_version}"
  have_torch || { echo "gmpq setup: torch ${torch_version} did not install into $venv" >&2; exit 1; }
fi
if ! have_ort; then
  # Only its shared library is used, so its Python dependencies are not installed.
  echo "gmpq setup: installing onnxruntime==${ort_version} (libonnxruntime.so for ONNX inference)" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps "onnxruntime==${ort_version}"
  have_ort || { echo "gmpq setup: onnxruntime ${ort_version} did not install into $venv" >&2; exit 1; }
fi
if ! have_zoo; then
  # --no-deps for torchvision: its torch requirement is met, and pip must not replace it.
  echo "gmpq setup: installing torchvision==${torchvision_version} and onnxscript==${onnxscript_version} (to export CNNs to ONNX for gmpq import)" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps "torchvision==${torchvision_version}"
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    "onnxscript==${onnxscript_version}" "onnx==1.23.2" "numpy==2.4.6" "pillow==13.0.0"
  have_zoo || { echo "gmpq setup: torchvision/onnxscript did not install into $venv" >&2; exit 1; }
fi
# The NCCL process group (`cargo build --features nccl`, docs/SCALE.md) compiles against the CUDA
# headers the torch wheel leaves out: the compiler-runtime and CCCL headers of torch's CUDA 13.0.
if [ "${GMPQ_NCCL:-0}" = 1 ] && ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/include/crt/host_config.h >/dev/null 2>&1; then
  echo "gmpq setup: installing the CUDA 13.0 headers for the nccl feature" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps \
    "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85"
fi
echo "gmpq setup: done" >&2

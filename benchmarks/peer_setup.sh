#!/usr/bin/env bash
# Create /work/main/.venv-peer: an isolated venv with vllm-project/llm-compressor
# (GPTQ peer baseline).  Does NOT touch the main .venv.
#
#   bash benchmarks/peer_setup.sh          # create/update .venv-peer
#   .venv-peer/bin/python benchmarks/peer_llmcompressor.py --help
#
# torch is installed FIRST and pinned via a constraints file during the second
# install, so pip takes the local CPU wheel and never pulls a CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEER_VENV:-$ROOT/.venv-peer}"
PY="${PEER_PYTHON:-python3.11}"

TORCH_VERSION=2.13.0
LLMCOMPRESSOR_VERSION=0.14.0.1       # requires torch>=2.10,<=2.14.0; transformers>=5.15,<=5.17
TRANSFORMERS_VERSION=5.17.0
COMPRESSED_TENSORS_VERSION=0.19.0   # llmcompressor 0.14.0.1 pins compressed-tensors==0.19.0

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

# 1) torch first (CPU wheel from local disk)
$PIP install "torch==${TORCH_VERSION}"

# 2) everything else, torch held at TORCH_VERSION by a constraints file
CONS="$(mktemp)"
trap 'rm -f "$CONS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONS"
# Full transitive lock as resolved on 2 vCPU / CPU-only, py3.11 (pip freeze of a
# working .venv-peer).  Set PEER_NO_LOCK=1 to resolve only the top-level pins.
if [ "${PEER_NO_LOCK:-0}" != "1" ]; then
  cat >> "$CONS" <<'LOCK'
accelerate==1.15.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
auto-round==0.15.1
certifi==2026.10.18
charset-normalizer==3.5.2
click==8.5.1
datasets==5.2.0
dill==0.4.1
filelock==4.2.11
fsspec==2026.9.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpx==0.28.1
huggingface_hub==1.33.0
idna==3.20
Jinja2==3.1.6
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
mpmath==1.3.0
multiprocess==0.70.19
networkx==3.6.1
numpy==2.4.6
nvidia-ml-py==13.615.71
packaging==26.3
pandas==3.1.1
pillow==13.0.0
psutil==7.2.2
py-cpuinfo==9.0.0
pyarrow==26.0.1
pydantic==2.14.3
pydantic_core==2.50.4
Pygments==2.21.0
python-dateutil==4.0.0
PyYAML==6.0.3
regex==2026.11.15
requests==2.34.2
rich==15.0.0
safetensors==0.8.0
shellingham==1.5.4
sympy==1.14.0
tokenizers==0.23.3
tqdm==4.70.1
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
xxhash==4.1.0
LOCK
fi
$PIP install -c "$CONS" \
  "llmcompressor==${LLMCOMPRESSOR_VERSION}" \
  "transformers==${TRANSFORMERS_VERSION}" \
  "compressed-tensors==${COMPRESSED_TENSORS_VERSION}"

$VENV/bin/python - <<'PY'
import importlib.metadata as md
for p in ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "datasets", "auto-round"):
    print(f"{p}=={md.version(p)}")
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
echo "peer venv ready: $VENV"

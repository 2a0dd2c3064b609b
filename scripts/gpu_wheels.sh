#!/usr/bin/env bash
# Download the wheels `make gpu-check` needs on a bare CUDA machine (Python 3.12,
# manylinux x86_64, PyTorch already there, no network), into .whl/ (git-ignored).
#
# Run it on a machine WITH network access, from the repository root:
#   bash scripts/gpu_wheels.sh                 # versions from .venv312 (CI's leg 2)
#   VERSIONS_FROM=path/to/venv bash scripts/gpu_wheels.sh
# Then carry .whl/ with the checkout; `make gpu-check` installs it into /tmp/gpu-site
# with --no-index --no-deps and runs the check. Checkout + wheels stay under 60 MiB
# (the script prints the total).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VERSIONS_FROM:-.venv312}"
# What the check imports beyond torch: transformers and PEFT with their own needs,
# pydantic + PyYAML for the templates, Jinja2 for chat templates.
PACKAGES=(
  transformers peft accelerate safetensors tokenizers huggingface-hub hf-xet
  pydantic pydantic-core annotated-types typing-inspection typing-extensions
  pyyaml numpy regex tqdm packaging filelock fsspec psutil
  httpx httpcore h11 anyio idna certifi jinja2 markupsafe shellingham typer-slim
  typer click
)
if [ ! -x "$VENV/bin/pip" ]; then
  echo "no $VENV: run 'make install PY=python3.12 VENV=.venv312 CONSTRAINTS=constraints/py312-axolotl021.txt' first, or set VERSIONS_FROM" >&2
  exit 2
fi
FREEZE="$("$VENV/bin/pip" freeze 2>/dev/null | tr 'A-Z_' 'a-z-')"
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
  pin="$(grep -E "^${name}==" <<<"$FREEZE" || true)"
  if [ -z "$pin" ]; then
    echo "skip $name (not in $VENV)"
    continue
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$pin"
done
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
echo "wheels: $(du -sh .whl | cut -f1); checkout without .git/.venv*: $(du -sh --exclude=.git --exclude='.venv*' --exclude=.whl --exclude=outputs --exclude=.cache . | cut -f1)"

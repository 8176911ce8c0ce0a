#!/usr/bin/env bash
# Prints the model of this machine's first GPU in short, lower case (h200, h100, gh200, a100), or "gpu"
# where nvidia-smi is missing: the device scripts name their reports after the chip that ran them.
name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)"
tag="$(grep -o -i -E '[a-z]*[0-9]{2,4}' <<<"$name" | head -1 | tr 'A-Z' 'a-z' || true)"
echo "${tag:-gpu}"

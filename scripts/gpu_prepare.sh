#!/usr/bin/env bash
# Prepare what the GPU machine of this workplace needs to run the embedded model (docs/gpu.md, "Running on
# the device machine"): py3.12 wheels of the packages its image lacks (plus this venv's transformers, peft and
# huggingface_hub, so tokenization and training match this machine), and the embedded GGUF cut into pieces
# that each fit one call beside the tracked files (64 MiB a call), in git-ignored folders .g0/ .g1/ ...
# .g0 holds the wheels but wandb, .g1 wandb; every folder holds a `part` of the GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.g*/' "$exclude" 2>/dev/null || echo '/.g*/' >> "$exclude"
names="PySocks annotated-types better-abc concept-erasure datasets dill docstring_parser evaluate
googleapis-common-protos httpcore2 httpx2 multiprocess opentelemetry-api opentelemetry-exporter-http-transport
opentelemetry-exporter-otlp-common opentelemetry-exporter-otlp-proto-common
opentelemetry-exporter-otlp-proto-http opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
outcome platformdirs pydantic pydantic_core sae-lens simple-parsing sniffio transformer-lens trio truststore
typing-inspection wandb gguf transformers huggingface_hub peft"
specs=$(for n in $names; do echo "$n==$("$python" -m pip show "$n" | awk '/^Version:/{print $2}')"; done)
wheels=$(mktemp -d)
# shellcheck disable=SC2086  # one argument per requirement
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" $specs
rm -rf .g[0-9]*
mkdir -p .g0 .g1
for w in "$wheels"/*.whl; do case $w in *wandb*) mv "$w" .g1/ ;; *) mv "$w" .g0/ ;; esac; done
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
room=$((64 * 1024 * 1024 - tracked - 2000000))  # what a call can carry beside the tracked files, with a margin
gguf=$("$python" -c "from hf_concept_ablation.loading import embedded_gguf_path; print(embedded_gguf_path())")
"$python" - "$gguf" "$room" "$(du -cb .g0 | tail -1 | cut -f1)" "$(du -cb .g1 | tail -1 | cut -f1)" <<'PY'
import math, os, sys
gguf, room, used0, used1 = sys.argv[1], *map(int, sys.argv[2:])
data = open(gguf, "rb").read()
sizes = [room - used0, room - used1]
rest = len(data) - sum(sizes)
sizes += [math.ceil(rest / math.ceil(rest / room))] * math.ceil(rest / room)
offset = 0
for i, size in enumerate(sizes):
    os.makedirs(f".g{i}", exist_ok=True)
    with open(f".g{i}/part", "wb") as f:
        f.write(data[offset:offset + size])
    offset += size
print(f"{len(sizes)} folders .g0 ... .g{len(sizes) - 1}; the GGUF's sha256 must be checked on the machine")
PY
rm -rf "$wheels"

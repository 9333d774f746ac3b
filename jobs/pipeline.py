"""Ray job entrypoint for `mmctr pipeline`: validate → [embed] → fuse → features → train → predict → report.

    ray job submit --working-dir . -- python jobs/pipeline.py --out s3://bucket/mmctr/p1 --work /mnt/shared/work/p1 \\
        --data /mnt/shared/DATA --config configs/paper.yaml --workers 4 --gpus-per-worker 1

Without --data the data is synthesized first (size flags as `mmctr synth`). See jobs/specs/pipeline.yaml.
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))

"""Ray job entrypoint for the main job (`mmctr demo`): synthetic data through every stage that exists.

    ray job submit --working-dir . -- python jobs/demo.py --out /mnt/shared/demo --config configs/tiny.yaml
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))

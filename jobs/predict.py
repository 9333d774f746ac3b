"""Ray job entrypoint for `mmctr predict`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/predict.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))

"""Ray job entrypoint for `mmctr train`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/train.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

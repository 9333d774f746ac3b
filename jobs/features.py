"""Ray job entrypoint for `mmctr features`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/features.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))

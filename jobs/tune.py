"""Ray job entrypoint for `mmctr tune`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/tune.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))

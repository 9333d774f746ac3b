"""Ray job entrypoint for `mmctr convert`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/convert.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

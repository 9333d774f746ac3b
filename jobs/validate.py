"""Ray job entrypoint for `mmctr validate`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/validate.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))

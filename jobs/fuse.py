"""Ray job entrypoint for `mmctr fuse`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/fuse.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["fuse", *sys.argv[1:]]))

"""Ray job entrypoint for `mmctr embed`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/embed.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))

"""Ray job entrypoint for `mmctr synth`; arguments are those of the CLI.

    ray job submit --working-dir . -- python jobs/synth.py --help
"""

import sys

from mmctr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))

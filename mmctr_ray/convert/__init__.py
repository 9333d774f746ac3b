"""``mmctr convert``: raw MicroLens files → the challenge layout (see :mod:`mmctr_ray.convert.pipeline`)."""

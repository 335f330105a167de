"""The ``--ray`` options of ``trainer.predict`` (kept apart so that Ray is imported only when a
run asks for it; the run itself is :mod:`trainer.ray_predict`)."""

from __future__ import annotations

import argparse

# Scenes larger than this many pixels a side are cut into blocks: at 512-pixel tiles a block
# spans 18 tiles a side, so the straddling tiles it shares with its neighbours cost about 11%.
DEFAULT_BLOCK_SIZE = 8192


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray``, ``--ray-actors`` and ``--block-size`` to ``parser``."""
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run on a Ray cluster: auto (the cluster of this machine, see `ray start`), local "
        "(a cluster of this machine, started for the run) or HOST:PORT; needs the [ray] extra",
    )
    parser.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        help="with --ray: model replicas (default: one per GPU, else one per --threads CPUs, "
        "keeping one CPU for reading and writing)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help="with --ray: GDAL rasters larger than this many pixels a side are cut into blocks",
    )

"""Optional dependencies, imported only where they are used. Each is an extra of the package:

    plots        matplotlib   the benchmarks' PNG figures (`fusion.bench`)
    tensorboard  tensorboard  Lightning's TensorBoardLogger (`configs/real_models.yaml`)
    merge        mergekit     full-model weight merging (`fusion.merging.merge_models`)
    ray          ray[data]    the offline cache built on Ray (`fusion.cache_ray`)

`pip install 'fusion[dev]'` (what `make setup` installs) includes all of them. When one is missing, the
code that needs it raises an ImportError naming the extra to install.
"""

from __future__ import annotations

import importlib.util


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the benchmark plots need matplotlib, which is not installed: pip install 'fusion[plots]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_tensorboard(key: str) -> None:
    """Lightning's TensorBoardLogger writes with tensorboard (or tensorboardX); `key` names the setting that asks for it."""
    if not any(_installed(name) for name in ("tensorboard", "tensorboardX")):
        raise ImportError(
            f"{key}: TensorBoardLogger needs tensorboard, which is not installed: pip install 'fusion[tensorboard]' "
            "(or log with lightning.pytorch.loggers.CSVLogger)"
        )


def mergekit_api():
    """mergekit's Python API: (MergeConfiguration, MergeOptions, run_merge)."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError as error:
        raise ImportError("full-model merging needs mergekit, which is not installed: pip install 'fusion[merge]'") from error
    return MergeConfiguration, MergeOptions, run_merge


def ray_data():
    """`ray` with Ray Data loaded (`fusion.cache_ray`)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "building the offline cache on Ray (python -m fusion.cache_ray) needs ray[data], which is not installed: "
            "pip install 'fusion[ray]' (from a clone: pip install -e '.[ray]')"
        ) from error
    return ray


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules without a spec
        return False

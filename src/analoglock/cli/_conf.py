"""Where the Hydra configs live, for every entry point, and the resolvers they use.

The configs ship inside the package (``analoglock/conf``), so a plain ``pip install .`` finds them.
"""

from pathlib import Path

from omegaconf import OmegaConf

CONF_MODULE = "analoglock.conf"  # for hydra.initialize_config_module
CONF_PATH = f"pkg://{CONF_MODULE}"  # for @hydra.main(config_path=...)
# A filesystem path, for hydra.initialize_config_dir in tests and scripts.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _stem(name: object) -> str:
    """`${stem:${data.name}}`: a dataset name, or a file's stem, as one folder name."""
    return Path(str(name)).stem


# Registered on import, so every entry point (they all import this module) and every test that
# composes a config resolves `${stem:...}`; an absolute data.name=/tmp/x/my.txt names runs/harvest/my-all.
OmegaConf.register_new_resolver("stem", _stem, replace=True)


def _map_name(target: object, basis: object = None) -> str:
    """`${map_name:${mapper._target_},${basis}}`: analoglock.lock.maps.LowRankMap.build -> lowrank.

    With a basis, its folder's name follows (sparsefeature-sae-l12): runs in two bases are two runs.
    """
    parts = str(target).split(".")
    cls = parts[-2] if parts[-1] == "build" else parts[-1]
    name = cls.removesuffix("Map").lower()
    return name if basis is None else f"{name}-{Path(str(basis)).name}"


# Resolves inside and outside a Hydra app (tests compose configs without one), unlike ${hydra:...}.
OmegaConf.register_new_resolver("map_name", _map_name, replace=True)

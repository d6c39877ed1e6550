"""Every entry config composes, with its defaults and with every option of every group it uses.

Configs are composed the way an installed package finds them (`pkg://analoglock.conf`), every
interpolation is resolved (mandatory `???` values filled with a placeholder) and every
`_target_` is imported, so a renamed group option, a stale interpolation or a moved class fails
here rather than in a user's shell. No model is loaded.
"""

from __future__ import annotations

import copy
import importlib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra._internal.utils import _locate
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from analoglock.cli._conf import CONF_DIR, CONF_MODULE

# config name -> console script; the entry points each load one of these.
ENTRY_CONFIGS = {
    "harvest": "analoglock-harvest",
    "corpus": "analoglock-corpus",
    "train": "analoglock-train",
    "steer": "analoglock-steer",
    "fit_basis": "analoglock-fit-basis",
    "compare_bases": "analoglock-compare-bases",
    "dashboard": "analoglock-dashboard",
    "patch": "analoglock-patch",
    "trace": "analoglock-trace",
    "relations": "analoglock-relations",
    "export_vector": "analoglock-export-vector",
}
PLACEHOLDER = "placeholder"  # stands in for a mandatory (???) value such as basis= or acts=


def entry_scripts() -> dict[str, str]:
    """Console script -> "module:function" for every installed analoglock command."""
    return {
        ep.name: ep.value
        for ep in entry_points(group="console_scripts")
        if ep.name.startswith("analoglock-")
    }


# Import every entry module, as running the command does: some register structured configs
# (Hydra's ConfigStore) that their yaml's defaults name.
for _target in entry_scripts().values():
    importlib.import_module(_target.split(":")[0])


def compose_resolved(
    config_name: str, overrides: list[str] = (), fill_missing: bool = True
) -> DictConfig:
    """Compose like the entry point does, fill mandatory values, resolve every interpolation.

    The job's config comes back resolved, without its `hydra` node (whose sweep keys exist only
    in a multirun); `HydraConfig.get()` holds that, as under `@hydra.main`. With
    `fill_missing=False`, a mandatory value left unset fails instead of being filled.
    """
    full = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(full)  # ${hydra:...} resolves as under @hydra.main
    cfg = copy.deepcopy(full)  # as Hydra's run_job does: the job sees its config without `hydra`
    with open_dict(cfg):
        del cfg["hydra"]
        unset = missing_paths(cfg)
        if unset and not fill_missing:
            raise AssertionError(f"{config_name} {overrides}: mandatory values unset: {unset}")
        for path in unset:
            OmegaConf.update(cfg, path, PLACEHOLDER)
    OmegaConf.resolve(cfg)
    return cfg


def missing_paths(node, prefix: str = "") -> list[str]:
    """Dotted paths of every `???` in a config tree (found without resolving anything)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    found = []
    for key in keys:
        child, path = node._get_node(key), f"{prefix}{key}"
        if child._is_missing():
            found.append(path)
        elif isinstance(child, (DictConfig, ListConfig)):
            found += missing_paths(child, f"{path}.")
    return found


def targets(node) -> list[str]:
    """Every `_target_` in a config tree."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append(str(node._target_))
        for key in node:
            found += targets(node[key])
    elif isinstance(node, ListConfig):
        for item in node:
            found += targets(item)
    return found


def group_cases() -> list[tuple[str, str, str]]:
    """(config, group, option) for every option of every non-Hydra group each entry config uses."""
    cases = []
    with initialize_config_module(CONF_MODULE, version_base=None):
        loader = GlobalHydra.instance().config_loader()
        for name in ENTRY_CONFIGS:
            try:
                choices = compose(name, return_hydra_config=True).hydra.runtime.choices
            except Exception:  # noqa: BLE001 -- reported by test_entry_config_composes_with_its_defaults
                continue
            for group in choices:
                if group == "hydra" or group.startswith("hydra/"):
                    continue  # Hydra's own groups; hydra/default is in every entry config
                for option in loader.get_group_options(group):
                    cases.append((name, group, option))
    return cases


def test_every_config_is_an_entry_point_and_every_entry_point_has_a_config():
    shipped = {p.stem for p in Path(CONF_DIR).glob("*.yaml")}
    assert shipped == set(ENTRY_CONFIGS)
    scripts = entry_scripts()
    assert set(scripts) == set(ENTRY_CONFIGS.values())
    for name, script in ENTRY_CONFIGS.items():
        module = scripts[script].split(":")[0]
        source = Path(_locate(module).__file__).read_text(encoding="utf-8")
        assert f'config_name="{name}"' in source, f"{script} does not load {name}.yaml"


@pytest.mark.parametrize("name", list(ENTRY_CONFIGS))
def test_entry_config_composes_with_its_defaults(name):
    with initialize_config_module(CONF_MODULE, version_base=None):
        cfg = compose_resolved(name)
        hydra_cfg = HydraConfig.get()
        assert hydra_cfg.runtime.choices["hydra"] == "default"  # shared, not a copied block
        assert hydra_cfg.job.chdir is False  # relative paths stay relative to the user's directory
        if name != "train":  # train logs beside its checkpoint
            assert hydra_cfg.run.dir.startswith(f"outputs/{name}/")
        assert hydra_cfg.sweep.dir.startswith(f"multirun/{name}/")
    for target in targets(cfg):
        _locate(target)  # raises when a _target_ names nothing importable


@pytest.mark.parametrize(("name", "group", "option"), group_cases())
def test_entry_config_composes_with_every_group_option(name, group, option):
    with initialize_config_module(CONF_MODULE, version_base=None):
        cfg = compose_resolved(name, [f"{group}={option}"])
        assert HydraConfig.get().runtime.choices[group] == option
    for target in targets(cfg):
        _locate(target)


def test_train_keeps_hydra_logs_out_of_the_run_folder():
    """A failed start must leave nothing in out_dir: Hydra's logs go to outputs/train/<time>."""
    with initialize_config_module(CONF_MODULE, version_base=None):
        compose_resolved("train", ["out_dir=checkpoints/x"])
        assert HydraConfig.get().run.dir.startswith("outputs/train/")


@pytest.mark.parametrize(
    ("overrides", "out_dir"),
    [
        ([], "runs/harvest/fable_work-all"),
        (["data.name=animals", "positions=roles"], "runs/harvest/animals-roles"),
        (["data=file", "data.name=/tmp/some/where/my.txt"], "runs/harvest/my-all"),
        (["data=corpus"], "runs/harvest/corpus-all"),
    ],
)
def test_harvest_out_dir_names_the_dataset_not_its_path(overrides, out_dir):
    with initialize_config_module(CONF_MODULE, version_base=None):
        assert compose_resolved("harvest", overrides).out_dir == out_dir


@pytest.mark.parametrize(
    ("overrides", "out_dir"),
    [
        ([], "checkpoints/fable_work-lowrank-blocks.20.hook_resid_post-seed0"),
        (
            ["mapper=sparse_matrix", "basis=runs/bases/sae-l12/", "hook=blocks.12.hook_resid_post"],
            "checkpoints/fable_work-sparsefeature-sae-l12-blocks.12.hook_resid_post-seed0",
        ),
    ],
)
def test_train_runs_in_two_bases_do_not_share_a_folder(overrides, out_dir):
    with initialize_config_module(CONF_MODULE, version_base=None):
        assert compose_resolved("train", overrides).out_dir == out_dir


def test_relations_runs_do_not_share_a_folder():
    with initialize_config_module(CONF_MODULE, version_base=None):
        out_dir = compose_resolved("relations").out_dir
    assert out_dir.startswith("runs/relations/") and out_dir != "runs/relations/"

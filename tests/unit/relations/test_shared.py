"""What the relations analyses share: their config dataclasses, the harvested-sets rule, the random
directions and p-values of `analoglock.stats`, the residual-depth rules of `analoglock.hooks`, the
size-matched hierarchy control, and the CLI's one list rule."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from analoglock.cli._args import as_list
from analoglock.hooks import block_hook, hook_layer, resid_post_after, residual_depth
from analoglock.relations.config import (
    CONFIGS,
    AlgebraConfig,
    InterpolateConfig,
    ShapeConfig,
    settings,
)
from analoglock.relations.context import harvested_only, split_pair_spec
from analoglock.stats import (
    bh_adjust,
    covariance_directions,
    empirical_p,
    null_directions,
    p_floor,
    random_unit_directions,
)

# ---------------------------------------------------------------- configs


def test_every_analysis_has_a_config_and_a_section_overrides_only_what_it_names():
    from analoglock.relations import ANALYSES

    assert set(CONFIGS) == set(ANALYSES)
    for cls in CONFIGS.values():
        assert settings(None, cls) == cls()  # defaults live in the dataclass only
    c = settings({"n_null": 7}, AlgebraConfig)
    assert c.n_null == 7 and c.n_random == AlgebraConfig().n_random
    assert settings(OmegaConf.create({"top_k": 3}), ShapeConfig).top_k == 3
    assert settings({"paraphrases": False}, InterpolateConfig).paraphrases is False  # "skip"


def test_a_misspelt_or_mistyped_setting_names_the_key():
    with pytest.raises(Exception, match="n_nul"):
        settings({"n_nul": 3}, AlgebraConfig)
    with pytest.raises(Exception, match="n_null"):
        settings({"n_null": "many"}, AlgebraConfig)


def test_relations_yaml_composes_every_section_from_the_dataclasses():
    from hydra import compose, initialize_config_dir

    import analoglock.cli.relations  # noqa: F401  (registers the dataclasses)
    from analoglock.cli._conf import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("relations", overrides=["algebra.n_null=9", "shape.n_random=3"])
    for name, cls in CONFIGS.items():
        assert set(cfg[name]) == set(OmegaConf.structured(cls)), name
    assert cfg.algebra.n_null == 9 and cfg.shape.n_random == 3
    assert settings(cfg.algebra, AlgebraConfig).n_null == 9


# ---------------------------------------------------------------- harvested sets


def test_explicit_requests_for_missing_sets_fail_and_default_ones_are_reported():
    items = [("a:x-y + b:u-v", ("a", "b"), 1), ("a:x-y + c:u-v", ("a", "c"), 2)]
    kept, skipped = harvested_only(items, ["a", "b"], explicit=False, what="composite")
    assert kept == [1] and skipped == ["composite a:x-y + c:u-v: set 'c' not harvested"]
    with pytest.raises(ValueError, match="set 'c' not harvested.*add it to concepts="):
        harvested_only(items, ["a", "b"], explicit=True, what="composite")
    assert split_pair_spec(" gender : male-female", "Relation", "'set:a-b'") == (
        "gender",
        "male",
        "female",
    )
    with pytest.raises(ValueError, match="must look like 'set:a-b'"):
        split_pair_spec("gender", "Relation", "'set:a-b'")


def test_algebra_refuses_an_explicit_composite_whose_set_was_not_harvested():
    from analoglock.relations import RelationsContext
    from analoglock.relations.algebra import run

    ctx = RelationsContext(model=None, hooks=[], concepts={})
    with pytest.raises(ValueError, match="composite gender:male-female \\+ emotion:angry-calm"):
        run({"composites": [["gender:male-female", "emotion:angry-calm"]]}, ctx)
    res = run({}, ctx)  # the defaults: left out and said so, not silently
    assert len(res["composites_skipped"]) == 2 and res["by_hook"] == {}


# ---------------------------------------------------------------- random directions and p-values


def test_random_directions_are_unit_and_covariance_ones_follow_the_data():
    g = torch.Generator().manual_seed(0)
    iso = random_unit_directions(500, 16, g)
    torch.testing.assert_close(iso.norm(dim=-1), torch.ones(500, dtype=torch.float64))
    scale = torch.ones(16, dtype=torch.float64)
    scale[0] = 30.0  # one direction carries almost all the variance
    rows = torch.randn(400, 16, generator=g, dtype=torch.float64) * scale + 5.0
    cov = covariance_directions(rows, 500, g)
    torch.testing.assert_close(cov.norm(dim=-1), torch.ones(500, dtype=torch.float64))
    assert float(cov[:, 0].abs().mean()) > 0.9 > 0.5 > float(iso[:, 0].abs().mean())
    assert null_directions("isotropic", 3, rows, g).shape == (3, 16)
    with pytest.raises(ValueError, match="valid: isotropic, covariance"):
        null_directions("uniform", 3, rows, g)
    same = random_unit_directions(4, 16, torch.Generator().manual_seed(3), torch.float32)
    torch.testing.assert_close(
        same, random_unit_directions(4, 16, torch.Generator().manual_seed(3), torch.float32)
    )


def test_empirical_p_counts_with_the_plus_one_and_works_elementwise():
    null = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert empirical_p(0.25, null) == pytest.approx(3 / 5)
    assert empirical_p(0.25, null, greater=False) == pytest.approx(3 / 5)
    assert empirical_p(9.0, null) == pytest.approx(p_floor(4)) == pytest.approx(1 / 5)
    many = empirical_p(torch.tensor([[0.05, 0.35], [0.4, 1.0]]), null)
    torch.testing.assert_close(
        many, torch.tensor([[5 / 5, 2 / 5], [2 / 5, 1 / 5]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        bh_adjust(torch.tensor([0.01, 0.04, 0.03, 0.5], dtype=torch.float64)),
        torch.tensor([0.04, 0.16 / 3, 0.16 / 3, 0.5], dtype=torch.float64),
    )


# ---------------------------------------------------------------- hooks


def test_residual_depth_and_block_parsing():
    assert block_hook("blocks.12.attn.hook_z") == (12, "attn.hook_z")
    assert block_hook("hook_embed") is None and hook_layer("ln_final.hook_normalized") is None
    assert residual_depth("hook_embed") == residual_depth("blocks.0.hook_resid_pre") == 0
    assert residual_depth("blocks.3.hook_resid_post") == residual_depth("blocks.4.hook_in") == 4
    assert residual_depth("blocks.3.hook_resid_mid") is None
    assert residual_depth("blocks.3.hook_attn_out") is None
    assert resid_post_after("blocks.3.hook_resid_post", 4, 30) == "blocks.7.hook_resid_post"
    assert resid_post_after("blocks.28.hook_mlp_out", 4, 30) == "blocks.29.hook_resid_post"
    with pytest.raises(ValueError, match="not inside a block"):
        resid_post_after("hook_embed", 4, 30)


# ---------------------------------------------------------------- hierarchy control


def test_the_hierarchy_control_edit_has_the_ablations_norm_at_every_token():
    from analoglock.relations.common import svd_basis
    from analoglock.relations.hierarchy import ablate_feature_edit, matched_norm_edit

    g = torch.Generator().manual_seed(4)
    basis = svd_basis(torch.randn(200, 24, generator=g), 6, "h")
    x = torch.randn(6, 5, 24, generator=g)  # 3 documents x 2 control directions
    cmask = torch.zeros(6, 5, dtype=torch.bool)
    cmask[:, 2:4] = True
    doc_idx = torch.arange(6)
    dirs = random_unit_directions(2, 24, g, torch.float32)
    ablated = ablate_feature_edit(basis, 1, 3.0)(x, cmask, doc_idx) - x
    control = matched_norm_edit(basis, 1, 3.0, dirs, n_docs=3)(x, cmask, doc_idx) - x
    torch.testing.assert_close(control.norm(dim=-1), ablated.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert float(ablated.norm(dim=-1)[cmask].min()) > 0.1  # a real edit, matched in size
    assert not control[~cmask].any()  # only concept tokens move
    cos = torch.nn.functional.cosine_similarity(control[4, 2], dirs[1].double().float(), dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-5)  # document 4 is in the second block


# ---------------------------------------------------------------- the CLI's list rule


def test_as_list_says_what_null_means():
    assert as_list(None, none="empty") == [] and as_list(None, none="keep") is None
    assert as_list(OmegaConf.create({"x": [1, [2, 3]]}).x, none="keep") == [1, [2, 3]]
    assert as_list("animals", none="empty") == ["animals"] and as_list((1, 2)) == [1, 2]
    with pytest.raises(ValueError, match="'empty' or 'keep'"):
        as_list(None, none="drop")

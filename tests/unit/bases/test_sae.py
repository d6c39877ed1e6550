"""SAE basis: SAELens SAEs trained by our Lightning loop, on synthetic data with a planted dictionary."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sae_lens import SAE

from analoglock.activation_store import ActivationStore
from analoglock.activations import harvest_to_disk
from analoglock.bases import BASES, SAEBasis, load_basis, match_features
from analoglock.bases.fit import fit_basis_on_store
from analoglock.bases.sae_train import LAST_CKPT, SAETrainConfig, train_sae
from analoglock.data import load_documents
from analoglock.lock.maps.sparse import SparseFeatureMap

D, M, K, N = 48, 24, 3, 6144  # d_model, planted features, active per row, rows
FAST = dict(batch_size=256, lr=1e-2, progress=False, logger="none", dead_feature_window=50)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny passes: threads only add contention


def planted(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows = K positive multiples of M unit directions + an offset + small noise; (x, dictionary)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1)
    idx = torch.rand(n, M, generator=g).argsort(-1)[:, :K]
    codes = torch.zeros(n, M).scatter_(1, idx, torch.rand(n, K, generator=g) + 0.5)
    offset = 2.0 * torch.randn(D, generator=g)  # a shared mean, like the residual stream's
    return codes @ dictionary + offset + 0.01 * torch.randn(n, D, generator=g), dictionary


@pytest.fixture(scope="module")
def trained() -> tuple[SAEBasis, torch.Tensor, torch.Tensor]:
    x, dictionary = planted()
    basis = SAEBasis(M, hook="blocks.1.hook_resid_post", k=K, n_tokens=400 * 256, **FAST)
    return basis.fit(x), x, dictionary


def test_topk_recovers_planted_dictionary(trained):
    basis, x, dictionary = trained
    q = basis.quality(planted(seed=0, n=N)[0][: N // 4])
    assert q["fvu"] < 0.1 and q["l0"] == pytest.approx(K) and q["dead_fraction"] == 0.0
    learned = match_features(basis.directions, dictionary).summary()
    control = match_features(torch.randn(M, D), dictionary).summary()  # random dictionary
    assert learned["mean"] > 0.9 and learned["frac_above_0.9"] > 0.75
    assert control["mean"] < 0.5
    # The activation scale is folded into the weights: rows were scaled to mean norm sqrt(D).
    assert basis.scaling_factor == pytest.approx(
        math.sqrt(D) / float(x.norm(dim=-1).mean()), rel=0.02
    )
    assert basis.train_stats["steps"] == 400 and basis.directions.shape == (M, D)


def test_saelens_loader_and_load_basis_round_trip(trained, tmp_path):
    basis, x, _ = trained
    basis.save(tmp_path, model={"spec": "tiny", "sha256": "abc"})
    ours = json.loads((tmp_path / "cfg.json").read_text())
    theirs = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert ours["kind"] == "sae" and ours["sae_dir"] == "sae" and ours["model"]["spec"] == "tiny"
    assert theirs["architecture"] == "topk" and theirs["metadata"]["hook_name"] == basis.hook
    assert theirs["metadata"]["model_name"] == "tiny"
    sae = SAE.load_from_disk(tmp_path / "sae")  # SAELens's own loader, alone
    codes = basis.encode(x[:64])
    torch.testing.assert_close(sae.encode(x[:64]), codes, atol=0, rtol=0)
    torch.testing.assert_close(sae(x[:64]), basis(x[:64]), atol=0, rtol=0)
    loaded = load_basis(tmp_path)
    assert isinstance(loaded, SAEBasis) and loaded.config() == basis.config()
    torch.testing.assert_close(loaded.encode(x[:64]), codes, atol=0, rtol=0)
    torch.testing.assert_close(loaded.directions, basis.directions, atol=0, rtol=0)
    basis.save(tmp_path)  # saving again swaps SAELens's folder whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae"]
    with pytest.raises(Exception, match="not 'pca'"):
        BASES["pca"].load(tmp_path)


@pytest.mark.parametrize(
    "arch,opts,saved_as",
    [
        ("batchtopk", {"k": K}, "jumprelu"),
        ("jumprelu", {"l0_coefficient": 1e-3, "jumprelu_init_threshold": 0.05}, "jumprelu"),
        ("standard", {"l1_coefficient": 1e-3}, "standard"),
    ],
)
def test_other_architectures_train_and_round_trip(arch, opts, saved_as, tmp_path):
    x, _ = planted(seed=1, n=2048)
    basis = SAEBasis(M, architecture=arch, n_tokens=150 * 256, **opts, **FAST).fit(x)
    q = basis.quality(x)
    assert q["fvu"] < 0.3 and 0 < q["l0"] < M  # learned something, and sparse
    basis.save(tmp_path)
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.architecture() == saved_as
    torch.testing.assert_close(sae(x[:32]), basis(x[:32]), atol=0, rtol=0)
    torch.testing.assert_close(load_basis(tmp_path).encode(x[:32]), basis.encode(x[:32]))


def test_resume_from_last_ckpt_continues_exactly(tmp_path):
    x, _ = planted(seed=2, n=2048)

    def run(ckpt_dir, steps):
        cfg = SAETrainConfig(sae={"k": K}, n_tokens=steps * 256, ckpt_dir=str(ckpt_dir),
                             ckpt_every_n_steps=10, **FAST)  # fmt: skip
        return train_sae(x, M, cfg)

    whole = run(tmp_path / "a", 30)
    first = run(tmp_path / "b", 13)  # stops mid-epoch (8 batches per epoch)
    assert torch.load(tmp_path / "b" / LAST_CKPT, weights_only=True)["global_step"] == 13
    resumed = run(tmp_path / "b", 30)
    assert resumed.stats["resumed_from"] and resumed.stats["steps"] == 30
    assert resumed.stats["token_presentations"] == 30 * 256
    for name, w in whole.sae.state_dict().items():  # same batches, same optimizer state
        torch.testing.assert_close(resumed.sae.state_dict()[name], w, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(first.sae.W_dec, whole.sae.W_dec)  # the check can fail
    other = SAETrainConfig(
        sae={"k": K + 1}, n_tokens=40 * 256, ckpt_dir=str(tmp_path / "b"), **FAST
    )
    with pytest.raises(ValueError, match="other settings"):
        train_sae(x, M, other)


def test_bos_rows_are_left_out():
    x, _ = planted(seed=3, n=2048)
    pos = torch.arange(len(x)) % 64
    x = x.clone()
    x[pos == 0] *= 100.0  # an attention-sink-sized BOS row
    basis = SAEBasis(M, k=K, n_tokens=20 * 256, **FAST).fit(x, pos=pos)
    assert basis.train_stats["n_rows"] == int((pos != 0).sum())
    mean_norm = float(x[pos != 0].norm(dim=-1).mean())
    assert basis.scaling_factor == pytest.approx(math.sqrt(D) / mean_norm, rel=0.02)


def test_bad_input_errors(trained):
    basis, x, _ = trained
    with pytest.raises(ValueError, match="n_features"):
        SAEBasis(0)
    with pytest.raises(ValueError, match="Unknown SAE options.*bogus"):
        SAEBasis(8, bogus=1)
    with pytest.raises(ValueError, match="Did you mean 'topk'"):
        SAEBasis(8, architecture="topkk")
    bad = x[:1024].clone()
    bad[5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN.*row 5"):
        SAEBasis(M, k=K, **FAST).fit(bad)
    with pytest.raises(ValueError, match="cannot train 512 latents"):
        SAEBasis(512, k=K, **FAST).fit(x[:300])
    with pytest.raises(ValueError, match="fewer than one batch"):
        SAEBasis(M, k=K, **FAST).fit(x[:100])
    with pytest.raises(ValueError, match="k must be"):
        SAEBasis(M, k=M, **FAST).fit(x)
    with pytest.raises(ValueError, match="d_model=40"):
        basis.encode(torch.randn(3, 40))
    with pytest.raises(RuntimeError, match="not fitted"):
        SAEBasis(M).encode(x)


def test_sparse_map_identity_on_the_sae(trained):
    basis, x, _ = trained
    mapper = SparseFeatureMap(basis)  # W_feat = I: decode(encode(x)), exactly the SAE
    with torch.no_grad():
        torch.testing.assert_close(mapper(x[:64]), basis(x[:64]))
    assert not any(p is basis.sae.W_dec for p in mapper.parameters())  # the SAE stays frozen


HOOK = "blocks.1.hook_resid_post"


def test_fit_on_store_and_mismatched_activations(tiny_model, tmp_path):
    acts = tmp_path / "acts"
    docs = load_documents("fable_work", split="test")
    harvest_to_disk(tiny_model, docs, [HOOK, "blocks.0.hook_resid_post"], acts, progress=False)
    opts = {"k": 4, "n_tokens": 30 * 128, "batch_size": 128, "logger": "csv",
            "ckpt_dir": str(tmp_path / "out" / "train"), "progress": False}  # fmt: skip
    m = fit_basis_on_store(acts, "sae", 64, tmp_path / "out", HOOK, basis_kwargs=opts)
    assert m["kind"] == "sae" and m["sae_training"]["steps"] == 30 and 0 < m["heldout/l0"] <= 4
    assert (tmp_path / "out" / "train" / LAST_CKPT).exists()
    basis = load_basis(tmp_path / "out")
    store = ActivationStore(acts)
    basis.check_store(store)  # same model, hook, width: fine
    with pytest.raises(ValueError, match="trained on 'blocks.1.hook_resid_post'"):
        basis.check_store(store, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="sha256"):
        basis.check_compatible(model={"spec": "other", "sha256": "f" * 64})
    with pytest.raises(ValueError, match="d_model=64; the activations have 576"):
        basis.check_compatible(d_model=576)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "standard"])
def test_hydra_presets_are_valid_sae_options(arch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from analoglock.cli._conf import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base=None):
        overrides = ["basis=sae", "acts=x", f"sae={arch}", "n_features=4608", "sae.lr=0.002"]
        cfg = compose("fit_basis", overrides=overrides)
    basis = SAEBasis(cfg.n_features, **OmegaConf.to_container(cfg.sae, resolve=True))
    assert basis.train_cfg.architecture == arch and basis.train_cfg.lr == 0.002
    assert basis.train_cfg.ckpt_dir == "runs/bases/sae-4608/train"
    assert ("k" in basis.train_cfg.sae) == (arch in ("topk", "batchtopk"))

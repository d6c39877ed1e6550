"""The lock trainer on the tiny random Llama: config composition, artifacts, resume, controls, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from analoglock.cli._conf import CONF_DIR
from analoglock.lock.data import PairedDataModule
from analoglock.lock.export import ArtifactError, load_artifact, read_artifact_cfg
from analoglock.lock.maps import build_mapper
from analoglock.lock.module import AnalogyLock, LockCallback
from analoglock.paired import PairedActivations, paired_activations, pool_pairs

REPO = Path(__file__).resolve().parents[3]
REQUIRED = (
    "locked", "lock_epoch", "epochs_run", "not_applicable", "shuffled_control_locked", "test",
    "test_margins", "n_pairs", "history",
)  # fmt: skip
MAPS = ("learned", "identity", "meandiff", "procrustes", "ridge", "shuffled_control")


def compose_train(tiny_dir: str, out_dir: Path, *extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(
            "train",
            overrides=[
                "model=hf", f"model.spec={tiny_dir}", "hook=blocks.2.hook_resid_post", "logger=csv",
                f"out_dir={out_dir}", "trainer.max_epochs=3", "trainer.enable_progress_bar=false", *extra,
            ],
        )  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Keep harvest caches of these tests out of the user's cache."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("ANALOGLOCK_CACHE")
    os.environ["ANALOGLOCK_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ANALOGLOCK_CACHE")
    else:
        os.environ["ANALOGLOCK_CACHE"] = old


def test_pool_pairs_are_aligned(tiny_model, cache_dir):
    paired = paired_activations(
        tiny_model, "fable_work", "blocks.1.hook_resid_post", progress=False
    )
    story = paired.subset(view="story")
    assert len(story) == 400 and {"train", "validation", "test"} == set(paired.split)
    assert all(v == "story" or v.startswith(("role", "mention")) for v in paired.view)
    # Every mention is its own pair; a role's mentions outnumber its role-mean rows.
    assert len(paired.subset(view="mentions")) > len(paired.subset(view="roles"))
    from analoglock.activation_store import ActivationStore

    store = ActivationStore(next((cache_dir / "harvests").iterdir()))
    acts = store.load()
    # The story vector of pair 0 is the mean of that story's token rows.
    rows = torch.tensor([acts.docs[d].id == "fable_work/000:a" for d in acts.doc.tolist()])
    torch.testing.assert_close(story.a[0], acts.acts["blocks.1.hook_resid_post"][rows].mean(0))
    again = pool_pairs(acts, "blocks.1.hook_resid_post", ("story",))
    torch.testing.assert_close(again.b, story.b)


def test_several_hooks_at_once_are_side_by_side_and_scaled_per_hook():
    from analoglock.paired import concat_hooks

    gen = torch.Generator().manual_seed(0)
    ids, views, splits = ["p0", "p1", "p2"], ["story"] * 3, ["train", "train", "test"]
    low = PairedActivations(torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen),
                            ids, views, splits)  # fmt: skip
    high = PairedActivations(100 * low.a[:, :2], 100 * low.b[:, :2], ids, views, splits)
    both = concat_hooks([low, high])
    assert both.a.shape == (3, 6) and (both.pair, both.split) == (ids, splits)
    for block in (both.a[:, :4], both.a[:, 4:]):  # each hook's train rows at RMS norm 1
        rows = torch.cat([block[:2], (both.b[:, :4] if block.shape[1] == 4 else both.b[:, 4:])[:2]])
        torch.testing.assert_close(rows.pow(2).sum(-1).mean(), torch.tensor(1.0))
    # the blocks are the parts themselves, each divided by one number: cosines within a block stay
    torch.testing.assert_close(both.a[:, :4] / both.a[0, 0] * low.a[0, 0], low.a)
    other = PairedActivations(low.a, low.b, ["p0", "p2", "p1"], views, splits)
    with pytest.raises(ValueError, match="part 1 holds other rows"):
        concat_hooks([low, other])


def test_one_sided_data_is_refused():
    x = torch.randn(6, 8)
    one = PairedActivations(x, x, [f"p{i}" for i in range(6)], ["story"] * 6, ["train"] * 6)
    with pytest.raises(ValueError, match="validation"):
        PairedDataModule(one)


def test_nan_activations_are_named():
    from analoglock.paired import check_finite

    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"rows \[2\]"):
        check_finite(x, "batch 7")


def test_untrained_translation_scores_like_identity():
    torch.manual_seed(0)
    a, b = torch.randn(20, 16), torch.randn(20, 16)
    module = AnalogyLock(build_mapper("translation", d_model=16), torch.optim.Adam, {"match": 1.0})
    torch.testing.assert_close(module(a), a)
    terms = module.loss_terms(a, b)
    assert set(terms) == {"match"}
    with pytest.raises(ValueError, match="valid"):
        AnalogyLock(
            build_mapper("translation", d_model=16), torch.optim.Adam, {"nuclear": 1.0}
        ).loss_terms(a, b)


PASSING = {
    f"top1_{v}_vs_{b}": [0.2, 0.05, 0.3]
    for v in ("story", "roles")
    for b in ("identity", "meandiff", "procrustes")
} | {
    "rel_err_story_vs_identity": [-0.2, -0.3, -0.1],
    "rel_err_roles_vs_identity": [-0.2, -0.3, -0.1],
}


def test_lock_callback_state_round_trips():
    cb = LockCallback(max_drift=0.1, patience=2)
    cb.criterion.update(PASSING, 0.01)
    cb.history.append({"epoch": 0})
    other = LockCallback(max_drift=0.1, patience=2)
    other.load_state_dict(cb.state_dict())
    assert other.criterion.streak == 1 and not other.locked
    assert other.criterion.update(PASSING, 0.01) and other.lock_epoch == 1
    with pytest.raises(ValueError, match="lock views"):
        LockCallback(views=["sentences"])
    with pytest.raises(ValueError, match="baselines"):
        LockCallback(baselines=["oracle"])


def test_train_writes_artifacts_resumes_and_reports_controls(
    tiny_dir, tiny_model, tmp_path, cache_dir
):
    from analoglock.lock.train import train
    from analoglock.reports.lock import lock_report

    out = tmp_path / "run"
    metrics, objects = train(compose_train(tiny_dir, out))
    for key in REQUIRED:
        assert key in metrics
    assert metrics["epochs_run"] == 3 and set(metrics["test"]) == set(MAPS)
    # The identity baseline scores the identity map: untrained translation starts there too.
    for g in ("story", "roles"):
        assert 0 <= metrics["test"]["identity"][f"top1_{g}"] <= 1
    # Each epoch's history says which clause passed, and why (paired margins vs baselines).
    clauses = metrics["history"][-1]["clauses"]
    assert "top1_roles_vs_meandiff" in clauses and "drift" in clauses
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"] == metrics["test"]
    lock_report(metrics, out)
    assert (out / "last.ckpt").exists() and (out / "report.html").stat().st_size > 10_000
    # The frozen transformer never enters the checkpoint: only the map and its bookkeeping.
    ckpt = torch.load(out / "last.ckpt", weights_only=True, map_location="cpu")
    assert all(k.startswith(("mapper.", "center", "prev_params")) for k in ckpt["state_dict"]), (
        list(ckpt["state_dict"])
    )
    assert ckpt["hyper_parameters"]["mapper_kind"] == "lowrank"
    # The portable artifact applies to the same model and refuses another.
    art = load_artifact(out, tiny_model)
    assert art.hook == "blocks.2.hook_resid_post" and art.vector.shape == (64,)
    assert {"learned", "meandiff", "center", "cov_a"} <= set(art.vectors)
    assert art.control_mapper is not None and art.control_mapper.kind == "lowrank"
    x = torch.randn(3, 64)
    torch.testing.assert_close(art.mapper(x), objects["module"].mapper(x).detach())
    torch.testing.assert_close(art.control_mapper(x), objects["control"].mapper(x).detach())
    with pytest.raises(ArtifactError, match="learned on model"):
        from analoglock.model import load_model
        from tests.helpers import tiny_model_dir

        load_artifact(out, load_model(str(tiny_model_dir(tmp_path / "other", seed=5))))
    # Resume: a longer run continues from last.ckpt instead of starting over.
    more, _ = train(compose_train(tiny_dir, out, "trainer.max_epochs=5"))
    assert more["epochs_run"] == 5
    assert [h["epoch"] for h in more["history"]] == [0, 1, 2, 3, 4]
    # A folder made with another configuration is never resumed: the message names the setting.
    with pytest.raises(ValueError, match="differs in: .*mapper"):
        train(compose_train(tiny_dir, out, "mapper=affine", "trainer.max_epochs=5"))


def test_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path, cache_dir):
    """Killed after 2 epochs and rerun to 4 gives the same map as 4 epochs straight."""
    from analoglock.lock.train import train

    straight, a = train(compose_train(tiny_dir, tmp_path / "a", "trainer.max_epochs=4",
                                      "shuffled_control=false"))  # fmt: skip
    train(compose_train(tiny_dir, tmp_path / "b", "trainer.max_epochs=2", "shuffled_control=false"))
    resumed, b = train(compose_train(tiny_dir, tmp_path / "b", "trainer.max_epochs=4",
                                     "shuffled_control=false"))  # fmt: skip
    for name, value in a["module"].mapper.export_tensors().items():
        torch.testing.assert_close(b["module"].mapper.export_tensors()[name], value, rtol=0, atol=0)
    assert straight["test"] == resumed["test"]


def test_bad_lock_inputs_fail_before_writing(tiny_dir, tmp_path, cache_dir):
    """A hook the model lacks fails before out_dir exists; out_dir that is a file is named."""
    from analoglock.lock.train import train

    with pytest.raises(ValueError, match="blocks.99"):
        train(compose_train(tiny_dir, tmp_path / "nohook", "hook=blocks.99.hook_resid_post"))
    assert not (tmp_path / "nohook").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile"):
        train(compose_train(tiny_dir, tmp_path / "afile"))


def test_foreign_files_are_not_relations(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "lock.safetensors"))
    with pytest.raises(ArtifactError, match="not an analoglock lock artifact"):
        read_artifact_cfg(tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "lock.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        read_artifact_cfg(tmp_path / "junk")


def test_ddp_runs_two_gloo_processes(tiny_dir, tmp_path, cache_dir):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "analoglock.cli.train", "model=hf", f"model.spec={tiny_dir}", "trainer=ddp",
        "hook=blocks.1.hook_resid_post", "logger=csv", f"out_dir={out}", "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    env = {**os.environ, "ANALOGLOCK_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log
    assert "Starting with 2 processes" in log or "world_size: 2" in log or "MEMBER: 2/2" in log, (
        log[-3000:]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["shuffled_control_locked"] is False
    # Both ranks scored the whole validation split: every logged value is one number per epoch.
    assert "Connection closed" not in log


def _tiny_pca_basis(tiny_model, hook: str, out: Path, n: int = 16) -> Path:
    """A PCA basis fit on the tiny model's paired story activations, saved with the model's identity."""
    from analoglock.bases import PCABasis
    from analoglock.model import model_info

    paired = paired_activations(tiny_model, "fable_work", hook, progress=False)
    basis = PCABasis(n_components=n, hook=hook).fit(torch.cat([paired.a, paired.b]))
    basis.save(out, model=model_info(tiny_model).to_dict())
    return out


def test_sparse_matrix_map_in_a_basis(tiny_dir, tiny_model, tmp_path, cache_dir):
    from analoglock.bases import BasisArtifactError
    from analoglock.lock.evaluate import relation_features
    from analoglock.lock.train import train

    hook = "blocks.2.hook_resid_post"
    basis_dir = _tiny_pca_basis(tiny_model, hook, tmp_path / "pca")
    out = tmp_path / "sparse"
    cfg = compose_train(
        tiny_dir, out, "mapper=sparse_matrix", f"basis={basis_dir}", "loss.weights.l1=0.001",
        "trainer.max_epochs=2",
    )  # fmt: skip
    metrics, _ = train(cfg)
    feats, ctrl = metrics["relation_features"], metrics["relation_features_shuffled_control"]
    assert len(feats) == 10 and len(ctrl) == 10
    assert all(0 <= f["feature"] < 16 for f in feats)
    # The artifact reloads its basis by itself and maps exactly as the trained module did.
    rel = load_artifact(out, tiny_model)
    assert rel.cfg["basis"] == str(basis_dir.resolve()) and rel.mapper.kind == "sparse"
    x = torch.randn(5, 64)
    W, b = rel.mapper.W_feat.detach(), rel.mapper.b_feat.detach()
    basis = rel.mapper.basis_a
    want = basis.decode(basis.encode(x) @ W + b) + (x - basis.decode(basis.encode(x)))
    torch.testing.assert_close(rel.mapper(x).detach(), want)
    # Readout: with W = I and b = e_3 the relation moves feature 3 only, by exactly 1 code unit.
    rel.mapper.W_feat.data = torch.eye(16)
    rel.mapper.b_feat.data = torch.nn.functional.one_hot(torch.tensor(3), 16).float()
    top = relation_features(rel.mapper, x, k=3)
    assert top[0]["feature"] == 3 and top[0]["code_change"] == pytest.approx(1.0, abs=1e-5)
    assert abs(top[1]["code_change"]) < 1e-5
    # A sparse map without a basis, a basis at another hook, a basis with a raw-space map: refused.
    with pytest.raises(ValueError, match="needs basis="):
        train(compose_train(tiny_dir, tmp_path / "nobasis", "mapper=sparse_matrix"))
    with pytest.raises(BasisArtifactError, match="fit at hook"):
        train(
            compose_train(
                tiny_dir, tmp_path / "wronghook", "mapper=sparse_matrix", f"basis={basis_dir}",
                "hook=blocks.1.hook_resid_post",
            )
        )  # fmt: skip
    with pytest.raises(ValueError, match="used only by mapper=sparse_matrix"):
        train(compose_train(tiny_dir, tmp_path / "raw", f"basis={basis_dir}"))


def test_non_finite_artifacts_are_refused_on_save_and_load(tiny_model, tmp_path):
    """A NaN map or vector would steer silently into garbage: refused both ways, file named."""
    import json as _json

    from safetensors.torch import save_file

    from analoglock.lock.export import save_artifact
    from analoglock.model import model_info

    info = model_info(tiny_model).to_dict()
    mapper = build_mapper("translation", d_model=64)
    bad = torch.zeros(64)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_artifact(
            tmp_path / "a", mapper, {"learned": bad}, model=info, hook="blocks.1.hook_resid_post"
        )
    path = save_artifact(tmp_path / "b", mapper, {"learned": torch.ones(64)}, model=info,
                         hook="blocks.1.hook_resid_post")  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["learned"][0] = float("inf")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ArtifactError, match="NaN or inf"):
        load_artifact(tmp_path / "b", tiny_model)
    assert _json.loads(meta["analoglock"])["kind"] == "translation"


def test_an_untrusted_checkpoint_is_named_and_never_unpickled(tiny_dir, tmp_path, cache_dir):
    """A last.ckpt holding a pickled object is refused with its path, not loaded unsafely."""
    from analoglock.lock.train import train

    out = tmp_path / "evil"
    out.mkdir()

    import argparse  # any class outside torch's weights_only allowlist stands for a payload

    torch.save({"state_dict": {}, "payload": argparse.Namespace(run="rm -rf /")}, out / "last.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint analoglock can trust") as err:
        train(compose_train(tiny_dir, out, "shuffled_control=false"))
    assert "last.ckpt" in str(err.value) and "weights_only=False" in str(err.value)

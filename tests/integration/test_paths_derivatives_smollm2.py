"""Interpolation paths and derivatives on the real SmolLM2: path endpoints reproduce the plain runs, JVP = finite
difference through the real bridge (KV-cache shortcut included). Kept small: short inputs."""

from __future__ import annotations

import torch

from analoglock.data import load_pairs
from analoglock.relations import interpolate as ip
from analoglock.relations import jacobian as jac


def test_interpolation_endpoints_reproduce_smollm2_runs(smollm2):
    pair = load_pairs("vacation_deadline")[0]
    read_hook = "blocks.15.hook_resid_post"
    basis = ip.fit_default_basis(smollm2, [pair.a, pair.b], read_hook, 8)
    reader = ip.FeatureReader(basis, read_hook, ip.n_prefix(smollm2), signed=True)
    fables = [p.a for p in load_pairs("fable_work")[:4]]
    reader.calibrate(ip.doc_activity(smollm2, reader, fables))
    ids_a = ip.encode(smollm2, pair.a)[:20]
    ids_b = ip.encode(smollm2, pair.b)[:20]
    for hook in ("hook_embed", "blocks.7.hook_resid_post"):
        for mode in ip.MODES:
            rec = ip.input_path(
                smollm2, reader, ids_a, ids_b, hook, mode, ip.step_grid(3), 2.0, 1.0
            )
            assert max(rec["endpoint_max_abs_diff"]) <= 1e-3, (
                hook,
                mode,
                rec["endpoint_max_abs_diff"],
            )
            assert len(rec["z"]) == 3 and len(rec["z"][0]) == 16
            assert len(rec["lens_top_tokens"]) == 3


def test_jvp_equals_finite_difference_on_smollm2(smollm2):
    ids = jac._encode(smollm2, load_pairs("vacation_deadline")[4].a, 24)
    v = jac.random_directions(2, smollm2.cfg.d_model, torch.Generator().manual_seed(0))
    mask = jac.position_mask(len(ids), "last", 1)[None].expand(2, -1)
    f = jac.perturbed_fn(
        smollm2, ids, "blocks.15.hook_resid_post", mask, jac.output_head("logprobs")
    )
    out, jv, how = jac.directional_derivative(f, v, "auto")
    assert how == "jvp"  # forward mode works through the bridge
    _, fd, _ = jac.directional_derivative(f, v, "finite_difference", eps=0.05)
    rel = (fd - jv).norm(dim=-1) / jv.norm(dim=-1)
    assert float(rel.max()) < 2e-2, rel
    p = out.exp()
    assert torch.allclose(p.sum(-1), torch.ones(2), atol=1e-4)

"""Interpolation paths and derivatives on the real SmolLM2: path endpoints reproduce the plain runs, JVP = finite
difference through the real bridge (KV-cache shortcut included). Kept small: short inputs."""

from __future__ import annotations

import torch

from analoglock.data import load_pairs
from analoglock.relations import derivatives as dv
from analoglock.relations import jacobian as jac
from analoglock.relations import paths as pa
from analoglock.relations import text as tx
from analoglock.relations.common import text_basis
from analoglock.stats import random_unit_directions

# An endpoint run differs from the plain run only in float32 summation order (a batch of 3 vs 1,
# another CPU's kernels): a few ulps of the largest activation it passes through. SmolLM2's read
# hook carries activations up to ~2.5e4 (the BOS), so one ulp there is ~2e-3 in absolute terms
# (another x86 CPU measured 0.0039 = 1.6e-7 of the maximum). The bound is relative to that scale:
# 1e-5 is ~80 float32 epsilons, room for 16 layers of reordered sums, and still ~1e-3 of the
# activations' typical size (rms ~230), so an endpoint off by a real change cannot pass.
ENDPOINT_RTOL = 1e-5


def test_interpolation_endpoints_reproduce_smollm2_runs(smollm2):
    pair = load_pairs("vacation_deadline")[0]
    read_hook = "blocks.15.hook_resid_post"
    basis = text_basis(smollm2, [pair.a, pair.b], read_hook, 8)
    reader = pa.FeatureReader(basis, read_hook, tx.n_prefix(smollm2), signed=True)
    fables = [p.a for p in load_pairs("fable_work")[:4]]
    reader.calibrate(pa.doc_activity(smollm2, reader, fables))
    ids_a = tx.encode(smollm2, pair.a)[:20]
    ids_b = tx.encode(smollm2, pair.b)[:20]
    for hook in ("hook_embed", "blocks.7.hook_resid_post"):
        for mode in pa.MODES:
            rec = pa.input_path(
                smollm2, reader, ids_a, ids_b, hook, mode, pa.step_grid(3), 2.0, 1.0
            )
            assert max(rec["endpoint_relative_diff"]) <= ENDPOINT_RTOL, (
                hook,
                mode,
                rec["endpoint_relative_diff"],
                rec["endpoint_max_abs_diff"],
            )
            assert len(rec["z"]) == 3 and len(rec["z"][0]) == 16
            assert len(rec["lens_top_tokens"]) == 3


def test_jvp_equals_finite_difference_on_smollm2(smollm2):
    ids = jac.encode_text(smollm2, load_pairs("vacation_deadline")[4].a, 24)
    v = random_unit_directions(
        2, smollm2.cfg.d_model, torch.Generator().manual_seed(0), torch.float32
    )
    mask = dv.position_mask(len(ids), "last", 1)[None].expand(2, -1)
    f = dv.perturbed_fn(smollm2, ids, "blocks.15.hook_resid_post", mask, dv.output_head("logprobs"))
    out, jv, how = dv.directional_derivative(f, v, "auto")
    assert how == "jvp"  # forward mode works through the bridge
    _, fd, _ = dv.directional_derivative(f, v, "finite_difference", eps=0.05)
    rel = (fd - jv).norm(dim=-1) / jv.norm(dim=-1)
    assert float(rel.max()) < 2e-2, rel
    p = out.exp()
    assert torch.allclose(p.sum(-1), torch.ones(2), atol=1e-4)

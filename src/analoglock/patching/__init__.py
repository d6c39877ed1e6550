"""Feature-to-feature causation: how intervening on upstream features changes downstream codes.

The pieces, in the order a run uses them (each module's docstring has the exact definitions):

    from analoglock.patching import (Segment, build_prompts, clean_runs, Ablate, exact_effects,
                                     attribution_effects, agreement, parse_routes)

    seg = Segment(model, "blocks.6.hook_resid_post", "blocks.12.hook_resid_post")  # h1 -> h2
    prompts = build_prompts(model, docs, intervene_at=None, measure_at=None)  # positions.* rules
    cleans = clean_runs(seg, prompts)            # one clean pass per prompt, cut to the stretch
    E = exact_effects(seg, cleans, U, V, Ablate(1.0))        # Effects: .effect [n_up, n_down], .control
    A = attribution_effects(seg, cleans, U, V, Ablate(1.0))  # same shape, first order, from gradients
    agreement(E, A)                               # spearman, topk_overlap, sign_agreement, ...
    E_mlp = exact_effects(seg, cleans, U, V, Ablate(1.0), routes=parse_routes("mlp", seg))

- `segment`: `Segment(model, h1, h2)` reruns only blocks start..end from the cached clean
  residual (`Segment.run(clean, delta[n, pos, d_model], routes) -> x2[n, pos, d2]`, differentiable
  in delta), and `Segment.run_full` is the full-forward reference. `CleanRun` holds one prompt's
  clean activations at h1/h2, the residual entering the stretch, the blocks' call kwargs and
  the clean outputs of every attention/MLP layer in between.
- `interventions`: `Ablate(alpha)`, `MeanAblate(means)`, `Patch()` give the code change c[t, i];
  the delta is c[t, i] * U.directions[i]. `random_directions` gives the equal-norm controls.
- `prompts`: `build_prompts(model, docs, intervene_at, measure_at, sources)` -> `Prompt`s (ids,
  bool masks, optional counterfactual source ids of the same length).
- `exact`: `exact_effects` (one rerun per upstream feature, stacked in the batch) and
  `position_effects` (a feature group at one position at a time; with `IdentityBasis` + `Patch`
  it equals TransformerLens's `get_act_patch_resid_pre`). `Effects` carries the matrices, the
  feature ids of rows/columns, the method, the intervention, seconds.
- `attribution`: `attribution_effects` (one forward per prompt, one batched VJP per downstream
  code), `agreement` and `agreement_bootstrap` (its intervals over upstream features).
- `paths`: `Routes` / `parse_routes(spec, segment)`: effects through chosen components only.
- `readouts`: `IdentityBasis` (standard basis) and `TokenLogits` (next-token logits as
  downstream codes, for working backwards from an output).
- `graph`: `build_graph`, `Thresholds`, `threshold_study`, `promoted_tokens`, `node_activations`,
  `beats_control` (the edges' control rule) and `control_contrast` (effect vs control, paired).

Bases are anything with `encode`, `directions`, `n_features` and `hook` (every
`analoglock.bases.FeatureBasis`, `TokenLogits`). Knows nothing of CLIs or reports.
"""

from analoglock.patching.attribution import agreement, agreement_bootstrap, attribution_effects
from analoglock.patching.exact import Effects, clean_runs, exact_effects, position_effects
from analoglock.patching.graph import (
    Thresholds,
    beats_control,
    build_graph,
    control_contrast,
    node_activations,
    promoted_tokens,
    threshold_study,
)
from analoglock.patching.interventions import (
    MODES,
    Ablate,
    InterventionError,
    MeanAblate,
    Patch,
    make_intervention,
    random_directions,
)
from analoglock.patching.paths import Routes, all_routes, parse_routes
from analoglock.patching.prompts import Prompt, build_prompts
from analoglock.patching.readouts import IdentityBasis, TokenLogits
from analoglock.patching.segment import CleanRun, PatchSetupError, Segment, site_of

__all__ = [
    "MODES",
    "Ablate",
    "CleanRun",
    "Effects",
    "IdentityBasis",
    "InterventionError",
    "MeanAblate",
    "Patch",
    "PatchSetupError",
    "Prompt",
    "Routes",
    "Segment",
    "Thresholds",
    "TokenLogits",
    "agreement",
    "agreement_bootstrap",
    "all_routes",
    "attribution_effects",
    "beats_control",
    "build_graph",
    "build_prompts",
    "clean_runs",
    "control_contrast",
    "exact_effects",
    "make_intervention",
    "node_activations",
    "parse_routes",
    "position_effects",
    "promoted_tokens",
    "random_directions",
    "site_of",
    "threshold_study",
]

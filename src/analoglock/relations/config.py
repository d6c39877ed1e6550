"""Every relations analysis's settings: one dataclass each, its defaults and what they mean.

The dataclasses are registered in Hydra's ConfigStore as group `relations_analysis` (one entry per
analysis name), which `relations.yaml` lists in its defaults, so `analoglock-relations --cfg job`
shows every default and `algebra.n_null=50` is type-checked. Runners read their section through
`settings(section, Config)`, so a Python caller passing a plain dict (or nothing) gets the same
defaults and the same error for a misspelt key. Knows nothing of what the analyses compute.

Random-direction controls come in two kinds (`analoglock.stats.NULL_KINDS`): isotropic, and drawn
from the covariance of the activations; the `n_*` counts below are per kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

GROUP = "relations_analysis"  # the ConfigStore group (not "analyses": that key lists what runs)

# Composites, comparisons and contrasts used when the config names none: each needs its sets harvested; those
# whose sets were not requested are reported as skipped (an explicit list must be harvestable).
DEFAULT_COMPOSITES = (
    ("gender:male-female", "emotion:angry-calm"),
    ("royalty:king-man", "gender:male-female"),
)
DEFAULT_COMPARISONS = (
    ("gender:male-female", "royalty:king-queen"),
    ("royalty:man-woman", "royalty:king-queen"),
    ("animals:lion-tiger", "canines:wolf-dog"),
    ("animals:lion-animal", "canines:wolf-animal"),
    ("emotion:angry-calm", "gender:male-female"),
)
DEFAULT_CONTRASTS = (
    "gender:male-female",
    "emotion:angry-calm",
    "royalty:king-man",
    "animals:lion-rest",
    "animals:tiger-rest",
    "canines:wolf-dog",
    "numbers:one-five",
)


@dataclass
class AlgebraConfig:
    """Relation vectors, their cosine matrix against nulls, and composites (algebra.py)."""

    n_null: int = 500
    """label shuffles for the shuffled-label null of every cosine (permutation p floor 1/501)"""
    n_random: int = 2000
    """random direction pairs for the |cos| nulls, per kind (isotropic, covariance)"""
    alpha: float = 0.05
    """level for the verdicts, on BH q-values over the cosine matrix"""
    relations: list[str] | None = None
    """["gender:male-female", ...]; None: every class pair of every set"""
    composites: list[list[str]] | None = None
    """pairs of relations added together; None: DEFAULT_COMPOSITES whose sets were harvested"""
    read_offset: int = 4
    """composites are read this many layers after the hook"""
    scale: float = 1.0
    """multiple of each relation vector added"""
    n_composite_random: int = 19
    """random vector pairs of the same norms per composite, per kind (p floor 1/20)"""


@dataclass
class SeparabilityConfig:
    """The causal separability matrix (separability.py)."""

    contrasts: list[str] | None = None
    """["set:pos-neg" or "set:pos-rest", ...]; None: DEFAULT_CONTRASTS whose sets were harvested
    (every set's own contrasts when none is)"""
    read_offset: int = 4
    """probes read this many layers after the hook"""
    read_hook: str | None = None
    """read here instead of read_offset layers later"""
    scale: float = 1.0
    """times the mean-difference vector, i.e. one class gap along it"""
    n_random: int = 2
    """random pushes of the contrast vector's norm per contrast, per kind; every entry is tested
    against the pooled |effect| of all of them (contrasts x readouts x n_random per kind)"""
    alpha: float = 0.05


@dataclass
class HierarchyConfig:
    """Shared / specific / generic parts of a hierarchical set, and its top features (hierarchy.py)."""

    set: str = "animals"
    generic: str = "animal"
    """the class naming the genus ("animal"); the others are the species"""
    reference: list[str] = field(default_factory=lambda: ["royalty", "gender"])
    """non-animal sets whose concept words give the shared "animal" direction its contrast"""
    read_offset: int = 4
    read_hook: str | None = None
    top_k: int = 5
    """features per species, ranked by |Cohen's d|"""
    n_null: int = 200
    """label shuffles for the structure cosines and the max-|d| feature test"""
    n_control: int = 24
    """random edits of the same norm as each top feature's ablation, per kind (p floor 1/25)"""
    upstream_offset: int = 4
    """patching: upstream SVD features this many layers earlier (0 skips)"""


@dataclass
class RecursiveConfig:
    """Relations of relations: comparisons, clusters, analogies (recursive.py)."""

    n_null: int = 500
    n_random: int = 200
    """random offsets per analogy question and random directions per comparison, per kind"""
    comparisons: list[list[str]] | None = None
    """pairs of relations compared as objects; None: DEFAULT_COMPARISONS whose sets were harvested"""
    families: dict[str, list[str]] = field(
        default_factory=lambda: {
            "gender": [
                "gender.male>gender.female",
                "royalty.king>royalty.queen",
                "royalty.man>royalty.woman",
            ],
            "royal": ["royalty.man>royalty.king", "royalty.woman>royalty.queen"],
            "successor": [
                "numbers.one>numbers.two",
                "numbers.two>numbers.three",
                "numbers.three>numbers.four",
                "numbers.four>numbers.five",
            ],
            "plus_two": [
                "numbers.one>numbers.three",
                "numbers.two>numbers.four",
                "numbers.three>numbers.five",
            ],
            "hypernym": [
                "animals.lion>animals.animal",
                "animals.tiger>animals.animal",
                "animals.bear>animals.animal",
                "canines.wolf>canines.animal",
                "canines.dog>canines.animal",
                "canines.fox>canines.animal",
            ],
        }
    )
    """relation families: members believed to share one relation ("set.a>set.b")"""


@dataclass
class AnomaliesConfig:
    """The battery of measurements ranked by surprise (anomalies.py)."""

    n_null: int = 200
    n_random: int = 500
    top: int = 50
    """rows kept in the ranked list"""


@dataclass
class InterpolateConfig:
    """Interpolation between unrelated inputs and between relation vectors (interpolate.py)."""

    hooks: list[str] | None = None
    """interpolation hooks; None: hook_embed and the resid_post at 1/4 and 1/2 depth"""
    read_hook: str | None = None
    """where features are read; None: the resid_post at 3/4 depth"""
    text_a: str | None = None
    """the two inputs; None: the first vacation/deadline pair"""
    text_b: str | None = None
    n_features: int = 16
    """SVD features when no basis was fit at read_hook"""
    basis_fit: str = "reference"
    """what that SVD is fit on: "reference" texts (neither input nor control) or the "inputs\""""
    n_steps: int = 11
    modes: list[str] = field(default_factory=lambda: ["linear", "slerp"])
    controls: list[str] = field(default_factory=lambda: ["shuffle", "random"])
    """control paths: the inputs' tokens shuffled, or random tokens of the reference vocabulary"""
    n_controls: int = 3
    """control paths (and random relation-vector pairs, per kind) per main path; with 3 the
    smallest p is 1/4, so the counts can show "no more than controls", not a significant excess"""
    theta: float = 2.0
    """z-score a feature must reach to count as active"""
    margin: float = 1.0
    """a tangent's interior peak must exceed both ends by this much z"""
    reference: Any = "fable_work"
    """a shipped dataset name or a list of texts: the feature z-scores' reference"""
    n_reference: int = 24
    paraphrases: Any = "vacation_deadline_paraphrase"
    """paraphrase pairs file for abstract vs superficial commonalities; null/false skips"""
    relations: list[str] | None = None
    """two relation specs ["set:a-b", "set:c-d"] to interpolate between; None: the first two
    harvested sets' first class pairs"""
    relation_hook: str | None = None
    top_k: int = 5
    """logit-lens tokens kept per step"""


@dataclass
class JacobianConfig:
    """Derivatives of the output along a basis's directions (jacobian.py)."""

    hook: str | None = None
    """None: the run's first hook"""
    texts: list[str] | None = None
    """None: both sides of the first two vacation/deadline pairs"""
    n_directions: int = 16
    n_random: int = 16
    """random unit directions per kind (isotropic, covariance of the fit texts' activations)"""
    steps: list[float] = field(default_factory=lambda: [0.05, 0.2, 0.5, 1.0])
    """step sizes, as fractions of the mean norm of the perturbed activations"""
    metric: str = "logprobs"
    """"logprobs" (next-token log-probabilities) or "logit_diff" (needs target_tokens)"""
    target_tokens: list[str] | None = None
    positions: Any = "last"
    """"last", "all" (non-BOS) or a list of indices"""
    method: str = "auto"
    """"auto" (forward mode, falling back to double backward), "jvp", "double_backward",
    "finite_difference\""""
    tol: float = 0.25
    """how far from 1 a response ratio may be and still count as linear"""
    max_tokens: int | None = 48
    batch_size: int = 16
    crosscheck: bool = False
    """compare one derivative with TransformerLens's JacobianLens"""
    crosscheck_tokens: int = 12


@dataclass
class ShapeConfig:
    """Concept search by shape (shape.py)."""

    hook: str | None = None
    top_k: int = 10
    n_random: int = 199
    """random candidate sets searched for the null of the best score (p floor 1/200)"""
    n_tuples: int = 2000
    """random tuples of the real candidates scored for the tuple baseline"""
    searches: dict[str, Any] | None = None
    """{name: {candidates, constraints, ...}}; None: the default searches whose sets were harvested"""


@dataclass
class LREConfig:
    """Relation operators on the Hernandez et al. (2024) benchmark: the linear relational
    embedding beside baselines, scored by faithfulness and causality (lre.py)."""

    relations: list[str] | None = None
    """shipped relation names ("country_capital_city", "factual/company_ceo") or .json files in
    the benchmark's format; None: every shipped relation of `kinds`"""
    kinds: list[str] = field(default_factory=lambda: ["factual"])
    """shipped kinds used when relations is None: factual, linguistic, bias"""
    layers: list[int] | None = None
    """subject layers swept (the state after each block); None: the layers of the run's hooks"""
    layer: int | None = None
    """the layer of the headline table; None: the first of `layers`"""
    n_train: int = 5
    """train samples per relation: the few-shot examples of every prompt, the Jacobian prompts,
    and what every baseline is fit on (the paper's n = 5)"""
    n_jacobian: int | None = None
    """how many train prompts' Jacobians are averaged into W; None: all n_train (the paper)"""
    min_test: int = 5
    """held-out correct samples a relation needs; fewer is an error (or a skip unless strict)"""
    max_samples: int | None = None
    """samples drawn per relation (seeded) before the correctness filter; None: all"""
    max_test: int | None = None
    """held-out correct samples scored per relation; None: all"""
    n_pairs: int | None = 16
    """causality edits per relation (source, target); None: one per held-out sample"""
    beta: float = 2.25
    """the paper's scale on W in z = beta W h + b (its GPT-J value)"""
    ranks: list[int] = field(default_factory=lambda: [4, 16, 64])
    """ranks of the low-rank W swept for both measures; faithfulness is also scored at full rank
    (edits are not: W's smallest singular values make its whole pseudo-inverse explode)"""
    edit_rank: int = 16
    """the LRE rank of the headline causality numbers (one of `ranks`; the paper's GPT-J ranks,
    about 3% of d_model, scaled to this model)"""
    template: int = 0
    """which prompt template (the paper uses the first)"""
    max_rounds: int = 4
    """rounds of replacing train samples the model gets wrong in context before giving up"""
    lock_rank: int = 8
    lock_steps: int = 300
    """the learned lock map: LowRankMap rank and Adam steps on the lock's losses"""
    n_boot: int = 2000
    """bootstrap resamples for every interval (samples within a relation, relations overall)"""
    linear_threshold: float = 0.5
    """LRE faithfulness at or above which a relation is called linearly decoded"""
    strict: bool = False
    """raise on a bad sample or a relation with too few correct samples; False drops bad
    samples and skips such relations, each with its reason in the results"""
    chunk: int = 64
    """cotangents per vmap chunk of the Jacobian (memory vs speed)"""


CONFIGS: dict[str, type] = {
    "algebra": AlgebraConfig,
    "separability": SeparabilityConfig,
    "hierarchy": HierarchyConfig,
    "recursive": RecursiveConfig,
    "interpolate": InterpolateConfig,
    "jacobian": JacobianConfig,
    "shape": ShapeConfig,
    "anomalies": AnomaliesConfig,
    "lre": LREConfig,
}

C = TypeVar("C")


def settings(section: Any, cls: type[C]) -> C:
    """A config dataclass from a Hydra section, a mapping, an instance or None (all defaults).

    Unknown keys and values of the wrong type raise OmegaConf's error, which names the key."""
    if isinstance(section, cls):
        return section
    base = OmegaConf.structured(cls)
    if section is None:
        return OmegaConf.to_object(base)
    if not isinstance(section, DictConfig):
        section = OmegaConf.create(dict(section))
    return OmegaConf.to_object(OmegaConf.merge(base, section))


def register_configs() -> None:
    """Store every analysis's dataclass in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, cls in CONFIGS.items():
        cs.store(group=GROUP, name=name, node=cls)


register_configs()

"""Steering: put the learned relation back into the model while it writes, and measure what it does.

`hooks` (one intervention: a vector or the map x + alpha (M(x) - x) at chosen token positions,
checked before it runs; steered generation and teacher-forced passes; random controls),
`prompts` (story openings, role positions in text, role-transfer prefixes, neutral and user
prompts, length checks), `measures` (per-unit numbers: judge shift, analogue rank, role
transfer, fluency, diversity, loops, neutral KL), `task` (the options; one split's prompts and
judge references), `arms` (one arm measured per unit; the selection rule), `evaluate` (the
protocol: sweep on validation, choice, one test evaluation, the report), `summary` (bootstrap
summaries), `bench` (the same over training seeds). Decoding lives in `analoglock.generation`,
the judge in `analoglock.lock.judge`, the plots in `analoglock.reports.steering`.
"""

from analoglock.lock.steering.arms import run_arm, select
from analoglock.lock.steering.bench import steer_seeds
from analoglock.lock.steering.evaluate import (
    arm_results,
    choose,
    evaluate_test,
    run_steering,
    sweep,
)
from analoglock.lock.steering.hooks import (
    POSITIONS,
    RowPositions,
    Steering,
    SteeringError,
    add_vector_hook,
    apply_map_hook,
    covariance_directions,
    map_steering,
    position_mask,
    random_control,
    steer,
    steered_generate,
    steered_logprobs,
    vector_steering,
)
from analoglock.lock.steering.measures import (
    chance_mrr,
    continuation_perplexity,
    cosine_ranks,
    distinct_n,
    domain_mass,
    domain_scores,
    domain_vocab,
    has_loop,
    neutral_kl,
    neutral_kl_values,
    role_transfer_ranks,
)
from analoglock.lock.steering.prompts import (
    NEUTRAL_PROMPTS,
    PromptError,
    RoleItem,
    StoryPrompt,
    check_prompt_lengths,
    read_prompts,
    role_spans,
    role_token_positions,
    role_transfer_items,
    story_opening,
    story_prompts,
    user_prompts,
)
from analoglock.lock.steering.summary import (
    MEASURES,
    ArmResult,
    arm_measures,
    headline,
    jsonable,
    random_p_values,
    summarize,
)
from analoglock.lock.steering.task import SteeringTask, SteerOptions, build_task

__all__ = [
    "MEASURES",
    "NEUTRAL_PROMPTS",
    "POSITIONS",
    "ArmResult",
    "PromptError",
    "RoleItem",
    "RowPositions",
    "SteerOptions",
    "Steering",
    "SteeringError",
    "SteeringTask",
    "StoryPrompt",
    "add_vector_hook",
    "apply_map_hook",
    "arm_measures",
    "arm_results",
    "build_task",
    "chance_mrr",
    "check_prompt_lengths",
    "choose",
    "continuation_perplexity",
    "cosine_ranks",
    "covariance_directions",
    "distinct_n",
    "domain_mass",
    "domain_scores",
    "domain_vocab",
    "evaluate_test",
    "has_loop",
    "headline",
    "jsonable",
    "map_steering",
    "neutral_kl",
    "neutral_kl_values",
    "position_mask",
    "random_control",
    "random_p_values",
    "read_prompts",
    "role_spans",
    "role_token_positions",
    "role_transfer_items",
    "role_transfer_ranks",
    "run_arm",
    "run_steering",
    "select",
    "steer",
    "steered_generate",
    "steered_logprobs",
    "steer_seeds",
    "story_opening",
    "story_prompts",
    "summarize",
    "sweep",
    "user_prompts",
    "vector_steering",
]

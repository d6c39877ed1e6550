#!/usr/bin/env bash
# Train residual SAEs on the generated corpus (issue 16): harvest blocks.L.hook_resid_post of every
# token (BOS excluded) of the corpus at each layer of LAYERS in one pass, then a SAELens TopK SAE
# (4608 latents, k=64) per layer for N_TOKENS token presentations, with held-out FVU / l0 / dead
# fraction and spliced CE (recovered against zero and mean ablation, bootstrap intervals over
# held-out documents) in $OUT_ROOT/sae-topk4608-l$L-$N_TOKENS/metrics.json.
# Re-running resumes both steps (harvest shards; each SAE from its train/last.ckpt).
#   scripts/train_sae_corpus.sh [N_TOKENS] [more analoglock-fit-basis overrides, e.g. sae.k=32]
#   LAYERS="12 15" (default), CORPUS=<jsonl> (default: the embedded SmolLM2's seed-0 corpus).
# Cost here (2 CPU cores): ~820 token presentations/s of SAE training on a quiet machine (a 1e6
# run is ~20 min per layer); the harvest of 1e6 tokens at two layers is ~4.6 GB of float32.
# The harvest is fingerprinted by its documents: while the corpus still grows, use ACTS=another dir.
set -euo pipefail
N_TOKENS=${1:-1000000}
shift || true
VENV=${VENV:-.venv}
LAYERS=${LAYERS:-12 15}
ACTS=${ACTS:-runs/harvest/corpus-resid}
OUT_ROOT=${OUT_ROOT:-runs/bases}
BATCH=512
DECAY=$(( N_TOKENS / BATCH / 5 ))  # the last fifth of the steps decays the lr linearly to lr/10 (SAELens: lr_end)

HOOKS=$(printf 'blocks.%s.hook_resid_post,' $LAYERS)
DATA=(data=corpus)
if [[ -n ${CORPUS:-} ]]; then DATA+=("data.path=$CORPUS"); fi
"$VENV/bin/analoglock-harvest" "${DATA[@]}" positions=all "hooks=[${HOOKS%,}]" out_dir="$ACTS"
for L in $LAYERS; do
    "$VENV/bin/analoglock-fit-basis" basis=sae acts="$ACTS" hook="blocks.$L.hook_resid_post" \
        n_features=4608 sae=topk sae.k=64 sae.n_tokens="$N_TOKENS" sae.batch_size=$BATCH \
        sae.lr_decay_steps=$DECAY splice_docs=64 out_dir="$OUT_ROOT/sae-topk4608-l$L-$N_TOKENS" "$@"
done

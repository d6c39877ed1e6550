"""The analogy lock: learn a map between two domains' activations, decide when it has locked, steer.

Layout (one concern per module): `data` (batches of paired activations and the shuffled-pairs
control), `maps/` (one map per file, registered by kind), `losses` and `metrics` (plain math and
torchmetrics), `module` (the LightningModule and the lock callback), `train` (the thin
orchestrator), `evaluate` (baselines, controls and readouts on held-out pairs), `export` (the
portable artifact), `steering` and `judge` (adding the learned relation back into the model and
measuring what it does). Sits above `analoglock.bases`; knows nothing of reports or the CLI.
"""

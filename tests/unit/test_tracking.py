"""wandb_logger: each logger gets its own run, even when a sweep runs jobs in one process."""

from analoglock.tracking import wandb_logger


def test_each_logger_gets_its_own_wandb_run(tmp_path, monkeypatch):
    """Two jobs of a --multirun in one process: the second must not adopt the first's open run."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = wandb_logger("analoglock-test", str(tmp_path / "a"), "a", offline=True)
    run_a = first.experiment.id  # starts the run, and leaves it open as a finished job does
    second = wandb_logger("analoglock-test", str(tmp_path / "b"), "b", offline=True)
    run_b = second.experiment.id
    second.experiment.finish()
    assert run_a != run_b
    assert (tmp_path / "a" / "wandb").is_dir() and (tmp_path / "b" / "wandb").is_dir()

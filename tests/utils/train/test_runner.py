"""--resume: which flags may change, training longer, and the epoch count from the checkpoint."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest

import training
from utils.artifacts.model_file import read_model_info
from utils.data import demo
from utils.train import runner


def saved_settings(**changes):
    settings = {"backbone": "mobilenet_v1", "epochs": 4, "max_lr": 0.01, "batch_size": 8, "seed": 1,
                "cache": False, "xla": False, "data": "data/prepared", "weights": "none", "freeze_epochs": 0}
    return {**settings, **changes}


def resume_args(flags, output=None):
    return SimpleNamespace(resume="runs/x", output=output, given_flags=set(flags), data="data/prepared")


def test_flags_that_change_what_is_learnt_are_refused():
    with pytest.raises(runner.TrainingSetupError) as error:
        runner.check_resume_flags(resume_args({"--max-lr", "--seed"}), saved_settings(max_lr=0.5, seed=7),
                                  saved_settings())
    message = str(error.value)
    assert "--max-lr 0.5 (the run has 0.01)" in message and "--seed 7 (the run has 1)" in message
    assert "--epochs" in message


def test_same_values_more_epochs_and_speed_flags_are_accepted():
    runner.check_resume_flags(resume_args({"--max-lr", "--epochs", "--cache", "--xla"}),
                              saved_settings(epochs=9, cache=True, xla=True), saved_settings())
    # flags that were not written on the command line are never compared
    runner.check_resume_flags(resume_args(set()), saved_settings(max_lr=0.5), saved_settings())


def test_fewer_epochs_other_data_or_output_are_refused():
    with pytest.raises(runner.TrainingSetupError, match="cannot be cut short"):
        runner.check_resume_flags(resume_args({"--epochs"}), saved_settings(epochs=2), saved_settings())
    args = resume_args({"--data"})
    args.data = "data/other"
    with pytest.raises(runner.TrainingSetupError, match="--data"):
        runner.check_resume_flags(args, saved_settings(), saved_settings())
    with pytest.raises(runner.TrainingSetupError, match="stays in its own directory"):
        runner.check_resume_flags(resume_args(set(), output="runs/y"), saved_settings(), saved_settings())


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.prepare_demo(progress=False, image_size=32, root=root, images_per_class=4)
    return root / "prepared"


def train(run, data, *flags):
    return training.main(["--data", str(data), "--output", str(run), "--backbone", "mobilenet_v1",
                          "--batch-size", "8", "--max-steps-per-epoch", "2", "--quiet", "--seed", "1", *flags])


def test_finished_epochs_come_from_the_checkpoint_not_the_log(tiny_demo, tmp_path, capsys):
    """(training longer and the resume record are checked end to end in tests/test_scripts.py)"""
    run = tmp_path / "run"
    assert train(run, tiny_demo, "--epochs", "1") == 0
    # a flag that changes what is learnt: refused with a clear message, nothing trained
    assert training.main(["--resume", str(run), "--max-lr", "0.5", "--quiet"]) == 2
    assert "--max-lr 0.5 (the run has 0.01)" in capsys.readouterr().err
    # killed after last.keras of epoch 1 was written but before its log row: epoch 1 is not trained twice
    log = pd.read_csv(run / "log.csv")
    log.iloc[:0].to_csv(run / "log.csv", index=False)
    assert runner._resume_state(run)[0] == 1
    assert training.main(["--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert pd.read_csv(run / "log.csv")["epoch"].tolist() == [1]
    assert read_model_info(run / "last.keras").extra["epoch"] == 2
    assert json.loads((run / "config.json").read_text())["config"]["max_steps_per_epoch"] == 2  # kept


def test_log_rows_past_the_checkpoint_are_dropped(tmp_path):
    """The other order of writes (a log row whose checkpoint was never written): that row goes."""
    pd.DataFrame({"epoch": [0, 1, 2, 3], "loss": [4.0, 3.0, 2.0, 1.0]}).to_csv(tmp_path / "log.csv", index=False)
    runner._trim_log(tmp_path, done=2)
    assert pd.read_csv(tmp_path / "log.csv")["epoch"].tolist() == [0, 1]

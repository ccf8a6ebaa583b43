"""--recipe presets: every value is a valid training flag, flags given win, the paper's facts hold."""

import pytest

import training
from utils import config, constants
from utils.train import recipes


def test_every_recipe_sets_only_training_flags_with_valid_values():
    for recipe in recipes.RECIPES.values():
        assert recipe.settings, recipe.name
        for name, value in recipe.settings.items():
            assert name in training.FLAGS, f"{recipe.name} sets {name}, not a training flag"
            assert type(value) is type(getattr(constants, name)), (recipe.name, name)
            config.check_value(name, value, f"recipe {recipe.name}: {name}")
    assert recipes.recipe_names() == ["none", "paper", "small-data", "site-robust"]


def test_no_recipe_is_constants_py_alone():
    args = training.parse_args(["--data", "d"])
    assert args.recipe == "none"
    for name in training.FLAGS:
        assert getattr(args, config.dest_name(name)) == getattr(constants, name), name


def test_a_recipe_sets_its_values_and_flags_written_on_the_command_line_win():
    args = training.parse_args(["--recipe", "small-data", "--epochs", "7", "--no-class-weights"])
    small = recipes.RECIPES["small-data"].settings
    assert (args.epochs, args.class_weights) == (7, False)  # given: kept
    assert (args.batch_size, args.augment_scale, args.augment_gamma) == (
        small["BATCH_SIZE"], small["AUGMENT_SCALE"], small["AUGMENT_GAMMA"])
    assert args.max_lr == constants.MAX_LR  # not named by the recipe: constants.py
    _, settings = config.start(training.parse_args, ["--recipe", "small-data"], training.FLAGS)
    assert settings["recipe"] == "small-data" and settings["epochs"] == small["EPOCHS"]  # what config.json records


def test_the_paper_recipe_is_the_papers_code():
    args = training.parse_args(["--recipe", "paper"])
    assert (args.backbone, args.weights, args.epochs, args.batch_size, args.max_lr) == (
        "mobilenet_v1", "none", 50, 32, 0.01)
    assert (args.weight_decay, args.clip_value, args.warmup_fraction, args.lr_start_div, args.lr_final_div) == (
        1e-4, 0.1, 0.3, 25.0, 1e4)
    assert (args.augment_rotation_deg, args.horizontal_flip, args.augment_brightness, args.augment_contrast) == (
        10.0, True, 0.0, 0.0)
    assert not any((args.augment_scale, args.augment_translate, args.augment_shear_deg, args.augment_gamma,
                    args.augment_sharpness, args.augment_noise, args.class_weights, args.label_smoothing))
    assert args.bn_momentum == 0.9  # PyTorch's, as the paper's code; Keras' 0.99 starves from-scratch BN


def test_demo_keeps_a_recipes_epochs_and_refuses_an_unknown_recipe(capsys):
    assert training.parse_args(["--demo", "--recipe", "small-data"]).epochs == 60
    assert training.parse_args(["--demo"]).epochs == constants.DEMO_EPOCHS
    with pytest.raises(SystemExit):
        training.parse_args(["--recipe", "big-data"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.apply(training.parse_args([]), "big-data", set())


def test_help_lists_every_recipe_with_what_it_sets(capsys):
    with pytest.raises(SystemExit):
        training.parse_args(["--help"])
    out = capsys.readouterr().out
    for recipe in recipes.RECIPES.values():
        assert f"--recipe {recipe.name}:" in out
    assert "--augment-gamma 0.3" in " ".join(out.split())

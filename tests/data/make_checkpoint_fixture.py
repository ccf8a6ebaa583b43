"""Writes checkpoint_before_keras_objects.keras (+ .json): a backward-compatibility fixture.

The checkpoint was generated ONCE, with the code as it was before OneCycle, AdamL2 and MacroF1
moved from utils/training.py to utils/keras_objects.py (they were registered as
``router>OneCycle``, ``router>AdamL2``, ``router>MacroF1`` from utils.training). It is a tiny
model compiled the way utils/runner.py compiles (``make_optimizer`` -> AdamL2 with a OneCycle
schedule, SparseCategoricalCrossentropy, accuracy and MacroF1), trained for one step so the
optimizer has state, and saved by ``utils.artifacts.save_model`` (optimizer included, embedded
preprocess.json). The .json beside it records what tests/utils/artifacts/test_model_file.py checks after
loading it with ``load_model(path, compile=True)``: the inputs' seed, the predictions, the
optimizer iterations and the schedule config.

How it was made: from a copy of commit f1ae1045c8cc (the code before the move; ``git archive f1ae1045c8cc | tar -x
-C /tmp/old``), with this script copied into it, ``cd /tmp/old && python tests/data/make_checkpoint_fixture.py``
(Keras 3.15.1, TensorFlow 2.21.0); the two files were copied back here. Its config.json names
``"module": "utils.training"`` for the three objects, which no longer exists for them: it loads
because Keras finds registered objects by their registered name.

Do not regenerate it casually: its point is to be a file written by the old code. If it must be
regenerated (an intentional format break), run it from a checkout of that commit as above: it
imports the modules by their names of then (since the move of utils/ into packages, the objects
are in utils.artifacts.keras_objects and the training pieces in utils.train.components).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

CHECKPOINT = HERE / "checkpoint_before_keras_objects.keras"
RECORD = HERE / "checkpoint_before_keras_objects.json"
CLASSES = ("chest", "hand", "skull")
SIZE = 32  # the smallest image_size a PreprocessSpec accepts
SEED = 1234
SCHEDULE = {"max_lr": 0.01, "total_steps": 20, "warmup_fraction": 0.3, "start_div": 25.0, "final_div": 1e4}
OPTIMIZER = {"weight_decay": 1e-4, "clip_value": 1.0}


def inputs(n: int = 4):
    """The fixed float32 0..255 batch the predictions are recorded on."""
    import numpy as np

    return np.random.default_rng(SEED).uniform(0, 255, (n, SIZE, SIZE, 1)).astype(np.float32)


def tiny_model():
    import keras

    layers = keras.layers
    image = keras.Input((SIZE, SIZE, 1), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1, name="preprocess")(image)
    x = layers.Conv2D(4, 3, strides=2, use_bias=False)(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, layers.Dense(len(CLASSES))(x), name="tiny")


def optimizer_abs_sum(optimizer) -> float:
    """Sum of |value| over the optimizer's moment variables (its state after the step)."""
    import numpy as np

    return float(sum(np.abs(np.asarray(v)).sum() for v in optimizer.variables if v.path != optimizer.iterations.path))


def main() -> None:
    import keras
    import numpy as np
    from utils.training import MacroF1, make_optimizer

    from utils.artifacts import save_model
    from utils.preprocessing import PreprocessSpec

    keras.utils.set_random_seed(SEED)
    model = tiny_model()
    optimizer = make_optimizer(**SCHEDULE, **OPTIMIZER)
    schedule = optimizer._learning_rate  # the OneCycle object (``learning_rate`` evaluates it)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"), MacroF1(len(CLASSES))])
    x = inputs(8)
    y = np.arange(8) % len(CLASSES)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # one step: the optimizer has state
    spec = PreprocessSpec(class_names=CLASSES, image_size=SIZE, channels=1)
    save_model(model, CHECKPOINT, spec, model_id="fixture/epoch-1", backbone="tiny", extra={"epoch": 1})
    record = {
        "seed": SEED, "batch": 4, "logits": model.predict(inputs(4), verbose=0).tolist(),
        "optimizer_iterations": int(model.optimizer.iterations.numpy()),
        "optimizer_abs_sum": optimizer_abs_sum(model.optimizer),
        "schedule": schedule.get_config(),
        "l2": OPTIMIZER["weight_decay"], "clipvalue": OPTIMIZER["clip_value"],
        "model_id": "fixture/epoch-1", "backbone": "tiny", "extra": {"epoch": 1}, "class_names": list(CLASSES),
        "written_with": {"keras": keras.__version__},
    }
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {CHECKPOINT} ({CHECKPOINT.stat().st_size} bytes) and {RECORD}")


if __name__ == "__main__":
    main()

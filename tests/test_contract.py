"""The preprocessing contract: training (prepared cache -> tf.data) and serving (raw DICOM ->
model input) must hand the model the same tensor for the same file."""

import numpy as np
import pydicom.uid
import pytest

from utils.data.dataset import build_dataset
from utils.data.prepare import prepare_dataset
from utils.evaluate import evaluation
from utils.io.dicom_writer import write_dicom
from utils.preprocessing import PreprocessSpec, preprocess_file, to_model_input

CLASSES = ("a", "b")


@pytest.mark.parametrize("aspect", ["stretch", "letterbox"])
@pytest.mark.parametrize("channels", [1, 3])
def test_cache_path_equals_raw_path(tmp_path, aspect, channels):
    rng = np.random.default_rng(0)
    cases = [  # several encodings and pixel pipelines, odd sizes
        dict(photometric="MONOCHROME1", bits_stored=12, window=(1800.0, 3000.0)),
        dict(photometric="MONOCHROME2", bits_stored=16, transfer_syntax=pydicom.uid.RLELossless),
        dict(photometric="MONOCHROME2", bits_stored=12, transfer_syntax=pydicom.uid.JPEG2000Lossless),
    ]
    files = []
    for i, kwargs in enumerate(cases * 2):
        pixels = (rng.random((97 + 13 * i, 61 + 7 * i)) * 4000).astype(np.uint16)
        path = write_dicom(tmp_path / "src" / CLASSES[i % 2] / f"{i}.dcm", pixels, patient_id=f"p{i}", **kwargs)
        files.append(path)
    spec = PreprocessSpec(class_names=CLASSES, image_size=48, channels=channels, aspect=aspect)
    result = prepare_dataset(tmp_path / "src", tmp_path / "prepared", spec, ratios=(1.0, 0.0, 0.0), seed=0,
                             workers=1, progress=False)
    assert len(result.labels) == len(files) and result.rejects.empty
    labels = result.labels
    cached = build_dataset([str(tmp_path / "prepared" / p) for p in labels["path"]], [0] * len(labels), spec,
                           training=False, batch_size=len(labels))
    train_side = next(iter(cached))[0].numpy()
    serve_side = np.stack([to_model_input(preprocess_file(f, spec)[0], channels) for f in labels["source_file"]])
    assert train_side.shape == serve_side.shape == (len(files), 48, 48, channels)
    np.testing.assert_array_equal(train_side, serve_side)
    # and the batch reader used by test.py/predict on raw files
    (batch, kept, errors), = list(evaluation.iter_batches(list(labels["source_file"]), spec, cached=False,
                                                          batch_size=len(labels)))
    assert errors == [] and kept == list(range(len(labels)))
    np.testing.assert_array_equal(batch, train_side)

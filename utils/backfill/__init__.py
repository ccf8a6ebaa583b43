"""backfill.py: classify a whole archive on Ray Data, resumably, and report on it.

sources.py   SOURCE arguments -> the files: local folders and lists (predict.py's collect_inputs),
             CSV manifests, fsspec URLs (s3://, gs://, file://...); remote files fetched for decoding
dicomweb.py  dicomweb+https:// sources: QIDO-RS listing into one path per instance, credentials from
             files or the environment, WADO-RS fetching in the decoding actors (utils/dicomweb/archive.py)
store.py     the output: a Parquet dataset of atomically written parts, predict.py's columns typed,
             the paths already done (resume), the run's identity (model, threshold)
pipeline.py  the Ray Data pipeline: decoding actors (the engine's isolated workers) -> an inference
             actor pool holding the model -> parts written by the driver
report.py    the curation report: counts per label and per BodyPartExamined, the tag x prediction
             matrix, proposed tag corrections
"""

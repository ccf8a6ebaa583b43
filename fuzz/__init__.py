"""Fuzzing the DICOM reader: hostile-file recipes, a corpus of malformed files, an atheris target."""

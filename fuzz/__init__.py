"""Fuzzing the DICOM reader: a corpus of malformed files, runners that classify what the reader
does with them, and an atheris target (see fuzz/README.md).

raw          byte-level surgery on DICOM files (find elements, rewrite values and lengths)
bases        the small valid files every mutation starts from
kinds        the kinds of malformed file, each an endless deterministic stream
corpus       generate(output_dir) -> the corpus on disk, with manifest.csv
probe        the reader's promise checked on one input (exercise)
isolated     each file in its own memory-capped, time-limited child process
sequential   files one after another in one process, as a batch tool reads them
reader_target  the atheris (libFuzzer) target
hostile      hand-made hostile files with exactly known failure modes
"""

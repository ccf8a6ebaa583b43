"""Sending classified objects on: one forwarder thread per destination (forwarder.py: C-STORE or a folder;
dicomweb.py: STOW-RS to a DICOMweb service; workers.py: one per destination of a configuration); dcmtk.py drives dcmtk's peers in tests and benchmarks."""

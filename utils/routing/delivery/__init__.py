"""Sending classified objects on: one forwarder thread per destination (forwarder.py); dcmtk.py drives
dcmtk's peers in tests and benchmarks."""

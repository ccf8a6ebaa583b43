"""The DICOM router: a Storage SCP that classifies each received image and forwards it by label.

    C-STORE in --> scp.py: spool file (fsync) + queue row (commit) --> 0x0000 answered
                   classifier.py: batches of received items -> rules.py (header only: CT, MR, reports,
                                  site rules -> their destination) -> the rest: label, confidence -> route
                   forwarder.py: one thread per destination, C-STORE out with the received
                                 transfer syntax, retries with backoff -> spool file removed

``queue.py`` is the persistent state (SQLite in WAL mode beside the spool files), so a restart,
even after kill -9, resumes where it stopped; ``audit.py`` writes the JSON-lines audit log;
``config.py`` reads and checks the YAML configuration (``rules.py`` its routing rules); ``node.py``
wires it all together.
"""

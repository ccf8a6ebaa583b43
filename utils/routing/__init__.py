"""The DICOM router: objects come in, wait in the queue, get a destination, go out.

    intake/      the ways in: scp.py (Storage SCP; wakeup.py and tls.py serve it), stow.py (STOW-RS,
                 POST /studies), orthanc_source.py (pulls an Orthanc's change feed); accepted.py (the
                 transfer syntaxes and SOP classes all of them take), space.py (the free-space reserve)
                      |  every object: spool file (fsync) + queue row (commit), then acknowledged
                      v
    queue.py     the persistent state (SQLite in WAL mode beside the spool files) and the only code
                 that reads or writes its SQL: store / next / settle / stats / search
                      |
                      v
    decision/    classifier.py takes batches of received items -> rules.py (header rules: CT, MR,
                 reports, site rules -> their destination) -> the model through the inference engine
                 (utils/infer) -> label, confidence -> route; shadow.py records what the model would do
                      |
                      v
    delivery/    workers.py: one thread per destination, retries with backoff -> spool file removed:
                 forwarder.py (C-STORE out in the received transfer syntax, or a folder), dicomweb.py
                 (STOW-RS to a DICOMweb service); dcmtk.py drives dcmtk's peers for tests and benchmarks

    operations/  config.py (the one typed configuration), audit.py (JSON-lines audit log),
                 reconcile.py (start-up repair), metrics.py (/metrics), console.py + review.py (web
                 console, corrections), backup.py, service.py (router.py's --check / --status)

``node.py`` builds each part with what it needs, starts and stops them in order, watches them and
reloads configuration and model on SIGHUP; ``worker.py`` is the base of the background threads;
``http_server.py`` serves the console and STOW-RS (uvicorn in a thread).
Where does an object go after it is stored? ``decision/classifier.py`` (``Classifier.run``) takes it
from the queue; ``delivery/forwarder.py`` sends it on.
"""

"""The delivery workers of a configuration: one thread per distinct destination (a DICOM node, a DICOMweb service,
a folder); routes that share a destination share its worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.routing.delivery.dicomweb import DicomwebForwarder
from utils.routing.delivery.forwarder import DicomForwarder, FolderForwarder, _Worker
from utils.routing.operations.audit import AuditLog
from utils.routing.operations.metrics import NO_METRICS
from utils.routing.queue import SpoolQueue

if TYPE_CHECKING:  # annotations only: the configuration imports the workers' settings
    from utils.routing.operations.config import Destination, RouterConfig


def make_forwarders(config: RouterConfig, queue: SpoolQueue, audit: AuditLog, metrics=NO_METRICS) -> list[_Worker]:
    """One worker per distinct target; routes that share a target share its worker."""
    by_node: dict[str, list[Destination]] = {}
    for destination in config.destinations.values():
        by_node.setdefault(destination.node, []).append(destination)
    workers: list[_Worker] = []
    for group in by_node.values():
        kind = (FolderForwarder if group[0].is_folder else DicomwebForwarder if group[0].dicomweb is not None
                else DicomForwarder)
        workers.append(kind(group[0], [d.route for d in group], queue, audit, config, metrics))
    return workers

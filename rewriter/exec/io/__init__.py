"""Byte movement: planned byte ranges copied into outputs with bounded memory, the output files
and multipart parts they write, the probe of a disk's bandwidth, the progress-rate throttle.

The small file helpers (full or read-only destinations, positioned writes, fsync) live in
:mod:`rewriter.exec.io.fileio`.
"""

from rewriter.exec.io.copy import Output, Progress, RangeCopier, copy_segments
from rewriter.exec.io.copy_paths import CopyStats, IOOptions
from rewriter.exec.io.outputs import LocalOutput, RemoteOutput
from rewriter.exec.io.partoutputs import MultipartPart, PartOutput
from rewriter.exec.io.probe import measure_disk
from rewriter.exec.io.throttle import Throttle
from rewriter.exec.options import DEFAULT_BUFFER_BYTES

__all__ = [
    "DEFAULT_BUFFER_BYTES", "CopyStats", "IOOptions", "LocalOutput", "MultipartPart", "Output",
    "PartOutput", "Progress", "RangeCopier", "RemoteOutput", "Throttle", "copy_segments",
    "measure_disk",
]

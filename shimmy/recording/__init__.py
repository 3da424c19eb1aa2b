"""A channel's recording on disk (docs/recording.md).  ``from shimmy import recording`` and
``recording.X`` reach everything callers use; the rooms:

* ``layout`` -- the format: catalog words, paths and names, the read-only ``Catalog``, the frame
  check, ``RecordSettings`` and ``RecordingError``;
* ``writer`` -- ``TrackWriter``, the recorder's side (append, roll, recover, retention);
* ``reader`` -- ``TrackReader`` and ``frames_with_time``, the readers' side.

This file only re-exports; it must never hold recording logic.
"""

from __future__ import annotations

from shimmy.recording.layout import (CATALOG_SIZE, DIR_MODE, ENTRY, FILE_MODE, FSYNC_POLICIES,
                                     IDX_SUFFIX, MAGIC, MAIN_TRACK, MAX_FRAME, MODES, MODE_NAMES,
                                     OFF_NAME, SEG_SUFFIX, VERSION, W_CAPACITY, W_COMMITTED,
                                     W_CREATED, W_DROPPED, W_ERRORS, W_FIRST_OFFSET, W_FIRST_SEQ,
                                     W_FIRST_TIME, W_LAG, W_LAST_TIME, W_LOST, W_MAGIC,
                                     W_MESSAGES, W_MODE, W_NEXT_SEQ, W_RING_MODE, W_START_SEQ,
                                     W_VERSION, Catalog, RecordSettings, RecordingError,
                                     catalog_name, channel_dir, channel_name, check_frame,
                                     make_dir, open_catalog, quote, read_entries, seg_path,
                                     segments, tracks)
from shimmy.recording.reader import TrackReader, frames_with_time
from shimmy.recording.writer import TrackWriter

__all__ = [
    "CATALOG_SIZE", "Catalog", "DIR_MODE", "ENTRY", "FILE_MODE", "FSYNC_POLICIES", "IDX_SUFFIX",
    "MAGIC", "MAIN_TRACK", "MAX_FRAME", "MODES", "MODE_NAMES", "OFF_NAME", "RecordSettings",
    "RecordingError", "SEG_SUFFIX", "TrackReader", "TrackWriter", "VERSION", "W_CAPACITY",
    "W_COMMITTED", "W_CREATED", "W_DROPPED", "W_ERRORS", "W_FIRST_OFFSET", "W_FIRST_SEQ",
    "W_FIRST_TIME", "W_LAG", "W_LAST_TIME", "W_LOST", "W_MAGIC", "W_MESSAGES", "W_MODE",
    "W_NEXT_SEQ", "W_RING_MODE", "W_START_SEQ", "W_VERSION", "catalog_name", "channel_dir",
    "channel_name", "check_frame", "frames_with_time", "make_dir", "open_catalog", "quote",
    "read_entries", "seg_path", "segments", "tracks",
]

"""The raw data lake: the embedded sync engine's second destination, "S3 raw lake for exploration".

Every batch becomes one parquet file at
``<root>/raw/<source>/<stream>/extracted_date=YYYY-MM-DD/<sync_id>-<n>.parquet`` (ARCHITECTURE §4),
with exactly the columns of the raw tables: the batch is typed by ``rawlayer.prepare()``, the
same path the warehouse uses, so the lake and the Destinations V2 tables cannot drift apart.

The files are plain parquet (snappy, INT64 UTC-microsecond timestamps, hive-style partition
directory) so DuckDB, Snowflake external tables and Athena read them as they are. One writer serves a
local directory and S3 through pyarrow's filesystem interface.

Durability rules, because the engine commits sync state right after a write returns:
- a file only ever appears under its final name complete: locally it is written to a hidden temporary
  name in the same directory, fsynced and renamed; on an object store it is serialised in memory
  first and sent in one upload, which S3 makes visible atomically when it completes;
- names are deterministic, so a re-delivered batch (same sync id and part) replaces its own file.

Generations: once a snapshot or full refresh of generation G is complete, :meth:`LakeWriter.supersede`
moves every file of the stream whose rows are of an older generation out of ``raw/`` into
``superseded/<source>/<stream>/generation=<g>/extracted_date=YYYY-MM-DD/``, so whatever reads
``raw/<source>/<stream>/`` (a DuckDB glob, a Snowflake external table, Athena) sees only the live
generation and the changes that followed it, and a row deleted at the source before G is gone.

Privacy: the files hold personal data in clear, so on a local disk directories are created 0700 and
files 0600 (readable by the OS user running the platform only); on S3 the bucket's policy decides.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stripe_platform.config import ENV_PREFIX, LAKE_FORMS
from stripe_platform.errors import PlatformError
from stripe_platform.rawlayer import RawStream, prepare

if TYPE_CHECKING:
    from stripe_platform.config import Settings

__all__ = ["LakeError", "LakeFile", "LakeUnreachable", "LakeWriter", "StoredFile", "Superseded"]

PARTITION = "extracted_date"
LIVE = "raw"
HISTORY = "superseded"  # a sibling of raw/: never under a reader's table location
GENERATION_COLUMN = "_airbyte_generation_id"
# Also in each file's key-value metadata: a file with no rows has no column statistics to read.
GENERATION_KEY = b"stripe_platform.generation_id"
DIR_MODE = 0o700
FILE_MODE = 0o600
_FOOTER_READERS = 8  # footers read at once when superseding (one small ranged read each on S3)
# Path components: no separators or "=" (hive parsing) and no leading "." or "_", which Hive, Athena
# and Spark treat as hidden files.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FILE = re.compile(r"^(?P<sync_id>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<part>\d+)\.parquet$")
_DATE_DIR = re.compile(rf"^{PARTITION}=(\d{{4}}-\d{{2}}-\d{{2}})$")
_TMP_SUFFIX = ".tmp"


class LakeError(PlatformError, RuntimeError):
    """The lake holds something the writer cannot work with; the message says what to do."""


class LakeUnreachable(LakeError, OSError):
    """The lake's filesystem refused a read or a write (no such bucket, no credentials, a full or
    read-only disk): raised where it happens, with the path and the setting that names the lake,
    and still an OSError for callers that catch one. Other OSErrors of a lake sync (a source's
    TLS file, a cache) are not the lake's, and are not labelled so."""


@dataclass(frozen=True)
class LakeFile:
    """What one write produced: enough for the engine to log it; sync state stays in the warehouse."""

    path: str  # absolute local path, or s3://bucket/key
    rows: int
    bytes: int
    extracted_date: dt.date
    nulled: dict[str, int] = field(default_factory=dict)  # column -> values that did not fit


@dataclass(frozen=True)
class StoredFile:
    """A data file found in the lake, described from its name and listing (no footer read)."""

    path: str
    bytes: int
    extracted_date: dt.date
    sync_id: str
    part: int


@dataclass(frozen=True)
class Superseded:
    """What :meth:`LakeWriter.supersede` moved to the history prefix, and what it left live."""

    files: int
    rows: int
    live_files: int


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"lake {kind} {value!r} cannot be a path component: use letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return value


def _base_filesystem(fs: pafs.FileSystem) -> pafs.FileSystem:
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return fs


def _write_parquet(
    table: pa.Table, sink: pa.NativeFile, compression: str, generation_id: int
) -> None:
    """Plain parquet every engine reads: v2.6 logical types, v1 data pages, microsecond timestamps."""
    schema = table.schema.with_metadata(
        {**(table.schema.metadata or {}), GENERATION_KEY: str(generation_id).encode()}
    )
    writer = pq.ParquetWriter(
        sink,
        schema,
        compression=compression,
        version="2.6",
        data_page_version="1.0",
        coerce_timestamps="us",
        allow_truncated_timestamps=False,
        use_deprecated_int96_timestamps=False,
        write_statistics=True,
        # Dictionary-encoding random ids is wasted work (it falls back to plain after a page).
        use_dictionary=[name for name in table.column_names if name != "_airbyte_raw_id"],
        # A column with more distinct values than fit in 256 KB (a key, a timestamp) gives up on
        # its dictionary sooner than at the default 1 MB: a third less CPU for Transaction's
        # snapshot files, 3.5% larger.
        dictionary_pagesize_limit=256 << 10,
    )
    try:
        writer.write_table(table.replace_schema_metadata(schema.metadata))
    finally:
        writer.close()


def _fsync(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_private_file(path: str) -> None:
    """Create an empty file only its owner can read, before any data goes in (the writer that
    fills it truncates it and keeps its mode). fchmod: exact whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _generation_of(meta: pq.FileMetaData) -> int | None:
    """The newest generation of a file's rows, from its footer; None for a file with no rows and
    no generation recorded (nothing in it can be lost)."""
    names = meta.schema.names
    if GENERATION_COLUMN in names:
        index = names.index(GENERATION_COLUMN)
        newest = None
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            if group.num_rows == 0:
                continue
            stats = group.column(index).statistics
            if stats is None or not stats.has_min_max:
                newest = None  # no statistics: the key below, else the caller reads the column
                break
            newest = stats.max if newest is None else max(newest, stats.max)
        if newest is not None:
            return int(newest)
    recorded = (meta.metadata or {}).get(GENERATION_KEY)
    return int(recorded) if recorded is not None else None


class LakeWriter:
    """Writes raw batches as parquet under ``root`` (a directory or ``s3://bucket/prefix``)."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        filesystem: pafs.FileSystem | None = None,
        *,
        compression: str = "snappy",
        fsync: bool = True,
    ) -> None:
        """``root=None`` means the configured lake (``<platform home>/lake`` by default).

        Pass ``filesystem`` for an S3-compatible endpoint (MinIO, moto); otherwise an ``s3://`` root
        is opened with ``FileSystem.from_uri`` (standard AWS credential chain, bucket region lookup).
        Snappy is the default because every reader (Athena, Snowflake, DuckDB) takes it; ``fsync``
        can be turned off only for throwaway test lakes.
        """
        if root is None:
            from stripe_platform.config import get_settings

            root = get_settings().lake_root
        root_str = os.fspath(root)
        scheme = urlsplit(root_str).scheme if "://" in root_str else ""
        if filesystem is None and scheme:
            filesystem, base = pafs.FileSystem.from_uri(root_str)
        else:
            filesystem = filesystem or pafs.LocalFileSystem()
            base = root_str.split("://", 1)[1] if scheme else root_str
        self.filesystem: pafs.FileSystem = filesystem
        self.compression = compression
        # Renames are atomic on a local disk; anything else is treated as an object store.
        self._local = isinstance(_base_filesystem(filesystem), pafs.LocalFileSystem)
        # fsync and file modes need OS paths, which a SubTreeFileSystem hides.
        self._os_paths = isinstance(filesystem, pafs.LocalFileSystem)
        self._fsync = fsync and self._os_paths
        if isinstance(filesystem, pafs.LocalFileSystem):
            base = str(Path(base).expanduser().resolve())
        self.base = base.rstrip("/") or "/"
        kind = _base_filesystem(filesystem).type_name
        self._prefix = {"s3": "s3://", "gcs": "gs://"}.get(
            kind, "" if self._local else f"{kind}://"
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> LakeWriter:
        """The lake the settings name; ``s3_endpoint_url`` points S3 at MinIO or a stand-in."""
        root = settings.lake_root
        if root.startswith("s3://") and settings.s3_endpoint_url:
            url = urlsplit(settings.s3_endpoint_url)
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            fs = pafs.S3FileSystem(
                endpoint_override=url.netloc,
                scheme=url.scheme or "https",
                region=region or "us-east-1",
            )
            return cls(root, fs)
        return cls(root)

    @contextlib.contextmanager
    def reaching(self, path: str, doing: str = "written") -> Iterator[None]:
        """Around the lake's filesystem calls: an OSError (pyarrow raises it for local and S3
        failures alike) becomes :class:`LakeUnreachable`, naming ``path`` and the variable."""
        try:
            yield
        except OSError as exc:
            raise LakeUnreachable(
                f"{ENV_PREFIX}LAKE_URI: the lake {self.uri(self.base)} cannot be {doing} "
                f"({self.uri(path)}: {exc}); {LAKE_FORMS}"
            ) from exc

    # Paths -----------------------------------------------------------------------------------------
    def stream_dir(self, source: str, stream: RawStream | str) -> str:
        """The stream's live directory inside the filesystem (``<root>/raw/<source>/<stream>``)."""
        name = stream.name if isinstance(stream, RawStream) else stream
        return f"{self.base}/{LIVE}/{_check_name('source', source)}/{_check_name('stream', name)}"

    def history_dir(self, source: str, stream: RawStream | str) -> str:
        """Where superseded generations go (``<root>/superseded/<source>/<stream>``)."""
        name = stream.name if isinstance(stream, RawStream) else stream
        return (
            f"{self.base}/{HISTORY}/{_check_name('source', source)}/{_check_name('stream', name)}"
        )

    def uri(self, path: str) -> str:
        """A filesystem path as users and other engines spell it (``s3://...`` or a local path)."""
        return f"{self._prefix}{path}"

    def duckdb_glob(self, source: str, stream: RawStream | str) -> str:
        """The glob for ``read_parquet(glob, hive_partitioning = true, union_by_name = true)``.

        ``union_by_name`` matters once a stream gains a column: older files simply lack it. Reading
        ``s3://`` globs from DuckDB needs its httpfs extension on the user's machine.
        """
        return self.uri(f"{self.stream_dir(source, stream)}/{PARTITION}=*/*.parquet")

    def history_glob(self, source: str, stream: RawStream | str) -> str:
        """The superseded generations, read like :meth:`duckdb_glob` (partitions ``generation`` and
        ``extracted_date``)."""
        return self.uri(f"{self.history_dir(source, stream)}/generation=*/{PARTITION}=*/*.parquet")

    # Writing ---------------------------------------------------------------------------------------
    def write(
        self,
        source: str,
        stream: RawStream,
        batch: pa.Table,
        *,
        sync_id: str,
        generation_id: int,
        part: int,
        extracted_at: dt.datetime | None = None,
    ) -> LakeFile:
        """Type ``batch`` like the raw tables and write it as one file, atomically.

        Pass the sync's start as ``extracted_at`` so a retried part lands in the same partition and
        replaces its file even across midnight UTC; by default it is now.
        """
        _check_name("sync id", sync_id)
        if part < 0:
            raise ValueError(f"part must be >= 0, got {part}")
        if extracted_at is None:
            extracted_at = dt.datetime.now(dt.UTC)
        elif extracted_at.tzinfo is None:
            raise ValueError("extracted_at must be timezone-aware (UTC is what lands in the files)")
        extracted_at = extracted_at.astimezone(dt.UTC)
        typed, nulled = prepare(
            stream, batch, sync_id=sync_id, generation_id=generation_id, extracted_at=extracted_at
        )
        day = extracted_at.date()
        directory = f"{self.stream_dir(source, stream)}/{PARTITION}={day.isoformat()}"
        final = f"{directory}/{sync_id}-{part}.parquet"
        if self._local:
            with self.reaching(final):
                size = self._write_local(
                    lambda out: _write_parquet(typed, out, self.compression, generation_id), final
                )
        else:
            buffer = pa.BufferOutputStream()
            _write_parquet(typed, buffer, self.compression, generation_id)
            with self.reaching(final):
                size = self._write_object(buffer.getvalue(), final)
        return LakeFile(self.uri(final), typed.num_rows, size, day, nulled)

    def put_bytes(self, path: str, data: bytes) -> None:
        """Write a small file (sync state) under ``path`` inside the lake, atomically and privately,
        with the same rules as the data files."""
        if not path.startswith(f"{self.base}/"):
            raise ValueError(f"{path!r} is not inside the lake {self.base!r}")
        with self.reaching(path):
            if self._local:
                self._write_local(lambda out: out.write(data), path)
            else:
                self._write_object(pa.py_buffer(data), path)

    def get_bytes(self, path: str) -> bytes | None:
        """A small file inside the lake (sync state) as :meth:`put_bytes` wrote it; None if absent."""
        with self.reaching(path, "read"):
            if self.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            with self.filesystem.open_input_stream(path) as f:
                return f.read()

    def _private_dir(self, directory: str) -> None:
        """Create ``directory`` and its missing parents; those inside the lake (the root included,
        when it is created here) 0700, and existing ones below the root tightened to 0700 if this
        user owns them (lakes written before modes were enforced). Parents above the root keep the
        default mode: the platform home must stay reachable by the cluster's OS user."""
        if not self._os_paths:
            self.filesystem.create_dir(directory, recursive=True)
            return
        if directory != self.base and not directory.startswith(f"{self.base}/"):
            raise ValueError(f"{directory!r} is not inside the lake {self.base!r}")
        created = []
        if not os.path.isdir(self.base):
            os.makedirs(os.path.dirname(self.base), exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.base, DIR_MODE)
                os.chmod(self.base, DIR_MODE)  # exact, whatever the umask
                created.append(self.base)
        path = self.base
        for part in directory[len(self.base) :].strip("/").split("/"):
            if not part:
                continue
            path = f"{path}/{part}"
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                info = os.stat(path)
                if info.st_mode & 0o777 != DIR_MODE and info.st_uid == os.geteuid():
                    os.chmod(path, DIR_MODE)
            else:
                os.chmod(path, DIR_MODE)
                created.append(path)
        if self._fsync:  # a new directory is durable once its parent's entry is
            for new in created:
                _fsync(os.path.dirname(new), directory=True)

    def _write_local(self, fill: Callable[[pa.NativeFile], object], final: str) -> int:
        """Hidden temporary name in the same directory, fsync, rename: readers see all or nothing."""
        fs = self.filesystem
        directory, _, name = final.rpartition("/")
        self._private_dir(directory)
        tmp = f"{directory}/.{name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            if self._os_paths:
                _create_private_file(tmp)
            with fs.open_output_stream(tmp) as out:
                fill(out)
            if self._fsync:
                _fsync(tmp)
            fs.move(tmp, final)  # rename(2): atomic, replaces a previous delivery
            if self._fsync:
                _fsync(directory, directory=True)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise
        return fs.get_file_info(final).size

    def _write_object(self, data: pa.Buffer, final: str) -> int:
        """Upload a serialised file once.

        Streaming parquet straight into an S3 output stream is unsafe: if serialisation fails, closing
        the stream completes the upload and publishes a truncated object under the final name.
        """
        with self.filesystem.open_output_stream(final) as out:
            out.write(data)
        return data.size

    # Reading back ----------------------------------------------------------------------------------
    def list_files(self, source: str, stream: RawStream | str) -> list[StoredFile]:
        """The stream's live data files, oldest partition first; temporary files are left out."""
        return [
            StoredFile(self.uri(path), size, date, sync_id, part)
            for path, size, date, sync_id, part in self._data_files(source, stream)
        ]

    def _data_files(
        self, source: str, stream: RawStream | str
    ) -> list[tuple[str, int, dt.date, str, int]]:
        """(filesystem path, bytes, extracted date, sync id, part) of each live data file."""
        directory = self.stream_dir(source, stream)
        selector = pafs.FileSelector(directory, recursive=True, allow_not_found=True)
        with self.reaching(directory, "read"):
            listed = self.filesystem.get_file_info(selector)
        found = []
        for info in listed:
            if info.type != pafs.FileType.File:
                continue
            parent, _, name = info.path.rpartition("/")
            date = _DATE_DIR.match(parent.rpartition("/")[2])
            match = _FILE.match(name)
            if not (date and match):
                continue
            found.append(
                (
                    info.path,
                    info.size,
                    dt.date.fromisoformat(date.group(1)),
                    match["sync_id"],
                    int(match["part"]),
                )
            )
        return sorted(found, key=lambda f: (f[2], f[3], f[4]))

    # Generations -----------------------------------------------------------------------------------
    def supersede(self, source: str, stream: RawStream, generation_id: int) -> Superseded:
        """Call once every row of generation ``generation_id`` is written (a complete snapshot or
        full refresh): move each live file whose rows are all of an older generation to
        ``superseded/<source>/<stream>/generation=<g>/extracted_date=.../`` under the same name.

        Each file's generation is read from its own footer (the ``_airbyte_generation_id``
        statistics), so the files of an attempt that died half-way are superseded too, and lakes
        written before this existed need nothing else. Each move is atomic for readers (a rename
        locally; on S3 a server-side copy, then the delete, so a file is never in neither place).
        Moves are idempotent: if this fails half-way, the next call (with this generation or a
        later one) finishes the job. Files of ``generation_id`` or newer are never touched; if there
        is none (the source table is empty), an empty file of this generation is written first, so
        readers get no rows rather than the old ones, and a glob still matches a file.
        """
        files = self._data_files(source, stream)
        with ThreadPoolExecutor(_FOOTER_READERS) as pool:
            footers = list(pool.map(lambda f: self._footer(f[0]), files))
        older = [
            (file, generation, rows)
            for file, (generation, rows) in zip(files, footers, strict=True)
            if generation is None or generation < generation_id
        ]
        live = len(files) - len(older)
        if live == 0:
            self.write(
                source,
                stream,
                pa.table({}),
                sync_id=f"empty-{generation_id}",
                generation_id=generation_id,
                part=0,
            )
            live = 1
        history = self.history_dir(source, stream)
        moves = [
            (
                path,
                f"{history}/generation={generation if generation is not None else 0}"
                f"/{PARTITION}={date.isoformat()}/{path.rpartition('/')[2]}",
            )
            for (path, _, date, _, _), generation, _ in older
        ]
        with self.reaching(history):
            if self._local:
                self._move_local(moves)
            else:
                with ThreadPoolExecutor(_FOOTER_READERS) as pool:
                    list(pool.map(lambda m: self._move_object(*m), moves))
        return Superseded(len(older), sum(rows for _, _, rows in older), live)

    def _footer(self, path: str) -> tuple[int | None, int]:
        """(newest generation of the file's rows, row count)."""
        try:
            with self.filesystem.open_input_file(path) as f:
                meta = pq.read_metadata(f)
                generation = _generation_of(meta)
                if generation is None and meta.num_rows:  # rows but no statistics: read them
                    column = pq.read_table(f, columns=[GENERATION_COLUMN]).column(0)
                    generation = pc.max(column).as_py()
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise LakeError(
                f"lake file {self.uri(path)} cannot be read to find its generation ({exc}); "
                "move it out of the live prefix or delete it, then sync again"
            ) from exc
        return generation, meta.num_rows

    def _move_local(self, moves: list[tuple[str, str]]) -> None:
        """rename(2) each file (atomic), then fsync the directories involved once; a date directory
        left empty is removed (rmdir only ever removes an empty one)."""
        touched: set[str] = set()
        for source, target in moves:
            self._private_dir(target.rpartition("/")[0])
            self.filesystem.move(source, target)
            touched.update((source.rpartition("/")[0], target.rpartition("/")[0]))
        if not self._os_paths:
            return
        for directory in sorted(touched):
            if os.path.isdir(directory):
                if self._fsync:
                    _fsync(directory, directory=True)
                if _DATE_DIR.match(directory.rpartition("/")[2]) and directory.startswith(
                    f"{self.base}/{LIVE}/"
                ):
                    with contextlib.suppress(OSError):
                        os.rmdir(directory)

    def _move_object(self, source: str, target: str) -> None:
        """A server-side copy, then the delete: a crash in between leaves the file in both places
        and the next supersede copies it again (same bytes) and deletes it."""
        self.filesystem.copy_file(source, target)
        self.filesystem.delete_file(source)

    def sweep_temporary(
        self,
        source: str,
        stream: RawStream | str,
        *,
        older_than: dt.timedelta = dt.timedelta(hours=1),
    ) -> int:
        """Delete temporary files a killed process left behind in the stream's live directory
        (readers ignore them, but they hold the batch's rows): those not modified for
        ``older_than``, so a write under way is left alone. Were one deleted anyway (a writer
        paused that long), its rename fails, and the sync with it, before any state is saved."""
        if not self._local:
            return 0  # object stores never see a temporary name
        cutoff = dt.datetime.now(dt.UTC) - older_than
        directory = self.stream_dir(source, stream)
        selector = pafs.FileSelector(directory, recursive=True, allow_not_found=True)
        removed = 0
        with self.reaching(directory, "read"):
            listed = self.filesystem.get_file_info(selector)
        for info in listed:
            name = info.base_name
            if (
                info.type == pafs.FileType.File
                and name.startswith(".")
                and name.endswith(_TMP_SUFFIX)
                and info.mtime is not None
                and info.mtime.astimezone(dt.UTC) < cutoff
            ):
                with contextlib.suppress(FileNotFoundError):  # another sweep got it first
                    self.filesystem.delete_file(info.path)
                    removed += 1
        return removed

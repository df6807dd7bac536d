"""DCP's storage with block checksums: ``torch.distributed.checkpoint``'s fsspec file system (a local
path or ``s3://`` alike) that records a CRC-32 of every ``CRC_BLOCK``-byte block of each file as it is
written (``Store.written``, for the manifests) and reads files in whole blocks, each checked against the
manifest's CRC (``CorruptCheckpoint`` names the file and the bytes that changed). A rank restoring
fetches only the blocks that hold its own tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import zlib
from dataclasses import dataclass

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem

from hierdino import storage
from hierdino.storage import StorageOptions

CRC_BLOCK = 16 << 20


class CorruptCheckpoint(Exception):
    """A checkpoint file's bytes differ from the checksums its manifest recorded when it was written."""


@dataclass
class FileChecksums:
    size: int
    crcs: list[int] | None   # CRC-32 of each ``block``-byte block, as written (None: a manifest without them)
    block: int = CRC_BLOCK

    def check(self, where: str, index: int, data: bytes) -> None:
        """Raise ``CorruptCheckpoint`` when block ``index`` (``data``) of the file at ``where`` changed."""
        if self.crcs is not None and zlib.crc32(data) != self.crcs[index]:
            start = index * self.block
            raise CorruptCheckpoint(f"{where}: bytes {start}-{start + len(data) - 1} differ from when they were written "
                                    f"(CRC-32 {zlib.crc32(data):08x}, the manifest's {self.crcs[index]:08x})")


class BlockCrc:
    """Size and CRC-32 of each ``CRC_BLOCK``-byte block of a byte stream, fed as it is written."""

    def __init__(self, data: bytes = b""):
        self.size, self.crcs = 0, []
        self.update(data)

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            fill = self.size % CRC_BLOCK
            part, view = view[:CRC_BLOCK - fill], view[CRC_BLOCK - fill:]
            self.crcs.append(zlib.crc32(part, self.crcs.pop() if fill else 0))
            self.size += len(part)


class _Tee:
    """A stream being written whose bytes also feed a ``BlockCrc``."""

    def __init__(self, raw, crc: BlockCrc):
        self.raw, self.crc = raw, crc

    def write(self, data):
        self.crc.update(data)
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


class CheckedFile(io.RawIOBase):
    """A checkpoint file read in whole blocks (``fetch``), each checked against its manifest's CRC."""

    def __init__(self, fs, path: str, where: str, sums: FileChecksums):
        self.fs, self.path, self.where, self.sums, self.pos, self.blocks = fs, path, where, sums, 0, {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (0, self.pos, self.sums.size)[whence] + offset
        return self.pos

    def readinto(self, buf) -> int:
        out, done = memoryview(buf).cast("B"), 0
        while done < len(out) and self.pos < self.sums.size:
            index, block = divmod(self.pos, self.sums.block)
            data = self._block(index)[block:block + len(out) - done]
            out[done:done + len(data)] = data
            done, self.pos = done + len(data), self.pos + len(data)
        return done

    def _block(self, index: int) -> bytes:
        if index not in self.blocks:
            start = index * self.sums.block
            data = fetch(self.fs, self.path, start, min(start + self.sums.block, self.sums.size), self.where)
            self.sums.check(self.where, index, data)
            self.blocks[index] = data
            # ``Reader`` takes a file's items in order (torch.load reads each item's end first): the lowest go
            while len(self.blocks) > 1 and len(self.blocks) * self.sums.block > 64 << 20:
                del self.blocks[min(self.blocks)]
        return self.blocks[index]


def fetch(fs, path: str, start: int, end: int, where: str) -> bytes:
    """Bytes ``[start, end)`` of the file at ``path`` (retried within the store's retry window)."""
    return storage.with_retries(lambda: fs.cat_file(path, start=start, end=end), where, "read")


class Store(FileSystem):
    """DCP's fsspec ``FileSystem`` for the checkpoint at ``uri``: records the checksums of the files it
    writes (``written``) and reads the files listed in ``files`` checked block by block."""

    def __init__(self, uri: str, options: StorageOptions | None, files: dict[str, FileChecksums] | None = None):
        super().__init__()
        self.uri, self.files, self.written = uri, files or {}, {}
        kwargs = (options or StorageOptions()).fsspec_kwargs() if storage.is_s3(uri) else {}
        self.root = self.init_path(uri if storage.is_s3(uri) else storage.resolve(uri)[1], **kwargs)

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        name = str(path).rsplit("/", 1)[-1].removesuffix(".tmp")  # DCP writes .metadata.tmp, then renames it
        if mode == "wb":
            with super().create_stream(path, mode) as raw:
                self.written[name] = crc = BlockCrc()  # a retried save starts the file again
                yield _Tee(raw, crc)
        elif name in self.files:
            yield CheckedFile(self.fs, str(path), storage.join(self.uri, name), self.files[name])
        else:
            with super().create_stream(path, mode) as raw:
                yield raw


class Writer(dcp.FileSystemWriter):
    def __init__(self, store: Store):
        super().__init__(store.root, sync_files=not storage.is_s3(store.uri))
        self.fs, self.path = store, store.root


class Reader(dcp.FileSystemReader):
    def __init__(self, store: Store):
        super().__init__(store.root)
        self.fs, self.path = store, store.root

    def read_data(self, plan, planner):
        """DCP's read, each file's items taken in the order they lie in it: a block is fetched once."""
        where = {i.storage_index: (self.storage_data[i.storage_index].relative_path,
                                   self.storage_data[i.storage_index].offset) for i in plan.items}
        return super().read_data(dataclasses.replace(plan, items=sorted(plan.items, key=lambda i: where[i.storage_index])),
                                 planner)

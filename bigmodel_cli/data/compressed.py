"""Reading a (maybe compressed) UTF-8 text file as lines or blocks: .gz, .bz2, .xz and .zst, with truncated or
corrupt files refused in one line."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from collections.abc import Iterator
from pathlib import Path

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError

COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")


class _ZstdFrames(io.RawIOBase):
    """A .zst file's frames decompressed one after another, refusing a file that ends inside a frame: the
    zstandard stream reader returns a truncated file's start as if it were the whole file."""

    def __init__(self, raw, decompressor):
        self._raw, self._zstd = raw, decompressor
        self._frame = None  # the decompressor of the frame being read; None between frames
        self._out, self._pos = b"", 0  # decompressed bytes not yet handed on

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self._pos == len(self._out):
            data = self._raw.read(1 << 15)  # small: what it decompresses to is held whole (text packs ~10x)
            if not data:
                if self._frame is not None:
                    raise EOFError("Compressed file ended before the end of its last zstd frame was reached")
                return 0
            self._out, self._pos = b"", 0
            while data:  # one read may end a frame and start the next
                if self._frame is None:
                    self._frame = self._zstd.decompressobj()
                self._out += self._frame.decompress(data)
                data = b""
                if self._frame.eof:
                    data, self._frame = self._frame.unused_data, None
        n = min(len(buf), len(self._out) - self._pos)
        buf[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _decompressed(raw, compression: str, name: str):
    """The decompressing reader over an open binary file, which its opener closes (gzip, bz2 and lzma leave a
    file object they are given open)."""
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == ".bz2":
        return bz2.BZ2File(raw)
    if compression == ".xz":
        return lzma.LZMAFile(raw)
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{name}: reading .zst needs the zstandard package: pip install zstandard") from None
        return _ZstdFrames(raw, zstandard.ZstdDecompressor())
    return raw


def read_text(path: Path, compression: str, name: str, block: int | None) -> Iterator[str]:
    """A (maybe compressed) UTF-8 text file as lines (block None) or blocks of that many characters, newlines
    normalised to \\n; bad input raises a UserError."""
    try:
        with (
            storage.path(path).open("rb") as raw,  # a gs:// object streams
            io.TextIOWrapper(
                io.BufferedReader(_decompressed(raw, compression, name)), encoding="utf-8", newline=None
            ) as f,
        ):
            for text in f if block is None else iter(lambda: f.read(block), ""):
                if "\x00" in text:
                    raise UserError(f"{name} looks binary (it holds NUL bytes): pass text files only")
                yield text
    except UnicodeDecodeError:
        raise UserError(f"{name} is not UTF-8 text: convert it (e.g. iconv -t utf-8) or leave it out") from None
    except (OSError, EOFError, lzma.LZMAError) as err:
        if isinstance(err, FileNotFoundError | PermissionError):
            raise
        raise UserError(f"{name} is not a valid {compression or 'text'} file ({err}): check it") from None
    except Exception as err:  # zstandard.ZstdError
        if type(err).__module__.startswith("zstandard"):
            raise UserError(f"{name} is not a valid .zst file ({err}): check it") from None
        raise

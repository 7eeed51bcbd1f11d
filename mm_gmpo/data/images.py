"""Reading images from data: checked before and while decoding, so that a bad image is a DataError naming its file,
row and field when the data loads, never a crash in the middle of training.

- Only the formats in :data:`ALLOWED_FORMATS` are decoded: PIL otherwise picks a decoder by content, and some
  (EPS) start external programs. Anything else is a DataError naming the format PIL recognises.
- A file is checked before it is opened (a regular, non-empty file under :data:`MAX_FILE_BYTES`: no FIFO, device
  or /proc file can block or flood a read), opened non-blocking, and PIL reads its header from the file: nothing is
  read whole before the header and the pixel cap are checked.
- :class:`ImageStore` keeps one decoded image per distinct file or byte string, already fitted to the processor's
  pixel budget (:class:`ImageFit`), and counts the memory the dataset's images hold.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mm_gmpo.data.prompts import DataError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_PIXELS = 64 * 1024 * 1024  # width x height read from the header before decoding (a decompression bomb stops)
MAX_ASPECT_RATIO = 200  # qwen-vl-utils' smart_resize refuses longer / shorter sides past this ratio
MAX_FILE_BYTES = 128 * 2**20  # an image file (or byte string) larger than this is refused before it is read


@dataclass(frozen=True)
class ImageFit:
    """The pixel budget the processor will resize to (``data.min_pixels`` / ``max_pixels``, the family's patch):
    images are kept at that size from the start, so the dataset never holds full-size pictures. Fitting is
    idempotent: the trainer's own resize of a fitted image returns it unchanged."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14

    def __call__(self, image: Image.Image) -> Image.Image:
        from mm_gmpo.data.processing import resize_image

        return resize_image(image, self.min_pixels, self.max_pixels, self.patch_size)


def _format_name(prefix: bytes) -> str:
    """The format PIL would take ``prefix`` (a file's first bytes) for, by its plugins' signature checks only."""
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # a plugin's check on bytes it does not expect
            continue
    return "unknown"


def _decode(fp, where: str) -> Image.Image:
    """Decode from an open binary file object: allow-listed formats only, header checks first, then everything."""
    try:
        with Image.open(fp, formats=ALLOWED_FORMATS) as im:
            w, h = im.size  # from the header, nothing decoded yet
            if w * h > MAX_PIXELS:
                raise DataError(f"{where}: a {w} x {h} image ({w * h / 1e6:.0f} M pixels) is over the "
                                f"{MAX_PIXELS / 1e6:.0f} M pixel cap; shrink it or drop the row")
            if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                raise DataError(f"{where}: a {w} x {h} image; the Qwen-VL processors take aspect ratios up to "
                                f"{MAX_ASPECT_RATIO}: pad or crop it")
            im.load()  # decode everything now: a truncated file with a valid header fails here
            return im.convert("RGB")
    except UnidentifiedImageError:
        fp.seek(0)
        fmt = _format_name(fp.read(64))
        what = "no image format PIL knows" if fmt == "unknown" else f"format {fmt}"
        raise DataError(f"{where} is not a readable image ({what}); images must be {', '.join(ALLOWED_FORMATS[:-1])} or "
                        f"{ALLOWED_FORMATS[-1]} (other decoders are not used: some run external programs). Convert "
                        "it to PNG, or use data.on_bad_sample=skip") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where} is not a readable image ({type(e).__name__}: {e}); replace it or use "
                        "data.on_bad_sample=skip") from None


def decode_image(data: bytes, where: str) -> Image.Image:
    """The image in ``data``, decoded in full as RGB. ``where`` names the file, row and field for the error."""
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{where}: {len(data) / 2**20:.0f} MiB of image bytes, over the {MAX_FILE_BYTES >> 20} MiB "
                        "cap; shrink the image")
    return _decode(io.BytesIO(data), where)


def _open_checked(path: Path, where: str, cap: int = MAX_FILE_BYTES, kind: str = "image"):
    """``path`` opened for reading, checked before it is opened: a regular file (no FIFO, socket or device, whose
    read could block), not empty (as /proc files report themselves), not over the size cap; opened non-blocking
    and checked again on the open descriptor (the file opened is the file checked)."""
    try:
        _check_regular(os.stat(path), path, where, cap, kind)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise DataError(f"{where}: {kind} file {path} not found (relative paths start at data.image_dir, else at "
                        "the data file's folder)") from None
    except OSError as e:
        raise DataError(f"{where}: {path} cannot be read ({e.strerror or e})") from None
    f = os.fdopen(fd, "rb")
    try:
        _check_regular(os.fstat(fd), path, where, cap, kind)
    except DataError:
        f.close()
        raise
    return f


def read_image_file(path: Path, where: str) -> Image.Image:
    """The image file at ``path``, decoded in full as RGB; PIL reads the header from the file."""
    with _open_checked(path, where) as f:
        return _decode(f, _named(where, path))


def image_file_bytes(path: Path, where: str) -> bytes:
    """The bytes of the image file at ``path``, after it decoded as an allowed image."""
    with _open_checked(path, where) as f:
        _decode(f, _named(where, path))
        f.seek(0)
        try:
            return f.read()
        except OSError as e:
            raise DataError(f"{where}: {path} cannot be read ({e.strerror or e})") from None


def _named(where: str, path: Path) -> str:
    return where if str(path) in where else f"{where}: {path}"


def _check_regular(st: os.stat_result, path: Path, where: str, cap: int = MAX_FILE_BYTES, kind: str = "image") -> None:
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{_named(where, path)} is not a regular file; {kind}s are read from regular files only")
    if st.st_size == 0:
        raise DataError(f"{_named(where, path)} is empty (or a special file that reports no size); replace it")
    if st.st_size > cap:
        raise DataError(f"{where}: {path} has {st.st_size / 2**20:.0f} MiB, over the {cap >> 20} MiB "
                        f"cap for {kind} files; shrink it")


class ImageStore:
    """Decoded images, one per distinct file or byte string, fitted to ``fit`` (when given) as they are read. Rows
    that name the same picture share one image object, so the memory is bounded by the distinct pictures at the
    processor's size, not by rows x full size. :attr:`nbytes` counts what it holds."""

    def __init__(self, fit: ImageFit | None = None):
        self.fit = fit
        self._images: dict[tuple, Image.Image] = {}

    def _keep(self, key: tuple, image: Image.Image) -> Image.Image:
        image = self.fit(image) if self.fit is not None else image
        self._images[key] = image
        return image

    def file(self, path: Path, where: str) -> Image.Image:
        try:
            st = os.stat(path)
            key = ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None  # read_image_file names the problem
        if key is not None and key in self._images:
            return self._images[key]
        image = read_image_file(path, where)
        return self._keep(key, image) if key is not None else image

    def bytes(self, data: bytes, where: str) -> Image.Image:
        key = ("bytes", hashlib.blake2b(data, digest_size=16).digest())
        if key in self._images:
            return self._images[key]
        return self._keep(key, decode_image(data, where))

    def pil(self, image: Image.Image, where: str) -> Image.Image:
        try:
            image.load()
            image = image.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"{where} holds an image that cannot be decoded ({e})") from None
        return self.fit(image) if self.fit is not None else image

    @property
    def count(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        return sum(im.width * im.height * len(im.getbands()) for im in self._images.values())

    def summary(self) -> str:
        size = f"{self.nbytes / 2**20:.1f} MiB" if self.nbytes >= 2**20 else f"{self.nbytes / 2**10:.0f} KiB"
        return f"{self.count} distinct image(s), {size} decoded"

"""Decoding images from data files: checked before and while decoding, so that a bad image is a DataError naming
its file and field when the data loads, never a crash in the middle of training."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from mm_gmpo.data.prompts import DataError

MAX_PIXELS = 64 * 1024 * 1024  # width x height read from the header before decoding (a decompression bomb stops)
MAX_ASPECT_RATIO = 200  # qwen-vl-utils' smart_resize refuses longer / shorter sides past this ratio


def decode_image(data: bytes, where: str) -> Image.Image:
    """The image in ``data``, decoded in full as RGB. ``where`` names the file, row and field for the error."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size  # from the header, nothing decoded yet
            if w * h > MAX_PIXELS:
                raise DataError(f"{where}: a {w} x {h} image ({w * h / 1e6:.0f} M pixels) is over the "
                                f"{MAX_PIXELS / 1e6:.0f} M pixel cap; shrink it or drop the row")
            if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                raise DataError(f"{where}: a {w} x {h} image; the Qwen-VL processors take aspect ratios up to "
                                f"{MAX_ASPECT_RATIO}: pad or crop it")
            im.load()  # decode everything now: a truncated file with a valid header fails here
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = "not an image format PIL reads" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{where} is not a readable image ({reason}); replace it or use data.on_bad_sample=skip") \
            from None

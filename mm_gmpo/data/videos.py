"""Video clips from data: a video file, a folder of frame images or a list of frames, decoded in this process and
kept at the processor's size, so a broken clip is a DataError naming its file, row and field when the data loads.

Frames are chosen as qwen-vl-utils chooses them (its ``smart_nframes`` at ``data.video_fps``, capped at
``data.video_max_frames``, then evenly spaced indices) and resized by its rule (``smart_resize``: sides a multiple
of 2 x patch size, pixels per frame within ``data.video_min_pixels`` / ``video_max_pixels`` and the prompt's token
budget, ``total_pixels`` in qwen-vl-utils), so training sees the frames inference would.

Untrusted files: only MP4/MOV, Matroska/WebM and AVI containers are opened, and the container is chosen from the
file's first bytes, never probed by FFmpeg (whose playlist and concat demuxers would open other files or URLs);
FFmpeg decodes in-process (PyAV), no program is started. The header's frame count and size are checked against
:data:`MAX_CLIP_BYTES` before any frame is decoded, and decoding stops at the last frame the clip needs. A file that
ends before that frame (truncated), has no video stream, no frames, or a codec this FFmpeg lacks is a DataError.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mm_gmpo.data.images import MAX_PIXELS, _open_checked, read_image_file
from mm_gmpo.data.prompts import DataError

MAX_VIDEO_FILE_BYTES = 4 * 2**30  # a video file larger than this is refused before it is read
MAX_CLIP_BYTES = 2 * 2**30  # the sampled frames at the source's size (RGB bytes), checked before decoding
FRAME_FACTOR = 2  # frames come in pairs: Qwen-VL's temporal patch is 2 frames (qwen-vl-utils' FRAME_FACTOR)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class VideoFit:
    """How clips are sampled and sized (``data.video_*``): ``fps`` frames per second of video, at most
    ``max_frames``; each frame resized to within [min_pixels, max_pixels] (and ``total_pixels`` over the clip,
    qwen-vl-utils' budget rule), sides a multiple of 2 x ``patch_size``."""

    fps: float = 2.0
    max_frames: int = 64
    min_pixels: int = 3136
    max_pixels: int = 262_144
    patch_size: int = 14
    total_pixels: int | None = None

    def frame_size(self, height: int, width: int, n_frames: int) -> tuple[int, int]:
        """qwen-vl-utils' resize rule for a clip of ``n_frames`` frames of ``height`` x ``width``."""
        from qwen_vl_utils.vision_process import smart_resize

        max_pixels = self.max_pixels
        if self.total_pixels:  # the prompt's budget, shared by the clip's frame pairs (qwen-vl-utils' rule)
            max_pixels = max(min(max_pixels, self.total_pixels / n_frames * FRAME_FACTOR), int(self.min_pixels * 1.05))
        return smart_resize(height, width, factor=2 * self.patch_size, min_pixels=self.min_pixels,
                            max_pixels=int(max_pixels))

    def n_frames(self, total: int, fps: float) -> int:
        """qwen-vl-utils' frame count for a source of ``total`` frames at ``fps``."""
        from qwen_vl_utils.vision_process import smart_nframes

        cap = min(self.max_frames, total)
        return smart_nframes({"fps": self.fps, "max_frames": max(cap, FRAME_FACTOR)}, total_frames=total,
                             video_fps=fps)


@dataclass(eq=False)
class Clip:
    """A clip as the model sees it: ``frames`` (T, 3, H, W) uint8 at the processor's size, T even; ``indices`` of
    those frames in the source of ``total_frames`` frames at ``fps`` (index / fps = the frame's time in seconds)."""

    frames: torch.Tensor
    fps: float
    indices: tuple[int, ...]
    total_frames: int
    key: str = ""

    def __post_init__(self):
        if not self.key:
            h = hashlib.blake2b(self.frames.numpy().tobytes(), digest_size=16)
            h.update(f"{tuple(self.frames.shape)}{self.fps}{self.indices}".encode())
            self.key = h.hexdigest()

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def nbytes(self) -> int:
        return self.frames.numel()

    @property
    def sample_fps(self) -> float:
        """Frames kept per second of video (qwen-vl-utils' and transformers' ``sampled_fps``); Qwen2.5-VL's
        ``second_per_grid_ts`` is temporal patch / sample_fps."""
        return len(self.indices) / self.total_frames * self.fps

    def metadata(self) -> dict[str, Any]:
        """transformers' ``VideoMetadata`` of the clip: what the processors (transformers', vLLM's) read Qwen3-VL's
        timestamps and Qwen2.5-VL's seconds per temporal patch from."""
        return {"fps": self.fps, "frames_indices": list(self.indices), "total_num_frames": self.total_frames}

    def timestamps(self, temporal_patch: int = 2) -> list[float]:
        """Seconds at the middle of each temporal patch (Qwen3-VL writes ``<t seconds>`` before each): the rule of
        Qwen3-VL's released processor (transformers 4.57) and of vLLM."""
        idx = list(self.indices)
        if len(idx) % temporal_patch:
            idx += [idx[-1]] * (temporal_patch - len(idx) % temporal_patch)
        ts = [i / self.fps for i in idx]
        return [(ts[k] + ts[k + temporal_patch - 1]) / 2 for k in range(0, len(ts), temporal_patch)]


def fit_frames(frames: torch.Tensor, fit: VideoFit) -> torch.Tensor:
    """(T, 3, H, W) uint8 frames resized by qwen-vl-utils' rule (bicubic, antialiased), rounded back to uint8."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    h, w = fit.frame_size(int(frames.shape[2]), int(frames.shape[3]), int(frames.shape[0]))
    if (h, w) == tuple(frames.shape[2:]):
        return frames.contiguous()
    out = TF.resize(frames.float(), [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def _even(frames: list, where: str) -> list:
    if not frames:
        raise DataError(f"{where}: the clip has no frames; give at least one")
    if len(frames) % FRAME_FACTOR:  # qwen-vl-utils pads an odd count with the last frame
        frames = frames + [frames[-1]] * (FRAME_FACTOR - len(frames) % FRAME_FACTOR)
    return frames


def _spread(total: int, max_frames: int) -> list[int]:
    """Evenly spaced indices of at most ``max_frames`` (even) of ``total`` frames, as qwen-vl-utils spaces them."""
    if total <= max_frames:
        return list(range(total))
    n = max(max_frames // FRAME_FACTOR * FRAME_FACTOR, FRAME_FACTOR)
    return torch.linspace(0, total - 1, n).round().long().tolist()


def clip_from_frames(frames: torch.Tensor, fit: VideoFit, where: str = "clip", fps: float | None = None,
                     indices: list[int] | None = None, total: int | None = None) -> Clip:
    """A clip from frames already sampled at ``fps`` (default ``fit.fps``), (T, 3, H, W) uint8: all of them, or
    evenly spaced ones when there are more than ``fit.max_frames``. ``indices`` / ``total``: the frames given are
    those of a longer sequence of ``total`` (their times stay right)."""
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise DataError(f"{where}: frames must be a (T, 3, H, W) uint8 tensor, got {tuple(frames.shape)} "
                        f"{frames.dtype}")
    if indices is None:
        indices, total = _spread(int(frames.shape[0]), fit.max_frames), int(frames.shape[0])
        frames = frames[indices]
    kept = _even(list(frames), where)
    pad = len(kept) - len(indices)  # an odd count gets its last frame twice, counted as one more frame of the
    indices = list(indices) + [indices[-1]] * pad  # sequence (qwen-vl-utils' frame lists: the rate stays fps)
    return Clip(fit_frames(torch.stack(kept), fit), float(fps or fit.fps), tuple(indices), int(total) + pad)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_frame_images(paths: list[Path], fit: VideoFit, where: str) -> Clip:
    """A clip from frame image files (in the order given), taken at ``fit.fps``: only the frames the clip keeps are
    decoded, and their decoded size counts against :data:`MAX_CLIP_BYTES`."""
    import numpy as np

    if not paths:
        raise DataError(f"{where}: the clip has no frames; give at least one image")
    indices = _spread(len(paths), fit.max_frames)
    frames, held = [], 0
    for i in indices:
        im = read_image_file(paths[i], where).convert("RGB")
        if frames and (im.height, im.width) != tuple(frames[0].shape[1:]):
            raise DataError(f"{where}: frame {paths[i]} is {im.width}x{im.height}, the clip's first frame "
                            f"{frames[0].shape[2]}x{frames[0].shape[1]}; frames of one clip must be the same size")
        held += im.width * im.height * 3
        if held > MAX_CLIP_BYTES:
            raise DataError(f"{where}: the clip's frames would take over the {MAX_CLIP_BYTES >> 30} GiB cap decoded; "
                            "lower data.video_max_frames or shrink the frames")
        frames.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return clip_from_frames(torch.stack(frames), fit, where, indices=indices, total=len(paths))


def read_frame_folder(folder: Path, fit: VideoFit, where: str) -> Clip:
    """A clip from a folder of extracted frames (image files, in natural name order: frame_2 before frame_10)."""
    try:
        names = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                       key=lambda p: _natural(p.name))
    except OSError as e:
        raise DataError(f"{where}: frame folder {folder} cannot be listed ({e.strerror or e})") from None
    if not names:
        raise DataError(f"{where}: frame folder {folder} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
    return read_frame_images(names, fit, f"{where}: {folder}")


def _container(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file's first bytes: MP4/MOV, Matroska/WebM or AVI; None for anything else."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def read_video_file(path: Path, fit: VideoFit, where: str) -> Clip:
    """The frames of a video file that the clip needs (qwen-vl-utils' choice), decoded in this process."""
    import av

    named = where if str(path) in where else f"{where}: {path}"
    with _open_checked(path, where, MAX_VIDEO_FILE_BYTES, "video") as f:
        fmt = _container(f.read(12))
        if fmt is None:
            raise DataError(f"{named} is not a video container mm_gmpo reads (MP4/MOV, Matroska/WebM, AVI); "
                            "convert it, or give a folder of frame images")
        f.seek(0)
        try:
            with av.open(f, mode="r", format=fmt, metadata_errors="ignore") as container:
                return _decode(container, fit, named)
        except av.error.EOFError:
            raise DataError(f"{named} ends before its first frame (zero frames, or truncated); re-encode or drop "
                            "it") from None
        except av.FFmpegError as e:
            raise DataError(f"{named} cannot be decoded as video ({type(e).__name__}: {e}); re-encode it (e.g. "
                            "H.264 in MP4) or give a folder of frame images") from None


def _decode(container, fit: VideoFit, named: str) -> Clip:
    if not container.streams.video:
        raise DataError(f"{named} has no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None or ctx.codec is None:
        raise DataError(f"{named}: its video codec is not one this FFmpeg decodes; re-encode it (e.g. H.264)")
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if fps <= 0 or width <= 0 or height <= 0:
        raise DataError(f"{named}: the header gives no frame rate or frame size ({fps} fps, {width}x{height})")
    if width * height > MAX_PIXELS:
        raise DataError(f"{named}: frames of {width}x{height} are over the {MAX_PIXELS >> 20} M-pixel cap")
    total = int(stream.frames or 0)
    if total <= 0:  # no count in the header (Matroska/WebM): count the packets, no decoding
        total = sum(1 for p in container.demux(stream) if p.size)
        if total <= 0:
            raise DataError(f"{named} has zero frames")
        container.seek(0)
    n = fit.n_frames(total, fps) if total >= FRAME_FACTOR else 1
    wanted = Counter(torch.linspace(0, total - 1, n).round().long().tolist())
    need = n * width * height * 3
    if need > MAX_CLIP_BYTES:
        raise DataError(f"{named}: {n} frames of {width}x{height} would take {need / 2**30:.1f} GiB decoded, over "
                        f"the {MAX_CLIP_BYTES >> 30} GiB cap; lower data.video_max_frames or shrink the video")
    last = max(wanted)
    frames: list[torch.Tensor] = []
    indices: list[int] = []
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            if (frame.height, frame.width) != (height, width):
                raise DataError(f"{named}: frame {i} is {frame.width}x{frame.height}, the header says "
                                f"{width}x{height}")
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            frames += [rgb] * wanted[i]
            indices += [i] * wanted[i]
        if i >= last:
            break
    if len(frames) < n:
        got = len(set(indices))
        raise DataError(f"{named} ends early: it decodes to fewer frames than its header's {total} (got {got} of "
                        f"the {len(wanted)} the clip needs; truncated or corrupt?); re-encode or drop it")
    frames = _even(frames, named)
    indices = indices + [indices[-1]] * (len(frames) - len(indices))
    return Clip(fit_frames(torch.stack(frames), fit), fps, tuple(indices), total)


class ClipStore:
    """Decoded clips, one per distinct file or folder, fitted as they are read (rows that name the same clip share
    it); :attr:`nbytes` counts what it holds."""

    def __init__(self, fit: VideoFit | None = None):
        self.fit = fit or VideoFit()
        self._clips: dict[tuple, Clip] = {}

    def read(self, entry: Any, where: str, base_dir: Path | None) -> Clip:
        """One clip entry: a video file path, a folder of frames, a list of frame paths, or a (T, 3, H, W) uint8
        tensor / (T, H, W, 3) uint8 array of frames."""
        import numpy as np

        if isinstance(entry, torch.Tensor | np.ndarray):
            t = torch.as_tensor(entry)
            if t.dim() == 4 and t.shape[-1] == 3 and t.shape[1] != 3:
                t = t.permute(0, 3, 1, 2)
            return clip_from_frames(t.contiguous(), self.fit, where)
        if isinstance(entry, list | tuple):
            if not entry:
                raise DataError(f"{where}: the clip is an empty list of frames; give frames, a folder or a video file")
            if not all(isinstance(e, str) for e in entry):
                raise DataError(f"{where}: a clip given as a list must list frame image paths (text)")
            paths = [self._path(e, where, base_dir) for e in entry]
            key = ("frames", *(str(p) for p in paths))
            if key not in self._clips:
                self._clips[key] = read_frame_images(paths, self.fit, where)
            return self._clips[key]
        if not isinstance(entry, str):
            raise DataError(f"{where} holds a {type(entry).__name__}; a clip is a video file path, a folder of frame "
                            "images or a list of frame image paths")
        path = self._path(entry, where, base_dir)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataError(f"{where}: video {path} not found (relative paths start at data.image_dir, else at the "
                            "data file's folder)") from None
        except OSError as e:
            raise DataError(f"{where}: {path} cannot be read ({e.strerror or e})") from None
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key not in self._clips:
            is_dir = path.is_dir()
            self._clips[key] = (read_frame_folder(path, self.fit, where) if is_dir
                                else read_video_file(path, self.fit, where))
        return self._clips[key]

    @staticmethod
    def _path(entry: str, where: str, base_dir: Path | None) -> Path:
        if "\0" in entry or not entry.strip():
            raise DataError(f"{where}: {entry!r} is not a file path")
        p = Path(entry).expanduser()
        return base_dir / p if not p.is_absolute() and base_dir is not None else p

    @property
    def count(self) -> int:
        return len(self._clips)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._clips.values())


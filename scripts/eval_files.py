"""Evaluate a model on any data set in the trainer's file format (data.dataset=files): pictures, video clips or
text, with the built-in verifier of --task (mean@k, pass@k, per-problem generations).

    python scripts/eval_files.py --model PATH --data clips.jsonl [--n 8 --temperature 1.0] [--backend vllm]

--data: a .jsonl / .json / .parquet file, a folder of them, or a hub dataset id, with @split; rows as the trainer
reads them (README "Your own data"; "Video prompts" for clips: a video file, a folder of frames or a frame list).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_gmpo.data.files import Columns, load_file_prompts
from mm_gmpo.data.images import ImageFit, ImageStore
from mm_gmpo.data.processing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, load_processor
from mm_gmpo.data.prompts import DataError
from mm_gmpo.data.videos import ClipStore, VideoFit
from mm_gmpo.evaluation import add_eval_args, run_cli
from mm_gmpo.models import processor_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(ap)
    ap.add_argument("--data", required=True, help="data file, folder or hub id, optionally @split (default: test)")
    ap.add_argument("--task", default="exact", choices=["math", "geometry3k", "exact"], help="built-in verifier")
    ap.add_argument("--prompt-key", default="problem")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--image-key", default="images")
    ap.add_argument("--video-key", default="videos")
    ap.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    ap.add_argument("--video-fps", type=float, default=2.0)
    ap.add_argument("--video-max-frames", type=int, default=64)
    ap.add_argument("--video-min-pixels", type=int, default=3136)
    ap.add_argument("--video-max-pixels", type=int, default=262_144)
    args = ap.parse_args()
    processor = load_processor(processor_source(args.model))
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", 14)
    try:
        prompts = load_file_prompts(
            args.data, columns=Columns(args.prompt_key, args.answer_key, args.image_key, args.video_key),
            template=args.template or "plain", task=args.task, default_split="test",
            images=ImageStore(ImageFit(args.min_pixels, args.max_pixels, patch)),
            clips=ClipStore(VideoFit(args.video_fps, args.video_max_frames, args.video_min_pixels,
                                     args.video_max_pixels, patch)))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    name = Path(args.data.split("@")[0]).stem or args.data
    run_cli(args, prompts, name, min_pixels=args.min_pixels, max_pixels=args.max_pixels)


if __name__ == "__main__":
    main()

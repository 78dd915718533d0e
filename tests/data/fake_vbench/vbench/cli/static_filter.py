"""Fake static filter: keeps every clip (renumbered per prompt, as VBench's check_and_move does)."""

import os
import shutil


def static_filter(args):
    target = os.path.join(args.result_path, "filtered_videos")
    os.makedirs(target, exist_ok=True)
    print("static filter with", args.model)
    counts = {}
    for name in sorted(os.listdir(args.videos_path)):
        prompt = name.rsplit("-", 1)[0]
        i = counts.get(prompt, 0)
        counts[prompt] = i + 1
        shutil.copy(os.path.join(args.videos_path, name), os.path.join(target, f"{prompt}-{i}.mp4"))

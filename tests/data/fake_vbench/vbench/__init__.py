"""Fake vbench for tests: same API and file conventions as VBench 0.1.5, recorded scores instead of models."""

import json
import os

RECORDED = os.path.join(os.path.dirname(__file__), "..", "..", "vbench", "recorded_eval_results.json")


class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.device, self.full_info_dir, self.output_path = device, full_info_dir, output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, read_frame=False,
                 mode="vbench_standard", **kwargs):
        assert local and mode == "vbench_standard", (local, mode)
        print("env", {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VBENCH_CACHE_DIR")})
        print("device", self.device)
        with open(self.full_info_dir, encoding="utf-8") as f:
            full_info = json.load(f)
        with open(RECORDED, encoding="utf-8") as f:
            recorded = json.load(f)
        names = set(os.listdir(videos_path))
        results = {}
        for dimension in dimension_list:
            found = []
            for entry in full_info:
                if dimension in entry["dimension"]:
                    for i in range(5):
                        if f"{entry['prompt_en']}-{i}.mp4" in names:
                            found.append(os.path.join(videos_path, f"{entry['prompt_en']}-{i}.mp4"))
                        else:
                            print(f"WARNING!!! This required video is not found! {entry['prompt_en']}-{i}.mp4")
            aggregate = recorded[dimension][0]
            results[dimension] = [aggregate, [{"video_path": v, "video_results": aggregate} for v in found]]
        with open(os.path.join(self.output_path, name + "_eval_results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=4)

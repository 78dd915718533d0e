"""Runs inside the VBench interpreter (never imported by tmdcli): score one dimension of one folder of videos.

    python vbench_driver.py --videos DIR --full-info VBench_full_info.json --dimension D --out DIR --name NAME

Uses VBench's Python API rather than `vbench evaluate`, whose CLI hard-codes CUDA; `local=True` is the API form of
`--load_ckpt_from_local`. temporal_flickering is only meaningful on static clips, so VBench's static filter (RAFT)
runs first and the dimension is scored on the clips it keeps. Stdlib and vbench only: tmdcli is not installed here.
"""

import argparse
import os
import sys

# Python puts this script's folder first on sys.path, and tmdcli's own vbench.py lives there: drop it, or
# `import vbench` would find that module instead of the VBench package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos", required=True)
    parser.add_argument("--full-info", required=True)
    parser.add_argument("--dimension", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--raft", required=True, help="raft-things.pth for the static filter")
    args = parser.parse_args(argv)

    from vbench import VBench

    videos = args.videos
    if args.dimension == "temporal_flickering":
        from vbench.cli.static_filter import static_filter

        result_path = os.path.join(args.out, "static_filter")
        static_filter(argparse.Namespace(model=args.raft, videos_path=videos, result_path=result_path,
                                         store_name="filtered_static_video.json", small=False,
                                         mixed_precision=False, alternate_corr=False,
                                         filter_scope="temporal_flickering"))
        videos = os.path.join(result_path, "filtered_videos")
    VBench(args.device, args.full_info, args.out).evaluate(videos_path=videos, name=args.name,
                                                           dimension_list=[args.dimension], local=True,
                                                           mode="vbench_standard")
    return 0


if __name__ == "__main__":
    sys.exit(main())

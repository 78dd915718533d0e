"""tmdcli: Transition Matching Distillation for Wan2.1 text-to-video models (command `tmd`)."""

__version__ = "0.1.0"

"""The stage scripts (``accelerate launch training/train_<stage>.py ...``), importable as ``training.train_<stage>``."""

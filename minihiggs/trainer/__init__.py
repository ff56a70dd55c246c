"""Helpers of the training recipe (`train.py`): process group and model wrapping, the LR schedule, checkpoints,
metrics and the loss-curve PNG. The training loop itself lives in `train.py`, in one readable function."""

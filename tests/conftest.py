import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# CI machines have 2 cores; keep runs deterministic and comparable.
torch.set_num_threads(min(2, os.cpu_count() or 1))

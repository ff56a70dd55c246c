"""One decode step replayed from a CUDA graph: on a GPU a small-batch step is launch-bound (hundreds of small
kernels per token), and a graph replays them all with one launch.

The step must have static shapes and no host synchronisation (`model.kv_cache.decode_one_token` has both); its
inputs are copied into the graph's own input buffers before each replay, and the outputs are the graph's output
buffers (overwritten by the next replay: copy what must outlive it).
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    def __init__(self, fn: Callable[..., tuple], example_inputs: tuple[torch.Tensor, ...], warmup: int = 2):
        self.inputs = tuple(t.clone() for t in example_inputs)
        # Warm-up on a side stream (cuBLAS workspaces, lazy kernel loading) before capturing, as torch documents.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> tuple:
        for dst, src in zip(self.inputs, args):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.outputs

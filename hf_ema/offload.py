"""Averages kept in host memory for a model on an accelerator: staged copies and a background thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor


def empty_like(tensor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor of `tensor`'s shape; pinned when it is host memory paired with an accelerator."""
    pin = device.type == "cpu" and tensor.device.type != "cpu" and torch.cuda.is_available()
    return torch.empty(tensor.shape, dtype=dtype, device=device, pin_memory=pin)


class HostOffload:
    """Overlaps updates of host-memory averages with training.

    An update copies the live tensors into pinned staging buffers without blocking (on a side CUDA stream) and runs
    the arithmetic on a background thread, overlapped with the next training steps. `fence()` makes the next optimizer
    step wait for the copies (it writes the weights); `wait()` blocks until the arithmetic is done (every read of the
    averages calls it). The staging buffers double as the stash of training values while an average is in the model.

    Args:
        live (`Sequence[Tensor]`): the live tensors, in the store's order.
        device (`torch.device`): where the averages (and so the staging buffers) live.
    """

    def __init__(self, live: Sequence[Tensor], device: torch.device) -> None:
        self.staging = [empty_like(t, t.dtype, device) for t in live]
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-ema")
        self._pending: Future | None = None
        self._copy_done = None  # CUDA event: the staged copies of the last update have been issued on a side stream
        self._copy_stream = None

    def run(self, live: Sequence[Tensor], work: Callable[[list[Tensor]], None]) -> None:
        """Stages `live` and runs `work(staged)` on the background thread."""
        self.wait()
        done = None
        if any(t.is_cuda for t in live):
            # Copy on a side stream: the next forward and backward (which only read the weights) overlap with it;
            # `fence()` makes the next optimizer step (which writes them) wait for it.
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream()
            self._copy_stream.wait_stream(torch.cuda.current_stream())
            done = torch.cuda.Event()
            with torch.cuda.stream(self._copy_stream):
                for buffer, tensor in zip(self.staging, live, strict=True):
                    buffer.copy_(tensor, non_blocking=True)
                done.record()
            self._copy_done = done
        else:
            for buffer, tensor in zip(self.staging, live, strict=True):
                buffer.copy_(tensor)
        staged = list(self.staging)

        def finish() -> None:
            if done is not None:
                done.synchronize()  # the staged copies of this step's weights have landed
            work(staged)

        self._pending = self._executor.submit(finish)

    def fence(self) -> None:
        """Makes the current CUDA stream wait until the last update's weights are copied out (no host sync)."""
        if self._copy_done is not None:
            torch.cuda.current_stream().wait_event(self._copy_done)
            self._copy_done = None

    def wait(self) -> None:
        """Blocks until a background update has finished."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        self._copy_done = None  # the background thread synchronised on it

    def close(self) -> None:
        """Finishes any background update and stops the background thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

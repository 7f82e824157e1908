"""Programmatic dependent launch (PDL, Hopper and later) for the step's Triton kernels.

A kernel launched as a programmatic dependent may start while the kernel before it in the stream
is still finishing, which hides the launch and ramp of a small kernel behind its predecessor's
tail. The price is a rule every such kernel keeps: it waits (``gdc_wait``) before it reads
anything a kernel of the same stream wrote, so only loads of data that no kernel in flight
writes (adapter weights, host-filled step buffers) may come first. Completion stays transitive:
a kernel completes only after its own wait, so once a kernel's wait returns every earlier kernel
has completed. ``HOTMERGE_PDL=0`` launches everything plainly (for comparisons; read in
``hotmerge_kernels.backend``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hotmerge_kernels.backend import INTERPRETING, PDL_ENABLED


@functools.cache
def launch_options(device: torch.device) -> dict:
    """The ``PDL`` constexpr (and, where it is on, the ``launch_pdl`` option) for a launch on
    ``device``: on for CUDA devices of compute capability 9 or more."""
    on = (
        PDL_ENABLED
        and not INTERPRETING
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


@triton.jit
def enter(PDL: tl.constexpr):
    """The top of a kernel that reads what the kernel before it wrote: wait for it, then let the
    next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

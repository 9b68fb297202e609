"""Every kernel specialization of the fused Triton step (rnnreg.nn.loops.triton_fused), compiled
for an NVIDIA GPU without one: the counterpart of ``triton_cases.compile_every_launch`` for the
one-kernel step. Imported in a process without ``TRITON_INTERPRET``."""

from __future__ import annotations

import os

import torch

from support.triton_cases import (
    CASES,
    GATES,
    compile_launched,
    record_launches,
    recurrence_inputs,
    run_recurrence,
)

KERNELS = ("_lstm_forward_step", "_gru_forward_step", "_elman_forward_step",
           "_lstm_backward_step", "_carry_backward_step")


def compile_every_fused_launch(arch=90):
    """Compile, for compute capability ``arch`` (90: the H100/H200), every specialization the
    fused step launches over :data:`triton_cases.CASES`, all four modes, float32 with products
    in TF32 and in IEEE float32 (cuDNN's RNN setting) and both autocast dtypes, plus a batch of
    one and 37 units; return how many. Nothing runs: the
    launches are recorded on CPU tensors and only compiled, so what Triton's interpreter lets
    pass (``tl.dot`` shapes and operand dtypes, constexpr use, casts) fails here."""
    from rnnreg.nn import loops
    from rnnreg.nn.loops import triton as triton_loops
    from rnnreg.nn.loops import triton_fused
    from rnnreg.nn.recurrence import recurrence

    assert not triton_loops.interpreted(), "Triton was imported with TRITON_INTERPRET=1"
    launched = record_launches(triton_fused, KERNELS)
    triton_loops.interpreted = lambda: True  # lets the engine take CPU tensors
    os.environ[loops.VARIABLE] = "triton"
    os.environ[triton_loops.STEP_VARIABLE] = "fused"
    shapes = [((3, 2, 2, 5), case) for case in CASES.values()]
    shapes.append(((3, 1, 3, 37), CASES["fresh+lengths+zoneout"]))
    rnn = torch.backends.cudnn.rnn
    for mode in GATES:
        for sizes, case in shapes:
            leaves, constants = recurrence_inputs(mode, *sizes, **case)
            for dtype, setting in ((None, "tf32"), (None, "ieee"), (torch.bfloat16, "tf32"),
                                   (torch.float16, "tf32")):
                rnn.fp32_precision = setting
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                    enabled=dtype is not None):
                    run_recurrence(mode, leaves, constants)
    leaves, constants = recurrence_inputs("GRU", 3, 2, 2, 5)
    recurrence("GRU", leaves["x"], leaves["state"], *leaves["weights"][:2], None, None, None,
               None)  # no b_hh
    assert {key[0] for key in launched} == set(KERNELS), "a kernel was never launched"
    assert {c["PRECISION"] for _, _, c, _ in launched.values()} == {"tf32", "ieee"}
    # The control: a tile that is not a power of two compiles in the interpreter, not here.
    return compile_launched(launched, arch, {"BLOCK_J": 24})

"""Named graph rewrites over Wengert lists.

Each pass takes the list of steps and returns a new one computing the same
registers; :class:`symdiff.autograd.Autograd` applies the ones it is given
before compiling. Keeping them separate keeps the compiler simple and each
rewrite testable on its own.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .graph import Step

Pass = Callable[[Sequence[Step]], list[Step]]


def crossent_softmax(steps: Sequence[Step]) -> list[Step]:
    """Rewrite ``crossEnt(softMax(o), t)`` into one ``crossEnt-softMax(o, t)`` step.

    The fused step computes the loss from the logits with log-sum-exp (no
    ``log 0``) and its gradient wrt ``o`` is ``p - t`` directly, as the seed's
    autograd did. The ``softMax`` step stays so the probabilities (``outputs``)
    are still computed, but no gradient flows through it any more.
    """
    producer = {s.output: s for s in steps}
    out: list[Step] = []
    for s in steps:
        if s.op == "crossEnt":
            p = producer.get(s.inputs[0])
            if p is not None and p.op == "softMax":
                s = Step(s.output, "crossEnt-softMax", (p.inputs[0], s.inputs[1]))
        out.append(s)
    return out


PASSES: dict[str, Pass] = {
    "crossent_softmax": crossent_softmax,
}

DEFAULT_PASSES: tuple[str, ...] = ("crossent_softmax",)

"""Named graph rewrites over Wengert lists.

Each pass takes the list of steps and returns a new one computing the same
registers; :class:`symdiff.autograd.Autograd` applies the ones it is given
before compiling. Keeping them separate keeps the compiler simple and each
rewrite testable on its own.
"""
from __future__ import annotations

from typing import Callable, Collection, Sequence

from .graph import Step
from .registry import get_op

Pass = Callable[..., list[Step]]  # (steps, keep=registers that must stay visible) -> steps


def crossent_softmax(steps: Sequence[Step], keep: Collection[str] = ()) -> list[Step]:
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


def merge_matmuls(steps: Sequence[Step], keep: Collection[str] = ()) -> list[Step]:
    """Merge matrix products that share an operand into one product, in two rounds.

    1. ``mul(a, P1) ... mul(a, Pk)`` (one left operand, k leaf right operands):
       the ``P`` are concatenated side by side once (``hconcat{k}``, shared by
       every group using the same ones: an LSTM's gate weights at every time
       step), multiplied by ``a`` once, and the result is cut back into the k
       registers (``split{k}``, views).
    2. ``mul(L1, R) ... mul(Lk, R)`` (one right operand, k leaf left operands):
       the ``L`` are stacked (``vconcat{k}``; one-hot inputs stay one-hot) and
       multiplied once, cut back by rows (``rsplit{k}``): an LSTM's characters
       at all time steps become one gather, and their weight gradient one
       scatter-add instead of one per step plus a sum over steps.

    Same math (rows and columns of a product are independent); everything
    downstream is unchanged. Operands may differ in width or height: the
    offsets travel with the concatenation.
    """
    steps = _merge_products(list(steps), by_right=False)
    return _merge_products(steps, by_right=True)


def _merge_products(steps: list[Step], by_right: bool) -> list[Step]:
    from .ops import multi_op

    produced = {o for s in steps for o in s.outputs}
    shared, other = (1, 0) if by_right else (0, 1)
    by_operand: dict[str, list[int]] = {}
    for k, s in enumerate(steps):
        if s.op == "mul" and s.inputs[other] not in produced:
            by_operand.setdefault(s.inputs[shared], []).append(k)
    groups = {}
    for operand, ks in by_operand.items():
        others = [steps[k].inputs[other] for k in ks]
        if len(ks) >= 2 and len(set(others)) == len(others) and operand not in others:
            groups[min(ks)] = ks if by_right else sorted(ks, key=lambda k: steps[k].inputs[other])
    if not groups:
        return steps
    kind, cut = ("vconcat", "rsplit") if by_right else ("hconcat", "split")
    merged = {k for ks in groups.values() for k in ks}
    out: list[Step] = []
    stacked: set[str] = set()
    for k, s in enumerate(steps):
        if k in groups:
            ks = groups[k]
            parts = tuple(steps[j].inputs[other] for j in ks)
            cat = f"{kind}({','.join(parts)})"
            offsets = f"layout({cat})"
            if cat not in stacked:
                out.append(Step((cat, offsets), multi_op(kind, len(ks)).name, parts))
                stacked.add(cat)
            operand = s.inputs[shared]
            product = f"{cat}*{operand}" if by_right else f"{operand}*{cat}"
            out.append(Step(product, "mul", (cat, operand) if by_right else (operand, cat)))
            out.append(Step(tuple(steps[j].output for j in ks), multi_op(cut, len(ks)).name, (product, offsets)))
        elif k not in merged:
            out.append(s)
    return out

def _fusable(op_name: str) -> bool:
    op = get_op(op_name)
    return op.elementwise and op.symbolic is not None


def fuse_elementwise(steps: Sequence[Step], keep: Collection[str] = ()) -> list[Step]:
    """Replace each maximal connected group of elementwise steps by one fused step.

    Two groups joined by an edge merge unless some path leaves one and re-enters
    the other through a non-elementwise step (merging would make a cycle: the
    LSTM cell at step t and t+1 stay apart because ``h_t`` goes through a matrix
    product). A fused step's outputs are the group's registers used outside it
    or listed in ``keep``, plus internal transcendental values (sigmoid, tanh,
    ...) that the derived gradients reuse. Its kernel is built once per
    structure by :func:`symdiff.symbolic.fused_kernel`.
    """
    from .symbolic import GroupSpec, costly, fused_kernel

    steps = list(steps)
    n = len(steps)
    fusable = [not isinstance(s.output, tuple) and _fusable(s.op) for s in steps]
    producer = {o: k for k, s in enumerate(steps) for o in s.outputs}
    consumers: dict[str, list[int]] = {}
    for k, s in enumerate(steps):
        for i in s.inputs:
            consumers.setdefault(i, []).append(k)
    parent = list(range(n))
    members: dict[int, set[int]] = {k: {k} for k in range(n)}

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for k, s in enumerate(steps):
        if not fusable[k]:
            continue
        for i in s.inputs:
            p = producer.get(i)
            if p is None or not fusable[p]:
                continue
            ga, gb = find(p), find(k)
            if ga == gb:
                continue
            a, b = members[ga], members[gb]
            if _path_outside(steps, consumers, a, b) or _path_outside(steps, consumers, b, a):
                continue
            parent[gb] = ga
            members[ga] = a | b
            del members[gb]

    groups = [sorted(m) for r, m in members.items() if len(m) > 1]
    if not groups:
        return steps
    keep = set(keep)
    group_of = {k: gi for gi, g in enumerate(groups) for k in g}
    fused_steps: dict[int, Step] = {}
    for gi, g in enumerate(groups):
        local = {steps[k].output: j for j, k in enumerate(g)}
        inputs: list[str] = []
        spec_steps = []
        for k in g:
            args = []
            for i in steps[k].inputs:
                if i in local:
                    args.append(("step", local[i]))
                else:
                    if i not in inputs:
                        inputs.append(i)
                    args.append(("in", inputs.index(i)))
            spec_steps.append((steps[k].op, tuple(args)))
        outputs = tuple(j for j, k in enumerate(g)
                        if steps[k].output in keep or not consumers.get(steps[k].output)
                        or any(group_of.get(c) != gi for c in consumers[steps[k].output]))
        saved = tuple(j for j, k in enumerate(g) if j not in outputs and costly(steps[k].op))
        spec = GroupSpec(tuple(spec_steps), len(inputs), outputs, saved)
        kernel = fused_kernel(spec)
        names = tuple(steps[g[j]].output for j in spec.results)
        fused_steps[gi] = Step(names, kernel.name, tuple(inputs))
    # condensed graph, topologically sorted (stable by first member)
    nodes: list[tuple[int, Step]] = []
    for k, s in enumerate(steps):
        if k in group_of:
            if groups[group_of[k]][0] == k:
                nodes.append((k, fused_steps[group_of[k]]))
        else:
            nodes.append((k, s))
    return _toposort(nodes)


def _users(steps: Sequence[Step], consumers: dict[str, list[int]], k: int) -> list[int]:
    return [c for o in steps[k].outputs for c in consumers.get(o, ())]


def _path_outside(steps: Sequence[Step], consumers: dict[str, list[int]], a: set[int], b: set[int]) -> bool:
    """Is there a path from a step of ``a`` to a step of ``b`` through at least one step outside both?"""
    stack = [c for k in a for c in _users(steps, consumers, k) if c not in a and c not in b]
    seen: set[int] = set()
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        for c in _users(steps, consumers, k):
            if c in b:
                return True
            if c not in a:
                stack.append(c)
    return False


def _toposort(nodes: list[tuple[int, Step]]) -> list[Step]:
    """Kahn's algorithm over steps whose outputs may be tuples; ties keep the original order."""
    import heapq

    out_of: dict[str, int] = {}
    for idx, (_, s) in enumerate(nodes):
        for name in s.outputs:
            out_of[name] = idx
    deps = [{out_of[i] for i in s.inputs if i in out_of} for _, s in nodes]
    users: dict[int, list[int]] = {}
    for idx, d in enumerate(deps):
        for p in d:
            users.setdefault(p, []).append(idx)
    remaining = [len(d) for d in deps]
    ready = [(nodes[idx][0], idx) for idx, d in enumerate(deps) if not d]
    heapq.heapify(ready)
    order: list[Step] = []
    while ready:
        _, idx = heapq.heappop(ready)
        order.append(nodes[idx][1])
        for u in users.get(idx, ()):
            remaining[u] -= 1
            if not remaining[u]:
                heapq.heappush(ready, (nodes[u][0], u))
    if len(order) != len(nodes):
        raise AssertionError("fuse_elementwise produced a cyclic graph")  # a bug, never user error
    return order


PASSES: dict[str, Pass] = {
    "crossent_softmax": crossent_softmax,
    "merge_matmuls": merge_matmuls,
    "fuse_elementwise": fuse_elementwise,
}

DEFAULT_PASSES: tuple[str, ...] = ("crossent_softmax", "merge_matmuls")

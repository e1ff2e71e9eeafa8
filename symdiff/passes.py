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

# (steps, keep=registers whose values must stay visible, whole=registers whose full gradient must
# also stay computable: Autograd.eval/bprop pass the model's named registers as both) -> steps
Pass = Callable[..., list[Step]]


def crossent_softmax(steps: Sequence[Step], keep: Collection[str] = (),
                     whole: Collection[str] = ()) -> list[Step]:
    """Rewrite ``crossEnt(softMax(o), t)`` into one ``crossEnt-softMax(o, t)`` step.

    The fused step computes the loss from the logits with log-sum-exp (no
    ``log 0``) and its gradient wrt ``o`` is ``p - t`` directly, as the seed's
    autograd did. The ``softMax`` step stays so the probabilities (``outputs``)
    are still computed, but no gradient flows through it any more, so a
    probability register listed in ``whole`` (its gradient is wanted) is left alone.
    """
    producer = {s.output: s for s in steps}
    out: list[Step] = []
    for s in steps:
        if s.op == "crossEnt":
            p = producer.get(s.inputs[0])
            if p is not None and p.op == "softMax" and p.output not in whole:
                s = Step(s.output, "crossEnt-softMax", (p.inputs[0], s.inputs[1]))
        out.append(s)
    return out


def merge_matmuls(steps: Sequence[Step], keep: Collection[str] = (),
                  whole: Collection[str] = ()) -> list[Step]:
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
    offsets travel with the concatenation. Every original register keeps its
    value and full gradient, so ``keep`` and ``whole`` need no care here.
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

def sum_products(steps: Sequence[Step], keep: Collection[str] = (),
                 whole: Collection[str] = ()) -> list[Step]:
    """Turn a sum of transposed products ``a_1ᵀb_1 + ... + a_kᵀb_k`` into one ``sum_mul_tn{k}`` step.

    A gradient graph sums a weight's gradient over its uses: an LSTM's
    ``U_g`` gets ``Σ_t mul_tn(h_t, δ_t)``, one small product per gate and time
    step (and an HVP's tangent of it twice as many). Stacking the operands by
    rows, ``[a_1; ...; a_k]ᵀ[b_1; ...; b_k]`` is the same sum in one product.
    A sum is a tree of ``add`` steps whose inner results are used once and not
    kept; its ``mul_tn`` leaves used only there (two or more) are merged, its
    other leaves are added to the merged product. Registers in ``keep`` or
    ``whole`` (named ones) are never merged away.
    """
    from .ops import sum_products_op

    steps = list(steps)
    keep = set(keep) | set(whole)
    producer, uses = _producers_and_uses(steps)

    def single(name: str, op: str) -> int | None:
        """The step computing ``name`` with ``op`` if ``name`` is used once and not kept."""
        k = producer.get(name)
        if k is None or steps[k].op != op or isinstance(steps[k].output, tuple):
            return None
        return k if uses.get(name) == 1 and name not in keep else None

    absorbed = {i for s in steps if s.op == "add" for i in s.inputs if single(i, "add") is not None}
    remove: set[int] = set()
    insert: dict[int, list[Step]] = {}
    for k, s in enumerate(steps):
        if s.op != "add" or s.output in absorbed:
            continue
        inner, leaves, todo = [], [], list(s.inputs)
        while todo:
            name = todo.pop(0)
            j = single(name, "add")
            if j is None:
                leaves.append(name)
            else:
                inner.append(j)
                todo.extend(steps[j].inputs)
        products = [producer[n] for n in leaves if single(n, "mul_tn") is not None]
        if len(products) < 2:
            continue
        rest = [n for n in leaves if single(n, "mul_tn") is None]
        args = tuple(steps[j].inputs[0] for j in products) + tuple(steps[j].inputs[1] for j in products)
        total = s.output if not rest else f"sum_mul_tn({s.output})"
        new = [Step((total,), sum_products_op(len(products)).name, args)]
        for n, other in enumerate(rest):
            out = s.output if n + 1 == len(rest) else f"{total}+{n + 1}"
            new.append(Step(out, "add", (total, other)))
            total = out
        remove.update([k, *inner, *products])
        insert[k] = new
    if not insert:
        return steps
    return _splice(steps, insert, remove)


def fuse_blocks(steps: Sequence[Step], keep: Collection[str] = (),
                whole: Collection[str] = ()) -> list[Step]:
    """Horizontal fusion: an elementwise op applied to every block of a cut runs once on the whole array.

    After ``merge_matmuls`` an LSTM step computes ``x·[W_c W_f W_i W_o]`` and
    ``h·[U_c U_f U_i U_o]``, cuts each into four gate blocks, and then adds,
    biases and squashes block by block: sixteen numpy calls on strided views.
    Three rewrites, repeated until none applies, lift that work above the cut:

    * ``op(a_j, b_j)`` for every block ``j`` of two cuts of one kind → one
      ``blockwise[op](A, layout_A, B, layout_B)``, then a cut;
    * ``op(a_j, p_j)`` with leaf registers ``p_j`` (the biases) → the leaves
      joined once by ``cat{k}``, then the same;
    * a unary op on every block (``tanh``, ``sigmoid``, ``sigmoid``, ``sigmoid``)
      → one ``blockmap[...]`` calling each op once per run of equal ops and
      handing out the blocks.

    The ops run their own registered kernels on bigger arrays; each block's
    value is the same as before (elementwise ops do not mix positions), and a
    layout mismatch found at run time falls back to one block at a time. Cut
    outputs that are kept or whole (named registers) or used twice are left alone.
    """
    steps = list(steps)
    keep = set(keep) | set(whole)
    while True:
        rewritten = _fuse_blocks_round(steps, keep)
        if rewritten is None:
            return steps
        steps = rewritten


def _fuse_blocks_round(steps: list[Step], keep: set[str]) -> list[Step] | None:
    """Apply every non-overlapping ``fuse_blocks`` rewrite found in ``steps`` once (None: none found)."""
    import re

    from .ops import block_op
    from .registry import OPS

    producer = {o: k for k, s in enumerate(steps) for o in s.outputs}
    consumers: dict[str, list[int]] = {}
    for k, s in enumerate(steps):
        for i in dict.fromkeys(s.inputs):
            consumers.setdefault(i, []).append(k)

    def sole_user(name: str) -> int | None:
        users = consumers.get(name, ())
        return users[0] if len(users) == 1 and name not in keep else None

    def is_cut(s: Step) -> bool:
        return isinstance(s.output, tuple) and re.fullmatch(r"split\d+", s.op) is not None

    taken: set[int] = set()
    remove: set[int] = set()
    insert: dict[int, list[Step]] = {}
    made = set(producer)  # registers some step computes (grows as cat steps are added)
    for k, cut in enumerate(steps):
        if k in taken or not is_cut(cut):
            continue
        users = [sole_user(o) for o in cut.output]
        if any(u is None or u in taken for u in users) or len(set(users)) != len(users):
            continue
        ops = [OPS.get(steps[u].op) for u in users]
        if any(op is None or not op.elementwise for op in ops):
            continue
        outputs = tuple(steps[u].output for u in users)
        at = min(users)
        if all(op.arity == 1 for op in ops):
            bm = block_op("blockmap", tuple(op.name for op in ops))
            if len(bm.runs) == len(ops):
                continue  # no two neighbouring blocks share an op: nothing to gain
            wholes = tuple(f"stack({','.join(outputs[a:b])})" for _, a, b in bm.runs)
            new = [Step((*outputs, *wholes), bm.name, cut.inputs)]
            drop = {k}
        elif all(op.arity == 2 for op in ops) and len({op.name for op in ops}) == 1:
            # which side of each op the block is on, and what is on the other side
            sides = []
            for o, u in zip(cut.output, users):
                a, b = steps[u].inputs
                sides.append((0, b) if a == o else (1, a))
            if len({side for side, _ in sides}) != 1:
                continue
            side = sides[0][0]
            others = [other for _, other in sides]
            pre: list[Step] = []
            drop = {k}
            if all(o not in made for o in others):  # leaves: join them once
                cat = block_op("cat", len(others))
                joined = f"cat({','.join(others)})"
                pair = (joined, f"layout({joined})")
                if joined not in made:
                    pre.append(Step(pair, cat.name, tuple(others)))
                    made.update(pair)
            else:
                j2 = producer.get(others[0])
                if j2 is None or j2 in taken or steps[j2].op != cut.op or steps[j2].output != tuple(others):
                    continue
                if j2 != k and any(sole_user(o) != u for o, u in zip(others, users)):
                    continue
                pair = steps[j2].inputs
                drop.add(j2)
            mine = cut.inputs
            a_pair, b_pair = (mine, pair) if side == 0 else (pair, mine)
            bw = block_op("blockwise", ops[0].name)
            r = f"stack({','.join(outputs)})"
            new = [*pre, Step((r, f"layout({r})"), bw.name, (*a_pair, *b_pair)),
                   Step(outputs, cut.op, (r, f"layout({r})"))]
        else:
            continue
        taken.update(users)
        taken.update(drop)
        remove.update(users)
        remove.update(drop)
        insert.setdefault(at, []).extend(new)
    if not insert:
        return None
    return _splice(steps, insert, remove)


def _fusable(op_name: str) -> bool:
    op = get_op(op_name)  # (an op with a nondiff argument stays alone: a fused gradient would differentiate it)
    return op.elementwise and op.symbolic is not None and not op.nondifferentiable


def fuse_elementwise(steps: Sequence[Step], keep: Collection[str] = (),
                     whole: Collection[str] = ()) -> list[Step]:
    """Replace each maximal connected group of elementwise steps by one fused step.

    Two groups joined by an edge merge unless some path leaves one and re-enters
    the other through a non-elementwise step (merging would make a cycle: the
    LSTM cell at step t and t+1 stay apart because ``h_t`` goes through a matrix
    product). A fused step's outputs are the group's registers used outside it
    or listed in ``keep``, plus internal transcendental values (sigmoid, tanh,
    ...) that the derived gradients reuse. Its kernel is built once per
    structure by :func:`symdiff.fusion.fused_kernel`. A register in ``whole``
    ends its group (no step of the same group reads it), so the gradient the
    group receives for it is its full gradient, not only the part from outside.
    """
    from .fusion import GroupSpec, costly, fused_kernel

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

    whole = set(whole)
    for k, s in enumerate(steps):
        if not fusable[k]:
            continue
        for i in s.inputs:
            p = producer.get(i)
            if p is None or not fusable[p] or i in whole:
                continue
            ga, gb = find(p), find(k)
            if ga == gb:
                continue
            a, b = members[ga], members[gb]
            group_of_step = lambda j: members[find(j)]  # noqa: E731  (groups as they stand now)
            if (_path_outside(steps, consumers, a, b, group_of_step)
                    or _path_outside(steps, consumers, b, a, group_of_step)):
                continue
            if whole and (_reads_whole(steps, consumers, whole, a, b) or _reads_whole(steps, consumers, whole, b, a)):
                continue
            parent[gb] = ga
            members[ga] = a | b
            del members[gb]

    groups = [sorted(m) for r, m in members.items() if len(m) > 1]
    if not groups:
        return steps
    keep = set(keep) | whole
    group_of = {k: gi for gi, g in enumerate(groups) for k in g}
    fused_steps: dict[int, Step] = {}
    for gi, g in enumerate(groups):
        local = {steps[k].output: j for j, k in enumerate(g)}
        outside = list(dict.fromkeys(i for k in g for i in steps[k].inputs if i not in local))
        first = {i: j for j, i in enumerate(outside)}

        def anchor(i: str) -> tuple[int, int]:
            # blocks of one cut side by side, in layout order, where the first of them is used:
            # a compiled backward's gradient blocks then join back without a copy
            p = producer.get(i)
            if p is None or len(steps[p].outputs) == 1:
                return first[i], 0
            outs = steps[p].outputs
            return min(first[o] for o in outs if o in first), outs.index(i)

        inputs = sorted(outside, key=anchor)
        position = {i: j for j, i in enumerate(inputs)}
        spec_steps = []
        for k in g:
            args = tuple(("step", local[i]) if i in local else ("in", position[i]) for i in steps[k].inputs)
            spec_steps.append((steps[k].op, args))
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


def fold_cuts(steps: Sequence[Step], keep: Collection[str] = (),
              whole: Collection[str] = ()) -> list[Step]:
    """A fused step reading every block of a column cut, and the only one: the cut folded into it.

    After ``merge_matmuls`` and ``fuse_elementwise`` an LSTM time step is a product
    ``h·[U_c U_f U_i U_o]``, a ``split4`` of it into gate views, and the fused cell
    reading those views (likewise for ``x·W``). The cut does no arithmetic, but it is a
    step of its own forward and backward, and on float32 batches that interpreter cost
    is what is left besides the products and kernels. Here the fused step takes the
    product and its layout and cuts (and joins the gradient) itself
    (:class:`symdiff.ops.CutFed`): same views, same numbers, two steps fewer each way
    per LSTM time step. Cuts whose blocks are kept, whole, or read elsewhere stay.
    """
    from .fusion import FusedKernel
    from .ops import Cut, cut_fed_op
    from .registry import MULTI_OPS

    steps = list(steps)
    keep = set(keep) | set(whole)
    producer, uses = _producers_and_uses(steps)
    remove: set[int] = set()
    replace: dict[int, Step] = {}
    for k, s in enumerate(steps):
        inner = MULTI_OPS.get(s.op) if isinstance(s.output, tuple) else None
        if not isinstance(inner, FusedKernel):
            continue
        cuts: list[int] = []
        for i in s.inputs:
            p = producer.get(i)
            cut = MULTI_OPS.get(steps[p].op) if p is not None else None
            if p in cuts or p in remove or not (isinstance(cut, Cut) and cut.axis):  # a column cut (split{k})
                continue
            outs = steps[p].outputs
            if all(o in s.inputs and uses[o] == 1 and o not in keep for o in outs):
                cuts.append(p)
        if not cuts:
            continue
        where = {o: (g, b) for g, p in enumerate(cuts) for b, o in enumerate(steps[p].outputs)}
        plain: list[str] = []
        sources: list[tuple[int, int]] = []
        for i in s.inputs:
            sources.append(where[i] if i in where else (-1, len(plain)))
            if i not in where:
                plain.append(i)
        op = cut_fed_op(inner, tuple(sources))
        inputs = (*plain, *(x for p in cuts for x in steps[p].inputs))
        replace[k] = Step(s.output, op.name, inputs)
        remove.update(cuts)
    if not replace:
        return steps
    return [replace.get(k, s) for k, s in enumerate(steps) if k not in remove]


def _producers_and_uses(steps: Sequence[Step]) -> tuple[dict[str, int], dict[str, int]]:
    """Which step computes each register, and how many times each register is read."""
    producer = {o: k for k, s in enumerate(steps) for o in s.outputs}
    uses: dict[str, int] = {}
    for s in steps:
        for i in s.inputs:
            uses[i] = uses.get(i, 0) + 1
    return producer, uses


def _splice(steps: Sequence[Step], insert: dict[int, list[Step]], remove: set[int]) -> list[Step]:
    """The step list with ``insert[k]`` placed before step ``k`` and the steps in ``remove`` left out."""
    out: list[Step] = []
    for k, s in enumerate(steps):
        out.extend(insert.get(k, ()))
        if k not in remove:
            out.append(s)
    return out


def _users(steps: Sequence[Step], consumers: dict[str, list[int]], k: int) -> list[int]:
    return [c for o in steps[k].outputs for c in consumers.get(o, ())]


def _reads_whole(steps: Sequence[Step], consumers: dict[str, list[int]], whole: set[str], a: set[int],
                 b: set[int]) -> bool:
    """Does a step of ``b`` read a register in ``whole`` that a step of ``a`` computes?"""
    return any(c in b for k in a if steps[k].output in whole for c in consumers.get(steps[k].output, ()))


def _path_outside(steps: Sequence[Step], consumers: dict[str, list[int]], a: set[int], b: set[int],
                  group_of: Callable[[int], set[int]] = lambda k: {k}) -> bool:
    """Is there a path from a step of ``a`` to a step of ``b`` through at least one step outside both?

    A step outside both that already belongs to a group (``group_of``) stands for its whole
    group, which runs as one step: a path entering it may leave from any of its members.
    """
    stack = [c for k in a for c in _users(steps, consumers, k) if c not in a and c not in b]
    seen: set[int] = set()
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        group = group_of(k)
        seen.update(group)
        for member in group:
            for c in _users(steps, consumers, member):
                if c in b:
                    return True
                if c not in a and c not in seen:
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
    "sum_products": sum_products,
    "fuse_blocks": fuse_blocks,
    "fuse_elementwise": fuse_elementwise,
    "fold_cuts": fold_cuts,
}

DEFAULT_PASSES: tuple[str, ...] = ("crossent_softmax", "merge_matmuls")
GRAPH_PASSES: tuple[str, ...] = (*DEFAULT_PASSES, "sum_products")
"""The passes ``hvp``/``jvp`` compile their graphs with (a gradient graph's sums of products too)."""

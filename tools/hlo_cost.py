"""What a compiled program does, read from its optimised, partitioned HLO (`compiled.as_text()`):
FLOPs, HBM bytes and collectives per chip, every while loop's body counted as many times as the
loop runs, and each collective traced to the line of our code that caused it.

XLA's own `cost_analysis()` sees a loop body once (a 42-layer scan is 1/42 of its work) and
nothing inside a Pallas kernel; this walk multiplies each body by its trip count and counts the
splash kernels from their operand shapes.

What is counted, per instruction and times its loop multiplier:
- matmul FLOPs: `dot` (2 x output elements x contracted size) and `convolution` (XLA:TPU writes
  most dots as convolutions: 2 x output elements x kernel elements / output features); the splash
  attention kernels (`tpu_custom_call` named splash_mha_*) from their q, k shapes: forward
  4 Sq Sk D per head (Q K^T and P V), the dq kernel 6 (recompute S, dP, dQ), the dkv kernel 8
  (recompute S, dP, dV, dK), every block visited (segment ids are dynamic, so the kernel visits
  all blocks and masks inside them);
- other FLOPs: one per output element of each elementwise or reduce instruction (the VPU's work;
  not used by the step-time estimate, reported for comparison with XLA's figure);
- HBM bytes: at the boundary of each top-level instruction (a fusion reads its operands and
  writes its result once): the operands and results that live in HBM (a layout's memory space
  S(n) with n > 0 is on-chip: VMEM, SMEM). A fused operand only sliced inside the fusion counts
  its slices; a fused in-place `dynamic-update-slice` counts its update, not its whole buffer;
- collectives: kind (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute),
  replica-group size and bytes moved per chip over ICI with the usual ring volumes: all-gather
  out x (g-1)/g, reduce-scatter in x (g-1)/g, all-reduce 2 x in x (g-1)/g, all-to-all
  in x (g-1)/g, collective-permute its buffer.

Trip counts: XLA's `known_trip_count` where the backend writes it, else the loop condition's
`counter < N` against the counter's initial constant and the step its body adds. A loop whose
count cannot be read counts once and is named in `unknown_trip_counts`. Every branch of a
`conditional` is counted (an upper bound; the train steps compiled here have none).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1,
    "token": 0,
}  # fmt: skip
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no data of their own (aliases, control, loop plumbing).
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
    "iota", "copy-done", "collective-permute-done", "all-gather-done", "all-reduce-done",
    "async-done", "send-done", "recv-done",
}  # fmt: skip
_ELEMENTWISE = {
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential", "log", "tanh",
    "rsqrt", "sqrt", "negate", "abs", "power", "select", "compare", "convert", "clamp",
    "exponential-minus-one", "log-plus-one", "logistic", "sine", "cosine", "erf", "floor",
    "ceil", "round-nearest-even", "sign", "atan2", "remainder", "and", "or", "xor", "not",
    "cbrt", "tan", "is-finite",
}  # fmt: skip
_SLICES = {"dynamic-slice", "slice", "gather"}

_SHAPE = re.compile(r"([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")


@dataclasses.dataclass
class Array:
    dtype: str
    dims: tuple[int, ...]
    space: int = 0  # memory space: 0 is HBM

    @property
    def bytes(self) -> float:
        return math.prod(self.dims) * DTYPE_BYTES.get(self.dtype, 4)

    @property
    def elements(self) -> int:
        return math.prod(self.dims)


def parse_type(text: str) -> list[Array]:
    """The arrays of an HLO type, a tuple flattened: 'bf16[8,4]{1,0:T(8,128)S(1)}' ->
    [Array('bf16', (8, 4), space=1)]."""
    out = []
    for m in _SHAPE.finditer(text):
        if m.group(1) not in DTYPE_BYTES:
            continue
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        space = re.search(r"S\((\d+)\)", m.group(3) or "")
        out.append(Array(m.group(1), dims, int(space.group(1)) if space else 0))
    return out


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    arrays: list[Array]  # the result, a tuple flattened
    operands: list[str]
    attrs: str  # everything after the operand list
    inner: str = ""  # the operand list's text (a constant's value, a parameter's number)

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=(%?[\w.\-]+)", self.attrs)
        return m.group(1).lstrip("%") if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def frame(self) -> int | None:
        m = re.search(r"stack_frame_id=(\d+)", self.attrs)
        return int(m.group(1)) if m else None


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}

    @property
    def root(self) -> Instr:
        return self.instrs[-1]


def _split_operands(s: str, start: int) -> tuple[str, int]:
    """The text inside the parenthesis opened at s[start] and the index after its close."""
    depth = 0
    for i in range(start, len(s)):
        c = s[i]
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if depth == 0:
                return s[start + 1 : i], i + 1
    return s[start + 1 :], len(s)


def _parse_instr(line: str) -> Instr | None:
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # a tuple type
        type_text, i = _split_operands(rest, 0)
        type_text = "(" + type_text + ")"
    else:
        i = rest.index(" ")
        type_text = rest[:i]
    rest = rest[i:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    inner, j = _split_operands(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", inner)
    return Instr(m.group(1), op.group(1), parse_type(type_text), operands, rest[j:], inner)


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: str
    frames: dict[int, tuple[str, int, str, int]]  # id -> (file, line, function, parent id)


def parse_module(text: str) -> Module:
    comps, entry, cur, body = {}, None, None, []
    lines = text.splitlines()
    tables = _parse_tables(lines)
    pending = None
    for line in lines:
        if cur is None:
            m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->\s*(.*)\{\s*$", line)
            if m and not line.startswith(" "):
                cur, body = m.group(2), []
                if m.group(1):
                    entry = cur
            continue
        if line == "}":
            if pending:
                body.append(pending)
            instrs = [i for i in map(_parse_instr, body) if i is not None]
            comps[cur] = Computation(cur, instrs)
            cur, pending = None, None
            continue
        if re.match(r"\s+(ROOT\s+)?%", line):
            if pending:
                body.append(pending)
            pending = line
        elif pending is not None:  # an attribute that spans lines (kernel metadata)
            pending += " " + line.strip()
    return Module(comps, entry, tables)


def _parse_tables(lines) -> dict[int, tuple[str, int, str, int]]:
    """The module's stack-frame tables: frame id -> (file, line, function, parent frame id)."""
    files, funcs, locs, frames, section = {}, {}, {}, {}, None
    for line in lines:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        m = re.match(r"(\d+) (.*)$", line)
        if section is None or not m:
            if section and line.strip() == "":
                section = None
            continue
        k, v = int(m.group(1)), m.group(2)
        if section == "FileNames":
            files[k] = v.strip('"')
        elif section == "FunctionNames":
            funcs[k] = v.strip('"')
        elif section == "FileLocations":
            f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v)
            if f:
                locs[k] = (int(f.group(1)), int(f.group(2)), int(f.group(3)))
        elif section == "StackFrames":
            f = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", v)
            if f:
                frames[k] = (int(f.group(1)), int(f.group(2)))
    out = {}
    for k, (loc, parent) in frames.items():
        fid, fn, line = locs.get(loc, (0, 0, 0))
        # The printed parent id is one past the parent frame's id; 1 means none.
        out[k] = (files.get(fid, "?"), line, funcs.get(fn, "?"), parent - 1)
    return out


# ---------------------------------------------------------------------------------------------


def trip_count(module: Module, comp: Computation, w: Instr) -> int | None:
    """How many times the while loop `w` (an instruction of `comp`) runs, or None."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', w.attrs)
    if m:
        return int(m.group(1))
    cond = module.computations.get(w.attr("condition") or "")
    if cond is None:
        return None
    fusion = None
    cmp_, scope = cond.root, cond
    if cmp_.opcode == "fusion":  # the compare fused: look inside, parameters map to operands
        fusion, scope = cmp_, module.computations.get(cmp_.attr("calls") or "")
        if scope is None:
            return None
        cmp_ = scope.root
    if cmp_.opcode != "compare" or len(cmp_.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", cmp_.attrs)
    direction = direction.group(1) if direction else ""
    a, b = (scope.by_name.get(o) for o in cmp_.operands)
    if a is None or b is None:
        return None
    counter, limit = a, _constant(b, cond, fusion)
    if limit is None:  # `N > counter`
        counter, limit = b, _constant(a, cond, fusion)
        direction = {"GT": "LT", "GE": "LE"}.get(direction, "")
    if limit is None:
        return None
    start, index = 0, _tuple_index(counter, cond, fusion)
    init = comp.by_name.get(w.operands[0]) if w.operands else None
    if index is not None and init is not None and init.opcode == "tuple":
        v = comp.by_name.get(init.operands[index])
        start = (_constant(v) if v is not None else None) or 0
    step = _counter_step(module.computations.get(w.attr("body") or ""), index)
    if direction == "LT":
        return max(-(-(limit - start) // step), 0)
    if direction == "LE":
        return max(-(-(limit - start + 1) // step), 0)
    return None


def _counter_step(body: Computation | None, index: int | None) -> int:
    """What the loop body adds to its counter (element `index` of the loop state) each time: 1
    for a scan; XLA's bidirectional collective-matmul loops count by 2."""
    if body is None or index is None or body.root.opcode != "tuple":
        return 1
    if index >= len(body.root.operands):
        return 1
    x = body.by_name.get(body.root.operands[index])
    while x is not None and x.opcode in ("copy", "bitcast", "convert") and x.operands:
        x = body.by_name.get(x.operands[0])
    if x is None or x.opcode != "add" or len(x.operands) != 2:
        return 1
    for o in x.operands:
        v = body.by_name.get(o)
        c = _constant(v) if v is not None else None
        if c is not None and c > 0:
            return c
    return 1


def _constant(instr: Instr, cond=None, fusion=None) -> int | None:
    """The integer value of a scalar constant, followed through a fusion's parameter."""
    if instr.opcode == "constant":
        m = re.fullmatch(r"\s*(-?\d+)\s*", instr.inner)
        return int(m.group(1)) if m else None
    if instr.opcode == "parameter" and fusion is not None:
        k = _param_number(instr)
        outer = cond.by_name.get(fusion.operands[k]) if k < len(fusion.operands) else None
        return _constant(outer) if outer is not None else None
    return None


def _tuple_index(counter: Instr, cond, fusion) -> int | None:
    """Which element of the loop state `counter` reads (through a fusion's parameter)."""
    if counter.opcode == "parameter" and fusion is not None:
        k = _param_number(counter)
        counter = cond.by_name.get(fusion.operands[k]) if k < len(fusion.operands) else None
        if counter is None:
            return None
    if counter.opcode == "get-tuple-element":
        m = re.search(r"index=(\d+)", counter.attrs)
        return int(m.group(1)) if m else None
    return None


def _param_number(instr: Instr) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*", instr.inner)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    """One top-level instruction's work per execution, and how often it runs per step."""

    name: str
    opcode: str
    flops: float  # matmul FLOPs (MXU)
    bytes: float  # HBM bytes read and written
    times: int  # executions per step (the product of the enclosing loops' trip counts)
    loop: str | None  # the innermost enclosing loop that runs more than once
    op_name: str = ""  # JAX's name of the op (for attribution)


@dataclasses.dataclass
class Collective:
    kind: str
    group: int  # replica-group size (collective-permute: the pairs)
    buffer_bytes: float  # the operand per chip
    moved_bytes: float  # bytes each chip sends over ICI, per execution
    times: int
    loop: str | None
    source: str  # file:line (function) of our code that caused it
    op: str  # the tail of the op's name: what JAX op it came from


@dataclasses.dataclass
class Cost:
    matmul_flops: float = 0.0  # per chip, per step
    other_flops: float = 0.0
    hbm_bytes: float = 0.0
    kernel_flops: float = 0.0  # of the matmul FLOPs: inside Pallas kernels (splash)
    kernels: int = 0  # Pallas kernel executions per step
    ops: list = dataclasses.field(default_factory=list)
    collectives: list = dataclasses.field(default_factory=list)
    loops: dict = dataclasses.field(default_factory=dict)  # body name -> trip count
    unknown_trip_counts: list = dataclasses.field(default_factory=list)

    def collective_totals(self) -> dict[str, dict]:
        """Per kind: executions per step, bytes moved per chip per step, group sizes."""
        out = {}
        for c in self.collectives:
            t = out.setdefault(c.kind, dict(count=0, moved_bytes=0.0, groups=set()))
            t["count"] += c.times
            t["moved_bytes"] += c.moved_bytes * c.times
            t["groups"].add(c.group)
        return {k: v | dict(groups=sorted(v["groups"])) for k, v in out.items()}

    def by_source(self) -> list[dict]:
        """The collectives aggregated by (kind, source, op), largest volume first."""
        rows = {}
        for c in self.collectives:
            key = (c.kind, c.source, c.op)
            r = rows.setdefault(key, dict(kind=c.kind, source=c.source, op=c.op, count=0,
                                          moved_bytes=0.0, groups=set(), static=0))  # fmt: skip
            r["count"] += c.times
            r["static"] += 1
            r["moved_bytes"] += c.moved_bytes * c.times
            r["groups"].add(c.group)
        out = [r | dict(groups=sorted(r["groups"])) for r in rows.values()]
        return sorted(out, key=lambda r: (-r["moved_bytes"], r["kind"], r["source"]))


def analyse_hlo(text: str, root: str | None = None) -> Cost:
    """The loop-aware cost of one compiled program's HLO text (per chip, per execution)."""
    return _Walker(parse_module(text), root).run()


class _Walker:
    def __init__(self, module: Module, root: str | None):
        self.m, self.cost = module, Cost()
        self.caller = {}  # fused computation -> the fusion instruction that calls it
        # Channel ids of the fused collectives met in the computation being walked: XLA:TPU
        # splits an asynchronous collective into start, in-flight and done fusions that each
        # carry a copy of it, with one channel id: one collective. (Unfused collectives count
        # each: those of a shard_map may all carry channel id 1.)
        self.channels = set()
        self.root = root or _repo_root()

    def run(self) -> Cost:
        self.top(self.m.computations[self.m.entry], 1, None)
        return self.cost

    # Computations whose instructions are scheduled one by one (entry, loop bodies, calls).
    def top(self, comp: Computation, times: int, loop: str | None):
        outer, self.channels = self.channels, set()
        self._top(comp, times, loop)
        self.channels = outer

    def _top(self, comp: Computation, times: int, loop: str | None):
        for ins in comp.instrs:
            op = ins.opcode
            if op == "while":
                trip = trip_count(self.m, comp, ins)
                body = ins.attr("body")
                if trip is None:
                    self.cost.unknown_trip_counts.append(body)
                    trip = 1
                self.cost.loops[body] = trip
                inner = self.m.computations.get(body)
                if inner is not None:
                    self.top(inner, times * trip, body if trip > 1 else loop)
                continue
            if op in ("call", "conditional", "async-start"):
                for name in re.findall(
                    r"(?:to_apply|calls|branch_computations|true_computation|false_computation)"
                    r"=\{?%?([\w.\-]+(?:, %?[\w.\-]+)*)",
                    ins.attrs,
                ):
                    for n in re.split(r",\s*%?", name):
                        if n in self.m.computations:
                            self.top(self.m.computations[n], times, loop)
                continue
            flops = self.flops(ins, comp, times, loop)
            nbytes = 0.0 if op in _FREE else self.boundary_bytes(ins, comp)
            self.cost.matmul_flops += flops * times
            self.cost.hbm_bytes += nbytes * times
            if flops or nbytes:
                self.cost.ops.append(Op(ins.name, op, flops, nbytes, times, loop, ins.op_name))

    def flops(self, ins: Instr, comp: Computation, times: int, loop) -> float:
        """Matmul FLOPs of one execution of `ins` (a fusion: of what it fuses); other FLOPs and
        collectives are recorded on the way."""
        op = ins.opcode
        if op == "fusion":
            inner = self.m.computations.get(ins.attr("calls") or "")
            if inner is None:
                return 0.0
            self.caller[inner.name] = (ins, comp)  # metadata for collectives that carry none
            return sum(self.flops(i, inner, times, loop) for i in inner.instrs)
        if op in ("dot", "convolution"):
            return _matmul_flops(ins, comp)
        if op == "custom-call":
            return self.kernel(ins, comp, times)
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base in COLLECTIVES:
            self.collective(base, ins, comp, times, loop)
            return 0.0
        if op in _ELEMENTWISE:
            self.cost.other_flops += sum(a.elements for a in ins.arrays) * times
        elif op == "reduce" and ins.operands:
            arg = comp.by_name.get(ins.operands[0])
            self.cost.other_flops += (arg.arrays[0].elements if arg and arg.arrays else 0) * times
        return 0.0

    def kernel(self, ins: Instr, comp: Computation, times: int) -> float:
        if "tpu_custom_call" not in ins.attrs:
            return 0.0
        self.cost.kernels += times
        name = ins.op_name
        kind = next((k for k in _SPLASH if k in name), None)
        if kind is None:
            return 0.0
        # q and k: the first two float operands of rank 3 (heads, length, head_dim), or more
        # with leading batch dimensions (the kernel vmapped over rows).
        qkv = [a for o in ins.operands for a in _arrays(comp, o)
               if a.dtype in ("bf16", "f32", "f16") and len(a.dims) >= 3]  # fmt: skip
        if len(qkv) < 2:
            return 0.0
        q, k = qkv[0].dims, qkv[1].dims
        f = _SPLASH[kind] * math.prod(q[:-2]) * q[-2] * k[-2] * q[-1]
        self.cost.kernel_flops += f * times
        return f

    def collective(self, kind: str, ins: Instr, comp: Computation, times: int, loop):
        channel = re.search(r"channel_id=(\d+)", ins.attrs)
        if channel and comp.name in self.caller:  # inside a fusion: maybe a split copy
            if channel.group(1) in self.channels:
                return
            self.channels.add(channel.group(1))
        if kind == "all-reduce" and comp.name.startswith("all-reduce-scatter"):
            kind = "reduce-scatter"  # XLA:TPU's reduce-scatter: an all-reduce fused with its slice
        meta, via = self.metadata(ins, comp)
        buffer = sum(a.bytes for o in ins.operands for a in _arrays(comp, o))
        if kind == "collective-permute":
            pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", ins.attrs)
            group = len(re.findall(r"\{\d+,\d+", pairs.group(1) + "}")) if pairs else 1
            moved = buffer
        else:
            group = _group_size(ins.attrs)
            frac = (group - 1) / group if group else 0.0
            moved = {
                "all-gather": buffer * (group - 1),
                "reduce-scatter": buffer * frac,
                "all-reduce": 2 * buffer * frac,
                "all-to-all": buffer * frac,
            }[kind]
        self.cost.collectives.append(Collective(
            kind, group, buffer, moved, times, loop, self.source(meta) + via, _op_tail(meta.op_name)
        ))  # fmt: skip

    def metadata(self, ins: Instr, comp: Computation) -> tuple[Instr, str]:
        """The instruction whose op metadata names a collective's cause: its own; else the
        fusion that wraps it; else (a reduce-scatter XLA builds for a gradient carries none)
        the instruction that produced its operand, marked as such."""
        if ins.frame or ins.op_name:
            return ins, ""
        outer, where = self.caller.get(comp.name, (None, None))
        if outer is not None and (outer.frame or outer.op_name):
            return outer, ""
        for inner, scope in ((ins, comp), (outer, where)):
            for name in inner.operands if inner is not None else ():
                prod = scope.by_name.get(name)
                if prod is not None and prod.opcode == "parameter" and scope is comp:
                    continue
                if prod is not None and (prod.frame or prod.op_name):
                    return prod, " [its operand's source]"
        return ins, ""

    def source(self, ins: Instr) -> str:
        """The innermost frame of this repository's code in the op's stack, else the innermost
        frame at all, as 'path:line (function)'."""
        fid, first, seen = ins.frame, None, set()
        while fid and fid in self.m.frames and fid not in seen:
            seen.add(fid)
            path, line, fn, parent = self.m.frames[fid]
            short = _short_path(path, self.root)
            here = f"{short}:{line} ({fn})"
            first = first or here
            if not short.startswith(("/", "site-packages")) and "site-packages" not in path:
                return here
            fid = parent
        return first or "(no source: inserted by XLA)"

    def boundary_bytes(self, ins: Instr, comp: Computation) -> float:
        """HBM bytes that `ins` reads and writes once."""
        if ins.opcode == "copy-start":  # HBM <-> on-chip: the side that is in HBM
            src = sum(a.bytes for o in ins.operands for a in _arrays(comp, o) if a.space == 0)
            dst = ins.arrays[1].bytes if len(ins.arrays) > 1 and ins.arrays[1].space == 0 else 0
            return src + dst
        out = sum(a.bytes for a in ins.arrays if a.space == 0)
        if ins.opcode != "fusion":
            return out + sum(
                a.bytes for o in ins.operands for a in _arrays(comp, o) if a.space == 0
            )
        inner = self.m.computations.get(ins.attr("calls") or "")
        if inner is None:
            return out
        users = defaultdict(list)
        for i in inner.instrs:
            for o in i.operands:
                users[o].append(i)
        params = {_param_number(i): i for i in inner.instrs if i.opcode == "parameter"}
        read = 0.0
        for k, name in enumerate(ins.operands):
            hbm = sum(a.bytes for a in _arrays(comp, name) if a.space == 0)
            p = params.get(k)
            if not hbm or p is None:
                continue
            uses = _through_views(p.name, users)
            if uses and all(u.opcode in _SLICES and u.operands[0] in _views(p.name, users)
                            for u in uses):  # fmt: skip
                read += min(hbm, sum(sum(a.bytes for a in u.arrays) for u in uses))
            elif any(u.opcode == "dynamic-update-slice" for u in uses):
                read += 0  # updated in place: the update is counted as the write
            else:
                read += hbm
        if inner.root.opcode == "dynamic-update-slice" and len(inner.root.operands) > 1:
            update = inner.by_name.get(inner.root.operands[1])
            out = min(out, sum(a.bytes for a in update.arrays)) if update else out
        return read + out


_SPLASH = {"splash_mha_fwd": 4, "splash_mha_dq": 6, "splash_mha_dkv": 8, "splash_mha_bwd": 10}


def _arrays(comp: Computation, name: str) -> list[Array]:
    i = comp.by_name.get(name)
    return i.arrays if i is not None else []


def _views(name: str, users) -> set[str]:
    """`name` and the bitcasts/reshapes of it."""
    out, todo = {name}, [name]
    while todo:
        for u in users.get(todo.pop(), []):
            if u.opcode in ("bitcast", "reshape") and u.name not in out:
                out.add(u.name)
                todo.append(u.name)
    return out


def _through_views(name: str, users) -> list[Instr]:
    views = _views(name, users)
    return [u for v in views for u in users.get(v, []) if u.name not in views]


def _matmul_flops(ins: Instr, comp: Computation) -> float:
    out = ins.arrays[0].elements if ins.arrays else 0
    lhs, rhs = (_arrays(comp, o) for o in ins.operands[:2])
    if not lhs or not rhs:
        return 0.0
    if ins.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        dims = [int(d) for d in m.group(1).split(",") if d] if m else []
        return 2.0 * out * math.prod(lhs[0].dims[d] for d in dims)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not labels:
        return 0.0
    lhs_l, kernel_l, out_l = labels.groups()
    kernel, result = rhs[0].dims, ins.arrays[0].dims
    macs = result[out_l.index("b")] * kernel[kernel_l.index("o")] * kernel[kernel_l.index("i")]
    window = _window(ins.attrs)
    for d, label in enumerate(sorted(c for c in out_l if c.isdigit())):
        w = {k: v[d] for k, v in window.items()} if window else {}
        macs *= _taps(
            size_in=lhs[0].dims[lhs_l.index(label)],
            size_out=result[out_l.index(label)],
            size_k=kernel[kernel_l.index(label)],
            stride=w.get("stride", 1),
            pad_lo=w.get("pad_lo", 0),
            lhs_dilate=w.get("lhs_dilate", 1),
            rhs_dilate=w.get("rhs_dilate", 1),
        )
    return 2.0 * macs


def _window(attrs: str) -> dict[str, list[int]]:
    """A convolution's window attribute, per spatial dimension."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out = {}
    for key, value in re.findall(r"(\w+)=([\w_]+)", m.group(1) if m else ""):
        parts = value.split("x")
        if key == "pad":
            out["pad_lo"] = [int(p.split("_")[0]) for p in parts]
        elif key in ("stride", "lhs_dilate", "rhs_dilate"):
            out[key] = [int(p) for p in parts]
    return out


def _taps(*, size_in, size_out, size_k, stride, pad_lo, lhs_dilate, rhs_dilate) -> int:
    """The (output position, kernel tap) pairs of one spatial dimension that read an input
    element rather than padding or a dilation hole. XLA:TPU writes batched matmuls (attention's
    heads) as convolutions whose window runs over the batch with holes or padding, so that each
    output reads one tap: counting the window's full size would count each head many times."""
    o = np.arange(size_out)[:, None] * stride - pad_lo
    p = o + np.arange(size_k)[None, :] * rhs_dilate  # position in the dilated input
    ok = (p >= 0) & (p <= (size_in - 1) * lhs_dilate) & (p % lhs_dilate == 0)
    return int(ok.sum())


def _group_size(attrs: str) -> int:
    # mesh['a'=8,'b'=2] {'a'}, maybe with device_ids=(...) between the mesh and its axes
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len([d for d in m.group(1).split(",") if d])
    return 1


def _op_tail(op_name: str) -> str:
    """'jit(train_step)/transpose(jvp(l...e,led->l...d))/dot_general' -> 'transpose(jvp(...))/
    dot_general': whether it is forward or backward, and the JAX op."""
    parts = op_name.split("/")
    tail = parts[-1]
    grad = "backward " if any(p.startswith("transpose(") for p in parts) else ""
    return grad + tail


def _short_path(path: str, root: str) -> str:
    if path.startswith(root):
        return path[len(root) :].lstrip("/")
    if "site-packages/" in path:
        return "site-packages/" + path.split("site-packages/", 1)[1]
    return path


def _repo_root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1])

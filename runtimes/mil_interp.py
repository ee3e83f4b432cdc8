"""An executable reference of a saved Core ML package: its MIL program read back and run op by op in numpy.

Core ML itself runs only on Apple's OSes; coremltools on Linux converts and saves packages but cannot predict.
So that the *saved artifact* (not the Python that wrote it) is what tests, `edgellm eval` and the benchmark
check here, the package's program is read back with coremltools' own MIL reader (milproto.load over
model.mlmodel and the weights directory) and each op of its 'main' function is executed by the functions
below, states included (read_state / slice_update / coreml_update_state act on caller-held numpy buffers,
like an MLState). Hand-written: no library executes MIL off macOS.

Numerics follow the program's declared dtypes: every op computes in float32 and its output is rounded to
the dtype MIL declares for it (fp16 for most of the decoder), so fp16 overflow and rounding show up here
as they would on a device; matrix products accumulate in float32. Weights (const, constexpr blockwise
shift-scale, constexpr look-up tables) are materialised once at load.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BackendError, InvalidModelError, UnsupportedModelError

WEIGHTS_DIR = ("Data", "com.apple.CoreML", "weights")
CONSTEXPR = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense")


def _np_dtype(var) -> np.dtype:
    from coremltools.converters.mil.mil import types

    t = var.dtype
    if types.is_tensor(t):
        t = t.get_primitive()
    if t == types.fp16:
        return np.dtype(np.float16)
    if t == types.fp32:
        return np.dtype(np.float32)
    if t == types.bool:
        return np.dtype(bool)
    return np.dtype(np.int32) if types.is_int(t) and t not in (types.uint8, types.int8) else np.dtype(
        types.nptype_from_builtin(t))


def read_program(package: str | Path):
    """(pymil Program, spec) of a .mlpackage, read with coremltools' MIL reader (no macOS needed)."""
    from edgellm.runtimes.coreml_package import check_package, coremltools, load_spec

    coremltools()    # imported quietly, numpy checked
    from coremltools.converters.mil.frontend.milproto import load as milproto

    package = Path(package)
    check_package(package)
    spec = load_spec(package)
    if spec.WhichOneof("Type") != "mlProgram":
        raise UnsupportedModelError(f"{package}: not an ML program (a {spec.WhichOneof('Type')} model)")
    try:
        prog = milproto.load(spec, spec.specificationVersion, str(package.joinpath(*WEIGHTS_DIR)))
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise InvalidModelError(f"{package}: its program cannot be read back: {e}") from None
    if "main" not in prog.functions:
        raise InvalidModelError(f"{package}: the program has no 'main' function")
    return prog, spec


def _const_value(op) -> np.ndarray:
    val = op.outputs[0].val
    return np.asarray(val) if not isinstance(val, str) else val


def materialize(op, values: dict[str, Any]) -> np.ndarray:
    """The dense value of a constexpr op (inputs already in `values`), in its output dtype."""
    if op.op_type == "constexpr_blockwise_shift_scale":
        data = values[op.data.name].astype(np.float32)
        scale = values[op.scale.name].astype(np.float32)
        if op.offset is not None:
            data = data - _expand(values[op.offset.name].astype(np.float32), data.shape)
        out = data * _expand(scale, data.shape)
    elif op.op_type == "constexpr_lut_to_dense":
        idx, lut = values[op.indices.name].astype(np.int64), values[op.lut.name]
        if lut.shape[-1] != 1:
            raise UnsupportedModelError("vector palettization (LUT vector size > 1) is not supported by the "
                                        "interpreter")
        blocks = [np.arange(n) // (n // g) for n, g in zip(idx.shape, lut.shape[:-2])]
        grid = np.ix_(*blocks)
        out = lut[(*grid, idx, 0)]
    else:  # pragma: no cover - callers pass constexpr ops only
        raise UnsupportedModelError(f"constexpr op {op.op_type}")
    return out.astype(_np_dtype(op.outputs[0]))


def _expand(per_block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block array along each axis to `shape` (block size = dim / blocks)."""
    for axis, (n, nb) in enumerate(zip(shape, per_block.shape)):
        if n != nb:
            per_block = np.repeat(per_block, n // nb, axis=axis)
    return per_block


# -- ops ---------------------------------------------------------------------------------------------------
def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False) if x.dtype == np.float16 else x


def _slices(shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    idx, squeeze = [], []
    for a in range(len(shape)):
        st = int(stride[a]) if stride is not None else 1
        if squeeze_mask is not None and squeeze_mask[a]:
            idx.append(slice(int(begin[a]), int(begin[a]) + 1 if int(begin[a]) != -1 else None))
            squeeze.append(a)
            continue
        b = None if begin_mask is not None and begin_mask[a] else int(begin[a])
        e = None if end_mask is not None and end_mask[a] else int(end[a])
        idx.append(slice(b, e, st))
    return tuple(idx), tuple(squeeze)


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    idx, squeeze = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x[idx].copy()   # a copy: a state buffer sliced here may be updated in place later in the program
    return np.squeeze(out, axis=squeeze) if squeeze else out


def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None,
                  _inplace=False):
    out = x if _inplace else x.copy()
    idx, _ = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target = out[idx]
    out[idx] = update.reshape(target.shape)
    return out


def _reshape(x, shape):
    shape = [int(s) for s in shape]
    shape = [x.shape[a] if s == 0 and len(shape) == x.ndim else s for a, s in enumerate(shape)]
    return x.reshape(shape)


def _softmax(x, axis=-1):
    x = _f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


def _sdpa(query, key, value, attn_mask=None):
    q, k, v = _f32(query), _f32(key), _f32(value)
    scores = (q @ np.swapaxes(k, -1, -2)) * np.float32(1 / np.sqrt(q.shape[-1]))
    if attn_mask is not None:
        if attn_mask.dtype == bool:
            scores = np.where(attn_mask, scores, -np.inf)
        else:
            scores = scores + _f32(attn_mask)
    return _softmax(scores) @ v


def _linear(x, weight, bias=None, _wt=None):
    x2 = _f32(x).reshape(-1, x.shape[-1])      # one 2-D product (BLAS gemm/gemv), whatever the batch dims
    y = (x2 @ (_wt if _wt is not None else _f32(weight).T)).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + _f32(bias)


def _matmul(x, y, transpose_x=False, transpose_y=False):
    a, b = _f32(x), _f32(y)
    return (np.swapaxes(a, -1, -2) if transpose_x else a) @ (np.swapaxes(b, -1, -2) if transpose_y else b)


def _split(x, num_splits=None, split_sizes=None, axis=0):
    if split_sizes is not None:
        cuts = np.cumsum([int(s) for s in split_sizes])[:-1]
        return np.split(x, cuts, axis=int(axis))
    return np.split(x, int(num_splits), axis=int(axis))


def _reduce(fn):
    def run(x, axes=None, keep_dims=False):
        ax = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return fn(_f32(x), axis=ax, keepdims=bool(keep_dims))
    return run


def _binary(f):
    """MIL passes binary operands as x=, y=; numpy's ufuncs take them positionally."""
    return lambda x, y: f(x, y)


_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": bool, "int8": np.int8,
           "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}

OPS: dict[str, Callable[..., Any]] = {
    "add": lambda x, y: np.add(x, y), "sub": lambda x, y: np.subtract(x, y), "mul": lambda x, y: np.multiply(x, y),
    "real_div": lambda x, y: np.divide(_f32(x), _f32(y)),
    "pow": lambda x, y: np.power(_f32(x), _f32(y)),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f32(x) + np.float32(epsilon)),
    "sqrt": lambda x: np.sqrt(_f32(x)), "exp": lambda x: np.exp(_f32(x)), "square": lambda x: np.square(_f32(x)),
    "silu": lambda x: _f32(x) / (1.0 + np.exp(-_f32(x))), "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-_f32(x))),
    "cast": lambda x, dtype: x.astype(_DTYPES[str(dtype)]),
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "reduce_max": _reduce(np.max),
    "linear": _linear, "matmul": _matmul, "softmax": _softmax, "scaled_dot_product_attention": _sdpa,
    "gather": lambda x, indices, axis=0, batch_dims=0, validate_indices=False: np.take(x, indices, axis=int(axis)),
    "split": _split, "concat": lambda values, axis, interleave=False: np.concatenate(values, axis=int(axis)),
    "reshape": _reshape, "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
    "squeeze": lambda x, axes=None: np.squeeze(x, None if axes is None else tuple(int(a) for a in axes)),
    "tile": lambda x, reps: np.tile(x, [int(r) for r in reps]),
    "fill": lambda shape, value=0.0: np.full([int(s) for s in shape], value),
    "shape": lambda x: np.array(x.shape, np.int32), "identity": lambda x: x,
    "slice_by_index": _slice_by_index, "slice_update": _slice_update,
    **{name: _binary(f) for name, f in (
        ("greater_equal", np.greater_equal), ("greater", np.greater), ("less", np.less), ("less_equal", np.less_equal),
        ("equal", np.equal), ("not_equal", np.not_equal), ("logical_and", np.logical_and),
        ("logical_or", np.logical_or), ("maximum", np.maximum), ("minimum", np.minimum))},
    "logical_not": lambda x: np.logical_not(x), "select": lambda cond, a, b: np.where(cond, a, b),
}


@dataclass
class _Step:
    op_type: str
    fn: Callable[..., Any]
    args: dict[str, Any]          # parameter -> var name, list of names, or ('const', value)
    outputs: list[tuple[str, np.dtype]]
    extra: dict[str, Any]


class MilProgram:
    """The 'main' function of a saved package, ready to run: `run(inputs, states) -> outputs`."""

    def __init__(self, package: str | Path) -> None:
        self.package = Path(package)
        prog, self.spec = read_program(self.package)
        fn = prog.functions["main"]
        self.input_names = [n for n, v in fn.inputs.items() if not _is_state(v)]
        self.state_shapes = {n: (tuple(int(s) for s in v.shape), _np_dtype(v)) for n, v in fn.inputs.items()
                             if _is_state(v)}
        self.output_names = [v.name for v in fn.outputs]
        self.op_types: dict[str, int] = {}
        self.consts: dict[str, Any] = {}
        self.constexpr_ops: dict[str, Any] = {}
        self._steps: list[_Step] = []
        self._compile(fn)

    def _compile(self, fn) -> None:
        ops = list(fn.operations)
        users: dict[int, list[int]] = {}   # var -> indices of the ops reading it
        for n, op in enumerate(ops):
            for v in op.inputs.values():
                for var in (v if isinstance(v, (list, tuple)) else [v]):
                    users.setdefault(id(var), []).append(n)
        seen: set[str] = set(fn.inputs)
        packed: set[str] = set()      # inputs of constexpr ops: dropped once materialised
        var_of = {o.name: o for op in ops for o in op.outputs}
        for n, op in enumerate(ops):
            self.op_types[op.op_type] = self.op_types.get(op.op_type, 0) + 1
            for o in op.outputs:
                if o.name in seen:
                    raise InvalidModelError(f"{self.package}: the program defines {o.name!r} twice")
                seen.add(o.name)
            if op.op_type == "const":
                self.consts[op.outputs[0].name] = _const_value(op)
                continue
            if op.op_type in CONSTEXPR:
                self.consts[op.outputs[0].name] = materialize(op, self.consts)
                self.constexpr_ops[op.outputs[0].name] = op
                packed.update(v.name for v in op.inputs.values())
                continue
            args: dict[str, Any] = {}
            for k, v in op.inputs.items():
                args[k] = [x.name for x in v] if isinstance(v, (list, tuple)) else v.name
            extra: dict[str, Any] = {}
            if op.op_type in ("read_state", "coreml_update_state"):
                fn_ = None
            elif op.op_type not in OPS:
                raise UnsupportedModelError(f"{self.package}: op {op.op_type!r} is not supported by edgellm's MIL "
                                            f"interpreter")
            else:
                fn_ = OPS[op.op_type]
            if op.op_type == "linear" and args["weight"] in self.consts:   # float32 once, at load
                w = self.consts[args["weight"]]
                self.consts[args["weight"]] = w = np.ascontiguousarray(w, np.float32)
                extra["_wt"] = w.T
            if op.op_type == "slice_update" and _inplace_ok(ops, n, op.x, users):
                extra["_inplace"] = True   # the state buffer is updated in place, as Core ML does
            self._steps.append(_Step(op.op_type, fn_, args, [(o.name, _np_dtype(o)) for o in op.outputs], extra))
        for name in packed:
            if all(ops[u].op_type in CONSTEXPR for u in users.get(id(var_of[name]), [])):
                del self.consts[name]

    def new_state(self) -> dict[str, np.ndarray]:
        """Zeroed state buffers (what MLModel.make_state gives)."""
        return {n: np.zeros(shape, dtype) for n, (shape, dtype) in self.state_shapes.items()}

    def run(self, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute 'main' once; `states` buffers are read and updated in place."""
        missing = [n for n in self.input_names if n not in inputs] + [n for n in self.state_shapes if n not in states]
        if missing:
            raise BackendError(f"missing model inputs/states: {', '.join(missing)}")
        env: dict[str, Any] = dict(self.consts)
        env.update(inputs)
        state_of: dict[str, str] = {}
        for name in self.state_shapes:
            env[name] = name
        try:
            for s in self._steps:
                if s.op_type == "read_state":
                    env[s.outputs[0][0]] = states[env[s.args["input"]]]
                    continue
                if s.op_type == "coreml_update_state":
                    name = env[s.args["state"]]
                    value = env[s.args["value"]]
                    states[name] = value if value.dtype == states[name].dtype else value.astype(states[name].dtype)
                    state_of[s.outputs[0][0]] = name
                    env[s.outputs[0][0]] = states[name]
                    continue
                kw = {k: ([env[x] for x in v] if isinstance(v, list) else env[v]) for k, v in s.args.items()}
                out = s.fn(**kw, **s.extra)
                outs = out if isinstance(out, (list, tuple)) else [out]
                for (name, dtype), val in zip(s.outputs, outs):
                    val = np.asarray(val)
                    env[name] = val if val.dtype == dtype else val.astype(dtype)
        except (ValueError, IndexError) as e:
            raise BackendError(f"the Core ML program failed at a {s.op_type} op: {e}") from None
        return {n: env[n] for n in self.output_names}


def _inplace_ok(ops, n: int, x, users: dict[int, list[int]]) -> bool:
    """A slice_update may write into its input when that is a state value and every other reader of it is a
    (copying) slice_by_index that runs earlier: nothing can see the buffer change."""
    if x.op is None or x.op.op_type not in ("read_state", "coreml_update_state"):
        return False
    return all(u < n and ops[u].op_type == "slice_by_index" for u in users[id(x)] if u != n)


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)

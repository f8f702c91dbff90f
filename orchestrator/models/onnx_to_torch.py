"""A small ONNX-graph interpreter as a ``torch.nn.Module``, for tracing to TorchScript.

``OnnxGraphModule`` walks an ONNX graph's nodes in order and runs each through the
torch op that implements it. Weights (``Constant`` nodes and initializers) become
buffers, so ``module.to(torch.bfloat16)`` casts them; constants that only shape the
computation (a Reshape target, Split sizes, Resize scales, Clip bounds) become plain
Python values that the trace records as constants.

It covers exactly the op sets of the models folio runs through it: the layout models it
ships (PP-PicoDet exported by paddle2onnx, opset 13) and rapidocr's DB text-line detector
(PP-OCRv6 small, opset 11: its forward pass on a GPU, ``orchestrator.stages.textlines``),
and refuses any other op by name, so a new model fails at build time, never at serving
time. It deliberately avoids onnx2torch, which imports
torchvision (not installable beside the CPU torch folio pins).

Usage::

    model = onnx.load("layout_cdla.onnx")
    module = OnnxGraphModule(model, dynamic_batch=True).eval()
    traced = trace_module(module, example)          # example: (2, 3, 800, 608) float32
    bf16 = trace_module(CastIO(module, torch.bfloat16), example)

``dynamic_batch=True`` turns Reshape targets whose first entry is the file's fixed batch
size (``[1, C, -1]``) into ``[0, C, -1]`` (ONNX "copy this dimension from the input"), so
the traced module runs at any batch size.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

__all__ = [
    "SUPPORTED_OPS",
    "CastIO",
    "OnnxGraphModule",
    "UnsupportedOnnxGraph",
    "onnx_op_set",
    "quiet_jit_deprecation",
    "trace_module",
]


class UnsupportedOnnxGraph(ValueError):
    """The ONNX graph uses an op, attribute or dynamic input this interpreter does not cover."""


# Clip and Resize took attributes (or other inputs) before opset 11; Split's sizes are an
# attribute before 13 and an input from 13 on (both read).
MIN_OPSET = 11
# Inputs that must be compile-time constants, by op: they become Python values.
_STATIC_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}),
    "Split": frozenset({1}),
    "Resize": frozenset({1, 2, 3}),
    "Clip": frozenset({1, 2}),
    "ReduceMean": frozenset({1}),  # axes: an input from opset 18
}


@dataclass(slots=True)
class _Step:
    op: str
    inputs: list[str]  # tensor inputs (graph values or constants)
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


def onnx_op_set(model: onnx.ModelProto) -> dict[str, int]:
    """Op types used by the main graph, with their counts (for inspection and tests)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        out[attr.name] = value
    return out


def _sanitize(name: str, index: int) -> str:
    return f"w{index}_" + "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


class OnnxGraphModule(nn.Module):
    """Runs one ONNX graph with torch ops; positional inputs, tuple of outputs.

    Only the ops in ``SUPPORTED_OPS`` are accepted; anything else raises
    ``UnsupportedOnnxGraph`` at construction. With ``fuse`` (the default), a
    BatchNormalization that follows a Conv is folded into the Conv's weights, and the
    exported hard-swish pattern ``x * Clip(x + 3, 0, 6) / 6`` runs as one ``F.hardswish``:
    fewer passes over memory, same results to float rounding.
    """

    def __init__(
        self, model: onnx.ModelProto, *, dynamic_batch: bool = True, fuse: bool = True
    ) -> None:
        super().__init__()
        graph = model.graph
        opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None
        )
        if opset is None or opset < MIN_OPSET:
            raise UnsupportedOnnxGraph(
                f"ONNX opset {opset} is not supported (needs >= {MIN_OPSET}: the input "
                "layout of Clip and Resize changed before it)"
            )
        constants: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in graph.initializer
        }
        nodes = []
        for node in graph.node:
            if node.op_type == "Constant":
                attrs = _attrs(node)
                if "value" not in attrs:
                    raise UnsupportedOnnxGraph(
                        f"Constant node {node.name!r}: only the 'value' attribute is supported"
                    )
                constants[node.output[0]] = numpy_helper.to_array(attrs["value"])
            else:
                nodes.append(node)

        foreign = sorted({f"{n.domain}::{n.op_type}" for n in nodes
                          if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise UnsupportedOnnxGraph(f"ops outside the ONNX domain: {', '.join(foreign)}")
        unsupported = sorted({n.op_type for n in nodes} - set(SUPPORTED_OPS))
        if unsupported:
            raise UnsupportedOnnxGraph(f"unsupported ONNX ops: {', '.join(unsupported)}")

        init_names = set(constants)
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in init_names]
        self.output_names: list[str] = [o.name for o in graph.output]
        fixed_batch = _fixed_batch(graph, self.input_names)

        steps: list[_Step] = []
        for node in nodes:
            attrs = _attrs(node)
            static = _STATIC_INPUTS.get(node.op_type, frozenset())
            inputs: list[str] = []
            for pos, name in enumerate(node.input):
                if pos in static:
                    if name and name not in constants:
                        raise UnsupportedOnnxGraph(
                            f"{node.op_type} node {node.name!r}: input {pos} ({name!r}) "
                            "must be a constant"
                        )
                    attrs[f"_in{pos}"] = constants[name].tolist() if name else None
                else:
                    inputs.append(name)
            while inputs and not inputs[-1]:
                inputs.pop()  # absent trailing optional inputs
            if "" in inputs:
                raise UnsupportedOnnxGraph(
                    f"{node.op_type} node {node.name!r}: absent optional tensor inputs "
                    "before present ones are not supported"
                )
            step = _Step(node.op_type, inputs, list(node.output), attrs)
            _prepare(step, fixed_batch if dynamic_batch else None)
            steps.append(step)
        if fuse:
            steps = _fold_batchnorm(steps, constants, self.output_names)
            steps = _fuse_hardswish(steps, constants, self.output_names)
        self._steps = steps

        # Constants that steps read as tensors become buffers (cast by module.to(dtype)).
        tensor_uses = {name for step in steps for name in step.inputs if name in constants}
        self._buffer_of: dict[str, str] = {}
        for index, (name, array) in enumerate(constants.items()):
            if name not in tensor_uses:
                continue
            attr = _sanitize(name, index)
            self.register_buffer(attr, torch.from_numpy(np.array(array, copy=True)))
            self._buffer_of[name] = attr

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs, got {len(inputs)}")
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs, strict=True))
        for step in self._steps:
            args = [self._value(env, name) for name in step.inputs]
            result = _OPS[step.op](args, step.attrs)
            if isinstance(result, torch.Tensor):
                env[step.outputs[0]] = result
            else:
                for name, tensor in zip(step.outputs, result, strict=True):
                    env[name] = tensor
        return tuple(env[name] for name in self.output_names)

    def _value(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        found = env.get(name)
        if found is not None:
            return found
        buffer: torch.Tensor = getattr(self, self._buffer_of[name])
        return buffer


def _fixed_batch(graph: onnx.GraphProto, input_names: Sequence[str]) -> int | None:
    for value in graph.input:
        if value.name in input_names:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                return int(dims[0].dim_value)
    return None


def _uses(steps: Sequence[_Step], graph_outputs: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {name: 1 for name in graph_outputs}
    for step in steps:
        for name in step.inputs:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _fold_batchnorm(
    steps: list[_Step], constants: dict[str, np.ndarray], graph_outputs: Sequence[str]
) -> list[_Step]:
    """Conv -> BatchNormalization (inference, constant statistics) becomes one Conv."""
    uses = _uses(steps, graph_outputs)
    producer = {out: step for step in steps for out in step.outputs}
    removed: set[int] = set()
    for bn in steps:
        if bn.op != "BatchNormalization":
            continue
        conv = producer.get(bn.inputs[0])
        if (
            conv is None
            or conv.op != "Conv"
            or uses.get(bn.inputs[0]) != 1
            or not all(name in constants for name in conv.inputs[1:] + bn.inputs[1:])
        ):
            continue
        weight = constants[conv.inputs[1]].astype(np.float64)
        out_channels = weight.shape[0]
        bias = (
            constants[conv.inputs[2]].astype(np.float64)
            if len(conv.inputs) > 2 and conv.inputs[2]
            else np.zeros(out_channels)
        )
        gamma, beta, mean, var = (constants[n].astype(np.float64) for n in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + bn.attrs["epsilon"])
        dtype = constants[conv.inputs[1]].dtype
        w_name, b_name = f"{bn.outputs[0]}::folded_w", f"{bn.outputs[0]}::folded_b"
        constants[w_name] = (weight * scale.reshape(-1, 1, 1, 1)).astype(dtype)
        constants[b_name] = ((bias - mean) * scale + beta).astype(dtype)
        conv.inputs = [conv.inputs[0], w_name, b_name]
        conv.outputs = list(bn.outputs[:1])
        removed.add(id(bn))
    return [step for step in steps if id(step) not in removed]


def _scalar(constants: dict[str, np.ndarray], name: str) -> float | None:
    value = constants.get(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(-1)[0])


def _fuse_hardswish(
    steps: list[_Step], constants: dict[str, np.ndarray], graph_outputs: Sequence[str]
) -> list[_Step]:
    """``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` (paddle2onnx's hard-swish) -> HardSwish(x)."""
    uses = _uses(steps, graph_outputs)
    producer = {out: step for step in steps for out in step.outputs}
    removed: set[int] = set()
    for div in steps:
        if div.op != "Div" or _scalar(constants, div.inputs[1]) != 6.0:
            continue
        mul = producer.get(div.inputs[0])
        if mul is None or mul.op != "Mul" or uses.get(div.inputs[0]) != 1:
            continue
        for x_name, clip_name in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            clip = producer.get(clip_name)
            if (
                clip is None
                or clip.op != "Clip"
                or uses.get(clip_name) != 1
                or (clip.attrs["min"], clip.attrs["max"]) != (0.0, 6.0)
            ):
                continue
            add = producer.get(clip.inputs[0])
            if add is None or add.op != "Add" or uses.get(clip.inputs[0]) != 1:
                continue
            if not (
                (add.inputs[0] == x_name and _scalar(constants, add.inputs[1]) == 3.0)
                or (add.inputs[1] == x_name and _scalar(constants, add.inputs[0]) == 3.0)
            ):
                continue
            removed.update({id(add), id(clip), id(mul)})
            div.op, div.inputs, div.attrs = "HardSwish", [x_name], {}
            break
    return [step for step in steps if id(step) not in removed]


def _prepare(step: _Step, fixed_batch: int | None) -> None:
    """Check attributes once, and turn static inputs into the op's Python arguments."""
    a = step.attrs
    if step.op == "Reshape":
        shape = [int(s) for s in a.pop("_in1")]
        if a.get("allowzero", 0):
            raise UnsupportedOnnxGraph("Reshape with allowzero=1 is not supported")
        if fixed_batch is not None and shape and shape[0] == fixed_batch:
            shape[0] = 0  # copy the batch dimension from the input: dynamic batch
        a["shape"] = shape
    elif step.op == "Split":
        sizes = a.pop("_in1", None)
        if sizes is None:
            sizes = a.pop("split", None)  # before opset 13: an attribute
        if sizes is None:
            raise UnsupportedOnnxGraph("Split without explicit sizes is not supported")
        a["sizes"] = [int(s) for s in sizes]
        a.setdefault("axis", 0)
    elif step.op == "Clip":
        lo, hi = a.pop("_in1", None), a.pop("_in2", None)
        a["min"] = None if lo is None else float(lo)
        a["max"] = None if hi is None else float(hi)
    elif step.op == "Resize":
        a.pop("_in1", None)  # roi: only used by tf_crop_and_resize
        scales, sizes = a.pop("_in2", None), a.pop("_in3", None)
        mode = a.get("mode", "nearest")
        ctm = a.get("coordinate_transformation_mode", "half_pixel")
        if mode != "nearest" or ctm != "asymmetric" or a.get("nearest_mode", "floor") != "floor":
            raise UnsupportedOnnxGraph(
                f"Resize mode={mode} coordinate_transformation_mode={ctm} is not supported "
                "(only nearest/asymmetric/floor)"
            )
        if scales:
            if [float(s) for s in scales[:2]] != [1.0, 1.0]:
                raise UnsupportedOnnxGraph("Resize of batch or channel axes is not supported")
            a["scale_factor"] = tuple(float(s) for s in scales[2:])
            a["size"] = None
        elif sizes:
            a["scale_factor"] = None
            a["size"] = tuple(int(s) for s in sizes[2:])
        else:
            raise UnsupportedOnnxGraph("Resize needs constant scales or sizes")
    elif step.op == "Conv":
        if len(a.get("kernel_shape", [0, 0])) != 2:
            raise UnsupportedOnnxGraph("only 2-D Conv is supported")
        a["stride"] = [int(s) for s in a.get("strides", [1, 1])]
        a["dilation"] = [int(d) for d in a.get("dilations", [1, 1])]
        a["groups"] = int(a.get("group", 1))
        pads = _pads(step)
        if pads[:2] == pads[2:]:
            a["padding"], a["pre_pad"] = pads[:2], None
        else:
            a["padding"], a["pre_pad"] = [0, 0], _pad_pairs(pads)
    elif step.op == "ConvTranspose":
        if len(a.get("kernel_shape", [0, 0])) != 2:
            raise UnsupportedOnnxGraph("only 2-D ConvTranspose is supported")
        if a.get("auto_pad", "NOTSET") != "NOTSET" or "output_shape" in a:
            raise UnsupportedOnnxGraph("ConvTranspose auto_pad and output_shape are not "
                                       "supported")
        pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
        if pads[:2] != pads[2:]:
            raise UnsupportedOnnxGraph("ConvTranspose with uneven pads is not supported")
        a["padding"] = pads[:2]
        a["stride"] = [int(s) for s in a.get("strides", [1, 1])]
        a["dilation"] = [int(d) for d in a.get("dilations", [1, 1])]
        a["output_padding"] = [int(p) for p in a.get("output_padding", [0, 0])]
        a["groups"] = int(a.get("group", 1))
    elif step.op == "MaxPool":
        if len(a["kernel_shape"]) != 2 or a.get("storage_order", 0) or len(step.outputs) > 1:
            raise UnsupportedOnnxGraph("only 2-D MaxPool without indices is supported")
        a["kernel"] = [int(k) for k in a["kernel_shape"]]
        a["stride"] = [int(s) for s in a.get("strides", [1, 1])]
        a["dilation"] = [int(d) for d in a.get("dilations", [1, 1])]
        a["ceil_mode"] = bool(a.get("ceil_mode", 0))
        pads = _pads(step)
        a["pre_pad"] = _pad_pairs(pads) if any(pads) else None
    elif step.op == "ReduceMean":
        axes = a.pop("_in1", None)
        axes = a.get("axes") if axes is None else axes
        if axes is None:
            raise UnsupportedOnnxGraph("ReduceMean over every axis is not supported")
        a["axes"] = [int(x) for x in axes]
        a["keepdims"] = bool(a.get("keepdims", 1))
    elif step.op == "BatchNormalization":
        a["epsilon"] = float(a.get("epsilon", 1e-5))
        if a.get("training_mode", 0):
            raise UnsupportedOnnxGraph("BatchNormalization in training mode is not supported")
    elif step.op == "Transpose":
        a["perm"] = [int(p) for p in a["perm"]]
    elif step.op == "HardSigmoid":
        a["alpha"] = float(a.get("alpha", 0.2))
        a["beta"] = float(a.get("beta", 0.5))
    elif step.op == "Concat":
        a["axis"] = int(a["axis"])


def _pads(step: _Step) -> list[int]:
    """A 2-D Conv's or pool's ONNX pads (begin, begin, end, end), ``auto_pad`` resolved:
    SAME_* is static only at stride 1 (total (kernel - 1) x dilation per axis; the odd pixel
    at the end for SAME_UPPER, at the start for SAME_LOWER)."""
    a = step.attrs
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        return [0, 0, 0, 0] if auto == "VALID" else [int(p) for p in a.get("pads", [0] * 4)]
    if auto not in ("SAME_UPPER", "SAME_LOWER") or any(int(s) != 1 for s in
                                                       a.get("strides", [1, 1])):
        raise UnsupportedOnnxGraph(f"{step.op} auto_pad={auto} is supported at stride 1 only")
    totals = [(int(k) - 1) * int(d) for k, d in
              zip(a["kernel_shape"], a.get("dilations", [1, 1]), strict=True)]
    small = [t // 2 for t in totals]
    large = [t - s for t, s in zip(totals, small, strict=True)]
    return small + large if auto == "SAME_UPPER" else large + small


def _pad_pairs(pads: list[int]) -> list[int]:
    """ONNX 2-D pads (begin h, begin w, end h, end w) as F.pad's (w begin, w end, h begin,
    h end)."""
    return [pads[1], pads[3], pads[0], pads[2]]


_Op = Callable[[list[torch.Tensor], dict[str, Any]], "torch.Tensor | Sequence[torch.Tensor]"]


def _conv(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    inp = x[0] if a["pre_pad"] is None else F.pad(x[0], a["pre_pad"])
    bias = x[2] if len(x) > 2 and x[2] is not None else None
    return F.conv2d(inp, x[1], bias, a["stride"], a["padding"], a["dilation"], a["groups"])


def _conv_transpose(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    bias = x[2] if len(x) > 2 else None
    return F.conv_transpose2d(x[0], x[1], bias, a["stride"], a["padding"], a["output_padding"],
                              a["groups"], a["dilation"])


def _max_pool(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    inp = x[0] if a["pre_pad"] is None else F.pad(x[0], a["pre_pad"], value=float("-inf"))
    return F.max_pool2d(inp, a["kernel"], a["stride"], 0, a["dilation"], a["ceil_mode"])


def _batch_norm(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    # ONNX order: X, scale, B, mean, var.
    return F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a["epsilon"])


def _clip(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    return torch.clamp(x[0], a["min"], a["max"])


def _reshape(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    t = x[0]
    shape = [t.size(i) if s == 0 else s for i, s in enumerate(a["shape"])]
    return t.reshape(shape)


def _resize(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    if a["size"] is not None:
        return F.interpolate(x[0], size=a["size"], mode="nearest")
    return F.interpolate(x[0], scale_factor=a["scale_factor"], mode="nearest")


def _global_average_pool(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    return x[0].mean(dim=list(range(2, x[0].dim())), keepdim=True)


def _hard_sigmoid(x: list[torch.Tensor], a: dict[str, Any]) -> torch.Tensor:
    # Not F.hardsigmoid: the file's alpha (0.1666667) is not exactly 1/6.
    return torch.clamp(x[0] * a["alpha"] + a["beta"], 0.0, 1.0)


SUPPORTED_OPS: dict[str, _Op] = {
    "Add": lambda x, a: torch.add(x[0], x[1]),
    "Sub": lambda x, a: torch.sub(x[0], x[1]),
    "Mul": lambda x, a: torch.mul(x[0], x[1]),
    "Div": lambda x, a: torch.div(x[0], x[1]),
    "Relu": lambda x, a: torch.relu(x[0]),
    "Sigmoid": lambda x, a: torch.sigmoid(x[0]),
    "HardSigmoid": _hard_sigmoid,
    "Clip": _clip,
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "GlobalAveragePool": _global_average_pool,
    "Concat": lambda x, a: torch.cat(x, dim=a["axis"]),
    "Split": lambda x, a: torch.split(x[0], a["sizes"], dim=a["axis"]),
    "Reshape": _reshape,
    "Transpose": lambda x, a: x[0].permute(a["perm"]),
    "Resize": _resize,
    "HardSwish": lambda x, a: F.hardswish(x[0]),
    "ConvTranspose": _conv_transpose,
    "MaxPool": _max_pool,
    "ReduceMean": lambda x, a: x[0].mean(dim=a["axes"], keepdim=a["keepdims"]),
    "Erf": lambda x, a: torch.erf(x[0]),
    "Identity": lambda x, a: x[0],
}
_OPS = SUPPORTED_OPS


class CastIO(nn.Module):
    """Runs ``inner`` in ``dtype`` behind a float32 interface: input cast in, outputs cast out."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = copy.deepcopy(inner).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.inner(x.to(self.dtype))
        return tuple(o.float() for o in outputs)


def trace_module(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` in eval mode under no_grad; the trace checker is left to callers."""
    module.eval()
    with torch.no_grad(), quiet_jit_deprecation():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    return traced


@contextlib.contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """torch 2.13 warns that TorchScript is deprecated; Triton's libtorch backend still needs it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"`torch\.jit")
        yield

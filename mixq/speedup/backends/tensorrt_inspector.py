"""Per-node precision from TensorRT's engine inspector JSON (pure functions, no ``tensorrt`` needed).

``ICudaEngine.create_engine_inspector().get_engine_information(LayerInformationFormat.JSON)``
on an engine built with ``ProfilingVerbosity.DETAILED`` gives ``{"Layers": [...]}``, one object
per engine layer (TensorRT "Engine Inspector" documentation). What this module relies on:

* ``Inputs``/``Outputs``: TensorRT 10 writes one ``"Format/Datatype"`` string per tensor
  (``"Row major linear FP32"``, ``"Thirty-two wide channel vectorized row major Int8 format"``,
  or a bare ``"Half"`` on Myelin layers); TensorRT 11 splits it into ``"DataType"`` and
  ``"Format"``.
* ``Weights``: ``{"Type": "Int8", "Count": n}`` on Cask convolutions. Myelin layers (``__myl_``
  names, types ``kgen``/``gemm``/...) list their weights as extra *inputs* named like
  ``__mye116_dconst`` instead (Torch-TensorRT "Mixed precision" guide, recorded layer logs).
* ``Metadata``: the ONNX parser tags each layer ``[ONNX Layer: <node>]``, or
  ``[ONNX Layer: <node> | Local Function: <F>]`` inside an ONNX local function, truncated in
  the middle at 4000 characters (onnx-tensorrt ``importerUtils.cpp``, ``processMetadata``);
  fused layers join their entries with ASCII separators (0x1E/0x1F).
* Without metadata (TensorRT 8.x engines, or Myelin layers with an empty one) the layer name is
  ``"a + b + PWN(c)"``; Myelin's own names (``__myl_...``) name no ONNX node.

A node that no layer maps is absent from the result: callers report it ``"unknown"``, never
``"fp32"`` (see :func:`with_unmapped`).
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, Iterable, List, Optional

from .base import PRECISION_ORDER, UNKNOWN

# one complete metadata entry; a truncated one (no '[' or no ']') does not match
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\[\]\x1e\x1f]+)\]")
_TRUNCATION = " ... "  # what the parser puts in place of the middle of metadata over 4000 characters
_FOREIGN_NODE = re.compile(r"^\{?ForeignNode\[(.*)\]\}?$")
# Myelin constants (weights, biases) listed as layer inputs
_CONSTANT_INPUT = re.compile(r"(dconst$|constant)", re.IGNORECASE)
# layers that only move data between layouts or streams: they carry no compute precision
_DATA_MOVEMENT_LAYER_TYPES = {"reformat", "noop", "signal", "wait"}


def precision_of_type(text: str) -> Optional[str]:
    """'int8' | 'fp16' | 'fp32' for a TensorRT data type or format description, else None.

    Accepts plain type names (``Int8``, ``UInt8``, ``Half``, ``BFloat16``, ``Float``) and the long
    format strings. Index types (Int32/Int64), Bool and FP8/FP4 give None; BFloat16 counts as
    'fp16' (the report has no separate bf16 entry).
    """
    low = text.lower()
    if re.search(r"\bu?int8\b", low):
        return "int8"
    if re.search(r"\b(half|fp16|b?float16|bf16)\b", low):
        return "fp16"
    if re.search(r"\b(float|fp32)\b", low):
        return "fp32"
    return None


def _tensor_precision(tensor: Dict[str, Any]) -> Optional[str]:
    """Precision of one ``Inputs``/``Outputs`` entry; the explicit ``DataType`` (TensorRT 11) wins."""
    for key in ("DataType", "Format/Datatype", "Format/DataType", "Format"):
        value = tensor.get(key)
        if isinstance(value, str):
            found = precision_of_type(value)
            if found is not None:
                return found
    return None


def _narrowest(precisions: Iterable[Optional[str]]) -> Optional[str]:
    known = [p for p in precisions if p is not None]
    return min(known, key=PRECISION_ORDER.__getitem__) if known else None


def layer_precision(layer: Dict[str, Any]) -> Optional[str]:
    """The precision a layer computes in.

    That of its first activation input with a float/int8 type (shape tensors and booleans are
    skipped), narrowed by the type of its weights when those are narrower: the embedded
    ``Weights`` entry, or the constant inputs of a Myelin layer. A convolution that reads fp32
    and converts it itself (a fused Cast) still runs on fp16 weights.
    """
    activation, constants = None, []
    for tensor in layer.get("Inputs") or []:
        if not isinstance(tensor, dict):
            continue
        precision = _tensor_precision(tensor)
        if _CONSTANT_INPUT.search(str(tensor.get("Name", ""))):
            constants.append(precision)
        elif activation is None and precision is not None:
            activation = precision
    weights = layer.get("Weights")
    if isinstance(weights, dict) and isinstance(weights.get("Type"), str):
        constants.append(precision_of_type(weights["Type"]))
    if activation is None:
        return None
    narrow = _narrowest(constants)
    return narrow if narrow is not None and PRECISION_ORDER[narrow] < PRECISION_ORDER[activation] else activation


def _names_from_layer_name(name: str) -> List[str]:
    """ONNX node names in a fused layer name (``"a + b + PWN(PWN(c, d), e)"``, ``"{ForeignNode[a...z]}"``)."""
    if name.startswith("__myl_") or name.startswith("Reformatting CopyNode"):
        return []
    foreign = _FOREIGN_NODE.match(name.strip())
    core = foreign.group(1) if foreign else name
    names = []
    for token in re.split(r" \+ |\.\.\.|, ", core):
        token = token.strip()
        while token.startswith("PWN("):
            token = token[4:]
        token = token.rstrip(")") if token.count(")") > token.count("(") else token
        if token:
            names.append(token)
    return names


def layer_onnx_nodes(layer: Dict[str, Any]) -> List[str]:
    """ONNX node names fused into one engine layer: from ``Metadata`` when it names any, else
    from the layer name."""
    metadata = layer.get("Metadata")
    if isinstance(metadata, str):
        names = [entry.split(" | ")[0].strip() for entry in _ONNX_LAYER.findall(metadata)
                 if _TRUNCATION not in entry]
        names = [n for n in names if n]
        if names:
            return names
    name = layer.get("Name")
    return _names_from_layer_name(name) if isinstance(name, str) else []


def _is_data_movement(layer: Dict[str, Any]) -> bool:
    layer_type = str(layer.get("LayerType", "")).lower()
    name = str(layer.get("Name", ""))
    return layer_type in _DATA_MOVEMENT_LAYER_TYPES or name.startswith("Reformatting CopyNode")


def load_layers(text: str) -> List[Dict[str, Any]]:
    """The ``Layers`` list of inspector JSON; a clear ``ValueError`` for anything else."""
    try:
        info = json.loads(text, strict=False)  # TensorRT may write separators as raw control characters
    except ValueError as exc:
        raise ValueError(f"engine inspector output is not valid JSON: {exc}") from exc
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        raise ValueError("engine inspector output has no 'Layers' list")
    if layers and not all(isinstance(layer, dict) for layer in layers):
        raise ValueError(
            "engine inspector reports layer names only: the engine was built without "
            "ProfilingVerbosity.DETAILED, so per-layer precisions are unknown; rebuild it")
    return layers


def precisions_from_inspector_json(text: str) -> Dict[str, str]:
    """Map ONNX node name -> 'int8' | 'fp16' | 'fp32' from ``get_engine_information(JSON)``.

    Each compute layer's precision (:func:`layer_precision`) goes to every ONNX node fused into
    it; reformat/no-op layers are skipped. A node found in several layers gets the widest
    precision among them, so it is 'int8' only if all of it ran in int8. Nodes no layer names
    are absent.
    """
    result: Dict[str, str] = {}
    for layer in load_layers(text):
        if _is_data_movement(layer):
            continue
        precision = layer_precision(layer)
        if precision is None:
            continue
        for node in layer_onnx_nodes(layer):
            old = result.get(node)
            if old is None or PRECISION_ORDER[precision] > PRECISION_ORDER[old]:
                result[node] = precision
    return result


def with_unmapped(precisions: Dict[str, str], nodes: Iterable[str]) -> Dict[str, str]:
    """``precisions`` plus ``'unknown'`` for each of ``nodes`` the inspector did not map."""
    result = dict(precisions)
    for node in nodes:
        result.setdefault(node, UNKNOWN)
    return result
